//! The scenarios, in the order they run in one guest. Each one sets up what
//! it needs (daemon running or not, modules loaded or not) instead of
//! trusting the previous one, so a failure early on still lets the later
//! scenarios say something meaningful.
use std::{
    collections::BTreeSet,
    fs,
    panic::{self, AssertUnwindSafe},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use crate::{
    Outcome,
    api::{Api, POLL_EVERY},
    compat,
    daemon::{self, Daemon},
    diagnostics, ensure, hostile, kmod, loss, more, race,
    report::Report,
    soak,
    status::{Actor, Status},
    ublk,
};

/// Longhorn's base requirement.
const BASE: &str = "base";
/// The V2 data engine's requirement group and its modules, in load order.
const V2: &str = "v2-data-engine";
const V2_MODULES: [&str; 3] = ["vfio_pci", "uio_pci_generic", "nvme_tcp"];
/// The config-file group holding the module that cannot load here.
const FAILING_GROUP: &str = "failing-probe";
/// Fails its init in every TCG guest of this architecture, after the
/// module_load tracepoint (the host harness, `Arch::failing_module` in
/// xtask, says why and puts it into the initramfs):
/// - x86-64: `kvm_intel`: QEMU's `-cpu max` under TCG is an AMD model
///   with SVM but no VMX, so vmx_init returns -EOPNOTSUPP;
/// - aarch64: `cppc_cpufreq`: the `virt` machine boots by device tree, so
///   ACPI is off, no CPU has a valid _CPC, and its init returns -ENODEV.
const FAILING_MODULE: &str = if cfg!(target_arch = "aarch64") {
    "cppc_cpufreq"
} else {
    "kvm_intel"
};
/// The CPU feature SPDK needs, which the V2 readiness section reports
/// from /proc/cpuinfo: ASIMD on arm64, SSE4.2 on x86-64.
const CPU_FEATURE: &str = if cfg!(target_arch = "aarch64") {
    "asimd"
} else {
    "sse4_2"
};
/// Every tracepoint the daemon's eBPF source may attach to: the module
/// ones are required, the syscall ones exist only with
/// CONFIG_FTRACE_SYSCALLS.
const TRACEPOINTS: &[(&str, &str)] = &[
    ("module", "module_load"),
    ("module", "module_free"),
    ("module", "module_request"),
    ("syscalls", "sys_exit_finit_module"),
    ("syscalls", "sys_exit_init_module"),
    ("syscalls", "sys_enter_finit_module"),
    ("syscalls", "sys_enter_init_module"),
    ("syscalls", "sys_enter_delete_module"),
    ("syscalls", "sys_exit_delete_module"),
];
/// The config-file group holding a module that is always in use while
/// dm_crypt is loaded, so rmmod of it fails.
const IN_USE_GROUP: &str = "in-use";
const IN_USE_MODULE: &str = "dm_mod";
/// The config file every daemon in the guest runs with.
const CONFIG: &str = "/tmp/kmod-monitor-vm-test.toml";
const TRACEFS: &str = "/sys/kernel/tracing";

/// Everything the scenarios share.
pub struct Guest {
    api: Api,
    daemon: Option<Daemon>,
    /// The `--source` of the running daemon.
    source: &'static str,
    /// Logs of daemons started during the current scenario.
    logs: Vec<PathBuf>,
    starts: usize,
    release: String,
}

type Scenario = fn(&mut Guest) -> Outcome;

/// Every scenario with its name, in running order.
const SCENARIOS: &[(&str, Scenario)] = &[
    ("guest-env", guest_env),
    ("env-failing-module", env_failing_module),
    ("baseline", baseline),
    ("v2-load-in-turn", v2_load_in_turn),
    ("rmmod-actor", rmmod_actor),
    ("failing-load", failing_load),
    ("unload-in-use", unload_in_use),
    ("restart-sees-offline-change", restart_sees_offline_change),
    ("check-exit-codes", check_exit_codes),
    ("uevent-v2-load-unload", uevent_v2_load_unload),
    ("metrics-follow", more::metrics_follow),
    ("forensic-unload", more::forensic_unload),
    ("compat-task", compat::compat_task),
    ("privileges-dropped", more::privileges_dropped),
    ("alert-latency", more::alert_latency),
    ("loss-never-silent", loss::loss_never_silent),
    (
        "ebpf-diagnostics",
        diagnostics::layout_unset_is_logged_and_counted,
    ),
    ("unprivileged-flood", hostile::unprivileged_flood),
    ("denied-rate-limit", hostile::denied_rate_limit),
    ("forged-uevent-ignored", hostile::forged_uevent_ignored),
    ("startup-race", race::startup_race),
    ("startup-race-uevent", race::startup_race_uevent),
    ("iommu-present", iommu_present),
    ("ublk-optional-group", |g| ublk::ublk_group(g, CONFIG)),
    ("soak-1000-cycles-under-scrapes", soak::soak),
];

/// The scenarios /proc/cmdline's `kmod_monitor.scenarios=a,b` names (all
/// when it names none)
/// less those `kmod_monitor.skip=c,d` names, and the names that match no
/// scenario.
fn selected(cmdline: &str) -> (Vec<(&'static str, Scenario)>, Vec<String>) {
    let list = |key: &str| -> Option<Vec<&str>> {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(|l| l.split(',').filter(|n| !n.is_empty()).collect())
    };
    let wanted = list("kmod_monitor.scenarios=");
    let skipped = list("kmod_monitor.skip=").unwrap_or_default();
    let chosen = SCENARIOS
        .iter()
        .filter(|(name, _)| wanted.as_ref().is_none_or(|w| w.contains(name)))
        .filter(|(name, _)| !skipped.contains(name))
        .copied()
        .collect();
    let unknown = wanted
        .iter()
        .flatten()
        .chain(&skipped)
        .filter(|n| !SCENARIOS.iter().any(|(name, _)| name == *n))
        .map(|n| (*n).to_owned())
        .collect();
    (chosen, unknown)
}

/// Runs the scenarios the kernel command line selects (all by default);
/// returns whether all passed.
pub fn run_all() -> bool {
    let release = kmod::kernel_release().unwrap_or_else(|e| {
        Report::note(&e);
        String::from("unknown")
    });
    let mut guest = Guest {
        api: Api::new(),
        daemon: None,
        source: "ebpf",
        logs: Vec::new(),
        starts: 0,
        release,
    };
    let mut report = Report::default();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_else(|e| {
        Report::note(&format!(
            "cannot read /proc/cmdline ({e}); running every scenario"
        ));
        String::new()
    });
    let (scenarios, unknown) = selected(&cmdline);
    Report::plan(scenarios.len() + unknown.len());
    let skipped: Vec<&str> = SCENARIOS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !scenarios.iter().any(|(n, _)| n == name))
        .collect();
    if !skipped.is_empty() {
        Report::note(&format!(
            "not run (as the kernel command line asks): {}",
            skipped.join(" ")
        ));
    }
    for name in &unknown {
        let known: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
        report.fail(
            name,
            &format!("no such scenario; there are: {}", known.join(" ")),
            Duration::ZERO,
        );
    }
    let config = format!(
        "[groups.{FAILING_GROUP}]\nall_of = [\"{FAILING_MODULE}\"]\n\n\
         [groups.{IN_USE_GROUP}]\nall_of = [\"{IN_USE_MODULE}\"]\n"
    );
    if let Err(e) = fs::write(CONFIG, config) {
        Report::note(&format!("cannot write {CONFIG}: {e}"));
    }
    for (name, scenario) in &scenarios {
        guest.logs.clear();
        let start = Instant::now();
        let result = panic::catch_unwind(AssertUnwindSafe(|| scenario(&mut guest)));
        let took = start.elapsed();
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(panic) => Err(format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
            )),
        };
        match outcome {
            Ok(()) => report.pass(name, took),
            Err(why) => {
                report.fail(name, &why, took);
                guest.dump_logs(name);
            }
        }
    }
    guest.stop_daemon();
    report.done()
}

