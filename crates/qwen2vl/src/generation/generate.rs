//! KV-cached batched generation: one prefill over the left-padded prompts, then one token per
//! step for every row, each row stopping at its own EOS.

use burn::tensor::{backend::Backend, Bool, Tensor, TensorData};

use super::sampling::{log_softmax_at, sample, Rng, Sampling};
use super::scoring::round_up;
use crate::error::Qwen2VLError;
use crate::model::{Images, Qwen2VL};
use crate::positions::{rope_index, TokenBatch};
use crate::text::KvCache;

/// Cache capacities are rounded up to this many slots, so that prompts of similar length share
/// compiled kernels on CubeCL backends.
pub const CACHE_BUCKET: usize = 64;

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// A row stops after emitting any of these.
    pub eos_token_ids: Vec<u32>,
    /// Fed to finished rows (their outputs are discarded).
    pub pad_token_id: u32,
    pub seed: u64,
    /// The prompt width is rounded up to a multiple of this with left padding (0 or 1: not),
    /// so that batches of similar prompt lengths share shapes and compiled kernels.
    pub prompt_bucket: usize,
}

/// What one generation call produced, per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens, ending with the EOS when the row finished.
    pub tokens: Vec<Vec<u32>>,
    /// log p(token) under the model's (untempered) distribution, one per token.
    pub logprobs: Vec<Vec<f32>>,
    /// The model's raw logits at each step, when asked for.
    pub step_logits: Option<Vec<Vec<Vec<f32>>>>,
    /// True when the row emitted an EOS; false when it hit `max_new_tokens`.
    pub finished: Vec<bool>,
}

/// Masks over a cache of `capacity` slots for `queries` new tokens written at `offset`:
/// a key is hidden when it is padding, not yet written, or after the query (causal).
fn cache_mask<B: Backend>(
    valid: &[Vec<bool>],
    offset: usize,
    queries: usize,
    capacity: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let mut m = Vec::with_capacity(valid.len() * queries * capacity);
    for row in valid {
        for q in 0..queries {
            let slot = offset + q;
            for j in 0..capacity {
                let visible = j <= slot && row.get(j).copied().unwrap_or(true);
                m.push(!(visible || j == slot));
            }
        }
    }
    Tensor::from_data(
        TensorData::new(m, [valid.len(), 1, queries, capacity]),
        device,
    )
}

/// Host copy of `[rows, vocab]` logits.
fn host_rows<B: Backend>(t: Tensor<B, 2>) -> Vec<Vec<f32>> {
    let [rows, vocab] = t.dims();
    let flat = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 after conversion");
    (0..rows)
        .map(|r| flat[r * vocab..(r + 1) * vocab].to_vec())
        .collect()
}

