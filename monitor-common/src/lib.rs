//! The `#[repr(C)]` types that cross the kernel/userspace boundary: the
//! ring-buffer event record and the load-time configuration global.
//!
//! Both sides compile this crate: the eBPF program for `bpfel-unknown-none`
//! and the daemon with the `user` feature, which implements `aya::Pod`.
#![no_std]

/// `MODULE_NAME_LEN` in the kernel is `64 - sizeof(unsigned long)`, 56 on
/// 64-bit. Names from `module_request` are free-form (`fs-ext4`,
/// `net-pf-10-proto-6`), so the buffer is a little larger and always
/// NUL-terminated by the kernel's string helpers.
pub const NAME_LEN: usize = 64;

/// `TASK_COMM_LEN` in the kernel.
pub const COMM_LEN: usize = 16;

/// Default ring buffer size in bytes (must be a power of two and a multiple
/// of the page size). 256 KiB holds about 1,700 events (144 bytes each
/// and the ring's 8-byte header).
pub const DEFAULT_RING_BYTES: u32 = 256 * 1024;

/// Kind of a [`ModuleEvent`]. Fixed numeric ids: the decoder relies on them,
/// so never renumber, only append.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `module:module_load`: the module is linked and its init is about to
    /// run. It does not mean the load succeeded.
    Load = 1,
    /// `module:module_free`: the module's memory is freed, after an unload
    /// or after a failed init. Inside the `delete_module` of a tracked
    /// module that asked for it, the record also stands for that unload's
    /// begin ([`ModuleEvent::begun_ns`]).
    Free = 2,
    /// `module:module_request`: the kernel asked modprobe for a module.
    Request = 3,
    /// Exit of `init_module`/`finit_module` in a task that fired
    /// `module_load`; `ret` is the syscall result (0 = init succeeded).
    LoadResult = 4,
    /// Entry of `delete_module`: an unload was asked for; the name is the
    /// user's argument. Sent at the syscall's exit, and only when the
    /// module was not freed in it (a refused or failed unload, or a
    /// `module_free` that could not be sent): a completed unload's begin
    /// travels in its `Free` record.
    UnloadBegin = 5,
    /// Exit of `delete_module`; `ret` is the syscall result.
    UnloadResult = 6,
    /// `delete_module` of a tracked module refused with EPERM (the caller
    /// lacks CAP_SYS_MODULE): an unprivileged attempt. Rate-limited in the
    /// kernel; what the limit drops is counted in `NOISE`.
    UnloadDenied = 7,
}

impl EventKind {
    /// Decodes the raw kind field; `None` for ids this build does not know.
    #[must_use]
    pub const fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            1 => Self::Load,
            2 => Self::Free,
            3 => Self::Request,
            4 => Self::LoadResult,
            5 => Self::UnloadBegin,
            6 => Self::UnloadResult,
            7 => Self::UnloadDenied,
            _ => return None,
        })
    }
}

/// One record in the `EVENTS` ring buffer.
///
/// Field order keeps every member naturally aligned without padding, so the
/// layout is identical on both sides (checked by a test in the daemon).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModuleEvent {
    /// [`EventKind`] as `u32`.
    pub kind: u32,
    /// CPU the event fired on (`bpf_get_smp_processor_id`).
    pub cpu: u32,
    /// `bpf_ktime_get_boot_ns`: CLOCK_BOOTTIME, comparable with userspace.
    pub boot_ns: u64,
    /// `bpf_get_current_cgroup_id` (cgroup v2 id; 0 where unavailable).
    pub cgroup_id: u64,
    /// Thread id (the kernel's `pid`).
    pub pid: u32,
    /// Process id (the kernel's `tgid`).
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// `module_load`'s taint flags; 0 for other kinds.
    pub taints: u32,
    /// `module_request`'s `wait`; 0 for other kinds.
    pub wait: u32,
    /// Syscall return value for `LoadResult`/`UnloadResult`; 0 otherwise.
    pub ret: i64,
    pub comm: [u8; COMM_LEN],
    /// NUL-terminated module name.
    pub name: [u8; NAME_LEN],
    /// For a `Free` inside the `delete_module` that asked for it: when that
    /// unload began (`bpf_ktime_get_boot_ns` at the syscall's entry), so
    /// the one record carries both events and nothing stands in the ring
    /// between them. 0 for every other record.
    pub begun_ns: u64,
}

