//! `kmod-monitor run`: start-up, the event loop and shutdown.
//!
//! Start-up is three steps, in this order so nothing is missed:
//! 1. attach the event source (and drop privileges);
//! 2. take the host snapshot, bracketed by boot-clock readings;
//! 3. apply what the source buffered meanwhile: events older than the
//!    snapshot are history only, events that raced it trigger a settling
//!    reconcile.
//!
//! Then the loop takes events, timers, signals and cluster changes, and
//! after each publishes the new state. The eBPF ring has a thread of its
//! own (`ring.rs`), which applies each event to the tracker as it takes
//! it; the tracker is shared with it under one lock (`shared.rs`). The
//! other concerns have their own files: `events.rs` handles what the
//! source sends once it is applied, `reconcile.rs` compares
//! with /proc/modules, `reload.rs` handles SIGHUP and cluster changes,
//! `publish.rs` fans the state out to /status, metrics and alerts, and
//! [`records`] builds the forensic records.
mod denied;
mod events;
mod publish;
mod reconcile;
pub mod records;
mod reload;
mod ring;
mod shared;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    alerting::{self, AlertSettings, LOST_ALERT_FOR, WantedSet},
    config::RunSettings,
    event::boot_ns_now,
    forensic::{self, EventLog, EventLogStatus, Record, RecordKind},
    host::{self, Snapshot},
    http, k8s,
    longhorn::{self, ClusterView, v2::V2State, watch::WatchTarget},
    metrics::Metrics,
    names::ModuleName,
    privileges::Privileges,
    remedy::BootFacts,
    requirements,
    source::{self, ActiveKind, RunningSource, SourceKind, SourceMsg, SourceOptions, Unavailable},
    stages::{self, Stage},
    status::EventCounts,
    tracker::{GroupReport, Tracker},
};

/// The daemon's state between events.
struct Daemon {
    settings: RunSettings,
    /// The tracker, shared with the ring thread (see [`shared`]).
    shared: Arc<shared::Shared>,
    /// The thread reading the eBPF ring, while that is the source.
    ring: Option<ring::RingThread>,
    /// The start-up snapshot: kernel config and module files for remedies.
    snapshot: Snapshot,
    counts: EventCounts,
    /// The periodic reconcile's pending second look, and its counters.
    reconciler: reconcile::Reconciler,
    /// Next initstate check and the back-off that led to it.
    confirm: Option<(Instant, Duration)>,
    /// Persistence across reboots and other kernels; refreshed on reconcile.
    boot: BootFacts,
    warnings: Vec<String>,
    metrics: Arc<Metrics>,
    wanted_tx: watch::Sender<Arc<WantedSet>>,
    /// When events were last lost (drives the events-lost alert).
    lost_at: Option<Instant>,
    /// Timestamp of the latest event, for alert latency.
    trigger_boot_ns: Option<u64>,
    /// Wall-clock time of CLOCK_BOOTTIME zero.
    boot_epoch: std::time::SystemTime,
    /// The forensic event log, if any.
    log: Option<EventLog>,
    /// uid, gid and capabilities after the drop.
    privileges: Privileges,
    /// V2 enablement, the cluster view, hugepages.
    v2: V2State,
    /// Refused unload attempts of the current window.
    denied: denied::Denied,
    /// What the kernel had suppressed when the current window opened.
    denied_suppressed_before: u64,
    /// Reconciles triggered by losses, spaced [`LOSS_RECONCILE_SPACING`].
    loss_reconcile: reconcile::Spaced,
    /// The checks of the host and the cluster, as last judged.
    checks: Vec<crate::longhorn::readiness::Verdict>,
    /// The Node condition, Events and labels; `None` when nothing is
    /// written (`--k8s-report off`, or not in a cluster).
    k8s: Option<k8s::Reporter>,
    /// Records waiting for the publish (see [`records::Deferred`]).
    deferred: records::Deferred,
    /// Since when a required module has been between a load's or an
    /// unload's start and its result (see [`Daemon::settling`]).
    settle_since: Option<Instant>,
    /// When the publish held this turn is due (see [`Daemon::settling`]).
    held_until: Option<Instant>,
    /// This turn changed a verdict or reported a loss: it is published at
    /// once, whatever else is under way.
    turn_decided: bool,
    /// A loss was reported: the reconcile it calls for runs once the
    /// turn's messages are all handled, so the log shows the events the
    /// tracker took before the correction ahead of it.
    loss_due: bool,
}

