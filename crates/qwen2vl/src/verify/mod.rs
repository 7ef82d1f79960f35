//! Parity checks against a reference fixture directory written by transformers
//! (`make_fixtures.py` format). Runs every check the directory supports; used by
//! `medr1 verify` and by the parity tests.

mod bf16;
mod chat;
mod fixture;
mod generation;
mod processor;

pub use bf16::{bf16_report, Bf16Reference, BF16_MARGIN};
pub use chat::verify_chat_cases;

pub use fixture::{Fixture, RefTensor};

use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::checkpoint::{host_f32, load_from_files, load_model, CheckpointFiles};
use crate::config::Qwen2VLConfig;
use crate::error::Qwen2VLError;
use crate::model::{Images, ModelTrace, Qwen2VL};
use crate::positions::TokenBatch;

/// Tolerance for float32 activations, logits and log-probs (the reference's own float32 vs
/// float64 disagreement is ~6e-6).
pub const FLOAT_TOLERANCE: f64 = 1e-4;

/// One comparison with the reference.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub max_abs_err: f64,
    pub tolerance: f64,
    /// Why the error is infinite (shape mismatch, missing output), when it is.
    pub note: Option<String>,
}

impl Check {
    /// NaN never passes.
    pub fn ok(&self) -> bool {
        self.max_abs_err <= self.tolerance
    }
}

/// All checks of one fixture directory.
#[derive(Debug, Clone)]
pub struct Report {
    pub fixture: PathBuf,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failures(&self) -> usize {
        self.checks.iter().filter(|c| !c.ok()).count()
    }

    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// Element-wise comparison; shapes must hold the same number of elements in the same order.
pub fn compare(
    name: &str,
    got: &[f64],
    got_shape: &[usize],
    want: &RefTensor,
    tolerance: f64,
) -> Check {
    if got.len() != want.values.len() {
        return Check {
            name: name.to_string(),
            max_abs_err: f64::INFINITY,
            tolerance,
            note: Some(format!("shape {got_shape:?} vs reference {:?}", want.shape)),
        };
    }
    let mut max = 0.0f64;
    for (a, b) in got.iter().zip(&want.values) {
        let d = (a - b).abs();
        if d.is_nan() || d > max {
            max = d;
            if d.is_nan() {
                break;
            }
        }
    }
    Check {
        name: name.to_string(),
        max_abs_err: max,
        tolerance,
        note: None,
    }
}

struct Checker<'a> {
    fixture: &'a Fixture,
    checks: Vec<Check>,
}

impl Checker<'_> {
    /// Compares `got` with fixture tensor `key` if the fixture has it.
    fn tensor<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        key: &str,
        got: Option<Tensor<B, D>>,
    ) -> Result<(), Qwen2VLError> {
        if !self.fixture.has(key) {
            return Ok(());
        }
        let want = self.fixture.get(key)?;
        let check = match got {
            Some(t) => {
                let (shape, values) = host_f32(t);
                let values: Vec<f64> = values.into_iter().map(f64::from).collect();
                compare(name, &values, &shape, &want, FLOAT_TOLERANCE)
            }
            None => Check {
                name: name.to_string(),
                max_abs_err: f64::INFINITY,
                tolerance: FLOAT_TOLERANCE,
                note: Some("the model produced no such output".into()),
            },
        };
        self.checks.push(check);
        Ok(())
    }

    fn host(
        &mut self,
        name: &str,
        key: &str,
        got: &[f64],
        tolerance: f64,
    ) -> Result<(), Qwen2VLError> {
        if !self.fixture.has(key) {
            return Ok(());
        }
        let want = self.fixture.get(key)?;
        self.checks
            .push(compare(name, got, &[got.len()], &want, tolerance));
        Ok(())
    }
}

/// Log-softmax of `logits` rows (`[rows][vocab]`), evaluated at `targets`, in f64.
pub fn token_logprobs(logits: &[f32], vocab: usize, rows: &[usize], targets: &[u32]) -> Vec<f64> {
    rows.iter()
        .zip(targets)
        .map(|(&r, &t)| {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let lse = row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            row[t as usize] as f64 - lse
        })
        .collect()
}

