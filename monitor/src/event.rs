//! The module event every source produces, decoded from the kernel's
//! `ModuleEvent` (eBPF) or synthesised from uevents and /proc/modules polls.
use compact_str::CompactString;
use monitor_common::{COMM_LEN, EventKind, ModuleEvent, NAME_LEN};
use serde::Serialize;

use crate::names::ModuleName;

/// What happened to a module, in the words of the API and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `module_load`: linked in, init about to run. Not yet a success.
    Load,
    /// Init succeeded (syscall exit 0, uevent add, or seen Live by a poll).
    Loaded,
    /// Init failed: the syscall returned an error, or `module_free`
    /// followed `module_load` without success.
    LoadFailed,
    /// `delete_module` entered.
    UnloadBegin,
    /// The module is gone (`module_free` after an unload, uevent remove,
    /// or no longer in /proc/modules).
    Unload,
    /// `delete_module` failed (EBUSY, ...); the module stays loaded.
    UnloadFailed,
    /// The kernel asked for the module (`module_request`).
    Request,
    /// The reconcile found the tracked state wrong and corrected it.
    Drift,
}

impl Kind {
    /// Every kind, for exporting all series from the start.
    pub const ALL: [Self; 8] = [
        Self::Load,
        Self::Loaded,
        Self::LoadFailed,
        Self::UnloadBegin,
        Self::Unload,
        Self::UnloadFailed,
        Self::Request,
        Self::Drift,
    ];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Load => "load",
            Self::Loaded => "loaded",
            Self::LoadFailed => "load_failed",
            Self::UnloadBegin => "unload_begin",
            Self::Unload => "unload",
            Self::UnloadFailed => "unload_failed",
            Self::Request => "request",
            Self::Drift => "drift",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The task that caused an event, as the kernel saw it at that moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Actor {
    /// Thread id.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// At most 15 bytes from the kernel, so inline (a comm that needs UTF-8
    /// repair can grow past the 24 inline bytes and take a heap block).
    pub comm: CompactString,
    pub cgroup_id: u64,
}

/// Raw, source-level event before the tracker interprets it. The eBPF
/// source reports kernel facts (`Free` does not know whether it ended an
/// unload or a failed init); the tracker, which knows the module's state,
/// turns them into [`Kind`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Raw {
    /// `module_load`.
    Load,
    /// `module_free`.
    Free,
    /// `module_request`.
    Request,
    /// Init syscall returned; `ret` 0 means init succeeded.
    LoadResult { ret: i64 },
    /// `delete_module` entered.
    UnloadBegin,
    /// `delete_module` returned.
    UnloadResult { ret: i64 },
    /// The module is loaded and live (uevent add, poll).
    Present,
    /// The module is no longer loaded (uevent remove, poll).
    Absent,
}

/// One event from a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceEvent {
    pub raw: Raw,
    pub module: ModuleName,
    /// CLOCK_BOOTTIME nanoseconds when it happened (in-kernel for eBPF,
    /// receipt time for uevent and poll).
    pub boot_ns: u64,
    /// Present for eBPF events only.
    pub actor: Option<Actor>,
    /// `module_load` taint flags (0 where unknown).
    pub taints: u32,
    /// `module_request`'s wait flag.
    pub wait: bool,
    pub cpu: Option<u32>,
}

/// A decoded ring-buffer record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// An event about a module.
    Module(SourceEvent),
    /// A completed unload: the `module_free` inside the `delete_module`
    /// that asked for it, which carries that unload's begin. `begin` is
    /// its `UnloadBegin` (at the syscall's entry, by the same task) and
    /// `free` its `Free`; the tracker takes them in that order.
    Unloaded {
        begin: SourceEvent,
        free: SourceEvent,
    },
    /// `module_request` for an alias that is not a module name
    /// (`crypto-xts(aes)`, `char-major-10-229`, `devname:...`). Counted, but
    /// it cannot match a required module until modprobe resolves it, and
    /// that load shows up as its own event.
    AliasRequest {
        alias: String,
        actor: Actor,
        boot_ns: u64,
    },
    /// `delete_module` of a tracked module refused with EPERM: someone
    /// without CAP_SYS_MODULE tried. Not a state change; aggregated per
    /// actor and module.
    UnloadDenied {
        module: ModuleName,
        actor: Actor,
        boot_ns: u64,
    },
}