impl ModuleEvent {
    /// An all-zero event, for initialising buffers.
    pub const ZERO: Self = Self {
        kind: 0,
        cpu: 0,
        boot_ns: 0,
        cgroup_id: 0,
        pid: 0,
        tgid: 0,
        uid: 0,
        gid: 0,
        taints: 0,
        wait: 0,
        ret: 0,
        comm: [0; COMM_LEN],
        name: [0; NAME_LEN],
        begun_ns: 0,
    };
}

// The layout both sides rely on, checked where both compile it: 144 bytes,
// 8-aligned, no padding, and the offsets the decoder reads. A field added or
// moved without updating the decoder fails the build, not a guest.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<ModuleEvent>() == 144);
    assert!(align_of::<ModuleEvent>() == 8);
    assert!(offset_of!(ModuleEvent, kind) == 0);
    assert!(offset_of!(ModuleEvent, cpu) == 4);
    assert!(offset_of!(ModuleEvent, boot_ns) == 8);
    assert!(offset_of!(ModuleEvent, cgroup_id) == 16);
    assert!(offset_of!(ModuleEvent, pid) == 24);
    assert!(offset_of!(ModuleEvent, tgid) == 28);
    assert!(offset_of!(ModuleEvent, uid) == 32);
    assert!(offset_of!(ModuleEvent, gid) == 36);
    assert!(offset_of!(ModuleEvent, taints) == 40);
    assert!(offset_of!(ModuleEvent, wait) == 44);
    assert!(offset_of!(ModuleEvent, ret) == 48);
    assert!(offset_of!(ModuleEvent, comm) == 56);
    assert!(offset_of!(ModuleEvent, name) == 56 + COMM_LEN);
    assert!(offset_of!(ModuleEvent, begun_ns) == 56 + COMM_LEN + NAME_LEN);
    assert!(size_of::<FieldOffset>() == 8);
    assert!(size_of::<TrackedNames>() == 8 + TRACKED_SLOTS * NAME_LEN);
    assert!(size_of::<TrackedNames>() <= 4096);
    assert!(NOISE_SLOTS as usize * size_of::<u64>() == 4096);
    assert!(size_of::<TracepointLayout>() == 8 * size_of::<FieldOffset>());
    assert!(DROPPED_SLOTS as usize * size_of::<u64>() == 4096);
};

/// Where a field lives inside a tracepoint record. For `__data_loc` fields
/// `offset` is the offset of the 32-bit location word (low 16 bits: offset
/// of the data from the record start; high 16 bits: its length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FieldOffset {
    pub offset: u32,
    /// 1 when the field exists on this kernel.
    pub present: u32,
}

/// Tracepoint layouts, read from tracefs `events/*/*/format` at load time and
/// handed to the program as the read-only global `LAYOUT`. Nothing in the
/// program assumes one kernel's layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracepointLayout {
    /// `module:module_load` `__data_loc char[] name`.
    pub load_name: FieldOffset,
    /// `module:module_load` `unsigned int taints`.
    pub load_taints: FieldOffset,
    /// `module:module_free` `__data_loc char[] name`.
    pub free_name: FieldOffset,
    /// `module:module_request` `__data_loc char[] name`.
    pub request_name: FieldOffset,
    /// `module:module_request` `bool wait`.
    pub request_wait: FieldOffset,
    /// `syscalls:sys_exit_{init,finit}_module` `long ret` (same layout for
    /// both; checked when the layout is read).
    pub init_exit_ret: FieldOffset,
    /// `syscalls:sys_enter_delete_module` `const char * name_user`.
    pub delete_enter_name: FieldOffset,
    /// `syscalls:sys_exit_delete_module` `long ret`.
    pub delete_exit_ret: FieldOffset,
}

/// Slots of the in-kernel loss counter array `LOST`, one per CPU id
/// modulo this; 512 u64 fill exactly one 4 KiB page, the mmap unit.
pub const LOST_SLOTS: u32 = 512;

/// `BPF_F_MMAPABLE`: the `LOST` array is read through mmap, which needs no
/// capability, so the count survives the privilege drop on every kernel.
pub const LOST_MAP_FLAGS: u32 = 1 << 10;

/// Names the program can track: what fits one 4 KiB page with the header.
pub const TRACKED_SLOTS: usize = 63;

