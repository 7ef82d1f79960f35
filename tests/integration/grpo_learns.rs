//! GRPO does real work: on a tiny random Qwen2-VL and a reward it can chase within seconds on
//! the CPU, the mean reward rises (seeded and deterministic).

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::AdamWConfig;
use burn::tensor::backend::Backend;
use burn::tensor::ElementConversion;
use grpo::learner::{policy_loss, rollout, update, GrpoConfig, PromptInput, StepSize};
use grpo::loss::LossConfig;
use grpo::{Reward, WeightedRewards};
use medvqa::VqaRecord;
use qwen2vl::generation::{Sampling, ShapeBuckets};
use qwen2vl::processor::{byte_tokenizer_json, TextTokenizer};
use qwen2vl::{Qwen2VL, Qwen2VLConfig};

pub(crate) type Ad = Autodiff<Flex>;

/// Share of the completion's 8 slots holding an ASCII letter or digit: dense enough that a
/// random model's groups differ, learnable by shifting next-token probabilities.
pub(crate) struct Alphanumeric;

impl Reward for Alphanumeric {
    fn name(&self) -> &str {
        "alphanumeric"
    }
    fn score(&self, _prompt: &str, completion: &str, _record: &VqaRecord) -> f32 {
        completion
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .count() as f32
            / 8.0
    }
}

pub(crate) fn record() -> VqaRecord {
    VqaRecord {
        id: "r".into(),
        image: "none".into(),
        question: "?".into(),
        options: vec!["a".into(), "b".into()],
        answer: 0,
        modality: None,
        question_type: None,
        dataset: None,
    }
}

/// A random model with the tiny fixture's architecture, seeded.
/// Runs `draw` alone on the backend's random generator, seeded first when `seed` is given.
/// The generator is global to the test process: two tests drawing at once would interleave
/// their draws, and a seeded one would get other values than its seed says. Every draw from
/// it in these tests (random models, LoRA's initial adapters) goes through here.
pub(crate) fn drawing<T>(seed: Option<u64>, draw: impl FnOnce() -> T) -> T {
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(seed) = seed {
        Ad::seed(&Default::default(), seed);
    }
    draw()
}

pub(crate) fn tiny_random_model(seed: u64, device: &burn::tensor::Device<Ad>) -> Qwen2VL<Ad> {
    drawing(Some(seed), || random_of_tiny_config(device))
}

fn random_of_tiny_config(device: &burn::tensor::Device<Ad>) -> Qwen2VL<Ad> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/qwen2vl-tiny-seed0/hf_model/config.json"
    ))
    .unwrap();
    let config = Qwen2VLConfig::from_json_str(&text, "tiny").unwrap();
    Qwen2VL::random(&config, device)
}

pub(crate) fn byte_tokenizer() -> TextTokenizer {
    TextTokenizer::from_bytes(byte_tokenizer_json().to_string().as_bytes(), "bytes").unwrap()
}

/// A text-only chat prompt asking `question`.
pub(crate) fn text_prompt(tokenizer: &TextTokenizer, question: &str) -> PromptInput {
    let text = format!("<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n");
    PromptInput {
        ids: tokenizer.encode(&text).unwrap(),
        text,
        images: Vec::new(),
        record: record(),
    }
}

