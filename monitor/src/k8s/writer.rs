//! The task that writes the report to the API server. It is fed the latest
//! [`Report`] through a watch channel (latest wins), so the event path only
//! ever replaces a value and never waits for the network.
//!
//! Each round it makes true, in this order, what is due:
//! 1. once, reads the Node (its uid for the Events, and our condition as a
//!    previous run left it, so `lastTransitionTime` survives a restart);
//! 2. the condition, with server-side apply on `nodes/status` under the
//!    field manager [`FIELD_MANAGER`]: on a change (at most one write per
//!    [`CONDITION_SPACING`], so a change is written within a second), and
//!    as a heartbeat every `--k8s-heartbeat` plus up to 10 % jitter;
//! 3. with `--k8s-node-labels`, the labels, with server-side apply on the
//!    Node under the same field manager;
//! 4. the Events the [`Recorder`] says are due.
//!
//! Every write to the Node (condition or labels) goes to every client that
//! watches Nodes (the scheduler, controllers, CNI agents), so they share a
//! budget: a burst of [`NODE_WRITE_BURST`] at once, then one per
//! [`NODE_WRITE_REFILL`]. A change is written within a second unless a
//! module has been flapping; then the latest state goes out with the next
//! token, and a flapping node costs at most 10 + 360 Node writes an hour.
//!
//! A failed request stops the round; the next is tried after a back-off
//! (0.5 s doubling to 30 s, reset by a success), with whatever the report
//! says by then. Every write is counted in `kmod_monitor_k8s_writes_total`.
use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::{
        core::v1::{Node, ObjectReference},
        events::v1::{Event, EventSeries},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    EVENTS_NAMESPACE, FIELD_MANAGER, REPORTING_CONTROLLER,
    recorder::{Action, EventType, Key, Outcome, Recorder},
    report::{CONDITION_TYPE, Condition, Report, Status},
};
use crate::metrics::{K8sWrite, Metrics};

/// Least time between two condition writes.
pub const CONDITION_SPACING: Duration = Duration::from_secs(1);
/// Node writes (condition, labels) that may go out at once.
pub const NODE_WRITE_BURST: u32 = 10;
/// One more Node write is allowed per this, up to the burst.
pub const NODE_WRITE_REFILL: Duration = Duration::from_secs(10);
/// How long the first write waits for the cluster view while the condition
/// would say Unknown, so a restart does not flip it through Unknown.
pub const STARTUP_SETTLE: Duration = Duration::from_secs(10);
/// Back-off after a failed request: doubles from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Longest one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The Events' `action`.
const ACTION: &str = "EvaluateRequirement";

/// How the writer runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name.
    pub node: String,
    /// The heartbeat, and the refresh of a repeating Event's count.
    pub heartbeat: Duration,
    /// Whether to keep the labels.
    pub labels: bool,
}

/// What the API holds of our condition.
#[derive(Clone, Debug)]
struct Written {
    condition: Condition,
    /// RFC 3339, as written.
    transition: String,
}

/// Why a round stopped.
struct Failed {
    kind: K8sWrite,
    error: String,
    /// The object is gone (404): for an Event, write it anew.
    not_found: bool,
}

struct Writer {
    config: Config,
    nodes: Api<Node>,
    events: Api<Event>,
    metrics: Arc<Metrics>,
    started: Instant,
    /// `(uid, our condition's status and lastTransitionTime)` once read.
    node: Option<(String, Option<(String, String)>)>,
    written: Option<Written>,
    last_condition_write: Option<Instant>,
    next_heartbeat: Option<Instant>,
    labels_written: Option<BTreeMap<String, String>>,
    /// The tallies already handed to the recorder.
    seen: BTreeMap<String, (u64, u64)>,
    recorder: Recorder,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// A failure was logged; the next success says so.
    failing: bool,
    /// Per-process random bits for the heartbeat's jitter.
    jitter_seed: u64,
    budget: Budget,
}

/// A token bucket for Node writes.
#[derive(Debug)]
struct Budget {
    tokens: u32,
    /// When the next token is added (while below the burst).
    refill_at: Instant,
}

impl Budget {
    fn new(now: Instant) -> Self {
        Self {
            tokens: NODE_WRITE_BURST,
            refill_at: now + NODE_WRITE_REFILL,
        }
    }

    fn refill(&mut self, now: Instant) {
        while self.tokens < NODE_WRITE_BURST && now >= self.refill_at {
            self.tokens += 1;
            self.refill_at += NODE_WRITE_REFILL;
        }
    }

    /// Whether a write may go out now (it then must be taken).
    fn available(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens > 0
    }

