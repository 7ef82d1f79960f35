//! `medr1 train | sft | eval`: one pipeline from a [`RunConfig`] to a run directory.
//!
//! `runs/<name>/`: `config.toml` (resolved), `data/` (synthetic runs), `sft/` (warm start),
//! `eval_before.*`, `grpo/` (burn-train's directory: checkpoints, metric logs), `metrics.jsonl`,
//! `train.log`, `eval_after.*`, `final/` (hub-layout checkpoint), `report.md`, `curves.png`.

mod data;
mod guard;
pub mod model;
mod plot;
mod report;
mod scan;
mod settings;
mod sft;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use grpo::eval::{comparison_csv, comparison_markdown, evaluate_source, EvalConfig, EvalReport};
use grpo::host::{launch, CompletionLog, HeldOut, HostCtx, HostOptions, OptimizerOptions};
use grpo::learner::GrpoConfig;
use grpo::loss::LossConfig;
use grpo::schedule::LrSchedule;
use grpo::stream::{PromptSource, StreamOptions};
use grpo::{AccuracyReward, FormatReward, LetterAccuracyReward, WeightedRewards};
use medvqa::PromptTemplate;
use qwen2vl::checkpoint::save_adapter;
use qwen2vl::generation::{Sampling, ShapeBuckets};
use qwen2vl::processor::{byte_tokenizer_json, TextTokenizer};
use qwen2vl::{save_model, Qwen2VL, SaveDtype};

use crate::backend::BackendTask;
use crate::config::RunConfig;

pub use guard::Interrupt;

/// What to run.
#[derive(Debug, Clone)]
pub enum Job {
    /// SFT warm start (if configured), evaluation before, GRPO, evaluation after, report.
    /// `force`: a run directory that already holds a run is moved aside instead of refused.
    /// `nodes`: this process is one node of a run on several.
    Train {
        resume: bool,
        force: bool,
        nodes: Option<grpo::nodes::collective::NodeSpec>,
    },
    /// The SFT warm start alone, written to `runs/<name>/sft/`.
    Sft { force: bool },
    /// Evaluate checkpoint directories on the configured eval set: a report each and one
    /// table with a row per checkpoint.
    Eval { checkpoints: Vec<PathBuf> },
}

pub struct RunTask {
    pub cfg: RunConfig,
    pub job: Job,
    pub interrupt: Interrupt,
}

impl BackendTask for RunTask {
    type Output = anyhow::Result<()>;
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        // With `devices`, the model lives on the first of them.
        let device = crate::backend::devices_of::<B>(&self.cfg.devices)
            .into_iter()
            .next()
            .unwrap_or(device);
        execute::<B>(&self.cfg, &self.job, &self.interrupt, device)
    }
}

pub fn run_dir(cfg: &RunConfig) -> PathBuf {
    cfg.runs_dir.join(&cfg.name)
}

/// `grpo.shape_bucket`, with 0 resolved for the device: 64 where kernels are compiled per
/// shape (cuda, wgpu), exact shapes on the CPU.
fn shape_bucket(cfg: &RunConfig) -> usize {
    match (cfg.grpo.shape_bucket, cfg.device.as_str()) {
        (0, "flex") => 1,
        (0, _) => 64,
        (b, _) => b,
    }
}

fn eval_config(cfg: &RunConfig, eos: &[u32], pad: u32) -> EvalConfig {
    EvalConfig {
        batch_size: cfg.eval.batch_size,
        max_new_tokens: cfg.eval.max_new_tokens,
        eos_token_ids: eos.to_vec(),
        pad_token_id: pad,
        buckets: ShapeBuckets {
            multiple: shape_bucket(cfg),
            max_completion: 0,
        },
        scoring: cfg.eval.scoring,
    }
}

