//! KV-cached batched generation: one prefill over the left-padded prompts, then one token per
//! step for every row, each row stopping at its own EOS.

use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};

use super::pick::pick;
use super::sampling::{Rng, Sampling};
use super::scoring::{round_up, ShapeBuckets};
use crate::error::Qwen2VLError;
use crate::model::{Images, Qwen2VL};
use crate::positions::TokenBatch;
use crate::text::{position_axes, KvCache};

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
    /// The prompt width is rounded up by `buckets.prompt_width` with left padding, so that
    /// batches of similar prompt lengths share shapes and compiled kernels.
    pub buckets: ShapeBuckets,
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
    generate_grouped(model, prompts, images, 1, cfg, keep_logits)
}

/// [`generate`] with `group` samples per prompt row (transformers' `num_return_sequences`):
/// each prompt and its images are prefilled once and the prompt's cache rows are forked to
/// its `group` samples, which come out prompt after prompt (row `p * group + g`). The same
/// tokens, log-probs and draws as [`generate`] over the prompts each repeated `group` times,
/// without running the vision tower and the prefill `group` times.
pub fn generate_grouped<B: Backend>(
    model: &Qwen2VL<B>,
    prompts: &TokenBatch,
    images: Option<&Images<B>>,
    group: usize,
    cfg: &GenerationConfig,
    keep_logits: bool,
) -> Result<Generation, Qwen2VLError> {
    prompts.validate()?;
    if group == 0 {
        return Err(Qwen2VLError::Input(
            "at least one sample per prompt is needed".into(),
        ));
    }
    let width = cfg.buckets.prompt_width(prompts.len);
    let padded;
    let prompts = if width > prompts.len {
        padded = prompts.left_padded_to(width, cfg.pad_token_id);
        &padded
    } else {
        prompts
    };
    let (p, l) = (prompts.batch, prompts.len);
    if p == 0 || (0..p).any(|r| prompts.mask_row(r).iter().all(|&m| m == 0)) {
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
    let inputs = model.prepare_inputs(prompts, images, None)?;
    let device = inputs.device.clone();
    let capacity = round_up(l + cfg.max_new_tokens, CACHE_BUCKET);
    let mut cache = KvCache::new(&model.config.text, p, capacity, &device);
    let prompt_valid: Vec<Vec<bool>> = (0..p)
        .map(|r| prompts.mask_row(r).iter().map(|&m| m != 0).collect())
        .collect();

    // Prefill, once per prompt.
    let prompt_next = inputs.next_positions(prompts);
    let rope = model
        .text
        .rope_tables(position_axes(&inputs.positions), p, l, &device);
    let mask = cache_mask::<B>(&prompt_valid, 0, l, capacity, &device);
    let hidden = model
        .text
        .forward_cached(inputs.embeds, &rope, mask, &mut cache);
    let d = model.config.text.hidden_size;
    let mut last = model.logits(hidden.narrow(1, l - 1, 1).reshape([p, d]));

    // Fork each prompt's cache rows to its samples.
    let b = p * group;
    let of_prompt = |r: usize| r / group;
    if group > 1 {
        let rows: Vec<i64> = (0..b).map(|r| of_prompt(r) as i64).collect();
        let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [b]), &device);
        for kv in &mut cache.layers {
            kv.k = kv.k.clone().select(0, rows.clone());
            kv.v = kv.v.clone().select(0, rows.clone());
        }
        last = last.select(0, rows);
    }
    let valid: Vec<Vec<bool>> = (0..b).map(|r| prompt_valid[of_prompt(r)].clone()).collect();
    // The next position of each row continues after its largest prompt position.
    let mut next_pos: Vec<i64> = (0..b).map(|r| prompt_next[of_prompt(r)]).collect();

    let mut rng = Rng::new(cfg.seed);
    let mut out = Generation {
        tokens: vec![Vec::new(); b],
        logprobs: vec![Vec::new(); b],
        step_logits: keep_logits.then(|| vec![Vec::new(); b]),
        finished: vec![false; b],
    };
    // Image/video placeholders are never generated: a completion holding one could not be
    // scored again (it would need an image).
    let banned = [model.config.image_token_id, model.config.video_token_id];
    // How often each row holds each token, for the repetition penalty: its prompt's (padding
    // aside, as transformers' `prompt_ignore_length`), then each token it generates.
    let vocab = model.config.text.vocab_size;
    let mut held = cfg.sampling.penalizes().then(|| {
        let mut counts = vec![0.0f32; b * vocab];
        for r in 0..b {
            let row = of_prompt(r);
            let ids = &prompts.ids[row * l..(row + 1) * l];
            for (&id, &v) in ids.iter().zip(&prompt_valid[row]) {
                if v && (id as usize) < vocab {
                    counts[r * vocab + id as usize] += 1.0;
                }
            }
        }
        Tensor::<B, 2>::from_data(TensorData::new(counts, [b, vocab]), &device)
    });
    for step in 0..cfg.max_new_tokens {
        let active: Vec<bool> = out.finished.iter().map(|&f| !f).collect();
        if let Some(keep) = out.step_logits.as_mut() {
            for (r, row) in host_rows(last.clone()).into_iter().enumerate() {
                if active[r] {
                    keep[r].push(row);
                }
            }
        }
        let seen = held.as_ref().map(|h| h.clone().greater_elem(0.0));
        let picked = pick(
            last,
            &banned,
            seen.as_ref(),
            &cfg.sampling,
            &active,
            &mut rng,
        );
        if let Some(counts) = held.take() {
            let ids: Vec<i64> = picked.tokens.iter().map(|&t| t as i64).collect();
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, 1]), &device);
            held = Some(counts.scatter(
                1,
                ids,
                Tensor::ones([b, 1], &device),
                burn::tensor::IndexingUpdateOp::Add,
            ));
        }
        let mut fed = Vec::with_capacity(b);
        for (r, &is_active) in active.iter().enumerate() {
            if !is_active {
                fed.push(cfg.pad_token_id);
                continue;
            }
            let tok = picked.tokens[r];
            out.tokens[r].push(tok);
            out.logprobs[r].push(picked.logprobs[r]);
            if cfg.eos_token_ids.contains(&tok) {
                out.finished[r] = true;
            }
            fed.push(tok);
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
