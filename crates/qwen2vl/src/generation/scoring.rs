//! Teacher-forced per-token log-probs of given completions in one batched forward: what GRPO
//! needs for the policy (with autodiff) and the reference model (without).

use burn::tensor::{activation::log_softmax, backend::Backend, Bool, Int, Tensor, TensorData};

use crate::error::Qwen2VLError;
use crate::model::{Images, Qwen2VL};
use crate::positions::TokenBatch;
use crate::text::causal_padding_mask;

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
    let batch = ScoringBatch::new(prompts, completions, 1, pad_id, buckets)?;
    let (logp, entropy) = batch.score(model, images, with_entropy)?;
    Ok(batch.exact(logp, entropy))
}

/// [`completion_scores_bucketed`] for groups of completions that share a prompt: `prompts`
/// (and `images`, theirs only) once, `completions` `group` per prompt, prompt after prompt
/// (completion `p * group + g` follows prompt `p`). Each prompt and its images run once; its
/// keys and values serve its `group` completions, and in the backward pass the gradients of
/// the shared part are summed over the group. The same values as the unshared call on the
/// prompts each repeated `group` times, up to float rounding.
#[allow(clippy::too_many_arguments)]
pub fn grouped_completion_scores<B: Backend>(
    model: &Qwen2VL<B>,
    prompts: &[Vec<u32>],
    images: Option<&Images<B>>,
    completions: &[Vec<u32>],
    group: usize,
    pad_id: u32,
    with_entropy: bool,
    buckets: ShapeBuckets,
) -> Result<(Tensor<B, 2>, Option<Tensor<B, 2>>), Qwen2VLError> {
    let batch = ScoringBatch::new(prompts, completions, group, pad_id, buckets)?;
    let (logp, entropy) = batch.score(model, images, with_entropy)?;
    Ok(batch.exact(logp, entropy))
}

/// The token layout of one scoring pass, built once and scored any number of times (by the
/// policy, the reference, the sampling policy): prompts and completions padded to their
/// bucket widths. With `group` 1 each completion follows its own copy of its prompt in one
/// `[pad.. prompt | completion ..pad]` row; with `group > 1` each prompt is one row and its
/// `group` completions run against its keys and values.
#[derive(Debug, Clone)]
pub struct ScoringBatch {
    layout: Layout,
    /// Completions, `rows x width` right-padded.
    targets: Vec<i64>,
    rows: usize,
    /// Completion slots per row (the bucket width).
    width: usize,
    /// The longest completion.
    exact: usize,
}

#[derive(Debug, Clone)]
enum Layout {
    /// Prompt and completion in one row; the prompt part is `prompt_width` wide.
    Joined {
        batch: TokenBatch,
        prompt_width: usize,
    },
    /// Each prompt once, its completions after its keys and values.
    Grouped {
        prompts: TokenBatch,
        completions: TokenBatch,
        group: usize,
    },
}

impl ScoringBatch {
    /// `completions` `group` per prompt, prompt after prompt (`group` 1: one per prompt).
    pub fn new(
        prompts: &[Vec<u32>],
        completions: &[Vec<u32>],
        group: usize,
        pad_id: u32,
        buckets: ShapeBuckets,
    ) -> Result<Self, Qwen2VLError> {
        if prompts.is_empty() || group == 0 || completions.len() != prompts.len() * group {
            return Err(Qwen2VLError::Input(format!(
                "{} prompts x {group} completions each need as many completions, not {}",
                prompts.len(),
                completions.len()
            )));
        }
        if prompts.iter().any(Vec::is_empty) {
            return Err(Qwen2VLError::Input(
                "an empty prompt cannot be scored".into(),
            ));
        }
        let exact = completions.iter().map(Vec::len).max().unwrap_or(0);
        let rows = completions.len();
        let (layout, width) = if group == 1 {
            let (batch, prompt_width, width) =
                prompt_completion_batch_bucketed(prompts, completions, pad_id, buckets);
            (
                Layout::Joined {
                    batch,
                    prompt_width,
                },
                width,
            )
        } else {
            let lp = buckets.prompt_width(prompts.iter().map(Vec::len).max().unwrap_or(0));
            let width = buckets.completion_width(exact).max(1);
            let mut ids = Vec::with_capacity(rows * width);
            for c in completions {
                ids.extend_from_slice(c);
                ids.extend(std::iter::repeat_n(pad_id, width - c.len()));
            }
            let completions = TokenBatch {
                attention_mask: vec![1; ids.len()],
                ids,
                batch: rows,
                len: width,
            };
            let prompts = TokenBatch::left_padded(prompts, pad_id).left_padded_to(lp, pad_id);
            (
                Layout::Grouped {
                    prompts,
                    completions,
                    group,
                },
                width,
            )
        };
        let targets = completions
            .iter()
            .flat_map(|c| (0..width).map(move |t| c.get(t).copied().unwrap_or(pad_id) as i64))
            .collect();
        Ok(Self {
            layout,
            targets,
            rows,
            width,
            exact,
        })
    }

