//! Applying what the source sends: module events, alias requests, losses
//! and undecodable records; the start-up drain that sorts buffered events
//! into history and live ones; and the initstate check for modules that
//! stay `loading` on kernels without syscall tracepoints.
use std::time::Duration;

use tokio::time::Instant;

use super::{
    Daemon, is_event, records,
    shared::{Applied, Taken},
};
use crate::{
    event::{Kind, Raw, SourceEvent, boot_ns_now},
    forensic::actor,
    host::{self, InitState},
    source::{self, RunningSource, SourceMsg},
    stages::{self, Stage},
    tracker::Outcome,
};

/// How long a module may stay `loading` before /sys/module/<m>/initstate
/// is consulted (kernels without syscall tracepoints, uevent source).
const CONFIRM_AFTER: Duration = Duration::from_millis(500);
/// Longest wait between initstate checks of a slow init.
const CONFIRM_MAX: Duration = Duration::from_secs(5);
/// How long a load's or an unload's in-between state (`loading`,
/// `unloading`) may go unpublished while its result is awaited. A turn
/// that changed a verdict is never held (see [`Daemon::settling`]), so no
/// alert or condition waits for it; /status's view of the in-between
/// state and its records do.
pub(super) const SETTLE_MAX: Duration = Duration::from_millis(20);
/// How long into a hold the waiting events' actors are read anyway (see
/// [`Daemon::settling`]).
const ENRICH_AFTER: Duration = Duration::from_millis(5);

impl Daemon {
    /// Start-up step 3: what the source buffered while the snapshot was
    /// read. Events from before the snapshot are history; an event that
    /// raced the read triggers a silent settling reconcile.
    pub(super) fn drain_startup(
        &mut self,
        running: &mut RunningSource,
        snap_start: u64,
        snap_end: u64,
    ) {
        let mut in_window = false;
        // Everything from before the snapshot is read, however much the
        // ring holds (it was all committed before this drain began, so it
        // is finite); what came later is bounded, so a ring refilled by a
        // flood as fast as it is read cannot hold the start-up: the rest
        // is read as live events, which it is.
        let mut later = 0;
        while later < source::SYNC_MAX {
            let Some(msg) = running.try_recv() else { break };
            if let Some(ev) = is_event(&msg) {
                if ev.boot_ns < snap_start {
                    let kind = self.shared.lock().tracker.record_historical(ev);
                    self.count(kind);
                    if let Some(kind) = kind {
                        self.record_historical(ev, kind);
                    }
                    continue;
                }
                in_window |= ev.boot_ns <= snap_end;
            }
            later += 1;
            self.handle(msg, running);
        }
        if in_window {
            // An event raced the snapshot read: settle against a fresh read.
            self.reconcile_now(false);
        }
        if std::mem::take(&mut self.loss_due) {
            self.reconcile_after_loss();
        }
    }

    fn count(&mut self, kind: Option<Kind>) {
        self.counts.received += 1;
        if let Some(kind) = kind {
            *self.counts.by_kind.entry(kind.as_str()).or_default() += 1;
        }
    }

    /// Applies a turn's messages from a reader task's queue (uevent,
    /// poll): the module events first to the tracker, all of them under
    /// one lock, and only then their metrics, log lines and records, so
    /// nothing but the tracker stands between an event and the state
    /// change of the events behind it in the batch. Each message is then
    /// finished in the order it came.
    pub(super) fn handle_batch(&mut self, batch: &mut Vec<SourceMsg>, running: &RunningSource) {
        let taken: Vec<Taken> = {
            let mut core = self.shared.lock();
            let mut taken: Vec<Taken> = batch.drain(..).map(|m| core.take(m)).collect();
            core.take_views(taken.iter_mut().filter_map(Taken::applied));
            taken
        };
        for t in taken {
            self.finish(t, running);
        }
    }

