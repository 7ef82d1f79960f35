//! `Qwen2VLForConditionalGeneration`: vision tower + text decoder + LM head.

use burn::module::{Module, ParamId};
use burn::nn::Linear;
use burn::optim::GradientsParams;
use burn::tensor::{
    backend::AutodiffBackend, backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData,
};

use crate::config::Qwen2VLConfig;
use crate::error::Qwen2VLError;
use crate::params::{linear, Dense, ParamSource, RandomInit};
use crate::positions::{rope_index, RopePositions, TokenBatch, VisionTokens};
use crate::processor::ProcessedImage;
use crate::text::{causal_padding_mask, position_axes, TextDecoder};
use crate::vision::{VisionTower, VisionTrace};

#[derive(Module, Debug)]
pub struct Qwen2VL<B: Backend> {
    pub visual: VisionTower<B>,
    pub text: TextDecoder<B>,
    /// Absent when tied to the token embeddings.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub config: Qwen2VLConfig,
}

/// Images of a batch: patch rows of all images concatenated in row order, and their grids.
#[derive(Debug, Clone)]
pub struct Images<B: Backend> {
    pub pixel_values: Tensor<B, 2>,
    pub grids: Vec<[usize; 3]>,
}

impl<B: Backend> Images<B> {
    /// The patch rows of `images`, in order, uploaded to `device` in one transfer (`None`
    /// without images). Every image must have the same patch width.
    pub fn from_processed<'a, I>(
        images: I,
        device: &B::Device,
    ) -> Result<Option<Self>, Qwen2VLError>
    where
        I: IntoIterator<Item = &'a ProcessedImage>,
    {
        let images: Vec<&ProcessedImage> = images.into_iter().collect();
        let Some(first) = images.first() else {
            return Ok(None);
        };
        let dim = first.patch_dim;
        if let Some(other) = images.iter().find(|im| im.patch_dim != dim) {
            return Err(Qwen2VLError::Input(format!(
                "images of one batch have patch widths {dim} and {}: they come from different \
                 processor settings",
                other.patch_dim
            )));
        }
        let rows: usize = images.iter().map(|im| im.rows()).sum();
        let mut pixels = Vec::with_capacity(rows * dim);
        for im in &images {
            pixels.extend_from_slice(&im.pixel_values);
        }
        Ok(Some(Self {
            pixel_values: Tensor::from_data(TensorData::new(pixels, [rows, dim]), device),
            grids: images.iter().map(|im| im.grid).collect(),
        }))
    }

    /// These images on the autodiff backend over `B` (no copy: the same device buffers).
    pub fn into_autodiff<A: burn::tensor::backend::AutodiffBackend<InnerBackend = B>>(
        self,
    ) -> Images<A> {
        Images {
            pixel_values: Tensor::from_inner(self.pixel_values),
            grids: self.grids,
        }
    }
}

/// Each batch's token embeddings, and the rows as their own leaf when the table trains
/// ([`Qwen2VL::token_embeddings_sparse`]).
pub type SparseLookup<B> = (Vec<Tensor<B, 3>>, Option<EmbeddingRows<B>>);

/// The token-embedding rows one training pass looked up, as a leaf of the graph
/// ([`Qwen2VL::token_embeddings_sparse`]), with the ids they came from.
#[derive(Debug, Clone)]
pub struct EmbeddingRows<B: Backend> {
    rows: Tensor<B, 2>,
    ids: Tensor<B, 1, Int>,
    param: ParamId,
    vocab: usize,
}

impl<A: AutodiffBackend> EmbeddingRows<A> {
    /// The rows' gradient, taken out of `grads` (before
    /// [`GradientsParams::from_grads`] consumes them); `None` when the loss did not reach
    /// them.
    pub fn take_grad(self, grads: &mut A::Gradients) -> Option<EmbeddingGrad<A::InnerBackend>> {
        let rows = self.rows.grad_remove(grads)?;
        Some(EmbeddingGrad {
            rows,
            ids: self.ids.inner(),
            param: self.param,
            vocab: self.vocab,
        })
    }
}

/// The gradient of the token-embedding rows one pass looked up ([`EmbeddingRows`]).
#[derive(Debug, Clone)]
pub struct EmbeddingGrad<B: Backend> {
    rows: Tensor<B, 2>,
    ids: Tensor<B, 1, Int>,
    param: ParamId,
    vocab: usize,
}

impl<B: Backend> EmbeddingGrad<B> {
    /// Adds the rows into the embedding table's gradient in `params` (which holds the tied LM
    /// head's part when the head is the table; zero when it holds none), row by row: what
    /// the lookup's own backward pass would have added.
    pub fn add_to(self, params: &mut GradientsParams) {
        let table = params.remove::<B, 2>(self.param).unwrap_or_else(|| {
            let d = self.rows.dims()[1];
            Tensor::zeros([self.vocab, d], &self.rows.device())
        });
        let table = table.select_assign(0, self.ids, self.rows, IndexingUpdateOp::Add);
        params.register::<B, 2>(self.param, table);
    }
}

