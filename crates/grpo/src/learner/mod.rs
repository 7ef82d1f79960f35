//! One GRPO iteration: roll out a group of completions per prompt on the inference backend,
//! reward each against its own record, compute group advantages, then update the policy with
//! the clipped surrogate and the KL penalty to a frozen reference.

mod clip;
pub mod devices;
mod finite;
mod sync;

pub use clip::clip_global_norm;
pub use finite::weights_finite;
pub use sync::mix_into_reference;

use std::ops::Range;

use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::{
    backend::AutodiffBackend, backend::Backend, ElementConversion, Tensor, TensorData,
};
use medvqa::VqaRecord;
use qwen2vl::generation::{
    chunked_backward, chunked_scores, generate_grouped, GenerationConfig, HeadScores, HeadWeight,
    Recompute, Sampling, ScoringBatch, ShapeBuckets,
};
use qwen2vl::processor::{ProcessedImage, TextTokenizer};
use qwen2vl::{Images, Qwen2VL, Qwen2VLError, TokenBatch};

use crate::advantages::{group_advantages, zero_std_fraction, ScaleRewards};
use crate::loss::{
    aggregate, entropy_weight, high_entropy_mask, masked_mean, per_token_loss, row_weights,
    LossConfig, LossInputs, LossType, PerToken,
};
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
    /// How the scoring passes bound their memory; the default changes nothing.
    pub memory: MemoryOptions,
    /// DAPO's dynamic sampling (verl's `algorithm.filter_groups`): a hosted step drops the
    /// groups whose rewards are all equal (no learning signal) and rolls out prompts drawn
    /// anew in their place, each group on its own.
    pub filter_groups: bool,
    /// Rounds of rollouts a step may take to fill its groups when `filter_groups` is on
    /// (verl's `max_num_gen_batches`, the first included; 0: no limit). When they run out the
    /// step keeps groups without spread to stay whole (verl stops with an error instead).
    pub max_num_gen_batches: usize,
    /// KL as a reward penalty (verl's `algorithm.use_kl_in_reward` with a fixed
    /// `kl_ctrl.kl_coef`): each completion's reward loses this times the summed KL estimate
    /// of the sampling policy against the reference over its tokens, before the advantages
    /// ([`penalize_kl_in_reward`]). 0: off.
    pub kl_in_reward: f32,
    /// The estimator of that penalty (verl's `algorithm.kl_penalty`, `kl` = k1 by default).
    pub kl_in_reward_estimator: crate::loss::KlEstimator,
    /// TRL's `sync_ref_model`: every `ref_model_sync_steps` optimizer steps the reference
    /// becomes `ref_model_mixup_alpha * policy + (1 - alpha) * reference`
    /// ([`mix_into_reference`]); a hosted run keeps each synced reference for its resume.
    pub sync_ref_model: bool,
    pub ref_model_mixup_alpha: f32,
    pub ref_model_sync_steps: usize,
    /// TRL's `num_generations_eval` (trl/trainer/grpo_config.py:67): a hosted run's held-out
    /// evaluation samples this many answers per question with `sampling` and scores them with
    /// the run's rewards ([`crate::eval::evaluate_sampled`]). `None`: greedy answers, Med-R1's
    /// protocol (TRL, whose evaluation always samples, takes `num_generations` then).
    pub num_generations_eval: Option<usize>,
}

/// Memory options of the scoring passes (policy, reference, sampling policy), each exact: the
/// log-probs and gradients equal the plain path's up to float rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryOptions {
    /// Completions per scoring pass (0: the whole rollout in one pass). Each pass runs forward
    /// and backward before the next, so activations are held for this many rows at a time;
    /// with group-shared prompts a multiple of `num_generations` (whole groups).
    pub micro_batch: usize,
    /// Completion tokens per LM-head chunk (0: all of a pass at once): log-probs and entropies
    /// are taken from the head's logits this many tokens at a time and the head's backward
    /// recomputes them the same way, so `[rows, tokens, vocab]` logits never exist at once
    /// (one more head product per chunk in the backward pass).
    pub head_chunk: usize,
    /// Activation checkpointing of the policy's scoring pass: the blocks named keep only
    /// their input going forward and run again, one at a time, in the backward pass (one
    /// more forward of those blocks per step). Incompatible with LoRA dropout, whose masks
    /// a second forward would draw anew.
    pub recompute: Recompute,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            num_generations: 4,
            sampling: Sampling {
                temperature: 1.0,
                top_k: 50,
                top_p: 1.0,
                min_p: 0.0,
                repetition_penalty: 1.0,
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
            memory: MemoryOptions::default(),
            filter_groups: false,
            max_num_gen_batches: 10,
            kl_in_reward: 0.0,
            kl_in_reward_estimator: crate::loss::KlEstimator::K1,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
            num_generations_eval: None,
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
    /// The prompt text of each completion.
    pub prompts: Vec<String>,
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
    /// The counted completion tokens of every rollout of the optimizer step this one belongs
    /// to, when the step accumulates several ([`share_step_statistics`]): `dapo`'s normalizer.
    /// `None`: this rollout's own.
    pub step_tokens: Option<usize>,
    /// Groups rolled out in place of groups without spread (`filter_groups`), and groups
    /// without spread it still holds when the rounds ran out.
    pub resampled_groups: usize,
    pub unfilled_groups: usize,
}

/// A rollout's values on the host, as one node sends them to the others.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostRollout {
    pub prompt_of: Vec<usize>,
    pub prompts: Vec<String>,
    pub completions: Vec<Vec<u32>>,
    pub texts: Vec<String>,
    pub masks: Vec<Vec<bool>>,
    pub rewards: Vec<f32>,
    pub per_reward: Vec<(String, Vec<f32>)>,
    pub advantages: Vec<f32>,
    pub resampled_groups: usize,
    pub unfilled_groups: usize,
}

/// A rollout's scoring inputs, built once when it is made and read by every pass over it
/// (the sampling policy's log-probs, the policy, the reference, each of `num_iterations`
/// updates): the token layout (each prompt once per group when shared, completions padded to
/// their bucket), the prompts' images on the device once, the mask and the advantages; in one
/// part, or in micro-batches of rows ([`MemoryOptions::micro_batch`]).
#[derive(Debug, Clone)]
pub struct StepBatch<B: Backend> {
    pub parts: Vec<StepPart<B>>,
    /// The widest part's completion slots: the width of whole-rollout score tensors.
    pub width: usize,
}

