//! The requirement tracker: a pure state machine that starts from a host
//! snapshot, applies module events in order, and says for every module and
//! requirement group where the node stands. No I/O happens here: the only
//! thing read from outside is the boot clock, to stamp `applied_ns` (when
//! an event was applied) for the detection latency.
//!
//! The kernel's module lifecycle, as the eBPF source reports it:
//!
//! ```text
//! finit_module: module_load ──► init runs ──► syscall exit ret=0   (loaded)
//!                                        └──► module_free, exit ret<0 (load failed)
//! delete_module: enter ──► exit() ──► module_free, exit ret=0       (unloaded)
//!                     └──► exit ret<0 (EBUSY…)                       (still loaded)
//! ```
//!
//! `module_load` fires before init, so a module is only `loaded` once its
//! init succeeded. Events from different CPUs can reach the ring buffer in
//! an order that differs from the syscalls' (an `rmmod` on one CPU can free
//! a module before the loader's syscall exit is recorded on another), so
//! each rule below looks at the module's current state, not only the event.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use serde::Serialize;
use smallvec::SmallVec;

use crate::{
    event::{Actor, Kind, Raw, SourceEvent},
    host::{LoadedModule, ProcModuleState, Snapshot},
    names::ModuleName,
    requirements::{GroupMode, GroupSpec},
    state::ModuleState,
};

/// A hash map with a fast, per-process seeded hasher: module names are
/// short, and the keys are the host's loaded and required modules (an
/// event's name is only ever looked up, never inserted, unless the kernel
/// loaded it).
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Load state of a module the kernel knows as loaded (in /proc/modules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Presence {
    /// Linked in, init running (or its success not yet confirmed).
    Loading,
    /// Init succeeded.
    Live,
    /// `delete_module` in progress; `was_live` tells whether init had been
    /// confirmed, so a failed unload returns to the right state.
    Unloading { was_live: bool },
}

impl Presence {
    const fn state(self) -> ModuleState {
        match self {
            Self::Loading => ModuleState::Loading,
            Self::Live => ModuleState::Loaded,
            Self::Unloading { .. } => ModuleState::Unloading,
        }
    }

    const fn from_proc(state: ProcModuleState) -> Self {
        match state {
            ProcModuleState::Live => Self::Live,
            ProcModuleState::Loading => Self::Loading,
            ProcModuleState::Unloading => Self::Unloading { was_live: true },
        }
    }
}

/// The most recent event about a required module, with who caused it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LastEvent {
    pub kind: Kind,
    /// CLOCK_BOOTTIME of the event itself (in-kernel for eBPF).
    pub boot_ns: u64,
    /// CLOCK_BOOTTIME when the tracker applied it: `applied_ns - boot_ns`
    /// is the detection latency (`cargo xtask bench` measures it).
    pub applied_ns: u64,
    pub actor: Option<Actor>,
}

/// What one applied event did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub module: ModuleName,
    /// The event's meaning after interpretation; `None` when the event
    /// carried no news (a duplicate confirmation, a stale syscall exit).
    pub kind: Option<Kind>,
    pub from: ModuleState,
    pub to: ModuleState,
    /// Whether the module belongs to an enabled group.
    pub required: bool,
    /// Groups whose `met` flipped, with the new value.
    pub group_changes: GroupChanges,
    /// CLOCK_BOOTTIME once the module's state had changed, before the
    /// groups were judged: the `applied_ns` of its [`LastEvent`], when it
    /// has one.
    pub applied_ns: u64,
}

/// The groups one event flipped: rarely more than one, so kept inline, and
/// the event that decides a group allocates nothing on the ring thread
/// before the thread has applied it (`daemon/shared.rs`; its record's view
/// is built after the batch). Its `applied_ns` is read before the groups
/// are judged (see [`Outcome::applied_ns`]).
pub type GroupChanges = SmallVec<[GroupChange; 2]>;

/// A requirement group went from met to unmet or back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupChange {
    /// Shared with the tracker's own copy, so a flip copies no string.
    pub group: Arc<str>,
    pub met: bool,
}

/// One module of a group, for reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModuleReport {
    pub name: ModuleName,
    pub state: ModuleState,
    pub last_event: Option<LastEvent>,
}

/// One group's verdict, for reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupReport {
    pub name: String,
    pub mode: GroupMode,
    pub met: bool,
    pub severity: String,
    pub modules: Vec<ModuleReport>,
    /// A check of the host or the cluster (mode `check`, no modules): its
    /// level, what was found and the fix. Absent for module groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<crate::requirements::CheckInfo>,
}

