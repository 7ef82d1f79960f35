//! Filters, deterministic splits and balanced sampling.

use std::collections::BTreeMap;

use crate::record::VqaRecord;
use crate::rng::Rng;
use crate::taxonomy::{Modality, QuestionType};

/// Which records to keep; an empty list keeps all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub modalities: Vec<Modality>,
    pub question_types: Vec<QuestionType>,
    pub datasets: Vec<String>,
}

impl Filter {
    pub fn keeps(&self, r: &VqaRecord) -> bool {
        (self.modalities.is_empty() || r.modality.is_some_and(|m| self.modalities.contains(&m)))
            && (self.question_types.is_empty()
                || r.question_type
                    .is_some_and(|q| self.question_types.contains(&q)))
            && (self.datasets.is_empty()
                || r.dataset
                    .as_ref()
                    .is_some_and(|d| self.datasets.contains(d)))
    }

    pub fn apply(&self, records: Vec<VqaRecord>) -> Vec<VqaRecord> {
        records.into_iter().filter(|r| self.keeps(r)).collect()
    }
}

/// Deterministic train/test split for data that has none: a seeded shuffle, then the first
/// `round(test_fraction * n)` records are the test set. Order within each part is the input
/// order.
pub fn split_train_test(
    records: &[VqaRecord],
    test_fraction: f64,
    seed: u64,
) -> (Vec<VqaRecord>, Vec<VqaRecord>) {
    let n = records.len();
    let n_test = ((test_fraction.clamp(0.0, 1.0) * n as f64).round() as usize).min(n);
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed).shuffle(&mut order);
    let mut is_test = vec![false; n];
    for &i in &order[..n_test] {
        is_test[i] = true;
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (r, t) in records.iter().zip(is_test) {
        if t {
            test.push(r.clone());
        } else {
            train.push(r.clone());
        }
    }
    (train, test)
}

/// Up to `per_group` records from each group (`key`), chosen by a seeded shuffle; groups come
/// out in key order.
pub fn balanced_sample<K: Ord>(
    records: &[VqaRecord],
    per_group: usize,
    seed: u64,
    key: impl Fn(&VqaRecord) -> K,
) -> Vec<VqaRecord> {
    let mut groups: BTreeMap<K, Vec<&VqaRecord>> = BTreeMap::new();
    for r in records {
        groups.entry(key(r)).or_default().push(r);
    }
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for (_, mut members) in groups {
        rng.shuffle(&mut members);
        out.extend(members.into_iter().take(per_group).cloned());
    }
    out
}
