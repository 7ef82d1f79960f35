//! Choosing each row's next token on the device: only the chosen ids and their log-probs (a few
//! bytes per row) come back to the host per decoding step, never the `[rows, vocab]` logits.
//!
//! - greedy: argmax;
//! - temperature only (top-k 0, top-p 1): inverse-CDF sampling in vocabulary order (searched
//!   block by block, `inverse_cdf`), one uniform draw per row from the seeded host
//!   generator, no sort;
//! - top-k and/or top-p: the `k` most likely tokens (the whole vocabulary when only top-p is
//!   set) sorted on the device and read back, then [`sample_sorted`] on the host, which keeps
//!   the order of transformers' logits warpers (temperature, top-k, top-p).
//!
//! Image and video placeholders are never chosen; their log-probs stay those of the model.

use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};

use super::sampling::{Rng, Sampling};

/// The chosen token and its log-prob under the model's untempered distribution, per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Picked {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
}

/// Picks the next token of every row of `logits` (`[rows, vocab]`), never one of `banned`.
/// `seen` (`[rows, vocab]`, true where the row already holds the token) is where the
/// repetition penalty applies, when the sampling asks for one. `active[r]` false: the row is
/// finished; it draws nothing from `rng` and its pick is meaningless. `rng` is drawn once per
/// active row in row order.
pub fn pick<B: Backend>(
    logits: Tensor<B, 2>,
    banned: &[u32],
    seen: Option<&Tensor<B, 2, Bool>>,
    sampling: &Sampling,
    active: &[bool],
    rng: &mut Rng,
) -> Picked {
    let [rows, vocab] = logits.dims();
    let device = logits.device();
    let penalized = seen.is_some() && sampling.penalizes();
    let scores = match seen {
        Some(seen) if penalized => {
            let p = sampling.repetition_penalty;
            let negative = logits.clone().lower_elem(0.0);
            let penalized = logits
                .clone()
                .div_scalar(p)
                .mask_where(negative, logits.clone().mul_scalar(p));
            logits.clone().mask_where(seen.clone(), penalized)
        }
        _ => logits.clone(),
    };
    // The banned ids within the vocabulary, each once.
    let mut banned: Vec<i64> = banned
        .iter()
        .filter(|&&id| (id as usize) < vocab)
        .map(|&id| id as i64)
        .collect();
    banned.sort_unstable();
    banned.dedup();
    let allowed = if banned.is_empty() {
        scores
    } else {
        let mut ban = vec![0.0f32; vocab];
        for &id in &banned {
            ban[id as usize] = f32::NEG_INFINITY;
        }
        scores + Tensor::<B, 2>::from_data(TensorData::new(ban, [1, vocab]), &device)
    };
    let (chosen, lse): (Tensor<B, 2, Int>, Tensor<B, 2>) = if sampling.is_greedy() {
        (allowed.argmax(1), log_sum_exp(logits.clone()))
    } else if sampling.top_k == 0 && sampling.top_p >= 1.0 {
        // Inverse CDF over unnormalised weights exp((allowed - max) / T), the most likely
        // allowed token weighing exactly 1. The draw is kept above 0 so that a token of no
        // weight is never the first to reach it.
        let u: Vec<f32> = active
            .iter()
            .map(|&a| {
                if a {
                    (rng.next_f64() as f32).max(f32::MIN_POSITIVE)
                } else {
                    0.5
                }
            })
            .collect();
        let u = Tensor::<B, 2>::from_data(TensorData::new(u, [rows, 1]), &device);
        let max = allowed.clone().max_dim(1);
        let shifted = allowed - max.clone();
        let untempered = sampling.temperature == 1.0 && !penalized;
        let weights = if untempered {
            shifted.exp()
        } else {
            shifted.div_scalar(sampling.temperature).exp()
        };
        let mut blocks = Blocks::of(weights);
        // Untempered and unpenalized, the weights are the model's own: their total (from the
        // block sums the search uses) gives the log-sum-exp of the allowed tokens, and the
        // banned ones are added to it.
        let lse = if untempered {
            let allowed_lse = blocks.total().log() + max;
            if banned.is_empty() {
                allowed_lse
            } else {
                let ids = Tensor::<B, 1, Int>::from_data(
                    TensorData::new(banned.clone(), [banned.len()]),
                    &device,
                );
                log_add_exp(allowed_lse, log_sum_exp(logits.clone().select(1, ids)))
            }
        } else {
            log_sum_exp(logits.clone())
        };
        if sampling.min_p > 0.0 {
            // Below min_p times the most likely (whose weight is 1), a token counts for
            // nothing (the total below renormalises).
            let weights = blocks.grouped.reshape([rows, vocab]);
            let below = weights.clone().lower_elem(sampling.min_p);
            blocks = Blocks::of(weights.mask_fill(below, 0.0));
        }
        (inverse_cdf(blocks, u), lse)
    } else {
        let k = if sampling.top_k > 0 {
            sampling.top_k.min(vocab)
        } else {
            vocab
        };
        let (values, indices) = allowed.sort_descending_with_indices(1);
        let values = host_f32(values.narrow(1, 0, k));
        let indices = host_i64(indices.narrow(1, 0, k));
        let tokens: Vec<i64> = (0..rows)
            .map(|r| {
                if !active[r] {
                    return indices[r * k];
                }
                let row = &values[r * k..(r + 1) * k];
                indices[r * k + sample_sorted(row, sampling, rng)]
            })
            .collect();
        (
            Tensor::from_data(TensorData::new(tokens, [rows, 1]), &device),
            log_sum_exp(logits.clone()),
        )
    };
    let logprobs = host_f32(logits.gather(1, chosen.clone()) - lse);
    Picked {
        tokens: host_i64(chosen).into_iter().map(|t| t as u32).collect(),
        logprobs,
    }
}

