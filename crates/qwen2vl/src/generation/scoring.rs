//! Teacher-forced per-token log-probs of given completions in one batched forward: what GRPO
//! needs for the policy (with autodiff) and the reference model (without).

use burn::tensor::{activation::log_softmax, backend::Backend, Int, Tensor, TensorData};

use super::head::{chunked_scores, softmax_parts};
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
    pub(super) layout: Layout,
    /// Completions, `rows x width` right-padded.
    targets: Vec<i64>,
    rows: usize,
    /// Completion slots per row (the bucket width).
    pub(super) width: usize,
    /// The longest completion.
    exact: usize,
}

#[derive(Debug, Clone)]
pub(super) enum Layout {
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
        let hidden = self.hidden(model, images)?;
        Ok(self.score_hidden(model, hidden, with_entropy))
    }

    /// [`Self::score`] from the final hidden states [`Self::hidden`] gives, through the
    /// model's LM head.
    pub fn score_hidden<B: Backend>(
        &self,
        model: &Qwen2VL<B>,
        hidden: Tensor<B, 3>,
        with_entropy: bool,
    ) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
        let targets = self
            .targets(&hidden.device())
            .reshape([self.rows, self.width, 1]);
        let entropy = with_entropy.then_some(EntropyOf::Values);
        target_scores(model, hidden, targets, entropy)
    }

    /// [`Self::score_hidden`] with the entropies kept in the graph, so that a loss can take
    /// their gradient (an entropy bonus).
    pub fn score_hidden_entropy_grad<B: Backend>(
        &self,
        model: &Qwen2VL<B>,
        hidden: Tensor<B, 3>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let targets = self
            .targets(&hidden.device())
            .reshape([self.rows, self.width, 1]);
        let (logp, entropy) = target_scores(model, hidden, targets, Some(EntropyOf::Graph));
        (logp, entropy.expect("asked for"))
    }

    /// [`Self::score`] with the LM head run `head_chunk` completion tokens at a time
    /// ([`chunked_scores`]; 0: [`Self::score`] itself), so that the logits of the whole batch
    /// never exist at once. With a chunk the scores are values only, outside any graph: a
    /// policy takes their gradient through [`Self::hidden`] and [`super::chunked_backward`].
    pub fn score_chunked<B: Backend>(
        &self,
        model: &Qwen2VL<B>,
        images: Option<&Images<B>>,
        with_entropy: bool,
        head_chunk: usize,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 2>>), Qwen2VLError> {
        if head_chunk == 0 {
            return self.score(model, images, with_entropy);
        }
        let hidden = self.hidden(model, images)?.detach();
        let head = model.head_weight().0.detach();
        let (n, tc) = (self.rows, self.width);
        let d = hidden.dims()[2];
        let targets = self.targets(&hidden.device());
        let (logp, entropy) = chunked_scores(
            &head,
            hidden.reshape([n * tc, d]),
            targets,
            with_entropy,
            head_chunk,
        );
        Ok((logp.reshape([n, tc]), entropy.map(|e| e.reshape([n, tc]))))
    }

    /// The completion tokens each slot predicts, `[rows * width]` row after row (pad ids past a
    /// completion).
    pub fn targets<B: Backend>(&self, device: &B::Device) -> Tensor<B, 1, Int> {
        Tensor::from_data(
            TensorData::new(self.targets.clone(), [self.rows * self.width]),
            device,
        )
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

/// Whether entropies are taken as values or kept in the autodiff graph.
#[derive(Debug, Clone, Copy)]
enum EntropyOf {
    Values,
    Graph,
}

/// Log-probs of `targets` (`[rows, slots, 1]`) from the hidden states that predict them
/// (`[rows, slots, hidden]`), and the entropies when asked.
fn target_scores<B: Backend>(
    model: &Qwen2VL<B>,
    hidden: Tensor<B, 3>,
    targets: Tensor<B, 3, Int>,
    entropy: Option<EntropyOf>,
) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
    let [n, tc, _] = hidden.dims();
    let Some(of) = entropy else {
        // The targets' log-probs alone: shifted logits less the log of their exponentials'
        // sum, without the whole log-softmax.
        let (shifted, _, total) = softmax_parts(model.logits(hidden), 2);
        let logp = shifted.gather(2, targets) - total.log();
        return (logp.reshape([n, tc]), None);
    };
    let logp = log_softmax(model.logits(hidden), 2);
    let lp = match of {
        EntropyOf::Values => logp.clone().detach(),
        EntropyOf::Graph => logp.clone(),
    };
    let entropy = lp.clone().exp().mul(lp).sum_dim(2).neg().reshape([n, tc]);
    (logp.gather(2, targets).reshape([n, tc]), Some(entropy))
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
