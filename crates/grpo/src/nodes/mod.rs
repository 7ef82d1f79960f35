//! Several machines ("nodes") training one run: each rolls out and scores its share of every
//! micro-batch, the nodes exchange what the step's statistics need (every row's rewards and
//! masks, [`crate::learner::HostRollout`]) and sum their gradients, so every node takes the
//! same optimizer step and holds the same weights.
//!
//! All exchanges are sums of `f32` vectors ([`Exchange`]): burn-collective's all-reduce does
//! them between processes ([`collective`], feature `nodes`); gathering variable-length bytes
//! ([`gather`]) is a sum of vectors where each node fills its own slot.

#[cfg(feature = "nodes")]
pub mod collective;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor, TensorData};
use qwen2vl::Qwen2VL;

/// Why an exchange between nodes failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("exchange between nodes: {0}")]
    Failed(String),
    #[error(
        "no answer from the other nodes within {0} s: a node stopped (every node keeps its last \
         checkpoint: start them all again with --resume), or a step takes that much longer on \
         another node (raise --node-timeout)"
    )]
    Timeout(u64),
    #[error("the nodes do not run the same thing: {0}")]
    Mismatch(String),
}

/// Sums `f32` vectors over the nodes of a run: every node calls [`Exchange::sum`] in the same
/// order with vectors of the same length and gets the same sum back.
pub trait Exchange: Send + Sync + std::fmt::Debug {
    /// This node's index, 0-based.
    fn rank(&self) -> usize;
    /// Nodes in the run.
    fn nodes(&self) -> usize;
    /// The element-wise sum of every node's `values`, the same on every node.
    fn sum(&self, values: Vec<f32>) -> Result<Vec<f32>, ExchangeError>;
}

/// Every node's bytes, in rank order: two sums, the lengths and then the bytes, each node
/// writing into its own slot (a byte and 16-bit halves of a length are exact in `f32`).
pub fn gather(ex: &dyn Exchange, mine: &[u8]) -> Result<Vec<Vec<u8>>, ExchangeError> {
    let (n, rank) = (ex.nodes(), ex.rank());
    let mut lens = vec![0.0f32; 2 * n];
    lens[2 * rank] = (mine.len() >> 16) as f32;
    lens[2 * rank + 1] = (mine.len() & 0xffff) as f32;
    let lens: Vec<usize> = ex
        .sum(lens)?
        .chunks(2)
        .map(|hl| ((hl[0] as usize) << 16) | hl[1] as usize)
        .collect();
    let width = lens.iter().copied().max().unwrap_or(0).max(1);
    let mut slots = vec![0.0f32; n * width];
    for (s, &b) in slots[rank * width..].iter_mut().zip(mine) {
        *s = f32::from(b);
    }
    let all = ex.sum(slots)?;
    Ok(lens
        .iter()
        .enumerate()
        .map(|(k, &len)| {
            all[k * width..k * width + len]
                .iter()
                .map(|&v| v as u8)
                .collect()
        })
        .collect())
}

/// Checks that every node describes its run as this one does (`fingerprint`: settings, data,
/// model, resume step, each `name: value` on its own line); an error names the first node and
/// line that differ from node 0's.
pub fn check_agreement(ex: &dyn Exchange, fingerprint: &str) -> Result<(), ExchangeError> {
    let all = gather(ex, fingerprint.as_bytes())?;
    let first = String::from_utf8_lossy(&all[0]).into_owned();
    for (k, other) in all.iter().enumerate().skip(1) {
        let other = String::from_utf8_lossy(other);
        if other != first {
            let line = first
                .lines()
                .zip(other.lines())
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("node 0 has `{a}`, node {k} has `{b}`"))
                .unwrap_or_else(|| format!("node {k}'s description differs from node 0's"));
            return Err(ExchangeError::Mismatch(line));
        }
    }
    Ok(())
}

/// Values per exchange of gradients (256 MiB of `f32`): a larger parameter goes alone.
const CHUNK: usize = 64 << 20;

/// The float parameters in the module's order (the same on every node): each one's element
/// count and whether this node has a gradient for it.
struct Layout<'a> {
    grads: &'a GradientsParams,
    params: Vec<(usize, bool)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Layout<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let present = self.grads.get::<B::InnerBackend, D>(param.id).is_some();
        self.params.push((param.shape().num_elements(), present));
    }
}

