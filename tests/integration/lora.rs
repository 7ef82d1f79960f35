//! LoRA against PEFT: the adapter of tests/fixtures/qwen2vl-tiny-lora (made by
//! `make_lora_fixture.py` with PEFT's own `save_pretrained`, every matrix random) loads onto
//! the tiny checkpoint and gives transformers' logits with the adapter on, bypassed and
//! merged; adapters medr1 saves load back exactly in PEFT's layout; a fresh adapter changes
//! nothing and only the adapters get gradients.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{backend::Backend, Tensor};
use qwen2vl::checkpoint::{load_adapter, save_adapter, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use qwen2vl::lora::{LoraConfig, TargetModules};
use qwen2vl::verify::{images, Fixture};
use qwen2vl::{load_model, Qwen2VL, TokenBatch};

use crate::common::{fixture_dir, max_abs_diff, Flex, Scratch};

fn lora_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2vl-tiny-lora")
}

fn scratch(name: &str) -> Scratch {
    crate::common::scratch("lora", name)
}

fn base<B: Backend>(device: &B::Device) -> Qwen2VL<B> {
    load_model::<B>(&fixture_dir().join("hf_model"), device)
        .unwrap()
        .0
}

/// The model's logits on a case of the tiny fixture, flattened.
fn logits<B: Backend>(model: &Qwen2VL<B>, case: &str, device: &B::Device) -> Vec<f32> {
    let fx = Fixture::open(&fixture_dir()).unwrap();
    let ids = fx.id_rows(&format!("{case}.input_ids")).unwrap().remove(0);
    let imgs = images::<B>(&fx, &[case], device).unwrap();
    let out = model
        .forward(&TokenBatch::single(ids), imgs.as_ref())
        .unwrap();
    out.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn reference(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(lora_dir().join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn a_peft_adapter_gives_transformers_logits_on_bypassed_and_merged() {
    let device = Default::default();
    let (model, cfg) = load_adapter(base::<Flex>(&device), &lora_dir().join("adapter")).unwrap();
    assert_eq!((cfg.r, cfg.alpha, cfg.use_rslora), (4, 8.0, false));
    // 2 text layers x 7, 2 vision blocks x (qkv, fc2), the merger's first layer.
    let adapted = model
        .projections()
        .iter()
        .filter(|(_, p)| p.lora.is_some())
        .count();
    assert_eq!(adapted, 2 * 7 + 2 * 2 + 1);
    for case in ["single", "multi"] {
        let on = logits(&model, case, &device);
        let want = reference(&format!("{case}.logits"));
        // The adapter must matter, or the comparison proves nothing.
        let base_want = reference(&format!("{case}.base_logits"));
        assert!(max_abs_diff(&want, &base_want) > 1.0);
        let err = max_abs_diff(&on, &want);
        assert!(
            err < 1e-4,
            "{case}: adapter logits differ from PEFT's by {err}"
        );

        let off = logits(&model.clone().without_adapters(), case, &device);
        let err = max_abs_diff(&off, &base_want);
        assert!(
            err < 1e-4,
            "{case}: bypassed adapters differ from PEFT's disabled by {err}"
        );

        let merged = logits(&model.clone().merge_adapters(), case, &device);
        let err = max_abs_diff(&merged, &reference(&format!("{case}.merged_logits")));
        assert!(
            err < 1e-4,
            "{case}: merged logits differ from PEFT's merged by {err}"
        );
    }
}

fn keys_and_shapes(path: &Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| (k, t.shape().to_vec()))
        .collect();
    v.sort();
    v
}

#[test]
fn saved_adapters_are_peft_files_that_load_back_exactly() {
    let device = Default::default();
    let peft = lora_dir().join("adapter");
    let (model, cfg) = load_adapter(base::<Flex>(&device), &peft).unwrap();
    let out = scratch("save");
    save_adapter(&model, &cfg, Some("tiny"), &out.0).unwrap();
    // PEFT's key names and shapes, PEFT's config fields.
    assert_eq!(
        keys_and_shapes(&out.0.join(ADAPTER_WEIGHTS)),
        keys_and_shapes(&peft.join(ADAPTER_WEIGHTS))
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.0.join(ADAPTER_CONFIG)).unwrap())
            .unwrap();
    assert_eq!(written["peft_type"], "LORA");
    assert_eq!(written["r"], 4);
    assert_eq!(written["lora_alpha"], 8);
    assert_eq!(written["base_model_name_or_path"], "tiny");

    let (again, cfg2) = load_adapter(base::<Flex>(&device), &out.0).unwrap();
    assert_eq!(cfg2, cfg);
    assert_eq!(
        logits(&again, "single", &device),
        logits(&model, "single", &device)
    );
}

/// Counts the parameters that got a gradient, adapters and base apart.
struct GradCount<'a> {
    grads: &'a GradientsParams,
    adapter_ids: Vec<ParamId>,
    adapters: usize,
    base: usize,
}

