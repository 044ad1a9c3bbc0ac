//! Shared support for the CLI integration tests (`tests/cli/main.rs`): builds the
//! real `kmod-monitor` binary once, lays out fake host roots from the real
//! fixtures in `monitor/src/host/fixtures/`, runs one-shot commands, and
//! starts `run` daemons that a drop guard always kills.
//!
//! Every helper panics with a message naming what it was doing (and, for a
//! command or daemon, its arguments and output) rather than returning an
//! error: a test fails by panicking, and the message is the diagnosis.

#[cfg(not(target_env = "musl"))]
pub mod apiserver;
pub mod servers;
use std::{
    ffi::OsString,
    fmt, fs,
    io::{BufRead as _, BufReader, Read},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock, PoisonError},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// `uname -r` of the Debian 12 guest the 6.1 fixtures come from.
pub const DEBIAN_6_1: &str = "6.1.0-56-amd64";
/// `uname -r` of the Debian 13 guest the 6.12 fixtures come from.
pub const DEBIAN_6_12: &str = "6.12.117+deb13-amd64";
/// `uname -r` of the development machine built without `CONFIG_MODULES`.
pub const DEV_6_18: &str = "6.18.44";

/// What `check` suggests appending the module name to.
pub const MODULES_LOAD_FILE: &str = "/etc/modules-load.d/kmod-monitor.conf";

/// How long a one-shot command may take before it counts as hung.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon may take to answer /healthz after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a condition on /status or stderr is re-checked.
const POLL_EVERY: Duration = Duration::from_millis(50);

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

/// The workspace root (the directory holding `monitor/` and `tests/`).
#[must_use]
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent", env!("CARGO_MANIFEST_DIR")))
        .to_path_buf()
}

/// A fixture file captured from a real system (see the README there).
#[must_use]
pub fn fixture_path(name: &str) -> PathBuf {
    workspace_dir().join("monitor/src/host/fixtures").join(name)
}

/// The bytes of a fixture file.
///
/// # Panics
/// When the file cannot be read.
#[must_use]
pub fn fixture(name: &str) -> Vec<u8> {
    let path = fixture_path(name);
    fs::read(&path).unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()))
}

