//! `medr1 bench`: the speed of a GRPO step (rollout with rewards, policy and reference scoring,
//! backward, clipping, AdamW: the learner's own step) on a model built from a config with
//! random weights (no checkpoint needed), on the chosen backend, with group-shared compute and
//! again with the prompt repeated per completion, as TRL computes it. Synthetic inputs: each
//! prompt is one image of `--image-size` pixels square plus `--prompt-len` text tokens.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use clap::Args;
use grpo::host::OptimizerOptions;
use grpo::learner::{rollout, update, GrpoConfig, MemoryOptions, PromptInput, StepSize};
use grpo::loss::LossConfig;
use grpo::WeightedRewards;
use medvqa::VqaRecord;
use qwen2vl::generation::{Recompute, Sampling};
use qwen2vl::processor::{byte_tokenizer_json, ProcessedImage, TextTokenizer};
use qwen2vl::{LoraConfig, Qwen2VL, Qwen2VLConfig};

use crate::accounting::{per_device, work, Account, StepShape, Training, Work};
use crate::backend::{dispatch_dtype, BackendTask, DeviceKind};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// A Qwen2-VL config.json (e.g. tests/fixtures/qwen2_vl_2b_instruct_config.json).
    #[arg(long)]
    pub model_config: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceKind::Flex)]
    pub device: DeviceKind,
    /// Run the CUDA backend in bf16.
    #[arg(long)]
    pub bf16: bool,
    /// Prompts per GRPO step, each with its own image.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Completions sampled per prompt (a GRPO group): a step has batch x num_generations rows.
    #[arg(long, default_value_t = 4)]
    pub num_generations: usize,
    /// Text tokens per prompt (besides the image's).
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Side of each prompt's square image in pixels (0: text only).
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Tokens generated per sequence (no early stop).
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Timed repetitions of each measurement (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Time the rollout only (no train step: the 2B model's f32 training state does not fit a
    /// 24 GiB machine, its decoding does).
    #[arg(long)]
    pub rollout_only: bool,
    /// Do not time the step again with the prompt repeated per completion
    /// (`grpo.share_prompt = false`, as TRL computes it).
    #[arg(long)]
    pub no_unshared: bool,
    /// Train LoRA adapters of this rank (alpha 2r) on the text decoder's seven projections
    /// instead of the whole model: the base frozen and shared with the reference (0: full
    /// fine-tuning).
    #[arg(long, default_value_t = 0)]
    pub lora_r: usize,
    /// Completions per scoring pass (`memory.score_micro_batch`; 0: the whole rollout; with the
    /// shared prompt a multiple of --num-generations).
    #[arg(long, default_value_t = 0)]
    pub score_micro_batch: usize,
    /// Completion tokens per LM-head chunk (`memory.lm_head_chunk`; 0: all at once).
    #[arg(long, default_value_t = 0)]
    pub lm_head_chunk: usize,
    /// Activation checkpointing of the policy's scoring pass (`memory.checkpoint_decoder`,
    /// `memory.checkpoint_vision`).
    #[arg(long, value_enum, default_value_t = Checkpointing::None)]
    pub checkpoint: Checkpointing,
    /// Print the memory account and the matrix work of the step and exit, without building the
    /// model (to size a machine for a configuration that does not fit this one).
    #[arg(long)]
    pub account_only: bool,
    /// Print the results as one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
    /// Account the memory of a data-parallel step over this many devices (`medr1 train
    /// --devices`): each device's share of the prompts, the optimizer on the main one. The
    /// timed step still runs on one device.
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
}

/// Which blocks `--checkpoint` recomputes.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpointing {
    None,
    Decoder,
    Vision,
    All,
}

impl Checkpointing {
    fn recompute(self) -> Recompute {
        Recompute {
            decoder: matches!(self, Self::Decoder | Self::All),
            vision: matches!(self, Self::Vision | Self::All),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Decoder => "decoder",
            Self::Vision => "vision",
            Self::All => "all",
        }
    }
}

struct Task(BenchArgs, Qwen2VLConfig);