/// Why a ring-buffer record could not be decoded. Such records are counted
/// and logged, never silently dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The record is not the size of `ModuleEvent` (kernel/daemon mismatch).
    #[error("ring buffer record of {len} bytes, expected {expected}")]
    Size { len: usize, expected: usize },
    /// A kind id this build does not know.
    #[error("unknown event kind {kind}")]
    UnknownKind { kind: u32 },
    /// The name field is not a module name. Userspace can pass anything
    /// to `delete_module`, so this is input to ignore, not a loss.
    #[error("event kind {kind} carries an invalid module name {name:?}")]
    BadName { kind: u32, name: String },
}

impl DecodeError {
    /// Whether the record itself is broken (a build mismatch between the
    /// program and the daemon: events may have been misread, so the state
    /// must be reconciled), rather than well-formed with a name that is
    /// not a module's (ignored).
    #[must_use]
    pub const fn is_corrupt(&self) -> bool {
        !matches!(self, Self::BadName { .. })
    }
}

/// Bytes up to the first NUL, as lossy UTF-8.
/// The text up to the first NUL; borrowed unless it needs repair (invalid
/// UTF-8), so decoding a record copies its names only into their own
/// inline storage.
fn c_str(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end])
}

impl SourceEvent {
    /// Decodes one ring-buffer record.
    ///
    /// # Errors
    /// When the record has the wrong size, an unknown kind or a name that
    /// cannot be a module name.
    pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
        let expected = size_of::<ModuleEvent>();
        if bytes.len() != expected {
            return Err(DecodeError::Size {
                len: bytes.len(),
                expected,
            });
        }
        // SAFETY: the length was checked above, ModuleEvent is a plain
        // #[repr(C)] struct of integers valid for any bit pattern, and
        // read_unaligned makes no alignment assumption about the slice.
        let ev: ModuleEvent = unsafe { bytes.as_ptr().cast::<ModuleEvent>().read_unaligned() };
        Self::from_kernel(&ev)
    }

    /// Interprets a kernel record.
    ///
    /// # Errors
    /// Unknown kind or invalid name.
    pub fn from_kernel(ev: &ModuleEvent) -> Result<Decoded, DecodeError> {
        let ModuleEvent {
            kind,
            cpu,
            boot_ns,
            cgroup_id,
            pid,
            tgid,
            uid,
            gid,
            taints,
            wait,
            ret,
            comm,
            name,
            begun_ns,
        } = *ev;
        let raw = match EventKind::from_raw(kind) {
            Some(EventKind::UnloadDenied) => None,
            Some(EventKind::Load) => Some(Raw::Load),
            Some(EventKind::Free) => Some(Raw::Free),
            Some(EventKind::Request) => Some(Raw::Request),
            Some(EventKind::LoadResult) => Some(Raw::LoadResult { ret }),
            Some(EventKind::UnloadBegin) => Some(Raw::UnloadBegin),
            Some(EventKind::UnloadResult) => Some(Raw::UnloadResult { ret }),
            None => return Err(DecodeError::UnknownKind { kind }),
        };
        let name_str = c_str(&name[..NAME_LEN]);
        let actor = Actor {
            pid,
            tgid,
            uid,
            gid,
            comm: CompactString::new(c_str(&comm[..COMM_LEN])),
            cgroup_id,
        };
        let Some(module) = ModuleName::from_kernel(&name_str) else {
            if raw == Some(Raw::Request) && !name_str.is_empty() {
                return Ok(Decoded::AliasRequest {
                    alias: name_str.into_owned(),
                    actor,
                    boot_ns,
                });
            }
            return Err(DecodeError::BadName {
                kind,
                name: name_str.into_owned(),
            });
        };
        let Some(raw) = raw else {
            return Ok(Decoded::UnloadDenied {
                module,
                actor,
                boot_ns,
            });
        };
        let event = Self {
            raw,
            module,
            boot_ns,
            actor: Some(actor),
            taints,
            wait: wait != 0,
            cpu: Some(cpu),
        };
        if raw == Raw::Free && begun_ns != 0 {
            // The begin is named as the kernel names the module freed: the
            // user's argument to delete_module, which must equal it (the
            // kernel looks the name up as given, without aliases).
            let begin = Self {
                raw: Raw::UnloadBegin,
                boot_ns: begun_ns,
                ..event.clone()
            };
            return Ok(Decoded::Unloaded { begin, free: event });
        }
        Ok(Decoded::Module(event))
    }

    /// An event synthesised by a source that has no actor (uevent, poll).
    #[must_use]
    pub fn observed(raw: Raw, module: ModuleName, boot_ns: u64) -> Self {
        Self {
            raw,
            module,
            boot_ns,
            actor: None,
            taints: 0,
            wait: false,
            cpu: None,
        }
    }
}

