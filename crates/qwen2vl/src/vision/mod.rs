//! The vision tower of Qwen2-VL and Qwen2.5-VL: Conv3d patch embedding (as a matrix
//! product), 2-D rotary ViT blocks with per-image (Qwen2.5-VL: mostly per-window) attention,
//! and the PatchMerger.

mod block;
mod merger;
mod window;

pub use block::{quick_gelu, VisionBlock, VisionNorm};
pub use merger::PatchMerger;
pub use window::{window_layout, WindowLayout};

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::config::VisionConfig;
use crate::error::Qwen2VLError;
use crate::params::{Dense, ParamKind, ParamSource};
use crate::rope::{spread_over_heads, vision_patch_positions, vision_tables};

#[derive(Module, Debug)]
pub struct VisionTower<B: Backend> {
    /// The Conv3d kernel flattened to `[patch_dim, embed_dim]`: kernel = stride, so the
    /// convolution is one matrix product per patch.
    pub patch_embed: Linear<B>,
    pub blocks: Vec<VisionBlock<B>>,
    pub merger: PatchMerger<B>,
    #[module(skip)]
    pub config: VisionConfig,
}

/// Intermediate activations, for parity checks.
#[derive(Debug, Clone)]
pub struct VisionTrace<B: Backend> {
    pub patch_embed: Option<Tensor<B, 2>>,
    pub rot_cos: Option<Tensor<B, 2>>,
    pub rot_sin: Option<Tensor<B, 2>>,
    pub blocks: Vec<Tensor<B, 2>>,
    pub merger_ln_q: Option<Tensor<B, 2>>,
}

impl<B: Backend> Default for VisionTrace<B> {
    fn default() -> Self {
        Self {
            patch_embed: None,
            rot_cos: None,
            rot_sin: None,
            blocks: Vec::new(),
            merger_ln_q: None,
        }
    }
}

/// What every vision block of one forward reads: the rotary tables spread over the fused qkv
/// projection's layout, the patch count of each image frame, and with window attention the
/// window order.
#[derive(Debug, Clone)]
pub(crate) struct BlockTables<B: Backend> {
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
    pub segments: Vec<usize>,
    /// Qwen2.5-VL: the blocks run over the patch rows in window order.
    pub window: Option<WindowTables<B>>,
    /// Per block: attention over whole frames (`segments`) rather than windows.
    pub full: Vec<bool>,
}

/// The window order of one forward's patches (Qwen2.5-VL).
#[derive(Debug, Clone)]
pub(crate) struct WindowTables<B: Backend> {
    /// Patch row `r` in window order is row `rows[r]` in the processor's order.
    pub rows: Tensor<B, 1, Int>,
    /// Merged token `j` in the processor's order is token `restore[j]` in window order.
    pub restore: Tensor<B, 1, Int>,
    /// The patch count of each window, in order.
    pub segments: Vec<usize>,
}

impl<B: Backend> BlockTables<B> {
    /// Block `i` of the tower over the patch rows `x`.
    pub fn block(&self, i: usize, block: &VisionBlock<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let segments = match &self.window {
            Some(w) if !self.full[i] => &w.segments,
            _ => &self.segments,
        };
        block.forward(x, self.cos.clone(), self.sin.clone(), segments)
    }

    /// Patch rows in the processor's order, in the order the blocks run over them.
    pub fn to_window_order(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.window {
            Some(w) => x.select(0, w.rows.clone()),
            None => x,
        }
    }

    /// Merged tokens back in the processor's order.
    pub fn to_image_order(&self, merged: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.window {
            Some(w) => merged.select(0, w.restore.clone()),
            None => merged,
        }
    }
}

impl<B: Backend> VisionTower<B> {
    pub fn load<S: ParamSource<B>>(
        src: &mut S,
        prefix: &str,
        config: &VisionConfig,
    ) -> Result<Self, Qwen2VLError> {
        let c = config;
        let e = c.embed_dim;
        let kernel = [
            e,
            c.in_channels,
            c.temporal_patch_size,
            c.patch_size,
            c.patch_size,
        ];
        let patch_dim: usize = kernel[1..].iter().product();
        let w: Tensor<B, 5> = src.tensor(
            &format!("{prefix}.patch_embed.proj.weight"),
            kernel,
            ParamKind::Weight,
        )?;
        let patch_embed = Linear {
            weight: burn::module::Param::from_tensor(crate::params::contiguous(
                w.reshape([e, patch_dim]).transpose(),
            )),
            bias: None,
        };
        let blocks = (0..c.depth)
            .map(|i| VisionBlock::load(src, &format!("{prefix}.blocks.{i}"), c))
            .collect::<Result<Vec<_>, _>>()?;
        let merger = PatchMerger::load(src, &format!("{prefix}.merger"), c)?;
        Ok(Self {
            patch_embed,
            blocks,
            merger,
            config: config.clone(),
        })
    }

