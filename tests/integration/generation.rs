//! Generation beyond the fixture's single-row greedy runs: batched rows agree with unbatched,
//! per-row EOS stops, seeded sampling reproduces, and scoring is differentiable.

use crate::common::{fixture_dir, Flex};
use burn::backend::Autodiff;
use burn::tensor::{Tensor, TensorData};
use qwen2vl::generation::{
    completion_logprobs, completion_scores, completion_scores_bucketed, generate, GenerationConfig,
    Sampling, ShapeBuckets,
};
use qwen2vl::verify::Fixture;
use qwen2vl::{load_model, Images, Qwen2VL, TokenBatch};

fn case<B: burn::tensor::backend::Backend>(
    fx: &Fixture,
    names: &[&str],
    device: &B::Device,
) -> (Vec<Vec<u32>>, Images<B>) {
    let mut rows = Vec::new();
    let mut pixels = Vec::new();
    let mut grids = Vec::new();
    for name in names {
        rows.push(fx.id_rows(&format!("{name}.input_ids")).unwrap().remove(0));
        pixels.extend(fx.get(&format!("{name}.pixel_values")).unwrap().as_f32());
        grids.extend(fx.grids(name).unwrap());
    }
    let n = pixels.len() / 1176;
    let images = Images {
        pixel_values: Tensor::from_data(TensorData::new(pixels, [n, 1176]), device),
        grids,
    };
    (rows, images)
}

fn greedy(max_new_tokens: usize, eos: Vec<u32>) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        sampling: Sampling::GREEDY,
        eos_token_ids: eos,
        pad_token_id: 256,
        seed: 0,
        buckets: ShapeBuckets::EXACT,
    }
}

fn model() -> (Qwen2VL<Flex>, Fixture) {
    let (m, _) = load_model::<Flex>(&fixture_dir().join("hf_model"), &Default::default()).unwrap();
    (m, Fixture::open(&fixture_dir()).unwrap())
}

#[test]
fn batched_left_padded_generation_equals_one_row_at_a_time() {
    let (model, fx) = model();
    let device = Default::default();
    let (rows, images) = case::<Flex>(&fx, &["single", "multi"], &device);
    let batch = TokenBatch::left_padded(&rows, 256);
    let both = generate(&model, &batch, Some(&images), &greedy(8, vec![]), false).unwrap();
    for (r, name) in ["single", "multi"].iter().enumerate() {
        let want = fx
            .id_rows(&format!("{name}.gen.new_tokens"))
            .unwrap()
            .remove(0);
        assert_eq!(both.tokens[r], want, "{name}");
        let lp = fx
            .get(&format!("{name}.gen.step_logprobs_kvcache"))
            .unwrap()
            .as_f32();
        for (a, b) in both.logprobs[r].iter().zip(&lp) {
            assert!((a - b).abs() < 1e-4, "{name}: {a} vs {b}");
        }
        assert!(!both.finished[r]);
    }
}

#[test]
fn each_row_stops_at_its_own_eos() {
    let (model, fx) = model();
    let device = Default::default();
    let (rows, images) = case::<Flex>(&fx, &["single", "multi"], &device);
    let single = fx.id_rows("single.gen.new_tokens").unwrap().remove(0);
    // The single case's fourth greedy token ends that row; the multi row never emits it.
    let eos = single[3];
    let multi = fx.id_rows("multi.gen.new_tokens").unwrap().remove(0);
    assert!(!multi.contains(&eos));
    let g = generate(
        &model,
        &TokenBatch::left_padded(&rows, 256),
        Some(&images),
        &greedy(8, vec![eos]),
        false,
    )
    .unwrap();
    assert_eq!(g.tokens[0], single[..4].to_vec());
    assert!(g.finished[0]);
    assert_eq!(g.tokens[1], multi);
    assert!(!g.finished[1]);
}

#[test]
fn seeded_sampling_reproduces() {
    let (model, fx) = model();
    let device = Default::default();
    let (rows, images) = case::<Flex>(&fx, &["single"], &device);
    let cfg = |seed| GenerationConfig {
        max_new_tokens: 12,
        sampling: Sampling {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.95,
            min_p: 0.0,
            repetition_penalty: 1.0,
        },
        eos_token_ids: vec![],
        pad_token_id: 256,
        seed,
        buckets: ShapeBuckets::EXACT,
    };
    let batch = TokenBatch::single(rows[0].clone());
    let a = generate(&model, &batch, Some(&images), &cfg(5), false).unwrap();
    let b = generate(&model, &batch, Some(&images), &cfg(5), false).unwrap();
    let c = generate(&model, &batch, Some(&images), &cfg(6), false).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.tokens, c.tokens);
}

