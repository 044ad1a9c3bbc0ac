//! Comparing the tracked state with /proc/modules.
//!
//! The periodic reconcile looks twice: a difference on the first look may
//! be an event that already happened but is still queued (ring buffer,
//! channel); it is applied in between and counted as what it is. Only
//! what still differs on the second look, [`DRIFT_CONFIRM_AFTER`] later,
//! with no event for it in between, is drift. A reconcile after a loss or a
//! source failure corrects at once. The two-look logic is
//! [`Reconciler`], fed the /proc/modules reads, and unit-tested here.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use tokio::time::Instant;

use super::{Daemon, records};
use crate::{
    event::boot_ns_now,
    forensic::{Record, RecordKind},
    host::{self, LoadedModule},
    names::ModuleName,
    tracker::{Outcome, Tracker},
};

/// How long the periodic reconcile waits before its second look at a
/// difference.
pub const DRIFT_CONFIRM_AFTER: Duration = Duration::from_millis(500);

/// /proc/modules as a reconcile reads it.
pub type Loaded = BTreeMap<ModuleName, LoadedModule>;

/// A difference the first look found, to look at again.
#[derive(Debug)]
struct SecondLook {
    at: Instant,
    suspects: BTreeSet<ModuleName>,
    /// CLOCK_BOOTTIME when the first read started.
    started: u64,
}

/// The periodic reconcile's pending second look, and the counters /status
/// shows.
#[derive(Debug, Default)]
pub struct Reconciler {
    second_look: Option<SecondLook>,
    /// Corrections counted as drift.
    pub drift_total: u64,
    /// Reads of /proc/modules that were compared.
    pub reconciles: u64,
}

impl Reconciler {
    /// When the pending second look is due.
    pub fn second_look_at(&self) -> Option<Instant> {
        self.second_look.as_ref().map(|s| s.at)
    }

    /// Whether a second look is pending (a first look then does nothing).
    pub const fn pending(&self) -> bool {
        self.second_look.is_some()
    }

    /// The first look: notes the modules whose tracked state differs from
    /// `loaded` (read from `started` on) and schedules the second look.
    pub fn first_look(&mut self, tracker: &Tracker, loaded: &Loaded, started: u64, now: Instant) {
        self.reconciles += 1;
        let suspects = tracker.disagreements(loaded);
        if !suspects.is_empty() {
            tracing::debug!(modules = ?suspects, "reconcile: differences; looking again before calling it drift");
            self.second_look = Some(SecondLook {
                at: now + DRIFT_CONFIRM_AFTER,
                suspects,
                started,
            });
        }
    }

    /// The second look: corrects and returns what still differs among the
    /// suspects, counting each as drift. Nothing when no look is pending.
    pub fn second_look(
        &mut self,
        tracker: &mut Tracker,
        loaded: &Loaded,
        now_ns: u64,
    ) -> Vec<Outcome> {
        let Some(look) = self.second_look.take() else {
            return Vec::new();
        };
        let still: BTreeSet<ModuleName> = tracker
            .disagreements(loaded)
            .intersection(&look.suspects)
            .cloned()
            .collect();
        let outcomes = tracker.reconcile_only(loaded, Some(&still), look.started, now_ns, true);
        self.drift_total += outcomes.len() as u64;
        outcomes
    }

    /// Corrects every difference at once; counted as drift when
    /// `count_as_drift` (after a loss), silent when settling the start-up.
    pub fn now(
        &mut self,
        tracker: &mut Tracker,
        loaded: &Loaded,
        started: u64,
        now_ns: u64,
        count_as_drift: bool,
    ) -> Vec<Outcome> {
        self.reconciles += 1;
        let outcomes = tracker.reconcile(loaded, started, now_ns, count_as_drift);
        if count_as_drift {
            self.drift_total += outcomes.len() as u64;
        }
        outcomes
    }
}

/// Spacing for reconciles a loss triggers: at most one per
/// [`super::LOSS_RECONCILE_SPACING`]; a request that comes sooner is
/// coalesced into one run when the spacing has passed.
#[derive(Debug, Default)]
pub struct Spaced {
    last: Option<Instant>,
    due: Option<Instant>,
}

impl Spaced {
    /// A reconcile is wanted at `now`: true to run it now, false when one
    /// is (now) scheduled for later instead.
    pub fn request(&mut self, now: Instant, spacing: std::time::Duration) -> bool {
        if let Some(last) = self.last
            && now < last + spacing
        {
            self.due.get_or_insert(last + spacing);
            return false;
        }
        self.due = None;
        self.last = Some(now);
        true
    }

