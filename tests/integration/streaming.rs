//! Real data as a run meets it: records and image headers checked before step 1, pixels made
//! on use (resized first when asked), steps from epochs, and one table for several
//! checkpoints. The bounded prefetch itself is unit-tested in `grpo::stream`.

use std::path::{Path, PathBuf};

use grpo::prompt::{prepare_prompt, prepare_prompt_with};
use grpo::stream::{PromptSource, RecordPrompts};
use medvqa::{load_paths, LoadOptions, PromptTemplate};
use qwen2vl::processor::{ImageProcessorConfig, Processor, TextTokenizer};
use serde_json::Value;

use crate::cli::medr1;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A synthetic set on disk as a user's files: `train.json`, `test.json`, `images/`.
fn synth(dir: &Path, n: usize, size: u32) {
    let _ = std::fs::remove_dir_all(dir);
    let (ok, _, err) = medr1(&[
        "data",
        "synth",
        "--out",
        s(dir),
        "--n",
        &n.to_string(),
        "--seed",
        "7",
        "--image-size",
        &size.to_string(),
    ]);
    assert!(ok, "{err}");
}

fn records(path: &Path) -> Vec<Value> {
    serde_json::from_str::<Value>(&std::fs::read_to_string(path).unwrap())
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// `medr1 train` on files under `data` with the tiny model, no warm start, no evaluation.
fn train_on(data: &Path, runs: &Path, extra: &[&str]) -> (bool, String) {
    let sets = [
        format!("runs_dir=\"{}\"", runs.display()),
        "data.source=\"files\"".to_string(),
        format!("data.train=[\"{}\"]", data.join("train.json").display()),
        format!("data.test=[\"{}\"]", data.join("test.json").display()),
        format!("data.image_root=\"{}\"", data.display()),
        "sft.steps=0".into(),
        "eval.before=false".into(),
        "eval.after=false".into(),
        "eval.every=0".into(),
        "checkpoint.every=100".into(),
    ];
    let mut args = vec!["train".to_string()];
    for x in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
        args.push("--set".into());
        args.push(x.into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = medr1(&args);
    (ok, err)
}

#[test]
fn bad_images_stop_the_run_before_step_1_or_are_left_out_and_listed() {
    let root = std::env::temp_dir().join(format!("medr1-stream-bad-{}", std::process::id()));
    let data = root.join("data");
    synth(&data, 30, 56);
    let train = records(&data.join("train.json"));
    let test = records(&data.join("test.json"));
    // One training image is not an image, one has a shape the processor refuses (aspect
    // ratio over 200), one held-out image is truncated to its signature.
    let img = |r: &Value| data.join(r["image"].as_str().unwrap());
    std::fs::write(img(&train[3]), b"this is not a PNG").unwrap();
    image::RgbImage::new(1, 300).save(img(&train[5])).unwrap();
    std::fs::write(img(&test[1]), &b"\x89PNG\r\n\x1a\n"[..]).unwrap();
    // Two cut short (as by an interrupted copy), which decode without an error: a PNG and a
    // JPEG, each its first half.
    let png = std::fs::read(img(&test[2])).unwrap();
    std::fs::write(img(&test[2]), &png[..png.len() / 2]).unwrap();
    let mut jpeg = std::io::Cursor::new(Vec::new());
    image::open(img(&test[4]))
        .unwrap()
        .write_to(&mut jpeg, image::ImageFormat::Jpeg)
        .unwrap();
    let jpeg = jpeg.into_inner();
    std::fs::write(img(&test[4]), &jpeg[..jpeg.len() / 2]).unwrap();
    // One good image reached through a link that leads out of the data root: said, not hidden.
    #[cfg(unix)]
    {
        let outside = root.join("outside.png");
        std::fs::rename(img(&train[7]), &outside).unwrap();
        std::os::unix::fs::symlink(&outside, img(&train[7])).unwrap();
    }

    let runs = root.join("runs");
    let (ok, err) = train_on(&data, &runs, &["grpo.steps=1"]);
    assert!(!ok, "{err}");
    let bad = train[3]["image"].as_str().unwrap();
    assert!(
        err.contains(bad) && err.contains("training record"),
        "{err}"
    );
    assert!(err.contains("data.skip_invalid"), "{err}");
    assert!(!err.contains("GRPO:"), "training started: {err}");

    // Left out and listed; the step count follows from the records that remain:
    // 2 epochs x floor(ceil(21 / 2) / 2) = 2 x 5 steps.
    let (ok, err) = train_on(
        &data,
        &runs,
        &[
            "data.skip_invalid=true",
            "grpo.steps=0",
            "grpo.epochs=2",
            "grpo.prompts_per_step=2",
            "grpo.gradient_accumulation=2",
            "grpo.num_generations=2",
        ],
    );
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(
        &std::fs::read_to_string(runs.join("tiny/skipped_records.json")).unwrap(),
    )
    .unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 5, "{listed:?}");
    let reasons: Vec<&str> = listed
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.iter().any(|r| r.contains("1x300")), "{reasons:?}");
    for (r, format) in [(&test[2], "Png"), (&test[4], "Jpeg")] {
        let name = r["image"].as_str().unwrap();
        assert!(
            reasons
                .iter()
                .any(|x| x.contains(name) && x.contains(&format!("the {format} file is cut short"))),
            "{reasons:?}"
        );
    }
    assert!(
        err.contains(&format!("data: {} training", train.len() - 2)),
        "{err}"
    );
    let kept = train.len() - 2;
    let steps = 2 * (kept.div_ceil(2) / 2);
    let rows = std::fs::read_to_string(runs.join("tiny/metrics.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), steps, "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn resize_happens_before_the_processor_and_prompts_are_made_on_use() {
    let root = std::env::temp_dir().join(format!("medr1-stream-resize-{}", std::process::id()));
    synth(&root, 6, 112);
    let loaded = load_paths(
        &[root.join("train.json")],
        &LoadOptions {
            data_root: Some(root.clone()),
            require_images: true,
            ..Default::default()
        },
    )
    .unwrap();
    let tokenizer = TextTokenizer::from_file(&root.join("tokenizer.json")).unwrap();
    let image = ImageProcessorConfig {
        min_pixels: 3136,
        max_pixels: 401_408,
        ..Default::default()
    };
    let processor = std::sync::Arc::new(Processor::new(tokenizer, image).unwrap());
    let template = PromptTemplate::parse("{Question}").unwrap();
    let r = &loaded.records[0];
    let plain = prepare_prompt(r, &template, &processor, &root).unwrap();
    let resized = prepare_prompt_with(r, &template, &processor, &root, Some((56, 56))).unwrap();
    // 112 x 112 -> 8 x 8 patches; resized to 56 x 56 first -> 4 x 4, 4 image tokens fewer x 3.
    assert_eq!(plain.images[0].grid, [1, 8, 8]);
    assert_eq!(resized.images[0].grid, [1, 4, 4]);
    assert_eq!(plain.ids.len() - resized.ids.len(), 16 - 4);
    let source = RecordPrompts {
        records: loaded.records.clone(),
        template,
        processor,
        image_root: root.clone(),
        resize: Some((56, 56)),
    };
    assert_eq!(source.len(), loaded.records.len());
    let again = source.prepare(0).unwrap();
    assert_eq!(again.images, resized.images);
    assert_eq!(again.ids, resized.ids);
    // A record whose image went away after the scan: the error names record and image.
    std::fs::remove_file(root.join(&loaded.records[1].image)).unwrap();
    let e = source.prepare(1).unwrap_err().to_string();
    assert!(
        e.contains(&loaded.records[1].id) && e.contains(&loaded.records[1].image),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn eval_writes_one_table_with_a_row_per_checkpoint() {
    let root = std::env::temp_dir().join(format!("medr1-stream-eval-{}", std::process::id()));
    let data = root.join("data");
    synth(&data, 24, 56);
    let runs = root.join("runs");
    let (ok, err) = train_on(&data, &runs, &["grpo.steps=1", "grpo.num_generations=2"]);
    assert!(ok, "{err}");
    let first = runs.join("tiny/final");
    let second: PathBuf = root.join("copy/final");
    std::fs::create_dir_all(&second).unwrap();
    for f in std::fs::read_dir(&first).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, second.join(f.file_name().unwrap())).unwrap();
    }
    // A third copy saved with a tokenizer of its own (another Unicode normalisation: the same
    // ids for these ASCII prompts) and a tensor no parameter uses.
    let third: PathBuf = root.join("other/final");
    std::fs::create_dir_all(&third).unwrap();
    for f in std::fs::read_dir(&first).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, third.join(f.file_name().unwrap())).unwrap();
    }
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(third.join("tokenizer.json")).unwrap())
            .unwrap();
    tok["normalizer"] = serde_json::json!({"type": "NFKC"});
    std::fs::write(third.join("tokenizer.json"), tok.to_string()).unwrap();
    let weights = std::fs::read(third.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let extra = [0u8; 8];
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    views.push((
        "visual.leftover.weight".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &extra).unwrap(),
    ));
    safetensors::serialize_to_file(views, None, &third.join("model.safetensors")).unwrap();
    let sets = [
        format!("runs_dir=\"{}\"", runs.display()),
        "name=\"evals\"".to_string(),
        "data.source=\"files\"".to_string(),
        format!("data.train=[\"{}\"]", data.join("train.json").display()),
        format!("data.test=[\"{}\"]", data.join("test.json").display()),
        format!("data.image_root=\"{}\"", data.display()),
        "eval.scoring=\"med_r1_raw\"".into(),
        "eval.max_new_tokens=4".into(),
    ];
    let mut args = vec!["eval"];
    for x in &sets {
        args.extend(["--set", x.as_str()]);
    }
    args.extend(["--checkpoint", s(&first), s(&second), s(&third)]);
    let (ok, out, err) = medr1(&args);
    assert!(ok, "{err}");
    assert!(
        err.contains("differs from the run's tokenizer")
            && err.contains("evaluating this checkpoint with its own"),
        "{err}"
    );
    assert!(
        err.contains("not used by this model") && err.contains("visual.leftover.weight"),
        "{err}"
    );
    let table = std::fs::read_to_string(runs.join("evals/eval_table.md")).unwrap();
    assert_eq!(out.trim(), table.trim());
    assert!(
        table.contains("| tiny/final |") && table.contains("| copy/final |"),
        "{table}"
    );
    // The same weights: the same row.
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap()
            .trim_start_matches(&format!("| {name} |"))
            .to_string()
    };
    assert_eq!(row("tiny/final"), row("copy/final"));
    assert_eq!(row("tiny/final"), row("other/final"));

    // A warm start saved with another tokenizer is refused, not read with the wrong ids.
    let (ok, err) = train_on(
        &data,
        &runs,
        &[
            "name=\"warm\"",
            "grpo.steps=1",
            &format!("sft.warm_start=\"{}\"", third.display()),
        ],
    );
    assert!(!ok, "{err}");
    assert!(err.contains("was saved with another tokenizer"), "{err}");
    let csv = std::fs::read_to_string(runs.join("evals/eval_table.csv")).unwrap();
    assert!(
        csv.lines()
            .any(|l| l.starts_with("copy/final,overall,overall,")),
        "{csv}"
    );
    for stem in ["eval_tiny_final", "eval_copy_final"] {
        assert!(runs.join("evals").join(format!("{stem}.json")).is_file());
    }
    let _ = std::fs::remove_dir_all(&root);
}
