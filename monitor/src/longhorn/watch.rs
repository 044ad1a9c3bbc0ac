//! The cluster watch: kube-rs watchers on Longhorn's Setting objects and on
//! this node, folded into one [`ClusterView`] the daemon subscribes to.
//!
//! Each watcher lists, then watches from the list's resourceVersion, and
//! relists on its own when the API server answers 410 Gone. Errors never end
//! the task: when a list or a watch start fails, the fact the watcher feeds
//! becomes [`Fact::Unknown`] with the reason, and the watcher is rebuilt
//! after an exponential backoff (0.8 s doubling to 30 s), so that recovery
//! is a fresh list. A stream that is merely cut (an API server restart, a
//! load balancer idle timeout) is resumed from the last resourceVersion and
//! changes nothing.
//!
//! A failure that says nothing about the cluster's answer (the API server
//! cannot be reached, answers 5xx or 429: a restart or a rolling upgrade)
//! keeps the last view the watcher had for [`CONNECTION_GRACE`], retrying
//! meanwhile; only when it lasts longer does the fact become unknown. An
//! answer that is one (403 forbidden, 404 not found, 401) makes it unknown
//! at once, and so does any failure before the first successful list:
//! there is no view to keep. The exception is such an answer within the
//! grace of an outage: an API server that has just started answers 403
//! until its RBAC cache has synced (measured: for a moment after
//! `/readyz`), so it is held like the outage it ends.
use std::{collections::BTreeMap, time::Duration};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
    runtime::watcher,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::enablement::{
    ClusterView, Fact, HUGEPAGE_LIMIT_SETTING, HUGEPAGE_SETTING, MEMORY_SIZE_SETTING,
    OPT_OUT_LABEL, V2_SETTING, VERSION_SETTING, parse_bool_setting, parse_mib_setting,
    parse_quantity_bytes,
};

/// The settings the view follows.
const SETTINGS: [&str; 5] = [
    V2_SETTING,
    HUGEPAGE_SETTING,
    VERSION_SETTING,
    MEMORY_SIZE_SETTING,
    HUGEPAGE_LIMIT_SETTING,
];

/// The settings' part of the view, from their raw values.
struct SettingFacts {
    v2: Fact<bool>,
    hugepages: Fact<bool>,
    version: Fact<String>,
    memory_size: Fact<u64>,
    hugepage_limit: Fact<u64>,
}

impl SettingFacts {
    fn of(values: &Values) -> Self {
        Self {
            v2: fact(values, V2_SETTING),
            hugepages: fact(values, HUGEPAGE_SETTING),
            version: match values.get(VERSION_SETTING) {
                None => Fact::Absent,
                Some(None) => {
                    Fact::Unknown(format!("setting {VERSION_SETTING} has no string value"))
                }
                Some(Some(v)) => Fact::Value(v.clone()),
            },
            memory_size: mib_fact(values, MEMORY_SIZE_SETTING),
            hugepage_limit: mib_fact(values, HUGEPAGE_LIMIT_SETTING),
        }
    }

    fn unknown(reason: &str) -> Self {
        let u = || Fact::Unknown(reason.to_owned());
        Self {
            v2: u(),
            hugepages: u(),
            version: Fact::Unknown(reason.to_owned()),
            memory_size: Fact::Unknown(reason.to_owned()),
            hugepage_limit: Fact::Unknown(reason.to_owned()),
        }
    }

    /// Writes these into `view`; true when anything changed.
    fn apply(self, view: &mut ClusterView) -> bool {
        let Self {
            v2,
            hugepages,
            version,
            memory_size,
            hugepage_limit,
        } = self;
        let changed = view.v2_setting != v2
            || view.hugepage_setting != hugepages
            || view.version != version
            || view.memory_size_mib != memory_size
            || view.hugepage_limit_mib != hugepage_limit;
        view.v2_setting = v2;
        view.hugepage_setting = hugepages;
        view.version = version;
        view.memory_size_mib = memory_size;
        view.hugepage_limit_mib = hugepage_limit;
        changed
    }
}

/// Where to look.
#[derive(Clone, Debug)]
pub struct WatchTarget {
    /// Longhorn's namespace (`longhorn-system`).
    pub namespace: String,
    /// This node's name.
    pub node: String,
}

