//! The run's model and tokenizer: a checkpoint directory, or a randomly initialised tiny
//! Qwen2-VL with the byte-level tokenizer.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::module::Module;
use burn::tensor::backend::Backend;
use qwen2vl::checkpoint::load_adapter;
use qwen2vl::processor::{byte_tokenizer_json, ImageProcessorConfig, Processor, TextTokenizer};
use qwen2vl::{load_model, LoraConfig, Qwen2VL, Qwen2VLConfig};

use crate::config::{LoraSection, RunConfig, TinyModel};

/// The HF `config.json` of a tiny model over the byte-level tokenizer's ids.
pub fn tiny_config_json(t: &TinyModel) -> String {
    serde_json::json!({
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "dtype": "float32",
        "image_token_id": 268,
        "video_token_id": 269,
        "vision_start_token_id": 265,
        "vision_end_token_id": 266,
        "tie_word_embeddings": true,
        "text_config": {
            "model_type": "qwen2_vl_text",
            "bos_token_id": 256,
            "eos_token_id": 258,
            "hidden_act": "silu",
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_attention_heads": t.heads,
            "num_hidden_layers": t.layers,
            "num_key_value_heads": t.kv_heads,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"mrope_section": t.mrope_section, "rope_theta": 1000000.0,
                                "rope_type": "default"},
            "vocab_size": 288
        },
        "vision_config": {
            "model_type": "qwen2_vl_vision",
            "depth": t.vision_depth,
            "embed_dim": t.vision_embed_dim,
            "hidden_act": "quick_gelu",
            "hidden_size": t.hidden_size,
            "in_channels": 3,
            "mlp_ratio": 4,
            "num_heads": t.vision_heads,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2
        }
    })
    .to_string()
}

/// The tokenizer file a run uses; `None` for the built-in byte-level tokenizer.
pub fn tokenizer_path(cfg: &RunConfig) -> Option<PathBuf> {
    let m = &cfg.model;
    if !m.tokenizer.is_empty() {
        Some(PathBuf::from(&m.tokenizer))
    } else if !m.checkpoint.is_empty() {
        Some(Path::new(&m.checkpoint).join("tokenizer.json"))
    } else {
        None
    }
}

pub fn tokenizer(cfg: &RunConfig) -> anyhow::Result<TextTokenizer> {
    match tokenizer_path(cfg) {
        Some(p) => TextTokenizer::from_file(&p)
            .with_context(|| format!("tokenizer {} (set model.tokenizer)", p.display())),
        None => Ok(TextTokenizer::from_bytes(
            byte_tokenizer_json().to_string().as_bytes(),
            "byte-level tokenizer",
        )?),
    }
}

pub fn processor(cfg: &RunConfig) -> anyhow::Result<Processor> {
    processor_with(cfg, tokenizer(cfg)?)
}

/// The run's image settings around `tokenizer`: the checkpoint's `preprocessor_config.json`
/// (Qwen2-VL's values without one) with `model.min_pixels` / `model.max_pixels` over it, as
/// Med-R1's trainer sets them on the loaded processor (`grpo_trainer.py`). A checkpoint's chat
/// template must be the one medr1 renders.
pub fn processor_with(cfg: &RunConfig, tokenizer: TextTokenizer) -> anyhow::Result<Processor> {
    let mut image = if cfg.model.checkpoint.is_empty() {
        ImageProcessorConfig::default()
    } else {
        Processor::image_config_of(Path::new(&cfg.model.checkpoint))?
    };
    image.min_pixels = cfg.model.min_pixels;
    image.max_pixels = cfg.model.max_pixels;
    Ok(Processor::new(tokenizer, image)?)
}

/// The run's tokenizer as a JSON value (formatting aside), and where it comes from.
fn run_tokenizer_json(cfg: &RunConfig) -> anyhow::Result<(serde_json::Value, String)> {
    match tokenizer_path(cfg) {
        Some(p) => {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("tokenizer {} (set model.tokenizer)", p.display()))?;
            let v = serde_json::from_str(&text)
                .with_context(|| format!("tokenizer {}: not JSON", p.display()))?;
            Ok((v, p.display().to_string()))
        }
        None => Ok((byte_tokenizer_json(), "the byte-level tokenizer".into())),
    }
}

