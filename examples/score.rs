//! Log-probabilities of given completions after an image + question prompt: the
//! teacher-forced scoring GRPO uses for the policy and the reference model.
//!
//! ```sh
//! cargo run --release -- train                                 # makes runs/tiny/final
//! cargo run --release --example score -- runs/tiny/final runs/tiny/data/images/synth-000001.png \
//!     "Which imaging modality produced this image? A)CT, B)Dermoscopy, C)Fundus, D)Microscopy"
//! ```

use std::path::Path;

use burn::backend::Flex;
use qwen2vl::generation::completion_logprobs;
use qwen2vl::processor::{load_image, preprocess, Message, Processor};
use qwen2vl::{load_model, Images};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, image, prompt] = args.as_slice() else {
        return Err("usage: score CHECKPOINT_DIR IMAGE PROMPT".into());
    };
    let dir = Path::new(dir);
    let device = Default::default();
    let processor = Processor::from_dir(dir)?;
    let processed = preprocess(&load_image(Path::new(image))?, &processor.image)?;
    let prompt_ids = processor.prompt_ids(
        &[Message::user_with_image(prompt.clone())],
        std::slice::from_ref(&processed),
    )?;
    let (model, _) = load_model::<Flex>(dir, &device)?;
    let completions: Vec<String> = ["A", "B", "C", "D"]
        .iter()
        .map(|l| format!("<answer> {l} </answer>"))
        .collect();
    let ids: Vec<Vec<u32>> = completions
        .iter()
        .map(|c| processor.tokenizer.encode(c))
        .collect::<Result<_, _>>()?;
    // One image per row: the same image repeated for each candidate completion.
    let images = Images::<Flex>::from_processed(vec![&processed; ids.len()], &device)?;
    let prompts = vec![prompt_ids; ids.len()];
    let lp = completion_logprobs(&model, &prompts, &ids, images.as_ref(), 0)?;
    let lp: Vec<f32> = lp.into_data().to_vec()?;
    let width = lp.len() / ids.len();
    for (k, (c, toks)) in completions.iter().zip(&ids).enumerate() {
        let row = &lp[k * width..k * width + toks.len()];
        let total: f32 = row.iter().sum();
        println!("{c:<24} log p = {total:>9.4}   per token {row:.3?}");
    }
    Ok(())
}
