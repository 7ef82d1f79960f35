//! A reward of your own, plugged into GRPO training next to Med-R1's.
//!
//! `Reward` is one method: score a completion against its prompt and its record. This example
//! adds a brevity reward (short answers score higher) to Med-R1's format and accuracy rewards
//! and trains a tiny random model for a few steps under burn-train on text-only questions.
//!
//! ```sh
//! cargo run --release --example custom_reward
//! ```

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use grpo::eval::EvalConfig;
use grpo::host::{launch, HeldOut, HostCtx, HostOptions, OptimizerOptions};
use grpo::learner::{GrpoConfig, PromptInput};
use grpo::loss::LossConfig;
use grpo::schedule::LrSchedule;
use grpo::{AccuracyReward, FormatReward, Reward, WeightedRewards};
use medvqa::VqaRecord;
use qwen2vl::generation::ShapeBuckets;
use qwen2vl::processor::{byte_tokenizer_json, TextTokenizer};
use qwen2vl::{Qwen2VL, Qwen2VLConfig};

type A = Autodiff<Flex>;

// ANCHOR: reward
/// 1 for an empty completion, falling linearly to 0 at 24 characters.
struct Brevity;

impl Reward for Brevity {
    fn name(&self) -> &str {
        "brevity"
    }

    fn score(&self, _prompt: &str, completion: &str, _record: &VqaRecord) -> f32 {
        (1.0 - completion.chars().count() as f32 / 24.0).max(0.0)
    }
}
// ANCHOR_END: reward

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Default::default();
    let tokenizer =
        TextTokenizer::from_bytes(byte_tokenizer_json().to_string().as_bytes(), "bytes")?;
    // A tiny model with the test fixture's architecture, random weights.
    let config = Qwen2VLConfig::from_file(
        "tests/fixtures/qwen2vl-tiny-seed0/hf_model/config.json".as_ref(),
    )?;
    A::seed(&device, 1);
    let policy = Qwen2VL::<A>::random(&config, &device);

    let record = |q: &str, answer: usize| VqaRecord {
        id: q.into(),
        image: String::new(),
        question: q.into(),
        options: vec!["yes".into(), "no".into()],
        answer,
        modality: None,
        question_type: None,
        dataset: None,
    };
    let prompts: Vec<PromptInput> = [("Is it red?", 0), ("Is it blue?", 1)]
        .iter()
        .map(|&(q, a)| {
            let text = format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
            Ok(PromptInput {
                ids: tokenizer.encode(&text)?,
                text,
                images: Vec::new(),
                record: record(q, a),
            })
        })
        .collect::<Result<_, qwen2vl::processor::ProcessorError>>()?;

    // ANCHOR: rewards
    let rewards = WeightedRewards {
        rewards: vec![
            (Box::new(FormatReward::new(false)), 1.0),
            (Box::new(AccuracyReward), 1.0),
            (Box::new(Brevity), 0.5),
        ],
    };
    // ANCHOR_END: rewards
    let cfg = GrpoConfig {
        num_generations: 4,
        max_completion_length: 16,
        loss: LossConfig {
            ..Default::default()
        },
        eos_token_ids: vec![258],
        pad_token_id: 256,
        ..Default::default()
    };
    let reference = policy.valid();
    let ctx = HostCtx::<A>::new(prompts, tokenizer, rewards, cfg, Some(reference), device, 1);
    let out = std::env::temp_dir().join("medr1-custom-reward");
    let _ = std::fs::remove_dir_all(&out);
    let opts = HostOptions {
        dir: out.join("grpo"),
        metrics_jsonl: out.join("metrics.jsonl"),
        log_file: out.join("train.log"),
        total_steps: 5,
        prompts_per_step: 2,
        checkpoint_every: 5,
        keep_checkpoints: 1,
        eval_every: 0,
        seed: 0,
        schedule: LrSchedule::constant(1e-3),
        optimizer: OptimizerOptions::default(),
        max_grad_norm: 1.0,
        resume: false,
        dashboard: false,
        interrupter: None,
        max_bad_steps: 3,
        tensorboard: None,
        completions: None,
    };
    let eval = EvalConfig {
        batch_size: 2,
        max_new_tokens: 16,
        eos_token_ids: vec![258],
        pad_token_id: 256,
        buckets: ShapeBuckets::EXACT,
        scoring: Default::default(),
    };
    let (_trained, state) = launch(policy, ctx, HeldOut::none(), eval, &opts)?;
    println!(
        "trained {} steps; per-step rewards (brevity among them) are in {}",
        state.step,
        opts.metrics_jsonl.display()
    );
    Ok(())
}
