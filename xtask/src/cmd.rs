//! Running external commands: echo what runs, and turn a failed spawn or a
//! non-zero exit into an error that names the command.
use std::{
    ffi::OsStr,
    fmt::Write as _,
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// `prog arg1 arg2 ...`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            let _ = write!(text, " '{arg}'");
        } else {
            let _ = write!(text, " {arg}");
        }
    }
    text
}

/// Runs `cmd` with inherited stdio, printing it first; fails unless it
/// exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let text = describe(cmd);
    println!("+ {text}");
    let status = cmd.status().with_context(|| format!("starting `{text}`"))?;
    if !status.success() {
        bail!("`{text}` failed: {status}");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; fails unless it exits 0, with
/// its stderr in the message.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let text = describe(cmd);
    let Output {
        status,
        stdout,
        stderr,
    } = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{text}`"))?;
    if !status.success() {
        bail!(
            "`{text}` failed: {status}: {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    String::from_utf8(stdout).with_context(|| format!("output of `{text}` is not UTF-8"))
}

/// Whether `cmd` can be started and exits 0 (its output is discarded).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// A `Command` for `prog` with `args`.
pub fn new<I, S>(prog: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(prog);
    cmd.args(args);
    cmd
}
