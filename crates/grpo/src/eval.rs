//! Evaluation as in Med-R1's script: greedy decoding, the letter inside `<answer> X </answer>`,
//! accuracy per modality, per question type and overall, with unparsable outputs counted.
//! Tables come out shaped like the paper's (one column per modality / question type).

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use medvqa::{Modality, QuestionType};
use qwen2vl::generation::{generate, GenerationConfig, Sampling};
use qwen2vl::processor::TextTokenizer;
use qwen2vl::{Qwen2VL, Qwen2VLError, TokenBatch};
use serde::Serialize;

use crate::learner::{images_of, PromptInput};
use crate::rewards::extract_letter;

/// Correct / total / unparsable counts of one group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub total: usize,
    pub correct: usize,
    pub unparsable: usize,
}

impl Tally {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }

    fn add(&mut self, correct: bool, parsed: bool) {
        self.total += 1;
        self.correct += correct as usize;
        self.unparsable += (!parsed) as usize;
    }
}

/// Named tallies in table-column order.
type Columns = Vec<(String, Tally)>;

/// One evaluated question.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub id: String,
    pub output: String,
    pub predicted: Option<String>,
    pub answer: String,
    pub correct: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EvalReport {
    pub overall: Tally,
    pub by_modality: BTreeMap<String, Tally>,
    pub by_question_type: BTreeMap<String, Tally>,
    pub predictions: Vec<Prediction>,
}

/// Scores one output against its record (Med-R1's eval extraction).
pub fn judge(output: &str, answer_letter: char) -> (Option<String>, bool) {
    let predicted = extract_letter(output);
    let correct = predicted.as_deref() == Some(answer_letter.to_string().as_str());
    (predicted, correct)
}

impl EvalReport {
    pub fn record(&mut self, p: &PromptInput, output: String) {
        let r = &p.record;
        let (predicted, correct) = judge(&output, r.answer_letter());
        let parsed = predicted.is_some();
        self.overall.add(correct, parsed);
        if let Some(m) = r.modality {
            self.by_modality
                .entry(m.name().to_string())
                .or_default()
                .add(correct, parsed);
        }
        if let Some(q) = r.question_type {
            self.by_question_type
                .entry(q.name().to_string())
                .or_default()
                .add(correct, parsed);
        }
        self.predictions.push(Prediction {
            id: r.id.clone(),
            output,
            predicted,
            answer: r.answer_letter().to_string(),
            correct,
        });
    }

    fn columns(&self) -> (Columns, Columns) {
        let modalities = Modality::ALL
            .iter()
            .filter_map(|m| {
                self.by_modality
                    .get(m.name())
                    .map(|t| (m.name().to_string(), *t))
            })
            .collect();
        let types = QuestionType::ALL
            .iter()
            .filter_map(|q| {
                self.by_question_type
                    .get(q.name())
                    .map(|t| (q.short().to_string(), *t))
            })
            .collect();
        (modalities, types)
    }

    /// `{"overall": {accuracy, total, correct, unparsable}, "by_modality": {name: {...}},
    /// "by_question_type": {...}, "predictions": [...]}`.
    pub fn to_json(&self) -> String {
        let tally = |t: &Tally| {
            serde_json::json!({
                "accuracy": t.accuracy(),
                "total": t.total,
                "correct": t.correct,
                "unparsable": t.unparsable,
            })
        };
        let table = |m: &BTreeMap<String, Tally>| {
            m.iter()
                .map(|(k, t)| (k.clone(), tally(t)))
                .collect::<serde_json::Map<_, _>>()
        };
        serde_json::to_string_pretty(&serde_json::json!({
            "overall": tally(&self.overall),
            "by_modality": table(&self.by_modality),
            "by_question_type": table(&self.by_question_type),
            "predictions": self.predictions,
        }))
        .expect("serialisable")
    }

    /// Two Markdown tables (modalities, question types), accuracy in percent, plus counts.
    pub fn to_markdown(&self, model_name: &str) -> String {
        let (mods, types) = self.columns();
        let mut out = String::new();
        for (title, cols) in [
            ("Accuracy by modality (%)", mods),
            ("Accuracy by question type (%)", types),
        ] {
            if cols.is_empty() {
                continue;
            }
            out.push_str(&format!("### {title}\n\n| Model |"));
            for (name, _) in &cols {
                out.push_str(&format!(" {name} |"));
            }
            out.push_str(" Overall |\n|---|");
            out.push_str(&"---:|".repeat(cols.len() + 1));
            out.push_str(&format!("\n| {model_name} |"));
            for (_, t) in &cols {
                out.push_str(&format!(" {:.2} |", 100.0 * t.accuracy()));
            }
            out.push_str(&format!(" {:.2} |\n\n", 100.0 * self.overall.accuracy()));
        }
        out.push_str(&format!(
            "{} questions, {} correct, {} unparsable answers.\n",
            self.overall.total, self.overall.correct, self.overall.unparsable
        ));
        out
    }

