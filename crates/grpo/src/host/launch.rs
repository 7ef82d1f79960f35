//! Building and launching a hosted GRPO run.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use crate::optim::MasterAdamW;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::InMemDataset;
use burn::tensor::backend::AutodiffBackend;
use burn::train::logger::MetricLogger;
use burn::train::metric::store::{EpochSummary, MetricsUpdate, Split};
use burn::train::metric::{MetricDefinition, NumericEntry};
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};
use burn::train::{Interrupter, Learner, SupervisedTraining, TrainingStrategy};
use qwen2vl::Qwen2VL;

use super::record::StepScalar;
use super::store::{
    check_checkpoint, complete_checkpoints, latest_state, remove_checkpoint, remove_partial_writes,
    resume_point, AtomicRecorder, RunState, SaveOnly, WriteLog,
};
use super::strategy::{Fatal, GrpoStrategy};
use super::tensorboard::EventWriter;
use super::{plan, EvalBatcher, GrpoBatcher, GrpoPolicy, HostCtx};
use crate::eval::{EvalConfig, SampledEval};
use crate::learner::PromptInput;
use crate::nodes::node_prompts;
use crate::schedule::{LrSchedule, ScheduledLr};
use crate::stream::PromptSource;

/// The held-out prompts of burn-train's validation pass (`eval_every`): the first `count`
/// of `source`, prepared one batch at a time.
#[derive(Clone)]
pub struct HeldOut {
    pub source: Arc<dyn PromptSource>,
    pub count: usize,
}

impl HeldOut {
    /// No validation prompts.
    pub fn none() -> Self {
        Self::from(Vec::new())
    }
}