fn write_eval(dir: &Path, stem: &str, report: &EvalReport, label: &str) -> anyhow::Result<()> {
    guard::write_atomic(&dir.join(format!("{stem}.json")), &report.to_json())?;
    guard::write_atomic(&dir.join(format!("{stem}.md")), &report.to_markdown(label))?;
    guard::write_atomic(&dir.join(format!("{stem}.csv")), &report.to_csv())?;
    Ok(())
}

/// An evaluation's accuracies as TensorBoard scalars at GRPO step `step` (0: before GRPO),
/// in `<run>/tensorboard/eval`: overall, by modality and by question type.
fn eval_events(
    cfg: &RunConfig,
    dir: &Path,
    step: usize,
    report: &EvalReport,
) -> anyhow::Result<()> {
    if !cfg.logging.tensorboard {
        return Ok(());
    }
    let events = dir.join("tensorboard").join("eval");
    let mut w = grpo::host::tensorboard::EventWriter::create(&events)
        .with_context(|| format!("cannot write TensorBoard events in {}", events.display()))?;
    let mut values = vec![
        ("eval/accuracy".to_string(), report.overall.accuracy()),
        (
            "eval/unparsable".to_string(),
            report.overall.unparsable as f64 / report.overall.total.max(1) as f64,
        ),
    ];
    for (m, t) in &report.by_modality {
        values.push((format!("eval/modality/{m}"), t.accuracy()));
    }
    for (q, t) in &report.by_question_type {
        values.push((format!("eval/question_type/{q}"), t.accuracy()));
    }
    let values: Vec<(&str, f64)> = values.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    w.scalars(step as u64, &values)
        .with_context(|| format!("cannot write TensorBoard events in {}", events.display()))
}

#[allow(clippy::too_many_arguments)]
fn run_eval<B: Backend>(
    model: &Qwen2VL<B>,
    prompts: &Arc<dyn PromptSource>,
    stream: StreamOptions,
    interrupt: &Interrupt,
    tok: &TextTokenizer,
    ecfg: &EvalConfig,
    what: &str,
    device: &B::Device,
) -> anyhow::Result<EvalReport> {
    let t = Instant::now();
    eprintln!("evaluating {what} on {} held-out questions", prompts.len());
    let mut bar = crate::progress::Progress::new(&format!("evaluating {what}"), prompts.len());
    let report = evaluate_source(
        model,
        prompts.clone(),
        tok,
        ecfg,
        stream,
        device,
        &mut |done, _| bar.set(done),
        &|| interrupt.requested(),
    )?;
    bar.finish();
    eprintln!(
        "{what}: accuracy {:.3} ({} of {}), unparsable {} ({:.1}s)",
        report.overall.accuracy(),
        report.overall.correct,
        report.overall.total,
        report.overall.unparsable,
        t.elapsed().as_secs_f64()
    );
    Ok(report)
}

fn rewards(cfg: &RunConfig, think: bool) -> WeightedRewards {
    let rewards = cfg
        .grpo
        .rewards
        .iter()
        .map(|(name, &w)| {
            let r: Box<dyn grpo::Reward> = match name.as_str() {
                "format" => Box::new(FormatReward::new(think)),
                "accuracy" => Box::new(AccuracyReward),
                _ => Box::new(LetterAccuracyReward),
            };
            (r, w)
        })
        .collect();
    WeightedRewards { rewards }
}