impl Guest {
    /// Daemon arguments for `source`: the V2 group and the failing-probe
    /// config group are always on, and the forensic log is written to
    /// [`more::EVENT_LOG`] (a later `--no-event-log` or `--event-log` wins).
    fn daemon_args(source: &str) -> [&str; 7] {
        [
            "--source",
            source,
            "--v2-data-engine",
            "--config",
            CONFIG,
            "--event-log",
            more::EVENT_LOG,
        ]
    }

    /// The log file of the daemon running now.
    pub fn daemon_log(&self) -> Option<PathBuf> {
        self.daemon.as_ref().map(|d| d.log.clone())
    }

    /// The daemon's HTTP API.
    pub const fn api(&self) -> &Api {
        &self.api
    }

    /// Starts a daemon with `source` (stopping any running one first) and
    /// returns its first `/status`.
    fn start_daemon(&mut self, source: &'static str) -> Result<Status, String> {
        self.start_daemon_with(source, &[])
    }

    /// Like [`start_daemon`](Self::start_daemon), with `extra` arguments.
    pub fn start_daemon_with(
        &mut self,
        source: &'static str,
        extra: &[&str],
    ) -> Result<Status, String> {
        self.start_daemon_env(source, extra, &[])
    }

    /// Like [`start_daemon_with`](Self::start_daemon_with), with `env`
    /// added to the daemon's environment.
    pub fn start_daemon_env(
        &mut self,
        source: &'static str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Status, String> {
        self.stop_daemon();
        self.starts += 1;
        let log = PathBuf::from(format!("/tmp/kmod-monitor.{}.log", self.starts));
        self.logs.push(log.clone());
        let mut args = Self::daemon_args(source).to_vec();
        args.extend_from_slice(extra);
        let daemon = Daemon::start_with_env(&args, env, log, &self.api)?;
        self.daemon = Some(daemon);
        self.source = source;
        self.api.status()
    }

    /// Starts a daemon like [`start_daemon_with`](Self::start_daemon_with)
    /// but returns as soon as the process runs, before it is ready; finish
    /// with [`wait_daemon_ready`](Self::wait_daemon_ready).
    pub fn spawn_daemon_with(&mut self, source: &'static str, extra: &[&str]) -> Outcome {
        self.stop_daemon();
        self.starts += 1;
        let log = PathBuf::from(format!("/tmp/kmod-monitor.{}.log", self.starts));
        self.logs.push(log.clone());
        let mut args = Self::daemon_args(source).to_vec();
        args.extend_from_slice(extra);
        self.daemon = Some(Daemon::spawn(&args, log)?);
        self.source = source;
        Ok(())
    }

