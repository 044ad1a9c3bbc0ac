//! The eBPF source: loads the embedded program with this kernel's
//! tracepoint layout, attaches it, and turns ring-buffer records into
//! events. Needs Linux 5.8+ (ring buffer) and CAP_BPF + CAP_PERFMON (or
//! root); 5.10 also needs RLIMIT_MEMLOCK raised, which is done here.
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::{
    Ebpf,
    maps::{Map, MapData, RingBuf},
    programs::TracePoint,
};
use monitor_common::{LOST_SLOTS, TracepointLayout};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tokio_util::sync::CancellationToken;

use super::{SourceMsg, SourceOptions, StartError, Started, tracefs};
use crate::event::{Decoded, SourceEvent};

/// The eBPF object built by build.rs, embedded so the binary stands alone.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// Tracepoints the program must attach to, and optional ones that only
/// sharpen the lifecycle (without them, loads are confirmed through
/// /sys/module/<m>/initstate instead of the syscall's return value).
const REQUIRED: [(&str, &str, &str); 3] = [
    ("module_load", "module", "module_load"),
    ("module_free", "module", "module_free"),
    ("module_request", "module", "module_request"),
];
const OPTIONAL: [(&str, &str, &str); 4] = [
    ("init_module_exit", "syscalls", "sys_exit_finit_module"),
    ("init_module_exit", "syscalls", "sys_exit_init_module"),
    ("delete_module_enter", "syscalls", "sys_enter_delete_module"),
    ("delete_module_exit", "syscalls", "sys_exit_delete_module"),
];

/// The loaded object; dropping it detaches everything.
struct Loaded {
    _ebpf: std::sync::Mutex<Ebpf>,
}

/// Reads the layout of every tracepoint from tracefs. The module ones are
/// required; syscall ones are marked absent when missing.
fn read_layout(
    opts: &SourceOptions,
    details: &mut Vec<String>,
) -> Result<TracepointLayout, StartError> {
    let dirs = tracefs::candidate_dirs(&opts.host.tracefs_candidates());
    let read = |group: &str, event: &str| tracefs::read_event(&dirs, group, event);
    let (load, free, request) = match (
        read("module", "module_load"),
        read("module", "module_free"),
        read("module", "module_request"),
    ) {
        (Ok(l), Ok(f), Ok(r)) => (l, f, r),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
            let why = if opts.host.proc_modules().exists() {
                String::new()
            } else {
                " (this kernel has no loadable-module support: /proc/modules is absent)".to_owned()
            };
            return Err(StartError::new(format!("{e}{why}")));
        }
    };
    let mut layout = tracefs::module_layout(&load, &free, &request)
        .map_err(|e| StartError::new(e.to_string()))?;
    let optional = |r: Result<monitor_common::FieldOffset, tracefs::FormatError>,
                    details: &mut Vec<String>| match r {
        Ok(f) => f,
        Err(e) => {
            details.push(format!("optional tracepoint unusable: {e}"));
            monitor_common::FieldOffset::default()
        }
    };
    layout.init_exit_ret = optional(
        read("syscalls", "sys_exit_finit_module")
            .and_then(|f| tracefs::syscall_ret(&f, "syscalls:sys_exit_finit_module")),
        details,
    );
    // init_module's exit shares the program, so its layout must match.
    if layout.init_exit_ret.present == 1
        && let Ok(other) = read("syscalls", "sys_exit_init_module")
            .and_then(|f| tracefs::syscall_ret(&f, "syscalls:sys_exit_init_module"))
        && other != layout.init_exit_ret
    {
        details
            .push("sys_exit_init_module layout differs from finit_module's; not attached".into());
    }
    layout.delete_enter_name = optional(
        read("syscalls", "sys_enter_delete_module").and_then(|f| tracefs::delete_name(&f)),
        details,
    );
    layout.delete_exit_ret = optional(
        read("syscalls", "sys_exit_delete_module")
            .and_then(|f| tracefs::syscall_ret(&f, "syscalls:sys_exit_delete_module")),
        details,
    );
    Ok(layout)
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock(details: &mut Vec<String>) {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct we own.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const rlim) };
    if ret != 0 {
        details.push(format!(
            "could not raise RLIMIT_MEMLOCK ({}); kernels before 5.11 may refuse the maps",
            std::io::Error::last_os_error()
        ));
    }
}

