//! Generation speed of the tiny reference model on the Flex CPU backend: a batch of prompts
//! with one image each, KV-cached decoding of a fixed number of tokens (no early stop), greedy
//! and sampled. Throughput is new tokens. Also the per-step choice of the next token at the
//! real vocabulary (8 rows x 151,936 logits, image placeholders banned), greedy and sampled at
//! temperature 1. `cargo bench --bench generation`.

mod common;

use burn::backend::Flex;
use burn::tensor::{Distribution, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use grpo::learner::{images_of, PromptInput};
use qwen2vl::generation::{generate, pick, GenerationConfig, Rng, Sampling, ShapeBuckets};
use qwen2vl::{load_model, TokenBatch};

const NEW_TOKENS: usize = 16;

fn bench(c: &mut Criterion) {
    let device = Default::default();
    let (model, _) = load_model::<Flex>(&common::fixture_dir(), &device).expect("fixture model");
    let prompts = common::synthetic_prompts(8);
    let mut group = c.benchmark_group("generation");
    group.sample_size(20);
    for batch in [1usize, 8] {
        let chosen: Vec<&PromptInput> = prompts.iter().take(batch).collect();
        let rows: Vec<Vec<u32>> = chosen.iter().map(|p| p.ids.clone()).collect();
        let tokens = TokenBatch::left_padded(&rows, common::PAD);
        let images = images_of::<Flex>(&chosen, &device).expect("one patch width");
        group.throughput(Throughput::Elements((batch * NEW_TOKENS) as u64));
        for (name, temperature) in [("greedy", 0.0), ("sampled", 1.0)] {
            let cfg = GenerationConfig {
                max_new_tokens: NEW_TOKENS,
                sampling: Sampling::full(temperature),
                // No stop token: every row decodes all NEW_TOKENS steps.
                eos_token_ids: Vec::new(),
                pad_token_id: common::PAD,
                seed: 0,
                buckets: ShapeBuckets::EXACT,
            };
            group.bench_function(format!("batch {batch} {name}"), |b| {
                b.iter(|| {
                    generate(&model, &tokens, images.as_ref(), &cfg, false).expect("generate")
                })
            });
        }
    }
    group.finish();
}

/// Qwen2-VL's vocabulary, and the placeholders a rollout never picks (image and video pads).
const VOCAB: usize = 151_936;
const BANNED: [u32; 2] = [151_655, 151_656];

fn bench_pick(c: &mut Criterion) {
    let device = Default::default();
    let rows = 8;
    let logits = Tensor::<Flex, 2>::random([rows, VOCAB], Distribution::Normal(0.0, 3.0), &device);
    let active = vec![true; rows];
    let mut group = c.benchmark_group("pick");
    group.sample_size(30);
    group.throughput(Throughput::Elements(rows as u64));
    for (name, sampling) in [
        ("greedy", Sampling::GREEDY),
        ("temperature 1", Sampling::full(1.0)),
        ("temperature 0.7", Sampling::full(0.7)),
    ] {
        let mut rng = Rng::new(0);
        group.bench_function(format!("{rows} x {VOCAB} {name}"), |b| {
            b.iter(|| pick(logits.clone(), &BANNED, None, &sampling, &active, &mut rng))
        });
    }
    group.finish();
}

criterion_group!(benches, bench, bench_pick);
criterion_main!(benches);
