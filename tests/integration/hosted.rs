//! GRPO under burn-train: metrics reach `metrics.jsonl`, checkpoints are complete and
//! atomic, and a run stopped at step k then resumed ends exactly where an uninterrupted run
//! does (weights and every logged number).

use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use grpo::eval::EvalConfig;
use grpo::host::{complete_checkpoints, launch, HeldOut, HostCtx, HostOptions, OptimizerOptions};
use grpo::learner::{policy_gradients, rollout, share_step_statistics, GrpoConfig};
use grpo::loss::LossConfig;
use grpo::schedule::LrSchedule;
use grpo::WeightedRewards;
use qwen2vl::generation::{Sampling, ShapeBuckets};

use crate::grpo_learns::{byte_tokenizer, text_prompt, tiny_random_model, Ad, Alphanumeric};

type Inner = <Ad as burn::tensor::backend::AutodiffBackend>::InnerBackend;

fn run(dir: &Path, total_steps: usize, resume: bool) -> qwen2vl::Qwen2VL<Inner> {
    run_with(dir, total_steps, resume, None)
}

/// The policy a run starts from: the tiny random Qwen2-VL, or the Qwen2.5-VL fixture's model.
fn initial_model(qwen25: bool) -> qwen2vl::Qwen2VL<Ad> {
    let device = Default::default();
    if qwen25 {
        let dir = crate::common::qwen25vl_fixture_dir().join("hf_model");
        qwen2vl::load_model::<Ad>(&dir, &device).unwrap().0
    } else {
        tiny_random_model(11, &device)
    }
}

/// [`run`], with LoRA adapters on the policy when `lora` is given (the reference then the
/// bypassed base, as `medr1 train` does).
fn run_with(
    dir: &Path,
    total_steps: usize,
    resume: bool,
    lora: Option<&qwen2vl::LoraConfig>,
) -> qwen2vl::Qwen2VL<Inner> {
    run_model(dir, total_steps, resume, lora, false)
}

/// [`run_with`] from [`initial_model`].
fn run_model(
    dir: &Path,
    total_steps: usize,
    resume: bool,
    lora: Option<&qwen2vl::LoraConfig>,
    qwen25: bool,
) -> qwen2vl::Qwen2VL<Inner> {
    run_configured(dir, total_steps, resume, lora, qwen25, |_| {})
}

/// [`run_model`] with the learner's settings changed by `adjust`.
fn run_configured(
    dir: &Path,
    total_steps: usize,
    resume: bool,
    lora: Option<&qwen2vl::LoraConfig>,
    qwen25: bool,
    adjust: impl Fn(&mut GrpoConfig),
) -> qwen2vl::Qwen2VL<Inner> {
    run_evaluated(dir, total_steps, resume, lora, qwen25, 0, 1, adjust).unwrap()
}

/// The first three run prompts: the held-out questions of runs that evaluate.
fn held_out_prompts() -> Vec<grpo::learner::PromptInput> {
    run_prompts(&byte_tokenizer())[..3].to_vec()
}

/// The held-out evaluation settings of the runs.
fn held_out_config() -> EvalConfig {
    EvalConfig {
        batch_size: 2,
        max_new_tokens: 4,
        eos_token_ids: vec![258],
        pad_token_id: 256,
        buckets: ShapeBuckets::EXACT,
        scoring: Default::default(),
    }
}

