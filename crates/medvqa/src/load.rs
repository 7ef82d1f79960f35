//! Reading record files: JSON arrays or JSONL, in Med-R1's format (`image`, `problem`,
//! `solution`) or OmniMedVQA's (`question_id`, `question`, `gt_answer`, `option_A`..., ...).
//! Every bad record is an error naming the file and the record index, or, with
//! `skip_invalid`, a line in the skip report; nothing is dropped silently.

use std::path::{Component, Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::DataError;
use crate::record::{dataset_of, parse_solution, split_problem, VqaRecord, LETTERS};
use crate::taxonomy::{Modality, QuestionType};

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Where image paths are resolved. Required to check images.
    pub data_root: Option<PathBuf>,
    /// Fail (or skip) records whose image file does not exist under the root.
    pub require_images: bool,
    /// Accept absolute image paths and paths that leave the root with `..`.
    pub allow_outside_root: bool,
    /// Keep going past bad records and report them instead of failing.
    pub skip_invalid: bool,
}

/// A record left out under `skip_invalid`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Skipped {
    pub file: PathBuf,
    pub index: usize,
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub records: Vec<VqaRecord>,
    pub skipped: Vec<Skipped>,
}

/// What a split file's name says about its records: `CT(Computed Tomography)_test.json` ->
/// modality CT; `Lesion Grading_train.json` -> question type.
pub fn infer_from_file_name(path: &Path) -> (Option<Modality>, Option<QuestionType>) {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = stem
        .strip_suffix("_train")
        .or_else(|| stem.strip_suffix("_test"))
        .or_else(|| stem.strip_suffix("_val"))
        .unwrap_or(&stem);
    match QuestionType::parse(base) {
        Some(q) => (None, Some(q)),
        None => (Modality::parse(base), None),
    }
}

/// Checks that `image` stays inside the data root.
pub fn check_image_path(image: &str, allow_outside_root: bool) -> Result<(), String> {
    let p = Path::new(image);
    if allow_outside_root {
        return Ok(());
    }
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, Component::RootDir | Component::Prefix(_)))
    {
        return Err(format!("image path {image:?} is absolute; allow paths outside the data root explicitly to use it"));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(format!("image path {image:?} leaves the data root with `..`; allow paths outside the data root explicitly to use it"));
    }
    Ok(())
}

fn text<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(format!("missing field `{key}`")),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("field `{key}` must be a string, got {other}")),
    }
}

