//! Group-relative advantages: each completion's reward against the other completions of the
//! same prompt.

use serde::{Deserialize, Serialize};

/// Added to the standard deviation before dividing (Med-R1 / TRL).
pub const STD_EPS: f32 = 1e-4;

/// How rewards are scaled after the group mean is subtracted (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    /// Divide by the group's std (Med-R1's default).
    #[default]
    Group,
    /// Divide by the std of the whole batch.
    Batch,
    /// Do not divide (Dr. GRPO).
    None,
}

/// Bessel-corrected standard deviation (`torch.std`'s default); 0 for fewer than 2 values.
pub fn std_unbiased(xs: &[f32]) -> f32 {
    if xs.len() < 2 {
        return 0.0;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    var.sqrt() as f32
}

/// `(r - mean_group) / (std + 1e-4)` for rewards laid out group after group (`group_size`
/// completions per prompt).
pub fn group_advantages(rewards: &[f32], group_size: usize, scale: ScaleRewards) -> Vec<f32> {
    assert!(
        group_size > 0 && rewards.len().is_multiple_of(group_size),
        "{} rewards do not split into groups of {group_size}",
        rewards.len()
    );
    let batch_std = std_unbiased(rewards);
    rewards
        .chunks(group_size)
        .flat_map(|g| {
            let mean = g.iter().sum::<f32>() / g.len() as f32;
            let std = match scale {
                ScaleRewards::Group => std_unbiased(g),
                ScaleRewards::Batch => batch_std,
                ScaleRewards::None => 0.0,
            };
            g.iter().map(move |&r| match scale {
                ScaleRewards::None => r - mean,
                _ => (r - mean) / (std + STD_EPS),
            })
        })
        .collect()
}

/// `scale_rewards = "batch"` over the rollouts of one step: each group's mean subtracted, the
/// standard deviation of every reward of the step divided by; the result per rollout, as
/// [`group_advantages`] gives it for all the rewards in one batch.
pub fn step_advantages(rollouts: &[&[f32]], group_size: usize) -> Vec<Vec<f32>> {
    let all: Vec<f32> = rollouts.iter().flat_map(|r| r.iter().copied()).collect();
    let std = std_unbiased(&all);
    rollouts
        .iter()
        .map(|rewards| {
            rewards
                .chunks(group_size)
                .flat_map(|g| {
                    let mean = g.iter().sum::<f32>() / g.len() as f32;
                    g.iter().map(move |&r| (r - mean) / (std + STD_EPS))
                })
                .collect()
        })
        .collect()
}

/// Fraction of groups whose rewards are all equal (they carry no learning signal).
pub fn zero_std_fraction(rewards: &[f32], group_size: usize) -> f32 {
    let groups: Vec<&[f32]> = rewards.chunks(group_size).collect();
    let zero = groups
        .iter()
        .filter(|g| g.iter().all(|&r| r == g[0]))
        .count();
    zero as f32 / groups.len().max(1) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_scaling_by_hand() {
        // Group 1: [2, 0, 1, 1] -> mean 1, sample std sqrt(2/3) = 0.81650.
        // Group 2: all 1 -> zero advantages.
        let a = group_advantages(
            &[2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            4,
            ScaleRewards::Group,
        );
        let s = (2.0f32 / 3.0).sqrt() + 1e-4;
        let want = [1.0 / s, -1.0 / s, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        for (x, y) in a.iter().zip(want) {
            assert!((x - y).abs() < 1e-5, "{a:?}");
        }
    }

    #[test]
    fn batch_and_none_scaling_by_hand() {
        // Rewards [1, 0 | 2, 2]: batch mean 1.25, batch sample std = sqrt(2.75/3) = 0.95743.
        let r = [1.0, 0.0, 2.0, 2.0];
        let b = group_advantages(&r, 2, ScaleRewards::Batch);
        let s = (2.75f32 / 3.0).sqrt() + 1e-4;
        assert!(
            (b[0] - 0.5 / s).abs() < 1e-5 && (b[1] + 0.5 / s).abs() < 1e-5 && b[2] == 0.0,
            "{b:?}"
        );
        assert_eq!(
            group_advantages(&r, 2, ScaleRewards::None),
            vec![0.5, -0.5, 0.0, 0.0]
        );
        assert_eq!(zero_std_fraction(&r, 2), 0.5);
    }

    #[test]
    fn a_steps_batch_scaling_spans_its_rollouts() {
        // Two rollouts [1, 0] and [2, 2]: the step's std is the batch's above.
        let split = step_advantages(&[&[1.0, 0.0], &[2.0, 2.0]], 2);
        let whole = group_advantages(&[1.0, 0.0, 2.0, 2.0], 2, ScaleRewards::Batch);
        assert_eq!(split.concat(), whole);
        // Each rollout's own std would differ: [1, 0] alone has std 0.7071.
        let alone = group_advantages(&[1.0, 0.0], 2, ScaleRewards::Batch);
        assert!((alone[0] - split[0][0]).abs() > 0.1);
    }
}
