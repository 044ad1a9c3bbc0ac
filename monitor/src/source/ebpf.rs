//! The eBPF source: loads the embedded program with this kernel's
//! tracepoint layout, attaches it, and turns ring-buffer records into
//! events. Needs Linux 5.8+ (ring buffer) and CAP_BPF + CAP_PERFMON (or
//! root); 5.10 also needs RLIMIT_MEMLOCK raised, which is done here. The
//! program's own log lines go to [`super::kernel_log`].
//!
//! For tests only, [`UNSET_LAYOUT_VAR`] names a layout field the loader
//! then leaves unset, as a broken loader would; the program must drop,
//! count and log what needs it.
use std::{
    collections::VecDeque,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
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
use monitor_common::{
    DROPPED_CPU_SLOTS, DROPPED_LAYOUT_UNSET, DROPPED_NAME_UNREADABLE, DROPPED_SLOTS,
    LOG_RING_BYTES, LOST_SLOTS, NAME_LEN, NOISE_CPU_SLOTS, NOISE_DENIED_SUPPRESSED,
    NOISE_REQUEST_UNTRACKED, NOISE_SLOTS, TRACKED_SLOTS, TracepointLayout, TrackedNames,
};
use tokio_util::sync::CancellationToken;

use super::{KernelLoss, Noise, SourceMsg, SourceOptions, StartError, Started, Tracking, tracefs};
use crate::{
    event::{Decoded, SourceEvent},
    names::ModuleName,
    stages::{self, Stage},
};

/// Most ring-buffer messages taken in one go (a completed unload's record
/// is two): the ring thread applies at most this many per hold of the
/// tracker's lock, so the daemon's task
/// never waits long for it (its own catch-up before an initstate check
/// takes up to `SYNC_MAX`). Also the daemon's messages per loop turn and
/// the ring thread's queue bound.
pub const DRAIN_BATCH: usize = 256;

/// The eBPF object built by build.rs, embedded so the binary stands alone.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// Tracepoints the program must attach to, and optional ones that only
/// sharpen the lifecycle (without them, loads are confirmed through
/// /sys/module/<m>/initstate instead of the syscall's return value, and
/// unloads refused with EBUSY go unseen). Each optional one is attached
/// only when tracefs has it (`syscalls:*` needs CONFIG_FTRACE_SYSCALLS)
/// and [`read_layout`] found it usable; a load syscall's entry only with
/// its exit.
const REQUIRED: [(&str, &str, &str); 3] = [
    ("module_load", "module", "module_load"),
    ("module_free", "module", "module_free"),
    ("module_request", "module", "module_request"),
];
const OPTIONAL: [(&str, &str, &str); 6] = [
    ("init_module_exit", "syscalls", "sys_exit_finit_module"),
    ("init_module_exit", "syscalls", "sys_exit_init_module"),
    ("init_module_enter", "syscalls", "sys_enter_finit_module"),
    ("init_module_enter", "syscalls", "sys_enter_init_module"),
    ("delete_module_enter", "syscalls", "sys_enter_delete_module"),
    ("delete_module_exit", "syscalls", "sys_exit_delete_module"),
];

/// Said in the details when the syscall tracepoints are attached: the
/// kernel skips 32-bit compat tasks there (`ARCH_TRACE_IGNORE_COMPAT_SYSCALLS`
/// on x86-64 and arm64), which the program copes with as it does without
/// them.
const COMPAT_NOTE: &str = "32-bit compat tasks bypass the syscall tracepoints: their loads are confirmed through /sys/module/<m>/initstate and their unloads seen as module_free";

/// The environment variable that makes the loader leave one layout field
/// unset (`present = 0`), for the VM test of the program's diagnostics.
/// Only the daemon's own environment can set it, which is root's to
/// choose; when set, the source's details (in /status and the start-up
/// log line) say so.
pub const UNSET_LAYOUT_VAR: &str = "KMOD_MONITOR_TEST_UNSET_LAYOUT";

/// Leaves the field named `field` of `layout` unset.
///
/// # Errors
/// When no field has that name; the message lists the names.
fn unset_field(layout: &mut TracepointLayout, field: &str) -> Result<(), String> {
    let TracepointLayout {
        load_name,
        load_taints,
        free_name,
        request_name,
        request_wait,
        init_exit_ret,
        delete_enter_name,
        delete_exit_ret,
    } = layout;
    let target = match field {
        "load_name" => load_name,
        "load_taints" => load_taints,
        "free_name" => free_name,
        "request_name" => request_name,
        "request_wait" => request_wait,
        "init_exit_ret" => init_exit_ret,
        "delete_enter_name" => delete_enter_name,
        "delete_exit_ret" => delete_exit_ret,
        other => {
            return Err(format!(
                "{UNSET_LAYOUT_VAR}={other}: no such layout field; the fields are load_name, load_taints, free_name, request_name, request_wait, init_exit_ret, delete_enter_name, delete_exit_ret"
            ));
        }
    };
    *target = monitor_common::FieldOffset::default();
    Ok(())
}

/// Applies [`UNSET_LAYOUT_VAR`] when it is set, and says so in `details`.
fn test_hook(layout: &mut TracepointLayout, details: &mut Vec<String>) -> Result<(), StartError> {
    let Some(field) = std::env::var_os(UNSET_LAYOUT_VAR) else {
        return Ok(());
    };
    let field = field.to_string_lossy();
    unset_field(layout, &field).map_err(StartError::new)?;
    tracing::warn!(
        field = %field,
        "{UNSET_LAYOUT_VAR} is set: the eBPF loader leaves this layout field unset on purpose (for tests only); the events that need it are dropped and counted as lost"
    );
    details.push(format!(
        "TEST: layout field {field} left unset on purpose ({UNSET_LAYOUT_VAR})"
    ));
    Ok(())
}

/// The loaded object; dropping it detaches everything.
struct Loaded {
    _ebpf: std::sync::Mutex<Ebpf>,
}

/// Reads the layout of every tracepoint from tracefs, and returns it with
/// the optional (`syscalls:*`) events that are there and usable. The module
/// ones are required; syscall ones are marked absent when missing, and
/// each one that cannot be used is named in `details`.
fn read_layout(
    opts: &SourceOptions,
    details: &mut Vec<String>,
) -> Result<(TracepointLayout, Vec<&'static str>), StartError> {
    let dirs = tracefs::candidate_dirs(&opts.host.tracefs_candidates());
    layout_from(&dirs, &opts.host.proc_modules(), details)
}

/// [`read_layout`] from the tracefs directories `dirs`; `proc_modules`
/// only explains a missing module tracepoint.
fn layout_from(
    dirs: &[PathBuf],
    proc_modules: &Path,
    details: &mut Vec<String>,
) -> Result<(TracepointLayout, Vec<&'static str>), StartError> {
    let read = |group: &str, event: &str| tracefs::read_event(dirs, group, event);
    let (load, free, request) = match (
        read("module", "module_load"),
        read("module", "module_free"),
        read("module", "module_request"),
    ) {
        (Ok(l), Ok(f), Ok(r)) => (l, f, r),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
            let why = if proc_modules.exists() {
                String::new()
            } else {
                " (this kernel has no loadable-module support: /proc/modules is absent)".to_owned()
            };
            return Err(StartError::new(format!("{e}{why}")));
        }
    };
    let mut layout = tracefs::module_layout(&load, &free, &request)
        .map_err(|e| StartError::new(e.to_string()))?;
    // The optional events found usable, and what was wrong with the others.
    let mut found = Found {
        usable: Vec::new(),
        details,
    };
    let ret = |event: &str| {
        read("syscalls", event).and_then(|f| tracefs::syscall_ret(&f, &format!("syscalls:{event}")))
    };
    layout.init_exit_ret = found.check("sys_exit_finit_module", ret("sys_exit_finit_module"));
    // init_module's exit shares the program, so its layout must match.
    if layout.init_exit_ret.present == 1 {
        match ret("sys_exit_init_module") {
            Ok(other) if other == layout.init_exit_ret => {
                found.check("sys_exit_init_module", Ok(other));
            }
            Ok(_) => found.details.push(
                "optional tracepoint unusable: syscalls:sys_exit_init_module: its layout differs from sys_exit_finit_module's".into(),
            ),
            Err(e) => {
                found.check("sys_exit_init_module", Err(e));
            }
        }
    }
    // A load syscall's entry marks the thread for module_load; it has no
    // field the program reads, but must be in tracefs.
    for (enter, exit) in [
        ("sys_enter_finit_module", "sys_exit_finit_module"),
        ("sys_enter_init_module", "sys_exit_init_module"),
    ] {
        if found.usable.contains(&exit) {
            let there = read("syscalls", enter).map(|_| monitor_common::FieldOffset::default());
            found.check(enter, there);
        }
    }
    layout.delete_enter_name = found.check(
        "sys_enter_delete_module",
        read("syscalls", "sys_enter_delete_module").and_then(|f| tracefs::delete_name(&f)),
    );
    layout.delete_exit_ret = found.check("sys_exit_delete_module", ret("sys_exit_delete_module"));
    let Found { usable, details } = found;
    let formats_in = dirs
        .iter()
        .find(|d| d.join("events/module/module_load/format").is_file())
        .map_or_else(|| "?".to_owned(), |d| d.display().to_string());
    details.push(format!("tracepoint formats read from {formats_in}"));
    Ok((layout, usable))
}