/// The Longhorn `Setting` resource (settings.longhorn.io/v1beta2).
#[must_use]
pub fn setting_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("longhorn.io", "v1beta2", "Setting"),
        "settings",
    )
}

/// Starts both watchers; the receiver sees every change of the view.
pub fn spawn(
    client: Client,
    target: &WatchTarget,
    cancel: CancellationToken,
) -> watch::Receiver<ClusterView> {
    let (tx, rx) = watch::channel(ClusterView::starting());
    let settings: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &target.namespace, &setting_resource());
    let nodes: Api<Node> = Api::all(client);
    tokio::spawn(watch_settings(
        settings,
        target.namespace.clone(),
        tx.clone(),
        cancel.clone(),
    ));
    tokio::spawn(watch_node(nodes, target.node.clone(), tx, cancel));
    rx
}

/// The settings we care about, by name, as their raw `value`.
type Values = BTreeMap<String, Option<String>>;

/// Backoff after a failed list or watch start: doubles from the first to
/// the last, and starts over after a good list.
const BACKOFF_FIRST: Duration = Duration::from_millis(800);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Pause before re-watching after a cut stream or a 410 (the watcher
/// itself would go again at once; a server that keeps cutting must not
/// make this a hot loop).
const REWATCH_PAUSE: Duration = Duration::from_secs(1);
/// How long a connection-level failure keeps the last known view: longer
/// than an API server takes to restart (a few seconds) or a rolling
/// upgrade of a control plane takes to move a client to the next server,
/// far shorter than `--longhorn-grace` (300 s), the alert's.
pub const CONNECTION_GRACE: Duration = Duration::from_secs(30);

/// Runs a kube-rs watcher for ever: `on_event` gets every event;
/// `on_failure` gets the reason when a list or watch start fails. After a
/// failure the watcher is rebuilt (after the backoff), so the next success
/// is a fresh list ending in `InitDone`: the caller learns that the API is
/// readable again even when nothing changed meanwhile (a watch resumed
/// from its old resourceVersion would say nothing).
async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &str,
    cancel: &CancellationToken,
    mut on_event: impl FnMut(watcher::Event<K>),
    mut on_failure: impl FnMut(String),
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut backoff = BACKOFF_FIRST;
    // Whether there is a view to keep: a list succeeded and no failure
    // has been reported since.
    let mut known = false;
    // When the current outage (a run of transient failures) began.
    let mut outage_since: Option<std::time::Instant> = None;
    loop {
        let mut stream = watcher(api.clone(), config.clone()).boxed();
        let pause = loop {
            let item = tokio::select! {
                () = cancel.cancelled() => return,
                item = stream.next() => item,
            };
            match item {
                Some(Ok(event)) => {
                    if matches!(event, watcher::Event::InitDone) {
                        backoff = BACKOFF_FIRST;
                        known = true;
                        outage_since = None;
                    }
                    on_event(event);
                }
                Some(Err(e)) => match failure_reason(&e, what) {
                    Some((reason, transient)) => {
                        let now = std::time::Instant::now();
                        if transient && outage_since.is_none() {
                            outage_since = Some(now);
                        }
                        // Within an outage's grace even a 403 or 404 is
                        // held: a server just back may not have synced.
                        let left = outage_since.map_or(Duration::ZERO, |since| {
                            CONNECTION_GRACE.saturating_sub(now - since)
                        });
                        let pause = if known && !left.is_zero() {
                            tracing::warn!(%reason, keeping_the_last_view_for = ?left, retry_in = ?backoff.min(left), "longhorn: read failed; retrying");
                            backoff.min(left)
                        } else {
                            tracing::warn!(%reason, retry_in = ?backoff, "longhorn: read failed; retrying");
                            on_failure(reason);
                            known = false;
                            backoff
                        };
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        break pause;
                    }
                    None => {
                        tracing::debug!(error = %e, "longhorn: watch interrupted; resuming");
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(REWATCH_PAUSE) => {}
                        }
                    }
                },
                None => break REWATCH_PAUSE,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

async fn watch_settings(
    api: Api<DynamicObject>,
    namespace: String,
    tx: watch::Sender<ClusterView>,
    cancel: CancellationToken,
) {
    let mut current: Values = BTreeMap::new();
    let mut relist: Option<Values> = None;
    let what = format!("settings.longhorn.io in namespace {namespace}");
    let publish = |current: &Values| {
        let facts = SettingFacts::of(current);
        tx.send_if_modified(|v| facts.apply(v));
    };
    let on_event = |event| {
        match event {
            watcher::Event::Init => {
                relist = Some(BTreeMap::new());
                return;
            }
            watcher::Event::InitApply(obj) => {
                if let (Some(buffer), Some((name, value))) = (relist.as_mut(), setting(&obj)) {
                    buffer.insert(name, value);
                }
                return;
            }
            watcher::Event::InitDone => current = relist.take().unwrap_or_default(),
            watcher::Event::Apply(obj) => {
                if let Some((name, value)) = setting(&obj) {
                    current.insert(name, value);
                }
            }
            watcher::Event::Delete(obj) => {
                if let Some((name, _)) = setting(&obj) {
                    current.remove(&name);
                }
            }
        }
        publish(&current);
    };
    let on_failure = |reason: String| {
        tx.send_if_modified(|v| SettingFacts::unknown(&reason).apply(v));
    };
    follow(
        api,
        watcher::Config::default(),
        &what,
        &cancel,
        on_event,
        on_failure,
    )
    .await;
}

/// `(name, value)` of a Setting we care about.
fn setting(obj: &DynamicObject) -> Option<(String, Option<String>)> {
    let name = obj.metadata.name.clone()?;
    if !SETTINGS.contains(&name.as_str()) {
        return None;
    }
    let value = obj.data.get("value").and_then(|v| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    });
    Some((name, value))
}

fn mib_fact(values: &Values, name: &str) -> Fact<u64> {
    match values.get(name) {
        None => Fact::Absent,
        Some(None) => Fact::Unknown(format!("setting {name} has no string value")),
        Some(Some(value)) => match parse_mib_setting(value) {
            Ok(n) => Fact::Value(n),
            Err(problem) => Fact::Unknown(format!("setting {name}: {problem}")),
        },
    }
}

fn fact(values: &Values, name: &str) -> Fact<bool> {
    match values.get(name) {
        None => Fact::Absent,
        Some(None) => Fact::Unknown(format!("setting {name} has no string value")),
        Some(Some(value)) => match parse_bool_setting(value) {
            Ok(b) => Fact::Value(b),
            Err(problem) => Fact::Unknown(format!("setting {name}: {problem}")),
        },
    }
}

async fn watch_node(
    api: Api<Node>,
    node: String,
    tx: watch::Sender<ClusterView>,
    cancel: CancellationToken,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut seen: Option<NodeFacts> = None;
    let mut relist: Option<Option<NodeFacts>> = None;
    let set = |f: (Fact<bool>, Fact<u64>)| {
        tx.send_if_modified(|v| {
            let changed = v.node_opt_out != f.0 || v.kubelet_hugepages != f.1;
            v.node_opt_out = f.0;
            v.kubelet_hugepages = f.1;
            changed
        });
    };
    let on_event = |event| {
        match event {
            watcher::Event::Init => {
                relist = Some(None);
                return;
            }
            watcher::Event::InitApply(n) => {
                if let Some(buffer) = relist.as_mut() {
                    *buffer = Some(NodeFacts::of(&n));
                }
                return;
            }
            watcher::Event::InitDone => seen = relist.take().flatten(),
            watcher::Event::Apply(n) => seen = Some(NodeFacts::of(&n)),
            watcher::Event::Delete(_) => seen = None,
        }
        set(match &seen {
            Some(f) => (Fact::Value(f.opted_out), f.kubelet_hugepages.clone()),
            None => {
                let why =
                    format!("no Node named {node:?} (is --node-name the Kubernetes node name?)");
                (Fact::Unknown(why.clone()), Fact::Unknown(why))
            }
        });
    };
    let what = format!("node {node}");
    follow(api, config, &what, &cancel, on_event, |reason| {
        set((Fact::Unknown(reason.clone()), Fact::Unknown(reason)));
    })
    .await;
}

/// What the view takes from this node's object.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NodeFacts {
    opted_out: bool,
    kubelet_hugepages: Fact<u64>,
}

impl NodeFacts {
    fn of(node: &Node) -> Self {
        Self {
            opted_out: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(OPT_OUT_LABEL))
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true")),
            kubelet_hugepages: kubelet_hugepages(node),
        }
    }
}