/// Sampling weights (`[rows, vocab]`, none negative, some positive in each row) in blocks of
/// the largest power of two up to 256 that divides the vocabulary (128 for Qwen2-VL's), with
/// each block's sum: made once per draw, for the search and for the rows' totals.
struct Blocks<B: Backend> {
    /// `[rows, blocks, width]`.
    grouped: Tensor<B, 3>,
    /// `[rows, blocks]`.
    sums: Tensor<B, 2>,
}

impl<B: Backend> Blocks<B> {
    fn of(weights: Tensor<B, 2>) -> Self {
        let [rows, vocab] = weights.dims();
        let width = 1usize << vocab.trailing_zeros().min(8);
        let grouped = weights.reshape([rows, vocab / width, width]);
        let sums = grouped.clone().sum_dim(2).reshape([rows, vocab / width]);
        Self { grouped, sums }
    }

    /// Each row's total weight, `[rows, 1]`.
    fn total(&self) -> Tensor<B, 2> {
        self.sums.clone().sum_dim(1)
    }
}

/// Per row, the first token whose cumulative weight reaches `u` (`[rows, 1]`, in (0, 1]) times
/// the row's total: `[rows, 1]`.
///
/// Searched in two levels so that nothing of the vocabulary's size but the block sums is made:
/// the block where the cumulative sum of the block sums reaches the target, then the token
/// within that block. A token of no weight is never chosen: rounding cannot carry the search
/// past the last block, or the last token within a block, that weighs anything.
fn inverse_cdf<B: Backend>(blocks: Blocks<B>, u: Tensor<B, 2>) -> Tensor<B, 2, Int> {
    let [rows, n, width] = blocks.grouped.dims();
    let (block, target) = {
        let cdf = blocks.sums.cumsum(1);
        let total = cdf.clone().narrow(1, n - 1, 1);
        let target = u.mul(total.clone());
        let block = first_reaching(cdf.clone(), target.clone(), total);
        // What the blocks before it weigh.
        let before = cdf
            .gather(1, block.clone().sub_scalar(1).clamp_min(0))
            .mask_fill(block.clone().equal_elem(0), 0.0);
        (block, target - before)
    };
    let within = blocks
        .grouped
        .gather(
            1,
            block.clone().reshape([rows, 1, 1]).expand([rows, 1, width]),
        )
        .reshape([rows, width])
        .cumsum(1);
    let total = within.clone().narrow(1, width - 1, 1);
    block.mul_scalar(width as i64) + first_reaching(within, target, total)
}