impl<B: burn::tensor::backend::AutodiffBackend> ModuleVisitor<B> for GradCount<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.grads.get::<B::InnerBackend, D>(param.id).is_some() {
            if self.adapter_ids.contains(&param.id) {
                self.adapters += 1;
            } else {
                self.base += 1;
            }
        }
    }
}

#[test]
fn a_fresh_adapter_changes_nothing_and_only_adapters_get_gradients() {
    type A = Autodiff<Flex>;
    let device = Default::default();
    let plain = base::<A>(&device);
    let before = logits(&plain, "single", &device);
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into(), "qkv".into()]),
        ..LoraConfig::default()
    };
    let model = crate::grpo_learns::drawing(None, || plain.with_lora(&cfg).unwrap());
    let adapter_ids: Vec<ParamId> = model
        .projections()
        .iter()
        .filter_map(|(_, p)| p.lora.as_ref())
        .flat_map(|l| [l.a.id, l.b.id])
        .collect();
    assert_eq!(adapter_ids.len(), 2 * (2 * 2 + 2));
    // B starts at zero: exactly the base model's logits.
    assert_eq!(logits(&model, "single", &device), before);

    let fx = Fixture::open(&fixture_dir()).unwrap();
    let ids = fx.id_rows("single.input_ids").unwrap().remove(0);
    let imgs = images::<A>(&fx, &["single"], &device).unwrap();
    let out = model
        .forward(&TokenBatch::single(ids), imgs.as_ref())
        .unwrap();
    let loss = out.powi_scalar(2).mean();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut count = GradCount {
        grads: &grads,
        adapter_ids,
        adapters: 0,
        base: 0,
    };
    model.visit(&mut count);
    assert_eq!(count.base, 0, "the base is frozen");
    assert_eq!(count.adapters, 12, "every adapter matrix gets a gradient");
}

