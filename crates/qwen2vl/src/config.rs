//! Model configuration, read from a checkpoint's `config.json`.
//!
//! Two layouts exist in the wild: the flat one of the released hub checkpoints (`rope_scaling`,
//! `vision_config.in_chans`, text fields at the root) and the nested one transformers 5 writes
//! (`text_config`, `vision_config`, `rope_parameters`, `in_channels`). Both parse into the same
//! [`Qwen2VLConfig`]; every number comes from the file, nothing is assumed for a model size.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::Qwen2VLError;

/// The text decoder (a Qwen2 language model with multimodal RoPE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Splits the rotary half-dimensions between the temporal, height and width position rows.
    pub mrope_section: [usize; 3],
    pub max_position_embeddings: usize,
    pub hidden_act: String,
}

/// The vision tower (ViT + PatchMerger).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: usize,
    pub num_heads: usize,
    /// Qwen2-VL's MLP width over `embed_dim` (0 for Qwen2.5-VL: see [`VisionConfig::mlp_dim`]).
    pub mlp_ratio: f64,
    pub in_channels: usize,
    /// Output width of the PatchMerger: the text hidden size.
    pub hidden_size: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub rope_theta: f64,
    pub hidden_act: String,
    /// What differs between the architectures' towers.
    pub kind: VisionKind,
}

/// The vision towers of the two architectures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum VisionKind {
    /// Qwen2-VL: LayerNorm, a QuickGELU MLP (`fc1`, `fc2`) of width `embed_dim * mlp_ratio`,
    /// attention over each whole image.
    Qwen2VL,
    /// Qwen2.5-VL: RMSNorm, a gated SiLU MLP with biases (`gate_proj`, `up_proj`,
    /// `down_proj`) of width `intermediate_size`, and attention within windows of
    /// `window_size` pixels (square, in whole merged tokens) except in the blocks
    /// `fullatt_block_indexes`, which attend over each whole image.
    Qwen25VL {
        intermediate_size: usize,
        window_size: usize,
        fullatt_block_indexes: Vec<usize>,
        /// Temporal position spacing of video frames (read and written back, unused for images).
        tokens_per_second: usize,
    },
}

impl VisionConfig {
    /// The width of a block's MLP.
    pub fn mlp_dim(&self) -> usize {
        match &self.kind {
            VisionKind::Qwen2VL => (self.embed_dim as f64 * self.mlp_ratio) as usize,
            VisionKind::Qwen25VL {
                intermediate_size, ..
            } => *intermediate_size,
        }
    }

    /// Merged tokens per side of an attention window (Qwen2.5-VL), `None` for full attention
    /// in every block.
    pub fn window_tokens(&self) -> Option<usize> {
        match &self.kind {
            VisionKind::Qwen2VL => None,
            VisionKind::Qwen25VL { window_size, .. } => {
                Some(window_size / self.spatial_merge_size / self.patch_size)
            }
        }
    }

    /// Whether block `i` attends over whole images.
    pub fn full_attention(&self, i: usize) -> bool {
        match &self.kind {
            VisionKind::Qwen2VL => true,
            VisionKind::Qwen25VL {
                fullatt_block_indexes,
                ..
            } => fullatt_block_indexes.contains(&i),
        }
    }
}

/// Everything needed to build a Qwen2-VL or Qwen2.5-VL model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2VLConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub tie_word_embeddings: bool,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    pub vision_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// dtype named in the file (`torch_dtype` or `dtype`), informational.
    pub dtype: Option<String>,
}