/// The kubelet's `hugepages-2Mi` capacity, in 2 MiB pages.
fn kubelet_hugepages(node: &Node) -> Fact<u64> {
    let capacity = node.status.as_ref().and_then(|s| s.capacity.as_ref());
    match capacity.and_then(|c| c.get("hugepages-2Mi")) {
        None => Fact::Absent,
        Some(q) => match parse_quantity_bytes(&q.0) {
            Ok(bytes) => Fact::Value(bytes / (2 * 1024 * 1024)),
            Err(problem) => Fact::Unknown(format!("Node capacity hugepages-2Mi: {problem}")),
        },
    }
}

/// Why reading `what` failed, for people, and whether the failure is
/// transient (see [`is_transient`]); `None` for what the watcher handles by
/// itself (410 Gone: it relists; a cut stream: it re-watches).
fn failure_reason(e: &watcher::Error, what: &str) -> Option<(String, bool)> {
    let client_error = match e {
        watcher::Error::WatchError(status) if status.code == 410 => return None,
        watcher::Error::WatchFailed(_) => return None,
        watcher::Error::WatchError(status) => {
            return Some((
                format!("{what}: watch error {}: {}", status.code, status.message),
                transient_code(status.code),
            ));
        }
        watcher::Error::NoResourceVersion => {
            return Some((
                format!("{what}: the API server gave no resourceVersion"),
                false,
            ));
        }
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) => e,
    };
    Some((describe(client_error, what), is_transient(client_error)))
}

