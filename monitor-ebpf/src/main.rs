//! kmod-monitor's kernel side: the module tracepoints (and the syscall exits
//! that tell whether a load or unload really succeeded) feed one
//! `ModuleEvent` each into the `EVENTS` ring buffer.
//!
//! Tracepoint field offsets are not compiled in: userspace reads them from
//! tracefs `events/*/*/format` and sets the `LAYOUT` global at load time.
//! Requires Linux 5.8 (ring buffer, `bpf_ktime_get_boot_ns`).
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
    maps::{Array, HashMap, RingBuf},
    programs::TracePointContext,
};
use monitor_common::{
    DEFAULT_RING_BYTES, EventKind, FieldOffset, LOST_MAP_FLAGS, LOST_SLOTS, ModuleEvent, NAME_LEN,
    TracepointLayout,
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

/// Module name of a `module_load` per thread, until its `finit_module` or
/// `init_module` returns; lets the syscall exit say which load it finished.
/// Also holds the name of a `delete_module` in flight.
#[map]
static PENDING: HashMap<u32, [u8; NAME_LEN]> = HashMap::with_max_entries(1024, 0);

/// Reads a `__data_loc char[]` field into `dst`.
///
/// The location word holds the data offset (low 16 bits) from the start of
/// the record; the length (high 16 bits) is bounded by `dst` anyway.
fn read_data_loc(ctx: &TracePointContext, field: FieldOffset, dst: &mut [u8]) -> Result<(), i64> {
    if field.present == 0 {
        return Err(-1);
    }
    // SAFETY: read_at uses bpf_probe_read, so an out-of-range offset is an
    // error, not a fault.
    let loc: u32 = unsafe { ctx.read_at(field.offset as usize) }.map_err(i64::from)?;
    let data_off = (loc & 0xffff) as usize;
    // SAFETY: the pointer is inside the tracepoint record and the read is
    // bounded by dst; bpf_probe_read_kernel_str faults safely.
    unsafe {
        let src = ctx.as_ptr().cast::<u8>().add(data_off);
        bpf_probe_read_kernel_str_bytes(src, dst).map_err(i64::from)?;
    }
    Ok(())
}

/// Reads a plain scalar field, or `default` where this kernel lacks it.
fn read_field<T: Copy>(ctx: &TracePointContext, field: FieldOffset, default: T) -> T {
    if field.present == 0 {
        return default;
    }
    // SAFETY: bpf_probe_read of a value inside the record; errors map to the
    // default instead of faulting.
    unsafe { ctx.read_at::<T>(field.offset as usize) }.unwrap_or(default)
}

fn count_lost() {
    // SAFETY: a plain helper call without pointer arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    if let Some(counter) = LOST.get_ptr_mut(cpu % LOST_SLOTS) {
        // SAFETY: this CPU's own slot: a tracepoint program is neither
        // preempted nor migrated while it runs, so no other writer races
        // it (CPU ids beyond LOST_SLOTS share slots and may undercount,
        // never to zero). The BPF target has no atomic read-modify-write
        // in core.
        unsafe { *counter += 1 };
    }
}

/// Reserves an event, fills the task fields and lets `fill` add the rest.
/// A failed reserve is counted, never silent.
fn emit(kind: EventKind, fill: impl FnOnce(&mut ModuleEvent)) {
    let Some(mut entry) = EVENTS.reserve::<ModuleEvent>(0) else {
        count_lost();
        return;
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
}

/// `module:module_load` (since 2.6.31): `unsigned int taints;
/// __data_loc char[] name;`. Fires before the module's init runs.
#[tracepoint]
pub fn module_load(ctx: TracePointContext) -> u32 {
    let layout = LAYOUT.load();
    let mut name = [0u8; NAME_LEN];
    if read_data_loc(&ctx, layout.load_name, &mut name).is_err() {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // A full PENDING map only costs the syscall-exit confirmation; userspace
    // then confirms through /sys/module/<name>/initstate.
    let _ = PENDING.insert(tid, name, 0);
    let taints = read_field::<u32>(&ctx, layout.load_taints, 0);
    emit(EventKind::Load, |ev| {
        ev.taints = taints;
        ev.name = name;
    });
    0
}

/// `module:module_free`: `__data_loc char[] name;`. Fires when the module's
/// memory is freed: after a completed unload, or after a failed init.
#[tracepoint]
pub fn module_free(ctx: TracePointContext) -> u32 {
    let layout = LAYOUT.load();
    let mut name = [0u8; NAME_LEN];
    if read_data_loc(&ctx, layout.free_name, &mut name).is_err() {
        return 0;
    }
    emit(EventKind::Free, |ev| ev.name = name);
    0
}

/// `module:module_request`: `unsigned long ip; bool wait;
/// __data_loc char[] name;`. The kernel asked usermode modprobe for `name`.
#[tracepoint]
pub fn module_request(ctx: TracePointContext) -> u32 {
    let layout = LAYOUT.load();
    let mut name = [0u8; NAME_LEN];
    if read_data_loc(&ctx, layout.request_name, &mut name).is_err() {
        return 0;
    }
    let wait = u32::from(read_field::<u8>(&ctx, layout.request_wait, 0));
    emit(EventKind::Request, |ev| {
        ev.wait = wait;
        ev.name = name;
    });
    0
}

/// `syscalls:sys_exit_finit_module` and `sys_exit_init_module`:
/// `long ret;`. Reports the result of a load that fired `module_load` in
/// this thread; other exits (EEXIST, bad parameters) are not module events.
#[tracepoint]
pub fn init_module_exit(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is copied out before the entry is removed, and only
    // this thread inserts or removes its own key.
    let Some(name) = (unsafe { PENDING.get(tid) }).copied() else {
        return 0;
    };
    let _ = PENDING.remove(tid);
    let ret = read_field::<i64>(&ctx, LAYOUT.load().init_exit_ret, 0);
    emit(EventKind::LoadResult, |ev| {
        ev.ret = ret;
        ev.name = name;
    });
    0
}

/// `syscalls:sys_enter_delete_module`: `const char * name_user; unsigned
/// int flags;`. An unload was asked for (rmmod, modprobe -r).
#[tracepoint]
pub fn delete_module_enter(ctx: TracePointContext) -> u32 {
    let layout = LAYOUT.load();
    if layout.delete_enter_name.present == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read of the pointer argument inside the record.
    let Ok(user_ptr) = (unsafe { ctx.read_at::<u64>(layout.delete_enter_name.offset as usize) })
    else {
        return 0;
    };
    let mut name = [0u8; NAME_LEN];
    // SAFETY: the helper validates the user pointer and bounds the copy.
    if unsafe { bpf_probe_read_user_str_bytes(user_ptr as *const u8, &mut name) }.is_err() {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = PENDING.insert(tid, name, 0);
    emit(EventKind::UnloadBegin, |ev| ev.name = name);
    0
}

/// `syscalls:sys_exit_delete_module`: `long ret;`. Ends an unload asked for
/// in this thread; a failure (EBUSY, EWOULDBLOCK) means it stays loaded.
#[tracepoint]
pub fn delete_module_exit(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: copied out before removal; only this thread uses its key.
    let Some(name) = (unsafe { PENDING.get(tid) }).copied() else {
        return 0;
    };
    let _ = PENDING.remove(tid);
    let ret = read_field::<i64>(&ctx, LAYOUT.load().delete_exit_ret, 0);
    emit(EventKind::UnloadResult, |ev| {
        ev.ret = ret;
        ev.name = name;
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
