//! Stress and soak, bounded in time: 1,000 load/unload cycles of a
//! required module against the eBPF daemon while a few threads hammer
//! /metrics and /status on loopback. The daemon must stay up, keep its RSS
//! flat, count every unload (or count the difference as lost), answer every
//! request, and keep handling events within a stated bound.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    Outcome, api::Api, bench, ensure, kmod, more::metric, report::Report, scenarios::Guest,
};

const MODULE: &str = "uio_pci_generic";
const V2: &str = "v2-data-engine";
const CYCLES: usize = 1_000;
const WARM_UP: usize = 50;
/// Every this many cycles, the unload's detection latency is sampled.
const SAMPLE_EVERY: usize = 10;
/// RSS growth allowed over the 1,000 cycles after warm-up.
const RSS_GROWTH_KIB: u64 = 2 * 1024;
/// Event handling delay allowed under the HTTP load (in-kernel timestamp to
/// the tracker's state change). Idle, the TCG guest's p99 is about 1 ms;
/// this leaves room for the emulated single CPU serving three clients.
const HANDLING_BOUND: Duration = Duration::from_millis(500);
/// Threads requesting /metrics and /status back to back.
const CLIENTS: usize = 3;

fn unloads(g: &Guest) -> Result<f64, String> {
    let text = g.api().metrics()?;
    Ok(metric(
        &text,
        &format!("kmod_monitor_module_events_total{{module=\"{MODULE}\",event=\"unload\"}}"),
    )
    .unwrap_or(0.0))
}

/// 1,000 cycles under concurrent scrapes: up, flat, counted, responsive.
pub fn soak(g: &mut Guest) -> Outcome {
    // A reconcile every 5 s races the storm on purpose. A reconcile that
    // read /proc/modules while events older than the read were still
    // queued used to "correct" the state as drift, and the queued unload
    // then went uncounted (999 of 1,000 once on 6.12). The periodic
    // reconcile now looks twice before it corrects anything, so every
    // unload must be counted and there must be no drift at all.
    let drift_before = g.api().status().map_or(0, |s| s.drift_total);
    g.start_daemon_with("ebpf", &["--reconcile-interval", "5"])?;
    let pid = g.daemon_pid().ok_or("no daemon running")?;
    kmod::modprobe(MODULE)?;
    kmod::rmmod(MODULE)?;
    let module = bench::module_file()?;
    for _ in 0..WARM_UP {
        bench::finit_module(&module)?;
        bench::delete_module()?;
    }
    g.api().wait_for("warm-up drained", |s| {
        Ok(s.state(V2, MODULE)? == "available")
    })?;
    let rss_before = bench::rss_kib(pid)?;
    let unloads_before = unloads(g)?;
    let lost_before = g.api().status()?.events.lost;

    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (stop, requests) = (Arc::clone(&stop), Arc::clone(&requests));
            thread::spawn(move || -> Result<(), String> {
                let api = Api::new();
                while !stop.load(Ordering::Relaxed) {
                    if i % 2 == 0 {
                        api.metrics()?;
                    } else {
                        api.status()?;
                    }
                    requests.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();

    let start = Instant::now();
    let mut delays_ms = Vec::new();
    let cycled = (|| -> Outcome {
        for i in 0..CYCLES {
            bench::finit_module(&module)?;
            let before = crate::more::boottime_ns();
            bench::delete_module()?;
            if i % SAMPLE_EVERY == 0 {
                let status = g.api().wait_for("the unload applied", |s| {
                    Ok(s.module(V2, MODULE)?
                        .last_event
                        .as_ref()
                        .is_some_and(|e| e.kind == "unload" && e.boot_ns >= before))
                })?;
                if let Some(e) = &status.module(V2, MODULE)?.last_event {
                    #[expect(clippy::cast_precision_loss, reason = "milliseconds for a report")]
                    delays_ms.push(e.applied_ns.saturating_sub(e.boot_ns) as f64 / 1e6);
                }
            }
        }
        Ok(())
    })();
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let client_errors: Vec<String> = clients
        .into_iter()
        .filter_map(|c| match c.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("a client thread panicked".to_owned()),
        })
        .collect();
    cycled?;
    ensure!(
        g.daemon_exited().is_none(),
        "kmod-monitor exited during the soak"
    );
    ensure!(
        client_errors.is_empty(),
        "requests failed during the storm: {}",
        client_errors.join("; ")
    );

    // Counted: every unload, or the loss counter covers the difference.
    let start_wait = Instant::now();
    let (counted, lost) = loop {
        let counted = unloads(g)? - unloads_before;
        let lost = g.api().status()?.events.lost - lost_before;
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let covered = counted + lost as f64 >= CYCLES as f64;
        if covered || start_wait.elapsed() > Duration::from_secs(10) {
            break (counted, lost);
        }
        thread::sleep(Duration::from_millis(50));
    };
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let cycles = CYCLES as f64;
    ensure!(
        counted <= cycles && counted + lost as f64 >= cycles,
        "{cycles} unloads, {counted} counted, {lost} lost: the difference is unaccounted for; {}",
        g.api().status()?.summary()
    );

    let status = g.api().status()?;
    ensure!(
        status.drift_total == 0,
        "drift_total is {} (was {drift_before} before the restart): a reconcile raced the storm's events; {}",
        status.drift_total,
        status.summary()
    );

    let rss_after = bench::rss_kib(pid)?;
    ensure!(
        rss_after <= rss_before + RSS_GROWTH_KIB,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over {CYCLES} cycles (bound {RSS_GROWTH_KIB} KiB)"
    );
    delays_ms.sort_by(f64::total_cmp);
    let max = delays_ms.last().copied().unwrap_or(f64::NAN);
    ensure!(
        max.total_cmp(&(HANDLING_BOUND.as_secs_f64() * 1e3)).is_le(),
        "an unload took {max:.1} ms to apply under HTTP load (bound {} ms)",
        HANDLING_BOUND.as_millis()
    );
    Report::note(&format!(
        "soak: {CYCLES} cycles in {:.1} s with {} requests from {CLIENTS} clients; unloads counted {counted}, lost {lost}; RSS {rss_before} -> {rss_after} KiB; unload handling p50 {:.2} ms, max {max:.2} ms over {} samples",
        took.as_secs_f64(),
        requests.load(Ordering::Relaxed),
        delays_ms
            .get(delays_ms.len() / 2)
            .copied()
            .unwrap_or(f64::NAN),
        delays_ms.len()
    ));
    g.stop_daemon();
    Ok(())
}