/// Per-module state for the whole kernel plus the verdict per group.
#[derive(Debug)]
pub struct Tracker {
    groups: Vec<GroupSpec>,
    /// Each group's name (same order as `groups`), for the changes that
    /// report it.
    names: Vec<Arc<str>>,
    /// Last verdict per group (same order as `groups`).
    met: Vec<bool>,
    /// Every module the kernel has loaded (all of /proc/modules), so a
    /// config reload that adds a group needs no new snapshot. Hashed: each
    /// event looks up several names here (its module, then every module of
    /// each group holding it), and a tree walk's string comparisons were
    /// half the host's time from decode to metrics per event.
    present: FastMap<ModuleName, Presence>,
    /// Every module some group requires, with its state while not loaded
    /// (built in, available or missing): the names each event asks about,
    /// answered without a walk of the kernel-wide sets below.
    required: FastMap<ModuleName, ModuleState>,
    builtin: BTreeSet<ModuleName>,
    available: BTreeSet<ModuleName>,
    /// Only for modules some group requires; bounded by the config.
    last_events: BTreeMap<ModuleName, LastEvent>,
    modules_supported: bool,
    /// Modules the boot-time configuration blocks (blacklisted, `install
    /// … /bin/false`, `module_blacklist=`): not loadable on demand, so an
    /// `available` group does not count them.
    blocked: BTreeSet<ModuleName>,
}

impl Tracker {
    /// Starts from a snapshot taken after the source was attached.
    #[must_use]
    pub fn new(snapshot: &Snapshot, groups: Vec<GroupSpec>) -> Self {
        let present = snapshot
            .loaded
            .iter()
            .map(|(name, m)| (name.clone(), Presence::from_proc(m.state)))
            .collect();
        let mut tracker = Self {
            met: Vec::new(),
            names: Vec::new(),
            groups,
            present,
            required: FastMap::default(),
            builtin: snapshot.builtin.clone(),
            available: snapshot.available.keys().cloned().collect(),
            last_events: BTreeMap::new(),
            modules_supported: snapshot.modules_supported,
            blocked: BTreeSet::new(),
        };
        tracker.index_groups();
        tracker.met = tracker.evaluate_all();
        tracker
    }

    /// Rebuilds [`required`](Self::required) and [`names`](Self::names)
    /// from the groups.
    fn index_groups(&mut self) {
        self.names = self
            .groups
            .iter()
            .map(|g| Arc::from(g.name.as_str()))
            .collect();
        let required = self
            .groups
            .iter()
            .flat_map(|g| &g.modules)
            .map(|m| (m.clone(), self.unloaded_state(m)))
            .collect();
        self.required = required;
    }

    /// The state of a module that is not loaded.
    fn unloaded_state(&self, name: &ModuleName) -> ModuleState {
        if self.builtin.contains(name) {
            ModuleState::Builtin
        } else if self.available.contains(name) {
            ModuleState::Available
        } else {
            ModuleState::Missing
        }
    }

    /// Whether the kernel can load modules at all (CONFIG_MODULES).
    #[must_use]
    pub const fn modules_supported(&self) -> bool {
        self.modules_supported
    }

    /// The module's current state.
    #[must_use]
    pub fn state(&self, name: &ModuleName) -> ModuleState {
        if let Some(p) = self.present.get(name) {
            p.state()
        } else if let Some(s) = self.required.get(name) {
            *s
        } else {
            self.unloaded_state(name)
        }
    }

    /// Whether any enabled group names the module.
    #[must_use]
    pub fn is_required(&self, name: &ModuleName) -> bool {
        self.required.contains_key(name)
    }

    /// Whether a required module is between the start of a load or an
    /// unload and its result (`loading`, `unloading`). Entering either
    /// from a settled state changes no verdict (`loading` fails a
    /// requirement as `available` did, `unloading` meets it as `loaded`
    /// did); an unload begun while still `loading` does (it counts as
    /// `unloading`), and the daemon publishes such a turn at once.
    #[must_use]
    pub fn in_transition(&self) -> bool {
        self.present.iter().any(|(name, p)| {
            matches!(p, Presence::Loading | Presence::Unloading { .. }) && self.is_required(name)
        })
    }

    /// Modules whose init has not been confirmed yet, in no particular
    /// order: the daemon confirms these through /sys/module/<m>/initstate
    /// when no syscall-exit event arrives (kernels without syscall
    /// tracepoints, or the uevent source).
    pub fn loading(&self) -> impl Iterator<Item = &ModuleName> {
        self.present
            .iter()
            .filter(|(_, p)| matches!(p, Presence::Loading))
            .map(|(n, _)| n)
    }

    /// The enabled groups.
    #[must_use]
    pub fn groups(&self) -> &[GroupSpec] {
        &self.groups
    }

    /// Replaces the groups (config reload) and returns the groups whose
    /// verdict differs from before (new groups count as changes when unmet).
    pub fn set_groups(&mut self, groups: Vec<GroupSpec>) -> Vec<GroupChange> {
        let before: BTreeMap<String, bool> = self
            .groups
            .iter()
            .zip(&self.met)
            .map(|(g, &m)| (g.name.clone(), m))
            .collect();
        self.groups = groups;
        self.index_groups();
        self.met = self.evaluate_all();
        self.last_events
            .retain(|name, _| self.required.contains_key(name));
        self.groups
            .iter()
            .zip(&self.names)
            .zip(&self.met)
            .filter(|((g, _), m)| before.get(&g.name).map_or(!**m, |b| b != *m))
            .map(|((_, name), &met)| GroupChange {
                group: Arc::clone(name),
                met,
            })
            .collect()
    }

