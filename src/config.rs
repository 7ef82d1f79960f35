//! Run configuration: TOML, every key documented in `configs/README.md`, defaults are the
//! embedded tiny demo's. `--set key=value` edits the parsed TOML before it is checked, so an
//! override goes through the same validation as the file: an unknown key or a wrong type is an
//! error that names the key.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use grpo::eval::Scoring;
use grpo::schedule::Decay;
use grpo::{ImportanceSampling, KlEstimator, LossType, ScaleRewards};
use serde::{Deserialize, Serialize};

/// The embedded default (`configs/tiny.toml`).
pub const TINY_TOML: &str = include_str!("../configs/tiny.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Run name: outputs go to `<runs_dir>/<name>/`.
    pub name: String,
    pub runs_dir: PathBuf,
    /// flex | wgpu | cuda
    pub device: String,
    /// Data-parallel GRPO over these devices of `device`'s backend (`cuda:0`, `cuda:1`, ...;
    /// `wgpu:N`, `wgpu:cpu`, ...; `flex`), the first the main one; empty: `device`'s default.
    pub devices: Vec<String>,
    /// f32 | bf16 (bf16 on CUDA, or on the Flex CPU backend to check bf16 numerics; not WGPU)
    pub dtype: String,
    pub seed: u64,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub sft: SftConfig,
    pub grpo: GrpoSection,
    pub eval: EvalSection,
    pub checkpoint: CheckpointSection,
    pub lora: LoraSection,
    pub memory: MemorySection,
    pub logging: LoggingSection,
}

/// What a run writes for the researcher watching it, besides metrics.jsonl and train.log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    /// TensorBoard event files under `<run>/tensorboard/`: every step's metrics (`train`),
    /// and the evaluations' accuracies by modality and question type (`eval`).
    pub tensorboard: bool,
    /// Every this many GRPO steps, the step's sampled completions (prompt, completion, each
    /// reward, advantage) to `completions.jsonl` and to TensorBoard as text (0: never).
    pub completions_every: usize,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            tensorboard: true,
            completions_every: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A Qwen2-VL checkpoint directory (HF layout). Empty: a randomly initialised model
    /// (`random_config`, or the tiny one).
    pub checkpoint: String,
    /// A Qwen2-VL config.json: random weights of that architecture, for speed and memory
    /// checks at full size without the checkpoint (needs `tokenizer`).
    pub random_config: String,
    /// tokenizer.json; empty: the checkpoint's, or the byte-level tokenizer for tiny models.
    pub tokenizer: String,
    pub tiny: TinyModel,
    pub min_pixels: usize,
    pub max_pixels: usize,
}

