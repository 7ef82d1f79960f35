//! `medr1 bench`: rollout and train-step speed of a model built from a config with random
//! weights (no checkpoint needed), on the chosen backend. Synthetic inputs: each prompt is one
//! image of `--image-size` pixels square plus `--prompt-len` text tokens.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use clap::Args;
use grpo::host::OptimizerOptions;
use grpo::learner::clip_global_norm;
use qwen2vl::generation::{completion_logprobs, generate, GenerationConfig, Sampling};
use qwen2vl::{Images, Qwen2VL, Qwen2VLConfig, TokenBatch};

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
    /// Sequences per rollout and per train step (prompts x generations).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
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
        let merge = config.vision.spatial_merge_size;
        let patch = config.vision.patch_size;
        let side = a.image_size / (patch * merge) * merge;
        let grid = [1, side, side];
        let image_tokens = if a.image_size == 0 {
            0
        } else {
            side * side / (merge * merge)
        };
        // `<|vision_start|>` image pads `<|vision_end|>` then text ids below the specials.
        let mut prompt = Vec::new();
        if image_tokens > 0 {
            prompt.push(config.vision_start_token_id);
            prompt.extend(std::iter::repeat_n(config.image_token_id, image_tokens));
            prompt.push(config.vision_end_token_id);
        }
        prompt.extend((0..a.prompt_len).map(|i| (i % 200 + 32) as u32));
        let rows = vec![prompt.clone(); a.batch];
        let images = |dev: &B::Device| -> Option<Images<B>> {
            (image_tokens > 0).then(|| {
                let dim =
                    config.vision.in_channels * config.vision.temporal_patch_size * patch * patch;
                let n = side * side * a.batch;
                let values: Vec<f32> = (0..n * dim)
                    .map(|i| ((i % 97) as f32 / 97.0) - 0.5)
                    .collect();
                Images {
                    pixel_values: Tensor::from_data(TensorData::new(values, [n, dim]), dev),
                    grids: vec![grid; a.batch],
                }
            })
        };
        let pad = config.bos_token_id.unwrap_or(0);
        let gen = GenerationConfig {
            max_new_tokens: a.new_tokens,
            sampling: Sampling {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
            },
            eos_token_ids: Vec::new(),
            pad_token_id: pad,
            seed: 0,
            prompt_bucket: 1,
        };
        let batch = TokenBatch::left_padded(&rows, pad);
        let inner_images = images(&device);
        let mut rollout_s = Vec::new();
        let mut completions = Vec::new();
        for i in 0..=a.steps {
            let t = Instant::now();
            let out = generate(&model.valid(), &batch, inner_images.as_ref(), &gen, false)?;
            if i > 0 {
                rollout_s.push(t.elapsed().as_secs_f64());
            }
            completions = out.tokens;
        }
        let rollout_peak = gpu.as_ref().map(GpuMemory::take_peak_gib);
        let completions: Vec<Vec<u32>> = completions
            .into_iter()
            .map(|c| if c.is_empty() { vec![pad] } else { c })
            .collect();
        let mut optim = OptimizerOptions::default().adamw().init();
        let ad_images = images_ad::<B>(inner_images.as_ref());
        let mut step_s = Vec::new();
        for i in 0..=a.steps {
            if a.rollout_only {
                break;
            }
            let t = Instant::now();
            let lp = completion_logprobs(&model, &rows, &completions, ad_images.as_ref(), pad)?;
            let loss = lp.mean().neg();
            let mut grads = GradientsParams::from_grads(loss.backward(), &model);
            clip_global_norm(&model, &mut grads, 1.0);
            model = optim.step(1e-6, model, grads);
            // Wait for the device before stopping the clock.
            let _ = model.text.norm.gamma.val().into_data();
            if i > 0 {
                step_s.push(t.elapsed().as_secs_f64());
            }
        }
        let step_peak = gpu.as_ref().map(GpuMemory::take_peak_gib);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (r, s) = (mean(&rollout_s), mean(&step_s));
        let params = config.parameter_counts().total();
        println!(
            "device {} ({}), model {} parameters, batch {}, prompt {} tokens ({} image + {} text), {} new tokens",
            a.device.name(),
            if a.bf16 { "bf16" } else { "f32" },
            params,
            a.batch,
            prompt.len(),
            image_tokens,
            a.prompt_len,
            a.new_tokens
        );
        println!(
            "rollout: {:.3} s, {:.1} tokens/s   (mean of {})",
            r,
            (a.batch * a.new_tokens) as f64 / r,
            rollout_s.len()
        );
        if a.rollout_only {
            println!(
                "rollout per new token (prefill included): {:.3} s",
                r / a.new_tokens.max(1) as f64
            );
        } else {
            println!(
                "train step (forward + backward + clip + AdamW): {:.3} s, {:.1} tokens/s",
                s,
                (a.batch * (prompt.len() + a.new_tokens)) as f64 / s
            );
        }
        match peak_rss_gib() {
            Some(g) => println!("peak host memory (RSS): {g:.2} GiB"),
            None => println!("peak host memory: not available on this platform"),
        }
        match (baseline_gib, rollout_peak, step_peak) {
            (Some(base), Some(r), Some(s)) => println!(
                "peak device memory (nvidia-smi, GPU 0, allocator pools included): rollout \
                 {r:.2} GiB, train step {s:.2} GiB (in use before the model: {base:.2} GiB)"
            ),
            _ if a.device == DeviceKind::Cuda => {
                println!("peak device memory: not measured (no nvidia-smi)")
            }
            _ => {}
        }
        Ok(())
    }
}

fn images_ad<B: Backend>(images: Option<&Images<B>>) -> Option<Images<Autodiff<B>>> {
    images.map(|i| Images {
        pixel_values: Tensor::from_inner(i.pixel_values.clone()),
        grids: i.grids.clone(),
    })
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let config = Qwen2VLConfig::from_file(&args.model_config)
        .with_context(|| format!("--model-config {}", args.model_config.display()))?;
    if args.batch == 0 || args.steps == 0 {
        anyhow::bail!("--batch and --steps must be at least 1");
    }
    dispatch_dtype(args.device, args.bf16, Task(args.clone(), config))?
}
