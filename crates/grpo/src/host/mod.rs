//! GRPO hosted by burn-train. burn-train's `Learner` holds the policy, the optimizer and the
//! learning-rate scheduler; its `TrainStep` (on [`GrpoPolicy`]) rolls a micro-batch out on the
//! inference backend, rewards it and returns the gradients of the GRPO loss; its data loader
//! feeds the step plan; its metrics, dashboard, file logger, checkpointer and interrupter do
//! their usual jobs. The epoch loop is ours ([`strategy::GrpoStrategy`], a burn-train custom
//! training strategy) because burn-train 0.21's loop cannot (a) clip the global gradient norm
//! after accumulation, (b) checkpoint every N optimizer steps rather than per epoch, or
//! (c) resume mid-epoch at an exact data position.

mod feed;
mod health;
mod launch;
mod record;
mod store;
mod strategy;
pub mod tensorboard;

use tensorboard::EventWriter;

pub use feed::PlanFeed;
pub use health::{CollapseWatch, Health, Verdict};
pub use launch::{launch, CompletionLog, HeldOut, HostError, HostOptions, OptimizerOptions};
pub use record::{StepRecord, StepScalar};
pub use store::{
    check_checkpoint, complete_checkpoints, latest_state, resume_point, AtomicRecorder, FileDigest,
    KeepLast, ResumePoint, RunState, SaveOnly, WriteLog, RENAME_DELAY_ENV,
};
pub use strategy::{Fatal, GrpoStrategy};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use burn::data::dataloader::batcher::Batcher;
use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use qwen2vl::processor::TextTokenizer;
use qwen2vl::Qwen2VL;

use crate::advantages::ScaleRewards;
use crate::eval::{evaluate, evaluate_sampled, EvalConfig, SampledEval};
use crate::learner::{
    parallel_gradients, penalize_kl_in_reward, rollout, share_step_statistics, GrpoConfig,
    PromptInput, Rollout, ShareSums, Worker,
};
use crate::loss::LossType;
use crate::nodes::Exchange;
use crate::rewards::WeightedRewards;
use crate::stream::{PromptSource, StreamOptions};

/// The policy as burn-train's training model.
#[derive(Module, Debug)]
pub struct GrpoPolicy<B: Backend> {
    pub policy: Qwen2VL<B>,
}

/// Everything a step needs besides the policy; shared by every batch of a run.
pub struct HostCtx<B: AutodiffBackend> {
    /// The training prompts, prepared as the plan reaches them.
    pub prompts: Arc<dyn PromptSource>,
    /// How far ahead of the step, and by how many threads.
    pub stream: StreamOptions,
    pub tokenizer: Arc<TextTokenizer>,
    pub rewards: Arc<WeightedRewards>,
    pub cfg: GrpoConfig,
    /// The reference (when `beta` or `kl_in_reward` is set): frozen, or pulled towards the
    /// policy with `sync_ref_model`.
    reference: std::sync::RwLock<Option<Qwen2VL<B::InnerBackend>>>,
    /// Where synced references are kept for resuming, and how many (set when the run is
    /// launched).
    reference_dir: Mutex<Option<(std::path::PathBuf, usize)>>,
    pub device: B::Device,
    /// Data parallelism: the devices after `device` (the main one), each rolling out and
    /// scoring its share of every micro-batch's prompts ([`HostCtx::with_devices`]).
    others: Vec<B::Device>,
    /// The reference on each of `others` (copied once, and again after each sync).
    reference_copies: Mutex<Vec<Qwen2VL<B::InnerBackend>>>,
    /// The policy on each of `others`, copied for the optimizer step it holds the weights of:
    /// a step's micro-batches share one copy.
    policy_copies: Mutex<Option<(usize, Vec<Qwen2VL<B>>)>>,
    /// Several nodes: how this one exchanges rollouts and gradients with the others
    /// ([`HostCtx::with_exchange`]).
    exchange: Option<Arc<dyn Exchange>>,
    /// Micro-batches per optimizer step; the loss is divided by it.
    pub accumulation: usize,
    /// Rollouts kept for reuse while `num_iterations > 1`, by rollout number.
    cache: Mutex<HashMap<usize, Rollout<B::InnerBackend>>>,
    /// The plan's prompts, prepared ahead (set when the run is launched).
    feed: Mutex<Option<PlanFeed>>,
    /// The run's plan (set when the run is launched): the rollouts a step makes together.
    plan: Mutex<Vec<MicroBatch>>,
    /// Where sampled completions go (set when the run is launched).
    samples: Mutex<Option<Samples>>,
}