#[test]
fn bad_adapters_and_settings_get_errors_naming_what_to_fix() {
    let device = Default::default();
    let peft = lora_dir().join("adapter");
    let dir = scratch("bad");
    let copy = |config: &str| {
        std::fs::write(dir.0.join(ADAPTER_CONFIG), config).unwrap();
        std::fs::copy(peft.join(ADAPTER_WEIGHTS), dir.0.join(ADAPTER_WEIGHTS)).unwrap();
    };
    let original = std::fs::read_to_string(peft.join(ADAPTER_CONFIG)).unwrap();

    copy(&original.replace("\"use_dora\": false", "\"use_dora\": true"));
    let e = load_adapter(base::<Flex>(&device), &dir.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("use_dora"), "{e}");

    copy(&original.replace("\"r\": 4", "\"r\": 8"));
    let e = load_adapter(base::<Flex>(&device), &dir.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_A.weight") && e.contains("expected shape [8"),
        "{e}"
    );

    // A target with no weights in the file: the missing matrix is named.
    copy(&original.replace("\"qkv\",", "\"qkv\", \"fc1\","));
    let e = load_adapter(base::<Flex>(&device), &dir.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.visual.blocks.0.mlp.fc1.lora_A.weight"),
        "{e}"
    );

    let none = LoraConfig {
        target_modules: TargetModules::Names(vec!["to_q".into()]),
        ..LoraConfig::default()
    };
    let e = crate::grpo_learns::drawing(None, || base::<Flex>(&device).with_lora(&none))
        .unwrap_err()
        .to_string();
    assert!(e.contains("match no linear layer"), "{e}");
    let head = LoraConfig {
        target_modules: TargetModules::Names(vec!["lm_head".into()]),
        ..LoraConfig::default()
    };
    let e = crate::grpo_learns::drawing(None, || base::<Flex>(&device).with_lora(&head))
        .unwrap_err()
        .to_string();
    assert!(e.contains("lm_head"), "{e}");
}

/// `medr1 train` from checkpoint `ckpt` with a warm start of `sft_steps`, `grpo_steps` of GRPO
/// and rank-2 adapters on `targets` (a TOML list); its runs directory and stderr.
fn lora_run(
    ckpt: &Path,
    name: &str,
    sft_steps: usize,
    grpo_steps: usize,
    targets: &str,
) -> (PathBuf, String) {
    let runs = ckpt.with_file_name(format!("medr1-{name}-{}-runs", std::process::id()));
    let _ = std::fs::remove_dir_all(&runs);
    let sets = [
        format!("runs_dir=\"{}\"", runs.display()),
        format!("model.checkpoint=\"{}\"", ckpt.display()),
        "data.synthetic.n=24".into(),
        format!("sft.steps={sft_steps}"),
        format!("grpo.steps={grpo_steps}"),
        "grpo.learning_rate=1e-2".into(),
        "eval.before=false".into(),
        "eval.after=false".into(),
        "eval.every=0".into(),
        "lora.enabled=true".into(),
        "lora.r=2".into(),
        "lora.alpha=4.0".into(),
        format!("lora.target_modules={targets}"),
    ];
    let mut args = vec!["train"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let (ok, _, err) = crate::cli::medr1(&args);
    assert!(ok, "{err}");
    (runs, err)
}

/// The warm start of `runs` with its final adapter, checked to equal the merged final model:
/// training changed nothing but the adapters.
fn sft_plus_adapter_is_the_final_model(runs: &Path) -> (Qwen2VL<Flex>, LoraConfig) {
    let fin = runs.join("tiny/final");
    let device = Default::default();
    // The adapters sit on the warm start's model.
    let base = load_model::<Flex>(&runs.join("tiny/sft"), &device)
        .unwrap()
        .0;
    let (adapted, cfg) = load_adapter(base, &fin.join("adapter")).unwrap();
    let merged = load_model::<Flex>(&fin, &device).unwrap().0;
    let err = max_abs_diff(
        &logits(&adapted, "single", &device),
        &logits(&merged, "single", &device),
    );
    assert!(err < 1e-4, "base + adapter vs merged final: {err}");
    (adapted, cfg)
}

#[test]
fn a_lora_run_trains_only_the_adapters_and_writes_them_as_peft_does() {
    let ckpt = crate::cli::tiny_checkpoint("lora-run");
    // A short warm start, so that the groups' rewards differ (the advantages are not 0).
    let (runs, err) = lora_run(&ckpt, "lora", 4, 3, r#"["q_proj", "v_proj", "qkv"]"#);
    assert!(err.contains("LoRA r 2 alpha 4: "), "{err}");
    // Only the adapters trained: the untouched warm start with the saved adapter is the
    // merged final model ...
    let (adapted, cfg) = sft_plus_adapter_is_the_final_model(&runs);
    assert_eq!((cfg.r, cfg.alpha), (2, 4.0));
    // ... and training moved them (B starts at zero).
    let moved = adapted
        .projections()
        .iter()
        .filter_map(|(_, p)| p.lora.as_ref())
        .map(|l| l.b.val().abs().max().into_scalar())
        .fold(0.0f32, f32::max);
    assert!(moved > 1e-4, "adapters did not train: max |B| {moved}");
    let _ = std::fs::remove_dir_all(&runs);
    let _ = std::fs::remove_dir_all(&ckpt);
}

#[test]
fn export_merges_an_adapter_into_a_checkpoint_transformers_agrees_with() {
    let out = scratch("export");
    let merged = out.0.join("merged");
    let base_dir = fixture_dir().join("hf_model");
    let adapter = lora_dir().join("adapter");
    let args = |to: &Path, merge: bool| {
        let mut v = vec![
            "export".to_string(),
            "--model".into(),
            base_dir.display().to_string(),
            "--adapter".into(),
            adapter.display().to_string(),
            "--out".into(),
            to.display().to_string(),
        ];
        if merge {
            v.push("--merge".into());
        }
        v
    };
    let run = |v: Vec<String>| {
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        crate::cli::medr1(&refs)
    };
    let (ok, _, err) = run(args(&merged, true));
    assert!(ok, "{err}");
    let device = Default::default();
    let model = load_model::<Flex>(&merged, &device).unwrap().0;
    assert!(!model.has_adapters());
    for case in ["single", "multi"] {
        let e = max_abs_diff(
            &logits(&model, case, &device),
            &reference(&format!("{case}.merged_logits")),
        );
        assert!(
            e < 1e-4,
            "{case}: exported merge vs PEFT's merge_and_unload: {e}"
        );
    }
    // Without --merge: the adapter again, PEFT's keys.
    let again = out.0.join("adapter");
    let (ok, _, err) = run(args(&again, false));
    assert!(ok, "{err}");
    assert_eq!(
        keys_and_shapes(&again.join(ADAPTER_WEIGHTS)),
        keys_and_shapes(&adapter.join(ADAPTER_WEIGHTS))
    );
    // Nothing is written over.
    let (ok, _, err) = run(args(&merged, true));
    assert!(!ok && err.contains("not empty"), "{err}");
}

#[test]
fn a_run_starts_from_a_peft_adapter_and_refuses_a_missing_one() {
    let ckpt = crate::cli::tiny_checkpoint("lora-start");
    let runs = ckpt.with_file_name(format!("medr1-lora-{}-start-runs", std::process::id()));
    let _ = std::fs::remove_dir_all(&runs);
    let train = |adapter: &Path| {
        let sets = [
            format!("runs_dir=\"{}\"", runs.display()),
            format!("model.checkpoint=\"{}\"", ckpt.display()),
            "data.synthetic.n=24".into(),
            "sft.steps=0".into(),
            "grpo.steps=1".into(),
            "eval.before=false".into(),
            "eval.after=false".into(),
            "lora.enabled=true".into(),
            format!("lora.adapter=\"{}\"", adapter.display()),
        ];
        let mut args = vec!["train".to_string()];
        for s in sets {
            args.extend(["--set".to_string(), s]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::cli::medr1(&refs)
    };
    let (ok, _, err) = train(&lora_dir().join("adapter"));
    assert!(ok, "{err}");
    // The adapter's own settings, not [lora]'s defaults (r 8, alpha 16).
    assert!(err.contains("LoRA r 4 alpha 8: "), "{err}");
    assert!(runs
        .join("tiny/final/adapter")
        .join(ADAPTER_WEIGHTS)
        .is_file());
    let _ = std::fs::remove_dir_all(&runs);
    let (ok, _, err) = train(&lora_dir().join("no-such-adapter"));
    assert!(
        !ok && err.contains("lora.adapter") && err.contains("no-such-adapter"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&runs);
    let _ = std::fs::remove_dir_all(&ckpt);
}

/// Qwen2.5-VL through the whole run: a GRPO run from the tiny Qwen2.5-VL checkpoint with
/// adapters on the decoder and on the vision tower's gated MLP, its final model written as a
/// Qwen2.5-VL checkpoint equal to the base with the saved adapter.
#[test]
fn a_qwen25vl_lora_run_trains_and_writes_a_qwen25vl_checkpoint() {
    let ckpt =
        crate::cli::tiny_checkpoint_of(&crate::common::qwen25vl_fixture_dir(), "q25-lora-run");
    // Shipped as the Hub's Qwen2.5-VL-Instruct repositories ship it: the legacy JSON file.
    let template = qwen2vl::processor::QWEN_VL_CHAT_TEMPLATE;
    let legacy = serde_json::json!({ "chat_template": template }).to_string();
    std::fs::write(ckpt.join("chat_template.json"), legacy).unwrap();
    let (runs, _) = lora_run(
        &ckpt,
        "q25-lora",
        2,
        2,
        r#"["q_proj", "v_proj", "gate_proj"]"#,
    );
    let fin = runs.join("tiny/final");
    let config = std::fs::read_to_string(fin.join("config.json")).unwrap();
    assert!(config.contains("\"qwen2_5_vl\""), "{config}");
    let adapter_config = std::fs::read_to_string(fin.join("adapter/adapter_config.json")).unwrap();
    assert!(adapter_config.contains("gate_proj"), "{adapter_config}");
    let saved = std::fs::read_to_string(fin.join("chat_template.jinja")).unwrap();
    assert_eq!(saved, template);
    sft_plus_adapter_is_the_final_model(&runs);
    let _ = std::fs::remove_dir_all(&runs);
    let _ = std::fs::remove_dir_all(&ckpt);
}
