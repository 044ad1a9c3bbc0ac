//! Loss must never be silent: with the smallest ring buffer (one page,
//! about 26 records) a load/unload storm overflows it, and the daemon must
//! count the loss in /metrics, reconcile at once (not at the reconcile
//! interval), end with the kernel's real state, write an `events_lost`
//! record and raise the `KernelModuleMonitorEventsLost` alert.
//!
//! The daemon is SIGSTOPped for the storm and SIGCONTed after it: a
//! stopped consumer is the slowest consumer there is, so the overflow is
//! certain instead of depending on how the TCG guest schedules the storm
//! against the daemon's event loop. The eBPF program keeps running in the
//! kernel meanwhile, exactly as it would behind a stalled daemon.
use std::{
    process::Command,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal, kill_process};

use crate::{
    Outcome,
    api::POLL_EVERY,
    daemon::BINARY,
    ensure, kmod,
    more::{EVENT_LOG, boottime_ns, metric},
    report::Report,
    scenarios::Guest,
};

/// Where this scenario's stand-in Alertmanager listens (more.rs's receiver
/// keeps 9093 for the rest of the guest's life).
const RECEIVER: &str = "127.0.0.1:9095";
/// The module stormed: small, loads in any TCG guest, and required by the
/// V2 group, so its final state is checked.
const STORM_MODULE: &str = "uio_pci_generic";
/// Load/unload cycles while the daemon is stopped: about 4 events each
/// (module_load, module_free, get/put), far beyond one page of ring.
const STORM_CYCLES: usize = 40;
const V2: &str = "v2-data-engine";
/// How soon after SIGCONT the loss must be handled; the reconcile interval
/// is an hour, so a reconcile within this is the immediate one.
const HANDLED_WITHIN: Duration = Duration::from_secs(10);