    /// When the coalesced run is due.
    pub const fn due(&self) -> Option<Instant> {
        self.due
    }
}

impl Daemon {
    /// Reads /proc/modules for a reconcile; a kernel without it has none
    /// loaded.
    fn read_loaded(&self) -> Option<Loaded> {
        match host::read_loaded(&self.settings.common.host) {
            Ok(Some(l)) => Some(l),
            Ok(None) => Some(BTreeMap::new()),
            Err(e) => {
                tracing::error!(error = %e, "reconcile: reading /proc/modules failed");
                None
            }
        }
    }

    /// The periodic reconcile, first look. Also re-reads what changes
    /// without events: modules-load.d and friends, and the hugepage pool.
    pub(super) fn reconcile_first_look(&mut self) {
        self.refresh_boot_facts();
        self.refresh_checks();
        if self.reconciler.pending() {
            return;
        }
        // Locked across the read, so the ring thread applies nothing
        // between it and the comparison: the tracker is never ahead of it.
        let core = self.shared.lock();
        let started = boot_ns_now();
        let Some(loaded) = self.read_loaded() else {
            return;
        };
        self.reconciler
            .first_look(&core.tracker, &loaded, started, Instant::now());
    }

    /// The periodic reconcile, second look.
    pub(super) fn reconcile_second_look(&mut self) {
        let mut core = self.shared.lock();
        let Some(loaded) = self.read_loaded() else {
            return;
        };
        let outcomes = self
            .reconciler
            .second_look(&mut core.tracker, &loaded, boot_ns_now());
        let corrections = corrections(&core.tracker, outcomes, true);
        drop(core);
        self.record_corrections(corrections, true);
    }

    /// Re-reads /proc/modules and corrects the tracker at once (after a
    /// loss, a source failure, or to settle the start-up snapshot).
    pub(super) fn reconcile_now(&mut self, count_as_drift: bool) {
        self.refresh_boot_facts();
        let mut core = self.shared.lock();
        let started = boot_ns_now();
        let Some(loaded) = self.read_loaded() else {
            return;
        };
        let outcomes = self.reconciler.now(
            &mut core.tracker,
            &loaded,
            started,
            boot_ns_now(),
            count_as_drift,
        );
        let corrections = corrections(&core.tracker, outcomes, count_as_drift);
        drop(core);
        self.record_corrections(corrections, count_as_drift);
    }

    /// Re-reads the boot-time configuration for the tracked groups; a
    /// module newly blacklisted (or no longer) can flip an `available`
    /// group, which is recorded.
    pub(super) fn refresh_boot_facts(&mut self) {
        // The groups copied out, so the ring thread does not wait for the
        // files read here.
        let groups = self.shared.lock().tracker.groups().to_vec();
        self.boot = crate::remedy::boot_facts(&self.settings.common.host, &self.snapshot, &groups);
        let changes = self.shared.lock().tracker.set_blocked(self.boot.blocked());
        for c in changes {
            if c.met {
                tracing::info!(group = %c.group, "requirement met again: nothing blocks its modules from loading any more");
            } else {
                tracing::error!(group = %c.group, "requirement NO LONGER met: the boot-time configuration now blocks one of its modules from loading");
            }
            self.append(records::requirement_flip(
                &c.group,
                !c.met,
                c.met,
                "the boot-time configuration (modprobe.d, the kernel command line) changed what may load".to_owned(),
                boot_ns_now(),
            ));
        }
    }

    /// Counts, logs and records the corrections a reconcile made.
    fn record_corrections(
        &mut self,
        corrections: Vec<(Outcome, Option<Record>)>,
        count_as_drift: bool,
    ) {
        for (o, drift) in corrections {
            if let Some(r) = drift {
                self.metrics.inc_drift();
                tracing::warn!(module = %o.module, tracked = %o.from, actual = %o.to, "drift: tracked state corrected from /proc/modules");
                self.append(r);
            }
            trace_group_changes(&o);
            // A silent correction right after start-up settles the snapshot.
            let cause = if count_as_drift {
                RecordKind::Drift
            } else {
                RecordKind::Snapshot
            };
            for r in records::group_changes(Some(&o.module), &o.group_changes, cause, boot_ns_now())
            {
                self.append(r);
            }
        }
    }
}