/// Device memory in use as `nvidia-smi` reports it (MiB), polled every 100 ms on a thread:
/// it sees what the process holds, the allocator's pools included, as an out-of-memory error
/// would. `None` where there is no `nvidia-smi`.
struct GpuMemory {
    peak_mib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

fn nvidia_smi_used_mib() -> Option<u64> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            "-i",
            "0",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

impl GpuMemory {
    fn start() -> Option<Self> {
        let first = nvidia_smi_used_mib()?;
        let peak_mib = Arc::new(AtomicU64::new(first));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak_mib.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(used) = nvidia_smi_used_mib() {
                    p.fetch_max(used, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Some(Self { peak_mib, stop })
    }

    /// The peak since the last call, in GiB; starts a new window.
    fn take_peak_gib(&self) -> f64 {
        let now = nvidia_smi_used_mib().unwrap_or(0);
        let peak = self.peak_mib.swap(now, Ordering::Relaxed).max(now);
        peak as f64 / 1024.0
    }
}

impl Drop for GpuMemory {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Peak resident memory of this process (Linux), in GiB.
fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / (1024.0 * 1024.0))
}

impl BackendTask for Task {
    type Output = anyhow::Result<()>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let (a, config) = (self.0, self.1);
        let gpu = if a.device == DeviceKind::Cuda {
            GpuMemory::start()
        } else {
            None
        };
        let baseline_gib = gpu.as_ref().map(GpuMemory::take_peak_gib);
        let t = Instant::now();
        let mut model = Qwen2VL::<Autodiff<B>>::random(&config, &device);
        eprintln!("built a random model in {:.1}s", t.elapsed().as_secs_f64());
        if a.lora_r > 0 {
            model = model.with_lora(&a.lora())?;
        }
        let (prompts, image_tokens) = synthetic_prompts(&a, &config);
        let prompt_tokens = prompts[0].ids.len();
        let pad = config.bos_token_id.unwrap_or(0);
        let rows = a.batch * a.num_generations;
        let memory = a.memory();
        let cfg = |share_prompt: bool| GrpoConfig {
            num_generations: a.num_generations,
            sampling: Sampling::full(1.0),
            max_completion_length: a.new_tokens,
            loss: LossConfig::default(),
            // No early stop: every completion takes --new-tokens tokens.
            eos_token_ids: Vec::new(),
            pad_token_id: pad,
            share_prompt,
            memory,
            ..GrpoConfig::default()
        };
        let tokenizer =
            TextTokenizer::from_bytes(byte_tokenizer_json().to_string().as_bytes(), "byte-level")?;
        let rewards = WeightedRewards::med_r1(false);
        let reference = (!a.rollout_only).then(|| model.valid().without_adapters());
        let mut optim = OptimizerOptions::default().adamw().init();
        let mut seed = 0;
        // One GRPO step, its rollout timed within it: (rollout_s, step_s).
        let mut step = |share_prompt: bool, model: &mut Option<Qwen2VL<Autodiff<B>>>| {
            let cfg = cfg(share_prompt);
            seed += 1;
            let t = Instant::now();
            let policy = model.take().expect("the policy");
            let roll = rollout(
                &policy.valid(),
                &prompts,
                &tokenizer,
                &rewards,
                &cfg,
                seed,
                &device,
            )?;
            let rollout_s = t.elapsed().as_secs_f64();
            let policy = if a.rollout_only {
                policy
            } else {
                let (policy, _) = update(
                    policy,
                    reference.as_ref(),
                    &mut optim,
                    &roll,
                    &cfg,
                    StepSize {
                        learning_rate: 1e-6,
                        max_grad_norm: 1.0,
                    },
                )?;
                // Wait for the device before stopping the clock.
                let _ = policy.text.norm.gamma.val().into_data();
                policy
            };
            *model = Some(policy);
            anyhow::Ok((rollout_s, t.elapsed().as_secs_f64()))
        };
        let lora_params = model.adapter_params();
        let mut held = Some(model);
        // Each mode is warmed up and timed over its first step with the peak memory taken
        // before the other mode runs (freed memory is kept: a later peak would be the larger
        // mode's). The other timed steps alternate between the modes, so that a change in the
        // machine's speed during the run reaches both alike.
        let mut first = |share_prompt: bool, held: &mut Option<_>| {
            reset_peak_rss();
            step(share_prompt, held)?;
            let timed = step(share_prompt, held)?;
            anyhow::Ok((timed, peak_rss_gib().map(|g| g * 1024.0)))
        };
        let mut shared = Timing::default();
        let mut unshared = (!a.no_unshared).then(Timing::default);
        let (timed, peak) = first(true, &mut held)?;
        shared.push(timed);
        shared.peak_rss_mib = peak;
        let step_peak = gpu.as_ref().map(GpuMemory::take_peak_gib);
        if let Some(u) = unshared.as_mut() {
            let (timed, peak) = first(false, &mut held)?;
            u.push(timed);
            u.peak_rss_mib = peak;
        }
        for _ in 1..a.steps {
            shared.push(step(true, &mut held)?);
            if let Some(u) = unshared.as_mut() {
                u.push(step(false, &mut held)?);
            }
        }
        model = held.take().expect("the policy");
        drop(model);

