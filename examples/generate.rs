//! Answer a question about an image with any Qwen2-VL checkpoint directory, on the backend the
//! build enables: the library calls behind `medr1 generate`, generic over Burn backends.
//!
//! ```sh
//! cargo run --release -- train                                 # makes runs/tiny/final
//! cargo run --release --example generate -- runs/tiny/final runs/tiny/data/images/synth-000001.png \
//!     "Which imaging modality produced this image? A)CT, B)Dermoscopy, C)Fundus, D)Microscopy"
//! cargo run --release --features wgpu --example generate -- wgpu runs/tiny/final ...
//! ```

use std::path::Path;

use burn::tensor::backend::Backend;
use qwen2vl::generation::{generate, GenerationConfig, Sampling, ShapeBuckets};
use qwen2vl::processor::{load_image, preprocess, Message, Processor};
use qwen2vl::{load_model, Images, TokenBatch};

type Error = Box<dyn std::error::Error>;

/// Greedy answer of the checkpoint in `dir` to `prompt` about `image`.
fn answer<B: Backend>(dir: &Path, image: &Path, prompt: &str) -> Result<String, Error> {
    let device = B::Device::default();
    let processor = Processor::from_dir(dir)?;
    let processed = preprocess(&load_image(image)?, &processor.image)?;
    let ids = processor.prompt_ids(
        &[Message::user_with_image(prompt.to_string())],
        std::slice::from_ref(&processed),
    )?;
    let (model, _) = load_model::<B>(dir, &device)?;
    let images = Images::from_processed([&processed], &device)?;
    let eos = model.config.eos_token_ids.clone();
    let cfg = GenerationConfig {
        max_new_tokens: 64,
        sampling: Sampling::GREEDY,
        pad_token_id: model.config.bos_token_id.unwrap_or(0),
        eos_token_ids: eos,
        seed: 0,
        buckets: ShapeBuckets::EXACT,
    };
    let out = generate(
        &model,
        &TokenBatch::single(ids),
        images.as_ref(),
        &cfg,
        false,
    )?;
    Ok(processor.tokenizer.decode(&out.tokens[0], true)?)
}

fn main() -> Result<(), Error> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let backend = match args.first().map(String::as_str) {
        Some("flex") | Some("wgpu") => args.remove(0),
        _ => "flex".to_string(),
    };
    let [dir, image, prompt] = args.as_slice() else {
        return Err("usage: generate [flex|wgpu] CHECKPOINT_DIR IMAGE PROMPT".into());
    };
    let (dir, image) = (Path::new(dir), Path::new(image));
    let text = match backend.as_str() {
        #[cfg(feature = "wgpu")]
        "wgpu" => answer::<burn::backend::Wgpu>(dir, image, prompt)?,
        "flex" => answer::<burn::backend::Flex>(dir, image, prompt)?,
        other => return Err(format!("this build has no `{other}` backend").into()),
    };
    println!("{text}");
    Ok(())
}