    /// The rest of a message's handling once the tracker has taken it.
    pub(super) fn finish(&mut self, taken: Taken, running: &RunningSource) {
        match taken {
            Taken::Applied(a) => self.finish_event(a),
            Taken::Other(msg) => self.handle(msg, running),
        }
    }

    /// Applies one message from the source.
    pub(super) fn handle(&mut self, msg: SourceMsg, running: &RunningSource) {
        match msg {
            SourceMsg::Event(ev) => {
                let applied = {
                    let mut core = self.shared.lock();
                    let mut applied = core.apply_event(ev);
                    core.take_views(std::iter::once(&mut applied));
                    applied
                };
                self.finish_event(applied);
            }
            SourceMsg::AliasRequest { alias } => {
                self.count(Some(Kind::Request));
                self.metrics.on_alias_request();
                tracing::debug!(%alias, "module_request for an alias");
            }
            SourceMsg::Lost { total } => {
                self.append(records::events_lost(
                    self.active().as_str(),
                    Some(total),
                    None,
                    boot_ns_now(),
                ));
                self.counts.lost = total;
                self.turn_decided = true;
                self.metrics.set_lost_total(total);
                self.lost_at = Some(Instant::now());
                tracing::error!(lost_total = total, "module events were lost; reconciling");
                self.loss_due = true;
            }
            SourceMsg::Undecodable { reason } => {
                self.append(records::events_lost(
                    self.active().as_str(),
                    None,
                    Some(format!("undecodable event: {reason}")),
                    boot_ns_now(),
                ));
                self.counts.undecodable += 1;
                self.turn_decided = true;
                self.metrics.add_lost(1);
                self.lost_at = Some(Instant::now());
                tracing::error!(%reason, "undecodable event from the kernel; reconciling");
                self.loss_due = true;
            }
            SourceMsg::Ignored { reason } => {
                self.counts.ignored += 1;
                self.metrics.on_ignored();
                tracing::debug!(%reason, "kernel event ignored");
            }
            SourceMsg::UnloadDenied {
                module,
                actor,
                boot_ns,
            } => self.on_denied(module, &actor, boot_ns, running),
        }
    }

