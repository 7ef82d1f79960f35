//! PatchMerger: LayerNorm, then each 2x2 block of patches (consecutive rows) is concatenated and
//! projected to the text width by a 2-layer MLP with exact (erf) GELU.

use burn::module::Module;
use burn::nn::LayerNorm;
use burn::tensor::{activation::gelu, backend::Backend, Tensor};

use crate::error::Qwen2VLError;
use crate::lora::Proj;
use crate::params::{layer_norm, proj, Dense, ParamSource};

#[derive(Module, Debug)]
pub struct PatchMerger<B: Backend> {
    pub ln_q: LayerNorm<B>,
    pub fc1: Proj<B>,
    pub fc2: Proj<B>,
    pub merged_dim: usize,
}

impl<B: Backend> PatchMerger<B> {
    pub fn load<S: ParamSource<B>>(
        src: &mut S,
        prefix: &str,
        dim: usize,
        merge: usize,
        out_dim: usize,
    ) -> Result<Self, Qwen2VLError> {
        let merged_dim = dim * merge * merge;
        Ok(Self {
            ln_q: layer_norm(src, &format!("{prefix}.ln_q"), dim, 1e-6)?,
            fc1: proj(
                src,
                &format!("{prefix}.mlp.0"),
                merged_dim,
                merged_dim,
                true,
            )?,
            fc2: proj(src, &format!("{prefix}.mlp.2"), merged_dim, out_dim, true)?,
            merged_dim,
        })
    }

    /// LayerNorm output (`[n, dim]`) and merged embeddings (`[n / merge², out_dim]`).
    pub fn forward(&self, x: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let normed = self.ln_q.forward(x);
        let [n, dim] = normed.dims();
        let groups = n * dim / self.merged_dim;
        let merged = normed.clone().reshape([groups, self.merged_dim]);
        let out = self.fc2.apply(gelu(self.fc1.apply(merged)));
        (normed, out)
    }
}
