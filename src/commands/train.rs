//! `medr1 train | sft | eval`: a run config, overrides, a backend.

use std::path::PathBuf;

use clap::Args;

use crate::backend::{dispatch_dtype, DeviceKind};
use crate::config::RunConfig;
use crate::run::{Interrupt, Job, RunTask};

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Run configuration (TOML; keys in configs/README.md). Default: the embedded tiny demo.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. `--set grpo.steps=50 --set data.max_eval=200`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Backend (overrides the config's `device`).
    #[arg(long, value_enum)]
    pub device: Option<DeviceKind>,
}

pub fn run(args: RunArgs, job: Job) -> anyhow::Result<()> {
    let mut overrides = args.set.clone();
    if let Some(d) = args.device {
        overrides.push(format!("device=\"{}\"", d.name()));
    }
    let cfg = RunConfig::load(args.config.as_deref(), &overrides)?;
    let kind = DeviceKind::from_name(&cfg.device).expect("validated");
    let bf16 = cfg.dtype == "bf16";
    let task = RunTask {
        cfg,
        job,
        interrupt: Interrupt::install(),
    };
    dispatch_dtype(kind, bf16, task)?
}
