//! Progress of long host work (checking data, writing images, evaluating): a live bar when
//! stderr is a terminal (indicatif), otherwise a plain line about every 10% or 30 s once the
//! work has taken more than 2 s, so that logs of batch jobs show where a run is without a
//! line per item (and short work prints nothing).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    started: Instant,
    bar: Option<ProgressBar>,
    /// Plain lines: when the last one was printed, and at which count.
    last_line: (Instant, u64),
    printed: bool,
}

/// Plain lines start once work has run this long.
const QUIET_START: Duration = Duration::from_secs(2);

impl Progress {
    /// `total` items of `label` (e.g. "scanning images").
    pub fn new(label: &str, total: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar
        });
        let now = Instant::now();
        Self {
            label: label.to_string(),
            total: total as u64,
            done: 0,
            started: now,
            bar,
            last_line: (now, 0),
            printed: false,
        }
    }

    /// `done` items so far.
    pub fn set(&mut self, done: usize) {
        self.done = done as u64;
        match &self.bar {
            Some(bar) => bar.set_position(self.done),
            None => {
                let (at, count) = self.last_line;
                let step = (self.total / 10).max(1);
                let due = self.done >= count + step || at.elapsed() >= Duration::from_secs(30);
                if due && self.done < self.total && self.started.elapsed() >= QUIET_START {
                    self.line();
                }
            }
        }
    }

    fn line(&mut self) {
        let secs = self.started.elapsed().as_secs_f64();
        let pct = 100.0 * self.done as f64 / self.total.max(1) as f64;
        eprintln!(
            "{}: {}/{} ({pct:.0}%, {secs:.0}s)",
            self.label, self.done, self.total
        );
        self.last_line = (Instant::now(), self.done);
        self.printed = true;
    }

    /// Ends the bar (or prints the last line).
    pub fn finish(mut self) {
        match self.bar.take() {
            Some(bar) => bar.finish_and_clear(),
            None if self.printed || self.started.elapsed() >= QUIET_START => self.line(),
            None => {}
        }
    }
}