/// The text of a fixture file.
///
/// # Panics
/// When the file cannot be read or is not UTF-8.
#[must_use]
pub fn fixture_text(name: &str) -> String {
    String::from_utf8(fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: not UTF-8: {e}"))
}

/// A fake host `/` in a temporary directory, for `--host-root`. Removed
/// when dropped.
pub struct FakeHost {
    dir: tempfile::TempDir,
    release: String,
}

impl FakeHost {
    /// An empty root whose kernel release is `release`
    /// (`proc/sys/kernel/osrelease` only).
    ///
    /// # Panics
    /// When the temporary directory cannot be created.
    #[must_use]
    pub fn with_release(release: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kmod-monitor-host-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temporary host root: {e}"));
        let host = Self {
            dir,
            release: release.to_owned(),
        };
        host.write("proc/sys/kernel/osrelease", format!("{release}\n"));
        // Every real host has one; a Debian default install's, for this
        // release.
        host.write(
            "proc/cmdline",
            format!(
                "BOOT_IMAGE=/boot/vmlinuz-{release} root=UUID=0a8b1a2c-5f7e-4a4e-9d55-3c1f0e2b7d61 ro quiet\n"
            ),
        );
        host
    }

    /// The Debian 12 guest (6.1.0-56-amd64) as captured: dm_crypt, nvme_tcp
    /// and vfio_pci loaded with their dependencies, uio_pci_generic only
    /// available; modules under `lib/modules`, config in `boot/`, and
    /// `sys/module/<m>/initstate` = `live` for every loaded module.
    #[must_use]
    pub fn debian_6_1() -> Self {
        let host = Self::with_release(DEBIAN_6_1);
        let dir = format!("lib/modules/{DEBIAN_6_1}");
        host.write(
            format!("{dir}/modules.builtin"),
            fixture("modules.builtin.debian-6.1"),
        );
        host.write(
            format!("{dir}/modules.dep"),
            fixture("modules.dep.debian-6.1"),
        );
        host.write(
            format!("boot/config-{DEBIAN_6_1}"),
            fixture("config.debian-6.1"),
        );
        host.set_proc_modules_with_initstate(&fixture_text("proc_modules.debian-6.1"));
        host
    }

    /// The Debian 13 guest (6.12.117): same modules loaded, module tree
    /// under `usr/lib/modules` (merged /usr) with `.ko.xz` files. No kernel
    /// config was captured for it, so there is none.
    #[must_use]
    pub fn debian_6_12() -> Self {
        let host = Self::with_release(DEBIAN_6_12);
        let dir = format!("usr/lib/modules/{DEBIAN_6_12}");
        host.write(
            format!("{dir}/modules.builtin"),
            fixture("modules.builtin.debian-6.12"),
        );
        host.write(
            format!("{dir}/modules.dep"),
            fixture("modules.dep.debian-6.12"),
        );
        host.set_proc_modules_with_initstate(&fixture_text("proc_modules.debian-6.12"));
        host
    }

    /// The development machine: 6.18.44 built without `CONFIG_MODULES`, so
    /// no `proc/modules` and no module tree; only its `proc/config.gz`.
    #[must_use]
    pub fn dev_6_18_no_modules() -> Self {
        let host = Self::with_release(DEV_6_18);
        host.write("proc/config.gz", fixture("config.gz.dev-6.18"));
        host
    }

    /// The root directory, for `--host-root`.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The kernel release this root reports.
    #[must_use]
    pub fn release(&self) -> &str {
        &self.release
    }

    /// `rel` (no leading `/`) under the root.
    #[must_use]
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The module directory this root's kernel uses (whichever of
    /// `lib/modules/<rel>` and `usr/lib/modules/<rel>` exists).
    ///
    /// # Panics
    /// When the root has no module directory.
    #[must_use]
    pub fn modules_dir(&self) -> PathBuf {
        ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| self.join(d).join(&self.release))
            .find(|d| d.is_dir())
            .unwrap_or_else(|| {
                panic!(
                    "{} has no module directory for {}",
                    self.path().display(),
                    self.release
                )
            })
    }

    /// Writes `content` to `rel` atomically (temporary file, then rename),
    /// creating parent directories: a daemon reading the file sees either
    /// the old or the new content, never a torn one.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn write(&self, rel: impl AsRef<Path>, content: impl AsRef<[u8]>) {
        write_atomic(&self.join(rel), content.as_ref());
    }

    /// The text of `rel`.
    ///
    /// # Panics
    /// When the file cannot be read.
    #[must_use]
    pub fn read(&self, rel: impl AsRef<Path>) -> String {
        let path = self.join(rel);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    /// Replaces the one occurrence of `from` in `rel` by `to`.
    ///
    /// # Panics
    /// Unless `from` occurs exactly once (so an edit of a fixture that
    /// changed under the test cannot silently do nothing).
    pub fn replace(&self, rel: impl AsRef<Path>, from: &str, to: &str) {
        let rel = rel.as_ref();
        let text = self.read(rel);
        let count = text.matches(from).count();
        assert_eq!(
            count,
            1,
            "{} contains {from:?} {count} times, expected once",
            rel.display()
        );
        self.write(rel, text.replacen(from, to, 1));
    }

    /// Removes from `rel` every line for which `drop` holds.
    ///
    /// # Panics
    /// Unless exactly one line is removed.
    pub fn remove_line(&self, rel: impl AsRef<Path>, drop: impl Fn(&str) -> bool) {
        let rel = rel.as_ref();
        let text = self.read(rel);
        let kept: String = text
            .lines()
            .filter(|l| !drop(l))
            .map(|l| format!("{l}\n"))
            .collect();
        let removed = text.lines().count() - kept.lines().count();
        assert_eq!(
            removed,
            1,
            "{}: removed {removed} lines, expected one",
            rel.display()
        );
        self.write(rel, kept);
    }

    /// Whether `proc/modules` lists `module`.
    #[must_use]
    pub fn is_loaded(&self, module: &str) -> bool {
        proc_modules_names(&self.read("proc/modules")).any(|n| n == module)
    }

    /// Removes `module`'s line from `proc/modules` (atomically, as the
    /// kernel's view changes at once) and its `sys/module` directory.
    ///
    /// # Panics
    /// Unless the module was listed.
    pub fn unload(&self, module: &str) {
        self.remove_line("proc/modules", |l| l.split(' ').next() == Some(module));
        let dir = self.join("sys/module").join(module);
        if dir.exists() {
            fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
        }
    }

    /// Writes `proc/modules` and `sys/module/<m>/initstate` = `live` for
    /// every module it lists.
    pub fn set_proc_modules_with_initstate(&self, text: &str) {
        for name in proc_modules_names(text) {
            self.write(format!("sys/module/{name}/initstate"), "live\n");
        }
        self.write("proc/modules", text);
    }

    /// Writes a config file (outside the host root's well-known paths) and
    /// returns its path, for `--config`.
    pub fn config(&self, text: &str) -> PathBuf {
        let path = self.join("etc/kmod-monitor/config.toml");
        write_atomic(&path, text.as_bytes());
        path
    }
}