    /// Applies one event and reports what it changed.
    pub fn apply(&mut self, ev: &SourceEvent) -> Outcome {
        let name = &ev.module;
        let from = self.state(name);
        let kind = self.transition(name, ev.raw);
        self.finish(name, from, kind, ev.boot_ns, ev.actor.clone())
    }

    /// Records an event that happened before the snapshot was read: the
    /// snapshot already reflects it, so it only updates the module's
    /// history, never its state.
    pub fn record_historical(&mut self, ev: &SourceEvent) -> Option<Kind> {
        let kind = historical_kind(ev.raw);
        if let Some(kind) = kind
            && self.is_required(&ev.module)
        {
            self.last_events.insert(
                ev.module.clone(),
                LastEvent {
                    kind,
                    boot_ns: ev.boot_ns,
                    applied_ns: crate::event::boot_ns_now(),
                    actor: ev.actor.clone(),
                },
            );
        }
        kind
    }

    /// Compares the tracked state with a fresh read of /proc/modules and
    /// corrects every difference. With `count_as_drift` each correction is
    /// an outcome of kind [`Kind::Drift`] (the periodic reconcile); without
    /// it (settling right after start-up) corrections are silent.
    ///
    /// `since_ns` protects modules with events newer than the read: the
    /// caller passes the boot time at which it started reading, and a
    /// module whose last event is newer is left alone.
    pub fn reconcile(
        &mut self,
        loaded: &BTreeMap<ModuleName, LoadedModule>,
        read_started_ns: u64,
        now_ns: u64,
        count_as_drift: bool,
    ) -> Vec<Outcome> {
        self.reconcile_only(loaded, None, read_started_ns, now_ns, count_as_drift)
    }

    /// The modules whose tracked state differs from `loaded` (a read of
    /// /proc/modules). The periodic reconcile corrects only those that
    /// still differ on a second read: an event that was still queued at the
    /// first read explains (and counts) its change itself.
    #[must_use]
    pub fn disagreements(
        &self,
        loaded: &BTreeMap<ModuleName, LoadedModule>,
    ) -> BTreeSet<ModuleName> {
        let mut names: BTreeSet<ModuleName> = self.present.keys().cloned().collect();
        names.extend(loaded.keys().cloned());
        names
            .into_iter()
            .filter(|name| !self.agrees(name, loaded))
            .collect()
    }

    fn agrees(&self, name: &ModuleName, loaded: &BTreeMap<ModuleName, LoadedModule>) -> bool {
        let want = loaded.get(name).map(|m| Presence::from_proc(m.state));
        match (self.present.get(name), want) {
            (None, None) => true,
            (Some(h), Some(w)) => h.state() == w.state(),
            _ => false,
        }
    }

    /// [`reconcile`](Self::reconcile) limited to `only` (all modules when
    /// `None`).
    pub fn reconcile_only(
        &mut self,
        loaded: &BTreeMap<ModuleName, LoadedModule>,
        only: Option<&BTreeSet<ModuleName>>,
        read_started_ns: u64,
        now_ns: u64,
        count_as_drift: bool,
    ) -> Vec<Outcome> {
        let mut names: BTreeSet<ModuleName> = self.present.keys().cloned().collect();
        names.extend(loaded.keys().cloned());
        if let Some(only) = only {
            names.retain(|n| only.contains(n));
        }
        let mut outcomes = Vec::new();
        for name in names {
            if self
                .last_events
                .get(&name)
                .is_some_and(|e| e.boot_ns >= read_started_ns)
            {
                continue;
            }
            if self.agrees(&name, loaded) {
                continue;
            }
            let want = loaded.get(&name).map(|m| Presence::from_proc(m.state));
            let from = self.state(&name);
            match want {
                Some(w) => self.present.insert(name.clone(), w),
                None => self.present.remove(&name),
            };
            let kind = count_as_drift.then_some(Kind::Drift);
            let outcome = self.finish(&name, from, kind, now_ns, None);
            if count_as_drift || outcome.from != outcome.to {
                outcomes.push(outcome);
            }
        }
        outcomes
    }

