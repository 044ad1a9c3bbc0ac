//! kmod-monitor's kernel side: the module tracepoints (and the syscall exits
//! that tell whether a load or unload really succeeded) feed one
//! `ModuleEvent` each into the `EVENTS` ring buffer.
//!
//! Tracepoint field offsets are not compiled in: userspace reads them from
//! tracefs `events/*/*/format` and sets the `LAYOUT` global at load time.
//! Requires Linux 5.8 (ring buffer, `bpf_ktime_get_boot_ns`).
//!
//! Two of the events can be caused by any unprivileged task:
//! `module_request` (an exec of an unknown binary format asks for
//! `binfmt-…`, a socket for `net-pf-…`) and `delete_module`, whose entry
//! fires before the kernel checks CAP_SYS_MODULE. So that a flood of them
//! can never crowd a required module's event out of the ring:
//! - both are filtered against `TRACKED`, the names userspace follows;
//!   other requests are only counted in `NOISE`, other deletes ignored;
//! - a `delete_module` is held in `PENDING` until it is known to matter:
//!   a completed unload's begin travels in its `module_free` record
//!   (`begun_ns`), any other's `UnloadBegin` is sent when the syscall
//!   returns, and an unload refused with EPERM becomes one rate-limited
//!   `UnloadDenied` (the rest counted in `NOISE`) instead of a begin/fail
//!   pair.
//!
//! What userspace cannot see otherwise goes to the daemon's log through
//! aya-log (`AYA_LOGS`, a small ring of its own): a module name that could
//! not be read, a layout field the loader did not set, and a failed
//! reserve in `EVENTS`. Each drops an event, so each is also counted
//! (`DROPPED`, `LOST`), and each kind of line is rate-limited to one per
//! second per CPU (`LOG_LAST`). No log site is reachable by an
//! unprivileged task except through those limits: a `delete_module` whose
//! name pointer cannot be read is the caller's bad argument and is
//! neither logged nor counted.
//!
//! 32-bit compat tasks (ia32 on x86-64, AArch32 on arm64) call the module
//! syscalls by other numbers, and the kernel skips them at the `syscalls:*`
//! tracepoints (`ARCH_TRACE_IGNORE_COMPAT_SYSCALLS`). For them only the
//! module tracepoints fire: their loads come without a syscall result (the
//! daemon confirms them through /sys/module/<m>/initstate) and their
//! unloads as `module_free` alone. The load path keys on the syscall entry
//! so that such a load leaves nothing in `PENDING`.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _, Global,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_smp_processor_id, bpf_ktime_get_boot_ns,
        bpf_probe_read_kernel_str_bytes, bpf_probe_read_user_str_bytes,
    },
    macros::{map, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::{error, warn};
use monitor_common::{
    DEFAULT_RING_BYTES, DENIED_PER_SECOND_PER_CPU, DROPPED_CPU_SLOTS, DROPPED_LAYOUT_UNSET,
    DROPPED_NAME_UNREADABLE, DROPPED_SLOTS, EventKind, FieldOffset, LOG_INTERVAL_NS, LOG_KINDS,
    LOG_LAYOUT_UNSET, LOG_NAME_UNREADABLE, LOG_RESERVE_FAILED, LOST_MAP_FLAGS, LOST_SLOTS,
    ModuleEvent, NAME_LEN, NOISE_CPU_SLOTS, NOISE_DENIED_SUPPRESSED, NOISE_REQUEST_UNTRACKED,
    NOISE_SLOTS, TRACKED_SLOTS, TracepointLayout, TrackedNames,
};

/// Field offsets for this kernel, set by the loader.
#[unsafe(no_mangle)]
static LAYOUT: Global<TracepointLayout> = Global::new(TracepointLayout {
    load_name: FieldOffset {
        offset: 0,
        present: 0,
    },
    load_taints: FieldOffset {
        offset: 0,
        present: 0,
    },
    free_name: FieldOffset {
        offset: 0,
        present: 0,
    },
    request_name: FieldOffset {
        offset: 0,
        present: 0,
    },
    request_wait: FieldOffset {
        offset: 0,
        present: 0,
    },
    init_exit_ret: FieldOffset {
        offset: 0,
        present: 0,
    },
    delete_enter_name: FieldOffset {
        offset: 0,
        present: 0,
    },
    delete_exit_ret: FieldOffset {
        offset: 0,
        present: 0,
    },
});

/// Module events for userspace. The size is overridden at load time
/// (`--ring-buffer-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Events that could not be reserved in `EVENTS`, one slot per CPU (the
/// slot of CPU `n` is `n % LOST_SLOTS`); userspace sums the slots. A plain
/// array rather than a per-CPU one because it is mmapable
/// (`BPF_F_MMAPABLE`, Linux 5.5+): userspace must read it after dropping
/// its capabilities, and Linux before 6.0 refuses every bpf(2) command,
/// map lookups included, to a task without CAP_BPF/CAP_SYS_ADMIN.
#[map]
static LOST: Array<u64> = Array::with_max_entries(LOST_SLOTS, LOST_MAP_FLAGS);

/// What a thread is in the middle of: a load syscall, from its entry (no
/// name yet) and once `module_load` named the module, until its
/// `finit_module`/`init_module` returns (so the exit can say which load it
/// finished), or a `delete_module` of a tracked module, until the syscall
/// returns.
#[repr(C)]
#[derive(Clone, Copy)]
struct Pending {
    /// `bpf_ktime_get_boot_ns` at the start (an unload's begin time).
    boot_ns: u64,
    /// [`PENDING_LOAD_ENTERED`], [`PENDING_LOAD`] or [`PENDING_DELETE`].
    kind: u32,
    /// 1 once the unload's begin was sent, in `module_free`'s record.
    begun: u32,
    name: [u8; NAME_LEN],
}

const PENDING_LOAD: u32 = 1;
const PENDING_DELETE: u32 = 2;
/// A load syscall has entered but not (yet) fired `module_load`.
const PENDING_LOAD_ENTERED: u32 = 3;
/// `-EPERM`: `delete_module` without CAP_SYS_MODULE.
const EPERM: i64 = -1;
const NS_PER_SECOND: u64 = 1_000_000_000;

/// Per thread id. LRU, so an entry whose exit never came (a task killed in
/// between) is evicted instead of filling the map; an evicted load or
/// delete only loses its syscall-exit detail, never the `module_free`.
#[map]
static PENDING: LruHashMap<u32, Pending> = LruHashMap::with_max_entries(4096, 0);

/// The names userspace follows (see [`TrackedNames`]); written by
/// userspace through its mapping.
#[map]
static TRACKED: Array<TrackedNames> = Array::with_max_entries(1, LOST_MAP_FLAGS);

/// Events kept out of the ring on purpose, per counter and CPU slot (see
/// `monitor_common::NOISE_SLOTS`); mmapable like `LOST`.
#[map]
static NOISE: Array<u64> = Array::with_max_entries(NOISE_SLOTS, LOST_MAP_FLAGS);

/// This CPU's `UnloadDenied` budget: the second it started and the events
/// sent in it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Budget {
    second_start: u64,
    sent: u64,
}

