//! One GRPO iteration: roll out a group of completions per prompt on the inference backend,
//! reward each against its own record, compute group advantages, then update the policy with
//! the clipped surrogate and the KL penalty to a frozen reference.

mod clip;
mod finite;

pub use clip::clip_global_norm;
pub use finite::weights_finite;

use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{
    backend::AutodiffBackend, backend::Backend, ElementConversion, Tensor, TensorData,
};
use medvqa::VqaRecord;
use qwen2vl::generation::{
    generate_grouped, GenerationConfig, Sampling, ScoringBatch, ShapeBuckets,
};
use qwen2vl::processor::{ProcessedImage, TextTokenizer};
use qwen2vl::{Images, Qwen2VL, Qwen2VLError, TokenBatch};

use crate::advantages::{group_advantages, zero_std_fraction, ScaleRewards};
use crate::loss::{aggregate, masked_mean, per_token_loss, LossConfig};
use crate::mask::batch_mask;
use crate::rewards::WeightedRewards;

/// One prompt, ready for the model: token ids, its processed images, its record.
#[derive(Debug, Clone)]
pub struct PromptInput {
    pub text: String,
    pub ids: Vec<u32>,
    /// The prompt's images in the order of their placeholders.
    pub images: Vec<ProcessedImage>,
    pub record: VqaRecord,
}

/// The learner's settings; defaults are Med-R1's.
#[derive(Debug, Clone)]
pub struct GrpoConfig {
    pub num_generations: usize,
    pub sampling: Sampling,
    pub max_completion_length: usize,
    pub loss: LossConfig,
    pub scale_rewards: ScaleRewards,
    pub mask_truncated_completions: bool,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
    /// Updates per rollout (TRL's `num_iterations`); above 1 the rollout keeps the sampling
    /// policy's log-probs and the clipped ratio becomes active.
    pub num_iterations: usize,
    /// Prompt and completion widths are padded (masked) to multiples of this, so that steps
    /// share tensor shapes: on CubeCL backends every new shape compiles kernels. 1: exact.
    pub shape_bucket: usize,
    /// Group-shared compute: each prompt and its images run once per group, in the rollout
    /// (one prefill, its KV cache forked to the group's samples) and in every scoring pass
    /// (the completions scored against the prompt's keys and values). The same results as
    /// repeating the prompt per completion, as every other trainer does (`false`), up to
    /// float rounding.
    pub share_prompt: bool,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            num_generations: 4,
            sampling: Sampling {
                temperature: 1.0,
                top_k: 50,
                top_p: 1.0,
            },
            max_completion_length: 256,
            loss: LossConfig::default(),
            scale_rewards: ScaleRewards::Group,
            mask_truncated_completions: false,
            eos_token_ids: vec![151645, 151643],
            pad_token_id: 151643,
            num_iterations: 1,
            shape_bucket: 1,
            share_prompt: true,
        }
    }
}

impl GrpoConfig {
    /// The padding of scoring batches: multiples of `shape_bucket`, never past the longest
    /// completion generation can produce.
    pub fn buckets(&self) -> ShapeBuckets {
        ShapeBuckets {
            multiple: self.shape_bucket,
            max_completion: self.max_completion_length,
        }
    }
}

/// A group of completions per prompt with their rewards and advantages, and the batch every
/// scoring pass over them reads (on the backend the rollout ran on).
#[derive(Debug, Clone)]
pub struct Rollout<B: Backend> {
    /// Prompt index of each completion (completions come group after group).
    pub prompt_of: Vec<usize>,
    pub completions: Vec<Vec<u32>>,
    pub texts: Vec<String>,
    /// The completion tokens that count, as wide as the longest completion.
    pub masks: Vec<Vec<bool>>,
    pub rewards: Vec<f32>,
    pub per_reward: Vec<(String, Vec<f32>)>,
    pub advantages: Vec<f32>,
    pub batch: StepBatch<B>,
    /// Log-probs of the completions under the sampling policy, `[rows, batch width]`, kept
    /// when `num_iterations > 1`.
    pub old_logprobs: Option<Tensor<B, 2>>,
}

/// A rollout's scoring inputs, built once when it is made and read by every pass over it
/// (the sampling policy's log-probs, the policy, the reference, each of `num_iterations`
/// updates): the token layout (each prompt once per group when shared, completions padded to
/// their bucket), the prompts' images on the device once, the mask and the advantages.
#[derive(Debug, Clone)]
pub struct StepBatch<B: Backend> {
    pub tokens: ScoringBatch,
    /// The images of the layout's prompt rows.
    pub images: Option<Images<B>>,
    /// `[rows, width]`: 1 on the completion tokens that count.
    pub mask: Tensor<B, 2>,
    /// `[rows]`.
    pub advantages: Tensor<B, 1>,
}