    /// `group,name,total,correct,unparsable,accuracy` rows.
    pub fn to_csv(&self) -> String {
        let mut out = String::from("group,name,total,correct,unparsable,accuracy\n");
        let (mods, _) = self.columns();
        let row = |g: &str, n: &str, t: &Tally| {
            format!(
                "{g},{n},{},{},{},{:.6}\n",
                t.total,
                t.correct,
                t.unparsable,
                t.accuracy()
            )
        };
        for (n, t) in &mods {
            out.push_str(&row("modality", n, t));
        }
        for q in QuestionType::ALL {
            if let Some(t) = self.by_question_type.get(q.name()) {
                out.push_str(&row("question_type", q.name(), t));
            }
        }
        out.push_str(&row("overall", "overall", &self.overall));
        out
    }
}

/// Decoding settings of an evaluation.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub batch_size: usize,
    pub max_new_tokens: usize,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
    /// Prompt widths padded (masked) to multiples of this (1: exact), as in
    /// [`GenerationConfig::prompt_bucket`].
    pub prompt_bucket: usize,
}

/// Greedy answers for `prompts`, `batch_size` at a time.
pub fn evaluate<B: Backend>(
    model: &Qwen2VL<B>,
    prompts: &[PromptInput],
    tokenizer: &TextTokenizer,
    cfg: &EvalConfig,
    device: &B::Device,
) -> Result<EvalReport, Qwen2VLError> {
    let gen = GenerationConfig {
        max_new_tokens: cfg.max_new_tokens,
        sampling: Sampling::GREEDY,
        eos_token_ids: cfg.eos_token_ids.clone(),
        pad_token_id: cfg.pad_token_id,
        seed: 0,
        prompt_bucket: cfg.prompt_bucket,
    };
    let mut report = EvalReport::default();
    for chunk in prompts.chunks(cfg.batch_size.max(1)) {
        let rows: Vec<Vec<u32>> = chunk.iter().map(|p| p.ids.clone()).collect();
        let refs: Vec<&PromptInput> = chunk.iter().collect();
        let batch = TokenBatch::left_padded(&rows, cfg.pad_token_id);
        let out = generate(
            model,
            &batch,
            images_of::<B>(&refs, device).as_ref(),
            &gen,
            false,
        )?;
        for (p, tokens) in chunk.iter().zip(&out.tokens) {
            let text = tokenizer.decode(tokens, true).unwrap_or_default();
            report.record(p, text);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use medvqa::VqaRecord;

    fn prompt(answer: usize, modality: Modality, q: QuestionType) -> PromptInput {
        PromptInput {
            text: String::new(),
            ids: vec![],
            pixels: vec![],
            grids: vec![],
            patch_dim: 0,
            record: VqaRecord {
                id: format!("{modality}-{answer}"),
                image: String::new(),
                question: "Q?".into(),
                options: vec!["a".into(), "b".into(), "c".into()],
                answer,
                modality: Some(modality),
                question_type: Some(q),
                dataset: None,
            },
        }
    }

    #[test]
    fn tallies_and_tables() {
        let mut r = EvalReport::default();
        r.record(
            &prompt(0, Modality::Ct, QuestionType::LesionGrading),
            "<answer> A </answer>".into(),
        );
        r.record(
            &prompt(1, Modality::Ct, QuestionType::LesionGrading),
            "<answer>C</answer>".into(),
        );
        r.record(
            &prompt(2, Modality::Oct, QuestionType::ModalityRecognition),
            "I think C".into(),
        );
        r.record(
            &prompt(2, Modality::Oct, QuestionType::ModalityRecognition),
            "<think>x</think><answer>\nC\n</answer>".into(),
        );
        assert_eq!(
            r.overall,
            Tally {
                total: 4,
                correct: 2,
                unparsable: 1
            }
        );
        assert_eq!(
            r.by_modality["CT"],
            Tally {
                total: 2,
                correct: 1,
                unparsable: 0
            }
        );
        assert_eq!(r.by_modality["OCT"].unparsable, 1);
        let md = r.to_markdown("tiny");
        assert!(md.contains("| Model | CT | OCT | Overall |"), "{md}");
        assert!(md.contains("| tiny | 50.00 | 50.00 | 50.00 |"), "{md}");
        assert!(
            md.contains("| tiny | 50.00 | 50.00 | 50.00 |\n\n4 questions"),
            "{md}"
        );
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["overall"]["accuracy"], 0.5);
        assert_eq!(json["by_modality"]["OCT"]["unparsable"], 1);
        assert_eq!(json["predictions"].as_array().unwrap().len(), 4);
        let csv = r.to_csv();
        assert!(
            csv.contains("modality,CT,2,1,0,0.500000")
                && csv.contains("overall,overall,4,2,1,0.500000"),
            "{csv}"
        );
    }
}
