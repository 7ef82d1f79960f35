//! The supervised warm start: cross-entropy on `<answer> X </answer><|im_end|>` after each
//! prompt (the right letter, or a random one when only the format is to be taught).

use std::sync::Arc;
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use grpo::host::OptimizerOptions;
use grpo::sft::sft_step;
use grpo::stream::{PromptSource, PromptStream, StreamOptions};
use medvqa::rng::Rng;
use medvqa::VqaRecord;
use qwen2vl::processor::TextTokenizer;
use qwen2vl::Qwen2VL;

use crate::config::SftConfig;

/// The completion SFT teaches for one record.
pub fn target_text(r: &VqaRecord, format_only: bool, think: bool, rng: &mut Rng) -> String {
    let letter = if format_only {
        (b'A' + rng.below(r.options.len().max(1)) as u8) as char
    } else {
        r.answer_letter()
    };
    if think {
        format!("<think> The answer is {letter}. </think><answer> {letter} </answer>")
    } else {
        format!("<answer> {letter} </answer>")
    }
}

/// Runs the warm start and returns the trained model.
#[allow(clippy::too_many_arguments)]
pub fn train<B: AutodiffBackend>(
    mut model: Qwen2VL<B>,
    prompts: Arc<dyn PromptSource>,
    stream: StreamOptions,
    tokenizer: &TextTokenizer,
    cfg: &SftConfig,
    think: bool,
    eos: u32,
    pad: u32,
    seed: u64,
    interrupt: &super::Interrupt,
    device: &B::Device,
) -> anyhow::Result<Qwen2VL<B>> {
    let mut optim = OptimizerOptions::default().adamw().init();
    let mut rng = Rng::new(seed ^ 0x5f7);
    let mut order: Vec<usize> = Vec::new();
    let format_only = cfg.target == "format_only";
    let batch_size = cfg.batch_size.max(1);
    // Every step's records and targets first (records only, no image is read), so that
    // the images can be prepared ahead in that order.
    let mut plan = Vec::with_capacity(cfg.steps * batch_size);
    let mut texts = Vec::with_capacity(cfg.steps * batch_size);
    for _ in 0..cfg.steps {
        let mut batch = Vec::with_capacity(batch_size);
        while batch.len() < batch_size {
            if order.is_empty() {
                order = (0..prompts.len()).collect();
                rng.shuffle(&mut order);
            }
            batch.push(order.pop().expect("refilled"));
        }
        for &i in &batch {
            texts.push(target_text(prompts.record(i), format_only, think, &mut rng));
        }
        plan.extend(batch);
    }
    let mut images = PromptStream::new(prompts, plan, stream);
    let mut texts = texts.into_iter();
    let started = Instant::now();
    let mut recent = Vec::new();
    for step in 0..cfg.steps {
        if interrupt.requested() {
            // A part-trained warm start is not saved: a later run would take it for the
            // finished one.
            anyhow::bail!(
                "interrupted during the SFT warm start at step {step} of {}; nothing was saved \
                 (the next run trains the warm start again)",
                cfg.steps
            );
        }
        let ps = images.take(batch_size)?;
        let targets = texts
            .by_ref()
            .take(batch_size)
            .map(|t| {
                let mut ids = tokenizer.encode(&t)?;
                ids.push(eos);
                Ok(ids)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (m, loss, _) = sft_step(
            model,
            &mut optim,
            &ps,
            &targets,
            cfg.learning_rate,
            1.0,
            pad,
            device,
        )?;
        model = m;
        recent.push(loss);
        if (step + 1) % 10 == 0 || step + 1 == cfg.steps {
            let mean = recent.iter().sum::<f32>() / recent.len() as f32;
            recent.clear();
            let per = started.elapsed().as_secs_f64() / (step + 1) as f64;
            eprintln!(
                "sft step {:>4}/{} | loss {mean:.4} | {per:.2} s/step | eta {:.0}s",
                step + 1,
                cfg.steps,
                per * (cfg.steps - step - 1) as f64
            );
        }
    }
    Ok(model)
}
