//! `cargo xtask vm-test`: for each architecture builds the static daemon
//! and guest driver and fetches its busybox, then for each of its kernels
//! (sequentially: the machine has two cores) fetches the kernel, builds its
//! initramfs, boots it and collects the guest driver's verdict. Every
//! requested kernel runs even after another failed, so one bad kernel does
//! not hide the others.
use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    arch::{self, Arch},
    binaries, dirs, initramfs,
    kernel::{self, Series},
    vm::{self, Machine},
};

/// Scenarios that need a machine of their own ([`Machine`]): each runs in
/// a boot of its own after the plain one, on the architectures that have
/// that machine here.
pub const OWN_MACHINE: &[(&str, Machine)] = &[("iommu-present", Machine::Iommu)];

/// Options of one vm-test run.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Architecture to test (repeatable; default: both).
    #[arg(long = "arch", value_enum)]
    pub archs: Vec<Arch>,
    /// Kernel series to test (repeatable; default: every series of each
    /// architecture: 5.10, 6.1, 6.12 and 6.17 on x86_64, 6.1, 6.12 and
    /// 6.17 on aarch64).
    #[arg(long = "kernel", value_enum, num_args = 1..)]
    pub kernels: Vec<Series>,
    /// Run only this scenario (repeatable; the names the guest prints, e.g.
    /// `baseline`). Default: all, less the ones an architecture skips
    /// unless `--full` is given.
    #[arg(long = "scenario")]
    pub scenarios: Vec<String>,
    /// Also run what a kernel skips by default to keep CI within its
    /// budget (`Arch::skipped_by_default`): the soak on aarch64, the flood
    /// and the IOMMU machine beyond one kernel each.
    #[arg(long, alias = "arm64-full")]
    pub full: bool,
    /// Ask the archive for newer kernel uploads (and busybox) instead of
    /// reusing the cached ones.
    #[arg(long)]
    pub refresh_kernels: bool,
    /// Hard limit for one guest, boot to power-off, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// The (architecture, kernel) pairs `archs` and `kernels` select, in
