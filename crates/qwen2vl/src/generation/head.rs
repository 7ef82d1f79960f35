//! The LM head over many token rows in chunks, so that `[rows, vocab]` logits never exist at
//! once: the log-probs of given targets and the entropies going forward, and going backward
//! the gradients of the hidden states and of the head's weight from the gradients of those
//! log-probs (`d logp_t / d z = onehot_t - softmax(z)`). Neither keeps a graph: they run on a
//! plain backend (a policy's inner one), and the caller carries the hidden states' gradient
//! into the model's backward pass.

use burn::module::ParamId;
use burn::tensor::{
    activation::softmax, backend::AutodiffBackend, backend::Backend, IndexingUpdateOp, Int, Tensor,
};

use crate::model::Qwen2VL;

/// The LM head's weight in the layout the model keeps it.
#[derive(Debug, Clone)]
pub enum HeadWeight<B: Backend> {
    /// Tied to the token embedding: `[vocab, hidden]`.
    Tied(Tensor<B, 2>),
    /// A separate head (Burn's linear layout): `[hidden, vocab]`.
    Separate(Tensor<B, 2>),
}

impl<B: Backend> HeadWeight<B> {
    /// The weight outside the graph.
    pub fn detach(self) -> Self {
        match self {
            Self::Tied(w) => Self::Tied(w.detach()),
            Self::Separate(w) => Self::Separate(w.detach()),
        }
    }

    /// `[rows, hidden] -> [rows, vocab]`, the product the model's scoring form takes.
    pub fn logits(&self, h: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Self::Tied(w) => h.matmul(w.clone().transpose()),
            Self::Separate(w) => h.matmul(w.clone()),
        }
    }

    /// The hidden states' gradient from the logits' `[rows, vocab]`.
    fn input_grad(&self, dz: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Self::Tied(w) => dz.matmul(w.clone()),
            Self::Separate(w) => dz.matmul(w.clone().transpose()),
        }
    }

    /// The weight's gradient (in the weight's own layout) from one chunk.
    fn weight_grad(&self, h: Tensor<B, 2>, dz: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Self::Tied(_) => dz.transpose().matmul(h),
            Self::Separate(_) => h.transpose().matmul(dz),
        }
    }
}

impl<B: AutodiffBackend> HeadWeight<B> {
    /// The weight on the inner backend, outside the graph.
    pub fn inner(&self) -> HeadWeight<B::InnerBackend> {
        match self {
            Self::Tied(w) => HeadWeight::Tied(w.clone().inner()),
            Self::Separate(w) => HeadWeight::Separate(w.clone().inner()),
        }
    }
}

impl<B: Backend> Qwen2VL<B> {
    /// The LM head's weight (the token embedding when tied) and the id of its parameter.
    pub fn head_weight(&self) -> (HeadWeight<B>, ParamId) {
        match &self.lm_head {
            Some(head) => (HeadWeight::Separate(head.weight.val()), head.weight.id),
            None => (
                HeadWeight::Tied(self.text.embed_tokens.weight.val()),
                self.text.embed_tokens.weight.id,
            ),
        }
    }
}

/// The pieces of a log-softmax along `dim`: `z` shifted by its (detached) maximum, the
/// exponentials of that, and their sums, so that `log_softmax(z) = shifted - log(total)` and
/// `softmax(z) = exp / total`. A caller that wants a few log-probs, or the probabilities, makes
/// them from these with fewer passes over `z` than through a whole log-softmax.
pub(crate) fn softmax_parts<B: Backend, const D: usize>(
    z: Tensor<B, D>,
    dim: usize,
) -> (Tensor<B, D>, Tensor<B, D>, Tensor<B, D>) {
    let shifted = z.clone() - z.detach().max_dim(dim);
    let exp = shifted.clone().exp();
    let total = exp.clone().sum_dim(dim);
    (shifted, exp, total)
}