/// Moves the gradients of the parameters `range` (in module order) that some node has into
/// `values` (zeros where this node has none), or back from `values` as the summed gradients.
struct Chunk<'a> {
    grads: &'a mut GradientsParams,
    present: &'a [bool],
    range: std::ops::Range<usize>,
    index: usize,
    values: Vec<f32>,
    /// Reading back: where the next parameter's values start.
    offset: usize,
    put: bool,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Chunk<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let i = self.index;
        self.index += 1;
        if !self.range.contains(&i) || !self.present[i] {
            return;
        }
        let shape = param.shape();
        let n = shape.num_elements();
        if self.put {
            let values = self.values[self.offset..self.offset + n].to_vec();
            self.offset += n;
            let value = param.val();
            let dtype: DType = value.dtype();
            let data = TensorData::new(values, shape).convert_dtype(dtype);
            let grad = Tensor::<B::InnerBackend, D>::from_data(data, &value.device());
            self.grads.register::<B::InnerBackend, D>(param.id, grad);
        } else {
            match self.grads.remove::<B::InnerBackend, D>(param.id) {
                Some(g) => self.values.extend(
                    g.into_data()
                        .convert::<f32>()
                        .into_vec::<f32>()
                        .expect("f32 gradient values"),
                ),
                None => self.values.resize(self.values.len() + n, 0.0),
            }
        }
    }
}

/// The sum over the nodes of their gradients of `model`'s parameters (in place of this
/// node's), and of `extra` (values to add up alongside, e.g. the step's measured sums). A
/// parameter no node has a gradient for stays without one (the optimizer leaves it alone, as
/// on one node); one that only some nodes have gets the others' zeros. The values travel in
/// `f32` in chunks of at most [`CHUNK`] (a larger parameter alone) and come back in each
/// parameter's own type, on its device.
pub fn sum_gradients<B: AutodiffBackend>(
    ex: &dyn Exchange,
    model: &Qwen2VL<B>,
    mut grads: GradientsParams,
    extra: Vec<f32>,
) -> Result<(GradientsParams, Vec<f32>), ExchangeError> {
    let mut layout = Layout {
        grads: &grads,
        params: Vec::new(),
    };
    model.visit(&mut layout);
    let params = layout.params;
    let mut first: Vec<f32> = params
        .iter()
        .map(|&(_, here)| f32::from(u8::from(here)))
        .collect();
    let n_extra = extra.len();
    first.extend(extra);
    let first = ex.sum(first)?;
    let present: Vec<bool> = first[..params.len()].iter().map(|&v| v > 0.0).collect();
    let extra = first[params.len()..params.len() + n_extra].to_vec();
    // Consecutive parameters, at most CHUNK values each (a larger one alone).
    let mut chunks: Vec<std::ops::Range<usize>> = Vec::new();
    let (mut start, mut filled) = (0, 0);
    for (i, &(n, _)) in params.iter().enumerate() {
        if !present[i] {
            continue;
        }
        if filled > 0 && filled + n > CHUNK {
            chunks.push(start..i);
            start = i;
            filled = 0;
        }
        filled += n;
    }
    if filled > 0 {
        chunks.push(start..params.len());
    }
    for range in chunks {
        let mut take = Chunk {
            grads: &mut grads,
            present: &present,
            range: range.clone(),
            index: 0,
            values: Vec::new(),
            offset: 0,
            put: false,
        };
        model.visit(&mut take);
        let summed = ex.sum(take.values)?;
        let mut put = Chunk {
            grads: &mut grads,
            present: &present,
            range,
            index: 0,
            values: summed,
            offset: 0,
            put: true,
        };
        model.visit(&mut put);
    }
    Ok((grads, extra))
}

/// The share of a micro-batch's `prompts` prompts that node `rank` of `nodes` rolls out, each
/// with `devices` devices: consecutive, as one node with `nodes * devices` devices would split
/// them (so a run on several nodes draws what one node with all their devices draws).
pub fn node_prompts(
    prompts: usize,
    nodes: usize,
    devices: usize,
    rank: usize,
) -> std::ops::Range<usize> {
    let per_node = prompts / (nodes * devices).max(1) * devices;
    rank * per_node..(rank + 1) * per_node
}