/// Least time between two reconciles triggered by lost or undecodable
/// events: each re-reads /proc/modules, and a source reporting losses in a
/// burst must not turn into a read per report.
pub const LOSS_RECONCILE_SPACING: Duration = Duration::from_secs(1);

/// Most source messages handled in one turn of the loop (applied, for a
/// reader task's queue; finished, for the ring thread's) before the state
/// is published and the other tasks get the thread.
const TURN_MAX: usize = source::ebpf::DRAIN_BATCH;

/// The names the kernel's filter lets through: every module any enabled
/// group could require (V2's included, whatever its enablement, so a flip
/// needs no rewrite), and the exact aliases that name them.
fn tracked_names(
    groups: &crate::requirements::GroupSettings,
    aliases: &BTreeMap<ModuleName, ModuleName>,
) -> (Vec<ModuleName>, BTreeMap<ModuleName, ModuleName>) {
    let modules: std::collections::BTreeSet<ModuleName> = requirements::resolve(groups, true)
        .into_iter()
        .flat_map(|g| g.modules)
        .collect();
    let relevant: BTreeMap<ModuleName, ModuleName> = aliases
        .iter()
        .filter(|(alias, module)| modules.contains(*module) && !modules.contains(*alias))
        .map(|(a, m)| (a.clone(), m.clone()))
        .collect();
    let names = modules.iter().chain(relevant.keys()).cloned().collect();
    (names, relevant)
}

