//! The forensic records the daemon writes, built from what the tracker and
//! the cluster state say. Pure: no I/O, no clock reads (the caller passes
//! every timestamp and the already-enriched actor, or the function that
//! enriches it), so each builder is unit-tested here.
//!
//! An event's record is not built on the event path: [`PendingEvent`]
//! keeps what the record needs from the moment the event was applied (the
//! state change and the verdicts then), and [`Deferred`] holds it, in
//! order with every other record made meanwhile, until the daemon has
//! published the new state; only then are actors enriched from /proc and
//! records built and handed to the log.
use compact_str::CompactString;

use crate::{
    event::{Actor, Kind, SourceEvent, taint_letters},
    forensic::{
        Record, RecordKind,
        chain::{canonical, sha256_hex},
        record::{
            ActorInfo, ConfigInfo, DeniedInfo, EnablementInfo, ModuleInfo, ModuleStateInfo,
            MonitorInfo, RequirementEffect, RequirementFlip, StateChange,
        },
    },
    host::Snapshot,
    longhorn::v2::Flip,
    names::ModuleName,
    requirements::GroupSpec,
    tracker::{GroupChange, GroupChanges, Outcome, Tracker},
};

/// `{name, taints}` of a record about a module.
#[must_use]
pub fn module_info(name: &ModuleName, taints: Option<CompactString>) -> ModuleInfo {
    ModuleInfo {
        name: name.as_str().into(),
        taints,
    }
}

/// The enabled groups' names.
#[must_use]
pub fn group_names(tracker: &Tracker) -> Vec<String> {
    tracker.groups().iter().map(|g| g.name.clone()).collect()
}

/// Each enabled group that holds `module`, with its verdict now and whether
/// `changes` flipped it; nothing for a module no group requires.
#[must_use]
pub fn effects(
    tracker: &Tracker,
    module: &ModuleName,
    changes: &[GroupChange],
) -> Vec<RequirementEffect> {
    effects_before(tracker, module, changes, &[])
}

/// [`effects`] as they were before `later` happened: a group `later`
/// flipped (its earliest flip, one per group) is given the verdict it had
/// before that flip.
fn effects_before(
    tracker: &Tracker,
    module: &ModuleName,
    changes: &[GroupChange],
    later: &[GroupChange],
) -> Vec<RequirementEffect> {
    tracker
        .verdicts_holding(module)
        .map(|(name, met)| RequirementEffect {
            changed: changes.iter().any(|c| &*c.group == name),
            name: name.into(),
            met: later
                .iter()
                .find(|c| &*c.group == name)
                .map_or(met, |c| !c.met),
        })
        .collect()
}

/// Every group's verdict now; `changes` marks the ones that just flipped.
#[must_use]
pub fn all_effects(tracker: &Tracker, changes: &[GroupChange]) -> Vec<RequirementEffect> {
    tracker
        .report()
        .into_iter()
        .map(|g| RequirementEffect {
            changed: changes.iter().any(|c| *c.group == *g.name),
            name: g.name.into(),
            met: g.met,
        })
        .collect()
}

/// A module event's record: the module, the actor (enriched by the caller),
/// the state change and the groups it touches. `outcome` is `None` for an
/// event from before the snapshot, which changed no state.
#[must_use]
pub fn event_record(
    tracker: &Tracker,
    ev: &SourceEvent,
    kind: Kind,
    outcome: Option<&Outcome>,
    actor: Option<ActorInfo>,
    source: &str,
) -> Record {
    PendingEvent::new(tracker, ev, kind, outcome, source)
        .into_records(actor)
        .swap_remove(0)
}

/// What an event's records need from the moment the event was applied:
/// the event, the state change and every verdict then. Cheap to make; the
/// records themselves are built by [`into_records`](Self::into_records)
/// once the actor is enriched.
#[derive(Clone, Debug)]
pub struct PendingEvent {
    ev: SourceEvent,
    kind: Kind,
    /// The state change, the groups holding the module (with their
    /// verdicts then) and the groups it flipped; `None` for an event from
    /// before the snapshot.
    applied: Option<(
        StateChange,
        Vec<RequirementEffect>,
        ModuleName,
        GroupChanges,
    )>,
    source: CompactString,
    /// The actor as /proc showed it, once read ([`Deferred::enrich_waiting`]).
    enriched: Option<ActorInfo>,
}