/// Starts a receiver that sends on the channel when a POST to
/// /api/v2/alerts carries a `KernelModuleMonitorEventsLost` alert.
fn spawn_receiver() -> Result<mpsc::Receiver<serde_json::Value>, String> {
    let server =
        tiny_http::Server::http(RECEIVER).map_err(|e| format!("listening on {RECEIVER}: {e}"))?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for mut request in server.incoming_requests() {
            let mut body = String::new();
            let _ = std::io::Read::read_to_string(request.as_reader(), &mut body);
            let to_alerts = request.url() == "/api/v2/alerts";
            let _ = request.respond(tiny_http::Response::empty(200));
            let lost = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .into_iter()
                .find(|a| a["labels"]["alertname"] == "KernelModuleMonitorEventsLost");
            if to_alerts
                && let Some(alert) = lost
                && tx.send(alert).is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}

fn signal(pid: u32, sig: Signal) -> Outcome {
    let raw = i32::try_from(pid).map_err(|e| format!("pid {pid}: {e}"))?;
    let pid = Pid::from_raw(raw).ok_or_else(|| format!("pid {raw} is not a pid"))?;
    kill_process(pid, sig).map_err(|e| format!("kill({raw}, {sig:?}): {e}"))
}

/// The `events_lost` records written at or after `since` (boot ns).
fn lost_records(since: u64) -> Result<Vec<serde_json::Value>, String> {
    let out = Command::new(BINARY)
        .args(["log", "show", "--json", "--kind", "events_lost", EVENT_LOG])
        .output()
        .map_err(|e| format!("running log show: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["boot_ns"].as_u64().is_some_and(|t| t >= since))
        .collect())
}

/// Every tracked module's state agrees with /proc/modules.
fn matches_proc_modules(g: &Guest) -> Outcome {
    let status = g.api().status()?;
    let mut wrong = Vec::new();
    for group in &status.groups {
        for m in &group.modules {
            let listed = kmod::listed(&m.name)?;
            let tracked_live = matches!(m.state.as_str(), "loaded" | "loading" | "unloading");
            if m.state != "builtin" && listed != tracked_live {
                wrong.push(format!(
                    "{}/{}: tracked {}, /proc/modules {}",
                    group.name,
                    m.name,
                    m.state,
                    if listed { "lists it" } else { "does not" }
                ));
            }
        }
    }
    ensure!(
        wrong.is_empty(),
        "tracked state disagrees with /proc/modules after the loss: {}",
        wrong.join("; ")
    );
    Ok(())
}

/// A 4 KiB ring overflows; the loss is counted, reconciled at once,
/// logged and alerted, and the final state is the kernel's.
pub fn loss_never_silent(g: &mut Guest) -> Outcome {
    let rx = spawn_receiver()?;
    let am = format!("http://{RECEIVER}");
    let before = g.start_daemon_with(
        "ebpf",
        &[
            "--ring-buffer-size",
            "4096",
            "--reconcile-interval",
            "3600",
            "--alertmanager",
            &am,
        ],
    )?;
    kmod::ensure_unloaded(STORM_MODULE)?;
    let pid = g.daemon_pid().ok_or("no daemon running")?;
    let storm_start = boottime_ns();
    let storm_clock = Instant::now();
    signal(pid, Signal::STOP)?;
    let storm = (|| -> Outcome {
        for _ in 0..STORM_CYCLES {
            kmod::modprobe(STORM_MODULE)?;
            kmod::rmmod(STORM_MODULE)?;
        }
        // End loaded, so the truth differs from "last event seen".
        kmod::modprobe(STORM_MODULE)?;
        Ok(())
    })();
    signal(pid, Signal::CONT)?;
    let storm_took = storm_clock.elapsed();
    storm?;
    let resumed = Instant::now();

    // The loss shows in /metrics and a reconcile follows at once.
    let mut lost = None;
    let mut status = None;
    while resumed.elapsed() < HANDLED_WITHIN {
        lost = metric(&g.api().metrics()?, "kmod_monitor_events_lost_total");
        let s = g.api().status()?;
        let reconciled = s.reconciles > before.reconciles;
        let done = lost.is_some_and(|l| l > 0.0) && reconciled;
        status = Some(s);
        if done {
            break;
        }
        thread::sleep(POLL_EVERY);
    }
    let status = status.ok_or("no /status after the storm")?;
    ensure!(
        lost.is_some_and(|l| l > 0.0),
        "kmod_monitor_events_lost_total is {lost:?} {} s after a {STORM_CYCLES}-cycle storm into a 4 KiB ring: {}",
        HANDLED_WITHIN.as_secs(),
        status.summary()
    );
    ensure!(
        status.reconciles > before.reconciles,
        "no reconcile within {} s of the loss (reconciles {} before, {} after; interval 3600 s)",
        HANDLED_WITHIN.as_secs(),
        before.reconciles,
        status.reconciles
    );
    matches_proc_modules(g)?;
    ensure!(
        status.state(V2, STORM_MODULE)? == "loaded",
        "{STORM_MODULE} is loaded but tracked as {}",
        status.state(V2, STORM_MODULE)?
    );

    // The forensic record, written by the log's own thread.
    let start = Instant::now();
    let records = loop {
        let records = lost_records(storm_start)?;
        if !records.is_empty() || start.elapsed() > HANDLED_WITHIN {
            break records;
        }
        thread::sleep(POLL_EVERY);
    };
    ensure!(
        records
            .iter()
            .any(|r| r["lost_total"].as_u64().is_some_and(|n| n > 0)),
        "no events_lost record with lost_total > 0 in {EVENT_LOG} since the storm: {records:?}"
    );

    // The health alert reaches the stand-in Alertmanager.
    let alert = rx
        .recv_timeout(HANDLED_WITHIN)
        .map_err(|_| "no KernelModuleMonitorEventsLost alert POSTed within 10 s".to_owned())?;
    // The failed reserves are exported on their own, and the program said
    // so through aya-log, at most once a second per CPU.
    let metrics = g.api().metrics()?;
    let reserve = metric(
        &metrics,
        "kmod_monitor_kernel_lost_total{reason=\"ring_reserve_failed\"}",
    );
    ensure!(
        reserve.is_some_and(|r| r > 0.0) && reserve == lost,
        "kmod_monitor_kernel_lost_total{{reason=\"ring_reserve_failed\"}} is {reserve:?}, events_lost_total {lost:?}: every loss here is a failed reserve"
    );
    let log = g.daemon_log().ok_or("no daemon running")?;
    let text =
        std::fs::read_to_string(&log).map_err(|e| format!("reading {}: {e}", log.display()))?;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" kmod_monitor::ebpf: ring buffer EVENTS is full"))
        .collect();
    let cpus = crate::diagnostics::online_cpus()?;
    let most = (usize::try_from(storm_took.as_secs()).map_err(|e| e.to_string())? + 1) * cpus;
    ensure!(
        !lines.is_empty() && lines.len() <= most && lines.iter().all(|l| l.contains("WARN")),
        "{} WARN line(s) under kmod_monitor::ebpf saying the event ring was full, after a {storm_took:?} storm on {cpus} CPU(s) (at least 1, at most {most}) in {}: {lines:?}",
        lines.len(),
        log.display()
    );
    Report::note(&format!(
        "loss: {STORM_CYCLES} cycles of {STORM_MODULE} into a 4 KiB ring with the daemon stopped: \
         lost {}, received {}, reconciles {} -> {}, alert {}, {} kernel log line(s): {:?}",
        lost.unwrap_or_default(),
        status.events.received,
        before.reconciles,
        status.reconciles,
        alert["labels"],
        lines.len(),
        lines.first().copied().unwrap_or_default()
    ));
    g.stop_daemon();
    Ok(())
}
