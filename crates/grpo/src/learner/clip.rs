//! Global-norm gradient clipping (PyTorch's `clip_grad_norm_`): Burn 0.21 clips per parameter
//! only.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{backend::AutodiffBackend, FloatDType, Tensor};

/// Sums the squared gradients on the device, in f32: one host read for the whole model
/// instead of one per parameter tensor (hundreds at 2B, each a device sync).
struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            // In f32 whatever the gradient's type: a bf16 sum of squares over millions of
            // values would lose most of its digits.
            let s = g.cast(FloatDType::F32).powi_scalar(2).sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f32,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads
                .register::<B::InnerBackend, D>(param.id, g * self.factor);
        }
    }
}

use burn::tensor::ElementConversion;

/// Scales all gradients so that their joint L2 norm is at most `max_norm`; returns the norm
/// before clipping.
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f32,
) -> f32 {
    let mut n = SquaredNorm::<B> { grads, total: None };
    module.visit(&mut n);
    let norm = n
        .total
        .map_or(0.0, |t| t.into_scalar().elem::<f32>().sqrt());
    if max_norm > 0.0 && norm > max_norm {
        let mut s = Scale {
            grads,
            factor: max_norm / (norm + 1e-6),
        };
        module.visit(&mut s);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::{Linear, LinearConfig};

    type A = Autodiff<Flex>;

    fn host_norm(model: &Linear<A>, grads: &GradientsParams) -> f64 {
        let mut sq = 0f64;
        let w = grads.get::<Flex, 2>(model.weight.id).unwrap();
        let b = grads
            .get::<Flex, 1>(model.bias.as_ref().unwrap().id)
            .unwrap();
        for v in w.into_data().to_vec::<f32>().unwrap() {
            sq += (v as f64).powi(2);
        }
        for v in b.into_data().to_vec::<f32>().unwrap() {
            sq += (v as f64).powi(2);
        }
        sq.sqrt()
    }

    #[test]
    fn the_norm_covers_every_parameter_and_clipping_scales_to_the_limit() {
        let device = Default::default();
        let model = LinearConfig::new(3, 2).init::<A>(&device);
        let x = Tensor::<A, 2>::from_floats([[1.0, -2.0, 3.0], [0.5, 0.25, -1.0]], &device);
        let loss = (model.forward(x) * 3.0).powi_scalar(2).sum();
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let want = host_norm(&model, &grads);
        assert!(want > 1.0, "the test needs a norm above the limit: {want}");
        let got = clip_global_norm(&model, &mut grads, 0.5);
        assert!(((got as f64) - want).abs() < 1e-4 * want, "{got} vs {want}");
        let after = host_norm(&model, &grads);
        assert!((after - 0.5).abs() < 1e-5, "clipped norm {after}");
        // Below the limit nothing changes.
        let again = clip_global_norm(&model, &mut grads, 10.0);
        assert!((again as f64 - after).abs() < 1e-6);
        assert!((host_norm(&model, &grads) - after).abs() < 1e-9);
    }
}
