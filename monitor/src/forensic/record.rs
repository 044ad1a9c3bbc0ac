//! The event-log record schema (version [`SCHEMA_VERSION`]): one JSON object
//! per line, the same struct for writing and for reading back.
//!
//! Every record has `v`, `seq`, `time`, `boot_id`, `boot_ns`, `host`,
//! `kind`, `prev_hash` and `hash`; the other members appear only on the
//! kinds they belong to (see the README, "Forensic event log").
use std::{borrow::Cow, fmt, sync::Arc, time::SystemTime};

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::event::Kind;

/// The `v` of every record this build writes.
pub const SCHEMA_VERSION: u32 = 1;

/// What a record is about.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// `module_load`: the module was linked in; its init is about to run.
    ModuleLoad,
    /// The module's init succeeded.
    ModuleLoaded,
    /// The module's init failed.
    ModuleLoadFailed,
    /// `delete_module` was entered.
    ModuleUnloadBegin,
    /// The module is gone.
    ModuleUnload,
    /// `delete_module` failed; the module stays.
    ModuleUnloadFailed,
    /// The kernel asked for the module.
    ModuleRequest,
    /// The state of every required module and every group at start-up.
    Snapshot,
    /// The reconcile found a tracked state wrong and corrected it.
    Drift,
    /// The event source lost events (or could not decode one).
    EventsLost,
    /// The daemon started (version, kernel, config digest).
    #[default]
    MonitorStart,
    /// The daemon stopped cleanly.
    MonitorStop,
    /// SIGHUP: the config was reloaded, or the new one rejected.
    ConfigReload,
    /// A requirement group went from met to unmet, or back.
    RequirementChange,
    /// Start-up (or a failed write) found torn lines; the chain continues
    /// from the last good record.
    LogRecovered,
    /// Records the log could not hold while the disk was failing.
    LogDropped,
    /// A requirement was switched on or off (or became unknown): the V2
    /// setting or node label changed, or the cluster became unreadable.
    RequirementEnablement,
    /// Attempts to unload a required module refused for lack of
    /// CAP_SYS_MODULE, aggregated per uid and module over a window that grows while attempts continue.
    ModuleUnloadDenied,
}

impl RecordKind {
    /// Every kind, in the order the README lists them.
    pub const ALL: [Self; 18] = [
        Self::ModuleLoad,
        Self::ModuleLoaded,
        Self::ModuleLoadFailed,
        Self::ModuleUnloadBegin,
        Self::ModuleUnload,
        Self::ModuleUnloadFailed,
        Self::ModuleRequest,
        Self::Snapshot,
        Self::Drift,
        Self::EventsLost,
        Self::MonitorStart,
        Self::MonitorStop,
        Self::ConfigReload,
        Self::RequirementChange,
        Self::LogRecovered,
        Self::LogDropped,
        Self::RequirementEnablement,
        Self::ModuleUnloadDenied,
    ];

