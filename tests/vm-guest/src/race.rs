//! The start-up race, made deterministic: a required module unloaded and
//! reloaded after the eBPF source attached but before the snapshot is
//! read. The daemon reads `--kubeconfig` between the two (attach, drop
//! privileges, read the cluster client's files, then the snapshot), so a
//! FIFO given as the kubeconfig holds it exactly there: our blocking open
//! for writing returns once the daemon has opened it for reading, and it
//! cannot take the snapshot until we have written the file and closed it.
//! Both events are then older than the snapshot, and must be sorted as
//! history: no alert, the group met, the last event's actor kept. Should
//! the daemon ever read the kubeconfig elsewhere, this fails rather than
//! passing by luck: before the attach, the events go unseen (no actor);
//! after the snapshot, they are live and flip the group.
//!
//! The uevent source runs the same race. Its events carry no kernel time
//! and no actor; what must hold is that both uevents are counted in the
//! first /status and no alert is ever pushed about V2. At this hold point
//! the kubeconfig read yields to the runtime, so the uevent reader takes
//! them before the snapshot, as history. Uevents sent while the daemon is
//! inside the snapshot read itself (which does not yield) wait in the
//! socket instead; for those the start-up sync reads the socket dry before
//! the first publish (`source::uevent::read_loop`). This test cannot hold
//! the daemon there, so it does not exercise that path.
use std::{
    ffi::CString,
    fs::{self, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::{
    Outcome, ensure, kmod,
    more::{EVENT_LOG, boottime_ns, metric},
    report::Report,
    scenarios::Guest,
};

const V2: &str = "v2-data-engine";
const V2_MODULES: [&str; 3] = ["vfio_pci", "uio_pci_generic", "nvme_tcp"];
/// The module unloaded and reloaded in the window.
const MODULE: &str = "nvme_tcp";
const FIFO: &str = "/tmp/race-kubeconfig";
/// A kubeconfig for an API server that is not there: the client builds,
/// and the cluster is merely unreadable (the V2 flag decides enablement).
/// It names a CA file because the kube client otherwise asks for the
/// system's roots, and the initramfs has none.
const KUBECONFIG: &str = "apiVersion: v1\nkind: Config\nclusters:\n- name: none\n  cluster:\n    server: http://127.0.0.1:1\n    certificate-authority: /tmp/race-ca.pem\ncontexts:\n- name: none\n  context:\n    cluster: none\n    user: none\ncurrent-context: none\nusers:\n- name: none\n  user:\n    token: none\n";
const CA_FILE: &str = "/tmp/race-ca.pem";
/// A throwaway self-signed certificate (P-256, its key discarded), only
/// for the kube client to build; nothing connects with it.
const CA_PEM: &str = "\
-----BEGIN CERTIFICATE-----
MIIBozCCAUmgAwIBAgIURM1gnlHSBynSWaaZLA5xjYcOjt8wCgYIKoZIzj0EAwIw
JjEkMCIGA1UEAwwba21vZC1tb25pdG9yLXZtLXRlc3QtdW51c2VkMCAXDTI2MTEy
NzE0MjgzNFoYDzIxMjYxMTAzMTQyODM0WjAmMSQwIgYDVQQDDBtrbW9kLW1vbml0
b3Itdm0tdGVzdC11bnVzZWQwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAARD/Ucc
+XK6fC04xsSVQ0/Q9wJrQRiakk5DWL65JD28VErArKSMvRrZUa3pqCv/XOYXaPWd
7UUBxjPKKmULFavpo1MwUTAdBgNVHQ4EFgQUoeETtbdU3XrvzSsRYYEenwb+e6Iw
HwYDVR0jBBgwFoAUoeETtbdU3XrvzSsRYYEenwb+e6IwDwYDVR0TAQH/BAUwAwEB
/zAKBggqhkjOPQQDAgNIADBFAiBfE21DR5uwIokeIBj3U46CjpnAL+fOJh55SFEI
KH+fNQIhAKcrpAYIeLifdRSk18e0vwtiiskR2bOfAftVxyqTsX/U
-----END CERTIFICATE-----
";

/// Where this scenario's stand-in Alertmanager listens, per source (each
/// keeps its port for the rest of the guest's life, as the others keep
/// 9093 and 9095).
fn receiver(source: &str) -> &'static str {
    match source {
        "ebpf" => "127.0.0.1:9096",
        _ => "127.0.0.1:9097",
    }
}

/// A stand-in Alertmanager: every body POSTed to /api/v2/alerts, parsed.
fn spawn_receiver(at: &str) -> Result<mpsc::Receiver<serde_json::Value>, String> {
    let server = tiny_http::Server::http(at).map_err(|e| format!("listening on {at}: {e}"))?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for mut request in server.incoming_requests() {
            let mut body = String::new();
            let _ = std::io::Read::read_to_string(request.as_reader(), &mut body);
            let to_alerts = request.url() == "/api/v2/alerts";
            let _ = request.respond(tiny_http::Response::empty(200));
            if let (true, Ok(v)) = (to_alerts, serde_json::from_str(&body))
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}

/// Opens [`FIFO`] for writing, which returns once a reader has opened it;
/// gives up after `within` (unblocking the open with a reader of our own).
fn open_when_read(within: Duration) -> Result<fs::File, String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(OpenOptions::new().write(true).open(FIFO));
    });
    match rx.recv_timeout(within) {
        Ok(file) => file.map_err(|e| format!("opening {FIFO} for writing: {e}")),
        Err(_) => {
            // Release the blocked open so its thread ends.
            let _ = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(FIFO);
            Err(format!(
                "the daemon did not open {FIFO} within {} s",
                within.as_secs()
            ))
        }
    }
}

