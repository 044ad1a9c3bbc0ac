//! Loading and unloading modules in the guest with busybox modprobe and
//! rmmod, as child processes whose pids the tests compare with the actor
//! the daemon reports; and reading the kernel's own view (/proc/modules,
//! tracefs).
use std::{
    fs,
    process::{Child, Command, Stdio},
};

/// A finished modprobe/rmmod.
#[derive(Debug)]
pub struct Ran {
    /// Its pid (== tgid: busybox applets are single-threaded).
    pub pid: u32,
    /// Whether it exited 0.
    pub success: bool,
    /// Exit status, for messages.
    pub status: String,
    /// What it printed on stderr.
    pub stderr: String,
}

/// Starts `prog args...` with stderr captured.
pub fn spawn(prog: &str, args: &[&str]) -> Result<Child, String> {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {prog} {}: {e}", args.join(" ")))
}

/// Waits for a child started by [`spawn`].
pub fn finish(child: Child, what: &str) -> Result<Ran, String> {
    let pid = child.id();
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {what}: {e}"))?;
    Ok(Ran {
        pid,
        success: out.status.success(),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// Runs `prog args...` to completion.
pub fn run(prog: &str, args: &[&str]) -> Result<Ran, String> {
    let what = format!("{prog} {}", args.join(" "));
    finish(spawn(prog, args)?, &what)
}

/// `modprobe module`, which must succeed.
pub fn modprobe(module: &str) -> Result<Ran, String> {
    let ran = run("modprobe", &[module])?;
    if ran.success {
        Ok(ran)
    } else {
        Err(format!(
            "modprobe {module} failed ({}): {}",
            ran.status, ran.stderr
        ))
    }
}

/// `rmmod module`, which must succeed.
pub fn rmmod(module: &str) -> Result<Ran, String> {
    let ran = run("rmmod", &[module])?;
    if ran.success {
        Ok(ran)
    } else {
        Err(format!(
            "rmmod {module} failed ({}): {}",
            ran.status, ran.stderr
        ))
    }
}

/// The raw /proc/modules.
pub fn proc_modules() -> Result<String, String> {
    fs::read_to_string("/proc/modules").map_err(|e| format!("reading /proc/modules: {e}"))
}

/// Whether `module` is listed in /proc/modules (in any state).
pub fn listed(module: &str) -> Result<bool, String> {
    Ok(proc_modules()?
        .lines()
        .any(|line| line.split_whitespace().next() == Some(module)))
}

/// `rmmod module` if it is loaded.
pub fn ensure_unloaded(module: &str) -> Result<(), String> {
    if listed(module)? {
        rmmod(module)?;
    }
    Ok(())
}

/// `uname -r`.
pub fn kernel_release() -> Result<String, String> {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("reading /proc/sys/kernel/osrelease: {e}"))
}

/// CLOCK_BOOTTIME in nanoseconds, from /proc/uptime (10 ms resolution).
pub fn boottime_ns() -> Result<u64, String> {
    let text =
        fs::read_to_string("/proc/uptime").map_err(|e| format!("reading /proc/uptime: {e}"))?;
    let secs = text.split_whitespace().next().unwrap_or_default();
    let (whole, frac) = secs.split_once('.').unwrap_or((secs, "0"));
    let whole: u64 = whole
        .parse()
        .map_err(|e| format!("/proc/uptime {secs:?}: {e}"))?;
    let mut frac_ns: u64 = 0;
    let mut scale = 100_000_000;
    for digit in frac.bytes().take(9) {
        if !digit.is_ascii_digit() {
            return Err(format!("/proc/uptime {secs:?} is not a number"));
        }
        frac_ns += u64::from(digit - b'0') * scale;
        scale /= 10;
    }
    Ok(whole * 1_000_000_000 + frac_ns)
}