/// Kernel taint flags in `module_load` (`TAINT_*` bit numbers) as the
/// letters /proc/modules prints, e.g. "OE" (at most 19, held inline).
#[must_use]
pub fn taint_letters(taints: u32) -> compact_str::CompactString {
    // Bit -> letter, from kernel/panic.c taint_flags (stable since 4.x).
    const LETTERS: [(u32, char); 19] = [
        (0, 'P'),
        (1, 'F'),
        (2, 'S'),
        (3, 'R'),
        (4, 'M'),
        (5, 'B'),
        (6, 'U'),
        (7, 'D'),
        (8, 'A'),
        (9, 'W'),
        (10, 'C'),
        (11, 'I'),
        (12, 'O'),
        (13, 'E'),
        (14, 'L'),
        (15, 'K'),
        (16, 'X'),
        (17, 'T'),
        (18, 'N'),
    ];
    LETTERS
        .iter()
        .filter(|(bit, _)| taints & (1 << bit) != 0)
        .map(|&(_, c)| c)
        .collect()
}

/// CLOCK_BOOTTIME now, in nanoseconds: the clock `bpf_ktime_get_boot_ns`
/// uses, so userspace and kernel timestamps compare directly.
#[must_use]
pub fn boot_ns_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; CLOCK_BOOTTIME exists on
    // every Linux this runs on (2.6.39+), so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_event(kind: EventKind, name: &str) -> ModuleEvent {
        let mut ev = ModuleEvent::ZERO;
        ev.kind = kind as u32;
        ev.pid = 4242;
        ev.tgid = 4242;
        ev.boot_ns = 77;
        ev.comm[..5].copy_from_slice(b"rmmod");
        ev.name[..name.len()].copy_from_slice(name.as_bytes());
        ev
    }

    fn bytes_of(ev: &ModuleEvent) -> Vec<u8> {
        // SAFETY: ModuleEvent is repr(C) plain data without padding (see
        // layout test), so viewing it as bytes is sound.
        unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(ev).cast::<u8>(),
                size_of::<ModuleEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn layout_has_no_padding() {
        // Sum of the field sizes; any padding would make the kernel and
        // userspace disagree the moment one side changes.
        let fields = 4 * 2 + 8 * 2 + 4 * 6 + 8 + 16 + 64 + 8;
        assert_eq!(size_of::<ModuleEvent>(), fields);
        assert_eq!(size_of::<ModuleEvent>() % 8, 0);
    }

    #[test]
    fn decodes_unload_with_actor() {
        let Decoded::Module(ev) =
            SourceEvent::decode(&bytes_of(&kernel_event(EventKind::Free, "nvme_tcp"))).unwrap()
        else {
            panic!("a module_free of nvme_tcp must decode as a module event");
        };
        assert_eq!(ev.raw, Raw::Free);
        assert_eq!(ev.module.as_str(), "nvme_tcp");
        let actor = ev.actor.unwrap();
        assert_eq!((actor.pid, actor.comm.as_str()), (4242, "rmmod"));
        assert_eq!(ev.boot_ns, 77);
    }

    #[test]
    fn a_free_that_carries_its_unload_begin_decodes_as_both_in_order() {
        let mut rec = kernel_event(EventKind::Free, "nvme_tcp");
        rec.begun_ns = 70;
        let Ok(Decoded::Unloaded { begin, free }) = SourceEvent::decode(&bytes_of(&rec)) else {
            panic!("a module_free with begun_ns must decode as an unload's begin and free");
        };
        assert_eq!((begin.raw, begin.boot_ns), (Raw::UnloadBegin, 70));
        assert_eq!((free.raw, free.boot_ns), (Raw::Free, 77));
        assert_eq!(begin.module.as_str(), "nvme_tcp");
        assert_eq!(begin.actor, free.actor, "one task asked for and freed it");
        assert_eq!(begin.actor.as_ref().map(|a| a.pid), Some(4242));
        // Without a begin it is a plain free (a failed init, a compat task).
        rec.begun_ns = 0;
        assert!(matches!(
            SourceEvent::decode(&bytes_of(&rec)),
            Ok(Decoded::Module(ev)) if ev.raw == Raw::Free
        ));
        // No other kind carries one.
        rec.kind = EventKind::UnloadResult as u32;
        rec.begun_ns = 70;
        assert!(matches!(
            SourceEvent::decode(&bytes_of(&rec)),
            Ok(Decoded::Module(ev)) if ev.raw == Raw::UnloadResult { ret: 0 }
        ));
    }

    #[test]
    fn normalises_dashes_from_user_supplied_names() {
        let decoded =
            SourceEvent::decode(&bytes_of(&kernel_event(EventKind::UnloadBegin, "nvme-tcp")))
                .unwrap();
        assert!(matches!(decoded, Decoded::Module(ev) if ev.module.as_str() == "nvme_tcp"));
    }

    #[test]
    fn full_length_name_without_nul_is_kept() {
        let long = "a".repeat(NAME_LEN);
        let mut ev = kernel_event(EventKind::Load, "");
        ev.name.copy_from_slice(long.as_bytes());
        // 64 bytes is longer than any module name (55): rejected, not truncated.
        assert!(matches!(
            SourceEvent::from_kernel(&ev),
            Err(DecodeError::BadName { .. })
        ));
    }

    #[test]
    fn alias_requests_are_kept_not_rejected() {
        let ev = kernel_event(EventKind::Request, "crypto-xts(aes)");
        let Ok(Decoded::AliasRequest { alias, actor, .. }) = SourceEvent::from_kernel(&ev) else {
            panic!("an alias request must decode");
        };
        assert_eq!((alias.as_str(), actor.pid), ("crypto-xts(aes)", 4242));
        let ev = kernel_event(EventKind::Request, "nvme-tcp");
        assert!(
            matches!(SourceEvent::from_kernel(&ev), Ok(Decoded::Module(e)) if e.raw == Raw::Request)
        );
    }

    #[test]
    fn rejects_wrong_size_and_unknown_kind() {
        assert_eq!(
            SourceEvent::decode(&[0u8; 3]),
            Err(DecodeError::Size {
                len: 3,
                expected: size_of::<ModuleEvent>()
            })
        );
        let mut ev = kernel_event(EventKind::Load, "dm_crypt");
        ev.kind = 99;
        assert_eq!(
            SourceEvent::from_kernel(&ev),
            Err(DecodeError::UnknownKind { kind: 99 })
        );
    }

    #[test]
    fn taints_decode_to_proc_modules_letters() {
        assert_eq!(taint_letters((1 << 12) | (1 << 13)), "OE");
        assert_eq!(taint_letters(0), "");
        assert_eq!(taint_letters(1), "P");
    }

    #[test]
    fn a_refused_unload_decodes_as_denied_not_as_an_event() {
        let mut ev = ModuleEvent::ZERO;
        ev.kind = EventKind::UnloadDenied as u32;
        ev.uid = 1000;
        ev.ret = -1;
        ev.boot_ns = 42;
        ev.name[..8].copy_from_slice(b"dm_crypt");
        ev.comm[..5].copy_from_slice(b"rmmod");
        match SourceEvent::from_kernel(&ev) {
            Ok(Decoded::UnloadDenied {
                module,
                actor,
                boot_ns,
            }) => {
                assert_eq!(module.as_str(), "dm_crypt");
                assert_eq!(
                    (actor.uid, actor.comm.as_str(), boot_ns),
                    (1000, "rmmod", 42)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_name_is_ignorable_and_a_bad_record_is_corrupt() {
        let mut ev = ModuleEvent::ZERO;
        ev.kind = EventKind::UnloadBegin as u32;
        ev.name[..5].copy_from_slice(b"a b\x1bc");
        let err = SourceEvent::from_kernel(&ev).unwrap_err();
        assert!(!err.is_corrupt(), "{err}");
        assert!(DecodeError::UnknownKind { kind: 99 }.is_corrupt());
        assert!(
            DecodeError::Size {
                len: 3,
                expected: 144
            }
            .is_corrupt()
        );
    }
}