/// The pixel rows and grids of the fixture's `cases`, concatenated in order (`None` without
/// images).
pub fn images<B: Backend>(
    fixture: &Fixture,
    cases: &[&str],
    device: &B::Device,
) -> Result<Option<Images<B>>, Qwen2VLError> {
    let mut rows = Vec::new();
    let mut grids = Vec::new();
    let mut width = 0;
    for case in cases {
        let key = format!("{case}.pixel_values");
        if !fixture.has(&key) {
            continue;
        }
        let pv = fixture.get(&key)?;
        width = pv.shape[1];
        rows.extend(pv.as_f32());
        grids.extend(fixture.grids(case)?);
    }
    if grids.is_empty() {
        return Ok(None);
    }
    let n = rows.len() / width;
    Ok(Some(Images {
        pixel_values: Tensor::from_data(TensorData::new(rows, [n, width]), device),
        grids,
    }))
}

/// Runs every check `dir` supports on backend `B`.
pub fn verify_fixture<B: Backend>(dir: &Path, device: &B::Device) -> Result<Report, Qwen2VLError> {
    let fixture = Fixture::open(dir)?;
    let hf_dir = dir.join("hf_model");
    let (model, info) = load_model::<B>(&hf_dir, device)?;
    let mut ck = Checker {
        fixture: &fixture,
        checks: Vec::new(),
    };
    ck.checks.push(Check {
        name: "load.unused_keys".into(),
        max_abs_err: info.unused.len() as f64,
        tolerance: 0.0,
        note: (!info.unused.is_empty()).then(|| info.unused.join(", ")),
    });

    let cases = fixture.cases();
    let single_cases: Vec<&str> = cases
        .iter()
        .map(String::as_str)
        .filter(|c| {
            fixture.has(&format!("{c}.input_ids")) && !fixture.has(&format!("{c}.attention_mask"))
        })
        .collect();
    let proc_cfg = processor::processor_config(&fixture.manifest);
    for case in &single_cases {
        ck.processor_case(case, &proc_cfg)?;
        check_case(&mut ck, &model, case, device)?;
        ck.generation_case(&model, case, device)?;
    }
    ck.decoded_images(&cases)?;
    for case in cases
        .iter()
        .filter(|c| fixture.has(&format!("{c}.attention_mask")))
    {
        check_batch(&mut ck, &model, case, &single_cases, device)?;
    }
    check_layouts::<B>(&mut ck, dir, &model.config, &single_cases, device)?;
    Ok(Report {
        fixture: dir.to_path_buf(),
        checks: ck.checks,
    })
}