/// The optional tracepoints [`read_layout`] found usable so far, and the
/// source's details, where each unusable one is named.
struct Found<'a> {
    usable: Vec<&'static str>,
    details: &'a mut Vec<String>,
}

impl Found<'_> {
    /// Records whether `event` is usable; returns its field (absent when
    /// not).
    fn check(
        &mut self,
        event: &'static str,
        field: Result<monitor_common::FieldOffset, tracefs::FormatError>,
    ) -> monitor_common::FieldOffset {
        match field {
            Ok(f) => {
                self.usable.push(event);
                f
            }
            Err(e) => {
                let hint = if matches!(e, tracefs::FormatError::NotFound { .. }) {
                    " (syscall tracepoints need a kernel with CONFIG_FTRACE_SYSCALLS)"
                } else {
                    ""
                };
                self.details
                    .push(format!("optional tracepoint unusable: {e}{hint}"));
                monitor_common::FieldOffset::default()
            }
        }
    }
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

/// Loads (once) and attaches `program`; the first load of each program
/// adds its size to `sizes`.
fn attach(
    ebpf: &mut Ebpf,
    program: &str,
    group: &str,
    event: &str,
    loaded: &mut std::collections::BTreeSet<String>,
    sizes: &mut Vec<String>,
) -> Result<(), String> {
    let prog: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the eBPF object"))?
        .try_into()
        .map_err(|e| format!("program {program}: {e}"))?;
    if loaded.insert(program.to_owned()) {
        prog.load()
            .map_err(|e| format!("loading {program} (verifier): {e:#}"))?;
        sizes.push(program_size(program, prog));
    }
    prog.attach(group, event)
        .map_err(|e| format!("attaching {program} to {group}:{event}: {e}"))?;
    Ok(())
}

