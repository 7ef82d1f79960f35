//! The embedded default data set: a deterministic synthetic med-VQA generator. Each of the 8
//! modalities is a visual style; each of the 5 question types asks something only the image
//! answers. Position, shape, grade (size) and count questions are asked in every style, so
//! cross-modality transfer can be studied at toy scale; modality questions ask for the style.
//! The same config and seed give the same bytes.

mod draw;

pub use draw::{background, draw_lesion, lesion_color, Lesion, Shape};

use std::path::Path;

use image::RgbImage;

use crate::convert::write_med_r1;
use crate::error::DataError;
use crate::record::VqaRecord;
use crate::rng::Rng;
use crate::select::split_train_test;
use crate::taxonomy::{Modality, QuestionType};

#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    pub n: usize,
    pub seed: u64,
    /// Square image side in pixels (112 gives 16 image tokens for Qwen2-VL).
    pub image_size: u32,
    pub modalities: Vec<Modality>,
    pub question_types: Vec<QuestionType>,
    pub min_options: usize,
    pub max_options: usize,
    /// Shuffle which letter each option gets; otherwise options keep their canonical order
    /// (an easier task: the letter alone identifies the answer value).
    pub shuffle_options: bool,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            n: 1000,
            seed: 0,
            image_size: 112,
            modalities: Modality::ALL.to_vec(),
            question_types: QuestionType::ALL.to_vec(),
            min_options: 2,
            max_options: 4,
            shuffle_options: true,
        }
    }
}

/// One generated question with its image.
#[derive(Debug, Clone)]
pub struct SynthItem {
    pub record: VqaRecord,
    pub image: RgbImage,
}

const QUADRANTS: [&str; 4] = ["upper left", "upper right", "lower left", "lower right"];
const GRADES: [&str; 4] = ["grade 1 (small)", "grade 2", "grade 3", "grade 4 (large)"];
const COUNTS: [&str; 4] = ["one", "two", "three", "four"];

fn question_text(q: QuestionType) -> &'static str {
    match q {
        QuestionType::ModalityRecognition => "Which imaging modality produced this image?",
        QuestionType::AnatomyIdentification => {
            "In which region of the image is the lesion located?"
        }
        QuestionType::DiseaseDiagnosis => "What is the shape of the lesion in this image?",
        QuestionType::LesionGrading => "What is the grade of the lesion, judged by its size?",
        QuestionType::OtherBiologicalAttributes => "How many lesions are visible in this image?",
    }
}

/// The possible answers of a question type, in canonical order.
fn values(q: QuestionType, modalities: &[Modality]) -> Vec<String> {
    match q {
        QuestionType::ModalityRecognition => {
            modalities.iter().map(|m| m.name().to_string()).collect()
        }
        QuestionType::AnatomyIdentification => QUADRANTS.iter().map(|s| s.to_string()).collect(),
        QuestionType::DiseaseDiagnosis => Shape::ALL.iter().map(|s| s.name().to_string()).collect(),
        QuestionType::LesionGrading => GRADES.iter().map(|s| s.to_string()).collect(),
        QuestionType::OtherBiologicalAttributes => COUNTS.iter().map(|s| s.to_string()).collect(),
    }
}

fn quadrant_center(q: usize, s: f64, rng: &mut Rng) -> (f64, f64) {
    let (qx, qy) = ((q % 2) as f64, (q / 2) as f64);
    (
        s * (0.3 + 0.4 * qx) + rng.range(-0.04, 0.04) * s,
        s * (0.3 + 0.4 * qy) + rng.range(-0.04, 0.04) * s,
    )
}

/// The lesions that make `value` the answer to `q`.
fn scene(q: QuestionType, value: usize, s: f64, rng: &mut Rng) -> Vec<Lesion> {
    let centre = |rng: &mut Rng| {
        (
            s * 0.5 + rng.range(-0.08, 0.08) * s,
            s * 0.5 + rng.range(-0.08, 0.08) * s,
        )
    };
    match q {
        QuestionType::ModalityRecognition => {
            let (cx, cy) = centre(rng);
            vec![Lesion {
                shape: Shape::Round,
                cx,
                cy,
                radius: s * 0.08,
            }]
        }
        QuestionType::AnatomyIdentification => {
            let (cx, cy) = quadrant_center(value, s, rng);
            vec![Lesion {
                shape: Shape::Round,
                cx,
                cy,
                radius: s * 0.1,
            }]
        }
        QuestionType::DiseaseDiagnosis => {
            let (cx, cy) = centre(rng);
            vec![Lesion {
                shape: Shape::ALL[value],
                cx,
                cy,
                radius: s * 0.17,
            }]
        }
        QuestionType::LesionGrading => {
            let (cx, cy) = centre(rng);
            let radius = s * [0.05, 0.1, 0.16, 0.23][value];
            vec![Lesion {
                shape: Shape::Round,
                cx,
                cy,
                radius,
            }]
        }
        QuestionType::OtherBiologicalAttributes => {
            let mut quads = [0, 1, 2, 3];
            rng.shuffle(&mut quads);
            quads[..=value]
                .iter()
                .map(|&qd| {
                    let (cx, cy) = quadrant_center(qd, s, rng);
                    Lesion {
                        shape: Shape::Round,
                        cx,
                        cy,
                        radius: s * 0.07,
                    }
                })
                .collect()
        }
    }
}

/// Generates `cfg.n` items, all in memory (small sets; [`items`] makes them one at a time).
pub fn generate(cfg: &SynthConfig) -> Result<Vec<SynthItem>, DataError> {
    Ok(items(cfg)?.collect())
}