fn check_case<B: Backend>(
    ck: &mut Checker,
    model: &Qwen2VL<B>,
    case: &str,
    device: &B::Device,
) -> Result<(), Qwen2VLError> {
    let fx = ck.fixture;
    let ids = fx.id_rows(&format!("{case}.input_ids"))?.remove(0);
    let batch = TokenBatch::single(ids.clone());
    let images = images::<B>(fx, &[case], device)?;
    let mut trace = ModelTrace::default();
    let hidden = model.forward_hidden(&batch, images.as_ref(), Some(&mut trace))?;
    let logits = model.logits(hidden);

    let pos = trace.positions.clone().expect("traced");
    let axes: Vec<f64> = pos.axes.iter().flatten().map(|&v| v as f64).collect();
    ck.host(
        &format!("{case}.position_ids"),
        &format!("{case}.position_ids"),
        &axes,
        0.0,
    )?;
    let deltas: Vec<f64> = pos.rope_deltas.iter().map(|&v| v as f64).collect();
    ck.host(
        &format!("{case}.rope_deltas"),
        &format!("{case}.rope_deltas"),
        &deltas,
        0.0,
    )?;

    let v = &trace.vision;
    let p = format!("{case}.vision");
    ck.tensor(
        &format!("{p}.patch_embed"),
        &format!("{p}.patch_embed"),
        v.patch_embed.clone(),
    )?;
    ck.tensor(
        &format!("{p}.rot_cos"),
        &format!("{p}.rot_cos"),
        v.rot_cos.clone(),
    )?;
    ck.tensor(
        &format!("{p}.rot_sin"),
        &format!("{p}.rot_sin"),
        v.rot_sin.clone(),
    )?;
    // Qwen2.5-VL's window layout (the order the blocks run in and the windows they attend in).
    if let Some(win) = model.config.vision.window_tokens() {
        let grids = fx.grids(case)?;
        let layout =
            crate::vision::window_layout(&grids, model.config.vision.spatial_merge_size, win);
        let groups: Vec<f64> = layout.groups.iter().map(|&g| g as f64).collect();
        ck.host(
            &format!("{p}.window_index"),
            &format!("{p}.window_index"),
            &groups,
            0.0,
        )?;
        let cumulative: Vec<f64> = std::iter::once(0.0)
            .chain(layout.segments.iter().scan(0usize, |acc, &n| {
                *acc += n;
                Some(*acc as f64)
            }))
            .collect();
        ck.host(
            &format!("{p}.cu_window_seqlens"),
            &format!("{p}.cu_window_seqlens"),
            &cumulative,
            0.0,
        )?;
    }
    for (i, b) in v.blocks.iter().enumerate() {
        ck.tensor(
            &format!("{p}.block{i}"),
            &format!("{p}.block{i}"),
            Some(b.clone()),
        )?;
    }
    ck.tensor(
        &format!("{p}.merger_ln_q"),
        &format!("{p}.merger_ln_q"),
        v.merger_ln_q.clone(),
    )?;
    ck.tensor(
        &format!("{p}.last_hidden_state"),
        &format!("{p}.last_hidden_state"),
        v.blocks.last().cloned(),
    )?;
    ck.tensor(
        &format!("{case}.image_embeds"),
        &format!("{case}.image_embeds"),
        trace.image_embeds.clone(),
    )?;
    ck.tensor(
        &format!("{case}.inputs_embeds"),
        &format!("{case}.inputs_embeds"),
        trace.inputs_embeds.clone(),
    )?;
    ck.tensor(
        &format!("{case}.text.rope_cos"),
        &format!("{case}.text.rope_cos"),
        trace.rope_cos.clone(),
    )?;
    ck.tensor(
        &format!("{case}.text.rope_sin"),
        &format!("{case}.text.rope_sin"),
        trace.rope_sin.clone(),
    )?;
    for (i, l) in trace.layers.iter().enumerate() {
        ck.tensor(
            &format!("{case}.text.layer{i}"),
            &format!("{case}.text.layer{i}"),
            Some(l.clone()),
        )?;
    }
    ck.tensor(
        &format!("{case}.text.final_norm"),
        &format!("{case}.text.final_norm"),
        trace.final_norm.clone(),
    )?;
    ck.tensor(
        &format!("{case}.logits"),
        &format!("{case}.logits"),
        Some(logits),
    )?;

    // Teacher-forced scoring of prompt + generated tokens (what GRPO computes).
    let full_key = format!("{case}.gen.full_ids");
    if fx.has(&full_key) {
        let full = fx.id_rows(&full_key)?.remove(0);
        let fb = TokenBatch::single(full.clone());
        let mut ft = ModelTrace::default();
        let logits = model.logits(model.forward_hidden(&fb, images.as_ref(), Some(&mut ft))?);
        let fpos = ft.positions.expect("traced");
        let axes: Vec<f64> = fpos.axes.iter().flatten().map(|&v| v as f64).collect();
        ck.host(
            &format!("{case}.gen.full_position_ids"),
            &format!("{case}.gen.full_position_ids"),
            &axes,
            0.0,
        )?;
        let vocab = model.config.text.vocab_size;
        let (_, lv) = host_f32(logits.clone());
        ck.tensor(
            &format!("{case}.gen.full_logits"),
            &format!("{case}.gen.full_logits"),
            Some(logits),
        )?;
        let l = ids.len();
        let rows: Vec<usize> = (l - 1..full.len() - 1).collect();
        let lp = token_logprobs(&lv, vocab, &rows, &full[l..]);
        ck.host(
            &format!("{case}.gen.token_logprobs"),
            &format!("{case}.gen.token_logprobs"),
            &lp,
            FLOAT_TOLERANCE,
        )?;
        let rows: Vec<usize> = (0..full.len() - 1).collect();
        let lp = token_logprobs(&lv, vocab, &rows, &full[1..]);
        ck.host(
            &format!("{case}.gen.all_next_token_logprobs"),
            &format!("{case}.gen.all_next_token_logprobs"),
            &lp,
            FLOAT_TOLERANCE,
        )?;
    }
    Ok(())
}

