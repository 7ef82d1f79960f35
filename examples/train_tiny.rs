//! The learner driven from code instead of the CLI: a synthetic set, a tiny random Qwen2-VL,
//! a supervised warm start, GRPO hosted by burn-train, and greedy evaluation before and after.
//! The same steps `medr1 train` takes with `configs/tiny.toml`, smaller.
//!
//! ```sh
//! cargo run --release --example train_tiny
//! ```

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use grpo::eval::{evaluate, EvalConfig};
use grpo::host::{launch, HeldOut, HostCtx, HostOptions, OptimizerOptions};
use grpo::learner::{GrpoConfig, PromptInput};
use grpo::loss::LossConfig;
use grpo::prompt::prepare_prompt;
use grpo::schedule::LrSchedule;
use grpo::sft::sft_step;
use grpo::WeightedRewards;
use medvqa::synth::{write_synthetic, SynthConfig};
use medvqa::{Modality, PromptTemplate, QuestionType};
use qwen2vl::generation::ShapeBuckets;
use qwen2vl::processor::{byte_tokenizer_json, ImageProcessorConfig, Processor, TextTokenizer};
use qwen2vl::{Qwen2VL, Qwen2VLConfig};

type A = Autodiff<Flex>;
type Error = Box<dyn std::error::Error>;

const EOS: u32 = 258; // <|im_end|> in the byte-level tokenizer
const PAD: u32 = 256; // <|endoftext|>

fn tokenizer() -> Result<TextTokenizer, Error> {
    Ok(TextTokenizer::from_bytes(
        byte_tokenizer_json().to_string().as_bytes(),
        "byte-level",
    )?)
}

fn main() -> Result<(), Error> {
    let dir = std::env::temp_dir().join("medr1-train-tiny");
    let _ = std::fs::remove_dir_all(&dir);
    // 1. Data: 400 synthetic questions about the imaging style, options in a fixed order.
    let (train, test) = write_synthetic(
        &SynthConfig {
            n: 400,
            seed: 5,
            image_size: 56,
            modalities: vec![
                Modality::Ct,
                Modality::Dermoscopy,
                Modality::Fundus,
                Modality::Microscopy,
            ],
            question_types: vec![QuestionType::ModalityRecognition],
            min_options: 4,
            max_options: 4,
            shuffle_options: false,
        },
        &dir,
        0.2,
    )?;
    let image = ImageProcessorConfig {
        min_pixels: 3136,
        max_pixels: 3136,
        ..Default::default()
    };
    let processor = Processor::new(tokenizer()?, image)?;
    let template = PromptTemplate::custom("{Question}")?;
    let prompts = |records: &[medvqa::VqaRecord]| -> Result<Vec<PromptInput>, Error> {
        records
            .iter()
            .map(|r| Ok(prepare_prompt(r, &template, &processor, &dir)?))
            .collect()
    };
    let (train, test) = (prompts(&train)?, prompts(&test)?);

    // 2. Model: the tiny fixture's architecture, random weights.
    let device = Default::default();
    let config = Qwen2VLConfig::from_file(
        "tests/fixtures/qwen2vl-tiny-seed0/hf_model/config.json".as_ref(),
    )?;
    A::seed(&device, 5);
    let mut model = Qwen2VL::<A>::random(&config, &device);

    // 3. Warm start: 60 supervised steps on `<answer> X </answer><|im_end|>`.
    let tok = tokenizer()?;
    let mut optim = OptimizerOptions::default().adamw().init();
    for step in 0..60 {
        let batch: Vec<PromptInput> = (0..16)
            .map(|k| train[(step * 16 + k) % train.len()].clone())
            .collect();
        let targets = batch
            .iter()
            .map(|p| {
                let mut ids =
                    tok.encode(&format!("<answer> {} </answer>", p.record.answer_letter()))?;
                ids.push(EOS);
                Ok(ids)
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let (m, loss, _) = sft_step(model, &mut optim, &batch, &targets, 3e-3, 1.0, PAD, &device)?;
        model = m;
        if (step + 1) % 20 == 0 {
            println!("sft step {:>3}: loss {loss:.4}", step + 1);
        }
    }
    let eval = EvalConfig {
        batch_size: 32,
        max_new_tokens: 12,
        eos_token_ids: vec![EOS, PAD],
        pad_token_id: PAD,
        buckets: ShapeBuckets::EXACT,
        scoring: Default::default(),
    };
    let before = evaluate(&model.valid(), &test, &tok, &eval, &device)?;

    // 4. GRPO under burn-train with Med-R1's rewards.
    let cfg = GrpoConfig {
        num_generations: 8,
        max_completion_length: 12,
        loss: LossConfig {
            ..Default::default()
        },
        eos_token_ids: vec![EOS, PAD],
        pad_token_id: PAD,
        ..Default::default()
    };
    let reference = model.valid();
    let ctx = HostCtx::<A>::new(
        train,
        tokenizer()?,
        WeightedRewards::med_r1(false),
        cfg,
        Some(reference),
        device,
        1,
    );
    let opts = HostOptions {
        dir: dir.join("grpo"),
        metrics_jsonl: dir.join("metrics.jsonl"),
        log_file: dir.join("train.log"),
        total_steps: 30,
        prompts_per_step: 4,
        checkpoint_every: 10,
        keep_checkpoints: 1,
        eval_every: 0,
        seed: 0,
        schedule: LrSchedule::constant(1.5e-3),
        optimizer: OptimizerOptions::default(),
        max_grad_norm: 1.0,
        resume: false,
        dashboard: false,
        interrupter: None,
        max_bad_steps: 3,
        tensorboard: None,
        completions: None,
    };
    let (trained, _) = launch(model, ctx, HeldOut::none(), eval.clone(), &opts)?;
    let after = evaluate(&trained, &test, &tok, &eval, &Default::default())?;
    println!(
        "held-out accuracy: {:.3} before GRPO, {:.3} after ({} questions)",
        before.overall.accuracy(),
        after.overall.accuracy(),
        after.overall.total
    );
    Ok(())
}
