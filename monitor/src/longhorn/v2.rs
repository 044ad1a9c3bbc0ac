//! The daemon's V2 state: the current decisions, the cluster view and the
//! hugepage pool, and what each update changed (for the log, the metrics
//! and the alerts).
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{
    ClusterView, Decision, LocalInputs, decide_hugepages, decide_v2,
    readiness::{self, HugepagesCheck, Readiness},
};
use crate::{
    host::HostRoot,
    requirements::{GroupMode, GroupSpec, V2_GROUP},
    tracker::GroupReport,
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
        self.readiness.hugepages.required = self.local.hugepages_2mi;
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

    /// The groups to track: `all` without the V2 group unless it is on.
    #[must_use]
    pub fn groups(&self, all: &[GroupSpec]) -> Vec<GroupSpec> {
        all.iter()
            .filter(|g| g.name != V2_GROUP || self.v2.enabled == Some(true))
            .cloned()
            .collect()
    }

    /// Re-reads the hugepage pool; returns `(was, now)` of the requirement
    /// when its verdict changed while enabled.
    pub fn refresh_hugepages(&mut self, host: &HostRoot) -> Option<(bool, bool)> {
        let was = self.hugepages_verdict();
        self.readiness.hugepages = readiness::hugepages(host, self.local.hugepages_2mi);
        let now = self.hugepages_verdict();
        match (was, now) {
            (Some(w), Some(n)) if w != n => Some((w, n)),
            _ => None,
        }
    }

    /// Met or not, while the requirement applies and the pool is readable.
    #[must_use]
    pub fn hugepages_verdict(&self) -> Option<bool> {
        if self.hugepages_on.enabled != Some(true) {
            return None;
        }
        self.readiness.hugepages.met
    }

    /// The hugepage requirement as a group without modules, while it applies
    /// (so it shares `requirement_met` and the transition timestamps).
    #[must_use]
    pub fn hugepages_group(&self, severity: &str) -> Option<GroupReport> {
        self.hugepages_verdict().map(|met| GroupReport {
            name: HUGEPAGES_REQUIREMENT.to_owned(),
            mode: GroupMode::AllOf,
            met,
            severity: severity.to_owned(),
            modules: Vec::new(),
        })
    }

    /// The pool, while the hugepage requirement applies and is unmet.
    #[must_use]
    pub fn hugepages_short(&self) -> Option<&HugepagesCheck> {
        (self.hugepages_verdict() == Some(false)).then_some(&self.readiness.hugepages)
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
        }
    }
}
