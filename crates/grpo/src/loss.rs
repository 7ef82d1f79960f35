//! The GRPO objective per token and its aggregation (TRL's `loss_type`s), as pure tensor
//! functions.

use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

/// Log-ratios are clamped to this magnitude before `exp`, so a stale or far-off log-prob
/// cannot overflow to inf and then NaN.
pub const MAX_LOG_RATIO: f32 = 20.0;

/// How per-token losses become one number (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over each sequence's tokens, then over sequences (Med-R1's).
    #[default]
    Grpo,
    /// Sum over the batch's tokens / number of active tokens in the batch.
    Bnpo,
    /// Sum / (batch size x max completion length).
    DrGrpo,
    /// Sum / active tokens of the whole (accumulated) batch.
    Dapo,
}

/// Where the importance ratio is taken (TRL's `importance_sampling_level`,
/// `trl/trainer/grpo_trainer.py:3055` at v1.9.0-26, `_compute_loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSampling {
    /// One ratio per token (GRPO, PPO).
    #[default]
    Token,
    /// One ratio per sequence, the exponential of the mean log-ratio over its tokens (GSPO,
    /// arXiv 2507.18071), clipped and applied to every token of the sequence.
    Sequence,
}

/// The per-token estimator of KL(policy || reference) added to the loss, `d = ref - logp`
/// (verl's `kl_penalty`, `verl/trainer/ppo/core_algos.py`; Schulman, "Approximating KL
/// divergence", 2020). TRL uses `k3` only (`grpo_trainer.py:3072`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `-d` (`logp - ref`): unbiased, high variance, can be negative (verl `kl` / `k1`).
    #[serde(alias = "kl")]
    K1,
    /// `|d|` (verl `abs`).
    Abs,
    /// `d² / 2`: low variance, biased (verl `mse` / `k2`).
    #[serde(alias = "mse")]
    K2,
    /// `exp(d) - d - 1`: unbiased and never negative (TRL's, Med-R1's).
    #[default]
    K3,
    /// `k3` clamped to [-10, 10] (verl `low_var_kl`, which verl also calls `k3`).
    LowVarKl,
}

