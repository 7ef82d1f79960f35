//! Inputs shared by the criterion benches: the tiny reference model's config and a small
//! synthetic question set prepared for it (byte-level tokenizer, 56x56 images).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use grpo::learner::PromptInput;
use grpo::prompt::prepare_prompt;
use medvqa::synth::{write_synthetic, SynthConfig};
use medvqa::{Modality, PromptTemplate, QuestionType};
use qwen2vl::processor::{byte_tokenizer_json, ImageProcessorConfig, Processor, TextTokenizer};
use qwen2vl::Qwen2VLConfig;

/// `<|im_end|>` and `<|endoftext|>` in the byte-level tokenizer.
pub const EOS: u32 = 258;
pub const PAD: u32 = 256;

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2vl-tiny-seed0/hf_model")
}

pub fn tiny_config() -> Qwen2VLConfig {
    Qwen2VLConfig::from_file(&fixture_dir().join("config.json")).expect("fixture config")
}

pub fn byte_tokenizer() -> TextTokenizer {
    TextTokenizer::from_bytes(byte_tokenizer_json().to_string().as_bytes(), "byte-level")
        .expect("byte-level tokenizer")
}

/// `n` synthetic modality questions written under the system temp dir and prepared as the
/// tiny demo prepares them (`{Question}` template, 56x56 images -> 4 image tokens).
pub fn synthetic_prompts(n: usize) -> Vec<PromptInput> {
    let dir = std::env::temp_dir().join(format!("medr1-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (train, _) = write_synthetic(
        &SynthConfig {
            n: 2 * n,
            seed: 5,
            image_size: 56,
            modalities: vec![
                Modality::Ct,
                Modality::Dermoscopy,
                Modality::Fundus,
                Modality::Microscopy,
            ],
            question_types: vec![QuestionType::ModalityRecognition],
            min_options: 4,
            max_options: 4,
            shuffle_options: false,
        },
        &dir,
        0.25,
    )
    .expect("synthetic set");
    let image = ImageProcessorConfig {
        min_pixels: 3136,
        max_pixels: 3136,
        ..Default::default()
    };
    let processor = Processor::new(byte_tokenizer(), image).expect("processor");
    let template = PromptTemplate::custom("{Question}").expect("template");
    let prompts = train
        .iter()
        .take(n)
        .map(|r| prepare_prompt(r, &template, &processor, &dir).expect("prompt"))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    prompts
}
