//! Parity with HuggingFace transformers on the tiny reference fixtures: Qwen2-VL
//! (`tests/fixtures/qwen2vl-tiny-seed0`, copied from `shared/fixtures`, made by
//! `make_fixtures.py --seed 0` with transformers 5.24, float32, eager attention) and Qwen2.5-VL
//! (`tests/fixtures/qwen25vl-tiny-seed0`, made by `tests/fixtures/make_qwen25vl_fixture.py`
//! with transformers 5.25, the same cases, and a windowed vision tower).

use crate::common::{fixture_dir, qwen25vl_fixture_dir, Flex};
use qwen2vl::verify::{verify_fixture, Report};

/// Every check named here must be present and pass: a port that silently skips a stage fails.
const REQUIRED: &[&str] = &[
    "load.unused_keys",
    "single.position_ids",
    "single.rope_deltas",
    "single.vision.patch_embed",
    "single.vision.rot_cos",
    "single.vision.rot_sin",
    "single.vision.block0",
    "single.vision.block1",
    "single.vision.merger_ln_q",
    "single.vision.last_hidden_state",
    "single.image_embeds",
    "single.inputs_embeds",
    "single.text.rope_cos",
    "single.text.layer0",
    "single.text.layer1",
    "single.text.final_norm",
    "single.logits",
    "single.gen.full_logits",
    "single.gen.token_logprobs",
    "multi.position_ids",
    "multi.rope_deltas",
    "multi.vision.block1",
    "multi.image_embeds",
    "multi.text.layer1",
    "multi.logits",
    "multi.gen.token_logprobs",
    "single.image0.resized_u8",
    "single.processor.pixel_values",
    "single.processor.image_grid_thw",
    "multi.image0.resized_u8",
    "multi.image1.resized_u8",
    "multi.processor.pixel_values",
    "decode.image_A_56x84.png",
    "decode.image_B_45x100.png",
    "decode.image_C_150x200.png",
    "single.gen.greedy_tokens",
    "single.gen.step_logits_kvcache",
    "single.gen.step_logprobs_kvcache",
    "single.gen.sampling_t0_equals_greedy",
    "multi.gen.greedy_tokens",
    "multi.gen.step_logits_kvcache",
    "multi.gen.sampling_t0_equals_greedy",
    "batch.scoring.token_logprobs",
    "batch.position_ids",
    "batch.rope_deltas",
    "batch.completion_logits",
    "batch.token_logprobs",
    "layout.hub_config.unused_keys",
    "layout.hub_config.single.logits",
    "layout.hub_config.multi.logits",
    "layout.runtime_layout.unused_keys",
    "layout.runtime_layout.single.logits",
    "layout.runtime_layout.multi.logits",
];

/// Qwen2.5-VL's window path on top: its layout, the windowed blocks 0 and 2 around the
/// full-attention block 1, in both cases (one image of two windows, two images of six).
const REQUIRED_QWEN25VL: &[&str] = &[
    "single.vision.window_index",
    "single.vision.cu_window_seqlens",
    "single.vision.block2",
    "multi.vision.window_index",
    "multi.vision.cu_window_seqlens",
    "multi.vision.block0",
    "multi.vision.block2",
    "multi.vision.merger_ln_q",
];

pub fn assert_report(report: &Report) {
    assert_report_with(report, &[]);
}

fn assert_report_with(report: &Report, more: &[&str]) {
    let mut problems = Vec::new();
    for name in REQUIRED.iter().chain(more) {
        match report.get(name) {
            None => problems.push(format!("{name}: missing")),
            Some(c) if !c.ok() => problems.push(format!(
                "{name}: max abs err {:e} > {:e} {}",
                c.max_abs_err,
                c.tolerance,
                c.note.clone().unwrap_or_default()
            )),
            Some(_) => {}
        }
    }
    for c in report.checks.iter().filter(|c| !c.ok()) {
        problems.push(format!(
            "{}: {:e} > {:e}",
            c.name, c.max_abs_err, c.tolerance
        ));
    }
    assert!(
        problems.is_empty(),
        "parity failures:\n{}",
        problems.join("\n")
    );
}

#[test]
fn tiny_fixture_matches_transformers_on_flex() {
    let report = verify_fixture::<Flex>(&fixture_dir(), &Default::default()).unwrap();
    for c in &report.checks {
        eprintln!("{:<45} {:.3e}", c.name, c.max_abs_err);
    }
    assert_report(&report);
}

/// The laptop-GPU path: the same checks on WGPU (software Vulkan in CI).
#[cfg(feature = "wgpu")]
#[test]
fn tiny_fixture_matches_transformers_on_wgpu() {
    let report =
        verify_fixture::<burn::backend::Wgpu>(&fixture_dir(), &crate::common::wgpu_device())
            .unwrap();
    assert_report(&report);
}

#[test]
fn tiny_qwen25vl_fixture_matches_transformers_on_flex() {
    let report = verify_fixture::<Flex>(&qwen25vl_fixture_dir(), &Default::default()).unwrap();
    assert_report_with(&report, REQUIRED_QWEN25VL);
}

#[cfg(feature = "wgpu")]
#[test]
fn tiny_qwen25vl_fixture_matches_transformers_on_wgpu() {
    let report = verify_fixture::<burn::backend::Wgpu>(
        &qwen25vl_fixture_dir(),
        &crate::common::wgpu_device(),
    )
    .unwrap();
    assert_report_with(&report, REQUIRED_QWEN25VL);
}