/// The per-token KL estimate of `policy` against `reference` log-probs, `[batch, tokens]`.
/// The log-ratio is clamped to [`MAX_LOG_RATIO`] first, as verl does before `exp`.
pub fn kl_estimate<B: Backend>(
    logp: Tensor<B, 2>,
    reference: Tensor<B, 2>,
    estimator: KlEstimator,
) -> Tensor<B, 2> {
    let d = (reference - logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO);
    match estimator {
        KlEstimator::K1 => d.neg(),
        KlEstimator::Abs => d.abs(),
        KlEstimator::K2 => d.clone() * d * 0.5,
        KlEstimator::K3 => d.clone().exp() - d - 1.0,
        KlEstimator::LowVarKl => (d.clone().exp() - d - 1.0).clamp(-10.0, 10.0),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    /// KL penalty weight (0 disables the reference model).
    pub beta: f32,
    pub epsilon_low: f32,
    pub epsilon_high: f32,
    pub loss_type: LossType,
    pub importance_sampling_level: ImportanceSampling,
    /// Two-sided clipping (TRL's `delta`, `grpo_trainer.py:3086`): the unclipped ratio is
    /// capped at `delta` too, so a negative advantage cannot push a large ratio without bound
    /// (INTELLECT-2, arXiv 2505.07291). `None`: one-sided, as PPO.
    pub delta: Option<f32>,
    pub kl_estimator: KlEstimator,
    /// Weight of the entropy bonus (TRL's `entropy_coef`, `grpo_trainer.py:3155`): the loss
    /// minus `entropy_coef` x the
    /// mean entropy of the policy's next-token distributions over the counted tokens.
    pub entropy_coef: f32,
    /// Only tokens whose entropy is at or above this quantile of the batch's entropies carry
    /// the policy term (TRL's `top_entropy_quantile`, arXiv 2506.01939: 0.2 keeps the top 20%);
    /// 1.0 keeps every token.
    pub top_entropy_quantile: f32,
}

impl Default for LossConfig {
    /// Med-R1: beta 0.04, epsilon 0.2, grpo aggregation, token-level ratios, k3, no entropy
    /// terms.
    fn default() -> Self {
        Self {
            beta: 0.04,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            loss_type: LossType::Grpo,
            importance_sampling_level: ImportanceSampling::Token,
            delta: None,
            kl_estimator: KlEstimator::K3,
            entropy_coef: 0.0,
            top_entropy_quantile: 1.0,
        }
    }
}

/// What [`per_token_loss`] reads, `[batch, tokens]` unless said.
#[derive(Debug, Clone)]
pub struct LossInputs<B: Backend> {
    pub logp: Tensor<B, 2>,
    /// The sampling policy's log-probs (`logp` detached with one update per rollout).
    pub old_logp: Tensor<B, 2>,
    pub ref_logp: Option<Tensor<B, 2>>,
    /// `[batch]`.
    pub advantages: Tensor<B, 1>,
    /// 1 on the tokens that count (the sequence-level ratio averages over them).
    pub mask: Tensor<B, 2>,
    /// `top_entropy_quantile`'s selection ([`high_entropy_mask`]): 1 where the policy term
    /// applies. `None`: everywhere.
    pub entropy_mask: Option<Tensor<B, 2>>,
}

/// Per-token terms, `[batch, tokens]`.
#[derive(Debug, Clone)]
pub struct PerToken<B: Backend> {
    pub loss: Tensor<B, 2>,
    /// The KL estimate against the reference, when a reference is given.
    pub kl: Option<Tensor<B, 2>>,
    /// 1 where the clipped surrogate was the active one.
    pub clipped: Tensor<B, 2>,
}

/// `-min(r' A, clip(r, 1-eps_low, 1+eps_high) A) * m + beta * kl`, TRL's `_compute_loss`
/// (`trl/trainer/grpo_trainer.py`): `r = exp(logp - old_logp)` per token, or per sequence
/// (the mean log-ratio over its counted tokens) with `importance_sampling_level = sequence`;
/// `r' = min(r, delta)` with two-sided clipping, else `r`; `m` the entropy mask (1 without
/// one); `kl` the configured estimator. With one update per rollout `old_logp` is `logp`
/// detached, so `r = 1` and the gradient is `-A d logp` (Med-R1's form).
// ANCHOR: per_token_loss
pub fn per_token_loss<B: Backend>(x: LossInputs<B>, cfg: &LossConfig) -> PerToken<B> {
    let [b, t] = x.logp.dims();
    let adv = x.advantages.reshape([b, 1]).expand([b, t]);
    let log_ratio = x.logp.clone() - x.old_logp;
    let log_ratio = match cfg.importance_sampling_level {
        ImportanceSampling::Token => log_ratio,
        ImportanceSampling::Sequence => {
            let per_seq =
                (log_ratio * x.mask.clone()).sum_dim(1) / x.mask.clone().sum_dim(1).clamp_min(1.0);
            per_seq.expand([b, t])
        }
    };
    let ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp();
    let clipped_ratio = ratio
        .clone()
        .clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high);
    let low = ratio
        .clone()
        .lower_elem(1.0 - cfg.epsilon_low)
        .bool_and(adv.clone().lower_elem(0.0));
    let high = ratio
        .clone()
        .greater_elem(1.0 + cfg.epsilon_high)
        .bool_and(adv.clone().greater_elem(0.0));
    let clipped = low.float() + high.float();
    let capped = match cfg.delta {
        Some(delta) => ratio.clamp_max(delta),
        None => ratio,
    };
    let surrogate = (capped * adv.clone()).min_pair(clipped_ratio * adv);
    let mut loss = surrogate.neg();
    if let Some(m) = x.entropy_mask {
        loss = loss * m;
    }
    let kl = x.ref_logp.map(|r| kl_estimate(x.logp, r, cfg.kl_estimator));
    if let Some(kl) = &kl {
        if cfg.beta != 0.0 {
            loss = loss + kl.clone() * cfg.beta;
        }
    }
    PerToken { loss, kl, clipped }
}
// ANCHOR_END: per_token_loss

/// `top_entropy_quantile`'s selection (TRL's `get_high_entropy_mask`,
/// `grpo_trainer.py:1396`): 1 on the counted tokens
/// whose entropy is at least the `1 - top_entropy_quantile` quantile of all counted tokens'
/// entropies (linear interpolation between order statistics, as `torch.quantile`), 0
/// elsewhere. `entropies` and `mask` are row-major `[rows, width]` values.
pub fn high_entropy_mask(entropies: &[f32], mask: &[f32], top_entropy_quantile: f32) -> Vec<f32> {
    let mut counted: Vec<f32> = entropies
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m > 0.0)
        .map(|(&e, _)| e)
        .collect();
    if counted.is_empty() {
        return vec![0.0; entropies.len()];
    }
    counted.sort_by(f32::total_cmp);
    let q = (1.0 - top_entropy_quantile).clamp(0.0, 1.0) as f64;
    let pos = q * (counted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let frac = (pos - lo as f64) as f32;
    let threshold = counted[lo] + (counted[hi] - counted[lo]) * frac;
    entropies
        .iter()
        .zip(mask)
        .map(|(&e, &m)| (m > 0.0 && e * m >= threshold) as u8 as f32)
        .collect()
}

