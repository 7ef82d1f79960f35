//! Evaluation as in Med-R1's script: greedy decoding, the letter inside `<answer> X </answer>`,
//! accuracy per modality, per question type and overall, with unparsable outputs counted.
//! Tables come out shaped like the paper's (one column per modality / question type).

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use medvqa::{Modality, QuestionType};
use qwen2vl::generation::{generate, GenerationConfig, Sampling, ShapeBuckets};
use qwen2vl::processor::TextTokenizer;
use qwen2vl::{Qwen2VL, Qwen2VLError, TokenBatch};
use serde::{Deserialize, Serialize};

use crate::advantages::{std_unbiased, zero_std_fraction};
use crate::learner::{images_of, sample_groups, PromptInput};
use crate::rewards::{extract_letter, WeightedRewards};
use crate::stream::{PromptError, PromptSource, PromptStream, StreamOptions};

/// How an output is judged against the answer letter: this project's extraction, or one of
/// Med-R1's evaluation scripts (v1.0.0, `src/eval_vqa/`), to reproduce the paper's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// The word inside the first `<answer> X </answer>` (Med-R1's think scripts).
    #[default]
    Tags,
    /// The whole output must equal the letter (`model_answer = original_output` in
    /// `test_qwen2vl_vqa_nothink.py` and `test_qwen2vl_vqa_zero_shot.py`).
    MedR1Raw,
    /// The tag's word when the output contains "answer", else the whole output
    /// (`test_qwen2_5vl_vqa_nothink.py`).
    MedR1Hybrid,
}

/// Why an evaluation stopped.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] Qwen2VLError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error("evaluation interrupted after {done} of {total} questions")]
    Interrupted { done: usize, total: usize },
}

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
    judge_with(Scoring::Tags, output, answer_letter)
}

/// Scores one output against its answer letter with `scoring`: the extracted answer (`None`:
/// nothing to compare, counted as unparsable) and whether it equals the letter exactly.
pub fn judge_with(scoring: Scoring, output: &str, answer_letter: char) -> (Option<String>, bool) {
    let predicted = match scoring {
        Scoring::Tags => extract_letter(output),
        Scoring::MedR1Raw => Some(output.to_string()),
        Scoring::MedR1Hybrid if output.contains("answer") => extract_letter(output),
        Scoring::MedR1Hybrid => Some(output.to_string()),
    };
    let correct = predicted.as_deref() == Some(answer_letter.to_string().as_str());
    (predicted, correct)
}

impl EvalReport {
    pub fn record(&mut self, p: &PromptInput, output: String) {
        self.record_with(Scoring::Tags, p, output)
    }