/// Runs until SIGTERM/SIGINT.
///
/// # Errors
/// When no source can start (or the requested one cannot), the snapshot
/// cannot be taken, or the listener cannot bind.
pub async fn run(settings: RunSettings) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    // Read before anything starts, so a bad file stops `run` at once, and
    // while the files are still readable (before --user).
    let web = http::WebConfig::load(settings.web_config_file.as_deref())?;
    let mut opts = SourceOptions {
        host: settings.common.host.clone(),
        ring_buffer_bytes: settings.ring_buffer_bytes,
        poll_interval: settings.poll_interval,
        // The modules' own names for now; their aliases once the snapshot
        // has found the module directory.
        tracked: tracked_names(&settings.common.groups, &BTreeMap::new()).0,
    };
    // 1. Attach first, so nothing that happens during the snapshot is missed.
    let mut running = source::start(settings.source, &opts)
        .await
        .map_err(|reasons| no_source_error(settings.source, &reasons))?;
    for u in &running.unavailable {
        tracing::warn!(source = %u.source, reason = %u.reason, "event source unavailable");
    }
    tracing::info!(source = %running.kind, details = ?running.details, "event source active");
    let privileges = drop_privileges(&settings)?;
    // The Alertmanager client's files, read as the user that re-reads them.
    let pusher = (!settings.alertmanager.is_empty())
        .then(|| {
            alerting::Pusher::new(AlertSettings {
                urls: settings.alertmanager.clone(),
                resend_interval: settings.alert_resend_interval,
                client: settings.alert_client.clone(),
            })
        })
        .transpose()?;
    // The cluster watch (no capability needed; the token is a file).
    let client = longhorn::client(&settings.common.cluster).await?;
    let report_client = report_client(&settings, client.as_ref()).await?;
    // 2. Snapshot, bracketed by boot-clock readings.
    let snap_start = boot_ns_now();
    let snapshot =
        host::take_snapshot(&settings.common.host).context("taking the start-up snapshot")?;
    let snap_end = boot_ns_now();
    log_snapshot(&snapshot);
    let all_aliases = snapshot
        .modules_dir
        .as_deref()
        .map(host::read_modules_alias)
        .unwrap_or_default();
    let (tracked, aliases) = tracked_names(&settings.common.groups, &all_aliases);
    if let Some(outcome) = running.set_tracked(&tracked) {
        tracing::info!(names = ?tracked.iter().map(ModuleName::as_str).collect::<Vec<_>>(), "{}", outcome.describe());
    }
    opts.tracked = tracked;
    let v2 = V2State::new(
        settings.common.v2_local,
        match (&client, settings.common.cluster.mode) {
            (Some(_), _) => Ok(()),
            (None, longhorn::LonghornMode::Off) => Err("--longhorn off".to_owned()),
            (None, longhorn::LonghornMode::Auto) => {
                Err("not in a cluster: no service account and no kubeconfig".to_owned())
            }
        },
        settings.common.cluster.namespace.clone(),
        settings.common.node_name.clone(),
        settings.common.cluster.grace,
        &settings.common.host,
        &snapshot.kernel_release,
    );
    let mut cluster_rx = client.map(|c| {
        longhorn::watch::spawn(
            c,
            &WatchTarget {
                namespace: settings.common.cluster.namespace.clone(),
                node: settings.common.node_name.clone(),
            },
            cancel.clone(),
        )
    });
    let groups = requirements::resolve(&settings.common.groups, v2.v2.enabled == Some(true));
    let tracker = Tracker::new(&snapshot, groups);
    let metrics = Arc::new(Metrics::new(&snapshot.kernel_release));
    let (wanted_tx, wanted_rx) = watch::channel(Arc::new(WantedSet::default()));
    let reporter = report_client.map(|c| {
        k8s::Reporter::spawn(
            c,
            &settings.k8s,
            &settings.common.node_name,
            Arc::clone(&metrics),
            cancel.clone(),
        )
    });
    let boot = crate::remedy::boot_facts(&settings.common.host, &snapshot, tracker.groups());
    for w in &boot.warnings {
        tracing::warn!(warning = %w, "boot-time module configuration");
    }
    let shared = Arc::new(shared::Shared::new(shared::Core::new(
        tracker,
        aliases,
        running.kind,
    )));
    let mut d = Daemon {
        shared: Arc::clone(&shared),
        ring: None,
        counts: EventCounts::default(),
        reconciler: reconcile::Reconciler::default(),
        warnings: snapshot.warnings.clone(),
        snapshot,
        settings,
        confirm: None,
        metrics: Arc::clone(&metrics),
        wanted_tx,
        lost_at: None,
        trigger_boot_ns: None,
        boot_epoch: std::time::SystemTime::now() - Duration::from_nanos(boot_ns_now()),
        log: None,
        boot,
        privileges,
        v2,
        denied: denied::Denied::default(),
        denied_suppressed_before: 0,
        loss_reconcile: reconcile::Spaced::default(),
        checks: Vec::new(),
        k8s: reporter,
        deferred: records::Deferred::default(),
        settle_since: None,
        held_until: None,
        turn_decided: false,
        loss_due: false,
    };
    // Judge the checks once; later judgements record what changes.
    d.refresh_boot_facts();
    d.refresh_checks();
    // The event log starts with who we are and what the snapshot saw,
    // before any event is applied.
    d.open_event_log(snap_end)?;
    // 3. Apply what the source buffered meanwhile: everything the kernel
    // holds (the uevent reader reads its socket dry first; the ring is
    // read directly), so events from before the snapshot are sorted as
    // such.
    running.sync().await;
    d.drain_startup(&mut running, snap_start, snap_end);
    // From here the ring (if that is the source) is read by its own thread.
    d.start_ring_thread(&mut running);
    let report = d.shared.lock().tracker.report();
    for g in &report {
        log_group(g);
    }
    let (status_tx, status_rx) = watch::channel(Arc::new(d.status(&running)));
    d.publish(&running, &status_tx);
    d.flush_records();
    let pusher = pusher.map(|p| p.spawn(wanted_rx, Arc::clone(&metrics), cancel.clone()));
    let server = http::serve(
        http::Listener {
            addr: d.settings.listen,
            web,
        },
        status_rx,
        d.log.as_ref().map(EventLog::view),
        Arc::clone(&metrics),
        cancel.clone(),
    )
    .await
    .with_context(|| format!("listening on {}", d.settings.listen))?;
    tracing::info!(listen = %d.settings.listen, "serving /status and /healthz");

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut reconcile = reconcile_timer(d.settings.reconcile_interval);
    let mut log_status = d.log.as_ref().map(EventLog::subscribe);
    // One turn's messages from the source (reused).
    let mut batch = Vec::with_capacity(TURN_MAX);
    // One turn's messages from the ring thread (reused).
    let mut taken = Vec::with_capacity(TURN_MAX);
    let stop_reason = loop {
        d.schedule_confirm();
        let confirm_at = d.confirm.map(|(at, _)| at);
        let lost_alert_ends = d.lost_at.map(|at| at + LOST_ALERT_FOR);
        let drift_at = d.reconciler.second_look_at();
        let denied_at = d.denied.due();
        let loss_at = d.loss_reconcile.due();
        let grace_at = d.v2.grace_ends().map(Instant::from_std);
        let settle_at = d.settle_deadline();
        // Whether this turn stopped at TURN_MAX messages with more waiting.
        let mut busy = false;
        // Whether this turn only applied what the source sent, or woke for
        // a hold: such a turn may be held (see Daemon::settling).
        let mut may_hold = false;
        tokio::select! {
            () = sleep_until(lost_alert_ends) => d.lost_at = None,
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break "SIGTERM"; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break "SIGINT"; }
            _ = sighup.recv() => {
                d.finish_queued(&running);
                let before = d.settings.reconcile_interval;
                d.reload();
                if d.settings.reconcile_interval != before {
                    reconcile = reconcile_timer(d.settings.reconcile_interval);
                }
                opts.tracked = d.retrack(&running);
            }
            () = sleep_until(denied_at) => {
                d.finish_queued(&running);
                d.flush_denied(&running);
            }
            () = sleep_until(loss_at) => {
                d.finish_queued(&running);
                d.reconcile_after_loss();
            }
            // The writer's state changed (degraded, written): republish.
            () = status_changed(&mut log_status) => {}
            () = sleep_until(confirm_at) => {
                // initstate says how things are now; apply every event that
                // happened before this moment first, or a module whose
                // events are merely queued behind a busy daemon would be
                // judged from a later state (and its queued events then
                // misread).
                d.catch_up(&mut running).await;
                d.confirm_loading();
            }
            _ = reconcile.tick() => {
                d.finish_queued(&running);
                d.reconcile_first_look();
            }
            () = sleep_until(drift_at) => {
                d.finish_queued(&running);
                d.reconcile_second_look();
            }
            Some(view) = cluster_changed(&mut cluster_rx) => {
                d.finish_queued(&running);
                d.on_view(view);
            }
            // The unreadable-cluster alert is due: republish.
            () = sleep_until(grace_at) => {}
            // A hold's next step: read the actors, or publish the
            // in-between state of a load or unload that is taking long.
            () = sleep_until(settle_at) => may_hold = true,
            // What the ring thread applied (see shared.rs).
            () = shared.ready() => {
                may_hold = true;
                busy = shared.take_queued(&mut taken, TURN_MAX);
                for t in taken.drain(..) {
                    d.finish(t, &running);
                }
                if let Some(reason) = shared.take_ring_failure() {
                    tracing::error!(%reason, "eBPF source stopped");
                    running = d.fall_back(&running, &opts).await?;
                }
            }
            msg = running.recv() => match msg {
                Some(msg) => {
                    may_hold = true;
                    // Take what else is waiting before publishing once, at
                    // most a batch: then publish and yield (below).
                    batch.push(msg);
                    busy = true;
                    for _ in 1..TURN_MAX {
                        let Some(msg) = running.try_recv() else {
                            busy = false;
                            break;
                        };
                        batch.push(msg);
                    }
                    d.handle_batch(&mut batch, &running);
                }
                None => running = d.fall_back(&running, &opts).await?,
            },
        }
        if std::mem::take(&mut d.loss_due) {
            d.finish_queued(&running);
            d.reconcile_after_loss();
        }
        // A load or unload under way: its result follows within
        // microseconds, so publish (and build records) once it is in, and
        // meanwhile sleep, which lets the loading or unloading process run
        // to its result instead of waiting behind the publish.
        if d.settling(may_hold) {
            // Still bounded while held: the records past the cap go out,
            // and a full batch gives the other tasks the thread.
            if d.deferred_full() {
                d.flush_records();
            }
            if busy {
                tokio::task::yield_now().await;
            }
            continue;
        }
        d.publish(&running, &status_tx);
        stages::mark_received(Stage::Published);
        // Only now the forensic records of what was applied (actor
        // enrichment, building, the hand-off), and only if no event is
        // waiting: the yield lets a reader task queue what it holds (the
        // ring thread queues on its own), and an event waiting is handled
        // and published first.
        if d.deferred_waiting() {
            tokio::task::yield_now().await;
            if (running.is_empty() && shared.nothing_queued()) || d.deferred_full() {
                d.flush_records();
            }
        }
        if !d.deferred_waiting() && shared.nothing_queued() {
            stages::close();
        }
        // Let the HTTP server, the pushers and the signals run between
        // batches, however fast the source refills.
        if busy {
            tokio::task::yield_now().await;
        }
    };
    // Stops the ring thread (see ring.rs).
    drop(d.ring.take());
    // What the ring thread applied before it stopped is still recorded.
    for t in shared.catch_up(0) {
        d.finish(t, &running);
    }
    stages::dump();
    d.flush_denied(&running);
    d.close_event_log(stop_reason);
    cancel.cancel();
    if let Some(r) = d.k8s.take() {
        r.stopped().await;
    }
    if let Some(p) = pusher
        && let Err(e) = p.await
    {
        tracing::warn!(error = %e, "alert pusher ended abnormally");
    }
    drop(running);
    if let Err(e) = server.await {
        tracing::warn!(error = %e, "HTTP server task ended abnormally");
    }
    tracing::info!("stopped");
    Ok(())
}

