//! What the daemon's task and its ring thread share: the tracker, and the
//! one function that applies a source's message to it.
//!
//! The eBPF ring is read by a thread of its own ([`super::ring`]), which
//! applies each module event to the tracker the moment it takes it, and
//! queues what it applied for the daemon's task (metrics, counts, log
//! lines, records, the publish). The uevent and poll sources' messages
//! are applied by the daemon's task itself, through the same function.
//! Everything else that reads or changes the tracker (the reconcile, the
//! initstate check, a reload, the /status document) takes the same lock,
//! so the tracker is never ahead of a /proc read made under it.
use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Condvar, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::Notify;

use super::records;
use crate::{
    event::{Raw, SourceEvent},
    names::ModuleName,
    source::{ActiveKind, SourceMsg, ebpf::RingFeed},
    stages::{self, Stage},
    tracker::{GroupChange, Outcome, Tracker},
};

/// Most messages the ring thread queues for the daemon's task; past it the
/// thread stops taking from the ring (which then fills, and the kernel
/// counts what it cannot deliver) until the task catches up.
pub(super) const OUT_MAX: usize = crate::source::ebpf::DRAIN_BATCH;

/// How long the ring thread may keep a batch that decides nothing from
/// the daemon's loop while a required module is loading or unloading: the
/// loop would only hold that turn's publish until the result (see
/// `Daemon::settling`), and waking it would put its work on the CPU the
/// loading or unloading process needs to send the result. As long as the
/// loop's own wait before it reads the actors of a slow load.
pub(super) const QUIET_MAX: std::time::Duration = std::time::Duration::from_millis(5);

/// What one [`Shared::take_from_ring`] did.
pub(super) struct RingTake {
    /// Messages taken.
    pub taken: usize,
    /// Whether it stopped at its limit, so the feed may still hold
    /// messages: the ring, or the second half of an unload's record, which
    /// no poll(2) would signal.
    pub more: bool,
    /// While what it queued is kept from the loop (see [`QUIET_MAX`]),
    /// until when.
    pub quiet_until: Option<std::time::Instant>,
}

/// The shared state and how its two users wake each other.
pub(super) struct Shared {
    core: Mutex<Core>,
    /// The ring thread queued something (or stopped): wakes the task.
    pub(super) queued: Notify,
    /// The task took from the queue (or stops the thread): wakes the
    /// thread waiting for room.
    room: Condvar,
}

/// The tracker and what applying an event needs besides it.
pub(super) struct Core {
    pub(super) tracker: Tracker,
    /// Exact aliases of the tracked modules (`fs_nfs4` → `nfs`): a request
    /// by alias is about its module.
    pub(super) aliases: BTreeMap<ModuleName, ModuleName>,
    /// Whether events' records are kept (there is an event log).
    pub(super) records: bool,
    /// The source in use, named in records.
    pub(super) source: ActiveKind,
    /// The eBPF ring, while the ring thread reads it.
    ring: Option<RingFeed>,
    /// What the ring thread took, in order, for the daemon's task.
    queue: VecDeque<Taken>,
    /// Why the ring thread stopped on its own (the source is dead).
    ring_failed: Option<String>,
    /// The daemon is stopping: the ring thread ends.
    stopping: bool,
    /// Since when the queue holds batches kept from the loop (see
    /// [`QUIET_MAX`]).
    quiet_since: Option<std::time::Instant>,
}

/// A source's message as the tracker took it.
pub(super) enum Taken {
    /// A module event, applied.
    Applied(Applied),
    /// Anything else, for the daemon's task.
    Other(SourceMsg),
}

/// A module event the tracker has applied, waiting for the rest of its
/// handling (metrics, counts, the log line and the record).
pub(super) struct Applied {
    pub(super) ev: SourceEvent,
    pub(super) outcome: Outcome,
    /// From the event to its state change.
    pub(super) latency_ns: u64,
    /// Its record, when there is a log and the event meant something.
    /// Boxed, and filled only once the batch is applied: a queued event
    /// is 232 bytes instead of 712, and each is moved into the queue
    /// before the next event of its batch is applied.
    pub(super) pending: Option<Box<records::PendingEvent>>,
}

impl Taken {
    /// The applied event, if this is one.
    pub(super) const fn applied(&mut self) -> Option<&mut Applied> {
        match self {
            Self::Applied(a) => Some(a),
            Self::Other(_) => None,
        }
    }
}