/// The module names of a `/proc/modules` text (first field of each line).
fn proc_modules_names(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .filter_map(|l| l.split(' ').next())
        .filter(|n| !n.is_empty())
}

/// Writes `content` to `path` through a temporary file in the same directory
/// and a rename.
fn write_atomic(path: &Path, content: &[u8]) {
    let dir = path
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent directory", path.display()));
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .unwrap_or_else(|e| panic!("temporary file in {}: {e}", dir.display()));
    std::io::Write::write_all(&mut tmp, content)
        .unwrap_or_else(|e| panic!("writing a temporary file for {}: {e}", path.display()));
    // Host files are world-readable (a temporary file is 0600), so a daemon
    // that dropped to an unprivileged user still reads them.
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .unwrap_or_else(|e| panic!("chmod 0644 {}: {e}", path.display()));
    tmp.persist(path)
        .unwrap_or_else(|e| panic!("renaming onto {}: {e}", path.display()));
}

/// Output captured from a child's pipe as it arrives, readable while the
/// child still runs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<String>>);

impl Captured {
    /// Reads `pipe` to its end on a background thread.
    fn spawn(pipe: impl Read + Send + 'static) -> (Self, thread::JoinHandle<()>) {
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

    fn text(&self) -> String {
        self.lock().clone()
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so no
/// test leaves one behind, panicking or not.
struct ChildGuard {
    child: Child,
    exited: Option<ExitStatus>,
}

impl ChildGuard {
    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for pid {}: {e}", self.child.id()));
        }
        self.exited
    }

    /// Waits up to `timeout` for the child to exit.
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
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
/// plain-text logs at `info` (no colours to trip up string checks).
fn command(args: &[OsString]) -> Command {
    let mut cmd = Command::new(kmod_monitor_bin());
    cmd.args(args)
        .env("NO_COLOR", "1")
        .env("KMOD_MONITOR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `args` as shown in messages.
fn shell_words(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// An array of arguments of mixed types (`&str`, `&Path`, `String`), as
/// `OsString`s.
#[macro_export]
macro_rules! args {
    ($($arg:expr),* $(,)?) => {
        [$(::std::ffi::OsString::from($arg)),*]
    };
}

/// A finished one-shot `kmod-monitor` run.
pub struct Finished {
    /// The arguments, for messages.
    pub args: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for Finished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            args,
            status,
            stdout,
            stderr,
        } = self;
        write!(
            f,
            "`kmod-monitor {args}` ended with {status}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}--- end ---"
        )
    }
}

impl Finished {
    /// Asserts the exit code (and that nothing panicked), returning `self`.
    ///
    /// # Panics
    /// On another exit code, death by a signal, or a panic message.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.status.code(),
            Some(code),
            "expected exit code {code}: {self}"
        );
        self.assert_no_panic();
        self
    }

    /// Asserts that neither output mentions a Rust panic.
    ///
    /// # Panics
    /// When one does.
    #[track_caller]
    pub fn assert_no_panic(&self) {
        assert!(
            !self.stderr.contains("panicked") && !self.stdout.contains("panicked"),
            "kmod-monitor panicked: {self}"
        );
    }

    /// Asserts that stderr contains every one of `needles`.
    ///
    /// # Panics
    /// Naming the first missing one.
    #[track_caller]
    pub fn stderr_has(&self, needles: &[&str]) -> &Self {
        for needle in needles {
            assert!(
                self.stderr.contains(needle),
                "stderr should contain {needle:?}: {self}"
            );
        }
        self
    }

    /// Stdout parsed as JSON.
    ///
    /// # Panics
    /// When stdout is not JSON.
    #[must_use]
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }
}

