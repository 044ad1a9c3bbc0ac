//! Starting, waiting for and killing the real kmod-monitor daemon in the
//! guest. Its stdout and stderr go to a file per start, so a failing
//! scenario can print what the daemon said.
use std::{
    fs::{self, File},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::api::{Api, LISTEN, POLL_EVERY};

/// The static daemon binary in the initramfs.
pub const BINARY: &str = "/usr/bin/kmod-monitor";
/// How long `run` may take to answer `/healthz` with 200. Loading and
/// verifying the eBPF program under TCG takes seconds, not minutes.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// A running `kmod-monitor run`, killed when dropped.
pub struct Daemon {
    child: Child,
    /// Its combined stdout and stderr.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `kmod-monitor run --listen LISTEN ARGS...` and waits until
    /// `/healthz` answers 200. `log` receives its output.
    pub fn start(args: &[&str], log: PathBuf, api: &Api) -> Result<Self, String> {
        Self::start_binary(BINARY, args, &[], log, api)
    }

    /// Like [`start`](Self::start), with `env` added to its environment.
    pub fn start_with_env(
        args: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
        api: &Api,
    ) -> Result<Self, String> {
        Self::start_binary(BINARY, args, env, log, api)
    }

    /// [`Daemon::start`] of another build of the daemon at `binary` (the
    /// benchmark's `bench`-feature build), with `env` added to its
    /// environment.
    pub fn start_binary(
        binary: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
        api: &Api,
    ) -> Result<Self, String> {
        let mut daemon = Self::spawn_binary(binary, args, env, log)?;
        daemon.wait_ready(args, api)?;
        Ok(daemon)
    }

    /// Starts `kmod-monitor run --listen LISTEN ARGS...` without waiting
    /// for it to be ready.
    pub fn spawn(args: &[&str], log: PathBuf) -> Result<Self, String> {
        Self::spawn_binary(BINARY, args, &[], log)
    }

    fn spawn_binary(
        binary: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Result<Self, String> {
        let out = File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("duplicating {}: {e}", log.display()))?;
        let child = Command::new(binary)
            .args(["run", "--listen", LISTEN])
            // The 512 MiB guests have no hugepages and these scenarios are
            // about modules; `check_exit_codes` covers the hugepage check
            // on the real kernel.
            .args(["--v2-hugepages-2mi", "0"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {binary}: {e}"))?;
        Ok(Self { child, log })
    }

    /// Waits until `/healthz` answers 200 (`args` name the daemon in
    /// messages).
    pub fn wait_ready(&mut self, args: &[&str], api: &Api) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "`kmod-monitor run {}` exited with {status} before it was ready",
                    args.join(" ")
                ));
            }
            let last = match api.healthz() {
                Ok(200) => return Ok(()),
                Ok(code) => format!("/healthz answered {code}"),
                Err(e) => e,
            };
            if start.elapsed() >= READY_WITHIN {
                return Err(format!(
                    "`kmod-monitor run {}` was not ready within {} s ({last})",
                    args.join(" "),
                    READY_WITHIN.as_secs()
                ));
            }
            thread::sleep(POLL_EVERY);
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the daemon and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus, String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Ok(status);
        }
        self.child
            .kill()
            .map_err(|e| format!("killing kmod-monitor: {e}"))?;
        self.child
            .wait()
            .map_err(|e| format!("reaping kmod-monitor: {e}"))
    }

    /// SIGTERMs the daemon (so it flushes what it gathers, as on a node's
    /// shutdown) and reaps it; SIGKILL after `within`, which is an error.
    pub fn terminate(&mut self, within: Duration) -> Result<ExitStatus, String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Ok(status);
        }
        let pid = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or("the daemon's pid does not fit a pid_t")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .map_err(|e| format!("SIGTERM to kmod-monitor: {e}"))?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Ok(status);
            }
            if start.elapsed() >= within {
                self.kill()?;
                return Err(format!(
                    "kmod-monitor did not exit within {} s of SIGTERM (killed)",
                    within.as_secs()
                ));
            }
            thread::sleep(POLL_EVERY);
        }
    }

    /// Whether the process has exited (and how).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// The last `lines` lines of a daemon log.
pub fn log_tail(log: &PathBuf, lines: usize) -> Vec<String> {
    match fs::read_to_string(log) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            all[from..].iter().map(|l| (*l).to_owned()).collect()
        }
        Err(e) => vec![format!("(cannot read {}: {e})", log.display())],
    }
}

/// Runs a one-shot `kmod-monitor ARGS...` (e.g. `check`): exit code,
/// stdout, stderr.
pub fn oneshot(args: &[&str]) -> Result<(i32, String, String), String> {
    let out = Command::new(BINARY)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("starting kmod-monitor {}: {e}", args.join(" ")))?;
    let code = out
        .status
        .code()
        .ok_or_else(|| format!("kmod-monitor {} was killed: {}", args.join(" "), out.status))?;
    Ok((
        code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
