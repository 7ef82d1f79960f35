//! `report.md` and `curves.png` of a finished run.

use std::path::Path;

use grpo::eval::EvalReport;
use serde_json::Value;

use super::plot::{render, smooth, Panel};
use crate::config::RunConfig;

/// An evaluation JSON written earlier (for a resumed run's report).
pub fn read_eval(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn series(rows: &[Value], key: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
        .collect()
}

fn mean(v: &[(f64, f64)]) -> f64 {
    v.iter().map(|p| p.1).sum::<f64>() / v.len().max(1) as f64
}

fn overall(v: &Value) -> Option<(f64, u64, u64)> {
    let o = v.get("overall")?;
    Some((
        o.get("accuracy")?.as_f64()?,
        o.get("total")?.as_u64()?,
        o.get("unparsable")?.as_u64()?,
    ))
}

/// Writes `report.md` and `curves.png`; returns the report text.
pub fn write(
    dir: &Path,
    cfg: &RunConfig,
    before: Option<&Value>,
    after: Option<&EvalReport>,
    grpo_secs: f64,
    total_secs: f64,
) -> anyhow::Result<String> {
    let rows = metrics(dir);
    let train_rows: Vec<Value> = rows
        .iter()
        .filter(|r| r.get("reward_mean").is_some())
        .cloned()
        .collect();
    let reward = series(&train_rows, "reward_mean");
    let acc = series(&train_rows, "reward/accuracy");
    // The format reward's name says which pattern it checks (`format_think`, `format_nothink`).
    let fmt_key = train_rows
        .first()
        .and_then(|r| r.as_object())
        .and_then(|o| o.keys().find(|k| k.starts_with("reward/format")).cloned())
        .unwrap_or_else(|| "reward/format".into());
    let fmt = series(&train_rows, &fmt_key);
    let kl = series(&train_rows, "kl");
    let len = series(&train_rows, "completion_len_mean");
    let held = series(&rows, "valid_accuracy");
    let window = (reward.len() / 10).max(1);
    let mut acc_series = vec![("train (reward)".to_string(), smooth(&acc, window))];
    if !held.is_empty() {
        acc_series.push(("held-out".to_string(), held.clone()));
    }
    let panels = [
        Panel {
            title: format!("mean reward (moving average of {window} steps)"),
            y_label: "reward".into(),
            series: vec![
                ("total".into(), smooth(&reward, window)),
                ("format".into(), smooth(&fmt, window)),
            ],
        },
        Panel {
            title: "accuracy".into(),
            y_label: "accuracy".into(),
            series: acc_series,
        },
        Panel {
            title: "KL to the reference".into(),
            y_label: "kl".into(),
            series: vec![("kl".into(), kl.clone())],
        },
        Panel {
            title: "completion length".into(),
            y_label: "tokens".into(),
            series: vec![("mean".into(), len.clone())],
        },
    ];
    render(&panels)
        .map_err(|e| anyhow::anyhow!("drawing curves.png: {e}"))?
        .save(dir.join("curves.png"))?;

    let tenth = (reward.len() / 10).max(1);
    let first = |v: &[(f64, f64)]| mean(&v[..tenth.min(v.len())]);
    let last = |v: &[(f64, f64)]| mean(&v[v.len().saturating_sub(tenth)..]);
    let mut md = format!("# Run `{}`\n\n", cfg.name);
    md += &format!(
        "Device {} ({}), seed {}. GRPO: {} steps x {} prompts x {} completions, lr {:e}, beta {}. \
         Wall time: {:.0} s in all, {:.0} s of GRPO.\n\n",
        cfg.device,
        cfg.dtype,
        cfg.seed,
        cfg.grpo.steps,
        cfg.grpo.prompts_per_step * cfg.grpo.gradient_accumulation,
        cfg.grpo.num_generations,
        cfg.grpo.learning_rate,
        cfg.grpo.beta,
        total_secs,
        grpo_secs
    );
    md += "## Training\n\n| | first 10% of steps | last 10% of steps |\n|---|---|---|\n";
    for (name, s) in [
        ("mean reward", &reward),
        ("accuracy reward", &acc),
        ("format reward", &fmt),
        ("KL", &kl),
        ("completion length", &len),
    ] {
        if !s.is_empty() {
            md += &format!("| {name} | {:.4} | {:.4} |\n", first(s), last(s));
        }
    }
    md += "\n## Held-out accuracy (greedy)\n\n| | accuracy | questions | unparsable |\n|---|---|---|---|\n";
    let after_json = after.map(|a| serde_json::from_str::<Value>(&a.to_json()).expect("json"));
    let b = before.and_then(overall);
    let a = after_json.as_ref().and_then(overall);
    for (name, v) in [("before GRPO", b), ("after GRPO", a)] {
        if let Some((accuracy, total, unparsable)) = v {
            md += &format!("| {name} | {accuracy:.4} | {total} | {unparsable} |\n");
        }
    }
    if let (Some(b), Some(a)) = (b, a) {
        md += &format!("\nChange from GRPO: {:+.1} points.\n", (a.0 - b.0) * 100.0);
    }
    if let Some(a) = after {
        md += "\n## After GRPO, per modality and question type\n\n";
        md += &a.to_markdown(&cfg.name);
    }
    md += "\n![curves](curves.png)\n";
    super::guard::write_atomic(&dir.join("report.md"), &md)?;
    Ok(md)
}