/// [`run_configured`], evaluating [`held_out_prompts`] every `eval_every` steps (0: never),
/// with `workers` data-parallel workers on the Flex device, one prompt each per micro-batch.
#[allow(clippy::too_many_arguments)]
fn run_evaluated(
    dir: &Path,
    total_steps: usize,
    resume: bool,
    lora: Option<&qwen2vl::LoraConfig>,
    qwen25: bool,
    eval_every: usize,
    workers: usize,
    adjust: impl Fn(&mut GrpoConfig),
) -> Result<qwen2vl::Qwen2VL<Inner>, grpo::host::HostError> {
    let device = Default::default();
    let mut policy = initial_model(qwen25);
    if let Some(l) = lora {
        policy = crate::grpo_learns::drawing(Some(12), || policy.with_lora(l).unwrap());
    }
    let reference = policy.valid().without_adapters();
    let tokenizer = byte_tokenizer();
    let prompts = run_prompts(&tokenizer);
    let mut cfg = run_config();
    adjust(&mut cfg);
    // With dynamic sampling, one prompt whose groups never spread, to be replaced.
    let rewards = if cfg.filter_groups {
        WeightedRewards {
            rewards: vec![(Box::new(FlatOnCount), 1.0)],
        }
    } else {
        WeightedRewards {
            rewards: vec![(Box::new(Alphanumeric), 1.0)],
        }
    };
    let ctx = HostCtx::new(prompts, tokenizer, rewards, cfg, Some(reference), device, 2)
        .with_devices(vec![Default::default(); workers]);
    let opts = HostOptions {
        dir: dir.join("grpo"),
        metrics_jsonl: dir.join("metrics.jsonl"),
        log_file: dir.join("train.log"),
        total_steps,
        prompts_per_step: workers,
        checkpoint_every: 2,
        keep_checkpoints: 2,
        eval_every,
        seed: 5,
        schedule: LrSchedule::constant(3e-3),
        optimizer: OptimizerOptions::default(),
        max_grad_norm: 1.0,
        resume,
        dashboard: false,
        interrupter: None,
        max_bad_steps: 3,
        tensorboard: Some(dir.join("tensorboard")),
        completions: Some(grpo::host::CompletionLog {
            path: dir.join("completions.jsonl"),
            every: 1,
        }),
    };
    let held_out = if eval_every > 0 {
        HeldOut::from(held_out_prompts())
    } else {
        HeldOut::none()
    };
    launch(policy, ctx, held_out, held_out_config(), &opts).map(|(model, _)| model)
}

/// [`Alphanumeric`], but the same reward for every completion of the "Count." prompt.
struct FlatOnCount;

impl grpo::Reward for FlatOnCount {
    fn name(&self) -> &str {
        "flat_on_count"
    }
    fn score(&self, prompt: &str, completion: &str, record: &medvqa::VqaRecord) -> f32 {
        if prompt.contains("Count.") {
            0.25
        } else {
            Alphanumeric.score(prompt, completion, record)
        }
    }
}

/// The runs' learner settings.
fn run_config() -> GrpoConfig {
    GrpoConfig {
        num_generations: 4,
        sampling: Sampling::full(1.0),
        max_completion_length: 6,
        loss: LossConfig {
            beta: 0.04,
            ..Default::default()
        },
        eos_token_ids: vec![258],
        pad_token_id: 256,
        num_iterations: 2,
        ..Default::default()
    }
}

