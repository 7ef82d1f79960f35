//! Data parallelism: a step whose rollout was sharded over two devices (each shard rolled out
//! and scored there by the policy's copy) has the one-device step's gradients and metrics over
//! the same completions, on Flex (two workers on its one device) and on WGPU (two devices:
//! the default adapter and the CPU one, both llvmpipe in CI).

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use grpo::learner::{
    parallel_gradients, policy_gradients, rollout, share_step_statistics, GrpoConfig, Rollout,
    Worker,
};
use grpo::loss::LossConfig;
use grpo::{ScaleRewards, WeightedRewards};
use qwen2vl::verify::Fixture;
use qwen2vl::{load_model, Qwen2VL};

use crate::common::fixture_dir;
use crate::grpo_learns::{byte_tokenizer, Alphanumeric};
use crate::memory::{assert_same_gradients, assert_same_metrics, collect};

/// Two prompts (with images), one per device: the sharded step against the one-device step
/// over the same completions, under step-wide statistics (`scale_rewards = "batch"`) and a
/// reference on each device; the whole model trained, and LoRA adapters over a frozen base
/// (which must stay frozen on the copy).
fn sharded_step_matches<B: AutodiffBackend>(devices: [B::Device; 2]) {
    let (model, _) = load_model::<B>(&fixture_dir().join("hf_model"), &devices[0]).unwrap();
    let lora = model
        .clone()
        .with_lora(&qwen2vl::LoraConfig {
            r: 2,
            alpha: 4.0,
            ..Default::default()
        })
        .unwrap();
    sharded_step_of(model.clone(), model.valid(), &devices, 50);
    let base = lora.valid().without_adapters();
    sharded_step_of(lora, base, &devices, 10);
}

/// [`sharded_step_matches`] for `policy` and `reference`, with at least `min_grads` parameters
/// getting gradients.
fn sharded_step_of<B: AutodiffBackend>(
    policy: Qwen2VL<B>,
    reference: Qwen2VL<B::InnerBackend>,
    devices: &[B::Device; 2],
    min_grads: usize,
) {
    let copy = grpo::learner::devices::model_to(policy.clone(), &devices[1]);
    let fx = Fixture::open(&fixture_dir()).unwrap();
    let eos = fx.id_rows("single.gen.new_tokens").unwrap().remove(0)[3];
    let prompts = crate::memory::prompts(&fx);
    let reference_copy = grpo::learner::devices::model_to(reference.clone(), &devices[1]);
    let cfg = GrpoConfig {
        num_generations: 4,
        max_completion_length: 6,
        loss: LossConfig {
            beta: 0.04,
            ..Default::default()
        },
        scale_rewards: ScaleRewards::Batch,
        eos_token_ids: vec![eos],
        pad_token_id: 256,
        ..Default::default()
    };
    let rewards = WeightedRewards {
        rewards: vec![(Box::new(Alphanumeric), 1.0)],
    };
    let tok = byte_tokenizer();
    let shard = |model: &Qwen2VL<B>, i: usize, device: &B::Device| {
        rollout(
            &model.valid(),
            &prompts[i..i + 1],
            &tok,
            &rewards,
            &cfg,
            5 + i as u64,
            device,
        )
        .unwrap()
    };
    let a = shard(&policy, 0, &devices[0]);
    let b = shard(&copy, 1, &devices[1]);
    assert_eq!(b.batch.parts[0].mask.device(), devices[1]);
    let statistics = |mut r: Rollout<B::InnerBackend>| {
        share_step_statistics(std::slice::from_mut(&mut r), &cfg);
        r
    };
    let sharded = statistics(Rollout::merge(vec![a.clone(), b.clone()]));
    let single = statistics(Rollout::merge(vec![a, b.to_device(&devices[0])]));
    assert_eq!(sharded.advantages, single.advantages);

    let workers = [
        Worker {
            policy: &policy,
            reference: Some(&reference),
            device: Some(&devices[0]),
        },
        Worker {
            policy: &copy,
            reference: Some(&reference_copy),
            device: Some(&devices[1]),
        },
    ];
    let (g_par, m_par) = parallel_gradients(&workers, &sharded, &cfg, 2).unwrap();
    if devices[0] != devices[1] {
        match parallel_gradients(&workers[..1], &sharded, &cfg, 2) {
            Err(e) => assert!(e.to_string().contains("no worker"), "{e}"),
            Ok(_) => panic!("a part on a device without a worker was scored"),
        }
    }
    let (g_one, m_one) = policy_gradients(&policy, Some(&reference), &single, &cfg, 2).unwrap();
    let compared = assert_same_gradients(
        "two devices vs one",
        &collect(&policy, &g_par),
        &collect(&policy, &g_one),
    );
    assert!(
        compared > min_grads,
        "only {compared} parameters had gradients"
    );
    assert!((m_par.loss - m_one.loss).abs() < 1e-5, "loss");
    assert!((m_par.kl - m_one.kl).abs() < 1e-6, "kl");
    assert_eq!(m_par.completion_tokens, m_one.completion_tokens);
    assert_eq!(m_par.reward_mean, m_one.reward_mean);
}