    /// Checks `pixel_values` against the grids before any work is done.
    pub fn validate(
        &self,
        pixel_rows: usize,
        pixel_cols: usize,
        grids: &[[usize; 3]],
    ) -> Result<(), Qwen2VLError> {
        let c = &self.config;
        let patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size;
        if pixel_cols != patch_dim {
            return Err(Qwen2VLError::Input(format!(
                "pixel_values rows have {pixel_cols} values, the vision tower expects {patch_dim}"
            )));
        }
        let m = c.spatial_merge_size;
        for (i, [t, h, w]) in grids.iter().enumerate() {
            if *t == 0 || h % m != 0 || w % m != 0 {
                return Err(Qwen2VLError::Input(format!(
                    "image {i}: grid (t={t}, h={h}, w={w}) must have h and w divisible by {m}"
                )));
            }
        }
        let expected: usize = grids.iter().map(|[t, h, w]| t * h * w).sum();
        if expected != pixel_rows {
            return Err(Qwen2VLError::Input(format!(
                "pixel_values has {pixel_rows} patch rows but the image grids describe {expected}"
            )));
        }
        Ok(())
    }

    /// `pixel_values` `[n_patches, patch_dim]` -> image embeddings `[n_patches / merge², hidden]`
    /// (block traces are in the order the blocks run: window order for Qwen2.5-VL).
    pub fn forward(&self, pixel_values: Tensor<B, 2>, grids: &[[usize; 3]]) -> Tensor<B, 2> {
        self.forward_traced(pixel_values, grids, None)
    }

    /// What every block of one forward over images of `grids` reads, and the rotary tables
    /// `[patches, head_dim]` before they are spread over the heads (for traces).
    pub(crate) fn block_tables(
        &self,
        grids: &[[usize; 3]],
        device: &B::Device,
    ) -> (BlockTables<B>, Vec<f32>, Vec<f32>) {
        let c = &self.config;
        let hd = c.embed_dim / c.num_heads;
        let positions = vision_patch_positions(grids, c.spatial_merge_size);
        let n = positions.len();
        let (cos_host, sin_host) = vision_tables(&positions, hd, c.rope_theta);
        let segments: Vec<usize> = grids
            .iter()
            .flat_map(|[t, h, w]| std::iter::repeat_n(h * w, *t))
            .collect();
        // Spread over the fused qkv projection's `[n, 3, heads, hd]` layout: q and k rotated,
        // v passed through (cos 1, sin 0: exact), so the whole projection rotates in one
        // contiguous pass.
        // With windows the blocks see the rows in window order, the tables too.
        let layout = c
            .window_tokens()
            .map(|win| window_layout(grids, c.spatial_merge_size, win));
        let (qkv_cos, qkv_sin) = spread_over_heads(
            &rows_in_order(&cos_host, hd, layout.as_ref()),
            &rows_in_order(&sin_host, hd, layout.as_ref()),
            hd,
            2 * c.num_heads,
            c.num_heads,
        );
        let shape = [n, 3, c.num_heads, hd];
        let index = |v: &[usize]| -> Tensor<B, 1, Int> {
            let v: Vec<i64> = v.iter().map(|&i| i as i64).collect();
            let len = v.len();
            Tensor::from_data(TensorData::new(v, [len]), device)
        };
        let window = layout.map(|l| WindowTables {
            rows: index(&l.rows),
            restore: index(&l.restore),
            segments: l.segments,
        });
        let tables = BlockTables {
            cos: Tensor::from_data(TensorData::new(qkv_cos, shape), device),
            sin: Tensor::from_data(TensorData::new(qkv_sin, shape), device),
            segments,
            window,
            full: (0..c.depth).map(|i| c.full_attention(i)).collect(),
        };
        (tables, cos_host, sin_host)
    }

    pub fn forward_traced(
        &self,
        pixel_values: Tensor<B, 2>,
        grids: &[[usize; 3]],
        mut trace: Option<&mut VisionTrace<B>>,
    ) -> Tensor<B, 2> {
        let device = pixel_values.device();
        let n = pixel_values.dims()[0];
        let hd = self.config.embed_dim / self.config.num_heads;
        let (tables, cos_host, sin_host) = self.block_tables(grids, &device);
        let mut x = self.patch_embed.apply(pixel_values);
        if let Some(t) = trace.as_deref_mut() {
            t.patch_embed = Some(x.clone());
            let table =
                |v: &[f32]| Tensor::from_data(TensorData::new(v.to_vec(), [n, hd]), &device);
            t.rot_cos = Some(table(&cos_host));
            t.rot_sin = Some(table(&sin_host));
        }
        x = tables.to_window_order(x);
        for (i, block) in self.blocks.iter().enumerate() {
            x = tables.block(i, block, x);
            if let Some(t) = trace.as_deref_mut() {
                t.blocks.push(x.clone());
            }
        }
        let (normed, merged) = self.merger.forward(x);
        if let Some(t) = trace {
            t.merger_ln_q = Some(normed);
        }
        tables.to_image_order(merged)
    }
}

/// The rows (of `width` values) of a per-patch table in the order the blocks run over the
/// patches: window order when there are windows, else as they are.
fn rows_in_order<'a>(
    table: &'a [f32],
    width: usize,
    layout: Option<&WindowLayout>,
) -> std::borrow::Cow<'a, [f32]> {
    match layout {
        Some(l) => l
            .rows
            .iter()
            .flat_map(|&r| table[r * width..(r + 1) * width].iter().copied())
            .collect(),
        None => std::borrow::Cow::Borrowed(table),
    }
}
