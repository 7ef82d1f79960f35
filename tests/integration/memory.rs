//! The memory options of the scoring passes are exact: scoring in micro-batches of rows, the
//! LM head in chunks and activation checkpointing of the decoder and vision blocks give the plain step's log-probs, loss, metrics and every parameter's
//! gradient, with the prompt shared per group and repeated, a tied and a separate head, and a
//! LoRA policy (frozen head).

use crate::common::{fixture_dir, qwen25vl_fixture_dir, Flex};
use crate::grpo_learns::{byte_tokenizer, drawing, record, Alphanumeric};
use crate::shared::processed_images;
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use grpo::learner::{
    policy_gradients, policy_loss, rollout, GrpoConfig, MemoryOptions, PromptInput, Rollout,
    StepMetrics,
};
use grpo::loss::LossConfig;
use grpo::WeightedRewards;
use qwen2vl::generation::Recompute;
use qwen2vl::verify::Fixture;
use qwen2vl::{load_model, LoraConfig, Qwen2VL, TargetModules};

type Ad = Autodiff<Flex>;
const PAD: u32 = 256;

/// Every float parameter's gradient (None: no gradient), in the module's order.
struct Collect<'a, B> {
    grads: &'a GradientsParams,
    out: Vec<(String, Option<Vec<f32>>)>,
    backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let g = self
            .grads
            .get::<B::InnerBackend, D>(param.id)
            .map(|g| g.into_data().convert::<f32>().to_vec::<f32>().unwrap());
        self.out.push((format!("{:?}", param.shape()), g));
    }
}

/// Each float parameter of `model` (its shape) with its gradient in `grads`.
pub(crate) fn collect<B: AutodiffBackend>(
    model: &Qwen2VL<B>,
    grads: &GradientsParams,
) -> Vec<(String, Option<Vec<f32>>)> {
    let mut v = Collect {
        grads,
        out: Vec::new(),
        backend: std::marker::PhantomData,
    };
    model.visit(&mut v);
    v.out
}

/// The same parameters have gradients in `a` and `b`, equal within 1e-5 of each gradient's
/// largest value; returns how many were compared.
pub(crate) fn assert_same_gradients(
    what: &str,
    a: &[(String, Option<Vec<f32>>)],
    b: &[(String, Option<Vec<f32>>)],
) -> usize {
    assert_eq!(a.len(), b.len());
    let mut compared = 0;
    for ((shape, x), (_, y)) in a.iter().zip(b) {
        let (Some(x), Some(y)) = (x, y) else {
            assert_eq!(
                x.is_some(),
                y.is_some(),
                "{what}: gradient of a {shape} parameter"
            );
            continue;
        };
        let scale = y.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for (u, v) in x.iter().zip(y) {
            assert!(
                (u - v).abs() <= 1e-5 * scale,
                "{what}: gradient of a {shape} parameter: {u} vs {v}"
            );
        }
        compared += 1;
    }
    compared
}

/// `a`'s loss, KL and entropy within 1e-5 / 1e-6 / 1e-5 of `b`'s, its clip ratio within
/// `clip_tolerance` (0: equal), the same completion tokens.
pub(crate) fn assert_same_metrics(
    what: &str,
    a: &StepMetrics,
    b: &StepMetrics,
    clip_tolerance: f32,
) {
    assert!(
        (a.loss - b.loss).abs() < 1e-5,
        "{what}: loss {} vs {}",
        a.loss,
        b.loss
    );
    assert!(
        (a.kl - b.kl).abs() < 1e-6,
        "{what}: kl {} vs {}",
        a.kl,
        b.kl
    );
    assert!((a.entropy - b.entropy).abs() < 1e-5, "{what}: entropy");
    if clip_tolerance == 0.0 {
        assert_eq!(a.clip_ratio, b.clip_ratio, "{what}: clip ratio");
    } else {
        assert!(
            (a.clip_ratio - b.clip_ratio).abs() < clip_tolerance,
            "{what}: clip ratio"
        );
    }
    assert_eq!(a.completion_tokens, b.completion_tokens, "{what}");
}

pub(crate) fn prompts(fx: &Fixture) -> Vec<PromptInput> {
    ["single", "multi"]
        .iter()
        .map(|name| PromptInput {
            text: String::new(),
            ids: fx.id_rows(&format!("{name}.input_ids")).unwrap().remove(0),
            images: processed_images(fx, name),
            record: record(),
        })
        .collect()
}

