//! `medr1`: Med-R1 (GRPO on Qwen2-VL for medical VQA) on Burn.

mod accounting;
mod backend;
mod commands;
mod config;
mod progress;
mod run;
#[cfg(feature = "wgpu")]
mod wgpu_probe;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use backend::DeviceKind;

#[derive(Parser)]
#[command(
    name = "medr1",
    version,
    about = "Med-R1 in Rust: GRPO training of Qwen2-VL for medical VQA, on Burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the model against reference fixture directories made with transformers
    /// (`make_fixtures.py` format); one line per check, non-zero exit on any failure.
    Verify {
        /// Fixture directories (manifest.json, fixtures.safetensors, hf_model/, ...).
        #[arg(required_unless_present = "chat_cases")]
        fixtures: Vec<std::path::PathBuf>,
        /// Chat-template/tokenizer reference cases (`qwen-chat/cases.json` format).
        #[arg(long, requires = "tokenizer")]
        chat_cases: Option<std::path::PathBuf>,
        /// tokenizer.json to check the chat cases with.
        #[arg(long, requires = "chat_cases")]
        tokenizer: Option<std::path::PathBuf>,
        /// Backend to run the model on.
        #[arg(long, value_enum, default_value_t = DeviceKind::Flex)]
        device: DeviceKind,
        /// Run the model in bf16 and judge its outputs against transformers' own bf16 error
        /// on the fixture (`bf16_reference.json`): cuda, or flex (the CPU, slowly).
        #[arg(long)]
        bf16: bool,
    },
    /// Summarise a checkpoint directory (or a config.json): architecture, parameters per tower,
    /// dtype and key layout on disk.
    Inspect {
        /// A checkpoint directory or a config.json file.
        path: std::path::PathBuf,
    },
    /// Answer a prompt about one image with a Qwen2-VL checkpoint directory.
    Generate(commands::generate::GenerateArgs),
    /// A LoRA adapter on its base: one merged checkpoint (--merge), or the adapter rewritten
    /// in PEFT's current layout.
    Export(commands::export::ExportArgs),
    /// Med-VQA data: summary, synth, convert.
    #[command(subcommand)]
    Data(commands::data::DataCommand),
    /// The speed of a GRPO step (rollout, scoring, update) and its peak memory, group-shared
    /// and unshared, on a model built from a config with random weights and synthetic inputs.
    Bench(commands::bench::BenchArgs),
    /// Train: SFT warm start (if configured), evaluation, GRPO under burn-train, evaluation,
    /// report. Without --config, runs the embedded tiny demo (configs/tiny.toml).
    Train {
        #[command(flatten)]
        run: commands::train::RunArgs,
        /// Continue the run from its newest complete checkpoint.
        #[arg(long, conflicts_with = "force")]
        resume: bool,
        /// Start over although runs/<name>/ holds a run: the old one is moved aside to
        /// runs/<name>.replaced-<time>/, nothing is deleted.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        nodes: commands::train::NodeArgs,
    },
    /// The orchestrator of a run on several nodes: they register with it before each exchange.
    /// Runs until interrupted (Ctrl-C).
    Orchestrator {
        /// The port to listen on (all interfaces).
        #[arg(long)]
        port: u16,
    },
    /// The supervised warm start alone (written to runs/<name>/sft/).
    Sft {
        #[command(flatten)]
        run: commands::train::RunArgs,
        /// Train it again although runs/<name>/sft/ exists (the old run is moved aside).
        #[arg(long)]
        force: bool,
    },
    /// Evaluate checkpoint directories on the config's held-out set (greedy; answers judged
    /// as eval.scoring says); tables per modality and question type as JSON, Markdown and
    /// CSV, and with several checkpoints one table with a row each (eval_table.md/.csv).
    Eval {
        #[command(flatten)]
        run: commands::train::RunArgs,
        /// Checkpoint directories (config.json + *.safetensors), e.g. runs/<name>/final;
        /// repeat the flag or list several after it.
        #[arg(long, required = true, num_args = 1..)]
        checkpoint: Vec<std::path::PathBuf>,
    },
}

/// glibc's malloc returns every freed block above its mmap threshold (at most 32 MiB) to the
/// kernel, which zeroes the pages again when the next step asks for them: on the CPU a training
/// step allocates and frees its large tensors (logits, attention scores, activations kept for
/// the backward pass, gradients) every time, and that zeroing and faulting was about 13% of a
/// 107M-parameter step. Serving them from the heap instead and never trimming it keeps the
/// freed memory for the next step: the process holds its peak (as a GPU caching allocator
/// does), and a step is 17-20% faster (measured back to back on a 2-core CPU, 2026-12-06:
/// shared 6.7 -> 5.6 s, unshared 16.1-17.7 -> 13.4 s, peak RSS +7-9%). mimalloc and jemalloc
/// as the global allocator were measured slower. A user who sets glibc's malloc tunables
/// (`GLIBC_TUNABLES=glibc.malloc...`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) keeps
/// theirs.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    let chosen = tunables.contains("glibc.malloc.mmap_threshold")
        || tunables.contains("glibc.malloc.trim_threshold")
        || std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some();
    if chosen {
        return;
    }
    // SAFETY: mallopt only changes the allocator's parameters; called before any thread
    // starts. A value it refuses leaves glibc's default (returns 0), which is only slower.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    // Output into a closed pipe (`medr1 ... | head`) ends the process quietly, as for other
    // command-line tools, instead of a panic in println!.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of a signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Verify {
            fixtures,
            device,
            chat_cases,
            tokenizer,
            bf16,
        } => commands::verify::run(&fixtures, chat_cases.zip(tokenizer), device, bf16),
        Command::Generate(args) => commands::generate::run(args).map(|_| true),
        Command::Export(args) => commands::export::run(args).map(|_| true),
        Command::Data(cmd) => commands::data::run(cmd),
        Command::Inspect { path } => commands::inspect::run(&path).map(|_| true),
        Command::Train {
            run,
            resume,
            force,
            nodes,
        } => nodes.spec().and_then(|nodes| {
            commands::train::run(
                run,
                run::Job::Train {
                    resume,
                    force,
                    nodes,
                },
            )
            .map(|_| true)
        }),
        Command::Orchestrator { port } => {
            eprintln!("orchestrator listening on port {port} (Ctrl-C stops it)");
            grpo::nodes::collective::serve_orchestrator(port)
                .map(|_| true)
                .map_err(|e| anyhow::anyhow!("orchestrator on port {port}: {e}"))
        }
        Command::Bench(args) => commands::bench::run(args).map(|_| true),
        Command::Sft { run, force } => {
            commands::train::run(run, run::Job::Sft { force }).map(|_| true)
        }
        Command::Eval { run, checkpoint } => commands::train::run(
            run,
            run::Job::Eval {
                checkpoints: checkpoint,
            },
        )
        .map(|_| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
