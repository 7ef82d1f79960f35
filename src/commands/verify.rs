//! `medr1 verify`: parity checks against transformers' reference fixtures.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::backend::{dispatch, BackendTask, DeviceKind};
use qwen2vl::verify::{verify_chat_cases, verify_fixture, Check, Report};

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
) -> anyhow::Result<bool> {
    let mut total = 0;
    let mut failed = 0;
    for dir in fixtures {
        let report = dispatch(device, Verify { dir })?
            .with_context(|| format!("verifying {}", dir.display()))?;
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
        "summary: {total} checks, {} passed, {failed} failed (device {device:?})",
        total - failed
    );
    Ok(failed == 0)
}