        let params = config.parameter_counts().total();
        let trainable = if a.lora_r > 0 { lora_params } else { params };
        println!(
            "device {} ({}), model {} parameters{}, {} prompts x {} generations, prompt {} tokens \
             ({} image + {} text), {} new tokens",
            a.device.name(),
            if a.bf16 { "bf16" } else { "f32" },
            params,
            if a.lora_r > 0 {
                format!(" (LoRA r {}: {trainable} trained)", a.lora_r)
            } else {
                String::new()
            },
            a.batch,
            a.num_generations,
            prompt_tokens,
            image_tokens,
            a.prompt_len,
            a.new_tokens
        );
        let new_tokens = (rows * a.new_tokens) as f64;
        let r = median(&shared.rollout_s);
        println!(
            "rollout (sampling + rewards): {r:.3} s, {:.1} new tokens/s   (median of {})",
            new_tokens / r,
            shared.rollout_s.len()
        );
        if a.rollout_only {
            println!(
                "rollout per new token (prefill included): {:.3} s",
                r / a.new_tokens.max(1) as f64
            );
        } else {
            println!(
                "GRPO step (rollout + policy and reference scoring + backward + clip + AdamW): \
                 {:.3} s, of which the update (scoring, backward, clip, AdamW) {:.3} s",
                median(&shared.step_s),
                median(&shared.update_s())
            );
        }
        if let Some(u) = &unshared {
            let what = if a.rollout_only {
                "rollout"
            } else {
                "GRPO step"
            };
            let (su, ss) = if a.rollout_only {
                (median(&u.rollout_s), r)
            } else {
                (median(&u.step_s), median(&shared.step_s))
            };
            println!(
                "{what} with the prompt repeated per completion (share_prompt = false): \
                 {su:.3} s, {:.2}x the shared one's time",
                su / ss
            );
        }
        let (accounted, other_device) = step_account(&a, &config, &prompts, trainable);
        let work = step_work(&a, &config, &prompts, trainable);
        let shared_s = if a.rollout_only {
            r
        } else {
            median(&shared.step_s)
        };
        work.print(&a, Some(shared_s));
        match shared.peak_rss_mib {
            Some(m) => println!("peak host memory (RSS): {:.2} GiB", m / 1024.0),
            None => println!("peak host memory: not available on this platform"),
        }
        match (baseline_gib, step_peak) {
            (Some(base), Some(s)) => println!(
                "peak device memory (nvidia-smi, GPU 0, allocator pools included): {s:.2} GiB \
                 (in use before the model: {base:.2} GiB)"
            ),
            _ if a.device == DeviceKind::Cuda => {
                println!("peak device memory: not measured (no nvidia-smi)")
            }
            _ => {}
        }
        if a.json {
            let mut out = serde_json::json!({
                "device": a.device.name(),
                "precision": if a.bf16 { "bf16" } else { "f32" },
                "parameters": params,
                "trained_parameters": trainable,
                "lora_r": a.lora_r,
                "prompts": a.batch,
                "num_generations": a.num_generations,
                "prompt_tokens": prompt_tokens,
                "image_tokens": image_tokens,
                "new_tokens": a.new_tokens,
                "steps": a.steps,
                "rollout_s": r,
                "rollout_tokens_per_s": new_tokens / r,
                "peak_rss_mib": shared.peak_rss_mib,
                "score_micro_batch": a.score_micro_batch,
                "lm_head_chunk": a.lm_head_chunk,
                "checkpoint": a.checkpoint.name(),
                "accounted_gib": accounted.json(),
                "devices": a.devices,
                "accounted_gib_other_device": other_device.map(|o| o.json()),
                "work_gflop": work.gflop(&a, true),
                "work_unshared_gflop": work.gflop(&a, false),
            });
            if !a.rollout_only {
                out["step_s"] = median(&shared.step_s).into();
                out["update_s"] = median(&shared.update_s()).into();
            }
            if let Some(u) = &unshared {
                out["rollout_unshared_s"] = median(&u.rollout_s).into();
                out["peak_rss_unshared_mib"] = u.peak_rss_mib.into();
                if !a.rollout_only {
                    out["step_unshared_s"] = median(&u.step_s).into();
                }
            }
            if let (Some(base), Some(s)) = (baseline_gib, step_peak) {
                out["peak_device_gib"] = s.into();
                out["device_baseline_gib"] = base.into();
            }
            println!("{out}");
        }
        Ok(())
    }
}

/// The matrix work of the step `a` describes, with the prompt shared and repeated.
struct StepWork {
    shared: Work,
    unshared: Work,
}

impl StepWork {
    /// The rollout's work with `--rollout-only`, else the whole step's, shared or repeated.
    fn gflop(&self, a: &BenchArgs, shared: bool) -> f64 {
        let w = if shared { &self.shared } else { &self.unshared };
        if a.rollout_only {
            w.rollout / 1e9
        } else {
            w.step() / 1e9
        }
    }

