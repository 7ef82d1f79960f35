//! Forward-pass time of the tiny reference model on the Flex CPU backend (a prompt with one
//! image, as in a rollout's scoring pass). `cargo bench --bench forward`.

use std::time::Instant;

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use qwen2vl::{load_model, Images, TokenBatch};

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen2vl-tiny-seed0/hf_model");
    let device = Default::default();
    let (model, _) = load_model::<Flex>(&dir, &device).expect("fixture model");
    let c = &model.config;
    // 4x6 patches -> 6 image tokens between vision start/end, then 64 text tokens.
    let grid = [1usize, 4, 6];
    let mut ids = vec![c.vision_start_token_id];
    ids.extend(std::iter::repeat_n(c.image_token_id, 6));
    ids.push(c.vision_end_token_id);
    ids.extend((0..64u32).map(|i| i % 200));
    let batch = TokenBatch::left_padded(&vec![ids; 8], 0);
    let patches = grid.iter().product::<usize>() * 8;
    let pixels: Vec<f32> = (0..patches * c.patch_dim())
        .map(|i| ((i % 97) as f32 / 97.0) - 0.5)
        .collect();
    let images = Images {
        pixel_values: Tensor::from_data(TensorData::new(pixels, [patches, c.patch_dim()]), &device),
        grids: vec![grid; 8],
    };
    let run = || {
        let logits: Tensor<Flex, 3> = model.forward(&batch, Some(&images)).unwrap();
        logits.into_data();
    };
    run();
    let iters = 20;
    let start = Instant::now();
    for _ in 0..iters {
        run();
    }
    let per = start.elapsed().as_secs_f64() / iters as f64;
    println!(
        "forward tiny model, batch 8 x {} tokens (1 image each): {:.2} ms/iter, {:.0} tokens/s",
        batch.len,
        per * 1e3,
        (8 * batch.len) as f64 / per
    );
}