/// One scoring pass over consecutive completion rows of a rollout.
#[derive(Debug, Clone)]
pub struct StepPart<B: Backend> {
    /// The rollout's completion rows it scores.
    pub rows: Range<usize>,
    pub tokens: ScoringBatch,
    /// The images of the layout's prompt rows.
    pub images: Option<Images<B>>,
    /// `[rows, part width]`: 1 on the completion tokens that count.
    pub mask: Tensor<B, 2>,
    /// `[rows]`.
    pub advantages: Tensor<B, 1>,
}

impl<B: Backend> StepBatch<B> {
    /// Per-token log-probs of the completions under `model`, `[rows, width]` (values only when
    /// the head is chunked), part by part.
    fn score(&self, model: &Qwen2VL<B>, head_chunk: usize) -> Result<Tensor<B, 2>, Qwen2VLError> {
        let scores = self
            .parts
            .iter()
            .map(|p| {
                Ok(p.tokens
                    .score_chunked(model, p.images.as_ref(), false, head_chunk)?
                    .0)
            })
            .collect::<Result<Vec<_>, Qwen2VLError>>()?;
        Ok(self.join(scores))
    }

    /// Per-part `[rows, part width]` tensors as one `[rows, width]`, zero past each part.
    fn join(&self, parts: Vec<Tensor<B, 2>>) -> Tensor<B, 2> {
        join_rows(parts, self.width)
    }

    /// `[rows, width]`: 1 on the completion tokens that count.
    pub fn mask(&self) -> Tensor<B, 2> {
        self.join(self.parts.iter().map(|p| p.mask.clone()).collect())
    }

    /// `[rows]`, on the first part's device.
    pub fn advantages(&self) -> Tensor<B, 1> {
        let device = self.parts[0].advantages.device();
        Tensor::cat(
            self.parts
                .iter()
                .map(|p| devices::tensor_to(p.advantages.clone(), &device))
                .collect(),
            0,
        )
    }
}

/// `[rows, w]` tensors, `w <= width`, as one `[rows, width]` (zero-padded on the right), on
/// the first one's device (a data-parallel rollout's parts live on several).
fn join_rows<K: Backend>(mut parts: Vec<Tensor<K, 2>>, width: usize) -> Tensor<K, 2> {
    if parts.len() == 1 && parts[0].dims()[1] == width {
        return parts.pop().expect("one part");
    }
    let device = parts[0].device();
    let widened: Vec<Tensor<K, 2>> = parts
        .into_iter()
        .map(|t| {
            let t = devices::tensor_to(t, &device);
            let [r, w] = t.dims();
            if w == width {
                t
            } else {
                let pad = Tensor::zeros([r, width - w], &t.device());
                Tensor::cat(vec![t, pad], 1)
            }
        })
        .collect();
    Tensor::cat(widened, 0)
}

impl<B: Backend> StepPart<B> {
    /// `[rows, part width]` of a whole-rollout `[rows, width]` tensor.
    fn of<K: Backend>(&self, whole: &Tensor<K, 2>) -> Tensor<K, 2> {
        whole
            .clone()
            .slice([self.rows.clone(), 0..self.tokens.width()])
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
    /// On a node of a multi-node run (its rollout's other rows scored on other nodes): this
    /// node's sums behind `loss`, `kl`, `entropy` and `clip_ratio`, which hold only once the
    /// nodes' sums are added up ([`StepMetrics::set_shares`]). `None` on one node.
    pub share: Option<ShareSums>,
}

/// The sums a node contributes to a step's measured values when its rollout's rows are
/// scored on several nodes; summed over the nodes they give the one-node values
/// ([`StepMetrics::set_shares`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ShareSums {
    /// The loss over this node's rows, weighted by the whole rollout's loss weights.
    pub loss: f32,
    /// Per-row means of the KL estimate over counted tokens, summed over this node's rows.
    pub kl_rows: f32,
    /// Per-row means of the entropy, summed likewise.
    pub entropy_rows: f32,
    /// Counted tokens whose ratio was clipped.
    pub clipped: f32,
    /// Counted tokens.
    pub counted: f32,
}

impl ShareSums {
    /// Values in a vector's order, for summing across nodes.
    pub const LEN: usize = 5;

    pub fn to_vec(&self) -> Vec<f32> {
        vec![
            self.loss,
            self.kl_rows,
            self.entropy_rows,
            self.clipped,
            self.counted,
        ]
    }

    /// The inverse of [`ShareSums::to_vec`] (`values` holds at least [`ShareSums::LEN`]).
    pub fn from_slice(values: &[f32]) -> Self {
        Self {
            loss: values[0],
            kl_rows: values[1],
            entropy_rows: values[2],
            clipped: values[3],
            counted: values[4],
        }
    }
}

impl StepMetrics {
    /// The values that depend on every node's rows, from all nodes' sums: the rollout has
    /// `rows` completions in all.
    pub fn set_shares(&mut self, total: ShareSums, rows: usize) {
        let rows = rows.max(1) as f32;
        self.loss = total.loss;
        self.kl = total.kl_rows / rows;
        self.entropy = total.entropy_rows / rows;
        self.clip_ratio = total.clipped / total.counted.max(1.0);
        self.share = None;
    }
}

/// The images of `prompts`, concatenated in order, on `device` ([`Images::from_processed`]).
pub fn images_of<B: Backend>(
    prompts: &[&PromptInput],
    device: &B::Device,
) -> Result<Option<Images<B>>, Qwen2VLError> {
    Images::from_processed(prompts.iter().flat_map(|p| &p.images), device)
}

/// `g` completions of each prompt, generated and scored: the prompt rows generation ran on
/// (each prompt once per group when `share`, else once per completion, `group` rows of
/// completions per prompt row), their ids and images on the device, and the completions
/// group after group with their texts, prompt texts and rewards.
pub(crate) struct Groups<'a, B: Backend> {
    pub rows: Vec<&'a PromptInput>,
    pub prompt_ids: Vec<Vec<u32>>,
    pub images: Option<Images<B>>,
    pub group: usize,
    pub out: qwen2vl::generation::Generation,
    pub texts: Vec<String>,
    pub prompt_texts: Vec<String>,
    pub scores: crate::rewards::Scores,
}