impl PendingEvent {
    /// Takes what the records of `ev` (applied with `outcome`) need from
    /// `tracker` now.
    #[must_use]
    pub fn new(
        tracker: &Tracker,
        ev: &SourceEvent,
        kind: Kind,
        outcome: Option<&Outcome>,
        source: &str,
    ) -> Self {
        Self::before(tracker, ev, kind, outcome, source, &[])
    }

    /// [`new`](Self::new), taken after `later` (the earliest flip of each
    /// group by events applied after `ev`) has moved the state on: the
    /// view is still the one right after `ev`.
    #[must_use]
    pub fn before(
        tracker: &Tracker,
        ev: &SourceEvent,
        kind: Kind,
        outcome: Option<&Outcome>,
        source: &str,
        later: &[GroupChange],
    ) -> Self {
        Self {
            ev: ev.clone(),
            kind,
            applied: outcome.map(|o| {
                (
                    StateChange {
                        from: o.from.as_str().into(),
                        to: o.to.as_str().into(),
                    },
                    effects_before(tracker, &o.module, &o.group_changes, later),
                    o.module.clone(),
                    o.group_changes.clone(),
                )
            }),
            source: source.into(),
            enriched: None,
        }
    }

    /// The event's in-kernel (or observed) time.
    #[must_use]
    pub const fn boot_ns(&self) -> u64 {
        self.ev.boot_ns
    }

    /// Who caused the event, as the kernel saw it.
    #[must_use]
    pub const fn actor(&self) -> Option<&Actor> {
        self.ev.actor.as_ref()
    }

    /// The event's record, with `actor` (enriched by the caller), then one
    /// `requirement_change` per group it flipped.
    #[must_use]
    pub fn into_records(self, actor: Option<ActorInfo>) -> Vec<Record> {
        let mut out = Vec::new();
        self.append_records(actor, &mut out, &mut Record::boxed);
        out.into_iter().map(|r| *r).collect()
    }

    /// [`into_records`](Self::into_records) onto the end of `out`, which
    /// the caller reuses (no list of its own per event), each record built
    /// in a box `new_record` gives (see
    /// [`EventLog::record`](crate::forensic::EventLog::record)).
    pub fn append_records(
        self,
        actor: Option<ActorInfo>,
        out: &mut Vec<Box<Record>>,
        new_record: &mut impl FnMut(RecordKind, u64) -> Box<Record>,
    ) {
        let Self {
            ev,
            kind,
            applied,
            source,
            enriched: _,
        } = self;
        let mut r = new_record(RecordKind::of_event(kind), ev.boot_ns);
        // Only eBPF's module_load carries taints.
        let taints = (kind == Kind::Load && ev.actor.is_some()).then(|| taint_letters(ev.taints));
        r.module = Some(module_info(&ev.module, taints));
        r.actor = actor;
        r.source = Some(source);
        let Some((state, requirements, module, changes)) = applied else {
            r.historical = true;
            out.push(r);
            return;
        };
        r.state = Some(state);
        r.requirements = requirements;
        out.push(r);
        for c in &changes {
            let mut r = new_record(RecordKind::RequirementChange, ev.boot_ns);
            group_change(&mut r, Some(&module), c, RecordKind::of_event(kind));
            out.push(r);
        }
    }
}

/// How many events and records [`Deferred`] may hold before the daemon
/// flushes them even while events keep coming (one ring drain batch). It
/// is checked between turns of the loop, and one turn takes at most what
/// the source queue holds, so the real bound is this plus
/// [`crate::source::QUEUE_CAPACITY`].
pub const DEFERRED_MAX: usize = 256;