    /// The work line, with the rate reached when the shared step took `seconds`.
    fn print(&self, a: &BenchArgs, seconds: Option<f64>) {
        let (shared, unshared) = (self.gflop(a, true), self.gflop(a, false));
        let rate = seconds.map_or(String::new(), |s| format!(" ({:.1} GFLOP/s)", shared / s));
        println!(
            "matrix work: {shared:.1} GFLOP{rate}; repeating the prompt: {unshared:.1} GFLOP, \
             {:.2}x (what sharing can gain at most)",
            unshared / shared
        );
    }
}

fn step_work(
    a: &BenchArgs,
    config: &Qwen2VLConfig,
    prompts: &[PromptInput],
    trained: usize,
) -> StepWork {
    let (shape, training) = step_shape(a, prompts, trained);
    StepWork {
        shared: work(config, shape, training),
        unshared: work(
            config,
            StepShape {
                share_prompt: false,
                ..shape
            },
            training,
        ),
    }
}

/// The shapes of the step `a` describes (prompt shared) and what it trains.
fn step_shape(a: &BenchArgs, prompts: &[PromptInput], trained: usize) -> (StepShape, Training) {
    (
        StepShape {
            prompts: a.batch,
            num_generations: a.num_generations,
            prompt_tokens: prompts[0].ids.len(),
            patches: prompts[0].images.iter().map(|im| im.rows()).sum(),
            completion_tokens: a.new_tokens,
            share_prompt: true,
        },
        Training {
            trained,
            lora: a.lora_r > 0,
            reference: LossConfig::default().beta != 0.0,
            // --lora-r puts adapters on the text decoder only.
            vision_trains: a.lora_r == 0,
            bytes: if a.bf16 { 2 } else { 4 },
        },
    )
}

/// The memory account of the step `a` describes, printed.
fn step_account(
    a: &BenchArgs,
    config: &Qwen2VLConfig,
    prompts: &[PromptInput],
    trained: usize,
) -> (Account, Option<Account>) {
    let (shape, training) = step_shape(a, prompts, trained);
    let (accounted, other) = per_device(config, shape, training, a.memory(), a.devices);
    println!(
        "memory options: score micro-batch {}, LM-head chunk {}, checkpointing {}; \
         accounted (the step's state and one scoring pass's peak):",
        a.score_micro_batch,
        a.lm_head_chunk,
        a.checkpoint.name()
    );
    if let Some(other) = &other {
        println!(
            "on each of {} devices ({} of the {} prompts each); the main device:",
            a.devices,
            a.batch.div_ceil(a.devices),
            a.batch
        );
        for l in accounted.lines_text() {
            println!("{l}");
        }
        println!("each other device:");
        for l in other.lines_text() {
            println!("{l}");
        }
    } else {
        for l in accounted.lines_text() {
            println!("{l}");
        }
    }
    (accounted, other)
}

impl BenchArgs {
    /// `--lora-r`'s adapters: rank r, alpha 2r, the decoder's seven projections.
    fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.lora_r,
            alpha: 2.0 * self.lora_r as f64,
            ..LoraConfig::default()
        }
    }

    fn memory(&self) -> MemoryOptions {
        MemoryOptions {
            micro_batch: self.score_micro_batch,
            head_chunk: self.lm_head_chunk,
            recompute: self.checkpoint.recompute(),
        }
    }
}

