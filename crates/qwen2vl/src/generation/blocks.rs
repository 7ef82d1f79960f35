//! A scoring pass as a chain of blocks (patch embedding, vision blocks, the merge into the
//! token embeddings, decoder layers, the final norm), run straight through by
//! [`ScoringBatch::hidden`], or with activation checkpointing: the blocks chosen by
//! [`Recompute`] keep only their input going forward and run again, with the graph, one at a
//! time in the backward pass ([`ScoringBatch::hidden_recomputed`],
//! [`ScoringBatch::backward_recomputed`]). Both run the same block functions on the same
//! inputs, so the values and gradients are the plain pass's.

use std::cell::RefCell;

use burn::tensor::{backend::AutodiffBackend, backend::Backend, Bool, Int, Tensor, TensorData};

use super::scoring::{Layout, ScoringBatch};
use crate::error::Qwen2VLError;
use crate::model::{next_positions, EmbeddingRows, Images, Qwen2VL};
use crate::positions::{rope_index, TokenBatch};
use crate::text::{causal_padding_mask, position_axes, Keys, RopeTables};
use crate::vision::BlockTables;

/// Which blocks of a scoring pass are recomputed in the backward pass instead of keeping
/// their activations (both off: the plain pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recompute {
    /// Each decoder layer, and the final norm.
    pub decoder: bool,
    /// The patch embedding, each vision block, and the merge into the token embeddings.
    pub vision: bool,
}

impl Recompute {
    pub fn any(&self) -> bool {
        self.decoder || self.vision
    }
}

#[derive(Debug, Clone, Copy)]
enum Block {
    PatchEmbed,
    Vision(usize),
    /// The merger, the token embeddings and the images put in place.
    Merge,
    Layer(usize),
    Final,
}

/// Whether any float parameter of a module takes gradients.
struct Trains(bool);

impl<B: Backend> burn::module::ModuleVisitor<B> for Trains {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
        self.0 |= param.is_require_grad();
    }
}

fn trains<B: Backend, M: burn::module::Module<B>>(m: &M) -> bool {
    let mut v = Trains(false);
    m.visit(&mut v);
    v.0
}

impl Block {
    /// Whether this block of `model` has parameters that take gradients.
    fn trains<B: Backend>(self, model: &Qwen2VL<B>) -> bool {
        match self {
            Block::PatchEmbed => trains(&model.visual.patch_embed),
            Block::Vision(i) => trains(&model.visual.blocks[i]),
            Block::Merge => trains(&model.visual.merger) || trains(&model.text.embed_tokens),
            Block::Layer(i) => trains(&model.text.layers[i]),
            Block::Final => trains(&model.text.norm),
        }
    }

    fn recomputed(self, r: Recompute) -> bool {
        match self {
            Block::PatchEmbed | Block::Vision(_) | Block::Merge => r.vision,
            Block::Layer(_) | Block::Final => r.decoder,
        }
    }
}

/// What flows from one block to the next.
#[derive(Debug, Clone)]
enum Flow<B: Backend> {
    /// A batch without images starts at the embedding lookup.
    Start,
    /// The vision tower's patch rows, `[patches, dim]`.
    Patches(Tensor<B, 2>),
    /// Decoder states: the layout's rows (prompt rows when grouped), and the grouped
    /// completions after them.
    Text {
        rows: Tensor<B, 3>,
        after: Option<Tensor<B, 3>>,
    },
    /// The final hidden states that predict the completion slots, `[rows, width, hidden]`.
    Hidden(Tensor<B, 3>),
}

impl<B: Backend> Flow<B> {
    /// These values as the inputs of a block on the autodiff backend over `B`, tracked when
    /// `track` (so that their gradient can be read).
    fn leaf<A: AutodiffBackend<InnerBackend = B>>(&self, track: bool) -> Flow<A> {
        fn lift<A: AutodiffBackend, const D: usize>(
            t: &Tensor<A::InnerBackend, D>,
            track: bool,
        ) -> Tensor<A, D> {
            let t = Tensor::from_inner(t.clone());
            if track {
                t.require_grad()
            } else {
                t
            }
        }
        match self {
            Flow::Start => Flow::Start,
            Flow::Patches(x) => Flow::Patches(lift::<A, 2>(x, track)),
            Flow::Text { rows, after } => Flow::Text {
                rows: lift::<A, 3>(rows, track),
                after: after.as_ref().map(|a| lift::<A, 3>(a, track)),
            },
            Flow::Hidden(h) => Flow::Hidden(lift::<A, 3>(h, track)),
        }
    }