impl<B: Backend> StepBatch<B> {
    /// Per-token log-probs (and entropies) of the completions under `model`, `[rows, width]`.
    fn score(
        &self,
        model: &Qwen2VL<B>,
        with_entropy: bool,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 2>>), Qwen2VLError> {
        self.tokens.score(model, self.images.as_ref(), with_entropy)
    }
}

/// What one optimizer step applies (a hosted run takes them from its learning-rate schedule
/// and [`crate::host::HostOptions`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSize {
    pub learning_rate: f64,
    /// Global gradient-norm clip.
    pub max_grad_norm: f32,
}

/// What one step measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    pub loss: f32,
    pub reward_mean: f32,
    pub reward_std: f32,
    pub per_reward_mean: Vec<(String, f32)>,
    pub kl: f32,
    pub clip_ratio: f32,
    /// Mean entropy of the policy's next-token distributions over completion tokens.
    pub entropy: f32,
    pub completion_len_mean: f32,
    pub completion_len_min: usize,
    pub completion_len_max: usize,
    pub completion_tokens: usize,
    pub zero_std_groups: f32,
    pub grad_norm: f32,
}

/// The images of `prompts`, concatenated in order, on `device` ([`Images::from_processed`]).
pub fn images_of<B: Backend>(
    prompts: &[&PromptInput],
    device: &B::Device,
) -> Result<Option<Images<B>>, Qwen2VLError> {
    Images::from_processed(prompts.iter().flat_map(|p| &p.images), device)
}

/// Samples `num_generations` completions per prompt on an inference model and scores them.
pub fn rollout<B: Backend>(
    model: &Qwen2VL<B>,
    prompts: &[PromptInput],
    tokenizer: &TextTokenizer,
    rewards: &WeightedRewards,
    cfg: &GrpoConfig,
    seed: u64,
    device: &B::Device,
) -> Result<Rollout<B>, Qwen2VLError> {
    let g = cfg.num_generations;
    let repeated: Vec<&PromptInput> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, g))
        .collect();
    let gen_cfg = GenerationConfig {
        max_new_tokens: cfg.max_completion_length,
        sampling: cfg.sampling,
        eos_token_ids: cfg.eos_token_ids.clone(),
        pad_token_id: cfg.pad_token_id,
        seed,
        buckets: cfg.buckets(),
    };
    // Each prompt once per group (shared) or once per completion; the same rows and images
    // serve generation and every scoring pass.
    let (rows, group): (Vec<&PromptInput>, usize) = if cfg.share_prompt {
        (prompts.iter().collect(), g)
    } else {
        (repeated.clone(), 1)
    };
    let prompt_ids: Vec<Vec<u32>> = rows.iter().map(|p| p.ids.clone()).collect();
    let images = images_of::<B>(&rows, device)?;
    let batch = TokenBatch::left_padded(&prompt_ids, cfg.pad_token_id);
    let out = generate_grouped(model, &batch, images.as_ref(), group, &gen_cfg, false)?;
    let texts: Vec<String> = out
        .tokens
        .iter()
        .map(|t| tokenizer.decode(t, true).unwrap_or_default())
        .collect();
    let prompt_texts: Vec<String> = repeated.iter().map(|p| p.text.clone()).collect();
    let records: Vec<&VqaRecord> = repeated.iter().map(|p| &p.record).collect();
    let scores = rewards.score(&prompt_texts, &texts, &records);
    let advantages = group_advantages(&scores.total, g, cfg.scale_rewards);
    let width = out.tokens.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let masks = batch_mask(
        &out.tokens,
        &cfg.eos_token_ids,
        cfg.mask_truncated_completions,
        width,
    );
    // Empty completions (an immediate stop) still take one slot to be scored.
    let completions: Vec<Vec<u32>> = out
        .tokens
        .iter()
        .map(|c| {
            if c.is_empty() {
                vec![cfg.pad_token_id]
            } else {
                c.clone()
            }
        })
        .collect();
    let tokens = ScoringBatch::new(
        &prompt_ids,
        &completions,
        group,
        cfg.pad_token_id,
        cfg.buckets(),
    )?;
    let (n, t) = (tokens.rows(), tokens.width());
    let mask_values: Vec<f32> = masks
        .iter()
        .flat_map(|m| (0..t).map(move |i| f32::from(u8::from(m.get(i) == Some(&true)))))
        .collect();
    let step = StepBatch {
        mask: Tensor::from_data(TensorData::new(mask_values, [n, t]), device),
        advantages: Tensor::from_data(TensorData::new(advantages.clone(), [n]), device),
        images,
        tokens,
    };
    let old_logprobs = if cfg.num_iterations > 1 {
        Some(step.score(model, false)?.0)
    } else {
        None
    };
    Ok(Rollout {
        old_logprobs,
        prompt_of: (0..repeated.len()).map(|i| i / g).collect(),
        masks,
        completions: out.tokens,
        texts,
        rewards: scores.total,
        per_reward: scores.per_reward,
        advantages,
        batch: step,
    })
}