/// Generates up to `cfg.max_new_tokens` tokens after each (left-padded) prompt row.
/// Run it on a non-autodiff backend (`model.valid()` of a training model).
pub fn generate<B: Backend>(
    model: &Qwen2VL<B>,
    prompts: &TokenBatch,
    images: Option<&Images<B>>,
    cfg: &GenerationConfig,
    keep_logits: bool,
) -> Result<Generation, Qwen2VLError> {
    prompts.validate()?;
    let width = round_up(prompts.len, cfg.prompt_bucket);
    let padded;
    let prompts = if width > prompts.len {
        padded = prompts.left_padded_to(width, cfg.pad_token_id);
        &padded
    } else {
        prompts
    };
    let device = match images {
        Some(im) => im.pixel_values.device(),
        None => model.text.embed_tokens.weight.val().device(),
    };
    let (b, l) = (prompts.batch, prompts.len);
    if b == 0 || (0..b).any(|r| prompts.mask_row(r).iter().all(|&m| m == 0)) {
        return Err(Qwen2VLError::Input(
            "every prompt row needs at least one token".into(),
        ));
    }
    let max_positions = model.config.text.max_position_embeddings;
    if l + cfg.max_new_tokens > max_positions {
        return Err(Qwen2VLError::Input(format!(
            "prompt of {l} tokens + {} new tokens exceeds the model's {max_positions} positions",
            cfg.max_new_tokens
        )));
    }
    let grids: &[[usize; 3]] = images.map_or(&[], |im| &im.grids);
    let positions = rope_index(prompts, grids, model.vision_tokens())?;
    let image_embeds = match images {
        Some(im) if !im.grids.is_empty() => {
            let [rows, cols] = im.pixel_values.dims();
            model.visual.validate(rows, cols, &im.grids)?;
            Some(model.visual.forward(im.pixel_values.clone(), &im.grids))
        }
        _ => None,
    };
    let embeds = model.embed(prompts, image_embeds, &device)?;
    let capacity = round_up(l + cfg.max_new_tokens, CACHE_BUCKET);
    let mut cache = KvCache::new(&model.config.text, b, capacity, &device);
    let valid: Vec<Vec<bool>> = (0..b)
        .map(|r| prompts.mask_row(r).iter().map(|&m| m != 0).collect())
        .collect();

    // Prefill.
    let axes = [
        &positions.axes[0][..],
        &positions.axes[1][..],
        &positions.axes[2][..],
    ];
    let rope = model.text.rope_tables(axes, b, l, &device);
    let mask = cache_mask::<B>(&valid, 0, l, capacity, &device);
    let hidden = model.text.forward_cached(embeds, &rope, mask, &mut cache);
    let d = model.config.text.hidden_size;
    let mut last = model.logits(hidden.narrow(1, l - 1, 1).reshape([b, d]));

    // The next position of each row continues after its largest prompt position.
    let mut next_pos: Vec<i64> = (0..b)
        .map(|r| {
            (0..l)
                .filter(|&i| valid[r][i])
                .map(|i| axes.iter().map(|a| a[r * l + i]).max().unwrap_or(0))
                .max()
                .map_or(0, |m| m + 1)
        })
        .collect();

    let mut rng = Rng::new(cfg.seed);
    let mut out = Generation {
        tokens: vec![Vec::new(); b],
        logprobs: vec![Vec::new(); b],
        step_logits: keep_logits.then(|| vec![Vec::new(); b]),
        finished: vec![false; b],
    };
    for step in 0..cfg.max_new_tokens {
        let rows = host_rows(last);
        let mut fed = Vec::with_capacity(b);
        for (r, logits) in rows.into_iter().enumerate() {
            if out.finished[r] {
                fed.push(cfg.pad_token_id);
                continue;
            }
            // Image/video placeholders are never generated: a completion holding one could not
            // be scored again (it would need an image). Their log-probs stay those of the model.
            // Masked in place and restored, rather than copying a vocabulary-sized row.
            let suppressed: Vec<(usize, f32)> =
                [model.config.image_token_id, model.config.video_token_id]
                    .into_iter()
                    .filter_map(|id| logits.get(id as usize).map(|&v| (id as usize, v)))
                    .collect();
            let mut logits = logits;
            for &(i, _) in &suppressed {
                logits[i] = f32::NEG_INFINITY;
            }
            let tok = sample(&logits, &cfg.sampling, &mut rng);
            for &(i, v) in &suppressed {
                logits[i] = v;
            }
            out.tokens[r].push(tok as u32);
            out.logprobs[r].push(log_softmax_at(&logits, tok) as f32);
            if let Some(keep) = out.step_logits.as_mut() {
                keep[r].push(logits);
            }
            if cfg.eos_token_ids.contains(&(tok as u32)) {
                out.finished[r] = true;
            }
            fed.push(tok as u32);
        }
        if out.finished.iter().all(|&f| f) || step + 1 == cfg.max_new_tokens {
            break;
        }
        // Decode one token per row.
        let step_batch = TokenBatch {
            ids: fed,
            attention_mask: vec![1; b],
            batch: b,
            len: 1,
        };
        let embeds = model.embed(&step_batch, None, &device)?;
        let pos: Vec<i64> = next_pos.clone();
        let rope = model.text.rope_tables([&pos, &pos, &pos], b, 1, &device);
        let mask = cache_mask::<B>(&valid, cache.len, 1, capacity, &device);
        let hidden = model.text.forward_cached(embeds, &rope, mask, &mut cache);
        last = model.logits(hidden.reshape([b, d]));
        next_pos.iter_mut().for_each(|p| *p += 1);
    }
    Ok(out)
}