    fn into_hidden(self) -> Tensor<B, 3> {
        match self {
            Flow::Hidden(h) => h,
            _ => unreachable!("the final block gives the hidden states"),
        }
    }
}

impl<A: AutodiffBackend> Flow<A> {
    /// The values, outside the graph.
    fn values(&self) -> Flow<A::InnerBackend> {
        match self {
            Flow::Start => Flow::Start,
            Flow::Patches(x) => Flow::Patches(x.clone().inner()),
            Flow::Text { rows, after } => Flow::Text {
                rows: rows.clone().inner(),
                after: after.as_ref().map(|a| a.clone().inner()),
            },
            Flow::Hidden(h) => Flow::Hidden(h.clone().inner()),
        }
    }

    /// The gradients of these (tracked) leaves in `grads` (zero where none reached them).
    fn grad(&self, grads: &A::Gradients) -> Flow<A::InnerBackend> {
        fn of<A: AutodiffBackend, const D: usize>(
            t: &Tensor<A, D>,
            grads: &A::Gradients,
        ) -> Tensor<A::InnerBackend, D> {
            t.grad(grads)
                .unwrap_or_else(|| t.clone().inner().zeros_like())
        }
        match self {
            Flow::Start => Flow::Start,
            Flow::Patches(x) => Flow::Patches(of(x, grads)),
            Flow::Text { rows, after } => Flow::Text {
                rows: of(rows, grads),
                after: after.as_ref().map(|a| of(a, grads)),
            },
            Flow::Hidden(h) => Flow::Hidden(of(h, grads)),
        }
    }

    /// `sum(self * grad)`: its gradient with respect to the block's inputs and parameters
    /// is what `grad`, the gradient of the loss with respect to these outputs, gives them.
    fn dot(&self, grad: &Flow<A::InnerBackend>) -> Option<Tensor<A, 1>> {
        fn d<A: AutodiffBackend, const D: usize>(
            t: &Tensor<A, D>,
            g: &Tensor<A::InnerBackend, D>,
        ) -> Tensor<A, 1> {
            (t.clone() * Tensor::from_inner(g.clone())).sum()
        }
        match (self, grad) {
            (Flow::Patches(x), Flow::Patches(g)) => Some(d(x, g)),
            (Flow::Hidden(h), Flow::Hidden(g)) => Some(d(h, g)),
            (
                Flow::Text { rows, after },
                Flow::Text {
                    rows: gr,
                    after: ga,
                },
            ) => {
                let s = d(rows, gr);
                Some(match (after, ga) {
                    (Some(a), Some(g)) => s + d(a, g),
                    _ => s,
                })
            }
            _ => None,
        }
    }
}

/// What the blocks of one pass read besides their inputs.
#[derive(Debug, Clone)]
struct Context<B: Backend> {
    grids: Vec<[usize; 3]>,
    vision: Option<BlockTables<B>>,
    /// The layout's rows (prompt rows when grouped).
    rope: RopeTables<B>,
    bias: Tensor<B, 4>,
    /// Grouped: each completion row's prompt row.
    prompt_of: Option<Tensor<B, 1, Int>>,
    /// Grouped, with completion tokens to run: their positions and mask after the prompts.
    after: Option<(RopeTables<B>, Tensor<B, 4>)>,
    /// Set for a pass whose token embeddings are looked up as their own leaf
    /// ([`Qwen2VL::token_embeddings_sparse`]): the merge leaves the rows here.
    embedding_rows: Option<RefCell<Option<EmbeddingRows<B>>>>,
}

/// One block of a checkpointed pass, as the backward pass finds it.
enum Taped<A: AutodiffBackend> {
    /// Neither it nor any block before it trains (a frozen vision tower under LoRA): run
    /// without a graph, and the backward pass stops here.
    Frozen,
    /// Run again from its input; whether a block before it trains (its input's gradient is
    /// needed).
    Recompute(Block, Flow<A::InnerBackend>, bool),
    /// Kept with its graph, from leaves tracked when a block before it trains.
    Kept {
        inputs: Flow<A>,
        outputs: Flow<A>,
        upstream: bool,
    },
}

/// What [`ScoringBatch::backward_recomputed`] needs of a checkpointed forward pass.
pub struct Tape<A: AutodiffBackend> {
    blocks: Vec<Taped<A>>,
    context: Context<A>,
}

