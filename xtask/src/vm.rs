//! Boots one test kernel in QEMU (TCG: KVM does not work on these
//! machines, and an arm64 guest on an x86-64 host has none), with the
//! system emulator, machine and console of the kernel's architecture;
//! records the serial console to a log file while echoing it,
//! enforces a hard timeout, and turns the guest driver's `VMTEST` lines into
//! a verdict. Anything unexpected (no boot, a panic, a missing result
//! marker, a count that does not add up) is a failure, never a skip.
use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};

use crate::{cmd, kernel::Kernel};

/// What one guest reported, plus the harness's own findings.
#[derive(Debug, Default)]
pub struct Report {
    /// `uname -r` the guest printed once booted.
    pub booted: Option<String>,
    /// How many scenarios the driver announced.
    pub plan: Option<usize>,
    /// Scenarios that passed.
    pub passed: Vec<String>,
    /// Scenarios that failed, with the driver's reason.
    pub failed: Vec<(String, String)>,
    /// The driver's closing `DONE passed=N failed=M`.
    pub done: Option<(usize, usize)>,
    /// The driver's exit code, from init.
    pub exit: Option<i32>,
    /// Whether the console shows a kernel panic.
    pub panicked: bool,
}

impl Report {
    /// Parses a console log. Result lines may carry noise before the
    /// `VMTEST` marker (a kernel message on the same line), so the marker
    /// is searched for, not anchored.
    pub fn parse(console: &str) -> Self {
        let mut report = Self::default();
        for raw in console.lines() {
            let line = raw.trim_end_matches('\r');
            if line.contains("Kernel panic - not syncing") {
                report.panicked = true;
            }
            let Some(at) = line.find("VMTEST ") else {
                continue;
            };
            let rest = &line[at + "VMTEST ".len()..];
            let (word, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            match word {
                "BOOTED" => report.booted = Some(tail.trim().to_owned()),
                "PLAN" => report.plan = tail.trim().parse().ok(),
                "PASS" => {
                    let name = tail.split_whitespace().next().unwrap_or_default();
                    report.passed.push(name.to_owned());
                }
                "FAIL" => {
                    let (name, why) = tail.split_once(':').unwrap_or((tail, ""));
                    report
                        .failed
                        .push((name.trim().to_owned(), why.trim().to_owned()));
                }
                "DONE" => report.done = parse_done(tail),
                "EXIT" => report.exit = tail.trim().parse().ok(),
                _ => {}
            }
        }
        report
    }

    /// Harness-level problems: reasons to fail the kernel beyond failed
    /// scenarios.
    pub fn problems(&self, expected_release: &str) -> Vec<String> {
        let mut problems = Vec::new();
        match &self.booted {
            None => problems
                .push("the kernel did not boot to /init (no `VMTEST BOOTED` line)".to_owned()),
            Some(rel) if rel != expected_release => {
                problems.push(format!("booted {rel}, expected {expected_release}"));
            }
            Some(_) => {}
        }
        if self.panicked {
            problems.push("the kernel panicked".to_owned());
        }
        let seen = (self.passed.len(), self.failed.len());
        match self.done {
            None => problems.push("the guest driver did not finish (no `VMTEST DONE` line)".to_owned()),
            Some(done) if done != seen => problems.push(format!(
                "the driver's DONE says passed={} failed={}, but the console shows {} PASS and {} FAIL lines",
                done.0, done.1, seen.0, seen.1
            )),
            Some(_) => {}
        }
        match self.plan {
            None if self.booted.is_some() => problems
                .push("the guest driver announced no plan (no `VMTEST PLAN` line)".to_owned()),
            Some(plan) if plan != seen.0 + seen.1 => problems.push(format!(
                "the driver planned {plan} scenarios but reported {}",
                seen.0 + seen.1
            )),
            _ => {}
        }
        match self.exit {
            None if self.booted.is_some() => {
                problems.push("init did not report the driver's exit code".to_owned())
            }
            Some(code) if code != 0 && self.failed.is_empty() => {
                problems.push(format!(
                    "the driver exited {code} without a failed scenario"
                ));
            }
            Some(0) if !self.failed.is_empty() => {
                problems.push("the driver exited 0 despite failed scenarios".to_owned());
            }
            _ => {}
        }
        problems
    }
}

fn parse_done(tail: &str) -> Option<(usize, usize)> {
    let mut passed = None;
    let mut failed = None;
    for field in tail.split_whitespace() {
        if let Some(n) = field.strip_prefix("passed=") {
            passed = n.parse().ok();
        } else if let Some(n) = field.strip_prefix("failed=") {
            failed = n.parse().ok();
        }
    }
    Some((passed?, failed?))
}

/// The QEMU machine a guest boots on. Every scenario shares the plain
/// one but those that need hardware it lacks; each of these gets a boot of
/// its own (`vm_test::OWN_MACHINE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// The architecture's machine ([`crate::arch::Arch::qemu_machine`]).
    Plain,
    /// x86-64's q35 with an emulated Intel IOMMU (VT-d) and the kernel
    /// told to use it (`intel_iommu=on`), so `/sys/kernel/iommu_groups`
    /// fills; the plain `pc` machine has no IOMMU. QEMU wants the IOMMU
    /// before any other device, and q35's own devices come after it.
    Iommu,
}