    /// Each group that holds `module`, with its verdict now, in group
    /// order: what a record about the module reports, without building a
    /// whole [`report`](Self::report).
    pub fn verdicts_holding<'a>(
        &'a self,
        module: &'a ModuleName,
    ) -> impl Iterator<Item = (&'a str, bool)> + 'a {
        self.groups
            .iter()
            .zip(&self.met)
            .filter(move |(g, _)| g.modules.contains(module))
            .map(|(g, &met)| (g.name.as_str(), met))
    }

    /// Every enabled group's verdict with its modules.
    #[must_use]
    pub fn report(&self) -> Vec<GroupReport> {
        self.groups
            .iter()
            .zip(&self.met)
            .map(|(g, &met)| GroupReport {
                name: g.name.clone(),
                mode: g.mode,
                met,
                severity: g.severity.clone(),
                modules: g
                    .modules
                    .iter()
                    .map(|m| ModuleReport {
                        name: m.clone(),
                        state: self.state(m),
                        last_event: self.last_events.get(m).cloned(),
                    })
                    .collect(),
                check: None,
            })
            .collect()
    }

    /// Sets the modules nothing may load on demand; returns the groups this
    /// flips (only `available` groups look at it).
    pub fn set_blocked(&mut self, blocked: BTreeSet<ModuleName>) -> Vec<GroupChange> {
        self.blocked = blocked;
        let now = self.evaluate_all();
        let changes = self
            .names
            .iter()
            .zip(self.met.iter().zip(&now))
            .filter(|(_, (was, is))| was != is)
            .map(|(name, (_, &met))| GroupChange {
                group: Arc::clone(name),
                met,
            })
            .collect();
        self.met = now;
        changes
    }

    /// Interprets `raw` against the module's presence and updates it.
    fn transition(&mut self, name: &ModuleName, raw: Raw) -> Option<Kind> {
        let have = self.present.get(name).copied();
        let (next, kind) = match (raw, have) {
            // A (re)load begins. A module_load for a module we think is live
            // means we missed its unload: the load is the news either way.
            (Raw::Load, _) => (Some(Presence::Loading), Some(Kind::Load)),
            (Raw::LoadResult { ret: 0 }, Some(Presence::Loading)) => {
                (Some(Presence::Live), Some(Kind::Loaded))
            }
            // An rmmod raced ahead of the loader's syscall exit: init did
            // succeed, the unload is what matters now.
            (Raw::LoadResult { ret: 0 }, Some(Presence::Unloading { .. })) => {
                (Some(Presence::Unloading { was_live: true }), None)
            }
            // Already live (duplicate), or already freed again (stale exit).
            (Raw::LoadResult { ret: 0 }, other) => (other, None),
            // Init failed. module_free has normally come first and already
            // said so; if not, say it now.
            (Raw::LoadResult { .. }, Some(Presence::Loading)) => (None, Some(Kind::LoadFailed)),
            (Raw::LoadResult { .. }, other) => (other, None),
            (Raw::Free, Some(Presence::Loading)) => (None, Some(Kind::LoadFailed)),
            (Raw::Free, Some(Presence::Live | Presence::Unloading { .. })) => {
                (None, Some(Kind::Unload))
            }
            (Raw::Free, None) => (None, None),
            (Raw::UnloadBegin, Some(Presence::Live)) => (
                Some(Presence::Unloading { was_live: true }),
                Some(Kind::UnloadBegin),
            ),
            (Raw::UnloadBegin, Some(Presence::Loading)) => (
                Some(Presence::Unloading { was_live: false }),
                Some(Kind::UnloadBegin),
            ),
            // rmmod of something not loaded (ENOENT follows), or a repeat.
            (Raw::UnloadBegin, other) => (other, None),
            (Raw::UnloadResult { ret: 0 }, other) => (other, None),
            (Raw::UnloadResult { .. }, Some(Presence::Unloading { was_live })) => (
                Some(if was_live {
                    Presence::Live
                } else {
                    Presence::Loading
                }),
                Some(Kind::UnloadFailed),
            ),
            (Raw::UnloadResult { .. }, other) => (other, None),
            (Raw::Request, other) => (other, Some(Kind::Request)),
            (Raw::Present, Some(Presence::Live)) => (Some(Presence::Live), None),
            (Raw::Present, _) => (Some(Presence::Live), Some(Kind::Loaded)),
            (Raw::Absent, Some(_)) => (None, Some(Kind::Unload)),
            (Raw::Absent, None) => (None, None),
        };
        match next {
            Some(p) => self.present.insert(name.clone(), p),
            None => self.present.remove(name),
        };
        kind
    }

    /// Records history and re-evaluates the groups that hold `name`.
    fn finish(
        &mut self,
        name: &ModuleName,
        from: ModuleState,
        kind: Option<Kind>,
        boot_ns: u64,
        actor: Option<Actor>,
    ) -> Outcome {
        let required = self.is_required(name);
        // Read once, for the event's latency and its last-event entry: the
        // state has changed, the groups are judged after it.
        let applied_ns = crate::event::boot_ns_now();
        if required && let Some(kind) = kind {
            self.last_events.insert(
                name.clone(),
                LastEvent {
                    kind,
                    boot_ns,
                    applied_ns,
                    actor,
                },
            );
        }
        let to = self.state(name);
        let mut group_changes = GroupChanges::new();
        if from != to {
            for i in 0..self.groups.len() {
                if !self.groups[i].modules.contains(name) {
                    continue;
                }
                let met = self.evaluate(&self.groups[i]);
                if met != self.met[i] {
                    self.met[i] = met;
                    group_changes.push(GroupChange {
                        group: Arc::clone(&self.names[i]),
                        met,
                    });
                }
            }
        }
        Outcome {
            module: name.clone(),
            kind,
            from,
            to,
            required,
            group_changes,
            applied_ns,
        }
    }

    fn evaluate(&self, group: &GroupSpec) -> bool {
        let mut ok = group.modules.iter().map(|m| self.state(m).satisfies());
        match group.mode {
            GroupMode::AllOf => ok.all(|s| s),
            GroupMode::AnyOf => ok.any(|s| s),
            GroupMode::Available => group.modules.iter().all(|m| {
                let state = self.state(m);
                state.satisfies() || (state == ModuleState::Available && !self.blocked.contains(m))
            }),
            // Checks are judged from host and cluster facts, never here.
            GroupMode::Check => false,
        }
    }

    fn evaluate_all(&self) -> Vec<bool> {
        self.groups.iter().map(|g| self.evaluate(g)).collect()
    }
}

