//! The guest half of `cargo xtask bench`: started instead of the scenarios
//! when the kernel command line carries `kmod_monitor.bench=1`. It measures
//! detection latency per source against the floor (`kmod-monitor-floor`:
//! the same eBPF program drained by a bare poll(2) loop, run before and
//! after each daemon run), a storm's throughput and loss at the default
//! ring size, the daemon's footprint, and, with the `bench` build of the
//! daemon, where one event's time goes. Every measurement is repeated
//! (`kmod_monitor.bench_reps=N`, default 3) and each run reported on its
//! own; the host takes the medians. Everything goes out as one
//! `VMBENCH {json}` line. It reports figures only; the targets are checked
//! on the host.
use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    io::{BufRead as _, BufReader},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    api::Api, daemon::Daemon, hostile::SustainedFlood, kmod, more::boottime_ns, report::Report,
};

/// The required module cycled: small, loads in every TCG guest, part of
/// the V2 group (`--v2-data-engine`).
const MODULE: &str = "uio_pci_generic";
const V2: &str = "v2-data-engine";
/// How long to wait for one state change to show in /status.
const CHANGE_WITHIN: Duration = Duration::from_secs(5);
/// Events the footprint storm drives through the daemon.
const FOOTPRINT_EVENTS: u64 = 10_000;
/// The floor binary (`bench` feature) in the initramfs.
const FLOOR: &str = "/usr/bin/kmod-monitor-floor";
/// The daemon built with the `bench` feature (per-stage timestamps).
const BENCH_DAEMON: &str = "/usr/bin/kmod-monitor-bench";
/// Where the bench daemon writes its stage summary when it stops.
const STAGES_FILE: &str = "/tmp/kmod-monitor-stages.json";
/// How long after a load or unload returned the driver waits before it
/// looks for the result, the same for the floor and every daemon run: a
/// driver polling /status every few ms would compete with the daemon for
/// the guest's one vCPU (and its one event thread) and measure itself.
const SETTLE: Duration = Duration::from_millis(20);
/// How long the driver lets the consumer rest before each load or unload,
/// the same for the floor and every daemon run: the result was just read
/// from it (/status over HTTP from the daemon, a line from the floor), and
/// an event landing on the tail of serving that read would time the
/// driver's own request, not the consumer waking for the kernel.
const QUIET: Duration = Duration::from_millis(5);

/// How much to measure: `kmod_monitor.bench_reps=N` on the kernel command
/// line repeats everything N times (at least 1).
#[derive(Clone, Copy, Debug)]
struct Plan {
    reps: usize,
    /// Load/unload cycles per run of the floor and the eBPF daemon (two
    /// samples each): the runs `--check` judges the daemon against the
    /// floor by. [`percentiles`] takes the sample at round((n - 1) * q): a
    /// p99 of 200 samples is their third-worst, and moved by a third
    /// between runs of the same build; of 600 it is the seventh-worst.
    judged_cycles: usize,
    /// Load/unload cycles per run of uevent, under the flood and of the
    /// stage breakdown; two samples each.
    cycles: usize,
    /// Poll detects a change only at its next 1 s tick and each
    /// transition starts at a random phase, so each costs about a second.
    poll_cycles: usize,
    /// The idle window of each footprint run.
    idle: Duration,
}

impl Plan {
    fn from_cmdline() -> Self {
        let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let reps = cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("kmod_monitor.bench_reps="))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(3)
            .max(1);
        Self {
            reps,
            judged_cycles: 300,
            cycles: 100,
            poll_cycles: 20,
            idle: Duration::from_secs(30),
        }
    }
}
const EVENT_LOG: &str = "/tmp/kmod-monitor-bench.jsonl";
/// Flag of finit_module(2) for an .ko.xz/.ko.zst file (Linux 6.6+ with
/// CONFIG_MODULE_DECOMPRESS).
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

/// Runs the benchmark; returns whether it produced its figures.
pub fn run() -> bool {
    Report::plan(1);
    let start = Instant::now();
    let mut report = Report::default();
    match measure() {
        Ok(figures) => {
            println!("VMBENCH {figures}");
            report.pass("bench", start.elapsed());
        }
        Err(why) => report.fail("bench", &why, start.elapsed()),
    }
    report.done()
}

/// Whether /proc/cmdline asks for the benchmark.
pub fn wanted() -> bool {
    fs::read_to_string("/proc/cmdline")
        .is_ok_and(|c| c.split_whitespace().any(|w| w == "kmod_monitor.bench=1"))
}

