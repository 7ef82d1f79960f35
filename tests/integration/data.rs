//! medvqa: both record formats, every error path, templates, conversion, splits and the
//! synthetic generator's determinism and balance.

use crate::common::Scratch;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medvqa::convert::convert_omnimed;
use medvqa::load::{check_image_path, write_skip_report};
use medvqa::synth::{generate, write_synthetic, SynthConfig};
use medvqa::template::PromptTemplate;
use medvqa::{
    balanced_sample, load_file, load_paths, split_train_test, DataError, Filter, LoadOptions,
    Modality, QuestionType, Summary,
};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

fn scratch(name: &str) -> Scratch {
    crate::common::scratch("data", name)
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn med_r1_split_files_take_modality_or_type_from_their_name() {
    let l = load_file(
        &data_dir().join("CT(Computed Tomography)_test.json"),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(l.records.len(), 3);
    let r = &l.records[0];
    assert_eq!((r.modality, r.question_type), (Some(Modality::Ct), None));
    assert_eq!((r.answer_letter(), r.answer_text()), ('B', "Kidney"));
    assert_eq!(r.dataset.as_deref(), Some("TOY"));
    assert_eq!(l.records[2].options[0], "Mild (grade I, early)");

    let l = load_file(
        &data_dir().join("Lesion Grading_train.jsonl"),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(l.records.len(), 2);
    assert_eq!(
        l.records[1].question_type,
        Some(QuestionType::LesionGrading)
    );
    assert_eq!(l.records[0].answer_text(), "Grade 3");
}

#[test]
fn omnimed_items_load_and_convert_to_med_r1() {
    let l = load_file(&data_dir().join("omnimed_qa.json"), &LoadOptions::default()).unwrap();
    assert_eq!(l.records.len(), 3);
    let r = &l.records[1];
    assert_eq!(
        (r.id.as_str(), r.answer_letter(), r.options.len()),
        ("toy_1", 'B', 3)
    );
    assert_eq!(
        (r.modality, r.question_type),
        (
            Some(Modality::Dermoscopy),
            Some(QuestionType::DiseaseDiagnosis)
        )
    );

    let dir = scratch("convert");
    let out = dir.0.join("medr1.json");
    convert_omnimed(&l.records, None, &out).unwrap();
    let back = load_file(&out, &LoadOptions::default()).unwrap().records;
    assert_eq!(back, l.records);
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(
        raw[0]["problem"],
        "What modality is used? A)CT, B)MRI, C)X-ray, D)PET"
    );
    assert_eq!(raw[0]["solution"], "<answer> B </answer>");

    // Shuffled: same seed, same output; the seed is recorded; the answer text survives.
    let a = convert_omnimed(&l.records, Some(9), &dir.0.join("a.json")).unwrap();
    let b = convert_omnimed(&l.records, Some(9), &dir.0.join("b.json")).unwrap();
    assert_eq!(
        std::fs::read(dir.0.join("a.json")).unwrap(),
        std::fs::read(dir.0.join("b.json")).unwrap()
    );
    for (x, y) in a.iter().zip(&l.records) {
        assert_eq!(x.answer_text(), y.answer_text());
    }
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.0.join("a.json")).unwrap()).unwrap();
    assert_eq!(raw[0]["option_shuffle_seed"], 9);
    drop(b);
}

#[test]
fn each_malformed_record_is_named_by_file_and_index() {
    let dir = scratch("bad");
    let cases = [
        (
            r#"[{"image": "x.png", "problem": "Q? A)a, B)b"}]"#,
            "missing field `solution`",
        ),
        (
            r#"[{"image": "x.png", "problem": "Q? A)a, B)b", "solution": "<answer> C </answer>"}]"#,
            "answer C is not among the 2 options",
        ),
        (
            r#"[{"image": "x.png", "problem": "Q? no options", "solution": "<answer> A </answer>"}]"#,
            "no options found",
        ),
        (
            r#"[{"question_id": "q", "question": "Q?", "gt_answer": "z", "image_path": "x.png", "option_A": "a"}]"#,
            "gt_answer \"z\" is not among the options",
        ),
        (
            r#"[{"question_id": "q", "question": "Q?", "gt_answer": "z", "image_path": "x.png"}]"#,
            "no options",
        ),
        (
            r#"[{"image": 3, "problem": "Q? A)a", "solution": "<answer> A </answer>"}]"#,
            "field `image` must be a string",
        ),
        (r#"[{"foo": 1}]"#, "neither a Med-R1 record"),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        let good =
            r#"{"image": "x.png", "problem": "Q? A)a, B)b", "solution": "<answer> A </answer>"}"#;
        let body = body.replacen('[', &format!("[{good}, "), 1);
        let p = write(&dir.0, &format!("case{i}.json"), &body);
        let err = load_file(&p, &LoadOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::Record { index: 1, .. }), "{msg}");
        assert!(
            msg.contains(&format!("case{i}.json"))
                && msg.contains("record 1")
                && msg.contains(want),
            "{msg}"
        );
    }
    let p = write(
        &dir.0,
        "syntax.json",
        "[\n  {\"image\": \"x.png\",\n   \"problem\" \"Q?\"}\n]",
    );
    let msg = load_file(&p, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("syntax.json") && msg.contains("line 3"),
        "{msg}"
    );
    let p = write(&dir.0, "lines.jsonl", "{\"image\": \"x.png\", \"problem\": \"Q? A)a\", \"solution\": \"<answer> A </answer>\"}\n{oops\n");
    let msg = load_file(&p, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("line 2"), "{msg}");
    // An empty file says so; a byte-order mark before the JSON is not an error.
    for body in ["", "  \n"] {
        let p = write(&dir.0, "empty.json", body);
        let msg = load_file(&p, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("empty.json") && msg.contains("the file is empty"),
            "{msg}"
        );
    }
    let good =
        r#"[{"image": "x.png", "problem": "Q? A)a, B)b", "solution": "<answer> A </answer>"}]"#;
    let p = write(&dir.0, "bom.json", &format!("\u{feff}{good}"));
    assert_eq!(
        load_file(&p, &LoadOptions::default())
            .unwrap()
            .records
            .len(),
        1
    );
}

#[test]
fn image_paths_stay_under_the_root_and_missing_images_are_caught() {
    assert!(check_image_path("Images/TOY/a.png", false).is_ok());
    assert!(check_image_path("/etc/passwd", false)
        .unwrap_err()
        .contains("absolute"));
    assert!(check_image_path("Images/../../secret.png", false)
        .unwrap_err()
        .contains(".."));
    assert!(check_image_path("/data/x.png", true).is_ok());

    let opts = LoadOptions {
        data_root: Some(data_dir().join("images")),
        require_images: true,
        ..Default::default()
    };
    let err = load_file(&data_dir().join("CT(Computed Tomography)_test.json"), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("record 2") && err.contains("missing.png"),
        "{err}"
    );

    let dir = scratch("skip");
    let skipping = LoadOptions {
        skip_invalid: true,
        ..opts
    };
    let l = load_file(
        &data_dir().join("CT(Computed Tomography)_test.json"),
        &skipping,
    )
    .unwrap();
    assert_eq!(
        (l.records.len(), l.skipped.len(), l.skipped[0].index),
        (2, 1, 2)
    );
    let report = dir.0.join("skipped.json");
    write_skip_report(&l.skipped, &report).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    assert_eq!(v[0]["index"], 2);
    assert!(v[0]["reason"].as_str().unwrap().contains("missing.png"));

    let escaping = write(
        &dir.0,
        "escape.json",
        r#"[{"image": "../x.png", "problem": "Q? A)a", "solution": "<answer> A </answer>"}]"#,
    );
    let rooted = LoadOptions {
        data_root: Some(dir.0.clone()),
        ..Default::default()
    };
    assert!(load_file(&escaping, &rooted)
        .unwrap_err()
        .to_string()
        .contains(".."));
    let allowed = LoadOptions {
        allow_outside_root: true,
        ..rooted
    };
    assert!(load_file(&escaping, &allowed).is_ok());
}

#[test]
fn filters_splits_and_balanced_samples() {
    let all = load_paths(&[data_dir()], &LoadOptions::default())
        .unwrap()
        .records;
    assert_eq!(all.len(), 8);
    let ct = Filter {
        modalities: vec![Modality::Ct],
        ..Default::default()
    }
    .apply(all.clone());
    assert_eq!(ct.len(), 3);
    let lg = Filter {
        question_types: vec![QuestionType::LesionGrading],
        ..Default::default()
    }
    .apply(all.clone());
    assert_eq!(lg.len(), 2);
    let toy = Filter {
        datasets: vec!["TOY".into()],
        ..Default::default()
    }
    .apply(all.clone());
    assert_eq!(toy.len(), 8);

    let (train, test) = split_train_test(&all, 0.25, 3);
    assert_eq!((train.len(), test.len()), (6, 2));
    let again = split_train_test(&all, 0.25, 3);
    assert_eq!((train.clone(), test.clone()), again);
    assert!(test.iter().all(|t| !train.contains(t)));

    let per = balanced_sample(&all, 1, 0, |r| r.modality);
    let s = Summary::of(&per);
    assert!(s.by_modality().values().all(|&n| n == 1), "{s:?}");
}

#[test]
fn templates_are_med_r1s_strings() {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen-chat/cases.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for (name, text) in cases["meta"]["templates"].as_object().unwrap() {
        assert_eq!(
            PromptTemplate::named(name).unwrap().text,
            text.as_str().unwrap(),
            "{name}"
        );
    }
    for case in cases["prompt_cases"].as_array().unwrap() {
        let t = PromptTemplate::named(case["template"].as_str().unwrap()).unwrap();
        assert_eq!(
            t.render(case["question"].as_str().unwrap()),
            case["user_text"].as_str().unwrap()
        );
        assert_eq!(t.thinks(), t.name.ends_with("_think"));
    }
    assert_eq!(
        PromptTemplate::parse("Q: {Question}").unwrap().render("x"),
        "Q: x"
    );
    assert!(PromptTemplate::parse("no placeholder").is_err());
}

#[test]
fn real_med_r1_splits_count_as_documented() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/med-r1-splits");
    if !root.is_dir() {
        eprintln!("skipped: {} is not on this machine", root.display());
        return;
    }
    let by_modality = Summary::of(
        &load_paths(&[root.join("modality/test")], &LoadOptions::default())
            .unwrap()
            .records,
    )
    .by_modality();
    let want = [
        (Modality::Ct, 3241),
        (Modality::Dermoscopy, 1306),
        (Modality::Fundus, 1098),
        (Modality::Mri, 6370),
        (Modality::Microscopy, 1110),
        (Modality::Oct, 848),
        (Modality::XRay, 1615),
        (Modality::Ultrasound, 2074),
    ];
    for (m, n) in want {
        assert_eq!(by_modality.get(&Some(m)), Some(&n), "{m}");
    }
    let by_type = Summary::of(
        &load_paths(&[root.join("question_type/test")], &LoadOptions::default())
            .unwrap()
            .records,
    )
    .by_question_type();
    let want = [
        (QuestionType::AnatomyIdentification, 3329),
        (QuestionType::DiseaseDiagnosis, 11058),
        (QuestionType::LesionGrading, 436),
        (QuestionType::ModalityRecognition, 2392),
        (QuestionType::OtherBiologicalAttributes, 704),
    ];
    for (q, n) in want {
        assert_eq!(by_type.get(&Some(q)), Some(&n), "{q}");
    }
}

