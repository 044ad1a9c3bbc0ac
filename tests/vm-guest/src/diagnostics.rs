//! The eBPF program's own diagnostics: with a layout field the loader left
//! unset on purpose (`KMOD_MONITOR_TEST_UNSET_LAYOUT=free_name`), every
//! `module_free` the kernel fires must be dropped by the program, counted
//! (`/status` `events.kernel_lost.layout_unset`, `events.lost`, and the
//! same in /metrics) exactly as often as tracefs saw the tracepoint fire,
//! and said in the daemon's log through aya-log, under the target
//! `kmod_monitor::ebpf`, at most once a second per CPU.
use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::{
    Outcome,
    api::POLL_EVERY,
    ensure, kmod,
    more::metric,
    report::Report,
    scenarios::Guest,
    status::{KernelLost, Status},
};

/// The loader's test hook and the field it leaves unset.
const UNSET_VAR: &str = "KMOD_MONITOR_TEST_UNSET_LAYOUT";
const UNSET_FIELD: &str = "free_name";
/// Small, loads in any guest, and required (V2), so its state is checked.
const MODULE: &str = "uio_pci_generic";
const V2: &str = "v2-data-engine";
/// Load/unload cycles: each rmmod fires one `module_free`.
const CYCLES: usize = 4;
/// How long the daemon may take to count and log what the kernel dropped.
const WITHIN: Duration = Duration::from_secs(10);
/// The tracing target of the program's lines.
const TARGET: &str = "kmod_monitor::ebpf";
/// A tracefs instance of this scenario's own, so the global trace buffer
/// is left alone.
const INSTANCE: &str = "/sys/kernel/tracing/instances/kmod-monitor-diagnostics";

/// A tracefs instance with `module:module_free` enabled; removed on drop.
struct FreeTrace {
    dir: PathBuf,
}

impl FreeTrace {
    fn start() -> Result<Self, String> {
        let dir = PathBuf::from(INSTANCE);
        if !dir.is_dir() {
            fs::create_dir(&dir).map_err(|e| format!("creating {INSTANCE}: {e}"))?;
        }
        let trace = Self { dir };
        trace.write("events/module/module_free/enable", "1")?;
        trace.write("trace", "")?;
        Ok(trace)
    }

    fn write(&self, file: &str, value: &str) -> Outcome {
        let path = self.dir.join(file);
        fs::write(&path, value).map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
    }

    /// `module_free` firings recorded since [`start`](Self::start).
    fn frees(&self) -> Result<usize, String> {
        let path = self.dir.join("trace");
        let text =
            fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(" module_free: "))
            .count())
    }
}

impl Drop for FreeTrace {
    fn drop(&mut self) {
        let _ = self.write("events/module/module_free/enable", "0");
        let _ = fs::remove_dir(&self.dir);
    }
}