/// Runs `kmod-monitor ARGS` to completion.
///
/// # Panics
/// When it cannot start or runs longer than a few seconds (it is killed).
#[must_use]
pub fn kmod_monitor(args: &[OsString]) -> Finished {
    let shown = shell_words(args);
    let mut child = command(args)
        .spawn()
        .unwrap_or_else(|e| panic!("starting `kmod-monitor {shown}`: {e}"));
    let (stdout, out_thread) =
        Captured::spawn(child.stdout.take().unwrap_or_else(|| unreachable!()));
    let (stderr, err_thread) =
        Captured::spawn(child.stderr.take().unwrap_or_else(|| unreachable!()));
    let mut guard = ChildGuard {
        child,
        exited: None,
    };
    let Some(status) = guard.wait_timeout(COMMAND_TIMEOUT) else {
        drop(guard);
        panic!(
            "`kmod-monitor {shown}` still running after {COMMAND_TIMEOUT:?}; killed\n--- stdout ---\n{}--- stderr ---\n{}",
            stdout.text(),
            stderr.text()
        );
    };
    // The pipes close when the child exits (it starts no children).
    let _ = out_thread.join();
    let _ = err_thread.join();
    Finished {
        args: shown,
        status,
        stdout: stdout.text(),
        stderr: stderr.text(),
    }
}

/// Runs `kmod-monitor check --host-root ROOT EXTRA...`.
#[must_use]
pub fn check(host: &FakeHost, extra: &[OsString]) -> Finished {
    let mut args = Vec::from(args!["check", "--host-root", host.path()]);
    args.extend(extra.iter().cloned());
    kmod_monitor(&args)
}

/// A free loopback port right now (it may be taken before it is used;
/// [`Daemon::start`] retries on a bind failure).
///
/// # Panics
/// When no port can be bound at all.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("binding 127.0.0.1:0 to find a free port: {e}"))
}

/// A running `kmod-monitor run` on a loopback port. Dropping it kills the
/// process.
pub struct Daemon {
    child: ChildGuard,
    addr: SocketAddr,
    args: String,
    stdout: Captured,
    stderr: Captured,
    http: ureq::Agent,
}

/// What a bind failure of the HTTP listener looks like on stderr.
const ADDR_IN_USE: &str = "Address already in use";

impl Daemon {
    /// Starts `kmod-monitor run --listen 127.0.0.1:PORT --host-root ROOT
    /// --no-event-log EXTRA...` and waits until /healthz answers 200. A port taken between
    /// choosing and binding it is retried with another.
    ///
    /// # Panics
    /// When the daemon exits or does not become ready in time.
    #[must_use]
    #[track_caller]
    pub fn start(host: &FakeHost, extra: &[OsString]) -> Self {
        Self::try_start(host, extra)
            .unwrap_or_else(|failed| panic!("daemon did not start: {failed}"))
    }

