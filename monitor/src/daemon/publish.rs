//! Fan-out after every change: the /status document, the metrics, the
//! set of alerts the pusher should hold firing and what the Kubernetes
//! writer should show on the Node. Everything here reads the
//! daemon's state; nothing changes it.
use std::sync::Arc;

use tokio::sync::watch;

use super::Daemon;
use crate::{
    alerting::{self, AlertInputs, WantedSet},
    forensic::EventLog,
    k8s,
    source::RunningSource,
    stages::{self, Stage},
    status::{KernelFiltered, SourceStatus, Status},
};

impl Daemon {
    /// Publishes the new state to /status, the metrics and the alert pusher.
    pub(super) fn publish(&self, running: &RunningSource, status_tx: &watch::Sender<Arc<Status>>) {
        let status = self.status(running);
        stages::mark_received(Stage::StatusBuilt);
        self.metrics
            .set_enabled(status.v2.enablement.iter().map(|(name, d)| (*name, d)));
        self.metrics.set_cluster_readable(self.v2.readable());
        let version = &status.v2.longhorn_version;
        self.metrics
            .set_longhorn_version(&version.version, &version.table_row, version.source);
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
        if let Some(f) = &status.events.kernel_filtered {
            self.metrics
                .set_kernel_filtered(f.requests_untracked, f.unload_denied_over_limit);
        }
        if let Some(l) = &status.events.kernel_lost {
            self.metrics.set_kernel_lost([
                l.ring_reserve_failed,
                l.name_unreadable,
                l.layout_unset,
            ]);
        }
        if let Some(log) = &status.event_log {
            self.metrics.set_event_log(log.degraded, log.write_errors);
            self.metrics.set_event_log_dropped(log.dropped);
        }
        stages::mark_received(Stage::GaugesSet);
        let alerts = alerting::wanted_alerts(&AlertInputs {
            instance: &self.settings.common.node_name,
            runbook_url: &self.settings.runbook_url,
            groups: &status.groups,
            snapshot: &self.snapshot,
            persistence: &self.boot.persistence,
            host: &self.settings.common.host,
            source: &status.source,
            modules_supported: status.modules_supported,
            lost_recently: self.lost_at.is_some(),
            lost_total: status.events.lost,
            boot_epoch: self.boot_epoch,
            cluster_unreadable: self.v2.unreadable_alert(),
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
        stages::mark_received(Stage::AlertsComputed);
        if let Some(reporter) = &self.k8s {
            reporter.update(&k8s::Inputs {
                groups: &status.groups,
                enablement: &status.v2.enablement,
                remedies: &status.remedies,
                host: &self.settings.common.host,
                source: running.kind,
            });
        }
        status_tx.send_replace(Arc::new(status));
    }

    /// The /status document for the state now.
    pub(super) fn status(&self, running: &RunningSource) -> Status {
        let mut events = self.counts.clone();
        events.lost = events.lost.max(running.lost());
        events.kernel_filtered = running.noise().map(|n| KernelFiltered {
            requests_untracked: n.requests_untracked(),
            unload_denied_over_limit: n.denied_suppressed(),
        });
        events.kernel_lost = running.kernel_loss().map(|l| crate::status::KernelLost {
            ring_reserve_failed: l.ring_reserve_failed(),
            name_unreadable: l.name_unreadable(),
            layout_unset: l.layout_unset(),
        });
        // Module groups, then the checks that have a verdict.
        let (modules, modules_supported) = {
            let core = self.shared.lock();
            (core.tracker.report(), core.tracker.modules_supported())
        };
        let groups: Vec<_> = modules
            .into_iter()
            .chain(self.checks.iter().filter_map(|c| c.report()))
            .collect();
        let remedies = crate::remedy::remedies(
            &groups,
            &self.boot.persistence,
            &self.snapshot,
            &self.settings.common.host,
        );
        Status {
            version: env!("CARGO_PKG_VERSION"),
            kernel_release: self.snapshot.kernel_release.clone(),
            modules_supported,
            host_root: self.settings.common.host.root().to_path_buf(),
            source: SourceStatus {
                active: running.kind,
                unavailable: running.unavailable.clone(),
                details: running.details.clone(),
            },
            events,
            drift_total: self.reconciler.drift_total,
            reconciles: self.reconciler.reconciles,
            warnings: self.warnings.clone(),
            groups,
            persistence: self.boot.persistence.clone(),
            remedies,
            other_kernels: self.boot.other_kernels.clone(),
            event_log: self.log.as_ref().map(EventLog::status),
            privileges: self.privileges.clone(),
            v2: self.v2.status(),
        }
    }
}