impl ScoringBatch {
    /// The rows the decoder runs over: the joined rows, or the prompt rows when grouped.
    fn decoder_rows(&self) -> &TokenBatch {
        match &self.layout {
            Layout::Joined { batch, .. } => batch,
            Layout::Grouped { prompts, .. } => prompts,
        }
    }

    fn context<B: Backend>(
        &self,
        model: &Qwen2VL<B>,
        images: Option<&Images<B>>,
    ) -> Result<Context<B>, Qwen2VLError> {
        let device = model.input_device(images);
        let rows = self.decoder_rows();
        rows.validate()?;
        let grids: Vec<[usize; 3]> = images.map_or(Vec::new(), |im| im.grids.clone());
        let vision = match images {
            Some(im) if !im.grids.is_empty() => {
                let [n, cols] = im.pixel_values.dims();
                model.visual.validate(n, cols, &im.grids)?;
                Some(model.visual.block_tables(&im.grids, &device).0)
            }
            _ => None,
        };
        let positions = rope_index(rows, &grids, model.vision_tokens())?;
        let rope = model
            .text
            .rope_tables(position_axes(&positions), rows.batch, rows.len, &device);
        let bias = model
            .text
            .score_bias(causal_padding_mask::<B>(rows, &device));
        let (prompt_of, after) = match &self.layout {
            Layout::Joined { .. } => (None, None),
            Layout::Grouped {
                prompts,
                completions,
                group,
            } => {
                let (n, tc, group) = (completions.batch, completions.len, *group);
                let of_prompt: Vec<i64> = (0..n).map(|r| (r / group) as i64).collect();
                let prompt_of = Tensor::from_data(TensorData::new(of_prompt, [n]), &device);
                let after = (tc > 1).then(|| {
                    let next = next_positions(&positions, prompts);
                    let pos: Vec<i64> = (0..n)
                        .flat_map(|r| {
                            let start = next[r / group];
                            (0..tc as i64).map(move |t| t + start)
                        })
                        .collect();
                    let rope = model.text.rope_tables([&pos, &pos, &pos], n, tc, &device);
                    let masked = after_prefix_mask::<B>(prompts, group, tc, &device);
                    (rope, model.text.score_bias(masked))
                });
                (Some(prompt_of), after)
            }
        };
        Ok(Context {
            grids,
            vision,
            rope,
            bias,
            prompt_of,
            after,
            embedding_rows: None,
        })
    }

    /// The pass's blocks in order, and its first input.
    fn plan<B: Backend>(
        &self,
        model: &Qwen2VL<B>,
        images: Option<&Images<B>>,
        context: &Context<B>,
    ) -> (Vec<Block>, Flow<B>) {
        let mut blocks = Vec::new();
        let start = match (images, &context.vision) {
            (Some(im), Some(_)) => {
                blocks.push(Block::PatchEmbed);
                blocks.extend((0..model.visual.blocks.len()).map(Block::Vision));
                Flow::Patches(im.pixel_values.clone())
            }
            _ => Flow::Start,
        };
        blocks.push(Block::Merge);
        blocks.extend((0..model.text.layers.len()).map(Block::Layer));
        blocks.push(Block::Final);
        (blocks, start)
    }

