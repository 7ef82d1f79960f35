//! `medr1 data`: summarise, synthesise and convert med-VQA data.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use medvqa::convert::convert_omnimed;
use medvqa::load::write_skip_report;
use medvqa::load::{load_paths_with, Loaded};
use medvqa::synth::{write_synthetic_with, SynthConfig};
use medvqa::{LoadOptions, Summary};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Counts per modality x question type of record files or directories (Med-R1 or
    /// OmniMedVQA format, JSON or JSONL).
    Summary {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Count the valid records and list the invalid ones instead of stopping at the first.
        #[arg(long)]
        skip_invalid: bool,
    },
    /// Write a synthetic med-VQA set: images, train.json/test.json in Med-R1 format, and the
    /// byte-level tokenizer.json that tiny models use.
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 1000)]
        n: usize,
        /// Square image side in pixels.
        #[arg(long, default_value_t = 112)]
        image_size: u32,
        #[arg(long, default_value_t = 0.2)]
        test_fraction: f64,
        /// Keep options in canonical order instead of shuffling their letters.
        #[arg(long)]
        canonical_options: bool,
    },
    /// Convert OmniMedVQA QA items to Med-R1's format.
    Convert {
        /// OmniMedVQA QA files or directories.
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        /// Output Med-R1 JSON file.
        #[arg(long)]
        out: PathBuf,
        /// Shuffle each question's options with this seed (recorded in every output record).
        #[arg(long)]
        shuffle_seed: Option<u64>,
        /// Resolve and check image paths under this directory.
        #[arg(long)]
        data_root: Option<PathBuf>,
        /// Require every image to exist under --data-root.
        #[arg(long, requires = "data_root")]
        require_images: bool,
        /// Accept absolute image paths and paths leaving the data root.
        #[arg(long)]
        allow_outside_root: bool,
        /// Convert the valid items and write the invalid ones to --report.
        #[arg(long, requires = "report")]
        skip_invalid: bool,
        /// Where --skip-invalid writes what it skipped (JSON).
        #[arg(long)]
        report: Option<PathBuf>,
    },
}

pub fn run(cmd: DataCommand) -> anyhow::Result<bool> {
    match cmd {
        DataCommand::Summary {
            paths,
            json,
            skip_invalid,
        } => {
            let opts = LoadOptions {
                skip_invalid,
                ..Default::default()
            };
            let loaded = read_with_progress(&paths, &opts)?;
            let summary = Summary::of(&loaded.records);
            if json {
                let mut v = summary.to_json();
                v["skipped"] = serde_json::to_value(&loaded.skipped)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", summary.table());
                for s in &loaded.skipped {
                    println!(
                        "skipped {} record {}: {}",
                        s.file.display(),
                        s.index,
                        s.reason
                    );
                }
            }
            Ok(true)
        }
        DataCommand::Synth {
            out,
            seed,
            n,
            image_size,
            test_fraction,
            canonical_options,
        } => {
            if !(0.0..=1.0).contains(&test_fraction) {
                bail!("--test-fraction must be within 0..1");
            }
            let cfg = SynthConfig {
                n,
                seed,
                image_size,
                shuffle_options: !canonical_options,
                ..Default::default()
            };
            let mut bar = crate::progress::Progress::new("writing synthetic images", n);
            let (train, test) =
                write_synthetic_with(&cfg, &out, test_fraction, &mut |done, _| bar.set(done))
                    .with_context(|| format!("writing {}", out.display()))?;
            bar.finish();
            // The byte-level tokenizer tiny models use with this data.
            let tokenizer = out.join("tokenizer.json");
            std::fs::write(
                &tokenizer,
                qwen2vl::processor::byte_tokenizer_json().to_string(),
            )
            .with_context(|| format!("writing {}", tokenizer.display()))?;
            println!(
                "wrote {} train + {} test questions with their images to {}",
                train.len(),
                test.len(),
                out.display()
            );
            Ok(true)
        }
        DataCommand::Convert {
            inputs,
            out,
            shuffle_seed,
            data_root,
            require_images,
            allow_outside_root,
            skip_invalid,
            report,
        } => {
            let opts = LoadOptions {
                data_root,
                require_images,
                allow_outside_root,
                skip_invalid,
            };
            let loaded = read_with_progress(&inputs, &opts)?;
            let converted = convert_omnimed(&loaded.records, shuffle_seed, &out)?;
            if let Some(report) = report {
                write_skip_report(&loaded.skipped, &report)?;
            }
            println!(
                "converted {} items to {}; skipped {}",
                converted.len(),
                out.display(),
                loaded.skipped.len()
            );
            Ok(true)
        }
    }
}

/// Record files read with a progress bar (or lines) per file.
pub fn read_with_progress(
    paths: &[PathBuf],
    opts: &LoadOptions,
) -> Result<Loaded, medvqa::DataError> {
    let mut bar: Option<crate::progress::Progress> = None;
    let loaded = load_paths_with(paths, opts, &mut |done, total| {
        bar.get_or_insert_with(|| crate::progress::Progress::new("reading record files", total))
            .set(done)
    })?;
    if let Some(bar) = bar {
        bar.finish();
    }
    Ok(loaded)
}