#[test]
fn grpo_raises_the_mean_reward_of_a_tiny_model() {
    let device = Default::default();
    let mut policy = tiny_random_model(7, &device);
    let reference = policy.valid();
    let tokenizer = byte_tokenizer();
    let prompts: Vec<PromptInput> = ["Say a word.", "Name a thing.", "Write code.", "Count."]
        .iter()
        .map(|q| text_prompt(&tokenizer, q))
        .collect();
    let cfg = GrpoConfig {
        num_generations: 8,
        sampling: Sampling::full(1.0),
        max_completion_length: 8,
        loss: LossConfig {
            beta: 0.04,
            ..Default::default()
        },
        eos_token_ids: vec![258],
        pad_token_id: 256,
        ..Default::default()
    };
    let rewards = WeightedRewards {
        rewards: vec![(Box::new(Alphanumeric), 1.0)],
    };
    let mut optim = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init();
    let mut means = Vec::new();
    for step in 0..20 {
        let roll = rollout(
            &policy.valid(),
            &prompts,
            &tokenizer,
            &rewards,
            &cfg,
            step,
            &device,
        )
        .unwrap();
        let (p, m) = update(
            policy,
            Some(&reference),
            &mut optim,
            &roll,
            &cfg,
            StepSize {
                learning_rate: 3e-3,
                max_grad_norm: 1.0,
            },
        )
        .unwrap();
        policy = p;
        assert!(m.loss.is_finite() && m.grad_norm.is_finite());
        means.push(m.reward_mean);
    }
    let first = means[..5].iter().sum::<f32>() / 5.0;
    let last = means[15..].iter().sum::<f32>() / 5.0;
    eprintln!("reward means: {means:?}");
    assert!(last > first + 0.15, "mean reward {first:.3} -> {last:.3}");
}

#[test]
fn sft_teaches_a_tiny_model_the_answer_format() {
    use grpo::sft::sft_step;
    use qwen2vl::generation::{generate, GenerationConfig};
    use qwen2vl::TokenBatch;

    let device = Default::default();
    let mut model = tiny_random_model(3, &device);
    let tokenizer = byte_tokenizer();
    let prompt = text_prompt(&tokenizer, "Answer.");
    let target = tokenizer.encode("<answer> A </answer><|im_end|>").unwrap();
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init();
    let mut losses = Vec::new();
    for _ in 0..40 {
        let (m, loss, _) = sft_step(
            model,
            &mut optim,
            std::slice::from_ref(&prompt),
            std::slice::from_ref(&target),
            3e-3,
            1.0,
            256,
            &device,
        )
        .unwrap();
        model = m;
        losses.push(loss);
    }
    assert!(losses[39] < losses[0] * 0.1, "{losses:?}");
    let cfg = GenerationConfig {
        max_new_tokens: 30,
        sampling: Sampling::GREEDY,
        eos_token_ids: vec![258],
        pad_token_id: 256,
        seed: 0,
        buckets: ShapeBuckets::EXACT,
    };
    let out = generate(
        &model.valid(),
        &TokenBatch::single(prompt.ids.clone()),
        None,
        &cfg,
        false,
    )
    .unwrap();
    assert_eq!(
        tokenizer.decode(&out.tokens[0], false).unwrap(),
        "<answer> A </answer><|im_end|>"
    );
}