/// The GRPO loss of a rollout (differentiable) and what it measured; `grad_norm` is left 0
/// for the caller that takes the gradient step. The rollout was made on the policy's inner
/// backend (its tensors are read without a copy).
pub fn policy_loss<B: AutodiffBackend>(
    policy: &Qwen2VL<B>,
    reference: Option<&Qwen2VL<B::InnerBackend>>,
    roll: &Rollout<B::InnerBackend>,
    cfg: &GrpoConfig,
) -> Result<(Tensor<B, 1>, StepMetrics), Qwen2VLError> {
    let n = roll.completions.len();
    let batch = &roll.batch;
    // The rollout's tensors, read by the policy through the autodiff wrapper (no copy).
    let images = batch.images.clone().map(Images::into_autodiff);
    let mask = Tensor::<B, 2>::from_inner(batch.mask.clone());
    let (logp, entropy) = batch.tokens.score(policy, images.as_ref(), true)?;
    let ref_logp = match (reference, cfg.loss.beta != 0.0) {
        (Some(r), true) => Some(Tensor::<B, 2>::from_inner(batch.score(r, false)?.0)),
        _ => None,
    };
    let old = match &roll.old_logprobs {
        Some(v) => Tensor::from_inner(v.clone()),
        None => logp.clone().detach(),
    };
    let adv = Tensor::from_inner(batch.advantages.clone());
    let pt = per_token_loss(logp, old, ref_logp, adv, &cfg.loss);
    let loss = aggregate(
        pt.loss,
        mask.clone(),
        &cfg.loss,
        cfg.max_completion_length,
        None,
    );
    let scalar = |x: Tensor<B, 1>| x.into_scalar().elem::<f32>();
    let kl = pt
        .kl
        .map(|k| scalar(masked_mean(k.detach(), mask.clone(), true)))
        .unwrap_or(0.0);
    let entropy = entropy
        .map(|e| scalar(masked_mean(e, mask.clone(), true)))
        .unwrap_or(0.0);
    let clip_ratio = scalar(masked_mean(pt.clipped.detach(), mask, false));
    let lens: Vec<usize> = roll
        .masks
        .iter()
        .map(|m| m.iter().filter(|&&b| b).count())
        .collect();
    let mean = roll.rewards.iter().sum::<f32>() / n as f32;
    let metrics = StepMetrics {
        loss: scalar(loss.clone().detach()),
        reward_mean: mean,
        reward_std: crate::advantages::std_unbiased(&roll.rewards),
        per_reward_mean: roll
            .per_reward
            .iter()
            .map(|(name, v)| (name.clone(), v.iter().sum::<f32>() / v.len().max(1) as f32))
            .collect(),
        kl,
        clip_ratio,
        entropy,
        completion_len_mean: lens.iter().sum::<usize>() as f32 / n as f32,
        completion_len_min: lens.iter().copied().min().unwrap_or(0),
        completion_len_max: lens.iter().copied().max().unwrap_or(0),
        completion_tokens: lens.iter().sum(),
        zero_std_groups: zero_std_fraction(&roll.rewards, cfg.num_generations),
        grad_norm: 0.0,
    };
    Ok((loss, metrics))
}

/// The gradients of a rollout's GRPO loss divided by `accumulation` (the micro-batches of one
/// optimizer step), and what the step measured (`loss` undivided, `grad_norm` left 0): the one
/// step computation of the hosted run, [`update`], the benches and the examples.
pub fn policy_gradients<B: AutodiffBackend>(
    policy: &Qwen2VL<B>,
    reference: Option<&Qwen2VL<B::InnerBackend>>,
    roll: &Rollout<B::InnerBackend>,
    cfg: &GrpoConfig,
    accumulation: usize,
) -> Result<(GradientsParams, StepMetrics), Qwen2VLError> {
    let (loss, metrics) = policy_loss(policy, reference, roll, cfg)?;
    let loss = if accumulation > 1 {
        loss.div_scalar(accumulation as f32)
    } else {
        loss
    };
    Ok((
        GradientsParams::from_grads(loss.backward(), policy),
        metrics,
    ))
}

/// One optimizer step on a rollout (one update per rollout: the ratio is 1 and clipping is
/// inactive, as in Med-R1): [`policy_gradients`], global-norm clipping, the optimizer.
pub fn update<B: AutodiffBackend, O: Optimizer<Qwen2VL<B>, B>>(
    policy: Qwen2VL<B>,
    reference: Option<&Qwen2VL<B::InnerBackend>>,
    optimizer: &mut O,
    roll: &Rollout<B::InnerBackend>,
    cfg: &GrpoConfig,
    size: StepSize,
) -> Result<(Qwen2VL<B>, StepMetrics), Qwen2VLError> {
    let (mut grads, mut metrics) = policy_gradients(&policy, reference, roll, cfg, 1)?;
    metrics.grad_norm = clip_global_norm(&policy, &mut grads, size.max_grad_norm);
    let policy = optimizer.step(size.learning_rate, policy, grads);
    Ok((policy, metrics))
}