fn grpo_config(cfg: &RunConfig, eos: &[u32], pad: u32) -> GrpoConfig {
    let g = &cfg.grpo;
    GrpoConfig {
        num_generations: g.num_generations,
        sampling: Sampling {
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            min_p: g.min_p,
            repetition_penalty: g.repetition_penalty,
        },
        max_completion_length: g.max_completion_length,
        loss: LossConfig {
            beta: g.beta,
            epsilon_low: g.epsilon,
            epsilon_high: g.epsilon_high,
            loss_type: g.loss_type,
            importance_sampling_level: g.importance_sampling_level,
            delta: g.delta,
            kl_estimator: g.kl_estimator,
            entropy_coef: g.entropy_coef,
            top_entropy_quantile: g.top_entropy_quantile,
        },
        scale_rewards: g.scale_rewards,
        mask_truncated_completions: g.mask_truncated_completions,
        eos_token_ids: eos.to_vec(),
        pad_token_id: pad,
        num_iterations: g.num_iterations.max(1),
        shape_bucket: shape_bucket(cfg),
        share_prompt: g.share_prompt,
        memory: cfg.memory.options(),
        filter_groups: g.filter_groups,
        max_num_gen_batches: g.max_num_gen_batches,
        kl_in_reward: g.kl_in_reward,
        kl_in_reward_estimator: g.kl_in_reward_estimator,
        sync_ref_model: g.sync_ref_model,
        ref_model_mixup_alpha: g.ref_model_mixup_alpha,
        ref_model_sync_steps: g.ref_model_sync_steps,
        num_generations_eval: g.num_generations_eval,
    }
}

