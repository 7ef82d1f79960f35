//! Forward-pass time of the tiny reference model on the Flex CPU backend: a batch of prompts
//! with one image each, as in a rollout's scoring pass; and the LM head's products at the real
//! vocabulary and the 107M config's width (151,936 x 512, tied): a decoding step's logits for
//! 8 rows, a scoring pass's for 128 completion tokens, its backward pass's two products, and
//! the whole head of a scoring pass (the targets' log-probs alone as the reference takes them;
//! with entropies and the backward pass as the policy does). Throughput is logits.
//! `cargo bench --bench forward`.

mod common;

use burn::backend::Flex;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use grpo::learner::{images_of, PromptInput};
use qwen2vl::generation::{chunked_scores, HeadScores, HeadWeight};
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

fn bench_head(c: &mut Criterion) {
    let device = Default::default();
    let (vocab, width) = (151_936, 512);
    let normal = Distribution::Normal(0.0, 0.02);
    let w = Tensor::<Flex, 2>::random([vocab, width], normal, &device);
    let mut group = c.benchmark_group("lm head 151936 x 512");
    group.sample_size(10);
    for rows in [8, 128] {
        let h = Tensor::<Flex, 2>::random([rows, width], normal, &device);
        group.throughput(Throughput::Elements((rows * vocab) as u64));
        group.bench_function(format!("logits, {rows} rows"), |b| {
            b.iter(|| h.clone().matmul(w.clone().transpose()))
        });
    }
    let rows = 128;
    let h = Tensor::<Flex, 2>::random([rows, width], normal, &device);
    let dz = Tensor::<Flex, 2>::random([rows, vocab], normal, &device);
    group.throughput(Throughput::Elements((rows * vocab) as u64));
    group.bench_function(format!("hidden gradient, {rows} rows"), |b| {
        b.iter(|| dz.clone().matmul(w.clone()))
    });
    group.bench_function(format!("weight gradient, {rows} rows"), |b| {
        b.iter(|| dz.clone().transpose().matmul(h.clone()))
    });
    let head = HeadWeight::Tied(w);
    let targets = Tensor::<Flex, 1, Int>::from_data(
        TensorData::new((0..rows as i64).map(|i| i * 997).collect(), [rows]),
        &device,
    );
    group.bench_function(format!("target log-probs, {rows} rows"), |b| {
        b.iter(|| {
            chunked_scores(&head, h.clone(), targets.clone(), false, 0)
                .0
                .into_data()
        })
    });
    let grad = Tensor::<Flex, 1>::ones([rows], &device);
    group.bench_function(
        format!("scores, entropies and backward, {rows} rows"),
        |b| {
            b.iter(|| {
                let (_, _, kept) = HeadScores::new(&head, h.clone(), targets.clone(), true);
                kept.backward(&head, grad.clone()).1.into_data()
            })
        },
    );
    group.finish();
}

criterion_group!(benches, bench, bench_head);
criterion_main!(benches);
