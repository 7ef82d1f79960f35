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
    prompt_completion_batch_bucketed(prompts, completions, pad_id, ShapeBuckets::EXACT)
}

/// How a scoring batch is padded (masked) so that batches of similar lengths share tensor
/// shapes, which on CubeCL backends means they share compiled kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeBuckets {
    /// Prompt and completion widths are rounded up to multiples of this (0 or 1: exact).
    pub multiple: usize,
    /// Completions never need more than this many slots (generation's limit; 0: no limit), so
    /// rounding stops there: short limits stay exact, long ones take a few widths.
    pub max_completion: usize,
}

impl ShapeBuckets {
    pub const EXACT: Self = Self {
        multiple: 1,
        max_completion: 0,
    };

    pub fn prompt_width(&self, n: usize) -> usize {
        round_up(n, self.multiple)
    }

    pub fn completion_width(&self, n: usize) -> usize {
        let r = round_up(n, self.multiple);
        if self.max_completion >= n && self.max_completion > 0 {
            r.min(self.max_completion)
        } else {
            r
        }
    }
}

/// [`prompt_completion_batch`] with the widths rounded up by `buckets`.
pub fn prompt_completion_batch_bucketed(
    prompts: &[Vec<u32>],
    completions: &[Vec<u32>],
    pad_id: u32,
    buckets: ShapeBuckets,
) -> (TokenBatch, usize, usize) {
    let lp = buckets.prompt_width(prompts.iter().map(Vec::len).max().unwrap_or(0));
    let tc = buckets.completion_width(completions.iter().map(Vec::len).max().unwrap_or(0));
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

/// `n` rounded up to a multiple of `bucket` (0 and 1: `n`).
pub fn round_up(n: usize, bucket: usize) -> usize {
    if bucket <= 1 {
        n
    } else {
        n.div_ceil(bucket) * bucket
    }
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
    completion_scores_bucketed(
        model,
        prompts,
        completions,
        images,
        pad_id,
        with_entropy,
        ShapeBuckets::EXACT,
    )
}

/// [`completion_scores`] over a batch whose prompt and completion widths are rounded up by
/// `buckets` ([`prompt_completion_batch_bucketed`]); the result has the exact width
/// (`[batch, max_completion_len]`). The same values, up to float rounding: padding is masked.
pub fn completion_scores_bucketed<B: Backend>(
    model: &Qwen2VL<B>,
    prompts: &[Vec<u32>],
    completions: &[Vec<u32>],
    images: Option<&Images<B>>,
    pad_id: u32,
    with_entropy: bool,
    buckets: ShapeBuckets,
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
    let (batch, lp, tc) = prompt_completion_batch_bucketed(prompts, completions, pad_id, buckets);
    let exact = completions.iter().map(Vec::len).max().unwrap_or(0);
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
    let logp = logp.gather(2, targets).reshape([b, tc]);
    if exact == tc {
        Ok((logp, entropy))
    } else {
        Ok((
            logp.narrow(1, 0, exact),
            entropy.map(|e| e.narrow(1, 0, exact)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_round_up_to_the_bucket_but_not_past_the_completion_limit() {
        let b = ShapeBuckets {
            multiple: 64,
            max_completion: 256,
        };
        let widths: Vec<usize> = [1, 10, 64, 65, 250, 256]
            .map(|n| b.completion_width(n))
            .to_vec();
        assert_eq!(widths, [64, 64, 64, 128, 256, 256]);
        assert_eq!(b.prompt_width(358), 384);
        let short = ShapeBuckets {
            multiple: 64,
            max_completion: 12,
        };
        assert_eq!(short.completion_width(5), 12);
        assert_eq!(ShapeBuckets::EXACT.completion_width(7), 7);
        assert_eq!(ShapeBuckets::EXACT.prompt_width(7), 7);
        let (batch, lp, tc) =
            prompt_completion_batch_bucketed(&[vec![5, 6, 7]], &[vec![8]], 0, short);
        assert_eq!((lp, tc, batch.len), (64, 12, 76));
        assert_eq!(batch.attention_mask.iter().filter(|&&m| m == 1).count(), 4);
    }
}
