//! PatchMerger: the tower's norm (LayerNorm in Qwen2-VL, RMSNorm in Qwen2.5-VL), then each 2x2
//! block of patches (consecutive rows) is concatenated and projected to the text width by a
//! 2-layer MLP with exact (erf) GELU.

use burn::module::Module;
use burn::tensor::{activation::gelu, backend::Backend, Tensor};

use super::block::VisionNorm;
use crate::config::VisionConfig;
use crate::error::Qwen2VLError;
use crate::lora::Proj;
use crate::params::{proj, Dense, ParamSource};

#[derive(Module, Debug)]
pub struct PatchMerger<B: Backend> {
    pub ln_q: VisionNorm<B>,
    pub fc1: Proj<B>,
    pub fc2: Proj<B>,
    pub merged_dim: usize,
}

impl<B: Backend> PatchMerger<B> {
    pub fn load<S: ParamSource<B>>(
        src: &mut S,
        prefix: &str,
        config: &VisionConfig,
    ) -> Result<Self, Qwen2VLError> {
        let (dim, merge, out_dim) = (
            config.embed_dim,
            config.spatial_merge_size,
            config.hidden_size,
        );
        let merged_dim = dim * merge * merge;
        Ok(Self {
            ln_q: VisionNorm::load(src, &format!("{prefix}.ln_q"), dim, config)?,
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

    /// The norm's output (`[n, dim]`) and merged embeddings (`[n / merge², out_dim]`).
    pub fn forward(&self, x: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let normed = self.ln_q.forward(x);
        let [n, dim] = normed.dims();
        let groups = n * dim / self.merged_dim;
        let merged = normed.clone().reshape([groups, self.merged_dim]);
        let out = self.fc2.apply(gelu(self.fc1.apply(merged)));
        (normed, out)
    }
}