/// Records waiting for the daemon to publish the state, in the order they
/// were made: events' (not built yet, their actors not enriched) and any
/// other record made after one of those, so the log keeps the daemon's
/// order.
#[derive(Debug, Default)]
pub struct Deferred {
    items: Vec<DeferredItem>,
}

#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "items wait one loop turn in a reused Vec; boxing would allocate per record"
)]
enum DeferredItem {
    Event(PendingEvent),
    Ready(Record),
}

impl Deferred {
    /// Holds an event's records until [`drain`](Self::drain).
    pub fn event(&mut self, pending: PendingEvent) {
        self.items.push(DeferredItem::Event(pending));
    }

    /// A record made now: held behind the waiting ones if there are any
    /// (`None`), else handed back to be appended at once.
    pub fn record(&mut self, record: Record) -> Option<Record> {
        if self.items.is_empty() {
            return Some(record);
        }
        self.items.push(DeferredItem::Ready(record));
        None
    }

    /// Whether nothing waits.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// How many events and records wait.
    #[must_use]
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Reads the actors of the waiting events that have not been read yet,
    /// while their processes are still likely to exist (a held publish
    /// waits for a load's result; a loader may exit right after it).
    pub fn enrich_waiting(&mut self, mut enrich: impl FnMut(u64, &Actor) -> ActorInfo) {
        for item in &mut self.items {
            if let DeferredItem::Event(p) = item
                && p.enriched.is_none()
                && let Some(actor) = p.ev.actor.as_ref()
            {
                p.enriched = Some(enrich(p.ev.boot_ns, actor));
            }
        }
    }

    /// Builds every waiting record, in order, calling `enrich` with each
    /// event's time and actor (the /proc reads) for those not read yet.
    /// Each event's records are built in a box `new_record` gives.
    pub fn drain(
        &mut self,
        mut enrich: impl FnMut(u64, &Actor) -> ActorInfo,
        mut new_record: impl FnMut(RecordKind, u64) -> Box<Record>,
    ) -> Vec<Box<Record>> {
        let mut out = Vec::with_capacity(self.items.len());
        for item in self.items.drain(..) {
            match item {
                DeferredItem::Ready(r) => out.push(Box::new(r)),
                DeferredItem::Event(mut p) => {
                    let actor = match p.enriched.take() {
                        Some(info) => Some(info),
                        None => p.actor().map(|a| enrich(p.boot_ns(), a)),
                    };
                    p.append_records(actor, &mut out, &mut new_record);
                }
            }
        }
        out
    }
}

/// One `requirement_change` per flipped group, caused by `cause` (the kind
/// of the record just before them).
#[must_use]
pub fn group_changes(
    module: Option<&ModuleName>,
    changes: &[GroupChange],
    cause: RecordKind,
    boot_ns: u64,
) -> Vec<Record> {
    changes
        .iter()
        .map(|c| {
            let mut r = Record::new(RecordKind::RequirementChange, boot_ns);
            group_change(&mut r, module, c, cause);
            r
        })
        .collect()
}

/// Fills in a new `requirement_change` record for `c`.
fn group_change(r: &mut Record, module: Option<&ModuleName>, c: &GroupChange, cause: RecordKind) {
    r.module = module.map(|m| module_info(m, None));
    r.requirement = Some(RequirementFlip {
        name: (*c.group).into(),
        was: !c.met,
        met: c.met,
    });
    r.cause = Some(cause);
}

/// A `drift` record: the reconcile found `o.module` in another state than
/// tracked and corrected it.
#[must_use]
pub fn drift(tracker: &Tracker, o: &Outcome, boot_ns: u64) -> Record {
    let mut r = Record::new(RecordKind::Drift, boot_ns);
    r.module = Some(module_info(&o.module, None));
    r.source = Some("reconcile".into());
    r.state = Some(StateChange {
        from: o.from.as_str().into(),
        to: o.to.as_str().into(),
    });
    r.requirements = effects(tracker, &o.module, &o.group_changes);
    r
}