/// Architecture of the randomly initialised tiny model (Qwen2-VL's, scaled down).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TinyModel {
    pub vision_depth: usize,
    pub vision_embed_dim: usize,
    pub vision_heads: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub mrope_section: [usize; 3],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// synthetic | files
    pub source: String,
    /// Med-R1 / OmniMedVQA record files or directories (source = files).
    pub train: Vec<PathBuf>,
    pub test: Vec<PathBuf>,
    /// Where image paths resolve (source = files).
    pub image_root: PathBuf,
    /// Keep only these modalities / question types (names as in Med-R1); empty keeps all.
    pub train_modalities: Vec<String>,
    pub eval_modalities: Vec<String>,
    pub question_types: Vec<String>,
    /// Cap on training / evaluation records (0: all), a seeded sample.
    pub max_train: usize,
    pub max_eval: usize,
    /// Prompt templates: train_think | train_nothink | eval_think | eval_nothink |
    /// eval_zero_shot | text.
    pub template: String,
    pub eval_template: String,
    /// `[width, height]`: every image is resized to this (Pillow's bicubic) before the
    /// processor, as Med-R1 resizes its images to 384 x 384 on disk (the default); empty: as
    /// they are.
    pub resize: Vec<usize>,
    /// Leave out records whose image is missing or unreadable (listed in
    /// `skipped_records.json`) instead of stopping before the run starts.
    pub skip_invalid: bool,
    /// Prompts prepared ahead of use (images decoded, resized and patchified).
    pub prefetch: usize,
    /// Threads preparing them.
    pub workers: usize,
    pub synthetic: SyntheticData,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticData {
    pub n: usize,
    pub image_size: u32,
    pub test_fraction: f64,
    pub modalities: Vec<String>,
    pub question_types: Vec<String>,
    pub min_options: usize,
    pub max_options: usize,
    pub shuffle_options: bool,
    /// Seed of the generated set (default: the run's `seed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Optimizer steps of the supervised warm start (0: none).
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// answer: `<answer> X </answer>` with the right letter; format_only: a random letter
    /// (teaches the format, not the task).
    pub target: String,
    /// Start from this SFT checkpoint instead of training one (empty: train).
    pub warm_start: String,
    /// Seed of the tiny model's initialisation and the warm start's batches (default: the
    /// run's `seed`). Fixing it fixes the warm start while `seed` varies GRPO.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoSection {
    /// Optimizer steps; 0: derived from `epochs`.
    pub steps: usize,
    /// Passes over the (filtered) training set, as the HF Trainer's `num_train_epochs`:
    /// steps = ceil(epochs x floor(ceil(records / prompts_per_step) / gradient_accumulation)).
    /// Used when `steps` is 0.
    pub epochs: f64,
    /// Prompts per micro-batch; each is sampled `num_generations` times.
    pub prompts_per_step: usize,
    pub gradient_accumulation: usize,
    pub num_generations: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    /// Sampling: tokens less likely than this times the most likely are dropped (0: off).
    pub min_p: f32,
    /// Sampling: tokens already in the prompt or the completion penalized (1: off).
    pub repetition_penalty: f32,
    pub max_completion_length: usize,
    pub beta: f32,
    pub epsilon: f32,
    pub epsilon_high: f32,
    /// grpo | bnpo | dr_grpo | dapo
    pub loss_type: LossType,
    /// group | batch | none
    pub scale_rewards: ScaleRewards,
    /// token | sequence (GSPO)
    pub importance_sampling_level: ImportanceSampling,
    /// Two-sided clipping: the unclipped ratio capped at this (above 1); absent: off.
    pub delta: Option<f32>,
    /// k3 (TRL's) | low_var_kl | k1 | k2 | abs
    pub kl_estimator: KlEstimator,
    /// Entropy bonus weight (0: off).
    pub entropy_coef: f32,
    /// Policy term on the tokens at or above this entropy quantile only (1: every token).
    pub top_entropy_quantile: f32,
    pub mask_truncated_completions: bool,
    /// DAPO's dynamic sampling: groups whose rewards are all equal are replaced by groups of
    /// prompts drawn anew (verl's `filter_groups`).
    pub filter_groups: bool,
    /// Rounds of rollouts a micro-batch may take to fill its groups (0: no limit).
    pub max_num_gen_batches: usize,
    /// KL as a reward penalty: each completion's reward minus this times its summed KL to the
    /// reference (verl's `use_kl_in_reward`); 0: off.
    pub kl_in_reward: f32,
    /// Its estimator (verl's `kl_penalty`): k1 (verl's default), k2, k3, low_var_kl, abs.
    pub kl_in_reward_estimator: KlEstimator,
    /// TRL's `sync_ref_model`: every `ref_model_sync_steps` steps the reference becomes
    /// `ref_model_mixup_alpha` x policy + (1 - alpha) x reference.
    pub sync_ref_model: bool,
    pub ref_model_mixup_alpha: f32,
    pub ref_model_sync_steps: usize,
    /// TRL's `num_generations_eval`: the held-out evaluation during GRPO (`eval.every`)
    /// samples this many answers per question with the training sampling settings and scores
    /// them with the rewards (accuracy over samples, pass@n, rewards); absent: greedy answers,
    /// Med-R1's protocol. The evaluations before and after GRPO stay greedy.
    pub num_generations_eval: Option<usize>,
    pub num_iterations: usize,
    /// Prompt and completion widths padded to multiples of this so steps share shapes (and
    /// compiled kernels on GPU backends); 0: 64 on cuda and wgpu, exact (1) on flex.
    pub shape_bucket: usize,
    /// Each prompt and its image run once per group (rollout prefill and every scoring pass)
    /// instead of once per completion; the same results up to float rounding. `false` repeats
    /// the prompt per completion, as TRL does (for comparison).
    pub share_prompt: bool,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    /// Warmup as a fraction of the run's steps (rounded up), when `warmup_steps` is 0.
    pub warmup_ratio: f64,
    /// constant | linear | cosine
    pub decay: Decay,
    pub weight_decay: f32,
    pub max_grad_norm: f32,
    /// A step whose loss, gradient norm or mean reward is not finite is skipped (weights
    /// untouched); this many in a row stop the run with an error.
    pub max_bad_steps: usize,
    /// Reward name -> weight: format, accuracy (Med-R1's exact match), letter_accuracy.
    pub rewards: std::collections::BTreeMap<String, f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    pub before: bool,
    pub after: bool,
    pub batch_size: usize,
    pub max_new_tokens: usize,
    /// Held-out greedy accuracy during GRPO every this many steps (0: never).
    pub every: usize,
    /// Held-out questions used by `every` (a prefix of the eval set).
    pub every_subset: usize,
    /// How an answer is judged: tags (the `<answer>` tag's letter), med_r1_raw (the whole
    /// output must be the letter: Med-R1's Qwen2-VL no-think and zero-shot scripts),
    /// med_r1_hybrid (the tag when the output says "answer", else the whole output: its
    /// Qwen2.5-VL no-think script).
    pub scoring: Scoring,
}

/// LoRA for GRPO (PEFT's `LoraConfig` names): the base frozen, adapters trained, the
/// reference model the base with the adapters bypassed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub enabled: bool,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names (a name or a `.`-suffix matches) or one regular expression (full match),
    /// PEFT names on transformers' Qwen2-VL.
    pub target_modules: qwen2vl::TargetModules,
    pub use_rslora: bool,
    /// A PEFT adapter directory to start from (its adapter_config.json then sets r, alpha,
    /// dropout, targets); empty: fresh adapters.
    pub adapter: String,
}

impl Default for LoraSection {
    fn default() -> Self {
        let d = qwen2vl::LoraConfig::default();
        Self {
            enabled: false,
            r: d.r,
            alpha: d.alpha,
            dropout: d.dropout,
            target_modules: d.target_modules,
            use_rslora: d.use_rslora,
            adapter: String::new(),
        }
    }
}

impl LoraSection {
    pub fn lora_config(&self) -> qwen2vl::LoraConfig {
        qwen2vl::LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            target_modules: self.target_modules.clone(),
            use_rslora: self.use_rslora,
        }
    }
}

/// How the scoring passes bound their memory (each exact: the same log-probs and gradients).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemorySection {
    /// Completions per scoring pass, each run forward and backward before the next; with
    /// grpo.share_prompt a multiple of grpo.num_generations. 0: all of a rollout in one pass.
    pub score_micro_batch: usize,
    /// Completion tokens per LM-head chunk for log-probs and entropies. 0: all at once.
    pub lm_head_chunk: usize,
    /// Activation checkpointing of each decoder layer in the policy's scoring pass.
    pub checkpoint_decoder: bool,
    /// Activation checkpointing of each vision block (and the patch embedding and merger).
    pub checkpoint_vision: bool,
}