/// `program`'s size as the kernel reports it: the instructions after
/// translation and, on Linux 5.16+, how many the verifier processed.
fn program_size(program: &str, prog: &TracePoint) -> String {
    match prog.info() {
        Ok(info) => {
            let insns = info.size_translated().map_or(0, |b| b / 8);
            match info.verified_instruction_count() {
                Some(verified) => format!("{program} {insns} ({verified} verified)"),
                None => format!("{program} {insns}"),
            }
        }
        Err(e) => format!("{program} ? ({e})"),
    }
}

/// The program loaded and attached, its ring buffer not yet read: what
/// [`start`] turns into the daemon's [`RingFeed`], and what the benchmark's floor
/// (`kmod-monitor-floor`, the `bench` feature) drains itself.
pub struct Attached {
    ebpf: Ebpf,
    /// The `EVENTS` ring buffer.
    pub ring: RingBuf<MapData>,
    losses: Arc<Losses>,
    noise: Counters,
    tracked: TrackedTable,
    /// What attached and what did not, for /status.
    pub details: Vec<String>,
}

/// Loads the embedded program with this kernel's tracepoint layout, fills
/// the name filter with `opts.tracked` and attaches every tracepoint it
/// can use. With `kernel_log`, the program's aya-log lines are forwarded
/// to tracing until it is cancelled (the floor reads none).
///
/// # Errors
/// When the binary carries no program, a required tracepoint is missing,
/// or loading, verifying or attaching fails.
pub fn attach_all(
    opts: &SourceOptions,
    kernel_log: Option<&CancellationToken>,
) -> Result<Attached, StartError> {
    if OBJECT.is_empty() {
        return Err(StartError::new(
            "this kmod-monitor was built with AYA_BUILD_SKIP=1 and carries no eBPF object; build it with `cargo xtask build`",
        ));
    }
    let mut details = Vec::new();
    let (mut layout, usable) = read_layout(opts, &mut details)?;
    test_hook(&mut layout, &mut details)?;
    raise_memlock(&mut details);
    let mut ebpf = aya::EbpfLoader::new()
        .override_global("LAYOUT", &layout, true)
        .map_max_entries("EVENTS", opts.ring_buffer_bytes)
        .map_max_entries("AYA_LOGS", LOG_RING_BYTES)
        .load(OBJECT)
        .map_err(|e| StartError::new(format!("loading the eBPF object: {e}")))?;
    // Before the programs attach, so no line is written before it is read.
    if let Some(cancel) = kernel_log {
        super::kernel_log::start(&mut ebpf, cancel.clone()).map_err(StartError::new)?;
    }
    let tracked = match ebpf.map("TRACKED") {
        Some(Map::Array(data)) => TrackedTable::map(data)?,
        Some(_) => return Err(StartError::new("map TRACKED is not an array")),
        None => return Err(StartError::new("map TRACKED missing from the eBPF object")),
    };
    // Before the programs attach, so the filter holds from the first event.
    let tracking = tracked.write(&opts.tracked);
    details.push(tracking.describe());
    let mut loaded = std::collections::BTreeSet::new();
    let mut sizes = Vec::new();
    for (program, group, event) in REQUIRED {
        attach(&mut ebpf, program, group, event, &mut loaded, &mut sizes)
            .map_err(StartError::new)?;
    }
    let mut attached: Vec<String> = REQUIRED
        .iter()
        .map(|(_, g, e)| format!("{g}:{e}"))
        .collect();
    for (program, group, event) in OPTIONAL {
        if !usable.contains(&event) {
            continue;
        }
        // The entry of a load syscall whose exit did not attach would mark
        // threads no exit clears.
        let exit = event.replacen("sys_enter_", "sys_exit_", 1);
        if program == "init_module_enter" && !attached.contains(&format!("{group}:{exit}")) {
            details.push(format!(
                "optional tracepoint not attached: {group}:{event}: {group}:{exit} is not attached"
            ));
            continue;
        }
        match attach(&mut ebpf, program, group, event, &mut loaded, &mut sizes) {
            Ok(()) => attached.push(format!("{group}:{event}")),
            Err(e) => details.push(format!("optional tracepoint not attached: {e}")),
        }
    }
    if attached.iter().any(|a| a.starts_with("syscalls:")) {
        details.push(COMPAT_NOTE.to_owned());
    }
    details.insert(0, format!("attached: {}", attached.join(", ")));
    details.push(format!("program instructions: {}", sizes.join(", ")));
    let ring = RingBuf::try_from(
        ebpf.take_map("EVENTS")
            .ok_or_else(|| StartError::new("map EVENTS missing from the eBPF object"))?,
    )
    .map_err(|e| StartError::new(format!("map EVENTS: {e}")))?;
    let losses = Arc::new(Losses {
        reserve: take_counters(&mut ebpf, "LOST", LOST_SLOTS)?,
        dropped: take_counters(&mut ebpf, "DROPPED", DROPPED_SLOTS)?,
    });
    let noise = match ebpf.take_map("NOISE") {
        Some(Map::Array(data)) => Counters::map(&data, NOISE_SLOTS, "NOISE")?,
        Some(_) => return Err(StartError::new("map NOISE is not an array")),
        None => return Err(StartError::new("map NOISE missing from the eBPF object")),
    };
    Ok(Attached {
        ebpf,
        ring,
        losses,
        noise,
        tracked,
        details,
    })
}