#[map]
static DENIED_BUDGET: PerCpuArray<Budget> = PerCpuArray::with_max_entries(1, 0);

/// Events dropped because a field could not be read, per counter and CPU
/// slot (see `monitor_common::DROPPED_SLOTS`); mmapable like `LOST`.
#[map]
static DROPPED: Array<u64> = Array::with_max_entries(DROPPED_SLOTS, LOST_MAP_FLAGS);

/// When this CPU last logged each kind of line (`LOG_*`), boot ns.
#[map]
static LOG_LAST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOG_KINDS, 0);

/// Why a module name was not read.
enum NameError {
    /// The loader left the field unset (`present == 0`).
    Unset,
    /// The read failed (the helper's error), or gave an empty name, which
    /// no module has: the offset does not match this kernel's record.
    Unreadable(i64),
}

/// Reads a `__data_loc char[]` field into `dst`.
///
/// The location word holds the data offset (low 16 bits) from the start of
/// the record; the length (high 16 bits) is bounded by `dst` anyway.
fn read_name(
    ctx: &TracePointContext,
    field: FieldOffset,
    dst: &mut [u8; NAME_LEN],
) -> Result<(), NameError> {
    if field.present == 0 {
        return Err(NameError::Unset);
    }
    // SAFETY: read_at uses bpf_probe_read, so an out-of-range offset is an
    // error, not a fault.
    let loc: u32 = unsafe { ctx.read_at(field.offset as usize) }
        .map_err(|e| NameError::Unreadable(i64::from(e)))?;
    let data_off = (loc & 0xffff) as usize;
    // SAFETY: the pointer is inside the tracepoint record and the read is
    // bounded by dst; bpf_probe_read_kernel_str faults safely.
    let read = unsafe {
        let src = ctx.as_ptr().cast::<u8>().add(data_off);
        bpf_probe_read_kernel_str_bytes(src, dst)
            .map(<[u8]>::is_empty)
            .map_err(|e| NameError::Unreadable(i64::from(e)))?
    };
    if read {
        return Err(NameError::Unreadable(0));
    }
    Ok(())
}

