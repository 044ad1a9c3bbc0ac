//! The cluster watch: kube-rs watchers on Longhorn's Setting objects and on
//! this node, folded into one [`ClusterView`] the daemon subscribes to.
//!
//! Each watcher lists, then watches from the list's resourceVersion, and
//! relists on its own when the API server answers 410 Gone. Errors never end
//! the task: the fact the failing watcher feeds becomes
//! [`Fact::Unknown`] with the reason, and the watcher retries with kube-rs's
//! default exponential backoff (0.8 s doubling to 30 s, with jitter). A
//! stream that is merely cut (an API server restart, a load balancer idle
//! timeout) is resumed from the last resourceVersion and changes nothing.
use std::collections::BTreeMap;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::enablement::{
    ClusterView, Fact, HUGEPAGE_SETTING, OPT_OUT_LABEL, V2_SETTING, parse_bool_setting,
};

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

async fn watch_settings(
    api: Api<DynamicObject>,
    namespace: String,
    tx: watch::Sender<ClusterView>,
    cancel: CancellationToken,
) {
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut current: Values = BTreeMap::new();
    let mut relist: Option<Values> = None;
    loop {
        let item = tokio::select! {
            () = cancel.cancelled() => return,
            item = stream.next() => item,
        };
        let Some(item) = item else { return };
        let event = match item {
            Ok(event) => event,
            Err(e) => {
                if let Some(reason) = failure_reason(
                    &e,
                    &format!("settings.longhorn.io in namespace {namespace}"),
                ) {
                    tracing::warn!(%reason, "longhorn: cannot read the settings; retrying with backoff");
                    tx.send_if_modified(|v| {
                        let before = v.clone();
                        v.v2_setting = Fact::Unknown(reason.clone());
                        v.hugepage_setting = Fact::Unknown(reason.clone());
                        *v != before
                    });
                }
                continue;
            }
        };
        let done = match event {
            watcher::Event::Init => {
                relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(obj) => {
                if let (Some(buffer), Some((name, value))) = (relist.as_mut(), setting(&obj)) {
                    buffer.insert(name, value);
                }
                false
            }
            watcher::Event::InitDone => {
                current = relist.take().unwrap_or_default();
                true
            }
            watcher::Event::Apply(obj) => {
                if let Some((name, value)) = setting(&obj) {
                    current.insert(name, value);
                }
                true
            }
            watcher::Event::Delete(obj) => {
                if let Some((name, _)) = setting(&obj) {
                    current.remove(&name);
                }
                true
            }
        };
        if done {
            let v2 = fact(&current, V2_SETTING);
            let hugepages = fact(&current, HUGEPAGE_SETTING);
            tx.send_if_modified(|v| {
                let changed = v.v2_setting != v2 || v.hugepage_setting != hugepages;
                v.v2_setting = v2;
                v.hugepage_setting = hugepages;
                changed
            });
        }
    }
}

/// `(name, value)` of a Setting we care about.
fn setting(obj: &DynamicObject) -> Option<(String, Option<String>)> {
    let name = obj.metadata.name.clone()?;
    if name != V2_SETTING && name != HUGEPAGE_SETTING {
        return None;
    }
    let value = obj.data.get("value").and_then(|v| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    });
    Some((name, value))
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
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut seen: Option<bool> = None;
    let mut relist: Option<Option<bool>> = None;
    loop {
        let item = tokio::select! {
            () = cancel.cancelled() => return,
            item = stream.next() => item,
        };
        let Some(item) = item else { return };
        let event = match item {
            Ok(event) => event,
            Err(e) => {
                if let Some(reason) = failure_reason(&e, &format!("node {node}")) {
                    tracing::warn!(%reason, "longhorn: cannot read this node's labels; retrying with backoff");
                    tx.send_if_modified(|v| {
                        let f = Fact::Unknown(reason.clone());
                        let changed = v.node_opt_out != f;
                        v.node_opt_out = f;
                        changed
                    });
                }
                continue;
            }
        };
        let done = match event {
            watcher::Event::Init => {
                relist = Some(None);
                false
            }
            watcher::Event::InitApply(n) => {
                if let Some(buffer) = relist.as_mut() {
                    *buffer = Some(opted_out(&n));
                }
                false
            }
            watcher::Event::InitDone => {
                seen = relist.take().flatten();
                true
            }
            watcher::Event::Apply(n) => {
                seen = Some(opted_out(&n));
                true
            }
            watcher::Event::Delete(_) => {
                seen = None;
                true
            }
        };
        if done {
            let f = match seen {
                Some(out) => Fact::Value(out),
                None => Fact::Unknown(format!(
                    "no Node named {node:?} (is --node-name the Kubernetes node name?)"
                )),
            };
            tx.send_if_modified(|v| {
                let changed = v.node_opt_out != f;
                v.node_opt_out = f;
                changed
            });
        }
    }
}

fn opted_out(node: &Node) -> bool {
    node.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(OPT_OUT_LABEL))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Why reading `what` failed, for people; `None` for what the watcher
/// handles by itself (410 Gone: it relists; a cut stream: it re-watches).
fn failure_reason(e: &watcher::Error, what: &str) -> Option<String> {
    let client_error = match e {
        watcher::Error::WatchError(status) if status.code == 410 => return None,
        watcher::Error::WatchFailed(_) => return None,
        watcher::Error::WatchError(status) => {
            return Some(format!(
                "{what}: watch error {}: {}",
                status.code, status.message
            ));
        }
        watcher::Error::NoResourceVersion => {
            return Some(format!("{what}: the API server gave no resourceVersion"));
        }
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) => e,
    };
    Some(describe(client_error, what))
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
    let read = |name: &'static str| {
        let settings = settings.clone();
        let what = what.clone();
        async move {
            match settings.get_opt(name).await {
                Ok(None) => Fact::Absent,
                Ok(Some(obj)) => {
                    let mut values = Values::new();
                    if let Some((n, v)) = setting(&obj) {
                        values.insert(n, v);
                    }
                    fact(&values, name)
                }
                Err(e) => Fact::Unknown(describe(&e, &what)),
            }
        }
    };
    let v2_setting = read(V2_SETTING).await;
    let hugepage_setting = read(HUGEPAGE_SETTING).await;
    let nodes: Api<Node> = Api::all(client);
    let node_opt_out = match nodes.get_opt(&target.node).await {
        Ok(Some(n)) => Fact::Value(opted_out(&n)),
        Ok(None) => Fact::Unknown(format!(
            "no Node named {:?} (is --node-name the Kubernetes node name?)",
            target.node
        )),
        Err(e) => Fact::Unknown(describe(&e, &format!("node {}", target.node))),
    };
    ClusterView {
        v2_setting,
        hugepage_setting,
        node_opt_out,
    }
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
