//! Models, gradients and tensors moved between the devices of one backend, for data-parallel
//! steps. On its own device nothing moves; to another device values go through host memory:
//! CubeCL 0.10 copies between two devices of a backend (`send`/`recv`) only on CUDA, and WGPU's
//! server leaves them unimplemented, so Burn's `to_device` would panic there.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Int, Tensor};
use qwen2vl::Qwen2VL;

/// `t` on `device`: itself when it is there, else a copy through host memory (a new leaf,
/// outside any autodiff graph).
pub fn tensor_to<B: Backend, const D: usize, K>(
    t: Tensor<B, D, K>,
    device: &B::Device,
) -> Tensor<B, D, K>
where
    K: burn::tensor::BasicOps<B>,
{
    if &t.device() == device {
        t
    } else {
        Tensor::from_data(t.into_data(), device)
    }
}

/// Moves every parameter, keeping its id and whether it takes gradients.
struct ToDevice<'a, B: Backend> {
    device: &'a B::Device,
}

impl<B: Backend> ModuleMapper<B> for ToDevice<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.map(|t| {
            let grad = t.is_require_grad();
            let moved = tensor_to(t.detach(), self.device);
            if grad {
                moved.require_grad()
            } else {
                moved
            }
        })
    }

    fn map_int<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Int>>,
    ) -> Param<Tensor<B, D, Int>> {
        param.map(|t| tensor_to(t, self.device))
    }

    fn map_bool<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Bool>>,
    ) -> Param<Tensor<B, D, Bool>> {
        param.map(|t| tensor_to(t, self.device))
    }
}

/// `model` on `device`, its parameters keeping their ids (gradients taken on the copy sum
/// into the original's) and whether they take gradients (a frozen LoRA base stays frozen).
pub fn model_to<B: Backend>(model: Qwen2VL<B>, device: &B::Device) -> Qwen2VL<B> {
    if model.devices().iter().all(|d| d == device) {
        return model;
    }
    model.map(&mut ToDevice { device })
}

/// Moves each parameter's gradient, found by the parameters of `model`.
struct GradsTo<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradsTo<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, tensor_to(g, self.device));
        }
    }
}

/// The gradients of `model`'s parameters on `device`.
pub fn grads_to<B: AutodiffBackend>(
    mut grads: GradientsParams,
    device: &B::Device,
    model: &Qwen2VL<B>,
) -> GradientsParams {
    model.visit(&mut GradsTo {
        grads: &mut grads,
        device,
    });
    grads
}