impl Shared {
    pub(super) fn new(core: Core) -> Self {
        Self {
            core: Mutex::new(core),
            queued: Notify::new(),
            room: Condvar::new(),
        }
    }

    /// The shared state, locked. Never call a method that locks again
    /// while holding it.
    pub(super) fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves the tracker as consistent
        // as any single step does (each step is one map update).
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves once the ring thread has queued something, or has
    /// stopped on its own; never without a ring thread.
    pub(super) async fn ready(&self) {
        loop {
            // A notification between the look and the wait is kept:
            // notify_one stores a permit when nobody waits.
            let queued = self.queued.notified();
            {
                let core = self.lock();
                if !core.queue.is_empty() || core.ring_failed.is_some() {
                    return;
                }
            }
            queued.await;
        }
    }

    /// Takes at most `max` of what the ring thread queued, into `into`;
    /// returns whether more is waiting.
    pub(super) fn take_queued(&self, into: &mut Vec<Taken>, max: usize) -> bool {
        let mut core = self.lock();
        let n = core.queue.len().min(max);
        into.extend(core.queue.drain(..n));
        let more = !core.queue.is_empty();
        drop(core);
        if n > 0 {
            self.room.notify_one();
        }
        more
    }

    /// Everything the ring holds now (at most `max` messages) and everything
    /// queued before it, applied, in order: what happened before this
    /// moment is in the tracker when this returns.
    pub(super) fn catch_up(&self, max: usize) -> Vec<Taken> {
        let mut core = self.lock();
        core.drain_ring(max);
        let taken = core.queue.drain(..).collect();
        drop(core);
        self.room.notify_one();
        taken
    }

    /// Whether the ring thread has queued nothing.
    pub(super) fn nothing_queued(&self) -> bool {
        self.lock().queue.is_empty()
    }

    /// Why the ring thread stopped on its own, once (the daemon falls back
    /// to another source).
    pub(super) fn take_ring_failure(&self) -> Option<String> {
        let mut core = self.lock();
        if !core.queue.is_empty() {
            return None;
        }
        let reason = core.ring_failed.take()?;
        core.ring = None;
        Some(reason)
    }

    /// Tells the ring thread to end (it also watches its stop descriptor).
    pub(super) fn stop(&self) {
        self.lock().stopping = true;
        self.room.notify_all();
    }

    /// For the ring thread: waits for room in the queue, then takes at
    /// most `max` messages from the ring and applies them (fewer if the
    /// queue has less room). `None` when the daemon is stopping.
    pub(super) fn take_from_ring(&self, max: usize) -> Option<RingTake> {
        let mut core = self.lock();
        while core.queue.len() >= OUT_MAX && !core.stopping {
            core = self.room.wait(core).unwrap_or_else(PoisonError::into_inner);
        }
        if core.stopping {
            return None;
        }
        let limit = max.min(OUT_MAX - core.queue.len());
        let before = core.queue.len();
        let taken = core.drain_ring(limit);
        let queued = core.queue.len() > before;
        let quiet_until = core.keep_quiet(before, std::time::Instant::now());
        drop(core);
        if queued && quiet_until.is_none() {
            self.queued.notify_one();
        }
        Some(RingTake {
            taken,
            more: taken == limit,
            quiet_until,
        })
    }

    /// For the ring thread: the quiet time is over; what it kept is the
    /// loop's now.
    pub(super) fn end_quiet(&self) {
        let mut core = self.lock();
        core.quiet_since = None;
        let waiting = !core.queue.is_empty();
        drop(core);
        if waiting {
            self.queued.notify_one();
        }
    }

    /// For the ring thread: the ring cannot be read any more.
    pub(super) fn ring_failed(&self, reason: String) {
        self.lock().ring_failed = Some(reason);
        self.queued.notify_one();
    }
}

impl Core {
    pub(super) const fn new(
        tracker: Tracker,
        aliases: BTreeMap<ModuleName, ModuleName>,
        source: ActiveKind,
    ) -> Self {
        Self {
            tracker,
            aliases,
            records: false,
            source,
            ring: None,
            queue: VecDeque::new(),
            ring_failed: None,
            stopping: false,
            quiet_since: None,
        }
    }

