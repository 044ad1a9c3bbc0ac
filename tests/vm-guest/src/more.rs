//! Scenarios for the daemon's outputs on a real kernel: /metrics following
//! modprobe and rmmod, the time from `module_free` to the alert POST, the
//! forensic log's record of an rmmod, and tracking after the privilege drop.
use std::{
    process::Command,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::{
    Outcome, api::POLL_EVERY, daemon::BINARY, ensure, kmod, report::Report, scenarios::Guest,
};

const V2: &str = "v2-data-engine";
const V2_MODULES: [&str; 3] = ["vfio_pci", "uio_pci_generic", "nvme_tcp"];
/// The forensic log every guest daemon writes (passed by `Guest`).
pub const EVENT_LOG: &str = "/tmp/kmod-monitor-events.jsonl";
/// Where the stand-in Alertmanager listens.
const RECEIVER: &str = "127.0.0.1:9093";

/// CLOCK_BOOTTIME in ns, the clock of the events' in-kernel timestamps.
pub fn boottime_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn wait_metric(g: &Guest, series: &str, want: f64) -> Outcome {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < Duration::from_secs(5) {
        let text = g.api().metrics()?;
        last = metric(&text, series);
        if last == Some(want) {
            return Ok(());
        }
        thread::sleep(POLL_EVERY);
    }
    Err(format!("{series} is {last:?}, expected {want} within 5 s"))
}

fn load_v2() -> Outcome {
    for m in V2_MODULES {
        if !kmod::listed(m)? {
            kmod::modprobe(m)?;
        }
    }
    Ok(())
}

/// /metrics follows modprobe and rmmod of a V2 module.
pub fn metrics_follow(g: &mut Guest) -> Outcome {
    g.ensure_daemon("ebpf")?;
    load_v2()?;
    let series = format!("kmod_monitor_requirement_met{{requirement=\"{V2}\"}}");
    wait_metric(g, &series, 1.0)?;
    kmod::rmmod("nvme_tcp")?;
    wait_metric(g, &series, 0.0)?;
    wait_metric(
        g,
        "kmod_monitor_module_state{module=\"nvme_tcp\",state=\"available\"}",
        1.0,
    )?;
    kmod::modprobe("nvme_tcp")?;
    wait_metric(g, &series, 1.0)?;
    let text = g.api().metrics()?;
    ensure!(
        metric(&text, "kmod_monitor_event_source_info{source=\"ebpf\"}") == Some(1.0),
        "event_source_info{{source=\"ebpf\"}} is not 1"
    );
    let unloads = metric(
        &text,
        "kmod_monitor_module_events_total{module=\"nvme_tcp\",event=\"unload\"}",
    )
    .unwrap_or(0.0);
    ensure!(
        unloads.total_cmp(&1.0).is_ge(),
        "no unload counted for nvme_tcp ({unloads})"
    );
    Ok(())
}

/// A minimal Alertmanager stand-in: records CLOCK_BOOTTIME when a POST to
/// /api/v2/alerts carrying a firing nvme_tcp alert arrives.
fn spawn_receiver() -> Result<mpsc::Receiver<u64>, String> {
    let server =
        tiny_http::Server::http(RECEIVER).map_err(|e| format!("listening on {RECEIVER}: {e}"))?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for mut request in server.incoming_requests() {
            let arrived = boottime_ns();
            let mut body = String::new();
            let _ = std::io::Read::read_to_string(request.as_reader(), &mut body);
            let firing_nvme = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .any(|a| {
                    a["labels"]["module"] == "nvme_tcp"
                        && a["labels"]["alertname"] == "KernelModuleRequirementUnmet"
                        && a["labels"]["requirement"] == V2
                        // Firing: endsAt lies ahead (resolutions end now).
                        && a["endsAt"]
                            .as_str()
                            .and_then(|t| humantime::parse_rfc3339(t).ok())
                            .is_some_and(|end| {
                                end > std::time::SystemTime::now() + Duration::from_secs(60)
                            })
                });
            let to_alerts = request.url() == "/api/v2/alerts";
            let _ = request.respond(tiny_http::Response::empty(200));
            if to_alerts && firing_nvme && tx.send(arrived).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Time from rmmod's `module_free` (its in-kernel timestamp) to the alert
/// POST reaching the receiver, over several unload cycles. Reported, not
/// asserted: the guest is emulated (TCG).
pub fn alert_latency(g: &mut Guest) -> Outcome {
    let rx = spawn_receiver()?;
    let am = format!("http://{RECEIVER}");
    g.start_daemon_with(
        "ebpf",
        &["--alertmanager", &am, "--alert-resend-interval", "600"],
    )?;
    let mut latencies_ms = Vec::new();
    for _ in 0..10 {
        load_v2()?;
        g.api().wait_for("V2 met", |s| s.met(V2))?;
        // Drop whatever an earlier cycle's resolution sent.
        while rx.try_recv().is_ok() {}
        kmod::rmmod("nvme_tcp")?;
        let arrived = rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| "no firing nvme_tcp alert POST within 5 s of rmmod".to_owned())?;
        let status = g.api().wait_for("nvme_tcp available", |s| {
            Ok(s.state(V2, "nvme_tcp")? == "available")
        })?;
        let freed = status
            .module(V2, "nvme_tcp")?
            .last_event
            .as_ref()
            .map(|e| e.boot_ns)
            .ok_or("nvme_tcp has no last_event after rmmod")?;
        ensure!(
            arrived >= freed,
            "POST at {arrived} ns before module_free at {freed} ns"
        );
        #[expect(clippy::cast_precision_loss, reason = "milliseconds for a report")]
        latencies_ms.push((arrived - freed) as f64 / 1e6);
    }
    latencies_ms.sort_by(f64::total_cmp);
    Report::note(&format!(
        "alert latency module_free -> POST at the receiver (TCG guest, {} cycles): min {:.2} ms, median {:.2} ms, max {:.2} ms",
        latencies_ms.len(),
        latencies_ms[0],
        latencies_ms[latencies_ms.len() / 2],
        latencies_ms[latencies_ms.len() - 1]
    ));
    g.stop_daemon();
    Ok(())
}

/// `rmmod nvme_tcp` leaves a `module_unload` record naming rmmod's pid and
/// the v2 group's state after it, and the log verifies.
pub fn forensic_unload(g: &mut Guest) -> Outcome {
    g.ensure_daemon("ebpf")?;
    load_v2()?;
    g.api().wait_for("V2 met", |s| s.met(V2))?;
    let ran = kmod::rmmod("nvme_tcp")?;
    g.api().wait_for("nvme_tcp available", |s| {
        Ok(s.state(V2, "nvme_tcp")? == "available")
    })?;
    // The record is written by the log's thread right after the event.
    let start = Instant::now();
    let record = loop {
        let out = Command::new(BINARY)
            .args([
                "log",
                "show",
                "--json",
                "--kind",
                "module_unload",
                "--module",
                "nvme_tcp",
                EVENT_LOG,
            ])
            .output()
            .map_err(|e| format!("running log show: {e}"))?;
        let found = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["actor"]["pid"] == ran.pid && r["actor"]["comm"] == "rmmod");
        if let Some(r) = found {
            break r;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(5),
            "no module_unload record of nvme_tcp by rmmod pid {} in {EVENT_LOG}: {}",
            ran.pid,
            String::from_utf8_lossy(&out.stderr)
        );
        thread::sleep(POLL_EVERY);
    };
    Report::note(&format!(
        "forensic-unload: actor as logged: {}",
        record["actor"]
    ));
    let v2_after = record["requirements"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == V2)
        .cloned()
        .ok_or_else(|| format!("the record names no {V2} effect: {record}"))?;
    ensure!(
        v2_after["met"] == false && v2_after["changed"] == true,
        "{V2} after the unload should be unmet and changed: {record}"
    );
    let verify = Command::new(BINARY)
        .args(["log", "verify", EVENT_LOG])
        .output()
        .map_err(|e| format!("running log verify: {e}"))?;
    ensure!(
        verify.status.success(),
        "log verify failed: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    Ok(())
}

/// After attaching, the daemon holds no capability, yet keeps tracking;
/// with `--user` it also leaves root and still tracks.
pub fn privileges_dropped(g: &mut Guest) -> Outcome {
    for extra in [&[][..], &["--user", "65534:65534", "--no-event-log"][..]] {
        let status = g.start_daemon_with("ebpf", extra)?;
        let p = status
            .privileges
            .as_ref()
            .ok_or("/status has no privileges")?;
        ensure!(
            p.dropped && p.effective.is_empty() && p.permitted.is_empty(),
            "capabilities left after the drop ({extra:?}): effective {:?}, permitted {:?}",
            p.effective,
            p.permitted
        );
        if !extra.is_empty() {
            ensure!(
                p.uid == 65534 && p.gid == 65534,
                "uid/gid {}/{} after --user",
                p.uid,
                p.gid
            );
        }
        load_v2()?;
        g.api().wait_for("V2 met", |s| s.met(V2))?;
        let ran = kmod::rmmod("nvme_tcp")?;
        let status = g.api().wait_for("nvme_tcp available", |s| {
            Ok(s.state(V2, "nvme_tcp")? == "available")
        })?;
        let actor = status
            .module(V2, "nvme_tcp")?
            .last_event
            .as_ref()
            .and_then(|e| e.actor.as_ref())
            .ok_or("no actor after the drop")?;
        ensure!(
            actor.pid == ran.pid && actor.comm == "rmmod",
            "after the drop the unload names {} pid {}, expected rmmod pid {}",
            actor.comm,
            actor.pid,
            ran.pid
        );
    }
    g.stop_daemon();
    Ok(())
}
