//! Counts per modality x question type, as a table or JSON.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::record::VqaRecord;
use crate::taxonomy::{Modality, QuestionType};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub total: usize,
    pub cells: BTreeMap<(Option<Modality>, Option<QuestionType>), usize>,
    pub options: BTreeMap<usize, usize>,
    pub datasets: BTreeMap<String, usize>,
}

impl Summary {
    pub fn of(records: &[VqaRecord]) -> Self {
        let mut s = Summary::default();
        for r in records {
            s.total += 1;
            *s.cells.entry((r.modality, r.question_type)).or_default() += 1;
            *s.options.entry(r.options.len()).or_default() += 1;
            *s.datasets
                .entry(r.dataset.clone().unwrap_or_else(|| "?".into()))
                .or_default() += 1;
        }
        s
    }

    pub fn by_modality(&self) -> BTreeMap<Option<Modality>, usize> {
        let mut m = BTreeMap::new();
        for ((md, _), n) in &self.cells {
            *m.entry(*md).or_default() += n;
        }
        m
    }

    pub fn by_question_type(&self) -> BTreeMap<Option<QuestionType>, usize> {
        let mut m = BTreeMap::new();
        for ((_, q), n) in &self.cells {
            *m.entry(*q).or_default() += n;
        }
        m
    }

    /// Rows: modalities (and `-` for unknown); columns: question types, then the row total.
    pub fn table(&self) -> String {
        let rows: Vec<Option<Modality>> = Modality::ALL
            .iter()
            .map(|m| Some(*m))
            .chain([None])
            .collect();
        let cols: Vec<Option<QuestionType>> = QuestionType::ALL
            .iter()
            .map(|q| Some(*q))
            .chain([None])
            .collect();
        let mut out = format!("{:<12}", "modality");
        for c in &cols {
            out.push_str(&format!("{:>8}", c.map_or("-", |q| q.short())));
        }
        out.push_str(&format!("{:>9}\n", "total"));
        for r in &rows {
            let total: usize = cols
                .iter()
                .map(|c| self.cells.get(&(*r, *c)).copied().unwrap_or(0))
                .sum();
            if total == 0 {
                continue;
            }
            out.push_str(&format!("{:<12}", r.map_or("-", |m| m.name())));
            for c in &cols {
                out.push_str(&format!(
                    "{:>8}",
                    self.cells.get(&(*r, *c)).copied().unwrap_or(0)
                ));
            }
            out.push_str(&format!("{total:>9}\n"));
        }
        out.push_str(&format!("{:<12}", "total"));
        let by_q = self.by_question_type();
        for c in &cols {
            out.push_str(&format!("{:>8}", by_q.get(c).copied().unwrap_or(0)));
        }
        out.push_str(&format!("{:>9}\n", self.total));
        let opts: Vec<String> = self
            .options
            .iter()
            .map(|(k, n)| format!("{k} options: {n}"))
            .collect();
        out.push_str(&format!(
            "{}; {} source datasets\n",
            opts.join(", "),
            self.datasets.len()
        ));
        out
    }

    pub fn to_json(&self) -> Value {
        let name_m =
            |m: &Option<Modality>| m.map_or("unknown".to_string(), |m| m.name().to_string());
        let name_q =
            |q: &Option<QuestionType>| q.map_or("unknown".to_string(), |q| q.name().to_string());
        json!({
            "total": self.total,
            "by_modality": self.by_modality().iter().map(|(m, n)| (name_m(m), json!(n))).collect::<serde_json::Map<_, _>>(),
            "by_question_type": self.by_question_type().iter().map(|(q, n)| (name_q(q), json!(n))).collect::<serde_json::Map<_, _>>(),
            "cells": self.cells.iter().map(|((m, q), n)| json!({"modality": name_m(m), "question_type": name_q(q), "count": n})).collect::<Vec<_>>(),
            "options": self.options.iter().map(|(k, n)| (k.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "datasets": self.datasets,
        })
    }
}
