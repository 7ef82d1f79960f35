//! Forward-pass time of the tiny reference model on the Flex CPU backend: a batch of prompts
//! with one image each, as in a rollout's scoring pass. `cargo bench --bench forward`.

mod common;

use burn::backend::Flex;
use burn::tensor::Tensor;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use grpo::learner::{images_of, PromptInput};
use qwen2vl::{load_model, TokenBatch};

fn bench(c: &mut Criterion) {
    let device = Default::default();
    let (model, _) = load_model::<Flex>(&common::fixture_dir(), &device).expect("fixture model");
    let prompts = common::synthetic_prompts(8);
    let chosen: Vec<&PromptInput> = prompts.iter().collect();
    let rows: Vec<Vec<u32>> = chosen.iter().map(|p| p.ids.clone()).collect();
    let batch = TokenBatch::left_padded(&rows, common::PAD);
    let images = images_of::<Flex>(&chosen, &device).expect("one patch width");
    let mut group = c.benchmark_group("forward");
    group.throughput(Throughput::Elements((batch.batch * batch.len) as u64));
    group.bench_function(format!("batch 8 x {} tokens", batch.len), |b| {
        b.iter(|| {
            let logits: Tensor<Flex, 3> = model.forward(&batch, images.as_ref()).expect("forward");
            logits.into_data()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
