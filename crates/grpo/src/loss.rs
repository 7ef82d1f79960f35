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

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    /// KL penalty weight (0 disables the reference model).
    pub beta: f32,
    pub epsilon_low: f32,
    pub epsilon_high: f32,
    pub loss_type: LossType,
}

impl Default for LossConfig {
    /// Med-R1: beta 0.04, epsilon 0.2, grpo aggregation.
    fn default() -> Self {
        Self {
            beta: 0.04,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            loss_type: LossType::Grpo,
        }
    }
}

/// Per-token terms, `[batch, tokens]`.
#[derive(Debug, Clone)]
pub struct PerToken<B: Backend> {
    pub loss: Tensor<B, 2>,
    /// k3 estimate of KL(policy || reference), when a reference is given.
    pub kl: Option<Tensor<B, 2>>,
    /// 1 where the clipped surrogate was the active one.
    pub clipped: Tensor<B, 2>,
}

/// `-min(r A, clip(r, 1-eps_low, 1+eps_high) A) + beta * kl`, with `r = exp(logp - old_logp)`
/// and `kl = exp(ref - logp) - (ref - logp) - 1`. With one update per rollout `old_logp` is
/// `logp` detached, so `r = 1` and the gradient is `-A d logp` (Med-R1's form).
// ANCHOR: per_token_loss
pub fn per_token_loss<B: Backend>(
    logp: Tensor<B, 2>,
    old_logp: Tensor<B, 2>,
    ref_logp: Option<Tensor<B, 2>>,
    advantages: Tensor<B, 1>,
    cfg: &LossConfig,
) -> PerToken<B> {
    let [b, t] = logp.dims();
    let adv = advantages.reshape([b, 1]).expand([b, t]);
    let ratio = (logp.clone() - old_logp)
        .clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        .exp();
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
    let surrogate = (ratio * adv.clone()).min_pair(clipped_ratio * adv);
    let mut loss = surrogate.neg();
    let kl = ref_logp.map(|r| {
        let d = (r - logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO);
        d.clone().exp() - d - 1.0
    });
    if let Some(kl) = &kl {
        if cfg.beta != 0.0 {
            loss = loss + kl.clone() * cfg.beta;
        }
    }
    PerToken { loss, kl, clipped }
}
// ANCHOR_END: per_token_loss

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
            lp.clone(),
            lp.clone(),
            None,
            adv.clone(),
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
        let pt = per_token_loss(lp.clone(), lp, Some(rf), adv, &cfg);
        let kl = values(pt.kl.unwrap());
        assert!(
            (kl[0] - 0.193_147).abs() < 1e-5 && kl[1].abs() < 1e-7,
            "{kl:?}"
        );
        let loss = values(pt.loss);
        assert!((loss[0] - 0.04 * 0.193_147).abs() < 1e-6, "{loss:?}");
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
        let pt = per_token_loss(lp, old, None, adv, &cfg);
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
        let pt = per_token_loss(lp.clone(), old, Some(lp.neg()), adv, &LossConfig::default());
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
        let pt = per_token_loss(lp.clone(), lp.clone().detach(), None, adv, &cfg);
        let grads = aggregate(pt.loss, mask, &cfg, 2, None).backward();
        let g: Vec<f32> = lp.grad(&grads).unwrap().into_data().to_vec().unwrap();
        // d/dlogp of mean_seq(mean_tok(-A r)) at r = 1: -A / (tokens in row) / rows.
        let want = [-0.25, -0.25, 1.5, 0.0];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{g:?}");
        }
    }
}
