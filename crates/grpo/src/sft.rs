//! Supervised fine-tuning on the same data path: cross-entropy of the completion tokens only
//! (the paper's SFT baseline, and the warm start of tiny models).

use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{backend::AutodiffBackend, ElementConversion, Tensor, TensorData};
use qwen2vl::generation::completion_logprobs;
use qwen2vl::{Qwen2VL, Qwen2VLError};

use crate::learner::{clip_global_norm, images_of, PromptInput};
use crate::loss::masked_mean;

/// Mean negative log-likelihood of `targets` after each prompt (per sequence, then over the
/// batch), and one optimizer step on it. Returns the model, the loss before the step and the
/// gradient norm. A loss or gradient norm that is not a finite number skips the step: the
/// model and the optimizer state come back untouched (the caller sees the value).
#[allow(clippy::too_many_arguments)]
pub fn sft_step<B: AutodiffBackend, O: Optimizer<Qwen2VL<B>, B>>(
    model: Qwen2VL<B>,
    optimizer: &mut O,
    prompts: &[PromptInput],
    targets: &[Vec<u32>],
    lr: f64,
    max_grad_norm: f32,
    pad_id: u32,
    device: &B::Device,
) -> Result<(Qwen2VL<B>, f32, f32), Qwen2VLError> {
    let (loss, _) = sft_loss(&model, prompts, targets, pad_id, device)?;
    let value: f32 = loss.clone().into_scalar().elem();
    let grads = loss.backward();
    let mut grads = GradientsParams::from_grads(grads, &model);
    let norm = clip_global_norm(&model, &mut grads, max_grad_norm);
    if !(value.is_finite() && norm.is_finite()) {
        return Ok((model, value, norm));
    }
    Ok((optimizer.step(lr, model, grads), value, norm))
}

/// The SFT loss (differentiable) and the number of target tokens.
pub fn sft_loss<B: burn::tensor::backend::Backend>(
    model: &Qwen2VL<B>,
    prompts: &[PromptInput],
    targets: &[Vec<u32>],
    pad_id: u32,
    device: &B::Device,
) -> Result<(Tensor<B, 1>, usize), Qwen2VLError> {
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let refs: Vec<&PromptInput> = prompts.iter().collect();
    let logp = completion_logprobs(
        model,
        &ids,
        targets,
        images_of::<B>(&refs, device)?.as_ref(),
        pad_id,
    )?;
    let [n, t] = logp.dims();
    let mask: Vec<f32> = targets
        .iter()
        .flat_map(|c| (0..t).map(move |i| if i < c.len() { 1.0 } else { 0.0 }))
        .collect();
    let count = targets.iter().map(Vec::len).sum();
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [n, t]), device);
    Ok((masked_mean(logp.neg(), mask, true), count))
}