/// running order. A series an explicitly asked architecture does not
/// test is an error; with no `--arch`, such a pair is just left out.
pub fn plan(archs: &[Arch], kernels: &[Series]) -> Result<Vec<(Arch, Series)>> {
    let mut pairs = Vec::new();
    for arch in arch::selected(archs) {
        let mut wanted: Vec<Series> = arch
            .series()
            .iter()
            .copied()
            .filter(|s| kernels.is_empty() || kernels.contains(s))
            .collect();
        wanted.sort();
        wanted.dedup();
        let missing: Vec<&str> = kernels
            .iter()
            .filter(|s| !arch.series().contains(s))
            .map(|s| s.name())
            .collect();
        if !missing.is_empty() && !archs.is_empty() {
            bail!(
                "{arch} has no {} test kernel (it tests {})",
                missing.join(", "),
                arch.series()
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        pairs.extend(wanted.into_iter().map(|s| (arch, s)));
    }
    if pairs.is_empty() {
        bail!("no architecture tests the kernel series asked for");
    }
    Ok(pairs)
}

/// One kernel's verdict.
#[derive(Debug)]
pub struct Outcome {
    /// The architecture tested.
    pub arch: Arch,
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
    /// Scenarios left out for this architecture (without `--arm64-full`,
    /// or for want of their machine).
    pub skipped: Vec<String>,
    /// The console log of each boot, once QEMU ran.
    pub consoles: Vec<PathBuf>,
}

impl Outcome {
    /// Whether the kernel passed as a whole.
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && self.problems.is_empty()
    }

    /// `aarch64 6.12`, for summaries.
    pub fn label(&self) -> String {
        format!("{} {}", self.arch, self.series)
    }
}

/// The static binaries and busybox one architecture's guests run.
pub struct GuestBinaries {
    busybox: PathBuf,
    compat_busybox: PathBuf,
    daemon: PathBuf,
    driver: PathBuf,
    /// More programs for `usr/bin` (the benchmark's).
    extras: Vec<(String, PathBuf)>,
}

impl GuestBinaries {
    /// Builds `kernel`'s initramfs with these binaries at `out`.
    pub fn initramfs(&self, kernel: &kernel::Kernel, out: &std::path::Path) -> Result<()> {
        let Self {
            busybox,
            compat_busybox,
            daemon,
            driver,
            extras,
        } = self;
        initramfs::build(
            kernel,
            &initramfs::Binaries {
                busybox,
                compat_busybox,
                daemon,
                driver,
                extras,
            },
            out,
        )
    }
}

/// [`guest_binaries`] plus what `cargo xtask bench` runs in the guest:
/// the floor and the `bench` build of the daemon, all copied to `dir`
/// first (the feature build overwrites cargo's product binary).
pub fn bench_guest_binaries(arch: Arch, dir: &std::path::Path) -> Result<GuestBinaries> {
    let mut b = guest_binaries(arch, false)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let product = dir.join(binaries::DAEMON);
    fs::copy(&b.daemon, &product)
        .with_context(|| format!("copying {} to {}", b.daemon.display(), product.display()))?;
    b.daemon = product;
    let (bench, floor) = binaries::build_bench_binaries(arch, dir)?;
    b.extras = vec![
        ("kmod-monitor-bench".to_owned(), bench),
        (binaries::FLOOR.to_owned(), floor),
    ];
    Ok(b)
}

/// Builds and fetches what `arch`'s guests run.
pub fn guest_binaries(arch: Arch, refresh: bool) -> Result<GuestBinaries> {
    // Only static builds: the VMs cannot run the host's glibc binary.
    let daemon = binaries::build_static_daemon(arch)
        .with_context(|| format!("building kmod-monitor for the {arch} VMs"))?;
    let driver = binaries::build_guest_driver(arch)
        .with_context(|| format!("building the {arch} guest driver"))?;
    let busybox = kernel::busybox(arch.debian(), refresh)
        .with_context(|| format!("fetching busybox-static for {arch}"))?;
    let compat_busybox = kernel::busybox(arch.compat_debian(), refresh)
        .with_context(|| format!("fetching the 32-bit busybox-static for {arch}"))?;
    Ok(GuestBinaries {
        busybox,
        compat_busybox,
        daemon,
        driver,
        extras: Vec::new(),
    })
}

/// The kernel command line that tells the guest driver which scenarios to
/// run (`kmod_monitor.scenarios=a,b`) or leave out (`kmod_monitor.skip=c`);
/// empty for all. Named scenarios are run even where they would be
/// skipped.
pub fn scenario_arg(scenarios: &[String], skipped: &[&str]) -> String {
    if !scenarios.is_empty() {
        format!("kmod_monitor.scenarios={}", scenarios.join(","))
    } else if !skipped.is_empty() {
        format!("kmod_monitor.skip={}", skipped.join(","))
    } else {
        String::new()
    }
}

/// One boot of a kernel: its machine and the kernel command line that
/// selects its scenarios.
#[derive(Debug, PartialEq, Eq)]
pub struct Boot {
    pub machine: Machine,
    pub extra: String,
}

/// The boots one kernel of `arch` needs for the `named` scenarios (every
/// scenario but `skipped` when none is named), and the scenarios left out
/// on it. Named scenarios run even where they would be skipped; one whose
/// machine `arch` lacks runs on the plain machine, where it fails saying
/// what it misses.
pub fn boots(arch: Arch, named: &[String], skipped: &[&str]) -> (Vec<Boot>, Vec<String>) {
    let own = |name: &str| {
        OWN_MACHINE
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, m)| *m)
            .filter(|m| m.qemu_args(arch).is_some())
    };
    let mut left_out: Vec<String> = skipped.iter().map(|s| (*s).to_owned()).collect();
    let mut boots = Vec::new();
    if named.is_empty() {
        let mut skip = skipped.to_vec();
        skip.extend(
            OWN_MACHINE
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| !skipped.contains(n)),
        );
        boots.push(Boot {
            machine: Machine::Plain,
            extra: scenario_arg(&[], &skip),
        });
        for (name, _) in OWN_MACHINE.iter().filter(|(n, _)| !skipped.contains(n)) {
            match own(name) {
                Some(machine) => boots.push(Boot {
                    machine,
                    extra: scenario_arg(&[(*name).to_owned()], &[]),
                }),
                None => left_out.push((*name).to_owned()),
            }
        }
        return (boots, left_out);
    }
    let plain: Vec<String> = named.iter().filter(|n| own(n).is_none()).cloned().collect();
    if !plain.is_empty() {
        boots.push(Boot {
            machine: Machine::Plain,
            extra: scenario_arg(&plain, &[]),
        });
    }
    let mut machines: Vec<Machine> = named.iter().filter_map(|n| own(n)).collect();
    machines.dedup();
    for machine in machines {
        let names: Vec<String> = named
            .iter()
            .filter(|n| own(n) == Some(machine))
            .cloned()
            .collect();
        boots.push(Boot {
            machine,
            extra: scenario_arg(&names, &[]),
        });
    }
    (boots, left_out)
}