/// The fixture's model as the policy, its two prompts, and the end token its greedy
/// completion emits.
fn fixture_policy() -> (Qwen2VL<Ad>, Vec<PromptInput>, u32) {
    let (policy, _) =
        load_model::<Ad>(&fixture_dir().join("hf_model"), &Default::default()).unwrap();
    let fx = Fixture::open(&fixture_dir()).unwrap();
    let eos = fx.id_rows("single.gen.new_tokens").unwrap().remove(0)[3];
    (policy, prompts(&fx), eos)
}

/// One reward: the completion's share of alphanumeric characters.
fn alphanumeric() -> WeightedRewards {
    WeightedRewards {
        rewards: vec![(Box::new(Alphanumeric), 1.0)],
    }
}

/// A rollout of `prompts` on `policy` rewarded by [`alphanumeric`].
fn roll_out(
    policy: &Qwen2VL<Ad>,
    prompts: &[PromptInput],
    cfg: &GrpoConfig,
    seed: u64,
) -> Rollout<Flex> {
    rollout(
        &policy.valid(),
        prompts,
        &byte_tokenizer(),
        &alphanumeric(),
        cfg,
        seed,
        &Default::default(),
    )
    .unwrap()
}

/// The configuration [`step`] trains with.
fn step_config(eos: u32, share_prompt: bool, memory: MemoryOptions) -> GrpoConfig {
    GrpoConfig {
        num_generations: 4,
        max_completion_length: 6,
        loss: LossConfig {
            beta: 0.04,
            ..Default::default()
        },
        num_iterations: 2,
        eos_token_ids: vec![eos],
        pad_token_id: PAD,
        share_prompt,
        memory,
        ..Default::default()
    }
}

/// Gradients and metrics of one step of `policy` with `memory`, and the sampling policy's
/// log-probs of the rollout.
fn step(
    policy: &Qwen2VL<Ad>,
    prompts: &[PromptInput],
    eos: u32,
    share_prompt: bool,
    memory: MemoryOptions,
) -> (Vec<Vec<u32>>, Vec<f32>, StepMetrics, GradientsParams) {
    let cfg = step_config(eos, share_prompt, memory);
    let reference = policy.valid().without_adapters();
    let roll = roll_out(policy, prompts, &cfg, 5);
    // Only the completions' own tokens: slots past a completion are masked everywhere.
    let old = roll.old_logprobs.clone().unwrap();
    let width = roll.batch.width;
    let old: Vec<f32> = old.into_data().to_vec().unwrap();
    let old = roll
        .completions
        .iter()
        .enumerate()
        .flat_map(|(r, c)| old[r * width..r * width + c.len()].to_vec())
        .collect();
    let (grads, metrics) = policy_gradients(policy, Some(&reference), &roll, &cfg, 1).unwrap();
    (roll.completions, old, metrics, grads)
}

fn memory_options_match(policy: &Qwen2VL<Ad>, what: &str) {
    let fx = Fixture::open(&fixture_dir()).unwrap();
    let prompts = prompts(&fx);
    let eos = fx.id_rows("single.gen.new_tokens").unwrap().remove(0)[3];
    for share_prompt in [true, false] {
        let plain = step(
            policy,
            &prompts,
            eos,
            share_prompt,
            MemoryOptions::default(),
        );
        let plain_grads = collect(policy, &plain.3);
        let (none, decoder, vision, both) = (
            Recompute::default(),
            Recompute {
                decoder: true,
                vision: false,
            },
            Recompute {
                decoder: false,
                vision: true,
            },
            Recompute {
                decoder: true,
                vision: true,
            },
        );
        let options = [
            (4, 0, none),
            (0, 5, none),
            (4, 3, none),
            (if share_prompt { 8 } else { 3 }, 1, none),
            (0, 0, decoder),
            (0, 0, vision),
            (0, 4, decoder),
            (4, 3, both),
        ];
        for (micro_batch, head_chunk, recompute) in options {
            let case = format!(
                "{what}, shared {share_prompt}, micro-batch {micro_batch}, head chunk \
                 {head_chunk}, {recompute:?}"
            );
            let memory = MemoryOptions {
                micro_batch,
                head_chunk,
                recompute,
            };
            let (completions, old, metrics, grads) =
                step(policy, &prompts, eos, share_prompt, memory);
            assert_eq!(completions, plain.0, "{case}: the rollouts differ");
            for (a, b) in old.iter().zip(&plain.1) {
                assert!((a - b).abs() < 1e-5, "{case}: old log-prob {a} vs {b}");
            }
            assert_same_metrics(&case, &metrics, &plain.2, 0.0);
            let compared = assert_same_gradients(&case, &collect(policy, &grads), &plain_grads);
            assert!(compared > 0, "{case}: no gradients compared");
        }
    }
}

