//! Med-R1's format reward: 1 when the whole completion has the requested tag structure.

use medvqa::VqaRecord;
use regex::Regex;

use super::Reward;

pub struct FormatReward {
    pattern: Regex,
    think: bool,
}

impl FormatReward {
    /// `think`: `<think>.*?</think>\s*<answer>.*?</answer>`; otherwise `\s*<answer>.*?</answer>`.
    /// Both must match the whole completion, with `.` matching newlines (Python's
    /// `re.fullmatch(..., re.DOTALL)`).
    pub fn new(think: bool) -> Self {
        let body = if think {
            r"<think>.*?</think>\s*<answer>.*?</answer>"
        } else {
            r"\s*<answer>.*?</answer>"
        };
        Self {
            pattern: Regex::new(&format!(r"\A(?s:{body})\z")).expect("valid pattern"),
            think,
        }
    }
}

impl Reward for FormatReward {
    fn name(&self) -> &str {
        if self.think {
            "format"
        } else {
            "format_nothink"
        }
    }

    fn score(&self, _prompt: &str, completion: &str, _record: &VqaRecord) -> f32 {
        if self.pattern.is_match(completion) {
            1.0
        } else {
            0.0
        }
    }
}