/// What one series of timed steps measured.
#[derive(Default)]
struct Timing {
    rollout_s: Vec<f64>,
    step_s: Vec<f64>,
    peak_rss_mib: Option<f64>,
}

impl Timing {
    fn push(&mut self, (rollout_s, step_s): (f64, f64)) {
        self.rollout_s.push(rollout_s);
        self.step_s.push(step_s);
    }

    /// Each step's time after its rollout.
    fn update_s(&self) -> Vec<f64> {
        self.step_s
            .iter()
            .zip(&self.rollout_s)
            .map(|(s, r)| s - r)
            .collect()
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Starts a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// `batch` prompts, each one image of `--image-size` pixels square (its own pixel pattern)
/// plus `--prompt-len` text ids below the specials: `<|vision_start|>` image pads
/// `<|vision_end|>` text. Returns them and the image tokens per prompt.
fn synthetic_prompts(a: &BenchArgs, config: &Qwen2VLConfig) -> (Vec<PromptInput>, usize) {
    let merge = config.vision.spatial_merge_size;
    let patch = config.vision.patch_size;
    let side = a.image_size / (patch * merge) * merge;
    let image_tokens = if a.image_size == 0 {
        0
    } else {
        side * side / (merge * merge)
    };
    let mut ids = Vec::new();
    if image_tokens > 0 {
        ids.push(config.vision_start_token_id);
        ids.extend(std::iter::repeat_n(config.image_token_id, image_tokens));
        ids.push(config.vision_end_token_id);
    }
    ids.extend((0..a.prompt_len).map(|i| (i % 200 + 32) as u32));
    let dim = config.vision.in_channels * config.vision.temporal_patch_size * patch * patch;
    let prompts = (0..a.batch)
        .map(|p| {
            let n = if image_tokens > 0 { side * side } else { 0 };
            PromptInput {
                text: String::new(),
                ids: ids.clone(),
                images: if n > 0 {
                    let pixels = (0..n * dim)
                        .map(|i| (((i + 13 * p) % 97) as f32 / 97.0) - 0.5)
                        .collect();
                    let image = ProcessedImage::new(pixels, [1, side, side], dim);
                    vec![image.expect("side * side rows of dim values")]
                } else {
                    Vec::new()
                },
                record: VqaRecord {
                    id: format!("bench-{p}"),
                    image: "synthetic".into(),
                    question: "?".into(),
                    options: vec!["a".into(), "b".into(), "c".into(), "d".into()],
                    answer: p % 4,
                    modality: None,
                    question_type: None,
                    dataset: None,
                },
            }
        })
        .collect();
    (prompts, image_tokens)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let config = Qwen2VLConfig::from_file(&args.model_config)
        .with_context(|| format!("--model-config {}", args.model_config.display()))?;
    if args.batch == 0 || args.steps == 0 || args.num_generations == 0 {
        anyhow::bail!("--batch, --num-generations and --steps must be at least 1");
    }
    if args.account_only {
        let trained = if args.lora_r > 0 {
            args.lora().trainable_params(&config)?
        } else {
            config.parameter_counts().total()
        };
        let (prompts, _) = synthetic_prompts(&args, &config);
        let (accounted, other) = step_account(&args, &config, &prompts, trained);
        let work = step_work(&args, &config, &prompts, trained);
        work.print(&args, None);
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "accounted_gib": accounted.json(),
                    "devices": args.devices,
                    "accounted_gib_other_device": other.map(|o| o.json()),
                    "work_gflop": work.gflop(&args, true),
                    "work_unshared_gflop": work.gflop(&args, false),
                })
            );
        }
        return Ok(());
    }
    dispatch_dtype(args.device, args.bf16, Task(args.clone(), config))?
}
