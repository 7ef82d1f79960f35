//! LoRA adapter directories as PEFT writes them (`PeftModel.save_pretrained`):
//! `adapter_config.json` and `adapter_model.safetensors`, keys
//! `base_model.model.{module}.lora_A.weight` (`[r, in]`) and `...lora_B.weight` (`[out, r]`).
//! Read in both of transformers' module layouts (5.x `model.language_model.layers.N...`,
//! `model.visual...`; 4.x `model.layers.N...`, `visual...`), written in 5.x's, which
//! `PeftModel.from_pretrained` loads onto transformers' Qwen2-VL.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use super::export::{host_f32, write_atomically};
use super::files::widen_to_f32;
use crate::error::Qwen2VLError;
use crate::lora::{LoraAdapter, LoraConfig, TargetMatcher, TargetModules};
use crate::model::Qwen2VL;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

fn err(dir: &Path, message: String) -> Qwen2VLError {
    Qwen2VLError::Checkpoint {
        dir: dir.to_path_buf(),
        message,
    }
}

/// A module name in transformers 5.x's layout, whichever layout `name` is in.
fn current_layout(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.layers.") {
        format!("model.language_model.layers.{rest}")
    } else if let Some(rest) = name.strip_prefix("visual.") {
        format!("model.visual.{rest}")
    } else {
        name.to_string()
    }
}

/// The LoRA settings of a PEFT `adapter_config.json`; refuses the PEFT features medr1 does
/// not implement (DoRA, per-module ranks, trained biases, extra saved modules, ...), naming
/// the field.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig, Qwen2VLError> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| Qwen2VLError::io(&path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| err(dir, format!("{ADAPTER_CONFIG} is not valid JSON: {e}")))?;
    let field = |name: &str, message: String| Qwen2VLError::Config {
        file: path.display().to_string(),
        field: name.into(),
        message,
    };
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(field(
            "peft_type",
            format!("expected \"LORA\", found {peft_type:?}"),
        ));
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| field("r", "missing or not a positive integer".into()))?;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| field("lora_alpha", "missing or not a number".into()))?;
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let use_rslora = v
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let target_modules: TargetModules = match v.get("target_modules") {
        Some(t) => serde_json::from_value(t.clone()).map_err(|_| {
            field(
                "target_modules",
                "expected a list of names or a string".into(),
            )
        })?,
        None => return Err(field("target_modules", "missing".into())),
    };
    let empty = |x: Option<&Value>| match x {
        None | Some(Value::Null) => true,
        Some(Value::Object(m)) => m.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Bool(b)) => !b,
        Some(_) => false,
    };
    for name in [
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "layers_to_transform",
        "use_dora",
        "fan_in_fan_out",
        "lora_bias",
        "trainable_token_indices",
        "target_parameters",
        "layer_replication",
    ] {
        if !empty(v.get(name)) {
            return Err(field(
                name,
                format!("{} is not supported by medr1", v[name]),
            ));
        }
    }
    if let Some(bias) = v.get("bias").and_then(Value::as_str) {
        if bias != "none" {
            return Err(field(
                "bias",
                format!("\"{bias}\" is not supported (only \"none\")"),
            ));
        }
    }
    let cfg = LoraConfig {
        r: r as usize,
        alpha,
        dropout,
        target_modules,
        use_rslora,
    };
    cfg.validate()
        .map_err(|e| field("r/lora_alpha/lora_dropout/target_modules", e.to_string()))?;
    Ok(cfg)
}