fn start_daemon(api: &Api, source: &str, n: usize) -> Result<Daemon, String> {
    let log = PathBuf::from(format!("/tmp/kmod-monitor-bench.{n}.log"));
    Daemon::start(
        &[
            "--source",
            source,
            "--v2-data-engine",
            "--event-log",
            EVENT_LOG,
        ],
        log,
        api,
    )
}

/// p50, p90, p99 and max of `samples` (ms), sorted in place.
fn percentiles(samples: &mut [f64]) -> Value {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into a short sample list"
        )]
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).copied().unwrap_or(f64::NAN)
    };
    json!({
        "samples": samples.len(),
        "p50_ms": at(0.5),
        "p90_ms": at(0.9),
        "p99_ms": at(0.99),
        "max_ms": at(1.0),
    })
}

/// One load or unload timed: its latency, whether it was a load, and how
/// long its syscall took (a load's includes the module's init).
struct Sample {
    load: bool,
    syscall_ms: f64,
    latency_ms: f64,
}

/// How many of the worst samples a run lists, with their kind and syscall
/// time: where a tail comes from (a slow init, or loads or unloads only).
const WORST_LISTED: usize = 8;

/// [`percentiles`] of all `samples`, then of the loads and the unloads
/// alone, and the [`WORST_LISTED`] worst with their kind and syscall time.
fn summarise(samples: &[Sample]) -> Value {
    let of = |keep: &dyn Fn(&Sample) -> bool| {
        let mut v: Vec<f64> = samples
            .iter()
            .filter(|s| keep(s))
            .map(|s| s.latency_ms)
            .collect();
        percentiles(&mut v)
    };
    let mut out = of(&|_| true);
    out["loads"] = of(&|s| s.load);
    out["unloads"] = of(&|s| !s.load);
    let mut worst: Vec<&Sample> = samples.iter().collect();
    worst.sort_by(|a, b| b.latency_ms.total_cmp(&a.latency_ms));
    out["worst"] = worst
        .iter()
        .take(WORST_LISTED)
        .map(|s| {
            json!({
                "kind": if s.load { "load" } else { "unload" },
                "latency_ms": s.latency_ms,
                "syscall_ms": s.syscall_ms,
            })
        })
        .collect();
    let mut syscalls: Vec<f64> = samples
        .iter()
        .filter(|s| s.load)
        .map(|s| s.syscall_ms)
        .collect();
    out["load_syscall"] = percentiles(&mut syscalls);
    out
}

/// Nanoseconds as milliseconds, for a report.
#[expect(clippy::cast_precision_loss, reason = "milliseconds for a report")]
fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The poll source's default interval.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A uniformly random duration below `limit` (from /dev/urandom; zero if
/// it cannot be read).
fn random_below(limit: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    let _ = fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    let nanos = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX).max(1);
    Duration::from_nanos(u64::from_le_bytes(bytes) % nanos)
}