/// The completions log of a run: JSONL lines and TensorBoard text, every `every` steps.
struct Samples {
    file: std::fs::File,
    path: std::path::PathBuf,
    every: usize,
    board: Arc<Mutex<Option<EventWriter>>>,
    /// Writes that failed (the first is said at once).
    lost: usize,
}

impl Samples {
    /// The completions of `roll`, micro-batch `part` of optimizer step `step` (1-based).
    fn write<K: Backend>(&mut self, step: usize, part: usize, roll: &Rollout<K>) {
        use std::io::Write;
        let mut lines = String::new();
        let mut table =
            String::from("| prompt | completion | reward | advantage |\n|---|---|---|---|\n");
        let cell = |s: &str| s.replace('|', "\\|").replace('\n', "<br>");
        for (i, completion) in roll.texts.iter().enumerate() {
            let rewards: serde_json::Map<String, serde_json::Value> = roll
                .per_reward
                .iter()
                .map(|(name, v)| (name.clone(), serde_json::json!(v[i])))
                .collect();
            let line = serde_json::json!({
                "step": step,
                "micro_batch": part,
                "prompt": roll.prompts[i],
                "completion": completion,
                "rewards": rewards,
                "reward": roll.rewards[i],
                "advantage": roll.advantages[i],
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
            table.push_str(&format!(
                "| {} | {} | {:.3} | {:.3} |\n",
                cell(&roll.prompts[i]),
                cell(completion),
                roll.rewards[i],
                roll.advantages[i]
            ));
        }
        let written = self
            .file
            .write_all(lines.as_bytes())
            .and_then(|_| self.file.flush());
        let shown = match self.board.lock().expect("event file").as_mut() {
            Some(w) => w.text(step as u64, &format!("completions/{part}"), &table),
            None => Ok(()),
        };
        if let Err(e) = written.and(shown) {
            self.lost += 1;
            if self.lost == 1 {
                eprintln!(
                    "warning: sampled completions could not be written to {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

impl<B: AutodiffBackend> HostCtx<B> {
    /// DAPO's dynamic sampling for plan entry `m`: each prompt's group rolled out on its own;
    /// groups whose rewards are all equal are set aside and prompts drawn anew (a seeded
    /// uniform draw from the training set, a function of the entry's seed and the round, so
    /// that a resumed run draws the same) are rolled out in their place, round after round,
    /// up to `max_num_gen_batches` rounds; short of groups then, the set-aside ones fill in.
    fn filtered_rollout(
        &self,
        model: &Qwen2VL<B::InnerBackend>,
        prompts: Vec<PromptInput>,
        m: &MicroBatch,
    ) -> Result<Rollout<B::InnerBackend>, qwen2vl::Qwen2VLError> {
        let cfg = &self.cfg;
        let want = prompts.len();
        let (mut kept, mut flat) = (Vec::new(), Vec::new());
        let mut pending = prompts;
        let mut round = 0u64;
        let mut resampled = 0;
        loop {
            for (i, p) in pending.iter().enumerate() {
                if kept.len() == want {
                    break;
                }
                let seed = mix(m.seed, (round << 32) + i as u64);
                let r = rollout(
                    model,
                    std::slice::from_ref(p),
                    &self.tokenizer,
                    &self.rewards,
                    cfg,
                    seed,
                    &self.device,
                )?;
                if r.rewards.iter().all(|&x| x == r.rewards[0]) {
                    flat.push(r);
                } else {
                    kept.push(r);
                }
            }
            round += 1;
            let rounds_left =
                cfg.max_num_gen_batches == 0 || round < cfg.max_num_gen_batches as u64;
            if kept.len() == want || !rounds_left {
                break;
            }
            let need = want - kept.len();
            let mut rng = medvqa::rng::Rng::new(mix(m.seed, 0xD1CE_0000 + round));
            pending = (0..need)
                .map(|_| self.prompts.prepare(rng.below(self.prompts.len())))
                .collect::<Result<_, _>>()
                .map_err(|e| qwen2vl::Qwen2VLError::Input(e.to_string()))?;
            resampled += need;
        }
        let unfilled = want - kept.len();
        kept.extend(flat.into_iter().take(unfilled));
        let mut roll = Rollout::merge(kept);
        // The groups were rolled out apart: statistics over all of them (a batch std).
        share_step_statistics(std::slice::from_mut(&mut roll), cfg);
        roll.resampled_groups = resampled;
        roll.unfilled_groups = unfilled;
        Ok(roll)
    }

    /// `prompts`: a [`PromptSource`] (`RecordPrompts` streams from disk; a
    /// `Vec<PromptInput>` holds prepared prompts).
    pub fn new<S: PromptSource + 'static>(
        prompts: S,
        tokenizer: TextTokenizer,
        rewards: WeightedRewards,
        cfg: GrpoConfig,
        reference: Option<Qwen2VL<B::InnerBackend>>,
        device: B::Device,
        accumulation: usize,
    ) -> Self {
        Self {
            prompts: Arc::new(prompts),
            stream: StreamOptions::default(),
            tokenizer: Arc::new(tokenizer),
            rewards: Arc::new(rewards),
            cfg,
            reference: std::sync::RwLock::new(reference),
            reference_dir: Mutex::new(None),
            device,
            others: Vec::new(),
            reference_copies: Mutex::new(Vec::new()),
            policy_copies: Mutex::new(None),
            exchange: None,
            accumulation: accumulation.max(1),
            cache: Mutex::new(HashMap::new()),
            feed: Mutex::new(None),
            plan: Mutex::new(Vec::new()),
            samples: Mutex::new(None),
        }
    }

    /// Data-parallel steps over `devices`, the first the main one (it holds the optimizer,
    /// sums the gradients and writes checkpoints, as `device` does alone): every micro-batch's
    /// prompts are split into as many shards, in order, each rolled out on its device (on its
    /// own thread) and scored there by a copy of the policy; the shards are merged into the
    /// micro-batch's rollout and its statistics taken over all of them, so the step is the
    /// one-device step over the same completions. Listing one device twice runs two workers
    /// on it (a check of the machinery, not a speed-up).
    pub fn with_devices(mut self, devices: Vec<B::Device>) -> Self {
        let mut devices = devices.into_iter();
        if let Some(main) = devices.next() {
            self.device = main;
            self.others = devices.collect();
        }
        self
    }

    /// One node of a run on several ([`crate::nodes`]): this node rolls out its share of every
    /// micro-batch's prompts on its devices (as one node with every node's devices would:
    /// shards in node order, each seeded by its index among all), receives the other nodes'
    /// completions and rewards so that every node takes the step's statistics over all of
    /// them, and sums its gradients with theirs. Every node takes the same optimizer step and
    /// writes the same checkpoints (each into its own run directory).
    pub fn with_exchange(mut self, exchange: Arc<dyn Exchange>) -> Self {
        self.exchange = Some(exchange);
        self
    }

    /// How this node exchanges with the others, on several nodes.
    pub fn exchange(&self) -> Option<&dyn Exchange> {
        self.exchange.as_deref()
    }

    /// Nodes in the run and this one's rank (1 and 0 alone).
    pub fn node(&self) -> (usize, usize) {
        self.exchange
            .as_ref()
            .map_or((1, 0), |ex| (ex.nodes(), ex.rank()))
    }

    /// Rollout shards of a micro-batch over every node: devices per node times nodes.
    pub fn shards(&self) -> usize {
        self.devices().len() * self.node().0
    }

    /// The devices of a step, the main one first.
    pub fn devices(&self) -> Vec<B::Device> {
        std::iter::once(self.device.clone())
            .chain(self.others.iter().cloned())
            .collect()
    }

    /// The policy on each device after the main one, as it is for optimizer step `step`: copied
    /// by the step's first micro-batch, shared by its others (the weights change only between
    /// steps).
    fn policy_copies(&self, policy: &Qwen2VL<B>, step: usize) -> Vec<Qwen2VL<B>> {
        if self.others.is_empty() {
            return Vec::new();
        }
        let mut copies = self.policy_copies.lock().expect("policy copies");
        match copies.as_ref() {
            Some((s, c)) if *s == step => c.clone(),
            _ => {
                let fresh: Vec<Qwen2VL<B>> = self
                    .others
                    .iter()
                    .map(|d| crate::learner::devices::model_to(policy.clone(), d))
                    .collect();
                *copies = Some((step, fresh.clone()));
                fresh
            }
        }
    }

    /// The reference on every device, the main one first (`None` without a reference).
    fn references(&self) -> Option<Vec<Qwen2VL<B::InnerBackend>>> {
        let main = self.reference.read().expect("reference").clone()?;
        let mut copies = self.reference_copies.lock().expect("reference copies");
        if copies.len() != self.others.len() {
            *copies = self
                .others
                .iter()
                .map(|d| crate::learner::devices::model_to(main.clone(), d))
                .collect();
        }
        Some(
            std::iter::once(main)
                .chain(copies.iter().cloned())
                .collect(),
        )
    }

    /// Prepares prompts ahead with these settings instead of the defaults.
    pub fn with_stream(mut self, stream: StreamOptions) -> Self {
        self.stream = stream;
        self
    }

    /// The prompts of plan entry `micro`, for its rollout: from the feed when the run's plan
    /// is set and the entry generates, prepared on the spot otherwise.
    fn prompts_of(
        &self,
        micro: &MicroBatch,
    ) -> Result<Vec<PromptInput>, crate::stream::PromptError> {
        let mut feed = self.feed.lock().expect("prompt feed");
        match feed.as_mut() {
            Some(f) if micro.generate => f.take(micro.index),
            // A step that reuses a rollout is fed nothing; it needs prompts only when its
            // cycle's rollout is not cached (a run resumed mid-cycle rolls out again).
            _ => micro
                .prompts
                .iter()
                .map(|&i| self.prompts.prepare(i))
                .collect(),
        }
    }

    fn set_plan(&self, plan: &[MicroBatch]) {
        // Only the entries that generate are prepared ahead: the others reuse a rollout.
        let groups = plan
            .iter()
            .map(|m| {
                if m.generate {
                    m.prompts.clone()
                } else {
                    Vec::new()
                }
            })
            .collect();
        *self.feed.lock().expect("prompt feed") =
            Some(PlanFeed::new(self.prompts.clone(), groups, self.stream));
        *self.plan.lock().expect("plan") = plan.to_vec();
    }

    /// Writes the sampled completions of every `log.every`-th step to `log.path` (appended) and
    /// as text to `board`'s event file.
    fn log_completions(
        &self,
        log: &CompletionLog,
        board: Arc<Mutex<Option<EventWriter>>>,
    ) -> std::io::Result<()> {
        if log.every == 0 {
            return Ok(());
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log.path)?;
        *self.samples.lock().expect("samples") = Some(Samples {
            file,
            path: log.path.clone(),
            every: log.every,
            board,
            lost: 0,
        });
        Ok(())
    }

    /// With `sync_ref_model`: the synced references are kept under `dir` (`step-<s>`, the
    /// reference after the sync at the start of step `s`), the newest `keep`; a run resumed at
    /// step `start` takes the newest from before it (a sync at `start` itself is made again),
    /// and fails if it is missing rather than go on with another reference.
    fn keep_references(
        &self,
        dir: std::path::PathBuf,
        keep: usize,
        start: usize,
    ) -> Result<(), String> {
        let every = self.cfg.ref_model_sync_steps.max(1);
        if self.cfg.sync_ref_model && start > every {
            // The last sync before `start`: at the largest multiple of `every` below it.
            let s = (start - 1) / every * every;
            let path = dir.join(format!("step-{s}"));
            let (model, _) = qwen2vl::load_model(&path, &self.device).map_err(|e| {
                format!(
                    "resuming at step {start} needs the reference synced at step {s} \
                     ({}): {e}",
                    path.display()
                )
            })?;
            *self.reference.write().expect("reference") = Some(model);
        }
        *self.reference_dir.lock().expect("reference dir") = Some((dir, keep.max(2)));
        Ok(())
    }

    /// TRL's `SyncRefModelCallback`: after every `ref_model_sync_steps` optimizer steps (here,
    /// at the start of the next), the reference moves towards `policy`; the result is saved.
    fn sync_reference(&self, policy: &Qwen2VL<B::InnerBackend>, step: usize) {
        let mut guard = self.reference.write().expect("reference");
        let Some(reference) = guard.take() else {
            return;
        };
        let mixed =
            crate::learner::mix_into_reference(reference, policy, self.cfg.ref_model_mixup_alpha);
        if let Some((dir, keep)) = self.reference_dir.lock().expect("reference dir").as_ref() {
            // Written aside and renamed into place: a crash mid-write leaves no `step-<s>` a
            // resume would take for complete.
            let path = dir.join(format!("step-{step}"));
            let aside = dir.join(format!(".step-{step}.partial"));
            let _ = std::fs::remove_dir_all(&aside);
            let saved = qwen2vl::save_model(&mixed, &aside, qwen2vl::SaveDtype::F32)
                .map_err(|e| e.to_string())
                .and_then(|_| {
                    let _ = std::fs::remove_dir_all(&path);
                    std::fs::rename(&aside, &path).map_err(|e| e.to_string())
                });
            if let Err(e) = saved {
                panic!(
                    "the reference synced at step {step} could not be saved to {}: {e}",
                    path.display()
                );
            }
            // Enough to resume from any checkpoint still kept.
            let mut kept = synced_references(dir);
            kept.sort_unstable();
            for old in kept.iter().rev().skip(*keep) {
                let _ = std::fs::remove_dir_all(dir.join(format!("step-{old}")));
            }
        }
        *guard = Some(mixed);
        self.reference_copies
            .lock()
            .expect("reference copies")
            .clear();
    }

    /// `prompts` rolled out (and penalized by their KL to the reference, with
    /// `kl_in_reward`), seeded by the entry's seed. With several devices: split in order into
    /// one shard per device, each rolled out on its device and thread, seeded by the entry's
    /// seed and the shard, and merged, with the statistics of the whole.
    fn sharded_rollout(
        &self,
        models: &[Qwen2VL<B::InnerBackend>],
        prompts: &[PromptInput],
        m: &MicroBatch,
    ) -> Rollout<B::InnerBackend> {
        let devices = self.devices();
        let per = prompts.len().div_ceil(models.len()).max(1);
        // This node's first shard among all nodes' (they split as one node with all devices).
        let (_, rank) = self.node();
        let (first, total) = (rank * models.len(), self.shards());
        let references = if self.cfg.kl_in_reward != 0.0 {
            Some(
                self.references()
                    .expect("kl_in_reward is set: the run holds a reference"),
            )
        } else {
            None
        };
        let shards: Vec<Rollout<B::InnerBackend>> = std::thread::scope(|scope| {
            let workers: Vec<_> = prompts
                .chunks(per)
                .enumerate()
                .map(|(w, shard)| {
                    let (model, device) = (&models[w], &devices[w]);
                    let reference = references.as_ref().map(|r| &r[w]);
                    scope.spawn(move || {
                        let seed = match total {
                            1 => m.seed,
                            _ => mix(m.seed, (first + w) as u64),
                        };
                        let mut roll = rollout(
                            model,
                            shard,
                            &self.tokenizer,
                            &self.rewards,
                            &self.cfg,
                            seed,
                            device,
                        )?;
                        if let Some(reference) = reference {
                            penalize_kl_in_reward(&mut roll, model, reference, &self.cfg)?;
                        }
                        Ok::<_, qwen2vl::Qwen2VLError>(roll)
                    })
                })
                .collect();
            workers
                .into_iter()
                .enumerate()
                .map(|(w, h)| {
                    h.join()
                        .unwrap_or_else(|_| panic!("the rollout worker on device {w} panicked"))
                        .unwrap_or_else(|e| {
                            panic!("rollout of step {} on device {w} failed: {e}", m.step)
                        })
                })
                .collect()
        });
        let shards = match &self.exchange {
            Some(ex) => {
                let own = Rollout::merge(shards);
                node_shards(ex.as_ref(), own, &self.device)
                    .unwrap_or_else(|e| panic!("step {}: {e}", m.step + 1))
            }
            None => shards,
        };
        if shards.len() == 1 {
            return shards.into_iter().next().expect("one shard");
        }
        let mut roll = Rollout::merge(shards);
        // The shards were rolled out apart: statistics over all of them (a batch std).
        share_step_statistics(std::slice::from_mut(&mut roll), &self.cfg);
        roll
    }

    /// Whether the rollouts of an optimizer step share statistics (TRL generates them
    /// together): a step-wide reward std or `dapo`'s step-wide token count, with accumulation.
    fn step_statistics(&self) -> bool {
        self.accumulation > 1
            && (self.cfg.scale_rewards == ScaleRewards::Batch
                || self.cfg.loss.loss_type == LossType::Dapo)
    }

    /// Rolls out `micro`'s plan entry, or with step statistics every rollout of its cycle (the
    /// generating entries of its step), sharing their statistics; returns `micro`'s rollout and
    /// keeps them for the other entries (and for reuse while `num_iterations > 1`).
    /// `models`: the policy on each device of [`HostCtx::devices`].
    fn roll_out(
        &self,
        models: &[Qwen2VL<B::InnerBackend>],
        micro: &MicroBatch,
    ) -> Rollout<B::InnerBackend> {
        let model = &models[0];
        let one = |m: &MicroBatch| {
            let prompts = self
                .prompts_of(m)
                .unwrap_or_else(|e| panic!("step {}: {e}", m.step + 1));
            if !self.cfg.filter_groups {
                return self.sharded_rollout(models, &prompts, m);
            }
            let mut roll = self
                .filtered_rollout(model, prompts, m)
                .unwrap_or_else(|e| panic!("rollout of step {} failed: {e}", m.step));
            if self.cfg.kl_in_reward != 0.0 {
                let reference = self.reference.read().expect("reference");
                let reference = reference
                    .as_ref()
                    .expect("kl_in_reward is set: the run holds a reference");
                penalize_kl_in_reward(&mut roll, model, reference, &self.cfg)
                    .unwrap_or_else(|e| panic!("KL penalty of step {} failed: {e}", m.step));
            }
            roll
        };
        let acc = self.accumulation;
        let reuse = self.cfg.num_iterations > 1;
        if !self.step_statistics() {
            let r = one(micro);
            if reuse {
                let mut cache = self.cache.lock().expect("rollout cache");
                cache.retain(|&k, _| k + acc > micro.rollout);
                cache.insert(micro.rollout, r.clone());
            }
            return r;
        }
        let cycle = micro.rollout / acc;
        let entries: Vec<MicroBatch> = {
            let plan = self.plan.lock().expect("plan");
            let found: Vec<MicroBatch> = plan
                .iter()
                .filter(|m| m.generate && m.rollout / acc == cycle)
                .cloned()
                .collect();
            if found.is_empty() {
                // No plan (a step driven by hand): this entry alone.
                vec![micro.clone()]
            } else {
                found
            }
        };
        let mut rolls: Vec<Rollout<B::InnerBackend>> = entries.iter().map(one).collect();
        share_step_statistics(&mut rolls, &self.cfg);
        let mut cache = self.cache.lock().expect("rollout cache");
        cache.retain(|&k, _| k / acc == cycle);
        let mut mine = None;
        for (m, r) in entries.iter().zip(rolls) {
            if m.rollout == micro.rollout {
                mine = Some(r.clone());
            }
            cache.insert(m.rollout, r);
        }
        mine.expect("the step's entries include this one")
    }
}

/// Every node's rollout of a micro-batch in node order, this node's `own` among them and the
/// others' values received ([`Rollout::remote`]: no tensors, not scored here).
fn node_shards<K: Backend>(
    ex: &dyn Exchange,
    own: Rollout<K>,
    device: &K::Device,
) -> Result<Vec<Rollout<K>>, String> {
    let bytes = serde_json::to_vec(&own.host()).map_err(|e| e.to_string())?;
    let all = crate::nodes::gather(ex, &bytes).map_err(|e| e.to_string())?;
    let old_on = own.old_logprobs.as_ref().map(|_| device);
    let mut own = Some(own);
    all.into_iter()
        .enumerate()
        .map(|(k, bytes)| {
            if k == ex.rank() {
                return Ok(own.take().expect("once"));
            }
            let host = serde_json::from_slice(&bytes)
                .map_err(|e| format!("node {k}'s rollout could not be read: {e}"))?;
            Ok(Rollout::remote(host, old_on))
        })
        .collect()
}

/// The steps whose synced reference is kept under `dir`.
fn synced_references(dir: &std::path::Path) -> Vec<usize> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let step = name.strip_prefix("step-")?.parse().ok()?;
                    e.path().join("model.safetensors").is_file().then_some(step)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One micro-batch of the run's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    /// Position in the plan.
    pub index: usize,
    /// Optimizer step (0-based) this micro-batch belongs to.
    pub step: usize,
    /// Rollout number: steps of one `num_iterations` cycle share their rollouts.
    pub rollout: usize,
    /// Whether this step generates (first iteration of its cycle) or reuses.
    pub generate: bool,
    /// Indices into the context's prompts.
    pub prompts: Vec<usize>,
    pub seed: u64,
}

/// The whole run as micro-batches: prompts walk through seeded reshuffles of the training
/// set (a fresh order each pass), `prompts_per_micro` at a time; every `num_iterations`
/// consecutive steps reuse one rollout. A function of its arguments only, so a resumed run
/// finds its exact data position and sampling seeds from the step number.
pub fn plan(
    n_prompts: usize,
    prompts_per_micro: usize,
    accumulation: usize,
    num_iterations: usize,
    total_steps: usize,
    seed: u64,
) -> Vec<MicroBatch> {
    let ni = num_iterations.max(1);
    let acc = accumulation.max(1);
    let mut order: Vec<usize> = Vec::new();
    let mut pass = 0u64;
    let mut take = |count: usize| -> Vec<usize> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            if order.is_empty() {
                let mut fresh: Vec<usize> = (0..n_prompts).collect();
                medvqa::rng::Rng::new(mix(seed, pass)).shuffle(&mut fresh);
                fresh.reverse();
                order = fresh;
                pass += 1;
            }
            out.push(order.pop().expect("refilled"));
        }
        out
    };
    let mut rollouts: Vec<Vec<usize>> = Vec::new();
    let mut micro = Vec::with_capacity(total_steps * acc);
    for step in 0..total_steps {
        let cycle = step / ni;
        for m in 0..acc {
            let r = cycle * acc + m;
            if r == rollouts.len() {
                rollouts.push(take(prompts_per_micro));
            }
            micro.push(MicroBatch {
                index: micro.len(),
                step,
                rollout: r,
                generate: step % ni == 0,
                prompts: rollouts[r].clone(),
                seed: mix(seed, 1_000_003 + r as u64),
            });
        }
    }
    micro
}

fn mix(seed: u64, k: u64) -> u64 {
    let mut z = seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A micro-batch on its way to the train step.
pub struct GrpoBatch<B: AutodiffBackend> {
    pub micro: MicroBatch,
    pub ctx: Arc<HostCtx<B>>,
}

impl<B: AutodiffBackend> Clone for GrpoBatch<B> {
    fn clone(&self) -> Self {
        Self {
            micro: self.micro.clone(),
            ctx: self.ctx.clone(),
        }
    }
}

impl<B: AutodiffBackend> std::fmt::Debug for GrpoBatch<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpoBatch")
            .field("micro", &self.micro)
            .finish_non_exhaustive()
    }
}

/// Turns plan entries into batches (one entry per batch).
pub struct GrpoBatcher<B: AutodiffBackend> {
    pub ctx: Arc<HostCtx<B>>,
}

impl<B: AutodiffBackend> Batcher<B, MicroBatch, GrpoBatch<B>> for GrpoBatcher<B> {
    fn batch(&self, mut items: Vec<MicroBatch>, _device: &B::Device) -> GrpoBatch<B> {
        assert_eq!(
            items.len(),
            1,
            "the GRPO plan is loaded one micro-batch at a time"
        );
        GrpoBatch {
            micro: items.pop().expect("one item"),
            ctx: self.ctx.clone(),
        }
    }
}

impl<B: AutodiffBackend> TrainStep for GrpoPolicy<B> {
    type Input = GrpoBatch<B>;
    type Output = StepRecord;

    /// Roll out (or reuse) the micro-batch's group, reward it against each prompt's own
    /// record, and return the gradients of the GRPO loss divided by the accumulation count.
    fn step(&self, batch: GrpoBatch<B>) -> TrainOutput<StepRecord> {
        let ctx = &batch.ctx;
        let micro = &batch.micro;
        let every = ctx.cfg.ref_model_sync_steps.max(1);
        let first_of_step = micro.index.is_multiple_of(ctx.accumulation);
        if ctx.cfg.sync_ref_model
            && first_of_step
            && micro.step > 0
            && micro.step.is_multiple_of(every)
        {
            ctx.sync_reference(&self.valid_model(), micro.step);
        }
        // A reused rollout, or one its step's first entry made with the others of the step.
        let cached = if micro.generate && !ctx.step_statistics() {
            None
        } else {
            ctx.cache
                .lock()
                .expect("rollout cache")
                .get(&micro.rollout)
                .cloned()
        };
        // Data parallel: the policy forked to every other device (the same parameter ids, so
        // their gradients sum into the main policy's).
        let devices = ctx.devices();
        let replicas = ctx.policy_copies(&self.policy, micro.step);
        let t_roll = std::time::Instant::now();
        let roll = match cached {
            Some(r) => r,
            None => {
                let models: Vec<Qwen2VL<B::InnerBackend>> = std::iter::once(self.valid_model())
                    .chain(
                        replicas
                            .iter()
                            .map(|r| burn::module::AutodiffModule::valid(r)),
                    )
                    .collect();
                ctx.roll_out(&models, micro)
            }
        };
        let rollout_seconds = t_roll.elapsed().as_secs_f64();
        // Gradients of `self.policy`: GrpoPolicy's only parameters are the policy's, with the
        // same ids.
        let references = ctx.references();
        let several = devices.len() > 1;
        let workers: Vec<Worker<'_, B>> = std::iter::once(&self.policy)
            .chain(replicas.iter())
            .zip(&devices)
            .enumerate()
            .map(|(i, (policy, device))| Worker {
                policy,
                reference: references.as_ref().map(|r| &r[i]),
                device: several.then_some(device),
            })
            .collect();
        let (grads, mut metrics) = parallel_gradients(&workers, &roll, &ctx.cfg, ctx.accumulation)
            .unwrap_or_else(|e| panic!("loss of step {} failed: {e}", micro.step));
        // Several nodes: every node's measured sums, added up (their gradients are summed once
        // per optimizer step, after its micro-batches: `GrpoStrategy`).
        if let Some(ex) = &ctx.exchange {
            let share = metrics.share.unwrap_or_default();
            let sums = ex
                .sum(share.to_vec())
                .unwrap_or_else(|e| panic!("step {}: {e}", micro.step + 1));
            metrics.set_shares(ShareSums::from_slice(&sums), roll.completions.len());
        }
        let mut item = StepRecord::from(&metrics);
        // The micro-batch's share of the step's loss: `dapo` over the step's tokens is one
        // already.
        let share = match (ctx.cfg.loss.loss_type, roll.step_tokens) {
            (LossType::Dapo, Some(_)) => 1.0,
            _ => ctx.accumulation as f64,
        };
        item.set("loss", metrics.loss as f64 / share);
        // The completions of a logged step, once (on the step that made them).
        if micro.generate {
            if let Some(samples) = ctx.samples.lock().expect("samples").as_mut() {
                if (micro.step + 1).is_multiple_of(samples.every) {
                    let part = micro.index % ctx.accumulation;
                    samples.write(micro.step + 1, part, &roll);
                }
            }
        }
        // Counted once, on the step that made the rollout (0 on its reuses).
        if ctx.cfg.filter_groups {
            let made = |n: usize| if micro.generate { n as f64 } else { 0.0 };
            item.set("resampled_groups", made(roll.resampled_groups));
            item.set("unfilled_groups", made(roll.unfilled_groups));
        }
        item.set("rollout_seconds", rollout_seconds);
        TrainOutput { grads, item }
    }
}

/// Held-out prompts for burn-train's validation pass: greedy accuracy, or sampled answers
/// with their rewards when the run sets `num_generations_eval`.
#[derive(Clone)]
pub struct EvalBatch {
    pub prompts: Vec<PromptInput>,
    /// The held-out index of the first prompt (seeds sampled answers).
    pub first: usize,
    pub tokenizer: Arc<TextTokenizer>,
    pub cfg: Arc<EvalConfig>,
    pub sampled: Option<Arc<SampledEval>>,
}

impl std::fmt::Debug for EvalBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalBatch")
            .field("prompts", &self.prompts.len())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> InferenceStep for GrpoPolicy<B> {
    type Input = EvalBatch;
    type Output = StepRecord;

    fn step(&self, batch: EvalBatch) -> StepRecord {
        let device = self
            .policy
            .devices()
            .into_iter()
            .next()
            .expect("a model lives on a device");
        let mut r = StepRecord::default();
        if let Some(sampled) = &batch.sampled {
            let report = evaluate_sampled(
                &self.policy,
                &batch.prompts,
                &batch.tokenizer,
                &batch.cfg,
                sampled,
                batch.first,
                &device,
            )
            .unwrap_or_else(|e| panic!("validation failed: {e}"));
            for (k, v) in report.metrics() {
                r.set(&k, v);
            }
            return r;
        }
        let report = evaluate(
            &self.policy,
            &batch.prompts,
            &batch.tokenizer,
            &batch.cfg,
            &device,
        )
        .unwrap_or_else(|e| panic!("validation failed: {e}"));
        r.set("accuracy", report.overall.accuracy());
        let t = report.overall.total.max(1) as f64;
        r.set("unparsable", report.overall.unparsable as f64 / t);
        r
    }
}

/// Batches held-out prompts for validation, preparing them from their source (indices in,
/// one batch of pixels alive at a time).
pub struct EvalBatcher {
    pub source: Arc<dyn PromptSource>,
    pub tokenizer: Arc<TextTokenizer>,
    pub cfg: Arc<EvalConfig>,
    pub sampled: Option<Arc<SampledEval>>,
}

impl<B: Backend> Batcher<B, usize, EvalBatch> for EvalBatcher {
    fn batch(&self, items: Vec<usize>, _device: &B::Device) -> EvalBatch {
        let prompts = items
            .iter()
            .map(|&i| self.source.prepare(i))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_else(|e| panic!("held-out evaluation: {e}"));
        EvalBatch {
            prompts,
            first: items.first().copied().unwrap_or(0),
            tokenizer: self.tokenizer.clone(),
            cfg: self.cfg.clone(),
            sampled: self.sampled.clone(),
        }
    }
}

impl<B: AutodiffBackend> GrpoPolicy<B> {
    /// The policy on the inference backend (shares the parameters, no copy).
    fn valid_model(&self) -> Qwen2VL<B::InnerBackend> {
        use burn::module::AutodiffModule;
        self.policy.valid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_walks_reshuffled_passes_and_shares_rollouts() {
        let p = plan(5, 2, 2, 2, 4, 9);
        assert_eq!(p.len(), 8);
        // Steps 0 and 1 form one cycle: same rollouts, only step 0 generates.
        assert_eq!(p[0].prompts, p[2].prompts);
        assert_eq!(p[1].prompts, p[3].prompts);
        assert_eq!(p[0].seed, p[2].seed);
        assert!(p[0].generate && p[1].generate && !p[2].generate && !p[3].generate);
        assert_eq!((p[4].rollout, p[5].rollout), (2, 3));
        // Four rollouts x 2 prompts = 8 draws: the first 5 are one permutation of 0..5.
        let mut first: Vec<usize> = [&p[0], &p[1], &p[4]]
            .iter()
            .flat_map(|m| m.prompts.clone())
            .take(5)
            .collect();
        first.sort_unstable();
        assert_eq!(first, vec![0, 1, 2, 3, 4]);
        assert_eq!(plan(5, 2, 2, 2, 4, 9), p, "deterministic");
        assert_ne!(plan(5, 2, 2, 2, 4, 10)[0].seed, p[0].seed);
    }
}