/// Reads a plain scalar field (present: the caller checked), or `default`
/// when the read fails.
fn read_field<T: Copy>(ctx: &TracePointContext, field: FieldOffset, default: T) -> T {
    // SAFETY: bpf_probe_read of a value inside the record; errors map to the
    // default instead of faulting.
    unsafe { ctx.read_at::<T>(field.offset as usize) }.unwrap_or(default)
}

/// Adds one to this CPU's slot of an mmapable counter array; returns the
/// slot's new value (0 if the slot could not be had).
fn count_in(map: &Array<u64>, base: u32, slots: u32) -> u64 {
    // SAFETY: a plain helper call without pointer arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(counter) = map.get_ptr_mut(base + cpu % slots) else {
        return 0;
    };
    // SAFETY: this CPU's own slot: a tracepoint program is neither
    // preempted nor migrated while it runs, so no other writer races it
    // (CPU ids beyond the slots share slots and may undercount, never to
    // zero). The BPF target has no atomic read-modify-write in core.
    unsafe {
        *counter += 1;
        *counter
    }
}

fn count_lost() -> u64 {
    count_in(&LOST, 0, LOST_SLOTS)
}

fn count_dropped(counter: u32) -> u64 {
    count_in(&DROPPED, counter * DROPPED_CPU_SLOTS, DROPPED_CPU_SLOTS)
}

/// Whether this CPU may log a line of `kind` now: at most one per
/// [`LOG_INTERVAL_NS`]. What is not logged is still counted.
fn log_allowed(kind: u32) -> bool {
    let Some(last) = LOG_LAST.get_ptr_mut(kind) else {
        return false;
    };
    // SAFETY: a plain helper call without pointer arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // SAFETY: this CPU's own value; a tracepoint program is neither
    // preempted nor migrated while it runs.
    let last = unsafe { &mut *last };
    if *last != 0 && now.wrapping_sub(*last) < LOG_INTERVAL_NS {
        return false;
    }
    *last = now;
    true
}

/// Drops the event of a program whose layout field `$field` the loader
/// left unset: counted, and said (rate-limited). The loader sets every
/// field an attached program reads, so only a broken loader gets here.
macro_rules! layout_unset {
    ($ctx:expr, $field:literal) => {{
        let n = count_dropped(DROPPED_LAYOUT_UNSET);
        if log_allowed(LOG_LAYOUT_UNSET) {
            error!(
                $ctx,
                "layout field {} is not set: the loader did not fill it in; event dropped ({} on this CPU so far)",
                $field,
                n
            );
        }
    }};
}

/// Reads the module name of `$event` from `$field`, or drops the event
/// (counted, and said: rate-limited) and returns from the program.
macro_rules! name_or_drop {
    ($ctx:expr, $field:expr, $field_name:literal, $event:literal) => {{
        let mut name = [0u8; NAME_LEN];
        match read_name($ctx, $field, &mut name) {
            Ok(()) => name,
            Err(NameError::Unset) => {
                layout_unset!($ctx, $field_name);
                return 0;
            }
            Err(NameError::Unreadable(err)) => {
                let n = count_dropped(DROPPED_NAME_UNREADABLE);
                if log_allowed(LOG_NAME_UNREADABLE) {
                    error!(
                        $ctx,
                        "{}: the module name could not be read from the record (error {}); event dropped ({} on this CPU so far)",
                        $event,
                        err,
                        n
                    );
                }
                return 0;
            }
        }
    }};
}

fn count_noise(counter: u32) {
    count_in(&NOISE, counter * NOISE_CPU_SLOTS, NOISE_CPU_SLOTS);
}