/// Samples `g` completions per prompt as `gen_cfg` says and scores them with `rewards`
/// against each prompt's record: a rollout's draw, and a sampled evaluation's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sample_groups<'a, B: Backend>(
    model: &Qwen2VL<B>,
    prompts: &'a [PromptInput],
    tokenizer: &TextTokenizer,
    rewards: &WeightedRewards,
    g: usize,
    share: bool,
    gen_cfg: &GenerationConfig,
    device: &B::Device,
) -> Result<Groups<'a, B>, Qwen2VLError> {
    let repeated: Vec<&PromptInput> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, g))
        .collect();
    // Each prompt once per group (shared) or once per completion; the same rows and images
    // serve generation and every scoring pass.
    let (rows, group): (Vec<&PromptInput>, usize) = if share {
        (prompts.iter().collect(), g)
    } else {
        (repeated.clone(), 1)
    };
    let prompt_ids: Vec<Vec<u32>> = rows.iter().map(|p| p.ids.clone()).collect();
    let images = images_of::<B>(&rows, device)?;
    let batch = TokenBatch::left_padded(&prompt_ids, gen_cfg.pad_token_id);
    let out = generate_grouped(model, &batch, images.as_ref(), group, gen_cfg, false)?;
    let texts: Vec<String> = out
        .tokens
        .iter()
        .map(|t| tokenizer.decode(t, true).unwrap_or_default())
        .collect();
    let prompt_texts: Vec<String> = repeated.iter().map(|p| p.text.clone()).collect();
    let records: Vec<&VqaRecord> = repeated.iter().map(|p| &p.record).collect();
    let scores = rewards.score(&prompt_texts, &texts, &records);
    Ok(Groups {
        rows,
        prompt_ids,
        images,
        group,
        out,
        texts,
        prompt_texts,
        scores,
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
) -> Result<Rollout<B>, Qwen2VLError> {
    let g = cfg.num_generations;
    let gen_cfg = GenerationConfig {
        max_new_tokens: cfg.max_completion_length,
        sampling: cfg.sampling,
        eos_token_ids: cfg.eos_token_ids.clone(),
        pad_token_id: cfg.pad_token_id,
        seed,
        buckets: cfg.buckets(),
    };
    let Groups {
        rows,
        prompt_ids,
        images,
        group,
        out,
        texts,
        prompt_texts,
        scores,
    } = sample_groups(
        model,
        prompts,
        tokenizer,
        rewards,
        g,
        cfg.share_prompt,
        &gen_cfg,
        device,
    )?;
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
    let step = step_batch(
        &rows,
        &prompt_ids,
        &completions,
        &masks,
        &advantages,
        images,
        group,
        cfg,
        device,
    )?;
    let old_logprobs = if cfg.num_iterations > 1 {
        Some(step.score(model, cfg.memory.head_chunk)?)
    } else {
        None
    };
    Ok(Rollout {
        old_logprobs,
        prompt_of: (0..out.tokens.len()).map(|i| i / g).collect(),
        prompts: prompt_texts,
        masks,
        completions: out.tokens,
        texts,
        rewards: scores.total,
        per_reward: scores.per_reward,
        advantages,
        batch: step,
        step_tokens: None,
        resampled_groups: 0,
        unfilled_groups: 0,
    })
}

impl<B: Backend> Rollout<B> {
    /// The rollout with its tensors (the images, mask and advantages of every part, the
    /// sampling policy's log-probs) on `device`.
    pub fn to_device(mut self, device: &B::Device) -> Self {
        for part in &mut self.batch.parts {
            part.mask = devices::tensor_to(part.mask.clone(), device);
            part.advantages = devices::tensor_to(part.advantages.clone(), device);
            if let Some(im) = part.images.as_mut() {
                im.pixel_values = devices::tensor_to(im.pixel_values.clone(), device);
            }
        }
        self.old_logprobs = self.old_logprobs.map(|o| devices::tensor_to(o, device));
        self
    }

    /// Replaces the advantages, in the rollout's completion order, in every scoring part.
    pub fn set_advantages(&mut self, advantages: Vec<f32>) {
        assert_eq!(
            advantages.len(),
            self.completions.len(),
            "one per completion"
        );
        for part in &mut self.batch.parts {
            let device = part.advantages.device();
            let rows = part.rows.clone();
            let values = advantages[rows.clone()].to_vec();
            part.advantages = Tensor::from_data(TensorData::new(values, [rows.len()]), &device);
        }
        self.advantages = advantages;
    }

    /// Whether some of its rows are scored elsewhere: a node's view of a multi-node rollout,
    /// whose parts cover its own rows only ([`Rollout::remote`]).
    pub fn is_partial(&self) -> bool {
        self.batch.parts.iter().map(|p| p.rows.len()).sum::<usize>() < self.completions.len()
    }

    /// Its values on the host (no tensors): what another node needs of it.
    pub fn host(&self) -> HostRollout {
        HostRollout {
            prompt_of: self.prompt_of.clone(),
            prompts: self.prompts.clone(),
            completions: self.completions.clone(),
            texts: self.texts.clone(),
            masks: self.masks.clone(),
            rewards: self.rewards.clone(),
            per_reward: self.per_reward.clone(),
            advantages: self.advantages.clone(),
            resampled_groups: self.resampled_groups,
            unfilled_groups: self.unfilled_groups,
        }
    }

    /// A rollout made on another node: its values, no scoring parts (this node scores none of
    /// its rows). Merged with this node's own ([`Rollout::merge`]), the statistics of the whole
    /// can be taken on every node. `old_on`: a device for placeholder sampling-policy
    /// log-probs (zeros, never read) when this node's rollouts keep theirs.
    pub fn remote(host: HostRollout, old_on: Option<&B::Device>) -> Self {
        let rows = host.completions.len();
        Self {
            old_logprobs: old_on.map(|d| Tensor::zeros([rows, 1], d)),
            prompt_of: host.prompt_of,
            prompts: host.prompts,
            completions: host.completions,
            texts: host.texts,
            masks: host.masks,
            rewards: host.rewards,
            per_reward: host.per_reward,
            advantages: host.advantages,
            batch: StepBatch {
                parts: Vec::new(),
                width: 1,
            },
            step_tokens: None,
            resampled_groups: host.resampled_groups,
            unfilled_groups: host.unfilled_groups,
        }
    }

    /// The completion tokens that count.
    pub fn counted_tokens(&self) -> usize {
        self.masks.iter().flatten().filter(|&&m| m).count()
    }

    /// Rollouts as one, in order (their parts kept as scoring parts, rows renumbered), so that
    /// a step over it is the step over all of them as one batch; each keeps its own rewards
    /// and advantages (set them anew for the merged batch's statistics).
    pub fn merge(rolls: Vec<Rollout<B>>) -> Rollout<B> {
        let width = rolls.iter().map(|r| r.batch.width).max().unwrap_or(1);
        let mut out = Rollout {
            prompt_of: Vec::new(),
            prompts: Vec::new(),
            completions: Vec::new(),
            texts: Vec::new(),
            masks: Vec::new(),
            rewards: Vec::new(),
            per_reward: Vec::new(),
            advantages: Vec::new(),
            batch: StepBatch {
                parts: Vec::new(),
                width,
            },
            old_logprobs: None,
            step_tokens: None,
            resampled_groups: 0,
            unfilled_groups: 0,
        };
        let mut olds = Vec::new();
        let (mut rows, mut prompts) = (0, 0);
        for r in rolls {
            out.prompt_of
                .extend(r.prompt_of.iter().map(|&p| p + prompts));
            prompts += r.prompt_of.iter().max().map_or(0, |&p| p + 1);
            out.prompts.extend(r.prompts);
            out.completions.extend(r.completions);
            out.texts.extend(r.texts);
            out.masks.extend(r.masks);
            out.rewards.extend(r.rewards);
            if out.per_reward.is_empty() {
                out.per_reward = r.per_reward;
            } else {
                for ((_, all), (_, v)) in out.per_reward.iter_mut().zip(r.per_reward) {
                    all.extend(v);
                }
            }
            out.advantages.extend(r.advantages);
            out.resampled_groups += r.resampled_groups;
            out.unfilled_groups += r.unfilled_groups;
            olds.extend(r.old_logprobs);
            let n = r.prompt_of.len();
            for mut part in r.batch.parts {
                part.rows = part.rows.start + rows..part.rows.end + rows;
                out.batch.parts.push(part);
            }
            rows += n;
        }
        if !olds.is_empty() {
            out.old_logprobs = Some(join_rows(olds, width));
        }
        out
    }
}

/// KL as a reward penalty (verl: `apply_kl_penalty` in `verl/trainer/ppo/ray_trainer.py`,
/// whose token-level rewards the GRPO advantage sums): each completion's reward minus
/// `cfg.kl_in_reward` x the sum over its counted tokens of `kl_estimate(sampling policy,
/// reference)`, logged as the reward `kl_penalty`; the group advantages are then taken anew.
/// `policy` is the sampling policy (its log-probs kept in the rollout are used when it has
/// them).
pub fn penalize_kl_in_reward<B: Backend>(
    roll: &mut Rollout<B>,
    policy: &Qwen2VL<B>,
    reference: &Qwen2VL<B>,
    cfg: &GrpoConfig,
) -> Result<(), Qwen2VLError> {
    let chunk = cfg.memory.head_chunk;
    let old = match &roll.old_logprobs {
        Some(o) => o.clone(),
        None => roll.batch.score(policy, chunk)?,
    };
    let refs = roll.batch.score(reference, chunk)?;
    let kl = crate::loss::kl_estimate(old, refs, cfg.kl_in_reward_estimator) * roll.batch.mask();
    let per_row: Vec<f32> = kl
        .sum_dim(1)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 values");
    let penalty: Vec<f32> = per_row.iter().map(|k| -cfg.kl_in_reward * k).collect();
    for (r, p) in roll.rewards.iter_mut().zip(&penalty) {
        *r += p;
    }
    roll.per_reward.push(("kl_penalty".into(), penalty));
    let advantages = group_advantages(&roll.rewards, cfg.num_generations, cfg.scale_rewards);
    roll.set_advantages(advantages);
    Ok(())
}

/// TRL's statistics over the rollouts of one optimizer step, which TRL generates together
/// (`steps_per_generation` = the accumulation count): with `scale_rewards = batch` the
/// advantages divide by the standard deviation of all their rewards
/// (`trl/trainer/grpo_trainer.py:2694` at v1.9.0-26), and `dapo`'s normalizer is all their
/// counted tokens (`num_items_in_batch`, `grpo_trainer.py:2427`). One rollout: nothing changes.
pub fn share_step_statistics<B: Backend>(rolls: &mut [Rollout<B>], cfg: &GrpoConfig) {
    let tokens: usize = rolls.iter().map(Rollout::counted_tokens).sum();
    if cfg.scale_rewards == ScaleRewards::Batch {
        let rewards: Vec<&[f32]> = rolls.iter().map(|r| r.rewards.as_slice()).collect();
        let advantages = crate::advantages::step_advantages(&rewards, cfg.num_generations);
        for (roll, adv) in rolls.iter_mut().zip(advantages) {
            roll.set_advantages(adv);
        }
    }
    for roll in rolls.iter_mut() {
        roll.step_tokens = Some(tokens);
    }
}

/// The scoring parts of a rollout: completion rows `micro_batch` at a time (whole groups when
/// the prompt rows are shared, `group` > 1), each with its prompt rows, their images (narrowed
/// from the rollout's, no new upload), its mask and advantages.
#[allow(clippy::too_many_arguments)]
fn step_batch<B: Backend>(
    rows: &[&PromptInput],
    prompt_ids: &[Vec<u32>],
    completions: &[Vec<u32>],
    masks: &[Vec<bool>],
    advantages: &[f32],
    images: Option<Images<B>>,
    group: usize,
    cfg: &GrpoConfig,
    device: &B::Device,
) -> Result<StepBatch<B>, Qwen2VLError> {
    let n = completions.len();
    let per_part = match cfg.memory.micro_batch {
        0 => n,
        m => m.min(n),
    };
    if !per_part.is_multiple_of(group) {
        return Err(Qwen2VLError::Input(format!(
            "a scoring micro-batch of {per_part} completions splits groups of {group} that share \
             their prompt: use a multiple of {group}"
        )));
    }
    let prompts_per_part = (per_part / group).max(1);
    let mut parts = Vec::new();
    // Patch rows of each prompt row's images, in order.
    let mut patch_start = 0;
    for (k, prompt_rows) in rows.chunks(prompts_per_part).enumerate() {
        let first = k * prompts_per_part;
        let range = first * group..(first + prompt_rows.len()) * group;
        let tokens = ScoringBatch::new(
            &prompt_ids[first..first + prompt_rows.len()],
            &completions[range.clone()],
            group,
            cfg.pad_token_id,
            cfg.buckets(),
        )?;
        let part_images = match &images {
            Some(all) if prompts_per_part >= rows.len() => Some(all.clone()),
            Some(all) => {
                let grids: Vec<[usize; 3]> = prompt_rows
                    .iter()
                    .flat_map(|p| p.images.iter().map(|im| im.grid))
                    .collect();
                let patches: usize = grids.iter().map(|[t, h, w]| t * h * w).sum();
                let start = patch_start;
                patch_start += patches;
                (!grids.is_empty()).then(|| Images {
                    pixel_values: all.pixel_values.clone().narrow(0, start, patches),
                    grids,
                })
            }
            None => None,
        };
        let (r, t) = (tokens.rows(), tokens.width());
        let mask_values: Vec<f32> = masks[range.clone()]
            .iter()
            .flat_map(|m| (0..t).map(move |i| f32::from(u8::from(m.get(i) == Some(&true)))))
            .collect();
        parts.push(StepPart {
            mask: Tensor::from_data(TensorData::new(mask_values, [r, t]), device),
            advantages: Tensor::from_data(
                TensorData::new(advantages[range.clone()].to_vec(), [r]),
                device,
            ),
            rows: range,
            images: part_images,
            tokens,
        });
    }
    let width = parts.iter().map(|p| p.tokens.width()).max().unwrap_or(1);
    Ok(StepBatch { parts, width })
}

/// The GRPO loss of a rollout (differentiable, every part in one graph) and what it measured;
/// `grad_norm` is left 0 for the caller that takes the gradient step. The definition that
/// [`policy_gradients`] takes the gradient of part by part. The rollout was made on the
/// policy's inner backend (its tensors are read without a copy).
pub fn policy_loss<B: AutodiffBackend>(
    policy: &Qwen2VL<B>,
    reference: Option<&Qwen2VL<B::InnerBackend>>,
    roll: &Rollout<B::InnerBackend>,
    cfg: &GrpoConfig,
) -> Result<(Tensor<B, 1>, StepMetrics), Qwen2VLError> {
    let batch = &roll.batch;
    let entropy_grad = cfg.loss.entropy_coef != 0.0;
    let mut logps = Vec::new();
    let mut entropies = Vec::new();
    for part in &batch.parts {
        // The rollout's tensors, read by the policy through the autodiff wrapper (no copy).
        let images = part.images.clone().map(Images::into_autodiff);
        let hidden = part.tokens.hidden(policy, images.as_ref())?;
        let (logp, entropy) = scores(&part.tokens, policy, hidden, entropy_grad);
        logps.push(logp);
        entropies.push(entropy);
    }
    let logp = join_rows(logps, batch.width);
    let entropy = join_rows(entropies, batch.width);
    let mask = batch.mask();
    let entropy_mask = entropy_selection(&cfg.loss, &entropy.clone().inner(), &mask);
    let ref_logp = match (reference, cfg.loss.beta != 0.0) {
        (Some(r), true) => Some(batch.score(r, 0)?),
        _ => None,
    };
    let old = match &roll.old_logprobs {
        Some(v) => Tensor::from_inner(v.clone()),
        None => logp.clone().detach(),
    };
    let pt = per_token_loss(
        LossInputs {
            logp,
            old_logp: old,
            ref_logp: ref_logp.map(Tensor::from_inner),
            advantages: Tensor::from_inner(batch.advantages()),
            mask: Tensor::from_inner(mask.clone()),
            entropy_mask: entropy_mask.clone().map(Tensor::from_inner),
        },
        &cfg.loss,
    );
    let mut loss = aggregate(
        pt.loss.clone(),
        Tensor::from_inner(mask.clone()),
        &cfg.loss,
        cfg.max_completion_length,
        roll.step_tokens.map(|n| n as f32),
    );
    if entropy_grad {
        let counted = counted_tokens(&mask, entropy_mask.as_ref());
        let w = entropy_weight(&cfg.loss, counted, 1, roll.step_tokens.map(|n| n as f32));
        let effective = Tensor::from_inner(effective_mask(&mask, entropy_mask.as_ref()));
        loss = loss - (entropy.clone() * effective).sum() * w;
    }
    let detached = PerToken {
        loss: pt.loss.detach().inner(),
        kl: pt.kl.map(|k| k.detach().inner()),
        clipped: pt.clipped.inner(),
    };
    let metrics = measure(
        roll,
        cfg,
        loss.clone().detach().inner(),
        &detached,
        Some(entropy.detach().inner()),
        mask,
    );
    Ok((loss, metrics))
}

/// `top_entropy_quantile`'s mask over a rollout's `[rows, width]` entropies ([`high_entropy_mask`]);
/// `None` when every token keeps its policy term.
fn entropy_selection<K: Backend>(
    cfg: &LossConfig,
    entropy: &Tensor<K, 2>,
    mask: &Tensor<K, 2>,
) -> Option<Tensor<K, 2>> {
    if cfg.top_entropy_quantile >= 1.0 {
        return None;
    }
    let dims = entropy.dims();
    let values = |t: &Tensor<K, 2>| -> Vec<f32> {
        t.clone()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 values")
    };
    let selected = high_entropy_mask(&values(entropy), &values(mask), cfg.top_entropy_quantile);
    Some(Tensor::from_data(
        TensorData::new(selected, dims),
        &entropy.device(),
    ))
}

/// The tokens whose entropy counts: the mask, narrowed by the entropy selection if any.
fn effective_mask<K: Backend>(
    mask: &Tensor<K, 2>,
    selection: Option<&Tensor<K, 2>>,
) -> Tensor<K, 2> {
    match selection {
        Some(m) => mask.clone() * m.clone(),
        None => mask.clone(),
    }
}

fn counted_tokens<K: Backend>(mask: &Tensor<K, 2>, selection: Option<&Tensor<K, 2>>) -> usize {
    effective_mask(mask, selection)
        .sum()
        .into_scalar()
        .elem::<f32>()
        .round() as usize
}

/// What a step measured from its per-token terms (values), the loss and the entropies.
fn measure<B: Backend>(
    roll: &Rollout<B>,
    cfg: &GrpoConfig,
    loss: Tensor<B, 1>,
    pt: &PerToken<B>,
    entropy: Option<Tensor<B, 2>>,
    mask: Tensor<B, 2>,
) -> StepMetrics {
    let n = roll.completions.len();
    let scalar = |x: Tensor<B, 1>| x.into_scalar().elem::<f32>();
    let kl = pt
        .kl
        .clone()
        .map(|k| scalar(masked_mean(k, mask.clone(), true)))
        .unwrap_or(0.0);
    let entropy = entropy
        .map(|e| scalar(masked_mean(e, mask.clone(), true)))
        .unwrap_or(0.0);
    let clip_ratio = scalar(masked_mean(pt.clipped.clone(), mask, false));
    let lens = completion_lens(roll);
    let mean = roll.rewards.iter().sum::<f32>() / n as f32;
    StepMetrics {
        loss: scalar(loss),
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
        share: None,
    }
}

/// Each completion's tokens that count.
fn completion_lens<B: Backend>(roll: &Rollout<B>) -> Vec<usize> {
    roll.masks
        .iter()
        .map(|m| m.iter().filter(|&&b| b).count())
        .collect()
}

/// The gradients of a rollout's GRPO loss ([`policy_loss`]) divided by `accumulation` (the
/// micro-batches of one optimizer step), and what the step measured (`loss` undivided,
/// `grad_norm` left 0): the one step computation of the hosted run, [`update`], the benches
/// and the examples. Part by part ([`MemoryOptions`]): each part's share of the loss (weighted
/// by the whole rollout's token counts, [`row_weights`]) runs forward and backward before the
/// next, and with a chunked head its log-probs are values whose gradient reaches the model
/// through [`chunked_backward`].
pub fn policy_gradients<B: AutodiffBackend>(
    policy: &Qwen2VL<B>,
    reference: Option<&Qwen2VL<B::InnerBackend>>,
    roll: &Rollout<B::InnerBackend>,
    cfg: &GrpoConfig,
    accumulation: usize,
) -> Result<(GradientsParams, StepMetrics), Qwen2VLError> {
    let one = [Worker {
        policy,
        reference,
        device: None,
    }];
    parallel_gradients(&one, roll, cfg, accumulation)
}

/// One device of a data-parallel step: the policy's replica there (the parameters of the main
/// policy, forked; the same parameter ids) and the reference's. `device: None` takes every
/// part (one device).
#[derive(Clone, Copy)]
pub struct Worker<'a, B: AutodiffBackend> {
    pub policy: &'a Qwen2VL<B>,
    pub reference: Option<&'a Qwen2VL<B::InnerBackend>>,
    pub device: Option<&'a B::Device>,
}