/// Waits until /status shows `MODULE` in `state` through an event applied
/// after `after_ns`; returns (event boot_ns, applied_ns).
fn wait_applied(api: &Api, state: &str, after_ns: u64) -> Result<(u64, u64), String> {
    let start = Instant::now();
    loop {
        let status = api.status()?;
        let m = status.module(V2, MODULE)?;
        if m.state == state
            && let Some(e) = &m.last_event
            && e.applied_ns > after_ns
        {
            return Ok((e.boot_ns, e.applied_ns));
        }
        if start.elapsed() > CHANGE_WITHIN {
            return Err(format!(
                "{MODULE} not {state} in /status within {} s: {}",
                CHANGE_WITHIN.as_secs(),
                status.summary()
            ));
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Detection latency of one source over `cycles` load/unload cycles, in
/// ms. The loads and unloads are direct finit_module/delete_module calls.
/// For eBPF the event time is the in-kernel timestamp. uevent and poll
/// carry none: for poll it is the guest's CLOCK_BOOTTIME right after the
/// syscall returned; the uevent is usually applied before the syscall
/// returns, so for uevent it is the time right before the syscall (an upper
/// bound that includes the load or unload itself).
fn latency(api: &Api, source: &str, cycles: usize) -> Result<Value, String> {
    kmod::ensure_unloaded(MODULE)?;
    let module = module_file()?;
    let daemon = start_daemon(api, source, 0)?;
    let samples = cycle_samples(api, source, &module, cycles)?;
    drop(daemon);
    let mut out = summarise(&samples);
    out["source"] = json!(source);
    out["cycles"] = json!(cycles);
    out["event_time"] = json!(match source {
        "ebpf" => "in-kernel event timestamp (last_event.boot_ns)",
        "uevent" => "guest CLOCK_BOOTTIME before the syscall (upper bound)",
        _ => "guest CLOCK_BOOTTIME after the syscall returned",
    });
    Ok(out)
}

/// The samples of [`latency`]: `cycles` load/unload cycles of `MODULE`
/// against the running daemon of `source`, in ms.
fn cycle_samples(
    api: &Api,
    source: &str,
    module: &(PathBuf, u32),
    cycles: usize,
) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::with_capacity(cycles * 2);
    for _ in 0..cycles {
        for (state, load) in [("loaded", true), ("available", false)] {
            if source == "poll" {
                // Out of phase with the poll tick, which the previous
                // change was detected on: otherwise every sample would wait
                // almost the whole interval.
                thread::sleep(random_below(POLL_INTERVAL));
            }
            thread::sleep(QUIET);
            let before = boottime_ns();
            if load {
                finit_module(module)?;
            } else {
                delete_module()?;
            }
            let returned = boottime_ns();
            thread::sleep(SETTLE);
            let (event_ns, applied_ns) = wait_applied(api, state, before)?;
            let from = match source {
                "ebpf" => event_ns,
                "uevent" => before,
                _ => returned,
            };
            samples.push(Sample {
                load,
                syscall_ms: ms(returned.saturating_sub(before)),
                latency_ms: ms(applied_ns.saturating_sub(from)),
            });
        }
    }
    Ok(samples)
}

/// The module's file and the finit_module flags it needs.
pub fn module_file() -> Result<(PathBuf, u32), String> {
    let release = kmod::kernel_release()?;
    let root = PathBuf::from(format!("/lib/modules/{release}"));
    let dep = fs::read_to_string(root.join("modules.dep"))
        .map_err(|e| format!("reading modules.dep: {e}"))?;
    let rel = dep
        .lines()
        .filter_map(|l| l.split_once(':').map(|(f, _)| f))
        .find(|f| {
            f.rsplit('/')
                .next()
                .and_then(|n| n.split('.').next())
                .is_some_and(|n| n.replace('-', "_") == MODULE)
        })
        .ok_or_else(|| format!("{MODULE} not in modules.dep"))?;
    let path = root.join(rel);
    if rel.ends_with(".ko") {
        return Ok((path, 0));
    }
    // Decompressing in the kernel on every load costs tens of ms under
    // TCG; busybox xzcat does it once.
    let plain = PathBuf::from(format!("/tmp/{MODULE}.ko"));
    if rel.ends_with(".ko.xz") {
        let out = std::process::Command::new("xzcat")
            .arg(&path)
            .output()
            .map_err(|e| format!("running xzcat {}: {e}", path.display()))?;
        if out.status.success() {
            fs::write(&plain, &out.stdout)
                .map_err(|e| format!("writing {}: {e}", plain.display()))?;
            return Ok((plain, 0));
        }
    }
    Ok((path, MODULE_INIT_COMPRESSED_FILE))
}

/// finit_module(2) of `MODULE`'s file. Its dependency `uio` must be
/// loaded.
pub fn finit_module((path, flags): &(PathBuf, u32)) -> Result<(), String> {
    let empty = CString::default();
    let file = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: a valid fd, a NUL-terminated empty parameter string and
    // plain flags; the kernel copies what it reads.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            empty.as_ptr(),
            *flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(format!(
            "finit_module({}): {}",
            path.display(),
            std::io::Error::last_os_error()
        ))
    }
}

/// delete_module(2) of `MODULE`.
pub fn delete_module() -> Result<(), String> {
    let name = CString::new(MODULE).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated module name and O_NONBLOCK.
    let r = unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), libc::O_NONBLOCK) };
    if r == 0 {
        Ok(())
    } else {
        Err(format!(
            "delete_module({MODULE}): {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// Loads and unloads `MODULE` with raw syscalls, `cycles` times, as fast
/// as the guest allows (no process per load).
fn storm(cycles: usize) -> Result<(), String> {
    let module = module_file()?;
    for _ in 0..cycles {
        finit_module(&module)?;
        delete_module()?;
    }
    Ok(())
}

/// Waits until `received` stops growing; returns the last /status.
fn drained(api: &Api) -> Result<crate::status::Status, String> {
    let mut last = api.status()?;
    loop {
        thread::sleep(Duration::from_millis(200));
        let now = api.status()?;
        if now.events.received == last.events.received {
            return Ok(now);
        }
        last = now;
    }
}

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, String> {
    proc_status_kib(pid, "VmRSS")
}

/// A KiB line of `/proc/PID/status` (`VmRSS`, `VmHWM`).
fn proc_status_kib(pid: u32, field: &str) -> Result<u64, String> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))
}