/// The client the Node condition and Events are written with: the cluster
/// watch's, or one of its own when `--longhorn off`; none with
/// `--k8s-report off` or outside a cluster.
async fn report_client(
    settings: &RunSettings,
    watch_client: Option<&kube::Client>,
) -> anyhow::Result<Option<kube::Client>> {
    if settings.k8s.mode == k8s::ReportMode::Off {
        tracing::info!("--k8s-report off: nothing is written to the API server");
        return Ok(None);
    }
    let client = match watch_client {
        Some(c) => Some(c.clone()),
        None if settings.common.cluster.mode == longhorn::LonghornMode::Off => {
            longhorn::connect(settings.common.cluster.kubeconfig.as_deref()).await?
        }
        None => None,
    };
    if client.is_none() {
        tracing::info!("--k8s-report auto: not in a cluster; nothing is written to the API server");
    }
    Ok(client)
}

/// The periodic reconcile's timer, first tick one interval from now.
fn reconcile_timer(every: Duration) -> tokio::time::Interval {
    let mut timer = tokio::time::interval_at(Instant::now() + every, every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer
}

/// Drops every capability (and switches user) now that the source is
/// attached, before any other thread exists: capabilities are per thread,
/// and the event log's writer and the HTTP client's pool come later.
fn drop_privileges(settings: &RunSettings) -> anyhow::Result<Privileges> {
    if settings.keep_privileges {
        tracing::warn!("--keep-privileges: running with every capability the process was given");
        return Ok(crate::privileges::current(false));
    }
    let p = crate::privileges::drop_all(settings.user.as_ref())
        .context("dropping privileges after attaching")?;
    tracing::info!(uid = p.uid, gid = p.gid, effective = ?p.effective, notes = ?p.notes, "privileges dropped");
    Ok(p)
}

fn log_snapshot(snapshot: &Snapshot) {
    for w in &snapshot.warnings {
        tracing::warn!(warning = %w, "snapshot");
    }
    if !snapshot.modules_supported {
        tracing::warn!(
            kernel = %snapshot.kernel_release,
            "this kernel has no loadable-module support (CONFIG_MODULES off): only built-in modules can satisfy a requirement"
        );
    }
}

impl Daemon {
    /// Opens the forensic log (if configured) and writes `monitor_start`
    /// and `snapshot`.
    fn open_event_log(&mut self, snapshot_ns: u64) -> anyhow::Result<()> {
        let Some(log_settings) = self.settings.event_log.clone() else {
            tracing::info!(
                "no forensic event log (--no-event-log, event_log = \"\", or not root and no --event-log)"
            );
            return Ok(());
        };
        let path = log_settings.path.clone();
        let log = EventLog::open(
            log_settings,
            forensic::read_boot_id(&self.settings.common.host),
            self.settings.common.node_name.clone(),
        )?;
        tracing::info!(path = %path.display(), "forensic event log open");
        self.log = Some(log);
        self.shared.lock().records = true;
        let config_path = self.settings.common.config_path.clone();
        let config_bytes = config_path.as_ref().and_then(|p| std::fs::read(p).ok());
        let core = self.shared.lock();
        let start = records::start(
            &core.tracker,
            &self.snapshot,
            &records::StartInfo {
                source: core.source.as_str(),
                pid: std::process::id(),
                config_file: config_path.map(|p| p.display().to_string()),
                config_bytes: config_bytes.as_deref(),
                now_ns: boot_ns_now(),
                snapshot_ns,
            },
        );
        drop(core);
        for r in start {
            self.append(r);
        }
        Ok(())
    }

    /// Writes `monitor_stop` and closes the log, waiting a bounded time for
    /// the writer.
    fn close_event_log(&mut self, reason: &str) {
        self.flush_records();
        if let Some(mut log) = self.log.take() {
            self.shared.lock().records = false;
            let mut r = Record::new(RecordKind::MonitorStop, boot_ns_now());
            r.reason = Some(reason.to_owned());
            log.append(r);
            let status = log.close(forensic::CLOSE_TIMEOUT);
            if status.pending > 0 {
                tracing::error!(
                    unwritten = status.pending,
                    "event log: records left unwritten at stop"
                );
            }
        }
    }

    /// Hands a record to the event log, if there is one (never blocks);
    /// behind the records waiting for the publish, if any, so the log
    /// keeps the order they were made in.
    fn append(&mut self, record: Record) {
        if self.log.is_none() {
            return;
        }
        if let Some(record) = self.deferred.record(record)
            && let Some(log) = &mut self.log
        {
            log.append(record);
        }
    }
}

impl Daemon {
    /// The source stopped: start the next one that works, say so, and
    /// correct the tracker from /proc/modules (what happened meanwhile
    /// went unseen).
    async fn fall_back(
        &mut self,
        dead: &RunningSource,
        opts: &SourceOptions,
    ) -> anyhow::Result<RunningSource> {
        drop(self.ring.take());
        let mut next = next_source(dead, opts).await?;
        self.shared.lock().source = next.kind;
        self.start_ring_thread(&mut next);
        self.reconcile_now(true);
        // The new source and the corrected state are news: never held.
        self.turn_decided = true;
        Ok(next)
    }

    /// Starts the ring thread if `running` reads the eBPF ring; a thread
    /// that cannot start is a dead source (the loop falls back).
    fn start_ring_thread(&mut self, running: &mut RunningSource) {
        if let Some(feed) = running.take_ring() {
            match ring::spawn(&self.shared, feed) {
                Ok(thread) => self.ring = Some(thread),
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "the ring thread could not start");
                    self.shared.ring_failed(format!("{e:#}"));
                }
            }
        }
    }

    /// Applies what the source had buffered when called, everything the
    /// ring thread queued before it, and what the ring holds: every event
    /// from before this moment is in the tracker when this returns.
    async fn catch_up(&mut self, running: &mut RunningSource) {
        running.sync().await;
        for _ in 0..source::SYNC_MAX {
            let Some(msg) = running.try_recv() else { break };
            self.handle(msg, running);
        }
        for t in self.shared.catch_up(source::SYNC_MAX) {
            self.finish(t, running);
        }
    }

    /// Finishes what the ring thread has applied so far: done before
    /// anything else that writes records, so the log keeps the order in
    /// which the tracker took things.
    fn finish_queued(&mut self, running: &RunningSource) {
        let mut taken = Vec::new();
        // Until nothing is queued, a few rounds at most: a flood that
        // refills the queue as fast is not waited out.
        for _ in 0..4 {
            self.shared.take_queued(&mut taken, usize::MAX);
            if taken.is_empty() {
                break;
            }
            for t in taken.drain(..) {
                self.finish(t, running);
            }
        }
    }

    /// The source in use, named in records.
    fn active(&self) -> ActiveKind {
        self.shared.lock().source
    }
}