/// [`policy_gradients`] for a rollout whose parts live on several devices (its shards rolled
/// out there, [`Rollout::merge`]d): each part is scored, forward and backward, by the worker
/// on its device, and its gradients summed on the first worker's device, which the result and
/// the metrics live on. The loss weights are the whole rollout's, so the gradients are those
/// of the one-device step over the same completions (burn-train's multi-device strategy with
/// the optimizer on the main device: `MultiDeviceOptim::OptimMainDevice`). The parts run one
/// after another on this thread: Burn 0.21's autodiff loses gradients when two threads run
/// `backward()` at once (tracel-ai/burn#5573); on GPUs their kernels still overlap, being
/// queued without waiting.
pub fn parallel_gradients<B: AutodiffBackend>(
    workers: &[Worker<'_, B>],
    roll: &Rollout<B::InnerBackend>,
    cfg: &GrpoConfig,
    accumulation: usize,
) -> Result<(GradientsParams, StepMetrics), Qwen2VLError> {
    let main = workers
        .first()
        .ok_or_else(|| Qwen2VLError::Input("a step needs at least one worker".into()))?;
    let policy = main.policy;
    let main_device = roll.batch.parts[0].mask.device();
    let worker_of = |device: &B::Device| -> Result<&Worker<'_, B>, Qwen2VLError> {
        workers
            .iter()
            .find(|w| w.device.is_none_or(|d| d == device))
            .ok_or_else(|| {
                Qwen2VLError::Input(format!(
                    "a rollout part lives on {device:?}, where no worker is"
                ))
            })
    };
    let batch = &roll.batch;
    let chunk = cfg.memory.head_chunk;
    check_options(cfg, policy, batch.parts.len(), roll.is_partial())?;
    let entropy_grad = cfg.loss.entropy_coef != 0.0;
    let step_tokens = roll.step_tokens.map(|n| n as f32);
    let lens = completion_lens(roll);
    let weights = row_weights(&lens, &cfg.loss, cfg.max_completion_length, step_tokens);
    // TRL divides every loss type by the accumulation count but `dapo`, whose normalizer is
    // already the whole step's token count.
    let scale = match (cfg.loss.loss_type, step_tokens) {
        (LossType::Dapo, Some(_)) => 1.0,
        _ => 1.0 / accumulation.max(1) as f32,
    };
    let all_counted = lens.iter().sum::<usize>();
    let mut accumulator = GradientsAccumulator::new();
    let mut only = None;
    let (mut logps, mut refs, mut entropies) = (vec![], vec![], vec![]);
    for part in &batch.parts {
        let device = part.mask.device();
        let worker = worker_of(&device)?;
        let (policy, reference) = (worker.policy, worker.reference);
        let w: Vec<f32> = weights[part.rows.clone()]
            .iter()
            .map(|w| w * scale)
            .collect();
        let r = part.rows.len();
        let w = part.mask.clone()
            * Tensor::<B::InnerBackend, 2>::from_data(TensorData::new(w, [r, 1]), &device);
        let ref_logp = match (reference, cfg.loss.beta != 0.0) {
            (Some(m), true) => Some(
                part.tokens
                    .score_chunked(m, part.images.as_ref(), false, chunk)?
                    .0,
            ),
            _ => None,
        };
        let old = roll
            .old_logprobs
            .as_ref()
            .map(|o| devices::tensor_to(part.of(o), &device));
        let loss_of = |logp: Tensor<B, 2>, entropy: Tensor<B, 2>| {
            let old = match &old {
                Some(o) => Tensor::from_inner(o.clone()),
                None => logp.clone().detach(),
            };
            // One part when an entropy quantile is asked for (`check_options`): its
            // entropies are the whole rollout's.
            let selection = entropy_selection(&cfg.loss, &entropy.clone().inner(), &part.mask);
            let pt = per_token_loss(
                LossInputs {
                    logp,
                    old_logp: old,
                    ref_logp: ref_logp.clone().map(Tensor::from_inner),
                    advantages: Tensor::from_inner(part.advantages.clone()),
                    mask: Tensor::from_inner(part.mask.clone()),
                    entropy_mask: selection.clone().map(Tensor::from_inner),
                },
                &cfg.loss,
            );
            let mut loss = (pt.loss * Tensor::from_inner(w.clone())).sum();
            if entropy_grad {
                let counted = match &selection {
                    Some(sel) => counted_tokens(&part.mask, Some(sel)),
                    None => all_counted,
                };
                let ew = entropy_weight(&cfg.loss, counted, accumulation, step_tokens);
                let effective = effective_mask(&part.mask, selection.as_ref());
                loss = loss - (entropy * Tensor::from_inner(effective)).sum() * ew;
            }
            loss
        };
        let images = part.images.clone().map(Images::into_autodiff);
        let recompute = cfg.memory.recompute;
        let (grads, logp, entropy) = split_gradients(
            policy,
            part,
            images.as_ref(),
            chunk,
            recompute,
            entropy_grad,
            loss_of,
        )?;
        let grads = if device == main_device {
            grads
        } else {
            devices::grads_to(grads, &main_device, policy)
        };
        if batch.parts.len() == 1 {
            only = Some(grads);
        } else {
            accumulator.accumulate(main.policy, grads);
        }
        logps.push(logp);
        entropies.push(entropy);
        refs.extend(ref_logp);
    }
    let grads = only.unwrap_or_else(|| accumulator.grads());
    // What the step measured, on the whole rollout's values.
    let logp = batch.join(logps);
    let mask = batch.mask();
    let entropy = batch.join(entropies);
    let selection = entropy_selection(&cfg.loss, &entropy, &mask);
    let ref_logp = (!refs.is_empty()).then(|| batch.join(refs));
    // The parts' rows of the kept log-probs: on a node, the rollout's rows include others'.
    let old = match &roll.old_logprobs {
        Some(o) if roll.is_partial() => batch.join(batch.parts.iter().map(|p| p.of(o)).collect()),
        Some(o) => o.clone(),
        None => logp.clone(),
    };
    let pt = per_token_loss(
        LossInputs {
            logp,
            old_logp: old,
            ref_logp,
            advantages: batch.advantages(),
            mask: mask.clone(),
            entropy_mask: selection.clone(),
        },
        &cfg.loss,
    );
    let mut loss = aggregate(
        pt.loss.clone(),
        mask.clone(),
        &cfg.loss,
        cfg.max_completion_length,
        step_tokens,
    );
    if entropy_grad {
        let counted = counted_tokens(&mask, selection.as_ref());
        let ew = entropy_weight(&cfg.loss, counted, 1, step_tokens);
        loss = loss - (entropy.clone() * effective_mask(&mask, selection.as_ref())).sum() * ew;
    }
    let share = roll.is_partial().then(|| {
        // This node's rows, in its parts' order (the order of the joined tensors).
        let own: Vec<f32> = batch
            .parts
            .iter()
            .flat_map(|p| weights[p.rows.clone()].iter().copied())
            .collect();
        let rows = own.len();
        let own = Tensor::<B::InnerBackend, 2>::from_data(
            TensorData::new(own, [rows, 1]),
            &mask.device(),
        );
        let mut loss = (pt.loss.clone() * mask.clone() * own).sum();
        if entropy_grad {
            // No entropy selection on several nodes (`check_options`): every counted token.
            let ew = entropy_weight(&cfg.loss, all_counted, 1, step_tokens);
            loss = loss - (entropy.clone() * mask.clone()).sum() * ew;
        }
        let row_means = |v: Tensor<B::InnerBackend, 2>| {
            ((v * mask.clone()).sum_dim(1) / mask.clone().sum_dim(1).clamp_min(1.0)).sum()
        };
        let scalar = |x: Tensor<B::InnerBackend, 1>| x.into_scalar().elem::<f32>();
        ShareSums {
            loss: scalar(loss),
            kl_rows: pt.kl.clone().map_or(0.0, |k| scalar(row_means(k))),
            entropy_rows: scalar(row_means(entropy.clone())),
            clipped: scalar((pt.clipped.clone() * mask.clone()).sum()),
            counted: scalar(mask.clone().sum()),
        }
    });
    let mut metrics = measure(roll, cfg, loss, &pt, Some(entropy), mask);
    metrics.share = share;
    Ok((grads, metrics))
}

