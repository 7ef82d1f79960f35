//! `medr1 generate`: one image + one prompt -> a completion, with the checkpoint's own
//! tokenizer and image settings.

use std::path::PathBuf;

use anyhow::{bail, Context};
use burn::tensor::backend::Backend;
use qwen2vl::generation::{generate, GenerationConfig, Sampling, ShapeBuckets};
use qwen2vl::processor::{load_image, preprocess, Message, Processor};
use qwen2vl::{Images, TokenBatch};

use crate::backend::{dispatch, BackendTask, DeviceKind};

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory: config.json, *.safetensors, tokenizer.json
    /// (preprocessor_config.json and generation_config.json when present).
    #[arg(long)]
    pub model: PathBuf,
    /// PNG or JPEG image.
    #[arg(long)]
    pub image: PathBuf,
    /// The user's text, placed after the image in one user turn.
    #[arg(long)]
    pub prompt: String,
    #[arg(long, value_enum, default_value_t = DeviceKind::Flex)]
    pub device: DeviceKind,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Drop tokens less likely than this times the most likely one (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalize tokens already in the prompt or the output (1: off; transformers' meaning).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also print the generated token ids (to stderr).
    #[arg(long)]
    pub show_ids: bool,
}

/// EOS ids: `generation_config.json` when present (Instruct checkpoints list both
/// `<|im_end|>` and `<|endoftext|>`), else the model config's.
fn eos_ids(dir: &std::path::Path, fallback: &[u32]) -> anyhow::Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(fallback.to_vec());
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let ids = match &v["eos_token_id"] {
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|n| n as u32)
            .collect(),
        serde_json::Value::Number(n) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        _ => Vec::new(),
    };
    Ok(if ids.is_empty() {
        fallback.to_vec()
    } else {
        ids
    })
}

struct Task(GenerateArgs);

impl BackendTask for Task {
    type Output = anyhow::Result<String>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let a = self.0;
        if !a.model.is_dir() {
            bail!("--model {}: not a checkpoint directory", a.model.display());
        }
        let processor = Processor::from_dir(&a.model)
            .with_context(|| format!("loading the processor of {}", a.model.display()))?;
        let img = load_image(&a.image).context("--image")?;
        let processed = preprocess(&img, &processor.image)
            .with_context(|| format!("preprocessing {}", a.image.display()))?;
        let ids = processor
            .prompt_ids(
                &[Message::user_with_image(a.prompt.clone())],
                std::slice::from_ref(&processed),
            )
            .context("building the prompt")?;
        let model = crate::run::model::load_checkpoint::<B>(&a.model, &device)
            .with_context(|| format!("loading {}", a.model.display()))?;
        let limit = model.config.text.max_position_embeddings;
        if ids.len() + a.max_new_tokens > limit {
            bail!(
                "the prompt is {} tokens (image included) and --max-new-tokens is {}: more than the model's {limit} positions; shorten the prompt or lower --max-new-tokens",
                ids.len(),
                a.max_new_tokens
            );
        }
        let images = Images::from_processed([&processed], &device)?;
        let eos = eos_ids(&a.model, &model.config.eos_token_ids)?;
        let cfg = GenerationConfig {
            max_new_tokens: a.max_new_tokens,
            sampling: Sampling {
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                min_p: a.min_p,
                repetition_penalty: a.repetition_penalty,
            },
            pad_token_id: model.config.bos_token_id.unwrap_or(0),
            eos_token_ids: eos.clone(),
            seed: a.seed,
            buckets: ShapeBuckets::EXACT,
        };
        let out = generate(
            &model,
            &TokenBatch::single(ids),
            images.as_ref(),
            &cfg,
            false,
        )?;
        if a.show_ids {
            eprintln!("ids: {:?}", out.tokens[0]);
        }
        let mut tokens = out.tokens[0].clone();
        if tokens.last().is_some_and(|t| eos.contains(t)) {
            tokens.pop();
        }
        Ok(processor.tokenizer.decode(&tokens, true)?)
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let temperature_ok = args.temperature.is_finite() && args.temperature >= 0.0;
    let top_p_ok = args.top_p > 0.0 && args.top_p <= 1.0;
    if !(temperature_ok && top_p_ok) {
        bail!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    if !(0.0..=1.0).contains(&args.min_p) {
        bail!("--min-p must be in [0, 1], not {}", args.min_p);
    }
    if !(args.repetition_penalty.is_finite() && args.repetition_penalty > 0.0) {
        bail!(
            "--repetition-penalty must be above 0, not {}",
            args.repetition_penalty
        );
    }
    let text = dispatch(args.device, Task(args))??;
    println!("{text}");
    Ok(())
}