/// The weight of each counted token's entropy in the loss when `entropy_coef` is set (TRL's
/// `_compute_loss`, `grpo_trainer.py:3155-3176`): the bonus is `-entropy_coef` x the mean entropy over the `counted`
/// tokens of the micro-batch divided by the accumulation count, or for `dapo` the entropy sum
/// over the whole accumulated step's `active_tokens` (its policy term's normalizer).
pub fn entropy_weight(
    cfg: &LossConfig,
    counted: usize,
    accumulation: usize,
    active_tokens: Option<f32>,
) -> f32 {
    match (cfg.loss_type, active_tokens) {
        (LossType::Dapo, Some(a)) => cfg.entropy_coef / a.max(1.0),
        _ => cfg.entropy_coef / (counted.max(1) * accumulation.max(1)) as f32,
    }
}

/// Mean of `values` over the mask's active tokens: per sequence then over sequences (`grpo`) or
/// over all tokens.
pub fn masked_mean<B: Backend>(
    values: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    per_sequence: bool,
) -> Tensor<B, 1> {
    let masked = values * mask.clone();
    if per_sequence {
        let per_seq = masked.sum_dim(1) / mask.sum_dim(1).clamp_min(1.0);
        per_seq.mean()
    } else {
        masked.sum() / mask.sum().clamp_min(1.0)
    }
}

/// One scalar from per-token losses. `max_completion_length` (generation's limit) is
/// `dr_grpo`'s constant denominator; `active_tokens` is the number of active tokens of the
/// whole accumulated batch, used by `dapo`; `None` counts this mask's.
pub fn aggregate<B: Backend>(
    loss: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    cfg: &LossConfig,
    max_completion_length: usize,
    active_tokens: Option<f32>,
) -> Tensor<B, 1> {
    let b = loss.dims()[0];
    match cfg.loss_type {
        LossType::Grpo => masked_mean(loss, mask, true),
        LossType::Bnpo => masked_mean(loss, mask, false),
        LossType::DrGrpo => (loss * mask).sum() / (b * max_completion_length) as f32,
        LossType::Dapo => match active_tokens {
            Some(n) => (loss * mask).sum() / n.max(1.0),
            None => masked_mean(loss, mask, false),
        },
    }
}