/// The messages of the daemon's JSON log lines under [`TARGET`], with
/// their levels.
fn ebpf_lines(log: &Path) -> Result<Vec<(String, String)>, String> {
    let text = fs::read_to_string(log).map_err(|e| format!("reading {}: {e}", log.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == TARGET)
        .map(|v| {
            (
                v["level"].as_str().unwrap_or_default().to_owned(),
                v["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// Online CPUs, from the kernel's list (`0`, `0-1`, `0,2-3`).
pub fn online_cpus() -> Result<usize, String> {
    let path = "/sys/devices/system/cpu/online";
    let text = fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    let mut n = 0;
    for range in text.trim().split(',') {
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        let a: usize = a.parse().map_err(|e| format!("{path}: {range:?}: {e}"))?;
        let b: usize = b.parse().map_err(|e| format!("{path}: {range:?}: {e}"))?;
        n += b + 1 - a;
    }
    Ok(n)
}

/// Waits until `/status` counts `want` dropped `module_free`s and tracks
/// [`MODULE`] as unloaded again.
fn wait_counted(g: &Guest, want: u64) -> Result<Status, String> {
    let start = Instant::now();
    loop {
        let status = g.api().status()?;
        let counted = status.events.kernel_lost.map(|k| k.layout_unset);
        let unloaded = status.state(V2, MODULE)? == "available";
        if (counted == Some(want) && unloaded) || start.elapsed() > WITHIN {
            return Ok(status);
        }
        thread::sleep(POLL_EVERY);
    }
}

/// Loads with `free_name` unset: each `module_free` is dropped, counted
/// and logged (rate-limited) through aya-log as `kmod_monitor::ebpf`.
pub fn layout_unset_is_logged_and_counted(g: &mut Guest) -> Outcome {
    g.stop_daemon();
    kmod::ensure_unloaded(MODULE)?;
    let before = g.start_daemon_env(
        "ebpf",
        &["--log-format", "json", "--reconcile-interval", "3600"],
        &[(UNSET_VAR, UNSET_FIELD)],
    )?;
    let log = g.daemon_log().ok_or("no daemon running")?;
    let hook = format!("TEST: layout field {UNSET_FIELD} left unset on purpose ({UNSET_VAR})");
    ensure!(
        before.source.details.contains(&hook),
        "/status source.details do not say that the layout was broken on purpose ({hook:?}): {:?}",
        before.source.details
    );
    let zero = KernelLost {
        ring_reserve_failed: 0,
        name_unreadable: 0,
        layout_unset: 0,
    };
    ensure!(
        before.events.kernel_lost == Some(zero) && before.events.lost == 0,
        "before any module_free: events.kernel_lost {:?}, events.lost {}",
        before.events.kernel_lost,
        before.events.lost
    );

    let trace = FreeTrace::start()?;
    let start = Instant::now();
    for _ in 0..CYCLES {
        kmod::modprobe(MODULE)?;
        kmod::rmmod(MODULE)?;
    }
    let took = start.elapsed();
    let frees = trace.frees()?;
    drop(trace);
    ensure!(
        frees >= CYCLES,
        "tracefs saw {frees} module_free in {CYCLES} load/unload cycles of {MODULE}"
    );
    let frees = u64::try_from(frees).map_err(|e| e.to_string())?;

    // Counted exactly, as a loss, and nothing else lost or undecodable.
    let status = wait_counted(g, frees)?;
    let want = KernelLost {
        layout_unset: frees,
        ..zero
    };
    ensure!(
        status.events.kernel_lost == Some(want),
        "events.kernel_lost is {:?} {} s after {frees} module_free (tracefs) with {UNSET_FIELD} unset; expected {want:?}",
        status.events.kernel_lost,
        WITHIN.as_secs()
    );
    ensure!(
        status.events.lost == frees && status.events.undecodable == 0,
        "events.lost {} (expected {frees}), events.undecodable {} (expected 0)",
        status.events.lost,
        status.events.undecodable
    );
    let metrics = g.api().metrics()?;
    for (series, want) in [
        (
            "kmod_monitor_kernel_lost_total{reason=\"layout_unset\"}",
            frees,
        ),
        (
            "kmod_monitor_kernel_lost_total{reason=\"name_unreadable\"}",
            0,
        ),
        (
            "kmod_monitor_kernel_lost_total{reason=\"ring_reserve_failed\"}",
            0,
        ),
        ("kmod_monitor_events_lost_total", frees),
    ] {
        let have = metric(&metrics, series);
        #[expect(
            clippy::cast_precision_loss,
            reason = "a handful of events, far below 2^53"
        )]
        let want = want as f64;
        ensure!(
            have == Some(want),
            "/metrics {series} is {have:?}, expected {want}"
        );
    }
    // The loss made the daemon reconcile: the unload it did not see is
    // tracked anyway.
    ensure!(
        status.state(V2, MODULE)? == "available" && !kmod::listed(MODULE)?,
        "{MODULE} is unloaded but tracked as {}",
        status.state(V2, MODULE)?
    );

    // Said in the log, under the program's target, and rate-limited.
    let needle = format!("layout field {UNSET_FIELD} is not set");
    let wait = Instant::now();
    let lines = loop {
        let lines: Vec<(String, String)> = ebpf_lines(&log)?
            .into_iter()
            .filter(|(_, m)| m.contains(&needle))
            .collect();
        if !lines.is_empty() || wait.elapsed() > WITHIN {
            break lines;
        }
        thread::sleep(POLL_EVERY);
    };
    ensure!(
        !lines.is_empty(),
        "no log line with target {TARGET} containing {needle:?} in {}",
        log.display()
    );
    ensure!(
        lines.iter().all(|(level, _)| level == "ERROR"),
        "the lines under {TARGET} are not at level ERROR: {lines:?}"
    );
    // One line per second per CPU at most: the cycles took `took`.
    let cpus = online_cpus()?;
    let seconds = usize::try_from(took.as_secs()).map_err(|e| e.to_string())? + 1;
    let most = (seconds * cpus).min(usize::try_from(frees).map_err(|e| e.to_string())?);
    ensure!(
        lines.len() <= most,
        "{} lines under {TARGET} for {frees} drops in {took:?} on {cpus} CPU(s): the limit allows {most}: {lines:?}",
        lines.len()
    );
    let sizes = status
        .source
        .details
        .iter()
        .find(|d| d.starts_with("program instructions: "))
        .cloned()
        .unwrap_or_default();
    Report::note(&format!(
        "ebpf-diagnostics: {frees} module_free dropped with {UNSET_FIELD} unset in {took:?}: counted {frees}, \
         {} line(s) under {TARGET}: {:?}; {sizes}",
        lines.len(),
        lines.first().map(|(_, m)| m.as_str()).unwrap_or_default()
    ));
    g.stop_daemon();
    Ok(())
}