/// Runs the VM tests and returns one outcome per kernel, in order.
pub fn vm_test(options: &Options) -> Result<Vec<Outcome>> {
    let Options {
        archs,
        kernels,
        scenarios,
        full,
        refresh_kernels,
        timeout,
    } = options;
    let pairs = plan(archs, kernels)?;
    let mut outcomes = Vec::new();
    let mut prepared: Option<(Arch, kernel::Apt, GuestBinaries)> = None;
    for (arch, series) in pairs {
        if prepared.as_ref().is_none_or(|(a, ..)| *a != arch) {
            let apt = kernel::Apt::new(arch.debian(), kernel::Purpose::Kernels)
                .context("preparing the private apt configuration")?;
            let binaries = guest_binaries(arch, *refresh_kernels)?;
            prepared = Some((arch, apt, binaries));
        }
        let Some((_, apt, binaries)) = prepared.as_mut() else {
            bail!("the {arch} binaries were not prepared");
        };
        let skipped = if *full || !scenarios.is_empty() {
            &[]
        } else {
            arch.skipped_by_default(series)
        };
        let (boots, skipped) = boots(arch, scenarios, skipped);
        let start = Instant::now();
        let mut outcome = Outcome {
            arch,
            series,
            skipped,
            release: None,
            passed: 0,
            failed: Vec::new(),
            problems: Vec::new(),
            duration: Duration::ZERO,
            boot_duration: None,
            consoles: Vec::new(),
        };
        if let Err(err) = run_one(
            series,
            *refresh_kernels,
            Duration::from_secs(*timeout),
            apt,
            binaries,
            &boots,
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
    binaries: &GuestBinaries,
    boots: &[Boot],
    outcome: &mut Outcome,
) -> Result<()> {
    let arch = outcome.arch;
    let label = outcome.label();
    let kernel = kernel::prepare(arch, series, refresh, apt)
        .with_context(|| format!("fetching the {label} kernel"))?;
    outcome.release = Some(kernel.release.clone());
    let dir = dirs::vm_test_dir(arch, series.name());
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let initrd = dir.join("initramfs.cpio.gz");
    binaries
        .initramfs(&kernel, &initrd)
        .with_context(|| format!("building the {label} initramfs"))?;
    for Boot { machine, extra } in boots {
        // The plain boot keeps the historical file name.
        let (console, label, on) = match machine {
            Machine::Plain => (dir.join("console.log"), label.clone(), String::new()),
            m => (
                dir.join(format!("console-{}.log", m.name())),
                format!("{label} {}", m.name()),
                format!(" (the {} machine)", m.name()),
            ),
        };
        let run = vm::boot_with(&kernel, *machine, &initrd, &console, timeout, &label, extra)?;
        *outcome.boot_duration.get_or_insert(Duration::ZERO) += run.duration;
        outcome.consoles.push(run.console.clone());
        let text = fs::read(&console).with_context(|| format!("reading {}", console.display()))?;
        let report = vm::Report::parse(&String::from_utf8_lossy(&text));
        if run.timed_out {
            outcome.problems.push(format!(
                "QEMU was killed after the {} s timeout{on}",
                timeout.as_secs()
            ));
        } else if !run.success {
            outcome
                .problems
                .push(format!("QEMU exited with {}{on}", run.status));
        }
        outcome.problems.extend(
            report
                .problems(&kernel.release)
                .into_iter()
                .map(|p| format!("{p}{on}")),
        );
        outcome.passed += report.passed.len();
        outcome.failed.extend(report.failed);
    }
    Ok(())
}

fn print_outcome(o: &Outcome) {
    let verdict = if o.ok() { "PASS" } else { "FAIL" };
    println!(
        "vm-test {}: {verdict}: {} passed, {} failed in {:.1} s (boot {}) [{}]",
        o.label(),
        o.passed,
        o.failed.len(),
        o.duration.as_secs_f64(),
        o.boot_duration
            .map_or_else(|| "-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
        o.release.as_deref().unwrap_or("kernel not fetched"),
    );
    for (name, why) in &o.failed {
        println!("vm-test {}:   FAIL {name}: {why}", o.label());
    }
    for problem in &o.problems {
        println!("vm-test {}:   PROBLEM {problem}", o.label());
    }
    if !o.skipped.is_empty() {
        println!(
            "vm-test {}:   not run here (`--full` runs them, but for a machine this architecture lacks here): {}",
            o.label(),
            o.skipped.join(" ")
        );
    }
    for console in &o.consoles {
        println!(
            "vm-test {}:   console log: {}",
            o.label(),
            console.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_runs_each_architecture_on_its_own_kernels() {
        let all = plan(&[], &[]).unwrap();
        assert_eq!(
            all.len(),
            Arch::X86_64.series().len() + Arch::Aarch64.series().len()
        );
        assert_eq!(all[0], (Arch::X86_64, Series::V5_10));
        assert!(all.contains(&(Arch::Aarch64, Series::V6_17)));
        assert!(!all.contains(&(Arch::Aarch64, Series::V5_10)));
        // Without --arch, 5.10 runs where it is tested.
        assert_eq!(
            plan(&[], &[Series::V5_10]).unwrap(),
            [(Arch::X86_64, Series::V5_10)]
        );
        assert_eq!(
            plan(&[Arch::Aarch64], &[Series::V6_12, Series::V6_1]).unwrap(),
            [
                (Arch::Aarch64, Series::V6_1),
                (Arch::Aarch64, Series::V6_12)
            ]
        );
        let err = plan(&[Arch::Aarch64], &[Series::V5_10])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "aarch64 has no 5.10 test kernel (it tests 6.1, 6.12, 6.17)"
        );
    }

    #[test]
    fn scenarios_go_on_the_kernel_command_line() {
        assert_eq!(scenario_arg(&[], &[]), "");
        let named = ["baseline".to_owned(), "failing-load".to_owned()];
        assert_eq!(
            scenario_arg(&named, &[]),
            "kmod_monitor.scenarios=baseline,failing-load"
        );
        let soak = Arch::Aarch64.skipped_by_default(Series::V6_12);
        assert_eq!(
            scenario_arg(&[], soak),
            "kmod_monitor.skip=soak-1000-cycles-under-scrapes,unprivileged-flood"
        );
        // Named scenarios run even where they are skipped by default.
        assert_eq!(
            scenario_arg(&named, soak),
            "kmod_monitor.scenarios=baseline,failing-load"
        );
        // Every x86-64 scenario runs on some kernel by default.
        for s in ["unprivileged-flood", "iommu-present"] {
            assert!(
                Series::ALL
                    .iter()
                    .any(|k| !Arch::X86_64.skipped_by_default(*k).contains(&s)),
                "{s} runs on no x86-64 kernel"
            );
        }
    }

    #[test]
    fn scenarios_needing_their_own_machine_get_their_own_boot() {
        let plain = |extra: &str| Boot {
            machine: Machine::Plain,
            extra: extra.to_owned(),
        };
        let iommu = Boot {
            machine: Machine::Iommu,
            extra: "kmod_monitor.scenarios=iommu-present".to_owned(),
        };
        // Everything: the plain boot leaves the IOMMU scenario to its own.
        let (all, left_out) = boots(Arch::X86_64, &[], &[]);
        assert_eq!(all, [plain("kmod_monitor.skip=iommu-present"), iommu]);
        assert!(left_out.is_empty());
        // arm64 has no IOMMU machine here: left out, and said so.
        let soak = Arch::Aarch64.skipped_by_default(Series::V6_12);
        let (all, left_out) = boots(Arch::Aarch64, &[], soak);
        assert_eq!(
            all,
            [plain(
                "kmod_monitor.skip=soak-1000-cycles-under-scrapes,unprivileged-flood,iommu-present"
            )]
        );
        assert_eq!(
            left_out,
            [
                "soak-1000-cycles-under-scrapes",
                "unprivileged-flood",
                "iommu-present"
            ]
        );
        // A skipped scenario of its own machine gets no boot.
        let (all, left_out) = boots(Arch::X86_64, &[], &["iommu-present"]);
        assert_eq!(all, [plain("kmod_monitor.skip=iommu-present")]);
        assert_eq!(left_out, ["iommu-present"]);
        // Named: one boot per machine that is needed, no empty boot.
        let named = ["iommu-present".to_owned(), "baseline".to_owned()];
        let (x86, _) = boots(Arch::X86_64, &named, &[]);
        assert_eq!(
            x86,
            [
                plain("kmod_monitor.scenarios=baseline"),
                Boot {
                    machine: Machine::Iommu,
                    extra: "kmod_monitor.scenarios=iommu-present".to_owned(),
                }
            ]
        );
        let (only, _) = boots(Arch::X86_64, &named[..1], &[]);
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].machine, Machine::Iommu);
        // Named where its machine is missing: on the plain one, to fail there.
        let (arm, _) = boots(Arch::Aarch64, &named[..1], &[]);
        assert_eq!(arm, [plain("kmod_monitor.scenarios=iommu-present")]);
    }
}
