//! One pre-norm ViT block: attention within each image (or, in Qwen2.5-VL's windowed blocks,
//! within each window), then the MLP: Qwen2-VL's QuickGELU `fc2(quick_gelu(fc1 x))` or
//! Qwen2.5-VL's gated `down_proj(silu(gate_proj x) * up_proj x)`.

use burn::module::Module;
use burn::nn::{LayerNorm, RmsNorm};
use burn::tensor::{
    activation::{sigmoid, silu},
    backend::Backend,
    Tensor,
};

use crate::attention::{apply_rotary, scaled_dot_product};
use crate::config::{VisionConfig, VisionKind};
use crate::error::Qwen2VLError;
use crate::lora::Proj;
use crate::params::{layer_norm, proj, rms_norm, Dense, ParamSource};

/// The vision tower's norm: Qwen2-VL's LayerNorm or Qwen2.5-VL's RMSNorm (both eps 1e-6).
#[derive(Module, Debug)]
pub enum VisionNorm<B: Backend> {
    Layer(LayerNorm<B>),
    Rms(RmsNorm<B>),
}

impl<B: Backend> VisionNorm<B> {
    pub fn load<S: ParamSource<B>>(
        src: &mut S,
        prefix: &str,
        dim: usize,
        config: &VisionConfig,
    ) -> Result<Self, Qwen2VLError> {
        Ok(match config.kind {
            VisionKind::Qwen2VL => VisionNorm::Layer(layer_norm(src, prefix, dim, 1e-6)?),
            VisionKind::Qwen25VL { .. } => {
                VisionNorm::Rms(rms_norm(src, &format!("{prefix}.weight"), dim, 1e-6)?)
            }
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            VisionNorm::Layer(n) => n.forward(x),
            VisionNorm::Rms(n) => n.forward(x),
        }
    }
}

#[derive(Module, Debug)]
pub struct VisionBlock<B: Backend> {
    pub norm1: VisionNorm<B>,
    pub qkv: Proj<B>,
    pub proj: Proj<B>,
    pub norm2: VisionNorm<B>,
    /// Qwen2-VL's `mlp.fc1`, Qwen2.5-VL's `mlp.up_proj`.
    pub fc1: Proj<B>,
    /// Qwen2-VL's `mlp.fc2`, Qwen2.5-VL's `mlp.down_proj`.
    pub fc2: Proj<B>,
    /// Qwen2.5-VL's `mlp.gate_proj`; none in Qwen2-VL.
    pub gate: Option<Proj<B>>,
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
        config: &VisionConfig,
    ) -> Result<Self, Qwen2VLError> {
        let (dim, mlp_dim) = (config.embed_dim, config.mlp_dim());
        let norm1 = VisionNorm::load(src, &format!("{prefix}.norm1"), dim, config)?;
        let qkv = proj(src, &format!("{prefix}.attn.qkv"), dim, 3 * dim, true)?;
        let attn_proj = proj(src, &format!("{prefix}.attn.proj"), dim, dim, true)?;
        let norm2 = VisionNorm::load(src, &format!("{prefix}.norm2"), dim, config)?;
        let (fc1, fc2, gate) = match config.kind {
            VisionKind::Qwen2VL => (
                proj(src, &format!("{prefix}.mlp.fc1"), dim, mlp_dim, true)?,
                proj(src, &format!("{prefix}.mlp.fc2"), mlp_dim, dim, true)?,
                None,
            ),
            VisionKind::Qwen25VL { .. } => {
                let gate = proj(src, &format!("{prefix}.mlp.gate_proj"), dim, mlp_dim, true)?;
                let up = proj(src, &format!("{prefix}.mlp.up_proj"), dim, mlp_dim, true)?;
                let down = proj(src, &format!("{prefix}.mlp.down_proj"), mlp_dim, dim, true)?;
                (up, down, Some(gate))
            }
        };
        Ok(Self {
            norm1,
            qkv,
            proj: attn_proj,
            norm2,
            fc1,
            fc2,
            gate,
            num_heads: config.num_heads,
        })
    }

    /// The block's projections under their checkpoint names (after `blocks.{i}.`), in
    /// checkpoint order.
    pub fn projections(&self) -> Vec<(&'static str, &Proj<B>)> {
        let mut out = vec![("attn.qkv", &self.qkv), ("attn.proj", &self.proj)];
        match &self.gate {
            None => out.extend([("mlp.fc1", &self.fc1), ("mlp.fc2", &self.fc2)]),
            Some(gate) => out.extend([
                ("mlp.gate_proj", gate),
                ("mlp.up_proj", &self.fc1),
                ("mlp.down_proj", &self.fc2),
            ]),
        }
        out
    }

    /// [`Self::projections`], mutable.
    pub fn projections_mut(&mut self) -> Vec<(&'static str, &mut Proj<B>)> {
        let Self {
            qkv,
            proj,
            fc1,
            fc2,
            gate,
            ..
        } = self;
        let mut out = vec![("attn.qkv", qkv), ("attn.proj", proj)];
        match gate {
            None => out.extend([("mlp.fc1", fc1), ("mlp.fc2", fc2)]),
            Some(gate) => out.extend([
                ("mlp.gate_proj", gate),
                ("mlp.up_proj", fc1),
                ("mlp.down_proj", fc2),
            ]),
        }
        out
    }

    /// `x` is `[n_patches, dim]`; `cos`/`sin` are `[n_patches, 3, heads, head_dim]` (spread
    /// over the fused qkv projection, sin folded: see [`spread_over_heads`](crate::rope::spread_over_heads)); `segments` are
    /// the patch counts of the runs of rows that attend to each other, in order (attention
    /// never crosses them).
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        segments: &[usize],
    ) -> Tensor<B, 2> {
        let h = self.attention(self.norm1.forward(x.clone()), cos, sin, segments);
        let x = x + h;
        let normed = self.norm2.forward(x.clone());
        let m = match &self.gate {
            None => self.fc2.apply(quick_gelu(self.fc1.apply(normed))),
            Some(gate) => {
                let gated = silu(gate.apply(normed.clone())) * self.fc1.apply(normed);
                self.fc2.apply(gated)
            }
        };
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
