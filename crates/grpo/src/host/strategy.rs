//! The epoch loop of a hosted GRPO run, as a burn-train custom training strategy.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use burn::data::dataloader::Progress;
use burn::module::AutodiffModule;
use burn::optim::lr_scheduler::LrScheduler;
use burn::optim::{GradientsAccumulator, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::train::checkpoint::CheckpointingAction;
use burn::train::{
    EventProcessorTraining, InferenceStep, Learner, LearnerEvent, LearningComponentsMarker,
    SupervisedLearningStrategy, SupervisedTrainingEventProcessor, TrainLoader, TrainingComponents,
    TrainingItem, ValidLoader,
};

use std::sync::{Arc, Mutex};

use super::health::{CollapseWatch, Health, Verdict};
use super::record::StepRecord;
use super::store::{remove_checkpoint, write_state, KeepLast, RunState, WriteLog};
use super::tensorboard::EventWriter;
use super::GrpoPolicy;
use crate::learner::{clip_global_norm, weights_finite};

/// How the loop runs; see [`super::HostOptions`] for the meaning of each field.
#[derive(Debug, Clone)]
pub struct GrpoStrategy {
    pub total_steps: usize,
    pub accumulation: usize,
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    pub existing_checkpoints: Vec<usize>,
    pub eval_every: usize,
    /// Data-parallel workers, recorded with each checkpoint.
    pub workers: usize,
    /// Several nodes: the optimizer step's gradients are summed over them once, after its
    /// micro-batches ([`crate::nodes::sum_gradients`]).
    pub exchange: Option<Arc<dyn crate::nodes::Exchange>>,
    pub max_grad_norm: f32,
    pub seed: u64,
    pub train_dir: PathBuf,
    pub metrics_jsonl: PathBuf,
    pub log_file: PathBuf,
    /// Print one progress line per step on stderr (when no dashboard is shown).
    pub progress_lines: bool,
    /// Non-finite steps in a row that stop the run.
    pub max_bad_steps: usize,
    /// Why the run stopped on its own, for the caller.
    pub fatal: Arc<Mutex<Option<Fatal>>>,
    /// Where the checkpoint recorder reports the files it finished.
    pub writes: WriteLog,
    /// The run's TensorBoard event file, when it writes one (shared with the train step,
    /// which adds the sampled completions).
    pub board: Arc<Mutex<Option<EventWriter>>>,
}

/// Why a hosted run stopped on its own.
#[derive(Debug, Clone, PartialEq)]
pub enum Fatal {
    /// Non-finite steps or weights.
    Diverged(String),
    /// A checkpoint could not be written (disk full, I/O error).
    Storage(String),
}

type Lc<B, LR, O> = LearningComponentsMarker<B, LR, GrpoPolicy<B>, O>;

struct Logs {
    jsonl: File,
    log: File,
    board: Arc<Mutex<Option<EventWriter>>>,
    echo: bool,
    /// Lines (or events) that could not be written, per file (each first failure is said at
    /// once).
    lost_json: usize,
    lost_log: usize,
    lost_events: usize,
}

impl Logs {
    fn open(s: &GrpoStrategy) -> std::io::Result<Self> {
        let append = |p: &PathBuf| OpenOptions::new().create(true).append(true).open(p);
        Ok(Self {
            jsonl: append(&s.metrics_jsonl)?,
            log: append(&s.log_file)?,
            board: s.board.clone(),
            echo: s.progress_lines,
            lost_json: 0,
            lost_log: 0,
            lost_events: 0,
        })
    }

    /// The record's values as TensorBoard scalars at its step: `train/<key>`, held-out
    /// evaluations (`valid_*`) as `eval/<key>`.
    fn events(&mut self, rec: &StepRecord) {
        let mut board = self.board.lock().expect("event file");
        let Some(w) = board.as_mut() else {
            return;
        };
        let step = rec.get("step").unwrap_or(0.0) as u64;
        let tags: Vec<(String, f64)> = rec
            .values
            .iter()
            .filter(|(k, _)| k != "step")
            .map(|(k, v)| match k.strip_prefix("valid_") {
                Some(k) => (format!("eval/{k}"), *v),
                None => (format!("train/{k}"), *v),
            })
            .collect();
        let values: Vec<(&str, f64)> = tags.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        if let Err(e) = w.scalars(step, &values) {
            self.lost_events += 1;
            if self.lost_events == 1 {
                eprintln!(
                    "warning: a TensorBoard event could not be written to {}: {e}",
                    w.path().display()
                );
            }
        }
    }

    fn json(&mut self, rec: &StepRecord) {
        self.events(rec);
        let written = writeln!(self.jsonl, "{}", rec.to_json()).and_then(|_| self.jsonl.flush());
        if let Err(e) = written {
            self.lost_json += 1;
            if self.lost_json == 1 {
                eprintln!("warning: a metrics.jsonl line could not be written: {e}");
            }
        }
    }

    fn line(&mut self, text: &str) {
        let written = writeln!(self.log, "{text}").and_then(|_| self.log.flush());
        if let Err(e) = written {
            self.lost_log += 1;
            if self.lost_log == 1 {
                eprintln!("warning: a train.log line could not be written: {e}");
            }
        }
        if self.echo {
            eprintln!("{text}");
        }
    }

    /// Says how many lines were lost, if any.
    fn finish(&self) {
        for (lost, file) in [
            (self.lost_json, "metrics.jsonl"),
            (self.lost_log, "train.log"),
            (self.lost_events, "the TensorBoard event file"),
        ] {
            if lost > 0 {
                eprintln!("warning: {lost} line(s) of {file} could not be written");
            }
        }
    }
}

fn progress_line(rec: &StepRecord, total: usize, eta_s: f64) -> String {
    let g = |k: &str| rec.get(k).unwrap_or(f64::NAN);
    let mut s = format!(
        "step {:>5}/{total} | reward {:.3} ± {:.3}",
        g("step") as usize,
        g("reward_mean"),
        g("reward_std")
    );
    for (k, v) in &rec.values {
        if let Some(name) = k.strip_prefix("reward/") {
            s += &format!(" | {name} {v:.3}");
        }
    }
    s += &format!(
        " | kl {:.4} | len {:.1} | lr {:.2e} | gnorm {:.3} | {:.0} tok/s | {:.1} s/step | eta {}",
        g("kl"),
        g("completion_len_mean"),
        g("lr"),
        g("grad_norm"),
        g("tokens_per_s"),
        g("step_seconds"),
        eta(eta_s)
    );
    s
}

fn eta(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

impl<B, LR, O> SupervisedLearningStrategy<Lc<B, LR, O>> for GrpoStrategy
where
    B: AutodiffBackend,
    LR: LrScheduler + 'static,
    O: Optimizer<GrpoPolicy<B>, B> + 'static,
{
    fn fit(
        &self,
        components: TrainingComponents<Lc<B, LR, O>>,
        mut learner: Learner<Lc<B, LR, O>>,
        train: TrainLoader<Lc<B, LR, O>>,
        valid: ValidLoader<Lc<B, LR, O>>,
        starting_epoch: usize,
    ) -> (
        GrpoPolicy<B>,
        SupervisedTrainingEventProcessor<Lc<B, LR, O>>,
    ) {
        // Checkpoint "epochs" are optimizer steps: resuming from checkpoint k starts at k + 1.
        let start = starting_epoch.saturating_sub(1);
        let acc = self.accumulation.max(1);
        let every = self.checkpoint_every.max(1);
        let mut processor = components.event_processor;
        let mut checkpointer = components.checkpointer;
        let interrupter = components.interrupter;
        let mut logs = Logs::open(self).unwrap_or_else(|e| {
            panic!(
                "cannot open {} for the metrics log: {e}",
                self.metrics_jsonl.display()
            )
        });
        let mut states = KeepLast::new(self.keep_checkpoints, self.existing_checkpoints.clone());
        let total_micro = train.num_items();
        let train = if start > 0 {
            train.slice((start * acc).min(total_micro), total_micro)
        } else {
            train
        };
        let mut batches = train.iter();
        let epochs = self.total_steps.div_ceil(every);
        let began = Instant::now();
        let mut last_saved = start;
        if start > 0 {
            logs.line(&format!("resumed at step {start}"));
        }
        let mut health = Health::new(self.max_bad_steps);
        let mut collapse = CollapseWatch::new(5);
        for step in start..self.total_steps {
            let t0 = Instant::now();
            learner.lr_step();
            let mut records = Vec::with_capacity(acc);
            let mut accumulator = GradientsAccumulator::new();
            let mut grads = None;
            for _ in 0..acc {
                let Some(batch) = batches.next() else {
                    panic!("the step plan ended before step {step}");
                };
                let out = learner.train_step(batch);
                records.push(out.item);
                if acc == 1 {
                    grads = Some(out.grads);
                } else {
                    accumulator.accumulate(&learner.model(), out.grads);
                }
            }
            let mut grads = grads.unwrap_or_else(|| accumulator.grads());
            let model = learner.model();
            if let Some(ex) = &self.exchange {
                grads = crate::nodes::sum_gradients(ex.as_ref(), &model.policy, grads, Vec::new())
                    .unwrap_or_else(|e| panic!("step {}: {e}", step + 1))
                    .0;
            }
            let grad_norm = clip_global_norm(&model.policy, &mut grads, self.max_grad_norm);
            let merged = StepRecord::merge(&records);
            let nan = f64::NAN;
            let verdict = health.check(
                step + 1,
                merged.get("loss").unwrap_or(nan),
                grad_norm as f64,
                merged.get("reward_mean").unwrap_or(nan),
            );
            match &verdict {
                Verdict::Apply => learner.optimizer_step(grads),
                Verdict::Skip(why) | Verdict::Stop(why) => logs.line(&format!("warning: {why}")),
            }
            if let Some(w) = collapse.observe(step + 1, merged.get("reward_mean").unwrap_or(nan)) {
                logs.line(&w);
            }
            let secs = t0.elapsed().as_secs_f64();
            let mut rec = StepRecord::default();
            rec.set("step", (step + 1) as f64);
            for (k, v) in merged.values {
                rec.set(&k, v);
            }
            rec.set("skipped", (verdict != Verdict::Apply) as u8 as f64);
            rec.set("lr", learner.lr_current());
            rec.set("grad_norm", grad_norm as f64);
            rec.set(
                "tokens_per_s",
                rec.get("completion_tokens").unwrap_or(0.0) / secs.max(1e-9),
            );
            rec.set("step_seconds", secs);
            let done = step + 1 - start;
            let per_step = began.elapsed().as_secs_f64() / done as f64;
            logs.json(&rec);
            logs.line(&progress_line(
                &rec,
                self.total_steps,
                per_step * (self.total_steps - step - 1) as f64,
            ));
            let epoch = step / every + 1;
            let item = TrainingItem::new(
                rec,
                Progress {
                    items_processed: step % every + 1,
                    items_total: every,
                },
                Progress {
                    items_processed: epoch,
                    items_total: epochs,
                },
                Some(step + 1),
                Some(learner.lr_current()),
            );
            processor.process_train(LearnerEvent::ProcessedItem(item));
            if let Verdict::Stop(why) = verdict {
                *self.fatal.lock().expect("fatal") = Some(Fatal::Diverged(why));
                break;
            }

            let steps_done = step + 1;
            let stop = interrupter.should_stop();
            let boundary = steps_done % every == 0 || steps_done == self.total_steps;
            if boundary {
                processor.process_train(LearnerEvent::EndEpoch(epoch));
            }
            if self.eval_every > 0 && steps_done % self.eval_every == 0 && !stop {
                let means = validate::<B, LR, O>(&learner, &valid, &mut processor, epoch);
                let mut v = StepRecord::default();
                v.set("step", steps_done as f64);
                for (k, x) in &means.values {
                    v.set(&format!("valid_{k}"), *x);
                }
                logs.json(&v);
                let accuracy = means.get("accuracy").unwrap_or(f64::NAN);
                let line = match means.get("reward_mean") {
                    Some(reward) => format!(
                        "step {steps_done:>5}/{} | held-out accuracy {accuracy:.3} (sampled), \
                         reward {reward:.3}",
                        self.total_steps
                    ),
                    None => format!(
                        "step {steps_done:>5}/{} | held-out accuracy {accuracy:.3}",
                        self.total_steps
                    ),
                };
                logs.line(&line);
            }
            if (boundary || stop) && steps_done != last_saved {
                if !weights_finite(&learner.model().policy.valid()) {
                    let why = format!(
                        "step {steps_done}: the policy's weights are not all finite; no \
                         checkpoint is written and the run stops (its last checkpoint, step \
                         {last_saved}, is intact): lower grpo.learning_rate and rerun with --resume"
                    );
                    logs.line(&format!("error: {why}"));
                    *self.fatal.lock().expect("fatal") = Some(Fatal::Diverged(why));
                    break;
                }
                if let Some(ck) = checkpointer.as_mut() {
                    ck.checkpoint(&learner, steps_done, &components.event_store);
                    let state = RunState {
                        step: steps_done,
                        data_position: steps_done * acc,
                        seed: self.seed,
                        workers: self.workers,
                    };
                    let written = self.writes.wait_for(steps_done).and_then(|files| {
                        write_state(&self.train_dir, &state, &files).map_err(|e| {
                            format!("{}: {e}", self.train_dir.join("checkpoint").display())
                        })
                    });
                    if let Err(e) = written {
                        let since = if last_saved == 0 {
                            "no checkpoint was written yet: a rerun starts over".to_string()
                        } else {
                            format!("its last complete checkpoint, step {last_saved}, is intact")
                        };
                        let why = format!(
                            "the checkpoint of step {steps_done} could not be written ({e}); \
                             the run stops ({since}): free space on that disk and rerun with \
                             --resume"
                        );
                        logs.line(&format!("error: {why}"));
                        // What of it did get written is incomplete: give the space back.
                        let _ = remove_checkpoint(&self.train_dir, steps_done);
                        *self.fatal.lock().expect("fatal") = Some(Fatal::Storage(why));
                        break;
                    }
                    // The new checkpoint is complete and durable: now the old ones may go.
                    for action in states.actions(steps_done) {
                        if let CheckpointingAction::Delete(old) = action {
                            if let Err(e) = remove_checkpoint(&self.train_dir, old) {
                                logs.line(&format!(
                                    "warning: the checkpoint of step {old} could not be \
                                     deleted: {e}"
                                ));
                            }
                        }
                    }
                    last_saved = steps_done;
                    logs.line(&format!("checkpoint at step {steps_done}"));
                }
            }
            if stop {
                let why = interrupter
                    .get_message()
                    .unwrap_or_else(|| "stopped".into());
                logs.line(&format!("interrupted after step {steps_done}: {why}"));
                break;
            }
        }
        logs.finish();
        (learner.model(), processor)
    }
}

/// burn-train's validation pass over the held-out loader; returns each metric's mean over the
/// held-out questions (each batch's value weighted by its questions).
fn validate<B, LR, O>(
    learner: &Learner<Lc<B, LR, O>>,
    valid: &ValidLoader<Lc<B, LR, O>>,
    processor: &mut SupervisedTrainingEventProcessor<Lc<B, LR, O>>,
    epoch: usize,
) -> StepRecord
where
    B: AutodiffBackend,
    LR: LrScheduler + 'static,
    O: Optimizer<GrpoPolicy<B>, B> + 'static,
{
    let model = learner.model().valid();
    let mut it = valid.iter();
    let mut sums: Vec<(String, f64)> = Vec::new();
    let mut n = 0usize;
    let mut i = 0;
    while let Some(batch) = it.next() {
        i += 1;
        let count = batch.prompts.len();
        let out = InferenceStep::step(&model, batch);
        for (k, v) in &out.values {
            match sums.iter_mut().find(|(s, _)| s == k) {
                Some(slot) => slot.1 += v * count as f64,
                None => sums.push((k.clone(), v * count as f64)),
            }
        }
        n += count;
        let progress = it.progress();
        processor.process_valid(LearnerEvent::ProcessedItem(TrainingItem::new(
            out,
            progress,
            Progress {
                items_processed: epoch,
                items_total: epoch,
            },
            Some(i),
            None,
        )));
    }
    processor.process_valid(LearnerEvent::EndEpoch(epoch));
    let mut means = StepRecord::default();
    if n == 0 {
        means.set("accuracy", f64::NAN);
    }
    for (k, sum) in sums {
        means.set(&k, sum / n as f64);
    }
    means
}