    /// Completion rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Completion slots per row: the bucket width of the scores [`Self::score`] returns.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Per-token log-probs of the completions under `model`, `[rows, width]` (slots past a
    /// completion hold the pad id's and must be masked), and the entropies of the next-token
    /// distributions when asked (detached). Differentiable when `B` is an autodiff backend;
    /// `images` are the prompts' images (once per prompt row).
    pub fn score<B: Backend>(
        &self,
        model: &Qwen2VL<B>,
        images: Option<&Images<B>>,
        with_entropy: bool,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 2>>), Qwen2VLError> {
        let (n, tc) = (self.rows, self.width);
        let hidden = match &self.layout {
            Layout::Joined {
                batch,
                prompt_width,
            } => model
                .forward_hidden(batch, images, None)?
                .narrow(1, prompt_width - 1, tc),
            Layout::Grouped {
                prompts,
                completions,
                group,
            } => grouped_hidden(model, prompts, completions, *group, images)?,
        };
        let device = hidden.device();
        let targets = Tensor::<B, 3, Int>::from_data(
            TensorData::new(self.targets.clone(), [n, tc, 1]),
            &device,
        );
        Ok(target_scores(model, hidden, targets, with_entropy))
    }

    /// Scores of [`Self::score`] narrowed to the longest completion.
    pub fn exact<B: Backend>(
        &self,
        logp: Tensor<B, 2>,
        entropy: Option<Tensor<B, 2>>,
    ) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
        if self.exact == self.width {
            (logp, entropy)
        } else {
            (
                logp.narrow(1, 0, self.exact),
                entropy.map(|e| e.narrow(1, 0, self.exact)),
            )
        }
    }
}

/// Log-probs of `targets` (`[rows, slots, 1]`) from the hidden states that predict them
/// (`[rows, slots, hidden]`), and the entropies when asked (detached).
fn target_scores<B: Backend>(
    model: &Qwen2VL<B>,
    hidden: Tensor<B, 3>,
    targets: Tensor<B, 3, Int>,
    with_entropy: bool,
) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
    let [n, tc, _] = hidden.dims();
    let logp = log_softmax(model.logits(hidden), 2);
    let entropy = with_entropy.then(|| {
        let lp = logp.clone().detach();
        lp.clone().exp().mul(lp).sum_dim(2).neg().reshape([n, tc])
    });
    (logp.gather(2, targets).reshape([n, tc]), entropy)
}

/// The hidden states that predict each completion slot when the prompts run once and their
/// `group` completions each run against their prompt's keys and values.
fn grouped_hidden<B: Backend>(
    model: &Qwen2VL<B>,
    prompt_batch: &TokenBatch,
    comp_batch: &TokenBatch,
    group: usize,
    images: Option<&Images<B>>,
) -> Result<Tensor<B, 3>, Qwen2VLError> {
    let (lp, n, tc) = (prompt_batch.len, comp_batch.batch, comp_batch.len);
    // One lookup for the prompts' and the completions' tokens (one scatter of the table's
    // gradient in training).
    let device = model.input_device(images);
    let batches: &[&TokenBatch] = if tc == 1 {
        &[prompt_batch]
    } else {
        &[prompt_batch, comp_batch]
    };
    let mut texts = model.token_embeddings(batches, &device)?.into_iter();
    let prompt_text = texts.next().expect("the prompts' embeddings");
    let comp_text = texts.next();
    // The prompts, once: hidden states and every layer's keys and values.
    let inputs = model.prepare_looked_up(prompt_batch, prompt_text, images, None)?;
    let next = inputs.next_positions(prompt_batch);
    let rope = model.text.rope_tables(
        crate::text::position_axes(&inputs.positions),
        prompt_batch.batch,
        lp,
        &device,
    );
    let masked = causal_padding_mask::<B>(prompt_batch, &device);
    let (prompt_hidden, prefix) = model.text.forward_keep(inputs.embeds, &rope, Some(masked));
    let of_prompt: Vec<i64> = (0..n).map(|r| (r / group) as i64).collect();
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(of_prompt, [n]), &device);
    // Predicts each completion's first token.
    let first = prompt_hidden.narrow(1, lp - 1, 1).select(0, rows.clone());
    let Some(comp_text) = comp_text else {
        return Ok(first);
    };
    // (Refuses image placeholders in a completion.)
    let embeds = model.place_images(comp_batch, comp_text, None, &device)?;
    // The completions after their prompt's keys and values.
    let pos: Vec<i64> = (0..n)
        .flat_map(|r| {
            let start = next[r / group];
            (0..tc as i64).map(move |t| t + start)
        })
        .collect();
    let rope = model.text.rope_tables([&pos, &pos, &pos], n, tc, &device);
    let masked = after_prefix_mask::<B>(prompt_batch, group, tc, &device);
    let after = model
        .text
        .forward_after(embeds, &rope, masked, &prefix, rows);
    Ok(Tensor::cat(vec![first, after.narrow(1, 0, tc - 1)], 1))
}

/// `[rows, 1, len, prefix_len + len]`, true where masked: completion token `i` of row `r`
/// sees its prompt's real tokens (row `r / group` of `prefix`) and its own tokens up to `i`.
fn after_prefix_mask<B: Backend>(
    prefix: &TokenBatch,
    group: usize,
    len: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let rows = prefix.batch * group;
    let keys = prefix.len + len;
    let mut m = Vec::with_capacity(rows * len * keys);
    for r in 0..rows {
        let valid = prefix.mask_row(r / group);
        for i in 0..len {
            m.extend(valid.iter().map(|&v| v == 0));
            m.extend((0..len).map(|j| j > i));
        }
    }
    Tensor::from_data(TensorData::new(m, [rows, 1, len, keys]), device)
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