/// The source to start after `dead` stopped: the next one that works.
async fn next_source(dead: &RunningSource, opts: &SourceOptions) -> anyhow::Result<RunningSource> {
    let reason = format!("{} source stopped unexpectedly", dead.kind);
    tracing::error!(%reason, "falling back to a slower source");
    let order = match dead.kind {
        ActiveKind::Ebpf => SourceKind::Auto,
        ActiveKind::Uevent | ActiveKind::Poll => SourceKind::Poll,
    };
    let mut next = source::start(order, opts)
        .await
        .map_err(|reasons| no_source_error(order, &reasons))?;
    if next.kind == dead.kind {
        next = source::start(SourceKind::Poll, opts)
            .await
            .map_err(|reasons| no_source_error(SourceKind::Poll, &reasons))?;
    }
    next.unavailable.insert(
        0,
        Unavailable {
            source: dead.kind,
            reason,
        },
    );
    Ok(next)
}

/// The cluster watch's next view; never without a watch (or once it ended).
async fn cluster_changed(rx: &mut Option<watch::Receiver<ClusterView>>) -> Option<ClusterView> {
    match rx {
        Some(r) => {
            if r.changed().await.is_err() {
                *rx = None;
                return None;
            }
            Some(r.borrow_and_update().clone())
        }
        None => std::future::pending().await,
    }
}

