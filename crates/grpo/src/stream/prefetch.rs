//! An ordered, bounded prefetch pipeline: worker threads prepare jobs `0..n` ahead of one
//! consumer, which receives them in order. At most `depth` jobs are claimed (being prepared
//! or finished and waiting) beyond those the consumer has taken, so what a pipeline keeps
//! alive is bounded by its depth whatever the number of jobs.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Prepares job `k`; called from worker threads.
pub type Produce<T> = Arc<dyn Fn(usize) -> T + Send + Sync>;

struct State<T> {
    /// The next job a worker will claim.
    claimed: usize,
    /// Jobs handed to the consumer so far.
    taken: usize,
    done: BTreeMap<usize, T>,
    /// A job whose preparation panicked, with the panic's message.
    failed: Option<(usize, String)>,
    stop: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Signalled when a job finishes.
    ready: Condvar,
    /// Signalled when the consumer takes a job (room for another) or on stop.
    room: Condvar,
    total: usize,
    depth: usize,
}

pub struct Prefetch<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    workers: Vec<JoinHandle<()>>,
}

impl<T: Send + 'static> Prefetch<T> {
    /// Starts `workers` threads (at least one) preparing jobs `0..total` with `produce`,
    /// at most `depth` (at least one) ahead of the consumer.
    pub fn new(total: usize, depth: usize, workers: usize, produce: Produce<T>) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                claimed: 0,
                taken: 0,
                done: BTreeMap::new(),
                failed: None,
                stop: false,
            }),
            ready: Condvar::new(),
            room: Condvar::new(),
            total,
            depth: depth.max(1),
        });
        let workers = (0..workers.max(1).min(total.max(1)))
            .map(|w| {
                let shared = shared.clone();
                let produce = produce.clone();
                std::thread::Builder::new()
                    .name(format!("medr1-prefetch-{w}"))
                    .spawn(move || work(&shared, &*produce))
                    .expect("a prefetch worker thread starts")
            })
            .collect();
        Self { shared, workers }
    }

    /// Jobs in all.
    pub fn len(&self) -> usize {
        self.shared.total
    }

    pub fn is_empty(&self) -> bool {
        self.shared.total == 0
    }

    /// The next job's result, in order; `None` after the last.
    pub fn next_item(&mut self) -> Option<T> {
        let sh = &*self.shared;
        let mut st = sh.state.lock().expect("prefetch state");
        let k = st.taken;
        if k >= sh.total {
            return None;
        }
        loop {
            if let Some(item) = st.done.remove(&k) {
                st.taken = k + 1;
                sh.room.notify_all();
                return Some(item);
            }
            if let Some((job, why)) = &st.failed {
                panic!("preparing job {job} panicked: {why}");
            }
            st = sh.ready.wait(st).expect("prefetch state");
        }
    }

    /// The next `n` results in order (fewer at the end).
    pub fn next_n(&mut self, n: usize) -> Vec<T> {
        (0..n).map_while(|_| self.next_item()).collect()
    }
}

impl<T: Send + 'static> Iterator for Prefetch<T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        self.next_item()
    }
}

fn work<T>(sh: &Shared<T>, produce: &(dyn Fn(usize) -> T + Send + Sync)) {
    loop {
        let k = {
            let mut st = sh.state.lock().expect("prefetch state");
            loop {
                if st.stop || st.claimed >= sh.total {
                    return;
                }
                if st.claimed < st.taken + sh.depth {
                    break;
                }
                st = sh.room.wait(st).expect("prefetch state");
            }
            st.claimed += 1;
            st.claimed - 1
        };
        let item = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| produce(k)));
        let mut st = sh.state.lock().expect("prefetch state");
        if st.stop {
            return;
        }
        match item {
            Ok(item) => {
                st.done.insert(k, item);
            }
            Err(payload) => {
                let why = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                st.failed.get_or_insert((k, why));
                st.stop = true;
                sh.ready.notify_all();
                sh.room.notify_all();
                return;
            }
        }
        sh.ready.notify_all();
    }
}

impl<T: Send + 'static> Drop for Prefetch<T> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.stop = true;
            st.done.clear();
        }
        self.shared.room.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts live instances, like a prepared image holding its pixels.
    struct Tracked {
        job: usize,
        live: Arc<AtomicUsize>,
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn delivers_in_order_and_keeps_at_most_depth_alive() {
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (l, p) = (live.clone(), peak.clone());
        let depth = 3;
        let produce: Produce<Tracked> = Arc::new(move |k| {
            let now = l.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            // Uneven work, so that later jobs often finish first.
            std::thread::sleep(std::time::Duration::from_micros(
                ((k * 7919) % 5) as u64 * 300,
            ));
            Tracked {
                job: k,
                live: l.clone(),
            }
        });
        let mut pipe = Prefetch::new(200, depth, 4, produce);
        for k in 0..200 {
            let item = pipe.next_item().expect("200 jobs");
            assert_eq!(item.job, k, "in order");
            // The consumer is slower than the workers: they fill the window and wait.
            std::thread::sleep(std::time::Duration::from_micros(200));
            drop(item);
        }
        assert!(pipe.next_item().is_none());
        // `depth` jobs ahead plus the one the consumer holds.
        let seen = peak.load(Ordering::SeqCst);
        assert!(seen <= depth + 1, "{seen} prepared items alive at once");
        assert!(seen >= 2, "the workers never ran ahead ({seen})");
        drop(pipe);
        assert_eq!(live.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn dropping_early_stops_the_workers() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let mut pipe = Prefetch::new(
            1_000_000,
            2,
            2,
            Arc::new(move |k| {
                c.fetch_add(1, Ordering::SeqCst);
                k
            }),
        );
        assert_eq!(pipe.next_n(3), vec![0, 1, 2]);
        drop(pipe);
        assert!(calls.load(Ordering::SeqCst) <= 3 + 2);
    }

    #[test]
    #[should_panic(expected = "preparing job 3 panicked: bad job")]
    fn a_panicking_job_reaches_the_consumer() {
        let pipe: Prefetch<usize> = Prefetch::new(
            10,
            4,
            2,
            Arc::new(|k| {
                assert!(k != 3, "bad job");
                k
            }),
        );
        let _ = pipe.collect::<Vec<_>>();
    }

    #[test]
    fn empty_and_short() {
        let mut pipe: Prefetch<usize> = Prefetch::new(0, 4, 2, Arc::new(|k| k));
        assert!(pipe.next_item().is_none());
        let pipe: Prefetch<usize> = Prefetch::new(5, 8, 3, Arc::new(|k| k * 2));
        assert_eq!(pipe.collect::<Vec<_>>(), vec![0, 2, 4, 6, 8]);
    }
}