    fn take(&mut self, now: Instant) {
        self.refill(now);
        if self.tokens == NODE_WRITE_BURST {
            self.refill_at = now + NODE_WRITE_REFILL;
        }
        self.tokens = self.tokens.saturating_sub(1);
    }

    /// When a token is next available.
    fn next_at(&self) -> Option<Instant> {
        (self.tokens == 0).then_some(self.refill_at)
    }
}

/// Runs until `cancel`.
pub async fn run(
    client: Client,
    config: Config,
    mut rx: watch::Receiver<Arc<Report>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut w = Writer {
        nodes: Api::all(client.clone()),
        events: Api::namespaced(client, EVENTS_NAMESPACE),
        config,
        metrics,
        started: Instant::now(),
        node: None,
        written: None,
        last_condition_write: None,
        next_heartbeat: None,
        labels_written: None,
        seen: BTreeMap::new(),
        recorder: Recorder::default(),
        backoff: BACKOFF_FIRST,
        retry_at: None,
        failing: false,
        jitter_seed: random_seed(),
        budget: Budget::new(Instant::now()),
    };
    let mut report = rx.borrow_and_update().clone();
    w.observe(&report);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = w.round(&report) => {}
        }
        let wake = w.next_wake(&report);
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                report = rx.borrow_and_update().clone();
                w.observe(&report);
            }
            () = sleep_until(wake) => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Random bits without a dependency: std's per-process hasher keys.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// RFC 3339 in seconds, as `metav1.Time` is written.
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn micro_time(t: SystemTime) -> MicroTime {
    MicroTime(Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH))
}

impl Writer {
    /// Hands new transitions to the recorder.
    fn observe(&mut self, report: &Report) {
        let now = Instant::now().into_std();
        let wall = SystemTime::now();
        for (group, tally) in &report.groups {
            let seen = self.seen.entry(group.clone()).or_default();
            for (type_, count, was, note) in [
                (
                    EventType::Warning,
                    tally.became_unmet,
                    &mut seen.0,
                    &tally.unmet_note,
                ),
                (
                    EventType::Normal,
                    tally.became_met,
                    &mut seen.1,
                    &tally.met_note,
                ),
            ] {
                let more = count.saturating_sub(*was);
                *was = count;
                self.recorder.observe(
                    Key {
                        group: group.clone(),
                        type_,
                    },
                    note,
                    more,
                    now,
                    wall,
                );
            }
        }
    }

    /// When something becomes due.
    fn next_wake(&self, report: &Report) -> Option<Instant> {
        if let Some(at) = self.retry_at {
            return Some(at);
        }
        let condition = match &self.written {
            None if report.condition.status == Status::Unknown => {
                Some(self.started + STARTUP_SETTLE)
            }
            Some(w) if w.condition != report.condition => {
                self.last_condition_write.map(|t| t + CONDITION_SPACING)
            }
            None => Some(Instant::now()),
            Some(_) => self.next_heartbeat,
        };
        let labels = (self.config.labels && self.labels_written.as_ref() != Some(&report.labels))
            .then(Instant::now);
        // A Node write waiting for the budget waits for its next token.
        let node = [condition, labels]
            .into_iter()
            .flatten()
            .min()
            .map(|at| self.budget.next_at().map_or(at, |token| at.max(token)));
        let events = self
            .recorder
            .next_due(self.config.heartbeat)
            .map(Instant::from_std);
        [node, events].into_iter().flatten().min()
    }