/// The meaning of an event that predates the snapshot, without the state
/// context: good enough for history ("last event: unload by rmmod").
const fn historical_kind(raw: Raw) -> Option<Kind> {
    match raw {
        Raw::Load => Some(Kind::Load),
        Raw::LoadResult { ret: 0 } | Raw::Present => Some(Kind::Loaded),
        Raw::LoadResult { .. } => Some(Kind::LoadFailed),
        Raw::UnloadBegin => Some(Kind::UnloadBegin),
        Raw::UnloadResult { ret: 0 } => None,
        Raw::UnloadResult { .. } => Some(Kind::UnloadFailed),
        Raw::Free | Raw::Absent => Some(Kind::Unload),
        Raw::Request => Some(Kind::Request),
    }
}

#[cfg(test)]
mod tests {
    //! Lifecycle tests on a snapshot parsed from a real Debian 6.1 guest
    //! (/proc/modules with dm_crypt, nvme_tcp and vfio_pci loaded, plus that
    //! kernel's modules.builtin and modules.dep).
    use super::*;
    use crate::testing::{
        event as ev, group, longhorn_groups, name as n, snapshot_debian_6_1 as snapshot_6_1,
    };

    fn met(t: &Tracker, group: &str) -> bool {
        t.report().iter().find(|g| g.name == group).unwrap().met
    }

    /// Applies events and returns (kind, resulting state) per event.
    fn run(t: &mut Tracker, events: &[SourceEvent]) -> Vec<(Option<Kind>, ModuleState)> {
        events
            .iter()
            .map(|e| t.apply(e))
            .map(|o| (o.kind, o.to))
            .collect()
    }

    #[test]
    fn snapshot_states_from_real_guest() {
        let t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        assert_eq!(t.state(&n("dm_crypt")), ModuleState::Loaded);
        assert_eq!(t.state(&n("nvme-tcp")), ModuleState::Loaded);
        assert_eq!(t.state(&n("uio_pci_generic")), ModuleState::Available);
        assert_eq!(t.state(&n("sha256_generic")), ModuleState::Builtin);
        assert_eq!(t.state(&n("no_such_module")), ModuleState::Missing);
        assert!(met(&t, "base"));
        assert!(
            !met(&t, "v2-data-engine"),
            "uio_pci_generic is not loaded in the fixture"
        );
    }

    #[test]
    fn successful_load_is_loading_until_init_returns() {
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        let load = t.apply(&ev(Raw::Load, "uio_pci_generic", 1));
        assert_eq!(
            (load.kind, load.to),
            (Some(Kind::Load), ModuleState::Loading)
        );
        assert!(
            load.group_changes.is_empty(),
            "loading does not satisfy yet"
        );
        assert_eq!(
            t.loading().cloned().collect::<Vec<_>>(),
            vec![n("uio_pci_generic")]
        );
        let done = t.apply(&ev(Raw::LoadResult { ret: 0 }, "uio_pci_generic", 2));
        assert_eq!(
            (done.kind, done.to),
            (Some(Kind::Loaded), ModuleState::Loaded)
        );
        assert_eq!(
            done.group_changes[..],
            [GroupChange {
                group: "v2-data-engine".into(),
                met: true
            }]
        );
        assert_eq!(t.loading().count(), 0);
    }

    #[test]
    fn an_outcome_carries_the_stamp_its_last_event_shows() {
        // One clock read per event: the latency the metrics get is the one
        // /status shows, taken after the state change.
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        let before = crate::event::boot_ns_now();
        let o = t.apply(&ev(Raw::UnloadBegin, "dm_crypt", 1));
        let free = t.apply(&ev(Raw::Free, "dm_crypt", 2));
        let after = crate::event::boot_ns_now();
        assert!((before..=after).contains(&o.applied_ns), "{o:?}");
        assert!(o.applied_ns <= free.applied_ns);
        let last = t.last_events.get(&n("dm_crypt")).cloned();
        assert_eq!(
            last.map(|e| (e.kind, e.boot_ns, e.applied_ns)),
            Some((Kind::Unload, 2, free.applied_ns))
        );
        // Not required: stamped all the same, no last event kept.
        let other = t.apply(&ev(Raw::Load, "snd_dummy", 3));
        assert!(other.applied_ns >= free.applied_ns);
        assert!(!t.last_events.contains_key(&n("snd_dummy")));
    }