/// The fixture's architecture with a separate LM head (random weights) and the fixture with
/// LoRA adapters (table and head frozen).
fn head_variants(tied: &Qwen2VL<Ad>) -> (Qwen2VL<Ad>, Qwen2VL<Ad>) {
    let mut config = tied.config.clone();
    config.tie_word_embeddings = false;
    let separate = drawing(Some(17), || {
        Qwen2VL::<Ad>::random(&config, &Default::default())
    });
    assert!(separate.lm_head.is_some());
    let lora = drawing(None, || {
        tied.clone().with_lora(&LoraConfig {
            r: 2,
            alpha: 4.0,
            ..LoraConfig::default()
        })
    })
    .unwrap();
    (separate, lora)
}

/// The step's gradient is the gradient of [`policy_loss`], the loss's definition (the whole
/// forward through autodiff): the step runs the LM head outside the graph and looks the token
/// embeddings up as their own leaf, so this checks both against the plain graph, with the head
/// tied to the table (the table's gradient from the head and the lookup together), a separate
/// head, and a LoRA policy (table and head frozen).
#[test]
fn the_step_takes_the_gradient_of_the_policy_loss() {
    let (tied, prompts, eos) = fixture_policy();
    let (separate, lora) = head_variants(&tied);
    for (what, policy, at_least) in [
        ("tied head", &tied, 50),
        ("separate head", &separate, 50),
        ("LoRA", &lora, 10),
    ] {
        let (_, _, metrics, grads) = step(policy, &prompts, eos, true, MemoryOptions::default());
        let cfg = step_config(eos, true, MemoryOptions::default());
        let roll = roll_out(policy, &prompts, &cfg, 5);
        let reference = policy.valid().without_adapters();
        let (loss, whole) = policy_loss(policy, Some(&reference), &roll, &cfg).unwrap();
        let whole_grads = GradientsParams::from_grads(loss.backward(), policy);
        assert_same_metrics(what, &metrics, &whole, 0.0);
        let n = assert_same_gradients(
            what,
            &collect(policy, &grads),
            &collect(policy, &whole_grads),
        );
        assert!(n > at_least, "{what}: only {n} parameters had gradients");
    }
}

/// Micro-batches and a chunked head on the fixture model (its head tied to the embedding).
#[test]
fn micro_batches_and_a_chunked_head_are_exact_with_a_tied_head() {
    let (policy, _) =
        load_model::<Ad>(&fixture_dir().join("hf_model"), &Default::default()).unwrap();
    memory_options_match(&policy, "tied head");
}

/// The same with a separate LM head (random weights, the fixture's architecture untied) and
/// with a LoRA policy, whose head is frozen.
#[test]
fn micro_batches_and_a_chunked_head_are_exact_with_a_separate_or_frozen_head() {
    let device = Default::default();
    let (tied, _) = load_model::<Ad>(&fixture_dir().join("hf_model"), &device).unwrap();
    let (separate, lora) = head_variants(&tied);
    memory_options_match(&separate, "separate head");
    memory_options_match(&lora, "LoRA policy");
    // Adapters on the second vision block and the decoder: the patch embedding and the first
    // block are frozen with nothing before them that trains (checkpointing stops there), the
    // second trains without needing its input's gradient.
    let vision_lora = with_lora_on(
        tied,
        r".*(visual\.blocks\.1\.attn\.qkv|language_model\..*q_proj)",
    );
    memory_options_match(&vision_lora, "LoRA on a later vision block");
}

/// Rank-2 adapters on the projections whose PEFT names match `pattern`.
fn with_lora_on(model: Qwen2VL<Ad>, pattern: &str) -> Qwen2VL<Ad> {
    drawing(None, || {
        model.with_lora(&LoraConfig {
            r: 2,
            alpha: 4.0,
            target_modules: TargetModules::Pattern(pattern.into()),
            ..LoraConfig::default()
        })
    })
    .unwrap()
}