/// utime + stime of `pid` (all threads) in clock ticks (100 Hz).
fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("reading /proc/{pid}/stat: {e}"))?;
    let after_comm = text.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat; index 0 here is field 3 (state).
    let get = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/stat field {} unreadable", i + 3))
    };
    Ok(get(11)? + get(12)?)
}

/// Context switches summed over every thread: (voluntary, involuntary),
/// and the voluntary ones per thread (`TID name`).
type Switches = ((u64, u64), BTreeMap<String, u64>);

/// [`Switches`] of every thread of `pid`, so the report can say which
/// thread woke.
fn ctxt_switches(pid: u32) -> Result<Switches, String> {
    let dir = format!("/proc/{pid}/task");
    let mut sum = (0, 0);
    let mut per_thread = BTreeMap::new();
    for entry in fs::read_dir(&dir).map_err(|e| format!("listing {dir}: {e}"))? {
        let entry = entry.map_err(|e| format!("listing {dir}: {e}"))?;
        let Ok(text) = fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let mut name = String::new();
        for line in text.lines() {
            let value = |p: &str| {
                line.strip_prefix(p)
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let Some(n) = line.strip_prefix("Name:") {
                name = n.trim().to_owned();
            } else if let Some(v) = value("voluntary_ctxt_switches:") {
                sum.0 += v;
                per_thread.insert(format!("{} {name}", entry.file_name().to_string_lossy()), v);
            } else if let Some(v) = value("nonvoluntary_ctxt_switches:") {
                sum.1 += v;
            }
        }
    }
    Ok((sum, per_thread))
}

/// The voluntary switches each thread made between two looks (threads
/// that made none left out; a thread gone by the second look is not
/// counted, one new by then counts all of its own).
fn switches_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(t, n)| {
            (
                t.clone(),
                n.saturating_sub(before.get(t).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// run_time_ns and run_cnt of every BPF program fd the daemon holds.
fn bpf_stats(pid: u32) -> Result<Value, String> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut progs = Vec::new();
    let (mut time, mut count) = (0u64, 0u64);
    for entry in fs::read_dir(&dir).map_err(|e| format!("listing {dir}: {e}"))? {
        let entry = entry.map_err(|e| format!("listing {dir}: {e}"))?;
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_owned())
        };
        let (Some(id), Some(t), Some(n)) = (
            field("prog_id:"),
            field("run_time_ns:").and_then(|v| v.parse::<u64>().ok()),
            field("run_cnt:").and_then(|v| v.parse::<u64>().ok()),
        ) else {
            continue;
        };
        time += t;
        count += n;
        progs.push(json!({"prog_id": id, "run_time_ns": t, "run_cnt": n}));
    }
    progs.sort_by_key(|p| p["prog_id"].as_str().map(str::to_owned));
    progs.dedup();
    #[expect(clippy::cast_precision_loss, reason = "a mean for a report")]
    let per_run = if count == 0 {
        f64::NAN
    } else {
        time as f64 / count as f64
    };
    Ok(json!({"programs": progs, "run_time_ns": time, "run_cnt": count, "ns_per_run": per_run}))
}

/// Storm throughput and loss at the default ring size, then the footprint.
/// Its requests go through a client of its own, closed before the idle
/// window: a keep-alive connection left open would have the daemon wake
/// to close it (its idle timeout, 10 s) inside the window, the driver's
/// doing rather than the daemon's.
fn storm_and_footprint(idle: Duration) -> Result<Value, String> {
    let client = Api::new();
    let api = &client;
    // Stats accumulate only while enabled.
    fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .map_err(|e| format!("enabling kernel.bpf_stats_enabled: {e}"))?;
    kmod::modprobe(MODULE)?;
    kmod::rmmod(MODULE)?;
    let daemon = start_daemon(api, "ebpf", 1)?;
    let pid = daemon.pid();
    thread::sleep(Duration::from_secs(1));
    let rss_start = rss_kib(pid)?;
    // What it is made of: the daemon's own memory, and what it maps: the
    // binary's pages (shmem here, the initramfs being tmpfs; file pages on
    // a disk) and the BPF maps it mmaps (the ring buffer, its data pages
    // mapped twice, and the mmapable arrays), which the kernel counts as
    // file pages. Named `binary` after the bigger part.
    let rss_start_anon = proc_status_kib(pid, "RssAnon")?;
    let rss_start_binary = proc_status_kib(pid, "RssFile")? + proc_status_kib(pid, "RssShmem")?;

    // The storm: back-to-back finit_module/delete_module.
    let before = api.status()?;
    let cycles = 500;
    let t0 = Instant::now();
    storm(cycles)?;
    let offered = t0.elapsed();
    let after = drained(api)?;
    let handled_in = t0.elapsed().saturating_sub(Duration::from_millis(200));
    let received = after.events.received - before.events.received;
    let lost = after.events.lost - before.events.lost;

    // Up to FOOTPRINT_EVENTS events in total, then RSS again.
    let per_cycle = (received / cycles as u64).max(1);
    let more = FOOTPRINT_EVENTS.saturating_sub(after.events.received) / per_cycle + 1;
    storm(usize::try_from(more).unwrap_or(usize::MAX))?;
    let footprint = drained(api)?;
    let rss_after = rss_kib(pid)?;
    let stats = bpf_stats(pid)?;

    // Idle: nobody scrapes, and no connection is left open (the daemon
    // sees this one close before the window starts).
    drop(client);
    thread::sleep(Duration::from_millis(200));
    let (cpu0, (sw0, threads0)) = (cpu_ticks(pid)?, ctxt_switches(pid)?);
    thread::sleep(idle);
    let (cpu1, (sw1, threads1)) = (cpu_ticks(pid)?, ctxt_switches(pid)?);
    let idle_s = idle.as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "rates for a report")]
    let figures = json!({
        "storm": {
            "cycles": cycles,
            "offered_s": offered.as_secs_f64(),
            "offered_events_per_s": received as f64 / offered.as_secs_f64(),
            "events_received": received,
            "events_lost": lost,
            "handled_events_per_s": received as f64 / handled_in.as_secs_f64(),
            "ring_buffer_bytes": 262_144,
        },
        "footprint": {
            "rss_start_kib": rss_start,
            "rss_start_anon_kib": rss_start_anon,
            "rss_start_binary_kib": rss_start_binary,
            "rss_after_events_kib": rss_after,
            "events_at_rss_after": footprint.events.received,
            "idle_window_s": idle_s,
            "idle_cpu_ticks": cpu1 - cpu0,
            "idle_cpu_percent": (cpu1 - cpu0) as f64 / 100.0 / idle_s * 100.0,
            "idle_voluntary_switches": sw1.0.saturating_sub(sw0.0),
            "idle_involuntary_switches": sw1.1.saturating_sub(sw0.1),
            "idle_voluntary_switches_by_thread": switches_between(&threads0, &threads1),
            "idle_wakeups_per_s": sw1.0.saturating_sub(sw0.0) as f64 / idle_s,
            "bpf": stats,
        },
    });
    drop(daemon);
    Ok(figures)
}