/// The `cfg.n` items of `cfg`, made one at a time. Modalities and question types cycle so that
/// every combination is equally frequent; within a question type the answer value cycles
/// through a fresh shuffle of its values, and the correct letter cycles through the options,
/// so answers are balanced.
pub fn items(cfg: &SynthConfig) -> Result<SynthItems<'_>, DataError> {
    if cfg.modalities.is_empty() || cfg.question_types.is_empty() {
        return Err(DataError::Invalid(
            "synthetic data needs at least one modality and one question type".into(),
        ));
    }
    if cfg.min_options < 2 || cfg.max_options < cfg.min_options || cfg.max_options > 4 {
        return Err(DataError::Invalid(format!(
            "options per question must satisfy 2 <= min ({}) <= max ({}) <= 4",
            cfg.min_options, cfg.max_options
        )));
    }
    if cfg.image_size < 28 {
        return Err(DataError::Invalid(format!(
            "image_size {} is below 28 pixels",
            cfg.image_size
        )));
    }
    Ok(SynthItems {
        cfg,
        rng: Rng::new(cfg.seed),
        cycles: vec![Vec::new(); cfg.question_types.len()],
        letter_turn: vec![0usize; cfg.question_types.len()],
        next: 0,
    })
}

/// The generator behind [`items`].
pub struct SynthItems<'a> {
    cfg: &'a SynthConfig,
    rng: Rng,
    cycles: Vec<Vec<usize>>,
    letter_turn: Vec<usize>,
    next: usize,
}

impl Iterator for SynthItems<'_> {
    type Item = SynthItem;

    fn next(&mut self) -> Option<SynthItem> {
        if self.next >= self.cfg.n {
            return None;
        }
        let i = self.next;
        self.next += 1;
        let cfg = self.cfg;
        let rng = &mut self.rng;
        let s = cfg.image_size as f64;
        let (nm, nq) = (cfg.modalities.len(), cfg.question_types.len());
        let cycles = &mut self.cycles;
        let letter_turn = &mut self.letter_turn;
        let modality = cfg.modalities[i % nm];
        let qi = (i / nm) % nq;
        let q = cfg.question_types[qi];
        let all_values = values(q, &cfg.modalities);
        let value = match q {
            QuestionType::ModalityRecognition => cfg
                .modalities
                .iter()
                .position(|&m| m == modality)
                .expect("listed"),
            _ => {
                if cycles[qi].is_empty() {
                    let mut order: Vec<usize> = (0..all_values.len()).collect();
                    rng.shuffle(&mut order);
                    cycles[qi] = order;
                }
                cycles[qi].pop().expect("refilled")
            }
        };
        let max_opts = cfg.max_options.min(all_values.len());
        let n_opts = (cfg.min_options.min(max_opts)
            + rng.below(max_opts - cfg.min_options.min(max_opts) + 1))
        .max(1);
        let mut distractors: Vec<usize> = (0..all_values.len()).filter(|&v| v != value).collect();
        rng.shuffle(&mut distractors);
        let mut chosen: Vec<usize> = distractors[..n_opts - 1].to_vec();
        let answer = if cfg.shuffle_options {
            let slot = letter_turn[qi] % n_opts;
            letter_turn[qi] += 1;
            chosen.insert(slot, value);
            slot
        } else {
            chosen.push(value);
            chosen.sort_unstable();
            chosen.iter().position(|&v| v == value).expect("inserted")
        };
        let mut image = background(modality, cfg.image_size, rng);
        let color = lesion_color(modality);
        for lesion in scene(q, value, s, rng) {
            draw_lesion(&mut image, &lesion, color);
        }
        let id = format!("synth-{:06}", i);
        Some(SynthItem {
            record: VqaRecord {
                image: format!("images/{id}.png"),
                id,
                question: question_text(q).to_string(),
                options: chosen.iter().map(|&v| all_values[v].clone()).collect(),
                answer,
                modality: Some(modality),
                question_type: Some(q),
                dataset: Some("synthetic".into()),
            },
            image,
        })
    }
}

/// Writes a synthetic set to `dir`: `images/*.png`, and `train.json` / `test.json` in Med-R1
/// format (with `modality` and `question_type` fields), split by the same seed.
pub fn write_synthetic(
    cfg: &SynthConfig,
    dir: &Path,
    test_fraction: f64,
) -> Result<(Vec<VqaRecord>, Vec<VqaRecord>), DataError> {
    write_synthetic_with(cfg, dir, test_fraction, &mut |_, _| {})
}

/// [`write_synthetic`], each image written as soon as it is made (memory does not grow with
/// `n`), `progress(done, n)` after each.
pub fn write_synthetic_with(
    cfg: &SynthConfig,
    dir: &Path,
    test_fraction: f64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<VqaRecord>, Vec<VqaRecord>), DataError> {
    let made = items(cfg)?;
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(|source| DataError::Io {
        path: images.clone(),
        source,
    })?;
    let mut records = Vec::with_capacity(cfg.n);
    for item in made {
        let path = dir.join(&item.record.image);
        item.image
            .save_with_format(&path, image::ImageFormat::Png)
            .map_err(|e| {
                DataError::Invalid(format!("{}: cannot write image: {e}", path.display()))
            })?;
        records.push(item.record);
        progress(records.len(), cfg.n);
    }
    let (train, test) = split_train_test(&records, test_fraction, cfg.seed);
    write_med_r1(&train, &dir.join("train.json"), |_, _| {})?;
    write_med_r1(&test, &dir.join("test.json"), |_, _| {})?;
    Ok((train, test))
}
