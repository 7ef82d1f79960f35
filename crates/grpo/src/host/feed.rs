//! The run's plan as a stream of prompts: the micro-batches' prompts are prepared a bounded
//! number ahead of the step that uses them, in plan order, on worker threads.

use std::sync::Arc;

use crate::learner::PromptInput;
use crate::stream::{PromptError, PromptSource, PromptStream, StreamOptions};

pub struct PlanFeed {
    source: Arc<dyn PromptSource>,
    /// Prompt indices of each plan entry.
    groups: Vec<Vec<usize>>,
    opts: StreamOptions,
    /// The stream and the plan entry it delivers next.
    active: Option<(usize, PromptStream)>,
}

impl PlanFeed {
    pub fn new(
        source: Arc<dyn PromptSource>,
        groups: Vec<Vec<usize>>,
        opts: StreamOptions,
    ) -> Self {
        Self {
            source,
            groups,
            opts,
            active: None,
        }
    }

    /// The prompts of plan entry `index`. Entries are expected in order (a resumed run
    /// starts wherever it resumes), entries without prompts may be passed over; any other
    /// jump restarts the stream there.
    pub fn take(&mut self, index: usize) -> Result<Vec<PromptInput>, PromptError> {
        let n = self.groups[index].len();
        match &mut self.active {
            Some((next, stream))
                if *next <= index && self.groups[*next..index].iter().all(Vec::is_empty) =>
            {
                *next = index + 1;
                stream.take(n)
            }
            _ => {
                let order: Vec<usize> = self.groups[index..].iter().flatten().copied().collect();
                let mut stream = PromptStream::new(self.source.clone(), order, self.opts);
                let out = stream.take(n);
                self.active = Some((index + 1, stream));
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medvqa::VqaRecord;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Prompts whose text is their index; counts preparations.
    struct Counting {
        records: Vec<VqaRecord>,
        prepared: AtomicUsize,
    }

    impl PromptSource for Counting {
        fn len(&self) -> usize {
            self.records.len()
        }
        fn record(&self, i: usize) -> &VqaRecord {
            &self.records[i]
        }
        fn prepare(&self, i: usize) -> Result<PromptInput, PromptError> {
            self.prepared.fetch_add(1, Ordering::SeqCst);
            Ok(PromptInput {
                text: i.to_string(),
                ids: vec![],
                images: vec![],
                record: self.records[i].clone(),
            })
        }
    }

    fn source(n: usize) -> Arc<Counting> {
        let rec = VqaRecord {
            id: String::new(),
            image: String::new(),
            question: "q".into(),
            options: vec!["a".into(), "b".into()],
            answer: 0,
            modality: None,
            question_type: None,
            dataset: None,
        };
        Arc::new(Counting {
            records: vec![rec; n],
            prepared: AtomicUsize::new(0),
        })
    }

    fn texts(p: Vec<PromptInput>) -> Vec<String> {
        p.into_iter().map(|p| p.text).collect()
    }

    #[test]
    fn entries_in_order_then_a_jump() {
        let src = source(10);
        let groups = vec![vec![3, 1], vec![4], vec![1, 5], vec![9, 2], vec![6]];
        let opts = StreamOptions {
            prefetch: 2,
            workers: 2,
        };
        let mut feed = PlanFeed::new(src.clone(), groups, opts);
        assert_eq!(texts(feed.take(0).unwrap()), ["3", "1"]);
        assert_eq!(texts(feed.take(1).unwrap()), ["4"]);
        // A resumed run asks for a later entry first.
        assert_eq!(texts(feed.take(3).unwrap()), ["9", "2"]);
        assert_eq!(texts(feed.take(4).unwrap()), ["6"]);
        let mut fresh = PlanFeed::new(src.clone(), vec![vec![0], vec![7, 8]], opts);
        assert_eq!(texts(fresh.take(1).unwrap()), ["7", "8"]);
        drop((feed, fresh));
        // Never more than the entries asked for plus the prefetch window of each stream.
        assert!(src.prepared.load(Ordering::SeqCst) <= 7 + 3 * 2);
    }

    #[test]
    fn entries_without_prompts_are_passed_over_without_a_restart() {
        let src = source(10);
        // Steps that reuse a rollout have no prompts of their own.
        let groups = vec![vec![3, 1], vec![], vec![], vec![4], vec![], vec![5]];
        let opts = StreamOptions {
            prefetch: 8,
            workers: 1,
        };
        let mut feed = PlanFeed::new(src.clone(), groups, opts);
        assert_eq!(texts(feed.take(0).unwrap()), ["3", "1"]);
        assert_eq!(texts(feed.take(3).unwrap()), ["4"]);
        assert_eq!(texts(feed.take(5).unwrap()), ["5"]);
        drop(feed);
        // One stream: each prompt prepared once.
        assert_eq!(src.prepared.load(Ordering::SeqCst), 4);
    }
}
