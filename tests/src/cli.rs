//! One-shot `kmod-monitor` commands (`check`, `log show`, …) run to
//! completion, and what they printed and returned.
use std::{ffi::OsString, fmt, path::Path, process::ExitStatus, time::Duration};

use serde_json::Value;

use crate::{
    FakeHost, args,
    process::{Captured, ChildGuard, command, shell_words},
};

/// How long a one-shot command may take before it counts as hung.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

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
    let mut guard = ChildGuard::new(child);
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

/// `log show --json EXTRA... LOG`: the records of an event log, each line
/// parsed.
///
/// # Panics
/// When `log show` fails or prints a line that is not JSON.
#[must_use]
pub fn log_records(log: &Path, extra: &[OsString]) -> Vec<Value> {
    let mut a = Vec::from(args!["log", "show", "--json"]);
    a.extend(extra.iter().cloned());
    a.push(log.into());
    let out = kmod_monitor(&a);
    out.expect_code(0);
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{out}")))
        .collect()
}
