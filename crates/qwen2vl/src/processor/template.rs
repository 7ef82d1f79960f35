//! The chat template a checkpoint ships, held against the one [`render_chat`] renders.
//!
//! Qwen2-VL-Instruct and Qwen2.5-VL-Instruct publish the same processor template
//! (`chat_template.json` on the Hub; `chat_template.jinja` when transformers 5 saves a
//! processor). `render_chat` is that template written out in Rust, so a checkpoint whose
//! template is a different one is refused: its prompts would not be the ones it was trained on.
//!
//! [`render_chat`]: super::render_chat

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ProcessorError;

/// The Qwen2-VL / Qwen2.5-VL Instruct processor template, byte for byte as published.
pub const QWEN_VL_CHAT_TEMPLATE: &str = include_str!("chat_template.jinja");

/// The processor template a checkpoint directory holds, found where transformers 5's
/// `ProcessorMixin.from_pretrained` looks (`processing_utils.py`): a legacy
/// `chat_template.json` (its `chat_template` key) first, else `chat_template.jinja`.
/// `None` when it has neither.
pub fn checkpoint_chat_template(dir: &Path) -> Result<Option<(PathBuf, String)>, ProcessorError> {
    let legacy = dir.join("chat_template.json");
    if legacy.is_file() {
        let text =
            std::fs::read_to_string(&legacy).map_err(|e| ProcessorError::Io(legacy.clone(), e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ProcessorError::Config {
            file: legacy.display().to_string(),
            message: format!("invalid JSON: {e}"),
        })?;
        let template = v
            .get("chat_template")
            .and_then(Value::as_str)
            .ok_or_else(|| ProcessorError::Config {
                file: legacy.display().to_string(),
                message: "no `chat_template` string".into(),
            })?;
        return Ok(Some((legacy, template.to_string())));
    }
    let raw = dir.join("chat_template.jinja");
    if raw.is_file() {
        let text = std::fs::read_to_string(&raw).map_err(|e| ProcessorError::Io(raw.clone(), e))?;
        return Ok(Some((raw, text)));
    }
    Ok(None)
}

/// Fails, naming the file and the first place it departs, when the checkpoint in `dir` ships
/// a processor template other than the one medr1 renders. Trailing whitespace is ignored, as
/// Jinja drops a template's final newline.
pub fn check_chat_template(dir: &Path) -> Result<(), ProcessorError> {
    let Some((file, template)) = checkpoint_chat_template(dir)? else {
        return Ok(());
    };
    let (theirs, ours) = (template.trim_end(), QWEN_VL_CHAT_TEMPLATE.trim_end());
    if theirs == ours {
        return Ok(());
    }
    let at = theirs
        .char_indices()
        .zip(ours.chars())
        .find(|((_, a), b)| a != b)
        .map_or(theirs.len().min(ours.len()), |((i, _), _)| i);
    let excerpt: String = theirs[at..].chars().take(60).collect();
    Err(ProcessorError::Config {
        file: file.display().to_string(),
        message: format!(
            "this chat template is not the Qwen2-VL / Qwen2.5-VL Instruct template, the only one \
             medr1 renders; it departs at character {at}: {excerpt:?}. Prompts built with \
             medr1's template would not be the ones this checkpoint expects"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory holding `files`, unique per call.
    struct Dir(PathBuf);

    impl Dir {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir_with(files: &[(&str, &str)]) -> Dir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("qwen2vl-template-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        for (name, text) in files {
            std::fs::write(d.join(name), text).unwrap();
        }
        Dir(d)
    }

    #[test]
    fn the_published_template_in_either_file_passes() {
        let json = serde_json::json!({ "chat_template": QWEN_VL_CHAT_TEMPLATE }).to_string();
        check_chat_template(dir_with(&[("chat_template.json", &json)]).path()).unwrap();
        let with_newline = format!("{QWEN_VL_CHAT_TEMPLATE}\n");
        check_chat_template(dir_with(&[("chat_template.jinja", &with_newline)]).path()).unwrap();
        check_chat_template(dir_with(&[]).path()).unwrap();
    }

    #[test]
    fn another_template_is_refused_naming_the_file_and_the_place() {
        let other = QWEN_VL_CHAT_TEMPLATE.replace("You are a helpful assistant.", "Be terse.");
        let d = dir_with(&[("chat_template.jinja", &other)]);
        let e = check_chat_template(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("chat_template.jinja") && e.contains("Be terse."),
            "{e}"
        );
        // The legacy file wins over the raw one, as in transformers.
        let json = serde_json::json!({ "chat_template": other }).to_string();
        let d = dir_with(&[
            ("chat_template.json", &json),
            ("chat_template.jinja", QWEN_VL_CHAT_TEMPLATE),
        ]);
        let e = check_chat_template(d.path()).unwrap_err().to_string();
        assert!(e.contains("chat_template.json"), "{e}");
        let d = dir_with(&[("chat_template.json", "{\"template\": 1}")]);
        let e = check_chat_template(d.path()).unwrap_err().to_string();
        assert!(e.contains("no `chat_template`"), "{e}");
    }
}
