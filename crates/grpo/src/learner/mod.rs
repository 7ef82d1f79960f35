//! One GRPO iteration: roll out a group of completions per prompt on the inference backend,
//! reward each against its own record, compute group advantages, then update the policy with
//! the clipped surrogate and the KL penalty to a frozen reference.

mod clip;
mod finite;

pub use clip::clip_global_norm;
pub use finite::weights_finite;

use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{backend::AutodiffBackend, backend::Backend, Tensor, TensorData};
use medvqa::VqaRecord;
use qwen2vl::generation::{
    completion_scores_bucketed, generate_grouped, grouped_completion_scores, GenerationConfig,
    Sampling, ShapeBuckets,
};
use qwen2vl::processor::TextTokenizer;
use qwen2vl::{Images, Qwen2VL, Qwen2VLError, TokenBatch};

use crate::advantages::{group_advantages, zero_std_fraction, ScaleRewards};
use crate::loss::{aggregate, masked_mean, per_token_loss, LossConfig};
use crate::mask::batch_mask;
use crate::rewards::WeightedRewards;

/// One prompt, ready for the model: token ids, its images' patches and grids, its record.
#[derive(Debug, Clone)]
pub struct PromptInput {
    pub text: String,
    pub ids: Vec<u32>,
    /// `[patches, patch_dim]` row-major, all images of the prompt.
    pub pixels: Vec<f32>,
    pub grids: Vec<[usize; 3]>,
    pub patch_dim: usize,
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
    pub learning_rate: f64,
    pub max_grad_norm: f32,
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
            learning_rate: 1e-6,
            max_grad_norm: 1.0,
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

/// A group of completions per prompt with their rewards and advantages.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Prompt index of each completion (completions come group after group).
    pub prompt_of: Vec<usize>,
    pub completions: Vec<Vec<u32>>,
    pub texts: Vec<String>,
    pub masks: Vec<Vec<bool>>,
    pub rewards: Vec<f32>,
    pub per_reward: Vec<(String, Vec<f32>)>,
    pub advantages: Vec<f32>,
    /// Log-probs of the completions under the sampling policy, `[n, width]` row-major, kept
    /// when `num_iterations > 1`.
    pub old_logprobs: Option<Vec<f32>>,
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

/// The images of `prompts`, concatenated in order, on `device`.
pub fn images_of<B: Backend>(prompts: &[&PromptInput], device: &B::Device) -> Option<Images<B>> {
    let grids: Vec<[usize; 3]> = prompts
        .iter()
        .flat_map(|p| p.grids.iter().copied())
        .collect();
    if grids.is_empty() {
        return None;
    }
    let dim = prompts
        .iter()
        .find(|p| !p.grids.is_empty())
        .map_or(0, |p| p.patch_dim);
    let pixels: Vec<f32> = prompts
        .iter()
        .flat_map(|p| p.pixels.iter().copied())
        .collect();
    let rows = pixels.len() / dim;
    Some(Images {
        pixel_values: Tensor::from_data(TensorData::new(pixels, [rows, dim]), device),
        grids,
    })
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
) -> Result<Rollout, Qwen2VLError> {
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
        prompt_bucket: cfg.shape_bucket,
    };
    let scoring = ScoringRows::new(prompts, cfg);
    let imgs = scoring.images::<B>(device);
    let batch = TokenBatch::left_padded(&scoring.prompt_ids, cfg.pad_token_id);
    let out = generate_grouped(model, &batch, imgs.as_ref(), scoring.group, &gen_cfg, false)?;
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
    let old_logprobs = if cfg.num_iterations > 1 {
        let completions = scoring_completions(&out.tokens, cfg.pad_token_id);
        let (lp, _) = scoring.score(model, imgs.as_ref(), &completions, false, cfg)?;
        let lp = pad_to(lp, width);
        Some(
            lp.into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("f32 after conversion"),
        )
    } else {
        None
    };
    Ok(Rollout {
        old_logprobs,
        prompt_of: (0..repeated.len()).map(|i| i / g).collect(),
        masks: batch_mask(
            &out.tokens,
            &cfg.eos_token_ids,
            cfg.mask_truncated_completions,
            width,
        ),
        completions: out.tokens,
        texts,
        rewards: scores.total,
        per_reward: scores.per_reward,
        advantages,
    })
}

