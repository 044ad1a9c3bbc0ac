//! `cargo xtask vm-test`: builds the static binaries, then for each kernel
//! (sequentially: the machine has two cores) fetches it, builds its
//! initramfs, boots it and collects the guest driver's verdict. Every
//! requested kernel runs even after another failed, so one bad kernel does
//! not hide the others.
use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{
    binaries, dirs, initramfs,
    kernel::{self, Series},
    vm,
};

/// Options of one vm-test run.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Kernel series to test (repeatable; default: all).
    #[arg(long = "kernel", value_enum, num_args = 1..)]
    pub kernels: Vec<Series>,
    /// Ask the archive for newer kernel uploads instead of reusing the
    /// cached ones.
    #[arg(long)]
    pub refresh_kernels: bool,
    /// Hard limit for one guest, boot to power-off, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// One kernel's verdict.
#[derive(Debug)]
pub struct Outcome {
    /// The series tested.
    pub series: Series,
    /// `uname -r` of the cached kernel, once known.
    pub release: Option<String>,
    /// Scenarios that passed.
    pub passed: usize,
    /// Failed scenarios with reasons.
    pub failed: Vec<(String, String)>,
    /// Harness-level problems (no boot, timeout, fetch failure, ...).
    pub problems: Vec<String>,
    /// Time spent on this kernel, fetch and initramfs included.
    pub duration: Duration,
    /// Time QEMU ran.
    pub boot_duration: Option<Duration>,
    /// The console log, once QEMU ran.
    pub console: Option<PathBuf>,
}

impl Outcome {
    /// Whether the kernel passed as a whole.
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && self.problems.is_empty()
    }
}

/// Runs the VM tests and returns one outcome per kernel, in order.
pub fn vm_test(options: &Options) -> Result<Vec<Outcome>> {
    let Options {
        kernels,
        refresh_kernels,
        timeout,
    } = options;
    let kernels = if kernels.is_empty() {
        Series::ALL.to_vec()
    } else {
        let mut k = kernels.clone();
        k.sort();
        k.dedup();
        k
    };
    // Only the static build: the VMs cannot run the host's glibc binary.
    let daemon = binaries::build_static_daemon().context("building kmod-monitor for the VMs")?;
    let driver = binaries::build_guest_driver().context("building the guest driver")?;
    let mut apt = kernel::Apt::new().context("preparing the private apt configuration")?;

    let mut outcomes = Vec::new();
    for series in kernels {
        let start = Instant::now();
        let mut outcome = Outcome {
            series,
            release: None,
            passed: 0,
            failed: Vec::new(),
            problems: Vec::new(),
            duration: Duration::ZERO,
            boot_duration: None,
            console: None,
        };
        if let Err(err) = run_one(
            series,
            *refresh_kernels,
            Duration::from_secs(*timeout),
            &mut apt,
            &daemon,
            &driver,
            &mut outcome,
        ) {
            outcome.problems.push(format!("{err:#}"));
        }
        outcome.duration = start.elapsed();
        print_outcome(&outcome);
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

fn run_one(
    series: Series,
    refresh: bool,
    timeout: Duration,
    apt: &mut kernel::Apt,
    daemon: &std::path::Path,
    driver: &std::path::Path,
    outcome: &mut Outcome,
) -> Result<()> {
    let kernel = kernel::prepare(series, refresh, apt)
        .with_context(|| format!("fetching the {series} kernel"))?;
    outcome.release = Some(kernel.release.clone());
    let dir = dirs::vm_test_dir(series.name());
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let initrd = dir.join("initramfs.cpio.gz");
    initramfs::build(&kernel, daemon, driver, &initrd)
        .with_context(|| format!("building the {series} initramfs"))?;
    let console = dir.join("console.log");
    let run = vm::boot(&kernel, &initrd, &console, timeout, series.name())?;
    outcome.boot_duration = Some(run.duration);
    outcome.console = Some(run.console.clone());
    let text = fs::read(&console).with_context(|| format!("reading {}", console.display()))?;
    let report = vm::Report::parse(&String::from_utf8_lossy(&text));
    if run.timed_out {
        outcome.problems.push(format!(
            "QEMU was killed after the {} s timeout",
            timeout.as_secs()
        ));
    } else if !run.success {
        outcome
            .problems
            .push(format!("QEMU exited with {}", run.status));
    }
    outcome.problems.extend(report.problems(&kernel.release));
    outcome.passed = report.passed.len();
    outcome.failed = report.failed;
    Ok(())
}

fn print_outcome(o: &Outcome) {
    let verdict = if o.ok() { "PASS" } else { "FAIL" };
    println!(
        "vm-test {}: {verdict}: {} passed, {} failed in {:.1} s (boot {}) [{}]",
        o.series,
        o.passed,
        o.failed.len(),
        o.duration.as_secs_f64(),
        o.boot_duration
            .map_or_else(|| "-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
        o.release.as_deref().unwrap_or("kernel not fetched"),
    );
    for (name, why) in &o.failed {
        println!("vm-test {}:   FAIL {name}: {why}", o.series);
    }
    for problem in &o.problems {
        println!("vm-test {}:   PROBLEM {problem}", o.series);
    }
    if let Some(console) = &o.console {
        println!("vm-test {}:   console log: {}", o.series, console.display());
    }
}