    /// Whether what the ring thread queued from `before` on is kept from
    /// the loop, and until when: while nothing queued since the quiet time
    /// began decides anything (a module event that flipped no group), a
    /// required module is loading or unloading, and [`QUIET_MAX`] has not
    /// passed.
    fn keep_quiet(&mut self, before: usize, now: std::time::Instant) -> Option<std::time::Instant> {
        if self.queue.len() == before {
            return self.quiet_since.map(|since| since + QUIET_MAX);
        }
        let decides_nothing = self
            .queue
            .range(before..)
            .all(|t| matches!(t, Taken::Applied(a) if a.outcome.group_changes.is_empty()));
        let until = *self.quiet_since.get_or_insert(now) + QUIET_MAX;
        if decides_nothing && self.tracker.in_transition() && now < until {
            Some(until)
        } else {
            self.quiet_since = None;
            None
        }
    }

    /// Hands the ring to the ring thread's reads (see [`super::ring`]).
    pub(super) fn set_ring(&mut self, ring: RingFeed) {
        self.ring = Some(ring);
        self.ring_failed = None;
        self.stopping = false;
    }

    /// Takes at most `max` messages from the ring, applies each and queues
    /// it; returns how many were taken.
    fn drain_ring(&mut self, max: usize) -> usize {
        let Some(mut ring) = self.ring.take() else {
            return 0;
        };
        let start = self.queue.len();
        let n = ring.drain(max, |msg| {
            let taken = self.take(msg);
            self.queue.push_back(taken);
        });
        self.ring = Some(ring);
        views(
            &self.tracker,
            self.records,
            self.source,
            self.queue.range_mut(start..).filter_map(Taken::applied),
        );
        n
    }

    /// Applies `msg` if it is a module event; its record's view is taken
    /// by [`take_views`](Self::take_views), once the batch is applied.
    pub(super) fn take(&mut self, msg: SourceMsg) -> Taken {
        match msg {
            SourceMsg::Event(ev) => Taken::Applied(self.apply_event(ev)),
            other => Taken::Other(other),
        }
    }

    /// The records' views of a batch the tracker has just taken, in order:
    /// built after the whole batch, so none of them stands between an
    /// event and the state change of the next. Each is still the view
    /// right after its own event: a group a later event of the batch
    /// flipped is shown as it was before that flip.
    pub(super) fn take_views<'a>(&self, batch: impl DoubleEndedIterator<Item = &'a mut Applied>) {
        views(&self.tracker, self.records, self.source, batch);
    }

    /// The state change of one module event; its record's view is left to
    /// [`take_views`](Self::take_views).
    pub(super) fn apply_event(&mut self, mut ev: SourceEvent) -> Applied {
        stages::mark(ev.boot_ns, Stage::Received);
        // A request by alias (`fs-nfs4`) is about its module (`nfs`).
        if ev.raw == Raw::Request
            && !self.tracker.is_required(&ev.module)
            && let Some(module) = self.aliases.get(&ev.module)
        {
            ev.module = module.clone();
        }
        let outcome = self.tracker.apply(&ev);
        let applied_ns = outcome.applied_ns;
        stages::mark_at(ev.boot_ns, Stage::Tracked, applied_ns);
        if outcome.required && outcome.from.satisfies() != outcome.to.satisfies() {
            stages::mark_decisive(ev.boot_ns);
        }
        Applied {
            latency_ns: applied_ns.saturating_sub(ev.boot_ns),
            ev,
            outcome,
            pending: None,
        }
    }
}

