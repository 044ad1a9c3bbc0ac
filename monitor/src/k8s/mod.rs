//! The verdict where Kubernetes looks: a condition on the daemon's own
//! Node, an Event on it for each requirement change, and, opt-in, one label
//! per requirement group.
//!
//! - [`report`] builds what the API should show from the daemon's state
//!   (pure).
//! - [`recorder`] aggregates repeated Events into series, with a bounded
//!   rate (pure).
//! - `writer` is the task that writes it: server-side apply of the
//!   condition on `nodes/status` and of the labels on the Node under the
//!   field manager [`FIELD_MANAGER`], Events through `events.k8s.io/v1`;
//!   retried with back-off and never on the event path.
//!
//! The daemon hands it its state after every change the way it feeds the
//! alert pusher: [`Reporter::update`] replaces the value of a watch
//! channel, and the writer takes the latest.
//!
//! No taints: a `NoExecute` taint on a node whose modules went missing
//! would evict the storage stack itself (longhorn-manager, the instance
//! managers serving the node's replicas and engines, the CSI plugin), and
//! with it the volumes' last healthy replica may go; a `NoSchedule` taint
//! would keep Longhorn's own DaemonSet pods from coming back after an
//! upgrade. Labels let workloads opt in to avoiding the node instead.
pub mod recorder;
pub mod report;
mod writer;

use std::{sync::Arc, time::Duration};

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use report::{CONDITION_TYPE, Inputs, LABEL_PREFIX, Report};
pub use writer::{CONDITION_SPACING, STARTUP_SETTLE};

use crate::metrics::Metrics;

/// The field manager of every write (server-side apply).
pub const FIELD_MANAGER: &str = "kmod-monitor";
/// The Events' `reportingController`.
pub const REPORTING_CONTROLLER: &str = "kmod-monitor.io/kmod-monitor";
/// Where Events about the (cluster-scoped) Node go, as client-go puts
/// them.
pub const EVENTS_NAMESPACE: &str = "default";

/// `--k8s-report`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportMode {
    /// Write the condition and Events when running in a cluster (the same
    /// client as the Longhorn watch: service account or kubeconfig).
    #[default]
    Auto,
    /// Write nothing.
    Off,
}

/// The reporting settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct K8sSettings {
    pub mode: ReportMode,
    /// Least time between heartbeat writes of the condition (plus up to
    /// 10 % jitter); also the refresh of a repeating Event's count.
    pub heartbeat: Duration,
    /// `--k8s-node-labels`: keep one label per requirement group.
    pub node_labels: bool,
}

/// The daemon's handle on the writer.
pub struct Reporter {
    tx: watch::Sender<Arc<Report>>,
    task: JoinHandle<()>,
}

impl Reporter {
    /// Starts the writer for Node `node`.
    #[must_use]
    pub fn spawn(
        client: kube::Client,
        settings: &K8sSettings,
        node: &str,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Self {
        tracing::info!(
            node,
            condition = CONDITION_TYPE,
            events_namespace = EVENTS_NAMESPACE,
            labels = settings.node_labels,
            heartbeat = ?settings.heartbeat,
            "k8s: reporting the verdict on this node's Node"
        );
        let (tx, rx) = watch::channel(Arc::new(Report::starting()));
        let task = tokio::spawn(writer::run(
            client,
            writer::Config {
                node: node.to_owned(),
                heartbeat: settings.heartbeat,
                labels: settings.node_labels,
            },
            rx,
            metrics,
            cancel,
        ));
        Self { tx, task }
    }

    /// Publishes the state now (never blocks: the writer takes the latest).
    pub fn update(&self, inputs: &Inputs<'_>) {
        let previous = Arc::clone(&self.tx.borrow());
        let next = report::build(inputs, &previous);
        if next != *previous {
            self.tx.send_replace(Arc::new(next));
        }
    }

    /// Waits for the writer to end (after the cancel).
    pub async fn stopped(self) {
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "k8s writer ended abnormally");
        }
    }
}