fn optional_text(obj: &Map<String, Value>, key: &str) -> Option<String> {
    match obj.get(key) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

fn parse_med_r1(
    obj: &Map<String, Value>,
    id: String,
    hints: (Option<Modality>, Option<QuestionType>),
) -> Result<VqaRecord, String> {
    let image = text(obj, "image")?.to_string();
    let (question, options) = split_problem(text(obj, "problem")?)?;
    let letter = parse_solution(text(obj, "solution")?)?;
    let answer = LETTERS
        .iter()
        .position(|&l| l == letter)
        .filter(|&i| i < options.len())
        .ok_or_else(|| {
            format!(
                "answer {letter} is not among the {} options (A..{})",
                options.len(),
                LETTERS[options.len() - 1]
            )
        })?;
    let modality = match optional_text(obj, "modality") {
        Some(m) => Some(Modality::parse(&m).ok_or_else(|| format!("unknown modality {m:?}"))?),
        None => hints.0,
    };
    let question_type = match optional_text(obj, "question_type") {
        Some(q) => {
            Some(QuestionType::parse(&q).ok_or_else(|| format!("unknown question type {q:?}"))?)
        }
        None => hints.1,
    };
    Ok(VqaRecord {
        id: optional_text(obj, "id").unwrap_or(id),
        dataset: optional_text(obj, "dataset").or_else(|| dataset_of(&image)),
        image,
        question,
        options,
        answer,
        modality,
        question_type,
    })
}

fn parse_omnimed(obj: &Map<String, Value>, id: String) -> Result<VqaRecord, String> {
    let question = text(obj, "question")?.trim().to_string();
    let gt = text(obj, "gt_answer")?.trim().to_string();
    let image = text(obj, "image_path")?.to_string();
    let mut options = Vec::new();
    for l in LETTERS {
        match obj.get(&format!("option_{l}")) {
            Some(Value::String(s)) => options.push(s.trim().to_string()),
            Some(Value::Null) | None => break,
            Some(other) => return Err(format!("field `option_{l}` must be a string, got {other}")),
        }
    }
    if options.is_empty() {
        return Err("no options (`option_A`, `option_B`, ...)".into());
    }
    let answer = options
        .iter()
        .position(|o| *o == gt)
        .ok_or_else(|| format!("gt_answer {gt:?} is not among the options {options:?}"))?;
    let modality = optional_text(obj, "modality_type")
        .map(|m| Modality::parse(&m).ok_or(format!("unknown modality_type {m:?}")))
        .transpose()?;
    let question_type = optional_text(obj, "question_type")
        .map(|q| QuestionType::parse(&q).ok_or(format!("unknown question_type {q:?}")))
        .transpose()?;
    Ok(VqaRecord {
        id: optional_text(obj, "question_id").unwrap_or(id),
        dataset: optional_text(obj, "dataset").or_else(|| dataset_of(&image)),
        image,
        question,
        options,
        answer,
        modality,
        question_type,
    })
}

/// Parses one record object, whichever format it is in.
pub fn parse_record(
    value: &Value,
    id: String,
    hints: (Option<Modality>, Option<QuestionType>),
) -> Result<VqaRecord, String> {
    let Value::Object(obj) = value else {
        return Err(format!("expected an object, got {}", short(value)));
    };
    if obj.contains_key("problem") || obj.contains_key("solution") {
        parse_med_r1(obj, id, hints)
    } else if obj.contains_key("gt_answer") || obj.contains_key("question_id") {
        parse_omnimed(obj, id)
    } else {
        Err("neither a Med-R1 record (`image`, `problem`, `solution`) nor an OmniMedVQA item (`question`, `gt_answer`, `image_path`, `option_A`...)".into())
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!(
            "{}...",
            &s[..s.char_indices().nth(57).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

/// The JSON values of a file: one array, or one object per line (JSONL).
fn read_values(path: &Path) -> Result<Vec<Value>, DataError> {
    let body = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // A byte-order mark (what some editors write first) is not part of the JSON.
    let body = body.strip_prefix('\u{feff}').unwrap_or(&body);
    if body.trim().is_empty() {
        return Err(DataError::Invalid(format!(
            "{}: the file is empty (expected a JSON array of records, or JSONL)",
            path.display()
        )));
    }
    let json_err = |e: serde_json::Error, line_offset: usize| DataError::Json {
        path: path.to_path_buf(),
        line: e.line() + line_offset,
        column: e.column(),
        message: e.to_string(),
    };
    if body.trim_start().starts_with('[') {
        return serde_json::from_str::<Vec<Value>>(body).map_err(|e| json_err(e, 0));
    }
    let mut values = Vec::new();
    for (i, line) in body.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        values.push(serde_json::from_str(line).map_err(|e| json_err(e, i))?);
    }
    Ok(values)
}

/// Loads one file.
pub fn load_file(path: &Path, opts: &LoadOptions) -> Result<Loaded, DataError> {
    let values = read_values(path)?;
    let hints = infer_from_file_name(path);
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = Loaded::default();
    for (index, value) in values.iter().enumerate() {
        let result = parse_record(value, format!("{stem}#{index}"), hints).and_then(|r| {
            if opts.data_root.is_some() || opts.require_images {
                check_image_path(&r.image, opts.allow_outside_root)?;
            }
            if opts.require_images {
                let root = opts.data_root.as_deref().unwrap_or(Path::new("."));
                let full = root.join(&r.image);
                if !full.is_file() {
                    return Err(format!("image {} does not exist", full.display()));
                }
            }
            Ok(r)
        });
        match result {
            Ok(r) => out.records.push(r),
            Err(reason) if opts.skip_invalid => out.skipped.push(Skipped {
                file: path.to_path_buf(),
                index,
                reason,
            }),
            Err(message) => {
                return Err(DataError::Record {
                    path: path.to_path_buf(),
                    index,
                    message,
                })
            }
        }
    }
    Ok(out)
}

/// Loads several files (a directory contributes its `*.json`/`*.jsonl` files, sorted).
pub fn load_paths(paths: &[PathBuf], opts: &LoadOptions) -> Result<Loaded, DataError> {
    load_paths_with(paths, opts, &mut |_, _| {})
}

/// [`load_paths`], calling `progress(files_done, files)` after each file.
pub fn load_paths_with(
    paths: &[PathBuf],
    opts: &LoadOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Loaded, DataError> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inner = Vec::new();
            collect_files(p, &mut inner)?;
            inner.sort();
            files.extend(inner);
        } else {
            files.push(p.clone());
        }
    }
    let mut out = Loaded::default();
    let total = files.len();
    for (i, f) in files.iter().enumerate() {
        let l = load_file(f, opts)?;
        out.records.extend(l.records);
        out.skipped.extend(l.skipped);
        progress(i + 1, total);
    }
    Ok(out)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out)?;
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("json") | Some("jsonl")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

/// Writes the skip report as JSON (`[{file, index, reason}]`).
pub fn write_skip_report(skipped: &[Skipped], path: &Path) -> Result<(), DataError> {
    let body = serde_json::to_string_pretty(skipped).expect("serialisable");
    std::fs::write(path, body).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}