    #[test]
    fn a_transition_is_in_flight_only_between_a_start_and_its_result_and_changes_no_verdict() {
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        // (event, in transition after it)
        let steps: [(SourceEvent, bool); 7] = [
            // Not required: its load is nobody's transition.
            (ev(Raw::Load, "snd_dummy", 1), false),
            (ev(Raw::Load, "uio_pci_generic", 2), true),
            (ev(Raw::LoadResult { ret: 0 }, "uio_pci_generic", 3), false),
            (ev(Raw::UnloadBegin, "uio_pci_generic", 4), true),
            (ev(Raw::Free, "uio_pci_generic", 5), false),
            (ev(Raw::UnloadBegin, "dm_crypt", 6), true),
            // A refused unload (in use): back to loaded.
            (ev(Raw::UnloadResult { ret: -11 }, "dm_crypt", 7), false),
        ];
        for (e, in_flight) in steps {
            let o = t.apply(&e);
            assert_eq!(t.in_transition(), in_flight, "after {e:?}");
            if in_flight {
                assert!(
                    o.group_changes.is_empty(),
                    "a transition's start changed a verdict: {e:?}"
                );
            }
        }
    }

    #[test]
    fn failed_init_is_never_loaded() {
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        // What the kernel emits for an init that returns -ENODEV.
        let steps = run(
            &mut t,
            &[
                ev(Raw::Load, "uio_pci_generic", 1),
                ev(Raw::Free, "uio_pci_generic", 2),
                ev(Raw::LoadResult { ret: -19 }, "uio_pci_generic", 3),
            ],
        );
        assert_eq!(
            steps,
            vec![
                (Some(Kind::Load), ModuleState::Loading),
                (Some(Kind::LoadFailed), ModuleState::Available),
                (None, ModuleState::Available),
            ]
        );
        assert!(!met(&t, "v2-data-engine"));
        let last = t.report()[1].modules[1].last_event.clone().unwrap();
        assert_eq!(last.kind, Kind::LoadFailed);
    }

    #[test]
    fn unload_names_the_actor_and_breaks_only_its_group() {
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        let base_before = met(&t, "base");
        let steps = run(
            &mut t,
            &[
                ev(Raw::UnloadBegin, "dm_crypt", 5),
                ev(Raw::Free, "dm_crypt", 6),
                ev(Raw::UnloadResult { ret: 0 }, "dm_crypt", 7),
            ],
        );
        assert_eq!(
            steps,
            vec![
                (Some(Kind::UnloadBegin), ModuleState::Unloading),
                (Some(Kind::Unload), ModuleState::Available),
                (None, ModuleState::Available),
            ]
        );
        assert!(base_before && !met(&t, "base"));
        let report = t.report();
        let last = report[0].modules[0].last_event.as_ref().unwrap();
        assert_eq!(last.kind, Kind::Unload);
        let actor = last.actor.as_ref().unwrap();
        assert_eq!((actor.pid, actor.comm.as_str()), (106, "modprobe"));
        // v2 is judged on its own: its modules did not change.
        assert!(
            report[1]
                .modules
                .iter()
                .all(|m| m.state != ModuleState::Unloading)
        );
    }

    #[test]
    fn busy_unload_returns_to_loaded_without_flapping_the_group() {
        let mut groups = longhorn_groups();
        groups.push(group("nvmf", GroupMode::AllOf, &["nvme_tcp"]));
        let mut t = Tracker::new(&snapshot_6_1(), groups);
        let begin = t.apply(&ev(Raw::UnloadBegin, "nvme_tcp", 1));
        let fail = t.apply(&ev(Raw::UnloadResult { ret: -16 }, "nvme_tcp", 2));
        assert_eq!(
            [(begin.kind, begin.to), (fail.kind, fail.to)],
            [
                (Some(Kind::UnloadBegin), ModuleState::Unloading),
                (Some(Kind::UnloadFailed), ModuleState::Loaded),
            ]
        );
        assert!(begin.group_changes.is_empty() && fail.group_changes.is_empty());
        assert!(met(&t, "nvmf"));
    }

    #[test]
    fn group_is_lost_when_the_module_is_freed() {
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        assert!(
            t.apply(&ev(Raw::UnloadBegin, "dm_crypt", 1))
                .group_changes
                .is_empty()
        );
        let free = t.apply(&ev(Raw::Free, "dm_crypt", 2));
        assert_eq!(
            free.group_changes[..],
            [GroupChange {
                group: "base".into(),
                met: false
            }]
        );
    }

    #[test]
    fn rmmod_racing_the_loaders_syscall_exit_ends_unloaded() {
        // modprobe's init finished and rmmod on another CPU freed the module
        // before modprobe's syscall exit reached the ring buffer.
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        let steps = run(
            &mut t,
            &[
                ev(Raw::Load, "uio_pci_generic", 1),
                ev(Raw::UnloadBegin, "uio_pci_generic", 2),
                ev(Raw::Free, "uio_pci_generic", 3),
                ev(Raw::LoadResult { ret: 0 }, "uio_pci_generic", 4),
                ev(Raw::UnloadResult { ret: 0 }, "uio_pci_generic", 5),
            ],
        );
        assert_eq!(steps.last().unwrap().1, ModuleState::Available);
        assert_eq!(
            steps[2].0,
            Some(Kind::Unload),
            "a free after an unload began is an unload"
        );
        assert!(steps.iter().all(|(_, s)| *s != ModuleState::Loaded));
    }

