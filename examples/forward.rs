//! Load a Qwen2-VL checkpoint directory and print the most likely next tokens of a token prompt.
//!
//! ```sh
//! cargo run --release --example forward -- tests/fixtures/qwen2vl-tiny-seed0/hf_model
//! ```

use burn::backend::Flex;
use burn::tensor::Tensor;
use qwen2vl::{load_model, TokenBatch};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/fixtures/qwen2vl-tiny-seed0/hf_model".into());
    // ANCHOR: load
    let device = Default::default();
    let (model, info) = load_model::<Flex>(dir.as_ref(), &device)?;
    println!(
        "loaded {} tensors ({}) from {:?}",
        info.tensors, info.layout, info.files
    );

    // A text-only prompt; the tiny fixture's tokenizer is byte-level (id = UTF-8 byte).
    let ids: Vec<u32> = "Describe this image.".bytes().map(u32::from).collect();
    let logits: Tensor<Flex, 3> = model.forward(&TokenBatch::single(ids.clone()), None)?;
    let vocab = model.config.text.vocab_size;
    let last: Vec<f32> = logits
        .narrow(1, ids.len() - 1, 1)
        .reshape([vocab])
        .into_data()
        .to_vec()?;
    // ANCHOR_END: load
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    for id in order.iter().take(5) {
        println!("token {id:>6}  logit {:.4}", last[*id]);
    }
    Ok(())
}
