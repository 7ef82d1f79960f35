//! Qwen2-VL (`Qwen2VLForConditionalGeneration`) in Burn, generic over backends: exact to
//! HuggingFace transformers, loading and saving checkpoints as published.

pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generation;
pub mod lora;
pub mod model;
pub mod params;
pub mod positions;
pub mod processor;
pub mod rope;
pub mod text;
pub mod verify;
pub mod vision;

pub use checkpoint::{load_model, save_model, CheckpointInfo, SaveDtype};
pub use config::{ParameterCounts, Qwen2VLConfig, TextConfig, VisionConfig, VisionKind};
pub use error::Qwen2VLError;
pub use lora::{LoraAdapter, LoraConfig, Proj, TargetModules};
pub use model::{Images, ModelTrace, PreparedInputs, Qwen2VL};
pub use positions::{rope_index, RopePositions, TokenBatch, VisionTokens};
