//! Chat-template and tokenizer checks against transformers' processor outputs
//! (`shared/fixtures/qwen-chat/cases.json` format).

use std::path::Path;

use serde_json::Value;

use super::Check;
use crate::error::Qwen2VLError;
use crate::processor::ImageProcessorConfig;
use crate::processor::{render_chat, smart_resize, Message, Processor, TextTokenizer};

fn bad(path: &Path, message: String) -> Qwen2VLError {
    Qwen2VLError::Checkpoint {
        dir: path.to_path_buf(),
        message,
    }
}

/// Mismatching positions (or infinity when the lengths differ).
fn id_check(name: String, got: &[u32], want: &[u32]) -> Check {
    let (err, note) = if got.len() != want.len() {
        (
            f64::INFINITY,
            Some(format!("{} ids vs reference {}", got.len(), want.len())),
        )
    } else {
        let diff = got.iter().zip(want).filter(|(a, b)| a != b).count();
        (
            diff as f64,
            (diff > 0).then(|| format!("{diff} ids differ")),
        )
    };
    Check {
        name,
        max_abs_err: err,
        tolerance: 0.0,
        note,
    }
}

fn text_check(name: String, got: &str, want: &str) -> Check {
    Check {
        name,
        max_abs_err: if got == want { 0.0 } else { 1.0 },
        tolerance: 0.0,
        note: (got != want).then(|| format!("got {got:?}, reference {want:?}")),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|n| n as u32)
                .collect()
        })
        .unwrap_or_default()
}

/// One check per prompt case (rendered text, grid, ids) and per completion case (ids, decoding).
pub fn verify_chat_cases(
    cases_path: &Path,
    tokenizer_path: &Path,
) -> Result<Vec<Check>, Qwen2VLError> {
    let text = std::fs::read_to_string(cases_path).map_err(|e| Qwen2VLError::io(cases_path, e))?;
    let doc: Value =
        serde_json::from_str(&text).map_err(|e| bad(cases_path, format!("invalid JSON: {e}")))?;
    let tokenizer =
        TextTokenizer::from_file(tokenizer_path).map_err(|e| bad(tokenizer_path, e.to_string()))?;
    let processor = Processor::new(tokenizer, ImageProcessorConfig::default())
        .map_err(|e| bad(tokenizer_path, e.to_string()))?;
    let mut checks = Vec::new();
    let prompt_cases = doc["prompt_cases"].as_array().cloned().unwrap_or_default();
    let completion_cases = doc["completion_cases"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if prompt_cases.is_empty() && completion_cases.is_empty() {
        return Err(bad(
            cases_path,
            "no `prompt_cases` or `completion_cases`".into(),
        ));
    }
    for (i, case) in prompt_cases.iter().enumerate() {
        let id = case["id"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("prompt{i}"));
        let field = |k: &str| {
            case[k]
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| bad(cases_path, format!("case {id}: missing `{k}`")))
        };
        let user_text = case["user_text"]
            .as_str()
            .ok_or_else(|| bad(cases_path, format!("case {id}: missing `user_text`")))?;
        let rendered = render_chat(&[Message::user_with_image(user_text)], true, false);
        if let Some(want) = case["rendered_text"].as_str() {
            checks.push(text_check(
                format!("chat.{id}.rendered_text"),
                &rendered,
                want,
            ));
        }
        let (rh, rw) = smart_resize(
            field("image_h")?,
            field("image_w")?,
            28,
            field("min_pixels")?,
            field("max_pixels")?,
        )
        .map_err(|e| bad(cases_path, format!("case {id}: {e}")))?;
        let grid = [1, rh / 14, rw / 14];
        let want_grid = ids(&case["grid_thw"]);
        let got_grid: Vec<u32> = grid.iter().map(|&g| g as u32).collect();
        checks.push(id_check(
            format!("chat.{id}.grid_thw"),
            &got_grid,
            &want_grid,
        ));
        let got = processor
            .expand_ids(&rendered, &[grid.iter().product::<usize>() / 4])
            .map_err(|e| bad(cases_path, format!("case {id}: {e}")))?;
        checks.push(id_check(
            format!("chat.{id}.input_ids"),
            &got,
            &ids(&case["input_ids"]),
        ));
    }
    for (i, case) in completion_cases.iter().enumerate() {
        let id = case["id"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("completion{i}"));
        let text = case["text"]
            .as_str()
            .ok_or_else(|| bad(cases_path, format!("case {id}: missing `text`")))?;
        let tk = &processor.tokenizer;
        let got = tk
            .encode(text)
            .map_err(|e| bad(cases_path, e.to_string()))?;
        let want = ids(&case["input_ids"]);
        checks.push(id_check(format!("chat.{id}.input_ids"), &got, &want));
        for (key, skip) in [("decoded", false), ("decoded_skip_special", true)] {
            if let Some(w) = case[key].as_str() {
                let d = tk
                    .decode(&want, skip)
                    .map_err(|e| bad(cases_path, e.to_string()))?;
                checks.push(text_check(format!("chat.{id}.{key}"), &d, w));
            }
        }
    }
    Ok(checks)
}