/// Issue 11: `rmmod nvme_tcp; modprobe nvme_tcp` while the daemon is held
/// between attaching and its snapshot. The daemon must end with V2 met,
/// nvme_tcp's last event the modprobe's load (its actor kept), both events
/// recorded as historical, no `requirement_change` and no drift.
pub fn startup_race(g: &mut Guest) -> Outcome {
    race(g, "ebpf")
}

/// The same race with the uevent source: the first /status has V2 met and
/// no alert is ever pushed about it (uevents carry no actor to keep).
pub fn startup_race_uevent(g: &mut Guest) -> Outcome {
    race(g, "uevent")
}

#[expect(
    clippy::too_many_lines,
    reason = "one scenario's steps, in the order they happen"
)]
fn race(g: &mut Guest, source: &'static str) -> Outcome {
    let ebpf = source == "ebpf";
    g.stop_daemon();
    for m in ["dm_crypt"].into_iter().chain(V2_MODULES) {
        if !kmod::listed(m)? {
            kmod::modprobe(m)?;
        }
    }
    fs::write(CA_FILE, CA_PEM).map_err(|e| format!("writing {CA_FILE}: {e}"))?;
    let _ = fs::remove_file(FIFO);
    let path = CString::new(FIFO).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated path that outlives the call.
    let r = unsafe { libc::mkfifo(path.as_ptr(), 0o600) };
    ensure!(r == 0, "mkfifo {FIFO}: {}", std::io::Error::last_os_error());
    let start_ns = boottime_ns();
    let alerts = spawn_receiver(receiver(source))?;
    let am = format!("http://{}", receiver(source));
    g.spawn_daemon_with(
        source,
        &[
            "--kubeconfig",
            FIFO,
            "--alertmanager",
            &am,
            "--alert-resend-interval",
            "1",
        ],
    )?;
    let mut fifo = match open_when_read(Duration::from_secs(60)) {
        Ok(f) => f,
        Err(e) => {
            let exited = g.daemon_exited();
            return Err(format!("{e} (daemon exited: {exited:?})"));
        }
    };
    // The daemon is attached and blocked in its read of the kubeconfig,
    // before the snapshot.
    let window_start = boottime_ns();
    let unload = kmod::rmmod(MODULE)?;
    let load = kmod::modprobe(MODULE)?;
    let window_end = boottime_ns();
    fifo.write_all(KUBECONFIG.as_bytes())
        .map_err(|e| format!("writing the kubeconfig into {FIFO}: {e}"))?;
    drop(fifo);
    let first = g.wait_daemon_ready()?;
    let _ = fs::remove_file(FIFO);
    // The very first /status already has it right.
    ensure!(
        first.met(V2)? && first.state(V2, MODULE)? == "loaded",
        "first /status after the race: {}",
        first.summary()
    );
    ensure!(
        first.source.active == source,
        "the daemon runs the {} source, not {source}",
        first.source.active
    );
    if !ebpf {
        return race_without_actors(g, &first, &alerts);
    }
    let m = first.module(V2, MODULE)?;
    let event = m
        .last_event
        .clone()
        .ok_or_else(|| format!("{MODULE} has no last_event: {}", first.summary()))?;
    let actor = event.actor.clone().ok_or("the last event has no actor")?;
    ensure!(
        (event.kind == "load" || event.kind == "loaded")
            && actor.comm == "modprobe"
            && actor.tgid == load.pid
            && actor.uid == 0,
        "{MODULE}'s last event is {} by {} pid {}, expected the load by modprobe pid {}",
        event.kind,
        actor.comm,
        actor.tgid,
        load.pid
    );
    ensure!(
        event.boot_ns >= window_start && event.boot_ns <= window_end,
        "the last event's boot_ns {} is outside the race window {window_start}..{window_end}",
        event.boot_ns
    );
    ensure!(
        first.drift_total == 0 && first.events.lost == 0,
        "drift {} lost {} after the race: {}",
        first.drift_total,
        first.events.lost,
        first.summary()
    );
    let metrics = g.api().metrics()?;
    ensure!(
        metric(
            &metrics,
            &format!("kmod_monitor_requirement_met{{requirement=\"{V2}\"}}")
        ) == Some(1.0),
        "kmod_monitor_requirement_met{{requirement=\"{V2}\"}} is not 1"
    );
    no_v2_alert(&alerts)?;
    // The forensic log: both events as history, with their actors, and no
    // requirement change (no alert was ever due).
    let start = Instant::now();
    let records = loop {
        let text =
            fs::read_to_string(EVENT_LOG).map_err(|e| format!("reading {EVENT_LOG}: {e}"))?;
        let records: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|r: &serde_json::Value| r["boot_ns"].as_u64().is_some_and(|t| t >= start_ns))
            .collect();
        let have = |pid: u32| {
            records
                .iter()
                .any(|r| r["module"]["name"] == MODULE && r["actor"]["pid"] == pid)
        };
        if have(unload.pid) && have(load.pid) {
            break records;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(5),
            "no records of both the rmmod (pid {}) and the modprobe (pid {}) of {MODULE}: {records:?}",
            unload.pid,
            load.pid
        );
        thread::sleep(Duration::from_millis(50));
    };
    let raced: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["module"]["name"] == MODULE && r["actor"].is_object())
        .collect();
    ensure!(
        raced.iter().all(|r| r["historical"] == true),
        "events older than the snapshot were not recorded as historical: {raced:?}"
    );
    let changes: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["kind"] == "requirement_change")
        .collect();
    ensure!(
        changes.is_empty(),
        "requirement changes after the race: {changes:?}"
    );
    #[expect(clippy::cast_precision_loss, reason = "milliseconds for a report")]
    let window_ms = (window_end - window_start) as f64 / 1e6;
    Report::note(&format!(
        "startup-race: rmmod pid {} and modprobe pid {} of {MODULE} in {window_ms:.1} ms while the daemon was held before its snapshot; {} records, all historical",
        unload.pid,
        load.pid,
        raced.len()
    ));
    g.stop_daemon();
    Ok(())
}

