//! GRPO for vision-language models: the RL math as small pure functions (advantages, masks,
//! per-token losses and their aggregation), rule-based rewards, and the learner that drives
//! rollouts and updates.

pub mod advantages;
pub mod eval;
pub mod host;
pub mod learner;
pub mod loss;
pub mod mask;
pub mod nodes;
pub mod optim;
pub mod prompt;
pub mod rewards;
pub mod schedule;
pub mod sft;
pub mod stream;

pub use advantages::{group_advantages, zero_std_fraction, ScaleRewards};
pub use loss::{
    aggregate, entropy_weight, high_entropy_mask, kl_estimate, per_token_loss, ImportanceSampling,
    KlEstimator, LossConfig, LossInputs, LossType,
};
pub use mask::completion_mask;
pub use rewards::{AccuracyReward, FormatReward, LetterAccuracyReward, Reward, WeightedRewards};
