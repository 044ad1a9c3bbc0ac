//! The daemon's Longhorn state: the V2 decisions, the cluster view, the
//! Longhorn version in force, the host facts the checks need, and what
//! each update changed (for the log, the metrics and the alerts).
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{
    ClusterView, Decision, Fact, LocalInputs, decide_hugepages, decide_v2,
    readiness::{self, CheckInputs, Readiness, Verdict},
};
use crate::{
    host::HostRoot,
    requirements::{GroupSettings, LonghornVersion, V2_GROUP, table::NEWEST},
};

/// The requirement name of the hugepage pool (metrics, /status, alerts).
pub const HUGEPAGES_REQUIREMENT: &str = "v2-hugepages";

/// The cluster watch as /status shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    /// Whether the daemon watches the cluster.
    pub watching: bool,
    /// Why not, when not.
    pub off_reason: Option<String>,
    pub namespace: String,
    pub node: String,
    /// The latest view; null while not watching.
    pub view: Option<ClusterView>,
    /// Seconds the settings or the node have been unreadable.
    pub unreadable_for_secs: Option<u64>,
}

/// What /status says about V2.
#[derive(Clone, Debug, Serialize)]
pub struct V2Status {
    /// `v2-data-engine` and `v2-hugepages`: enabled, disabled or unknown,
    /// with the source and the reason.
    pub enablement: std::collections::BTreeMap<&'static str, Decision>,
    pub cluster: ClusterStatus,
    pub readiness: Readiness,
    /// The Longhorn version whose requirements are in force, and why.
    pub longhorn_version: VersionInForce,
    /// 2 MiB pages V2 needs, and which input said so.
    pub required_hugepages: u64,
    pub required_hugepages_source: String,
}

/// The Longhorn version the requirement table follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VersionInForce {
    /// `major.minor`.
    pub version: String,
    /// `flag`, `config`, `cluster` (the `current-longhorn-version`
    /// setting) or `default` (the newest the table knows).
    pub source: &'static str,
    /// The table row applied (a version between rows takes the one below).
    pub table_row: String,
}

/// One requirement's enablement changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flip {
    pub requirement: &'static str,
    pub was: Decision,
    pub now: Decision,
}

/// The V2 state.
#[derive(Debug)]
pub struct V2State {
    pub local: LocalInputs,
    /// `None` while the cluster is not watched.
    pub view: Option<ClusterView>,
    off_reason: Option<String>,
    namespace: String,
    node: String,
    pub v2: Decision,
    pub hugepages_on: Decision,
    pub readiness: Readiness,
    unreadable_since: Option<Instant>,
    pub grace: Duration,
}

impl V2State {
    /// Before the watch starts. `watching`: whether a watch will feed
    /// [`Self::set_view`] (else `off_reason` says why not).
    #[must_use]
    pub fn new(
        local: LocalInputs,
        watching: Result<(), String>,
        namespace: String,
        node: String,
        grace: Duration,
        host: &HostRoot,
        kernel_release: &str,
    ) -> Self {
        let view = watching.is_ok().then(ClusterView::starting);
        let v2 = decide_v2(local, view.as_ref());
        let hugepages_on = decide_hugepages(&v2, local, view.as_ref());
        Self {
            local,
            unreadable_since: view.as_ref().map(|_| Instant::now()),
            view,
            off_reason: watching.err(),
            namespace,
            node,
            v2,
            hugepages_on,
            readiness: readiness::read(host, kernel_release, local.hugepages_2mi),
            grace,
        }
    }

    /// The Longhorn version in force: the flag or config file, else the
    /// cluster's `current-longhorn-version`, else the newest known.
    #[must_use]
    pub fn version(&self) -> (LonghornVersion, &'static str) {
        if let Some((v, source)) = self.local.version {
            return (v, source);
        }
        if let Some(Fact::Value(text)) = self.view.as_ref().map(|v| &v.version) {
            match LonghornVersion::parse(text) {
                Ok(v) => return (v, "cluster"),
                Err(e) => tracing::debug!(error = %e, "longhorn: current-longhorn-version"),
            }
        }
        (NEWEST, "default")
    }

    /// 2 MiB pages V2 needs: the cluster's setting for the version in
    /// force (`data-engine-memory-size`, or `v2-data-engine-hugepage-limit`
    /// before 1.10; MiB / 2), else the flag, config file or default.
    #[must_use]
    pub fn required_pages(&self) -> (u64, String) {
        let (version, _) = self.version();
        let setting = version.table().v2_hugepage_setting.name;
        let from_cluster = self.view.as_ref().and_then(|v| {
            let fact = if setting == super::enablement::MEMORY_SIZE_SETTING {
                &v.memory_size_mib
            } else {
                &v.hugepage_limit_mib
            };
            match fact {
                Fact::Value(mib) => Some(*mib),
                _ => None,
            }
        });
        match from_cluster {
            Some(mib) if self.local.hugepages_2mi > 0 => (
                mib.div_ceil(2),
                format!("Longhorn setting {setting} = {mib} MiB"),
            ),
            _ => (
                self.local.hugepages_2mi,
                match self.local.hugepages_source {
                    super::Source::Flag => "--v2-hugepages-2mi".to_owned(),
                    super::Source::Config => "v2_hugepages_2mi in the config file".to_owned(),
                    _ => "the default, 2048 MiB".to_owned(),
                },
            ),
        }
    }

