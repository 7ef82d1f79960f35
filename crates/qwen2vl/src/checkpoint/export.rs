//! Saving a model as a hub-layout checkpoint that transformers opens: `config.json`,
//! `generation_config.json` and `model.safetensors` (hub key names, no `lm_head.weight` when
//! tied). Files are written to temporary names and renamed, so a crash never leaves a
//! half-written checkpoint under the real names. A projection's LoRA adapter, if any, is
//! merged into its weight: the checkpoint computes what the model does.

use std::collections::HashMap;
use std::path::Path;

use burn::nn::{LayerNorm, Linear, RmsNorm};
use burn::tensor::{backend::Backend, Tensor};
use safetensors::{Dtype, View};

use crate::error::Qwen2VLError;
use crate::lora::Proj;
use crate::model::Qwen2VL;
use crate::vision::VisionNorm;

/// Storage dtype of a saved checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    BF16,
}

impl SaveDtype {
    fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::BF16 => "bfloat16",
        }
    }
}

/// One parameter in checkpoint orientation (`[out, in]` for linear weights).
pub struct NamedTensor {
    pub key: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// A tensor's shape and values on the host, as f32.
pub(crate) fn host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<usize>, Vec<f32>) {
    let shape = t.dims().to_vec();
    let values = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 after conversion");
    (shape, values)
}

struct Collector(Vec<NamedTensor>);

impl Collector {
    fn push<B: Backend, const D: usize>(&mut self, key: String, t: Tensor<B, D>) {
        let (shape, values) = host_f32(t);
        self.0.push(NamedTensor { key, shape, values });
    }

    fn linear<B: Backend>(&mut self, prefix: &str, l: &Linear<B>) {
        self.push(format!("{prefix}.weight"), l.weight.val().transpose());
        if let Some(b) = &l.bias {
            self.push(format!("{prefix}.bias"), b.val());
        }
    }

    /// A projection as the layer computes it: an adapter, if any, merged into the weight.
    fn proj<B: Backend>(&mut self, prefix: &str, p: &Proj<B>) {
        self.push(format!("{prefix}.weight"), p.merged_weight().transpose());
        if let Some(b) = &p.base.bias {
            self.push(format!("{prefix}.bias"), b.val());
        }
    }

    fn layer_norm<B: Backend>(&mut self, prefix: &str, n: &LayerNorm<B>) {
        self.push(format!("{prefix}.weight"), n.gamma.val());
        if let Some(b) = &n.beta {
            self.push(format!("{prefix}.bias"), b.val());
        }
    }

    fn vision_norm<B: Backend>(&mut self, prefix: &str, n: &VisionNorm<B>) {
        match n {
            VisionNorm::Layer(n) => self.layer_norm(prefix, n),
            VisionNorm::Rms(n) => self.rms_norm(&format!("{prefix}.weight"), n),
        }
    }

    fn rms_norm<B: Backend>(&mut self, key: &str, n: &RmsNorm<B>) {
        self.push(key.to_string(), n.gamma.val());
    }
}

/// Every parameter under its hub key, in checkpoint orientation.
pub fn named_tensors<B: Backend>(model: &Qwen2VL<B>) -> Vec<NamedTensor> {
    let mut c = Collector(Vec::new());
    let v = &model.visual;
    let vc = &v.config;
    let kernel = [
        vc.embed_dim,
        vc.in_channels,
        vc.temporal_patch_size,
        vc.patch_size,
        vc.patch_size,
    ];
    c.push(
        "visual.patch_embed.proj.weight".into(),
        v.patch_embed.weight.val().transpose().reshape(kernel),
    );
    for (i, b) in v.blocks.iter().enumerate() {
        let p = format!("visual.blocks.{i}");
        c.vision_norm(&format!("{p}.norm1"), &b.norm1);
        c.vision_norm(&format!("{p}.norm2"), &b.norm2);
        for (name, proj) in b.projections() {
            c.proj(&format!("{p}.{name}"), proj);
        }
    }
    c.vision_norm("visual.merger.ln_q", &v.merger.ln_q);
    c.proj("visual.merger.mlp.0", &v.merger.fc1);
    c.proj("visual.merger.mlp.2", &v.merger.fc2);

    let t = &model.text;
    c.push(
        "model.embed_tokens.weight".into(),
        t.embed_tokens.weight.val(),
    );
    for (i, l) in t.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        c.rms_norm(&format!("{p}.input_layernorm.weight"), &l.input_layernorm);
        c.proj(&format!("{p}.self_attn.q_proj"), &l.q_proj);
        c.proj(&format!("{p}.self_attn.k_proj"), &l.k_proj);
        c.proj(&format!("{p}.self_attn.v_proj"), &l.v_proj);
        c.proj(&format!("{p}.self_attn.o_proj"), &l.o_proj);
        c.rms_norm(
            &format!("{p}.post_attention_layernorm.weight"),
            &l.post_attention_layernorm,
        );
        c.proj(&format!("{p}.mlp.gate_proj"), &l.gate_proj);
        c.proj(&format!("{p}.mlp.up_proj"), &l.up_proj);
        c.proj(&format!("{p}.mlp.down_proj"), &l.down_proj);
    }
    c.rms_norm("model.norm.weight", &t.norm);
    if let Some(head) = &model.lm_head {
        c.linear("lm_head", head);
    }
    c.0
}

struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

pub(crate) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), Qwen2VLError>,
) -> Result<(), Qwen2VLError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.partial"));
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Qwen2VLError::io(path, e))
}

/// Writes `model` to `dir` (created if needed) as a hub-layout checkpoint.
pub fn save_model<B: Backend>(
    model: &Qwen2VL<B>,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<(), Qwen2VLError> {
    std::fs::create_dir_all(dir).map_err(|e| Qwen2VLError::io(dir, e))?;
    let tensors: Vec<(String, Bytes)> = named_tensors(model)
        .into_iter()
        .map(|t| {
            let data = match dtype {
                SaveDtype::F32 => t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                SaveDtype::BF16 => t
                    .values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
            let st_dtype = match dtype {
                SaveDtype::F32 => Dtype::F32,
                SaveDtype::BF16 => Dtype::BF16,
            };
            (
                t.key,
                Bytes {
                    dtype: st_dtype,
                    shape: t.shape,
                    data,
                },
            )
        })
        .collect();
    let weights = dir.join("model.safetensors");
    write_atomically(&weights, |tmp| {
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(
            tensors.iter().map(|(k, b)| (k.as_str(), b)),
            Some(metadata),
            tmp,
        )
        .map_err(|e| Qwen2VLError::Checkpoint {
            dir: dir.to_path_buf(),
            message: format!("writing model.safetensors: {e}"),
        })
    })?;
    let config = model.config.to_hub_json(dtype.torch_name());
    let text = serde_json::to_string_pretty(&config).expect("JSON value serialises");
    let config_path = dir.join("config.json");
    write_atomically(&config_path, |tmp| {
        std::fs::write(tmp, &text).map_err(|e| Qwen2VLError::io(tmp, e))
    })?;
    let mut generation = serde_json::json!({"_from_model_config": true});
    if let Some(bos) = model.config.bos_token_id {
        generation["bos_token_id"] = bos.into();
    }
    if !model.config.eos_token_ids.is_empty() {
        generation["eos_token_id"] = model.config.eos_token_ids.clone().into();
    }
    let gen_path = dir.join("generation_config.json");
    let gen_text = serde_json::to_string_pretty(&generation).expect("JSON value serialises");
    write_atomically(&gen_path, |tmp| {
        std::fs::write(tmp, &gen_text).map_err(|e| Qwen2VLError::io(tmp, e))
    })
}