fn execute<B: Backend>(
    cfg: &RunConfig,
    job: &Job,
    interrupt: &Interrupt,
    device: B::Device,
) -> anyhow::Result<()> {
    type A<B> = Autodiff<B>;
    let started = Instant::now();
    if matches!(job, Job::Train { .. }) && !cfg.grpo.trains() {
        anyhow::bail!("grpo.steps and grpo.epochs are both 0: set one of them to train");
    }
    let dir = run_dir(cfg);
    // One process per run directory, and a finished or interrupted run is not overwritten
    // without being asked.
    let mut lock = guard::RunLock::acquire(&dir)?;
    let (what, force) = match job {
        Job::Train {
            resume: false,
            force,
            ..
        } => (guard::TRAIN_OUTPUTS, *force),
        Job::Sft { force } => (guard::SFT_OUTPUTS, *force),
        _ => (&[][..], false),
    };
    let found = guard::existing_outputs(&dir, what);
    if !found.is_empty() {
        if !force {
            anyhow::bail!(
                "{} already holds a run ({}): `--resume` continues it, `--force` starts over \
                 (the old run is moved aside, nothing is deleted), or choose another `name`",
                dir.display(),
                found.join(", ")
            );
        }
        let aside = guard::move_aside(&dir, &mut lock)?;
        eprintln!("moved the previous run to {}", aside.display());
    }
    guard::prepare_run_dir(&dir, cfg)?;
    // A resumed run continues the same run: only step counts, logging, checkpoint and
    // evaluation settings may change (and are recorded).
    let previous = std::fs::read_to_string(dir.join("config.toml")).ok();
    if let (Job::Train { resume: true, .. }, Some(old)) = (job, &previous) {
        let (fixed, changed) = settings::resume_differences(old, &cfg.to_toml())?;
        if !fixed.is_empty() {
            anyhow::bail!(
                "--resume continues the run in {} with the settings it was made with; these \
                 differ:\n  {}\nundo them, or start a new run (another `name`, or `--force`)",
                dir.display(),
                fixed.join("\n  ")
            );
        }
        if !changed.is_empty() {
            let line = format!("resumed with changed settings: {}", changed.join("; "));
            eprintln!("{line}");
            use std::io::Write;
            if let Ok(mut log) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("train.log"))
            {
                let _ = writeln!(log, "{line}");
            }
        }
    }
    // An evaluation must not overwrite the training run's resolved config.
    let config_name = match job {
        Job::Eval { .. } => "eval_config.toml",
        _ => "config.toml",
    };
    guard::write_atomic(&dir.join(config_name), &cfg.to_toml())?;
    let tok = model::tokenizer(cfg)?;
    if model::tokenizer_path(cfg).is_none() {
        guard::write_atomic(
            &dir.join("tokenizer.json"),
            &byte_tokenizer_json().to_string(),
        )?;
    }
    let (eos, pad) = model::special_ids(&tok)?;
    let processor = Arc::new(model::processor(cfg)?);
    let positions = model::architecture(cfg)?.text.max_position_embeddings;
    let data = data::load(cfg, &dir, &processor, positions, interrupt)?;
    eprintln!(
        "data: {} training, {} held-out questions",
        data.train.len(),
        data.test.len()
    );
    // `grpo.epochs` becomes a number of steps once the training set's size is known.
    let mut resolved = cfg.clone();
    resolved.grpo.steps = cfg.grpo.total_steps(data.train.len());
    let cfg = &resolved;
    let stream = data::stream_options(cfg);
    let test_records = match job {
        Job::Eval { .. } => data.test.clone(),
        _ => Vec::new(),
    };
    let data_root = data.image_root.clone();
    let eval_prompts = data::source(
        cfg,
        data.test,
        &cfg.data.eval_template,
        &processor,
        &data.image_root,
    )?;
    let ecfg = eval_config(cfg, &eos, pad);
    let eval_with = |model: &Qwen2VL<B>, what: &str| {
        run_eval(
            model,
            &eval_prompts,
            stream,
            interrupt,
            &tok,
            &ecfg,
            what,
            &device,
        )
    };

    // An empty held-out set is not an accuracy of 0.
    let has_eval = !eval_prompts.is_empty();
    if let Job::Eval { .. } = job {
        if !has_eval {
            anyhow::bail!(
                "no held-out questions to evaluate on: data.test is empty or the filters \
                 (data.eval_modalities, data.question_types) left none"
            );
        }
    } else if !has_eval && (cfg.eval.before || cfg.eval.after) {
        eprintln!("no held-out questions (data.test): the evaluations are skipped");
    }
    if let Job::Eval { checkpoints } = job {
        let mut rows = Vec::with_capacity(checkpoints.len());
        let labels = checkpoint_labels(checkpoints);
        for (checkpoint, label) in checkpoints.iter().zip(labels) {
            let m = model::load_checkpoint::<B>(checkpoint, &device)
                .with_context(|| format!("checkpoint {}", checkpoint.display()))?;
            // A checkpoint saved with another tokenizer is evaluated with its own: prompts,
            // special ids and decoding all come from it.
            let report = match model::own_tokenizer(cfg, checkpoint)? {
                None => eval_with(&m, &label)?,
                Some((own, path, origin)) => {
                    eprintln!(
                        "{label}: {} differs from the run's tokenizer ({origin}); evaluating \
                         this checkpoint with its own",
                        path.display()
                    );
                    let (eos, pad) = model::special_ids(&own)
                        .with_context(|| format!("tokenizer {}", path.display()))?;
                    let again = TextTokenizer::from_file(&path)
                        .with_context(|| format!("tokenizer {}", path.display()))?;
                    let processor = Arc::new(model::processor_with(cfg, again)?);
                    let prompts = data::source(
                        cfg,
                        test_records.clone(),
                        &cfg.data.eval_template,
                        &processor,
                        &data_root,
                    )?;
                    run_eval(
                        &m,
                        &prompts,
                        stream,
                        interrupt,
                        &own,
                        &eval_config(cfg, &eos, pad),
                        &label,
                        &device,
                    )?
                }
            };
            // Never the training run's own reports (a checkpoint directory named `after`).
            let name = label.replace(['/', '\\'], "_");
            let stem = match name.as_str() {
                "before" | "after" | "sft" => format!("eval_checkpoint_{name}"),
                _ => format!("eval_{name}"),
            };
            write_eval(&dir, &stem, &report, &label)?;
            eprintln!("wrote {}/{stem}.{{json,md,csv}}", dir.display());
            rows.push((label, report));
        }
        if rows.len() == 1 {
            println!("{}", rows[0].1.to_markdown(&rows[0].0));
        } else {
            let md = comparison_markdown(&rows);
            guard::write_atomic(&dir.join("eval_table.md"), &md)?;
            guard::write_atomic(&dir.join("eval_table.csv"), &comparison_csv(&rows))?;
            println!("{md}");
            eprintln!("wrote {}/eval_table.{{md,csv}}", dir.display());
        }
        return Ok(());
    }

    let train_prompts = data::source(
        cfg,
        data.train,
        &cfg.data.template,
        &processor,
        &data.image_root,
    )?;

    let template = PromptTemplate::parse(&cfg.data.template)?;

    // The warm start: a given checkpoint, the run's own finished SFT, or a fresh one.
    let sft_dir = dir.join("sft");
    let warm: Option<PathBuf> = if !cfg.sft.warm_start.is_empty() {
        Some(PathBuf::from(&cfg.sft.warm_start))
    } else if sft_dir.join("config.json").is_file() && !matches!(job, Job::Sft { .. }) {
        let what = format!("{} (the warm start)", sft_dir.display());
        settings::check_reuse(&sft_dir, &what, &settings::warm_start(cfg))?;
        Some(sft_dir.clone())
    } else {
        None
    };
    let policy: Qwen2VL<A<B>> = match (&warm, cfg.sft.steps) {
        (Some(w), _) => {
            eprintln!("warm start from {}", w.display());
            if let Some((_, path, origin)) = model::own_tokenizer(cfg, w)? {
                anyhow::bail!(
                    "the warm start {} was saved with another tokenizer ({}) than this run's \
                     ({origin}): its token ids mean other words here. Use a warm start made \
                     from this run's model, or train from its base (model.checkpoint, \
                     model.tokenizer = \"{}\")",
                    w.display(),
                    path.display(),
                    path.display()
                );
            }
            model::load_checkpoint::<A<B>>(w, &device)
                .with_context(|| format!("warm start {}", w.display()))?
        }
        (None, 0) => model::initial::<A<B>>(cfg, &device)?,
        (None, _) => {
            let m = model::initial::<A<B>>(cfg, &device)?;
            eprintln!("SFT warm start: {} steps", cfg.sft.steps);
            let m = sft::train(
                m,
                train_prompts.clone(),
                stream,
                &tok,
                &cfg.sft,
                template.thinks(),
                eos[0],
                pad,
                cfg.sft.seed.unwrap_or(cfg.seed),
                cfg.grpo.max_bad_steps,
                interrupt,
                &device,
            )?;
            save_model(&m.valid(), &sft_dir, SaveDtype::F32)?;
            write_processor_files(&sft_dir, cfg)?;
            settings::record(&sft_dir, &settings::warm_start(cfg))?;
            eprintln!("wrote the warm start to {}", sft_dir.display());
            m
        }
    };
    if matches!(job, Job::Sft { .. }) {
        if cfg.eval.after && has_eval {
            let r = eval_with(&policy.valid(), "SFT")?;
            write_eval(&dir, "eval_sft", &r, "SFT")?;
        }
        return Ok(());
    }
    let resume = matches!(job, Job::Train { resume: true, .. });
    let (policy, lora) = model::with_lora(policy, &cfg.lora)?;

    if !resume {
        // A fresh run starts fresh TensorBoard events and completions (before the evaluation
        // that writes the first of them).
        let _ = std::fs::remove_dir_all(dir.join("tensorboard"));
        let _ = std::fs::remove_file(dir.join("completions.jsonl"));
    }
    let before = if cfg.eval.before && has_eval {
        let path = dir.join("eval_before.json");
        if resume && path.is_file() {
            eprintln!("evaluation before GRPO already in {}", path.display());
            None
        } else {
            let r = eval_with(&policy.valid(), "before GRPO")?;
            write_eval(&dir, "eval_before", &r, "before GRPO")?;
            eval_events(cfg, &dir, 0, &r)?;
            Some(r)
        }
    } else {
        None
    };
    if interrupt.requested() {
        anyhow::bail!("interrupted before GRPO started; rerun with --resume");
    }

    let gcfg = grpo_config(cfg, &eos, pad);
    // With LoRA the reference is the frozen base itself (adapters bypassed, weights shared).
    let reference = (gcfg.loss.beta != 0.0 || gcfg.kl_in_reward != 0.0)
        .then(|| policy.valid().without_adapters());
    let ctx = HostCtx::<A<B>>::new(
        train_prompts,
        model::tokenizer(cfg)?,
        rewards(cfg, template.thinks()),
        gcfg,
        reference,
        device.clone(),
        cfg.grpo.gradient_accumulation,
    )
    .with_stream(stream);
    let ctx = ctx.with_devices(crate::backend::devices_of::<A<B>>(&cfg.devices));
    let node = match job {
        Job::Train {
            nodes: Some(spec), ..
        } => Some(spec),
        _ => None,
    };
    let ctx = match node {
        Some(spec) => {
            let exchange = grpo::nodes::collective::CollectiveExchange::new(spec.clone())
                .map_err(anyhow::Error::msg)?;
            eprintln!(
                "node {} of {}: orchestrator {}, this node {}",
                spec.rank, spec.nodes, spec.orchestrator, spec.address
            );
            ctx.with_exchange(std::sync::Arc::new(exchange))
        }
        None => ctx,
    };
    let opts = HostOptions {
        dir: dir.join("grpo"),
        metrics_jsonl: dir.join("metrics.jsonl"),
        log_file: dir.join("train.log"),
        total_steps: cfg.grpo.steps,
        prompts_per_step: cfg.grpo.prompts_per_step,
        checkpoint_every: cfg.checkpoint.every,
        keep_checkpoints: cfg.checkpoint.keep,
        eval_every: cfg.eval.every,
        seed: cfg.seed,
        schedule: LrSchedule {
            peak: cfg.grpo.learning_rate,
            warmup_steps: cfg.grpo.warmup(cfg.grpo.steps),
            total_steps: cfg.grpo.steps,
            decay: cfg.grpo.decay,
        },
        optimizer: OptimizerOptions {
            weight_decay: cfg.grpo.weight_decay,
            ..Default::default()
        },
        max_grad_norm: cfg.grpo.max_grad_norm,
        resume,
        dashboard: true,
        interrupter: Some(interrupt.interrupter()),
        max_bad_steps: cfg.grpo.max_bad_steps,
        tensorboard: cfg.logging.tensorboard.then(|| dir.join("tensorboard")),
        completions: Some(CompletionLog {
            path: dir.join("completions.jsonl"),
            every: cfg.logging.completions_every,
        }),
    };
    if !resume {
        // A fresh run starts fresh logs.
        let _ = std::fs::remove_file(&opts.metrics_jsonl);
        let _ = std::fs::remove_file(&opts.log_file);
        let _ = std::fs::remove_dir_all(&opts.dir);
    }
    let held_out = HeldOut {
        source: eval_prompts.clone(),
        count: cfg.eval.every_subset,
    };
    let grpo_started = Instant::now();
    eprintln!("GRPO: {} steps", cfg.grpo.steps);
    // burn-collective prints a line on stdout each time a node connects (every exchange): to a
    // log in the run directory while the nodes train.
    let _quiet = match node {
        Some(_) => Some(guard::StdoutTo::file(&dir.join("collective.log"))?),
        None => None,
    };
    let keys = std::io::stdout()
        .is_terminal()
        .then(guard::SignalKeys::keep)
        .flatten();
    let launched = launch(policy, ctx, held_out, ecfg.clone(), &opts);
    drop(keys);
    drop(_quiet);
    let (trained, state) = launched?;
    let grpo_secs = grpo_started.elapsed().as_secs_f64();
    if state.step < cfg.grpo.steps {
        anyhow::bail!(
            "stopped at step {} of {}: `medr1 train --config ... --resume` continues from the \
             last checkpoint",
            state.step,
            cfg.grpo.steps
        );
    }
    let after = if cfg.eval.after && has_eval {
        let r = eval_with(&trained, "after GRPO")?;
        write_eval(&dir, "eval_after", &r, "after GRPO")?;
        eval_events(cfg, &dir, cfg.grpo.steps, &r)?;
        Some(r)
    } else {
        None
    };
    let final_dir = dir.join("final");
    save_model(&trained, &final_dir, SaveDtype::F32)?;
    write_processor_files(&final_dir, cfg)?;
    if let Some(lcfg) = &lora {
        // The merged checkpoint above, and the adapter itself as PEFT reads it.
        let base = (!cfg.model.checkpoint.is_empty()).then_some(cfg.model.checkpoint.as_str());
        save_adapter(&trained, lcfg, base, &final_dir.join("adapter"))?;
    }
    let before = match before {
        Some(b) => serde_json::from_str(&b.to_json()).ok(),
        None => report::read_eval(&dir.join("eval_before.json")),
    };
    report::write(
        &dir,
        cfg,
        before.as_ref(),
        after.as_ref(),
        grpo_secs,
        started.elapsed().as_secs_f64(),
    )?;
    eprintln!(
        "done in {:.0}s: {}/report.md, curves.png, final/",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(())
}