    /// Every check that applies now.
    #[must_use]
    pub fn checks(&self, settings: &GroupSettings, v2_severity: &str) -> Vec<Verdict> {
        let (version, version_source) = self.version();
        let (required_pages, pages_source) = self.required_pages();
        readiness::judge(&CheckInputs {
            version,
            version_source,
            v2: self.v2.enabled,
            hugepages_on: self.hugepages_on.enabled,
            required_pages,
            required_pages_source: &pages_source,
            kubelet_pages: self.view.as_ref().map(|v| &v.kubelet_hugepages),
            settings,
            v2_severity,
            readiness: &self.readiness,
        })
    }

    /// Re-reads the host facts (each reconcile, SIGHUP, cluster change).
    pub fn refresh_facts(&mut self, host: &HostRoot) {
        let required = self.required_pages().0;
        let release = self.readiness.kernel.release.clone();
        self.readiness = readiness::read(host, &release, required);
    }

    /// Re-decides after a new view (or new local inputs); returns the flips.
    pub fn decide(&mut self) -> Vec<Flip> {
        let v2 = decide_v2(self.local, self.view.as_ref());
        let hugepages_on = decide_hugepages(&v2, self.local, self.view.as_ref());
        let mut flips = Vec::new();
        if v2.enabled != self.v2.enabled {
            flips.push(Flip {
                requirement: V2_GROUP,
                was: self.v2.clone(),
                now: v2.clone(),
            });
        }
        if hugepages_on.enabled != self.hugepages_on.enabled {
            flips.push(Flip {
                requirement: HUGEPAGES_REQUIREMENT,
                was: self.hugepages_on.clone(),
                now: hugepages_on.clone(),
            });
        }
        self.v2 = v2;
        self.hugepages_on = hugepages_on;
        self.readiness.hugepages.required = self.required_pages().0;
        flips
    }

    /// Takes the watch's latest view.
    pub fn set_view(&mut self, view: ClusterView) -> Vec<Flip> {
        let unreadable = view.settings_unreadable().is_some() || view.node_unreadable().is_some();
        match (unreadable, self.unreadable_since) {
            (true, None) => self.unreadable_since = Some(Instant::now()),
            (false, _) => self.unreadable_since = None,
            (true, Some(_)) => {}
        }
        self.view = Some(view);
        self.decide()
    }

    /// Why the cluster is unreadable, once it has been for the grace period.
    #[must_use]
    pub fn unreadable_alert(&self) -> Option<String> {
        let since = self.unreadable_since?;
        if since.elapsed() < self.grace {
            return None;
        }
        let view = self.view.as_ref()?;
        let reasons: Vec<&str> = [view.settings_unreadable(), view.node_unreadable()]
            .into_iter()
            .flatten()
            .collect();
        Some(reasons.join("; "))
    }

    /// When the unreadable alert is due, if it is not yet.
    #[must_use]
    pub fn grace_ends(&self) -> Option<Instant> {
        // A grace too large for the clock never ends.
        let at = self.unreadable_since?.checked_add(self.grace)?;
        (at > Instant::now()).then_some(at)
    }

    /// `(settings, node)` readable; `None` while not watching.
    #[must_use]
    pub fn readable(&self) -> Option<(bool, bool)> {
        self.view.as_ref().map(|v| {
            (
                v.settings_unreadable().is_none(),
                v.node_unreadable().is_none(),
            )
        })
    }

    #[must_use]
    pub fn status(&self) -> V2Status {
        V2Status {
            enablement: [
                (V2_GROUP, self.v2.clone()),
                (HUGEPAGES_REQUIREMENT, self.hugepages_on.clone()),
            ]
            .into_iter()
            .collect(),
            cluster: ClusterStatus {
                watching: self.view.is_some(),
                off_reason: self.off_reason.clone(),
                namespace: self.namespace.clone(),
                node: self.node.clone(),
                view: self.view.clone(),
                unreadable_for_secs: self.unreadable_since.map(|t| t.elapsed().as_secs()),
            },
            readiness: self.readiness.clone(),
            longhorn_version: {
                let (v, source) = self.version();
                VersionInForce {
                    version: v.to_string(),
                    source,
                    table_row: v.table().version.to_string(),
                }
            },
            required_hugepages: self.required_pages().0,
            required_hugepages_source: self.required_pages().1,
        }
    }
}