    /// The name in the `kind` member.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ModuleLoad => "module_load",
            Self::ModuleLoaded => "module_loaded",
            Self::ModuleLoadFailed => "module_load_failed",
            Self::ModuleUnloadBegin => "module_unload_begin",
            Self::ModuleUnload => "module_unload",
            Self::ModuleUnloadFailed => "module_unload_failed",
            Self::ModuleRequest => "module_request",
            Self::Snapshot => "snapshot",
            Self::Drift => "drift",
            Self::EventsLost => "events_lost",
            Self::MonitorStart => "monitor_start",
            Self::MonitorStop => "monitor_stop",
            Self::ConfigReload => "config_reload",
            Self::RequirementChange => "requirement_change",
            Self::LogRecovered => "log_recovered",
            Self::LogDropped => "log_dropped",
            Self::RequirementEnablement => "requirement_enablement",
            Self::ModuleUnloadDenied => "module_unload_denied",
        }
    }

    /// The kind named `name`, if there is one.
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The record kind of a tracker event kind.
    #[must_use]
    pub const fn of_event(kind: Kind) -> Self {
        match kind {
            Kind::Load => Self::ModuleLoad,
            Kind::Loaded => Self::ModuleLoaded,
            Kind::LoadFailed => Self::ModuleLoadFailed,
            Kind::UnloadBegin => Self::ModuleUnloadBegin,
            Kind::Unload => Self::ModuleUnload,
            Kind::UnloadFailed => Self::ModuleUnloadFailed,
            Kind::Request => Self::ModuleRequest,
            Kind::Drift => Self::Drift,
        }
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The module an event is about.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleInfo {
    /// Normalised name (`nvme_tcp`).
    pub name: CompactString,
    /// Taint letters as /proc/modules prints them (`"OE"`, `""` for none);
    /// null where the source does not know (everything but eBPF's
    /// `module_load`).
    pub taints: Option<CompactString>,
}

/// The task that caused an event.
///
/// `pid`, `tgid`, `uid`, `gid`, `comm` and `cgroup_id` are the kernel's, taken
/// in the event itself. `ppid`, `exe`, `cmdline`, `cgroup`, `container_id`
/// and `pod_uid` are read from `/proc/<tgid>` right after the event arrived
/// (`read_late` is always true to say so): null when the process was already
/// gone, or when `/proc/<tgid>` no longer showed the event's `comm` (the pid
/// was reused).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorInfo {
    /// The cgroup path from `/proc/<tgid>/cgroup` (read late).
    pub cgroup: Option<String>,
    /// The kernel's cgroup v2 id of the task.
    pub cgroup_id: u64,
    /// `/proc/<tgid>/cmdline`, one string per argument, at most
    /// [`CMDLINE_MAX`](super::actor::CMDLINE_MAX) bytes in all (read late).
    pub cmdline: Option<Vec<String>>,
    /// The thread's name, at most 15 bytes.
    pub comm: CompactString,
    /// 64-hex container id found in the cgroup path (read late).
    pub container_id: Option<String>,
    /// `/proc/<tgid>/exe` (read late).
    pub exe: Option<String>,
    pub gid: u32,
    /// Thread id.
    pub pid: u32,
    /// Kubernetes pod UID found in the cgroup path (read late).
    pub pod_uid: Option<String>,
    /// Parent process id (read late).
    pub ppid: Option<u32>,
    /// Always true: the fields marked "read late" come from /proc after the
    /// event, not from the kernel at the event.
    pub read_late: bool,
    /// Process id.
    pub tgid: u32,
    pub uid: u32,
}

/// A module's state before and after a record's event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// The state before, e.g. `available` (the daemon's names are static).
    pub from: Cow<'static, str>,
    /// The state after.
    pub to: Cow<'static, str>,
}

/// One requirement group an event touches, after the event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequirementEffect {
    /// Whether this event flipped it (it was `!met` before).
    pub changed: bool,
    /// Whether it is met after the event.
    pub met: bool,
    /// The group.
    pub name: CompactString,
}

/// A group that went from met to unmet or back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequirementFlip {
    /// After.
    pub met: bool,
    pub name: CompactString,
    /// Before.
    pub was: bool,
}

/// What `requirement_enablement` says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnablementInfo {
    /// After.
    pub enabled: Option<bool>,
    /// One sentence: the setting's value, the label, the API error.
    pub reason: String,
    /// `v2-data-engine` or `v2-hugepages`.
    pub requirement: String,
    /// The input that decided (`flag`, `node-label`, `longhorn-setting`,
    /// `config`, `default`), or the one that could not be read.
    pub source: String,
    /// Before: true, false, or null for unknown.
    pub was: Option<bool>,
}

/// What `module_unload_denied` says: one user's refused attempts on one
/// module within a window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeniedInfo {
    /// Attempts the kernel reported for this actor and module.
    pub count: u64,
    /// CLOCK_BOOTTIME of the first and the last of them.
    pub first_boot_ns: u64,
    pub last_boot_ns: u64,
    /// Attempts by anyone the kernel only counted in the window (over its
    /// per-CPU rate limit), so not attributed to an actor.
    pub suppressed_in_window: u64,
    /// The window they were gathered over, seconds.
    pub window_secs: u64,
}