    pub fn record_with(&mut self, scoring: Scoring, p: &PromptInput, output: String) {
        let r = &p.record;
        let (predicted, correct) = judge_with(scoring, &output, r.answer_letter());
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
        let mut out = tables_markdown(&[(model_name, self)]);
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

/// The column names present in any of `reports`, in table order, for modalities and for
/// question types (with their short and full names).
fn column_names(reports: &[&EvalReport]) -> (Vec<&'static str>, Vec<(&'static str, &'static str)>) {
    let mods = Modality::ALL
        .iter()
        .filter(|m| reports.iter().any(|r| r.by_modality.contains_key(m.name())))
        .map(|m| m.name())
        .collect();
    let types = QuestionType::ALL
        .iter()
        .filter(|q| {
            reports
                .iter()
                .any(|r| r.by_question_type.contains_key(q.name()))
        })
        .map(|q| (q.short(), q.name()))
        .collect();
    (mods, types)
}

/// The paper's two tables with a row per report; a column a report lacks reads `-`.
fn tables_markdown(rows: &[(&str, &EvalReport)]) -> String {
    let reports: Vec<&EvalReport> = rows.iter().map(|(_, r)| *r).collect();
    let (mods, types) = column_names(&reports);
    let mods: Vec<(&str, &str)> = mods.into_iter().map(|m| (m, m)).collect();
    let mut out = String::new();
    for (title, cols, by_type) in [
        ("Accuracy by modality (%)", mods, false),
        ("Accuracy by question type (%)", types, true),
    ] {
        if cols.is_empty() {
            continue;
        }
        out.push_str(&format!("### {title}\n\n| Model |"));
        for (short, _) in &cols {
            out.push_str(&format!(" {short} |"));
        }
        out.push_str(" Overall |\n|---|");
        out.push_str(&"---:|".repeat(cols.len() + 1));
        out.push('\n');
        for (name, r) in rows {
            out.push_str(&format!("| {name} |"));
            for (_, key) in &cols {
                let table = if by_type {
                    &r.by_question_type
                } else {
                    &r.by_modality
                };
                match table.get(*key) {
                    Some(t) => out.push_str(&format!(" {:.2} |", 100.0 * t.accuracy())),
                    None => out.push_str(" - |"),
                }
            }
            out.push_str(&format!(" {:.2} |\n", 100.0 * r.overall.accuracy()));
        }
        out.push('\n');
    }
    out
}

/// One table per grouping with a row per `(label, report)`: the cross-modality matrix when
/// each checkpoint was trained on one modality.
pub fn comparison_markdown(rows: &[(String, EvalReport)]) -> String {
    let refs: Vec<(&str, &EvalReport)> = rows.iter().map(|(n, r)| (n.as_str(), r)).collect();
    let mut out = tables_markdown(&refs);
    out.push_str("| Model | Questions | Correct | Unparsable |\n|---|---:|---:|---:|\n");
    for (n, r) in rows {
        out.push_str(&format!(
            "| {n} | {} | {} | {} |\n",
            r.overall.total, r.overall.correct, r.overall.unparsable
        ));
    }
    out
}

/// `model,group,name,total,correct,unparsable,accuracy`: every report's rows.
pub fn comparison_csv(rows: &[(String, EvalReport)]) -> String {
    let mut out = String::from("model,group,name,total,correct,unparsable,accuracy\n");
    for (n, r) in rows {
        let quoted = if n.contains([',', '"']) {
            format!("\"{}\"", n.replace('"', "\"\""))
        } else {
            n.clone()
        };
        for line in r.to_csv().lines().skip(1) {
            out.push_str(&format!("{quoted},{line}\n"));
        }
    }
    out
}

/// Decoding settings of an evaluation.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub batch_size: usize,
    pub max_new_tokens: usize,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
    /// Prompt widths padded (masked) to bucket widths, as in [`GenerationConfig::buckets`].
    pub buckets: ShapeBuckets,
    pub scoring: Scoring,
}

fn generation_config(cfg: &EvalConfig) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: cfg.max_new_tokens,
        sampling: Sampling::GREEDY,
        eos_token_ids: cfg.eos_token_ids.clone(),
        pad_token_id: cfg.pad_token_id,
        seed: 0,
        buckets: cfg.buckets,
    }
}

/// Greedy answers for one batch, recorded into `report`.
fn evaluate_batch<B: Backend>(
    model: &Qwen2VL<B>,
    chunk: &[PromptInput],
    tokenizer: &TextTokenizer,
    cfg: &EvalConfig,
    report: &mut EvalReport,
    device: &B::Device,
) -> Result<(), Qwen2VLError> {
    let rows: Vec<Vec<u32>> = chunk.iter().map(|p| p.ids.clone()).collect();
    let refs: Vec<&PromptInput> = chunk.iter().collect();
    let batch = TokenBatch::left_padded(&rows, cfg.pad_token_id);
    let out = generate(
        model,
        &batch,
        images_of::<B>(&refs, device)?.as_ref(),
        &generation_config(cfg),
        false,
    )?;
    for (p, tokens) in chunk.iter().zip(&out.tokens) {
        let text = tokenizer.decode(tokens, true).unwrap_or_default();
        report.record_with(cfg.scoring, p, text);
    }
    Ok(())
}