/// A failure that says nothing about what the cluster would answer: the
/// API server could not be reached (connection refused or reset, TLS,
/// timeout), or it answered that it cannot serve now (5xx, 429).
#[must_use]
pub fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => transient_code(status.code),
        _ => true,
    }
}

const fn transient_code(code: u16) -> bool {
    code == 429 || code >= 500
}

/// A client error, for people, without saying what was being read.
#[must_use]
pub fn describe_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("API error {}: {}", status.code, status.message),
        other => format!("cannot reach the API server: {}", error_chain(other)),
    }
}

/// A client error, for people.
fn describe(client_error: &kube::Error, what: &str) -> String {
    match client_error {
        kube::Error::Api(status) => match status.code {
            403 => format!(
                "{what}: forbidden by RBAC (403): {} (apply deploy/kubernetes/rbac.yaml)",
                status.message
            ),
            404 => format!(
                "{what}: not found (404): is Longhorn installed? {}",
                status.message
            ),
            401 => format!("{what}: unauthorized (401): {}", status.message),
            code => format!("{what}: API error {code}: {}", status.message),
        },
        other => format!(
            "{what}: cannot reach the API server: {}",
            error_chain(other)
        ),
    }
}

/// One read of everything the watch would follow, for `check`.
pub async fn read_once(client: Client, target: &WatchTarget) -> ClusterView {
    let settings: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &target.namespace, &setting_resource());
    let what = format!("settings.longhorn.io in namespace {}", target.namespace);
    // A list, as the watcher starts with: a missing CRD is a 404 error here,
    // where a get of one object would call it "no such setting".
    let facts = match settings.list(&ListParams::default()).await {
        Ok(list) => {
            let values: Values = list.items.iter().filter_map(setting).collect();
            SettingFacts::of(&values)
        }
        Err(e) => SettingFacts::unknown(&describe(&e, &what)),
    };
    let nodes: Api<Node> = Api::all(client);
    let (node_opt_out, kubelet) = match nodes.get_opt(&target.node).await {
        Ok(Some(n)) => {
            let f = NodeFacts::of(&n);
            (Fact::Value(f.opted_out), f.kubelet_hugepages)
        }
        Ok(None) => {
            let why = format!(
                "no Node named {:?} (is --node-name the Kubernetes node name?)",
                target.node
            );
            (Fact::Unknown(why.clone()), Fact::Unknown(why))
        }
        Err(e) => {
            let why = describe(&e, &format!("node {}", target.node));
            (Fact::Unknown(why.clone()), Fact::Unknown(why))
        }
    };
    let mut view = ClusterView::starting();
    facts.apply(&mut view);
    view.node_opt_out = node_opt_out;
    view.kubelet_hugepages = kubelet;
    view
}

/// An error and its causes, `: `-joined (hyper hides the useful part in the
/// source chain: "connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
