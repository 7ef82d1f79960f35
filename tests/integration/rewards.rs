//! Med-R1's rewards on tricky completions, and each completion scored against its own record.

use grpo::rewards::{extract_answer, extract_letter};
use grpo::{AccuracyReward, FormatReward, LetterAccuracyReward, Reward, WeightedRewards};
use medvqa::VqaRecord;

fn record(answer: usize) -> VqaRecord {
    VqaRecord {
        id: "r".into(),
        image: "x.png".into(),
        question: "Q?".into(),
        options: vec!["a".into(), "b".into(), "c".into(), "d".into()],
        answer,
        modality: None,
        question_type: None,
        dataset: None,
    }
}

#[test]
fn think_format_needs_the_whole_structure() {
    let f = FormatReward::new(true);
    let r = record(1);
    let score = |c: &str| f.score("", c, &r);
    assert_eq!(
        score("<think>look\nat it</think>\n<answer> B </answer>"),
        1.0
    );
    assert_eq!(score("<think></think><answer></answer>"), 1.0);
    assert_eq!(
        score("<think>a</think> <answer>B</answer> extra"),
        0.0,
        "extra text after"
    );
    assert_eq!(
        score("Sure! <think>a</think><answer>B</answer>"),
        0.0,
        "text before"
    );
    assert_eq!(score("<think>a</think><answer>B"), 0.0, "missing close");
    assert_eq!(score("<answer>B</answer>"), 0.0, "no think");
    assert_eq!(
        score("<THINK>a</THINK><ANSWER>B</ANSWER>"),
        0.0,
        "tags are case-sensitive"
    );
    // Whole-string match, as Python's re.fullmatch: a nested think parses as one think block
    // whose text is `<think>a</think>`, so it matches (checked against Python).
    assert_eq!(
        score("<think><think>a</think></think><answer>B</answer>"),
        1.0
    );
    assert_eq!(
        score("<think>a</think><answer>B</answer><answer>C</answer>"),
        1.0
    );
}

#[test]
fn nothink_format() {
    let f = FormatReward::new(false);
    let r = record(0);
    assert_eq!(f.score("", "\n <answer> A </answer>", &r), 1.0);
    assert_eq!(f.score("", "<answer>A</answer>\n", &r), 0.0);
    assert_eq!(f.score("", "<think>x</think><answer>A</answer>", &r), 0.0);
}

#[test]
fn accuracy_extracts_like_med_r1() {
    let r = record(2); // C
    let acc = |c: &str| AccuracyReward.score("", c, &r);
    assert_eq!(acc("<think>hmm</think><answer> C </answer>"), 1.0);
    assert_eq!(acc("<answer>C</answer>"), 1.0);
    assert_eq!(
        acc("<answer>c</answer>"),
        0.0,
        "lowercase is wrong for exact match"
    );
    assert_eq!(acc("<answer>C) c</answer>"), 0.0);
    assert_eq!(acc("C"), 1.0, "no tags: the whole text, stripped");
    assert_eq!(
        acc("<answer>\nC</answer>"),
        0.0,
        "'.' does not cross newlines: falls back to the whole text"
    );
    assert_eq!(
        acc("<answer>B</answer><answer>C</answer>"),
        0.0,
        "first answer counts"
    );
    assert_eq!(extract_answer("<answer> D </answer>"), "D");

    let letter = |c: &str| LetterAccuracyReward.score("", c, &r);
    assert_eq!(letter("<answer>\n C \n</answer>"), 1.0);
    assert_eq!(letter("<answer>C</answer>"), 1.0);
    assert_eq!(letter("C"), 0.0, "needs the tags");
    assert_eq!(extract_letter("<answer> C) c </answer>"), None);
}

#[test]
fn each_completion_is_scored_against_its_own_record() {
    // Two prompts x two completions each, in group order: [p0 c0, p0 c1, p1 c0, p1 c1].
    // Med-R1's trainer paired completions with the wrong solutions when batch > 1; here every
    // completion names its own record's answer and must score 2 (format + accuracy).
    let (r0, r1) = (record(0), record(3));
    let records = [&r0, &r0, &r1, &r1];
    let completions: Vec<String> = records
        .iter()
        .map(|r| format!("<think>x</think><answer> {} </answer>", r.answer_letter()))
        .collect();
    let prompts = vec![String::new(); 4];
    let scores = WeightedRewards::med_r1(true).score(&prompts, &completions, &records);
    assert_eq!(scores.total, [2.0, 2.0, 2.0, 2.0]);
    // Shifting the records by one prompt (the misalignment) must be caught.
    let shifted = [&r1, &r1, &r0, &r0];
    let wrong = WeightedRewards::med_r1(true).score(&prompts, &completions, &shifted);
    assert_eq!(wrong.total, [1.0, 1.0, 1.0, 1.0]);
    assert_eq!(scores.per_reward[0].0, "format");
}