/// The module names userspace cares about (required modules and their
/// exact aliases, `-` written `_`), in the mmapable one-element array
/// `TRACKED`. Userspace writes it through its mapping, before the programs
/// attach and again when the groups change; no bpf(2) call is needed, so
/// it works after the privilege drop on every kernel. `module_request` and
/// `delete_module` events for other names never reach the ring buffer:
/// they are only counted (`NOISE`), so a flood of them cannot crowd out a
/// required module's event.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TrackedNames {
    /// 1: filter by `names`; 0: every name counts as tracked (before
    /// userspace fills the table, or when the names do not fit).
    pub filter: u64,
    /// NUL-padded names; an empty slot starts with NUL.
    pub names: [[u8; NAME_LEN]; TRACKED_SLOTS],
}

/// Counters of events the program kept out of the ring buffer on purpose,
/// in the mmapable array `NOISE`: counter `c` of CPU `n` is slot
/// `c * NOISE_CPU_SLOTS + n % NOISE_CPU_SLOTS`. One page in all.
pub const NOISE_CPU_SLOTS: u32 = 256;
/// `NOISE` counter: `module_request` for a name not in `TRACKED`.
pub const NOISE_REQUEST_UNTRACKED: u32 = 0;
/// `NOISE` counter: `UnloadDenied` events over the per-CPU rate limit.
pub const NOISE_DENIED_SUPPRESSED: u32 = 1;
/// Entries of the `NOISE` array.
pub const NOISE_SLOTS: u32 = 2 * NOISE_CPU_SLOTS;
/// `UnloadDenied` events each CPU may send per second; the rest are only
/// counted. Security-relevant, so not dropped silently, but an
/// unprivileged loop of refused `rmmod`s must not fill the ring.
pub const DENIED_PER_SECOND_PER_CPU: u64 = 20;

/// Events the program had to drop because it could not read them, in the
/// mmapable array `DROPPED`, laid out like `NOISE`: counter `c` of CPU `n`
/// is slot `c * DROPPED_CPU_SLOTS + n % DROPPED_CPU_SLOTS`. One page in
/// all. Unlike `NOISE`, these are losses: userspace adds them to the
/// events lost and reconciles.
pub const DROPPED_CPU_SLOTS: u32 = 256;
/// `DROPPED` counter: a module name that could not be read from the
/// tracepoint record (a wrong offset, or a kernel whose record differs
/// from its format file).
pub const DROPPED_NAME_UNREADABLE: u32 = 0;
/// `DROPPED` counter: an event whose layout field the loader left unset
/// (`present == 0` in an attached program).
pub const DROPPED_LAYOUT_UNSET: u32 = 1;
/// Entries of the `DROPPED` array.
pub const DROPPED_SLOTS: u32 = 2 * DROPPED_CPU_SLOTS;

/// What the program logs through aya-log, each kind rate-limited on its
/// own to one line per [`LOG_INTERVAL_NS`] per CPU (`LOG_LAST` holds each
/// kind's last line time per CPU). The counters behind them (`LOST`,
/// `DROPPED`) count every occurrence.
pub const LOG_RESERVE_FAILED: u32 = 0;
/// See [`LOG_RESERVE_FAILED`]: a module name that could not be read.
pub const LOG_NAME_UNREADABLE: u32 = 1;
/// See [`LOG_RESERVE_FAILED`]: a layout field the loader did not set.
pub const LOG_LAYOUT_UNSET: u32 = 2;
/// Entries of `LOG_LAST`.
pub const LOG_KINDS: u32 = 3;
/// At most one line of each kind per CPU in this many nanoseconds.
pub const LOG_INTERVAL_NS: u64 = 1_000_000_000;
/// Bytes of the aya-log ring `AYA_LOGS` (set at load time; aya-log-ebpf
/// compiles in 128 KiB). A line takes 256 bytes of it, so it holds 64
/// lines: ten seconds of the most the rate limits allow on 2 CPUs
/// (3 kinds, one line each per second per CPU) while the daemon reads
/// nothing. A line that does not fit is dropped by the kernel, never
/// waited for; the events have their own ring.
pub const LOG_RING_BYTES: u32 = 16 * 1024;

#[cfg(feature = "user")]
mod user {
    use super::{ModuleEvent, TracepointLayout, TrackedNames};

    // SAFETY: both are #[repr(C)], made only of integers and byte arrays,
    // have no padding (asserted at compile time above) and every bit pattern
    // is valid.
    unsafe impl aya::Pod for ModuleEvent {}
    // SAFETY: as above; TracepointLayout is u32 pairs only.
    unsafe impl aya::Pod for TracepointLayout {}
    // SAFETY: as above; a u64 and byte arrays, 8 + 63 * 64 bytes, no
    // padding.
    unsafe impl aya::Pod for TrackedNames {}
}
