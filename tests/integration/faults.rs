//! Fault injection on whole runs: a run killed with SIGKILL at random points (a checkpoint's
//! renames delayed so that kills land mid-write) and a run whose disk fills up both resume to
//! the same final weights as an uninterrupted run, with every step in metrics.jsonl exactly
//! once, and the full disk is a clear error rather than a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use grpo::host::RENAME_DELAY_ENV;

const STEPS: usize = 8;

fn runs_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("medr1-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A short tiny run: a checkpoint after every step, one kept.
fn train_args(runs: &Path, resume: bool) -> Vec<String> {
    let mut args = vec!["train".to_string()];
    for s in [
        format!("runs_dir=\"{}\"", runs.display()),
        "data.synthetic.n=24".to_string(),
        "sft.steps=0".into(),
        format!("grpo.steps={STEPS}"),
        "grpo.num_generations=2".into(),
        "grpo.gradient_accumulation=1".into(),
        "eval.before=false".into(),
        "eval.after=false".into(),
        "eval.every=0".into(),
        "checkpoint.every=1".into(),
        "checkpoint.keep=1".into(),
    ] {
        args.extend(["--set".to_string(), s]);
    }
    if resume {
        args.push("--resume".into());
    }
    args
}

fn medr1() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_medr1"));
    c.stdin(Stdio::null());
    c
}

/// Steps logged in `metrics.jsonl` (training rows only), in file order.
fn metric_steps(runs: &Path) -> Vec<usize> {
    std::fs::read_to_string(runs.join("tiny/metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .filter_map(|v| v["step"].as_f64())
        .map(|s| s as usize)
        .collect()
}

fn final_weights(runs: &Path) -> Vec<u8> {
    let path = runs.join("tiny/final/model.safetensors");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// An uninterrupted run's final weights (`tag`: the test's own directory).
fn reference_weights(tag: &str) -> Vec<u8> {
    let runs = runs_dir(&format!("{tag}-reference"));
    let out = medr1().args(train_args(&runs, false)).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(metric_steps(&runs), (1..=STEPS).collect::<Vec<_>>());
    let w = final_weights(&runs);
    let _ = std::fs::remove_dir_all(&runs);
    w
}

fn assert_finished_like_reference(runs: &Path, reference: &[u8]) {
    assert_eq!(
        metric_steps(runs),
        (1..=STEPS).collect::<Vec<_>>(),
        "each step must be logged exactly once"
    );
    assert!(final_weights(runs) == reference, "final weights differ");
    let ck = runs.join("tiny/grpo/checkpoint");
    let left: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!left.iter().any(|n| n.contains("tmp")), "{left:?}");
    // keep = 1: the last checkpoint alone.
    let states: Vec<&String> = left.iter().filter(|n| n.starts_with("state-")).collect();
    assert_eq!(states, vec![&format!("state-{STEPS}.json")], "{left:?}");
}

/// xorshift: reproducible "random" kill points.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn kill_9_at_random_points_then_resume_ends_like_an_uninterrupted_run() {
    let reference = reference_weights("killed");
    let runs = runs_dir("killed");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut kills = Vec::new();
    for round in 0..6 {
        let before = metric_steps(&runs).len();
        let mut child = medr1()
            .args(train_args(&runs, round > 0))
            .env(RENAME_DELAY_ENV, "60")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The first kill lands in the start-up (data generation, checks); later ones a
        // step or two on, at a random moment of the step or its checkpoint write.
        let target = before + 1 + rng.below(2) as usize;
        let started = Instant::now();
        let mut delay = Duration::from_millis(if round == 0 {
            50 + rng.below(400)
        } else {
            rng.below(150)
        });
        let exited = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if round == 0 || metric_steps(&runs).len() >= target {
                std::thread::sleep(delay);
                delay = Duration::ZERO;
                if child.try_wait().unwrap().is_none() {
                    break None;
                }
            }
            assert!(started.elapsed() < Duration::from_secs(300), "run hangs");
            std::thread::sleep(Duration::from_millis(5));
        };
        match exited {
            Some(status) => {
                assert!(status.success(), "round {round}: {status}");
                break;
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills.push(metric_steps(&runs).len());
            }
        }
    }
    assert!(kills.len() >= 4, "too few kills landed: {kills:?}");
    let out = medr1().args(train_args(&runs, true)).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_finished_like_reference(&runs, &reference);
    let _ = std::fs::remove_dir_all(&runs);
}