/// Log-probs `[rows]` of `targets` (`[rows, 1]`) and, when asked, the entropies `[rows]`
/// (`log total - sum p shifted`) and the probabilities `[rows, vocab]` of logits `z` (made
/// for either).
#[allow(clippy::type_complexity)]
fn picked_scores<B: Backend>(
    z: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
    with_entropy: bool,
    with_probs: bool,
) -> (Tensor<B, 1>, Option<Tensor<B, 1>>, Option<Tensor<B, 2>>) {
    let rows = z.dims()[0];
    let (shifted, exp, total) = softmax_parts(z, 1);
    let log_total = total.clone().log();
    let probs = (with_entropy || with_probs).then(|| exp / total);
    let entropy = with_entropy.then(|| {
        let p = probs.clone().expect("made above");
        (log_total.clone() - (p * shifted.clone()).sum_dim(1)).reshape([rows])
    });
    let picked = (shifted.gather(1, targets) - log_total).reshape([rows]);
    (picked, entropy, probs)
}

/// Row ranges of at most `chunk` rows (0: one range).
fn chunks(rows: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let step = if chunk == 0 { rows.max(1) } else { chunk };
    (0..rows)
        .step_by(step)
        .map(move |start| (start, step.min(rows - start)))
}

/// Log-probs of `targets` (`[rows]`) under the head's distributions at `hidden`
/// (`[rows, hidden]`), and the entropies of those distributions when asked, `chunk` rows at a
/// time (0: all at once). The same values as log-softmax over the whole logits.
pub fn chunked_scores<B: Backend>(
    head: &HeadWeight<B>,
    hidden: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    with_entropy: bool,
    chunk: usize,
) -> (Tensor<B, 1>, Option<Tensor<B, 1>>) {
    let rows = hidden.dims()[0];
    let mut logps = Vec::new();
    let mut entropies = Vec::new();
    for (start, len) in chunks(rows, chunk) {
        let h = hidden.clone().narrow(0, start, len);
        let t = targets.clone().narrow(0, start, len).reshape([len, 1]);
        let (logp, entropy, _) = picked_scores(head.logits(h), t, with_entropy, false);
        entropies.extend(entropy);
        logps.push(logp);
    }
    let entropy = with_entropy.then(|| Tensor::cat(entropies, 0));
    (Tensor::cat(logps, 0), entropy)
}

/// d/dz of `g * logp_t` for each row: `g * (onehot_t - p)` from the softmax `p`
/// (`[rows, vocab]`), the targets and `g` (both `[rows, 1]`).
fn logits_grad<B: Backend>(p: Tensor<B, 2>, t: Tensor<B, 2, Int>, g: Tensor<B, 2>) -> Tensor<B, 2> {
    (p * g.clone().neg()).scatter(1, t, g, IndexingUpdateOp::Add)
}

/// The LM head over all rows at once, outside any graph, with its softmax kept for
/// [`Self::backward`]: the log-probs of `targets` and, when asked, the entropies, as
/// [`chunked_scores`] gives them in one chunk. Its backward pass computes the weight's
/// gradient in the weight's own layout in one product (through autodiff, a tied head's came
/// out as a transposed view that every later use copied into place, single-threaded) and
/// needs no second log-softmax pass.
pub struct HeadScores<B: Backend> {
    probs: Tensor<B, 2>,
    hidden: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
}

impl<B: Backend> HeadScores<B> {
    /// `hidden` `[rows, hidden]`, `targets` `[rows]`: the log-probs `[rows]`, the entropies
    /// `[rows]` when asked, and what the backward pass needs.
    pub fn new(
        head: &HeadWeight<B>,
        hidden: Tensor<B, 2>,
        targets: Tensor<B, 1, Int>,
        with_entropy: bool,
    ) -> (Tensor<B, 1>, Option<Tensor<B, 1>>, Self) {
        let rows = hidden.dims()[0];
        let targets = targets.reshape([rows, 1]);
        let (picked, entropy, probs) = picked_scores(
            head.logits(hidden.clone()),
            targets.clone(),
            with_entropy,
            true,
        );
        let kept = Self {
            probs: probs.expect("asked for"),
            hidden,
            targets,
        };
        (picked, entropy, kept)
    }

    /// The gradients of the hidden states (`[rows, hidden]`) and of the head's weight (its
    /// own layout) given `grad` (`[rows]`), the gradient of some loss with respect to the
    /// log-probs [`Self::new`] returned.
    pub fn backward(
        self,
        head: &HeadWeight<B>,
        grad: Tensor<B, 1>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let rows = self.hidden.dims()[0];
        let dz = logits_grad(self.probs, self.targets, grad.reshape([rows, 1]));
        let dh = head.input_grad(dz.clone());
        (dh, head.weight_grad(self.hidden, dz))
    }
}

