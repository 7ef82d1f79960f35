//! Accuracy rewards: Med-R1's exact-match of the `<answer>` contents, and the letter-robust
//! variant of Med-R1's evaluation script.

use std::sync::OnceLock;

use medvqa::VqaRecord;
use regex::Regex;

use super::Reward;

fn answer_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    // Python `re.search(r'<answer>(.*?)</answer>', s)`: `.` does not cross newlines.
    RE.get_or_init(|| Regex::new(r"<answer>(.*?)</answer>").expect("valid pattern"))
}

fn letter_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"<answer>\s*(\w+)\s*</answer>").expect("valid pattern"))
}

/// Med-R1's extraction: the first `<answer>...</answer>` contents, stripped; without tags, the
/// whole text stripped.
pub fn extract_answer(text: &str) -> String {
    match answer_re().captures(text) {
        Some(c) => c[1].trim().to_string(),
        None => text.trim().to_string(),
    }
}

/// Med-R1's evaluation extraction: the word inside the first `<answer> X </answer>`.
pub fn extract_letter(text: &str) -> Option<String> {
    letter_re().captures(text).map(|c| c[1].to_string())
}

/// 1 when the extracted answer equals the solution's exactly (Med-R1's training reward).
pub struct AccuracyReward;

impl Reward for AccuracyReward {
    fn name(&self) -> &str {
        "accuracy"
    }

    fn score(&self, _prompt: &str, completion: &str, record: &VqaRecord) -> f32 {
        if extract_answer(completion) == extract_answer(&record.solution()) {
            1.0
        } else {
            0.0
        }
    }
}

/// 1 when `<answer> X </answer>` holds the correct letter, whitespace aside (Med-R1's eval).
pub struct LetterAccuracyReward;

impl Reward for LetterAccuracyReward {
    fn name(&self) -> &str {
        "accuracy_letter"
    }

    fn score(&self, _prompt: &str, completion: &str, record: &VqaRecord) -> f32 {
        match extract_letter(completion) {
            Some(l) if l == record.answer_letter().to_string() => 1.0,
            _ => 0.0,
        }
    }
}