/// `name` as eight little-endian words with `-` written `_`: the form of
/// `TRACKED`'s slots, compared a word at a time.
fn name_words(name: &[u8; NAME_LEN]) -> [u64; NAME_LEN / 8] {
    let mut words = [0u64; NAME_LEN / 8];
    let mut i = 0;
    while i < NAME_LEN {
        let b = if name[i] == b'-' { b'_' } else { name[i] };
        words[i / 8] |= u64::from(b) << ((i % 8) * 8);
        i += 1;
    }
    words
}

/// Whether userspace follows `name` (or does not filter at all).
fn is_tracked(name: &[u8; NAME_LEN]) -> bool {
    let Some(tracked) = TRACKED.get_ptr(0) else {
        return true;
    };
    // SAFETY: the value lives as long as the map; userspace may rewrite a
    // slot while this reads it, which can only make one racing event
    // count as untracked or tracked, never fault.
    let tracked = unsafe { &*tracked };
    if tracked.filter == 0 {
        return true;
    }
    let want = name_words(name);
    let mut slot = 0;
    while slot < TRACKED_SLOTS {
        // SAFETY: names start at offset 8 and are 64 bytes each, so every
        // slot is 8-aligned inside the value; read as eight words.
        let have = unsafe { &*tracked.names[slot].as_ptr().cast::<[u64; NAME_LEN / 8]>() };
        if have[0] == 0 {
            // Slots are filled from the first; the rest are empty.
            return false;
        }
        if *have == want {
            return true;
        }
        slot += 1;
    }
    false
}

/// Whether this CPU may still send an `UnloadDenied` this second.
fn denied_allowed(now: u64) -> bool {
    let Some(budget) = DENIED_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's own value; a tracepoint program is neither
    // preempted nor migrated while it runs.
    let budget = unsafe { &mut *budget };
    if now.wrapping_sub(budget.second_start) >= NS_PER_SECOND {
        budget.second_start = now;
        budget.sent = 0;
    }
    if budget.sent >= DENIED_PER_SECOND_PER_CPU {
        return false;
    }
    budget.sent += 1;
    true
}

/// Reserves an event, fills the task fields and lets `fill` add the rest;
/// returns whether it was sent. A failed reserve is counted, never silent,
/// and said (rate-limited).
/// The log line is expanded into every instantiation on purpose: as a
/// BPF-to-BPF subprogram it made the object smaller but doubled the
/// verifier's work on the programs that call it (see README, Event
/// sources).
fn emit(ctx: &TracePointContext, kind: EventKind, fill: impl FnOnce(&mut ModuleEvent)) -> bool {
    let Some(mut entry) = EVENTS.reserve::<ModuleEvent>(0) else {
        let n = count_lost();
        if log_allowed(LOG_RESERVE_FAILED) {
            warn!(
                ctx,
                "ring buffer EVENTS is full: an event of kind {} was dropped ({} on this CPU so far)",
                kind as u32,
                n
            );
        }
        return false;
    };
    let ev = entry.write(ModuleEvent::ZERO);
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    ev.kind = kind as u32;
    // SAFETY: plain helper calls without pointer arguments.
    unsafe {
        ev.cpu = bpf_get_smp_processor_id();
        ev.boot_ns = bpf_ktime_get_boot_ns();
        ev.cgroup_id = bpf_get_current_cgroup_id();
    }
    ev.pid = pid_tgid as u32;
    ev.tgid = (pid_tgid >> 32) as u32;
    ev.uid = uid_gid as u32;
    ev.gid = (uid_gid >> 32) as u32;
    ev.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    fill(ev);
    entry.submit(0);
    true
}

/// `syscalls:sys_enter_finit_module` and `sys_enter_init_module`: a load
/// syscall starts in this thread. Marks it in `PENDING` (an empty name) for
/// `module_load` to fill in. Compat tasks never get here (see the crate
/// docs), so their `module_load` finds no mark.
#[tracepoint]
pub fn init_module_enter(_ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // A failed insert only costs the syscall-exit confirmation; userspace
    // then confirms through /sys/module/<name>/initstate.
    let _ = PENDING.insert(
        tid,
        Pending {
            // SAFETY: a plain helper call without pointer arguments.
            boot_ns: unsafe { bpf_ktime_get_boot_ns() },
            kind: PENDING_LOAD_ENTERED,
            begun: 0,
            name: [0u8; NAME_LEN],
        },
        0,
    );
    0
}

