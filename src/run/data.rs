//! A run's records: synthetic data generated into the run directory on first use, or the
//! user's Med-R1 / OmniMedVQA files; filters and seeded caps; every image's header checked;
//! then prompt sources that make each prompt's pixels only when it is used.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use grpo::stream::{PromptSource, RecordPrompts, StreamOptions};
use medvqa::load::write_skip_report;
use medvqa::select::{balanced_sample, Filter};
use medvqa::synth::{write_synthetic_with, SynthConfig};
use medvqa::{LoadOptions, Modality, PromptTemplate, QuestionType, VqaRecord};
use qwen2vl::processor::Processor;

use super::scan::{scan, Fit};
use crate::config::RunConfig;

pub struct RunData {
    pub train: Vec<VqaRecord>,
    pub test: Vec<VqaRecord>,
    pub image_root: PathBuf,
}

/// `data.resize` as `(width, height)`.
pub fn resize(cfg: &RunConfig) -> Option<(usize, usize)> {
    match cfg.data.resize.as_slice() {
        [w, h] => Some((*w, *h)),
        _ => None,
    }
}

/// `data.prefetch` and `data.workers`.
pub fn stream_options(cfg: &RunConfig) -> StreamOptions {
    StreamOptions {
        prefetch: cfg.data.prefetch,
        workers: cfg.data.workers,
    }
}

fn modalities(names: &[String], key: &str) -> anyhow::Result<Vec<Modality>> {
    names
        .iter()
        .map(|n| Modality::parse(n).with_context(|| format!("{key}: unknown modality {n:?}")))
        .collect()
}

fn question_types(names: &[String], key: &str) -> anyhow::Result<Vec<QuestionType>> {
    names
        .iter()
        .map(|n| {
            QuestionType::parse(n).with_context(|| format!("{key}: unknown question type {n:?}"))
        })
        .collect()
}

/// Synthetic data under `dir` (generated unless `dir/train.json` and `dir/test.json` exist).
fn synthetic(cfg: &RunConfig, dir: &Path) -> anyhow::Result<()> {
    let settings = super::settings::synthetic_data(cfg);
    if dir.join("train.json").is_file() && dir.join("test.json").is_file() {
        let what = format!("{} (the synthetic data)", dir.display());
        return super::settings::check_reuse(dir, &what, &settings);
    }
    let s = &cfg.data.synthetic;
    let mut sc = SynthConfig {
        n: s.n,
        seed: s.seed.unwrap_or(cfg.seed),
        image_size: s.image_size,
        min_options: s.min_options,
        max_options: s.max_options,
        shuffle_options: s.shuffle_options,
        ..Default::default()
    };
    if !s.modalities.is_empty() {
        sc.modalities = modalities(&s.modalities, "data.synthetic.modalities")?;
    }
    if !s.question_types.is_empty() {
        sc.question_types = question_types(&s.question_types, "data.synthetic.question_types")?;
    }
    eprintln!(
        "generating {} synthetic questions into {}",
        s.n,
        dir.display()
    );
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let mut bar = crate::progress::Progress::new("writing synthetic images", s.n);
    write_synthetic_with(&sc, &tmp, s.test_fraction, &mut |done, _| bar.set(done))?;
    bar.finish();
    super::settings::record(&tmp, &settings)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(())
}

/// The run's records, filtered, capped and each checked: its image (the processor's size
/// limits included) and its prompt's length against the model's `positions`.
pub fn load(
    cfg: &RunConfig,
    run_dir: &Path,
    processor: &Processor,
    positions: usize,
    interrupt: &super::Interrupt,
) -> anyhow::Result<RunData> {
    let d = &cfg.data;
    let (train_paths, test_paths, root) = match d.source.as_str() {
        "synthetic" => {
            let dir = run_dir.join("data");
            synthetic(cfg, &dir)?;
            (
                vec![dir.join("train.json")],
                vec![dir.join("test.json")],
                dir,
            )
        }
        _ => (d.train.clone(), d.test.clone(), d.image_root.clone()),
    };
    let opts = LoadOptions {
        data_root: Some(root.clone()),
        require_images: true,
        skip_invalid: d.skip_invalid,
        ..Default::default()
    };
    let mut skipped = Vec::new();
    let mut read = |paths: &[PathBuf]| -> anyhow::Result<Vec<VqaRecord>> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let loaded = crate::commands::data::read_with_progress(paths, &opts)?;
        skipped.extend(loaded.skipped);
        Ok(loaded.records)
    };
    let qt = question_types(&d.question_types, "data.question_types")?;
    let train_filter = Filter {
        modalities: modalities(&d.train_modalities, "data.train_modalities")?,
        question_types: qt.clone(),
        datasets: Vec::new(),
    };
    let eval_filter = Filter {
        modalities: modalities(&d.eval_modalities, "data.eval_modalities")?,
        question_types: qt,
        datasets: Vec::new(),
    };
    let mut train = train_filter.apply(read(&train_paths)?);
    let mut test = eval_filter.apply(read(&test_paths)?);
    let cap = |records: Vec<VqaRecord>, max: usize, seed: u64| {
        if max == 0 || records.len() <= max {
            return records;
        }
        // Balanced over modality x question type, then trimmed to the cap.
        let groups = records
            .iter()
            .map(|r| (r.modality, r.question_type))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            .max(1);
        let mut s = balanced_sample(&records, max.div_ceil(groups), seed, |r| {
            (r.modality, r.question_type)
        });
        s.truncate(max);
        s
    };
    train = cap(train, d.max_train, cfg.seed);
    test = cap(test, d.max_eval, cfg.seed ^ 1);
    let size = resize(cfg);
    let stop = || interrupt.requested();
    let (train_template, eval_template) = (
        PromptTemplate::parse(&d.template)?,
        PromptTemplate::parse(&d.eval_template)?,
    );
    let fit = Fit {
        processor,
        template: &train_template,
        positions,
        reserve: cfg.grpo.max_completion_length,
    };
    let (train, bad) = scan(train, "training", &root, size, &fit, d.skip_invalid, &stop)?;
    skipped.extend(bad);
    let fit = Fit {
        template: &eval_template,
        reserve: cfg.eval.max_new_tokens,
        ..fit
    };
    let (test, bad) = scan(test, "held-out", &root, size, &fit, d.skip_invalid, &stop)?;
    skipped.extend(bad);
    if !skipped.is_empty() {
        let report = run_dir.join("skipped_records.json");
        write_skip_report(&skipped, &report)?;
        eprintln!(
            "data: left out {} invalid record(s) (data.skip_invalid), listed in {}",
            skipped.len(),
            report.display()
        );
    }
    if train.is_empty() && (cfg.grpo.trains() || cfg.sft.steps > 0) {
        bail!("no training records left after the data filters");
    }
    Ok(RunData {
        train,
        test,
        image_root: root,
    })
}

/// The prompts of `records` with `template`, each made (image read, resized, patchified)
/// only when it is used.
pub fn source(
    cfg: &RunConfig,
    records: Vec<VqaRecord>,
    template: &str,
    processor: &Arc<Processor>,
    root: &Path,
) -> anyhow::Result<Arc<dyn PromptSource>> {
    Ok(Arc::new(RecordPrompts {
        records,
        template: PromptTemplate::parse(template)?,
        processor: processor.clone(),
        image_root: root.to_path_buf(),
        resize: resize(cfg),
    }))
}