/// With the prompt shared per group, a micro-batch must hold whole groups.
#[test]
fn a_micro_batch_that_splits_a_group_is_refused() {
    let device = Default::default();
    let (policy, _) = load_model::<Ad>(&fixture_dir().join("hf_model"), &device).unwrap();
    let fx = Fixture::open(&fixture_dir()).unwrap();
    let cfg = GrpoConfig {
        num_generations: 4,
        max_completion_length: 2,
        pad_token_id: PAD,
        memory: MemoryOptions {
            micro_batch: 6,
            ..Default::default()
        },
        ..Default::default()
    };
    let rewards = alphanumeric();
    let err = rollout(
        &policy.valid(),
        &prompts(&fx),
        &byte_tokenizer(),
        &rewards,
        &cfg,
        5,
        &device,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("multiple of 4"), "{err}");
}

/// Activation checkpointing would draw new LoRA dropout masks when it recomputes: refused.
#[test]
fn checkpointing_with_lora_dropout_is_refused() {
    let device = Default::default();
    let (policy, _) = load_model::<Ad>(&fixture_dir().join("hf_model"), &device).unwrap();
    let policy = drawing(None, || {
        policy.with_lora(&LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.1,
            ..LoraConfig::default()
        })
    })
    .unwrap();
    let fx = Fixture::open(&fixture_dir()).unwrap();
    let cfg = GrpoConfig {
        num_generations: 2,
        max_completion_length: 2,
        pad_token_id: PAD,
        memory: MemoryOptions {
            recompute: Recompute {
                decoder: true,
                vision: false,
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let rewards = alphanumeric();
    let roll = rollout(
        &policy.valid(),
        &prompts(&fx),
        &byte_tokenizer(),
        &rewards,
        &cfg,
        5,
        &device,
    )
    .unwrap();
    let err = policy_gradients(&policy, None, &roll, &cfg, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dropout"), "{err}");
}

/// Qwen2.5-VL (windowed vision tower): every memory option, shared and unshared, equals the
/// plain step, with the whole model trained and with LoRA on a vision block.
#[test]
fn memory_options_are_exact_on_qwen25vl() {
    let device = Default::default();
    let (policy, _) = load_model::<Ad>(&qwen25vl_fixture_dir().join("hf_model"), &device).unwrap();
    memory_options_match(&policy, "Qwen2.5-VL");
    let lora = with_lora_on(
        policy,
        r".*(visual\.blocks\.2\.mlp\.gate_proj|language_model\..*v_proj)",
    );
    memory_options_match(&lora, "Qwen2.5-VL, LoRA on the last vision block's gate");
}

/// Every loss option of the menu (GSPO's sequence-level ratios, two-sided clipping, each KL
/// estimator, the entropy bonus, the high-entropy selection, dapo over a step's tokens) steps
/// along the gradient of its [`policy_loss`], the loss's definition, also with activation
/// checkpointing (the entropy bonus's gradient through recomputed blocks) and, where allowed,
/// in micro-batches. The sampling policy's log-probs are moved off the policy's so that ratios,
/// clipping and the cap are active.
#[test]
fn every_loss_option_steps_along_the_gradient_of_its_policy_loss() {
    use grpo::loss::{ImportanceSampling, KlEstimator, LossType};
    let device = Default::default();
    let (policy, prompts, eos) = fixture_policy();
    let base = LossConfig {
        beta: 0.04,
        ..Default::default()
    };
    let options = [
        LossConfig {
            importance_sampling_level: ImportanceSampling::Sequence,
            ..base
        },
        LossConfig {
            delta: Some(1.3),
            ..base
        },
        LossConfig {
            kl_estimator: KlEstimator::K1,
            ..base
        },
        LossConfig {
            kl_estimator: KlEstimator::K2,
            loss_type: LossType::Bnpo,
            ..base
        },
        LossConfig {
            kl_estimator: KlEstimator::LowVarKl,
            ..base
        },
        LossConfig {
            kl_estimator: KlEstimator::Abs,
            ..base
        },
        LossConfig {
            entropy_coef: 0.05,
            ..base
        },
        LossConfig {
            top_entropy_quantile: 0.4,
            entropy_coef: 0.05,
            loss_type: LossType::DrGrpo,
            ..base
        },
        LossConfig {
            importance_sampling_level: ImportanceSampling::Sequence,
            top_entropy_quantile: 0.5,
            delta: Some(1.3),
            ..base
        },
        LossConfig {
            loss_type: LossType::Dapo,
            entropy_coef: 0.05,
            ..base
        },
    ];
    // Another model, so that the log-ratio to the reference is not 0 (where `abs` has no
    // derivative and rounding would pick its sign).
    let reference = crate::grpo_learns::tiny_random_model(3, &device).valid();
    for loss in options {
        let cfg = GrpoConfig {
            num_generations: 4,
            max_completion_length: 6,
            loss,
            num_iterations: 2,
            eos_token_ids: vec![eos],
            pad_token_id: PAD,
            ..Default::default()
        };
        let mut roll = roll_out(&policy, &prompts, &cfg, 5);
        let old = roll.old_logprobs.take().unwrap();
        let [r, w] = old.dims();
        let shift: Vec<f32> = (0..r * w).map(|i| [0.4, -0.3, 0.1][i % 3] as f32).collect();
        roll.old_logprobs =
            Some(old + Tensor::from_data(burn::tensor::TensorData::new(shift, [r, w]), &device));
        if loss.loss_type == LossType::Dapo {
            // One of two accumulated rollouts: the step's tokens are more than its own.
            roll.step_tokens = Some(roll.masks.iter().flatten().filter(|&&m| m).count() + 7);
        }
        let (whole, metrics) = policy_loss(&policy, Some(&reference), &roll, &cfg).unwrap();
        let want = collect(
            &policy,
            &GradientsParams::from_grads(whole.backward(), &policy),
        );
        let micro_batch = if loss.top_entropy_quantile < 1.0 {
            0
        } else {
            4
        };
        for memory in [
            MemoryOptions::default(),
            MemoryOptions {
                micro_batch,
                recompute: Recompute {
                    decoder: true,
                    vision: true,
                },
                ..Default::default()
            },
        ] {
            let case = format!("{loss:?}, {memory:?}");
            let cfg = GrpoConfig {
                memory,
                ..cfg.clone()
            };
            let (grads, got) = policy_gradients(&policy, Some(&reference), &roll, &cfg, 1).unwrap();
            assert_same_metrics(&case, &got, &metrics, 0.0);
            let n = assert_same_gradients(&case, &collect(&policy, &grads), &want);
            assert!(n > 50, "{case}: only {n} parameters had gradients");
        }
    }
}

/// Options that cannot hold together are refused before any work, naming both.
#[test]
fn loss_options_that_need_what_a_memory_option_removes_are_refused() {
    let (policy, prompts, _) = fixture_policy();
    for (loss, memory, names) in [
        (
            LossConfig {
                entropy_coef: 0.1,
                ..Default::default()
            },
            MemoryOptions {
                head_chunk: 2,
                ..Default::default()
            },
            ["entropy_coef", "head_chunk"],
        ),
        (
            LossConfig {
                top_entropy_quantile: 0.5,
                ..Default::default()
            },
            MemoryOptions {
                micro_batch: 4,
                ..Default::default()
            },
            ["top_entropy_quantile", "micro_batch"],
        ),
    ] {
        let cfg = GrpoConfig {
            num_generations: 4,
            max_completion_length: 4,
            loss,
            memory,
            eos_token_ids: vec![PAD],
            pad_token_id: PAD,
            ..Default::default()
        };
        let roll = roll_out(&policy, &prompts, &cfg, 1);
        let e = policy_gradients(&policy, None, &roll, &cfg, 1)
            .unwrap_err()
            .to_string();
        assert!(names.iter().all(|n| e.contains(n)), "{e}");
    }
}

/// `loss_type = "dapo"` and `scale_rewards = "batch"` follow TRL under gradient accumulation:
/// two accumulated rollouts with their step's statistics shared ([`share_step_statistics`])
/// give the gradient of the two as one batch, as TRL generates and normalises them; without
/// the shared statistics (each rollout on its own, as before) they do not.
#[test]
fn dapo_and_batch_scaling_follow_trl_under_accumulation() {
    use grpo::advantages::{group_advantages, ScaleRewards};
    use grpo::learner::share_step_statistics;
    use grpo::loss::LossType;
    let (policy, prompts, eos) = fixture_policy();
    let reference = policy.valid();
    let sum = |a: Vec<(String, Option<Vec<f32>>)>, b: Vec<(String, Option<Vec<f32>>)>| {
        a.into_iter()
            .zip(b)
            .map(|((shape, x), (_, y))| {
                let z = match (x, y) {
                    (Some(x), Some(y)) => Some(x.iter().zip(&y).map(|(u, v)| u + v).collect()),
                    (x, y) => x.or(y),
                };
                (shape, z)
            })
            .collect::<Vec<_>>()
    };
    for (loss_type, scale_rewards) in [
        (LossType::Dapo, ScaleRewards::Group),
        (LossType::Grpo, ScaleRewards::Batch),
        (LossType::Dapo, ScaleRewards::Batch),
    ] {
        let case = format!("{loss_type:?}, {scale_rewards:?}");
        let cfg = GrpoConfig {
            num_generations: 4,
            max_completion_length: 6,
            loss: LossConfig {
                beta: 0.04,
                loss_type,
                ..Default::default()
            },
            scale_rewards,
            eos_token_ids: vec![eos],
            pad_token_id: PAD,
            ..Default::default()
        };
        let first = roll_out(&policy, &prompts[..1], &cfg, 5);
        let second = roll_out(&policy, &prompts[1..], &cfg, 6);
        // TRL's single batch: both groups, advantages and normaliser over all of them.
        let mut whole = Rollout::merge(vec![first.clone(), second.clone()]);
        whole.set_advantages(group_advantages(&whole.rewards, 4, scale_rewards));
        let (grads, _) = policy_gradients(&policy, Some(&reference), &whole, &cfg, 1).unwrap();
        let want = collect(&policy, &grads);
        let accumulated = |rolls: &[Rollout<Flex>]| {
            let g: Vec<_> = rolls
                .iter()
                .map(|r| {
                    let (g, _) = policy_gradients(&policy, Some(&reference), r, &cfg, 2).unwrap();
                    collect(&policy, &g)
                })
                .collect();
            sum(g[0].clone(), g[1].clone())
        };
        let alone = accumulated(&[first.clone(), second.clone()]);
        let mut step = [first, second];
        share_step_statistics(&mut step, &cfg);
        let n = assert_same_gradients(&case, &accumulated(&step), &want);
        assert!(n > 50, "{case}: only {n} parameters had gradients");
        let differs = alone
            .iter()
            .zip(&want)
            .any(|((_, x), (_, y))| match (x, y) {
                (Some(x), Some(y)) => x.iter().zip(y).any(|(u, v)| (u - v).abs() > 1e-4),
                _ => false,
            });
        assert!(
            differs,
            "{case}: per-rollout statistics should differ from TRL's"
        );
    }
}

/// KL as a reward penalty, by an independent computation: each completion scored alone under
/// the sampling policy and under the reference (`completion_logprobs`), its k1 estimate
/// summed over its counted tokens, times the coefficient, off its reward; the advantages are
/// the group's anew.
#[test]
fn the_kl_reward_penalty_takes_each_completions_summed_kl() {
    use grpo::advantages::group_advantages;
    use grpo::learner::penalize_kl_in_reward;
    use qwen2vl::generation::completion_logprobs;
    let (policy, prompts, eos) = fixture_policy();
    let device = Default::default();
    let cfg = GrpoConfig {
        num_generations: 4,
        max_completion_length: 6,
        eos_token_ids: vec![eos],
        pad_token_id: PAD,
        kl_in_reward: 0.3,
        ..Default::default()
    };
    let reference = crate::grpo_learns::tiny_random_model(3, &device).valid();
    let sampler = policy.valid();
    let plain = roll_out(&policy, &prompts, &cfg, 5);
    let mut roll = plain.clone();
    penalize_kl_in_reward(&mut roll, &sampler, &reference, &cfg).unwrap();
    let mut want = plain.rewards.clone();
    for (i, completion) in plain.completions.iter().enumerate() {
        let p = &prompts[plain.prompt_of[i]];
        let images = qwen2vl::Images::from_processed(p.images.iter(), &device).unwrap();
        let lp = |m: &Qwen2VL<Flex>| -> Vec<f32> {
            completion_logprobs(
                m,
                std::slice::from_ref(&p.ids),
                std::slice::from_ref(completion),
                images.as_ref(),
                PAD,
            )
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap()
        };
        let (old, refs) = (lp(&sampler), lp(&reference));
        let kl: f32 = plain.masks[i]
            .iter()
            .enumerate()
            .filter(|(_, &m)| m)
            .map(|(t, _)| old[t] - refs[t])
            .sum();
        want[i] -= 0.3 * kl;
    }
    for (got, want) in roll.rewards.iter().zip(&want) {
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }
    assert!(roll
        .rewards
        .iter()
        .zip(&plain.rewards)
        .any(|(a, b)| (a - b).abs() > 1e-3));
    assert_eq!(
        roll.advantages,
        group_advantages(&roll.rewards, 4, cfg.scale_rewards)
    );
    assert!(roll.per_reward.iter().any(|(name, _)| name == "kl_penalty"));
}