impl MemorySection {
    pub fn options(&self) -> grpo::learner::MemoryOptions {
        grpo::learner::MemoryOptions {
            micro_batch: self.score_micro_batch,
            head_chunk: self.lm_head_chunk,
            recompute: qwen2vl::generation::Recompute {
                decoder: self.checkpoint_decoder,
                vision: self.checkpoint_vision,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    pub every: usize,
    pub keep: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            name: "tiny".into(),
            runs_dir: "runs".into(),
            device: "flex".into(),
            devices: Vec::new(),
            dtype: "f32".into(),
            seed: 0,
            model: ModelConfig::default(),
            data: DataConfig::default(),
            sft: SftConfig::default(),
            grpo: GrpoSection::default(),
            eval: EvalSection::default(),
            checkpoint: CheckpointSection::default(),
            lora: LoraSection::default(),
            memory: MemorySection::default(),
            logging: LoggingSection::default(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            checkpoint: String::new(),
            random_config: String::new(),
            tokenizer: String::new(),
            tiny: TinyModel::default(),
            min_pixels: 3136,
            max_pixels: 401_408,
        }
    }
}

impl Default for TinyModel {
    fn default() -> Self {
        Self {
            vision_depth: 2,
            vision_embed_dim: 64,
            vision_heads: 4,
            hidden_size: 128,
            intermediate_size: 512,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            mrope_section: [4, 6, 6],
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: "synthetic".into(),
            train: Vec::new(),
            test: Vec::new(),
            image_root: PathBuf::new(),
            train_modalities: Vec::new(),
            eval_modalities: Vec::new(),
            question_types: Vec::new(),
            max_train: 0,
            max_eval: 0,
            template: "train_nothink".into(),
            eval_template: "eval_nothink".into(),
            resize: vec![384, 384],
            skip_invalid: false,
            prefetch: 8,
            workers: 2,
            synthetic: SyntheticData::default(),
        }
    }
}

impl Default for SyntheticData {
    fn default() -> Self {
        Self {
            n: 1000,
            image_size: 56,
            test_fraction: 0.2,
            modalities: Vec::new(),
            question_types: Vec::new(),
            min_options: 4,
            max_options: 4,
            shuffle_options: false,
            seed: None,
        }
    }
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            steps: 0,
            batch_size: 16,
            learning_rate: 1e-3,
            target: "answer".into(),
            warm_start: String::new(),
            seed: None,
        }
    }
}

impl Default for GrpoSection {
    /// Med-R1's recipe.
    fn default() -> Self {
        Self {
            steps: 100,
            epochs: 0.0,
            prompts_per_step: 1,
            gradient_accumulation: 4,
            num_generations: 4,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            max_completion_length: 256,
            beta: 0.04,
            epsilon: 0.2,
            epsilon_high: 0.2,
            loss_type: LossType::Grpo,
            scale_rewards: ScaleRewards::Group,
            importance_sampling_level: ImportanceSampling::Token,
            delta: None,
            kl_estimator: KlEstimator::K3,
            entropy_coef: 0.0,
            top_entropy_quantile: 1.0,
            mask_truncated_completions: false,
            filter_groups: false,
            max_num_gen_batches: 10,
            kl_in_reward: 0.0,
            kl_in_reward_estimator: KlEstimator::K1,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
            num_generations_eval: None,
            num_iterations: 1,
            shape_bucket: 0,
            share_prompt: true,
            learning_rate: 1e-6,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            decay: Decay::Linear,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            max_bad_steps: 3,
            rewards: [("accuracy".to_string(), 1.0), ("format".to_string(), 1.0)]
                .into_iter()
                .collect(),
        }
    }
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            before: true,
            after: true,
            batch_size: 16,
            max_new_tokens: 256,
            every: 0,
            every_subset: 64,
            scoring: Scoring::Tags,
        }
    }
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self { every: 50, keep: 2 }
    }
}

/// Applies `key=value` to a TOML document: the value is read as TOML (`3`, `1e-4`, `true`,
/// `"text"`, `[1, 2]`), or taken as a string when it does not parse.
pub fn apply_override(doc: &mut toml::Table, assignment: &str) -> anyhow::Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow!("--set {assignment:?}: expected key=value"))?;
    let key = key.trim();
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set {assignment:?}: empty key segment");
    }
    let mut table = doc;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| {
            anyhow!(
                "--set {key}: `{}` is a value, not a section",
                parts[..=i].join(".")
            )
        })?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

