//! The Qwen2 text decoder with multimodal rotary positions.

mod layer;

pub use layer::{DecoderLayer, Keys, LayerKv, RopeTables};

use burn::module::Module;
use burn::nn::{Embedding, RmsNorm};
use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};

use crate::attention::score_bias;
use crate::config::TextConfig;
use crate::error::Qwen2VLError;
use crate::params::{embedding, rms_norm, ParamSource};
use crate::positions::{RopePositions, TokenBatch};
use crate::rope::{mrope_tables, spread_over_heads};

#[derive(Module, Debug)]
pub struct TextDecoder<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    #[module(skip)]
    pub config: TextConfig,
}

impl<B: Backend> TextDecoder<B> {
    pub fn load<S: ParamSource<B>>(
        src: &mut S,
        prefix: &str,
        c: &TextConfig,
    ) -> Result<Self, Qwen2VLError> {
        let embed_tokens = embedding(
            src,
            &format!("{prefix}.embed_tokens.weight"),
            c.vocab_size,
            c.hidden_size,
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::load(src, &format!("{prefix}.layers.{i}"), c))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = rms_norm(
            src,
            &format!("{prefix}.norm.weight"),
            c.hidden_size,
            c.rms_norm_eps,
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            config: c.clone(),
        })
    }

    /// Rotary tables `[batch, 1, len, head_dim]` for positions laid out `[3][batch * len]`.
    pub fn rope_tables(
        &self,
        positions: [&[i64]; 3],
        batch: usize,
        len: usize,
        device: &B::Device,
    ) -> RopeTables<B> {
        let c = &self.config;
        let (cos, sin) = mrope_tables(positions, c.head_dim, c.rope_theta, c.mrope_section);
        let spread = |heads: usize| -> (Tensor<B, 4>, Tensor<B, 4>) {
            let (cos, sin) = spread_over_heads(&cos, &sin, c.head_dim, heads, 0);
            let shape = [batch, len, heads, c.head_dim];
            (
                Tensor::from_data(TensorData::new(cos, shape), device),
                Tensor::from_data(TensorData::new(sin, shape), device),
            )
        };
        let (q_cos, q_sin) = spread(c.num_attention_heads);
        let (k_cos, k_sin) = if c.num_key_value_heads == c.num_attention_heads {
            (q_cos.clone(), q_sin.clone())
        } else {
            spread(c.num_key_value_heads)
        };
        RopeTables {
            q_cos,
            q_sin,
            k_cos,
            k_sin,
        }
    }

    /// The rotary tables as transformers' rotary embedding returns them (`[batch, 1, len,
    /// head_dim]`, cos and sin), for parity traces.
    pub fn plain_rope_tables(
        &self,
        positions: [&[i64]; 3],
        batch: usize,
        len: usize,
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let c = &self.config;
        let (cos, sin) = mrope_tables(positions, c.head_dim, c.rope_theta, c.mrope_section);
        let shape = [batch, 1, len, c.head_dim];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }

    /// The attention mask (`[batch, 1, len, keys]`, true where masked) as every layer adds it.
    pub(crate) fn score_bias(&self, masked: Tensor<B, 4, Bool>) -> Tensor<B, 4> {
        score_bias(
            masked,
            self.config.num_attention_heads,
            self.config.num_key_value_heads,
        )
    }

    /// Runs every layer over `embeds` (`[batch, len, hidden]`); returns the final-normed hidden
    /// states and, when asked, each layer's output.
    pub fn forward(
        &self,
        embeds: Tensor<B, 3>,
        rope: &RopeTables<B>,
        masked: Option<Tensor<B, 4, Bool>>,
        mut layer_outputs: Option<&mut Vec<Tensor<B, 3>>>,
    ) -> Tensor<B, 3> {
        let bias = masked.map(|m| self.score_bias(m));
        let mut h = embeds;
        for layer in &self.layers {
            h = layer.forward(h, rope, bias.as_ref(), Keys::Own);
            if let Some(out) = layer_outputs.as_deref_mut() {
                out.push(h.clone());
            }
        }
        self.norm.forward(h)
    }

    /// [`Self::forward`] that also returns every layer's post-RoPE keys and values: a prompt
    /// run once, for the completions that [`Self::forward_after`] scores after it.
    pub fn forward_keep(
        &self,
        embeds: Tensor<B, 3>,
        rope: &RopeTables<B>,
        masked: Option<Tensor<B, 4, Bool>>,
    ) -> (Tensor<B, 3>, Vec<LayerKv<B>>) {
        let bias = masked.map(|m| self.score_bias(m));
        let mut kept = Vec::with_capacity(self.layers.len());
        let mut h = embeds;
        for layer in &self.layers {
            h = layer.forward(h, rope, bias.as_ref(), Keys::Keep(&mut kept));
        }
        (self.norm.forward(h), kept)
    }

    /// Runs `embeds` (`[rows, len, hidden]`) as the tokens after a prefix whose keys and values
    /// per layer are `prefix` (from [`Self::forward_keep`], `[prefix rows, ..]`): row `r`
    /// continues prefix row `rows[r]`. `masked` is `[rows, 1, len, prefix_len + len]`.
    pub fn forward_after(
        &self,
        embeds: Tensor<B, 3>,
        rope: &RopeTables<B>,
        masked: Tensor<B, 4, Bool>,
        prefix: &[LayerKv<B>],
        rows: Tensor<B, 1, Int>,
    ) -> Tensor<B, 3> {
        assert_eq!(
            prefix.len(),
            self.layers.len(),
            "one prefix entry per layer"
        );
        let bias = self.score_bias(masked);
        let mut h = embeds;
        for (layer, kv) in self.layers.iter().zip(prefix) {
            h = layer.forward(h, rope, Some(&bias), Keys::After(kv, rows.clone()));
        }
        self.norm.forward(h)
    }
}

