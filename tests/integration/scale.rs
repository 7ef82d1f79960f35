//! Med-R1's real workload size on the CPU: a data set as large as its CT split (12,567
//! training and 3,241 held-out questions) with 384 x 384 images, processed at Med-R1's
//! `max_pixels` (784 patches, 3.7 MB of f32 pixels per image), trained a few steps with a
//! tiny model. Peak memory must not grow with the data set. Ignored by default (it writes
//! about 2 GB of images and takes minutes); run it with
//! `cargo test --release --test integration scale -- --ignored --nocapture`
//! and put its numbers in your notes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Peak resident memory (bytes) of the child processes waited for so far.
#[cfg(unix)]
fn children_peak_rss() -> u64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0, "getrusage");
    usage.ru_maxrss as u64 * 1024
}

struct Measured {
    peak_rss: u64,
    to_first_step: Duration,
    /// Of which the evaluation before GRPO, as the run reports it.
    eval_seconds: f64,
    total: Duration,
}

/// Writes `n` questions with 384 x 384 images under `dir` (unless there), then trains 3 GRPO
/// steps on them and evaluates `max_eval` held-out questions, in a fresh process each, so that
/// the peak of the training process alone is measured.
fn run(dir: &Path, n: usize, max_eval: usize) -> Measured {
    if !dir.join("test.json").is_file() {
        let t = Instant::now();
        let status = Command::new(env!("CARGO_BIN_EXE_medr1"))
            .args(["data", "synth", "--image-size", "384", "--seed", "1"])
            .args(["--n", &n.to_string(), "--out"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success());
        eprintln!(
            "wrote {n} images of 384x384 in {:.0}s",
            t.elapsed().as_secs_f64()
        );
    }
    let sets = [
        format!("runs_dir=\"{}\"", dir.join("runs").display()),
        "data.source=\"files\"".to_string(),
        format!("data.train=[\"{}\"]", dir.join("train.json").display()),
        format!("data.test=[\"{}\"]", dir.join("test.json").display()),
        format!("data.image_root=\"{}\"", dir.display()),
        "data.resize=[384, 384]".into(),
        "model.max_pixels=401408".into(),
        "sft.steps=0".into(),
        "grpo.steps=3".into(),
        "grpo.prompts_per_step=1".into(),
        "grpo.gradient_accumulation=4".into(),
        "grpo.num_generations=4".into(),
        format!("data.max_eval={max_eval}"),
        "eval.before=true".into(),
        "eval.after=false".into(),
        "eval.every=0".into(),
        "checkpoint.every=100".into(),
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medr1"));
    cmd.arg("train");
    for s in &sets {
        cmd.args(["--set", s]);
    }
    let started = Instant::now();
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let mut first_step = None;
    let mut eval_seconds = 0.0;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if first_step.is_none() && line.trim_start().starts_with("step ") {
            first_step = Some(started.elapsed());
        }
        // "before GRPO: accuracy 0.000 (0 of 200), unparsable 200 (20.8s)"
        if let Some(rest) = line.strip_prefix("before GRPO: accuracy") {
            let secs = rest.rsplit('(').next().unwrap_or("").trim_end_matches("s)");
            eval_seconds = secs.parse().unwrap_or(0.0);
        }
        eprintln!("  | {line}");
    }
    assert!(child.wait().unwrap().success());
    Measured {
        peak_rss: children_peak_rss(),
        to_first_step: first_step.expect("a step line"),
        eval_seconds,
        total: started.elapsed(),
    }
}

fn report(what: &str, m: &Measured) {
    eprintln!(
        "{what}: peak RSS {:.2} GB, first step after {:.1}s ({:.1}s of it the evaluation \
         before GRPO), {:.1}s in all",
        m.peak_rss as f64 / 1e9,
        m.to_first_step.as_secs_f64(),
        m.eval_seconds,
        m.total.as_secs_f64()
    );
}

#[test]
#[ignore = "real scale: writes about 2 GB of 384x384 images and trains; minutes (see the module doc)"]
fn memory_stays_flat_at_med_r1_ct_split_size() {
    let root = std::env::var_os("MEDR1_SCALE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("medr1-scale"));
    // Small first: RUSAGE_CHILDREN is a maximum over every child so far, so the large run's
    // figure is the larger of the two; both must stay under the bound.
    let small = run(&root.join("n1000"), 1_000, 200);
    report("1,000 questions (200 evaluated)", &small);
    // 12,567 + 3,241: the CT split's sizes; every held-out question is evaluated.
    let large = run(&root.join("n15808"), 15_808, 0);
    report("15,808 questions (3,162 evaluated)", &large);
    assert!(
        large.peak_rss < 3_000_000_000,
        "peak RSS {} bytes",
        large.peak_rss
    );
    // Flat: 16x the data may not cost more than a quarter more memory (plus the records).
    assert!(
        (large.peak_rss as f64) < small.peak_rss as f64 * 1.25 + 100e6,
        "{} -> {} bytes",
        small.peak_rss,
        large.peak_rss
    );
}
