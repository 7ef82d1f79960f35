//! Generation checks: KV-cached greedy decoding (tokens, step logits, log-probs), sampling at
//! temperature -> 0, and batched teacher-forced log-probs through the scoring path GRPO uses.

use burn::tensor::backend::Backend;

use super::{images, Checker, FLOAT_TOLERANCE};
use crate::checkpoint::host_f32;
use crate::error::Qwen2VLError;
use crate::generation::{completion_logprobs, generate, GenerationConfig, Sampling, ShapeBuckets};
use crate::model::Qwen2VL;
use crate::positions::TokenBatch;

impl Checker<'_> {
    pub(super) fn generation_case<B: Backend>(
        &mut self,
        model: &Qwen2VL<B>,
        case: &str,
        device: &B::Device,
    ) -> Result<(), Qwen2VLError> {
        let fx = self.fixture;
        let key = format!("{case}.gen.new_tokens");
        if !fx.has(&key) {
            return Ok(());
        }
        let want = fx.id_rows(&key)?.remove(0);
        let ids = fx.id_rows(&format!("{case}.input_ids"))?.remove(0);
        let imgs = images::<B>(fx, &[case], device)?;
        let mut cfg = GenerationConfig {
            max_new_tokens: want.len(),
            sampling: Sampling::GREEDY,
            // The fixture generates a fixed number of tokens without stopping.
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
            seed: 0,
            buckets: ShapeBuckets::EXACT,
        };
        let batch = TokenBatch::single(ids);
        let g = generate(model, &batch, imgs.as_ref(), &cfg, true)?;
        let tokens: Vec<f64> = g.tokens[0].iter().map(|&t| t as f64).collect();
        self.host(&format!("{case}.gen.greedy_tokens"), &key, &tokens, 0.0)?;
        let steps: Vec<f64> = g.step_logits.as_ref().expect("kept")[0]
            .iter()
            .flatten()
            .map(|&v| v as f64)
            .collect();
        self.host(
            &format!("{case}.gen.step_logits_kvcache"),
            &format!("{case}.gen.step_logits_kvcache"),
            &steps,
            FLOAT_TOLERANCE,
        )?;
        let lp: Vec<f64> = g.logprobs[0].iter().map(|&v| v as f64).collect();
        self.host(
            &format!("{case}.gen.step_logprobs_kvcache"),
            &format!("{case}.gen.step_logprobs_kvcache"),
            &lp,
            FLOAT_TOLERANCE,
        )?;

        // Sampling at a vanishing temperature must pick the argmax every time.
        cfg.sampling = Sampling::full(1e-4);
        cfg.seed = 1234;
        let s = generate(model, &batch, imgs.as_ref(), &cfg, false)?;
        let tokens: Vec<f64> = s.tokens[0].iter().map(|&t| t as f64).collect();
        self.host(
            &format!("{case}.gen.sampling_t0_equals_greedy"),
            &key,
            &tokens,
            0.0,
        )
    }

    /// Scores each batch row's generated tokens after its prompt, all rows in one forward.
    pub(super) fn batch_scoring<B: Backend>(
        &mut self,
        model: &Qwen2VL<B>,
        case: &str,
        owners: &[&str],
        device: &B::Device,
    ) -> Result<(), Qwen2VLError> {
        let fx = self.fixture;
        let key = format!("{case}.token_logprobs");
        if !fx.has(&key)
            || owners
                .iter()
                .any(|c| !fx.has(&format!("{c}.gen.new_tokens")))
        {
            return Ok(());
        }
        let mut prompts = Vec::new();
        let mut completions = Vec::new();
        for c in owners {
            prompts.push(fx.id_rows(&format!("{c}.input_ids"))?.remove(0));
            completions.push(fx.id_rows(&format!("{c}.gen.new_tokens"))?.remove(0));
        }
        let imgs = images::<B>(fx, owners, device)?;
        let pad = model.config.bos_token_id.unwrap_or(0);
        let lp = completion_logprobs(model, &prompts, &completions, imgs.as_ref(), pad)?;
        let (_, values) = host_f32(lp);
        let values: Vec<f64> = values.into_iter().map(f64::from).collect();
        self.host(
            &format!("{case}.scoring.token_logprobs"),
            &key,
            &values,
            FLOAT_TOLERANCE,
        )
    }
}
