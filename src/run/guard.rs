//! Safety around a run: one process per run directory (an exclusive lock), a run already in
//! the directory is never overwritten unasked, the directory is checked (writable, enough
//! disk) before any training starts, files are written atomically, and Ctrl-C / SIGTERM ask
//! the training loop to checkpoint and stop after the current step (a second Ctrl-C exits at
//! once).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use burn::train::Interrupter;

use crate::config::RunConfig;

/// Writes `text` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension()
            .map_or(String::new(), |e| e.to_string_lossy().into_owned())
    ));
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// What a training run leaves in its directory: found there, a new run would overwrite it.
pub const TRAIN_OUTPUTS: &[&str] = &[
    "metrics.jsonl",
    "train.log",
    "completions.jsonl",
    "tensorboard",
    "grpo",
    "eval_before.json",
    "eval_after.json",
    "final",
    "report.md",
];

/// What `medr1 sft` leaves.
pub const SFT_OUTPUTS: &[&str] = &["sft"];

/// Which of `names` exist under `dir`.
pub fn existing_outputs(dir: &Path, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .filter(|n| dir.join(n).exists())
        .map(|n| n.to_string())
        .collect()
}

/// Moves a run directory aside to `<dir>.replaced-<unix time>` (taking the lock along) and
/// makes a fresh, locked one in its place; returns where the old run went.
pub fn move_aside(dir: &Path, lock: &mut RunLock) -> anyhow::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = dir
        .file_name()
        .map_or("run".into(), |n| n.to_string_lossy().into_owned());
    let mut aside = dir.with_file_name(format!("{name}.replaced-{secs}"));
    let mut k = 1;
    while aside.exists() {
        aside = dir.with_file_name(format!("{name}.replaced-{secs}-{k}"));
        k += 1;
    }
    std::fs::rename(dir, &aside)
        .with_context(|| format!("cannot move {} aside to {}", dir.display(), aside.display()))?;
    *lock = RunLock::acquire(dir)?;
    Ok(aside)
}

/// An exclusive lock on a run directory (`.lock`, flock(2)): released when dropped or when
/// the process dies, however it dies. The file holds the owner's pid and command line.
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Creates `dir` if needed and locks it, or says which process holds it.
    pub fn acquire(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the run directory {}", dir.display()))?;
        let path = dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        if !try_lock(&file) {
            let owner = std::fs::read_to_string(&path).unwrap_or_default();
            let owner = owner.trim();
            bail!(
                "{} is in use by another medr1 process ({}): two runs in one directory would \
                 mix their checkpoints and logs; wait for it to end, stop it, or give this run \
                 another `name`",
                dir.display(),
                if owner.is_empty() {
                    "pid unknown"
                } else {
                    owner
                }
            );
        }
        let me = format!(
            "pid {}: {}",
            std::process::id(),
            std::env::args().collect::<Vec<_>>().join(" ")
        );
        // The lock is ours: say who holds it.
        use std::io::{Seek, Write};
        let mut f = &file;
        let _ = f.set_len(0);
        let _ = f.seek(std::io::SeekFrom::Start(0));
        let _ = f.write_all(me.as_bytes());
        let _ = f.flush();
        Ok(Self { _file: file })
    }
}

#[cfg(unix)]
fn try_lock(file: &File) -> bool {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a valid open descriptor; LOCK_NB never blocks.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(not(unix))]
fn try_lock(_: &File) -> bool {
    true
}

