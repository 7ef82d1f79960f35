//! Group-shared compute is exact: a prompt (and its images) run once for its group gives the
//! same tokens, log-probs, entropies and parameter gradients as the prompt repeated per row.

use crate::common::{fixture_dir, Flex};
use burn::backend::Autodiff;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use qwen2vl::generation::{
    completion_scores_bucketed, generate, generate_grouped, grouped_completion_scores,
    GenerationConfig, Sampling, ShapeBuckets,
};
use qwen2vl::processor::ProcessedImage;
use qwen2vl::verify::Fixture;
use qwen2vl::{load_model, Images, Qwen2VL, TokenBatch};

const PAD: u32 = 256;

/// The prompts and images of fixture cases, once each and repeated `group` times per case.
struct Cases<B: Backend> {
    prompts: Vec<Vec<u32>>,
    images: Images<B>,
    repeated_prompts: Vec<Vec<u32>>,
    repeated_images: Images<B>,
}

/// A fixture case's images as the processor hands them over, one per grid.
pub(crate) fn processed_images(fx: &Fixture, name: &str) -> Vec<ProcessedImage> {
    let pixels = fx.get(&format!("{name}.pixel_values")).unwrap().as_f32();
    let mut rows = pixels.chunks_exact(1176);
    fx.grids(name)
        .unwrap()
        .into_iter()
        .map(|grid| {
            let n = grid.iter().product::<usize>();
            let values: Vec<f32> = rows.by_ref().take(n).flatten().copied().collect();
            ProcessedImage::new(values, grid, 1176).unwrap()
        })
        .collect()
}

fn cases<B: Backend>(fx: &Fixture, names: &[&str], group: usize, device: &B::Device) -> Cases<B> {
    let prompts: Vec<Vec<u32>> = names
        .iter()
        .map(|name| fx.id_rows(&format!("{name}.input_ids")).unwrap().remove(0))
        .collect();
    let per_case: Vec<Vec<ProcessedImage>> = names
        .iter()
        .map(|name| processed_images(fx, name))
        .collect();
    let once = per_case.iter().flatten();
    let repeated = per_case
        .iter()
        .flat_map(|c| std::iter::repeat_n(c, group))
        .flatten();
    Cases {
        repeated_prompts: prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), group))
            .collect(),
        prompts,
        images: Images::from_processed(once, device).unwrap().unwrap(),
        repeated_images: Images::from_processed(repeated, device).unwrap().unwrap(),
    }
}

fn flat<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

#[test]
fn grouped_generation_equals_repeated_prompts() {
    grouped_generation_matches::<Flex>(Default::default());
}

/// The same on WGPU (software Vulkan in CI): the device-side token choice (argmax, and the
/// sort and cumulative sum of top-k/top-p sampling) on a CubeCL backend. Beyond agreeing with
/// its own repeated path, WGPU draws the very tokens Flex draws from the same seed.
#[cfg(feature = "wgpu")]
#[test]
fn grouped_generation_equals_repeated_prompts_on_wgpu() {
    let on_wgpu = grouped_generation_matches::<burn::backend::Wgpu>(crate::common::wgpu_device());
    let on_flex = grouped_generation_matches::<Flex>(Default::default());
    assert_eq!(on_wgpu, on_flex, "greedy and sampled tokens, WGPU vs Flex");
}

/// Greedy (with per-row EOS) and top-k/top-p sampled generation of two fixture prompts, each
/// once for a group of 3 and each repeated 3 times: identical tokens, log-probs within 1e-5.
/// Returns the tokens of both configurations.
fn grouped_generation_matches<B: Backend>(device: B::Device) -> Vec<Vec<Vec<u32>>> {
    let (model, _) = load_model::<B>(&fixture_dir().join("hf_model"), &device).unwrap();
    let fx = Fixture::open(&fixture_dir()).unwrap();
    let group = 3;
    let c = cases::<B>(&fx, &["single", "multi"], group, &device);
    let mut drawn = Vec::new();
    // The single case's fourth greedy token ends its rows early (per-row EOS).
    let eos = fx.id_rows("single.gen.new_tokens").unwrap().remove(0)[3];
    let greedy = GenerationConfig {
        max_new_tokens: 8,
        sampling: Sampling::GREEDY,
        eos_token_ids: vec![eos],
        pad_token_id: PAD,
        seed: 0,
        buckets: ShapeBuckets::EXACT,
    };
    let sampled = GenerationConfig {
        sampling: Sampling {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.95,
            min_p: 0.0,
            repetition_penalty: 1.0,
        },
        eos_token_ids: vec![],
        seed: 11,
        ..greedy.clone()
    };
    for cfg in [greedy, sampled] {
        let once = TokenBatch::left_padded(&c.prompts, PAD);
        let shared = generate_grouped(&model, &once, Some(&c.images), group, &cfg, false).unwrap();
        let repeated = TokenBatch::left_padded(&c.repeated_prompts, PAD);
        let plain = generate(&model, &repeated, Some(&c.repeated_images), &cfg, false).unwrap();
        assert_eq!(shared.tokens, plain.tokens, "{:?}", cfg.sampling);
        assert_eq!(shared.finished, plain.finished);
        for (a, b) in shared
            .logprobs
            .iter()
            .flatten()
            .zip(plain.logprobs.iter().flatten())
        {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        if !cfg.sampling.is_greedy() {
            // Sampling draws differ between the rows of a group.
            assert!(shared.tokens[0] != shared.tokens[1] || shared.tokens[1] != shared.tokens[2]);
        } else {
            assert!(shared.finished[0] && !shared.finished[group]);
        }
        drawn.push(shared.tokens);
    }
    drawn
}

/// Every parameter's gradient, in the model's visiting order.
struct Grads<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    out: Vec<(String, Option<Vec<f32>>)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let g = param
            .grad(self.grads)
            .map(|g| g.into_data().convert::<f32>().to_vec::<f32>().unwrap());
        self.out.push((format!("{:?}", param.shape()), g));
    }
}