    /// Waits until the daemon [`spawn_daemon_with`](Self::spawn_daemon_with)
    /// started answers `/healthz`; returns its first `/status`.
    pub fn wait_daemon_ready(&mut self) -> Result<Status, String> {
        let daemon = self.daemon.as_mut().ok_or("no daemon was started")?;
        daemon.wait_ready(&[self.source], &self.api)?;
        self.api.status()
    }

    /// SIGTERMs the running daemon and waits for it to exit, as a node's
    /// shutdown would stop it (it flushes what it gathers).
    pub fn terminate_daemon(&mut self) -> Outcome {
        let mut daemon = self.daemon.take().ok_or("no daemon is running")?;
        let status = daemon.terminate(Duration::from_secs(10))?;
        ensure!(
            status.success(),
            "kmod-monitor exited with {status} on SIGTERM"
        );
        Ok(())
    }

    /// Makes sure a daemon with `source` runs; returns a fresh `/status`.
    pub fn ensure_daemon(&mut self, source: &'static str) -> Result<Status, String> {
        let alive = match self.daemon.as_mut() {
            Some(d) => d.exited().is_none(),
            None => false,
        };
        if alive && self.source == source {
            if let Some(d) = &self.daemon {
                self.logs.push(d.log.clone());
            }
            self.api.status()
        } else {
            self.start_daemon(source)
        }
    }

    /// The running daemon's pid.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Daemon::pid)
    }

    /// Whether the running daemon has exited (and how).
    pub fn daemon_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.daemon.as_mut().and_then(Daemon::exited)
    }

    pub fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
        }
    }

    /// Prints the output of every daemon this scenario used, and the
    /// kernel's module list, after a failure.
    fn dump_logs(&mut self, scenario: &str) {
        if let Some(d) = self.daemon.as_mut()
            && let Some(status) = d.exited()
        {
            Report::note(&format!(
                "{scenario}: kmod-monitor (pid {}) has exited: {status}",
                d.pid()
            ));
        }
        for log in &self.logs {
            Report::note(&format!(
                "{scenario}: output of kmod-monitor, {}:",
                log.display()
            ));
            for line in daemon::log_tail(log, 40) {
                Report::log("kmod-monitor", &line);
            }
        }
        match kmod::proc_modules() {
            Ok(text) => {
                for line in text.lines() {
                    Report::log("/proc/modules", line);
                }
            }
            Err(e) => Report::note(&e),
        }
    }
}

/// The active source must be the one asked for: a silent fallback fails.
fn expect_source(status: &Status, wanted: &str) -> Outcome {
    let reasons: Vec<String> = status
        .source
        .unavailable
        .iter()
        .map(|u| format!("{}: {}", u.source, u.reason))
        .collect();
    ensure!(
        status.source.active == wanted,
        "source.active is {:?}, expected {wanted:?} (unavailable: {})",
        status.source.active,
        reasons.join("; ")
    );
    Ok(())
}

/// The eBPF source reports what it attached to, and that is exactly the
/// tracepoints of [`TRACEPOINTS`] this kernel's tracefs has: the daemon
/// looks them up rather than assuming them.
fn expect_attached(status: &Status) -> Outcome {
    let details = &status.source.details;
    let Some(line) = details.iter().find_map(|d| d.strip_prefix("attached: ")) else {
        return Err(format!(
            "source.details has no `attached: ...` entry: {details:?}"
        ));
    };
    let attached: BTreeSet<&str> = line.split(", ").collect();
    let present: BTreeSet<String> = TRACEPOINTS
        .iter()
        .filter(|(group, event)| {
            fs::metadata(format!("{TRACEFS}/events/{group}/{event}/format")).is_ok()
        })
        .map(|(group, event)| format!("{group}:{event}"))
        .collect();
    let present: BTreeSet<&str> = present.iter().map(String::as_str).collect();
    ensure!(
        attached == present,
        "the daemon reports {attached:?} attached, but tracefs has {present:?}; details: {details:?}"
    );
    Report::note(&format!("eBPF source details: {}", details.join(" | ")));
    Ok(())
}

/// With the eBPF source every change arrives as an event, so reconciling
/// against /proc/modules must never find the tracked state wrong.
fn expect_no_drift(status: &Status) -> Outcome {
    ensure!(
        status.drift_total == 0,
        "drift_total is {}: the eBPF events missed or misread a change ({})",
        status.drift_total,
        status.summary()
    );
    Ok(())
}

fn expect_actor(actor: Option<&Actor>, comm: &str, pid: u32, what: &str) -> Outcome {
    let Some(actor) = actor else {
        return Err(format!(
            "{what}: last_event.actor is null, expected {comm} pid {pid}"
        ));
    };
    ensure!(
        actor.comm == comm
            && actor.pid == pid
            && actor.tgid == pid
            && actor.uid == 0
            && actor.gid == 0,
        "{what}: actor is comm={:?} pid={} tgid={} uid={} gid={} cgroup_id={}, \
         expected comm={comm:?} pid={pid} tgid={pid} uid=0 gid=0",
        actor.comm,
        actor.pid,
        actor.tgid,
        actor.uid,
        actor.gid,
        actor.cgroup_id
    );
    Ok(())
}