/// The GRPO loss of a rollout (differentiable) and what it measured; `grad_norm` is left 0
/// for the caller that takes the gradient step.
pub fn policy_loss<B: AutodiffBackend>(
    policy: &Qwen2VL<B>,
    reference: Option<&Qwen2VL<B::InnerBackend>>,
    prompts: &[PromptInput],
    roll: &Rollout,
    cfg: &GrpoConfig,
    device: &B::Device,
) -> Result<(Tensor<B, 1>, StepMetrics), Qwen2VLError> {
    let n = roll.completions.len();
    let width = roll.masks.first().map_or(0, Vec::len);
    let scoring = ScoringRows::of_rollout(prompts, &roll.prompt_of, cfg);
    let completions = scoring_completions(&roll.completions, cfg.pad_token_id);
    let t = cfg.buckets().completion_width(
        completions
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(1)
            .max(width),
    );
    let mask_values: Vec<f32> = roll
        .masks
        .iter()
        .flat_map(|m| {
            (0..t).map(move |i| {
                if m.get(i).copied().unwrap_or(false) {
                    1.0
                } else {
                    0.0
                }
            })
        })
        .collect();
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask_values, [n, t]), device);
    // The pixels go to the device once; the policy reads them through the autodiff wrapper.
    let inner_images = scoring.images::<B::InnerBackend>(device);
    let images = inner_images.as_ref().map(|im| Images {
        pixel_values: Tensor::from_inner(im.pixel_values.clone()),
        grids: im.grids.clone(),
    });
    let (logp, entropy) = scoring.score(policy, images.as_ref(), &completions, true, cfg)?;
    let logp = pad_to(logp, t);
    let ref_logp = match (reference, cfg.loss.beta != 0.0) {
        (Some(r), true) => {
            let (inner, _) = scoring.score(r, inner_images.as_ref(), &completions, false, cfg)?;
            Some(pad_to(Tensor::<B, 2>::from_inner(inner), t))
        }
        _ => None,
    };
    let adv = Tensor::<B, 1>::from_data(TensorData::new(roll.advantages.clone(), [n]), device);
    let old = match &roll.old_logprobs {
        Some(v) => {
            let data = TensorData::new(v.clone(), [n, v.len() / n]);
            pad_to(Tensor::<B, 2>::from_data(data, device), t)
        }
        None => logp.clone().detach(),
    };
    let pt = per_token_loss(logp, old, ref_logp, adv, &cfg.loss);
    let loss = aggregate(pt.loss, mask.clone(), &cfg.loss, None);
    let scalar = |x: Tensor<B, 1>| x.into_scalar().elem::<f32>();
    let kl = pt
        .kl
        .map(|k| scalar(masked_mean(k.detach(), mask.clone(), true)))
        .unwrap_or(0.0);
    let entropy = entropy
        .map(|e| scalar(masked_mean(pad_to(e, t), mask.clone(), true)))
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
    prompts: &[PromptInput],
    roll: &Rollout,
    cfg: &GrpoConfig,
    accumulation: usize,
    device: &B::Device,
) -> Result<(GradientsParams, StepMetrics), Qwen2VLError> {
    let (loss, metrics) = policy_loss(policy, reference, prompts, roll, cfg, device)?;
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
#[allow(clippy::too_many_arguments)]
pub fn update<B: AutodiffBackend, O: Optimizer<Qwen2VL<B>, B>>(
    policy: Qwen2VL<B>,
    reference: Option<&Qwen2VL<B::InnerBackend>>,
    optimizer: &mut O,
    prompts: &[PromptInput],
    roll: &Rollout,
    cfg: &GrpoConfig,
    device: &B::Device,
) -> Result<(Qwen2VL<B>, StepMetrics), Qwen2VLError> {
    let (mut grads, mut metrics) =
        policy_gradients(&policy, reference, prompts, roll, cfg, 1, device)?;
    metrics.grad_norm = clip_global_norm(&policy, &mut grads, cfg.max_grad_norm);
    let policy = optimizer.step(cfg.learning_rate, policy, grads);
    Ok((policy, metrics))
}

use burn::tensor::ElementConversion;

/// The prompt rows of a rollout's scoring passes: each prompt once with `group` completions
/// after it (group-shared), or the prompt repeated per completion (`group` 1).
struct ScoringRows<'a> {
    /// The prompts in the order of `prompt_ids`.
    rows: Vec<&'a PromptInput>,
    prompt_ids: Vec<Vec<u32>>,
    group: usize,
}