fn gradients<B: AutodiffBackend>(
    model: &Qwen2VL<B>,
    loss: Tensor<B, 1>,
) -> Vec<(String, Option<Vec<f32>>)> {
    let grads = loss.backward();
    let mut v = Grads::<B> {
        grads: &grads,
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}

/// Log-probs, entropies and the gradient of every parameter (vision tower included) agree
/// between the shared and the repeated scoring, within 1e-5, for prompts of different lengths
/// and image counts in one batch, completions of different lengths, and shape buckets.
#[test]
fn grouped_scoring_equals_repeated_prompts_with_gradients() {
    grouped_scoring_matches::<Autodiff<Flex>>(Default::default());
}

/// The same on WGPU (software Vulkan in CI): the grouped path's kernels (row selection of the
/// prefix, concatenated keys, the additive mask) on a CubeCL backend.
#[cfg(feature = "wgpu")]
#[test]
fn grouped_scoring_equals_repeated_prompts_with_gradients_on_wgpu() {
    grouped_scoring_matches::<Autodiff<burn::backend::Wgpu>>(crate::common::wgpu_device());
}

fn grouped_scoring_matches<Ad: AutodiffBackend>(device: Ad::Device) {
    let (model, _) = load_model::<Ad>(&fixture_dir().join("hf_model"), &device).unwrap();
    let fx = Fixture::open(&fixture_dir()).unwrap();
    let group = 3;
    let c = cases::<Ad>(&fx, &["single", "multi"], group, &device);
    let single = fx.id_rows("single.gen.new_tokens").unwrap().remove(0);
    let multi = fx.id_rows("multi.gen.new_tokens").unwrap().remove(0);
    let completions = vec![
        single.clone(),
        single[..5].to_vec(),
        vec![PAD],
        multi[..2].to_vec(),
        multi.clone(),
        single[..7].to_vec(),
    ];
    let width = completions.iter().map(Vec::len).max().unwrap();
    // Fixed weights on the real tokens, zero on the padding past each completion.
    let weights: Vec<f32> = completions
        .iter()
        .enumerate()
        .flat_map(|(r, comp)| {
            (0..width).map(move |t| {
                if t < comp.len() {
                    ((r * 7 + t * 3) % 5) as f32 - 2.0
                } else {
                    0.0
                }
            })
        })
        .collect();
    let w = || {
        Tensor::<Ad, 2>::from_data(
            TensorData::new(weights.clone(), [completions.len(), width]),
            &device,
        )
    };
    for buckets in [
        ShapeBuckets::EXACT,
        ShapeBuckets {
            multiple: 16,
            max_completion: 12,
        },
    ] {
        let (lp_s, ent_s) = grouped_completion_scores(
            &model,
            &c.prompts,
            Some(&c.images),
            &completions,
            group,
            PAD,
            true,
            buckets,
        )
        .unwrap();
        let (lp_r, ent_r) = completion_scores_bucketed(
            &model,
            &c.repeated_prompts,
            &completions,
            Some(&c.repeated_images),
            PAD,
            true,
            buckets,
        )
        .unwrap();
        assert_eq!(lp_s.dims(), [completions.len(), width]);
        assert_eq!(lp_r.dims(), lp_s.dims());
        let valid = |v: Vec<f32>| -> Vec<f32> {
            v.chunks(width)
                .zip(&completions)
                .flat_map(|(row, comp)| row[..comp.len()].to_vec())
                .collect()
        };
        let pairs = [
            (flat(lp_s.clone()), flat(lp_r.clone())),
            (flat(ent_s.unwrap()), flat(ent_r.unwrap())),
        ];
        for (a, b) in pairs {
            let (a, b) = (valid(a), valid(b));
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "{buckets:?}: {x} vs {y}");
            }
        }
        let gs = gradients(&model, (lp_s * w()).sum());
        let gr = gradients(&model, (lp_r * w()).sum());
        assert_eq!(gs.len(), gr.len());
        let mut compared = 0;
        for ((shape, a), (_, b)) in gs.iter().zip(&gr) {
            let (Some(a), Some(b)) = (a, b) else {
                assert_eq!(a.is_some(), b.is_some(), "{shape}");
                continue;
            };
            let scale = b.iter().fold(1.0f32, |m, x| m.max(x.abs()));
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst <= 1e-5 * scale,
                "{buckets:?}: gradient of a {shape} parameter differs by {worst} (scale {scale})"
            );
            compared += 1;
        }
        assert!(compared > 50, "only {compared} parameters had gradients");
    }
}