/// Flooders doing the `unprivileged-flood` scenario's rounds: a refused
/// unload of dm_crypt and an exec of an unknown binary format. Each exec
/// waits for the kernel's usermode `modprobe binfmt-cafe`, so one such
/// flooder leaves the guest's one vCPU idle while it waits; two overlap.
const FLOOD_ROUND_PROCS: usize = 2;
/// Flooders doing refused unloads alone, as fast as the syscall goes: what
/// the guest can produce at most, past the kernel's limit of 20 a second
/// per CPU (the rest are counted in the kernel).
const FLOOD_UNLOAD_PROCS: usize = 1;
/// The flood alone, before the detection cycles start: the window of the
/// daemon's CPU under the flood with no other work.
const FLOOD_ALONE: Duration = Duration::from_secs(10);

/// The forensic log's size now (0 before it exists).
fn event_log_bytes() -> u64 {
    fs::metadata(EVENT_LOG).map_or(0, |m| m.len())
}

/// Bytes of the forensic log's records from at or after `since_ns` whose
/// actor is `uid`.
fn event_log_bytes_of(uid: u32, since_ns: u64) -> u64 {
    let text = fs::read_to_string(EVENT_LOG).unwrap_or_default();
    text.lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|r| {
                r["boot_ns"].as_u64().is_some_and(|t| t >= since_ns)
                    && r["actor"]["uid"].as_u64() == Some(u64::from(uid))
            })
        })
        .map(|l| l.len() as u64 + 1)
        .sum()
}