/// [`Core::take_views`], over the fields it needs (so the ring's batch can
/// be viewed in place in the queue).
fn views<'a>(
    tracker: &Tracker,
    records: bool,
    source: ActiveKind,
    batch: impl DoubleEndedIterator<Item = &'a mut Applied>,
) {
    if !records {
        return;
    }
    // The earliest flip of each group by the events after the one at hand
    // (walking back, each flip seen replaces a later one).
    let mut later: Vec<GroupChange> = Vec::new();
    for a in batch.rev() {
        if let Some(kind) = a.outcome.kind {
            a.pending = Some(Box::new(records::PendingEvent::before(
                tracker,
                &a.ev,
                kind,
                Some(&a.outcome),
                source.as_str(),
                &later,
            )));
        }
        for c in &a.outcome.group_changes {
            match later.iter_mut().find(|l| l.group == c.group) {
                Some(l) => l.met = c.met,
                None => later.push(c.clone()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::Raw,
        forensic::Record,
        testing::{event, longhorn_groups, snapshot_debian_6_1},
    };

    fn core() -> Core {
        let mut core = Core::new(
            Tracker::new(&snapshot_debian_6_1(), longhorn_groups()),
            BTreeMap::new(),
            ActiveKind::Ebpf,
        );
        core.records = true;
        core
    }

    fn records_of(applied: Vec<Applied>) -> Vec<Record> {
        applied
            .into_iter()
            .filter_map(|a| a.pending)
            .flat_map(|p| p.into_records(None))
            .collect()
    }

    /// A batch that breaks and restores base twice, with a V2 module's
    /// unload in between.
    fn batch() -> Vec<SourceEvent> {
        vec![
            event(Raw::UnloadBegin, "dm_crypt", 1),
            event(Raw::Free, "dm_crypt", 2),
            event(Raw::UnloadResult { ret: 0 }, "dm_crypt", 3),
            event(Raw::Load, "dm_crypt", 4),
            event(Raw::LoadResult { ret: 0 }, "dm_crypt", 5),
            event(Raw::Free, "nvme_tcp", 6),
            event(Raw::Free, "dm_crypt", 7),
            event(Raw::Load, "dm_crypt", 8),
            event(Raw::LoadResult { ret: 0 }, "dm_crypt", 9),
        ]
    }

    #[test]
    fn views_taken_after_the_batch_are_those_right_after_each_event() {
        // One by one: each view taken at once, as the initstate check does.
        let mut one = core();
        let mut expected = Vec::new();
        for ev in batch() {
            let mut a = one.apply_event(ev);
            one.take_views(std::iter::once(&mut a));
            expected.push(a);
        }
        // The batch applied first, every view taken after it.
        let mut all = core();
        let mut applied: Vec<Applied> = batch().into_iter().map(|ev| all.apply_event(ev)).collect();
        all.take_views(applied.iter_mut());
        let (expected, got) = (records_of(expected), records_of(applied));
        // Not a vacuous comparison: base was shown unmet and met again,
        // and some views differ from the state after the batch.
        let base_met: Vec<bool> = got
            .iter()
            .flat_map(|r| &r.requirements)
            .filter(|e| e.name == "base")
            .map(|e| e.met)
            .collect();
        assert!(
            base_met.contains(&false) && base_met.contains(&true),
            "{base_met:?}"
        );
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g.requirements, e.requirements, "{g:?}");
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn a_batch_that_decides_nothing_mid_unload_is_kept_quiet_until_the_result() {
        let mut c = core();
        let t0 = std::time::Instant::now();
        let push = |c: &mut Core, ev: SourceEvent, at| {
            let before = c.queue.len();
            let applied = c.apply_event(ev);
            c.queue.push_back(Taken::Applied(applied));
            c.keep_quiet(before, at)
        };
        // The unload's start: dm_crypt is unloading, base still met.
        let quiet = push(&mut c, event(Raw::UnloadBegin, "dm_crypt", 1), t0);
        assert_eq!(quiet, Some(t0 + QUIET_MAX));
        // Nothing new: still kept, to the same deadline.
        assert_eq!(c.keep_quiet(c.queue.len(), t0), Some(t0 + QUIET_MAX));
        // The free breaks base: the loop is woken for everything.
        let at = t0 + std::time::Duration::from_millis(1);
        assert_eq!(push(&mut c, event(Raw::Free, "dm_crypt", 2), at), None);
        assert_eq!(
            c.keep_quiet(c.queue.len(), at),
            None,
            "the quiet time ended"
        );

        // A load's start kept, then more news past the quiet time: woken.
        let mut c = core();
        assert!(push(&mut c, event(Raw::UnloadBegin, "nvme_tcp", 3), t0).is_some());
        let late = t0 + QUIET_MAX;
        assert_eq!(
            push(&mut c, event(Raw::UnloadBegin, "vfio_pci", 4), late),
            None
        );

        // Anything but a module event is news at once.
        let mut c = core();
        assert!(push(&mut c, event(Raw::UnloadBegin, "dm_crypt", 5), t0).is_some());
        let before = c.queue.len();
        c.queue
            .push_back(Taken::Other(SourceMsg::Lost { total: 1 }));
        assert_eq!(c.keep_quiet(before, t0), None);

        // With no load or unload under way nothing is kept.
        let mut c = core();
        assert_eq!(push(&mut c, event(Raw::Request, "dm_crypt", 6), t0), None);
    }

    #[test]
    fn without_a_log_no_view_is_taken() {
        let mut c = core();
        c.records = false;
        let mut applied: Vec<Applied> = batch().into_iter().map(|ev| c.apply_event(ev)).collect();
        c.take_views(applied.iter_mut());
        assert!(applied.iter().all(|a| a.pending.is_none()));
    }
}
