//! Med-R1's prompt templates (the strings of its trainer and evaluation script), selectable by
//! name, and user-defined templates with a `{Question}` placeholder.

use crate::error::DataError;

pub const TRAIN_THINK: &str = "{Question} Your task: 1. Think through the question step by step, enclose your reasoning process in <think>...</think> tags. 2. Then provide the correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags. 3. No extra information or text outside of these tags.";
pub const TRAIN_NOTHINK: &str = "{Question} Your task: 1. Provide the correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags. 2. No extra information or text outside of this tag.";
pub const EVAL_THINK: &str = "{Question} Think through the question step by step in <think>...</think> tags. Then provide the correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags.";
pub const EVAL_NOTHINK: &str = "{Question} Provide the correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags.";
/// Med-R1's zero-shot evaluation of base models (`test_qwen2vl_vqa_zero_shot.py`): no tags
/// asked for, the output compared with the letter as it is.
pub const EVAL_ZERO_SHOT: &str =
    "{Question} Provide the correct single-letter choice (A, B, C, D,...).";

/// A prompt template: `{Question}` is replaced by the record's problem text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplate {
    pub name: String,
    pub text: String,
}

impl PromptTemplate {
    /// `train_think`, `train_nothink`, `eval_think`, `eval_nothink`, `eval_zero_shot`.
    pub fn named(name: &str) -> Result<Self, DataError> {
        let text = match name {
            "train_think" => TRAIN_THINK,
            "train_nothink" => TRAIN_NOTHINK,
            "eval_think" => EVAL_THINK,
            "eval_nothink" => EVAL_NOTHINK,
            "eval_zero_shot" => EVAL_ZERO_SHOT,
            other => {
                return Err(DataError::Invalid(format!(
                    "unknown prompt template `{other}`: use train_think, train_nothink, eval_think, eval_nothink, eval_zero_shot, or give the template text with a {{Question}} placeholder"
                )))
            }
        };
        Ok(Self {
            name: name.to_string(),
            text: text.to_string(),
        })
    }

    /// A user template; it must contain `{Question}`.
    pub fn custom(text: &str) -> Result<Self, DataError> {
        if !text.contains("{Question}") {
            return Err(DataError::Invalid(format!(
                "prompt template {text:?} has no {{Question}} placeholder"
            )));
        }
        Ok(Self {
            name: "custom".into(),
            text: text.to_string(),
        })
    }

    /// A name of the built-ins, or a template text.
    pub fn parse(name_or_text: &str) -> Result<Self, DataError> {
        if name_or_text.contains("{Question}") {
            Self::custom(name_or_text)
        } else {
            Self::named(name_or_text)
        }
    }

    /// Whether the template asks for `<think>` reasoning (selects the format reward's pattern).
    pub fn thinks(&self) -> bool {
        self.text.contains("<think>")
    }

    pub fn render(&self, problem: &str) -> String {
        self.text.replace("{Question}", problem)
    }
}