/// A required module in a `snapshot` record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStateInfo {
    pub name: String,
    pub state: String,
    /// Taint letters from /proc/modules; null when not loaded.
    pub taints: Option<String>,
}

/// What `monitor_start` says about the daemon.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorInfo {
    /// Hex SHA-256 of the config file's bytes, or (no file) of the resolved
    /// groups as JSON.
    pub config_digest: String,
    /// `file` or `groups`: what `config_digest` is a digest of.
    pub config_digest_of: String,
    /// The config file, if any.
    pub config_file: Option<String>,
    /// The enabled groups.
    pub groups: Vec<String>,
    /// `uname -r` of the host.
    pub kernel_release: String,
    /// The daemon's pid.
    pub pid: u32,
    /// The active event source (`ebpf`, `uevent`, `poll`).
    pub source: String,
    /// kmod-monitor's version.
    pub version: String,
}

/// What `config_reload` says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigInfo {
    /// Whether the new config was taken (false: rejected, old one kept).
    pub accepted: bool,
    /// Keys the file changed that took effect at once.
    #[serde(default)]
    pub applied: Vec<String>,
    /// Hex SHA-256 of the bytes read (null when unreadable).
    pub digest: Option<String>,
    /// Why it was rejected.
    pub error: Option<String>,
    /// The config file.
    pub file: String,
    /// The enabled groups after the reload.
    pub groups: Vec<String>,
    /// Keys the file changed that a command-line flag still overrides.
    #[serde(default)]
    pub overridden: Vec<String>,
    /// Keys the file changed that take effect only at the next start.
    #[serde(default)]
    pub restart_required: Vec<String>,
}

/// A torn or unparsable line named by `log_recovered`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TornLine {
    /// Its length in bytes, without the newline.
    pub bytes: u64,
    /// 1-based line number in the same file as the `log_recovered` record.
    pub line: u64,
    /// Whether it lacked its newline (a write cut short); start-up added one.
    pub unterminated: bool,
}

/// One line of the event log.
///
/// Optional members are left out when they do not apply (`None`, empty,
/// false), so a record carries only what its kind needs.
///
/// The members of this struct and of every struct in it are declared in the
/// byte order of their names, and every map in it is sorted: serde_json's
/// compact output of a record is then its canonical form (chain.rs), which
/// [`seal_into`](super::chain::seal_into) writes directly (debug builds
/// check it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<ActorInfo>,
    /// `log_recovered`: seq of the last good record it continues from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_seq: Option<u64>,
    /// `/proc/sys/kernel/random/boot_id` of the host (`""` if unreadable).
    /// Shared: every record of a log carries the same one.
    pub boot_id: Arc<str>,
    /// CLOCK_BOOTTIME ns of the event (in-kernel for eBPF, receipt for
    /// uevent/poll), or of the record for records that are not events.
    pub boot_ns: u64,
    /// `requirement_change`: the kind of record that caused it (the record
    /// just before it), e.g. `module_unload`, `drift`, `config_reload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<RecordKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigInfo>,
    /// `module_unload_denied`: how many attempts, when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied: Option<DeniedInfo>,
    /// `log_dropped`: how many records were not written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    /// `requirement_enablement`: what switched, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enablement: Option<EnablementInfo>,
    /// Hex SHA-256 of this record's canonical form without `hash` (see
    /// [`seal_into`](super::chain::seal_into)); left out while empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hash: String,
    /// The event happened before the start-up snapshot: history only, it
    /// changed no state.
    #[serde(default, skip_serializing_if = "is_false")]
    pub historical: bool,
    /// The node name. Shared, as `boot_id` is.
    pub host: Arc<str>,
    pub kind: RecordKind,
    /// `events_lost`: the source's running total of lost events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_total: Option<u64>,
    /// When the daemon made the record, until the log's writer thread
    /// writes it into `time` as it seals the record: formatting there
    /// keeps that allocation off the event loop. Never serialised.
    #[serde(skip)]
    pub made: Option<SystemTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<ModuleInfo>,
    /// `snapshot`: every required module's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<ModuleStateInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<MonitorInfo>,
    /// Hex SHA-256 of the previous record (64 zeros before the first).
    pub prev_hash: String,
    /// `events_lost` (undecodable record), `monitor_stop` (signal): why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `requirement_change`: the group that flipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirement: Option<RequirementFlip>,
    /// Module events: each group holding the module. Snapshot and reload:
    /// every group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<RequirementEffect>,
    /// 1 for the first record ever; +1 per record, across restarts and
    /// rotated files.
    pub seq: u64,
    /// The event source that saw it (`ebpf`, `uevent`, `poll`,
    /// `initstate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<CompactString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateChange>,
    /// RFC 3339 UTC with nanoseconds: the wall clock when the daemon made the
    /// record (a record held back by a failing disk keeps its time).
    pub time: String,
    /// `log_recovered`: the lines after the last good record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub torn: Vec<TornLine>,
    /// Schema version, [`SCHEMA_VERSION`].
    pub v: u32,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