impl RunConfig {
    /// Reads `path` (or the embedded tiny config) and applies the overrides.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> anyhow::Result<Self> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read config {}", p.display()))?,
                p.display().to_string(),
            ),
            None => (TINY_TOML.to_string(), "embedded tiny config".to_string()),
        };
        Self::from_toml(&text, &origin, overrides)
    }

    pub fn from_toml(text: &str, origin: &str, overrides: &[String]) -> anyhow::Result<Self> {
        let mut doc: toml::Table =
            toml::from_str(text).map_err(|e| anyhow!("{origin}: {}", e.message()))?;
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        let cfg: RunConfig = serde_path_to_error(doc).map_err(|e| {
            let Some(key) = e.key else {
                return anyhow!("{origin}: {}", e.message);
            };
            // Name the override when the key came from one.
            let from_set = overrides.iter().any(|o| {
                let k = o.split('=').next().unwrap_or("").trim();
                k == key || key.starts_with(&format!("{k}."))
            });
            if from_set {
                anyhow!("--set {key}: {}", e.message)
            } else {
                anyhow!("{origin}: key `{key}`: {}", e.message)
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The resolved config as TOML (written to the run directory).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a config serialises")
    }

    fn validate(&self) -> anyhow::Result<()> {
        let one_of = |key: &str, v: &str, allowed: &[&str]| -> anyhow::Result<()> {
            if allowed.contains(&v) {
                Ok(())
            } else {
                bail!("{key} = {v:?}: expected one of {}", allowed.join(", "))
            }
        };
        one_of("device", &self.device, &["flex", "wgpu", "cuda"])?;
        one_of("dtype", &self.dtype, &["f32", "bf16"])?;
        for spec in &self.devices {
            let (kind, _) = crate::backend::parse_device(spec).map_err(anyhow::Error::msg)?;
            if kind.name() != self.device {
                bail!(
                    "devices: {spec:?} is not a {} device (device = {:?}); list devices of one \
                     backend",
                    self.device,
                    self.device
                );
            }
        }
        let workers = self.devices.len();
        if workers > 1 {
            if !self.grpo.prompts_per_step.is_multiple_of(workers) {
                bail!(
                    "grpo.prompts_per_step ({}) must be a multiple of the {workers} devices: \
                     each rolls out an equal share of every micro-batch",
                    self.grpo.prompts_per_step
                );
            }
            if self.grpo.filter_groups {
                bail!(
                    "grpo.filter_groups with several devices: dynamic sampling rolls groups out \
                     one at a time on the main device; use one device"
                );
            }
        }
        if self.dtype == "bf16" && self.device == "wgpu" {
            bail!("dtype = \"bf16\" runs on device = \"cuda\" or \"flex\": WGPU has no bf16 arithmetic");
        }
        if !self.model.random_config.is_empty() {
            if !self.model.checkpoint.is_empty() {
                bail!("model.checkpoint and model.random_config are alternatives: set one");
            }
            if self.model.tokenizer.is_empty() {
                bail!("model.random_config needs model.tokenizer (a tokenizer.json for its vocabulary)");
            }
        }
        one_of("data.source", &self.data.source, &["synthetic", "files"])?;
        one_of("sft.target", &self.sft.target, &["answer", "format_only"])?;
        for name in self.grpo.rewards.keys() {
            one_of(
                "grpo.rewards",
                name,
                &["format", "accuracy", "letter_accuracy"],
            )?;
        }
        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            bail!("name = {:?}: a plain directory name is needed", self.name);
        }
        if self.lora.enabled {
            self.lora
                .lora_config()
                .validate()
                .map_err(|e| anyhow!("{e}"))?;
        } else if !self.lora.adapter.is_empty() {
            bail!("lora.adapter is set but lora.enabled = false: enable LoRA to train the adapter");
        }
        if self.grpo.num_generations < 2 {
            bail!("grpo.num_generations must be at least 2: advantages compare within a group");
        }
        let micro = self.memory.score_micro_batch;
        if self.grpo.share_prompt && !micro.is_multiple_of(self.grpo.num_generations) {
            bail!(
                "memory.score_micro_batch = {micro}: with grpo.share_prompt a scoring pass holds \
                 whole groups, a multiple of grpo.num_generations ({})",
                self.grpo.num_generations
            );
        }
        if self.lora.enabled
            && self.lora.dropout > 0.0
            && (self.memory.checkpoint_decoder || self.memory.checkpoint_vision)
        {
            bail!(
                "memory.checkpoint_decoder / memory.checkpoint_vision with lora.dropout = {}: \
                 checkpointing recomputes blocks and would draw new dropout masks; set \
                 lora.dropout = 0 or turn checkpointing off",
                self.lora.dropout
            );
        }
        self.validate_ranges()?;
        match self.data.resize.as_slice() {
            [] => {}
            [w, h] if *w > 0 && *h > 0 => {}
            other => bail!("data.resize = {other:?}: expected [] or [width, height]"),
        }
        if self.data.prefetch == 0 || self.data.workers == 0 {
            bail!("data.prefetch and data.workers must be at least 1");
        }
        let epochs = self.grpo.epochs;
        if !(epochs.is_finite() && epochs >= 0.0) {
            bail!("grpo.epochs = {epochs}: expected a number of passes, 0 or more");
        }
        if self.grpo.steps > 0 && epochs > 0.0 {
            bail!(
                "grpo.steps = {} and grpo.epochs = {epochs}: set one of them (the other to 0)",
                self.grpo.steps
            );
        }
        if self.data.source == "files" && self.data.train.is_empty() && self.grpo.trains() {
            bail!("data.source = \"files\" needs data.train (Med-R1 or OmniMedVQA record files)");
        }
        Ok(())
    }
}

impl RunConfig {
    /// Every numeric setting within its allowed range, naming the key: checked before any work.
    fn validate_ranges(&self) -> anyhow::Result<()> {
        fn at_least(key: &str, v: usize, min: usize) -> anyhow::Result<()> {
            if v < min {
                bail!("{key} = {v}: must be at least {min}");
            }
            Ok(())
        }
        fn real(key: &str, v: f64, lo: f64, lo_open: bool, hi: f64) -> anyhow::Result<()> {
            let above = if lo_open { v > lo } else { v >= lo };
            if !(v.is_finite() && above && v <= hi) {
                let open = if lo_open { "(" } else { "[" };
                bail!("{key} = {v}: expected a finite number in {open}{lo}, {hi}]");
            }
            Ok(())
        }
        let inf = f64::MAX;
        let m = &self.model;
        at_least("model.min_pixels", m.min_pixels, 1)?;
        if m.max_pixels < m.min_pixels {
            bail!(
                "model.max_pixels = {} is below model.min_pixels = {}",
                m.max_pixels,
                m.min_pixels
            );
        }
        let d = &self.data;
        if d.source == "synthetic" {
            let sy = &d.synthetic;
            at_least("data.synthetic.n", sy.n, 1)?;
            at_least("data.synthetic.image_size", sy.image_size as usize, 28)?;
            real(
                "data.synthetic.test_fraction",
                sy.test_fraction,
                0.0,
                false,
                1.0,
            )?;
            at_least("data.synthetic.min_options", sy.min_options, 2)?;
            if !(sy.min_options..=4).contains(&sy.max_options) {
                bail!(
                    "data.synthetic.max_options = {}: expected data.synthetic.min_options ({}) to 4",
                    sy.max_options,
                    sy.min_options
                );
            }
        }
        let sft = &self.sft;
        if sft.steps > 0 {
            at_least("sft.batch_size", sft.batch_size, 1)?;
            real("sft.learning_rate", sft.learning_rate, 0.0, true, inf)?;
        }
        let g = &self.grpo;
        at_least("grpo.prompts_per_step", g.prompts_per_step, 1)?;
        at_least("grpo.gradient_accumulation", g.gradient_accumulation, 1)?;
        at_least("grpo.max_completion_length", g.max_completion_length, 1)?;
        at_least("grpo.num_iterations", g.num_iterations, 1)?;
        at_least("grpo.max_bad_steps", g.max_bad_steps, 1)?;
        real("grpo.temperature", g.temperature as f64, 0.0, true, inf)?;
        real("grpo.top_p", g.top_p as f64, 0.0, true, 1.0)?;
        real("grpo.min_p", g.min_p as f64, 0.0, false, 1.0)?;
        real(
            "grpo.repetition_penalty",
            g.repetition_penalty as f64,
            0.0,
            true,
            inf,
        )?;
        real("grpo.beta", g.beta as f64, 0.0, false, inf)?;
        real("grpo.epsilon", g.epsilon as f64, 0.0, false, inf)?;
        real("grpo.epsilon_high", g.epsilon_high as f64, 0.0, false, inf)?;
        if let Some(delta) = g.delta {
            real("grpo.delta", delta as f64, 1.0, true, inf)?;
        }
        if let Some(n) = g.num_generations_eval {
            at_least("grpo.num_generations_eval", n, 1)?;
            if self.eval.every == 0 {
                bail!(
                    "grpo.num_generations_eval is set but eval.every is 0: only the held-out \
                     evaluation during GRPO samples answers (set eval.every, or remove \
                     grpo.num_generations_eval)"
                );
            }
        }
        real("grpo.entropy_coef", g.entropy_coef as f64, -inf, false, inf)?;
        real("grpo.kl_in_reward", g.kl_in_reward as f64, 0.0, false, inf)?;
        if g.sync_ref_model {
            real(
                "grpo.ref_model_mixup_alpha",
                g.ref_model_mixup_alpha as f64,
                0.0,
                false,
                1.0,
            )?;
            at_least("grpo.ref_model_sync_steps", g.ref_model_sync_steps, 1)?;
            if g.beta == 0.0 && g.kl_in_reward == 0.0 {
                bail!(
                    "grpo.sync_ref_model is set but no reference model is used (grpo.beta and \
                     grpo.kl_in_reward are 0): nothing to synchronise"
                );
            }
            if self.lora.enabled {
                bail!(
                    "grpo.sync_ref_model with lora.enabled: the LoRA reference is the frozen \
                     base the adapters sit on, which cannot move (TRL refuses it with PEFT too)"
                );
            }
        }
        real(
            "grpo.top_entropy_quantile",
            g.top_entropy_quantile as f64,
            0.0,
            true,
            1.0,
        )?;
        real("grpo.warmup_ratio", g.warmup_ratio, 0.0, false, 1.0)?;
        let mem = &self.memory;
        if g.entropy_coef != 0.0 && mem.lm_head_chunk > 0 {
            bail!(
                "grpo.entropy_coef = {} needs the entropies' gradient, which memory.lm_head_chunk = {} \
                 does not keep: set one of the two to 0",
                g.entropy_coef,
                mem.lm_head_chunk
            );
        }
        if g.filter_groups && g.top_entropy_quantile < 1.0 && g.prompts_per_step > 1 {
            bail!(
                "grpo.filter_groups scores each group in its own pass, and \
                 grpo.top_entropy_quantile = {} needs the whole rollout in one: with \
                 grpo.prompts_per_step = {} turn one of the two off",
                g.top_entropy_quantile,
                g.prompts_per_step
            );
        }
        let rows = g.prompts_per_step * g.num_generations;
        if g.top_entropy_quantile < 1.0 && mem.score_micro_batch > 0 && mem.score_micro_batch < rows
        {
            bail!(
                "grpo.top_entropy_quantile = {} is taken over a whole rollout, which \
                 memory.score_micro_batch = {} scores in parts: set it to 0",
                g.top_entropy_quantile,
                mem.score_micro_batch
            );
        }
        if g.warmup_ratio > 0.0 && g.warmup_steps > 0 {
            bail!(
                "grpo.warmup_steps = {} and grpo.warmup_ratio = {}: set one of the two",
                g.warmup_steps,
                g.warmup_ratio
            );
        }
        real("grpo.learning_rate", g.learning_rate, 0.0, true, inf)?;
        real("grpo.weight_decay", g.weight_decay as f64, 0.0, false, inf)?;
        real("grpo.max_grad_norm", g.max_grad_norm as f64, 0.0, true, inf)?;
        if g.rewards.is_empty() {
            bail!("grpo.rewards is empty: GRPO needs at least one reward (format, accuracy, letter_accuracy)");
        }
        for (name, &w) in &g.rewards {
            if !w.is_finite() {
                bail!("grpo.rewards.{name} = {w}: a reward weight must be a finite number");
            }
        }
        let e = &self.eval;
        at_least("eval.batch_size", e.batch_size, 1)?;
        at_least("eval.max_new_tokens", e.max_new_tokens, 1)?;
        at_least("checkpoint.every", self.checkpoint.every, 1)?;
        at_least("checkpoint.keep", self.checkpoint.keep, 1)?;
        Ok(())
    }
}

impl GrpoSection {
    /// Whether the run takes any GRPO step.
    pub fn trains(&self) -> bool {
        self.steps > 0 || self.epochs > 0.0
    }

    /// Warmup steps of a run of `total_steps`: `warmup_steps`, or `warmup_ratio` of the run
    /// rounded up (the HF Trainer's `get_warmup_steps`).
    pub fn warmup(&self, total_steps: usize) -> usize {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * total_steps as f64).ceil() as usize
        }
    }

    /// Optimizer steps over `records` training records: `steps`, or `epochs` passes counted
    /// as the HF Trainer counts them (micro-batches per pass, floor-divided by the
    /// accumulation, at least 1; the epochs' total rounded up).
    pub fn total_steps(&self, records: usize) -> usize {
        if self.steps > 0 {
            return self.steps;
        }
        let micro = records.div_ceil(self.prompts_per_step.max(1));
        let per_epoch = (micro / self.gradient_accumulation.max(1)).max(1);
        (self.epochs * per_epoch as f64).ceil() as usize
    }
}