/// Log-probs and entropies from the final hidden states, the entropies in the graph when an
/// entropy bonus takes their gradient.
fn scores<B: Backend>(
    tokens: &ScoringBatch,
    policy: &Qwen2VL<B>,
    hidden: Tensor<B, 3>,
    entropy_grad: bool,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    if entropy_grad {
        tokens.score_hidden_entropy_grad(policy, hidden)
    } else {
        let (logp, entropy) = tokens.score_hidden(policy, hidden, true);
        (logp, entropy.expect("asked for"))
    }
}

/// Settings that cannot be honoured together, refused before any work.
fn check_options<B: Backend>(
    cfg: &GrpoConfig,
    policy: &Qwen2VL<B>,
    parts: usize,
    partial: bool,
) -> Result<(), Qwen2VLError> {
    if cfg.memory.recompute.any() && policy.adapter_dropout() > 0.0 {
        return Err(Qwen2VLError::Input(format!(
            "activation checkpointing recomputes blocks, which would draw new dropout masks for \
             the LoRA adapters (dropout {}): turn one of the two off",
            policy.adapter_dropout()
        )));
    }
    if cfg.loss.entropy_coef != 0.0 && cfg.memory.head_chunk > 0 {
        return Err(Qwen2VLError::Input(
            "entropy_coef takes the gradient of the entropies, which a chunked LM head \
             (memory head_chunk) computes as values only: turn one of the two off"
                .into(),
        ));
    }
    if cfg.loss.top_entropy_quantile < 1.0 && (parts > 1 || partial) {
        return Err(Qwen2VLError::Input(
            "top_entropy_quantile takes its quantile over the whole rollout's entropies, \
             which memory micro_batch or several nodes score in several passes: turn one of \
             the two off"
                .into(),
        ));
    }
    Ok(())
}

