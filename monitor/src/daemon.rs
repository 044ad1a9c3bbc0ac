//! `kmod-monitor run`: attach the source, take the snapshot, apply what
//! arrived in between, then follow events; reconcile periodically and on
//! loss; reload the config on SIGHUP; stop cleanly on SIGTERM/SIGINT.
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    alerting::{self, AlertInputs, AlertSettings, LOST_ALERT_FOR, WantedSet},
    config::{self, FileConfig, GroupSpec, SourceKind},
    event::{Kind, Raw, SourceEvent, boot_ns_now},
    host::{self, HostRoot, InitState, Snapshot},
    http,
    metrics::Metrics,
    source::{self, ActiveKind, RunningSource, SourceMsg, SourceOptions, Unavailable},
    tracker::{GroupReport, Outcome, Tracker},
};

/// Everything `run` needs, validated: CLI flags over the config file over
/// defaults.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub config_path: Option<PathBuf>,
    /// `--v2-data-engine` on the command line (kept for reloads).
    pub v2_flag: bool,
    pub groups: Vec<GroupSpec>,
    pub listen: SocketAddr,
    pub source: SourceKind,
    pub host: HostRoot,
    pub reconcile_interval: Duration,
    pub poll_interval: Duration,
    pub ring_buffer_bytes: u32,
    /// Alertmanager base URLs; empty = no push.
    pub alertmanager: Vec<reqwest::Url>,
    pub alert_resend_interval: Duration,
    /// The alerts' `instance` label.
    pub node_name: String,
    pub runbook_url: String,
}

/// How long a module may stay `loading` before /sys/module/<m>/initstate
/// is consulted (kernels without syscall tracepoints, uevent source).
const CONFIRM_AFTER: Duration = Duration::from_millis(500);
/// Longest wait between initstate checks of a slow init.
const CONFIRM_MAX: Duration = Duration::from_secs(5);

/// The event source as /status shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SourceStatus {
    pub active: ActiveKind,
    pub unavailable: Vec<Unavailable>,
    pub details: Vec<String>,
}

/// Event counters as /status shows them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EventCounts {
    pub received: u64,
    pub lost: u64,
    pub undecodable: u64,
    pub by_kind: BTreeMap<&'static str, u64>,
}

/// The daemon's state for /status, rebuilt after every change.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub kernel_release: String,
    pub modules_supported: bool,
    pub host_root: PathBuf,
    pub source: SourceStatus,
    pub events: EventCounts,
    pub drift_total: u64,
    pub reconciles: u64,
    pub warnings: Vec<String>,
    pub groups: Vec<GroupReport>,
}

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
    let mut tracker = Tracker::new(&snapshot, settings.groups.clone());
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
    };
    // 3. Apply what the source buffered meanwhile.
    let mut in_window = false;
    while let Ok(msg) = running.rx.try_recv() {
        if let SourceMsg::Event(ev) = &msg {
            if ev.boot_ns < snap_start {
                d.count(tracker.record_historical(ev));
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
    loop {
        d.schedule_confirm(&tracker);
        let confirm_at = d.confirm.map(|(at, _)| at);
        let lost_alert_ends = d.lost_at.map(|at| at + LOST_ALERT_FOR);
        tokio::select! {
            () = sleep_until(lost_alert_ends) => d.lost_at = None,
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => d.reload(&mut tracker),
            () = sleep_until(confirm_at) => d.confirm_loading(&mut tracker),
            _ = reconcile.tick() => d.reconcile(&mut tracker, true),
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
                    d.reconcile(&mut tracker, true);
                }
            },
        }
        d.publish(&tracker, &running, &status_tx);
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
            }
            SourceMsg::AliasRequest { alias } => {
                self.count(Some(Kind::Request));
                self.metrics.on_alias_request();
                tracing::debug!(%alias, "module_request for an alias");
            }
            SourceMsg::Lost { total } => {
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
                self.counts.undecodable += 1;
                self.metrics.add_lost(1);
                self.lost_at = Some(Instant::now());
                tracing::error!(%reason, "undecodable event from the kernel; reconciling now");
                self.reconcile(tracker, true);
            }
        }
    }

    /// Re-reads /proc/modules and corrects the tracker.
    fn reconcile(&mut self, tracker: &mut Tracker, count_as_drift: bool) {
        let started = boot_ns_now();
        let loaded = match host::read_loaded(&self.settings.host) {
            Ok(Some(l)) => l,
            Ok(None) => BTreeMap::new(),
            Err(e) => {
                tracing::error!(error = %e, "reconcile: reading /proc/modules failed");
                return;
            }
        };
        self.reconciles += 1;
        for o in tracker.reconcile(&loaded, started, boot_ns_now(), count_as_drift) {
            if count_as_drift {
                self.drift_total += 1;
                self.metrics.inc_drift();
                tracing::warn!(module = %o.module, tracked = %o.from, actual = %o.to, "drift: tracked state corrected from /proc/modules");
            }
            log_group_changes(&o);
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
        let file: FileConfig = match config::load_config(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: new config rejected; keeping the current one");
                return;
            }
        };
        let groups = config::resolve_groups(Some(&file), self.settings.v2_flag);
        let changes = tracker.set_groups(groups.clone());
        self.settings.groups = groups;
        tracing::info!(path = %path.display(), groups = ?tracker.groups().iter().map(|g| &g.name).collect::<Vec<_>>(), "SIGHUP: config reloaded");
        for c in changes {
            tracing::info!(group = %c.group, met = c.met, "requirement after reload");
        }
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
        let status = self.status(tracker, running);
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.metrics.set_groups(&status.groups, now_unix);
        self.metrics.set_source(running.kind);
        self.metrics.set_lost_total(running.lost());
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
        }
    }
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