/// Loads a PEFT LoRA adapter directory onto `model`: the base frozen, an adapter on every
/// module the file holds weights for. Every module `target_modules` selects must have both
/// matrices, every tensor in the file must belong to one, shapes must fit. Returns the
/// adapted model and the adapter's settings.
pub fn load_adapter<B: Backend>(
    model: Qwen2VL<B>,
    dir: &Path,
) -> Result<(Qwen2VL<B>, LoraConfig), Qwen2VLError> {
    let cfg = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&path).map_err(|e| Qwen2VLError::io(&path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        err(
            dir,
            format!("{ADAPTER_WEIGHTS} is not a safetensors file: {e}"),
        )
    })?;
    // module name (5.x layout) -> (A, B) views, each with its key.
    let mut found: HashMap<String, [Option<String>; 2]> = HashMap::new();
    for key in st.names() {
        let parsed = key.strip_prefix(KEY_PREFIX).and_then(|k| {
            k.strip_suffix(".lora_A.weight")
                .map(|m| (m, 0))
                .or_else(|| k.strip_suffix(".lora_B.weight").map(|m| (m, 1)))
        });
        let Some((module, which)) = parsed else {
            return Err(err(
                dir,
                format!(
                    "{ADAPTER_WEIGHTS}: tensor `{key}` is not a LoRA matrix \
                     (base_model.model.<module>.lora_A.weight / .lora_B.weight)"
                ),
            ));
        };
        found.entry(current_layout(module)).or_default()[which] = Some(key.to_string());
    }
    let device = model.text.embed_tokens.weight.device();
    let mut model = model.no_grad();
    if model.has_adapters() {
        return Err(Qwen2VLError::Lora(
            "the model already carries LoRA adapters".into(),
        ));
    }
    let r = cfg.r;
    let mut used = 0;
    let matcher = TargetMatcher::new(&cfg.target_modules)?;
    let mut attached = 0;
    for (name, proj) in model.projections_mut() {
        let entry = found.get(&name);
        if entry.is_none() && !matcher.matches(&name) {
            continue;
        }
        let [d_in, d_out] = proj.dims();
        let mut read = |which: usize, shape: [usize; 2]| -> Result<Tensor<B, 2>, Qwen2VLError> {
            let suffix = ["lora_A", "lora_B"][which];
            let key = entry.and_then(|e| e[which].clone()).ok_or_else(|| {
                Qwen2VLError::MissingTensor {
                    dir: dir.to_path_buf(),
                    key: format!("{KEY_PREFIX}{name}.{suffix}.weight"),
                    expected: shape.to_vec(),
                }
            })?;
            let view = st.tensor(&key).expect("listed key");
            if view.shape() != shape {
                return Err(Qwen2VLError::Shape {
                    key: key.clone(),
                    expected: shape.to_vec(),
                    found: view.shape().to_vec(),
                    file: path.clone(),
                });
            }
            let values = widen_to_f32(view.dtype(), view.data()).ok_or_else(|| {
                err(
                    dir,
                    format!(
                        "{ADAPTER_WEIGHTS}: tensor `{key}` has dtype {:?} (expected F32, BF16 \
                         or F16)",
                        view.dtype()
                    ),
                )
            })?;
            used += 1;
            Ok(Tensor::from_data(TensorData::new(values, shape), &device))
        };
        let a = read(0, [r, d_in])?.transpose();
        let b = read(1, [d_out, r])?.transpose();
        proj.lora = Some(LoraAdapter::from_tensors(
            crate::params::contiguous(a),
            crate::params::contiguous(b),
            &cfg,
        ));
        attached += 1;
    }
    let total: usize = found.values().map(|e| e.iter().flatten().count()).sum();
    if used != total {
        let known: Vec<String> = model.projections().into_iter().map(|(n, _)| n).collect();
        let mut unknown: Vec<&String> = found.keys().filter(|m| !known.contains(m)).collect();
        unknown.sort();
        return Err(err(
            dir,
            format!(
                "{ADAPTER_WEIGHTS} holds adapters for modules this model does not have or medr1 \
                 does not adapt: {unknown:?}"
            ),
        ));
    }
    if attached == 0 {
        return Err(err(
            dir,
            format!("{ADAPTER_WEIGHTS} holds no LoRA matrices"),
        ));
    }
    Ok((model, cfg))
}

/// Writes the model's adapters as a PEFT adapter directory (created if needed; each file
/// written to a temporary name and renamed). `base_model` goes to `base_model_name_or_path`.
/// Fails when the model has no adapters.
pub fn save_adapter<B: Backend>(
    model: &Qwen2VL<B>,
    cfg: &LoraConfig,
    base_model: Option<&str>,
    dir: &Path,
) -> Result<(), Qwen2VLError> {
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, proj) in model.projections() {
        let Some(l) = &proj.lora else { continue };
        for (suffix, t) in [
            ("lora_A", l.a.val().transpose()),
            ("lora_B", l.b.val().transpose()),
        ] {
            let (shape, values) = host_f32(t);
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.insert(format!("{KEY_PREFIX}{name}.{suffix}.weight"), (shape, data));
        }
    }
    if tensors.is_empty() {
        return Err(Qwen2VLError::Lora(
            "the model has no LoRA adapters to save".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Qwen2VLError::io(dir, e))?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, data))| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                .expect("shape matches data");
            (k.clone(), view)
        })
        .collect();
    write_atomically(&dir.join(ADAPTER_WEIGHTS), |tmp| {
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(
            views.iter().map(|(k, v)| (k.as_str(), v)),
            Some(metadata),
            tmp,
        )
        .map_err(|e| err(dir, format!("writing {ADAPTER_WEIGHTS}: {e}")))
    })?;
    let alpha = if cfg.alpha.fract() == 0.0 {
        json!(cfg.alpha as i64)
    } else {
        json!(cfg.alpha)
    };
    let config = json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": base_model,
        "revision": null,
        "r": cfg.r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
    });
    let text = serde_json::to_string_pretty(&config).expect("JSON value serialises");
    write_atomically(&dir.join(ADAPTER_CONFIG), |tmp| {
        std::fs::write(tmp, &text).map_err(|e| Qwen2VLError::io(tmp, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_module_layouts_name_the_same_module() {
        assert_eq!(
            current_layout("model.layers.3.self_attn.q_proj"),
            "model.language_model.layers.3.self_attn.q_proj"
        );
        assert_eq!(
            current_layout("visual.blocks.0.attn.qkv"),
            "model.visual.blocks.0.attn.qkv"
        );
        assert_eq!(
            current_layout("model.language_model.layers.1.mlp.up_proj"),
            "model.language_model.layers.1.mlp.up_proj"
        );
    }
}