/// The daemon (eBPF, as started for [`latency`]) under issue 11's
/// unprivileged flood, sustained as uid 1000 by [`FLOOD_ROUND_PROCS`] +
/// [`FLOOD_UNLOAD_PROCS`] flooders: [`FLOOD_ALONE`] of the flood alone,
/// then `cycles` load/unload cycles of `MODULE` timed exactly as
/// [`latency`] times them, with the flood going on. Reports what the
/// flooders did, what the daemon accounted for and lost, its CPU (over the
/// flood alone, and over the whole flood), its RSS and what the forensic
/// log gained.
fn under_flood(api: &Api, cycles: usize) -> Result<Value, String> {
    kmod::ensure_unloaded(MODULE)?;
    let module = module_file()?;
    let mut daemon = start_daemon(api, "ebpf", 2)?;
    let pid = daemon.pid();
    thread::sleep(Duration::from_secs(1));
    let rss_before = rss_kib(pid)?;
    let peak_before = proc_status_kib(pid, "VmHWM")?;
    let log_before = event_log_bytes();
    let before = api.status()?;
    let start_ns = boottime_ns();
    let mut flood = SustainedFlood::start(FLOOD_ROUND_PROCS, FLOOD_UNLOAD_PROCS)?;
    let (start, cpu_start) = (Instant::now(), cpu_ticks(pid)?);
    thread::sleep(FLOOD_ALONE);
    let (alone, cpu_alone) = (start.elapsed(), cpu_ticks(pid)?);
    let samples = cycle_samples(api, "ebpf", &module, cycles)?;
    let rss_end = rss_kib(pid)?;
    let done = flood.stop()?;
    let wall = start.elapsed();
    let cpu_end = cpu_ticks(pid)?;
    // The kernel's filter counters reach /status when the daemon next
    // publishes: one more cycle, after the flood, makes it publish.
    for (state, load) in [("loaded", true), ("available", false)] {
        let at = boottime_ns();
        if load {
            finit_module(&module)?;
        } else {
            delete_module()?;
        }
        wait_applied(api, state, at)?;
    }
    let after = drained(api)?;
    let peak_after = proc_status_kib(pid, "VmHWM")?;
    let log_after = event_log_bytes();
    // SIGTERM flushes the refusal windows still open into the log.
    daemon.terminate(Duration::from_secs(10))?;
    let log_flood = event_log_bytes_of(crate::hostile::USER, start_ns);
    let filtered = |s: &crate::status::Status| {
        s.events.kernel_filtered.map_or((0, 0), |f| {
            (f.unload_denied_over_limit, f.requests_untracked)
        })
    };
    let (over_limit0, untracked0) = filtered(&before);
    let (over_limit1, untracked1) = filtered(&after);
    let reported = after
        .events
        .unload_denied
        .saturating_sub(before.events.unload_denied);
    let over_limit = over_limit1.saturating_sub(over_limit0);
    let denied_accounted = reported + over_limit;
    let requests_accounted = untracked1.saturating_sub(untracked0);
    let reserve_failed =
        |s: &crate::status::Status| s.events.kernel_lost.map_or(0, |l| l.ring_reserve_failed);
    let secs = wall.as_secs_f64();
    let produced = done.denied + done.noexec;
    let accounted = denied_accounted + requests_accounted;
    let signed = |a: u64, b: u64| {
        i64::try_from(a)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(b).unwrap_or(i64::MAX))
    };
    let percent = |ticks: u64, over: Duration| {
        #[expect(clippy::cast_precision_loss, reason = "a percentage for a report")]
        let t = ticks as f64;
        t / 100.0 / over.as_secs_f64() * 100.0
    };
    let mut latency = summarise(&samples);
    latency["cycles"] = json!(cycles);
    #[expect(clippy::cast_precision_loss, reason = "rates for a report")]
    Ok(json!({
        "flooders": FLOOD_ROUND_PROCS + FLOOD_UNLOAD_PROCS,
        "flooders_rounds": FLOOD_ROUND_PROCS,
        "flooders_unloads_only": FLOOD_UNLOAD_PROCS,
        "uid": crate::hostile::USER,
        "wall_s": secs,
        "alone_s": alone.as_secs_f64(),
        "refused_unloads": done.denied,
        "binfmt_requests": done.noexec,
        "events_per_s": produced as f64 / secs,
        "refused_unloads_reported": reported,
        "refused_unloads_over_limit": over_limit,
        "refused_unloads_accounted": denied_accounted,
        "binfmt_requests_accounted": requests_accounted,
        "absorbed_per_s": accounted as f64 / secs,
        "refused_unloads_unaccounted": signed(done.denied, denied_accounted),
        "binfmt_requests_unaccounted": signed(done.noexec, requests_accounted),
        "events_lost": after.events.lost.saturating_sub(before.events.lost),
        "ring_reserve_failed": reserve_failed(&after).saturating_sub(reserve_failed(&before)),
        "daemon_cpu_ticks_alone": cpu_alone.saturating_sub(cpu_start),
        "daemon_cpu_percent_alone": percent(cpu_alone.saturating_sub(cpu_start), alone),
        "daemon_cpu_ticks": cpu_end.saturating_sub(cpu_start),
        "daemon_cpu_percent": percent(cpu_end.saturating_sub(cpu_start), wall),
        "rss_before_kib": rss_before,
        "rss_end_kib": rss_end,
        "rss_peak_before_kib": peak_before,
        "rss_peak_kib": peak_after,
        "event_log_growth_bytes": log_after.saturating_sub(log_before),
        "event_log_flood_bytes": log_flood,
        "latency": latency,
    }))
}