#[test]
fn evaluation_runs_end_to_end_on_synthetic_images() {
    use grpo::eval::{evaluate, EvalConfig};
    use grpo::prompt::prepare_prompt;
    use medvqa::synth::{write_synthetic, SynthConfig};
    use medvqa::PromptTemplate;
    use qwen2vl::processor::{ImageProcessorConfig, Processor};

    let dir = std::env::temp_dir().join(format!("medr1-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (_, test) = write_synthetic(
        &SynthConfig {
            n: 40,
            seed: 2,
            image_size: 56,
            ..Default::default()
        },
        &dir,
        0.4,
    )
    .unwrap();
    let tokenizer = || byte_tokenizer();
    let image = ImageProcessorConfig {
        min_pixels: 3136,
        max_pixels: 12544,
        ..Default::default()
    };
    let processor = Processor::new(tokenizer(), image).unwrap();
    let template = PromptTemplate::named("eval_nothink").unwrap();
    let prompts: Vec<PromptInput> = test
        .iter()
        .map(|r| prepare_prompt(r, &template, &processor, &dir).unwrap())
        .collect();
    assert_eq!(prompts[0].images[0].grid, [1, 4, 4]);

    let device = Default::default();
    let (model, _) = qwen2vl::load_model::<Flex>(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/qwen2vl-tiny-seed0/hf_model"
        )
        .as_ref(),
        &device,
    )
    .unwrap();
    let cfg = EvalConfig {
        batch_size: 8,
        max_new_tokens: 12,
        eos_token_ids: vec![258],
        pad_token_id: 256,
        buckets: ShapeBuckets::EXACT,
        scoring: Default::default(),
    };
    let report = evaluate(&model, &prompts, &tokenizer(), &cfg, &device).unwrap();
    assert_eq!(report.overall.total, 16);
    assert_eq!(report.predictions.len(), 16);
    // A random model does not write `<answer> X </answer>`: everything is unparsable, nothing correct.
    assert_eq!((report.overall.correct, report.overall.unparsable), (0, 16));
    assert_eq!(
        report.by_modality.values().map(|t| t.total).sum::<usize>(),
        16
    );
    assert!(report.to_markdown("random").contains("| Model |"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn several_updates_per_rollout_use_the_sampling_log_probs() {
    let device = Default::default();
    let policy = tiny_random_model(11, &device);
    let tokenizer = byte_tokenizer();
    let prompts = vec![text_prompt(&tokenizer, "Go.")];
    let cfg = GrpoConfig {
        num_generations: 4,
        max_completion_length: 6,
        loss: LossConfig {
            beta: 0.0,
            ..Default::default()
        },
        eos_token_ids: vec![258],
        pad_token_id: 256,
        num_iterations: 2,
        ..Default::default()
    };
    let rewards = WeightedRewards {
        rewards: vec![(Box::new(Alphanumeric), 1.0)],
    };
    let roll = rollout(
        &policy.valid(),
        &prompts,
        &tokenizer,
        &rewards,
        &cfg,
        1,
        &device,
    )
    .unwrap();
    let old = roll
        .old_logprobs
        .clone()
        .expect("kept for num_iterations > 1");
    assert_eq!(old.dims(), [4, roll.batch.width]);
    let size = StepSize {
        learning_rate: 1e-2,
        max_grad_norm: 1.0,
    };
    // At the first iteration the stored log-probs equal the policy's: same loss as ratio = 1.
    let adamw = || {
        AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(0.0)
            .init()
    };
    let fresh = grpo::learner::Rollout {
        old_logprobs: None,
        ..roll.clone()
    };
    let (_, detached) = update(policy.clone(), None, &mut adamw(), &fresh, &cfg, size).unwrap();
    let mut optim = adamw();
    let (policy, first) = update(policy, None, &mut optim, &roll, &cfg, size).unwrap();
    assert!(
        (first.loss - detached.loss).abs() < 1e-5,
        "{} vs {}",
        first.loss,
        detached.loss
    );
    assert_eq!(first.clip_ratio, 0.0);
    // The second iteration sees a ratio away from 1 (the policy moved).
    let (_, second) = update(policy, None, &mut optim, &roll, &cfg, size).unwrap();
    assert!(second.loss.is_finite() && (second.loss - first.loss).abs() > 1e-6);
}

/// The image reaches the answer through training: four prompts with the same text and
/// different images, each with its own answer letter. Only the image can tell them apart, so
/// the loss can fall below the uniform-letter floor only if gradients flow through the vision
/// tower and the image embeddings.
#[test]
fn sft_learns_an_answer_only_the_image_gives() {
    use grpo::prompt::prepare_prompt;
    use grpo::sft::sft_loss;
    use medvqa::synth::{write_synthetic, SynthConfig};
    use medvqa::{Modality, PromptTemplate, QuestionType};
    use qwen2vl::processor::{ImageProcessorConfig, Processor};

    let dir = std::env::temp_dir().join(format!("medr1-image-sft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (train, _) = write_synthetic(
        &SynthConfig {
            n: 4,
            seed: 1,
            image_size: 56,
            modalities: vec![
                Modality::Ct,
                Modality::Mri,
                Modality::XRay,
                Modality::Fundus,
            ],
            question_types: vec![QuestionType::ModalityRecognition],
            min_options: 4,
            max_options: 4,
            shuffle_options: false,
        },
        &dir,
        0.0,
    )
    .unwrap();
    let image = ImageProcessorConfig {
        min_pixels: 3136,
        max_pixels: 3136,
        ..Default::default()
    };
    let processor = Processor::new(byte_tokenizer(), image).unwrap();
    let template = PromptTemplate::custom("{Question}").unwrap();
    let prompts: Vec<PromptInput> = train
        .iter()
        .map(|r| prepare_prompt(r, &template, &processor, &dir).unwrap())
        .collect();
    assert!(
        prompts.windows(2).all(|w| w[0].ids == w[1].ids),
        "same text"
    );
    let tokenizer = byte_tokenizer();
    let targets: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut ids = tokenizer
                .encode(&format!("{}", p.record.answer_letter()))
                .unwrap();
            ids.push(258);
            ids
        })
        .collect();
    let device = Default::default();
    let mut model = tiny_random_model(5, &device);
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init();
    for _ in 0..150 {
        let (m, _, _) = grpo::sft::sft_step(
            model, &mut optim, &prompts, &targets, 3e-3, 1.0, 256, &device,
        )
        .unwrap();
        model = m;
    }
    let (loss, _) = sft_loss(&model.valid(), &prompts, &targets, 256, &device).unwrap();
    let loss: f32 = loss.into_scalar();
    // Letter uniform over 4 and the end token certain would be (ln 4 + 0) / 2 = 0.69 per
    // token; measured 0.0022 after 150 steps (0.16 at step 70: learning takes off late).
    assert!(
        loss < 0.05,
        "loss {loss}: the answer did not learn to use the image"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Shape buckets pad prompts and completions (masked) in the rollout and in the loss: the same
/// completions, the same loss and metrics as exact shapes, up to float rounding.
#[test]
fn shape_buckets_leave_the_rollout_and_the_loss_unchanged() {
    let device = Default::default();
    let policy = tiny_random_model(3, &device);
    let reference = policy.valid();
    let tokenizer = byte_tokenizer();
    let prompts: Vec<PromptInput> = ["Say a word.", "Name three things, please."]
        .iter()
        .map(|q| text_prompt(&tokenizer, q))
        .collect();
    let rewards = WeightedRewards {
        rewards: vec![(Box::new(Alphanumeric), 1.0)],
    };
    let run = |bucket: usize| {
        let cfg = GrpoConfig {
            num_generations: 4,
            max_completion_length: 6,
            loss: LossConfig {
                beta: 0.04,
                ..Default::default()
            },
            num_iterations: 2,
            eos_token_ids: vec![258],
            pad_token_id: 256,
            shape_bucket: bucket,
            ..Default::default()
        };
        let roll = rollout(
            &policy.valid(),
            &prompts,
            &tokenizer,
            &rewards,
            &cfg,
            9,
            &device,
        )
        .unwrap();
        let (loss, metrics) = policy_loss(&policy, Some(&reference), &roll, &cfg).unwrap();
        (roll, loss.into_scalar().elem::<f32>(), metrics)
    };
    let (r1, l1, m1) = run(1);
    let (r64, l64, m64) = run(64);
    assert_eq!(r1.completions, r64.completions);
    assert_eq!(r1.rewards, r64.rewards);
    let values = |t: burn::tensor::Tensor<Flex, 2>| -> Vec<Vec<f32>> {
        let [_, w] = t.dims();
        let v = t.into_data().to_vec::<f32>().unwrap();
        v.chunks(w).map(<[f32]>::to_vec).collect()
    };
    let (o1, o64) = (
        values(r1.old_logprobs.unwrap()),
        values(r64.old_logprobs.unwrap()),
    );
    // Bucketed or not, every completion token has the same old log-prob.
    for ((a, b), c) in o1.iter().zip(&o64).zip(&r1.completions) {
        for t in 0..c.len() {
            assert!((a[t] - b[t]).abs() < 1e-5, "{} vs {}", a[t], b[t]);
        }
    }
    assert!((l1 - l64).abs() < 1e-5, "loss {l1} vs {l64}");
    assert!((m1.kl - m64.kl).abs() < 1e-6, "kl {} vs {}", m1.kl, m64.kl);
    assert!((m1.entropy - m64.entropy).abs() < 1e-5);
}

/// `num_generations_eval`: the held-out answers are drawn as a rollout draws its groups (the
/// same seed gives the same completions, rewards and lengths), and with greedy sampling every
/// answer of a question is the greedy evaluation's.
#[test]
fn sampled_evaluation_draws_as_a_rollout_does() {
    use grpo::eval::{evaluate, evaluate_sampled, EvalConfig, SampledEval};
    let device = Default::default();
    let model = tiny_random_model(11, &device).valid();
    let tokenizer = byte_tokenizer();
    let prompts: Vec<PromptInput> = ["Say a word.", "Name a thing.", "Count."]
        .iter()
        .map(|q| text_prompt(&tokenizer, q))
        .collect();
    let rewards = std::sync::Arc::new(WeightedRewards {
        rewards: vec![(Box::new(Alphanumeric), 1.0)],
    });
    let eval = EvalConfig {
        batch_size: 3,
        max_new_tokens: 6,
        eos_token_ids: vec![258],
        pad_token_id: 256,
        buckets: ShapeBuckets::EXACT,
        scoring: Default::default(),
    };
    let sampled = SampledEval {
        num_generations: 4,
        sampling: Sampling::full(1.0),
        rewards: rewards.clone(),
        seed: 9,
    };
    let got = evaluate_sampled(&model, &prompts, &tokenizer, &eval, &sampled, 0, &device).unwrap();
    let cfg = GrpoConfig {
        num_generations: 4,
        sampling: Sampling::full(1.0),
        max_completion_length: 6,
        eos_token_ids: vec![258],
        pad_token_id: 256,
        ..Default::default()
    };
    let roll = rollout(&model, &prompts, &tokenizer, &rewards, &cfg, 9, &device).unwrap();
    let outputs: Vec<&str> = got
        .report
        .predictions
        .iter()
        .map(|p| p.output.as_str())
        .collect();
    let texts: Vec<&str> = roll.texts.iter().map(String::as_str).collect();
    assert_eq!(outputs, texts);
    assert_eq!(got.rewards, roll.rewards);
    assert_eq!(got.per_reward, roll.per_reward);
    let lens: Vec<usize> = roll.completions.iter().map(Vec::len).collect();
    assert_eq!(got.completion_lens, lens);
    assert_eq!(got.report.overall.total, 12);
    assert!(
        texts.chunks(4).any(|g| g.iter().any(|t| *t != g[0])),
        "sampling drew the same answer everywhere: {texts:?}"
    );
    // Seeded by question index: batches of 2 draw what one batch of 3 does only for the first
    // batch's questions; the second batch starts from its own index.
    let halves = EvalConfig {
        batch_size: 2,
        ..eval.clone()
    };
    let again =
        evaluate_sampled(&model, &prompts, &tokenizer, &halves, &sampled, 0, &device).unwrap();
    let tail = evaluate_sampled(
        &model,
        &prompts[2..],
        &tokenizer,
        &halves,
        &sampled,
        2,
        &device,
    )
    .unwrap();
    assert_eq!(again.rewards[8..], tail.rewards[..]);

    let greedy = SampledEval {
        num_generations: 2,
        sampling: Sampling::GREEDY,
        ..sampled
    };
    let twice = evaluate_sampled(&model, &prompts, &tokenizer, &eval, &greedy, 0, &device).unwrap();
    let once = evaluate(&model, &prompts, &tokenizer, &eval, &device).unwrap();
    for (pair, p) in twice.report.predictions.chunks(2).zip(&once.predictions) {
        assert_eq!((&pair[0].output, &pair[1].output), (&p.output, &p.output));
    }
}
