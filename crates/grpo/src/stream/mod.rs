//! Streaming data: prompts are made when they are about to be used, a bounded number ahead,
//! on worker threads, so that host memory does not grow with the data set.

mod prefetch;
mod source;

pub use prefetch::{Prefetch, Produce};
pub use source::{PromptError, PromptSource, RecordPrompts};

use std::sync::Arc;

use crate::learner::PromptInput;

/// How far ahead prompts are prepared, and by how many threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// Prompts prepared ahead of the one in use (at least 1).
    pub prefetch: usize,
    /// Threads preparing them (at least 1).
    pub workers: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            prefetch: 8,
            workers: 2,
        }
    }
}

/// The prompts of `order` (indices into `source`), in that order, prepared ahead.
pub struct PromptStream {
    pipe: Prefetch<Result<PromptInput, PromptError>>,
}

impl PromptStream {
    pub fn new(source: Arc<dyn PromptSource>, order: Vec<usize>, opts: StreamOptions) -> Self {
        let total = order.len();
        let produce: Produce<Result<PromptInput, PromptError>> =
            Arc::new(move |k| source.prepare(order[k]));
        Self {
            pipe: Prefetch::new(total, opts.prefetch, opts.workers, produce),
        }
    }

    /// The next `n` prompts (fewer at the end); the first that fails is the error.
    pub fn take(&mut self, n: usize) -> Result<Vec<PromptInput>, PromptError> {
        self.pipe.next_n(n).into_iter().collect()
    }

    pub fn len(&self) -> usize {
        self.pipe.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pipe.is_empty()
    }
}
