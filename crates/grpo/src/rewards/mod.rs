//! Rule-based rewards. A reward scores one completion against its own prompt and record;
//! Med-R1 sums a format reward and an accuracy reward. Users add their own by implementing
//! [`Reward`].

mod accuracy;
mod format;

pub use accuracy::{extract_answer, extract_letter, AccuracyReward, LetterAccuracyReward};
pub use format::FormatReward;

use medvqa::VqaRecord;

// ANCHOR: reward_trait
pub trait Reward: Send + Sync {
    /// Name used in metrics (`reward/<name>`).
    fn name(&self) -> &str;

    fn score(&self, prompt: &str, completion: &str, record: &VqaRecord) -> f32;
    // ANCHOR_END: reward_trait

    /// Scores a batch; `records[i]` is the record completion `i` was generated for.
    fn score_batch(
        &self,
        prompts: &[String],
        completions: &[String],
        records: &[&VqaRecord],
    ) -> Vec<f32> {
        prompts
            .iter()
            .zip(completions)
            .zip(records)
            .map(|((p, c), r)| self.score(p, c, r))
            .collect()
    }
}

/// Rewards with weights (TRL's `reward_weights`); the total is the weighted sum.
pub struct WeightedRewards {
    pub rewards: Vec<(Box<dyn Reward>, f32)>,
}

/// Each reward's scores and the weighted totals.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub per_reward: Vec<(String, Vec<f32>)>,
    pub total: Vec<f32>,
}

impl WeightedRewards {
    /// Med-R1's: format (think or no-think pattern) + accuracy, weight 1 each.
    pub fn med_r1(think: bool) -> Self {
        Self {
            rewards: vec![
                (Box::new(FormatReward::new(think)), 1.0),
                (Box::new(AccuracyReward), 1.0),
            ],
        }
    }

    pub fn score(
        &self,
        prompts: &[String],
        completions: &[String],
        records: &[&VqaRecord],
    ) -> Scores {
        let mut total = vec![0.0; completions.len()];
        let mut per_reward = Vec::with_capacity(self.rewards.len());
        for (reward, weight) in &self.rewards {
            let s = reward.score_batch(prompts, completions, records);
            for (t, v) in total.iter_mut().zip(&s) {
                *t += weight * v;
            }
            per_reward.push((reward.name().to_string(), s));
        }
        Scores { per_reward, total }
    }
}