    fn run_block<B: Backend>(
        &self,
        model: &Qwen2VL<B>,
        context: &Context<B>,
        block: Block,
        input: Flow<B>,
    ) -> Result<Flow<B>, Qwen2VLError> {
        let flow = match (block, input) {
            (Block::PatchEmbed, Flow::Patches(p)) => {
                let tables = context.vision.as_ref().expect("images");
                let x = crate::params::Dense::apply(&model.visual.patch_embed, p);
                Flow::Patches(tables.to_window_order(x))
            }
            (Block::Vision(i), Flow::Patches(x)) => {
                let tables = context.vision.as_ref().expect("images");
                Flow::Patches(tables.block(i, &model.visual.blocks[i], x))
            }
            (Block::Merge, input) => {
                let image_embeds = match input {
                    Flow::Patches(x) => {
                        let tables = context.vision.as_ref().expect("images");
                        Some(tables.to_image_order(model.visual.merger.forward(x).1))
                    }
                    _ => None,
                };
                self.merge(model, context, image_embeds)?
            }
            (Block::Layer(i), Flow::Text { rows, after }) => {
                let layer = &model.text.layers[i];
                match (&context.prompt_of, &context.after, after) {
                    (Some(prompt_of), Some((rope, bias)), Some(after)) => {
                        let mut kept = Vec::with_capacity(1);
                        let rows = layer.forward(
                            rows,
                            &context.rope,
                            Some(&context.bias),
                            Keys::Keep(&mut kept),
                        );
                        let kv = kept.pop().expect("the layer's keys and values");
                        let after = layer.forward(
                            after,
                            rope,
                            Some(bias),
                            Keys::After(&kv, prompt_of.clone()),
                        );
                        Flow::Text {
                            rows,
                            after: Some(after),
                        }
                    }
                    _ => Flow::Text {
                        rows: layer.forward(rows, &context.rope, Some(&context.bias), Keys::Own),
                        after: None,
                    },
                }
            }
            (Block::Final, Flow::Text { rows, after }) => {
                let rows = model.text.norm.forward(rows);
                Flow::Hidden(match &self.layout {
                    Layout::Joined { prompt_width, .. } => {
                        rows.narrow(1, prompt_width - 1, self.width)
                    }
                    Layout::Grouped { prompts, .. } => {
                        let prompt_of = context.prompt_of.clone().expect("grouped");
                        // Predicts each completion's first token.
                        let first = rows.narrow(1, prompts.len - 1, 1).select(0, prompt_of);
                        match after {
                            Some(a) => {
                                let a = model.text.norm.forward(a);
                                Tensor::cat(vec![first, a.narrow(1, 0, self.width - 1)], 1)
                            }
                            None => first,
                        }
                    }
                })
            }
            (block, _) => unreachable!("{block:?} after the wrong block"),
        };
        Ok(flow)
    }

    /// The decoder's input: the token embeddings (one lookup for the prompts and the grouped
    /// completions: one scatter of the table's gradient in training) with the images in place.
    fn merge<B: Backend>(
        &self,
        model: &Qwen2VL<B>,
        context: &Context<B>,
        image_embeds: Option<Tensor<B, 2>>,
    ) -> Result<Flow<B>, Qwen2VLError> {
        let device = context.rope.q_cos.device();
        let rows = self.decoder_rows();
        let completions = match &self.layout {
            Layout::Grouped { completions, .. } if context.after.is_some() => Some(completions),
            _ => None,
        };
        let batches: Vec<&TokenBatch> = std::iter::once(rows).chain(completions).collect();
        let texts = match &context.embedding_rows {
            Some(cell) => {
                let (texts, rows) = model.token_embeddings_sparse(&batches, &device)?;
                *cell.borrow_mut() = rows;
                texts
            }
            None => model.token_embeddings(&batches, &device)?,
        };
        let mut texts = texts.into_iter();
        let text = texts.next().expect("the rows' embeddings");
        debug_assert_eq!(context.grids.is_empty(), image_embeds.is_none());
        let rows = model.place_images(rows, text, image_embeds, &device)?;
        let after = match (completions, texts.next()) {
            // (Refuses image placeholders in a completion.)
            (Some(c), Some(t)) => Some(model.place_images(c, t, None, &device)?),
            _ => None,
        };
        Ok(Flow::Text { rows, after })
    }

    /// The final hidden states that predict each completion slot, `[rows, width, hidden]`
    /// (differentiable when `B` is an autodiff backend): every block straight through.
    pub fn hidden<B: Backend>(
        &self,
        model: &Qwen2VL<B>,
        images: Option<&Images<B>>,
    ) -> Result<Tensor<B, 3>, Qwen2VLError> {
        let context = self.context(model, images)?;
        self.run_through(model, images, &context)
    }

    /// Every block of the pass straight through: the final hidden states.
    fn run_through<B: Backend>(
        &self,
        model: &Qwen2VL<B>,
        images: Option<&Images<B>>,
        context: &Context<B>,
    ) -> Result<Tensor<B, 3>, Qwen2VLError> {
        let (blocks, mut flow) = self.plan(model, images, context);
        for block in blocks {
            flow = self.run_block(model, context, block, flow)?;
        }
        Ok(flow.into_hidden())
    }

    /// [`Self::hidden`] with the token embeddings looked up as their own leaf when the table
    /// trains ([`Qwen2VL::token_embeddings_sparse`]): after the backward pass,
    /// [`EmbeddingRows::take_grad`] and [`crate::model::EmbeddingGrad::add_to`] add their
    /// gradient into the table's. The same values and, once added, the same gradients as
    /// [`Self::hidden`].
    pub fn hidden_sparse<B: Backend>(
        &self,
        model: &Qwen2VL<B>,
        images: Option<&Images<B>>,
    ) -> Result<(Tensor<B, 3>, Option<EmbeddingRows<B>>), Qwen2VLError> {
        let mut context = self.context(model, images)?;
        context.embedding_rows = Some(RefCell::new(None));
        let hidden = self.run_through(model, images, &context)?;
        let rows = context.embedding_rows.and_then(RefCell::into_inner);
        Ok((hidden, rows))
    }

