//! Where parameter values come from when a model is built.
//!
//! The model is assembled once, tensor by tensor, by asking a [`ParamSource`] for each named
//! parameter in checkpoint (hub) naming and shape. A checkpoint reader and a random initialiser
//! are two sources, so loading never allocates a throw-away random model first.

use burn::module::Param;
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear, RmsNorm};
use burn::tensor::{backend::Backend, Distribution, Tensor};

use crate::error::Qwen2VLError;
use crate::lora::Proj;

/// What a parameter is, so that a random initialiser can pick the right distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A projection matrix: normal(0, initializer_range).
    Weight,
    /// A bias: zeros.
    Bias,
    /// A normalisation scale: ones.
    NormScale,
    /// A normalisation shift: zeros.
    NormShift,
}

/// Supplies parameter values by checkpoint key.
pub trait ParamSource<B: Backend> {
    /// The tensor stored under `key`, which must have exactly `shape` (checkpoint orientation:
    /// linear weights are `[out, in]`).
    /// The values flattened to one dimension.
    fn take(
        &mut self,
        key: &str,
        shape: &[usize],
        kind: ParamKind,
    ) -> Result<Tensor<B, 1>, Qwen2VLError>;

    fn device(&self) -> &B::Device;

    fn tensor<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        kind: ParamKind,
    ) -> Result<Tensor<B, D>, Qwen2VLError> {
        Ok(self.take(key, &shape, kind)?.reshape(shape))
    }
}

/// Random initialisation as transformers does it for Qwen2-VL (`_init_weights`): normal(0, std)
/// weights, zero biases, unit norms. Seeded through the backend's seed.
pub struct RandomInit<B: Backend> {
    pub std: f64,
    pub device: B::Device,
}

impl<B: Backend> ParamSource<B> for RandomInit<B> {
    fn take(
        &mut self,
        _key: &str,
        shape: &[usize],
        kind: ParamKind,
    ) -> Result<Tensor<B, 1>, Qwen2VLError> {
        Ok(match kind {
            ParamKind::Weight => Tensor::random(
                [shape.iter().product::<usize>()],
                Distribution::Normal(0.0, self.std),
                &self.device,
            ),
            ParamKind::Bias | ParamKind::NormShift => {
                Tensor::zeros([shape.iter().product::<usize>()], &self.device)
            }
            ParamKind::NormScale => Tensor::ones([shape.iter().product::<usize>()], &self.device),
        })
    }

    fn device(&self) -> &B::Device {
        &self.device
    }
}

/// `t` laid out densely in its own shape. A transposed view would otherwise be copied by
/// every reshape of it: Burn's `linear` reshapes its weight on each call, so a strided weight
/// costs a copy of itself per call (at 2B, gigabytes per decoded token). Done once, at load;
/// the optimizer's element-wise updates keep the layout.
pub fn contiguous<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    let device = t.device();
    Tensor::from_data(t.into_data(), &device)
}

/// A `Linear` applied as one 2-D matrix product over the flattened leading axes. Burn's
/// `Linear::forward` (0.21) reshapes the weight to the input's rank on every call and its
/// backward reshapes the transposed weight, which copies a strided weight each time; a 2-D
/// `matmul` reads either layout in place, forward and backward.
pub trait Dense<B: Backend> {
    fn apply<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>;
}

impl<B: Backend> Dense<B> for Linear<B> {
    fn apply<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let d_in = dims[D - 1];
        let rows: usize = dims[..D - 1].iter().product();
        let w = self.weight.val();
        dims[D - 1] = w.dims()[1];
        let y = x.reshape([rows, d_in]).matmul(w);
        let y = match &self.bias {
            Some(b) => y + b.val().unsqueeze_dim::<2>(0),
            None => y,
        };
        y.reshape(dims)
    }
}

/// `{prefix}.weight` `[out, in]` (and `{prefix}.bias`) as a Burn `Linear` (`[in, out]`,
/// dense in that layout).
pub fn linear<B: Backend, S: ParamSource<B>>(
    src: &mut S,
    prefix: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
) -> Result<Linear<B>, Qwen2VLError> {
    let weight: Tensor<B, 2> = src.tensor(
        &format!("{prefix}.weight"),
        [d_out, d_in],
        ParamKind::Weight,
    )?;
    let bias = if bias {
        Some(Param::from_tensor(src.tensor(
            &format!("{prefix}.bias"),
            [d_out],
            ParamKind::Bias,
        )?))
    } else {
        None
    };
    Ok(Linear {
        weight: Param::from_tensor(contiguous(weight.transpose())),
        bias,
    })
}

/// [`linear`] as a [`Proj`] without an adapter.
pub fn proj<B: Backend, S: ParamSource<B>>(
    src: &mut S,
    prefix: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
) -> Result<Proj<B>, Qwen2VLError> {
    Ok(Proj::new(linear(src, prefix, d_in, d_out, bias)?))
}

/// LayerNorm with affine scale and shift.
pub fn layer_norm<B: Backend, S: ParamSource<B>>(
    src: &mut S,
    prefix: &str,
    dim: usize,
    eps: f64,
) -> Result<LayerNorm<B>, Qwen2VLError> {
    let gamma = src.tensor(&format!("{prefix}.weight"), [dim], ParamKind::NormScale)?;
    let beta = src.tensor(&format!("{prefix}.bias"), [dim], ParamKind::NormShift)?;
    // LayerNorm keeps its epsilon private: build it, then put the loaded values in.
    let mut norm = LayerNormConfig::new(dim)
        .with_epsilon(eps)
        .init(src.device());
    norm.gamma = Param::from_tensor(gamma);
    norm.beta = Some(Param::from_tensor(beta));
    Ok(norm)
}

pub fn rms_norm<B: Backend, S: ParamSource<B>>(
    src: &mut S,
    key: &str,
    dim: usize,
    eps: f64,
) -> Result<RmsNorm<B>, Qwen2VLError> {
    Ok(RmsNorm {
        gamma: Param::from_tensor(src.tensor(key, [dim], ParamKind::NormScale)?),
        epsilon: eps,
    })
}

pub fn embedding<B: Backend, S: ParamSource<B>>(
    src: &mut S,
    key: &str,
    rows: usize,
    dim: usize,
) -> Result<Embedding<B>, Qwen2VLError> {
    Ok(Embedding {
        weight: Param::from_tensor(src.tensor(key, [rows, dim], ParamKind::Weight)?),
    })
}