/// The gradients of one part's loss and its log-probs and entropies (values), with the LM
/// head outside the autodiff graph: the model's body runs with its graph (or checkpointed,
/// `recompute`) up to the final hidden states; the head scores their values
/// ([`HeadScores`], or `chunk` tokens at a time, [`chunked_scores`], recomputing the logits
/// going backward); the loss's gradient with respect to the log-probs gives the hidden
/// states' and the head's gradients; the body's backward pass takes the hidden states'. The
/// token embeddings are looked up as their own leaf, their gradient added into the table's
/// row by row. With an entropy bonus (which needs the entropies' gradient) and no chunk, the
/// head runs through autodiff on a leaf of the hidden states instead.
#[allow(clippy::type_complexity)]
fn split_gradients<B: AutodiffBackend>(
    policy: &Qwen2VL<B>,
    part: &StepPart<B::InnerBackend>,
    images: Option<&Images<B>>,
    chunk: usize,
    recompute: Recompute,
    entropy_grad: bool,
    loss_of: impl FnOnce(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 1>,
) -> Result<
    (
        GradientsParams,
        Tensor<B::InnerBackend, 2>,
        Tensor<B::InnerBackend, 2>,
    ),
    Qwen2VLError,
> {
    let tokens = &part.tokens;
    let (graph, tape, values) = if recompute.any() {
        let (values, tape) = tokens.hidden_recomputed(policy, images, recompute)?;
        (None, Some(tape), values)
    } else {
        let (hidden, rows) = tokens.hidden_sparse(policy, images)?;
        let values = hidden.clone().detach().inner();
        (Some((hidden, rows)), None, values)
    };
    let [r, t, d] = values.dims();
    let mut accumulator = GradientsAccumulator::new();
    // The head's weight gradient, when it trains.
    let mut head_grad = None;
    let (dh, logp, entropy) = if chunk == 0 && entropy_grad {
        let leaf = Tensor::<B, 3>::from_inner(values).require_grad();
        let (logp, entropy) = scores(tokens, policy, leaf.clone(), entropy_grad);
        let logp_values = logp.clone().detach().inner();
        let entropy_values = entropy.clone().detach().inner();
        let grads = loss_of(logp, entropy).backward();
        let dh = leaf
            .grad(&grads)
            .expect("the loss depends on the hidden states");
        accumulator.accumulate(policy, GradientsParams::from_grads(grads, policy));
        (dh, logp_values, entropy_values)
    } else {
        let (head, head_id) = policy.head_weight();
        let head_trains = match &head {
            HeadWeight::Tied(w) | HeadWeight::Separate(w) => w.is_require_grad(),
        };
        let head = head.inner();
        let h = values.reshape([r * t, d]);
        let targets = tokens.targets(&h.device());
        let (logp, entropy, kept) = if chunk == 0 {
            let (logp, entropy, kept) = HeadScores::new(&head, h.clone(), targets.clone(), true);
            (logp, entropy, Some(kept))
        } else {
            let (logp, entropy) = chunked_scores(&head, h.clone(), targets.clone(), true, chunk);
            (logp, entropy, None)
        };
        let logp = logp.reshape([r, t]);
        let entropy = entropy.expect("asked for").reshape([r, t]);
        let leaf = Tensor::<B, 2>::from_inner(logp.clone()).require_grad();
        // The entropies as values: an entropy bonus with a chunked head is refused.
        let of_logp = loss_of(leaf.clone(), Tensor::from_inner(entropy.clone())).backward();
        let g = leaf
            .grad(&of_logp)
            .expect("the loss depends on the log-probs")
            .reshape([r * t]);
        let (dh, dw) = match kept {
            Some(kept) => kept.backward(&head, g),
            None => chunked_backward(&head, h, targets, g, chunk),
        };
        if head_trains {
            head_grad = Some((head_id, dw));
        }
        (dh.reshape([r, t, d]), logp, entropy)
    };
    match (graph, tape) {
        (Some((hidden, rows)), _) => {
            let through = (hidden * Tensor::<B, 3>::from_inner(dh)).sum();
            let mut grads = through.backward();
            let rows = rows.and_then(|rows| rows.take_grad(&mut grads));
            let mut params = GradientsParams::from_grads(grads, policy);
            // The head's part first, so that a tied table's rows are added into it in place
            // of a table-sized buffer of their own.
            if let Some((id, dw)) = head_grad.take() {
                let dw = match params.remove::<B::InnerBackend, 2>(id) {
                    Some(body) => body + dw,
                    None => dw,
                };
                params.register(id, dw);
            }
            if let Some(rows) = rows {
                rows.add_to(&mut params);
            }
            accumulator.accumulate(policy, params);
        }
        (None, Some(tape)) => tokens.backward_recomputed(policy, tape, dh, |g| {
            accumulator.accumulate(policy, GradientsParams::from_grads(g, policy))
        })?,
        (None, None) => unreachable!("one of the two"),
    }
    if let Some((id, dw)) = head_grad {
        let mut grads = GradientsParams::new();
        grads.register(id, dw);
        accumulator.accumulate(policy, grads);
    }
    Ok((accumulator.grads(), logp, entropy))
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