impl Attached {
    /// Events the program could not deliver so far (`LOST` and `DROPPED`).
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.losses.total()
    }
}

/// Loads and attaches; the daemon reads the ring itself ([`RingFeed`]): its
/// task during start-up, then its ring thread.
pub(crate) fn start(
    opts: &SourceOptions,
    lost: Arc<AtomicU64>,
    cancel: &CancellationToken,
) -> Result<Started, StartError> {
    let Attached {
        ebpf,
        ring,
        losses,
        noise: noise_map,
        tracked,
        details,
    } = attach_all(opts, Some(cancel))?;
    Ok(Started {
        details,
        guard: Some(Box::new(Loaded {
            _ebpf: std::sync::Mutex::new(ebpf),
        })),
        control: Some(super::Control {
            tracked: Box::new(tracked),
            noise: Box::new(noise_map),
            loss: Box::new(Arc::clone(&losses)),
        }),
        sync: None,
        ring: Some(RingFeed {
            ring,
            losses,
            lost,
            pending: VecDeque::new(),
        }),
    })
}

/// Maps the counter array `name` of `slots` u64 entries (see [`Counters`]).
fn take_counters(ebpf: &mut Ebpf, name: &str, slots: u32) -> Result<Counters, StartError> {
    match ebpf.take_map(name) {
        Some(Map::Array(data)) => Counters::map(&data, slots, name),
        Some(_) => Err(StartError::new(format!("map {name} is not an array"))),
        None => Err(StartError::new(format!(
            "map {name} missing from the eBPF object"
        ))),
    }
}

/// What the program could not deliver: failed reserves in `EVENTS`
/// (`LOST`) and events dropped for a field it could not read (`DROPPED`).
/// Their sum is the source's loss total.
struct Losses {
    reserve: Counters,
    dropped: Counters,
}

impl Losses {
    fn total(&self) -> u64 {
        self.reserve.total() + self.dropped.total()
    }
}

impl KernelLoss for Arc<Losses> {
    fn ring_reserve_failed(&self) -> u64 {
        self.reserve.total()
    }

    fn name_unreadable(&self) -> u64 {
        self.dropped.sum(
            DROPPED_NAME_UNREADABLE * DROPPED_CPU_SLOTS,
            DROPPED_CPU_SLOTS,
        )
    }

    fn layout_unset(&self) -> u64 {
        self.dropped
            .sum(DROPPED_LAYOUT_UNSET * DROPPED_CPU_SLOTS, DROPPED_CPU_SLOTS)
    }
}

/// An in-kernel counter array (`LOST`, `NOISE`, `DROPPED`), mapped read-only into
/// this process. Reading it needs no bpf(2) call, so it keeps working
/// after the privilege drop (Linux before 6.0 refuses map lookups to a
/// task without CAP_BPF).
struct Counters {
    /// Start of the mapping: `slots` u64 counters.
    base: NonNull<u64>,
    slots: u32,
}