#[test]
fn a_sharded_step_equals_the_one_device_step_on_flex() {
    sharded_step_matches::<burn::backend::Autodiff<crate::common::Flex>>([
        Default::default(),
        Default::default(),
    ]);
}

/// Two WGPU devices: the shard on the second is scored by the policy's copy there and its
/// gradients brought to the first; a part on a device no worker holds is refused.
#[cfg(feature = "wgpu")]
#[test]
fn a_sharded_step_equals_the_one_device_step_on_two_wgpu_devices() {
    use burn::backend::wgpu::WgpuDevice;
    type Ad = burn::backend::Autodiff<burn::backend::Wgpu>;
    let first = crate::common::wgpu_device();
    sharded_step_matches::<Ad>([first, WgpuDevice::Cpu]);
}

/// Several nodes: each holds every row's values (rewards, masks: [`Rollout::remote`] for the
/// other nodes' rows) but scores only its own. Their gradients and measured sums, added up
/// (what the nodes' all-reduce does), are the one-node step's, for every loss type, an
/// entropy bonus, and kept sampling-policy log-probs (`num_iterations` 2: the other rows'
/// placeholders must not shift this node's).
#[test]
fn node_shares_add_up_to_the_one_node_step() {
    use grpo::learner::ShareSums;
    use grpo::loss::LossType;
    type B = burn::backend::Autodiff<crate::common::Flex>;
    let device = Default::default();
    let (policy, _) = load_model::<B>(&fixture_dir().join("hf_model"), &device).unwrap();
    let reference = policy.valid();
    let fx = Fixture::open(&fixture_dir()).unwrap();
    let eos = fx.id_rows("single.gen.new_tokens").unwrap().remove(0)[3];
    let prompts = crate::memory::prompts(&fx);
    let rewards = WeightedRewards {
        rewards: vec![(Box::new(Alphanumeric), 1.0)],
    };
    let tok = byte_tokenizer();
    let cases = [
        (LossType::Grpo, 0.0, 1),
        (LossType::Bnpo, 0.0, 2),
        (LossType::DrGrpo, 0.01, 1),
        (LossType::Dapo, 0.0, 1),
    ];
    for (loss_type, entropy_coef, num_iterations) in cases {
        let what = format!("{loss_type:?}, entropy {entropy_coef}, iterations {num_iterations}");
        let cfg = GrpoConfig {
            num_generations: 4,
            max_completion_length: 6,
            num_iterations,
            loss: LossConfig {
                beta: 0.04,
                loss_type,
                entropy_coef,
                ..Default::default()
            },
            scale_rewards: ScaleRewards::Batch,
            eos_token_ids: vec![eos],
            pad_token_id: 256,
            ..Default::default()
        };
        let shard = |i: usize| {
            rollout(
                &policy.valid(),
                &prompts[i..i + 1],
                &tok,
                &rewards,
                &cfg,
                5 + i as u64,
                &device,
            )
            .unwrap()
        };
        let (a, b) = (shard(0), shard(1));
        let old = (num_iterations > 1).then_some(&device);
        let statistics = |rolls: Vec<Rollout<crate::common::Flex>>| {
            let mut r = Rollout::merge(rolls);
            share_step_statistics(std::slice::from_mut(&mut r), &cfg);
            r
        };
        let whole = statistics(vec![a.clone(), b.clone()]);
        let nodes = [
            statistics(vec![a.clone(), Rollout::remote(b.host(), old)]),
            statistics(vec![Rollout::remote(a.host(), old), b]),
        ];
        assert!(!whole.is_partial() && nodes.iter().all(Rollout::is_partial));
        let (g_one, m_one) = policy_gradients(&policy, Some(&reference), &whole, &cfg, 2).unwrap();
        let mut summed: Option<Vec<(String, Option<Vec<f32>>)>> = None;
        let mut sums = vec![0.0f32; ShareSums::LEN];
        let mut metrics = None;
        for node in &nodes {
            assert_eq!(node.advantages, whole.advantages, "{what}: advantages");
            let (g, m) = policy_gradients(&policy, Some(&reference), node, &cfg, 2).unwrap();
            let share = m.share.expect("a node's share is measured");
            for (s, v) in sums.iter_mut().zip(share.to_vec()) {
                *s += v;
            }
            let g = collect(&policy, &g);
            summed = Some(match summed {
                None => g,
                Some(acc) => acc
                    .into_iter()
                    .zip(g)
                    .map(|((shape, x), (_, y))| {
                        let added = match (x, y) {
                            (Some(x), Some(y)) => {
                                Some(x.iter().zip(&y).map(|(u, v)| u + v).collect())
                            }
                            (x, y) => x.or(y),
                        };
                        (shape, added)
                    })
                    .collect(),
            });
            metrics = Some(m);
        }
        let compared = assert_same_gradients(
            &what,
            &summed.expect("two nodes"),
            &collect(&policy, &g_one),
        );
        assert!(compared > 50, "{what}: only {compared} gradients");
        let mut m = metrics.expect("two nodes");
        m.set_shares(ShareSums::from_slice(&sums), whole.completions.len());
        assert_same_metrics(&what, &m, &m_one, 1e-6);
        assert_eq!(m.reward_std, m_one.reward_std, "{what}");
        assert_eq!(m.zero_std_groups, m_one.zero_std_groups, "{what}");
    }
}
