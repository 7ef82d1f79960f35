//! One GRPO step on the tiny model (Flex CPU backend), as the tiny demo takes it: 4 prompts x
//! 8 generations sampled with a KV cache, Med-R1's rewards, group advantages, then the policy
//! loss with the KL penalty to a frozen reference, backward, global-norm clipping and AdamW.
//! The rollout alone is measured as well, and the step both with group-shared compute (each
//! prompt and image once per group) and with the prompt repeated per completion (as TRL).
//! `cargo bench --bench grpo_step`.

mod common;

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use grpo::host::OptimizerOptions;
use grpo::learner::{rollout, update, GrpoConfig, StepSize};
use grpo::loss::LossConfig;
use grpo::WeightedRewards;
use qwen2vl::Qwen2VL;

type A = Autodiff<Flex>;

const PROMPTS: usize = 4;
const GENERATIONS: usize = 8;
const MAX_COMPLETION: usize = 12;

fn bench(c: &mut Criterion) {
    let device = Default::default();
    A::seed(&device, 0);
    let mut policy = Some(Qwen2VL::<A>::random(&common::tiny_config(), &device));
    let reference = policy.as_ref().map(|p| p.valid()).expect("policy");
    let prompts = common::synthetic_prompts(PROMPTS);
    let tokenizer = common::byte_tokenizer();
    let rewards = WeightedRewards::med_r1(false);
    let shared = GrpoConfig {
        num_generations: GENERATIONS,
        max_completion_length: MAX_COMPLETION,
        loss: LossConfig::default(),
        eos_token_ids: vec![common::EOS, common::PAD],
        pad_token_id: common::PAD,
        ..Default::default()
    };
    let unshared = GrpoConfig {
        share_prompt: false,
        ..shared.clone()
    };
    let mut optim = OptimizerOptions::default().adamw().init();
    let mut seed = 0u64;
    let mut group = c.benchmark_group("grpo");
    // A step takes about a second on two cores: ten samples keep `cargo bench` to minutes.
    group.sample_size(10);
    group.throughput(Throughput::Elements((PROMPTS * GENERATIONS) as u64));
    group.bench_function("rollout 4x8", |b| {
        let model = policy.as_ref().expect("policy").valid();
        b.iter(|| {
            seed += 1;
            rollout(
                &model, &prompts, &tokenizer, &rewards, &shared, seed, &device,
            )
            .expect("rollout")
        })
    });
    for (name, cfg) in [
        ("step 4x8 (rollout + update)", &shared),
        (
            "step 4x8 unshared (prompt repeated per completion)",
            &unshared,
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                seed += 1;
                let model = policy.take().expect("policy");
                let roll = rollout(
                    &model.valid(),
                    &prompts,
                    &tokenizer,
                    &rewards,
                    cfg,
                    seed,
                    &device,
                )
                .expect("rollout");
                let (model, metrics) = update(
                    model,
                    Some(&reference),
                    &mut optim,
                    &roll,
                    cfg,
                    StepSize {
                        learning_rate: 1e-4,
                        max_grad_norm: 1.0,
                    },
                )
                .expect("update");
                policy = Some(model);
                metrics
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