// SAFETY: the mapping is process-wide shared memory that the kernel
// updates with single 8-byte stores; the pointer may be used from any
// thread, and this type only reads through it.
unsafe impl Send for Counters {}
// SAFETY: as above; concurrent reads of shared memory are fine.
unsafe impl Sync for Counters {}

impl Counters {
    /// Maps an array created `BPF_F_MMAPABLE` with `slots` u64 entries. The
    /// mapping keeps the map alive by itself, so `data` may be dropped
    /// afterwards.
    fn map(data: &MapData, slots: u32, name: &str) -> Result<Self, StartError> {
        let len = slots as usize * size_of::<u64>();
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
                "mapping the eBPF counters {name} (needs Linux 5.5+): {}",
                std::io::Error::last_os_error()
            )));
        }
        let base = NonNull::new(ptr.cast::<u64>())
            .ok_or_else(|| StartError::new(format!("mmap of {name} returned null")))?;
        Ok(Self { base, slots })
    }

    /// The sum of `count` slots from `first` (all CPUs of one counter).
    fn sum(&self, first: u32, count: u32) -> u64 {
        (first..first.saturating_add(count).min(self.slots))
            .map(|slot| {
                // SAFETY: every slot below `slots` lies inside the live,
                // aligned mapping; the kernel writes each with a single
                // 8-byte store.
                unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(slot as usize)) }
                    .load(Ordering::Relaxed)
            })
            .sum()
    }

    /// The sum of every slot.
    fn total(&self) -> u64 {
        self.sum(0, self.slots)
    }
}

impl Noise for Counters {
    fn requests_untracked(&self) -> u64 {
        self.sum(NOISE_REQUEST_UNTRACKED * NOISE_CPU_SLOTS, NOISE_CPU_SLOTS)
    }

    fn denied_suppressed(&self) -> u64 {
        self.sum(NOISE_DENIED_SUPPRESSED * NOISE_CPU_SLOTS, NOISE_CPU_SLOTS)
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, used no more.
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast(),
                self.slots as usize * size_of::<u64>(),
            )
        };
    }
}

/// The `TRACKED` array, mapped read-write: the names the program lets
/// through (see [`TrackedNames`]).
struct TrackedTable {
    base: NonNull<u64>,
}

// SAFETY: shared memory written only through `write`, which the owner
// serialises (`&self` methods are called from the daemon's one task);
// the kernel only reads it.
unsafe impl Send for TrackedTable {}
// SAFETY: as above.
unsafe impl Sync for TrackedTable {}

/// Words of the [`TrackedNames`] value: the `filter` word, then 8 per name.
const TRACKED_WORDS: usize = size_of::<TrackedNames>() / size_of::<u64>();

impl TrackedTable {
    fn map(data: &MapData) -> Result<Self, StartError> {
        // SAFETY: a fresh shared read-write mapping of the map's fd (created
        // BPF_F_MMAPABLE, never frozen); the kernel checks the length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size_of::<TrackedNames>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(StartError::new(format!(
                "mapping the eBPF name filter TRACKED (needs Linux 5.5+): {}",
                std::io::Error::last_os_error()
            )));
        }
        let base = NonNull::new(ptr.cast::<u64>())
            .ok_or_else(|| StartError::new("mmap of TRACKED returned null"))?;
        Ok(Self { base })
    }

    fn store(&self, word: usize, value: u64) {
        if word < TRACKED_WORDS {
            // SAFETY: `word` is inside the live, 8-aligned mapping; an
            // atomic store so the kernel never reads a torn word.
            unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(word)) }
                .store(value, Ordering::Relaxed);
        }
    }
}

impl Tracking for TrackedTable {
    /// Rewrites the table: filtering off while the slots change, then on
    /// again if every name fit (else left off, and said so).
    fn write(&self, names: &[ModuleName]) -> super::TrackedOutcome {
        self.store(0, 0);
        std::sync::atomic::fence(Ordering::SeqCst);
        let fitting: Vec<&ModuleName> = names
            .iter()
            .filter(|n| n.as_str().len() < NAME_LEN)
            .collect();
        let fits = fitting.len() <= TRACKED_SLOTS && fitting.len() == names.len();
        for slot in 0..TRACKED_SLOTS {
            let words = fitting
                .get(slot)
                .filter(|_| fits)
                .map_or([0; NAME_LEN / 8], |n| name_words(n.as_str()));
            for (i, w) in words.into_iter().enumerate() {
                self.store(1 + slot * (NAME_LEN / 8) + i, w);
            }
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        if fits {
            self.store(0, 1);
        }
        super::TrackedOutcome {
            names: names.len(),
            filtering: fits,
        }
    }
}

impl Drop for TrackedTable {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, used no more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), size_of::<TrackedNames>()) };
    }
}

