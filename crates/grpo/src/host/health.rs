//! Whether a step may change the policy: a step whose loss, gradient norm or reward is not a
//! finite number is skipped (weights and optimizer state untouched) and named; too many such
//! steps in a row stop the run. A reward that stays far below its running mean is reported as
//! a possible collapse. Pure bookkeeping: the loop acts on the verdicts.

/// What to do with one step's update.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Apply,
    /// Skip the update; the text says why.
    Skip(String),
    /// Skip it and stop the run; the text says why.
    Stop(String),
}

/// Consecutive non-finite steps.
#[derive(Debug, Clone)]
pub struct Health {
    /// Bad steps in a row that stop the run (at least 1).
    pub max_bad_steps: usize,
    bad_in_a_row: usize,
}

impl Health {
    pub fn new(max_bad_steps: usize) -> Self {
        Self {
            max_bad_steps: max_bad_steps.max(1),
            bad_in_a_row: 0,
        }
    }

    /// The verdict on step `step` (1-based) with these measurements.
    pub fn check(&mut self, step: usize, loss: f64, grad_norm: f64, reward: f64) -> Verdict {
        let bad = [
            ("loss", loss),
            ("gradient norm", grad_norm),
            ("mean reward", reward),
        ]
        .into_iter()
        .find(|(_, v)| !v.is_finite());
        let Some((what, value)) = bad else {
            self.bad_in_a_row = 0;
            return Verdict::Apply;
        };
        self.bad_in_a_row += 1;
        let n = self.bad_in_a_row;
        let why = format!(
            "step {step}: the {what} is {value}, not a finite number; the update is skipped \
             (weights and optimizer state untouched), {n} such step(s) in a row"
        );
        if n >= self.max_bad_steps {
            Verdict::Stop(format!(
                "{why}: the run diverged and stops (grpo.max_bad_steps = {}). Its last \
                 checkpoint is intact; lower grpo.learning_rate, check the reward weights, then \
                 rerun with --resume",
                self.max_bad_steps
            ))
        } else {
            Verdict::Skip(why)
        }
    }
}

/// Watches the mean reward for a collapse: below half its running mean (an exponential
/// average over about 20 steps) for `window` steps in a row, once the running mean is
/// meaningful. Warns once per collapse.
#[derive(Debug, Clone)]
pub struct CollapseWatch {
    pub window: usize,
    mean: Option<f64>,
    seen: usize,
    low_in_a_row: usize,
    warned: bool,
}

impl CollapseWatch {
    pub fn new(window: usize) -> Self {
        Self {
            window: window.max(1),
            mean: None,
            seen: 0,
            low_in_a_row: 0,
            warned: false,
        }
    }

    /// Observes step `step`'s mean reward; a warning when it looks like a collapse.
    pub fn observe(&mut self, step: usize, reward: f64) -> Option<String> {
        if !reward.is_finite() {
            return None;
        }
        let Some(mean) = self.mean else {
            self.mean = Some(reward);
            self.seen = 1;
            return None;
        };
        self.seen += 1;
        let low = self.seen > self.window && mean > 0.1 && reward < 0.5 * mean;
        let mut warning = None;
        if low {
            self.low_in_a_row += 1;
            if self.low_in_a_row >= self.window && !self.warned {
                self.warned = true;
                warning = Some(format!(
                    "warning: step {step}: the mean reward has stayed below half its running \
                     mean ({mean:.3}) for {} steps (now {reward:.3}): the policy may be \
                     collapsing (unparsable answers, a learning rate too high?)",
                    self.low_in_a_row
                ));
            }
        } else {
            self.low_in_a_row = 0;
            self.warned = false;
        }
        // The running mean follows only steps that do not look collapsed, so that a collapse
        // does not become the new normal.
        if !low {
            self.mean = Some(mean + (reward - mean) / 20.0);
        }
        warning
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_steps_are_skipped_then_stop_the_run() {
        let mut h = Health::new(3);
        assert_eq!(h.check(1, 0.5, 1.0, 1.2), Verdict::Apply);
        let Verdict::Skip(why) = h.check(2, f64::NAN, 1.0, 1.2) else {
            panic!("a NaN loss is skipped")
        };
        assert!(
            why.contains("step 2") && why.contains("loss is NaN"),
            "{why}"
        );
        assert!(
            matches!(h.check(3, 0.1, f64::INFINITY, 1.0), Verdict::Skip(w) if w.contains("gradient norm is inf"))
        );
        // A good step resets the count.
        assert_eq!(h.check(4, 0.1, 0.2, 1.0), Verdict::Apply);
        assert!(
            matches!(h.check(5, 0.1, 0.2, f64::NAN), Verdict::Skip(w) if w.contains("mean reward"))
        );
        assert!(matches!(
            h.check(6, f64::NAN, f64::NAN, 0.0),
            Verdict::Skip(_)
        ));
        let Verdict::Stop(why) = h.check(7, f64::NAN, 0.2, 1.0) else {
            panic!("the third bad step in a row stops")
        };
        assert!(
            why.contains("3 such step(s) in a row") && why.contains("--resume"),
            "{why}"
        );
        let mut once = Health::new(1);
        assert!(matches!(
            once.check(1, f64::NAN, 0.0, 0.0),
            Verdict::Stop(_)
        ));
    }

    #[test]
    fn a_reward_far_below_its_running_mean_warns_once() {
        let mut w = CollapseWatch::new(3);
        for s in 1..=10 {
            assert_eq!(w.observe(s, 1.8), None, "steady");
        }
        // Two low steps, then a normal one: no warning.
        assert_eq!(w.observe(11, 0.2), None);
        assert_eq!(w.observe(12, 0.2), None);
        assert_eq!(w.observe(13, 1.7), None);
        assert_eq!(w.observe(14, 0.1), None);
        assert_eq!(w.observe(15, 0.0), None);
        let warning = w.observe(16, 0.0).expect("three low steps in a row");
        assert!(
            warning.contains("step 16") && warning.contains("collapsing"),
            "{warning}"
        );
        assert_eq!(w.observe(17, 0.0), None, "once per collapse");
        // A reward that was never high is not a collapse.
        let mut low = CollapseWatch::new(2);
        for s in 1..=20 {
            assert_eq!(low.observe(s, 0.05), None);
        }
    }
}