/// Sampled held-out evaluation, TRL's `num_generations_eval` (trl/trainer/grpo_config.py:67,
/// used at grpo_trainer.py:741 and 1277): each question answered `num_generations` times with
/// the training run's sampling settings and scored by its reward functions, as TRL's
/// evaluation loop generates and scores an eval batch (`_generate_and_score_completions` with
/// `mode = "eval"`). medr1's default held-out evaluation stays greedy (Med-R1's protocol);
/// this one is chosen by setting the option.
#[derive(Clone)]
pub struct SampledEval {
    pub num_generations: usize,
    pub sampling: Sampling,
    pub rewards: Arc<WeightedRewards>,
    /// The draws of a batch are seeded by this plus the batch's first question index, so
    /// every evaluation of a run draws the same random numbers: two checkpoints differ only by
    /// their weights, and a resumed run evaluates as the uninterrupted one.
    pub seed: u64,
}

impl std::fmt::Debug for SampledEval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampledEval")
            .field("num_generations", &self.num_generations)
            .field("sampling", &self.sampling)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

/// What a sampled evaluation measured: every sample recorded in `report` (its accuracies are
/// means over the samples), with the rewards and lengths of the samples, question after
/// question (`num_generations` each).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampledReport {
    pub report: EvalReport,
    pub num_generations: usize,
    pub rewards: Vec<f32>,
    pub per_reward: Vec<(String, Vec<f32>)>,
    pub completion_lens: Vec<usize>,
}

impl SampledReport {
    /// Questions with at least one correct sample.
    pub fn solved(&self) -> usize {
        self.report
            .predictions
            .chunks(self.num_generations.max(1))
            .filter(|g| g.iter().any(|p| p.correct))
            .count()
    }

    /// The metrics under the names a training step logs them (`reward_mean`, `reward_std`
    /// over every sample as TRL's `reward_std`, `reward/<name>`, `zero_std_groups`,
    /// `completion_len_mean`), plus `accuracy` (mean over samples), `pass_at_n` (questions
    /// with a correct sample among their `num_generations`) and `unparsable` (fraction of
    /// samples).
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let n = self.rewards.len().max(1) as f64;
        let questions = self.rewards.len() / self.num_generations.max(1);
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
        let mut out = vec![
            ("accuracy".to_string(), self.report.overall.accuracy()),
            (
                "pass_at_n".to_string(),
                self.solved() as f64 / questions.max(1) as f64,
            ),
            (
                "unparsable".to_string(),
                self.report.overall.unparsable as f64 / n,
            ),
            ("reward_mean".to_string(), mean(&self.rewards)),
            ("reward_std".to_string(), std_unbiased(&self.rewards) as f64),
        ];
        for (name, v) in &self.per_reward {
            out.push((format!("reward/{name}"), mean(v)));
        }
        out.push((
            "zero_std_groups".to_string(),
            zero_std_fraction(&self.rewards, self.num_generations.max(1)) as f64,
        ));
        out.push((
            "completion_len_mean".to_string(),
            self.completion_lens.iter().sum::<usize>() as f64 / n,
        ));
        out
    }
}

