//! [`Exchange`] between processes with Burn 0.21's burn-collective: an orchestrator (one
//! process, [`serve_orchestrator`]) that the nodes register with, and an all-reduce of each
//! vector over websockets between the nodes' data services.
//!
//! Each sum registers anew, all-reduces once and finishes: with burn-collective 0.21 a second
//! all-reduce in one registration hangs (its transfer ids repeat: tracel-ai/burn#4549). The
//! vectors are Flex (CPU) tensors whatever the training backend: the global all-reduce moves
//! host data between the nodes anyway.

use std::str::FromStr;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{
    all_reduce, finish_collective, register, CollectiveConfig, PeerId, ReduceOperation,
};
use burn_communication::Address;

use super::{Exchange, ExchangeError};

/// Where a node is in its run and how it reaches the others.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    /// This node's index, 0-based.
    pub rank: usize,
    /// Nodes in the run.
    pub nodes: usize,
    /// The orchestrator, `ws://host:port`.
    pub orchestrator: String,
    /// This node's address as the others reach it, `ws://host:port`; its data service listens
    /// on that port.
    pub address: String,
    /// How long a node waits for the others at one exchange.
    pub timeout: Duration,
}

impl NodeSpec {
    /// The port of `address`; an error names what is wrong with the spec.
    pub fn check(&self) -> Result<u16, String> {
        if self.nodes < 2 {
            return Err(format!(
                "--nodes {}: a run on several nodes has at least 2",
                self.nodes
            ));
        }
        if self.rank >= self.nodes {
            return Err(format!(
                "--node-rank {} is not below --nodes {}",
                self.rank, self.nodes
            ));
        }
        let port = |what: &str, a: &str| -> Result<u16, String> {
            let rest = a
                .strip_prefix("ws://")
                .ok_or_else(|| format!("{what} `{a}`: expected ws://host:port"))?;
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("{what} `{a}`: expected ws://host:port"))?;
            if host.is_empty() {
                return Err(format!("{what} `{a}`: no host"));
            }
            port.trim_end_matches('/')
                .parse()
                .map_err(|_| format!("{what} `{a}`: `{port}` is not a port number"))
        };
        port("--orchestrator", &self.orchestrator)?;
        port("--node-address", &self.address)
    }
}

/// The exchange of one node: every call registers with the orchestrator, all-reduces and
/// finishes; calls are one at a time.
#[derive(Debug)]
pub struct CollectiveExchange {
    spec: NodeSpec,
    config: CollectiveConfig,
    lock: Mutex<()>,
}

impl CollectiveExchange {
    /// Checks the spec; nothing is contacted until the first sum.
    pub fn new(spec: NodeSpec) -> Result<Self, String> {
        let port = spec.check()?;
        let address = |a: &str| Address::from_str(a).map_err(|e| format!("`{a}`: {e:?}"));
        let config = CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(spec.nodes as u32)
            .with_global_address(address(&spec.orchestrator)?)
            .with_node_address(address(&spec.address)?)
            .with_data_service_port(port);
        if !config.is_valid() {
            return Err(format!("burn-collective refuses the settings {config:?}"));
        }
        Ok(Self {
            spec,
            config,
            lock: Mutex::new(()),
        })
    }
}

impl Exchange for CollectiveExchange {
    fn rank(&self) -> usize {
        self.spec.rank
    }

    fn nodes(&self) -> usize {
        self.spec.nodes
    }

    fn sum(&self, values: Vec<f32>) -> Result<Vec<f32>, ExchangeError> {
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let n = values.len();
        if n == 0 {
            return Ok(values);
        }
        let peer = PeerId::from(self.spec.rank as u32);
        let config = self.config.clone();
        let (tx, rx) = mpsc::channel();
        // On its own thread so that a node that never answers becomes an error here.
        std::thread::spawn(move || {
            let failed = |what: &str, e: burn_collective::CollectiveError| {
                let mut why = format!("{what}: {e:?}");
                if why.contains("DoubleRegister") {
                    why += ": the orchestrator still holds this node from a run that stopped; \
                            restart `medr1 orchestrator`, then every node";
                }
                ExchangeError::Failed(why)
            };
            let out = (|| {
                register::<Flex>(peer, Default::default(), config)
                    .map_err(|e| failed("register", e))?;
                let device = Default::default();
                let t = Tensor::<Flex, 1>::from_data(TensorData::new(values, [n]), &device);
                let summed =
                    all_reduce::<Flex>(peer, t.into_primitive().tensor(), ReduceOperation::Sum)
                        .map_err(|e| failed("all-reduce", e))?;
                finish_collective::<Flex>(peer).map_err(|e| failed("finish", e))?;
                Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(summed))
                    .into_data()
                    .into_vec::<f32>()
                    .map_err(|e| ExchangeError::Failed(format!("{e:?}")))
            })();
            let _ = tx.send(out);
        });
        match rx.recv_timeout(self.spec.timeout) {
            Ok(out) => out,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(ExchangeError::Timeout(self.spec.timeout.as_secs()))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ExchangeError::Failed(
                "the exchange thread stopped (burn-collective panicked)".into(),
            )),
        }
    }
}

/// Runs the orchestrator the nodes register with on `port` (all interfaces) until the process
/// is interrupted (Ctrl-C or SIGTERM).
pub fn serve_orchestrator(port: u16) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}
