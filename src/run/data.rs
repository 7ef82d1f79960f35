//! A run's records: synthetic data generated into the run directory on first use, or the
//! user's Med-R1 / OmniMedVQA files; filters and seeded caps; then prompts.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use grpo::learner::PromptInput;
use grpo::prompt::prepare_prompt;
use medvqa::select::{balanced_sample, Filter};
use medvqa::synth::{write_synthetic, SynthConfig};
use medvqa::{load_paths, LoadOptions, Modality, PromptTemplate, QuestionType, VqaRecord};
use qwen2vl::processor::Processor;

use crate::config::RunConfig;

pub struct RunData {
    pub train: Vec<VqaRecord>,
    pub test: Vec<VqaRecord>,
    pub image_root: PathBuf,
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
    if dir.join("train.json").is_file() && dir.join("test.json").is_file() {
        return Ok(());
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
    write_synthetic(&sc, &tmp, s.test_fraction)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(())
}

pub fn load(cfg: &RunConfig, run_dir: &Path) -> anyhow::Result<RunData> {
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
        ..Default::default()
    };
    let read = |paths: &[PathBuf]| -> anyhow::Result<Vec<VqaRecord>> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        Ok(load_paths(paths, &opts)?.records)
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
    if train.is_empty() && (cfg.grpo.steps > 0 || cfg.sft.steps > 0) {
        bail!("no training records left after the data filters");
    }
    Ok(RunData {
        train,
        test,
        image_root: root,
    })
}

/// Prompts of `records` with `template`, reading each image once.
pub fn prompts(
    records: &[VqaRecord],
    template: &str,
    processor: &Processor,
    root: &Path,
) -> anyhow::Result<Vec<PromptInput>> {
    let template = PromptTemplate::parse(template)?;
    records
        .iter()
        .map(|r| {
            prepare_prompt(r, &template, processor, root)
                .with_context(|| format!("record {}: image {}", r.id, r.image))
        })
        .collect()
}