    #[test]
    fn reload_after_unload() {
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        let steps = run(
            &mut t,
            &[
                ev(Raw::UnloadBegin, "vfio_pci", 1),
                ev(Raw::Free, "vfio_pci", 2),
                ev(Raw::UnloadResult { ret: 0 }, "vfio_pci", 3),
                ev(Raw::Load, "vfio_pci", 4),
                ev(Raw::LoadResult { ret: 0 }, "vfio_pci", 5),
            ],
        );
        assert_eq!(
            steps.last().unwrap(),
            &(Some(Kind::Loaded), ModuleState::Loaded)
        );
    }

    #[test]
    fn uevent_and_poll_events_drive_the_same_states() {
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        let steps = run(
            &mut t,
            &[
                SourceEvent::observed(Raw::Present, n("uio_pci_generic"), 1),
                SourceEvent::observed(Raw::Present, n("uio_pci_generic"), 2),
                SourceEvent::observed(Raw::Absent, n("nvme_tcp"), 3),
                SourceEvent::observed(Raw::Absent, n("nvme_tcp"), 4),
            ],
        );
        assert_eq!(
            steps,
            vec![
                (Some(Kind::Loaded), ModuleState::Loaded),
                (None, ModuleState::Loaded),
                (Some(Kind::Unload), ModuleState::Available),
                (None, ModuleState::Available),
            ]
        );
        let last = t.report()[1].modules[2].last_event.clone().unwrap();
        assert_eq!((last.kind, last.actor), (Kind::Unload, None));
    }

    #[test]
    fn requests_are_history_not_state() {
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        let o = t.apply(&ev(Raw::Request, "uio_pci_generic", 1));
        assert_eq!(
            (o.kind, o.from, o.to),
            (
                Some(Kind::Request),
                ModuleState::Available,
                ModuleState::Available
            )
        );
        assert_eq!(
            t.report()[1].modules[1].last_event.as_ref().unwrap().kind,
            Kind::Request
        );
    }

    #[test]
    fn events_before_the_snapshot_are_history_only() {
        // The snapshot (taken after attach) already shows nvme_tcp loaded; an
        // older unload+load pair must not move it.
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        assert_eq!(
            t.record_historical(&ev(Raw::Free, "nvme_tcp", 1)),
            Some(Kind::Unload)
        );
        assert_eq!(
            t.record_historical(&ev(Raw::Load, "nvme_tcp", 2)),
            Some(Kind::Load)
        );
        assert_eq!(t.state(&n("nvme_tcp")), ModuleState::Loaded);
        assert_eq!(
            t.report()[1].modules[2].last_event.as_ref().unwrap().kind,
            Kind::Load
        );
    }

    #[test]
    fn settling_after_a_racing_event_is_silent_and_correct() {
        // A load whose module_load raced the snapshot: applied as Load
        // (Loading), but /proc/modules read afterwards says Live.
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        t.apply(&ev(Raw::Load, "dm_crypt", 10));
        let loaded = snapshot_6_1().loaded;
        let out = t.reconcile(&loaded, 5, 20, false);
        assert_eq!(
            out.len(),
            0,
            "module's last event (10) is newer than the read (5): left alone"
        );
        let out = t.reconcile(&loaded, 15, 20, false);
        assert_eq!(
            out.iter().map(|o| (o.kind, o.to)).collect::<Vec<_>>(),
            vec![(None, ModuleState::Loaded)]
        );
    }