/// A batch ready for the decoder ([`Qwen2VL::prepare_inputs`]).
#[derive(Debug, Clone)]
pub struct PreparedInputs<B: Backend> {
    /// `[batch, len, hidden]`, images in place.
    pub embeds: Tensor<B, 3>,
    pub positions: RopePositions,
    pub device: B::Device,
}

impl<B: Backend> PreparedInputs<B> {
    /// The position each row continues at: one past its largest position on any axis
    /// (transformers' `max_position_ids + 1`, what decoding and scoring after the row use).
    pub fn next_positions(&self, batch: &TokenBatch) -> Vec<i64> {
        next_positions(&self.positions, batch)
    }
}

/// The position each row of `batch` continues at, from its M-RoPE `positions`
/// ([`PreparedInputs::next_positions`]).
pub(crate) fn next_positions(positions: &RopePositions, batch: &TokenBatch) -> Vec<i64> {
    let l = batch.len;
    (0..batch.batch)
        .map(|r| {
            let valid = batch.mask_row(r);
            (0..l)
                .filter(|&i| valid[i] != 0)
                .map(|i| {
                    positions
                        .axes
                        .iter()
                        .map(|a| a[r * l + i])
                        .max()
                        .unwrap_or(0)
                })
                .max()
                .map_or(0, |m| m + 1)
        })
        .collect()
}

/// Intermediate activations of one forward, for parity checks.
#[derive(Debug, Clone)]
pub struct ModelTrace<B: Backend> {
    pub vision: VisionTrace<B>,
    pub image_embeds: Option<Tensor<B, 2>>,
    pub inputs_embeds: Option<Tensor<B, 3>>,
    pub positions: Option<RopePositions>,
    pub rope_cos: Option<Tensor<B, 4>>,
    pub rope_sin: Option<Tensor<B, 4>>,
    pub layers: Vec<Tensor<B, 3>>,
    pub final_norm: Option<Tensor<B, 3>>,
}

impl<B: Backend> Default for ModelTrace<B> {
    fn default() -> Self {
        Self {
            vision: VisionTrace::default(),
            image_embeds: None,
            inputs_embeds: None,
            positions: None,
            rope_cos: None,
            rope_sin: None,
            layers: Vec::new(),
            final_norm: None,
        }
    }
}

/// Rows up to which a tied head multiplies as `(W h^T)^T` (see [`Qwen2VL::logits`]).
pub const DENSE_HEAD_ROWS: usize = 64;