#[test]
fn scoring_is_differentiable_and_matches_inference() {
    type Ad = Autodiff<Flex>;
    let device = Default::default();
    let (model, _) = load_model::<Ad>(&fixture_dir().join("hf_model"), &device).unwrap();
    let fx = Fixture::open(&fixture_dir()).unwrap();
    let (rows, images) = case::<Ad>(&fx, &["single"], &device);
    let completion = fx.id_rows("single.gen.new_tokens").unwrap().remove(0);
    let lp = completion_logprobs(&model, &rows, &[completion], Some(&images), 256).unwrap();
    let want = fx.get("single.gen.token_logprobs").unwrap().as_f32();
    let got: Vec<f32> = lp.clone().into_data().to_vec().unwrap();
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    let grads = lp.sum().backward();
    let g = model
        .visual
        .patch_embed
        .weight
        .grad(&grads)
        .expect("the vision tower gets a gradient");
    let norm: f32 = g.abs().sum().into_scalar();
    assert!(norm > 0.0);
}

#[test]
fn empty_prompts_are_refused() {
    let (model, _) = model();
    let err = generate(
        &model,
        &TokenBatch::single(vec![]),
        None,
        &greedy(4, vec![]),
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("at least one token"), "{err}");
    let padded = TokenBatch::left_padded(&[vec![1, 2], vec![]], 256);
    assert!(generate(&model, &padded, None, &greedy(4, vec![]), false).is_err());
}

/// Padding prompts and completions to shape buckets (masked) changes no result: the same
/// greedy tokens, the same log-probs and entropies up to float rounding, the exact width.
#[test]
fn shape_buckets_change_no_result() {
    let (model, fx) = model();
    let device = Default::default();
    let (rows, images) = case::<Flex>(&fx, &["single", "multi"], &device);
    let batch = TokenBatch::left_padded(&rows, 256);
    let exact = generate(&model, &batch, Some(&images), &greedy(8, vec![]), false).unwrap();
    let bucketed_cfg = GenerationConfig {
        buckets: ShapeBuckets {
            multiple: 64,
            max_completion: 0,
        },
        ..greedy(8, vec![])
    };
    assert!(
        !batch.len.is_multiple_of(64),
        "the test needs a prompt that is not already a multiple"
    );
    let bucketed = generate(&model, &batch, Some(&images), &bucketed_cfg, false).unwrap();
    assert_eq!(exact.tokens, bucketed.tokens);
    for (a, b) in exact
        .logprobs
        .iter()
        .flatten()
        .zip(bucketed.logprobs.iter().flatten())
    {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }

    let completions = vec![exact.tokens[0].clone(), exact.tokens[1][..5].to_vec()];
    let (lp, ent) =
        completion_scores(&model, &rows, &completions, Some(&images), 256, true).unwrap();
    let buckets = ShapeBuckets {
        multiple: 64,
        max_completion: 0,
    };
    let (lp64, ent64) = completion_scores_bucketed(
        &model,
        &rows,
        &completions,
        Some(&images),
        256,
        true,
        buckets,
    )
    .unwrap();
    assert_eq!(lp.dims(), [2, 8]);
    assert_eq!(lp64.dims(), [2, 8]);
    let flat = |t: Tensor<Flex, 2>| -> Vec<f32> { t.into_data().to_vec().unwrap() };
    for (a, b) in flat(lp).iter().zip(&flat(lp64)) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    for (a, b) in flat(ent.unwrap()).iter().zip(&flat(ent64.unwrap())) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

/// The repetition penalty in greedy generation, checked step by step against the raw logits:
/// each chosen token is the argmax of the logits with every token the row holds (its prompt's,
/// padding aside, and those it generated) penalized as transformers does, placeholders
/// banned; in a left-padded batch and with groups of samples per prompt alike.
#[test]
fn the_repetition_penalty_covers_the_prompt_and_what_was_generated() {
    use qwen2vl::generation::generate_grouped;
    let (model, fx) = model();
    let device = Default::default();
    let (rows, images) = case::<Flex>(&fx, &["single", "multi"], &device);
    let penalty = 4.0;
    let cfg = GenerationConfig {
        sampling: Sampling {
            repetition_penalty: penalty,
            ..Sampling::GREEDY
        },
        ..greedy(10, vec![])
    };
    let batch = TokenBatch::left_padded(&rows, 256);
    let plain = generate(&model, &batch, Some(&images), &greedy(10, vec![]), false).unwrap();
    let g = generate_grouped(&model, &batch, Some(&images), 2, &cfg, true).unwrap();
    let banned = [model.config.image_token_id, model.config.video_token_id];
    for (r, tokens) in g.tokens.iter().enumerate() {
        let prompt = &rows[r / 2];
        let mut held: std::collections::BTreeSet<u32> = prompt.iter().copied().collect();
        let step_logits = &g.step_logits.as_ref().unwrap()[r];
        for (step, &tok) in tokens.iter().enumerate() {
            let scores: Vec<f32> = step_logits[step]
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    if banned.contains(&(i as u32)) {
                        f32::NEG_INFINITY
                    } else if held.contains(&(i as u32)) {
                        if v < 0.0 {
                            v * penalty
                        } else {
                            v / penalty
                        }
                    } else {
                        v
                    }
                })
                .collect();
            let best = scores
                .iter()
                .enumerate()
                .fold(0, |b, (i, &v)| if v > scores[b] { i } else { b });
            assert_eq!(tok as usize, best, "row {r} step {step}");
            held.insert(tok);
        }
        assert_eq!(tokens.len(), 10);
    }
    // Both samples of a prompt agree (greedy), and the penalty changed something.
    assert_eq!(g.tokens[0], g.tokens[1]);
    assert!(
        g.tokens[0] != plain.tokens[0] || g.tokens[2] != plain.tokens[1],
        "the penalty changed nothing"
    );
}