/// `dir/tokenizer.json` when `dir` has one that differs from the run's tokenizer (a model
/// trained or saved with another vocabulary), with the run tokenizer's origin.
pub fn own_tokenizer(
    cfg: &RunConfig,
    dir: &Path,
) -> anyhow::Result<Option<(TextTokenizer, PathBuf, String)>> {
    let path = dir.join("tokenizer.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let own: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a tokenizer (not JSON)", path.display()))?;
    let (run, origin) = run_tokenizer_json(cfg)?;
    if own == run {
        return Ok(None);
    }
    let tok =
        TextTokenizer::from_file(&path).with_context(|| format!("tokenizer {}", path.display()))?;
    Ok(Some((tok, path, origin)))
}

/// Loads a checkpoint directory, saying which of its tensors no parameter of the model uses
/// (a checkpoint of another architecture or version, loaded without them).
pub fn load_checkpoint<B: Backend>(dir: &Path, device: &B::Device) -> anyhow::Result<Qwen2VL<B>> {
    let (model, info) = load_model::<B>(dir, device)?;
    if !info.unused.is_empty() {
        let shown: Vec<&str> = info.unused.iter().take(8).map(String::as_str).collect();
        let more = info.unused.len() - shown.len();
        eprintln!(
            "warning: {}: {} tensor(s) of the checkpoint are not used by this model and were \
             not loaded: {}{}",
            dir.display(),
            info.unused.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    Ok(model)
}

/// The model a run starts from: the configured checkpoint, or a seeded random tiny model.
pub fn initial<B: Backend>(cfg: &RunConfig, device: &B::Device) -> anyhow::Result<Qwen2VL<B>> {
    if !cfg.model.checkpoint.is_empty() {
        let dir = Path::new(&cfg.model.checkpoint);
        eprintln!("loading {}", dir.display());
        return load_checkpoint::<B>(dir, device);
    }
    if !cfg.model.random_config.is_empty() {
        eprintln!(
            "random weights of the architecture in {}",
            cfg.model.random_config
        );
    }
    let config = architecture(cfg)?;
    B::seed(device, cfg.sft.seed.unwrap_or(cfg.seed));
    Ok(Qwen2VL::random(&config, device))
}

/// The architecture a run trains: the checkpoint's config, `model.random_config`, or the tiny
/// spec.
pub fn architecture(cfg: &RunConfig) -> anyhow::Result<Qwen2VLConfig> {
    let m = &cfg.model;
    if !m.checkpoint.is_empty() {
        let path = Path::new(&m.checkpoint).join("config.json");
        Ok(Qwen2VLConfig::from_file(&path)?)
    } else if !m.random_config.is_empty() {
        let path = Path::new(&m.random_config);
        Ok(Qwen2VLConfig::from_file(path)
            .with_context(|| format!("model.random_config {}", path.display()))?)
    } else {
        Ok(Qwen2VLConfig::from_json_str(
            &tiny_config_json(&m.tiny),
            "model.tiny",
        )?)
    }
}

/// End-of-turn and padding ids of the tokenizer in use.
pub fn special_ids(tok: &TextTokenizer) -> anyhow::Result<(Vec<u32>, u32)> {
    let im_end = tok
        .token_id("<|im_end|>")
        .context("the tokenizer has no <|im_end|> token")?;
    let endoftext = tok
        .token_id("<|endoftext|>")
        .context("the tokenizer has no <|endoftext|> token")?;
    Ok((vec![im_end, endoftext], endoftext))
}

/// The policy with LoRA adapters when `lora.enabled` (the base frozen): loaded from
/// `lora.adapter`, or fresh. Returns the adapters' settings (`None` without LoRA).
pub fn with_lora<B: Backend>(
    policy: Qwen2VL<B>,
    lora: &LoraSection,
) -> anyhow::Result<(Qwen2VL<B>, Option<LoraConfig>)> {
    if !lora.enabled {
        return Ok((policy, None));
    }
    let (policy, cfg) = if lora.adapter.is_empty() {
        let cfg = lora.lora_config();
        (policy.with_lora(&cfg)?, cfg)
    } else {
        let dir = Path::new(&lora.adapter);
        load_adapter(policy, dir).with_context(|| format!("lora.adapter {}", dir.display()))?
    };
    let trainable = policy.adapter_params();
    let frozen = policy.num_params() - trainable;
    eprintln!(
        "LoRA r {} alpha {}: {trainable} trainable parameters, {frozen} frozen",
        cfg.r, cfg.alpha
    );
    Ok((policy, Some(cfg)))
}
