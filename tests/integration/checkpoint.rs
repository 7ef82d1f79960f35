//! Checkpoint directories: sharded and bf16 weights, both key layouts, clear errors for bad
//! input, and a save -> load round trip.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::{fixture_dir, max_abs_diff, Flex};
use burn::tensor::Tensor;
use qwen2vl::checkpoint::{load_model, named_tensors};
use qwen2vl::{save_model, Qwen2VLError, SaveDtype, TokenBatch};
use safetensors::{Dtype, SafeTensors};

/// A scratch directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("medr1-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// The fixture's weights as (key, dtype, shape, bytes), in the file's own order.
fn fixture_tensors() -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(fixture_dir().join("hf_model/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, d, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn copy_config(dir: &Path) {
    std::fs::copy(
        fixture_dir().join("hf_model/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
}

fn logits_of(dir: &Path) -> Vec<f32> {
    let (model, _) = load_model::<Flex>(dir, &Default::default()).unwrap();
    let batch = TokenBatch::single((0u32..40).map(|i| (i * 7) % 256).collect());
    let logits: Tensor<Flex, 3> = model.forward(&batch, None).unwrap();
    logits.into_data().to_vec::<f32>().unwrap()
}

/// The checkpoint in `dir` computes exactly what the fixture's own checkpoint does.
fn assert_same_logits_as_fixture(dir: &Path) {
    let diff = max_abs_diff(&logits_of(dir), &logits_of(&fixture_dir().join("hf_model")));
    assert_eq!(diff, 0.0);
}

#[test]
fn sharded_checkpoint_with_index_loads_like_one_file() {
    let dir = temp_dir("sharded");
    copy_config(&dir);
    let tensors = fixture_tensors();
    let (a, b) = tensors.split_at(tensors.len() / 2);
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    write(&dir.join(names[0]), a);
    write(&dir.join(names[1]), b);
    let weight_map: BTreeMap<_, _> = a
        .iter()
        .map(|t| (t.0.clone(), names[0]))
        .chain(b.iter().map(|t| (t.0.clone(), names[1])))
        .collect();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let (_, info) = load_model::<Flex>(&dir, &Default::default()).unwrap();
    assert_eq!(info.files.len(), 2);
    assert!(info.unused.is_empty());
    assert_same_logits_as_fixture(&dir);
}

#[test]
fn bf16_weights_are_widened_exactly() {
    let dir = temp_dir("bf16");
    copy_config(&dir);
    let tensors: Vec<_> = fixture_tensors()
        .into_iter()
        .map(|(k, _, s, b)| {
            let bf: Vec<u8> = b
                .chunks_exact(4)
                .flat_map(|c| {
                    half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes()
                })
                .collect();
            (k, Dtype::BF16, s, bf)
        })
        .collect();
    write(&dir.join("model.safetensors"), &tensors);
    let (model, info) = load_model::<Flex>(&dir, &Default::default()).unwrap();
    assert_eq!(info.dtypes, vec![("BF16".to_string(), tensors.len())]);
    // Every loaded value must be the bf16 value, widened without change.
    for t in named_tensors(&model) {
        let stored = tensors.iter().find(|s| s.0 == t.key).unwrap();
        let widened: Vec<f32> = stored
            .3
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert_eq!(t.values, widened, "{}", t.key);
    }
}

#[test]
fn save_then_load_gives_the_same_model() {
    let (model, _) =
        load_model::<Flex>(&fixture_dir().join("hf_model"), &Default::default()).unwrap();
    let dir = temp_dir("saved");
    save_model(&model, &dir, SaveDtype::F32).unwrap();
    // Hub layout, no lm_head (tied), the same key set transformers' save_pretrained wrote.
    let saved: Vec<String> = {
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let mut k: Vec<String> = SafeTensors::deserialize(&bytes)
            .unwrap()
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        k.sort();
        k
    };
    let reference: Vec<String> = fixture_tensors().into_iter().map(|t| t.0).collect();
    assert_eq!(saved, reference);
    assert!(!dir.read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".partial")));
    assert_same_logits_as_fixture(&dir);
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let dir = temp_dir("missing");
    copy_config(&dir);
    let mut tensors = fixture_tensors();
    tensors.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight");
    write(&dir.join("model.safetensors"), &tensors);
    let err = load_model::<Flex>(&dir, &Default::default()).unwrap_err();
    assert!(matches!(err, Qwen2VLError::MissingTensor { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("model.layers.1.mlp.up_proj.weight") && msg.contains("[128, 64]"),
        "{msg}"
    );

    let dir = temp_dir("misshapen");
    copy_config(&dir);
    let mut tensors = fixture_tensors();
    let t = tensors
        .iter_mut()
        .find(|t| t.0 == "model.norm.weight")
        .unwrap();
    t.2 = vec![32];
    t.3.truncate(32 * 4);
    write(&dir.join("model.safetensors"), &tensors);
    let msg = load_model::<Flex>(&dir, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("model.norm.weight") && msg.contains("[64]") && msg.contains("[32]"),
        "{msg}"
    );
}

#[test]
fn unused_keys_are_reported() {
    let dir = temp_dir("extra");
    copy_config(&dir);
    let mut tensors = fixture_tensors();
    tensors.push((
        "visual.extra.weight".into(),
        Dtype::F32,
        vec![2],
        vec![0; 8],
    ));
    write(&dir.join("model.safetensors"), &tensors);
    let (_, info) = load_model::<Flex>(&dir, &Default::default()).unwrap();
    assert_eq!(info.unused, vec!["visual.extra.weight".to_string()]);
}

#[test]
fn pickle_only_directories_are_refused_with_advice() {
    let dir = temp_dir("pickle");
    copy_config(&dir);
    std::fs::write(dir.join("pytorch_model.bin"), b"not read").unwrap();
    let msg = load_model::<Flex>(&dir, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("pytorch_model.bin") && msg.contains("safe_serialization=True"),
        "{msg}"
    );

    let empty = temp_dir("noconfig");
    let msg = load_model::<Flex>(&empty, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("config.json"), "{msg}");
}
