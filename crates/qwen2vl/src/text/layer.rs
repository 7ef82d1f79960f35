//! One Qwen2 decoder layer: RMSNorm, grouped-query attention with q/k/v bias and M-RoPE,
//! RMSNorm, SwiGLU MLP.

use burn::module::Module;
use burn::nn::RmsNorm;
use burn::tensor::{activation::silu, backend::Backend, Int, Tensor};

use crate::attention::{apply_rotary, scaled_dot_product_biased};
use crate::config::TextConfig;
use crate::error::Qwen2VLError;
use crate::lora::Proj;
use crate::params::{proj, rms_norm, Dense, ParamSource};

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub q_proj: Proj<B>,
    pub k_proj: Proj<B>,
    pub v_proj: Proj<B>,
    pub o_proj: Proj<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub gate_proj: Proj<B>,
    pub up_proj: Proj<B>,
    pub down_proj: Proj<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// One layer's cached keys and values, `[batch, kv_heads, capacity, head_dim]`.
#[derive(Debug, Clone)]
pub struct LayerKv<B: Backend> {
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
}

/// Where a layer's attention takes its keys and values from, besides the input's own.
pub enum Keys<'a, B: Backend> {
    /// Only the input's own tokens.
    Own,
    /// The input's own, and this layer's post-RoPE keys and values are pushed to the list (a
    /// shared prompt's, for the completions scored after it).
    Keep(&'a mut Vec<LayerKv<B>>),
    /// Written into a fixed-capacity cache at the offset; the queries attend over the whole
    /// cache.
    Cache(&'a mut LayerKv<B>, usize),
    /// A prefix's keys and values (`[prefix rows, kv_heads, prefix_len, head_dim]`) come
    /// before the input's own: input row `r` continues prefix row `rows[r]`. Gradients reach
    /// the prefix through the row selection (summed over the rows that share it).
    After(&'a LayerKv<B>, Tensor<B, 1, Int>),
}

/// Rotary tables for the tokens of one forward, spread over the heads in the layout the
/// projections give (`[batch, len, heads, head_dim]`, sin folded: see
/// [`spread_over_heads`](crate::rope::spread_over_heads)): one pair for the query heads, one
/// for the key-value heads.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    pub q_cos: Tensor<B, 4>,
    pub q_sin: Tensor<B, 4>,
    pub k_cos: Tensor<B, 4>,
    pub k_sin: Tensor<B, 4>,
}

impl<B: Backend> DecoderLayer<B> {
    pub fn load<S: ParamSource<B>>(
        src: &mut S,
        prefix: &str,
        c: &TextConfig,
    ) -> Result<Self, Qwen2VLError> {
        let d = c.hidden_size;
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        let i = c.intermediate_size;
        let eps = c.rms_norm_eps;
        Ok(Self {
            input_layernorm: rms_norm(src, &format!("{prefix}.input_layernorm.weight"), d, eps)?,
            q_proj: proj(src, &format!("{prefix}.self_attn.q_proj"), d, q, true)?,
            k_proj: proj(src, &format!("{prefix}.self_attn.k_proj"), d, kv, true)?,
            v_proj: proj(src, &format!("{prefix}.self_attn.v_proj"), d, kv, true)?,
            o_proj: proj(src, &format!("{prefix}.self_attn.o_proj"), q, d, false)?,
            post_attention_layernorm: rms_norm(
                src,
                &format!("{prefix}.post_attention_layernorm.weight"),
                d,
                eps,
            )?,
            gate_proj: proj(src, &format!("{prefix}.mlp.gate_proj"), d, i, false)?,
            up_proj: proj(src, &format!("{prefix}.mlp.up_proj"), d, i, false)?,
            down_proj: proj(src, &format!("{prefix}.mlp.down_proj"), i, d, false)?,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        })
    }

    /// `x` is `[batch, len, hidden]`; `bias` is the attention mask as a
    /// [`crate::attention::score_bias`] over `keys` (made once per forward by the decoder).
    /// With [`Keys::Own`] the keys are `x`'s own; with a cache, the post-RoPE
    /// keys and values of `x` are written into it at its fill offset and the queries attend
    /// over its whole (fixed) capacity, so every decoding step has the same shapes; after a
    /// prefix, the keys are the prefix's followed by `x`'s own.
    // ANCHOR: decoder_layer
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        bias: Option<&Tensor<B, 4>>,
        keys: Keys<'_, B>,
    ) -> Tensor<B, 3> {
        let [b, l, _] = x.dims();
        let a = self.input_layernorm.forward(x.clone());
        // Rotated as the projections lay the heads out (`[b, l, heads, d]`, contiguous), then
        // viewed head-major for the attention.
        let heads =
            |t: Tensor<B, 3>, n: usize| -> Tensor<B, 4> { t.reshape([b, l, n, self.head_dim]) };
        let q = heads(self.q_proj.apply(a.clone()), self.num_heads);
        let k = heads(self.k_proj.apply(a.clone()), self.num_kv_heads);
        let v = heads(self.v_proj.apply(a), self.num_kv_heads).swap_dims(1, 2);
        let q = apply_rotary(q, rope.q_cos.clone(), rope.q_sin.clone()).swap_dims(1, 2);
        let k = apply_rotary(k, rope.k_cos.clone(), rope.k_sin.clone()).swap_dims(1, 2);
        let (k_all, v_all) = match keys {
            Keys::Cache(kv, offset) => {
                let range = [
                    0..b,
                    0..self.num_kv_heads,
                    offset..offset + l,
                    0..self.head_dim,
                ];
                // Moved out (not cloned) so that the cache is the buffer's only owner and the
                // new keys are written in place: a clone made slice_assign copy the whole
                // fixed-capacity cache of every layer at every step.
                let device = k.device();
                let old_k = std::mem::replace(&mut kv.k, Tensor::empty([0, 0, 0, 0], &device));
                let old_v = std::mem::replace(&mut kv.v, Tensor::empty([0, 0, 0, 0], &device));
                kv.k = old_k.slice_assign(range.clone(), k);
                kv.v = old_v.slice_assign(range, v);
                (kv.k.clone(), kv.v.clone())
            }
            Keys::Own => (k, v),
            Keys::Keep(kept) => {
                kept.push(LayerKv {
                    k: k.clone(),
                    v: v.clone(),
                });
                (k, v)
            }
            Keys::After(prefix, rows) => (
                Tensor::cat(vec![prefix.k.clone().select(0, rows.clone()), k], 2),
                Tensor::cat(vec![prefix.v.clone().select(0, rows), v], 2),
            ),
        };
        let o = scaled_dot_product_biased(q, k_all, v_all, bias);
        let o = o
            .swap_dims(1, 2)
            .reshape([b, l, self.num_heads * self.head_dim]);
        let x = x + self.o_proj.apply(o);
        let m = self.post_attention_layernorm.forward(x.clone());
        let m = self
            .down_proj
            .apply(silu(self.gate_proj.apply(m.clone())) * self.up_proj.apply(m));
        x + m
    }
    // ANCHOR_END: decoder_layer
}