impl<B: Backend> Qwen2VL<B> {
    /// Builds the model from a parameter source using checkpoint (hub) names.
    pub fn load_from<S: ParamSource<B>>(
        src: &mut S,
        config: &Qwen2VLConfig,
    ) -> Result<Self, Qwen2VLError> {
        let visual = VisionTower::load(src, "visual", &config.vision)?;
        let text = TextDecoder::load(src, "model", &config.text)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            let t = &config.text;
            Some(linear(src, "lm_head", t.hidden_size, t.vocab_size, false)?)
        };
        Ok(Self {
            visual,
            text,
            lm_head,
            config: config.clone(),
        })
    }

    /// A freshly initialised model (normal(0, 0.02) weights, as transformers initialises).
    pub fn random(config: &Qwen2VLConfig, device: &B::Device) -> Self {
        let mut src = RandomInit {
            std: 0.02,
            device: device.clone(),
        };
        Self::load_from(&mut src, config).expect("random initialisation cannot fail")
    }

    pub fn vision_tokens(&self) -> VisionTokens {
        VisionTokens {
            image_token_id: self.config.image_token_id,
            video_token_id: self.config.video_token_id,
            spatial_merge_size: self.config.vision.spatial_merge_size,
        }
    }

    /// Token embeddings with each image placeholder replaced, in order, by the image embeddings.
    pub fn embed(
        &self,
        batch: &TokenBatch,
        image_embeds: Option<Tensor<B, 2>>,
        device: &B::Device,
    ) -> Result<Tensor<B, 3>, Qwen2VLError> {
        let text = self.token_embeddings(&[batch], device)?.remove(0);
        self.place_images(batch, text, image_embeds, device)
    }

    /// The token embeddings `[batch, len, hidden]` of each of `batches`, from one lookup in
    /// the table: in training, one scatter of the table's gradient (a table-sized buffer on the
    /// CPU backend) instead of one per batch.
    pub fn token_embeddings(
        &self,
        batches: &[&TokenBatch],
        device: &B::Device,
    ) -> Result<Vec<Tensor<B, 3>>, Qwen2VLError> {
        let ids = self.lookup_ids(batches)?;
        let total = ids.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, total]), device);
        let table = self.text.embed_tokens.forward(ids);
        Ok(self.split_lookup(batches, table))
    }

    /// [`Self::token_embeddings`] for a training pass whose table trains, with the lookup
    /// outside the graph: the looked-up rows are a leaf of their own ([`EmbeddingRows`]), so
    /// the backward pass gives their gradient, `[tokens, hidden]`, instead of scattering it
    /// into a table-sized buffer (on the CPU backend a zeroed, copied and added 151,936-row
    /// buffer per pass); [`EmbeddingRows::take_grad`] and [`EmbeddingGrad::add_to`] add those
    /// rows into the table's gradient. When the table does not train: the plain lookup, no
    /// rows.
    pub fn token_embeddings_sparse(
        &self,
        batches: &[&TokenBatch],
        device: &B::Device,
    ) -> Result<SparseLookup<B>, Qwen2VLError> {
        let weight = &self.text.embed_tokens.weight;
        if !weight.is_require_grad() {
            return Ok((self.token_embeddings(batches, device)?, None));
        }
        let ids = self.lookup_ids(batches)?;
        let total = ids.len();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [total]), device);
        let rows = weight
            .val()
            .detach()
            .select(0, ids.clone())
            // A leaf of its own (the result of an op is not one, even outside the graph).
            .detach()
            .require_grad();
        let parts = self.split_lookup(batches, rows.clone().unsqueeze_dim(0));
        Ok((
            parts,
            Some(EmbeddingRows {
                rows,
                ids,
                param: weight.id,
                vocab: self.config.text.vocab_size,
            }),
        ))
    }

    /// Every batch validated, their token ids in order, each inside the vocabulary.
    fn lookup_ids(&self, batches: &[&TokenBatch]) -> Result<Vec<i64>, Qwen2VLError> {
        for b in batches {
            b.validate()?;
        }
        let vocab = self.config.text.vocab_size;
        let ids = batches.iter().flat_map(|b| &b.ids);
        if let Some(bad) = ids.clone().find(|&&id| id as usize >= vocab) {
            return Err(Qwen2VLError::Input(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        Ok(ids.map(|&i| i as i64).collect())
    }

    /// One lookup's rows, `[1, tokens, hidden]`, cut into each batch's `[batch, len, hidden]`.
    fn split_lookup(&self, batches: &[&TokenBatch], table: Tensor<B, 3>) -> Vec<Tensor<B, 3>> {
        let d = self.config.text.hidden_size;
        let mut start = 0;
        batches
            .iter()
            .map(|b| {
                let n = b.batch * b.len;
                let part = table
                    .clone()
                    .narrow(1, start, n)
                    .reshape([b.batch, b.len, d]);
                start += n;
                part
            })
            .collect()
    }

    /// `text` (a batch's token embeddings) with each image placeholder replaced, in order, by
    /// the image embeddings.
    pub(crate) fn place_images(
        &self,
        batch: &TokenBatch,
        text: Tensor<B, 3>,
        image_embeds: Option<Tensor<B, 2>>,
        device: &B::Device,
    ) -> Result<Tensor<B, 3>, Qwen2VLError> {
        let (b, l) = (batch.batch, batch.len);
        let d = self.config.text.hidden_size;
        let image_token = self.config.image_token_id;
        let slots: Vec<usize> = (0..b * l)
            .filter(|&i| batch.ids[i] == image_token)
            .collect();
        let n_images = image_embeds.as_ref().map_or(0, |e| e.dims()[0]);
        if slots.len() != n_images {
            return Err(Qwen2VLError::Input(format!(
                "the token ids hold {} image placeholders but the images give {n_images} embeddings",
                slots.len()
            )));
        }
        let Some(image_embeds) = image_embeds.filter(|_| n_images > 0) else {
            return Ok(text);
        };
        // Gather from [text rows | image rows]: slot p takes text row p or image row k.
        let mut index: Vec<i64> = (0..(b * l) as i64).collect();
        for (k, &p) in slots.iter().enumerate() {
            index[p] = (b * l + k) as i64;
        }
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [b * l]), device);
        let rows = Tensor::cat(vec![text.reshape([b * l, d]), image_embeds], 0);
        Ok(rows.select(0, index).reshape([b, l, d]))
    }

    /// The device a batch's inputs go to: the images' when there are any, else the model's.
    pub fn input_device(&self, images: Option<&Images<B>>) -> B::Device {
        match images {
            Some(im) => im.pixel_values.device(),
            None => self.text.embed_tokens.weight.val().device(),
        }
    }

    /// A batch made ready for the decoder: the image placeholders replaced by the vision
    /// tower's embeddings, and the M-RoPE positions. The one input preparation of the model's
    /// forward, of generation and of scoring.
    pub fn prepare_inputs(
        &self,
        batch: &TokenBatch,
        images: Option<&Images<B>>,
        trace: Option<&mut ModelTrace<B>>,
    ) -> Result<PreparedInputs<B>, Qwen2VLError> {
        let device = self.input_device(images);
        let text = self.token_embeddings(&[batch], &device)?.remove(0);
        self.prepare_looked_up(batch, text, images, trace)
    }

    /// [`Self::prepare_inputs`] for a batch whose token embeddings `text` were already looked
    /// up ([`Self::token_embeddings`], on [`Self::input_device`]).
    pub fn prepare_looked_up(
        &self,
        batch: &TokenBatch,
        text: Tensor<B, 3>,
        images: Option<&Images<B>>,
        mut trace: Option<&mut ModelTrace<B>>,
    ) -> Result<PreparedInputs<B>, Qwen2VLError> {
        batch.validate()?;
        let device = self.input_device(images);
        let grids: &[[usize; 3]] = images.map_or(&[], |im| &im.grids);
        let positions = rope_index(batch, grids, self.vision_tokens())?;
        let image_embeds = match images {
            Some(im) if !im.grids.is_empty() => {
                let [rows, cols] = im.pixel_values.dims();
                self.visual.validate(rows, cols, &im.grids)?;
                let vt = trace.as_deref_mut().map(|t| &mut t.vision);
                Some(
                    self.visual
                        .forward_traced(im.pixel_values.clone(), &im.grids, vt),
                )
            }
            _ => None,
        };
        if let Some(t) = trace {
            t.image_embeds = image_embeds.clone();
        }
        let embeds = self.place_images(batch, text, image_embeds, &device)?;
        Ok(PreparedInputs {
            embeds,
            positions,
            device,
        })
    }

    /// Final-normed hidden states `[batch, len, hidden]` of a left-padded batch.
    // ANCHOR: forward_hidden
    pub fn forward_hidden(
        &self,
        batch: &TokenBatch,
        images: Option<&Images<B>>,
        mut trace: Option<&mut ModelTrace<B>>,
    ) -> Result<Tensor<B, 3>, Qwen2VLError> {
        let PreparedInputs {
            embeds,
            positions,
            device,
        } = self.prepare_inputs(batch, images, trace.as_deref_mut())?;
        let rope =
            self.text
                .rope_tables(position_axes(&positions), batch.batch, batch.len, &device);
        let masked = causal_padding_mask::<B>(batch, &device);
        let layers = match trace.as_deref_mut() {
            Some(t) => {
                t.inputs_embeds = Some(embeds.clone());
                let (cos, sin) = self.text.plain_rope_tables(
                    position_axes(&positions),
                    batch.batch,
                    batch.len,
                    &device,
                );
                t.rope_cos = Some(cos);
                t.rope_sin = Some(sin);
                t.positions = Some(positions.clone());
                Some(&mut t.layers)
            }
            None => None,
        };
        let hidden = self.text.forward(embeds, &rope, Some(masked), layers);
        if let Some(t) = trace {
            t.final_norm = Some(hidden.clone());
        }
        Ok(hidden)
    }
    // ANCHOR_END: forward_hidden

    /// Logits from final hidden states: `[.., hidden] -> [.., vocab]`.
    ///
    /// Rows up to [`DENSE_HEAD_ROWS`] take the decoding form of a tied head.
    pub fn logits<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        match &self.lm_head {
            Some(head) => head.apply(hidden),
            None => {
                let w = self.text.embed_tokens.weight.val();
                let dims = hidden.dims();
                let d = dims[D - 1];
                let rows: usize = dims[..D - 1].iter().product();
                let h = hidden.reshape([rows, d]);
                // For a few rows (decoding) `(W h^T)^T`: the embedding is read in its own
                // row-major layout, where as the transposed right operand the matmul repacked
                // all of it per call (at 107M two thirds of a decode step). For many rows
                // (scoring) that packing is amortised, and `h W^T` gives the dense
                // `[rows, vocab]` that log-softmax and its backward want.
                let out = if rows <= DENSE_HEAD_ROWS {
                    w.matmul(h.transpose()).transpose()
                } else {
                    h.matmul(w.transpose())
                };
                let mut shape = dims;
                shape[D - 1] = self.config.text.vocab_size;
                out.reshape(shape)
            }
        }
    }

    /// Logits `[batch, len, vocab]` of a left-padded batch.
    pub fn forward(
        &self,
        batch: &TokenBatch,
        images: Option<&Images<B>>,
    ) -> Result<Tensor<B, 3>, Qwen2VLError> {
        Ok(self.logits(self.forward_hidden(batch, images, None)?))
    }
}