/// `events_lost`, with the source's running total or the reason a record
/// could not be decoded.
#[must_use]
pub fn events_lost(
    source: &str,
    lost_total: Option<u64>,
    reason: Option<String>,
    boot_ns: u64,
) -> Record {
    let mut r = Record::new(RecordKind::EventsLost, boot_ns);
    r.lost_total = lost_total;
    r.reason = reason;
    r.source = Some(source.into());
    r
}

/// A `module_unload_denied` record: one user's refused attempts on one
/// module in the window that just closed (`actor` is the last attempt's,
/// enriched by the caller).
#[must_use]
pub fn unload_denied(
    key: Option<(&super::denied::Key, &super::denied::Attempts)>,
    actor: Option<ActorInfo>,
    window: std::time::Duration,
    suppressed_in_window: u64,
    boot_ns: u64,
) -> Record {
    let mut r = Record::new(RecordKind::ModuleUnloadDenied, boot_ns);
    if let Some((key, attempts)) = key {
        r.module = Some(module_info(&key.module, None));
        r.actor = actor;
        r.denied = Some(DeniedInfo {
            count: attempts.count,
            first_boot_ns: attempts.first_boot_ns,
            last_boot_ns: attempts.last_boot_ns,
            window_secs: window.as_secs(),
            suppressed_in_window,
        });
    }
    r
}

/// The attempts of a window beyond its key limit, without an actor.
#[must_use]
pub fn unload_denied_other(
    count: u64,
    window: std::time::Duration,
    suppressed_in_window: u64,
    boot_ns: u64,
) -> Record {
    let mut r = Record::new(RecordKind::ModuleUnloadDenied, boot_ns);
    r.reason = Some(format!(
        "{count} more attempts by other users (over {} uid/module keys in the window)",
        super::denied::MAX_KEYS
    ));
    r.denied = Some(DeniedInfo {
        count,
        first_boot_ns: 0,
        last_boot_ns: 0,
        window_secs: window.as_secs(),
        suppressed_in_window,
    });
    r
}

/// A `requirement_enablement` record for one flip.
#[must_use]
pub fn enablement(flip: &Flip, boot_ns: u64) -> Record {
    let mut r = Record::new(RecordKind::RequirementEnablement, boot_ns);
    r.enablement = Some(EnablementInfo {
        requirement: flip.requirement.to_owned(),
        was: flip.was.enabled,
        enabled: flip.now.enabled,
        source: flip.now.source.as_str().to_owned(),
        reason: flip.now.reason.clone(),
    });
    r
}

/// A `requirement_change` of a requirement without modules (the hugepage
/// pool), with the reason in words.
#[must_use]
pub fn requirement_flip(name: &str, was: bool, met: bool, reason: String, boot_ns: u64) -> Record {
    let mut r = Record::new(RecordKind::RequirementChange, boot_ns);
    r.requirement = Some(RequirementFlip {
        name: name.into(),
        was,
        met,
    });
    r.reason = Some(reason);
    r
}

/// The config file and the SHA-256 of `bytes` (its content, when it could
/// be read); without them, the SHA-256 of the resolved groups' canonical
/// JSON. Returns `(file, digest, what the digest is of)`.
#[must_use]
pub fn config_digest(
    file: Option<String>,
    bytes: Option<&[u8]>,
    groups: &[GroupSpec],
) -> (Option<String>, String, &'static str) {
    if let Some(bytes) = bytes {
        return (file, sha256_hex(bytes), "file");
    }
    let groups = serde_json::to_value(groups).map_or_else(|_| String::new(), |v| canonical(&v));
    (file, sha256_hex(groups.as_bytes()), "groups")
}

/// Who started, with what (the caller fills in the version, pid, source
/// and digest).
pub struct StartInfo<'a> {
    pub source: &'a str,
    pub pid: u32,
    pub config_file: Option<String>,
    pub config_bytes: Option<&'a [u8]>,
    pub now_ns: u64,
    pub snapshot_ns: u64,
}