    /// Everything else an applied event leads to: metrics, counts, the log
    /// line, the record.
    fn finish_event(&mut self, a: Applied) {
        let Applied {
            ev,
            outcome,
            latency_ns,
            pending,
        } = a;
        #[expect(
            clippy::cast_precision_loss,
            reason = "a latency in seconds for a histogram"
        )]
        let latency = latency_ns as f64 / 1e9;
        self.turn_decided |= !outcome.group_changes.is_empty();
        self.metrics.on_event(&outcome, Some(latency));
        stages::mark(ev.boot_ns, Stage::Metrics);
        self.count(outcome.kind);
        self.trigger_boot_ns = Some(ev.boot_ns);
        trace_outcome(&outcome, &ev);
        if let Some(pending) = pending {
            self.deferred.event(*pending);
        }
    }

    /// A refused unload attempt: counted at once, logged the first time per
    /// actor and module in a window, recorded when the window closes.
    fn on_denied(
        &mut self,
        module: crate::names::ModuleName,
        actor: &crate::event::Actor,
        boot_ns: u64,
        running: &RunningSource,
    ) {
        self.counts.unload_denied += 1;
        self.metrics.on_unload_denied(module.as_str());
        if self.denied.due().is_none() {
            self.denied_suppressed_before = running.noise().map_or(0, |n| n.denied_suppressed());
        }
        let log_name = module.clone();
        if self.denied.add(module, actor, boot_ns, Instant::now()) {
            tracing::warn!(
                module = %log_name,
                uid = actor.uid,
                pid = actor.tgid,
                comm = ?actor.comm,
                "refused attempt to unload a required module (no CAP_SYS_MODULE); counting further attempts by this uid on it"
            );
        }
    }

    /// Closes the refused-unload window: one `module_unload_denied` record
    /// per uid and module, and one for the attempts past the key limit.
    pub(super) fn flush_denied(&mut self, running: &RunningSource) {
        if self.denied.due().is_none() {
            return;
        }
        let suppressed = running
            .noise()
            .map_or(0, |n| n.denied_suppressed())
            .saturating_sub(self.denied_suppressed_before);
        let summary = self.denied.flush(Instant::now());
        let now = boot_ns_now();
        for (key, attempts) in &summary.keys {
            tracing::warn!(
                module = %key.module,
                uid = key.uid,
                comm = ?attempts.last.comm,
                attempts = attempts.count,
                window_secs = summary.window.as_secs(),
                "refused attempts to unload a required module in the last window"
            );
            let actor = actor::enrich(&self.settings.common.host, &attempts.last);
            self.append(records::unload_denied(
                Some((key, attempts)),
                Some(actor),
                summary.window,
                suppressed,
                now,
            ));
        }
        if summary.other > 0 {
            self.append(records::unload_denied_other(
                summary.other,
                summary.window,
                suppressed,
                now,
            ));
        }
    }

    /// An event from before the snapshot: history only, no state change.
    fn record_historical(&mut self, ev: &SourceEvent, kind: Kind) {
        if self.log.is_none() {
            return;
        }
        let core = self.shared.lock();
        let pending =
            records::PendingEvent::new(&core.tracker, ev, kind, None, core.source.as_str());
        drop(core);
        self.deferred.event(pending);
    }

    /// Whether records wait for [`flush_records`](Self::flush_records).
    pub(super) fn deferred_waiting(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Whether so many records wait that they are flushed even while
    /// events keep coming (a storm must not hold them without bound).
    pub(super) fn deferred_full(&self) -> bool {
        self.deferred.len() >= records::DEFERRED_MAX
    }

    /// After the publish: enriches the waiting events' actors from
    /// /proc/<tgid> (a few small procfs reads; the process is still likely
    /// to exist), builds their records and hands everything waiting to the
    /// log, in order. Nothing here changes the state, so none of it sits
    /// between an event and /status.
    pub(super) fn flush_records(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let host = &self.settings.common.host;
        let log = self.log.as_ref();
        let records = self.deferred.drain(
            |boot_ns, a| {
                let info = actor::enrich(host, a);
                stages::mark(boot_ns, Stage::Enriched);
                info
            },
            |kind, boot_ns| match log {
                Some(log) => log.record(kind, boot_ns),
                None => crate::forensic::Record::boxed(kind, boot_ns),
            },
        );
        if let Some(log) = &mut self.log {
            // The bench build's hand-off stamps (nothing to keep otherwise).
            let times: Vec<u64> = if cfg!(feature = "bench") {
                records.iter().map(|r| r.boot_ns).collect()
            } else {
                Vec::new()
            };
            log.append_all(records);
            for boot_ns in times {
                stages::mark(boot_ns, Stage::HandedOff);
            }
        }
    }

    /// Whether to hold the publish (and the records) of this turn: it only
    /// applied source messages or woke for the hold itself (`may_hold`),
    /// nothing in it changed a verdict or reported a loss, and a required
    /// module is `loading` or `unloading`, for less than [`SETTLE_MAX`] so
    /// far. Publishing that state would put the work in front of the
    /// result the kernel is about to send, on the CPU the loading process
    /// needs to send it. A held turn's other news (another module's
    /// in-between state, counters) waits at most [`SETTLE_MAX`].
    ///
    /// A result that takes longer than [`ENRICH_AFTER`] (a slow init) has
    /// the waiting events' actors read from /proc then, while the loader is
    /// certainly still inside its syscall; a quick one has them read right
    /// after its publish, as every other event.
    pub(super) fn settling(&mut self, may_hold: bool) -> bool {
        self.held_until = None;
        let decided = std::mem::take(&mut self.turn_decided);
        if !self.shared.lock().tracker.in_transition() {
            self.settle_since = None;
            return false;
        }
        if decided || !may_hold {
            return false;
        }
        let now = Instant::now();
        let since = *self.settle_since.get_or_insert(now);
        let due = since + SETTLE_MAX;
        if now >= due {
            return false;
        }
        // Each hold is armed with its own deadline, which fires once even
        // if it has passed by the time the loop waits.
        let enrich_at = since + ENRICH_AFTER;
        if now < enrich_at {
            self.held_until = Some(enrich_at);
        } else {
            self.held_until = Some(due);
            let host = &self.settings.common.host;
            self.deferred
                .enrich_waiting(|_, actor| actor::enrich(host, actor));
        }
        true
    }

    /// When the held publish is due, while one is held.
    pub(super) const fn settle_deadline(&self) -> Option<Instant> {
        self.held_until
    }

    /// Arms the initstate check while some module is `loading`.
    pub(super) fn schedule_confirm(&mut self) {
        if self.shared.lock().tracker.loading().next().is_none() {
            self.confirm = None;
        } else if self.confirm.is_none() {
            self.confirm = Some((Instant::now() + CONFIRM_AFTER, CONFIRM_AFTER));
        }
    }

    /// Asks /sys/module/<m>/initstate about modules still `loading`. The
    /// caller has applied every event the source held first (see the
    /// loop), so a module still `loading` here has had no news for
    /// [`CONFIRM_AFTER`].
    pub(super) fn confirm_loading(&mut self) {
        // In name order, so the records and log lines of one pass come
        // in the same order every time.
        let mut loading: Vec<_> = self.shared.lock().tracker.loading().cloned().collect();
        loading.sort_unstable();
        let mut still = false;
        for name in loading {
            // Read and applied under the lock, so the ring thread cannot
            // apply a newer event of this module between the two.
            let mut core = self.shared.lock();
            if !core.tracker.loading().any(|m| *m == name) {
                continue;
            }
            let raw = match host::read_initstate(&self.settings.common.host, &name) {
                Ok(Some(InitState::Live)) => Raw::Present,
                Ok(Some(InitState::Coming)) => {
                    still = true;
                    continue;
                }
                Ok(Some(InitState::Going) | None) => Raw::Absent,
                Err(e) => {
                    tracing::warn!(module = %name, error = %e, "reading initstate failed");
                    still = true;
                    continue;
                }
            };
            let ev = SourceEvent::observed(raw, name, boot_ns_now());
            let outcome = core.tracker.apply(&ev);
            let pending = match (&self.log, outcome.kind) {
                (Some(_), Some(kind)) => Some(records::PendingEvent::new(
                    &core.tracker,
                    &ev,
                    kind,
                    Some(&outcome),
                    "initstate",
                )),
                _ => None,
            };
            drop(core);
            self.metrics.on_event(&outcome, None);
            self.count(outcome.kind);
            trace_outcome(&outcome, &ev);
            if let Some(pending) = pending {
                self.deferred.event(pending);
            }
        }
        self.confirm = still.then(|| {
            let back_off = self
                .confirm
                .map_or(CONFIRM_AFTER, |(_, d)| (d * 2).min(CONFIRM_MAX));
            (Instant::now() + back_off, back_off)
        });
    }
}

/// The daemon's log line for a required module's event, and for each group
/// it flipped.
fn trace_outcome(o: &Outcome, ev: &SourceEvent) {
    if let Some(kind) = o.kind
        && o.required
    {
        let actor = ev.actor.as_ref();
        tracing::info!(
            module = %o.module,
            event = %kind,
            from = %o.from,
            to = %o.to,
            pid = actor.map(|a| a.tgid),
            comm = actor.map(|a| a.comm.as_str()),
            uid = actor.map(|a| a.uid),
            "required module event"
        );
    }
    super::reconcile::trace_group_changes(o);
}