/// `sampled.num_generations` answers to each of `prompts`, `cfg.batch_size` questions at a
/// time, sampled as a rollout samples (each prompt prefilled once for its group), scored by
/// `cfg.scoring` and by the reward functions; `first_index` seeds the first batch's draws.
pub fn evaluate_sampled<B: Backend>(
    model: &Qwen2VL<B>,
    prompts: &[PromptInput],
    tokenizer: &TextTokenizer,
    cfg: &EvalConfig,
    sampled: &SampledEval,
    first_index: usize,
    device: &B::Device,
) -> Result<SampledReport, Qwen2VLError> {
    let g = sampled.num_generations;
    if g == 0 {
        return Err(Qwen2VLError::Input(
            "num_generations_eval must be at least 1".into(),
        ));
    }
    let mut out = SampledReport {
        num_generations: g,
        per_reward: sampled
            .rewards
            .rewards
            .iter()
            .map(|(r, _)| (r.name().to_string(), Vec::new()))
            .collect(),
        ..Default::default()
    };
    let batch = cfg.batch_size.max(1);
    for (i, chunk) in prompts.chunks(batch).enumerate() {
        let gen_cfg = GenerationConfig {
            sampling: sampled.sampling,
            seed: sampled.seed.wrapping_add((first_index + i * batch) as u64),
            ..generation_config(cfg)
        };
        let groups = sample_groups(
            model,
            chunk,
            tokenizer,
            &sampled.rewards,
            g,
            true,
            &gen_cfg,
            device,
        )?;
        out.rewards.extend(&groups.scores.total);
        for ((_, all), (_, s)) in out.per_reward.iter_mut().zip(groups.scores.per_reward) {
            all.extend(s);
        }
        out.completion_lens
            .extend(groups.out.tokens.iter().map(Vec::len));
        let questions = chunk.iter().flat_map(|p| std::iter::repeat_n(p, g));
        for (p, text) in questions.zip(groups.texts) {
            out.report.record_with(cfg.scoring, p, text);
        }
    }
    Ok(out)
}

/// Greedy answers for every prompt of `source`, `batch_size` at a time, the next batches
/// prepared while one is generating; `progress(done, total)` after each batch, and
/// `should_stop()` before each (a stop request ends the evaluation with an error).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_source<B: Backend>(
    model: &Qwen2VL<B>,
    source: Arc<dyn PromptSource>,
    tokenizer: &TextTokenizer,
    cfg: &EvalConfig,
    stream: StreamOptions,
    device: &B::Device,
    progress: &mut dyn FnMut(usize, usize),
    should_stop: &dyn Fn() -> bool,
) -> Result<EvalReport, EvalError> {
    let total = source.len();
    let batch = cfg.batch_size.max(1);
    let opts = StreamOptions {
        prefetch: stream.prefetch.max(batch),
        ..stream
    };
    let mut prompts = PromptStream::new(source, (0..total).collect(), opts);
    let mut report = EvalReport::default();
    let mut done = 0;
    while done < total {
        if should_stop() {
            return Err(EvalError::Interrupted { done, total });
        }
        let chunk = prompts.take(batch)?;
        evaluate_batch(model, &chunk, tokenizer, cfg, &mut report, device)?;
        done += chunk.len();
        progress(done, total);
    }
    Ok(report)
}