/// `pick` over `logits` (`[rows, vocab]`) on `B`, three placeholders banned, from a fixed seed.
#[cfg(feature = "wgpu")]
fn picks<B: burn::tensor::backend::Backend>(
    logits: &[f32],
    rows: usize,
    sampling: &Sampling,
    device: &B::Device,
) -> qwen2vl::generation::Picked {
    let vocab = logits.len() / rows;
    let logits = Tensor::<B, 2>::from_data(TensorData::new(logits.to_vec(), [rows, vocab]), device);
    let mut rng = qwen2vl::generation::Rng::new(17);
    qwen2vl::generation::pick(logits, &BANNED, None, sampling, &vec![true; rows], &mut rng)
}

#[cfg(feature = "wgpu")]
const BANNED: [u32; 3] = [7, 300, 4095];

/// Sampling from the whole distribution (`debug-wgpu.toml`: top-k 0, the inverse CDF searched
/// block by block) draws on WGPU what it draws on Flex from the same generator, never a banned
/// token, with the same log-probs: 4,096 tokens (16 blocks of 256), untempered and tempered.
#[cfg(feature = "wgpu")]
#[test]
fn whole_distribution_sampling_on_wgpu_draws_what_flex_draws() {
    let (rows, vocab) = (256, 4096);
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|i| (i as f32 * 0.37).sin() * 3.0)
        .collect();
    let wgpu = crate::common::wgpu_device();
    for sampling in [Sampling::full(1.0), Sampling::full(0.7)] {
        let on_flex = picks::<Flex>(&logits, rows, &sampling, &Default::default());
        let on_wgpu = picks::<burn::backend::Wgpu>(&logits, rows, &sampling, &wgpu);
        assert!(on_wgpu.tokens.iter().all(|t| !BANNED.contains(t)));
        // Float rounding may move a draw that falls on a boundary; nothing more.
        let differ = on_flex
            .tokens
            .iter()
            .zip(&on_wgpu.tokens)
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            differ <= rows / 100,
            "{sampling:?}: {differ} of {rows} draws differ"
        );
        for ((a, b), (la, lb)) in on_flex
            .tokens
            .iter()
            .zip(&on_wgpu.tokens)
            .zip(on_flex.logprobs.iter().zip(&on_wgpu.logprobs))
        {
            if a == b {
                assert!(
                    (la - lb).abs() < 1e-4,
                    "{sampling:?}: token {a}: {la} vs {lb}"
                );
            }
        }
    }
}
