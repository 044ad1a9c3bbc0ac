//! `kmod-monitor run`: attach the source, take the snapshot, apply what
//! arrived in between, then follow events; reconcile periodically and on
//! loss; reload the config on SIGHUP; stop cleanly on SIGTERM/SIGINT. Every
//! step that changes what is known about the node's modules also goes to the
//! forensic event log ([`crate::forensic`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    alerting::{self, AlertInputs, AlertSettings, LOST_ALERT_FOR, WantedSet},
    config::{self, FileConfig, SourceKind},
    event::{Kind, Raw, SourceEvent, boot_ns_now, taint_letters},
    forensic::{
        self, EventLog, EventLogSettings, EventLogStatus, Record, RecordKind, actor,
        chain::{canonical, sha256_hex},
        record::{
            ConfigInfo, EnablementInfo, ModuleInfo, ModuleStateInfo, MonitorInfo,
            RequirementEffect, RequirementFlip, StateChange,
        },
    },
    host::{self, HostRoot, InitState, Snapshot},
    http,
    longhorn::{
        self, ClusterSettings, ClusterView, LocalInputs,
        v2::{Flip, HUGEPAGES_REQUIREMENT, V2State},
        watch::WatchTarget,
    },
    metrics::Metrics,
    names::ModuleName,
    requirements::{self, GroupSpec},
    source::{self, ActiveKind, RunningSource, SourceMsg, SourceOptions, Unavailable},
    status::{EventCounts, SourceStatus, Status},
    tracker::{GroupChange, GroupReport, Outcome, Tracker},
};

/// Everything `run` needs, validated: CLI flags over the config file over
/// defaults.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub config_path: Option<PathBuf>,
    /// Every group the config enables, the V2 group included whatever V2's
    /// enablement: the daemon tracks it only while V2 is on.
    pub groups: Vec<GroupSpec>,
    /// The V2 inputs that are not the cluster's (flag, file, hugepages).
    pub v2_local: LocalInputs,
    /// `--v2-hugepages-2mi` (kept for reloads: it wins over the file).
    pub hugepages_flag: Option<u64>,
    /// The cluster watch.
    pub cluster: ClusterSettings,
    pub listen: SocketAddr,
    pub source: SourceKind,
    pub host: HostRoot,
    pub reconcile_interval: Duration,
    pub poll_interval: Duration,
    pub ring_buffer_bytes: u32,
    /// Alertmanager base URLs; empty = no push.
    pub alertmanager: Vec<reqwest::Url>,
    pub alert_resend_interval: Duration,
    /// The alerts' `instance` label, and the event log's `host`.
    pub node_name: String,
    pub runbook_url: String,
    /// `--user`: who to become after attaching.
    pub user: Option<crate::privileges::User>,
    /// `--keep-privileges`: skip the drop.
    pub keep_privileges: bool,
    /// The forensic event log; `None` = no log.
    pub event_log: Option<EventLogSettings>,
}

/// How long the periodic reconcile waits before its second look at a
/// difference (see `Daemon::reconcile_periodic`).
const DRIFT_CONFIRM_AFTER: Duration = Duration::from_millis(500);

/// A difference the periodic reconcile found, to look at again.
struct DriftCheck {
    at: Instant,
    suspects: BTreeSet<ModuleName>,
    /// CLOCK_BOOTTIME when the first read started.
    started: u64,
}

/// How long a module may stay `loading` before /sys/module/<m>/initstate
/// is consulted (kernels without syscall tracepoints, uevent source).
const CONFIRM_AFTER: Duration = Duration::from_millis(500);
/// Longest wait between initstate checks of a slow init.
const CONFIRM_MAX: Duration = Duration::from_secs(5);

