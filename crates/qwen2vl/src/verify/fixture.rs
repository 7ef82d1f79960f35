//! Reading a reference fixture directory (the format of `make_fixtures.py`): `manifest.json`,
//! `fixtures.safetensors`, `hf_model/`, `hub_config.json`, `runtime_layout_model.safetensors`.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::Qwen2VLError;

pub struct Fixture {
    pub dir: PathBuf,
    pub manifest: Value,
    map: Mmap,
}

/// A reference tensor: shape and values widened to f64 (exact for f32, i64 ids and u8 pixels).
#[derive(Debug, Clone)]
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl RefTensor {
    pub fn as_f32(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }

    pub fn as_i64(&self) -> Vec<i64> {
        self.values.iter().map(|&v| v as i64).collect()
    }
}

fn malformed(dir: &Path, message: String) -> Qwen2VLError {
    Qwen2VLError::Checkpoint {
        dir: dir.to_path_buf(),
        message: format!("not a reference fixture directory: {message}"),
    }
}

impl Fixture {
    pub fn open(dir: &Path) -> Result<Self, Qwen2VLError> {
        let manifest_path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| malformed(dir, format!("manifest.json: {e}")))?;
        let manifest: Value = serde_json::from_str(&text)
            .map_err(|e| malformed(dir, format!("manifest.json: invalid JSON: {e}")))?;
        if !manifest.get("cases").is_some_and(Value::is_object) {
            return Err(malformed(dir, "manifest.json has no `cases` object".into()));
        }
        let tensors_path = dir.join("fixtures.safetensors");
        let file = File::open(&tensors_path)
            .map_err(|e| malformed(dir, format!("fixtures.safetensors: {e}")))?;
        // SAFETY: read-only mapping of a file nobody writes while we read it.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Qwen2VLError::io(&tensors_path, e))?;
        SafeTensors::deserialize(&map)
            .map_err(|e| malformed(dir, format!("fixtures.safetensors: {e}")))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            map,
        })
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.map).expect("validated when opened")
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors().tensor(name).is_ok()
    }

    /// Case names in manifest order, e.g. `single`, `multi`, `batch`.
    pub fn cases(&self) -> Vec<String> {
        self.manifest["cases"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn get(&self, name: &str) -> Result<RefTensor, Qwen2VLError> {
        let st = self.tensors();
        let view = st.tensor(name).map_err(|_| {
            malformed(
                &self.dir,
                format!("fixtures.safetensors has no tensor `{name}`"),
            )
        })?;
        let b = view.data();
        let values: Vec<f64> = match view.dtype() {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            Dtype::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64)
                .collect(),
            Dtype::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            Dtype::U8 => b.iter().map(|&v| v as f64).collect(),
            other => {
                return Err(malformed(
                    &self.dir,
                    format!("tensor `{name}` has unsupported dtype {other:?}"),
                ))
            }
        };
        Ok(RefTensor {
            shape: view.shape().to_vec(),
            values,
        })
    }

    /// The image grids of a case, `[n_images][3]`.
    pub fn grids(&self, case: &str) -> Result<Vec<[usize; 3]>, Qwen2VLError> {
        let g = self.get(&format!("{case}.image_grid_thw"))?;
        Ok(g.values
            .chunks_exact(3)
            .map(|c| [c[0] as usize, c[1] as usize, c[2] as usize])
            .collect())
    }

    /// Token ids `[batch, len]` as rows.
    pub fn id_rows(&self, name: &str) -> Result<Vec<Vec<u32>>, Qwen2VLError> {
        let t = self.get(name)?;
        let len = *t.shape.last().unwrap_or(&0);
        if len == 0 {
            return Ok(Vec::new());
        }
        Ok(t.values
            .chunks_exact(len)
            .map(|r| r.iter().map(|&v| v as u32).collect())
            .collect())
    }
}
