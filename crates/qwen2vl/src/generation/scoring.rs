//! Teacher-forced per-token log-probs of given completions in one batched forward: what GRPO
//! needs for the policy (with autodiff) and the reference model (without).

use burn::tensor::{activation::log_softmax, backend::Backend, Int, Tensor, TensorData};

use crate::error::Qwen2VLError;
use crate::model::{Images, Qwen2VL};
use crate::positions::TokenBatch;

/// Prompts left-padded to a common length, completions right-padded after them:
/// `[pad.. prompt | completion ..pad]`. Returns the batch and the prompt width.
pub fn prompt_completion_batch(
    prompts: &[Vec<u32>],
    completions: &[Vec<u32>],
    pad_id: u32,
) -> (TokenBatch, usize, usize) {
    let lp = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let tc = completions.iter().map(Vec::len).max().unwrap_or(0);
    let len = lp + tc;
    let mut ids = Vec::with_capacity(prompts.len() * len);
    let mut mask = Vec::with_capacity(prompts.len() * len);
    for (p, c) in prompts.iter().zip(completions) {
        let (lpad, rpad) = (lp - p.len(), tc - c.len());
        ids.extend(std::iter::repeat_n(pad_id, lpad));
        ids.extend_from_slice(p);
        ids.extend_from_slice(c);
        ids.extend(std::iter::repeat_n(pad_id, rpad));
        mask.extend(std::iter::repeat_n(0u8, lpad));
        mask.extend(std::iter::repeat_n(1u8, p.len() + c.len()));
        mask.extend(std::iter::repeat_n(0u8, rpad));
    }
    let batch = TokenBatch {
        ids,
        attention_mask: mask,
        batch: prompts.len(),
        len,
    };
    (batch, lp, tc)
}

/// `log p(completion_t | prompt, completion_<t)` for every row, `[batch, max_completion_len]`;
/// slots past a row's completion hold the log-prob of the pad id and must be masked by the
/// caller. Differentiable when `B` is an autodiff backend.
pub fn completion_logprobs<B: Backend>(
    model: &Qwen2VL<B>,
    prompts: &[Vec<u32>],
    completions: &[Vec<u32>],
    images: Option<&Images<B>>,
    pad_id: u32,
) -> Result<Tensor<B, 2>, Qwen2VLError> {
    completion_scores(model, prompts, completions, images, pad_id, false).map(|(lp, _)| lp)
}

/// [`completion_logprobs`] and, when `with_entropy`, the entropy of each next-token
/// distribution (`[batch, max_completion_len]`, detached from the graph).
pub fn completion_scores<B: Backend>(
    model: &Qwen2VL<B>,
    prompts: &[Vec<u32>],
    completions: &[Vec<u32>],
    images: Option<&Images<B>>,
    pad_id: u32,
    with_entropy: bool,
) -> Result<(Tensor<B, 2>, Option<Tensor<B, 2>>), Qwen2VLError> {
    if prompts.len() != completions.len() || prompts.is_empty() {
        return Err(Qwen2VLError::Input(format!(
            "{} prompts and {} completions: one completion per prompt is needed",
            prompts.len(),
            completions.len()
        )));
    }
    if prompts.iter().any(Vec::is_empty) {
        return Err(Qwen2VLError::Input(
            "an empty prompt cannot be scored".into(),
        ));
    }
    let (batch, lp, tc) = prompt_completion_batch(prompts, completions, pad_id);
    let b = batch.batch;
    let hidden = model.forward_hidden(&batch, images, None)?;
    let device = hidden.device();
    let logits = model.logits(hidden.narrow(1, lp - 1, tc));
    let logp = log_softmax(logits, 2);
    let targets: Vec<i64> = completions
        .iter()
        .flat_map(|c| (0..tc).map(move |t| c.get(t).copied().unwrap_or(pad_id) as i64))
        .collect();
    let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [b, tc, 1]), &device);
    let entropy = with_entropy.then(|| {
        let lp = logp.clone().detach();
        lp.clone().exp().mul(lp).sum_dim(2).neg().reshape([b, tc])
    });
    Ok((logp.gather(2, targets).reshape([b, tc]), entropy))
}
