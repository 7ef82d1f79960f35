//! What one step reports, as named numbers: the item burn-train's metrics read, and one line
//! of `metrics.jsonl`.

use std::sync::Arc;

use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};
use burn::train::ItemLazy;

use crate::learner::StepMetrics;

/// Named values of one step, in a stable order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepRecord {
    pub values: Vec<(String, f64)>,
}

impl StepRecord {
    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.iter().find(|(k, _)| k == key).map(|&(_, v)| v)
    }

    /// Sets `key`, replacing an earlier value.
    pub fn set(&mut self, key: &str, value: f64) {
        match self.values.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.values.push((key.to_string(), value)),
        }
    }

    /// Micro-batches of one optimizer step as one record: means, except for minima, maxima
    /// and counts, which combine as such.
    pub fn merge(records: &[StepRecord]) -> StepRecord {
        let Some(first) = records.first() else {
            return StepRecord::default();
        };
        let mut out = StepRecord::default();
        for (key, _) in &first.values {
            let vals: Vec<f64> = records.iter().filter_map(|r| r.get(key)).collect();
            let v = if key.ends_with("_min") {
                vals.iter().copied().fold(f64::INFINITY, f64::min)
            } else if key.ends_with("_max") {
                vals.iter().copied().fold(f64::NEG_INFINITY, f64::max)
            } else if [
                "completion_tokens",
                "loss",
                "rollout_seconds",
                "resampled_groups",
                "unfilled_groups",
            ]
            .contains(&key.as_str())
            {
                // Each micro-batch's loss is already its share of the step's.
                vals.iter().sum()
            } else {
                vals.iter().sum::<f64>() / vals.len().max(1) as f64
            };
            out.set(key, v);
        }
        out
    }

    /// One JSON object (keys in record order).
    pub fn to_json(&self) -> String {
        let fields: Vec<String> = self
            .values
            .iter()
            .map(|(k, v)| {
                let v = if v.is_finite() {
                    format!("{v}")
                } else {
                    "null".into()
                };
                format!("{}:{v}", serde_json::to_string(k).expect("a string"))
            })
            .collect();
        format!("{{{}}}", fields.join(","))
    }
}

impl From<&StepMetrics> for StepRecord {
    fn from(m: &StepMetrics) -> Self {
        let mut r = StepRecord::default();
        r.set("loss", m.loss as f64);
        r.set("reward_mean", m.reward_mean as f64);
        r.set("reward_std", m.reward_std as f64);
        for (name, v) in &m.per_reward_mean {
            r.set(&format!("reward/{name}"), *v as f64);
        }
        r.set("kl", m.kl as f64);
        r.set("clip_ratio", m.clip_ratio as f64);
        r.set("entropy", m.entropy as f64);
        r.set("completion_len_mean", m.completion_len_mean as f64);
        r.set("completion_len_min", m.completion_len_min as f64);
        r.set("completion_len_max", m.completion_len_max as f64);
        r.set("completion_tokens", m.completion_tokens as f64);
        r.set("zero_std_groups", m.zero_std_groups as f64);
        r
    }
}

impl ItemLazy for StepRecord {
    type ItemSync = StepRecord;
    fn sync(self) -> Self::ItemSync {
        self
    }
}

impl Adaptor<StepRecord> for StepRecord {
    fn adapt(&self) -> StepRecord {
        self.clone()
    }
}

/// A burn-train numeric metric reading one key of a [`StepRecord`].
#[derive(Clone)]
pub struct StepScalar {
    key: String,
    name: MetricName,
    higher_is_better: bool,
    precision: usize,
    state: NumericMetricState,
}

impl StepScalar {
    pub fn new(key: &str, higher_is_better: bool) -> Self {
        Self {
            key: key.to_string(),
            // burn-train's file logger names a file after the metric: no path separators.
            name: Arc::new(key.replace('/', "_")),
            higher_is_better,
            precision: 4,
            state: NumericMetricState::new(),
        }
    }
}

impl Metric for StepScalar {
    type Input = StepRecord;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: None,
            higher_is_better: self.higher_is_better,
        }
        .into()
    }

    fn update(&mut self, item: &StepRecord, _meta: &MetricMetadata) -> SerializedEntry {
        let v = item.get(&self.key).unwrap_or(f64::NAN);
        self.state.update(
            v,
            1,
            FormatOptions::new(self.name.clone()).precision(self.precision),
        )
    }

    fn clear(&mut self) {
        self.state.reset();
    }
}

impl Numeric for StepScalar {
    fn value(&self) -> NumericEntry {
        self.state.current_value()
    }

    fn running_value(&self) -> NumericEntry {
        self.state.running_value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_means_sums_and_extremes() {
        let a = StepRecord {
            values: vec![
                ("loss".into(), 0.25),
                ("reward_mean".into(), 1.0),
                ("completion_len_min".into(), 3.0),
                ("completion_len_max".into(), 9.0),
                ("completion_tokens".into(), 40.0),
            ],
        };
        let mut b = a.clone();
        b.set("loss", 0.5);
        b.set("reward_mean", 0.0);
        b.set("completion_len_min", 1.0);
        b.set("completion_len_max", 5.0);
        b.set("completion_tokens", 10.0);
        let m = StepRecord::merge(&[a, b]);
        assert_eq!(m.get("loss"), Some(0.75));
        assert_eq!(m.get("reward_mean"), Some(0.5));
        assert_eq!(m.get("completion_len_min"), Some(1.0));
        assert_eq!(m.get("completion_len_max"), Some(9.0));
        assert_eq!(m.get("completion_tokens"), Some(50.0));
        let mut j = StepRecord::default();
        j.set("step", 3.0);
        j.set("kl", f64::NAN);
        assert_eq!(j.to_json(), r#"{"step":3,"kl":null}"#);
    }
}