const fn is_false(b: &bool) -> bool {
    !*b
}

/// Bytes the allocator adds to every heap block: a chunk header, rounded
/// up (glibc's is 8 bytes and rounds to 16; musl's mallocng 4 to 16).
const ALLOC_OVERHEAD: usize = 16;

/// What a value owns on the heap, in bytes, allocator overhead included:
/// what the event log's byte bound counts ([`Record::footprint`]).
trait Heap {
    fn heap_bytes(&self) -> usize;
}

/// Short strings (names) are held inline, without a heap block.
impl Heap for CompactString {
    fn heap_bytes(&self) -> usize {
        if self.is_heap_allocated() {
            self.capacity() + ALLOC_OVERHEAD
        } else {
            0
        }
    }
}

impl Heap for Cow<'static, str> {
    fn heap_bytes(&self) -> usize {
        match self {
            Cow::Borrowed(_) => 0,
            Cow::Owned(s) => s.heap_bytes(),
        }
    }
}

/// Shared with the log itself (`boot_id`, `host`): a record adds a
/// reference, not a copy.
impl Heap for Arc<str> {
    fn heap_bytes(&self) -> usize {
        0
    }
}

impl Heap for String {
    fn heap_bytes(&self) -> usize {
        match self.capacity() {
            0 => 0,
            n => n + ALLOC_OVERHEAD,
        }
    }
}

impl<T: Heap> Heap for Option<T> {
    fn heap_bytes(&self) -> usize {
        self.as_ref().map_or(0, Heap::heap_bytes)
    }
}

impl<T: Heap> Heap for Vec<T> {
    fn heap_bytes(&self) -> usize {
        let block = match self.capacity() {
            0 => 0,
            n => n * std::mem::size_of::<T>() + ALLOC_OVERHEAD,
        };
        block + self.iter().map(Heap::heap_bytes).sum::<usize>()
    }
}

impl Heap for ModuleInfo {
    fn heap_bytes(&self) -> usize {
        let Self { name, taints } = self;
        name.heap_bytes() + taints.heap_bytes()
    }
}

impl Heap for ActorInfo {
    fn heap_bytes(&self) -> usize {
        let Self {
            pid: _,
            tgid: _,
            ppid: _,
            uid: _,
            gid: _,
            comm,
            exe,
            cmdline,
            cgroup_id: _,
            cgroup,
            container_id,
            pod_uid,
            read_late: _,
        } = self;
        comm.heap_bytes()
            + exe.heap_bytes()
            + cmdline.heap_bytes()
            + cgroup.heap_bytes()
            + container_id.heap_bytes()
            + pod_uid.heap_bytes()
    }
}