    #[test]
    fn reconcile_counts_and_corrects_drift() {
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        let mut loaded = snapshot_6_1().loaded;
        loaded.remove(&n("dm_crypt"));
        loaded.insert(
            n("uio_pci_generic"),
            LoadedModule {
                state: ProcModuleState::Live,
                taints: String::new(),
            },
        );
        let out = t.reconcile(&loaded, 100, 101, true);
        let summary: Vec<_> = out
            .iter()
            .map(|o| (o.module.as_str(), o.kind, o.to))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("dm_crypt", Some(Kind::Drift), ModuleState::Available),
                ("uio_pci_generic", Some(Kind::Drift), ModuleState::Loaded),
            ]
        );
        assert!(!met(&t, "base"));
        assert!(met(&t, "v2-data-engine"));
        assert!(
            t.reconcile(&loaded, 200, 201, true).is_empty(),
            "second pass finds nothing"
        );
    }

    #[test]
    fn a_late_event_explains_a_difference_before_it_counts_as_drift() {
        // The soak's race: rmmod freed nvme_tcp, the reconcile read
        // /proc/modules before the daemon took the queued module_free.
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        let mut loaded = snapshot_6_1().loaded;
        loaded.remove(&n("nvme_tcp"));
        let suspects = t.disagreements(&loaded);
        assert_eq!(
            suspects.iter().map(ModuleName::as_str).collect::<Vec<_>>(),
            ["nvme_tcp"]
        );
        // The queued event arrives and is counted as what it is.
        let free = t.apply(&ev(Raw::Free, "nvme_tcp", 50));
        assert_eq!(free.kind, Some(Kind::Unload));
        // The second look finds nothing left to correct.
        assert!(t.disagreements(&loaded).is_empty());
        assert!(
            t.reconcile_only(&loaded, Some(&suspects), 40, 60, true)
                .is_empty()
        );
    }

    #[test]
    fn reconcile_only_touches_the_named_modules() {
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        let mut loaded = snapshot_6_1().loaded;
        loaded.remove(&n("nvme_tcp"));
        loaded.remove(&n("dm_crypt"));
        let only: BTreeSet<ModuleName> = [n("dm_crypt")].into();
        let out = t.reconcile_only(&loaded, Some(&only), 1, 2, true);
        assert_eq!(
            out.iter().map(|o| o.module.as_str()).collect::<Vec<_>>(),
            ["dm_crypt"]
        );
        assert_eq!(
            t.state(&n("nvme_tcp")),
            ModuleState::Loaded,
            "not named: untouched"
        );
    }

    #[test]
    fn any_of_group_needs_one() {
        let groups = vec![group(
            "spdk-driver",
            GroupMode::AnyOf,
            &["vfio_pci", "uio_pci_generic"],
        )];
        let mut t = Tracker::new(&snapshot_6_1(), groups);
        assert!(met(&t, "spdk-driver"));
        let o = t.apply(&SourceEvent::observed(Raw::Absent, n("vfio_pci"), 1));
        assert_eq!(
            o.group_changes[..],
            [GroupChange {
                group: "spdk-driver".into(),
                met: false
            }]
        );
        let o = t.apply(&SourceEvent::observed(
            Raw::Present,
            n("uio_pci_generic"),
            2,
        ));
        assert_eq!(
            o.group_changes[..],
            [GroupChange {
                group: "spdk-driver".into(),
                met: true
            }]
        );
    }

    #[test]
    fn a_module_in_two_groups_changes_both() {
        let mut groups = longhorn_groups();
        groups.push(group("nvmf", GroupMode::AllOf, &["nvme_tcp"]));
        let mut t = Tracker::new(&snapshot_6_1(), groups);
        t.apply(&SourceEvent::observed(
            Raw::Present,
            n("uio_pci_generic"),
            1,
        ));
        let o = t.apply(&SourceEvent::observed(Raw::Absent, n("nvme_tcp"), 2));
        let changed: Vec<&str> = o.group_changes.iter().map(|c| &*c.group).collect();
        assert_eq!(changed, vec!["v2-data-engine", "nvmf"]);
        assert!(met(&t, "base"));
    }

    #[test]
    fn config_reload_adds_and_drops_groups() {
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups()[..1].to_vec());
        let changes = t.set_groups(longhorn_groups());
        assert_eq!(
            changes,
            vec![GroupChange {
                group: "v2-data-engine".into(),
                met: false
            }]
        );
        assert_eq!(t.state(&n("uio_pci_generic")), ModuleState::Available);
        assert!(t.is_required(&n("nvme_tcp")), "the added group's modules");
        let changes = t.set_groups(longhorn_groups()[..1].to_vec());
        assert!(
            changes.is_empty(),
            "dropping a group is not a verdict change"
        );
        assert!(!t.is_required(&n("nvme_tcp")));
    }

    #[test]
    fn kernel_without_module_support_counts_only_builtins() {
        let mut snap = snapshot_6_1();
        snap.loaded.clear();
        snap.available.clear();
        snap.modules_supported = false;
        let groups = vec![
            group("base", GroupMode::AllOf, &["dm_crypt"]),
            group(
                "crypto",
                GroupMode::AllOf,
                &["sha256_generic", "aes_generic"],
            ),
        ];
        let t = Tracker::new(&snap, groups);
        assert!(!t.modules_supported());
        assert_eq!(t.state(&n("dm_crypt")), ModuleState::Missing);
        assert!(!met(&t, "base"));
        assert!(met(&t, "crypto"), "built-ins satisfy a requirement");
    }

    #[test]
    fn history_is_kept_only_for_required_modules() {
        let mut t = Tracker::new(&snapshot_6_1(), longhorn_groups());
        let o = t.apply(&ev(Raw::Load, "crc64", 1));
        assert!(!o.required);
        assert!(t.last_events.is_empty());
    }

    #[test]
    fn available_groups_count_loadable_modules_unless_blocked() {
        let groups = vec![group(
            "v1",
            GroupMode::Available,
            &["iscsi_tcp", "dm_crypt"],
        )];
        // iscsi_tcp is only a module file in the 6.1 guest; dm_crypt loaded.
        let mut t = Tracker::new(&snapshot_6_1(), groups);
        assert_eq!(t.state(&n("iscsi_tcp")), ModuleState::Available);
        assert!(met(&t, "v1"), "loadable on demand is enough");
        let changes = t.set_blocked([n("iscsi_tcp")].into());
        assert_eq!(
            changes,
            [GroupChange {
                group: "v1".into(),
                met: false
            }]
        );
        assert!(!met(&t, "v1"));
        // Loaded, a blacklist no longer matters.
        run(&mut t, &[ev(Raw::Present, "iscsi_tcp", 5)]);
        assert!(met(&t, "v1"));
        assert!(t.set_blocked(BTreeSet::new()).is_empty());
        // A module the kernel lacks fails it.
        let t = Tracker::new(
            &snapshot_6_1(),
            vec![group("ublk", GroupMode::Available, &["no_such_module"])],
        );
        assert!(!met(&t, "ublk"));
    }
}