/// A deserialisation error with the dotted path of the offending key, if one is found.
struct KeyError {
    key: Option<String>,
    message: String,
}

/// Deserialises, naming the offending key: for an unknown key the name in the message under
/// the table the error points into; otherwise the key on the line the error points at.
fn serde_path_to_error(doc: toml::Table) -> Result<RunConfig, KeyError> {
    let text = toml::to_string(&doc).map_err(|e| KeyError {
        key: None,
        message: e.to_string(),
    })?;
    toml::from_str::<RunConfig>(&text).map_err(|e| {
        let message = e.message().trim().to_string();
        let Some(span) = e.span() else {
            return KeyError { key: None, message };
        };
        let start = span.start.min(text.len());
        // The line holding the error's start, and the table header at or above it.
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line = text[line_start..].lines().next().unwrap_or("").trim();
        let header = |l: &str| {
            let l = l.trim();
            (l.starts_with('[') && l.ends_with(']'))
                .then(|| l.trim_matches(['[', ']']).trim().to_string())
        };
        let section = header(line).or_else(|| text[..line_start].lines().rev().find_map(header));
        let unknown = message
            .strip_prefix("unknown field `")
            .and_then(|m| m.split('`').next())
            .map(str::to_string);
        let key = match unknown {
            Some(field) => Some(match &section {
                Some(s) => format!("{s}.{field}"),
                None => field,
            }),
            None if header(line).is_some() => section,
            None => {
                let k = line.split('=').next().unwrap_or("").trim();
                match (&section, k.is_empty()) {
                    (Some(s), false) => Some(format!("{s}.{k}")),
                    (None, false) => Some(k.to_string()),
                    (s, true) => s.clone(),
                }
            }
        };
        KeyError { key, message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_config_parses_and_round_trips() {
        let cfg = RunConfig::load(None, &[]).unwrap();
        let again = RunConfig::from_toml(&cfg.to_toml(), "resolved", &[]).unwrap();
        assert_eq!(cfg, again);
    }

    #[test]
    fn every_shipped_config_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                RunConfig::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e:#}"));
                n += 1;
            }
        }
        assert!(n >= 7, "{n} configs");
    }

    #[test]
    fn the_lora_recipe_is_med_r1s_no_think_recipe_with_lora() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let lora = RunConfig::load(Some(&dir.join("med-r1-2b-lora.toml")), &[]).unwrap();
        let mut plain = RunConfig::load(Some(&dir.join("med-r1-2b-nothink.toml")), &[]).unwrap();
        assert!(lora.lora.enabled && lora.lora.adapter.is_empty());
        assert_eq!(lora.lora.lora_config().scale(), 2.0);
        plain.name = lora.name.clone();
        plain.grpo.learning_rate = lora.grpo.learning_rate;
        plain.lora = lora.lora.clone();
        assert_eq!(plain, lora);
    }

    /// Med-R1's README trains Qwen2.5-VL-3B with the arguments of the 2B no-think recipe; only
    /// the model and the evaluation script's scoring differ.
    #[test]
    fn the_qwen25vl_recipe_is_the_no_think_recipe_on_another_model() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let q25 = RunConfig::load(Some(&dir.join("med-r1-qwen25vl-3b-nothink.toml")), &[]).unwrap();
        let mut plain = RunConfig::load(Some(&dir.join("med-r1-2b-nothink.toml")), &[]).unwrap();
        assert!(q25.model.checkpoint.contains("Qwen2.5-VL-3B-Instruct"));
        assert_eq!(q25.eval.scoring, Scoring::MedR1Hybrid);
        plain.name = q25.name.clone();
        plain.model.checkpoint = q25.model.checkpoint.clone();
        plain.eval.scoring = q25.eval.scoring;
        assert_eq!(plain, q25);
    }

    #[test]
    fn the_loss_menu_is_read_and_checked_naming_the_key() {
        let cfg = RunConfig::load(
            None,
            &[
                "grpo.importance_sampling_level=\"sequence\"".into(),
                "grpo.delta=1.5".into(),
                "grpo.kl_estimator=\"mse\"".into(),
                "grpo.entropy_coef=0.01".into(),
                "grpo.top_entropy_quantile=0.2".into(),
            ],
        )
        .unwrap();
        let g = &cfg.grpo;
        assert_eq!(g.importance_sampling_level, ImportanceSampling::Sequence);
        assert_eq!((g.delta, g.kl_estimator), (Some(1.5), KlEstimator::K2));
        assert_eq!((g.entropy_coef, g.top_entropy_quantile), (0.01, 0.2));
        let again = RunConfig::from_toml(&cfg.to_toml(), "resolved", &[]).unwrap();
        assert_eq!(cfg, again);
        for (bad, key) in [
            ("grpo.delta=1.0", "grpo.delta"),
            ("grpo.top_entropy_quantile=0.0", "grpo.top_entropy_quantile"),
            ("grpo.kl_estimator=\"k4\"", "kl_estimator"),
            ("grpo.warmup_ratio=1.5", "grpo.warmup_ratio"),
            ("grpo.min_p=1.5", "grpo.min_p"),
            ("grpo.repetition_penalty=0.0", "grpo.repetition_penalty"),
            ("grpo.num_generations_eval=0", "grpo.num_generations_eval"),
        ] {
            let e = format!("{:#}", RunConfig::load(None, &[bad.into()]).unwrap_err());
            assert!(e.contains(key), "{bad}: {e}");
        }
        for (a, b) in [
            ("grpo.sync_ref_model=true", "grpo.beta=0.0"),
            ("grpo.sync_ref_model=true", "lora.enabled=true"),
            ("grpo.num_generations_eval=2", "eval.every=0"),
            ("grpo.entropy_coef=0.1", "memory.lm_head_chunk=64"),
            (
                "grpo.top_entropy_quantile=0.5",
                "memory.score_micro_batch=8",
            ),
        ] {
            let e = RunConfig::load(None, &[a.into(), b.into()]).unwrap_err();
            let e = format!("{e:#}");
            let key = |s: &str| s.split('=').next().unwrap().to_string();
            assert!(e.contains(&key(a)) && e.contains(&key(b)), "{e}");
        }
    }

    #[test]
    fn device_lists_are_checked_naming_the_key() {
        let ok = RunConfig::load(
            None,
            &[
                "devices=[\"flex\", \"flex\"]".into(),
                "grpo.prompts_per_step=2".into(),
            ],
        )
        .unwrap();
        assert_eq!(ok.devices.len(), 2);
        for (sets, needle) in [
            (vec!["devices=[\"cuda:0\"]"], "not a flex device"),
            (vec!["devices=[\"gpu0\"]"], "is not a device"),
            (
                vec!["devices=[\"flex\", \"flex\"]", "grpo.prompts_per_step=3"],
                "grpo.prompts_per_step",
            ),
            (
                vec![
                    "devices=[\"flex\", \"flex\"]",
                    "grpo.prompts_per_step=2",
                    "grpo.filter_groups=true",
                ],
                "grpo.filter_groups",
            ),
        ] {
            let sets: Vec<String> = sets.into_iter().map(String::from).collect();
            let e = format!("{:#}", RunConfig::load(None, &sets).unwrap_err());
            assert!(e.contains(needle) && e.contains("devices"), "{sets:?}: {e}");
        }
    }

    /// `warmup_ratio` as the HF Trainer's `get_warmup_steps` reads it: ceil(ratio x steps),
    /// and never together with `warmup_steps`.
    #[test]
    fn warmup_ratio_gives_steps_rounded_up() {
        let cfg = RunConfig::load(None, &["grpo.warmup_ratio=0.1".into()]).unwrap();
        assert_eq!(cfg.grpo.warmup(25), 3);
        assert_eq!(cfg.grpo.warmup(100), 10);
        let steps = RunConfig::load(None, &["grpo.warmup_steps=4".into()]).unwrap();
        assert_eq!(steps.grpo.warmup(100), 4);
        let both = RunConfig::load(
            None,
            &["grpo.warmup_steps=4".into(), "grpo.warmup_ratio=0.1".into()],
        )
        .unwrap_err();
        assert!(
            format!("{both:#}").contains("set one of the two"),
            "{both:#}"
        );
    }

    #[test]
    fn overrides_reach_nested_keys() {
        let cfg = RunConfig::load(
            None,
            &[
                "grpo.steps=7".into(),
                "grpo.learning_rate=2e-4".into(),
                "name=other".into(),
                "model.tiny.mrope_section=[2,3,3]".into(),
            ],
        )
        .unwrap();
        assert_eq!(cfg.grpo.steps, 7);
        assert_eq!(cfg.grpo.learning_rate, 2e-4);
        assert_eq!(cfg.name, "other");
        assert_eq!(cfg.model.tiny.mrope_section, [2, 3, 3]);
    }

    #[test]
    fn epochs_give_steps_as_the_hf_trainer_counts_them() {
        let cfg = RunConfig::load(
            None,
            &[
                "grpo.steps=0".into(),
                "grpo.epochs=2".into(),
                "grpo.prompts_per_step=1".into(),
                "grpo.gradient_accumulation=4".into(),
            ],
        )
        .unwrap();
        // Med-R1's CT split: 12,567 questions, 4 per optimizer step.
        assert_eq!(cfg.grpo.total_steps(12_567), 2 * 3141);
        assert_eq!(cfg.grpo.total_steps(3), 2, "at least one step per epoch");
        let mut half = cfg.grpo.clone();
        half.epochs = 0.5;
        half.prompts_per_step = 3;
        half.gradient_accumulation = 2;
        // ceil(10 / 3) = 4 micro-batches, 2 steps per epoch, half an epoch.
        assert_eq!(half.total_steps(10), 1);
        let e = RunConfig::load(None, &["grpo.epochs=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("grpo.steps") && e.contains("grpo.epochs"), "{e}");
        let e = RunConfig::load(None, &["data.resize=[384]".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.resize"), "{e}");
        let e = RunConfig::load(None, &["eval.scoring=\"loose\"".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("eval.scoring"), "{e}");
        // A shared-prompt scoring pass holds whole groups (tiny: 8 generations).
        let e = RunConfig::load(None, &["memory.score_micro_batch=6".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory.score_micro_batch"), "{e}");
        let ok = RunConfig::load(
            None,
            &[
                "memory.score_micro_batch=8".into(),
                "memory.lm_head_chunk=64".into(),
            ],
        )
        .unwrap();
        assert_eq!(ok.memory.options().micro_batch, 8);
        assert_eq!(ok.memory.options().head_chunk, 64);
        let on = RunConfig::load(None, &["memory.checkpoint_decoder=true".into()]).unwrap();
        assert!(on.memory.options().recompute.decoder && !on.memory.options().recompute.vision);
        let e = RunConfig::load(
            None,
            &[
                "memory.checkpoint_vision=true".into(),
                "lora.enabled=true".into(),
                "lora.dropout=0.05".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("lora.dropout"), "{e}");
        RunConfig::load(
            None,
            &[
                "memory.score_micro_batch=6".into(),
                "grpo.share_prompt=false".into(),
            ],
        )
        .unwrap();
    }

    #[test]
    fn every_numeric_setting_out_of_range_is_refused_naming_its_key() {
        for (set, key) in [
            ("grpo.temperature=nan", "grpo.temperature"),
            ("grpo.temperature=inf", "grpo.temperature"),
            ("grpo.temperature=0.0", "grpo.temperature"),
            ("grpo.top_p=1.5", "grpo.top_p"),
            ("grpo.top_p=0.0", "grpo.top_p"),
            ("grpo.learning_rate=-1e-6", "grpo.learning_rate"),
            ("grpo.learning_rate=nan", "grpo.learning_rate"),
            ("grpo.beta=-0.04", "grpo.beta"),
            ("grpo.max_completion_length=0", "grpo.max_completion_length"),
            ("grpo.max_grad_norm=0.0", "grpo.max_grad_norm"),
            ("grpo.prompts_per_step=0", "grpo.prompts_per_step"),
            ("grpo.gradient_accumulation=0", "grpo.gradient_accumulation"),
            ("grpo.num_iterations=0", "grpo.num_iterations"),
            ("grpo.rewards.accuracy=nan", "grpo.rewards.accuracy"),
            ("sft.learning_rate=0.0", "sft.learning_rate"),
            ("sft.batch_size=0", "sft.batch_size"),
            ("eval.batch_size=0", "eval.batch_size"),
            ("eval.max_new_tokens=0", "eval.max_new_tokens"),
            ("checkpoint.every=0", "checkpoint.every"),
            ("checkpoint.keep=0", "checkpoint.keep"),
            ("model.max_pixels=100", "model.max_pixels"),
            (
                "data.synthetic.test_fraction=1.5",
                "data.synthetic.test_fraction",
            ),
            ("data.synthetic.max_options=5", "data.synthetic.max_options"),
        ] {
            let e = RunConfig::load(None, &[set.into()])
                .err()
                .unwrap_or_else(|| panic!("{set} accepted"))
                .to_string();
            assert!(e.contains(key), "{set}: {e}");
        }
        let mut cfg = RunConfig::load(None, &[]).unwrap();
        cfg.grpo.rewards.clear();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("grpo.rewards"), "{e}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let e = RunConfig::load(None, &["grpo.stepz=3".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("stepz"), "{e}");
        let e = RunConfig::load(None, &["grpo.steps=\"many\"".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("grpo.steps"), "{e}");
        let e = RunConfig::load(None, &["grpo.loss_type=sum".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("grpo.loss_type"), "{e}");
        let e = RunConfig::load(None, &["steps".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key=value"), "{e}");
    }

    /// The key named is the one that is wrong (not a neighbour of it, nor its table's
    /// header), and an override's error says `--set`, not the file it overrides.
    #[test]
    fn errors_name_exactly_the_wrong_key_and_where_it_came_from() {
        for (set, want) in [
            (
                "grpo.lerning_rate=1",
                "--set grpo.lerning_rate: unknown field `lerning_rate`",
            ),
            (
                "data.synthetic.nn=3",
                "--set data.synthetic.nn: unknown field `nn`",
            ),
            ("foo=1", "--set foo: unknown field `foo`"),
            (
                "model.tiny.hiden=3",
                "--set model.tiny.hiden: unknown field `hiden`",
            ),
            (
                "eval.max_new_tokens=-3",
                "--set eval.max_new_tokens: invalid value",
            ),
        ] {
            let e = RunConfig::load(None, &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{set}: {e}");
        }
        for (text, want) in [
            (
                "[grpo]\nsteps = 3\nbeta_typo = 1\n",
                "f.toml: key `grpo.beta_typo`: unknown",
            ),
            (
                "name = \"x\"\nbogus = 1\n[grpo]\nsteps = 3\n",
                "f.toml: key `bogus`: unknown",
            ),
            (
                "[grpo]\nbeta = 0.0\nsteps = \"x\"\n",
                "f.toml: key `grpo.steps`: invalid type",
            ),
            (
                "[data.synthetic]\nn = 3\nnn = 4\n",
                "f.toml: key `data.synthetic.nn`: unknown",
            ),
        ] {
            let e = RunConfig::from_toml(text, "f.toml", &[])
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{text}: {e}");
        }
    }
}