/// The floor: `kmod-monitor-floor` (the daemon's eBPF program, drained by
/// a bare poll(2) loop) over `cycles` load/unload cycles, paced exactly as
/// [`latency`] paces the daemon. The samples are the records the daemon's
/// state changes come from: the load syscall's exit with 0 (`loaded`) and
/// `module_free` (`available`); each is the time from the record's
/// in-kernel timestamp to the moment the floor took it from the ring.
fn floor(cycles: usize) -> Result<Value, String> {
    kmod::ensure_unloaded(MODULE)?;
    let module = module_file()?;
    let mut floor = Floor::start()?;
    let mut samples = Vec::with_capacity(cycles * 2);
    for _ in 0..cycles {
        for (kind, load) in [(KIND_LOAD_RESULT, true), (KIND_FREE, false)] {
            thread::sleep(QUIET);
            let before = boottime_ns();
            if load {
                finit_module(&module)?;
            } else {
                delete_module()?;
            }
            let returned = boottime_ns();
            thread::sleep(SETTLE);
            let (boot_ns, taken_ns) = floor.wait_for(kind, before)?;
            samples.push(Sample {
                load,
                syscall_ms: ms(returned.saturating_sub(before)),
                latency_ms: ms(taken_ns.saturating_sub(boot_ns)),
            });
        }
    }
    let lost = floor.stop()?;
    let mut out = summarise(&samples);
    out["source"] = json!("floor");
    out["cycles"] = json!(cycles);
    out["events_lost"] = json!(lost);
    out["event_time"] =
        json!("in-kernel event timestamp; taken = CLOCK_BOOTTIME when the record left the ring");
    Ok(out)
}

/// `EventKind::LoadResult` and `EventKind::Free` (monitor-common).
const KIND_LOAD_RESULT: u32 = 4;
const KIND_FREE: u32 = 2;

/// A running `kmod-monitor-floor` and the lines it prints.
struct Floor {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Floor {
    /// Starts the floor and waits until it has attached.
    fn start() -> Result<Self, String> {
        let mut child = Command::new(FLOOR)
            .args(["--track", MODULE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {FLOOR}: {e}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| format!("{FLOOR}: no stdout"))?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut floor = Self { child, lines };
        match floor.next_line(Duration::from_secs(60))? {
            l if l == "FLOOR READY" => Ok(floor),
            l => Err(format!("{FLOOR} said {l:?} instead of FLOOR READY")),
        }
    }

    fn next_line(&mut self, within: Duration) -> Result<String, String> {
        self.lines.recv_timeout(within).map_err(|e| {
            let status = self.child.try_wait().ok().flatten();
            format!(
                "{FLOOR}: no line within {} s ({e}; exit status {status:?})",
                within.as_secs()
            )
        })
    }

    /// The (event, taken) times of the next `MODULE` record of `kind`
    /// (with a return value of 0) from after `after_ns`.
    fn wait_for(&mut self, kind: u32, after_ns: u64) -> Result<(u64, u64), String> {
        let start = Instant::now();
        loop {
            let left = CHANGE_WITHIN.saturating_sub(start.elapsed());
            let line = self.next_line(left)?;
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_, k, ret, name, boot, taken] = f.as_slice() else {
                continue;
            };
            let (Ok(k), Ok(boot), Ok(taken)) =
                (k.parse::<u32>(), boot.parse::<u64>(), taken.parse::<u64>())
            else {
                continue;
            };
            if k == kind && *ret == "0" && *name == MODULE && boot > after_ns {
                return Ok((boot, taken));
            }
        }
    }

