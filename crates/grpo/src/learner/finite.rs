//! Whether every weight of a module is a finite number: checked before a checkpoint is
//! written, so that a diverged policy never replaces a good one on disk.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, ElementConversion, FloatDType, Tensor};

/// Sums |w| over every float parameter on the device, in f32: NaN and infinity propagate
/// through the sum, so one host read answers for the whole model.
struct AbsSum<B: Backend> {
    total: Option<Tensor<B, 1>>,
}

impl<B: Backend> ModuleVisitor<B> for AbsSum<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let s = param.val().cast(FloatDType::F32).abs().sum();
        self.total = Some(match self.total.take() {
            Some(t) => t + s,
            None => s,
        });
    }
}

/// True when no weight is NaN or infinite (nor so large that their sum overflows f32).
pub fn weights_finite<B: Backend, M: Module<B>>(module: &M) -> bool {
    let mut v = AbsSum::<B> { total: None };
    module.visit(&mut v);
    v.total
        .is_none_or(|t| t.into_scalar().elem::<f32>().is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::nn::LinearConfig;
    use burn::tensor::TensorData;

    #[test]
    fn one_nan_or_infinity_anywhere_is_found() {
        let device = Default::default();
        let model = LinearConfig::new(3, 2).init::<Flex>(&device);
        assert!(weights_finite(&model));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut m = model.clone();
            let mut w = m
                .bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            w[1] = bad;
            m.bias = Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(w, [2]),
                &device,
            )));
            assert!(!weights_finite(&m), "{bad} not found");
        }
    }
}
