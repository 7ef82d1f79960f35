//! The embedded tiny demo, shortened: `medr1 train` with the default config and fewer GRPO
//! steps, as a user runs it. Seeded, so the same numbers come out each time; the assertions
//! are what a shortened run can defend.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Success and stderr of a `medr1` run.
fn medr1(args: &[&str]) -> (bool, String) {
    let (ok, _, err) = crate::cli::medr1(args);
    (ok, err)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn shortened_tiny_demo_learns_and_writes_its_run_directory() {
    let runs = std::env::temp_dir().join(format!("medr1-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&runs);
    let runs_set = format!("runs_dir=\"{}\"", runs.display());
    let (ok, err) = medr1(&[
        "train",
        "--set",
        &runs_set,
        "--set",
        "grpo.steps=40",
        "--set",
        "eval.every=0",
        "--set",
        "checkpoint.every=20",
    ]);
    assert!(ok, "{err}");
    let dir = runs.join("tiny");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "train.log",
        "eval_before.json",
        "eval_after.json",
        "eval_after.md",
        "eval_after.csv",
        "report.md",
        "curves.png",
        "final/config.json",
        "final/model.safetensors",
        "final/tokenizer.json",
        "final/preprocessor_config.json",
        "grpo/checkpoint/state-40.json",
        "completions.jsonl",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing; stderr:\n{err}");
    }
    // Completions of every 10th step: 4 prompts x 8 samples each, with their rewards.
    let samples: Vec<Value> = std::fs::read_to_string(dir.join("completions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 4 * 32);
    for s in &samples {
        assert_eq!(s["step"].as_u64().unwrap() % 10, 0, "{s}");
        for key in ["prompt", "completion", "reward", "advantage"] {
            assert!(s.get(key).is_some(), "{key} missing: {s}");
        }
        assert!(s["rewards"].get("accuracy").is_some(), "{s}");
    }
    // TensorBoard: one event file of the steps, two of the evaluations (before, after).
    let files = |d: &str| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir.join("tensorboard").join(d))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    };
    let train = files("train");
    assert_eq!(train.len(), 1);
    let records = grpo::host::tensorboard::read_records(&train[0]).unwrap();
    // The file version, 40 steps' scalars, 4 logged steps' completions.
    assert_eq!(records.len(), 1 + 40 + 4);
    assert_eq!(files("eval").len(), 2);
    let rows: Vec<Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 40);
    let col = |k: &str| -> Vec<f64> { rows.iter().map(|r| r[k].as_f64().unwrap()).collect() };
    let (reward, format) = (col("reward_mean"), col("reward/format_nothink"));
    let (first, last) = (mean(&reward[..10]), mean(&reward[30..]));
    assert!(last > first, "training reward {first:.3} -> {last:.3}");
    assert!(
        mean(&format[30..]) >= 0.95,
        "format rate {:?}",
        &format[30..]
    );
    let before = json(&dir.join("eval_before.json"));
    let after = json(&dir.join("eval_after.json"));
    let (b, a) = (
        before["overall"]["accuracy"].as_f64().unwrap(),
        after["overall"]["accuracy"].as_f64().unwrap(),
    );
    assert!(a >= b, "held-out accuracy {b:.3} -> {a:.3}");
    assert!(after["by_modality"].as_object().unwrap().len() == 4);
    // The final checkpoint answers a held-out question through `medr1 generate`, in format.
    let test: Value = json(&dir.join("data/test.json"));
    let record = &test[0];
    let image = dir.join("data").join(record["image"].as_str().unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_medr1"))
        .args(["generate", "--model"])
        .arg(dir.join("final"))
        .arg("--image")
        .arg(&image)
        .args([
            "--prompt",
            record["problem"].as_str().unwrap(),
            "--max-new-tokens",
            "12",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("<answer>") && text.contains("</answer>"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(report.contains("after GRPO"), "{report}");
    let _ = std::fs::remove_dir_all(&runs);
}

#[test]
fn bad_configs_and_unwritable_run_directories_fail_before_training() {
    let (ok, err) = medr1(&["train", "--set", "grpo.stepz=3"]);
    assert!(!ok && err.contains("stepz"), "{err}");
    let (ok, err) = medr1(&["train", "--set", "grpo.learning_rate=fast"]);
    assert!(!ok && err.contains("grpo.learning_rate"), "{err}");
    let (ok, err) = medr1(&["train", "--config", "no/such/config.toml"]);
    assert!(!ok && err.contains("no/such/config.toml"), "{err}");
    // A file where the runs directory should be: nothing can be created under it.
    let blocker = std::env::temp_dir().join(format!("medr1-blocker-{}", std::process::id()));
    std::fs::write(&blocker, b"not a directory").unwrap();
    let runs_set = format!("runs_dir=\"{}\"", blocker.display());
    let (ok, err) = medr1(&["train", "--set", &runs_set]);
    assert!(!ok && err.contains("run directory"), "{err}");
    assert!(!err.contains("SFT warm start"), "training started: {err}");
    let _ = std::fs::remove_file(blocker);
    let (ok, err) = medr1(&["train", "--set", "model.random_config=\"x/config.json\""]);
    assert!(!ok && err.contains("model.tokenizer"), "{err}");
}

/// `model.random_config`: random weights of any architecture (here the tiny fixture's, with
/// the byte-level tokenizer given as a file), through SFT, GRPO and the final checkpoint.
#[test]
fn a_run_can_start_from_random_weights_of_a_given_config() {
    let root = std::env::temp_dir().join(format!("medr1-random-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let tokenizer = root.join("tokenizer.json");
    std::fs::write(
        &tokenizer,
        qwen2vl::processor::byte_tokenizer_json().to_string(),
    )
    .unwrap();
    let config = crate::common::fixture_dir().join("hf_model/config.json");
    let sets = [
        format!("runs_dir=\"{}\"", root.join("runs").display()),
        format!("model.random_config=\"{}\"", config.display()),
        format!("model.tokenizer=\"{}\"", tokenizer.display()),
        "data.synthetic.n=24".into(),
        "sft.steps=2".into(),
        "grpo.steps=2".into(),
        "eval.before=false".into(),
        "eval.after=false".into(),
        "eval.every=0".into(),
    ];
    let mut args = vec!["train"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let (ok, err) = medr1(&args);
    assert!(ok, "{err}");
    assert!(
        err.contains("random weights of the architecture in"),
        "{err}"
    );
    let run = root.join("runs/tiny");
    let saved = qwen2vl::Qwen2VLConfig::from_file(&run.join("final/config.json")).unwrap();
    let wanted = qwen2vl::Qwen2VLConfig::from_file(&config).unwrap();
    assert_eq!(
        saved.parameter_counts().total(),
        wanted.parameter_counts().total()
    );
    assert!(run.join("final/tokenizer.json").is_file());
    let _ = std::fs::remove_dir_all(&root);
}

/// The shipped DAPO and GSPO recipes run as shipped (shortened): their steps train and log
/// what is particular to them.
#[test]
fn the_dapo_and_gspo_configs_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    for (file, name) in [("dapo.toml", "tiny-dapo"), ("gspo.toml", "tiny-gspo")] {
        let runs = std::env::temp_dir().join(format!("medr1-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&runs);
        let config = root.join(file);
        let runs_set = format!("runs_dir=\"{}\"", runs.display());
        let (ok, err) = medr1(&[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--set",
            &runs_set,
            "--set",
            "sft.steps=4",
            "--set",
            "grpo.steps=4",
            "--set",
            "eval.before=false",
            "--set",
            "eval.after=false",
            "--set",
            "eval.every=0",
        ]);
        assert!(ok, "{file}: {err}");
        let rows: Vec<Value> = std::fs::read_to_string(runs.join(name).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let grpo: Vec<&Value> = rows.iter().filter(|r| r.get("kl").is_some()).collect();
        assert_eq!(grpo.len(), 4, "{file}: {rows:?}");
        for r in &grpo {
            assert!(r["loss"].as_f64().unwrap().is_finite(), "{file}: {r}");
            if name == "tiny-dapo" {
                assert!(r.get("resampled_groups").is_some(), "{file}: {r}");
            }
        }
        let _ = std::fs::remove_dir_all(&runs);
    }
}
