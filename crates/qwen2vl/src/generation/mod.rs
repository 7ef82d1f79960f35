//! Rollouts: KV-cached sampling with per-token log-probs, and teacher-forced scoring.

mod blocks;
mod generate;
mod head;
mod pick;
mod sampling;
mod scoring;

pub use blocks::{Recompute, Tape};
pub use generate::{generate, generate_grouped, Generation, GenerationConfig, CACHE_BUCKET};
pub use head::{chunked_backward, chunked_scores, HeadScores, HeadWeight};
pub use pick::{log_sum_exp, pick, sample_sorted, Picked};
pub use sampling::{argmax, log_softmax_at, sample, Rng, Sampling};
pub use scoring::{
    completion_logprobs, completion_scores, completion_scores_bucketed, grouped_completion_scores,
    prompt_completion_batch, prompt_completion_batch_bucketed, round_up, ScoringBatch,
    ShapeBuckets,
};