/// Waits until `module` (listed in `group`) is in `state`.
fn wait_state(api: &Api, group: &str, module: &str, state: &str) -> Result<Status, String> {
    api.wait_for(&format!("{module} {state}"), |s| {
        Ok(s.state(group, module)? == state)
    })
}

/// Unloads the V2 modules and waits for the daemon to see them available.
fn unload_v2(api: &Api) -> Outcome {
    for module in V2_MODULES.iter().rev() {
        kmod::ensure_unloaded(module)?;
    }
    api.wait_for("all V2 modules available", |s| {
        for module in V2_MODULES {
            if s.state(V2, module)? != "available" {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    Ok(())
}

/// Loads the V2 modules one by one (b): the group is met only once the
/// last one is loaded. With `actors`, each load's actor must be the
/// modprobe that did it.
fn load_v2_in_turn(api: &Api, actors: bool) -> Outcome {
    for (i, module) in V2_MODULES.iter().enumerate() {
        let ran = kmod::modprobe(module)?;
        let status = wait_state(api, V2, module, "loaded")?;
        let last = i == V2_MODULES.len() - 1;
        let met = status.met(V2)?;
        ensure!(
            met == last,
            "after modprobe {module}, {V2} met={met}, expected {last}: {}",
            status.summary()
        );
        ensure!(
            status.met(BASE)?,
            "base unmet after modprobe {module}: {}",
            status.summary()
        );
        if actors {
            let m = status.module(V2, module)?;
            let Some(event) = &m.last_event else {
                return Err(format!("{module} is loaded but its last_event is null"));
            };
            ensure!(
                event.kind == "load" || event.kind == "loaded",
                "{module}'s last_event.kind is {:?} after a successful modprobe",
                event.kind
            );
            expect_actor(
                event.actor.as_ref(),
                "modprobe",
                ran.pid,
                &format!("modprobe {module}"),
            )?;
        }
    }
    Ok(())
}

/// Unloads nvme_tcp with a child rmmod (c); returns its pid and the status
/// once the daemon shows the module available. With `kernel_time`, the
/// event's boot_ns must fall within the rmmod's run (a kernel timestamp,
/// as the eBPF source takes; uevents are stamped on receipt).
fn rmmod_nvme_tcp(api: &Api, kernel_time: bool) -> Result<(u32, Status), String> {
    let before_ns = kmod::boottime_ns()?;
    let ran = kmod::rmmod("nvme_tcp")?;
    let after_ns = kmod::boottime_ns()?;
    let status = wait_state(api, V2, "nvme_tcp", "available")?;
    ensure!(
        !status.met(V2)?,
        "{V2} still met after rmmod nvme_tcp: {}",
        status.summary()
    );
    ensure!(
        status.met(BASE)?,
        "base unmet after rmmod nvme_tcp: {}",
        status.summary()
    );
    let m = status.module(V2, "nvme_tcp")?;
    let Some(event) = &m.last_event else {
        return Err("nvme_tcp's last_event is null after rmmod".to_owned());
    };
    ensure!(
        event.kind == "unload",
        "nvme_tcp's last_event.kind is {:?} after rmmod, expected \"unload\"",
        event.kind
    );
    // /proc/uptime counts CLOCK_BOOTTIME in 10 ms steps.
    let slack = 20_000_000;
    ensure!(
        !kernel_time || (event.boot_ns + slack >= before_ns && event.boot_ns <= after_ns + slack),
        "nvme_tcp's unload has boot_ns {}, outside the rmmod's run {before_ns}..{after_ns} (CLOCK_BOOTTIME)",
        event.boot_ns
    );
    Ok((ran.pid, status))
}

// ---- scenarios ----

/// The guest has what the daemon relies on: module tracepoints, module
/// metadata, the kernel config and loopback networking.
fn guest_env(g: &mut Guest) -> Outcome {
    for event in [
        "module_load",
        "module_free",
        "module_request",
        "module_get",
        "module_put",
    ] {
        let path = format!("{TRACEFS}/events/module/{event}/format");
        ensure!(
            fs::metadata(&path).is_ok(),
            "{path} is missing: no module tracepoint {event}"
        );
    }
    kmod::proc_modules()?;
    for file in [
        format!("/lib/modules/{}/modules.builtin", g.release),
        format!("/lib/modules/{}/modules.dep", g.release),
        format!("/boot/config-{}", g.release),
    ] {
        ensure!(
            fs::metadata(&file).is_ok(),
            "{file} is missing from the initramfs"
        );
    }
    std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("loopback is not up: {e}"))?;
    Ok(())
}

/// The chosen failing module really fails: module_load then module_free
/// in tracefs, a failed modprobe, and nothing left in /proc/modules.
fn env_failing_module(_: &mut Guest) -> Outcome {
    let write = |path: &str, value: &str| {
        fs::write(format!("{TRACEFS}/{path}"), value)
            .map_err(|e| format!("writing {value:?} to {TRACEFS}/{path}: {e}"))
    };
    write("trace", "")?;
    write("events/module/module_load/enable", "1")?;
    write("events/module/module_free/enable", "1")?;
    let ran = kmod::run("modprobe", &[FAILING_MODULE]);
    write("events/module/module_load/enable", "0")?;
    write("events/module/module_free/enable", "0")?;
    let ran = ran?;
    let trace = fs::read_to_string(format!("{TRACEFS}/trace"))
        .map_err(|e| format!("reading the trace: {e}"))?;
    write("trace", "")?;
    ensure!(
        !ran.success,
        "modprobe {FAILING_MODULE} succeeded; it must fail in a TCG guest"
    );
    let loads = trace
        .lines()
        .filter(|l| l.contains(&format!("module_load: {FAILING_MODULE}")))
        .count();
    let frees = trace
        .lines()
        .filter(|l| l.contains(&format!("module_free: {FAILING_MODULE}")))
        .count();
    ensure!(
        loads >= 1 && loads == frees,
        "expected module_load and module_free of {FAILING_MODULE} in pairs, saw {loads} loads and {frees} frees: {trace}"
    );
    ensure!(
        !kmod::listed(FAILING_MODULE)?,
        "{FAILING_MODULE} is in /proc/modules after a failed load"
    );
    Report::note(&format!(
        "{FAILING_MODULE} fails as expected: {} ({loads} load/free pairs)",
        ran.stderr
    ));
    Ok(())
}

/// (a) A module loaded before the daemon starts is reported loaded.
fn baseline(g: &mut Guest) -> Outcome {
    g.stop_daemon();
    kmod::modprobe("dm_crypt")?;
    ensure!(
        kmod::listed("dm_crypt")?,
        "dm_crypt is not in /proc/modules after modprobe"
    );
    for module in V2_MODULES {
        kmod::ensure_unloaded(module)?;
    }
    let status = g.start_daemon("ebpf")?;
    Report::note(&format!("baseline: first /status: {}", status.summary()));
    expect_source(&status, "ebpf")?;
    expect_attached(&status)?;
    ensure!(
        status.version == env!("CARGO_PKG_VERSION"),
        "version is {:?}, expected {:?}",
        status.version,
        env!("CARGO_PKG_VERSION")
    );
    ensure!(
        status.kernel_release == g.release,
        "kernel_release is {:?}, uname -r says {:?}",
        status.kernel_release,
        g.release
    );
    ensure!(
        status.modules_supported,
        "modules_supported is false on a modular kernel"
    );
    let base = status.group(BASE)?;
    ensure!(
        base.mode == "all_of",
        "base mode is {:?}, expected all_of",
        base.mode
    );
    ensure!(
        status.state(BASE, "dm_crypt")? == "loaded",
        "dm_crypt is not loaded: {}",
        status.summary()
    );
    ensure!(
        base.met,
        "base is unmet with dm_crypt loaded: {}",
        status.summary()
    );
    ensure!(
        !status.met(V2)?,
        "{V2} is met with no V2 module loaded: {}",
        status.summary()
    );
    for module in V2_MODULES {
        let state = status.state(V2, module)?;
        ensure!(
            state == "available",
            "{module} is {state:?}, expected available: {}",
            status.summary()
        );
    }
    let state = status.state(FAILING_GROUP, FAILING_MODULE)?;
    ensure!(
        state == "available",
        "{FAILING_MODULE} is {state:?}, expected available"
    );
    ensure!(
        !status.met(FAILING_GROUP)?,
        "{FAILING_GROUP} is met: {}",
        status.summary()
    );
    Ok(())
}

/// (b) Loading the V2 modules one by one meets the group only at the last.
fn v2_load_in_turn(g: &mut Guest) -> Outcome {
    g.ensure_daemon("ebpf")?;
    unload_v2(&g.api)?;
    let before = g.api.status()?;
    expect_source(&before, "ebpf")?;
    load_v2_in_turn(&g.api, true)?;
    let after = g.api.status()?;
    ensure!(
        after.events.received > before.events.received,
        "events.received did not grow across three loads ({} -> {})",
        before.events.received,
        after.events.received
    );
    ensure!(
        after.events.lost == 0,
        "events.lost is {}",
        after.events.lost
    );
    expect_no_drift(&after)?;
    Ok(())
}

/// (c) rmmod nvme_tcp: the group drops, and the event names the rmmod.
fn rmmod_actor(g: &mut Guest) -> Outcome {
    g.ensure_daemon("ebpf")?;
    for module in V2_MODULES {
        kmod::modprobe(module)?;
    }
    g.api.wait_for("V2 met", |s| s.met(V2))?;
    let (pid, status) = rmmod_nvme_tcp(&g.api, true)?;
    let event = status.module(V2, "nvme_tcp")?.last_event.clone();
    expect_actor(
        event.and_then(|e| e.actor).as_ref(),
        "rmmod",
        pid,
        "rmmod nvme_tcp",
    )?;
    expect_no_drift(&status)?;
    Ok(())
}

/// (d) A module whose init fails is never reported loaded and ends
/// available with a load_failed event.
fn failing_load(g: &mut Guest) -> Outcome {
    let status = g.ensure_daemon("ebpf")?;
    expect_source(&status, "ebpf")?;
    let state = status.state(FAILING_GROUP, FAILING_MODULE)?;
    ensure!(
        state == "available",
        "{FAILING_MODULE} is {state:?} before the attempt"
    );

    let mut child = kmod::spawn("modprobe", &[FAILING_MODULE])?;
    let pid = child.id();
    let mut seen: Vec<String> = Vec::new();
    let mut observe = |s: &Status| -> Result<(), String> {
        let state = s.state(FAILING_GROUP, FAILING_MODULE)?.to_owned();
        if seen.last() != Some(&state) {
            seen.push(state);
        }
        Ok(())
    };
    // Poll as fast as the API answers while modprobe runs.
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if let Ok(s) = g.api.status() {
            observe(&s)?;
        }
    }
    let ran = kmod::finish(child, "modprobe")?;
    ensure!(
        !ran.success,
        "modprobe {FAILING_MODULE} succeeded ({})",
        ran.status
    );
    let last = g
        .api
        .wait_for(&format!("{FAILING_MODULE} load_failed"), |s| {
            let m = s.module(FAILING_GROUP, FAILING_MODULE)?;
            Ok(m.last_event
                .as_ref()
                .is_some_and(|e| e.kind == "load_failed"))
        });
    // And keep watching a little: a late "loaded" is as wrong as an early one.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(500) {
        if let Ok(s) = g.api.status() {
            observe(&s)?;
        }
        thread::sleep(POLL_EVERY);
    }
    Report::note(&format!(
        "{FAILING_MODULE} states seen while loading: {}",
        seen.join(" -> ")
    ));
    ensure!(
        !seen.iter().any(|s| s == "loaded"),
        "{FAILING_MODULE} was reported loaded at some point: {}",
        seen.join(" -> ")
    );
    let last = last?;
    let state = last.state(FAILING_GROUP, FAILING_MODULE)?;
    ensure!(
        state == "available",
        "{FAILING_MODULE} ends {state:?}, expected available"
    );
    ensure!(
        !last.met(FAILING_GROUP)?,
        "{FAILING_GROUP} is met: {}",
        last.summary()
    );
    let event = last
        .module(FAILING_GROUP, FAILING_MODULE)?
        .last_event
        .clone();
    expect_actor(
        event.and_then(|e| e.actor).as_ref(),
        "modprobe",
        pid,
        "failed modprobe",
    )?;
    ensure!(
        !kmod::listed(FAILING_MODULE)?,
        "{FAILING_MODULE} is in /proc/modules"
    );
    expect_no_drift(&last)?;
    Ok(())
}

/// An unload refused because the module is in use (dm_mod under
/// dm_crypt) leaves it loaded, with an unload_failed event from the rmmod.
fn unload_in_use(g: &mut Guest) -> Outcome {
    g.ensure_daemon("ebpf")?;
    kmod::modprobe("dm_crypt")?;
    let status = wait_state(&g.api, IN_USE_GROUP, IN_USE_MODULE, "loaded")?;
    ensure!(
        status.met(IN_USE_GROUP)?,
        "{IN_USE_GROUP} unmet: {}",
        status.summary()
    );
    let ran = kmod::run("rmmod", &[IN_USE_MODULE])?;
    ensure!(
        !ran.success,
        "rmmod {IN_USE_MODULE} succeeded although dm_crypt uses it"
    );
    let status = g
        .api
        .wait_for(&format!("{IN_USE_MODULE} unload_failed"), |s| {
            let m = s.module(IN_USE_GROUP, IN_USE_MODULE)?;
            Ok(m.last_event
                .as_ref()
                .is_some_and(|e| e.kind == "unload_failed"))
        })?;
    let state = status.state(IN_USE_GROUP, IN_USE_MODULE)?;
    ensure!(
        state == "loaded",
        "{IN_USE_MODULE} is {state:?} after a refused rmmod, expected loaded"
    );
    ensure!(
        status.met(IN_USE_GROUP)?,
        "{IN_USE_GROUP} unmet after a refused rmmod"
    );
    let event = status
        .module(IN_USE_GROUP, IN_USE_MODULE)?
        .last_event
        .clone();
    expect_actor(
        event.and_then(|e| e.actor).as_ref(),
        "rmmod",
        ran.pid,
        "refused rmmod",
    )?;
    ensure!(
        kmod::listed(IN_USE_MODULE)?,
        "{IN_USE_MODULE} left /proc/modules"
    );
    expect_no_drift(&status)?;
    Ok(())
}

/// (e) A change made while the daemon is down shows in the very first
/// /status after a restart.
fn restart_sees_offline_change(g: &mut Guest) -> Outcome {
    g.ensure_daemon("ebpf")?;
    kmod::modprobe("uio_pci_generic")?;
    wait_state(&g.api, V2, "uio_pci_generic", "loaded")?;
    if let Some(mut d) = g.daemon.take() {
        d.kill()?;
    }
    kmod::rmmod("uio_pci_generic")?;
    let first = g.start_daemon("ebpf")?;
    expect_source(&first, "ebpf")?;
    let state = first.state(V2, "uio_pci_generic")?;
    ensure!(
        state == "available",
        "first /status after restart says uio_pci_generic is {state:?}, expected available: {}",
        first.summary()
    );
    ensure!(
        !first.met(V2)?,
        "{V2} met right after restart without uio_pci_generic"
    );
    Ok(())
}

/// (f) `check` exits 0 when all groups are met, 1 when one is not, and 2
/// on a config error.
fn check_exit_codes(_: &mut Guest) -> Outcome {
    for module in ["dm_crypt"].into_iter().chain(V2_MODULES) {
        kmod::modprobe(module)?;
    }
    let expect = |args: &[&str], code: i32| -> Result<String, String> {
        let (got, out, err) = daemon::oneshot(args)?;
        ensure!(
            got == code,
            "`kmod-monitor {}` exited {got}, expected {code}; stdout: {} stderr: {}",
            args.join(" "),
            out.trim(),
            err.trim()
        );
        Ok(out)
    };
    let json = |args: &[&str], code: i32| -> Result<serde_json::Value, String> {
        let out = expect(&[args, &["--output", "json"]].concat(), code)?;
        serde_json::from_str(&out).map_err(|e| format!("check JSON ({e}): {out}"))
    };
    let item = |report: &serde_json::Value, name: &str| -> Result<serde_json::Value, String> {
        report["groups"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["name"] == name))
            .cloned()
            .ok_or_else(|| format!("no {name} in check's report: {report}"))
    };
    // This guest, judged against Longhorn 1.12 (the newest table): its
    // kernel is new enough for V2 only from 6.7; no IOMMU (QEMU's default
    // machine has none); no hugepages yet.
    let release = kmod::kernel_release()?;
    let version: Vec<u32> = release
        .split(['.', '-', '+'])
        .take(2)
        .map(|p| {
            p.parse()
                .map_err(|e| format!("kernel release {release:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let new_enough = version >= vec![6, 7];
    let report = json(
        &["check", "--v2-data-engine", "--longhorn-version", "1.12"],
        1,
    )?;
    let kernel = item(&report, "v2-kernel")?;
    ensure!(
        kernel["met"] == new_enough && kernel["check"]["level"] == "required",
        "v2-kernel on {release} under 1.12 should be met={new_enough}: {kernel}"
    );
    let iommu = item(&report, "v2-iommu")?;
    ensure!(
        iommu["met"] == false
            && iommu["check"]["fix"]
                .as_str()
                .is_some_and(|f| f.contains("iommu")),
        "this guest has no IOMMU: {iommu}"
    );
    let pool = item(&report, "v2-hugepages")?;
    ensure!(
        pool["met"] == false
            && pool["check"]["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("0 of 1024")),
        "check should name the hugepage shortfall: {pool}"
    );
    let cpu = item(&report, "v2-cpu")?;
    ensure!(cpu["met"] == true, "the CPU item: {cpu}");
    ensure!(
        report["v2"]["longhorn_version"]["source"] == "flag",
        "the version in force: {}",
        report["v2"]["longhorn_version"]
    );
    // The text names them too.
    let text = expect(&["check", "--v2-data-engine"], 1)?;
    ensure!(
        text.contains("Longhorn 1.12 node requirements") && text.contains("v2-iommu"),
        "check's readiness table: {}",
        text.trim()
    );
    // The kernel and IOMMU items switched off in a config file, as a user
    // whose Longhorn does not need them would; the hugepages decide.
    let lenient = "/tmp/lenient.toml";
    fs::write(
        lenient,
        "[groups.v2-kernel]\nenabled = false\n\n[groups.v2-iommu]\nenabled = false\n",
    )
    .map_err(|e| format!("writing {lenient}: {e}"))?;
    // Give the real kernel a 2 MiB pool: check reads it from sysfs.
    let nr = "/proc/sys/vm/nr_hugepages";
    fs::write(nr, "16\n").map_err(|e| format!("writing {nr}: {e}"))?;
    let got = fs::read_to_string(nr).map_err(|e| format!("reading {nr}: {e}"))?;
    let pages: u64 = got
        .trim()
        .parse()
        .map_err(|e| format!("{nr} holds {got:?}: {e}"))?;
    ensure!(pages > 0, "the kernel allocated no hugepages");
    let need = pages.to_string();
    let base = ["check", "--v2-data-engine", "--config", lenient];
    let pool = json(&[&base[..], &["--v2-hugepages-2mi", &need]].concat(), 0)?;
    let seen = &pool["v2"]["readiness"]["hugepages"]["pool"];
    ensure!(
        seen["total"] == pages && seen["source"] == "sysfs",
        "check saw {seen} for a pool of {pages}"
    );
    ensure!(
        item(&pool, "v2-kernel").is_err() && item(&pool, "v2-iommu").is_err(),
        "switched-off items are gone: {pool}"
    );
    // The CPU feature comes from this guest's /proc/cpuinfo, which has it.
    let cpuinfo =
        fs::read_to_string("/proc/cpuinfo").map_err(|e| format!("reading /proc/cpuinfo: {e}"))?;
    ensure!(
        cpuinfo
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(key, _)| matches!(key.trim(), "flags" | "Features"))
            .all(|(_, flags)| flags.split_whitespace().any(|f| f == CPU_FEATURE)),
        "this guest's /proc/cpuinfo lacks {CPU_FEATURE}"
    );
    let cpu = &pool["v2"]["readiness"]["cpu"];
    ensure!(
        cpu["feature"] == CPU_FEATURE && cpu["present"] == true,
        "check's readiness reports the CPU as {cpu}, expected {CPU_FEATURE} present"
    );
    let more = (pages + 1).to_string();
    expect(&[&base[..], &["--v2-hugepages-2mi", &more]].concat(), 1)?;
    fs::write(nr, "0\n").map_err(|e| format!("writing {nr}: {e}"))?;
    // The module verdicts alone.
    let v2 = [&base[..], &["--v2-hugepages-2mi", "0"]].concat();
    expect(&v2, 0)?;
    json(&v2, 0)?;
    kmod::rmmod("uio_pci_generic")?;
    expect(&v2, 1)?;
    expect(&["check"], 0)?;
    let bad_top = "/tmp/bad-top.toml";
    let bad_group = "/tmp/bad-group.toml";
    fs::write(bad_top, "colour = \"blue\"\n").map_err(|e| format!("writing {bad_top}: {e}"))?;
    fs::write(
        bad_group,
        "[groups.x]\nall_of = [\"dm_crypt\"]\nany_off = [\"nvme_tcp\"]\n",
    )
    .map_err(|e| format!("writing {bad_group}: {e}"))?;
    expect(&["check", "--v2-data-engine", "--config", bad_top], 2)?;
    expect(&["check", "--config", bad_group], 2)?;
    expect(&["check", "--longhorn-version", "latest"], 2)?;
    kmod::modprobe("uio_pci_generic")?;
    Ok(())
}

/// Issue 12: on q35 with an emulated Intel IOMMU and `intel_iommu=on` (the
/// host harness boots this scenario on that machine of its own), the
/// kernel makes IOMMU groups and `check` reports `v2-iommu` met under the
/// 1.12 table. [`check_exit_codes`] asserts the opposite on the plain
/// machine.
fn iommu_present(_: &mut Guest) -> Outcome {
    let cmdline =
        fs::read_to_string("/proc/cmdline").map_err(|e| format!("reading /proc/cmdline: {e}"))?;
    ensure!(
        cmdline.split_whitespace().any(|w| w == "intel_iommu=on"),
        "this scenario needs the IOMMU machine (q35, -device intel-iommu, intel_iommu=on), which \
         `cargo xtask vm-test` boots on x86_64 only; /proc/cmdline: {}",
        cmdline.trim()
    );
    let groups_dir = "/sys/kernel/iommu_groups";
    let groups = fs::read_dir(groups_dir)
        .map_err(|e| format!("listing {groups_dir}: {e}"))?
        .count();
    ensure!(
        groups > 0,
        "no IOMMU groups in {groups_dir} with intel_iommu=on on q35"
    );
    let args = [
        "check",
        "--v2-data-engine",
        "--longhorn-version",
        "1.12",
        "--output",
        "json",
    ];
    // Exit 1 is expected: this guest has no hugepages.
    let (code, out, err) = daemon::oneshot(&args)?;
    ensure!(
        code == 0 || code == 1,
        "`kmod-monitor {}` exited {code}: {}",
        args.join(" "),
        err.trim()
    );
    let report: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("check JSON ({e}): {out}"))?;
    let iommu = report["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == "v2-iommu"))
        .cloned()
        .ok_or_else(|| format!("no v2-iommu in check's report: {report}"))?;
    ensure!(
        iommu["met"] == true && iommu["check"]["level"] == "required",
        "{groups} IOMMU groups in {groups_dir}, yet: {iommu}"
    );
    Report::note(&format!(
        "iommu-present: {groups} IOMMU groups; check says: {}",
        iommu["check"]["detail"]
    ));
    Ok(())
}

/// (g) b and c with the uevent source.
fn uevent_v2_load_unload(g: &mut Guest) -> Outcome {
    let status = g.start_daemon("uevent")?;
    expect_source(&status, "uevent")?;
    unload_v2(&g.api)?;
    load_v2_in_turn(&g.api, false)?;
    rmmod_nvme_tcp(&g.api, false)?;
    g.stop_daemon();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{SCENARIOS, selected};

    fn names(cmdline: &str) -> (Vec<&'static str>, Vec<String>) {
        let (chosen, unknown) = selected(cmdline);
        (chosen.iter().map(|(n, _)| *n).collect(), unknown)
    }

    #[test]
    fn the_command_line_selects_and_skips_scenarios() {
        let all: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names("console=ttyS0 quiet"), (all.clone(), Vec::new()));
        assert_eq!(
            names("quiet kmod_monitor.scenarios=failing-load,baseline"),
            (vec!["baseline", "failing-load"], Vec::new())
        );
        let (chosen, unknown) = names("kmod_monitor.skip=soak-1000-cycles-under-scrapes");
        assert_eq!(chosen.len(), all.len() - 1);
        assert!(!chosen.contains(&"soak-1000-cycles-under-scrapes"));
        assert!(unknown.is_empty());
        assert_eq!(
            names("kmod_monitor.scenarios=baseline,nope kmod_monitor.skip=baseline,gone"),
            (Vec::new(), vec!["nope".to_owned(), "gone".to_owned()])
        );
    }
}