/// A left-padded batch whose rows are other cases' full sequences; each row's images are found
/// by matching the row's ids to a case.
fn check_batch<B: Backend>(
    ck: &mut Checker,
    model: &Qwen2VL<B>,
    case: &str,
    single_cases: &[&str],
    device: &B::Device,
) -> Result<(), Qwen2VLError> {
    let fx = ck.fixture;
    let ids = fx.id_rows(&format!("{case}.input_ids"))?;
    let mask = fx.id_rows(&format!("{case}.attention_mask"))?;
    let mut rows = Vec::new();
    let mut owners = Vec::new();
    for (r, (row, m)) in ids.iter().zip(&mask).enumerate() {
        let real: Vec<u32> = row
            .iter()
            .zip(m)
            .filter(|(_, &m)| m != 0)
            .map(|(&t, _)| t)
            .collect();
        let owner = single_cases.iter().find(|c| {
            [format!("{c}.gen.full_ids"), format!("{c}.input_ids")]
                .iter()
                .any(|k| fx.has(k) && fx.id_rows(k).map(|v| v[0] == real).unwrap_or(false))
        });
        let Some(owner) = owner else {
            return Err(Qwen2VLError::Checkpoint {
                dir: fx.dir.clone(),
                message: format!(
                    "{case}: row {r} matches no case's token ids, so its images are unknown"
                ),
            });
        };
        owners.push(*owner);
        rows.push(real);
    }
    let batch = TokenBatch {
        ids: ids.concat(),
        attention_mask: mask.concat().iter().map(|&v| v as u8).collect(),
        batch: ids.len(),
        len: ids[0].len(),
    };
    ck.batch_scoring(model, case, &owners, device)?;
    let images = images::<B>(fx, &owners, device)?;
    let mut trace = ModelTrace::default();
    let hidden = model.forward_hidden(&batch, images.as_ref(), Some(&mut trace))?;
    let pos = trace.positions.expect("traced");
    let axes: Vec<f64> = pos.axes.iter().flatten().map(|&v| v as f64).collect();
    ck.host(
        &format!("{case}.position_ids"),
        &format!("{case}.position_ids"),
        &axes,
        0.0,
    )?;
    let deltas: Vec<f64> = pos.rope_deltas.iter().map(|&v| v as f64).collect();
    ck.host(
        &format!("{case}.rope_deltas"),
        &format!("{case}.rope_deltas"),
        &deltas,
        0.0,
    )?;

    let key = format!("{case}.completion_logits");
    if fx.has(&key) {
        let want = fx.get(&key)?;
        let n = want.shape[1];
        let t = batch.len;
        let comp = hidden.narrow(1, t - 1 - n, n);
        let logits = model.logits(comp);
        let (shape, lv) = host_f32(logits);
        let vocab = model.config.text.vocab_size;
        let got: Vec<f64> = lv.iter().map(|&v| v as f64).collect();
        ck.checks
            .push(compare(&key, &got, &shape, &want, FLOAT_TOLERANCE));
        let mut lp = Vec::new();
        for b in 0..batch.batch {
            let targets = &batch.row(b)[t - n..];
            let rows: Vec<usize> = (0..n).map(|i| b * n + i).collect();
            lp.extend(token_logprobs(&lv, vocab, &rows, targets));
        }
        ck.host(
            &format!("{case}.token_logprobs"),
            &format!("{case}.token_logprobs"),
            &lp,
            FLOAT_TOLERANCE,
        )?;
    }
    Ok(())
}

/// The same weights in the other layouts must give the same logits.
fn check_layouts<B: Backend>(
    ck: &mut Checker,
    dir: &Path,
    config: &Qwen2VLConfig,
    cases: &[&str],
    device: &B::Device,
) -> Result<(), Qwen2VLError> {
    let hf_weights = dir.join("hf_model").join("model.safetensors");
    let mut variants: Vec<(&str, Qwen2VLConfig, PathBuf)> = Vec::new();
    let hub_config = dir.join("hub_config.json");
    if hub_config.is_file() && hf_weights.is_file() {
        variants.push((
            "hub_config",
            Qwen2VLConfig::from_file(&hub_config)?,
            hf_weights.clone(),
        ));
    }
    let runtime = dir.join("runtime_layout_model.safetensors");
    if runtime.is_file() {
        variants.push(("runtime_layout", config.clone(), runtime));
    }
    for (name, cfg, weights) in variants {
        let files = CheckpointFiles::from_paths(dir, vec![weights])?;
        let (model, info) = load_from_files::<B>(files, &cfg, device)?;
        ck.checks.push(Check {
            name: format!("layout.{name}.unused_keys"),
            max_abs_err: info.unused.len() as f64,
            tolerance: 0.0,
            note: (!info.unused.is_empty()).then(|| info.unused.join(", ")),
        });
        for case in cases {
            let ids = ck.fixture.id_rows(&format!("{case}.input_ids"))?.remove(0);
            let images = images::<B>(ck.fixture, &[case], device)?;
            let logits = model.forward(&TokenBatch::single(ids), images.as_ref())?;
            ck.tensor(
                &format!("layout.{name}.{case}.logits"),
                &format!("{case}.logits"),
                Some(logits),
            )?;
        }
    }
    Ok(())
}