/// Resolves when the event log's status changes; never without a log.
async fn status_changed(rx: &mut Option<watch::Receiver<EventLogStatus>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                // The writer is gone; nothing more will change.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn no_source_error(wanted: SourceKind, reasons: &[Unavailable]) -> anyhow::Error {
    let list = reasons
        .iter()
        .map(|u| format!("{}: {}", u.source, u.reason))
        .collect::<Vec<_>>()
        .join("; ");
    anyhow::anyhow!("event source {wanted} could not start ({list})")
}

/// One line per group: met, or not and why.
fn log_group(g: &GroupReport) {
    let modules = g
        .modules
        .iter()
        .map(|m| format!("{}={}", m.name, m.state))
        .collect::<Vec<_>>()
        .join(" ");
    if g.met {
        tracing::info!(group = %g.name, %modules, "requirement met");
    } else {
        tracing::error!(group = %g.name, severity = %g.severity, %modules, "requirement NOT met");
    }
}

impl Daemon {
    /// Recomputes the tracked names from the current groups (after a
    /// SIGHUP) and hands them to the kernel's filter; returns them for a
    /// source started later.
    fn retrack(&mut self, running: &RunningSource) -> Vec<ModuleName> {
        let all = self
            .snapshot
            .modules_dir
            .as_deref()
            .map(host::read_modules_alias)
            .unwrap_or_default();
        let (tracked, aliases) = tracked_names(&self.settings.common.groups, &all);
        self.shared.lock().aliases = aliases;
        if let Some(outcome) = running.set_tracked(&tracked) {
            tracing::info!("{}", outcome.describe());
        }
        tracked
    }