/// Bytes free on the file system holding `path`.
#[cfg(unix)]
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (rc == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

#[cfg(not(unix))]
fn free_bytes(_: &Path) -> Option<u64> {
    None
}

/// Parameters of the model a run trains (from the checkpoint's config or the tiny spec).
fn parameters(cfg: &RunConfig) -> anyhow::Result<usize> {
    Ok(super::model::architecture(cfg)?.parameter_counts().total())
}

/// Creates the run directory, proves it writable and checks the disk can hold the
/// checkpoints the config asks for (each: the weights saved in f32, AdamW's two f32 moments
/// and, in a bf16 run, the optimizer's f32 master copy of the weights).
pub fn prepare_run_dir(dir: &Path, cfg: &RunConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the run directory {}", dir.display()))?;
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"ok")
        .with_context(|| format!("the run directory {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    let params = parameters(cfg)? as u64;
    let copies = if cfg.dtype == "bf16" { 4 } else { 3 };
    // Optimizer state for what is trained: with LoRA only the adapters (the frozen base's
    // weights are still in each checkpoint).
    let trained = if cfg.lora.enabled {
        let arch = super::model::architecture(cfg)?;
        // A given adapter's own settings rule (as when the run attaches it).
        let lora = if cfg.lora.adapter.is_empty() {
            cfg.lora.lora_config()
        } else {
            qwen2vl::checkpoint::read_adapter_config(Path::new(&cfg.lora.adapter))
                .with_context(|| format!("lora.adapter {}", cfg.lora.adapter))?
        };
        lora.trainable_params(&arch)? as u64
    } else {
        params
    };
    let per_checkpoint = params * 4 + trained * 4 * (copies - 1);
    // Kept checkpoints and one being written (no more than the run will write: one every
    // `checkpoint.every` steps and one at the end), the SFT and final weights.
    // With `grpo.epochs` the step count is known only once the data is read: count the most.
    let written = match cfg.grpo.steps {
        0 => cfg.checkpoint.keep + 1,
        steps => (cfg.checkpoint.keep + 1).min(steps.div_ceil(cfg.checkpoint.every.max(1))),
    };
    let needed = per_checkpoint * written as u64 + params * 4 * 2;
    if let Some(free) = free_bytes(dir) {
        if free < needed {
            bail!(
                "{} has {:.1} GiB free; this run needs about {:.1} GiB ({} checkpoints of \
                 {:.1} GiB: weights and optimizer state, plus SFT and final weights). Free \
                 space, lower checkpoint.keep, or set runs_dir elsewhere.",
                dir.display(),
                free as f64 / (1u64 << 30) as f64,
                needed as f64 / (1u64 << 30) as f64,
                written,
                per_checkpoint as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}

static STOP: AtomicBool = AtomicBool::new(false);

/// The terminal's settings before burn-train's dashboard changed them, for a second Ctrl-C
/// that leaves at once (set once, before the dashboard starts; read in the signal handler).
#[cfg(unix)]
static TERMINAL: std::sync::OnceLock<(libc::c_int, libc::termios)> = std::sync::OnceLock::new();

#[cfg(unix)]
extern "C" fn on_signal(_: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // Second signal: leave now (only async-signal-safe calls here: tcsetattr, write,
        // _exit), putting a terminal the dashboard held back as it was.
        // (OnceLock::get is one atomic load.)
        if let Some((fd, t)) = TERMINAL.get() {
            // SAFETY: a saved termios of an open descriptor; a static byte string.
            unsafe {
                libc::tcsetattr(*fd, libc::TCSANOW, t);
                let leave = b"\x1b[?1049l\x1b[?25h\r\n";
                libc::write(libc::STDOUT_FILENO, leave.as_ptr().cast(), leave.len());
            }
        }
        unsafe { libc::_exit(130) };
    }
}

/// burn-train's dashboard puts the terminal in raw mode, where Ctrl-C is a key press rather
/// than SIGINT, and the dashboard itself only knows `q`. While a `SignalKeys` lives it keeps
/// the terminal's signal keys on (checked every 100 ms), so that Ctrl-C stops the run after
/// the current step as it does without the dashboard.
pub struct SignalKeys {
    done: std::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SignalKeys {
    /// Starts keeping them on the controlling terminal (stdin, or `/dev/tty` when stdin is
    /// redirected); None without one.
    #[cfg(unix)]
    pub fn keep() -> Option<Self> {
        use std::os::unix::io::AsRawFd;
        // SAFETY: isatty / tcgetattr on descriptors this process holds open.
        let fd = if unsafe { libc::isatty(libc::STDIN_FILENO) } == 1 {
            libc::STDIN_FILENO
        } else {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/tty")
                .ok()?;
            // Left open for the process's life: the signal handler may restore through it.
            let fd = f.as_raw_fd();
            std::mem::forget(f);
            fd
        };
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return None;
        }
        let _ = TERMINAL.set((fd, t));
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                let mut now: libc::termios = unsafe { std::mem::zeroed() };
                // SAFETY: as above; only ISIG is changed.
                unsafe {
                    if libc::tcgetattr(fd, &mut now) == 0 && now.c_lflag & libc::ISIG == 0 {
                        now.c_lflag |= libc::ISIG;
                        libc::tcsetattr(fd, libc::TCSANOW, &now);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Some(Self {
            done,
            thread: Some(thread),
        })
    }

    #[cfg(not(unix))]
    pub fn keep() -> Option<Self> {
        None
    }
}

impl Drop for SignalKeys {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A stop request shared by the signal handler and burn-train's interrupter.
#[derive(Clone)]
pub struct Interrupt {
    interrupter: Interrupter,
}

impl Interrupt {
    /// Installs SIGINT / SIGTERM handlers that stop training after the current step.
    pub fn install() -> Self {
        let interrupter = Interrupter::new();
        #[cfg(unix)]
        unsafe {
            libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        }
        let i = interrupter.clone();
        std::thread::spawn(move || loop {
            if STOP.load(Ordering::SeqCst) {
                eprintln!(
                    "\nstopping: during GRPO after the current step, with a checkpoint; \
                     during data checks, SFT or evaluation at once (Ctrl-C again to quit now)"
                );
                i.stop(Some("interrupted by a signal"));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        });
        Self { interrupter }
    }

    pub fn interrupter(&self) -> Interrupter {
        self.interrupter.clone()
    }

    pub fn requested(&self) -> bool {
        self.interrupter.should_stop()
    }
}

/// Standard output sent to a file until dropped (then restored): for a library that prints
/// on stdout while the run shows its own progress. Elsewhere than unix, nothing changes.
pub struct StdoutTo {
    #[cfg(unix)]
    saved: libc::c_int,
}

impl StdoutTo {
    /// Appends standard output to `path` from now on.
    pub fn file(path: &Path) -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use std::io::Write;
            use std::os::fd::AsRawFd;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let _ = std::io::stdout().flush();
            // SAFETY: duplicating and replacing file descriptor 1, which this process owns;
            // `file` stays open until dup2 has made its copy.
            let saved = unsafe { libc::dup(1) };
            if saved < 0 || unsafe { libc::dup2(file.as_raw_fd(), 1) } < 0 {
                bail!(
                    "cannot send standard output to {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
            Ok(Self { saved })
        }
        #[cfg(not(unix))]
        {
            let _ = path;
            Ok(Self {})
        }
    }
}

impl Drop for StdoutTo {
    fn drop(&mut self) {
        #[cfg(unix)]
        {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            // SAFETY: putting back the descriptor saved by `file`, then closing the copy.
            unsafe {
                libc::dup2(self.saved, 1);
                libc::close(self.saved);
            }
        }
    }
}
