//! One multiple-choice question about one image, whatever file format it came from.

use serde::{Deserialize, Serialize};

use crate::taxonomy::{Modality, QuestionType};

pub const LETTERS: [char; 6] = ['A', 'B', 'C', 'D', 'E', 'F'];

/// A med-VQA item. `problem()` gives Med-R1's problem text: the question followed by
/// ` A)opt, B)opt, ...`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqaRecord {
    /// Stable identifier (`question_id`, or `<file stem>#<index>`).
    pub id: String,
    /// Image path relative to the data root, as written in the record.
    pub image: String,
    pub question: String,
    /// Option texts in letter order (A, B, ...): 1 to 6 of them.
    pub options: Vec<String>,
    /// Index of the correct option.
    pub answer: usize,
    pub modality: Option<Modality>,
    pub question_type: Option<QuestionType>,
    /// Source dataset (`Images/<dataset>/...` for OmniMedVQA).
    pub dataset: Option<String>,
}

impl VqaRecord {
    pub fn answer_letter(&self) -> char {
        LETTERS[self.answer]
    }

    pub fn answer_text(&self) -> &str {
        &self.options[self.answer]
    }

    /// Med-R1's problem text.
    pub fn problem(&self) -> String {
        let opts: Vec<String> = self
            .options
            .iter()
            .enumerate()
            .map(|(i, o)| format!("{}){o}", LETTERS[i]))
            .collect();
        format!("{} {}", self.question, opts.join(", "))
    }

    /// Med-R1's solution text.
    pub fn solution(&self) -> String {
        format!("<answer> {} </answer>", self.answer_letter())
    }
}

/// The dataset named by an OmniMedVQA image path (`Images/<dataset>/...`).
pub fn dataset_of(image: &str) -> Option<String> {
    let mut parts = image.split('/').filter(|p| !p.is_empty());
    match (parts.next(), parts.next()) {
        (Some("Images"), Some(d)) => Some(d.to_string()),
        _ => None,
    }
}

/// Splits Med-R1's problem text into the question and its options: `question A)x, B)y, C)z`.
/// Markers are searched from the end, so option texts may contain commas; a question without
/// an `A)` marker is an error.
pub fn split_problem(problem: &str) -> Result<(String, Vec<String>), String> {
    // Find the highest letter whose chain of markers back to A) exists.
    for n in (1..=LETTERS.len()).rev() {
        let mut end = problem.len();
        let mut options = Vec::with_capacity(n);
        let mut ok = true;
        for k in (0..n).rev() {
            let marker = if k == 0 {
                format!("{})", LETTERS[0])
            } else {
                format!(", {})", LETTERS[k])
            };
            // `A)` must open the option list: at the start or after whitespace (an option text
            // such as "(ACJ OA)." holds `A)` too).
            let found = problem[..end]
                .rmatch_indices(&marker)
                .map(|(pos, _)| pos)
                .find(|&pos| k > 0 || pos == 0 || problem[..pos].ends_with(char::is_whitespace));
            match found {
                Some(pos) => {
                    options.push(problem[pos + marker.len()..end].to_string());
                    end = pos;
                }
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            options.reverse();
            return Ok((problem[..end].trim_end().to_string(), options));
        }
    }
    Err("no options found in `problem` (expected `... A)option, B)option`)".into())
}

/// The letter inside Med-R1's `<answer> X </answer>`.
pub fn parse_solution(solution: &str) -> Result<char, String> {
    let inner = solution
        .split_once("<answer>")
        .and_then(|(_, rest)| rest.split_once("</answer>"))
        .map(|(inner, _)| inner.trim())
        .ok_or_else(|| format!("`solution` {solution:?} is not `<answer> X </answer>`"))?;
    let mut chars = inner.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_uppercase() => Ok(c),
        _ => Err(format!(
            "`solution` {solution:?} does not hold a single option letter"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_split_into_question_and_options() {
        let (q, o) =
            split_problem("What is shown? A)Kidney, left, B)Brain, C)Liver, D)None").unwrap();
        assert_eq!(q, "What is shown?");
        assert_eq!(o, ["Kidney, left", "Brain", "Liver", "None"]);
        let (q, o) = split_problem("Grade? A)It's good., B)It's bad.").unwrap();
        assert_eq!((q.as_str(), o.len()), ("Grade?", 2));
        let (_, o) = split_problem("Only one? A)Yes").unwrap();
        assert_eq!(o, ["Yes"]);
        assert!(split_problem("No options here").is_err());
        // Option A itself ends in `A)`.
        let (q, o) = split_problem("Seen? A)Joint OA (ACJ OA)., B)Gout").unwrap();
        assert_eq!((q.as_str(), o[0].as_str()), ("Seen?", "Joint OA (ACJ OA)."));
    }

    #[test]
    fn problem_text_round_trips() {
        let p = "What modality? A)CT scan, B)X-ray, C)Mammography, D)PET scan";
        let (q, options) = split_problem(p).unwrap();
        let r = VqaRecord {
            id: "x".into(),
            image: "Images/MIAS/a.png".into(),
            question: q,
            options,
            answer: 2,
            modality: None,
            question_type: None,
            dataset: dataset_of("Images/MIAS/a.png"),
        };
        assert_eq!(r.problem(), p);
        assert_eq!(r.solution(), "<answer> C </answer>");
        assert_eq!(r.dataset.as_deref(), Some("MIAS"));
    }

    #[test]
    fn solutions_parse() {
        assert_eq!(parse_solution("<answer> D </answer>"), Ok('D'));
        assert_eq!(parse_solution("<answer>B</answer>"), Ok('B'));
        assert!(parse_solution("D").is_err());
        assert!(parse_solution("<answer> DD </answer>").is_err());
    }
}