    /// Writes what is due; stops at the first failure.
    async fn round(&mut self, report: &Report) {
        let now = Instant::now();
        if self.retry_at.is_some_and(|at| at > now) {
            return;
        }
        match self.try_round(report).await {
            Ok(()) => {
                self.retry_at = None;
                self.backoff = BACKOFF_FIRST;
                if self.failing {
                    self.failing = false;
                    tracing::info!(node = %self.config.node, "k8s: writing to the API server again");
                }
            }
            Err(f) => {
                self.metrics.k8s_write(f.kind, false);
                tracing::warn!(kind = f.kind.as_str(), error = %f.error, retry_in = ?self.backoff, "k8s: write failed; retrying");
                self.failing = true;
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    async fn try_round(&mut self, report: &Report) -> Result<(), Failed> {
        if self.node.is_none() {
            self.read_node().await?;
        }
        if self.condition_due(report) && self.budget.available(Instant::now()) {
            self.budget.take(Instant::now());
            self.write_condition(&report.condition).await?;
        }
        if self.config.labels
            && self.labels_written.as_ref() != Some(&report.labels)
            && self.budget.available(Instant::now())
        {
            self.budget.take(Instant::now());
            self.write_labels(&report.labels).await?;
        }
        loop {
            let now = Instant::now().into_std();
            self.recorder.expire(now);
            let Some(action) = self.recorder.next(now, self.config.heartbeat) else {
                break;
            };
            match self.write_event(&action).await {
                Ok(outcome) => self
                    .recorder
                    .done(&action, outcome, Instant::now().into_std()),
                Err(f) if f.not_found => {
                    // Expired from the API (its event TTL): create it anew.
                    self.metrics.k8s_write(f.kind, false);
                    self.recorder.done(&action, Outcome::Gone, now);
                }
                Err(f) => return Err(f),
            }
        }
        Ok(())
    }

    fn condition_due(&self, report: &Report) -> bool {
        let now = Instant::now();
        match &self.written {
            None => {
                report.condition.status != Status::Unknown || now >= self.started + STARTUP_SETTLE
            }
            Some(w) if w.condition != report.condition => self
                .last_condition_write
                .is_none_or(|t| now >= t + CONDITION_SPACING),
            Some(_) => self.next_heartbeat.is_some_and(|at| now >= at),
        }
    }

    /// The Node's uid, and our condition as it is there.
    async fn read_node(&mut self) -> Result<(), Failed> {
        let node = timed(self.nodes.get(&self.config.node))
            .await
            .map_err(|e| {
                failed(
                    K8sWrite::Condition,
                    &format!("reading node {}", self.config.node),
                    e,
                )
            })?;
        let uid = node.metadata.uid.clone().unwrap_or_default();
        let ours = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == CONDITION_TYPE))
            .and_then(|c| {
                c.last_transition_time.as_ref().map(|t| {
                    (
                        c.status.clone(),
                        t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    )
                })
            });
        self.node = Some((uid, ours));
        Ok(())
    }

    async fn write_condition(&mut self, condition: &Condition) -> Result<(), Failed> {
        let now = SystemTime::now();
        let status = condition.status.as_str();
        let transition = match (&self.written, &self.node) {
            (Some(w), _) if w.condition.status == condition.status => w.transition.clone(),
            (None, Some((_, Some((was, at))))) if was == status => at.clone(),
            _ => rfc3339(now),
        };
        let body = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.config.node},
            "status": {"conditions": [{
                "type": CONDITION_TYPE,
                "status": status,
                "reason": condition.reason,
                "message": condition.message,
                "lastTransitionTime": transition,
                "lastHeartbeatTime": rfc3339(now),
            }]},
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        timed(
            self.nodes
                .patch_status(&self.config.node, &params, &Patch::Apply(&body)),
        )
        .await
        .map_err(|e| failed(K8sWrite::Condition, "applying the condition", e))?;
        self.metrics.k8s_write(K8sWrite::Condition, true);
        if self
            .written
            .as_ref()
            .is_none_or(|w| w.condition.status != condition.status)
        {
            tracing::info!(node = %self.config.node, status, reason = condition.reason, message = %condition.message, "k8s: node condition {CONDITION_TYPE}");
        }
        self.written = Some(Written {
            condition: condition.clone(),
            transition,
        });
        let written_at = Instant::now();
        self.last_condition_write = Some(written_at);
        self.next_heartbeat = Some(written_at + self.jittered());
        Ok(())
    }

    /// The heartbeat plus up to 10 %, different at every write.
    fn jittered(&mut self) -> Duration {
        // xorshift64: cheap, and different nodes start from different seeds.
        let mut x = self.jitter_seed | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter_seed = x;
        let permille = u32::try_from(x % 100).unwrap_or(0);
        self.config.heartbeat + self.config.heartbeat * permille / 1000
    }