/// Per row of `cdf` (`[rows, n]`, non-decreasing, ending at `total`): the first position whose
/// value reaches `target`, never past the first that reaches `total`.
fn first_reaching<B: Backend>(
    cdf: Tensor<B, 2>,
    target: Tensor<B, 2>,
    total: Tensor<B, 2>,
) -> Tensor<B, 2, Int> {
    let last = cdf.clone().lower(total).int().sum_dim(1);
    cdf.lower(target).int().sum_dim(1).min_pair(last)
}

/// `log(exp a + exp b)` elementwise, stable.
fn log_add_exp<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = a.clone().max_pair(b.clone());
    ((a - max.clone()).exp() + (b - max.clone()).exp()).log() + max
}

/// `log sum exp` of each row, `[rows, 1]`, stable (the row's maximum taken out first).
pub fn log_sum_exp<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = x.clone().max_dim(1);
    (x - max.clone()).exp().sum_dim(1).log() + max
}

/// Samples a position of `sorted` (logits in descending order, the `k` kept by top-k):
/// temperature, then top-p over the kept tokens, then one uniform draw.
pub fn sample_sorted(sorted: &[f32], s: &Sampling, rng: &mut Rng) -> usize {
    let t = s.temperature as f64;
    let max = sorted[0] as f64 / t;
    let mut probs: Vec<f64> = sorted.iter().map(|&v| (v as f64 / t - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let mut keep = probs.len();
    if s.top_p < 1.0 {
        let mut cum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= s.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    if s.min_p > 0.0 {
        // Sorted: the first is the most likely; at least it is kept.
        let floor = s.min_p as f64 * probs[0];
        keep = probs.iter().take_while(|&&p| p >= floor).count().max(1);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u = rng.next_f64();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return i;
        }
        u -= p;
    }
    keep - 1
}

fn host_f32<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 after conversion")
}

fn host_i64<B: Backend>(t: Tensor<B, 2, Int>) -> Vec<i64> {
    t.into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("i64 after conversion")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    const LOGITS: [f32; 7] = [1.0, 2.5, 0.2, 2.0, -1.0, 0.7, 1.6];
    /// Token 3 is banned in every test.
    const BANNED: [u32; 1] = [3];

    /// Tokens the rows have already seen, for the repetition penalty.
    const SEEN: [usize; 2] = [1, 4];

    /// The logits after the repetition penalty on [`SEEN`], when `s` asks for one.
    fn penalized(s: &Sampling) -> Vec<f32> {
        let mut l = LOGITS.to_vec();
        if s.repetition_penalty != 1.0 {
            for i in SEEN {
                l[i] = if l[i] < 0.0 {
                    l[i] * s.repetition_penalty
                } else {
                    l[i] / s.repetition_penalty
                };
            }
        }
        l
    }

    /// The exact probabilities of each token under `s`, token 3 banned: the repetition
    /// penalty, temperature, then the top-k, then the smallest top-p prefix, then the tokens
    /// at least min-p times the most likely, renormalised.
    fn exact(s: &Sampling) -> Vec<f64> {
        let logits = penalized(s);
        let mut order: Vec<usize> = (0..logits.len()).filter(|&i| i != 3).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if s.top_k > 0 {
            order.truncate(s.top_k);
        }
        let w: Vec<f64> = order
            .iter()
            .map(|&i| (logits[i] as f64 / s.temperature as f64).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let mut keep = order.len();
        let mut cum = 0.0;
        for (i, x) in w.iter().enumerate() {
            cum += x / total;
            if cum >= s.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        // min-p compares against the most likely token: w[0], whatever the normalisation.
        keep = w[..keep]
            .iter()
            .take_while(|&&x| x >= s.min_p as f64 * w[0])
            .count();
        let total: f64 = w[..keep].iter().sum();
        let mut p = vec![0.0; LOGITS.len()];
        for (j, &i) in order[..keep].iter().enumerate() {
            p[i] = w[j] / total;
        }
        p
    }

    /// The log-sum-exp of [`LOGITS`].
    fn lse() -> f64 {
        let m = LOGITS.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        LOGITS
            .iter()
            .map(|&v| (v as f64 - m).exp())
            .sum::<f64>()
            .ln()
            + m
    }

    /// Counts of `draws` picks (in batches of rows) under `s`.
    fn counts(s: &Sampling, draws: usize) -> Vec<usize> {
        let device = Default::default();
        let rows = 1000;
        let mut rng = Rng::new(42);
        let mut counts = vec![0; LOGITS.len()];
        let full: Vec<f32> = (0..rows).flat_map(|_| LOGITS).collect();
        let mut held = vec![false; rows * LOGITS.len()];
        for r in 0..rows {
            for i in SEEN {
                held[r * LOGITS.len() + i] = true;
            }
        }
        let seen = Tensor::<Flex, 2, Bool>::from_data(
            TensorData::new(held, [rows, LOGITS.len()]),
            &device,
        );
        let lse = lse();
        for _ in 0..draws / rows {
            let logits = Tensor::<Flex, 2>::from_data(
                TensorData::new(full.clone(), [rows, LOGITS.len()]),
                &device,
            );
            let p = pick(logits, &BANNED, Some(&seen), s, &vec![true; rows], &mut rng);
            for (t, lp) in p.tokens.iter().zip(&p.logprobs) {
                counts[*t as usize] += 1;
                // The log-prob is the model's, untempered, unbanned and unpenalized.
                let want = LOGITS[*t as usize] as f64 - lse;
                assert!((*lp as f64 - want).abs() < 1e-5, "{lp} vs {want}");
            }
        }
        counts
    }

    /// Pearson's chi-square of `counts` against `p`; tokens of probability 0 must not occur.
    fn chi_square(counts: &[usize], p: &[f64]) -> (f64, usize) {
        let n: usize = counts.iter().sum();
        let mut chi = 0.0;
        let mut df = 0;
        for (&c, &q) in counts.iter().zip(p) {
            if q == 0.0 {
                assert_eq!(c, 0, "a token outside the support was drawn: {counts:?}");
                continue;
            }
            let e = q * n as f64;
            chi += (c as f64 - e).powi(2) / e;
            df += 1;
        }
        (chi, df - 1)
    }

    #[test]
    fn sampled_frequencies_match_the_exact_probabilities() {
        // 99.9% quantiles of chi-square with 1..=5 degrees of freedom.
        let critical = [0.0, 10.83, 13.82, 16.27, 18.47, 20.52];
        let cases = [
            (1.0, 0, 1.0, 0.0, 1.0),  // inverse CDF over the vocabulary
            (0.7, 0, 1.0, 0.0, 1.0),  // tempered
            (1.0, 3, 1.0, 0.0, 1.0),  // top-k
            (1.3, 0, 0.8, 0.0, 1.0),  // top-p
            (1.0, 4, 0.75, 0.0, 1.0), // both
            (1.0, 0, 1.0, 0.3, 1.0),  // min-p on the device's inverse CDF
            (1.2, 5, 0.9, 0.2, 1.0),  // min-p after top-k and top-p
            (1.0, 0, 1.0, 0.0, 1.8),  // repetition penalty: token 1 drops below 6
            (0.8, 4, 1.0, 0.1, 1.5),  // all of them
        ];
        for (temperature, top_k, top_p, min_p, repetition_penalty) in cases {
            let s = Sampling {
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty,
            };
            let counts = counts(&s, 20_000);
            let (chi, df) = chi_square(&counts, &exact(&s));
            assert!(
                chi < critical[df],
                "{s:?}: chi-square {chi:.1} with {df} degrees of freedom, counts {counts:?}"
            );
        }
    }

    #[test]
    fn log_probs_stay_the_models_whatever_is_banned() {
        // An id banned twice and one past the vocabulary: never drawn, or nothing.
        let device = Default::default();
        let rows = 200;
        let logits = Tensor::<Flex, 2>::from_data(
            TensorData::new(LOGITS.repeat(rows), [rows, LOGITS.len()]),
            &device,
        );
        for s in [Sampling::full(1.0), Sampling::full(0.5)] {
            let p = pick(
                logits.clone(),
                &[3, 1, 3, 99],
                None,
                &s,
                &vec![true; rows],
                &mut Rng::new(5),
            );
            for (&t, &lp) in p.tokens.iter().zip(&p.logprobs) {
                assert!(t != 1 && t != 3, "{s:?}: banned token {t} drawn");
                let want = LOGITS[t as usize] as f64 - lse();
                assert!((lp as f64 - want).abs() < 1e-5, "{s:?}: {lp} vs {want}");
            }
        }
    }

    #[test]
    fn the_two_level_search_finds_the_token_the_cumulative_weights_reach() {
        // 80 tokens: 5 blocks of 16. Tokens of no weight start and end the first block, fill
        // the second, end the third, start the fourth and end the last.
        let mut w = [0.0f32; 80];
        for (i, x) in w.iter_mut().enumerate() {
            *x = match i {
                0..=3 | 12..=31 | 44..=49 | 78.. => 0.0,
                _ => 0.25 + (i % 5) as f32,
            };
        }
        let total: f64 = w.iter().map(|&x| x as f64).sum();
        let positive = |t: usize| w[t] > 0.0;
        // The last draw stands for a target that rounding carried past the total.
        let us: Vec<f32> = (0..=200)
            .map(|k| k as f32 / 200.0)
            .map(|u| u.max(f32::MIN_POSITIVE))
            .chain([1.0 + 4.0 * f32::EPSILON])
            .collect();
        let device = Default::default();
        let rows = us.len();
        let weights =
            Tensor::<Flex, 2>::from_data(TensorData::new(w.repeat(rows), [rows, w.len()]), &device);
        let u = Tensor::<Flex, 2>::from_data(TensorData::new(us.clone(), [rows, 1]), &device);
        let chosen = host_i64(inverse_cdf(Blocks::of(weights), u));
        for (&u, &t) in us.iter().zip(&chosen) {
            let t = t as usize;
            assert!(positive(t), "u = {u}: token {t} weighs nothing");
            let u = u.min(1.0);
            // The exact answer, unless u lies within rounding of a boundary.
            let target = u as f64 * total;
            let mut cum = 0.0;
            let exact = (0..w.len())
                .find(|&i| {
                    cum += w[i] as f64;
                    cum >= target
                })
                .unwrap();
            let (lo, hi) = (
                w[..t].iter().map(|&x| x as f64).sum::<f64>(),
                w[..=t].iter().map(|&x| x as f64).sum::<f64>(),
            );
            let near = (target - lo).abs() < 1e-4 || (target - hi).abs() < 1e-4;
            assert!(t == exact || near, "u = {u}: token {t}, exactly {exact}");
        }
        // The extremes: the first and the last token that weigh anything.
        assert_eq!(chosen[0], 4);
        assert_eq!(chosen[rows - 2..], [77, 77]);
    }

    #[test]
    fn greedy_takes_the_best_allowed_token_and_finished_rows_draw_nothing() {
        let device = Default::default();
        let logits = Tensor::<Flex, 2>::from_data(
            TensorData::new([LOGITS, LOGITS].concat(), [2, LOGITS.len()]),
            &device,
        );
        let mut rng = Rng::new(1);
        let p = pick(
            logits.clone(),
            &[],
            None,
            &Sampling::GREEDY,
            &[true, true],
            &mut rng,
        );
        assert_eq!(p.tokens, [1, 1]);
        // Banned: the next best.
        let p = pick(
            logits.clone(),
            &[1],
            None,
            &Sampling::GREEDY,
            &[true, true],
            &mut rng,
        );
        assert_eq!(p.tokens, [3, 3]);
        // A finished row takes no draw: the active row's pick is the one it gets alone.
        let s = Sampling::full(1.0);
        let one = pick(
            logits.clone().narrow(0, 1, 1),
            &[],
            None,
            &s,
            &[true],
            &mut Rng::new(9),
        );
        let two = pick(logits, &[], None, &s, &[false, true], &mut Rng::new(9));
        assert_eq!(one.tokens[0], two.tokens[1]);
    }
}