    /// A loss (or an undecodable record) was reported: reconcile now, or,
    /// if the last such reconcile was less than
    /// [`LOSS_RECONCILE_SPACING`] ago, once when that time has passed.
    fn reconcile_after_loss(&mut self) {
        if self
            .loss_reconcile
            .request(Instant::now(), LOSS_RECONCILE_SPACING)
        {
            self.reconcile_now(true);
        }
    }
}

/// What `msg` was about, for the start-up drain.
const fn is_event(msg: &SourceMsg) -> Option<&crate::event::SourceEvent> {
    match msg {
        SourceMsg::Event(ev) => Some(ev),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        requirements::{GroupSettings, UserGroup},
        testing::{group, name},
    };

    #[test]
    fn tracked_names_are_every_possible_module_and_its_aliases() {
        let mut groups = GroupSettings::default();
        groups.user.push(UserGroup {
            spec: group(
                "nfs-client",
                crate::requirements::GroupMode::AllOf,
                &["nfs"],
            ),
            enabled: true,
        });
        let aliases: BTreeMap<ModuleName, ModuleName> = [
            ("fs_nfs4", "nfs"),
            ("nfs4", "nfs"),
            ("fs_xfs", "xfs"),
            ("dm_crypt", "dm_crypt"),
        ]
        .into_iter()
        .map(|(a, m)| (name(a), name(m)))
        .collect();
        let (names, relevant) = tracked_names(&groups, &aliases);
        let names: Vec<&str> = names.iter().map(ModuleName::as_str).collect();
        // V2's modules too, whatever its enablement; xfs's alias is not ours.
        assert_eq!(
            names,
            [
                "dm_crypt",
                "iscsi_tcp",
                "nfs",
                "nfsv4",
                "nvme_tcp",
                "uio_pci_generic",
                "vfio_pci",
                "fs_nfs4",
                "nfs4"
            ]
        );
        assert_eq!(relevant.len(), 2);
        assert_eq!(relevant.get(&name("fs_nfs4")), Some(&name("nfs")));
    }
}
