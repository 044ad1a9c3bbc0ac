//! The userspace event pipeline without a kernel: ring-buffer records are
//! decoded, applied to the tracker, counted in the metrics and appended to
//! the forensic log (enriched from /proc, sealed into the hash chain and
//! written by the log's thread), as the daemon's event loop does for each
//! record, with the daemon's own record builders and its per-turn hand-off
//! to the log. `cargo xtask bench` runs it as the daemon ships (the static
//! musl build, with the static build's flags: `Arch::last_crate_rustflags`
//! in xtask); `cargo bench -p kmod-monitor --bench pipeline` runs the host's
//! glibc build, which is faster and not what a node runs.
use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kmod_monitor::{
    daemon::records::{Deferred, PendingEvent},
    event::{Decoded, SourceEvent},
    forensic::{self, EventLog, EventLogSettings, FsyncPolicy},
    host::{HostRoot, Snapshot, parse_modules_builtin, parse_modules_dep, parse_proc_modules},
    metrics::Metrics,
    requirements::{self, GroupSettings},
    tracker::{Outcome, Tracker},
};
use monitor_common::{EventKind, ModuleEvent};

/// The events of one cycle: load, loaded, unload begin, free, unload
/// result.
const CYCLE_EVENTS: u64 = 5;

/// A load/unload cycle of nvme_tcp, the records the kernel emits for
/// `modprobe nvme_tcp; rmmod nvme_tcp`: load, its result, the free that
/// carries the unload's begin, the unload's result ([`CYCLE_EVENTS`]
/// events in four records).
fn cycle() -> Vec<Vec<u8>> {
    let kinds = [
        (EventKind::Load, false),
        (EventKind::LoadResult, false),
        (EventKind::Free, true),
        (EventKind::UnloadResult, false),
    ];
    kinds
        .iter()
        .enumerate()
        .map(|(i, &(kind, carries_begin))| {
            let mut ev = ModuleEvent::ZERO;
            ev.kind = kind as u32;
            ev.pid = 4242;
            ev.tgid = 4242;
            ev.boot_ns = 1_000 + 2 * i as u64;
            if carries_begin {
                ev.begun_ns = ev.boot_ns - 1;
            }
            ev.comm[..8].copy_from_slice(b"modprobe");
            ev.name[..8].copy_from_slice(b"nvme_tcp");
            // SAFETY: ModuleEvent is repr(C) plain data without padding.
            unsafe {
                std::slice::from_raw_parts(
                    std::ptr::from_ref(&ev).cast::<u8>(),
                    size_of::<ModuleEvent>(),
                )
            }
            .to_vec()
        })
        .collect()
}

fn fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/host/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The real Debian 6.1 guest's snapshot.
fn snapshot() -> Snapshot {
    let p = std::path::Path::new("fixture");
    Snapshot {
        kernel_release: "6.1.0-56-amd64".into(),
        modules_supported: true,
        loaded: parse_proc_modules(&fixture("proc_modules.debian-6.1"), p)
            .log_and_take()
            .into_iter()
            .map(|m| {
                (
                    m.name,
                    kmod_monitor::host::LoadedModule {
                        state: m.state,
                        taints: m.taints,
                    },
                )
            })
            .collect(),
        builtin: parse_modules_builtin(&fixture("modules.builtin.debian-6.1"), p).log_and_take(),
        available: parse_modules_dep(&fixture("modules.dep.debian-6.1"), p).log_and_take(),
        kernel_config: None,
        modules_dir: None,
        warnings: Vec::new(),
    }
}

/// What the event loop does with one ring-buffer record before the log:
/// decode it, then apply each of its events (two for an unload's free) to
/// the tracker and count it in the metrics; `each` gets them in order.
fn track(
    rec: &[u8],
    tracker: &mut Tracker,
    metrics: &Metrics,
    mut each: impl FnMut(&Tracker, SourceEvent, Outcome),
) {
    let (first, second) = match SourceEvent::decode(black_box(rec)) {
        Ok(Decoded::Module(ev)) => (ev, None),
        Ok(Decoded::Unloaded { begin, free }) => (begin, Some(free)),
        _ => panic!("the benchmark's records decode"),
    };
    for ev in std::iter::once(first).chain(second) {
        let outcome = tracker.apply(&ev);
        metrics.on_event(&outcome, Some(1e-4));
        if !outcome.group_changes.is_empty() {
            metrics.set_groups(&tracker.report(), 1.0);
        }
        each(tracker, ev, outcome);
    }
}

fn pipeline(c: &mut Criterion) {
    let records = cycle();
    let mut tracker = Tracker::new(
        &snapshot(),
        requirements::resolve(&GroupSettings::default(), true),
    );
    let metrics = Metrics::new("6.1.0-56-amd64");
    metrics.set_groups(&tracker.report(), 0.0);
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(CYCLE_EVENTS));
    group.bench_function("decode+track+metrics per event", |b| {
        b.iter(|| {
            for rec in &records {
                track(rec, &mut tracker, &metrics, |_, ev, outcome| {
                    black_box((ev, outcome));
                });
            }
        });
    });
    // The whole path, forensic log included: append N events' records, then
    // close the log, which returns once the writer thread has written (and
    // fsynced) them all, so the disk work is inside the measured time.
    group.bench_function("full pipeline with forensic log, per event", |b| {
        b.iter_custom(|iters| {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
            let host = HostRoot::new(dir.path());
            let mut log = EventLog::open(
                EventLogSettings {
                    path: dir.path().join("events.jsonl"),
                    fsync: FsyncPolicy::Interval,
                    max_bytes: 64 * 1024 * 1024,
                    keep: 2,
                    // Room for every record of the run: this measures
                    // writing them, not dropping what a slower disk
                    // could not take.
                    buffer_bytes: kmod_monitor::config::validate::MAX_EVENT_LOG_BUFFER_BYTES,
                },
                "bench-boot".into(),
                "bench-host".into(),
            )
            .unwrap_or_else(|e| panic!("opening the bench log: {e}"));
            let mut deferred = Deferred::default();
            let start = Instant::now();
            for _ in 0..iters {
                // One loop turn's events (a load and an unload of
                // nvme_tcp): each applied, then their records built and
                // handed to the log together once the state is published,
                // as the daemon's event loop does.
                for rec in &records {
                    track(rec, &mut tracker, &metrics, |tracker, ev, outcome| {
                        if let Some(kind) = outcome.kind {
                            deferred.event(PendingEvent::new(
                                tracker,
                                &ev,
                                kind,
                                Some(&outcome),
                                "ebpf",
                            ));
                        }
                    });
                }
                let built = deferred.drain(
                    |_, a| forensic::actor::enrich(&host, a),
                    |kind, boot_ns| log.record(kind, boot_ns),
                );
                log.append_all(built);
            }
            let status = log.close(Duration::from_secs(60));
            let took = start.elapsed();
            assert_eq!(status.pending, 0, "the writer finished");
            assert_eq!(status.dropped, 0, "every record was written");
            assert_eq!(status.write_errors, 0);
            took
        });
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
