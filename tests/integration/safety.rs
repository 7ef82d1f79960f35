//! A run that goes wrong says so and keeps what it had: a diverging run skips its non-finite
//! updates, then stops with an error; bad settings are refused before any work.

use serde_json::Value;

use crate::cli::medr1;

#[test]
fn a_diverging_run_skips_bad_updates_then_stops_with_an_error() {
    let runs = std::env::temp_dir().join(format!("medr1-diverge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&runs);
    let sets = [
        format!("runs_dir=\"{}\"", runs.display()),
        "data.synthetic.n=40".to_string(),
        "sft.steps=0".into(),
        "grpo.steps=12".into(),
        "grpo.learning_rate=1e20".into(),
        "eval.before=false".into(),
        "eval.after=false".into(),
        "eval.every=0".into(),
        "checkpoint.every=1".into(),
        "checkpoint.keep=20".into(),
    ];
    let mut args = vec!["train"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let (ok, _, err) = medr1(&args);
    assert!(!ok, "a diverged run must fail: {err}");
    assert!(err.contains("not a finite number"), "{err}");
    assert!(err.contains("grpo.max_bad_steps = 3"), "{err}");
    let dir = runs.join("tiny");
    let rows: Vec<Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let skipped: Vec<usize> = rows
        .iter()
        .filter(|r| r["skipped"] == 1.0)
        .map(|r| r["step"].as_f64().unwrap() as usize)
        .collect();
    // Three bad steps in a row, the last of them the final row.
    assert_eq!(skipped.len(), 3, "{rows:?}");
    assert_eq!(skipped[2], rows.len(), "{rows:?}");
    assert_eq!(skipped[1] + 1, skipped[2]);
    assert!(rows.len() < 12, "the run went on: {rows:?}");
    // Checkpoints were written only while the weights were finite, and none after the stop.
    let states: Vec<usize> = std::fs::read_dir(dir.join("grpo/checkpoint"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_prefix("state-")?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        states.iter().all(|&s| s < rows.len()),
        "{states:?} vs {} steps",
        rows.len()
    );
    assert!(!dir.join("final").exists(), "a diverged run wrote final/");
    let _ = std::fs::remove_dir_all(&runs);
}

/// The SFT warm start has the same guard: non-finite steps are skipped, too many in a row end
/// it with an error and nothing saved.
#[test]
fn a_diverging_warm_start_stops_with_an_error_and_saves_nothing() {
    let runs = std::env::temp_dir().join(format!("medr1-sft-diverge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&runs);
    let sets = [
        format!("runs_dir=\"{}\"", runs.display()),
        "data.synthetic.n=24".to_string(),
        "sft.steps=40".into(),
        "sft.learning_rate=1e20".into(),
        "eval.before=false".into(),
        "eval.after=false".into(),
    ];
    let mut args = vec!["train"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let (ok, _, err) = medr1(&args);
    assert!(!ok, "{err}");
    assert!(err.contains("the SFT warm start diverged"), "{err}");
    assert!(err.contains("the update is skipped"), "{err}");
    assert!(!err.contains("GRPO:"), "GRPO started: {err}");
    assert!(!runs.join("tiny/sft/config.json").exists());
    let _ = std::fs::remove_dir_all(&runs);
}

#[test]
fn bad_settings_are_refused_before_any_work() {
    for (set, key) in [
        ("grpo.rewards.accuracy=nan", "grpo.rewards.accuracy"),
        ("grpo.temperature=nan", "grpo.temperature"),
        ("grpo.top_p=1.5", "grpo.top_p"),
    ] {
        let (ok, _, err) = medr1(&["train", "--set", set]);
        assert!(!ok && err.contains(key), "{set}: {err}");
        assert!(!err.contains("generating"), "{set}: work started: {err}");
    }
    let (ok, _, err) = medr1(&["train", "--set", "grpo.steps=0"]);
    assert!(!ok && err.contains("grpo.epochs"), "{err}");
    assert!(!err.contains("SFT"), "work started: {err}");
}

#[test]
fn a_run_directory_is_never_overwritten_unasked_and_never_shared() {
    let runs = std::env::temp_dir().join(format!("medr1-rundir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&runs);
    let sets = [
        format!("runs_dir=\"{}\"", runs.display()),
        "data.synthetic.n=24".to_string(),
        "sft.steps=0".into(),
        "grpo.steps=1".into(),
        "grpo.num_generations=2".into(),
        "eval.before=false".into(),
        "eval.after=false".into(),
        "eval.every=0".into(),
    ];
    let train = |extra: &[&str]| {
        let mut args = vec!["train"];
        for s in &sets {
            args.extend(["--set", s.as_str()]);
        }
        args.extend(extra);
        medr1(&args)
    };
    let (ok, _, err) = train(&[]);
    assert!(ok, "{err}");
    let dir = runs.join("tiny");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();

    // The same name again, without --resume or --force: refused, nothing touched.
    let (ok, _, err) = train(&[]);
    assert!(!ok && err.contains("already holds a run"), "{err}");
    assert!(err.contains("--resume") && err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(),
        metrics
    );

    // --force starts over and keeps the old run beside the new one.
    let (ok, _, err) = train(&["--force"]);
    assert!(ok, "{err}");
    let aside: Vec<_> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("tiny.replaced-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read_to_string(aside[0].join("metrics.jsonl")).unwrap(),
        metrics
    );
    assert!(dir.join("final/config.json").is_file());

    // Another process holds the directory: a second run says which and does nothing.
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::io::AsRawFd;
        let mut held = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(".lock"))
            .unwrap();
        // SAFETY: a valid open descriptor.
        assert_eq!(
            unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
            0
        );
        held.set_len(0).unwrap();
        held.write_all(b"pid 4242: medr1 train").unwrap();
        let before = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let (ok, _, err) = train(&["--resume"]);
        assert!(
            !ok && err.contains("in use by another medr1 process"),
            "{err}"
        );
        assert!(err.contains("pid 4242"), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(),
            before
        );
        drop(held);
        let (ok, _, err) = train(&["--resume"]);
        assert!(ok, "{err}");
    }
    let _ = std::fs::remove_dir_all(&runs);
}

/// SIGINT during the SFT warm start stops the run at the next step, saving no half-trained
/// warm start that a later run would take for a finished one.
#[cfg(unix)]
#[test]
fn ctrl_c_during_sft_stops_promptly_and_saves_nothing() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let runs = std::env::temp_dir().join(format!("medr1-sigint-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&runs);
    let mut child = Command::new(env!("CARGO_BIN_EXE_medr1"))
        .args(["train", "--set"])
        .arg(format!("runs_dir=\"{}\"", runs.display()))
        .args(["--set", "sft.steps=100000", "--set", "data.synthetic.n=40"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let started = line.starts_with("SFT warm start");
        seen.push(line);
        if started {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let sent = Instant::now();
    seen.extend(lines.map(|l| l.unwrap()));
    let status = child.wait().unwrap();
    let err = seen.join("\n");
    assert!(
        sent.elapsed() < Duration::from_secs(30),
        "took {:?}",
        sent.elapsed()
    );
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("interrupted during the SFT warm start"),
        "{err}"
    );
    assert!(
        !runs.join("tiny/sft/config.json").exists(),
        "a partial warm start was saved"
    );
    let _ = std::fs::remove_dir_all(&runs);
}

/// With burn-train's dashboard on a terminal (raw mode, where Ctrl-C is a key press), Ctrl-C
/// still stops the run after the current step with a checkpoint. The terminal is a pty made
/// by util-linux `script`; the ^C byte is typed into it.
#[cfg(target_os = "linux")]
#[test]
fn ctrl_c_at_the_dashboard_stops_the_run() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let runs = std::env::temp_dir().join(format!("medr1-tui-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&runs);
    let mut cmd = format!("'{}' train", env!("CARGO_BIN_EXE_medr1"));
    for s in [
        format!("runs_dir=\"{}\"", runs.display()),
        "data.synthetic.n=24".into(),
        "sft.steps=0".into(),
        "grpo.steps=200".into(),
        "grpo.num_generations=2".into(),
        "eval.before=false".into(),
        "eval.after=false".into(),
        "eval.every=0".into(),
        "checkpoint.every=1".into(),
    ] {
        cmd += &format!(" --set '{s}'");
    }
    let mut child = Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("util-linux `script` runs the dashboard on a pseudo-terminal");
    let log = runs.join("tiny/train.log");
    let started = Instant::now();
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("checkpoint at step 2")) {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the run did not start"
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"\x03").unwrap();
    stdin.flush().unwrap();
    let sent = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if sent.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("Ctrl-C at the dashboard did not stop the run");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stdin);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(text.contains("interrupted after step"), "{text}");
    let _ = std::fs::remove_dir_all(&runs);
}

/// `medr1 ... | head`: the closed pipe ends medr1 quietly, no panic.
#[cfg(unix)]
#[test]
fn a_closed_stdout_pipe_is_not_a_panic() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen2_vl_2b_instruct_config.json");
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "for i in 1 2 3 4 5 6 7 8; do '{}' inspect '{}'; done | head -c 1 >/dev/null",
            env!("CARGO_BIN_EXE_medr1"),
            config.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

/// A prompt that cannot fit the model's positions with its completion is found when the data
/// is checked, before SFT, evaluation or any step.
#[test]
fn prompts_too_long_for_the_model_are_refused_at_the_data_check() {
    let runs = std::env::temp_dir().join(format!("medr1-toolong-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&runs);
    let runs_set = format!("runs_dir=\"{}\"", runs.display());
    let (ok, _, err) = medr1(&[
        "train",
        "--set",
        &runs_set,
        "--set",
        "data.synthetic.n=24",
        "--set",
        "grpo.max_completion_length=10000000",
    ]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("training record") && err.contains("positions"),
        "{err}"
    );
    assert!(!err.contains("SFT warm start"), "work started: {err}");
    let _ = std::fs::remove_dir_all(&runs);
}

/// What a run reuses from its directory (synthetic data, warm start) must come from the same
/// settings, and `--resume` continues only the same run: step counts and the like may change
/// (recorded), the rest is refused with the differences listed.
#[test]
fn reused_data_warm_starts_and_resumes_must_match_their_settings() {
    let runs = std::env::temp_dir().join(format!("medr1-settings-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&runs);
    let base = [
        format!("runs_dir=\"{}\"", runs.display()),
        "data.synthetic.n=24".to_string(),
        "sft.steps=2".into(),
        "grpo.steps=1".into(),
        "grpo.num_generations=2".into(),
        "eval.before=false".into(),
        "eval.after=false".into(),
        "eval.every=0".into(),
    ];
    let run = |cmd: &str, extra: &[&str]| {
        let mut args = vec![cmd];
        for s in &base {
            args.extend(["--set", s.as_str()]);
        }
        for e in extra {
            if e.starts_with("--") {
                args.push(e);
            } else {
                args.extend(["--set", e]);
            }
        }
        medr1(&args)
    };
    let (ok, _, err) = run("sft", &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = run("train", &["data.synthetic.n=30"]);
    assert!(!ok && err.contains("the synthetic data"), "{err}");
    assert!(err.contains("n: 24 -> 30"), "{err}");
    let (ok, _, err) = run("train", &["sft.learning_rate=0.5"]);
    assert!(
        !ok && err.contains("the warm start") && err.contains("sft.learning_rate"),
        "{err}"
    );
    let (ok, _, err) = run("train", &[]);
    assert!(ok && err.contains("warm start from"), "{err}");

    let (ok, _, err) = run("train", &["--resume", "grpo.learning_rate=0.01"]);
    assert!(!ok && err.contains("grpo.learning_rate"), "{err}");
    let (ok, _, err) = run("train", &["--resume", "grpo.steps=2"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("resumed with changed settings: grpo.steps: 1 -> 2"),
        "{err}"
    );
    let log = std::fs::read_to_string(runs.join("tiny/train.log")).unwrap();
    assert!(log.contains("grpo.steps: 1 -> 2"), "{log}");
    let _ = std::fs::remove_dir_all(&runs);
}
