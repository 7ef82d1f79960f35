//! `medr1 verify`: parity checks against transformers' reference fixtures.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::backend::{dispatch_dtype, BackendTask, DeviceKind};
use qwen2vl::verify::{
    bf16_report, verify_chat_cases, verify_fixture, Bf16Reference, Check, Report,
};

struct Verify<'a> {
    dir: &'a Path,
}

impl BackendTask for Verify<'_> {
    type Output = Result<Report, qwen2vl::Qwen2VLError>;
    fn run<B: burn::tensor::backend::Backend>(self, device: B::Device) -> Self::Output {
        verify_fixture::<B>(self.dir, &device)
    }
}

fn print_checks(checks: &[Check]) {
    println!(
        "{:<48} {:>12} {:>10}  result",
        "check", "max_abs_err", "tolerance"
    );
    for c in checks {
        let status = if c.ok() { "ok" } else { "FAIL" };
        let note = c
            .note
            .as_deref()
            .map(|n| format!("  ({n})"))
            .unwrap_or_default();
        println!(
            "{:<48} {:>12.3e} {:>10.1e}  {status}{note}",
            c.name, c.max_abs_err, c.tolerance
        );
    }
}

/// Prints one line per check and a summary; true when every check passed.
pub fn run(
    fixtures: &[PathBuf],
    chat: Option<(PathBuf, PathBuf)>,
    device: DeviceKind,
    bf16: bool,
) -> anyhow::Result<bool> {
    let mut total = 0;
    let mut failed = 0;
    // The bf16 backend setting is made once per process, before the first tensor; the
    // reference is read before the backend starts, so that a missing file fails fast.
    let reference = match (bf16, fixtures) {
        (false, _) | (true, []) => None,
        (true, [dir]) => Some(Bf16Reference::open(dir)?),
        _ => anyhow::bail!("--bf16 checks one fixture directory per run"),
    };
    for dir in fixtures {
        let report = dispatch_dtype(device, bf16, Verify { dir })?
            .with_context(|| format!("verifying {}", dir.display()))?;
        let report = match &reference {
            Some(reference) => {
                println!("bf16 reference: {}", reference.engine);
                bf16_report(report, reference)
            }
            None => report,
        };
        println!("fixture {}", dir.display());
        print_checks(&report.checks);
        total += report.checks.len();
        failed += report.failures();
    }
    if let Some((cases, tokenizer)) = chat {
        let checks = verify_chat_cases(&cases, &tokenizer)
            .with_context(|| format!("checking chat cases {}", cases.display()))?;
        println!(
            "chat cases {} with {}",
            cases.display(),
            tokenizer.display()
        );
        print_checks(&checks);
        total += checks.len();
        failed += checks.iter().filter(|c| !c.ok()).count();
    }
    println!(
        "summary: {total} checks, {} passed, {failed} failed (device {device:?}, {})",
        total - failed,
        if bf16 { "bf16" } else { "f32" }
    );
    Ok(failed == 0)
}