    /// Closes the floor's stdin, which stops it; returns the ring's loss
    /// count it reported.
    fn stop(mut self) -> Result<u64, String> {
        drop(self.child.stdin.take());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let Ok(line) = self.next_line(Duration::from_secs(10)) else {
                break;
            };
            if let Some(n) = line.strip_prefix("FLOOR LOST ") {
                let _ = self.child.wait();
                return n
                    .trim()
                    .parse()
                    .map_err(|e| format!("FLOOR LOST {n:?}: {e}"));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Err(format!("{FLOOR} did not stop when its stdin closed"))
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where one event's time goes: the `bench` build of the daemon over
/// `cycles` cycles, then SIGTERM, on which it writes its stage summary.
fn stages(api: &Api, cycles: usize) -> Result<Value, String> {
    kmod::ensure_unloaded(MODULE)?;
    let module = module_file()?;
    let _ = fs::remove_file(STAGES_FILE);
    let mut daemon = Daemon::start_binary(
        BENCH_DAEMON,
        &[
            "--source",
            "ebpf",
            "--v2-data-engine",
            "--event-log",
            EVENT_LOG,
        ],
        &[("KMOD_MONITOR_BENCH_STAGES", STAGES_FILE)],
        PathBuf::from("/tmp/kmod-monitor-bench.stages.log"),
        api,
    )?;
    for _ in 0..cycles {
        for (state, load) in [("loaded", true), ("available", false)] {
            thread::sleep(QUIET);
            let before = boottime_ns();
            if load {
                finit_module(&module)?;
            } else {
                delete_module()?;
            }
            thread::sleep(SETTLE);
            wait_applied(api, state, before)?;
        }
    }
    daemon.terminate(Duration::from_secs(10))?;
    let text = fs::read_to_string(STAGES_FILE)
        .map_err(|e| format!("the bench daemon wrote no {STAGES_FILE}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("{STAGES_FILE}: {e}"))
}

fn measure() -> Result<Value, String> {
    let plan = Plan::from_cmdline();
    Report::note(&format!("bench: {plan:?}"));
    let api = Api::new();
    // Loads the dependency uio, which the raw finit_module calls need.
    kmod::modprobe(MODULE)?;
    let mut latencies = Vec::new();
    let mut timed = |what: &str, run: usize, l: Result<Value, String>| -> Result<(), String> {
        let mut l = l?;
        l["run"] = json!(run);
        Report::note(&format!("bench: {what} run {run}: {l}"));
        latencies.push(l);
        Ok(())
    };
    // The floor before and after every daemon run, in the same guest.
    for run in 0..plan.reps {
        timed("floor", run, floor(plan.judged_cycles))?;
        timed("ebpf", run, latency(&api, "ebpf", plan.judged_cycles))?;
    }
    timed("floor", plan.reps, floor(plan.judged_cycles))?;
    for run in 0..plan.reps {
        timed("uevent", run, latency(&api, "uevent", plan.cycles))?;
    }
    for run in 0..plan.reps {
        timed("poll", run, latency(&api, "poll", plan.poll_cycles))?;
    }
    let mut floods = Vec::new();
    for run in 0..plan.reps {
        let mut flood = under_flood(&api, plan.cycles)?;
        flood["run"] = json!(run);
        Report::note(&format!("bench: under a flood run {run}: {flood}"));
        floods.push(flood);
    }
    let mut storms = Vec::new();
    let mut footprints = Vec::new();
    for run in 0..plan.reps {
        let rest = storm_and_footprint(plan.idle)?;
        Report::note(&format!("bench: storm and footprint run {run}: {rest}"));
        storms.push(rest["storm"].clone());
        footprints.push(rest["footprint"].clone());
    }
    let stages = stages(&api, plan.cycles)?;
    kmod::ensure_unloaded(MODULE)?;
    Ok(json!({
        "kernel": kmod::kernel_release()?,
        "module": MODULE,
        "reps": plan.reps,
        "settle_ms": SETTLE.as_secs_f64() * 1e3,
        "latency": latencies,
        "storm": storms,
        "footprint": footprints,
        "flood": floods,
        "stages": stages,
    }))
}
