//! Finding and memory-mapping the safetensors files of a checkpoint, and indexing their keys
//! under hub names whatever layout they were written in.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::Qwen2VLError;

/// The key naming a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// `visual.*`, `model.layers.*` (released checkpoints, `save_pretrained`).
    Hub,
    /// `model.visual.*`, `model.language_model.*` (transformers' module names).
    Runtime,
    Mixed,
}

impl std::fmt::Display for KeyLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyLayout::Hub => "hub (visual.*, model.layers.*)",
            KeyLayout::Runtime => "runtime (model.visual.*, model.language_model.*)",
            KeyLayout::Mixed => "mixed hub and runtime names",
        })
    }
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub file: usize,
    /// The key as written in the file.
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

/// The memory-mapped safetensors files of a checkpoint, indexed by hub key.
pub struct CheckpointFiles {
    pub dir: PathBuf,
    pub paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    pub index: BTreeMap<String, StoredTensor>,
    pub layout: KeyLayout,
}

/// The hub name of a key written in either layout.
pub fn hub_key(key: &str) -> (String, bool) {
    if let Some(rest) = key.strip_prefix("model.visual.") {
        (format!("visual.{rest}"), true)
    } else if let Some(rest) = key.strip_prefix("model.language_model.") {
        (format!("model.{rest}"), true)
    } else {
        (key.to_string(), false)
    }
}

fn checkpoint_err(dir: &Path, message: String) -> Qwen2VLError {
    Qwen2VLError::Checkpoint {
        dir: dir.to_path_buf(),
        message,
    }
}

impl CheckpointFiles {
    /// Finds the weights of a checkpoint directory: the index's shards, else
    /// `model.safetensors`, else every `*.safetensors` file. PyTorch pickles are refused.
    pub fn open(dir: &Path) -> Result<Self, Qwen2VLError> {
        if !dir.is_dir() {
            return Err(checkpoint_err(dir, "not a directory".into()));
        }
        let index_path = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| Qwen2VLError::io(&index_path, e))?;
            let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                checkpoint_err(
                    dir,
                    format!("model.safetensors.index.json: invalid JSON: {e}"),
                )
            })?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    checkpoint_err(
                        dir,
                        "model.safetensors.index.json: no `weight_map` object".into(),
                    )
                })?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            for s in &shards {
                if s.contains('/') || s.contains("..") {
                    return Err(checkpoint_err(
                        dir,
                        format!("index names shard `{s}` outside the directory"),
                    ));
                }
            }
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if dir.join("model.safetensors").is_file() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut found = Vec::new();
            let mut pickles = Vec::new();
            let entries = std::fs::read_dir(dir).map_err(|e| Qwen2VLError::io(dir, e))?;
            for entry in entries.flatten() {
                let path = entry.path();
                match path.extension().and_then(|e| e.to_str()) {
                    Some("safetensors") => found.push(path),
                    Some("bin") | Some("pt") | Some("pth") | Some("ckpt") => pickles.push(path),
                    _ => {}
                }
            }
            found.sort();
            if found.is_empty() {
                let message = if pickles.is_empty() {
                    "no *.safetensors weights found".to_string()
                } else {
                    format!(
                        "only PyTorch pickle weights found ({}); medr1 reads safetensors only, because \
                         unpickling can execute code. Convert once in Python: \
                         `Qwen2VLForConditionalGeneration.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`",
                        pickles
                            .iter()
                            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                return Err(checkpoint_err(dir, message));
            }
            found
        };
        Self::from_paths(dir, paths)
    }

    /// Indexes the given files.
    pub fn from_paths(dir: &Path, paths: Vec<PathBuf>) -> Result<Self, Qwen2VLError> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        let (mut hub, mut runtime) = (0usize, 0usize);
        for (fi, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| Qwen2VLError::io(path, e))?;
            // SAFETY: the file is opened read-only and only read while mapped; a concurrent writer
            // truncating it is outside what a checkpoint directory promises.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Qwen2VLError::io(path, e))?;
            let st = SafeTensors::deserialize(&map).map_err(|e| {
                checkpoint_err(
                    dir,
                    format!("{}: not a valid safetensors file: {e}", path.display()),
                )
            })?;
            for (key, view) in st.tensors() {
                let (hk, renamed) = hub_key(&key);
                if renamed {
                    runtime += 1;
                } else if hk != "lm_head.weight" {
                    hub += 1;
                }
                let stored = StoredTensor {
                    file: fi,
                    key: key.clone(),
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                };
                if let Some(prev) = index.insert(hk.clone(), stored) {
                    return Err(checkpoint_err(
                        dir,
                        format!(
                            "tensor `{hk}` stored twice (as `{}` in {} and as `{key}` in {})",
                            prev.key,
                            paths[prev.file].display(),
                            path.display()
                        ),
                    ));
                }
            }
            maps.push(map);
        }
        let layout = match (hub, runtime) {
            (_, 0) => KeyLayout::Hub,
            (0, _) => KeyLayout::Runtime,
            _ => KeyLayout::Mixed,
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            paths,
            maps,
            index,
            layout,
        })
    }

    /// The values of a stored tensor as f32 (bf16 and f16 widen exactly).
    pub fn read_f32(&self, t: &StoredTensor) -> Result<Vec<f32>, Qwen2VLError> {
        let st = SafeTensors::deserialize(&self.maps[t.file]).map_err(|e| {
            checkpoint_err(&self.dir, format!("{}: {e}", self.paths[t.file].display()))
        })?;
        let view = st
            .tensor(&t.key)
            .map_err(|e| checkpoint_err(&self.dir, format!("tensor `{}`: {e}", t.key)))?;
        let values = widen_to_f32(t.dtype, view.data()).ok_or_else(|| {
            checkpoint_err(
                &self.dir,
                format!(
                    "tensor `{}` has dtype {:?}; only f32, bf16, f16 and f64 weights are supported",
                    t.key, t.dtype
                ),
            )
        })?;
        Ok(values)
    }

    /// Storage dtypes and how many tensors use each.
    pub fn dtype_counts(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for t in self.index.values() {
            *counts.entry(format!("{:?}", t.dtype)).or_default() += 1;
        }
        let mut v: Vec<_> = counts.into_iter().collect();
        v.sort();
        v
    }
}

/// Little-endian safetensors values as f32 (bf16 and f16 widen exactly, f64 rounds); `None`
/// for other dtypes.
pub(crate) fn widen_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => return None,
    })
}