/// `monitor_start` then `snapshot`: who we are and what start-up saw
/// (every required module once, with its taints, and every group).
#[must_use]
pub fn start(tracker: &Tracker, snapshot: &Snapshot, info: &StartInfo<'_>) -> [Record; 2] {
    let StartInfo {
        source,
        pid,
        config_file,
        config_bytes,
        now_ns,
        snapshot_ns,
    } = info;
    let (config_file, config_digest, config_digest_of) =
        config_digest(config_file.clone(), *config_bytes, tracker.groups());
    let mut start = Record::new(RecordKind::MonitorStart, *now_ns);
    start.monitor = Some(MonitorInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        kernel_release: snapshot.kernel_release.clone(),
        source: (*source).to_owned(),
        pid: *pid,
        groups: group_names(tracker),
        config_file,
        config_digest,
        config_digest_of: config_digest_of.to_owned(),
    });
    let report = tracker.report();
    let mut snap = Record::new(RecordKind::Snapshot, *snapshot_ns);
    for m in report.iter().flat_map(|g| &g.modules) {
        if snap.modules.iter().any(|s| s.name == m.name.as_str()) {
            continue;
        }
        snap.modules.push(ModuleStateInfo {
            name: m.name.to_string(),
            state: m.state.to_string(),
            taints: snapshot.loaded.get(&m.name).map(|l| l.taints.clone()),
        });
    }
    snap.requirements = all_effects(tracker, &[]);
    [start, snap]
}

/// What a SIGHUP did with the file: taken (and which keys did what), or
/// rejected with the error.
pub struct ReloadInfo<'a> {
    pub file: String,
    pub digest: Option<String>,
    pub outcome: Result<ReloadKeys<'a>, String>,
}

/// The keys a taken reload changed, sorted by what happened to them.
pub struct ReloadKeys<'a> {
    pub applied: &'a [&'static str],
    pub restart_required: &'a [&'static str],
    pub overridden: &'a [&'static str],
    /// The groups it flipped.
    pub changes: &'a [GroupChange],
}