/// Runs until SIGTERM/SIGINT.
///
/// # Errors
/// When no source can start (or the requested one cannot), the snapshot
/// cannot be taken, or the listener cannot bind.
pub async fn run(settings: RunSettings) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let opts = SourceOptions {
        host: settings.host.clone(),
        ring_buffer_bytes: settings.ring_buffer_bytes,
        poll_interval: settings.poll_interval,
    };
    // 1. Attach first, so nothing that happens during the snapshot is missed.
    let mut running = source::start(settings.source, &opts)
        .await
        .map_err(|reasons| no_source_error(settings.source, &reasons))?;
    for u in &running.unavailable {
        tracing::warn!(source = %u.source, reason = %u.reason, "event source unavailable");
    }
    tracing::info!(source = %running.kind, details = ?running.details, "event source active");
    // Attached: drop what is no longer needed before any other thread (the
    // event log's writer, the HTTP client's pool) exists, since
    // capabilities are per thread.
    let privileges = if settings.keep_privileges {
        tracing::warn!("--keep-privileges: running with every capability the process was given");
        crate::privileges::current(false)
    } else {
        let p = crate::privileges::drop_all(settings.user.as_ref())
            .context("dropping privileges after attaching")?;
        tracing::info!(uid = p.uid, gid = p.gid, effective = ?p.effective, notes = ?p.notes, "privileges dropped");
        p
    };
    // The cluster watch (no capability needed; the token is a file).
    let client = longhorn::client(&settings.cluster).await?;
    // 2. Snapshot, bracketed by boot-clock readings.
    let snap_start = boot_ns_now();
    let snapshot: Snapshot =
        host::take_snapshot(&settings.host).context("taking the start-up snapshot")?;
    let snap_end = boot_ns_now();
    for w in &snapshot.warnings {
        tracing::warn!(warning = %w, "snapshot");
    }
    if !snapshot.modules_supported {
        tracing::warn!(
            kernel = %snapshot.kernel_release,
            "this kernel has no loadable-module support (CONFIG_MODULES off): only built-in modules can satisfy a requirement"
        );
    }
    let v2 = V2State::new(
        settings.v2_local,
        match (&client, settings.cluster.mode) {
            (Some(_), _) => Ok(()),
            (None, longhorn::LonghornMode::Off) => Err("--longhorn off".to_owned()),
            (None, longhorn::LonghornMode::Auto) => {
                Err("not in a cluster: no service account and no kubeconfig".to_owned())
            }
        },
        settings.cluster.namespace.clone(),
        settings.node_name.clone(),
        settings.cluster.grace,
        &settings.host,
        &snapshot.kernel_release,
    );
    let mut cluster_rx = client.map(|c| {
        longhorn::watch::spawn(
            c,
            &WatchTarget {
                namespace: settings.cluster.namespace.clone(),
                node: settings.node_name.clone(),
            },
            cancel.clone(),
        )
    });
    let mut tracker = Tracker::new(&snapshot, v2.groups(&settings.groups));
    let metrics = Arc::new(Metrics::new(&snapshot.kernel_release));
    let (wanted_tx, wanted_rx) = watch::channel(Arc::new(WantedSet::default()));
    let mut d = Daemon {
        counts: EventCounts::default(),
        drift_total: 0,
        reconciles: 0,
        kernel_release: snapshot.kernel_release.clone(),
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
        active: running.kind,
        boot: crate::remedy::BootFacts::default(),
        privileges,
        drift_check: None,
        v2,
    };
    d.boot = crate::remedy::boot_facts(&d.settings.host, &d.snapshot, tracker.groups());
    for w in &d.boot.warnings {
        tracing::warn!(warning = %w, "boot-time module configuration");
    }
    // The event log starts with who we are and what the snapshot saw,
    // before any event is applied.
    if d.settings.event_log.is_none() {
        tracing::info!(
            "no forensic event log (--no-event-log, event_log = \"\", or not root and no --event-log)"
        );
    }
    if let Some(log_settings) = d.settings.event_log.clone() {
        let path = log_settings.path.clone();
        let log = EventLog::open(
            log_settings,
            forensic::read_boot_id(&d.settings.host),
            d.settings.node_name.clone(),
        )?;
        tracing::info!(path = %path.display(), "forensic event log open");
        d.log = Some(log);
        d.log_start(&tracker, snap_end);
    }
    // 3. Apply what the source buffered meanwhile.
    let mut in_window = false;
    while let Ok(msg) = running.rx.try_recv() {
        if let SourceMsg::Event(ev) = &msg {
            if ev.boot_ns < snap_start {
                let kind = tracker.record_historical(ev);
                d.count(kind);
                if let Some(kind) = kind {
                    d.log_historical(&tracker, ev, kind);
                }
                continue;
            }
            in_window |= ev.boot_ns <= snap_end;
        }
        d.handle(&mut tracker, msg);
    }
    if in_window {
        // An event raced the snapshot read: settle against a fresh read.
        d.reconcile(&mut tracker, false);
    }
    for g in tracker.report() {
        log_group(&g);
    }
    let (status_tx, status_rx) = watch::channel(Arc::new(d.status(&tracker, &running)));
    d.publish(&tracker, &running, &status_tx);
    let pusher = (!d.settings.alertmanager.is_empty()).then(|| {
        tracing::info!(alertmanager = ?d.settings.alertmanager.iter().map(reqwest::Url::as_str).collect::<Vec<_>>(), "pushing alerts");
        alerting::spawn(
            AlertSettings {
                urls: d.settings.alertmanager.clone(),
                resend_interval: d.settings.alert_resend_interval,
            },
            wanted_rx,
            Arc::clone(&metrics),
            cancel.clone(),
        )
    });
    let server = http::serve(
        d.settings.listen,
        status_rx,
        Arc::clone(&metrics),
        cancel.clone(),
    )
    .await
    .with_context(|| format!("listening on {}", d.settings.listen))?;
    tracing::info!(listen = %d.settings.listen, "serving /status and /healthz");

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut reconcile = tokio::time::interval_at(
        Instant::now() + d.settings.reconcile_interval,
        d.settings.reconcile_interval,
    );
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut log_status = d.log.as_ref().map(EventLog::subscribe);
    let stop_reason = loop {
        d.schedule_confirm(&tracker);
        let confirm_at = d.confirm.map(|(at, _)| at);
        let lost_alert_ends = d.lost_at.map(|at| at + LOST_ALERT_FOR);
        let drift_at = d.drift_check.as_ref().map(|c| c.at);
        let grace_at = d.v2.grace_ends().map(Instant::from_std);
        tokio::select! {
            () = sleep_until(lost_alert_ends) => d.lost_at = None,
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break "SIGTERM"; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break "SIGINT"; }
            _ = sighup.recv() => d.reload(&mut tracker),
            // The writer's state changed (degraded, written): republish.
            () = status_changed(&mut log_status) => {}
            () = sleep_until(confirm_at) => d.confirm_loading(&mut tracker),
            _ = reconcile.tick() => d.reconcile_periodic(&tracker),
            () = sleep_until(drift_at) => d.confirm_drift(&mut tracker),
            Some(view) = cluster_changed(&mut cluster_rx) => d.on_view(&mut tracker, view),
            // The unreadable-cluster alert is due: republish.
            () = sleep_until(grace_at) => {}
            msg = running.rx.recv() => match msg {
                Some(msg) => {
                    d.handle(&mut tracker, msg);
                    // Take what else is queued before publishing once.
                    while let Ok(msg) = running.rx.try_recv() {
                        d.handle(&mut tracker, msg);
                    }
                }
                None => {
                    running = d.fall_back(&running, &opts).await?;
                    d.active = running.kind;
                    d.reconcile(&mut tracker, true);
                }
            },
        }
        d.publish(&tracker, &running, &status_tx);
    };
    if let Some(mut log) = d.log.take() {
        let mut r = Record::new(RecordKind::MonitorStop, boot_ns_now());
        r.reason = Some(stop_reason.to_owned());
        log.append(r);
        let status = log.close(forensic::CLOSE_TIMEOUT);
        if status.pending > 0 {
            tracing::error!(
                unwritten = status.pending,
                "event log: records left unwritten at stop"
            );
        }
    }
    cancel.cancel();
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