/// Causal attention mask with key padding, `[batch, 1, len, len]`, true where masked.
/// A query always sees itself, so padded rows stay finite.
pub fn causal_padding_mask<B: Backend>(
    batch: &TokenBatch,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let l = batch.len;
    let mut masked = Vec::with_capacity(batch.batch * l * l);
    for b in 0..batch.batch {
        let valid = batch.mask_row(b);
        for i in 0..l {
            masked.extend(
                valid
                    .iter()
                    .enumerate()
                    .map(|(j, &v)| j > i || (v == 0 && j != i)),
            );
        }
    }
    Tensor::from_data(TensorData::new(masked, [batch.batch, 1, l, l]), device)
}

/// Positions as `[3][batch * len]` slices.
pub fn position_axes(p: &RopePositions) -> [&[i64]; 3] {
    [&p.axes[0], &p.axes[1], &p.axes[2]]
}

/// Keys and values of every layer for a batch, pre-allocated at a fixed capacity. `len` slots
/// are filled; attention masks the rest, so shapes stay the same from step to step.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<LayerKv<B>>,
    pub len: usize,
    pub capacity: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(config: &TextConfig, batch: usize, capacity: usize, device: &B::Device) -> Self {
        let shape = [batch, config.num_key_value_heads, capacity, config.head_dim];
        let layers = (0..config.num_hidden_layers)
            .map(|_| LayerKv {
                k: Tensor::zeros(shape, device),
                v: Tensor::zeros(shape, device),
            })
            .collect();
        Self {
            layers,
            len: 0,
            capacity,
        }
    }
}

impl<B: Backend> TextDecoder<B> {
    /// Runs `embeds` (`[batch, len, hidden]`) as the next tokens after the cache's content,
    /// appending their keys and values. `masked` covers the cache's whole capacity:
    /// `[batch, 1, len, capacity]`.
    pub fn forward_cached(
        &self,
        embeds: Tensor<B, 3>,
        rope: &RopeTables<B>,
        masked: Tensor<B, 4, Bool>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let l = embeds.dims()[1];
        assert!(
            cache.len + l <= cache.capacity,
            "KV cache overflow: {} + {l} > {}",
            cache.len,
            cache.capacity
        );
        let bias = self.score_bias(masked);
        let mut h = embeds;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward(h, rope, Some(&bias), Keys::Cache(kv, cache.len));
        }
        cache.len += l;
        self.norm.forward(h)
    }
}