impl Heap for StateChange {
    fn heap_bytes(&self) -> usize {
        let Self { from, to } = self;
        from.heap_bytes() + to.heap_bytes()
    }
}

impl Heap for RequirementEffect {
    fn heap_bytes(&self) -> usize {
        let Self {
            name,
            met: _,
            changed: _,
        } = self;
        name.heap_bytes()
    }
}

impl Heap for RequirementFlip {
    fn heap_bytes(&self) -> usize {
        let Self {
            name,
            was: _,
            met: _,
        } = self;
        name.heap_bytes()
    }
}

impl Heap for DeniedInfo {
    fn heap_bytes(&self) -> usize {
        let Self {
            count: _,
            first_boot_ns: _,
            last_boot_ns: _,
            window_secs: _,
            suppressed_in_window: _,
        } = self;
        0
    }
}

impl Heap for EnablementInfo {
    fn heap_bytes(&self) -> usize {
        let Self {
            requirement,
            was: _,
            enabled: _,
            source,
            reason,
        } = self;
        requirement.heap_bytes() + source.heap_bytes() + reason.heap_bytes()
    }
}

impl Heap for ModuleStateInfo {
    fn heap_bytes(&self) -> usize {
        let Self {
            name,
            state,
            taints,
        } = self;
        name.heap_bytes() + state.heap_bytes() + taints.heap_bytes()
    }
}

impl Heap for MonitorInfo {
    fn heap_bytes(&self) -> usize {
        let Self {
            version,
            kernel_release,
            source,
            pid: _,
            groups,
            config_file,
            config_digest,
            config_digest_of,
        } = self;
        version.heap_bytes()
            + kernel_release.heap_bytes()
            + source.heap_bytes()
            + groups.heap_bytes()
            + config_file.heap_bytes()
            + config_digest.heap_bytes()
            + config_digest_of.heap_bytes()
    }
}

impl Heap for ConfigInfo {
    fn heap_bytes(&self) -> usize {
        let Self {
            file,
            digest,
            accepted: _,
            error,
            groups,
            applied,
            restart_required,
            overridden,
        } = self;
        file.heap_bytes()
            + digest.heap_bytes()
            + error.heap_bytes()
            + groups.heap_bytes()
            + applied.heap_bytes()
            + restart_required.heap_bytes()
            + overridden.heap_bytes()
    }
}

impl Heap for TornLine {
    fn heap_bytes(&self) -> usize {
        let Self {
            line: _,
            bytes: _,
            unterminated: _,
        } = self;
        0
    }
}

/// A string the writer fills in as it seals the record, as the record
/// holds it once sealed: a chain member (`prev_hash`, `hash`: 64 hex
/// digits) or `time` (30 bytes, formatted from `made`), in a string the
/// writer may reuse from a written record (at most 64 bytes, see
/// writer.rs `SPARE_STRING_BYTES`). Records are charged when queued,
/// before the writer seals them, and a sealed record held behind a failing
/// disk keeps them.
fn sealed_member_bytes(s: &String) -> usize {
    s.heap_bytes().max(64 + ALLOC_OVERHEAD)
}

impl Record {
    /// Bytes this record takes in memory once boxed: the struct, every heap
    /// block it owns, and the allocator's overhead on each. The event log's
    /// buffer bound (`buffer_bytes`) counts this.
    #[must_use]
    pub fn footprint(&self) -> usize {
        let Self {
            v: _,
            seq: _,
            time,
            boot_id,
            boot_ns: _,
            host,
            kind: _,
            made: _,
            module,
            actor,
            source,
            historical: _,
            state,
            requirements,
            requirement,
            cause: _,
            modules,
            monitor,
            enablement,
            config,
            lost_total: _,
            reason,
            torn,
            after_seq: _,
            dropped: _,
            denied,
            prev_hash,
            hash,
        } = self;
        std::mem::size_of::<Self>()
            + ALLOC_OVERHEAD
            + sealed_member_bytes(time)
            + boot_id.heap_bytes()
            + host.heap_bytes()
            + module.heap_bytes()
            + actor.heap_bytes()
            + source.heap_bytes()
            + state.heap_bytes()
            + requirements.heap_bytes()
            + requirement.heap_bytes()
            + modules.heap_bytes()
            + monitor.heap_bytes()
            + enablement.heap_bytes()
            + config.heap_bytes()
            + reason.heap_bytes()
            + torn.heap_bytes()
            + denied.heap_bytes()
            + sealed_member_bytes(prev_hash)
            + sealed_member_bytes(hash)
    }