/// A name as the program compares it: NUL-padded bytes, `-` written `_`,
/// as eight little-endian words (see `name_words` in monitor-ebpf).
fn name_words(name: &str) -> [u64; NAME_LEN / 8] {
    let mut words = [0u64; NAME_LEN / 8];
    for (i, b) in name.bytes().take(NAME_LEN - 1).enumerate() {
        let b = if b == b'-' { b'_' } else { b };
        words[i / 8] |= u64::from(b) << ((i % 8) * 8);
    }
    words
}

/// One record as the daemon takes it: one message, or two for an unload
/// whose `module_free` carries its begin (the begin first).
fn messages(item: &[u8]) -> (SourceMsg, Option<SourceMsg>) {
    let drained = stages::now();
    let taken = |ev: SourceEvent| {
        stages::mark_woke(ev.boot_ns);
        stages::mark_at(ev.boot_ns, Stage::Drained, drained);
        stages::mark(ev.boot_ns, Stage::Decoded);
        SourceMsg::Event(ev)
    };
    let msg = match SourceEvent::decode(item) {
        Ok(Decoded::Module(ev)) => taken(ev),
        Ok(Decoded::Unloaded { begin, free }) => {
            let begin = taken(begin);
            return (begin, Some(taken(free)));
        }
        Ok(Decoded::AliasRequest { alias, .. }) => SourceMsg::AliasRequest { alias },
        Ok(Decoded::UnloadDenied {
            module,
            actor,
            boot_ns,
        }) => SourceMsg::UnloadDenied {
            module,
            actor,
            boot_ns,
        },
        Err(e) if e.is_corrupt() => SourceMsg::Undecodable {
            reason: e.to_string(),
        },
        Err(e) => SourceMsg::Ignored {
            reason: e.to_string(),
        },
    };
    (msg, None)
}

/// Hands at most `limit` messages to `take`, in order: first those in
/// `held`, then those of the records `next` takes. A record's second
/// message that does not fit is held for the next call. Returns how many
/// were handed; fewer than `limit` means `held` and the records ran out.
fn drain(
    held: &mut VecDeque<SourceMsg>,
    limit: usize,
    mut next: impl FnMut() -> Option<(SourceMsg, Option<SourceMsg>)>,
    mut take: impl FnMut(SourceMsg),
) -> usize {
    let mut taken = 0;
    while taken < limit {
        let msg = match held.pop_front() {
            Some(m) => m,
            None => {
                let Some((first, second)) = next() else { break };
                held.extend(second);
                first
            }
        };
        take(msg);
        taken += 1;
    }
    taken
}

/// The next record of `ring` as messages (see [`messages`]).
fn next_record(ring: &mut RingBuf<MapData>) -> Option<(SourceMsg, Option<SourceMsg>)> {
    ring.next().map(|item| messages(&item))
}

/// The ring buffer as the daemon reads it: by the daemon's task during
/// start-up ([`try_recv`](Self::try_recv)), then by the daemon's ring
/// thread, which waits on [`fd`](Self::fd) with poll(2) and takes records
/// with [`drain`](Self::drain). A record leaves the ring only into the
/// caller's hands (or `pending`, for the next `try_recv`).
pub(crate) struct RingFeed {
    ring: RingBuf<MapData>,
    losses: Arc<Losses>,
    /// The source's loss total, as last reported.
    lost: Arc<AtomicU64>,
    /// Messages taken from the ring and not yet handed over: by
    /// [`try_recv`](Self::try_recv), and a record's second message that a
    /// drain's limit left out.
    pending: VecDeque<SourceMsg>,
}

impl RingFeed {
    /// A message the ring already holds, without waiting: everything
    /// committed before the call is reachable this way (the start-up drain
    /// relies on it).
    pub(crate) fn try_recv(&mut self) -> Option<SourceMsg> {
        if self.pending.is_empty() {
            let Self {
                ring,
                losses,
                lost,
                pending,
            } = self;
            for _ in 0..DRAIN_BATCH {
                let Some((first, second)) = next_record(ring) else {
                    break;
                };
                pending.push_back(first);
                pending.extend(second);
            }
            if let Some(m) = note_losses(losses, lost) {
                pending.push_back(m);
            }
        }
        self.pending.pop_front()
    }

    /// Hands at most `limit` messages to `take`, in order: any left from
    /// [`try_recv`](Self::try_recv), then the ring's, then a
    /// [`SourceMsg::Lost`] if the in-kernel loss count grew (one past
    /// `limit`, so a loss is reported as soon as the reader catches up;
    /// never while it holds the second half of a record).
    /// Returns how many messages it handed over, the loss aside; fewer
    /// than `limit` means the ring was empty.
    pub(crate) fn drain(&mut self, limit: usize, mut take: impl FnMut(SourceMsg)) -> usize {
        let ring = &mut self.ring;
        let taken = drain(&mut self.pending, limit, || next_record(ring), &mut take);
        // Not between the two halves of an unload's record.
        if self.pending.is_empty()
            && let Some(m) = note_losses(&self.losses, &self.lost)
        {
            take(m);
        }
        taken
    }

    /// The ring's file descriptor, readable while it holds a record.
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.ring.as_fd()
    }
}

