//! Learning-rate schedules: constant, or linear warmup followed by linear or cosine decay to
//! zero (transformers' `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    #[default]
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub decay: Decay,
}

impl LrSchedule {
    pub fn constant(lr: f64) -> Self {
        Self {
            peak: lr,
            warmup_steps: 0,
            total_steps: 0,
            decay: Decay::Constant,
        }
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Linear => self.peak * (1.0 - progress),
            Decay::Cosine => self.peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_linear_decay_by_hand() {
        let s = LrSchedule {
            peak: 1e-3,
            warmup_steps: 4,
            total_steps: 14,
            decay: Decay::Linear,
        };
        let lr: Vec<f64> = [0, 2, 4, 9, 14, 20].iter().map(|&i| s.at(i)).collect();
        let want = [0.0, 5e-4, 1e-3, 5e-4, 0.0, 0.0];
        for (a, b) in lr.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{lr:?}");
        }
        let c = LrSchedule {
            decay: Decay::Cosine,
            ..s
        };
        assert!((c.at(9) - 5e-4).abs() < 1e-12);
        assert_eq!(LrSchedule::constant(2e-6).at(1000), 2e-6);
    }
}

/// [`LrSchedule`] as burn-train's scheduler: one `step()` per optimizer step, the step count
/// being its checkpointed state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduledLr {
    pub schedule: LrSchedule,
    pub step: usize,
}

impl ScheduledLr {
    pub fn new(schedule: LrSchedule) -> Self {
        Self { schedule, step: 0 }
    }
}

impl burn::optim::lr_scheduler::LrScheduler for ScheduledLr {
    type Record<B: burn::tensor::backend::Backend> = usize;

    fn step(&mut self) -> f64 {
        let lr = self.schedule.at(self.step);
        self.step += 1;
        lr
    }

    fn to_record<B: burn::tensor::backend::Backend>(&self) -> usize {
        self.step
    }

    fn load_record<B: burn::tensor::backend::Backend>(self, record: usize) -> Self {
        Self {
            step: record,
            ..self
        }
    }
}
