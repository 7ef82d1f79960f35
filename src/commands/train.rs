//! `medr1 train | sft | eval`: a run config, overrides, a backend.

use std::path::PathBuf;

use clap::Args;

use grpo::nodes::collective::NodeSpec;

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

/// Training across several machines: every node runs `medr1 train` with the same config and
/// data, its own `--node-rank`, and `medr1 orchestrator` running somewhere they all reach.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// Nodes (machines) in the run; each rolls out and scores its share of every micro-batch
    /// and they sum their gradients (book: "Several devices").
    #[arg(long, requires_all = ["node_rank", "orchestrator", "node_address"])]
    pub nodes: Option<usize>,
    /// This node's index, 0 to nodes - 1. Node 0 writes runs/<name>/, node k runs/<name>.node<k>/.
    #[arg(long, requires = "nodes")]
    pub node_rank: Option<usize>,
    /// The orchestrator's address (`medr1 orchestrator --port P`), e.g. ws://10.0.0.1:3000.
    #[arg(long, requires = "nodes")]
    pub orchestrator: Option<String>,
    /// This node's address as the other nodes reach it, e.g. ws://10.0.0.2:3001; its data
    /// service listens on that port.
    #[arg(long, requires = "nodes")]
    pub node_address: Option<String>,
    /// Seconds a node waits for the others at one exchange before it stops with an error.
    #[arg(long, default_value_t = 1800, requires = "nodes")]
    pub node_timeout: u64,
}

impl NodeArgs {
    /// The node's spec, checked; `None` on one node.
    pub fn spec(&self) -> anyhow::Result<Option<NodeSpec>> {
        let Some(nodes) = self.nodes else {
            return Ok(None);
        };
        let spec = NodeSpec {
            rank: self.node_rank.expect("clap requires it"),
            nodes,
            orchestrator: self.orchestrator.clone().expect("clap requires it"),
            address: self.node_address.clone().expect("clap requires it"),
            timeout: std::time::Duration::from_secs(self.node_timeout.max(1)),
        };
        spec.check().map_err(anyhow::Error::msg)?;
        Ok(Some(spec))
    }
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
    let mut cfg = RunConfig::load(args.config.as_deref(), &overrides)?;
    // Several nodes on one shared disk must not share a run directory.
    if let Job::Train {
        nodes: Some(spec), ..
    } = &job
    {
        if spec.rank > 0 {
            cfg.name = format!("{}.node{}", cfg.name, spec.rank);
        }
    }
    let kind = DeviceKind::from_name(&cfg.device).expect("validated");
    let bf16 = cfg.dtype == "bf16";
    let task = RunTask {
        cfg,
        job,
        interrupt: Interrupt::install(),
    };
    dispatch_dtype(kind, bf16, task)?
}