/// The gradients of the hidden states (`[rows, hidden]`) and of the head's weight (its own
/// layout) given `grad` (`[rows]`), the gradient of some loss with respect to the log-probs
/// [`chunked_scores`] returns, recomputing the logits `chunk` rows at a time (0: all at once).
pub fn chunked_backward<B: Backend>(
    head: &HeadWeight<B>,
    hidden: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    grad: Tensor<B, 1>,
    chunk: usize,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let rows = hidden.dims()[0];
    let mut dh = Vec::new();
    let mut dw: Option<Tensor<B, 2>> = None;
    for (start, len) in chunks(rows, chunk) {
        let h = hidden.clone().narrow(0, start, len);
        let t = targets.clone().narrow(0, start, len).reshape([len, 1]);
        let g = grad.clone().narrow(0, start, len).reshape([len, 1]);
        let p = softmax(head.logits(h.clone()), 1);
        let dz = logits_grad(p, t, g);
        dh.push(head.input_grad(dz.clone()));
        let w = head.weight_grad(h, dz);
        dw = Some(match dw {
            Some(acc) => acc + w,
            None => w,
        });
    }
    let dw = dw.unwrap_or_else(|| match head {
        HeadWeight::Tied(w) | HeadWeight::Separate(w) => w.zeros_like(),
    });
    (Tensor::cat(dh, 0), dw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{activation::log_softmax, Distribution, ElementConversion, TensorData};

    type A = Autodiff<Flex>;

    fn max_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
        (a - b).abs().max().into_scalar().elem()
    }

    /// Chunked scores and gradients equal autodiff through the whole log-softmax, for both
    /// head layouts and chunks that do and do not divide the rows.
    #[test]
    fn chunks_equal_the_whole_head_forward_and_backward() {
        let device = Default::default();
        let (rows, d, vocab) = (7, 5, 11);
        let targets: Vec<i64> = (0..rows as i64)
            .map(|r| (r * 3 + 1) % vocab as i64)
            .collect();
        let g_values: Vec<f32> = (0..rows).map(|r| 0.3 * r as f32 - 0.8).collect();
        for tied in [true, false] {
            let hidden = Tensor::<A, 2>::random([rows, d], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            let shape = if tied { [vocab, d] } else { [d, vocab] };
            let w = Tensor::<A, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            let head = if tied {
                HeadWeight::Tied(w.clone())
            } else {
                HeadWeight::Separate(w.clone())
            };
            let t =
                Tensor::<A, 1, Int>::from_data(TensorData::new(targets.clone(), [rows]), &device);
            let g = Tensor::<A, 1>::from_data(TensorData::new(g_values.clone(), [rows]), &device);
            // The whole head through autodiff.
            let logp = log_softmax(head.logits(hidden.clone()), 1);
            let entropy = (logp.clone().exp() * logp.clone())
                .sum_dim(1)
                .neg()
                .reshape([rows]);
            let picked = logp.gather(1, t.clone().reshape([rows, 1])).reshape([rows]);
            let grads = (picked.clone() * g.clone()).sum().backward();
            let (dh_ref, dw_ref) = (hidden.grad(&grads).unwrap(), w.grad(&grads).unwrap());
            for chunk in [0, 1, 3, 7, 10] {
                let inner = head.inner();
                let h = hidden.clone().inner();
                let (lp, ent) = chunked_scores(&inner, h.clone(), t.clone().inner(), true, chunk);
                assert!(
                    max_diff(lp, picked.clone().inner()) < 1e-6,
                    "log-probs, chunk {chunk}"
                );
                assert!(
                    max_diff(ent.unwrap(), entropy.clone().inner()) < 1e-6,
                    "entropy"
                );
                let (dh, dw) =
                    chunked_backward(&inner, h, t.clone().inner(), g.clone().inner(), chunk);
                assert!(
                    max_diff(dh, dh_ref.clone()) < 1e-5,
                    "hidden grad, chunk {chunk}"
                );
                assert!(
                    max_diff(dw, dw_ref.clone()) < 1e-5,
                    "weight grad, chunk {chunk}"
                );
            }
        }
    }
}