impl From<Vec<PromptInput>> for HeldOut {
    fn from(prompts: Vec<PromptInput>) -> Self {
        Self {
            count: prompts.len(),
            source: Arc::new(prompts),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{0}")]
    Config(String),
    /// The run diverged (non-finite steps or weights); its last checkpoint is intact.
    #[error("{0}")]
    Diverged(String),
    /// A checkpoint could not be written; the last complete one is intact.
    #[error("{0}")]
    Storage(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// AdamW's settings; the defaults are PyTorch's (burn's own defaults differ).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerOptions {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
}

impl Default for OptimizerOptions {
    fn default() -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl OptimizerOptions {
    /// AdamW with f32 master weights for bf16 parameters (on f32 parameters: Burn's AdamW).
    pub fn adamw(&self) -> MasterAdamW {
        MasterAdamW {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
        }
    }
}

/// A hosted run's shape.
#[derive(Clone)]
pub struct HostOptions {
    /// burn-train's directory: `checkpoint/` and `experiment.log`.
    pub dir: PathBuf,
    /// One JSON object per step (and per held-out evaluation).
    pub metrics_jsonl: PathBuf,
    /// The progress lines, as text.
    pub log_file: PathBuf,
    pub total_steps: usize,
    /// Prompts per micro-batch (each sampled `num_generations` times).
    pub prompts_per_step: usize,
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    /// Held-out greedy accuracy every this many steps (0: never).
    pub eval_every: usize,
    pub seed: u64,
    pub schedule: LrSchedule,
    pub optimizer: OptimizerOptions,
    pub max_grad_norm: f32,
    /// Continue from the newest complete checkpoint under `dir`.
    pub resume: bool,
    /// burn-train's terminal dashboard when stdout is a terminal; progress lines otherwise.
    pub dashboard: bool,
    pub interrupter: Option<Interrupter>,
    /// Steps in a row with a non-finite loss, gradient norm or reward that stop the run (each
    /// is skipped, weights untouched).
    pub max_bad_steps: usize,
    /// TensorBoard event files of every step's metrics (under `<dir>/train`); `None`: none.
    pub tensorboard: Option<PathBuf>,
    /// Sampled completions (prompt, completion, rewards, advantage) of every `every`-th
    /// step, one JSON object per completion, and as text to TensorBoard; `None`: none.
    pub completions: Option<CompletionLog>,
}

/// Where and how often a run writes the completions it sampled.
#[derive(Debug, Clone)]
pub struct CompletionLog {
    pub path: PathBuf,
    /// Every this many optimizer steps (0: never).
    pub every: usize,
}

/// burn-train's metric logger, replaced: its file logger writes the same numbers as
/// `metrics.jsonl` a second time and panics when the disk is full. metrics.jsonl (written by
/// the loop, failures reported) is the run's record; nothing reads these back.
struct NoMetricFiles;

impl MetricLogger for NoMetricFiles {
    fn log(&mut self, _: MetricsUpdate, _: usize, _: &Split) {}
    fn read_numeric(
        &mut self,
        name: &str,
        _: usize,
        _: &Split,
    ) -> Result<Vec<NumericEntry>, String> {
        Err(format!(
            "{name}: a hosted GRPO run keeps its metrics in metrics.jsonl"
        ))
    }
    fn log_metric_definition(&mut self, _: MetricDefinition) {}
    fn log_epoch_summary(&mut self, _: EpochSummary) {}
}

/// Renders nothing: the loop's own progress lines stand in when there is no terminal.
struct Quiet;

impl MetricsRendererTraining for Quiet {
    fn update_train(&mut self, _: MetricState) {}
    fn update_valid(&mut self, _: MetricState) {}
    fn render_train(&mut self, _: TrainingProgress, _: Vec<ProgressType>) {}
    fn render_valid(&mut self, _: TrainingProgress, _: Vec<ProgressType>) {}
}

impl MetricsRendererEvaluation for Quiet {
    fn update_test(&mut self, _: EvaluationName, _: MetricState) {}
    fn render_test(&mut self, _: EvaluationProgress, _: Vec<ProgressType>) {}
}

impl MetricsRenderer for Quiet {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, _: MetricDefinition) {}
}

/// Trains `policy` with GRPO under burn-train and returns it with the run's final state.
pub fn launch<B: AutodiffBackend>(
    policy: Qwen2VL<B>,
    ctx: HostCtx<B>,
    held_out: HeldOut,
    eval: EvalConfig,
    opts: &HostOptions,
) -> Result<(Qwen2VL<B::InnerBackend>, RunState), HostError> {
    let cfg = &ctx.cfg;
    if ctx.prompts.is_empty() {
        return Err(HostError::Config("no training prompts".into()));
    }
    if opts.prompts_per_step == 0 || opts.total_steps == 0 {
        return Err(HostError::Config(
            "prompts_per_step and steps must be at least 1".into(),
        ));
    }
    // Rollout shards of every micro-batch: the devices of every node.
    let workers = ctx.shards();
    let (nodes, rank) = ctx.node();
    let devices_here = ctx.devices().len();
    let where_ = if nodes > 1 {
        format!("{nodes} nodes x {devices_here} device(s)")
    } else {
        format!("{workers} devices")
    };
    if workers > 1 {
        if cfg.filter_groups {
            return Err(HostError::Config(format!(
                "filter_groups with {where_}: dynamic sampling rolls groups out one at a time \
                 on the main device; run it on one device"
            )));
        }
        if !opts.prompts_per_step.is_multiple_of(workers) {
            return Err(HostError::Config(format!(
                "prompts_per_step ({}) must be a multiple of the {workers} rollout shards \
                 ({where_}): each device rolls out an equal share of every micro-batch",
                opts.prompts_per_step
            )));
        }
    }
    if nodes > 1 && cfg.loss.top_entropy_quantile < 1.0 {
        return Err(HostError::Config(
            "top_entropy_quantile takes its quantile over the whole rollout's entropies, which \
             several nodes score apart: run it on one node"
                .into(),
        ));
    }
    let ni = cfg.num_iterations.max(1);
    if !opts.checkpoint_every.is_multiple_of(ni) {
        return Err(HostError::Config(format!(
            "checkpoint_every ({}) must be a multiple of num_iterations ({ni}): a checkpoint \
             cannot hold a half-used rollout",
            opts.checkpoint_every
        )));
    }
    std::fs::create_dir_all(&opts.dir).map_err(|source| HostError::Io {
        path: opts.dir.clone(),
        source,
    })?;
    remove_partial_writes(&opts.dir);
    let resume_state = if opts.resume {
        let point = resume_point(&opts.dir);
        for (step, why) in &point.damaged {
            eprintln!("the checkpoint of step {step} is damaged and is removed: {why}");
            remove_checkpoint(&opts.dir, *step).map_err(|source| HostError::Io {
                path: opts.dir.join("checkpoint"),
                source,
            })?;
        }
        if let (Some(s), false) = (&point.state, point.damaged.is_empty()) {
            eprintln!(
                "resuming from the newest intact checkpoint, step {}",
                s.step
            );
        }
        point.state
    } else {
        None
    };
    // Several nodes resume together from the newest step every one of them has (a node that
    // was stopped may have checkpointed a step the others had not).
    let resume_state = match (ctx.exchange(), opts.resume) {
        (Some(ex), true) => {
            let mine = resume_state.as_ref().map_or(0, |s| s.step);
            let mut steps = vec![0.0f32; ex.nodes()];
            steps[ex.rank()] = mine as f32;
            let common = ex
                .sum(steps)
                .map_err(|e| HostError::Config(e.to_string()))?
                .into_iter()
                .fold(mine, |m, s| m.min(s as usize));
            if common == mine {
                resume_state
            } else if common == 0 {
                eprintln!("another node has no checkpoint: every node starts from step 0");
                None
            } else {
                eprintln!(
                    "resuming from step {common}, the newest checkpoint every node has (this \
                     node's newest is step {mine})"
                );
                Some(check_checkpoint(&opts.dir, common).map_err(|why| {
                    HostError::Config(format!(
                        "the other nodes resume from step {common}, whose checkpoint here is \
                         not usable: {why}"
                    ))
                })?)
            }
        }
        _ => resume_state,
    };
    if opts.resume && resume_state.is_none() {
        eprintln!(
            "no complete checkpoint under {}: starting from step 0",
            opts.dir.display()
        );
    }
    if let Some(s) = &resume_state {
        if s.seed != opts.seed {
            return Err(HostError::Config(format!(
                "the checkpoint at step {} was made with seed {}, this run has seed {}: \
                 resuming would not continue the same run",
                s.step, s.seed, opts.seed
            )));
        }
        if s.workers != workers {
            return Err(HostError::Config(format!(
                "the checkpoint at step {} was made on {} device(s) in all, this run has \
                 {workers} ({where_}): each device draws its own shard's samples, so resuming \
                 would not continue the same run (use as many devices in all as before)",
                s.step, s.workers
            )));
        }
    }
    if let Some(ex) = ctx.exchange() {
        // Every node must run the same thing from the same step, else their sums mix steps.
        let fingerprint = format!(
            "seed: {}\nsteps: {}\nprompts per micro-batch: {}\naccumulation: {}\n\
             training prompts: {}\ndevices per node: {devices_here}\nresumes from step: {}\n\
             checkpoint every: {}\nsettings: {:?}\n",
            opts.seed,
            opts.total_steps,
            opts.prompts_per_step,
            ctx.accumulation,
            ctx.prompts.len(),
            resume_state.as_ref().map_or(0, |s| s.step),
            opts.checkpoint_every,
            ctx.cfg,
        );
        crate::nodes::check_agreement(ex, &fingerprint)
            .map_err(|e| HostError::Config(e.to_string()))?;
    }
    let micro = plan(
        ctx.prompts.len(),
        opts.prompts_per_step,
        ctx.accumulation,
        ni,
        opts.total_steps,
        opts.seed,
    );
    // Several nodes: each node's plan holds its share of every micro-batch's prompts.
    let micro = if nodes > 1 {
        let share = node_prompts(opts.prompts_per_step, nodes, devices_here, rank);
        micro
            .into_iter()
            .map(|mut m| {
                m.prompts = m.prompts[share.clone()].to_vec();
                m
            })
            .collect()
    } else {
        micro
    };
    let reward_names: Vec<String> = ctx
        .rewards
        .rewards
        .iter()
        .map(|(r, _)| r.name().to_string())
        .collect();
    ctx.set_plan(&micro);
    let resumed_from = resume_state.as_ref().map_or(0, |s| s.step);
    // The synced references a resume from any kept checkpoint may need.
    let every = ctx.cfg.ref_model_sync_steps.max(1);
    let keep = opts.checkpoint_every.max(1).div_ceil(every) * opts.keep_checkpoints.max(1) + 1;
    ctx.keep_references(opts.dir.join("reference"), keep, resumed_from)
        .map_err(HostError::Config)?;
    let ctx = Arc::new(ctx);
    // One event file per launch; a resumed run first tells TensorBoard to drop what the
    // stopped one logged past its checkpoint.
    let resumed_at = resume_state.as_ref().map_or(0, |s| s.step);
    let board = match &opts.tensorboard {
        Some(dir) => {
            let train_dir = dir.join("train");
            let io = |source| HostError::Io {
                path: train_dir.clone(),
                source,
            };
            let mut w = EventWriter::create(&train_dir).map_err(io)?;
            if resumed_at > 0 {
                w.restart(resumed_at as u64 + 1).map_err(io)?;
            }
            Some(w)
        }
        None => None,
    };
    let board = Arc::new(std::sync::Mutex::new(board));
    let train = DataLoaderBuilder::new(GrpoBatcher { ctx: ctx.clone() })
        .batch_size(1)
        .build(InMemDataset::new(micro));
    let eval_batch = eval.batch_size.max(1);
    let held_out_count = held_out.count.min(held_out.source.len());
    let sampled = ctx.cfg.num_generations_eval.map(|n| {
        Arc::new(SampledEval {
            num_generations: n,
            sampling: ctx.cfg.sampling,
            rewards: ctx.rewards.clone(),
            seed: opts.seed,
        })
    });
    let valid = DataLoaderBuilder::new(EvalBatcher {
        source: held_out.source,
        tokenizer: ctx.tokenizer.clone(),
        cfg: Arc::new(eval),
        sampled,
    })
    .batch_size(eval_batch)
    .build(InMemDataset::new(
        (0..held_out_count).collect::<Vec<usize>>(),
    ));

    let show_dashboard = opts.dashboard && std::io::stdout().is_terminal();
    let fatal = Arc::new(std::sync::Mutex::new(None));
    let existing = complete_checkpoints(&opts.dir);
    let writes = WriteLog::default();
    let strategy = GrpoStrategy {
        total_steps: opts.total_steps,
        accumulation: ctx.accumulation,
        checkpoint_every: opts.checkpoint_every.max(1),
        keep_checkpoints: opts.keep_checkpoints,
        existing_checkpoints: existing.clone(),
        eval_every: opts.eval_every,
        workers,
        exchange: ctx.exchange.clone(),
        max_grad_norm: opts.max_grad_norm,
        seed: opts.seed,
        train_dir: opts.dir.clone(),
        metrics_jsonl: opts.metrics_jsonl.clone(),
        log_file: opts.log_file.clone(),
        progress_lines: !show_dashboard,
        max_bad_steps: opts.max_bad_steps,
        fatal: fatal.clone(),
        writes: writes.clone(),
        board: board.clone(),
    };
    let mut training = SupervisedTraining::new(&opts.dir, train, valid)
        .with_training_strategy(TrainingStrategy::Custom(Arc::new(strategy)))
        .with_file_checkpointer(AtomicRecorder::new(writes))
        .with_checkpointing_strategy(SaveOnly)
        .with_metric_logger(NoMetricFiles)
        .metric_valid_numeric(StepScalar::new("accuracy", true));
    for (key, higher) in [
        ("loss", false),
        ("reward_mean", true),
        ("reward_std", true),
        ("kl", false),
        ("clip_ratio", false),
        ("entropy", false),
        ("completion_len_mean", false),
        ("completion_len_min", false),
        ("completion_len_max", false),
        ("zero_std_groups", false),
        ("grad_norm", false),
        ("lr", false),
        ("tokens_per_s", true),
    ] {
        training = training.metric_train_numeric(StepScalar::new(key, higher));
    }
    for name in &reward_names {
        training = training.metric_train_numeric(StepScalar::new(&format!("reward/{name}"), true));
    }
    if let Some(i) = &opts.interrupter {
        training = training.with_interrupter(i.clone());
    }
    if !show_dashboard {
        training = training.renderer(Quiet);
    }
    let start = resume_state.map_or(0, |s| s.step);
    truncate_metrics(&opts.metrics_jsonl, start).map_err(|source| HostError::Io {
        path: opts.metrics_jsonl.clone(),
        source,
    })?;
    if let Some(c) = &opts.completions {
        truncate_metrics(&c.path, start).map_err(|source| HostError::Io {
            path: c.path.clone(),
            source,
        })?;
        ctx.log_completions(c, board.clone())
            .map_err(|source| HostError::Io {
                path: c.path.clone(),
                source,
            })?;
    }
    if start > 0 {
        training = training.checkpoint(start);
    }
    let optim = opts.optimizer.adamw().init::<B, GrpoPolicy<B>>();
    let learner = Learner::new(
        GrpoPolicy { policy },
        optim,
        ScheduledLr::new(opts.schedule),
    );
    let result = training.launch(learner);
    match fatal.lock().expect("fatal").take() {
        Some(Fatal::Diverged(why)) => return Err(HostError::Diverged(why)),
        Some(Fatal::Storage(why)) => return Err(HostError::Storage(why)),
        None => {}
    }
    let state = latest_state(&opts.dir).unwrap_or(RunState {
        step: 0,
        data_position: 0,
        seed: opts.seed,
        workers,
    });
    Ok((result.model.policy, state))
}

/// Drops `metrics.jsonl` lines of steps after `step`: a run killed after its last checkpoint
/// logged steps that the resumed run does again.
fn truncate_metrics(path: &std::path::Path, step: usize) -> std::io::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step")?.as_f64())
                .is_some_and(|s| s <= step as f64)
        })
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}