/// Per-row weights that make [`aggregate`] a weighted sum over tokens:
/// `aggregate(loss, mask) = sum_r w_r sum_t mask_rt loss_rt`, from each row's active-token
/// count. A loss split over several passes (micro-batches of rows) adds up to the whole one
/// this way, each pass weighted by the whole batch's counts.
pub fn row_weights(
    lens: &[usize],
    cfg: &LossConfig,
    max_completion_length: usize,
    active_tokens: Option<f32>,
) -> Vec<f32> {
    let n = lens.len();
    let total = lens.iter().sum::<usize>() as f32;
    let over_tokens = 1.0 / total.max(1.0);
    match cfg.loss_type {
        LossType::Grpo => lens
            .iter()
            .map(|&l| 1.0 / (l.max(1) as f32 * n as f32))
            .collect(),
        LossType::Bnpo => vec![over_tokens; n],
        LossType::DrGrpo => vec![1.0 / (n * max_completion_length) as f32; n],
        LossType::Dapo => match active_tokens {
            Some(a) => vec![1.0 / a.max(1.0); n],
            None => vec![over_tokens; n],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;

    type B = Flex;

    fn t2(v: [[f32; 2]; 2]) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::from(v), &Default::default())
    }

    fn values(t: Tensor<B, 2>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    fn scalar(t: Tensor<B, 1>) -> f32 {
        t.into_scalar()
    }

    /// Inputs with every token counted and no entropy selection.
    fn inputs<K: Backend>(
        logp: Tensor<K, 2>,
        old_logp: Tensor<K, 2>,
        ref_logp: Option<Tensor<K, 2>>,
        advantages: Tensor<K, 1>,
    ) -> LossInputs<K> {
        let mask = logp.ones_like();
        LossInputs {
            logp,
            old_logp,
            ref_logp,
            advantages,
            mask,
            entropy_mask: None,
        }
    }

    #[test]
    fn row_weights_make_every_aggregation_a_weighted_sum() {
        let loss = t2([[0.5, -1.5], [2.0, 0.25]]);
        let mask = t2([[1.0, 1.0], [1.0, 0.0]]);
        for loss_type in [
            LossType::Grpo,
            LossType::Bnpo,
            LossType::DrGrpo,
            LossType::Dapo,
        ] {
            let cfg = LossConfig {
                loss_type,
                ..Default::default()
            };
            for active in [None, Some(7.0)] {
                let w = row_weights(&[2, 1], &cfg, 3, active);
                let by_hand = (0.5 - 1.5) * w[0] + 2.0 * w[1];
                let whole = scalar(aggregate(loss.clone(), mask.clone(), &cfg, 3, active));
                assert!(
                    (by_hand - whole).abs() < 1e-6,
                    "{loss_type:?} {active:?}: {by_hand} vs {whole}"
                );
            }
        }
        // By hand for grpo: rows of 2 and 1 tokens over 2 rows.
        let grpo = row_weights(&[2, 1], &LossConfig::default(), 3, None);
        assert_eq!(grpo, vec![0.25, 0.5]);
    }

    #[test]
    fn aggregations_by_hand() {
        // Ratio 1, no KL: per-token loss = -A. A = [1, -3]; mask [[1, 1], [1, 0]].
        let lp = t2([[-1.0, -2.0], [-0.5, -0.7]]);
        let adv = Tensor::<B, 1>::from_data(TensorData::from([1.0f32, -3.0]), &Default::default());
        let mask = t2([[1.0, 1.0], [1.0, 0.0]]);
        let cfg = |loss_type| LossConfig {
            beta: 0.0,
            loss_type,
            ..Default::default()
        };
        let pt = per_token_loss(
            inputs(lp.clone(), lp.clone(), None, adv.clone()),
            &cfg(LossType::Grpo),
        );
        assert_eq!(values(pt.loss.clone()), [-1.0, -1.0, 3.0, 3.0]);
        let agg = |loss_type, active| {
            scalar(aggregate(
                pt.loss.clone(),
                mask.clone(),
                &cfg(loss_type),
                4,
                active,
            ))
        };
        // grpo: (mean(-1, -1) + mean(3)) / 2 = 1
        assert!((agg(LossType::Grpo, None) - 1.0).abs() < 1e-6);
        // bnpo: (-1 - 1 + 3) / 3
        assert!((agg(LossType::Bnpo, None) - 1.0 / 3.0).abs() < 1e-6);
        // dr_grpo: 1 / (2 * 4)
        assert!((agg(LossType::DrGrpo, None) - 0.125).abs() < 1e-6);
        // dapo over an accumulated batch of 10 active tokens: 1 / 10
        assert!((agg(LossType::Dapo, Some(10.0)) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn k3_kl_by_hand() {
        // logp = ln 0.5, ref = ln 0.25: d = -ln 2, kl = 0.5 + ln 2 - 1 = 0.193147.
        let lp = t2([[0.5f32.ln(), 0.5f32.ln()], [0.5f32.ln(), 0.5f32.ln()]]);
        let rf = t2([[0.25f32.ln(), 0.5f32.ln()], [0.25f32.ln(), 0.5f32.ln()]]);
        let adv = Tensor::<B, 1>::zeros([2], &Default::default());
        let cfg = LossConfig {
            beta: 0.04,
            ..Default::default()
        };
        let pt = per_token_loss(inputs(lp.clone(), lp, Some(rf), adv), &cfg);
        let kl = values(pt.kl.unwrap());
        assert!(
            (kl[0] - 0.193_147).abs() < 1e-5 && kl[1].abs() < 1e-7,
            "{kl:?}"
        );
        let loss = values(pt.loss);
        assert!((loss[0] - 0.04 * 0.193_147).abs() < 1e-6, "{loss:?}");
    }

    #[test]
    fn every_kl_estimator_by_hand() {
        // logp = ln 0.5, ref = ln 0.25: d = ref - logp = -ln 2; and d = 3 in the second column.
        let lp = t2([[0.5f32.ln(), 0.0], [0.5f32.ln(), 0.0]]);
        let rf = t2([[0.25f32.ln(), 3.0], [0.25f32.ln(), 3.0]]);
        let ln2 = std::f32::consts::LN_2;
        let k3_of_3 = 3f32.exp() - 4.0; // 16.0855
        for (estimator, small, large) in [
            (KlEstimator::K1, ln2, -3.0),
            (KlEstimator::Abs, ln2, 3.0),
            (KlEstimator::K2, 0.5 * ln2 * ln2, 4.5),
            (KlEstimator::K3, 0.5 + ln2 - 1.0, k3_of_3),
            (KlEstimator::LowVarKl, 0.5 + ln2 - 1.0, 10.0),
        ] {
            let kl = values(kl_estimate(lp.clone(), rf.clone(), estimator));
            assert!(
                (kl[0] - small).abs() < 1e-5 && (kl[1] - large).abs() < 1e-4,
                "{estimator:?}: {kl:?}"
            );
        }
    }

    #[test]
    fn sequence_level_ratios_by_hand() {
        // Log-ratios [0.3, 0.1] (A = +1) and [0.5, masked] (A = -1), eps 0.2.
        let old = t2([[0.0, 0.0], [0.0, 0.0]]);
        let lp = t2([[0.3, 0.1], [0.5, 7.0]]);
        let adv = Tensor::<B, 1>::from_data(TensorData::from([1.0f32, -1.0]), &Default::default());
        let mask = t2([[1.0, 1.0], [1.0, 0.0]]);
        let run = |level| {
            let cfg = LossConfig {
                beta: 0.0,
                importance_sampling_level: level,
                ..Default::default()
            };
            let x = LossInputs {
                mask: mask.clone(),
                ..inputs(lp.clone(), old.clone(), None, adv.clone())
            };
            values(per_token_loss(x, &cfg).loss)
        };
        // Token level: min(e^0.3 = 1.35, 1.2) = 1.2 and e^0.1 = 1.105 for row 0; row 1 e^0.5.
        let token = run(ImportanceSampling::Token);
        assert!((token[0] + 1.2).abs() < 1e-5 && (token[1] + 0.1f32.exp()).abs() < 1e-5);
        // Sequence level: row 0 mean 0.2, e^0.2 = 1.221 clipped to 1.2 on both tokens; row 1
        // the mean over its one counted token, e^0.5 = 1.649, unclipped for A < 0.
        let seq = run(ImportanceSampling::Sequence);
        assert!(
            (seq[0] + 1.2).abs() < 1e-5 && (seq[1] + 1.2).abs() < 1e-5,
            "{seq:?}"
        );
        assert!((seq[2] - 0.5f32.exp()).abs() < 1e-5, "{seq:?}");
    }

    #[test]
    fn two_sided_clipping_by_hand() {
        // Ratio 3, eps 0.2. A = -1: -min(-3, -1.2) = 3 one-sided, -min(-2, -1.2) = 2 with
        // delta 2. A = +1: -min(2, 1.2) = -1.2 either way.
        let lp = t2([[3f32.ln(); 2]; 2]);
        let old = t2([[0.0; 2]; 2]);
        let adv = Tensor::<B, 1>::from_data(TensorData::from([1.0f32, -1.0]), &Default::default());
        let run = |delta| {
            let cfg = LossConfig {
                beta: 0.0,
                delta,
                ..Default::default()
            };
            values(per_token_loss(inputs(lp.clone(), old.clone(), None, adv.clone()), &cfg).loss)
        };
        let one = run(None);
        let two = run(Some(2.0));
        assert!(
            (one[2] - 3.0).abs() < 1e-5 && (two[2] - 2.0).abs() < 1e-5,
            "{two:?}"
        );
        assert!((one[0] + 1.2).abs() < 1e-5 && (two[0] + 1.2).abs() < 1e-5);
    }

    #[test]
    fn high_entropy_selection_by_hand() {
        // Counted entropies 0.1, 0.5, 0.9 (the fourth is masked out).
        let e = [0.1, 0.5, 0.9, 0.3];
        let m = [1.0, 1.0, 1.0, 0.0];
        // Top half: the median, 0.5.
        assert_eq!(high_entropy_mask(&e, &m, 0.5), [0.0, 1.0, 1.0, 0.0]);
        // Top 20%: the 0.8 quantile, 0.5 + 0.6 x 0.4 = 0.74 (torch.quantile's interpolation).
        assert_eq!(high_entropy_mask(&e, &m, 0.2), [0.0, 0.0, 1.0, 0.0]);
        assert_eq!(high_entropy_mask(&e, &m, 1.0), [1.0, 1.0, 1.0, 0.0]);
        assert_eq!(high_entropy_mask(&e, &[0.0; 4], 0.5), [0.0; 4]);
        // The selection removes the policy term, not the KL term.
        let lp = t2([[0.5f32.ln(); 2]; 2]);
        let rf = t2([[0.25f32.ln(); 2]; 2]);
        let adv = Tensor::<B, 1>::from_data(TensorData::from([1.0f32, 1.0]), &Default::default());
        let x = LossInputs {
            entropy_mask: Some(t2([[1.0, 0.0], [1.0, 0.0]])),
            ..inputs(lp.clone(), lp, Some(rf), adv)
        };
        let loss = values(per_token_loss(x, &LossConfig::default()).loss);
        let kl = 0.04 * (0.5 + std::f32::consts::LN_2 - 1.0);
        assert!(
            (loss[0] - (kl - 1.0)).abs() < 1e-6 && (loss[1] - kl).abs() < 1e-6,
            "{loss:?}"
        );
    }

    #[test]
    fn entropy_weights_by_hand() {
        let cfg = |loss_type| LossConfig {
            entropy_coef: 0.1,
            loss_type,
            ..Default::default()
        };
        // grpo: 0.1 / (5 counted x 2 accumulated); dapo: 0.1 / the step's 20 tokens.
        assert!((entropy_weight(&cfg(LossType::Grpo), 5, 2, None) - 0.01).abs() < 1e-9);
        assert!((entropy_weight(&cfg(LossType::Dapo), 5, 2, Some(20.0)) - 0.005).abs() < 1e-9);
        assert!((entropy_weight(&cfg(LossType::Dapo), 5, 2, None) - 0.01).abs() < 1e-9);
    }

    #[test]
    fn clipping_by_hand() {
        // Ratio 1.5, eps 0.2: A = +1 -> min(1.5, 1.2) = 1.2 (clipped); A = -1 -> min(-1.5, -1.2) = -1.5.
        let lp = t2([[0.0, 0.0], [0.0, 0.0]]);
        let old = t2([[-(1.5f32.ln()); 2]; 2]);
        let adv = Tensor::<B, 1>::from_data(TensorData::from([1.0f32, -1.0]), &Default::default());
        let cfg = LossConfig {
            beta: 0.0,
            ..Default::default()
        };
        let pt = per_token_loss(inputs(lp, old, None, adv), &cfg);
        let loss = values(pt.loss);
        assert!(
            (loss[0] + 1.2).abs() < 1e-5 && (loss[2] - 1.5).abs() < 1e-5,
            "{loss:?}"
        );
        assert_eq!(values(pt.clipped), [1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn huge_log_ratios_stay_finite() {
        let lp = t2([[0.0, -1e4], [1e4, 0.0]]);
        let old = t2([[-1e4, 0.0], [0.0, 1e4]]);
        let adv = Tensor::<B, 1>::from_data(TensorData::from([1.0f32, -1.0]), &Default::default());
        let pt = per_token_loss(
            inputs(lp.clone(), old, Some(lp.neg()), adv),
            &LossConfig::default(),
        );
        assert!(values(pt.loss).iter().all(|v| v.is_finite()));
    }

    #[test]
    fn gradient_is_minus_advantage_over_token_count() {
        type Ad = Autodiff<Flex>;
        let device = Default::default();
        let lp =
            Tensor::<Ad, 2>::from_data(TensorData::from([[-1.0f32, -2.0], [-0.5, -0.7]]), &device)
                .require_grad();
        let adv = Tensor::<Ad, 1>::from_data(TensorData::from([1.0f32, -3.0]), &device);
        let mask =
            Tensor::<Ad, 2>::from_data(TensorData::from([[1.0f32, 1.0], [1.0, 0.0]]), &device);
        let cfg = LossConfig {
            beta: 0.0,
            ..Default::default()
        };
        let pt = per_token_loss(inputs(lp.clone(), lp.clone().detach(), None, adv), &cfg);
        let grads = aggregate(pt.loss, mask, &cfg, 2, None).backward();
        let g: Vec<f32> = lp.grad(&grads).unwrap().into_data().to_vec().unwrap();
        // d/dlogp of mean_seq(mean_tok(-A r)) at r = 1: -A / (tokens in row) / rows.
        let want = [-0.25, -0.25, 1.5, 0.0];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{g:?}");
        }
    }
}