/// A reconcile's corrections with their drift records (when counted as
/// drift), built under the same lock as the corrections: the records' views
/// include nothing the ring thread applied after them.
fn corrections(
    tracker: &Tracker,
    outcomes: Vec<Outcome>,
    count_as_drift: bool,
) -> Vec<(Outcome, Option<Record>)> {
    outcomes
        .into_iter()
        .map(|o| {
            let drift = count_as_drift.then(|| records::drift(tracker, &o, boot_ns_now()));
            (o, drift)
        })
        .collect()
}

/// The daemon's log line for each group an outcome flipped.
pub(super) fn trace_group_changes(o: &Outcome) {
    for c in &o.group_changes {
        if c.met {
            tracing::info!(group = %c.group, module = %o.module, "requirement met again");
        } else {
            tracing::error!(group = %c.group, module = %o.module, state = %o.to, "requirement NO LONGER met");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{Kind, Raw},
        state::ModuleState,
        testing::{event, longhorn_groups, name, snapshot_debian_6_1},
    };

    fn loaded_without(module: &str) -> Loaded {
        let mut loaded = snapshot_debian_6_1().loaded;
        loaded.remove(&name(module));
        loaded
    }

    #[test]
    fn a_difference_seen_twice_is_drift_and_corrected() {
        let mut t = Tracker::new(&snapshot_debian_6_1(), longhorn_groups());
        let mut r = Reconciler::default();
        let loaded = loaded_without("dm_crypt");
        let t0 = Instant::now();
        r.first_look(&t, &loaded, 10, t0);
        assert!(r.pending());
        assert_eq!(r.second_look_at(), Some(t0 + DRIFT_CONFIRM_AFTER));
        let out = r.second_look(&mut t, &loaded, 20);
        assert_eq!(
            out.iter()
                .map(|o| (o.module.as_str(), o.kind, o.to))
                .collect::<Vec<_>>(),
            [("dm_crypt", Some(Kind::Drift), ModuleState::Available)]
        );
        assert_eq!((r.drift_total, r.reconciles), (1, 1));
        assert!(!r.pending());
        assert!(!t.report()[0].met, "base follows the correction");
    }

    #[test]
    fn an_event_between_the_looks_is_not_drift() {
        let mut t = Tracker::new(&snapshot_debian_6_1(), longhorn_groups());
        let mut r = Reconciler::default();
        let loaded = loaded_without("nvme_tcp");
        r.first_look(&t, &loaded, 10, Instant::now());
        // The queued module_free arrives between the looks.
        let o = t.apply(&event(Raw::Free, "nvme_tcp", 15));
        assert_eq!(o.kind, Some(Kind::Unload));
        assert!(r.second_look(&mut t, &loaded, 20).is_empty());
        assert_eq!(r.drift_total, 0);
    }

    #[test]
    fn agreement_schedules_nothing_and_a_stray_second_look_is_a_no_op() {
        let mut t = Tracker::new(&snapshot_debian_6_1(), longhorn_groups());
        let mut r = Reconciler::default();
        r.first_look(&t, &snapshot_debian_6_1().loaded, 1, Instant::now());
        assert!(!r.pending());
        assert!(
            r.second_look(&mut t, &snapshot_debian_6_1().loaded, 2)
                .is_empty()
        );
        assert_eq!((r.drift_total, r.reconciles), (0, 1));
    }

    #[test]
    fn loss_reconciles_are_spaced_and_coalesced() {
        let spacing = Duration::from_secs(1);
        let mut s = Spaced::default();
        let t0 = Instant::now();
        assert!(s.request(t0, spacing), "the first runs at once");
        for ms in [1, 10, 500, 999] {
            assert!(!s.request(t0 + Duration::from_millis(ms), spacing));
        }
        assert_eq!(s.due(), Some(t0 + spacing), "one run for all of them");
        assert!(s.request(t0 + spacing, spacing), "due: runs");
        assert_eq!(s.due(), None);
        assert!(!s.request(t0 + spacing + Duration::from_millis(1), spacing));
    }

    #[test]
    fn settling_corrects_silently_and_a_loss_counts() {
        let mut t = Tracker::new(&snapshot_debian_6_1(), longhorn_groups());
        let mut r = Reconciler::default();
        let out = r.now(&mut t, &loaded_without("dm_crypt"), 1, 2, false);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, None, "settling is not an event");
        assert_eq!(r.drift_total, 0);
        let mut t = Tracker::new(&snapshot_debian_6_1(), longhorn_groups());
        let out = r.now(&mut t, &loaded_without("dm_crypt"), 3, 4, true);
        assert_eq!(out[0].kind, Some(Kind::Drift));
        assert_eq!((r.drift_total, r.reconciles), (1, 2));
    }
}