/// A short, distinct name per checkpoint: its directory name, with parent directories added
/// while two would read the same (`a/final`, `b/final`).
fn checkpoint_labels(dirs: &[PathBuf]) -> Vec<String> {
    let parts: Vec<Vec<String>> = dirs
        .iter()
        .map(|d| {
            d.components()
                .rev()
                .filter_map(|c| match c {
                    std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect()
        })
        .collect();
    let label = |p: &Vec<String>, depth: usize| {
        let mut names: Vec<&str> = p.iter().take(depth).map(String::as_str).collect();
        names.reverse();
        if names.is_empty() {
            "model".to_string()
        } else {
            names.join("/")
        }
    };
    let longest = parts.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let mut depth = 1;
    loop {
        let labels: Vec<String> = parts.iter().map(|p| label(p, depth)).collect();
        let distinct: std::collections::BTreeSet<&String> = labels.iter().collect();
        if distinct.len() == labels.len() || depth >= longest {
            return labels;
        }
        depth += 1;
    }
}

/// `tokenizer.json`, `preprocessor_config.json` and `chat_template.jinja` next to a saved
/// checkpoint, so that `medr1 generate --model DIR` and transformers' processor build inputs as
/// training did (the template is the one medr1 renders; a run refuses a checkpoint with another).
fn write_processor_files(dir: &Path, cfg: &RunConfig) -> anyhow::Result<()> {
    guard::write_atomic(&dir.join("tokenizer.json"), &tok_json(cfg)?)?;
    guard::write_atomic(
        &dir.join("chat_template.jinja"),
        qwen2vl::processor::QWEN_VL_CHAT_TEMPLATE,
    )?;
    let from_checkpoint = Path::new(&cfg.model.checkpoint).join("preprocessor_config.json");
    let pp = if !cfg.model.checkpoint.is_empty() && from_checkpoint.is_file() {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&from_checkpoint)?)?;
        v["min_pixels"] = cfg.model.min_pixels.into();
        v["max_pixels"] = cfg.model.max_pixels.into();
        v
    } else {
        serde_json::json!({
            "image_processor_type": "Qwen2VLImageProcessor",
            "min_pixels": cfg.model.min_pixels,
            "max_pixels": cfg.model.max_pixels,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        })
    };
    guard::write_atomic(
        &dir.join("preprocessor_config.json"),
        &serde_json::to_string_pretty(&pp)?,
    )
}

/// The tokenizer file saved next to a checkpoint.
fn tok_json(cfg: &RunConfig) -> anyhow::Result<String> {
    match model::tokenizer_path(cfg) {
        Some(path) => std::fs::read_to_string(&path).with_context(|| format!("{}", path.display())),
        None => Ok(byte_tokenizer_json().to_string()),
    }
}