    async fn write_labels(&mut self, labels: &BTreeMap<String, String>) -> Result<(), Failed> {
        let body = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.config.node, "labels": labels},
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        timed(
            self.nodes
                .patch(&self.config.node, &params, &Patch::Apply(&body)),
        )
        .await
        .map_err(|e| failed(K8sWrite::Labels, "applying the labels", e))?;
        self.metrics.k8s_write(K8sWrite::Labels, true);
        tracing::info!(node = %self.config.node, ?labels, "k8s: node labels");
        self.labels_written = Some(labels.clone());
        Ok(())
    }

    async fn write_event(&mut self, action: &Action) -> Result<Outcome, Failed> {
        match action {
            Action::Create { key, series } => {
                let uid = self.node.as_ref().map(|(uid, _)| uid.clone());
                let event = self.new_event(key, series, uid);
                let name = event.metadata.name.clone().unwrap_or_default();
                timed(self.events.create(&PostParams::default(), &event))
                    .await
                    .map_err(|e| failed(K8sWrite::Event, "creating an Event", e))?;
                self.metrics.k8s_write(K8sWrite::Event, true);
                tracing::debug!(%name, group = %key.group, type_ = key.type_.as_str(), count = series.count, "k8s: event created");
                Ok(Outcome::Created(name))
            }
            Action::Patch { key, series } => {
                let name = series.name.clone().unwrap_or_default();
                let patch = json!({"series": {
                    "count": i32::try_from(series.count).unwrap_or(i32::MAX),
                    "lastObservedTime": micro_time(series.last_observed_wall),
                }});
                timed(
                    self.events
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await
                .map_err(|e| failed(K8sWrite::Event, "patching an Event's series", e))?;
                self.metrics.k8s_write(K8sWrite::Event, true);
                tracing::debug!(%name, group = %key.group, count = series.count, "k8s: event series");
                Ok(Outcome::Patched)
            }
        }
    }

    /// A new events.k8s.io/v1 Event about this Node, as client-go's
    /// recorder makes one (named `<node>.<hex nanoseconds>`, in `default`,
    /// where Events about cluster-scoped objects go).
    fn new_event(&self, key: &Key, series: &super::recorder::Series, uid: Option<String>) -> Event {
        let now = SystemTime::now();
        let nanos = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let reason = format!(
            "{}{}",
            camel(&key.group),
            match key.type_ {
                EventType::Warning => "RequirementUnmet",
                EventType::Normal => "RequirementMet",
            }
        );
        Event {
            metadata: ObjectMeta {
                name: Some(format!("{}.{nanos:x}", self.config.node)),
                namespace: Some(EVENTS_NAMESPACE.to_owned()),
                ..ObjectMeta::default()
            },
            event_time: Some(micro_time(series.first)),
            series: (series.count > 1).then(|| EventSeries {
                count: i32::try_from(series.count).unwrap_or(i32::MAX),
                last_observed_time: micro_time(series.last_observed_wall),
            }),
            regarding: Some(ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Node".to_owned()),
                name: Some(self.config.node.clone()),
                uid: uid.filter(|u| !u.is_empty()),
                ..ObjectReference::default()
            }),
            action: Some(ACTION.to_owned()),
            reason: Some(reason.chars().take(128).collect()),
            note: Some(series.note.clone()),
            type_: Some(key.type_.as_str().to_owned()),
            reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
            reporting_instance: Some(
                format!("kmod-monitor-{}", self.config.node)
                    .chars()
                    .take(128)
                    .collect(),
            ),
            ..Event::default()
        }
    }
}

/// `v2-data-engine` → `V2DataEngine`.
#[must_use]
pub fn camel(group: &str) -> String {
    group
        .split('-')
        .map(|part| {
            let mut cs = part.chars();
            cs.next()
                .map(|c| c.to_ascii_uppercase().to_string() + cs.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// A request with [`REQUEST_TIMEOUT`].
async fn timed<T>(
    request: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, TimedError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(r) => r.map_err(TimedError::Api),
        Err(_) => Err(TimedError::Timeout),
    }
}

enum TimedError {
    Api(kube::Error),
    Timeout,
}

fn failed(kind: K8sWrite, doing: &str, e: TimedError) -> Failed {
    match e {
        TimedError::Timeout => Failed {
            kind,
            error: format!("{doing}: no answer in {REQUEST_TIMEOUT:?}"),
            not_found: false,
        },
        TimedError::Api(e) => Failed {
            kind,
            not_found: matches!(&e, kube::Error::Api(s) if s.code == 404),
            error: format!("{doing}: {}", crate::longhorn::watch::describe_error(&e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_write_budget_allows_a_burst_then_one_per_refill() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        for _ in 0..NODE_WRITE_BURST {
            assert!(b.available(t0));
            b.take(t0);
        }
        assert!(!b.available(t0));
        assert_eq!(b.next_at(), Some(t0 + NODE_WRITE_REFILL));
        let t1 = t0 + NODE_WRITE_REFILL;
        assert!(b.available(t1));
        b.take(t1);
        assert!(!b.available(t1 + NODE_WRITE_REFILL / 2));
        // An hour of writing whenever allowed: the burst plus one per refill.
        let mut writes = 0;
        let mut b = Budget::new(t0);
        for s in 0..3600 {
            let now = t0 + Duration::from_secs(s);
            if b.available(now) {
                b.take(now);
                writes += 1;
            }
        }
        assert_eq!(writes, NODE_WRITE_BURST + 359);
        // Quiet for long enough, the burst is back.
        let later = t0 + Duration::from_secs(3600) + NODE_WRITE_REFILL * NODE_WRITE_BURST;
        let mut n = 0;
        while b.available(later) {
            b.take(later);
            n += 1;
        }
        assert_eq!(n, NODE_WRITE_BURST);
    }

    #[test]
    fn reasons_are_camel_case() {
        assert_eq!(camel("v2-data-engine"), "V2DataEngine");
        assert_eq!(camel("base"), "Base");
    }
}