/// After a drain: a grown in-kernel loss count becomes a message behind the
/// records taken (no timer needed).
fn note_losses(losses: &Losses, lost: &AtomicU64) -> Option<SourceMsg> {
    let total = losses.total();
    (total > lost.load(Ordering::Relaxed)).then(|| {
        lost.store(total, Ordering::Relaxed);
        SourceMsg::Lost { total }
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use monitor_common::{EventKind, ModuleEvent};

    use super::*;

    #[test]
    fn the_test_hook_unsets_exactly_the_field_it_names() {
        let set = monitor_common::FieldOffset {
            offset: 8,
            present: 1,
        };
        let full = TracepointLayout {
            load_name: set,
            load_taints: set,
            free_name: set,
            request_name: set,
            request_wait: set,
            init_exit_ret: set,
            delete_enter_name: set,
            delete_exit_ret: set,
        };
        let mut layout = full;
        unset_field(&mut layout, "free_name").unwrap();
        assert_eq!(
            layout,
            TracepointLayout {
                free_name: monitor_common::FieldOffset::default(),
                ..full
            }
        );
        for name in [
            "load_name",
            "load_taints",
            "request_name",
            "request_wait",
            "init_exit_ret",
            "delete_enter_name",
            "delete_exit_ret",
        ] {
            let mut layout = full;
            unset_field(&mut layout, name).unwrap();
            assert_ne!(layout, full, "{name}");
        }
        let err = unset_field(&mut layout, "free-name").unwrap_err();
        assert!(
            err.starts_with("KMOD_MONITOR_TEST_UNSET_LAYOUT=free-name: no such layout field")
                && err.contains("delete_exit_ret"),
            "{err}"
        );
    }

    /// A kernel record's bytes, as the ring holds them.
    fn record(kind: EventKind, name: &str, boot_ns: u64, begun_ns: u64) -> Vec<u8> {
        let mut ev = ModuleEvent::ZERO;
        ev.kind = kind as u32;
        ev.boot_ns = boot_ns;
        ev.begun_ns = begun_ns;
        ev.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: ModuleEvent is repr(C) plain data without padding (the
        // layout asserts in monitor-common), so its bytes are initialised.
        unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(&ev).cast::<u8>(),
                size_of::<ModuleEvent>(),
            )
        }
        .to_vec()
    }

    /// What a drain hands over, as (kind, boot_ns) of each event.
    fn events(msgs: &[SourceMsg]) -> Vec<(crate::event::Raw, u64)> {
        msgs.iter()
            .map(|m| match m {
                SourceMsg::Event(ev) => (ev.raw, ev.boot_ns),
                other => panic!("not a module event: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn an_unload_record_is_handed_over_as_begin_then_free_across_drains() {
        use crate::event::Raw;
        let ring = [
            record(EventKind::Load, "dm_crypt", 1, 0),
            record(EventKind::Free, "nvme_tcp", 3, 2),
            record(EventKind::Free, "dm_crypt", 4, 0),
        ];
        let mut records = ring.iter();
        let mut next = || records.next().map(|r| messages(r));
        let mut held = VecDeque::new();
        let mut out = Vec::new();
        // The limit falls between the unload's two events: the free waits
        // for the next drain, ahead of any later record.
        assert_eq!(drain(&mut held, 2, &mut next, |m| out.push(m)), 2);
        assert_eq!(
            events(&out),
            [(Raw::Load, 1), (Raw::UnloadBegin, 2)],
            "the begin first, at its own time"
        );
        assert_eq!(held.len(), 1);
        out.clear();
        assert_eq!(drain(&mut held, 8, &mut next, |m| out.push(m)), 2);
        assert_eq!(events(&out), [(Raw::Free, 3), (Raw::Free, 4)]);
        assert!(held.is_empty());
        // Fewer than the limit: the records ran out.
        assert_eq!(drain(&mut held, 8, &mut next, |m| out.push(m)), 0);
    }

    #[test]
    fn names_are_packed_as_the_program_compares_them() {
        let w = name_words("dm-crypt");
        assert_eq!(w[0], u64::from_le_bytes(*b"dm_crypt"));
        assert!(w[1..].iter().all(|&x| x == 0));
        // Longer than a word, and capped below NAME_LEN (room for the NUL).
        let long = "a".repeat(100);
        let w = name_words(&long);
        assert_eq!(w[7] >> 56, 0, "the last byte stays NUL");
    }

    /// Every optional tracepoint, in [`OPTIONAL`]'s order.
    const ALL_OPTIONAL: [&str; 6] = [
        "sys_exit_finit_module",
        "sys_exit_init_module",
        "sys_enter_finit_module",
        "sys_enter_init_module",
        "sys_enter_delete_module",
        "sys_exit_delete_module",
    ];

    /// A tracefs with the real format files of `kernel` (a fixture
    /// suffix such as `debian-6.1-arm64`) for `events`.
    fn tracefs(kernel: &str, events: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/source/fixtures");
        for event in events {
            let group = if event.starts_with("module_") {
                "module"
            } else {
                "syscalls"
            };
            let to = dir.path().join("events").join(group).join(event);
            fs::create_dir_all(&to).unwrap();
            let from = fixtures.join(format!("{event}.format.{kernel}"));
            fs::copy(&from, to.join("format"))
                .unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        }
        dir
    }

    fn layout(dir: &Path) -> (TracepointLayout, Vec<&'static str>, Vec<String>) {
        let mut details = Vec::new();
        let (layout, usable) = layout_from(
            &[dir.to_path_buf()],
            Path::new("/nonexistent"),
            &mut details,
        )
        .unwrap_or_else(|e| panic!("{e}: {details:?}"));
        (layout, usable, details)
    }

    const MODULE_EVENTS: [&str; 3] = ["module_load", "module_free", "module_request"];

    #[test]
    fn every_test_kernel_has_every_tracepoint_the_program_uses() {
        for kernel in [
            "debian-5.10",
            "debian-6.1",
            "debian-6.12",
            "debian-6.17",
            "debian-6.1-arm64",
            "debian-6.12-arm64",
            "debian-6.17-arm64",
        ] {
            let events: Vec<&str> = MODULE_EVENTS.iter().chain(&ALL_OPTIONAL).copied().collect();
            let dir = tracefs(kernel, &events);
            let (layout, usable, details) = layout(dir.path());
            assert_eq!(usable, ALL_OPTIONAL, "{kernel}: {details:?}");
            assert_eq!(
                details,
                [format!(
                    "tracepoint formats read from {}",
                    dir.path().display()
                )],
                "{kernel}"
            );
            assert_eq!(
                (layout.init_exit_ret.offset, layout.delete_exit_ret.offset),
                (16, 16),
                "{kernel}"
            );
        }
    }

    #[test]
    fn without_syscall_tracepoints_each_is_named_with_the_config_option() {
        let dir = tracefs("debian-6.12-arm64", &MODULE_EVENTS);
        let (layout, usable, details) = layout(dir.path());
        assert!(usable.is_empty(), "{usable:?}");
        assert_eq!(layout.init_exit_ret.present, 0);
        assert_eq!(layout.delete_enter_name.present, 0);
        // The load entries are not even looked for without their exits.
        let unusable: Vec<&String> = details
            .iter()
            .filter(|d| d.starts_with("optional tracepoint unusable: "))
            .collect();
        assert_eq!(unusable.len(), 3, "{details:?}");
        for d in unusable {
            assert!(
                d.ends_with("(syscall tracepoints need a kernel with CONFIG_FTRACE_SYSCALLS)"),
                "{d}"
            );
        }
        assert!(
            details[0].contains("tracepoint syscalls:sys_exit_finit_module not found under"),
            "{details:?}"
        );
    }

    #[test]
    fn a_load_syscall_entry_is_used_only_with_its_exit() {
        let events: Vec<&str> = MODULE_EVENTS
            .iter()
            .chain(&ALL_OPTIONAL)
            .copied()
            .filter(|e| *e != "sys_exit_init_module")
            .collect();
        let dir = tracefs("debian-6.1-arm64", &events);
        let (_, usable, details) = layout(dir.path());
        assert_eq!(
            usable,
            [
                "sys_exit_finit_module",
                "sys_enter_finit_module",
                "sys_enter_delete_module",
                "sys_exit_delete_module"
            ],
            "{details:?}"
        );
    }

    #[test]
    fn an_init_module_exit_unlike_finit_modules_is_not_used() {
        let events: Vec<&str> = MODULE_EVENTS.iter().chain(&ALL_OPTIONAL).copied().collect();
        let dir = tracefs("debian-6.1", &events);
        let format = dir
            .path()
            .join("events/syscalls/sys_exit_init_module/format");
        let text = fs::read_to_string(&format).unwrap();
        fs::write(&format, text.replace("offset:16;", "offset:24;")).unwrap();
        let (_, usable, details) = layout(dir.path());
        assert!(!usable.contains(&"sys_exit_init_module"), "{usable:?}");
        assert!(!usable.contains(&"sys_enter_init_module"), "{usable:?}");
        assert!(
            details.contains(
                &"optional tracepoint unusable: syscalls:sys_exit_init_module: its layout differs from sys_exit_finit_module's"
                    .to_owned()
            ),
            "{details:?}"
        );
    }

    #[test]
    fn missing_module_tracepoints_stop_the_source() {
        let dir = tracefs("debian-6.1", &["module_load", "module_free"]);
        let err = layout_from(
            &[dir.path().to_path_buf()],
            Path::new("/nonexistent"),
            &mut Vec::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("tracepoint module:module_request not found under")
                && err.ends_with(
                    "(this kernel has no loadable-module support: /proc/modules is absent)"
                ),
            "{err}"
        );
    }
}
