//! One pre-LayerNorm ViT block: full (non-causal) attention within each image, QuickGELU MLP.

use burn::module::Module;
use burn::nn::LayerNorm;
use burn::tensor::{activation::sigmoid, backend::Backend, Tensor};

use crate::attention::{apply_rotary, scaled_dot_product};
use crate::error::Qwen2VLError;
use crate::lora::Proj;
use crate::params::{layer_norm, proj, Dense, ParamSource};

#[derive(Module, Debug)]
pub struct VisionBlock<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub qkv: Proj<B>,
    pub proj: Proj<B>,
    pub norm2: LayerNorm<B>,
    pub fc1: Proj<B>,
    pub fc2: Proj<B>,
    pub num_heads: usize,
}

/// `z * sigmoid(1.702 z)`.
pub fn quick_gelu<B: Backend, const D: usize>(z: Tensor<B, D>) -> Tensor<B, D> {
    z.clone() * sigmoid(z * 1.702)
}

impl<B: Backend> VisionBlock<B> {
    pub fn load<S: ParamSource<B>>(
        src: &mut S,
        prefix: &str,
        dim: usize,
        num_heads: usize,
        mlp_dim: usize,
    ) -> Result<Self, Qwen2VLError> {
        Ok(Self {
            norm1: layer_norm(src, &format!("{prefix}.norm1"), dim, 1e-6)?,
            qkv: proj(src, &format!("{prefix}.attn.qkv"), dim, 3 * dim, true)?,
            proj: proj(src, &format!("{prefix}.attn.proj"), dim, dim, true)?,
            norm2: layer_norm(src, &format!("{prefix}.norm2"), dim, 1e-6)?,
            fc1: proj(src, &format!("{prefix}.mlp.fc1"), dim, mlp_dim, true)?,
            fc2: proj(src, &format!("{prefix}.mlp.fc2"), mlp_dim, dim, true)?,
            num_heads,
        })
    }

    /// `x` is `[n_patches, dim]`; `cos`/`sin` are `[n_patches, 3, heads, head_dim]` (spread
    /// over the fused qkv projection, sin folded: see [`spread_over_heads`](crate::rope::spread_over_heads)); `segments` are
    /// the patch counts of each image frame, in order (attention never crosses them).
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        segments: &[usize],
    ) -> Tensor<B, 2> {
        let h = self.attention(self.norm1.forward(x.clone()), cos, sin, segments);
        let x = x + h;
        let m = self
            .fc2
            .apply(quick_gelu(self.fc1.apply(self.norm2.forward(x.clone()))));
        x + m
    }

    fn attention(
        &self,
        x: Tensor<B, 2>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        segments: &[usize],
    ) -> Tensor<B, 2> {
        let [n, dim] = x.dims();
        let heads = self.num_heads;
        let hd = dim / heads;
        // q and k rotated, v passed through, in one pass over the fused projection (the tables
        // are spread over its `[n, 3, heads, hd]` layout).
        let qkv = apply_rotary(self.qkv.apply(x).reshape([n, 3, heads, hd]), cos, sin);
        let q = qkv.clone().narrow(1, 0, 1).reshape([n, heads, hd]);
        let k = qkv.clone().narrow(1, 1, 1).reshape([n, heads, hd]);
        let v = qkv.narrow(1, 2, 1).reshape([n, heads, hd]);

        // Runs of equally sized segments are attended as one batch.
        let mut outputs = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < segments.len() {
            let len = segments[i];
            let mut count = 1;
            while i + count < segments.len() && segments[i + count] == len {
                count += 1;
            }
            let rows = len * count;
            let split = |t: &Tensor<B, 3>| -> Tensor<B, 4> {
                t.clone()
                    .narrow(0, start, rows)
                    .reshape([count, len, heads, hd])
                    .swap_dims(1, 2)
            };
            let o = scaled_dot_product(split(&q), split(&k), split(&v), None);
            outputs.push(o.swap_dims(1, 2).reshape([rows, dim]));
            start += rows;
            i += count;
        }
        let o = if outputs.len() == 1 {
            outputs.pop().expect("one output")
        } else {
            Tensor::cat(outputs, 0)
        };
        self.proj.apply(o)
    }
}