    /// Like [`start`](Self::start), but a daemon that exits before it is
    /// ready is returned as `Err` with its exit status and output.
    ///
    /// # Errors
    /// The finished process when it exited before answering /healthz.
    ///
    /// # Panics
    /// When it neither exits nor becomes ready in time.
    pub fn try_start(host: &FakeHost, extra: &[OsString]) -> Result<Self, Finished> {
        const ATTEMPTS: usize = 5;
        let mut attempt = 1;
        loop {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut args = Vec::from(args![
                "run",
                "--listen",
                addr.to_string(),
                "--host-root",
                host.path(),
                // Run as root (CI), the daemon would default to writing the
                // real /var/lib/kmod-monitor/events.jsonl. A test that wants
                // a log passes --event-log, which overrides this (the last
                // of the two wins).
                "--no-event-log"
            ]);
            args.extend(extra.iter().cloned());
            match Self::spawn(addr, &args) {
                Err(failed) if failed.stderr.contains(ADDR_IN_USE) && attempt < ATTEMPTS => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Starts the daemon; `Err` with its output if it exits before /healthz
    /// answers.
    fn spawn(addr: SocketAddr, args: &[OsString]) -> Result<Self, Finished> {
        let shown = shell_words(args);
        let mut child = command(args)
            .spawn()
            .unwrap_or_else(|e| panic!("starting `kmod-monitor {shown}`: {e}"));
        let (stdout, _) = Captured::spawn(child.stdout.take().unwrap_or_else(|| unreachable!()));
        let (stderr, _) = Captured::spawn(child.stderr.take().unwrap_or_else(|| unreachable!()));
        let mut daemon = Self {
            child: ChildGuard {
                child,
                exited: None,
            },
            addr,
            args: shown,
            stdout,
            stderr,
            http: ureq::Agent::config_builder()
                // Never send loopback requests to an HTTP_PROXY from the env.
                .proxy(None)
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .into(),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = daemon.child.try_wait() {
                // Let the reader threads take the last lines.
                thread::sleep(POLL_EVERY);
                return Err(Finished {
                    args: daemon.args.clone(),
                    status,
                    stdout: daemon.stdout.text(),
                    stderr: daemon.stderr.text(),
                });
            }
            if matches!(daemon.get("/healthz"), Ok((200, _))) {
                return Ok(daemon);
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready (no 200 from /healthz) after {READY_TIMEOUT:?}: {daemon}"
            );
            thread::sleep(POLL_EVERY);
        }
    }

    /// The address it listens on.
    #[must_use]
    pub const fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET path`: status code and body.
    ///
    /// # Errors
    /// When the request fails (connection refused, timeout).
    pub fn get(&self, path: &str) -> Result<(u16, String), ureq::Error> {
        let mut response = self
            .http
            .get(format!("http://{}{path}", self.addr))
            .call()?;
        let code = response.status().as_u16();
        let body = response.body_mut().read_to_string()?;
        Ok((code, body))
    }

    /// `GET /metrics`, the OpenMetrics text.
    ///
    /// # Panics
    /// Unless it answers 200.
    #[must_use]
    #[track_caller]
    pub fn metrics(&self) -> String {
        match self.get("/metrics") {
            Ok((200, body)) => body,
            other => panic!("GET /metrics: {other:?}\n{self}"),
        }
    }

    /// `GET /status`, parsed.
    ///
    /// # Panics
    /// Unless it answers 200 with JSON.
    #[must_use]
    #[track_caller]
    pub fn status(&self) -> Value {
        match self.get("/status") {
            Ok((200, body)) => serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}\n{self}")),
            Ok((code, body)) => panic!("/status answered {code}: {body}\n{self}"),
            Err(e) => panic!("GET /status failed: {e}\n{self}"),
        }
    }

    /// Polls /status every 50 ms until `ok` holds, and returns that status.
    ///
    /// # Panics
    /// After `timeout`, with the last status and the daemon's stderr, or at
    /// once if the daemon exits.
    #[track_caller]
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running(what);
            let status = self.status();
            if ok(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last /status:\n{}\n{self}",
                pretty(&status)
            );
            thread::sleep(POLL_EVERY);
        }
    }

    /// Waits until stderr contains `needle`, and returns all of stderr.
    ///
    /// # Panics
    /// After `timeout`, with stderr.
    #[track_caller]
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.stderr.text();
            if text.contains(needle) {
                return text;
            }
            self.assert_running(&format!("{needle:?} on stderr"));
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {needle:?} on stderr\n{self}"
            );
            thread::sleep(POLL_EVERY);
        }
    }

    /// What it wrote to stderr so far.
    #[must_use]
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().is_none()
    }

    /// Panics (with its output) if the daemon has exited.
    #[track_caller]
    fn assert_running(&mut self, while_doing: &str) {
        if let Some(status) = self.child.try_wait() {
            thread::sleep(POLL_EVERY);
            panic!("daemon exited ({status}) while waiting for {while_doing}\n{self}");
        }
    }

    /// The daemon's pid.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.child.id()
    }

    /// Sends `signal` to the daemon.
    ///
    /// # Panics
    /// When the signal cannot be sent.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_child(&self.child.child);
        rustix::process::kill_process(pid, signal)
            .unwrap_or_else(|e| panic!("sending {signal:?} to pid {pid:?}: {e}\n{self}"));
    }

    /// Waits up to `timeout` for the daemon to exit and returns its status.
    ///
    /// # Panics
    /// When it is still running after `timeout` (it is then killed).
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = self.child.wait_timeout(timeout).unwrap_or_else(|| {
            panic!("daemon still running {timeout:?} after being asked to stop\n{self}")
        });
        // Let the reader threads take the last lines.
        thread::sleep(POLL_EVERY);
        status
    }
}

impl fmt::Display for Daemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "daemon `kmod-monitor {}`\n--- stdout ---\n{}--- stderr ---\n{}--- end ---",
            self.args,
            self.stdout.text(),
            self.stderr.text()
        )
    }
}

/// `value` as indented JSON, for messages.
#[must_use]
pub fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// The group called `name` in a `check --output json` report or a /status.
///
/// # Panics
/// When there is none, listing the groups there are.
#[must_use]
#[track_caller]
pub fn group<'a>(report: &'a Value, name: &str) -> &'a Value {
    let groups = report["groups"]
        .as_array()
        .unwrap_or_else(|| panic!("no groups array in:\n{}", pretty(report)));
    groups
        .iter()
        .find(|g| g["name"] == name)
        .unwrap_or_else(|| panic!("no group {name:?} in:\n{}", pretty(report)))
}

/// The names of the groups of a report, in order.
#[must_use]
pub fn group_names(report: &Value) -> Vec<String> {
    report["groups"]
        .as_array()
        .map(|gs| {
            gs.iter()
                .filter_map(|g| g["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The module called `name` in a group.
///
/// # Panics
/// When the group does not list it.
#[must_use]
#[track_caller]
pub fn module<'a>(group: &'a Value, name: &str) -> &'a Value {
    group["modules"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no module {name:?} in group:\n{}", pretty(group)))
}

/// The state of module `name` in group `group_name`, `""` if absent (for
/// `wait_for` predicates, which must not panic while the state settles).
#[must_use]
pub fn state_of<'a>(report: &'a Value, group_name: &str, name: &str) -> &'a str {
    report["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["name"] == group_name))
        .and_then(|g| g["modules"].as_array())
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .and_then(|m| m["state"].as_str())
        .unwrap_or("")
}

/// Whether group `name` is met (`None` if there is no such group).
#[must_use]
pub fn met(report: &Value, name: &str) -> Option<bool> {
    report["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["name"] == name))
        .and_then(|g| g["met"].as_bool())
}

/// The sorted keys of a JSON object (empty for anything else).
#[must_use]
pub fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    keys
}
