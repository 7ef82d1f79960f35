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
/// Watches the SFT loss: a step whose loss or gradient norm is not finite is skipped (by
/// `sft_step`) and counted, `max_bad` in a row end the warm start; a loss that climbs far above
/// where it started (a 10-step mean over 10x the first step's loss, and up by more than 1) is said
/// once.
pub struct SftWatch {
    max_bad: usize,
    bad_in_a_row: usize,
    first: Option<f32>,
    warned: bool,
}

impl SftWatch {
    pub fn new(max_bad: usize) -> Self {
        Self {
            max_bad: max_bad.max(1),
            bad_in_a_row: 0,
            first: None,
            warned: false,
        }
    }

    /// One step (1-based): a warning to print, or the error that ends the warm start.
    pub fn step(
        &mut self,
        step: usize,
        loss: f32,
        grad_norm: f32,
    ) -> anyhow::Result<Option<String>> {
        if loss.is_finite() && grad_norm.is_finite() {
            self.bad_in_a_row = 0;
            self.first.get_or_insert(loss);
            return Ok(None);
        }
        self.bad_in_a_row += 1;
        let why = format!(
            "sft step {step}: the loss is {loss} and the gradient norm {grad_norm}: not finite \
             numbers; the update is skipped, {} such step(s) in a row",
            self.bad_in_a_row
        );
        if self.bad_in_a_row >= self.max_bad {
            anyhow::bail!(
                "{why}: the SFT warm start diverged and stops (grpo.max_bad_steps = {}); nothing \
                 was saved. Lower sft.learning_rate",
                self.max_bad
            );
        }
        Ok(Some(format!("warning: {why}")))
    }

    /// A 10-step mean of the loss: a warning when it has climbed far above the first step's.
    pub fn window(&mut self, step: usize, mean: f32) -> Option<String> {
        let first = self.first?;
        if !mean.is_finite() {
            return None;
        }
        if self.warned || !(mean > 10.0 * first && mean > first + 1.0) {
            return None;
        }
        self.warned = true;
        Some(format!(
            "warning: sft step {step}: the loss rose from {first:.4} to {mean:.4}: the warm start \
             is diverging; lower sft.learning_rate"
        ))
    }
}

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
    max_bad_steps: usize,
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
    let mut watch = SftWatch::new(max_bad_steps);
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
        let (m, loss, norm) = sft_step(
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
        if let Some(w) = watch.step(step + 1, loss, norm)? {
            eprintln!("{w}");
        }
        if loss.is_finite() {
            recent.push(loss);
        }
        if (step + 1) % 10 == 0 || step + 1 == cfg.steps {
            let mean = recent.iter().sum::<f32>() / recent.len().max(1) as f32;
            recent.clear();
            if let Some(w) = watch.window(step + 1, mean) {
                eprintln!("{w}");
            }
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

#[cfg(test)]
mod tests {
    use super::SftWatch;

    #[test]
    fn non_finite_steps_are_counted_and_end_the_warm_start() {
        let mut w = SftWatch::new(2);
        assert!(w.step(1, 1.0, 0.5).unwrap().is_none());
        assert!(w
            .step(2, f32::NAN, 0.5)
            .unwrap()
            .unwrap()
            .contains("sft step 2"));
        assert!(w.step(3, 1.0, 0.5).unwrap().is_none());
        assert!(w.step(4, 1.0, f32::INFINITY).unwrap().is_some());
        let e = w.step(5, f32::NAN, f32::NAN).unwrap_err().to_string();
        assert!(
            e.contains("diverged") && e.contains("sft.learning_rate"),
            "{e}"
        );
    }

    #[test]
    fn a_climbing_loss_is_said_once() {
        let mut w = SftWatch::new(3);
        assert!(w.window(10, 2.0).is_none(), "no step seen yet");
        assert!(w.step(1, 2.0, 0.1).unwrap().is_none());
        assert!(w.window(10, 2.0).is_none());
        assert!(w.window(20, 1.5).is_none());
        assert!(w.window(30, 19.0).is_none());
        let said = w.window(40, 2.7e6).unwrap();
        assert!(said.contains("rose from 2.0000"), "{said}");
        assert!(w.window(50, 3e6).is_none());
    }
}
