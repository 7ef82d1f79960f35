//! The `medr1` binary as a user runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::fixture_dir;
use qwen2vl::processor::byte_tokenizer_json;
use qwen2vl::verify::Fixture;

pub(crate) fn medr1(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_medr1"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The tiny fixture model with the project's byte-level tokenizer and the fixture's image
/// settings: a complete checkpoint directory.
pub(crate) fn tiny_checkpoint(name: &str) -> PathBuf {
    tiny_checkpoint_of(&fixture_dir(), name)
}

/// [`tiny_checkpoint`] of the model of another fixture directory.
pub(crate) fn tiny_checkpoint_of(fixture: &Path, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("medr1-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture.join("hf_model").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("tokenizer.json"),
        byte_tokenizer_json().to_string(),
    )
    .unwrap();
    let pp = r#"{"min_pixels": 3136, "max_pixels": 12544, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}"#;
    std::fs::write(dir.join("preprocessor_config.json"), pp).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `medr1 generate` on the checkpoint `dir`: the fixture's first image, "Describe this image.",
/// and `extra` arguments.
fn describe_image(dir: &Path, extra: &[&str]) -> (bool, String, String) {
    let image = fixture_dir().join("images/image_A_56x84.png");
    let mut args = vec![
        "generate",
        "--model",
        s(dir),
        "--image",
        s(&image),
        "--prompt",
        "Describe this image.",
    ];
    args.extend_from_slice(extra);
    medr1(&args)
}

#[test]
fn generate_reproduces_the_reference_greedy_tokens() {
    let dir = tiny_checkpoint("generate");
    let (ok, _, err) = describe_image(&dir, &["--max-new-tokens", "8", "--show-ids"]);
    assert!(ok, "{err}");
    let want = Fixture::open(&fixture_dir())
        .unwrap()
        .id_rows("single.gen.new_tokens")
        .unwrap()
        .remove(0);
    assert!(err.contains(&format!("ids: {want:?}")), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A checkpoint whose processor template is not the Qwen2-VL / Qwen2.5-VL one medr1 renders is
/// refused by generation and by training, naming the file, before any work.
#[test]
fn a_checkpoint_with_another_chat_template_is_refused() {
    let dir = tiny_checkpoint("template");
    let other = qwen2vl::processor::QWEN_VL_CHAT_TEMPLATE
        .replace("You are a helpful assistant.", "You are a radiologist.");
    std::fs::write(dir.join("chat_template.jinja"), other).unwrap();
    let (ok, _, err) = describe_image(&dir, &[]);
    assert!(
        !ok && err.contains("chat_template.jinja") && err.contains("radiologist"),
        "{err}"
    );
    let runs = dir.join("runs");
    let (ok, _, err) = medr1(&[
        "train",
        "--set",
        &format!("runs_dir=\"{}\"", runs.display()),
        "--set",
        &format!("model.checkpoint=\"{}\"", dir.display()),
        "--set",
        "grpo.steps=1",
    ]);
    assert!(!ok && err.contains("chat_template.jinja"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn generate_explains_bad_input() {
    let dir = tiny_checkpoint("bad");
    let image = fixture_dir().join("images/image_A_56x84.png");
    let (ok, _, err) = medr1(&[
        "generate",
        "--model",
        s(&dir),
        "--image",
        "/nonexistent/x.png",
        "--prompt",
        "hi",
    ]);
    assert!(!ok && err.contains("/nonexistent/x.png"), "{err}");
    let (ok, _, err) = medr1(&[
        "generate",
        "--model",
        "/nonexistent-model",
        "--image",
        s(&image),
        "--prompt",
        "hi",
    ]);
    assert!(!ok && err.contains("/nonexistent-model"), "{err}");
    let (ok, _, err) = medr1(&[
        "generate",
        "--model",
        s(&dir),
        "--image",
        s(&image),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "5000",
    ]);
    assert!(!ok && err.contains("positions"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn verify_prints_one_line_per_check_and_fails_on_a_bad_directory() {
    let (ok, out, err) = medr1(&["verify", s(&fixture_dir())]);
    assert!(ok, "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("single.logits") && l.ends_with("ok")),
        "{out}"
    );
    assert!(
        out.contains("summary:") && out.contains(" 0 failed"),
        "{out}"
    );
    let (ok, _, err) = medr1(&["verify", "/nonexistent-fixture"]);
    assert!(!ok && err.contains("manifest.json"), "{err}");
}

#[test]
fn inspect_counts_the_2b_parameters_from_its_config() {
    let cfg = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen2_vl_2b_instruct_config.json");
    let (ok, out, err) = medr1(&["inspect", s(&cfg)]);
    assert!(ok, "{err}");
    assert!(out.contains("total  2,208,985,600"), "{out}");
}

#[test]
fn data_commands_summarise_synthesise_and_convert() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data");
    let (ok, out, err) = medr1(&["data", "summary", s(&data), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"], 8);
    assert_eq!(v["by_modality"]["CT"], 3);

    let dir = std::env::temp_dir().join(format!("medr1-cli-{}-synth", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ok, out, err) = medr1(&[
        "data",
        "synth",
        "--out",
        s(&dir),
        "--n",
        "20",
        "--seed",
        "3",
        "--image-size",
        "56",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("16 train + 4 test"), "{out}");
    assert_eq!(std::fs::read_dir(dir.join("images")).unwrap().count(), 20);
    let tk = qwen2vl::processor::TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(tk.token_id("<|image_pad|>"), Some(268));

    let converted = dir.join("omni.json");
    let (ok, out, err) = medr1(&[
        "data",
        "convert",
        "--input",
        s(&data.join("omnimed_qa.json")),
        "--out",
        s(&converted),
        "--shuffle-seed",
        "4",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("converted 3 items"), "{out}");
    let (ok, _, err) = medr1(&["data", "summary", s(&data.join("missing.json"))]);
    assert!(!ok && err.contains("missing.json"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bench_reports_rollout_and_train_step_speed_with_device_and_dtype() {
    let config = fixture_dir().join("hf_model/config.json");
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--model-config",
            s(&config),
            "--batch",
            "2",
            "--prompt-len",
            "8",
            "--image-size",
            "56",
            "--new-tokens",
            "4",
            "--steps",
            "1",
        ];
        args.extend_from_slice(extra);
        medr1(&args)
    };
    let (ok, out, err) = bench(&["--num-generations", "3", "--json"]);
    assert!(ok, "{err}");
    assert!(out.contains("device flex (f32)"), "{out}");
    assert!(out.contains("2 prompts x 3 generations"), "{out}");
    assert!(
        out.contains("rollout (sampling + rewards):") && out.contains("new tokens/s"),
        "{out}"
    );
    assert!(
        out.contains("GRPO step (rollout + policy and reference"),
        "{out}"
    );
    assert!(out.contains("share_prompt = false"), "{out}");
    assert!(out.contains("4 image + 8 text"), "{out}");
    // The last line is one JSON object with the numbers a script compares.
    let last = out.lines().last().unwrap();
    let json: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
    for key in [
        "rollout_s",
        "rollout_tokens_per_s",
        "step_s",
        "step_unshared_s",
        "peak_rss_mib",
    ] {
        let v = json[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} in {last}"));
        assert!(v > 0.0 && v.is_finite(), "{key} = {v}");
    }
    assert_eq!(json["num_generations"], 3);
    assert!(json["update_s"].as_f64().unwrap() > 0.0, "{last}");
    // The matrix work: repeating the prompt 3 times costs more, never 3 times as much.
    assert!(out.contains("matrix work:"), "{out}");
    let work = |j: &serde_json::Value, key: &str| j[key].as_f64().unwrap_or_else(|| panic!("{j}"));
    let (shared, unshared) = (
        work(&json, "work_gflop"),
        work(&json, "work_unshared_gflop"),
    );
    assert!(
        shared > 0.0 && unshared > shared && unshared < 3.0 * shared,
        "{last}"
    );
    // The memory options run, and the account follows them.
    let (ok, out, err) = bench(&[
        "--num-generations",
        "3",
        "--score-micro-batch",
        "3",
        "--lm-head-chunk",
        "2",
        "--checkpoint",
        "all",
        "--no-unshared",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("checkpointing all"), "{out}");
    let last = out.lines().last().unwrap();
    let options: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(options["checkpoint"], "all");
    assert_eq!(options["score_micro_batch"], 3);
    let logits = |j: &serde_json::Value| {
        j["accounted_gib"]["head_logits"]
            .as_f64()
            .unwrap_or_else(|| panic!("{j}"))
    };
    // A chunk of 2 completion tokens, against all 6 x 4 of the step in one pass.
    assert!((logits(&options) * 12.0 - logits(&json)).abs() < 1e-6 * logits(&json));
    // The account alone, without a run, is the same account.
    let (ok, out, err) = bench(&[
        "--num-generations",
        "3",
        "--score-micro-batch",
        "3",
        "--lm-head-chunk",
        "2",
        "--checkpoint",
        "all",
        "--account-only",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert!(!out.contains("GRPO step"), "{out}");
    let alone: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(alone["accounted_gib"], options["accounted_gib"]);
    assert_eq!(alone["work_gflop"], json["work_gflop"]);
    assert_eq!(alone["work_unshared_gflop"], json["work_unshared_gflop"]);
    let (ok, _, err) = medr1(&[
        "bench",
        "--model-config",
        s(&config),
        "--num-generations",
        "0",
    ]);
    assert!(!ok && err.contains("--num-generations"), "{err}");
    let (ok, _, err) = medr1(&["bench", "--model-config", "no/config.json"]);
    assert!(!ok && err.contains("no/config.json"), "{err}");

    // bf16 on the CPU: the rollout, then forward, backward and AdamW with f32 master weights.
    let (ok, out, err) = bench(&["--bf16"]);
    assert!(ok, "{err}");
    assert!(out.contains("device flex (bf16)"), "{out}");
    assert!(out.contains("GRPO step"), "{out}");
}

/// The error of `name` on its line of `medr1 verify` output.
fn check_error(out: &str, name: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no check {name} in:\n{out}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn verify_in_bf16_runs_in_bf16_and_stays_within_transformers_own_bf16_error() {
    let (ok, out, err) = medr1(&["verify", s(&fixture_dir()), "--bf16"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("0 failed (device Flex, bf16)"), "{out}");
    // Really bf16: in f32 these errors are about 1e-6.
    let logits = check_error(&out, "single.logits");
    assert!(
        logits > 1e-3,
        "single.logits error {logits}: not a bf16 run?"
    );
    let logprobs = check_error(&out, "batch.token_logprobs");
    assert!(logprobs > 1e-4 && logprobs < 0.2, "{logprobs}");
    // Without transformers' bf16 measurement there is nothing to judge against.
    let bare = std::env::temp_dir().join(format!("medr1-cli-{}-nobf16", std::process::id()));
    let _ = std::fs::create_dir_all(&bare);
    let (ok, _, err) = medr1(&["verify", s(&bare), "--bf16"]);
    assert!(!ok && err.contains("bf16_reference.json"), "{err}");
    let _ = std::fs::remove_dir_all(&bare);
}

/// `--device wgpu` on a machine without a graphics adapter (here: the Vulkan loader pointed at
/// no driver): every command that can take it stops before any work with one plain error
/// naming the fix, and exits non-zero; no panic, no backtrace.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_without_an_adapter_is_a_plain_error_naming_the_fix() {
    let ckpt = tiny_checkpoint("no-adapter");
    let image = ckpt.join("image.png");
    image::RgbImage::from_pixel(56, 56, image::Rgb([90, 30, 200]))
        .save(&image)
        .unwrap();
    let config = ckpt.join("config.json");
    let fixture = fixture_dir();
    let runs = ckpt.join("runs");
    let runs_set = format!("runs_dir=\"{}\"", runs.display());
    let commands: Vec<Vec<&str>> = vec![
        vec!["verify", s(&fixture), "--device", "wgpu"],
        vec![
            "generate",
            "--model",
            s(&ckpt),
            "--image",
            s(&image),
            "--prompt",
            "Which organ?",
            "--device",
            "wgpu",
        ],
        vec!["bench", "--model-config", s(&config), "--device", "wgpu"],
        vec!["train", "--device", "wgpu", "--set", &runs_set],
    ];
    for args in commands {
        let out = Command::new(env!("CARGO_BIN_EXE_medr1"))
            .args(&args)
            .env("VK_DRIVER_FILES", "/nonexistent/no-driver.json")
            .env("VK_ICD_FILENAMES", "/nonexistent/no-driver.json")
            .env_remove("VK_ADD_DRIVER_FILES")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let cmd = args.join(" ");
        assert!(
            !out.status.success(),
            "medr1 {cmd} succeeded without an adapter"
        );
        assert!(
            err.contains("no Vulkan graphics adapter")
                && err.contains("apt-get install -y mesa-vulkan-drivers")
                && err.contains("--device flex"),
            "medr1 {cmd}: {err}"
        );
        assert!(!err.contains("panicked"), "medr1 {cmd}: {err}");
    }
    assert!(!runs.exists(), "training started without a device");
    let _ = std::fs::remove_dir_all(&ckpt);
}

/// `medr1 train --devices` on two WGPU devices (the default adapter and the CPU one; both
/// llvmpipe in CI) trains as two workers on one device do: the same shards, seeds and
/// arithmetic, only the second shard's copy of the policy (and its gradients) crossing devices,
/// once per optimizer step. With accumulation 2 a step's second micro-batch reuses the copy.
#[cfg(feature = "wgpu")]
#[test]
fn two_wgpu_devices_train_as_two_workers_on_one() {
    let _ = crate::common::wgpu_device();
    let root = std::env::temp_dir().join(format!("medr1-cli-{}-devices", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let run = |name: &str, devices: &str| -> Vec<serde_json::Value> {
        let runs_set = format!("runs_dir=\"{}\"", root.join(name).display());
        let (ok, _, err) = medr1(&[
            "train",
            "--devices",
            devices,
            "--set",
            &runs_set,
            "--set",
            "grpo.steps=2",
            "--set",
            "grpo.prompts_per_step=2",
            "--set",
            "grpo.gradient_accumulation=2",
            "--set",
            "sft.steps=2",
            "--set",
            "eval.before=false",
            "--set",
            "eval.after=false",
        ]);
        assert!(ok, "medr1 train --devices {devices}: {err}");
        std::fs::read_to_string(root.join(name).join("tiny/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let two = run("two", "wgpu:default,wgpu:cpu");
    let one = run("one", "wgpu:default,wgpu:default");
    assert_eq!(two.len(), 2);
    for (a, b) in two.iter().zip(&one) {
        for key in [
            "loss",
            "reward_mean",
            "kl",
            "grad_norm",
            "completion_tokens",
        ] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                "{key}: {x} on two devices, {y} on one: {a} vs {b}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A free TCP port on the loopback interface.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the orchestrator when the test ends, however it ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `medr1 train` as node `rank` of `nodes` (orchestrator on `orch`, this node on `port`).
fn node(rank: usize, nodes: usize, orch: u16, port: u16, extra: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_medr1"));
    c.args(["train", "--nodes", &nodes.to_string(), "--node-rank"])
        .arg(rank.to_string())
        .arg("--orchestrator")
        .arg(format!("ws://127.0.0.1:{orch}"))
        .arg("--node-address")
        .arg(format!("ws://127.0.0.1:{port}"))
        .args(["--node-timeout", "120"])
        .args(extra);
    c
}

/// Several nodes on loopback (three processes: `medr1 orchestrator` and two `medr1 train`
/// nodes with two Flex workers each) train as one node with all four workers: the same
/// shards and seeds, step statistics over every node's rows (`scale_rewards = "batch"`, `dapo`
/// over the step's tokens), summed gradients and measured sums. Both nodes write the same
/// checkpoint, byte for byte. A node whose settings differ is named and no node trains.
#[test]
fn two_nodes_train_as_one_node_with_all_their_devices() {
    let root = std::env::temp_dir().join(format!("medr1-cli-{}-nodes", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let settings = |name: &str| -> Vec<String> {
        [
            format!("runs_dir=\"{}\"", root.join(name).display()),
            "grpo.steps=2".into(),
            "grpo.prompts_per_step=4".into(),
            "grpo.gradient_accumulation=2".into(),
            "grpo.scale_rewards=\"batch\"".into(),
            "grpo.loss_type=\"dapo\"".into(),
            "sft.steps=8".into(),
            "eval.before=false".into(),
            "eval.after=false".into(),
            "checkpoint.every=1".into(),
        ]
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
    };
    let metrics = |dir: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let orch = free_port();
    let _orchestrator = Reaped(
        Command::new(env!("CARGO_BIN_EXE_medr1"))
            .args(["orchestrator", "--port", &orch.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let run_nodes = |extra: [Vec<String>; 2]| -> Vec<std::process::Output> {
        let children: Vec<_> = extra
            .iter()
            .enumerate()
            .map(|(rank, extra)| {
                node(rank, 2, orch, free_port(), extra)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect()
    };
    let mut two = settings("nodes");
    two.extend(["--devices".into(), "flex,flex".into()]);
    for (rank, out) in run_nodes([two.clone(), two]).iter().enumerate() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "node {rank}: {err}");
    }
    let mut four = vec!["train".to_string()];
    four.extend(settings("one"));
    four.extend(["--devices".into(), "flex,flex,flex,flex".into()]);
    let (ok, _, err) = medr1(&four.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "one node with four workers: {err}");

    let (n0, n1, one) = (
        root.join("nodes/tiny"),
        root.join("nodes/tiny.node1"),
        root.join("one/tiny"),
    );
    let weights = |d: &std::path::Path| std::fs::read(d.join("final/model.safetensors")).unwrap();
    assert!(
        weights(&n0) == weights(&n1),
        "the two nodes wrote different weights"
    );
    let (m0, m1, single) = (metrics(&n0), metrics(&n1), metrics(&one));
    assert_eq!(m0.len(), 2);
    assert!(
        m0[0]["grad_norm"].as_f64().unwrap() > 1e-3,
        "a step without gradient checks nothing: {}",
        m0[0]
    );
    for ((a, b), c) in m0.iter().zip(&m1).zip(&single) {
        for key in [
            "loss",
            "reward_mean",
            "reward_std",
            "kl",
            "entropy",
            "grad_norm",
            "completion_tokens",
        ] {
            let (x, y, z) = (
                a[key].as_f64().unwrap(),
                b[key].as_f64().unwrap(),
                c[key].as_f64().unwrap(),
            );
            assert_eq!(x, y, "{key}: node 0 {x}, node 1 {y}");
            assert!(
                (x - z).abs() <= 1e-5 * z.abs().max(1.0),
                "{key}: {x} on two nodes, {z} on one: {a} vs {c}"
            );
        }
    }

    // Node 1 lost its newest checkpoint (as a node stopped mid-write would): both resume from
    // the newest step both have, and again end with the same weights.
    std::fs::remove_file(n1.join("grpo/checkpoint/state-2.json")).unwrap();
    let mut more = settings("nodes");
    more.extend([
        "--devices".into(),
        "flex,flex".into(),
        "--set".into(),
        "grpo.steps=3".into(),
        "--resume".into(),
    ]);
    let outs = run_nodes([more.clone(), more]);
    for (rank, out) in outs.iter().enumerate() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "resumed node {rank}: {err}");
    }
    let err = String::from_utf8_lossy(&outs[0].stderr);
    assert!(
        err.contains("resuming from step 1, the newest checkpoint every node has"),
        "{err}"
    );
    assert!(
        weights(&n0) == weights(&n1),
        "the resumed nodes wrote different weights"
    );

    // Node 1 asked for more steps: both stop before training, naming the difference.
    let mut other = settings("mismatch");
    other.extend(["--set".into(), "grpo.steps=3".into()]);
    for (rank, out) in run_nodes([settings("mismatch"), other]).iter().enumerate() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "node {rank} trained");
        assert!(
            err.contains("do not run the same thing")
                && err.contains("node 0 has `steps: 2`, node 1 has `steps: 3`"),
            "node {rank}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}