/// Whether this machine lets an unprivileged namespace mount a tmpfs.
fn namespaces_work() -> bool {
    Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Output of one run inside the full-disk scenario.
struct Outcome {
    code: Option<i32>,
    stderr: String,
}

/// The run's directory on a 48 MiB tmpfs, in a private mount namespace; once step 2 is
/// logged the rest of the tmpfs is filled, then freed for `--resume`. The run directory is
/// copied out for the checks.
fn full_tmpfs(runs: &Path, out: &Path) -> (Outcome, Outcome) {
    let bin = env!("CARGO_BIN_EXE_medr1");
    let quote = |a: &[String]| {
        a.iter()
            .map(|s| format!("'{}'", s.replace('\'', r"'\''")))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let script = format!(
        r#"set -u
mkdir -p '{runs}' '{out}'
mount -t tmpfs -o size=48m tmpfs '{runs}' || exit 90
'{bin}' {first} > '{out}/first.out' 2> '{out}/first.err' < /dev/null &
pid=$!
while kill -0 $pid 2>/dev/null; do
  n=$(grep -c loss '{runs}/tiny/metrics.jsonl' 2>/dev/null || true)
  [ "${{n:-0}}" -ge 2 ] && break
  sleep 0.01
done
dd if=/dev/zero of='{runs}/filler' bs=64k 2>/dev/null
wait $pid
echo $? > '{out}/first.rc'
rm -f '{runs}/filler'
'{bin}' {second} > '{out}/second.out' 2> '{out}/second.err' < /dev/null
echo $? > '{out}/second.rc'
cp -r '{runs}/tiny' '{out}/tiny'
"#,
        runs = runs.display(),
        out = out.display(),
        first = quote(&train_args(runs, false)),
        second = quote(&train_args(runs, true)),
    );
    let status = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .status()
        .unwrap();
    assert!(status.success(), "the scenario script failed: {status}");
    let read = |name: &str| {
        let rc = std::fs::read_to_string(out.join(format!("{name}.rc"))).unwrap();
        Outcome {
            code: rc.trim().parse().ok(),
            stderr: std::fs::read_to_string(out.join(format!("{name}.err"))).unwrap(),
        }
    };
    (read("first"), read("second"))
}

/// Where namespaces are not allowed: the same failure from a link to /dev/full (every write
/// ENOSPC) planted where step 3's optimizer record is written, removed for `--resume`.
fn dev_full(runs: &Path, out: &Path) -> (Outcome, Outcome) {
    let run = |resume: bool, plant: bool| {
        let child = medr1()
            .args(train_args(runs, resume))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if plant {
            let ck = runs.join("tiny/grpo/checkpoint");
            let started = Instant::now();
            while metric_steps(runs).is_empty() {
                assert!(started.elapsed() < Duration::from_secs(300), "run hangs");
                std::thread::sleep(Duration::from_millis(5));
            }
            std::os::unix::fs::symlink("/dev/full", ck.join(".tmp-optim-3.bin")).unwrap();
        }
        let o = child.wait_with_output().unwrap();
        Outcome {
            code: o.status.code(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    };
    let first = run(false, true);
    let second = run(true, false);
    copy_dir(&runs.join("tiny"), &out.join("tiny"));
    (first, second)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_stops_the_run_with_a_clear_error_and_it_resumes() {
    let reference = reference_weights("full");
    let runs = runs_dir("full");
    let out = runs_dir("full-out");
    let (first, second) = if namespaces_work() {
        full_tmpfs(&runs, &out)
    } else {
        eprintln!("no mount namespaces here: the full disk is a link to /dev/full");
        dev_full(&runs, &out)
    };
    assert_ne!(
        first.code,
        Some(0),
        "a run that could not checkpoint succeeded"
    );
    assert_ne!(
        first.code,
        Some(101),
        "a full disk panicked: {}",
        first.stderr
    );
    assert!(!first.stderr.contains("panicked"), "{}", first.stderr);
    assert!(
        first.stderr.contains("could not be written") && first.stderr.contains("--resume"),
        "{}",
        first.stderr
    );
    assert_eq!(second.code, Some(0), "{}", second.stderr);
    let log = std::fs::read_to_string(out.join("tiny/train.log")).unwrap();
    assert!(
        log.contains("resumed at step"),
        "the resumed run started over: {log}"
    );
    assert_finished_like_reference(&out, &reference);
    let _ = (
        std::fs::remove_dir_all(&runs),
        std::fs::remove_dir_all(&out),
    );
}