    /// [`Self::hidden`] as values, with activation checkpointing: the blocks `recompute`
    /// names run outside the graph and keep only their input; the others keep their graph.
    /// [`Self::backward_recomputed`] takes the gradient back through the returned tape.
    pub fn hidden_recomputed<A: AutodiffBackend>(
        &self,
        model: &Qwen2VL<A>,
        images: Option<&Images<A>>,
        recompute: Recompute,
    ) -> Result<(Tensor<A::InnerBackend, 3>, Tape<A>), Qwen2VLError> {
        use burn::module::AutodiffModule;
        let plain = model.valid();
        let plain_images = images.map(|im| Images {
            pixel_values: im.pixel_values.clone().inner(),
            grids: im.grids.clone(),
        });
        let plain_context = self.context(&plain, plain_images.as_ref())?;
        let context = self.context(model, images)?;
        let (blocks, mut flow) = self.plan(&plain, plain_images.as_ref(), &plain_context);
        let mut taped = Vec::with_capacity(blocks.len());
        // Whether a block before this one trains: its input's gradient is needed.
        let mut upstream = false;
        for block in blocks {
            let trains = block.trains(model);
            if !trains && !upstream {
                flow = self.run_block(&plain, &plain_context, block, flow)?;
                taped.push(Taped::Frozen);
            } else if block.recomputed(recompute) {
                let next = self.run_block(&plain, &plain_context, block, flow.clone())?;
                taped.push(Taped::Recompute(block, flow, upstream));
                flow = next;
            } else {
                let inputs: Flow<A> = flow.leaf(upstream);
                let outputs = self.run_block(model, &context, block, inputs.clone())?;
                flow = outputs.values();
                taped.push(Taped::Kept {
                    inputs,
                    outputs,
                    upstream,
                });
            }
            upstream |= trains;
        }
        Ok((
            flow.into_hidden(),
            Tape {
                blocks: taped,
                context,
            },
        ))
    }

    /// The backward pass of [`Self::hidden_recomputed`] given `grad`, the loss's gradient with
    /// respect to its hidden states: block after block from the last, each recomputed (or
    /// kept) block's parameter gradients handed to `on_grads` as they are made, so that one
    /// block's graph is alive at a time.
    pub fn backward_recomputed<A: AutodiffBackend>(
        &self,
        model: &Qwen2VL<A>,
        tape: Tape<A>,
        grad: Tensor<A::InnerBackend, 3>,
        mut on_grads: impl FnMut(A::Gradients),
    ) -> Result<(), Qwen2VLError> {
        let Tape { blocks, context } = tape;
        let mut grad = Flow::Hidden(grad);
        for taped in blocks.into_iter().rev() {
            let (inputs, outputs, upstream) = match taped {
                // Nothing before it trains either.
                Taped::Frozen => break,
                Taped::Recompute(block, input, upstream) => {
                    let inputs: Flow<A> = input.leaf(upstream);
                    let outputs = self.run_block(model, &context, block, inputs.clone())?;
                    (inputs, outputs, upstream)
                }
                Taped::Kept {
                    inputs,
                    outputs,
                    upstream,
                } => (inputs, outputs, upstream),
            };
            let Some(surrogate) = outputs.dot(&grad) else {
                continue;
            };
            drop(outputs);
            let grads = surrogate.backward();
            if upstream {
                grad = inputs.grad(&grads);
            }
            on_grads(grads);
            if !upstream {
                break;
            }
        }
        Ok(())
    }
}

/// `[rows, 1, len, prefix_len + len]`, true where masked: completion token `i` of row `r`
/// sees its prompt's real tokens (row `r / group` of `prefix`) and its own tokens up to `i`.
fn after_prefix_mask<B: Backend>(
    prefix: &TokenBatch,
    group: usize,
    len: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let rows = prefix.batch * group;
    let keys = prefix.len + len;
    let mut m = Vec::with_capacity(rows * len * keys);
    for r in 0..rows {
        let valid = prefix.mask_row(r / group);
        for i in 0..len {
            m.extend(valid.iter().map(|&v| v == 0));
            m.extend((0..len).map(|j| j > i));
        }
    }
    Tensor::from_data(TensorData::new(m, [rows, 1, len, keys]), device)
}