struct Daemon {
    settings: RunSettings,
    /// A pending second look of the periodic reconcile.
    drift_check: Option<DriftCheck>,
    privileges: crate::privileges::Privileges,
    /// Persistence across reboots and other kernels; refreshed on reconcile.
    boot: crate::remedy::BootFacts,
    counts: EventCounts,
    drift_total: u64,
    reconciles: u64,
    kernel_release: String,
    warnings: Vec<String>,
    /// Next initstate check and the back-off that led to it.
    confirm: Option<(Instant, Duration)>,
    /// The start-up snapshot: kernel config and module files for remedies.
    snapshot: Snapshot,
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
    /// The source in use (named in event records).
    active: ActiveKind,
    /// V2 enablement, the cluster view, hugepages.
    v2: V2State,
}

impl Daemon {
    fn count(&mut self, kind: Option<Kind>) {
        self.counts.received += 1;
        if let Some(kind) = kind {
            *self.counts.by_kind.entry(kind.as_str()).or_default() += 1;
        }
    }

    fn handle(&mut self, tracker: &mut Tracker, msg: SourceMsg) {
        match msg {
            SourceMsg::Event(ev) => {
                let outcome = tracker.apply(&ev);
                let latency_ns = boot_ns_now().saturating_sub(ev.boot_ns);
                #[expect(
                    clippy::cast_precision_loss,
                    reason = "a latency in seconds for a histogram"
                )]
                let latency = latency_ns as f64 / 1e9;
                self.metrics.on_event(&outcome, Some(latency));
                self.count(outcome.kind);
                self.trigger_boot_ns = Some(ev.boot_ns);
                log_outcome(&outcome, &ev);
                self.log_outcome(tracker, &ev, &outcome, self.active.as_str());
            }
            SourceMsg::AliasRequest { alias } => {
                self.count(Some(Kind::Request));
                self.metrics.on_alias_request();
                tracing::debug!(%alias, "module_request for an alias");
            }
            SourceMsg::Lost { total } => {
                let mut r = Record::new(RecordKind::EventsLost, boot_ns_now());
                r.lost_total = Some(total);
                r.source = Some(self.active.as_str().to_owned());
                self.append(r);
                self.counts.lost = total;
                self.metrics.set_lost_total(total);
                self.lost_at = Some(Instant::now());
                tracing::error!(
                    lost_total = total,
                    "module events were lost; reconciling now"
                );
                self.reconcile(tracker, true);
            }
            SourceMsg::Undecodable { reason } => {
                let mut r = Record::new(RecordKind::EventsLost, boot_ns_now());
                r.reason = Some(format!("undecodable event: {reason}"));
                r.source = Some(self.active.as_str().to_owned());
                self.append(r);
                self.counts.undecodable += 1;
                self.metrics.add_lost(1);
                self.lost_at = Some(Instant::now());
                tracing::error!(%reason, "undecodable event from the kernel; reconciling now");
                self.reconcile(tracker, true);
            }
        }
    }

    /// Reads /proc/modules for a reconcile.
    fn read_loaded(&self) -> Option<BTreeMap<ModuleName, host::LoadedModule>> {
        match host::read_loaded(&self.settings.host) {
            Ok(Some(l)) => Some(l),
            Ok(None) => Some(BTreeMap::new()),
            Err(e) => {
                tracing::error!(error = %e, "reconcile: reading /proc/modules failed");
                None
            }
        }
    }

    /// The periodic reconcile, first look: notes the modules whose tracked
    /// state differs from /proc/modules and looks again after
    /// [`DRIFT_CONFIRM_AFTER`]. An event that had already happened but was
    /// still queued (ring buffer, channel) is applied in between and counted
    /// as what it is, instead of being overwritten as drift.
    fn reconcile_periodic(&mut self, tracker: &Tracker) {
        // modules-load.d and friends change without events; they are a few
        // small files, so re-read them with every reconcile.
        self.boot =
            crate::remedy::boot_facts(&self.settings.host, &self.snapshot, tracker.groups());
        self.refresh_hugepages();
        if self.drift_check.is_some() {
            return;
        }
        let started = boot_ns_now();
        let Some(loaded) = self.read_loaded() else {
            return;
        };
        self.reconciles += 1;
        let suspects = tracker.disagreements(&loaded);
        if !suspects.is_empty() {
            tracing::debug!(modules = ?suspects, "reconcile: differences; looking again before calling it drift");
            self.drift_check = Some(DriftCheck {
                at: Instant::now() + DRIFT_CONFIRM_AFTER,
                suspects,
                started,
            });
        }
    }

    /// The periodic reconcile, second look: what still differs, with no
    /// event for it in between, is drift.
    fn confirm_drift(&mut self, tracker: &mut Tracker) {
        let Some(check) = self.drift_check.take() else {
            return;
        };
        let Some(loaded) = self.read_loaded() else {
            return;
        };
        let still: BTreeSet<ModuleName> = tracker
            .disagreements(&loaded)
            .intersection(&check.suspects)
            .cloned()
            .collect();
        let outcomes =
            tracker.reconcile_only(&loaded, Some(&still), check.started, boot_ns_now(), true);
        self.record_corrections(tracker, outcomes, true);
    }

    /// Re-reads /proc/modules and corrects the tracker at once (after a
    /// loss, a source failure, or to settle the start-up snapshot).
    fn reconcile(&mut self, tracker: &mut Tracker, count_as_drift: bool) {
        self.boot =
            crate::remedy::boot_facts(&self.settings.host, &self.snapshot, tracker.groups());
        let started = boot_ns_now();
        let Some(loaded) = self.read_loaded() else {
            return;
        };
        self.reconciles += 1;
        let outcomes = tracker.reconcile(&loaded, started, boot_ns_now(), count_as_drift);
        self.record_corrections(tracker, outcomes, count_as_drift);
    }

    /// Counts, logs and records the corrections a reconcile made.
    fn record_corrections(
        &mut self,
        tracker: &Tracker,
        outcomes: Vec<Outcome>,
        count_as_drift: bool,
    ) {
        for o in outcomes {
            if count_as_drift {
                self.drift_total += 1;
                self.metrics.inc_drift();
                tracing::warn!(module = %o.module, tracked = %o.from, actual = %o.to, "drift: tracked state corrected from /proc/modules");
                let mut r = Record::new(RecordKind::Drift, boot_ns_now());
                r.module = Some(module_info(&o.module, None));
                r.source = Some("reconcile".to_owned());
                r.state = Some(StateChange {
                    from: o.from.to_string(),
                    to: o.to.to_string(),
                });
                r.requirements = effects(tracker, &o.module, &o.group_changes);
                self.append(r);
            }
            log_group_changes(&o);
            // A silent correction right after start-up settles the snapshot.
            let cause = if count_as_drift {
                RecordKind::Drift
            } else {
                RecordKind::Snapshot
            };
            self.log_group_changes(Some(&o.module), &o.group_changes, cause, boot_ns_now());
        }
    }

    /// Arms the initstate check while some module is `loading`.
    fn schedule_confirm(&mut self, tracker: &Tracker) {
        if tracker.loading().next().is_none() {
            self.confirm = None;
        } else if self.confirm.is_none() {
            self.confirm = Some((Instant::now() + CONFIRM_AFTER, CONFIRM_AFTER));
        }
    }

    /// Asks /sys/module/<m>/initstate about modules still `loading`.
    fn confirm_loading(&mut self, tracker: &mut Tracker) {
        let loading: Vec<_> = tracker.loading().cloned().collect();
        let mut still = false;
        for name in loading {
            let raw = match host::read_initstate(&self.settings.host, &name) {
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
            let outcome = tracker.apply(&ev);
            self.count(outcome.kind);
            log_outcome(&outcome, &ev);
            self.log_outcome(tracker, &ev, &outcome, "initstate");
        }
        self.confirm = still.then(|| {
            let back_off = self
                .confirm
                .map_or(CONFIRM_AFTER, |(_, d)| (d * 2).min(CONFIRM_MAX));
            (Instant::now() + back_off, back_off)
        });
    }

    /// SIGHUP: re-read the config; keep the old one if the new one is bad.
    fn reload(&mut self, tracker: &mut Tracker) {
        let Some(path) = self.settings.config_path.clone() else {
            tracing::info!("SIGHUP: no --config file; nothing to reload");
            return;
        };
        let digest = std::fs::read(&path).ok().map(|b| sha256_hex(&b));
        let mut record = Record::new(RecordKind::ConfigReload, boot_ns_now());
        let file: FileConfig = match config::load_config(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: new config rejected; keeping the current one");
                record.config = Some(ConfigInfo {
                    file: path.display().to_string(),
                    digest,
                    accepted: false,
                    error: Some(e.to_string()),
                    groups: group_names(tracker),
                });
                self.append(record);
                return;
            }
        };
        let groups = requirements::resolve(&file.groups, true);
        self.settings.v2_local = LocalInputs::resolve(
            self.settings.v2_local.flag,
            self.settings.hugepages_flag,
            Some(&file),
        );
        self.v2.local = self.settings.v2_local;
        let flips = self.v2.decide();
        self.log_flips(&flips);
        let changes = tracker.set_groups(self.v2.groups(&groups));
        self.boot =
            crate::remedy::boot_facts(&self.settings.host, &self.snapshot, tracker.groups());
        self.settings.groups = groups;
        self.refresh_hugepages();
        tracing::info!(path = %path.display(), groups = ?tracker.groups().iter().map(|g| &g.name).collect::<Vec<_>>(), "SIGHUP: config reloaded");
        for c in &changes {
            tracing::info!(group = %c.group, met = c.met, "requirement after reload");
        }
        record.config = Some(ConfigInfo {
            file: path.display().to_string(),
            digest,
            accepted: true,
            error: None,
            groups: group_names(tracker),
        });
        record.requirements = tracker
            .report()
            .into_iter()
            .map(|g| RequirementEffect {
                changed: changes.iter().any(|c| c.group == g.name),
                name: g.name,
                met: g.met,
            })
            .collect();
        self.append(record);
        self.log_group_changes(None, &changes, RecordKind::ConfigReload, boot_ns_now());
        for g in tracker.report() {
            log_group(&g);
        }
    }

    /// The source stopped: start the next one that works and say so.
    async fn fall_back(
        &mut self,
        dead: &RunningSource,
        opts: &SourceOptions,
    ) -> anyhow::Result<RunningSource> {
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

    /// Publishes the new state to /status, the metrics and the alert pusher.
    fn publish(
        &mut self,
        tracker: &Tracker,
        running: &RunningSource,
        status_tx: &watch::Sender<Arc<Status>>,
    ) {
        let mut status = self.status(tracker, running);
        let severity = requirements::v2_severity(&self.settings.groups);
        if let Some(g) = self.v2.hugepages_group(severity) {
            // Right after the V2 group it belongs with.
            let at = status
                .groups
                .iter()
                .position(|g| g.name == requirements::V2_GROUP)
                .map_or(status.groups.len(), |i| i + 1);
            status.groups.insert(at, g);
        }
        self.metrics
            .set_enabled(status.v2.enablement.iter().map(|(name, d)| (*name, d)));
        self.metrics.set_cluster_readable(self.v2.readable());
        self.metrics
            .set_hugepages(self.v2.readiness.hugepages.pool.as_ref());
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.metrics.set_groups(&status.groups, now_unix);
        self.metrics.set_persistent(
            status
                .persistence
                .iter()
                .map(|(m, p)| (m.as_str(), p.persistent)),
        );
        self.metrics.set_source(running.kind);
        self.metrics.set_lost_total(running.lost());
        if let Some(log) = &status.event_log {
            self.metrics.set_event_log(log.degraded, log.write_errors);
        }
        let alerts = alerting::wanted_alerts(&AlertInputs {
            instance: &self.settings.node_name,
            runbook_url: &self.settings.runbook_url,
            groups: &status.groups,
            snapshot: &self.snapshot,
            source: &status.source,
            modules_supported: status.modules_supported,
            lost_recently: self.lost_at.is_some(),
            lost_total: status.events.lost,
            boot_epoch: self.boot_epoch,
            hugepages_short: self.v2.hugepages_short(),
            cluster_unreadable: self.v2.unreadable_alert(),
            hugepages_severity: severity,
        });
        let trigger = self.trigger_boot_ns;
        self.wanted_tx.send_if_modified(|w| {
            if w.alerts == alerts {
                return false;
            }
            *w = Arc::new(WantedSet {
                alerts,
                trigger_boot_ns: trigger,
            });
            true
        });
        status_tx.send_replace(Arc::new(status));
    }

    fn status(&self, tracker: &Tracker, running: &RunningSource) -> Status {
        let mut events = self.counts.clone();
        events.lost = events.lost.max(running.lost());
        Status {
            version: env!("CARGO_PKG_VERSION"),
            kernel_release: self.kernel_release.clone(),
            modules_supported: tracker.modules_supported(),
            host_root: self.settings.host.root().to_path_buf(),
            source: SourceStatus {
                active: running.kind,
                unavailable: running.unavailable.clone(),
                details: running.details.clone(),
            },
            events,
            drift_total: self.drift_total,
            reconciles: self.reconciles,
            warnings: self.warnings.clone(),
            groups: tracker.report(),
            persistence: self.boot.persistence.clone(),
            other_kernels: self.boot.other_kernels.clone(),
            event_log: self.log.as_ref().map(EventLog::status),
            privileges: self.privileges.clone(),
            v2: self.v2.status(),
        }
    }

    /// The cluster watch saw a change.
    fn on_view(&mut self, tracker: &mut Tracker, view: ClusterView) {
        tracing::debug!(?view, "longhorn: cluster view");
        let flips = self.v2.set_view(view);
        if flips.is_empty() {
            return;
        }
        self.log_flips(&flips);
        if flips
            .iter()
            .any(|f| f.requirement == requirements::V2_GROUP)
        {
            let changes = tracker.set_groups(self.v2.groups(&self.settings.groups));
            self.boot =
                crate::remedy::boot_facts(&self.settings.host, &self.snapshot, tracker.groups());
            self.log_group_changes(
                None,
                &changes,
                RecordKind::RequirementEnablement,
                boot_ns_now(),
            );
            for g in tracker.report() {
                log_group(&g);
            }
        }
        self.refresh_hugepages();
    }

    /// Logs and records enablement flips.
    fn log_flips(&mut self, flips: &[Flip]) {
        for f in flips {
            match f.now.enabled {
                Some(true) => {
                    tracing::warn!(requirement = f.requirement, source = f.now.source.as_str(), reason = %f.now.reason, "requirement now ENABLED")
                }
                Some(false) => {
                    tracing::info!(requirement = f.requirement, source = f.now.source.as_str(), reason = %f.now.reason, "requirement now disabled")
                }
                None => {
                    tracing::error!(requirement = f.requirement, reason = %f.now.reason, "requirement now UNKNOWN")
                }
            }
            let mut r = Record::new(RecordKind::RequirementEnablement, boot_ns_now());
            r.enablement = Some(EnablementInfo {
                requirement: f.requirement.to_owned(),
                was: f.was.enabled,
                enabled: f.now.enabled,
                source: f.now.source.as_str().to_owned(),
                reason: f.now.reason.clone(),
            });
            self.append(r);
        }
    }

    /// Re-reads the hugepage pool; records a verdict change.
    fn refresh_hugepages(&mut self) {
        if let Some((was, met)) = self.v2.refresh_hugepages(&self.settings.host) {
            let h = &self.v2.readiness.hugepages;
            let total = h.pool.map_or(0, |p| p.total);
            if met {
                tracing::info!(
                    total,
                    required = h.required,
                    "requirement met: 2 MiB hugepages"
                );
            } else {
                tracing::error!(
                    total,
                    required = h.required,
                    "requirement NOT met: 2 MiB hugepages"
                );
            }
            let mut r = Record::new(RecordKind::RequirementChange, boot_ns_now());
            r.requirement = Some(RequirementFlip {
                name: HUGEPAGES_REQUIREMENT.to_owned(),
                was,
                met,
            });
            r.reason = Some(format!("{total} of {} 2 MiB hugepages", h.required));
            self.append(r);
        }
    }

    /// Hands a record to the event log, if there is one (never blocks).
    fn append(&mut self, record: Record) {
        if let Some(log) = &mut self.log {
            log.append(record);
        }
    }

    /// `monitor_start` then `snapshot`: who we are and what start-up saw.
    fn log_start(&mut self, tracker: &Tracker, snap_ns: u64) {
        let (config_file, config_digest, config_digest_of) = config_digest(&self.settings);
        let mut start = Record::new(RecordKind::MonitorStart, boot_ns_now());
        start.monitor = Some(MonitorInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel_release: self.kernel_release.clone(),
            source: self.active.as_str().to_owned(),
            pid: std::process::id(),
            groups: group_names(tracker),
            config_file,
            config_digest,
            config_digest_of: config_digest_of.to_owned(),
        });
        self.append(start);
        let report = tracker.report();
        let mut snap = Record::new(RecordKind::Snapshot, snap_ns);
        for m in report.iter().flat_map(|g| &g.modules) {
            if snap.modules.iter().any(|s| s.name == m.name.as_str()) {
                continue;
            }
            snap.modules.push(ModuleStateInfo {
                name: m.name.to_string(),
                state: m.state.to_string(),
                taints: self.snapshot.loaded.get(&m.name).map(|l| l.taints.clone()),
            });
        }
        snap.requirements = report
            .into_iter()
            .map(|g| RequirementEffect {
                name: g.name,
                met: g.met,
                changed: false,
            })
            .collect();
        self.append(snap);
    }

    /// The record of one applied event (when it meant something), then one
    /// `requirement_change` per group it flipped.
    fn log_outcome(&mut self, tracker: &Tracker, ev: &SourceEvent, o: &Outcome, source: &str) {
        if self.log.is_none() {
            return;
        }
        let Some(kind) = o.kind else { return };
        let mut r = self.event_record(tracker, ev, kind, Some(o));
        source.clone_into(r.source.get_or_insert_default());
        self.append(r);
        self.log_group_changes(
            Some(&o.module),
            &o.group_changes,
            RecordKind::of_event(kind),
            ev.boot_ns,
        );
    }

    /// An event from before the snapshot: history only, no state change.
    fn log_historical(&mut self, tracker: &Tracker, ev: &SourceEvent, kind: Kind) {
        if self.log.is_none() {
            return;
        }
        let mut r = self.event_record(tracker, ev, kind, None);
        r.historical = true;
        r.source = Some(self.active.as_str().to_owned());
        self.append(r);
    }

    /// A module event's record: the module, the actor enriched from
    /// /proc/<tgid> (a few small procfs reads, done here on the event task
    /// so the process is still likely to exist), the state change and the
    /// groups it touches.
    fn event_record(
        &self,
        tracker: &Tracker,
        ev: &SourceEvent,
        kind: Kind,
        o: Option<&Outcome>,
    ) -> Record {
        let mut r = Record::new(RecordKind::of_event(kind), ev.boot_ns);
        // Only eBPF's module_load carries taints.
        let taints = (kind == Kind::Load && ev.actor.is_some()).then(|| taint_letters(ev.taints));
        r.module = Some(module_info(&ev.module, taints));
        r.actor = ev
            .actor
            .as_ref()
            .map(|a| actor::enrich(&self.settings.host, a));
        if let Some(o) = o {
            r.state = Some(StateChange {
                from: o.from.to_string(),
                to: o.to.to_string(),
            });
            r.requirements = effects(tracker, &o.module, &o.group_changes);
        }
        r
    }

    fn log_group_changes(
        &mut self,
        module: Option<&ModuleName>,
        changes: &[GroupChange],
        cause: RecordKind,
        boot_ns: u64,
    ) {
        for c in changes {
            let mut r = Record::new(RecordKind::RequirementChange, boot_ns);
            r.module = module.map(|m| module_info(m, None));
            r.requirement = Some(RequirementFlip {
                name: c.group.clone(),
                was: !c.met,
                met: c.met,
            });
            r.cause = Some(cause);
            self.append(r);
        }
    }
}