/// Greedy answers for `prompts`, `batch_size` at a time.
pub fn evaluate<B: Backend>(
    model: &Qwen2VL<B>,
    prompts: &[PromptInput],
    tokenizer: &TextTokenizer,
    cfg: &EvalConfig,
    device: &B::Device,
) -> Result<EvalReport, Qwen2VLError> {
    let mut report = EvalReport::default();
    for chunk in prompts.chunks(cfg.batch_size.max(1)) {
        evaluate_batch(model, chunk, tokenizer, cfg, &mut report, device)?;
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
            images: vec![],
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

    /// Two questions, two samples each: question 1 answered right once and unparsably once,
    /// question 2 wrong twice with equal rewards.
    #[test]
    fn sampled_metrics_by_hand() {
        let mut r = SampledReport {
            num_generations: 2,
            rewards: vec![1.0, 0.0, 0.5, 0.5],
            per_reward: vec![("fmt".into(), vec![1.0, 0.0, 1.0, 1.0])],
            completion_lens: vec![3, 5, 2, 2],
            ..Default::default()
        };
        let q1 = prompt(0, Modality::Ct, QuestionType::LesionGrading);
        let q2 = prompt(1, Modality::Ct, QuestionType::LesionGrading);
        for (p, out) in [
            (&q1, "<answer> A </answer>"),
            (&q1, "x"),
            (&q2, "<answer> A </answer>"),
            (&q2, "<answer> C </answer>"),
        ] {
            r.report.record(p, out.into());
        }
        let m: BTreeMap<String, f64> = r.metrics().into_iter().collect();
        let expect = [
            ("accuracy", 0.25),
            ("pass_at_n", 0.5),
            ("unparsable", 0.25),
            ("reward_mean", 0.5),
            // Deviations 0.5, -0.5, 0, 0: sqrt(0.5 / 3).
            ("reward_std", (0.5f64 / 3.0).sqrt()),
            ("reward/fmt", 0.75),
            ("zero_std_groups", 0.5),
            ("completion_len_mean", 3.0),
        ];
        assert_eq!(m.len(), expect.len(), "{m:?}");
        for (k, v) in expect {
            assert!((m[k] - v).abs() < 1e-6, "{k}: {} vs {v}", m[k]);
        }
        assert_eq!(r.solved(), 1);
    }

    #[test]
    fn one_row_per_checkpoint() {
        let mut ct = EvalReport::default();
        ct.record(
            &prompt(0, Modality::Ct, QuestionType::LesionGrading),
            "<answer> A </answer>".into(),
        );
        let mut oct = EvalReport::default();
        oct.record(
            &prompt(1, Modality::Oct, QuestionType::LesionGrading),
            "<answer> A </answer>".into(),
        );
        oct.record(
            &prompt(1, Modality::Ct, QuestionType::LesionGrading),
            "<answer> B </answer>".into(),
        );
        let rows = vec![("train-CT".to_string(), ct), ("a,b".to_string(), oct)];
        let md = comparison_markdown(&rows);
        assert!(md.contains("| Model | CT | OCT | Overall |"), "{md}");
        assert!(md.contains("| train-CT | 100.00 | - | 100.00 |"), "{md}");
        assert!(md.contains("| a,b | 100.00 | 0.00 | 50.00 |"), "{md}");
        assert!(md.contains("| train-CT | 1 | 1 | 0 |"), "{md}");
        let csv = comparison_csv(&rows);
        assert!(csv.starts_with("model,group,name,"), "{csv}");
        assert!(csv.contains("train-CT,modality,CT,1,1,0,1.000000"), "{csv}");
        assert!(csv.contains("\"a,b\",modality,OCT,1,0,0,0.000000"), "{csv}");
    }

    #[test]
    fn med_r1_scoring_protocols() {
        use Scoring::*;
        /// What one protocol extracts from an output, and whether it is judged correct.
        type Judged<'a> = (Option<&'a str>, bool);
        let cases: [(&str, [Judged; 3]); 6] = [
            // output: (tags, raw, hybrid)
            (
                "<answer> B </answer>",
                [
                    (Some("B"), true),
                    (Some("<answer> B </answer>"), false),
                    (Some("B"), true),
                ],
            ),
            ("B", [(None, false), (Some("B"), true), (Some("B"), true)]),
            // Raw equality: a trailing period or space is wrong.
            (
                "B.",
                [(None, false), (Some("B."), false), (Some("B."), false)],
            ),
            (
                " B",
                [(None, false), (Some(" B"), false), (Some(" B"), false)],
            ),
            // "answer" present but no tag: the hybrid script's regex finds nothing.
            (
                "The answer is B",
                [
                    (None, false),
                    (Some("The answer is B"), false),
                    (None, false),
                ],
            ),
            (
                "<think>x</think><answer>A</answer>",
                [
                    (Some("A"), false),
                    (Some("<think>x</think><answer>A</answer>"), false),
                    (Some("A"), false),
                ],
            ),
        ];
        for (output, expected) in cases {
            for (scoring, (pred, correct)) in
                [Tags, MedR1Raw, MedR1Hybrid].into_iter().zip(expected)
            {
                let (p, c) = judge_with(scoring, output, 'B');
                assert_eq!(
                    (p.as_deref(), c),
                    (pred, correct),
                    "{scoring:?} on {output:?}"
                );
            }
        }
    }
}