/// Reads a JSON object field by field, naming the field in every error.
struct Fields<'a> {
    file: &'a str,
    scope: &'a str,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, key: &str, message: &str) -> Qwen2VLError {
        let field = if self.scope.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.scope)
        };
        Qwen2VLError::Config {
            file: self.file.to_string(),
            field,
            message: message.to_string(),
        }
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>, Qwen2VLError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(key, &format!("expected a non-negative integer, got {v}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, Qwen2VLError> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(key, "missing required field"))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>, Qwen2VLError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, &format!("expected a number, got {v}"))),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>, Qwen2VLError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, &format!("expected true or false, got {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<String>, Qwen2VLError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.err(key, &format!("expected a string, got {v}"))),
        }
    }

    fn u32_opt(&self, key: &str) -> Result<Option<u32>, Qwen2VLError> {
        Ok(self.usize_opt(key)?.map(|n| n as u32))
    }

    /// `eos_token_id` may be one id or a list of ids.
    fn ids(&self, key: &str) -> Result<Vec<u32>, Qwen2VLError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as u32)
                        .ok_or_else(|| self.err(key, &format!("expected token ids, got {v}")))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .map(|n| vec![n as u32])
                .ok_or_else(|| self.err(key, &format!("expected a token id, got {v}"))),
        }
    }

    fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>, Qwen2VLError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.err(key, &format!("expected an object, got {v}"))),
        }
    }

    fn nested(&self, key: &'a str, map: &'a Map<String, Value>) -> Fields<'a> {
        Fields {
            file: self.file,
            scope: key,
            map,
        }
    }
}

fn mrope_section(
    fields: &Fields,
    key: &str,
    rope: &Map<String, Value>,
) -> Result<Option<[usize; 3]>, Qwen2VLError> {
    let Some(v) = rope.get("mrope_section").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let parts: Option<Vec<usize>> = v
        .as_array()
        .map(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect())
        .unwrap_or(None);
    match parts.as_deref() {
        Some([t, h, w]) => Ok(Some([*t, *h, *w])),
        _ => Err(fields.err(
            &format!("{key}.mrope_section"),
            &format!("expected three integers, got {v}"),
        )),
    }
}