/// Whether the tracepoint's layout fields were found (optional ones).
const fn optional_present(layout: &TracepointLayout, event: &str) -> bool {
    match event.as_bytes() {
        b"sys_exit_finit_module" | b"sys_exit_init_module" => layout.init_exit_ret.present == 1,
        b"sys_enter_delete_module" => layout.delete_enter_name.present == 1,
        b"sys_exit_delete_module" => layout.delete_exit_ret.present == 1,
        _ => false,
    }
}

fn attach(
    ebpf: &mut Ebpf,
    program: &str,
    group: &str,
    event: &str,
    loaded: &mut std::collections::BTreeSet<String>,
) -> Result<(), String> {
    let prog: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the eBPF object"))?
        .try_into()
        .map_err(|e| format!("program {program}: {e}"))?;
    if loaded.insert(program.to_owned()) {
        prog.load()
            .map_err(|e| format!("loading {program} (verifier): {e:#}"))?;
    }
    prog.attach(group, event)
        .map_err(|e| format!("attaching {program} to {group}:{event}: {e}"))?;
    Ok(())
}

/// Loads, attaches and starts reading.
pub(crate) fn start(
    opts: &SourceOptions,
    tx: mpsc::Sender<SourceMsg>,
    lost: Arc<AtomicU64>,
    cancel: CancellationToken,
) -> Result<Started, StartError> {
    if OBJECT.is_empty() {
        return Err(StartError::new(
            "this kmod-monitor was built with AYA_BUILD_SKIP=1 and carries no eBPF object; build it with `cargo xtask build`",
        ));
    }
    let mut details = Vec::new();
    let layout = read_layout(opts, &mut details)?;
    raise_memlock(&mut details);
    let mut ebpf = aya::EbpfLoader::new()
        .override_global("LAYOUT", &layout, true)
        .map_max_entries("EVENTS", opts.ring_buffer_bytes)
        .load(OBJECT)
        .map_err(|e| StartError::new(format!("loading the eBPF object: {e}")))?;
    let mut loaded = std::collections::BTreeSet::new();
    for (program, group, event) in REQUIRED {
        attach(&mut ebpf, program, group, event, &mut loaded).map_err(StartError::new)?;
    }
    let mut attached: Vec<String> = REQUIRED
        .iter()
        .map(|(_, g, e)| format!("{g}:{e}"))
        .collect();
    for (program, group, event) in OPTIONAL {
        if !optional_present(&layout, event) {
            continue;
        }
        match attach(&mut ebpf, program, group, event, &mut loaded) {
            Ok(()) => attached.push(format!("{group}:{event}")),
            Err(e) => details.push(format!("optional tracepoint not attached: {e}")),
        }
    }
    details.insert(0, format!("attached: {}", attached.join(", ")));
    let ring = RingBuf::try_from(
        ebpf.take_map("EVENTS")
            .ok_or_else(|| StartError::new("map EVENTS missing from the eBPF object"))?,
    )
    .map_err(|e| StartError::new(format!("map EVENTS: {e}")))?;
    let lost_map = match ebpf.take_map("LOST") {
        Some(Map::Array(data)) => LostCounter::map(&data)?,
        Some(_) => return Err(StartError::new("map LOST is not an array")),
        None => return Err(StartError::new("map LOST missing from the eBPF object")),
    };
    // SAFETY: the RingBuf owns its map fd for as long as it lives, and
    // the AsyncFd owns the RingBuf, so the fd stays open and unchanged for
    // the AsyncFd's whole lifetime.
    let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| StartError::new(format!("polling the ring buffer: {e}")))?;
    tokio::spawn(read_loop(fd, lost_map, tx, lost, cancel));
    Ok(Started {
        details,
        guard: Some(Box::new(Loaded {
            _ebpf: std::sync::Mutex::new(ebpf),
        })),
    })
}

