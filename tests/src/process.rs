//! The real `kmod-monitor` binary, built once per test process, and the
//! child processes the tests start: their output captured as it arrives,
//! and a guard that kills and reaps them whatever happens.
use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock, PoisonError},
    thread,
    time::{Duration, Instant},
};

use crate::workspace_dir;

/// The `kmod-monitor` binary, built once per test process with
/// `cargo build -p kmod-monitor --bin kmod-monitor` (same profile as the
/// tests) through escargot.
///
/// The tests crate cannot get `CARGO_BIN_EXE_kmod-monitor` (that only exists
/// for a package's own binaries), and a binary merely found in `target/`
/// may be stale or missing on a fresh clone. Asking cargo is always right:
/// it is a no-op when the binary is up to date. `AYA_BUILD_SKIP` in the
/// environment reaches the daemon's build script unchanged.
///
/// # Panics
/// When the build fails; cargo's diagnostics are in the message.
pub fn kmod_monitor_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let manifest = workspace_dir().join("Cargo.toml");
        let build = escargot::CargoBuild::new()
            .manifest_path(&manifest)
            .package("kmod-monitor")
            .bin("kmod-monitor")
            .current_release()
            .run()
            .unwrap_or_else(|e| {
                panic!(
                    "building kmod-monitor (cargo build -p kmod-monitor, {}) failed: {e}",
                    manifest.display()
                )
            });
        build.path().to_path_buf()
    })
}

/// Output captured from a child's pipe as it arrives, readable while the
/// child still runs.
#[derive(Clone, Default)]
pub(crate) struct Captured(Arc<Mutex<String>>);

impl Captured {
    /// Reads `pipe` to its end on a background thread.
    pub(crate) fn spawn(pipe: impl Read + Send + 'static) -> (Self, thread::JoinHandle<()>) {
        let captured = Self::default();
        let sink = captured.clone();
        let handle = thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                sink.lock().push_str(&String::from_utf8_lossy(&line));
                line.clear();
            }
        });
        (captured, handle)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn text(&self) -> String {
        self.lock().clone()
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so no
/// test leaves one behind, panicking or not.
pub(crate) struct ChildGuard {
    pub(crate) child: Child,
    exited: Option<ExitStatus>,
}

impl ChildGuard {
    /// Guards `child` from now on.
    pub(crate) const fn new(child: Child) -> Self {
        Self {
            child,
            exited: None,
        }
    }

    pub(crate) fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for pid {}: {e}", self.child.id()));
        }
        self.exited
    }

    /// Waits up to `timeout` for the child to exit.
    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Never panic here: this also runs while a failed test unwinds.
        if self.exited.is_none() && !matches!(self.child.try_wait(), Ok(Some(_))) {
            // An error means it is already gone: nothing else to do.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `kmod-monitor` command line with the environment every test uses:
/// plain-text logs at `info` (no colours to trip up string checks), and no
/// way to find a cluster but the `--kubeconfig` a test passes: no
/// `$KUBECONFIG`, no `~/.kube/config`, no in-cluster service account. The
/// daemon writes to the cluster it finds (its Node condition, Events), and
/// a test run on a machine that can reach a real one must not.
pub(crate) fn command(args: &[OsString]) -> Command {
    let mut cmd = Command::new(kmod_monitor_bin());
    cmd.args(args)
        .env("NO_COLOR", "1")
        .env("KMOD_MONITOR_LOG", "info")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("HOME", "/nonexistent/kmod-monitor-tests-home")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `args` as shown in messages.
pub(crate) fn shell_words(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts `cmd` with RLIMIT_NOFILE set to `n` (soft and hard), as a unit
/// with `LimitNOFILE=n` would.
pub(crate) fn limit_nofile(cmd: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt as _;
    let limit = rustix::process::Rlimit {
        current: Some(n),
        maximum: Some(n),
    };
    // SAFETY: the closure runs in the forked child before exec; it only
    // makes the setrlimit system call (async-signal-safe, no allocation, no
    // lock) on a value prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                .map_err(std::io::Error::from)
        });
    }
}

/// Raises this process's RLIMIT_NOFILE soft limit to its hard limit (a
/// test that opens a thousand connections needs more than 1024), and
/// returns the soft limit now.
#[must_use]
pub fn raise_own_nofile() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limit.maximum.unwrap_or(u64::MAX),
        Err(_) => limit.current.unwrap_or(u64::MAX),
    }
}