    /// A record of `kind` about something at `boot_ns`; the log fills in
    /// `v`, `time`, `boot_id`, `host`, `seq` and the hashes.
    #[must_use]
    pub fn new(kind: RecordKind, boot_ns: u64) -> Self {
        Self {
            v: SCHEMA_VERSION,
            kind,
            boot_ns,
            ..Self::default()
        }
    }

    /// [`new`](Self::new), in a box of its own.
    #[must_use]
    pub fn boxed(kind: RecordKind, boot_ns: u64) -> Box<Self> {
        Box::new(Self::new(kind, boot_ns))
    }

    /// The module this record is about, if any.
    #[must_use]
    pub fn module_name(&self) -> Option<&str> {
        self.module.as_ref().map(|m| m.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for kind in RecordKind::ALL {
            assert_eq!(RecordKind::parse(kind.as_str()), Some(kind));
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
        }
        assert_eq!(RecordKind::parse("module_unloaded"), None);
        for kind in Kind::ALL {
            let name = RecordKind::of_event(kind).as_str();
            assert!(
                name == "drift" || name == format!("module_{kind}"),
                "{kind} -> {name}"
            );
        }
    }

    #[test]
    fn footprint_counts_the_struct_and_every_heap_block() {
        let bare = Record::new(RecordKind::MonitorStop, 5);
        let base = bare.footprint();
        // The chain members and the time count as sealed from the start.
        assert_eq!(
            base,
            std::mem::size_of::<Record>() + ALLOC_OVERHEAD + 3 * (64 + ALLOC_OVERHEAD)
        );
        let mut r = bare.clone();
        r.reason = Some(String::with_capacity(100));
        assert_eq!(r.footprint(), base + 100 + ALLOC_OVERHEAD);
        r.actor = Some(ActorInfo {
            comm: "rmmod".into(),
            cmdline: Some(vec!["rmmod".into(), "dm_crypt".into()]),
            ..ActorInfo::default()
        });
        // comm is held inline: no heap block.
        let actor = 2 * std::mem::size_of::<String>() + ALLOC_OVERHEAD // the list
            + (5 + ALLOC_OVERHEAD) + (8 + ALLOC_OVERHEAD); // its strings
        assert_eq!(r.footprint(), base + 100 + ALLOC_OVERHEAD + actor);
        // A name too long to be held inline is counted.
        let long = "x".repeat(40);
        r.source = Some(long.as_str().into());
        let source = r.source.as_ref().map_or(0, CompactString::capacity);
        assert!(source >= 40);
        assert_eq!(
            r.footprint(),
            base + 100 + ALLOC_OVERHEAD + actor + source + ALLOC_OVERHEAD
        );
        // An actor's 4 KiB cmdline is counted in full.
        r.actor.as_mut().unwrap().cmdline = Some(vec!["x".repeat(4096)]);
        assert!(r.footprint() > base + 4096);
    }

    #[test]
    fn optional_members_are_left_out() {
        let mut r = Record::new(RecordKind::MonitorStop, 5);
        // `hash` is left out only while empty (an unsealed record).
        r.hash = "h".into();
        let json = serde_json::to_value(&r).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "boot_id",
                "boot_ns",
                "hash",
                "host",
                "kind",
                "prev_hash",
                "seq",
                "time",
                "v"
            ]
        );
        let back: Record = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }
}