/// The pusher sends the alerts in force at start and every second: in its
/// first 3 s some must arrive, and none may name the V2 group or the
/// module of the race.
fn no_v2_alert(alerts: &mpsc::Receiver<serde_json::Value>) -> Outcome {
    thread::sleep(Duration::from_secs(3));
    let bodies: Vec<serde_json::Value> = alerts.try_iter().collect();
    ensure!(
        !bodies.is_empty(),
        "no POST reached the stand-in Alertmanager in 3 s"
    );
    let v2_alerts: Vec<&serde_json::Value> = bodies
        .iter()
        .filter_map(serde_json::Value::as_array)
        .flatten()
        .filter(|a| a["labels"]["requirement"] == V2 || a["labels"]["module"] == MODULE)
        .collect();
    ensure!(
        v2_alerts.is_empty(),
        "alerts about {V2} after the race: {v2_alerts:?}"
    );
    Ok(())
}

/// What the race must give with a source that has no actors: the first
/// /status right, and no alert about V2 in the pusher's first seconds.
fn race_without_actors(
    g: &mut Guest,
    first: &crate::status::Status,
    alerts: &mpsc::Receiver<serde_json::Value>,
) -> Outcome {
    let m = first.module(V2, MODULE)?;
    let event = m
        .last_event
        .clone()
        .ok_or_else(|| format!("{MODULE} has no last_event: {}", first.summary()))?;
    // Both uevents (remove, add) are in the first /status: as history if
    // the reader took them before the snapshot, else applied live before
    // the first publish. Still in the socket, they would count 0 here and
    // flip V2 after the daemon said it was met.
    ensure!(
        first.events.received >= 2,
        "the first /status counts {} events received: the uevents of the race were not applied before it ({})",
        first.events.received,
        first.summary()
    );
    ensure!(
        (event.kind == "load" || event.kind == "loaded") && event.actor.is_none(),
        "{MODULE}'s last event is {} (actor {:?}), expected the uevent's add",
        event.kind,
        event.actor
    );
    ensure!(
        first.events.lost == 0,
        "lost {} after the race",
        first.events.lost
    );
    no_v2_alert(alerts)?;
    Report::note(
        "startup-race-uevent: the uevents queued during the snapshot were applied before the first publish; no alert",
    );
    g.stop_daemon();
    Ok(())
}