fn module_info(name: &ModuleName, taints: Option<String>) -> ModuleInfo {
    ModuleInfo {
        name: name.to_string(),
        taints,
    }
}

fn group_names(tracker: &Tracker) -> Vec<String> {
    tracker.groups().iter().map(|g| g.name.clone()).collect()
}

/// Each enabled group that holds `module`, with its verdict now and whether
/// `changes` flipped it.
fn effects(
    tracker: &Tracker,
    module: &ModuleName,
    changes: &[GroupChange],
) -> Vec<RequirementEffect> {
    if !tracker.is_required(module) {
        return Vec::new();
    }
    tracker
        .report()
        .into_iter()
        .filter(|g| g.modules.iter().any(|m| &m.name == module))
        .map(|g| RequirementEffect {
            changed: changes.iter().any(|c| c.group == g.name),
            name: g.name,
            met: g.met,
        })
        .collect()
}

/// The config file and the SHA-256 of its bytes; without a file (or when
/// it cannot be read now), the SHA-256 of the resolved groups' canonical
/// JSON.
fn config_digest(settings: &RunSettings) -> (Option<String>, String, &'static str) {
    let file = settings
        .config_path
        .as_ref()
        .map(|p| p.display().to_string());
    if let Some(bytes) = settings
        .config_path
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
    {
        return (file, sha256_hex(&bytes), "file");
    }
    let groups =
        serde_json::to_value(&settings.groups).map_or_else(|_| String::new(), |v| canonical(&v));
    (file, sha256_hex(groups.as_bytes()), "groups")
}

fn log_outcome(o: &Outcome, ev: &SourceEvent) {
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
    log_group_changes(o);
}

fn log_group_changes(o: &Outcome) {
    for c in &o.group_changes {
        if c.met {
            tracing::info!(group = %c.group, module = %o.module, "requirement met again");
        } else {
            tracing::error!(group = %c.group, module = %o.module, state = %o.to, "requirement NO LONGER met");
        }
    }
}