/// `module:module_load` (since 2.6.31): `unsigned int taints;
/// __data_loc char[] name;`. Fires before the module's init runs.
#[tracepoint]
pub fn module_load(ctx: TracePointContext) -> u32 {
    let layout = LAYOUT.load();
    if layout.load_taints.present == 0 {
        layout_unset!(&ctx, "load_taints");
        return 0;
    }
    let name = name_or_drop!(&ctx, layout.load_name, "load_name", "module_load");
    let tid = bpf_get_current_pid_tgid() as u32;
    // Only a load whose syscall entry was seen gets a syscall exit to
    // report its result; any other (a compat task, or no syscall
    // tracepoints) is confirmed through initstate and leaves no entry
    // behind for a later thread with the same id. A failed insert only
    // costs the syscall-exit confirmation too.
    // SAFETY: the value is copied out at once, and only this thread inserts
    // or removes its own key.
    let entered = (unsafe { PENDING.get(tid) }).is_some_and(|p| p.kind == PENDING_LOAD_ENTERED);
    if entered {
        let _ = PENDING.insert(
            tid,
            Pending {
                // SAFETY: a plain helper call without pointer arguments.
                boot_ns: unsafe { bpf_ktime_get_boot_ns() },
                kind: PENDING_LOAD,
                begun: 0,
                name,
            },
            0,
        );
    }
    let taints = read_field::<u32>(&ctx, layout.load_taints, 0);
    emit(&ctx, EventKind::Load, |ev| {
        ev.taints = taints;
        ev.name = name;
    });
    0
}

/// `module:module_free`: `__data_loc char[] name;`. Fires when the module's
/// memory is freed: after a completed unload, or after a failed init. In an
/// unload it runs inside the rmmod's `delete_module`, whose held begin it
/// carries (`begun_ns`): one record, so the daemon takes nothing else
/// between the two. Only a record that was sent marks the begin as sent;
/// otherwise the syscall's exit still sends it.
#[tracepoint]
pub fn module_free(ctx: TracePointContext) -> u32 {
    let layout = LAYOUT.load();
    let name = name_or_drop!(&ctx, layout.free_name, "free_name", "module_free");
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is copied out at once, and only this thread inserts
    // or removes its own key.
    let begun_ns = match unsafe { PENDING.get(tid) } {
        Some(p) if p.kind == PENDING_DELETE && p.begun == 0 => p.boot_ns,
        _ => 0,
    };
    let sent = emit(&ctx, EventKind::Free, |ev| {
        ev.name = name;
        ev.begun_ns = begun_ns;
    });
    // Looked up again rather than held across `emit`: the map is an LRU,
    // so another CPU's insert may have evicted (and reused) the entry, and
    // a pointer held over the reserve doubles the verifier's work on it.
    if sent
        && begun_ns != 0
        && let Some(p) = PENDING.get_ptr_mut(tid)
    {
        // SAFETY: this thread's own entry (looked up by its id just now);
        // only this thread inserts or removes its key.
        let p = unsafe { &mut *p };
        if p.kind == PENDING_DELETE {
            p.begun = 1;
        }
    }
    0
}

/// `module:module_request`: `unsigned long ip; bool wait;
/// __data_loc char[] name;`. The kernel asked usermode modprobe for `name`.
#[tracepoint]
pub fn module_request(ctx: TracePointContext) -> u32 {
    let layout = LAYOUT.load();
    if layout.request_wait.present == 0 {
        layout_unset!(&ctx, "request_wait");
        return 0;
    }
    let name = name_or_drop!(&ctx, layout.request_name, "request_name", "module_request");
    if !is_tracked(&name) {
        count_noise(NOISE_REQUEST_UNTRACKED);
        return 0;
    }
    let wait = u32::from(read_field::<u8>(&ctx, layout.request_wait, 0));
    emit(&ctx, EventKind::Request, |ev| {
        ev.wait = wait;
        ev.name = name;
    });
    0
}

