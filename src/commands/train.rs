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
    /// Data-parallel GRPO over these devices, the first the main one, e.g.
    /// `--devices cuda:0,cuda:1` (overrides the config's `devices`; the backend follows).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
}

pub fn run(args: RunArgs, job: Job) -> anyhow::Result<()> {
    let mut overrides = args.set.clone();
    if let Some(d) = args.device {
        overrides.push(format!("device=\"{}\"", d.name()));
    }
    if !args.devices.is_empty() {
        let (kind, _) =
            crate::backend::parse_device(&args.devices[0]).map_err(anyhow::Error::msg)?;
        if args.device.is_none() {
            overrides.push(format!("device=\"{}\"", kind.name()));
        }
        let quoted: Vec<String> = args.devices.iter().map(|d| format!("{d:?}")).collect();
        overrides.push(format!("devices=[{}]", quoted.join(",")));
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