impl Qwen2VLConfig {
    /// Reads `config.json` (either layout).
    pub fn from_file(path: &Path) -> Result<Self, Qwen2VLError> {
        let text = std::fs::read_to_string(path).map_err(|e| Qwen2VLError::io(path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses a `config.json` body; `origin` names the file in error messages.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, Qwen2VLError> {
        let value: Value = serde_json::from_str(text).map_err(|e| Qwen2VLError::Config {
            file: origin.to_string(),
            field: format!("line {} column {}", e.line(), e.column()),
            message: format!("invalid JSON: {e}"),
        })?;
        let Value::Object(root_map) = &value else {
            return Err(Qwen2VLError::Config {
                file: origin.to_string(),
                field: "(root)".into(),
                message: "expected a JSON object".into(),
            });
        };
        let root = Fields {
            file: origin,
            scope: "",
            map: root_map,
        };
        let qwen25 = match root.str_opt("model_type")?.as_deref() {
            None | Some("qwen2_vl") => false,
            Some("qwen2_5_vl") => true,
            Some(other) => {
                return Err(root.err(
                    "model_type",
                    &format!("this is a `{other}` checkpoint; medr1 implements `qwen2_vl` (Qwen2-VL) and `qwen2_5_vl` (Qwen2.5-VL)"),
                ));
            }
        };
        // Nested (transformers 5) layout keeps text fields in `text_config`; flat keeps them at the root.
        let text_map = root.object("text_config")?;
        let text = match text_map {
            Some(m) => root.nested("text_config", m),
            None => Fields {
                file: origin,
                scope: "",
                map: root_map,
            },
        };
        let vision_map = root
            .object("vision_config")?
            .ok_or_else(|| root.err("vision_config", "missing required field"))?;
        let vision = root.nested("vision_config", vision_map);

        let hidden_size = text.usize("hidden_size")?;
        let num_attention_heads = text.usize("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(text.err("num_attention_heads", "must divide hidden_size"));
        }
        let head_dim = text
            .usize_opt("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads);

        // Rotary settings: `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (hub).
        let (rope_theta, mrope) = match text.object("rope_parameters")? {
            Some(rp) => {
                let f = text.nested("rope_parameters", rp);
                let theta = f
                    .f64_opt("rope_theta")?
                    .or(text.f64_opt("rope_theta")?)
                    .unwrap_or(10000.0);
                (theta, mrope_section(&text, "rope_parameters", rp)?)
            }
            None => {
                let theta = text.f64_opt("rope_theta")?.unwrap_or(10000.0);
                let scaling = match text.object("rope_scaling")? {
                    Some(m) => Some(m),
                    None => root.object("rope_scaling")?,
                };
                let section = match scaling {
                    Some(m) => mrope_section(&text, "rope_scaling", m)?,
                    None => None,
                };
                (theta, section)
            }
        };
        // transformers' default when the field is absent.
        let mrope_section = mrope.unwrap_or([16, 24, 24]);
        if mrope_section.iter().sum::<usize>() * 2 != head_dim {
            return Err(text.err(
                "mrope_section",
                &format!(
                    "sections {mrope_section:?} must sum to head_dim/2 = {}",
                    head_dim / 2
                ),
            ));
        }

        let num_key_value_heads = text
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(text.err("num_key_value_heads", "must divide num_attention_heads"));
        }
        let hidden_act = text.str_opt("hidden_act")?.unwrap_or_else(|| "silu".into());
        if hidden_act != "silu" {
            return Err(text.err(
                "hidden_act",
                &format!("only `silu` is supported, got `{hidden_act}`"),
            ));
        }
        let text_cfg = TextConfig {
            vocab_size: text.usize("vocab_size")?,
            hidden_size,
            intermediate_size: text.usize("intermediate_size")?,
            num_hidden_layers: text.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: text.f64_opt("rms_norm_eps")?.unwrap_or(1e-5),
            rope_theta,
            mrope_section,
            max_position_embeddings: text.usize_opt("max_position_embeddings")?.unwrap_or(32768),
            hidden_act,
        };

        // Qwen2-VL names the tower's width `embed_dim` and the merger's output `hidden_size`;
        // Qwen2.5-VL names them `hidden_size` and `out_hidden_size`.
        let (embed_dim, out_dim) = if qwen25 {
            (
                vision.usize_opt("hidden_size")?.unwrap_or(3584),
                vision.usize_opt("out_hidden_size")?.unwrap_or(3584),
            )
        } else {
            (
                vision.usize_opt("embed_dim")?.unwrap_or(1280),
                vision.usize_opt("hidden_size")?.unwrap_or(3584),
            )
        };
        let num_heads = vision.usize_opt("num_heads")?.unwrap_or(16);
        if num_heads == 0 || embed_dim % num_heads != 0 || (embed_dim / num_heads) % 4 != 0 {
            return Err(vision.err(
                "num_heads",
                &format!(
                    "{} / num_heads must be a whole multiple of 4 (2-D rotary)",
                    if qwen25 { "hidden_size" } else { "embed_dim" }
                ),
            ));
        }
        let vision_rope_theta = match vision.object("rope_parameters")? {
            Some(rp) => vision.nested("rope_parameters", rp).f64_opt("rope_theta")?,
            None => None,
        }
        .unwrap_or(10000.0);
        let expected_act = if qwen25 { "silu" } else { "quick_gelu" };
        let vision_act = vision
            .str_opt("hidden_act")?
            .unwrap_or_else(|| expected_act.into());
        if vision_act != expected_act {
            return Err(vision.err(
                "hidden_act",
                &format!("only `{expected_act}` is supported, got `{vision_act}`"),
            ));
        }
        let patch_size = vision
            .usize_opt("patch_size")?
            .or(vision.usize_opt("spatial_patch_size")?)
            .unwrap_or(14);
        let spatial_merge_size = vision.usize_opt("spatial_merge_size")?.unwrap_or(2);
        let depth = vision.usize_opt("depth")?.unwrap_or(32);
        let kind = if qwen25 {
            let window_size = vision.usize_opt("window_size")?.unwrap_or(112);
            let unit = spatial_merge_size * patch_size;
            if unit == 0 || window_size == 0 || window_size % unit != 0 {
                return Err(vision.err(
                    "window_size",
                    &format!(
                        "must be a positive multiple of patch_size x spatial_merge_size = {unit}"
                    ),
                ));
            }
            let fullatt_block_indexes = match vision.get("fullatt_block_indexes") {
                None => vec![7, 15, 23, 31],
                Some(v) => v
                    .as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|x| x.as_u64().map(|n| n as usize))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| {
                        vision.err(
                            "fullatt_block_indexes",
                            &format!("expected a list of block indexes, got {v}"),
                        )
                    })?,
            };
            if let Some(i) = fullatt_block_indexes.iter().find(|&&i| i >= depth) {
                return Err(vision.err(
                    "fullatt_block_indexes",
                    &format!("block {i} does not exist (depth {depth})"),
                ));
            }
            VisionKind::Qwen25VL {
                intermediate_size: vision.usize_opt("intermediate_size")?.unwrap_or(3420),
                window_size,
                fullatt_block_indexes,
                tokens_per_second: vision.usize_opt("tokens_per_second")?.unwrap_or(4),
            }
        } else {
            VisionKind::Qwen2VL
        };
        // 5.x reads `in_channels`; the hub's `in_chans` is ignored by transformers (default 3).
        let in_channels = vision.usize_opt("in_channels")?.unwrap_or(3);
        let vision_cfg = VisionConfig {
            depth,
            embed_dim,
            num_heads,
            mlp_ratio: if qwen25 {
                0.0
            } else {
                vision.f64_opt("mlp_ratio")?.unwrap_or(4.0)
            },
            in_channels,
            hidden_size: out_dim,
            patch_size,
            temporal_patch_size: vision.usize_opt("temporal_patch_size")?.unwrap_or(2),
            spatial_merge_size,
            rope_theta: vision_rope_theta,
            hidden_act: vision_act,
            kind,
        };
        if vision_cfg.hidden_size != text_cfg.hidden_size {
            return Err(vision.err(
                if qwen25 {
                    "out_hidden_size"
                } else {
                    "hidden_size"
                },
                &format!(
                    "the PatchMerger output ({}) must equal the text hidden_size ({})",
                    vision_cfg.hidden_size, text_cfg.hidden_size
                ),
            ));
        }

        // Special ids live at the root in both layouts, sometimes also in text_config.
        let id = |key: &str, default: u32| -> Result<u32, Qwen2VLError> {
            Ok(root.u32_opt(key)?.or(text.u32_opt(key)?).unwrap_or(default))
        };
        let mut eos_token_ids = root.ids("eos_token_id")?;
        if eos_token_ids.is_empty() {
            eos_token_ids = text.ids("eos_token_id")?;
        }
        let tie = match root.bool_opt("tie_word_embeddings")? {
            Some(t) => t,
            None => text.bool_opt("tie_word_embeddings")?.unwrap_or(false),
        };
        Ok(Self {
            text: text_cfg,
            vision: vision_cfg,
            tie_word_embeddings: tie,
            image_token_id: id("image_token_id", 151655)?,
            video_token_id: id("video_token_id", 151656)?,
            vision_start_token_id: id("vision_start_token_id", 151652)?,
            vision_end_token_id: id("vision_end_token_id", 151653)?,
            vision_token_id: root.u32_opt("vision_token_id")?,
            bos_token_id: root
                .u32_opt("bos_token_id")?
                .or(text.u32_opt("bos_token_id")?),
            eos_token_ids,
            dtype: root.str_opt("torch_dtype")?.or(root.str_opt("dtype")?),
        })
    }

    /// `config.json` in the flat layout of the released checkpoints, which every transformers
    /// version (4.45+ and 5.x) loads.
    pub fn to_hub_json(&self, dtype: &str) -> Value {
        let t = &self.text;
        let v = &self.vision;
        let (architecture, model_type) = match v.kind {
            VisionKind::Qwen2VL => ("Qwen2VLForConditionalGeneration", "qwen2_vl"),
            VisionKind::Qwen25VL { .. } => ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
        };
        let mut root = json!({
            "architectures": [architecture],
            "model_type": model_type,
            "attention_dropout": 0.0,
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "max_window_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": t.mrope_section},
            "sliding_window": t.max_position_embeddings,
            "use_sliding_window": false,
            "use_cache": true,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": dtype,
            "vocab_size": t.vocab_size,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_config": Self::hub_vision_json(v),
        });
        let map = root.as_object_mut().expect("object literal");
        if t.head_dim * t.num_attention_heads != t.hidden_size {
            map.insert("head_dim".into(), json!(t.head_dim));
        }
        if let Some(id) = self.vision_token_id {
            map.insert("vision_token_id".into(), json!(id));
        }
        if let Some(id) = self.bos_token_id {
            map.insert("bos_token_id".into(), json!(id));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                map.insert("eos_token_id".into(), json!(one));
            }
            many => {
                map.insert("eos_token_id".into(), json!(many));
            }
        }
        root
    }

    /// The `vision_config` of the released checkpoints of either architecture.
    fn hub_vision_json(v: &VisionConfig) -> Value {
        match &v.kind {
            VisionKind::Qwen2VL => json!({
                "depth": v.depth,
                "embed_dim": v.embed_dim,
                // transformers' strict config wants an int when the ratio is whole.
                "mlp_ratio": if v.mlp_ratio.fract() == 0.0 { json!(v.mlp_ratio as u64) } else { json!(v.mlp_ratio) },
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "in_channels": v.in_channels,
                "hidden_size": v.hidden_size,
                "hidden_act": v.hidden_act,
                "patch_size": v.patch_size,
                "spatial_patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
            }),
            VisionKind::Qwen25VL {
                intermediate_size,
                window_size,
                fullatt_block_indexes,
                tokens_per_second,
            } => json!({
                "depth": v.depth,
                "hidden_act": v.hidden_act,
                "hidden_size": v.embed_dim,
                "intermediate_size": intermediate_size,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "in_channels": v.in_channels,
                "out_hidden_size": v.hidden_size,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "spatial_patch_size": v.patch_size,
                "window_size": window_size,
                "fullatt_block_indexes": fullatt_block_indexes,
                "tokens_per_second": tokens_per_second,
                "temporal_patch_size": v.temporal_patch_size,
            }),
        }
    }

    /// Width of one flattened patch: channels x temporal x patch x patch (1176 for Qwen2-VL).
    pub fn patch_dim(&self) -> usize {
        let v = &self.vision;
        v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size
    }

    /// Parameter count per tower, computed from the config alone (nothing is allocated).
    pub fn parameter_counts(&self) -> ParameterCounts {
        let v = &self.vision;
        let e = v.embed_dim;
        let mlp = v.mlp_dim();
        // LayerNorm has a weight and a bias, RMSNorm a weight; the gated MLP a third matrix.
        let (norm, mlp_in) = match v.kind {
            VisionKind::Qwen2VL => (2 * e, 1),
            VisionKind::Qwen25VL { .. } => (e, 2),
        };
        let block = 2 * norm // norm1, norm2
            + (3 * e * e + 3 * e) // qkv
            + (e * e + e) // proj
            + mlp_in * (mlp * e + mlp) // fc1 (gate_proj, up_proj)
            + (e * mlp + e); // fc2 (down_proj)
        let merged = e * v.spatial_merge_size * v.spatial_merge_size;
        let merger = norm + (merged * merged + merged) + (v.hidden_size * merged + v.hidden_size);
        let vision = self.patch_dim() * e + v.depth * block + merger;

        let t = &self.text;
        let d = t.hidden_size;
        let q = t.num_attention_heads * t.head_dim;
        let kv = t.num_key_value_heads * t.head_dim;
        let layer = 2 * d // two RMSNorms
            + (d * q + q) + 2 * (d * kv + kv) // q, k, v with bias
            + q * d // o_proj, no bias
            + 3 * d * t.intermediate_size; // gate, up, down
        let embed = t.vocab_size * d;
        let text = embed + t.num_hidden_layers * layer + d;
        let lm_head = if self.tie_word_embeddings { 0 } else { embed };
        ParameterCounts {
            vision,
            text,
            lm_head,
        }
    }
}

