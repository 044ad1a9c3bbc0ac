//! The userspace event pipeline without a kernel: ring-buffer records are
//! decoded, applied to the tracker and counted in the metrics, exactly as
//! the daemon's event loop does for each record. Run with
//! `cargo bench -p kmod-monitor --bench pipeline`; `cargo xtask bench`
//! reports the events/s figure.
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kmod_monitor::{
    config::resolve_groups,
    event::{Decoded, SourceEvent},
    host::{Snapshot, parse_modules_builtin, parse_modules_dep, parse_proc_modules},
    metrics::Metrics,
    tracker::Tracker,
};
use monitor_common::{EventKind, ModuleEvent};

/// A load/loaded/unload-begin/free/unload-result cycle of nvme_tcp, the
/// records the kernel emits for `modprobe nvme_tcp; rmmod nvme_tcp`.
fn cycle() -> Vec<Vec<u8>> {
    let kinds = [
        (EventKind::Load, 0),
        (EventKind::LoadResult, 0),
        (EventKind::UnloadBegin, 0),
        (EventKind::Free, 0),
        (EventKind::UnloadResult, 0),
    ];
    kinds
        .iter()
        .enumerate()
        .map(|(i, &(kind, ret))| {
            let mut ev = ModuleEvent::ZERO;
            ev.kind = kind as u32;
            ev.ret = ret;
            ev.pid = 4242;
            ev.tgid = 4242;
            ev.boot_ns = 1_000 + i as u64;
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

fn pipeline(c: &mut Criterion) {
    let records = cycle();
    let mut tracker = Tracker::new(&snapshot(), resolve_groups(None, true));
    let metrics = Metrics::new("6.1.0-56-amd64");
    metrics.set_groups(&tracker.report(), 0.0);
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.bench_function("decode+track+metrics per event", |b| {
        b.iter(|| {
            for rec in &records {
                let Ok(Decoded::Module(ev)) = SourceEvent::decode(black_box(rec)) else {
                    panic!("the benchmark's records decode");
                };
                let outcome = tracker.apply(&ev);
                metrics.on_event(&outcome, Some(1e-4));
                if !outcome.group_changes.is_empty() {
                    metrics.set_groups(&tracker.report(), 1.0);
                }
                black_box(&outcome);
            }
        });
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