/// `syscalls:sys_exit_finit_module` and `sys_exit_init_module`:
/// `long ret;`. Reports the result of a load that fired `module_load` in
/// this thread; other exits (EEXIST, bad parameters: still the empty mark
/// of the entry) are not module events.
#[tracepoint]
pub fn init_module_exit(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is copied out before the entry is removed, and only
    // this thread inserts or removes its own key.
    let Some(pending) = (unsafe { PENDING.get(tid) }).copied() else {
        return 0;
    };
    if pending.kind != PENDING_LOAD && pending.kind != PENDING_LOAD_ENTERED {
        return 0;
    }
    let _ = PENDING.remove(tid);
    // Still the entry's mark: the syscall failed before `module_load`
    // (EEXIST, a bad parameter), which is no module event.
    if pending.kind == PENDING_LOAD_ENTERED {
        return 0;
    }
    let field = LAYOUT.load().init_exit_ret;
    if field.present == 0 {
        layout_unset!(&ctx, "init_exit_ret");
        return 0;
    }
    let ret = read_field::<i64>(&ctx, field, 0);
    emit(&ctx, EventKind::LoadResult, |ev| {
        ev.ret = ret;
        ev.name = pending.name;
    });
    0
}

/// `syscalls:sys_enter_delete_module`: `const char * name_user; unsigned
/// int flags;`. An unload was asked for (rmmod, modprobe -r) — or anyone
/// tried: this fires before the permission check. Nothing is sent yet; a
/// tracked name is held until the module is freed or the call returns.
#[tracepoint]
pub fn delete_module_enter(ctx: TracePointContext) -> u32 {
    let layout = LAYOUT.load();
    if layout.delete_enter_name.present == 0 {
        layout_unset!(&ctx, "delete_enter_name");
        return 0;
    }
    // SAFETY: bpf_probe_read of the pointer argument inside the record.
    let Ok(user_ptr) = (unsafe { ctx.read_at::<u64>(layout.delete_enter_name.offset as usize) })
    else {
        return 0;
    };
    let mut name = [0u8; NAME_LEN];
    // A pointer that cannot be read is the caller's bad argument (the
    // syscall fails with EFAULT): anyone can pass one, so it is neither
    // logged nor counted.
    // SAFETY: the helper validates the user pointer and bounds the copy.
    if unsafe { bpf_probe_read_user_str_bytes(user_ptr as *const u8, &mut name) }.is_err() {
        return 0;
    }
    if !is_tracked(&name) {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = PENDING.insert(
        tid,
        Pending {
            // SAFETY: a plain helper call without pointer arguments.
            boot_ns: unsafe { bpf_ktime_get_boot_ns() },
            kind: PENDING_DELETE,
            begun: 0,
            name,
        },
        0,
    );
    0
}

/// `syscalls:sys_exit_delete_module`: `long ret;`. Ends an unload asked for
/// in this thread; a failure (EBUSY, EWOULDBLOCK) means it stays loaded.
/// EPERM means the caller had no right to ask: one rate-limited
/// `UnloadDenied`, no begin/fail pair.
#[tracepoint]
pub fn delete_module_exit(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: copied out before removal; only this thread uses its key.
    let Some(pending) = (unsafe { PENDING.get(tid) }).copied() else {
        return 0;
    };
    if pending.kind != PENDING_DELETE {
        return 0;
    }
    let _ = PENDING.remove(tid);
    let field = LAYOUT.load().delete_exit_ret;
    if field.present == 0 {
        layout_unset!(&ctx, "delete_exit_ret");
        return 0;
    }
    let ret = read_field::<i64>(&ctx, field, 0);
    if ret == EPERM {
        // SAFETY: a plain helper call without pointer arguments.
        if denied_allowed(unsafe { bpf_ktime_get_boot_ns() }) {
            emit(&ctx, EventKind::UnloadDenied, |ev| {
                ev.boot_ns = pending.boot_ns;
                ev.ret = ret;
                ev.name = pending.name;
            });
        } else {
            count_noise(NOISE_DENIED_SUPPRESSED);
        }
        return 0;
    }
    if pending.begun == 0 {
        emit(&ctx, EventKind::UnloadBegin, |ev| {
            ev.boot_ns = pending.boot_ns;
            ev.name = pending.name;
        });
    }
    emit(&ctx, EventKind::UnloadResult, |ev| {
        ev.ret = ret;
        ev.name = pending.name;
    });
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