/// Unique parameters per part of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterCounts {
    pub vision: usize,
    /// Embeddings, decoder layers and the final norm.
    pub text: usize,
    /// Zero when the LM head is tied to the embeddings.
    pub lm_head: usize,
}

impl ParameterCounts {
    pub fn total(&self) -> usize {
        self.vision + self.text + self.lm_head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN2VL_2B: &str =
        include_str!("../../../tests/fixtures/qwen2_vl_2b_instruct_config.json");

    #[test]
    fn real_2b_config_counts_2_208_985_600_parameters() {
        let cfg = Qwen2VLConfig::from_json_str(QWEN2VL_2B, "2b").unwrap();
        assert_eq!(cfg.text.head_dim, 128);
        assert_eq!(cfg.text.mrope_section, [16, 24, 24]);
        assert_eq!(cfg.vision.hidden_size, 1536);
        assert!(cfg.tie_word_embeddings);
        assert_eq!(cfg.parameter_counts().total(), 2_208_985_600);
    }

    const QWEN25VL_3B: &str =
        include_str!("../../../tests/fixtures/qwen2_5_vl_3b_instruct_config.json");

    /// transformers' Qwen2_5_VLForConditionalGeneration built from this config (on the meta
    /// device) has 3,754,622,976 parameters, 668,684,288 of them in the vision tower.
    #[test]
    fn real_qwen25vl_3b_config_counts_3_754_622_976_parameters() {
        let cfg = Qwen2VLConfig::from_json_str(QWEN25VL_3B, "3b").unwrap();
        assert_eq!(cfg.vision.embed_dim, 1280);
        assert_eq!(cfg.vision.hidden_size, 2048);
        assert_eq!(cfg.vision.mlp_dim(), 3420);
        assert_eq!(cfg.vision.window_tokens(), Some(4));
        assert!(cfg.vision.full_attention(7) && !cfg.vision.full_attention(8));
        let counts = cfg.parameter_counts();
        assert_eq!(counts.vision, 668_684_288);
        assert_eq!(counts.total(), 3_754_622_976);
        let again = Qwen2VLConfig::from_json_str(&cfg.to_hub_json("bfloat16").to_string(), "saved")
            .unwrap();
        assert_eq!(cfg, again);
    }

    #[test]
    fn qwen25vl_window_errors_name_the_field() {
        let bad = QWEN25VL_3B.replace("\"window_size\": 112", "\"window_size\": 100");
        let err = Qwen2VLConfig::from_json_str(&bad, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("vision_config.window_size"), "{err}");
        let bad = QWEN25VL_3B.replace("31\n", "32\n");
        let err = Qwen2VLConfig::from_json_str(&bad, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fullatt_block_indexes"), "{err}");
    }

    #[test]
    fn hub_json_round_trips() {
        let cfg = Qwen2VLConfig::from_json_str(QWEN2VL_2B, "2b").unwrap();
        let again = Qwen2VLConfig::from_json_str(&cfg.to_hub_json("bfloat16").to_string(), "saved")
            .unwrap();
        assert_eq!(cfg, again);
    }

    #[test]
    fn errors_name_the_field() {
        let bad = QWEN2VL_2B.replace(
            "\"hidden_size\": 1536,\n  \"initializer_range\"",
            "\"hidden_size\": \"wide\",\n  \"initializer_range\"",
        );
        let err = Qwen2VLConfig::from_json_str(&bad, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cfg.json") && err.contains("hidden_size"),
            "{err}"
        );

        let err = Qwen2VLConfig::from_json_str("{\"vocab_size\": 3", "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");

        let other = QWEN2VL_2B.replace(
            "\"model_type\": \"qwen2_vl\"",
            "\"model_type\": \"qwen3_vl\"",
        );
        let err = Qwen2VLConfig::from_json_str(&other, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("qwen3_vl") && err.contains("model_type"),
            "{err}"
        );
    }
}