/// The runs' four text prompts.
fn run_prompts(tokenizer: &qwen2vl::processor::TextTokenizer) -> Vec<grpo::learner::PromptInput> {
    ["Say a word.", "Name a thing.", "Write code.", "Count."]
        .iter()
        .map(|q| text_prompt(tokenizer, q))
        .collect()
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("medr1-hosted-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn flat<B: Backend>(m: &qwen2vl::Qwen2VL<B>) -> Vec<f32> {
    qwen2vl::checkpoint::named_tensors(m)
        .into_iter()
        .flat_map(|t| t.values)
        .collect()
}

/// The run resumed in `parts` logged the four steps of the uninterrupted run in `whole` alike
/// (step, loss, reward, KL, gradient norm) and ended with the same weights (`b` and `a`).
fn assert_resumed_as_whole<B: Backend>(
    whole: &Path,
    parts: &Path,
    a: &qwen2vl::Qwen2VL<B>,
    b: &qwen2vl::Qwen2VL<B>,
) {
    let (la, lb) = (lines(whole), lines(parts));
    assert_eq!(la.len(), 4);
    for (x, y) in la.iter().zip(&lb) {
        for key in ["step", "loss", "reward_mean", "kl", "grad_norm"] {
            assert_eq!(x[key], y[key], "{key} differs: {x} vs {y}");
        }
    }
    assert_eq!(flat(a), flat(b), "final weights differ");
}

fn lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_resumed_run_matches_an_uninterrupted_one() {
    let whole = fresh_dir("whole");
    let parts = fresh_dir("parts");
    let a = run(&whole, 4, false);
    run(&parts, 2, false);
    assert_eq!(complete_checkpoints(&parts.join("grpo")), vec![2]);
    let b = run(&parts, 4, true);
    assert_eq!(complete_checkpoints(&parts.join("grpo")), vec![2, 4]);

    let (la, lb) = (lines(&whole), lines(&parts));
    assert_eq!(la.len(), 4);
    assert_eq!(lb.len(), 4);
    for (x, y) in la.iter().zip(&lb) {
        for key in [
            "step",
            "loss",
            "reward_mean",
            "kl",
            "grad_norm",
            "entropy",
            "lr",
        ] {
            assert_eq!(x[key], y[key], "{key} differs: {x} vs {y}");
        }
    }
    for key in [
        "reward_std",
        "reward/alphanumeric",
        "clip_ratio",
        "completion_len_mean",
        "completion_len_min",
        "completion_len_max",
        "zero_std_groups",
        "tokens_per_s",
    ] {
        assert!(la[0].get(key).is_some(), "{key} missing from {}", la[0]);
    }
    assert_eq!(flat(&a), flat(&b), "final weights differ");
    assert_ne!(
        flat(&a),
        flat(&tiny_random_model(11, &Default::default()).valid()),
        "training changed nothing"
    );
    let ck = parts.join("grpo/checkpoint");
    let stray: Vec<_> = std::fs::read_dir(&ck)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
    let _ = (
        std::fs::remove_dir_all(whole),
        std::fs::remove_dir_all(parts),
    );
}

/// A 4-step run and one stopped at step 2 and resumed to 4 (`name` their directories, the
/// settings changed by `adjust`): their metrics and final weights are held equal; the whole
/// run's metrics and model are returned.
fn resumed_matches_whole(
    name: &str,
    qwen25: bool,
    adjust: impl Fn(&mut GrpoConfig) + Copy,
) -> (Vec<serde_json::Value>, qwen2vl::Qwen2VL<Inner>) {
    let whole = fresh_dir(&format!("{name}-whole"));
    let parts = fresh_dir(&format!("{name}-parts"));
    let a = run_configured(&whole, 4, false, None, qwen25, adjust);
    run_configured(&parts, 2, false, None, qwen25, adjust);
    let b = run_configured(&parts, 4, true, None, qwen25, adjust);
    assert_resumed_as_whole(&whole, &parts, &a, &b);
    let la = lines(&whole);
    // The sampled completions too: the resumed run's file holds what the whole run's does
    // (its first launch's lines past the checkpoint, if any, dropped).
    let completions = |d: &Path| std::fs::read_to_string(d.join("completions.jsonl")).unwrap();
    assert_eq!(completions(&whole), completions(&parts));
    assert_eq!(completions(&whole).lines().count(), 4 * 2 * 4 / 2);
    // Two launches, two event files; the second opens by announcing the restart at step 3.
    let mut events: Vec<_> = std::fs::read_dir(parts.join("tensorboard/train"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    events.sort();
    assert_eq!(events.len(), 2, "{events:?}");
    let records: Vec<Vec<Vec<u8>>> = events
        .iter()
        .map(|p| grpo::host::tensorboard::read_records(p).unwrap())
        .collect();
    let start = &records[1][1];
    assert!(start.ends_with(&[0x3A, 2, 0x08, 1]), "{start:?}");
    // File version, then per step its scalars and (every step here) its completions' text.
    assert_eq!(records[0].len(), 1 + 2 * 2);
    let _ = (
        std::fs::remove_dir_all(whole),
        std::fs::remove_dir_all(parts),
    );
    (la, a)
}

/// With step-wide statistics (`dapo` over the step's tokens, `scale_rewards = "batch"` over
/// its rewards: the step's two accumulated rollouts made together by its first micro-batch,
/// reused by the second and by the cycle's second update), a resumed run ends where an
/// uninterrupted one does.
#[test]
fn a_resumed_run_with_step_statistics_matches_an_uninterrupted_one() {
    let adjust = |cfg: &mut GrpoConfig| {
        cfg.loss.loss_type = grpo::loss::LossType::Dapo;
        cfg.scale_rewards = grpo::advantages::ScaleRewards::Batch;
    };
    let (la, _) = resumed_matches_whole("stats", false, adjust);
    // The first step as the hosted run took it: its two micro-batches' rollouts (the plan's
    // prompts and seeds) with their statistics shared, each micro-batch's loss its share.
    let plan = grpo::host::plan(4, 1, 2, 2, 4, 5);
    let policy = initial_model(false);
    let mut cfg = run_config();
    adjust(&mut cfg);
    let tokenizer = byte_tokenizer();
    let prompts = run_prompts(&tokenizer);
    let rewards = WeightedRewards {
        rewards: vec![(Box::new(Alphanumeric), 1.0)],
    };
    let mut rolls: Vec<_> = plan[..2]
        .iter()
        .map(|m| {
            let ps: Vec<_> = m.prompts.iter().map(|&i| prompts[i].clone()).collect();
            let model = policy.valid();
            rollout(
                &model,
                &ps,
                &tokenizer,
                &rewards,
                &cfg,
                m.seed,
                &Default::default(),
            )
            .unwrap()
        })
        .collect();
    share_step_statistics(&mut rolls, &cfg);
    let reference = policy.valid();
    let mut accumulator = burn::optim::GradientsAccumulator::new();
    for r in &rolls {
        let (g, _) = policy_gradients(&policy, Some(&reference), r, &cfg, 2).unwrap();
        accumulator.accumulate(&policy, g);
    }
    let mut grads = accumulator.grads();
    let norm = grpo::learner::clip_global_norm(&policy, &mut grads, f32::MAX) as f64;
    let logged = la[0]["grad_norm"].as_f64().unwrap();
    assert!(
        (logged - norm).abs() < 1e-5 * norm,
        "logged {logged} vs {norm}"
    );
}

/// DAPO's dynamic sampling in a hosted run: the groups of the prompt whose rewards never
/// spread are replaced by groups of prompts drawn anew, so no step trains on a flat group;
/// the draws are a function of the step, so a resumed run ends where an uninterrupted one does.
#[test]
fn dynamic_sampling_replaces_flat_groups_and_resumes_exactly() {
    let (lines, _) = resumed_matches_whole("filter", false, |cfg| {
        cfg.filter_groups = true;
        cfg.max_num_gen_batches = 20;
    });
    // Two cycles of two rollouts of one prompt: the four prompts once each, "Count." among
    // them, whose flat group was replaced (counted on the step that rolled it out).
    let resampled: Vec<f64> = lines
        .iter()
        .map(|l| {
            l.get("resampled_groups")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0)
        })
        .collect();
    assert_eq!(resampled.iter().sum::<f64>(), 1.0, "{lines:?}");
    for l in &lines {
        assert_eq!(l["zero_std_groups"].as_f64(), Some(0.0), "{l}");
        assert_ne!(l["unfilled_groups"].as_f64(), Some(1.0), "{l}");
    }
}

/// KL as a reward penalty in a hosted run: logged as its own reward, and a resumed run ends
/// where an uninterrupted one does.
#[test]
fn a_kl_reward_penalty_run_logs_it_and_resumes_exactly() {
    let (lines, _) = resumed_matches_whole("klr", false, |cfg| cfg.kl_in_reward = 0.5);
    let penalties: Vec<f64> = lines
        .iter()
        .map(|l| l["reward/kl_penalty"].as_f64().unwrap())
        .collect();
    // Step 1 samples from the reference itself (KL 0); later rollouts have moved away.
    assert_eq!(penalties[0], 0.0);
    assert!(penalties[2] < 0.0, "{penalties:?}");
}

/// TRL's `sync_ref_model` in a hosted run: the reference moves towards the policy every step
/// (alpha 0.5), each synced reference a resume may need is kept, and a run resumed at step 2
/// takes the reference synced before it and ends where an uninterrupted one does.
#[test]
fn a_synced_reference_run_resumes_exactly() {
    let sync = |cfg: &mut GrpoConfig| {
        cfg.sync_ref_model = true;
        cfg.ref_model_mixup_alpha = 0.5;
        cfg.ref_model_sync_steps = 1;
    };
    let (synced, _) = resumed_matches_whole("sync", false, sync);
    let (frozen, _) = resumed_matches_whole("frozen", false, |_| {});
    // The KL to a reference that follows the policy is smaller than to the frozen one.
    let kl = |lines: &[serde_json::Value]| lines[3]["kl"].as_f64().unwrap();
    assert!(
        kl(&synced) < kl(&frozen),
        "{} vs {}",
        kl(&synced),
        kl(&frozen)
    );
    // The references kept: every sync a resume from a kept checkpoint may need (checkpoints
    // every 2 steps, 2 kept, a sync every step: 2 x 2 + 1 = 5, here all three).
    let dir = fresh_dir("sync-kept");
    run_configured(&dir, 4, false, None, false, sync);
    let mut kept: Vec<String> = std::fs::read_dir(dir.join("grpo/reference"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["step-1", "step-2", "step-3"]);
    let _ = std::fs::remove_dir_all(dir);
}

/// The same on Qwen2.5-VL (its vision tower's norms and gated MLP in the checkpoint record).
/// `num_generations_eval`: the held-out evaluation samples answers and logs their rewards;
/// the logged numbers are those of [`evaluate_sampled`] on the model at that step (batches of
/// two questions, seeded by the run's seed and the question index), and a resumed run logs
/// the same evaluations as an uninterrupted one.
#[test]
fn a_sampled_held_out_evaluation_logs_rewards_and_resumes_exactly() {
    use grpo::eval::{evaluate_sampled, SampledEval};
    let adjust = |c: &mut GrpoConfig| c.num_generations_eval = Some(3);
    let whole = fresh_dir("sampled-eval-whole");
    let parts = fresh_dir("sampled-eval-parts");
    let a = run_evaluated(&whole, 4, false, None, false, 2, 1, adjust).unwrap();
    run_evaluated(&parts, 2, false, None, false, 2, 1, adjust).unwrap();
    run_evaluated(&parts, 4, true, None, false, 2, 1, adjust).unwrap();
    let evals = |dir: &Path| -> Vec<serde_json::Value> {
        lines(dir)
            .into_iter()
            .filter(|l| l.get("valid_accuracy").is_some())
            .collect()
    };
    let (ea, eb) = (evals(&whole), evals(&parts));
    assert_eq!(ea.len(), 2, "{ea:?}");
    assert_eq!(ea, eb, "a resumed run evaluated differently");
    for key in [
        "valid_pass_at_n",
        "valid_unparsable",
        "valid_reward_mean",
        "valid_reward_std",
        "valid_reward/alphanumeric",
        "valid_zero_std_groups",
        "valid_completion_len_mean",
    ] {
        assert!(ea[1].get(key).is_some(), "{key} missing from {}", ea[1]);
    }
    assert_eq!(ea[1]["step"], 4.0);

    let device = Default::default();
    let sampled = SampledEval {
        num_generations: 3,
        sampling: run_config().sampling,
        rewards: std::sync::Arc::new(WeightedRewards {
            rewards: vec![(Box::new(Alphanumeric), 1.0)],
        }),
        seed: 5,
    };
    let prompts = held_out_prompts();
    let tok = byte_tokenizer();
    let eval = held_out_config();
    let whole_set = evaluate_sampled(&a, &prompts, &tok, &eval, &sampled, 0, &device).unwrap();
    let got = |k: &str| ea[1][k].as_f64().unwrap();
    assert!(
        got("valid_reward_std") > 0.0,
        "the samples differ: {}",
        ea[1]
    );
    for (k, v) in whole_set.metrics() {
        if k == "reward_std" {
            continue;
        }
        assert!(
            (got(&format!("valid_{k}")) - v).abs() < 1e-6,
            "{k}: {} vs {v}",
            ea[1]
        );
    }
    // The spread is each batch's (two questions, then one), weighted by its questions.
    let std = |r: &[f32]| grpo::advantages::std_unbiased(r) as f64;
    let r = &whole_set.rewards;
    let expected = (2.0 * std(&r[..6]) + std(&r[6..])) / 3.0;
    assert!((got("valid_reward_std") - expected).abs() < 1e-6);
    let _ = (
        std::fs::remove_dir_all(whole),
        std::fs::remove_dir_all(parts),
    );
}

/// Two data-parallel workers (on the one Flex device): each micro-batch's two prompts are
/// rolled out one per worker, on two threads, and merged; every completion of both reaches the
/// metrics and the completions log; a resumed run ends exactly where an uninterrupted one
/// does. With `kl_in_reward` and a step-wide reward std the shards' statistics are the
/// merged batch's.
#[test]
fn a_two_worker_run_logs_both_shards_and_resumes_exactly() {
    let adjust = |c: &mut GrpoConfig| {
        c.kl_in_reward = 0.05;
        c.scale_rewards = grpo::ScaleRewards::Batch;
    };
    let whole = fresh_dir("two-workers-whole");
    let parts = fresh_dir("two-workers-parts");
    let a = run_evaluated(&whole, 4, false, None, false, 0, 2, adjust).unwrap();
    run_evaluated(&parts, 2, false, None, false, 0, 2, adjust).unwrap();
    // On another number of devices the shards, and so the samples, differ: refused.
    let other = match run_evaluated(&parts, 4, true, None, false, 0, 1, adjust) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a two-device run resumed on one device"),
    };
    assert!(
        other.contains("2 device(s)") && other.contains("1"),
        "{other}"
    );
    let b = run_evaluated(&parts, 4, true, None, false, 0, 2, adjust).unwrap();
    assert_resumed_as_whole(&whole, &parts, &a, &b);
    // Two prompts of four completions per micro-batch, two micro-batches per step: the step
    // that generates logs 16 completions, 8 per shard's prompt pair.
    let logged = std::fs::read_to_string(whole.join("completions.jsonl")).unwrap();
    let first: Vec<serde_json::Value> = logged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["step"] == 1)
        .collect();
    assert_eq!(first.len(), 16, "{logged}");
    let prompts: std::collections::BTreeSet<String> = first
        .iter()
        .map(|v| v["prompt"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(prompts.len(), 4, "every prompt of the step: {prompts:?}");
    let _ = (
        std::fs::remove_dir_all(whole),
        std::fs::remove_dir_all(parts),
    );
}

#[test]
fn a_resumed_qwen25vl_run_matches_an_uninterrupted_one() {
    let (_, a) = resumed_matches_whole("q25", true, |_| {});
    assert_ne!(
        flat(&a),
        flat(&initial_model(true).valid()),
        "training changed nothing"
    );
}

#[test]
fn a_resumed_lora_run_matches_an_uninterrupted_one() {
    let lora = qwen2vl::LoraConfig {
        r: 2,
        alpha: 4.0,
        target_modules: qwen2vl::TargetModules::Names(vec!["q_proj".into(), "down_proj".into()]),
        ..Default::default()
    };
    let whole = fresh_dir("lora-whole");
    let parts = fresh_dir("lora-parts");
    let a = run_with(&whole, 4, false, Some(&lora));
    run_with(&parts, 2, false, Some(&lora));
    let b = run_with(&parts, 4, true, Some(&lora));
    let (la, lb) = (lines(&whole), lines(&parts));
    assert_eq!(la.len(), 4);
    for (x, y) in la.iter().zip(&lb) {
        for key in ["step", "loss", "reward_mean", "kl", "grad_norm"] {
            assert_eq!(x[key], y[key], "{key} differs: {x} vs {y}");
        }
    }
    let adapters = |m: &qwen2vl::Qwen2VL<Inner>| -> Vec<f32> {
        m.projections()
            .iter()
            .filter_map(|(_, p)| p.lora.as_ref())
            .flat_map(|l| {
                let a = l.a.val().into_data().to_vec::<f32>().unwrap();
                let b = l.b.val().into_data().to_vec::<f32>().unwrap();
                a.into_iter().chain(b)
            })
            .collect()
    };
    assert_eq!(adapters(&a), adapters(&b), "final adapters differ");
    assert!(adapters(&a).iter().any(|&v| v != 0.0));
    // The base is untouched: bypassing the adapters gives the initial model.
    let initial = tiny_random_model(11, &Default::default()).valid();
    assert_eq!(flat(&a.clone().without_adapters()), flat(&initial));
    assert_ne!(flat(&a), flat(&initial), "training changed nothing");
    let _ = (
        std::fs::remove_dir_all(whole),
        std::fs::remove_dir_all(parts),
    );
}

/// A resumed run whose newest checkpoint was damaged after it was written (cut short, as by a
/// failing disk) falls back to the one before and still ends where an uninterrupted run does.
#[test]
fn a_damaged_newest_checkpoint_is_passed_over_on_resume() {
    let whole = fresh_dir("whole-6");
    let parts = fresh_dir("damaged");
    let a = run(&whole, 6, false);
    run(&parts, 4, false);
    assert_eq!(complete_checkpoints(&parts.join("grpo")), vec![2, 4]);
    let model4 = parts.join("grpo/checkpoint/model-4.bin");
    let bytes = std::fs::read(&model4).unwrap();
    std::fs::write(&model4, &bytes[..bytes.len() - 1]).unwrap();
    let b = run(&parts, 6, true);
    assert_eq!(flat(&a), flat(&b), "final weights differ");
    let steps: Vec<f64> = lines(&parts)
        .iter()
        .map(|l| l["step"].as_f64().unwrap())
        .collect();
    assert_eq!(steps, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(complete_checkpoints(&parts.join("grpo")), vec![4, 6]);
    assert!(grpo::host::check_checkpoint(&parts.join("grpo"), 4).is_ok());
    let _ = (
        std::fs::remove_dir_all(whole),
        std::fs::remove_dir_all(parts),
    );
}
