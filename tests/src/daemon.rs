//! `kmod-monitor run` daemons on a loopback port: started, polled through
//! /status and stderr, signalled, and killed by a drop guard.
use std::{
    ffi::OsString,
    fmt,
    net::{SocketAddr, TcpListener},
    process::ExitStatus,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    FakeHost, Finished, args, pretty,
    process::{Captured, ChildGuard, command, limit_nofile, shell_words},
};

/// How long a daemon may take to answer /healthz after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a condition on /status or stderr is re-checked.
const POLL_EVERY: Duration = Duration::from_millis(50);

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
    /// `http` or `https`.
    scheme: &'static str,
}

/// How a daemon is started, beyond its arguments.
#[derive(Default)]
pub struct Launch {
    /// RLIMIT_NOFILE, soft and hard, for the daemon (systemd's default soft
    /// limit is 1024).
    pub nofile: Option<u64>,
    /// An https client that trusts the daemon's certificate; `None` for
    /// plain http.
    pub https: Option<ureq::Agent>,
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
        Self::try_start_with(host, extra, &Launch::default())
    }

    /// Like [`start`](Self::start), started as `launch` says.
    ///
    /// # Panics
    /// When the daemon exits or does not become ready in time.
    #[must_use]
    #[track_caller]
    pub fn start_with(host: &FakeHost, extra: &[OsString], launch: &Launch) -> Self {
        Self::try_start_with(host, extra, launch)
            .unwrap_or_else(|failed| panic!("daemon did not start: {failed}"))
    }

    /// Like [`try_start`](Self::try_start), started as `launch` says.
    ///
    /// # Errors
    /// The finished process when it exited before answering /healthz.
    ///
    /// # Panics
    /// When it neither exits nor becomes ready in time.
    pub fn try_start_with(
        host: &FakeHost,
        extra: &[OsString],
        launch: &Launch,
    ) -> Result<Self, Finished> {
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
            match Self::spawn(addr, &args, launch) {
                Err(failed) if failed.stderr.contains(ADDR_IN_USE) && attempt < ATTEMPTS => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Starts the daemon; `Err` with its output if it exits before /healthz
    /// answers.
    fn spawn(addr: SocketAddr, args: &[OsString], launch: &Launch) -> Result<Self, Finished> {
        let shown = shell_words(args);
        let mut cmd = command(args);
        if let Some(n) = launch.nofile {
            limit_nofile(&mut cmd, n);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting `kmod-monitor {shown}`: {e}"));
        let (stdout, _) = Captured::spawn(child.stdout.take().unwrap_or_else(|| unreachable!()));
        let (stderr, _) = Captured::spawn(child.stderr.take().unwrap_or_else(|| unreachable!()));
        let mut daemon = Self {
            child: ChildGuard::new(child),
            addr,
            args: shown,
            stdout,
            stderr,
            http: launch.https.clone().unwrap_or_else(|| {
                ureq::Agent::config_builder()
                    // Never send loopback requests to an HTTP_PROXY from the env.
                    .proxy(None)
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build()
                    .into()
            }),
            scheme: if launch.https.is_some() {
                "https"
            } else {
                "http"
            },
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

    /// `http://ADDR/path` (or https).
    #[must_use]
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// A line of the daemon's `/proc/PID/status` (`VmRSS`, `VmHWM`, …) in
    /// KiB.
    ///
    /// # Panics
    /// When the file or the line cannot be read.
    #[must_use]
    pub fn proc_status_kib(&self, key: &str) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {path}: {e}\n{self}"));
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {path}:\n{text}"))
    }

    /// How many file descriptors the daemon has open.
    ///
    /// # Panics
    /// When `/proc/PID/fd` cannot be read.
    #[must_use]
    pub fn open_fds(&self) -> usize {
        let path = format!("/proc/{}/fd", self.pid());
        std::fs::read_dir(&path)
            .unwrap_or_else(|e| panic!("reading {path}: {e}\n{self}"))
            .count()
    }

    /// `GET path`: status code and body.
    ///
    /// # Errors
    /// When the request fails (connection refused, timeout).
    pub fn get(&self, path: &str) -> Result<(u16, String), ureq::Error> {
        let mut response = self.http.get(self.url(path)).call()?;
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