impl<'a> ScoringRows<'a> {
    /// For a rollout of `prompts` with `cfg.num_generations` completions each.
    fn new(prompts: &'a [PromptInput], cfg: &GrpoConfig) -> Self {
        let prompt_of: Vec<usize> = (0..prompts.len() * cfg.num_generations)
            .map(|i| i / cfg.num_generations.max(1))
            .collect();
        Self::of_rollout(prompts, &prompt_of, cfg)
    }

    /// For completions whose prompts are `prompt_of`: shared when `cfg.share_prompt` and the
    /// completions come in equal groups, prompt after prompt (as [`rollout`] makes them).
    fn of_rollout(prompts: &'a [PromptInput], prompt_of: &[usize], cfg: &GrpoConfig) -> Self {
        let group = prompt_of.len() / prompts.len().max(1);
        let grouped = group > 0
            && prompt_of.len() == prompts.len() * group
            && prompt_of.iter().enumerate().all(|(i, &p)| p == i / group);
        let rows: Vec<&PromptInput> = if cfg.share_prompt && grouped {
            prompts.iter().collect()
        } else {
            prompt_of.iter().map(|&i| &prompts[i]).collect()
        };
        let group = if cfg.share_prompt && grouped {
            group
        } else {
            1
        };
        Self {
            prompt_ids: rows.iter().map(|p| p.ids.clone()).collect(),
            rows,
            group,
        }
    }

    /// The images of the rows, each prompt's once per row.
    fn images<B: Backend>(&self, device: &B::Device) -> Option<Images<B>> {
        images_of::<B>(&self.rows, device)
    }

    /// Per-token log-probs (and entropies) of `completions` under `model`.
    fn score<B: Backend>(
        &self,
        model: &Qwen2VL<B>,
        images: Option<&Images<B>>,
        completions: &[Vec<u32>],
        with_entropy: bool,
        cfg: &GrpoConfig,
    ) -> Result<(Tensor<B, 2>, Option<Tensor<B, 2>>), Qwen2VLError> {
        if self.group > 1 {
            grouped_completion_scores(
                model,
                &self.prompt_ids,
                images,
                completions,
                self.group,
                cfg.pad_token_id,
                with_entropy,
                cfg.buckets(),
            )
        } else {
            completion_scores_bucketed(
                model,
                &self.prompt_ids,
                completions,
                images,
                cfg.pad_token_id,
                with_entropy,
                cfg.buckets(),
            )
        }
    }
}

/// Empty completions (an immediate stop) still need one slot to be scored.
fn scoring_completions(tokens: &[Vec<u32>], pad: u32) -> Vec<Vec<u32>> {
    tokens
        .iter()
        .map(|c| if c.is_empty() { vec![pad] } else { c.clone() })
        .collect()
}

/// Pads `[n, t0]` with zeros to `[n, t]` on the right.
fn pad_to<B: Backend>(x: Tensor<B, 2>, t: usize) -> Tensor<B, 2> {
    let [n, t0] = x.dims();
    if t0 >= t {
        return x;
    }
    let device = x.device();
    Tensor::cat(vec![x, Tensor::zeros([n, t - t0], &device)], 1)
}