/// The in-kernel loss counter, mapped read-only into this process. Reading
/// it needs no bpf(2) call, so it keeps working after the privilege drop
/// (Linux before 6.0 refuses map lookups to a task without CAP_BPF).
struct LostCounter {
    /// Start of the mapping: [`LOST_SLOTS`] per-CPU counters.
    base: NonNull<u64>,
    len: usize,
}

// SAFETY: the mapping is process-wide shared memory that the kernel
// updates atomically; the pointer may be used from any thread.
unsafe impl Send for LostCounter {}

impl LostCounter {
    /// Maps the `LOST` array (created `BPF_F_MMAPABLE`). The mapping keeps
    /// the map alive by itself, so `data` may be dropped afterwards.
    fn map(data: &MapData) -> Result<Self, StartError> {
        let len = LOST_SLOTS as usize * size_of::<u64>();
        // SAFETY: a fresh shared read-only mapping of the map's fd; the
        // kernel checks the length and offset against the map.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(StartError::new(format!(
                "mapping the eBPF loss counter (needs Linux 5.5+): {}",
                std::io::Error::last_os_error()
            )));
        }
        let base = NonNull::new(ptr.cast::<u64>())
            .ok_or_else(|| StartError::new("mmap of the eBPF loss counter returned null"))?;
        Ok(Self { base, len })
    }

    /// Events the program could not reserve so far (all CPUs).
    fn total(&self) -> u64 {
        (0..LOST_SLOTS as usize)
            .map(|slot| {
                // SAFETY: every slot lies inside the live, aligned mapping;
                // the kernel writes each with a single 8-byte store.
                unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(slot)) }.load(Ordering::Relaxed)
            })
            .sum()
    }
}

impl Drop for LostCounter {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, used no more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn drain(ring: &mut RingBuf<MapData>, batch: &mut Vec<SourceMsg>) {
    while let Some(item) = ring.next() {
        batch.push(match SourceEvent::decode(&item) {
            Ok(Decoded::Module(ev)) => SourceMsg::Event(ev),
            Ok(Decoded::AliasRequest { alias, .. }) => SourceMsg::AliasRequest { alias },
            Err(e) => SourceMsg::Undecodable {
                reason: e.to_string(),
            },
        });
    }
}

/// Drains the ring buffer whenever it is readable; after each drain checks
/// the in-kernel loss counter, so a loss is reported as soon as userspace
/// catches up (no timer needed).
async fn read_loop(
    mut fd: AsyncFd<RingBuf<MapData>>,
    lost_map: LostCounter,
    tx: mpsc::Sender<SourceMsg>,
    lost: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    let mut batch = Vec::with_capacity(256);
    loop {
        let mut guard = tokio::select! {
            () = cancel.cancelled() => return,
            g = fd.readable_mut() => match g {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "ring buffer poll failed; eBPF source stopped");
                    return;
                }
            },
        };
        drain(guard.get_inner_mut(), &mut batch);
        // Clear readiness, then drain once more: a record committed between
        // the last read and the clear would otherwise wait for the next
        // wake-up (the kernel only notifies a consumer that has caught up).
        guard.clear_ready();
        drain(guard.get_inner_mut(), &mut batch);
        drop(guard);
        for msg in batch.drain(..) {
            if tx.send(msg).await.is_err() {
                return;
            }
        }
        let total = lost_map.total();
        if total > lost.load(Ordering::Relaxed) {
            lost.store(total, Ordering::Relaxed);
            if tx.send(SourceMsg::Lost { total }).await.is_err() {
                return;
            }
        }
    }
}