impl Machine {
    /// A short name for file names and messages.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Iommu => "iommu",
        }
    }

    /// QEMU arguments beyond the architecture's, or `None` where `arch`
    /// has no such machine here (arm64's SMMUv3 would need its driver
    /// module in the initramfs; not done).
    pub const fn qemu_args(self, arch: crate::arch::Arch) -> Option<&'static [&'static str]> {
        match (self, arch) {
            (Self::Plain, _) => Some(&[]),
            (Self::Iommu, crate::arch::Arch::X86_64) => {
                Some(&["-machine", "q35", "-device", "intel-iommu"])
            }
            (Self::Iommu, crate::arch::Arch::Aarch64) => None,
        }
    }

    /// Kernel command-line arguments the machine needs.
    pub const fn kernel_args(self) -> &'static str {
        match self {
            Self::Plain => "",
            Self::Iommu => "intel_iommu=on",
        }
    }
}

/// How a QEMU run ended.
#[derive(Debug)]
pub struct Run {
    /// Wall time from spawn to exit (or kill).
    pub duration: Duration,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// QEMU's exit status, as text.
    pub status: String,
    /// Whether QEMU exited 0.
    pub success: bool,
    /// The console log.
    pub console: PathBuf,
}

/// Boots `kernel` with `initrd` on `machine`, logging the console to
/// `console` and echoing it with a `[label]` prefix, with `extra` appended
/// to the kernel command line (the guest driver reads its mode and
/// scenarios from /proc/cmdline). Kills QEMU after `timeout`.
pub fn boot_with(
    kernel: &Kernel,
    machine: Machine,
    initrd: &Path,
    console: &Path,
    timeout: Duration,
    label: &str,
    extra: &str,
) -> Result<Run> {
    let arch = kernel.arch;
    let Some(machine_args) = machine.qemu_args(arch) else {
        return Err(anyhow!("{arch} has no {} machine", machine.name()));
    };
    let console_arg = format!("console={}", arch.console());
    let append = [
        console_arg.as_str(),
        "quiet",
        "panic=-1",
        arch.kernel_args(),
        machine.kernel_args(),
        extra,
    ]
    .into_iter()
    .filter(|a| !a.is_empty())
    .collect::<Vec<_>>()
    .join(" ");
    let mut qemu = Command::new(arch.qemu());
    qemu.args(arch.qemu_machine())
        .args(machine_args)
        .args(["-m", "512", "-nographic", "-no-reboot"])
        // No NIC: the guest only needs loopback, and no option ROM to probe.
        .args(["-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append.as_str()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let text = cmd::describe(&qemu);
    println!("+ {text}");
    let log = Arc::new(Mutex::new(
        File::create(console).with_context(|| format!("creating {}", console.display()))?,
    ));
    let start = Instant::now();
    let mut child = qemu.spawn().with_context(|| format!("starting `{text}`"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("QEMU's stdout was not captured"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow!("QEMU's stderr was not captured"))?;
    let out_thread = echo(stdout, Arc::clone(&log), format!("[{label}] "));
    let err_thread = echo(stderr, Arc::clone(&log), format!("[{label} qemu] "));

    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for QEMU")? {
            break status;
        }
        if start.elapsed() >= timeout {
            timed_out = true;
            child.kill().context("killing QEMU after the timeout")?;
            break child.wait().context("waiting for the killed QEMU")?;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let duration = start.elapsed();
    for handle in [out_thread, err_thread] {
        handle
            .join()
            .map_err(|_| anyhow!("a console reader thread panicked"))?
            .with_context(|| format!("recording the console to {}", console.display()))?;
    }
    Ok(Run {
        duration,
        timed_out,
        status: status.to_string(),
        success: status.success(),
        console: console.to_path_buf(),
    })
}

/// Copies `input` into `log` and echoes each line (control characters
/// such as the firmware's screen clears removed) with `prefix`.
fn echo(
    input: impl Read + Send + 'static,
    log: Arc<Mutex<File>>,
    prefix: String,
) -> thread::JoinHandle<std::io::Result<()>> {
    thread::spawn(move || {
        let mut reader = BufReader::new(input);
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            {
                let mut file = log
                    .lock()
                    .map_err(|_| std::io::Error::other("console log lock poisoned"))?;
                file.write_all(&line)?;
            }
            let text = String::from_utf8_lossy(&line);
            let clean: String = text
                .chars()
                .filter(|c| !c.is_control() || *c == '\t')
                .collect();
            println!("{prefix}{clean}");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::Report;

    const GOOD: &str = "\
SeaBIOS (version 1.16.2-debian-1.16.2-1)\r
VMTEST BOOTED 6.1.0-56-amd64\r
VMTEST PLAN 3\r
VMTEST PASS guest-env (0.1 s)\r
[    3.1] some kernel line VMTEST PASS baseline (2.0 s)\r
VMTEST FAIL restart: uio_pci_generic is loaded, expected available\r
VMTEST LOG kmod-monitor: starting\r
VMTEST DONE passed=2 failed=1\r
VMTEST EXIT 1\r
[    9.0] reboot: Power down\r
";

    #[test]
    fn parses_results_even_after_kernel_noise() {
        let report = Report::parse(GOOD);
        assert_eq!(report.booted.as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!(report.passed, ["guest-env", "baseline"]);
        assert_eq!(
            report.failed,
            [(
                "restart".to_owned(),
                "uio_pci_generic is loaded, expected available".to_owned()
            )]
        );
        assert_eq!(report.done, Some((2, 1)));
        assert_eq!(report.exit, Some(1));
        assert!(
            report.problems("6.1.0-56-amd64").is_empty(),
            "{:?}",
            report.problems("6.1.0-56-amd64")
        );
        assert!(!report.problems("6.12.117+deb13-amd64").is_empty());
    }

    #[test]
    fn silence_and_panics_are_problems() {
        let none = Report::parse("SeaBIOS\r\nBooting from ROM...\r\n");
        assert!(
            none.problems("x")
                .iter()
                .any(|p| p.contains("did not boot"))
        );
        let panic =
            Report::parse("VMTEST BOOTED x\nKernel panic - not syncing: Attempted to kill init!\n");
        let problems = panic.problems("x");
        assert!(
            problems.iter().any(|p| p.contains("panicked")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("did not finish")),
            "{problems:?}"
        );
    }

    #[test]
    fn counts_that_do_not_add_up_are_problems() {
        let text = "VMTEST BOOTED x\nVMTEST PLAN 3\nVMTEST PASS a\nVMTEST DONE passed=2 failed=0\nVMTEST EXIT 0\n";
        let problems = Report::parse(text).problems("x");
        assert!(
            problems.iter().any(|p| p.contains("DONE says")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("planned 3")),
            "{problems:?}"
        );
    }
}