/// Nodes of one process, for tests: each call's vectors are summed once every node (thread)
/// has sent its own.
#[derive(Clone, Debug)]
pub struct LocalExchange {
    rank: usize,
    shared: std::sync::Arc<LocalShared>,
}

#[derive(Debug)]
struct LocalShared {
    nodes: usize,
    state: std::sync::Mutex<LocalRound>,
    turn: std::sync::Condvar,
}

#[derive(Default, Debug)]
struct LocalRound {
    round: u64,
    sum: Vec<f32>,
    arrived: usize,
    result: Vec<f32>,
}

impl LocalExchange {
    /// One handle per node.
    pub fn nodes(n: usize) -> Vec<LocalExchange> {
        let shared = std::sync::Arc::new(LocalShared {
            nodes: n,
            state: std::sync::Mutex::new(LocalRound::default()),
            turn: std::sync::Condvar::new(),
        });
        (0..n)
            .map(|rank| LocalExchange {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Exchange for LocalExchange {
    fn rank(&self) -> usize {
        self.rank
    }

    fn nodes(&self) -> usize {
        self.shared.nodes
    }

    fn sum(&self, values: Vec<f32>) -> Result<Vec<f32>, ExchangeError> {
        let s = &self.shared;
        let mut state = s.state.lock().expect("exchange state");
        let round = state.round;
        if state.arrived == 0 {
            state.sum = vec![0.0; values.len()];
        }
        if state.sum.len() != values.len() {
            return Err(ExchangeError::Failed(format!(
                "node {} sent {} values, another {}",
                self.rank,
                values.len(),
                state.sum.len()
            )));
        }
        for (a, v) in state.sum.iter_mut().zip(&values) {
            *a += v;
        }
        state.arrived += 1;
        if state.arrived == s.nodes {
            state.result = std::mem::take(&mut state.sum);
            state.arrived = 0;
            state.round += 1;
            s.turn.notify_all();
        } else {
            while state.round == round {
                state = s.turn.wait(state).expect("exchange state");
            }
        }
        Ok(state.result.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `f` on every node of a [`LocalExchange`], each on its own thread; their results by rank.
    fn on_nodes<T: Send>(n: usize, f: impl Fn(&LocalExchange) -> T + Sync) -> Vec<T> {
        let nodes = LocalExchange::nodes(n);
        std::thread::scope(|s| {
            let handles: Vec<_> = nodes.iter().map(|ex| s.spawn(|| f(ex))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn gather_returns_every_nodes_bytes_in_rank_order() {
        let out = on_nodes(3, |ex| {
            let mine: Vec<u8> = match ex.rank() {
                0 => b"first".to_vec(),
                1 => Vec::new(),
                _ => (0..=255u8).cycle().take(70_000).collect(),
            };
            gather(ex, &mine).unwrap()
        });
        let long: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        for got in out {
            assert_eq!(got, vec![b"first".to_vec(), Vec::new(), long.clone()]);
        }
    }

    #[test]
    fn a_node_that_runs_something_else_is_named() {
        let out = on_nodes(3, |ex| {
            let text = match ex.rank() {
                2 => "seed: 1\nsteps: 9\n",
                _ => "seed: 1\nsteps: 10\n",
            };
            check_agreement(ex, text).map_err(|e| e.to_string())
        });
        for got in out {
            let e = got.unwrap_err();
            assert!(
                e.contains("node 0 has `steps: 10`, node 2 has `steps: 9`"),
                "{e}"
            );
        }
        let agreed = on_nodes(2, |ex| check_agreement(ex, "seed: 1\n").is_ok());
        assert!(agreed.into_iter().all(|ok| ok));
    }

    #[test]
    fn prompt_shares_are_what_one_node_with_every_device_splits() {
        assert_eq!(node_prompts(8, 2, 2, 0), 0..4);
        assert_eq!(node_prompts(8, 2, 2, 1), 4..8);
        assert_eq!(node_prompts(6, 3, 1, 2), 4..6);
    }
}