/// A `config_reload` record.
#[must_use]
pub fn config_reload(tracker: &Tracker, info: ReloadInfo<'_>, boot_ns: u64) -> Record {
    let ReloadInfo {
        file,
        digest,
        outcome,
    } = info;
    let owned = |keys: &[&'static str]| keys.iter().map(|k| (*k).to_owned()).collect();
    let mut r = Record::new(RecordKind::ConfigReload, boot_ns);
    match outcome {
        Ok(ReloadKeys {
            applied,
            restart_required,
            overridden,
            changes,
        }) => {
            r.config = Some(ConfigInfo {
                file,
                digest,
                accepted: true,
                error: None,
                groups: group_names(tracker),
                applied: owned(applied),
                restart_required: owned(restart_required),
                overridden: owned(overridden),
            });
            r.requirements = all_effects(tracker, changes);
        }
        Err(error) => {
            r.config = Some(ConfigInfo {
                file,
                digest,
                accepted: false,
                error: Some(error),
                groups: group_names(tracker),
                applied: Vec::new(),
                restart_required: Vec::new(),
                overridden: Vec::new(),
            });
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::Raw,
        testing::{event, longhorn_groups, name, snapshot_debian_6_1},
    };

    #[test]
    fn an_unload_record_names_the_change_and_the_group_it_broke() {
        let mut t = Tracker::new(&snapshot_debian_6_1(), longhorn_groups());
        let ev = event(Raw::Free, "nvme_tcp", 7);
        let o = t.apply(&ev);
        let kind = o.kind.unwrap();
        let r = event_record(&t, &ev, kind, Some(&o), None, "ebpf");
        assert_eq!(r.kind, RecordKind::ModuleUnload);
        assert_eq!(r.boot_ns, 7);
        assert_eq!(r.source.as_deref(), Some("ebpf"));
        assert_eq!(
            r.state,
            Some(StateChange {
                from: "loaded".into(),
                to: "available".into()
            })
        );
        assert_eq!(
            r.requirements,
            [RequirementEffect {
                name: "v2-data-engine".into(),
                met: false,
                changed: false,
            }],
            "uio_pci_generic is not loaded in the fixture, so V2 was already unmet"
        );
        assert!(!r.historical);
        // The group changes follow, caused by this record's kind.
        let flips = group_changes(Some(&o.module), &o.group_changes, r.kind, 7);
        assert_eq!(flips.len(), o.group_changes.len());
    }

    #[test]
    fn deferred_records_keep_their_order_and_enrich_only_when_drained() {
        let mut t = Tracker::new(&snapshot_debian_6_1(), longhorn_groups());
        let mut deferred = Deferred::default();
        let lone = Record::new(RecordKind::EventsLost, 1);
        assert!(
            deferred.record(lone).is_some(),
            "nothing waits: appended at once"
        );
        // dm_crypt's unload breaks base: its record and the group change
        // wait, and so does every record made after them.
        let mut ev = event(Raw::Free, "dm_crypt", 9);
        ev.actor = Some(crate::event::Actor {
            pid: 7,
            tgid: 7,
            uid: 0,
            gid: 0,
            comm: "rmmod".into(),
            cgroup_id: 0,
        });
        let o = t.apply(&ev);
        let expected = event_record(
            &t,
            &ev,
            o.kind.unwrap(),
            Some(&o),
            Some(ActorInfo {
                comm: "enriched".into(),
                ..ActorInfo::default()
            }),
            "ebpf",
        );
        deferred.event(PendingEvent::new(
            &t,
            &ev,
            o.kind.unwrap(),
            Some(&o),
            "ebpf",
        ));
        // The state moves on before the records are built: they still say
        // what it was when the event was applied.
        t.apply(&event(Raw::Load, "dm_crypt", 10));
        assert!(
            deferred
                .record(Record::new(RecordKind::EventsLost, 11))
                .is_none()
        );
        let mut enriched = Vec::new();
        let records = deferred.drain(
            |boot_ns, actor| {
                enriched.push((boot_ns, actor.comm.clone()));
                ActorInfo {
                    comm: "enriched".into(),
                    ..ActorInfo::default()
                }
            },
            Record::boxed,
        );
        assert_eq!(enriched, [(9, compact_str::CompactString::from("rmmod"))]);
        let kinds: Vec<RecordKind> = records.iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                RecordKind::ModuleUnload,
                RecordKind::RequirementChange,
                RecordKind::EventsLost
            ]
        );
        assert_eq!(*records[0], expected);
        assert_eq!(
            records[0].requirements,
            [RequirementEffect {
                name: "base".into(),
                met: false,
                changed: true
            }]
        );
        assert!(deferred.is_empty());
    }

    #[test]
    fn an_actor_read_while_the_publish_is_held_is_not_read_again() {
        let mut t = Tracker::new(&snapshot_debian_6_1(), longhorn_groups());
        let mut deferred = Deferred::default();
        // testing::event gives it an actor (modprobe).
        let ev = event(Raw::Load, "uio_pci_generic", 3);
        let o = t.apply(&ev);
        deferred.event(PendingEvent::new(
            &t,
            &ev,
            o.kind.unwrap(),
            Some(&o),
            "ebpf",
        ));
        let read = |comm: &str| {
            let comm = comm.to_owned();
            move |_: u64, _: &crate::event::Actor| ActorInfo {
                comm: comm.as_str().into(),
                ..ActorInfo::default()
            }
        };
        // Held: read now, while the loader is still in finit_module.
        deferred.enrich_waiting(read("while held"));
        // A second look reads nothing more.
        deferred.enrich_waiting(|_, _| panic!("read twice"));
        let records = deferred.drain(|_, _| panic!("read again at the flush"), Record::boxed);
        assert_eq!(
            records[0].actor.as_ref().map(|a| a.comm.as_str()),
            Some("while held")
        );
    }

    #[test]
    fn breaking_base_yields_one_change_record_with_its_cause() {
        let mut t = Tracker::new(&snapshot_debian_6_1(), longhorn_groups());
        let o = t.apply(&event(Raw::Free, "dm_crypt", 9));
        let flips = group_changes(
            Some(&o.module),
            &o.group_changes,
            RecordKind::ModuleUnload,
            9,
        );
        assert_eq!(flips.len(), 1);
        let f = &flips[0];
        assert_eq!(f.kind, RecordKind::RequirementChange);
        assert_eq!(
            f.requirement,
            Some(RequirementFlip {
                name: "base".into(),
                was: true,
                met: false
            })
        );
        assert_eq!(f.cause, Some(RecordKind::ModuleUnload));
        assert_eq!(f.module.as_ref().map(|m| m.name.as_str()), Some("dm_crypt"));
    }

    #[test]
    fn history_and_unrequired_modules() {
        let t = Tracker::new(&snapshot_debian_6_1(), longhorn_groups());
        let ev = event(Raw::Request, "dm_crypt", 1);
        let r = event_record(&t, &ev, Kind::Request, None, None, "ebpf");
        assert!(r.historical);
        assert_eq!(r.state, None);
        assert!(effects(&t, &name("nbd"), &[]).is_empty());
    }

    #[test]
    fn start_lists_each_required_module_once_with_taints() {
        let snapshot = snapshot_debian_6_1();
        let t = Tracker::new(&snapshot, longhorn_groups());
        let [start, snap] = start(
            &t,
            &snapshot,
            &StartInfo {
                source: "poll",
                pid: 42,
                config_file: None,
                config_bytes: None,
                now_ns: 2,
                snapshot_ns: 1,
            },
        );
        let m = start.monitor.unwrap();
        assert_eq!(m.groups, ["base", "v2-data-engine"]);
        assert_eq!(m.config_digest_of, "groups");
        assert_eq!(m.pid, 42);
        let names: Vec<&str> = snap.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["dm_crypt", "vfio_pci", "uio_pci_generic", "nvme_tcp"]
        );
        assert_eq!(snap.modules[0].taints.as_deref(), Some(""));
        assert_eq!(snap.modules[2].taints, None, "not loaded");
        assert_eq!(snap.boot_ns, 1);
        assert_eq!(snap.requirements.len(), 2);
    }

    #[test]
    fn config_digest_is_of_the_file_when_read() {
        let groups = longhorn_groups();
        let (_, by_file, of) = config_digest(Some("/c".into()), Some(b"x"), &groups);
        assert_eq!(of, "file");
        assert_eq!(by_file, sha256_hex(b"x"));
        let (_, by_groups, of) = config_digest(Some("/c".into()), None, &groups);
        assert_eq!(of, "groups");
        assert_ne!(by_groups, by_file);
    }

    #[test]
    fn a_reload_record_says_what_each_key_did() {
        let t = Tracker::new(&snapshot_debian_6_1(), longhorn_groups());
        let r = config_reload(
            &t,
            ReloadInfo {
                file: "/etc/k.toml".into(),
                digest: Some("d".into()),
                outcome: Ok(ReloadKeys {
                    applied: &["reconcile_interval"],
                    restart_required: &["listen"],
                    overridden: &["source"],
                    changes: &[],
                }),
            },
            5,
        );
        let c = r.config.unwrap();
        assert!(c.accepted);
        assert_eq!(c.applied, ["reconcile_interval"]);
        assert_eq!(c.restart_required, ["listen"]);
        assert_eq!(c.overridden, ["source"]);
        assert_eq!(r.requirements.len(), 2);
        let rejected = config_reload(
            &t,
            ReloadInfo {
                file: "/etc/k.toml".into(),
                digest: None,
                outcome: Err("line 1: bad".into()),
            },
            6,
        );
        let c = rejected.config.unwrap();
        assert!(!c.accepted);
        assert_eq!(c.error.as_deref(), Some("line 1: bad"));
        assert!(c.applied.is_empty() && rejected.requirements.is_empty());
    }
}