/// The learner with `share_prompt` on and off: the same rollout (tokens, rewards, the sampling
/// policy's log-probs), the same loss and metrics, the same gradients, on image prompts of
/// different lengths with per-row EOS and shape buckets.
#[test]
fn shared_learner_step_equals_the_unshared_one() {
    use crate::grpo_learns::{byte_tokenizer, record, Alphanumeric};
    use burn::module::AutodiffModule;
    use burn::tensor::ElementConversion;
    use grpo::learner::{policy_loss, rollout, GrpoConfig, PromptInput};
    use grpo::loss::LossConfig;
    use grpo::WeightedRewards;
    type Ad = Autodiff<Flex>;
    let device = Default::default();
    let (policy, _) = load_model::<Ad>(&fixture_dir().join("hf_model"), &device).unwrap();
    let reference = policy.valid();
    let fx = Fixture::open(&fixture_dir()).unwrap();
    let prompts: Vec<PromptInput> = ["single", "multi"]
        .iter()
        .map(|name| PromptInput {
            text: String::new(),
            ids: fx.id_rows(&format!("{name}.input_ids")).unwrap().remove(0),
            images: processed_images(&fx, name),
            record: record(),
        })
        .collect();
    let tokenizer = byte_tokenizer();
    let rewards = WeightedRewards {
        rewards: vec![(Box::new(Alphanumeric), 1.0)],
    };
    let eos = fx.id_rows("single.gen.new_tokens").unwrap().remove(0)[3];
    let run = |share_prompt: bool, bucket: usize| {
        let cfg = GrpoConfig {
            num_generations: 4,
            max_completion_length: 6,
            loss: LossConfig {
                beta: 0.04,
                ..Default::default()
            },
            num_iterations: 2,
            eos_token_ids: vec![eos],
            pad_token_id: PAD,
            shape_bucket: bucket,
            share_prompt,
            ..Default::default()
        };
        let roll = rollout(
            &policy.valid(),
            &prompts,
            &tokenizer,
            &rewards,
            &cfg,
            5,
            &device,
        )
        .unwrap();
        let (loss, metrics) = policy_loss(&policy, Some(&reference), &roll, &cfg).unwrap();
        let value = loss.clone().into_scalar().elem::<f32>();
        (roll, value, metrics, gradients(&policy, loss))
    };
    for bucket in [1, 16] {
        let (rs, ls, ms, gs) = run(true, bucket);
        let (ru, lu, mu, gu) = run(false, bucket);
        assert_eq!(rs.completions, ru.completions);
        assert!(
            rs.completions.iter().any(|c| c.len() < 6),
            "the test needs a completion that stops early"
        );
        assert_eq!(rs.rewards, ru.rewards);
        // Slots past a completion's end are masked everywhere: only its tokens are compared.
        let (os, ou) = (
            flat(rs.old_logprobs.clone().unwrap()),
            flat(ru.old_logprobs.clone().unwrap()),
        );
        assert_eq!(os.len(), ou.len());
        let width = os.len() / rs.completions.len();
        for (r, c) in rs.completions.iter().enumerate() {
            for t in r * width..r * width + c.len() {
                assert!(
                    (os[t] - ou[t]).abs() < 1e-5,
                    "old log-prob {} vs {}",
                    os[t],
                    ou[t]
                );
            }
        }
        assert!((ls - lu).abs() < 1e-5, "loss {ls} vs {lu}");
        assert!((ms.kl - mu.kl).abs() < 1e-6, "kl {} vs {}", ms.kl, mu.kl);
        assert!((ms.entropy - mu.entropy).abs() < 1e-5);
        assert_eq!(ms.clip_ratio, mu.clip_ratio);
        for ((shape, a), (_, b)) in gs.iter().zip(&gu) {
            let (Some(a), Some(b)) = (a, b) else {
                assert_eq!(a.is_some(), b.is_some(), "{shape}");
                continue;
            };
            let scale = b.iter().fold(1.0f32, |m, x| m.max(x.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-5 * scale,
                    "gradient of a {shape} parameter: {x} vs {y}"
                );
            }
        }
    }
}