#[test]
fn synthetic_sets_are_deterministic_to_the_byte() {
    let cfg = SynthConfig {
        n: 80,
        seed: 11,
        image_size: 56,
        ..Default::default()
    };
    let (a, b, c) = (scratch("synth-a"), scratch("synth-b"), scratch("synth-c"));
    write_synthetic(&cfg, &a.0, 0.25).unwrap();
    write_synthetic(&cfg, &b.0, 0.25).unwrap();
    write_synthetic(
        &SynthConfig {
            seed: 12,
            ..cfg.clone()
        },
        &c.0,
        0.25,
    )
    .unwrap();
    let files = |d: &Path| -> BTreeMap<PathBuf, Vec<u8>> {
        let mut m = BTreeMap::new();
        for sub in [d.to_path_buf(), d.join("images")] {
            for e in std::fs::read_dir(&sub).unwrap().flatten() {
                if e.path().is_file() {
                    m.insert(
                        e.path().strip_prefix(d).unwrap().to_path_buf(),
                        std::fs::read(e.path()).unwrap(),
                    );
                }
            }
        }
        m
    };
    let (fa, fb, fc) = (files(&a.0), files(&b.0), files(&c.0));
    assert_eq!(fa.len(), 82);
    assert_eq!(fa, fb);
    assert_ne!(
        fa.get(Path::new("train.json")),
        fc.get(Path::new("train.json"))
    );
    // Written sets load back with their modality and question type.
    let train = load_file(
        &a.0.join("train.json"),
        &LoadOptions {
            data_root: Some(a.0.clone()),
            require_images: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(train.records.len(), 60);
    assert!(train
        .records
        .iter()
        .all(|r| r.modality.is_some() && r.question_type.is_some()));
}

#[test]
fn synthetic_answers_are_balanced_and_readable_from_the_image() {
    let items = generate(&SynthConfig {
        n: 800,
        seed: 5,
        ..Default::default()
    })
    .unwrap();
    let records: Vec<_> = items.iter().map(|i| i.record.clone()).collect();
    let s = Summary::of(&records);
    // Every modality x question type cell is equally frequent.
    assert!(s.cells.values().all(|&n| n == 20), "{:?}", s.cells);
    for q in QuestionType::ALL {
        let of_q: Vec<_> = records
            .iter()
            .filter(|r| r.question_type == Some(q))
            .collect();
        let mut letters: BTreeMap<char, usize> = BTreeMap::new();
        let mut values: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &of_q {
            *letters.entry(r.answer_letter()).or_default() += 1;
            *values.entry(r.answer_text()).or_default() += 1;
            assert!((2..=4).contains(&r.options.len()));
            let mut dedup = r.options.clone();
            dedup.sort();
            dedup.dedup();
            assert_eq!(dedup.len(), r.options.len(), "duplicate options in {r:?}");
        }
        // Letter A is correct at most about as often as 1 / (smallest option count).
        assert!(
            letters[&'A'] as f64 / (of_q.len() as f64) < 0.5,
            "{q}: {letters:?}"
        );
        let (lo, hi) = (
            values.values().min().unwrap(),
            values.values().max().unwrap(),
        );
        assert!(
            hi - lo <= of_q.len() / 10,
            "{q}: answer values unbalanced {values:?}"
        );
    }
    // The styles differ: the mean colour of each modality's images is distinct.
    let mut means: BTreeMap<Modality, [f64; 3]> = BTreeMap::new();
    for i in &items {
        let m = means.entry(i.record.modality.unwrap()).or_insert([0.0; 3]);
        for p in i.image.pixels() {
            for (acc, v) in m.iter_mut().zip(p.0) {
                *acc += v as f64;
            }
        }
    }
    let v: Vec<[f64; 3]> = means.values().copied().collect();
    for a in 0..v.len() {
        for b in a + 1..v.len() {
            let d: f64 =
                (0..3).map(|c| (v[a][c] - v[b][c]).abs()).sum::<f64>() / (100.0 * 112.0 * 112.0);
            assert!(d > 1.0, "styles {a} and {b} look alike ({d})");
        }
    }
    // Count questions: the number of lesion-coloured blobs grows with the answer.
    let count_items: Vec<_> = items
        .iter()
        .filter(|i| i.record.question_type == Some(QuestionType::OtherBiologicalAttributes))
        .collect();
    for i in count_items.iter().take(40) {
        let color = medvqa::synth::lesion_color(i.record.modality.unwrap());
        let lit = i.image.pixels().filter(|p| **p == color).count();
        let n = ["one", "two", "three", "four"]
            .iter()
            .position(|c| *c == i.record.answer_text())
            .unwrap()
            + 1;
        let area = std::f64::consts::PI * (0.07f64 * 112.0).powi(2);
        assert!(
            (lit as f64 / area - n as f64).abs() < 0.5,
            "{}: {lit} lesion pixels for {n}",
            i.record.id
        );
    }
}
