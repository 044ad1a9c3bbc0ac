//! `monitor/deploy/kubernetes` against a real kube-apiserver
//! (`kmod_monitor_tests::apiserver`): the kustomization passes the
//! server's own validation (`--dry-run=server`, strict field validation)
//! with the CRDs it needs installed, applies with server-side apply, and
//! the shipped ServiceAccount's token can do what `rbac.yaml` grants and
//! nothing more; the optional `components/node-labels` adds patch on nodes
//! and nothing else. The overlay with the optional NetworkPolicy component
//! (`kubernetes-with-network-policy`) validates and applies the same way.
use std::{collections::BTreeSet, path::Path, process::Output};

use kmod_monitor_tests::{
    apiserver::{
        ControlPlane, LONGHORN_CRD, LONGHORN_NAMESPACE, PROMETHEUS_OPERATOR_CRDS,
        SERVICE_ACCOUNT_NAMESPACE,
    },
    workspace_dir,
};

fn kustomization() -> String {
    workspace_dir()
        .join("monitor/deploy/kubernetes")
        .display()
        .to_string()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A cluster as the kustomization expects one: Longhorn's namespace (the
/// Role and RoleBinding live there) and prometheus-operator's CRDs.
fn cluster() -> ControlPlane {
    let k8s = ControlPlane::start();
    k8s.namespace(LONGHORN_NAMESPACE);
    k8s.install_crds(PROMETHEUS_OPERATOR_CRDS);
    k8s
}

/// Every object of the kustomization, as kubectl names them in its output.
const OBJECTS: &[&str] = &[
    "namespace/kmod-monitor",
    "serviceaccount/kmod-monitor",
    "clusterrole.rbac.authorization.k8s.io/kmod-monitor-nodes",
    "clusterrolebinding.rbac.authorization.k8s.io/kmod-monitor-nodes",
    "role.rbac.authorization.k8s.io/kmod-monitor-events",
    "role.rbac.authorization.k8s.io/kmod-monitor-longhorn-settings",
    "rolebinding.rbac.authorization.k8s.io/kmod-monitor-events",
    "rolebinding.rbac.authorization.k8s.io/kmod-monitor-longhorn-settings",
    "configmap/kmod-monitor-config-",
    "service/kmod-monitor",
    "daemonset.apps/kmod-monitor",
    "servicemonitor.monitoring.coreos.com/kmod-monitor",
    "prometheusrule.monitoring.coreos.com/kmod-monitor",
];

#[test]
fn kustomization_passes_server_validation_and_applies() {
    let k8s = cluster();
    // A server dry run creates nothing, so it cannot create the namespace
    // and then the objects in it: the namespace comes first, applied as
    // shipped (as a first install would, or as it is on an upgrade).
    let namespace = workspace_dir().join("monitor/deploy/kubernetes/namespace.yaml");
    k8s.kubectl(&[
        "apply",
        "--server-side",
        "-f",
        &namespace.display().to_string(),
    ]);
    let dry = k8s.kubectl(&[
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-k",
        &kustomization(),
    ]);
    let out = text(&dry);
    for object in OBJECTS {
        assert!(
            out.lines()
                .any(|l| l.starts_with(object) && l.contains("(server dry run)")),
            "{object} missing from the server dry run:\n{out}"
        );
    }
    // Nothing was created by the dry run.
    let none = k8s.kubectl_with(
        k8s.admin_kubeconfig(),
        &[
            "get",
            "serviceaccount",
            "kmod-monitor",
            "--namespace",
            SERVICE_ACCOUNT_NAMESPACE,
        ],
        None,
    );
    assert!(
        !none.status.success() && text(&none).contains("NotFound"),
        "the dry run created the ServiceAccount:\n{}",
        text(&none)
    );

    // Applied for real, with server-side apply, twice: the second apply
    // changes nothing and conflicts with nothing.
    for round in ["first", "second"] {
        let applied = k8s.kubectl(&[
            "apply",
            "--server-side",
            "--validate=strict",
            "-k",
            &kustomization(),
        ]);
        let out = text(&applied);
        for object in OBJECTS {
            assert!(
                out.lines().any(|l| l.starts_with(object)),
                "{object} missing from the {round} apply:\n{out}"
            );
        }
    }
    let ds = k8s.kubectl(&[
        "get",
        "daemonset",
        "kmod-monitor",
        "--namespace",
        SERVICE_ACCOUNT_NAMESPACE,
        "-o",
        "jsonpath={.spec.template.spec.serviceAccountName}",
    ]);
    assert_eq!(String::from_utf8_lossy(&ds.stdout), "kmod-monitor");
    // The Role stayed in Longhorn's namespace (the namespace transformer
    // only fills in a missing one).
    k8s.kubectl(&[
        "get",
        "role,rolebinding",
        "kmod-monitor-longhorn-settings",
        "--namespace",
        LONGHORN_NAMESPACE,
    ]);
    // And the Events' in `default`.
    k8s.kubectl(&[
        "get",
        "role,rolebinding",
        "kmod-monitor-events",
        "--namespace",
        "default",
    ]);
}

/// `kubectl auth can-i VERB RESOURCE [--namespace NS]` with `token`;
/// for `nodes/status` with `--subresource status` (kubectl would read
/// `TYPE/NAME`).
fn can_i(
    k8s: &ControlPlane,
    token: &Path,
    verb: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    let mut args = vec!["auth", "can-i", verb];
    match resource.split_once('/') {
        Some((resource, sub)) => args.extend([resource, "--subresource", sub]),
        None => args.push(resource),
    }
    if let Some(ns) = namespace {
        args.extend(["--namespace", ns]);
    }
    let out = k8s.kubectl_with(token, &args, None);
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match (out.status.code(), answer.as_str()) {
        (Some(0), "yes") => true,
        (Some(1), "no") => false,
        _ => panic!(
            "kubectl auth can-i {verb} {resource} {namespace:?}: {}",
            text(&out)
        ),
    }
}

/// Every `(resource or URL, verb)` the token's user may do in `namespace`
/// (cluster-wide rights included), from `kubectl auth can-i --list`.
fn rights(k8s: &ControlPlane, token: &Path, namespace: &str) -> BTreeSet<(String, String)> {
    let out = k8s.kubectl_with(
        token,
        &["auth", "can-i", "--list", "--namespace", namespace],
        None,
    );
    assert!(out.status.success(), "can-i --list: {}", text(&out));
    let mut rights = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        // `RESOURCE [URLS] [NAMES] [VERBS]`; the verbs are the last [...].
        let what = line.split_whitespace().next().unwrap_or_default();
        let verbs = line
            .rsplit_once('[')
            .and_then(|(_, v)| v.split_once(']'))
            .map_or("", |(v, _)| v);
        for verb in verbs.split_whitespace() {
            rights.insert((what.to_owned(), verb.to_owned()));
        }
    }
    rights
}

/// `(resource, verb)` pairs.
fn pairs(list: &[(&str, &[&str])]) -> BTreeSet<(String, String)> {
    list.iter()
        .flat_map(|(r, verbs)| verbs.iter().map(|v| ((*r).to_owned(), (*v).to_owned())))
        .collect()
}

/// The overlay with the optional NetworkPolicy component.
fn with_network_policy() -> String {
    workspace_dir()
        .join("monitor/deploy/kubernetes-with-network-policy")
        .display()
        .to_string()
}

#[test]
fn the_network_policy_component_passes_server_validation_and_applies() {
    let k8s = cluster();
    let namespace = workspace_dir().join("monitor/deploy/kubernetes/namespace.yaml");
    k8s.kubectl(&[
        "apply",
        "--server-side",
        "-f",
        &namespace.display().to_string(),
    ]);
    let policy = "networkpolicy.networking.k8s.io/kmod-monitor";
    let dry = k8s.kubectl(&[
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-k",
        &with_network_policy(),
    ]);
    let out = text(&dry);
    for object in OBJECTS.iter().chain([&policy]) {
        assert!(
            out.lines()
                .any(|l| l.starts_with(object) && l.contains("(server dry run)")),
            "{object} missing from the server dry run of the overlay:\n{out}"
        );
    }
    let applied = k8s.kubectl(&[
        "apply",
        "--server-side",
        "--validate=strict",
        "-k",
        &with_network_policy(),
    ]);
    assert!(
        text(&applied).lines().any(|l| l.starts_with(policy)),
        "{}",
        text(&applied)
    );
    // As applied: the kmod-monitor pods, ingress only, only from the
    // monitoring namespace, only to the metrics port.
    let spec = k8s.kubectl(&[
        "get",
        "networkpolicy",
        "kmod-monitor",
        "--namespace",
        SERVICE_ACCOUNT_NAMESPACE,
        "-o",
        "jsonpath={.spec.podSelector.matchLabels.app\\.kubernetes\\.io/name} {.spec.policyTypes} {.spec.ingress[0].from[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name} {.spec.ingress[0].ports[0].port}",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&spec.stdout),
        r#"kmod-monitor ["Ingress"] monitoring metrics"#
    );
    // The base alone does not carry it: the component is optional.
    let base = k8s.kubectl(&["kustomize", &kustomization()]);
    assert!(!text(&base).contains("kind: NetworkPolicy"));
}

#[test]
fn the_service_account_can_do_what_rbac_grants_and_nothing_more() {
    let k8s = cluster();
    k8s.install_crds(&[LONGHORN_CRD]);
    k8s.apply_shipped_manifests();
    k8s.set_setting("v2-data-engine", "true");
    k8s.set_node("node-1", &[]);
    let token = k8s.service_account_kubeconfig();
    // What a ServiceAccount with no binding may do (discovery, self
    // reviews): the shipped one holds exactly that plus rbac.yaml's rules.
    k8s.kubectl(&[
        "create",
        "serviceaccount",
        "nobody",
        "--namespace",
        SERVICE_ACCOUNT_NAMESPACE,
    ]);
    let nobody = k8s.token_kubeconfig(SERVICE_ACCOUNT_NAMESPACE, "nobody");
    let read: &[&str] = &["get", "list", "watch"];
    let everywhere: &[(&str, &[&str])] = &[("nodes", read), ("nodes/status", &["patch"])];
    for ns in [
        "default",
        SERVICE_ACCOUNT_NAMESPACE,
        LONGHORN_NAMESPACE,
        "kube-system",
    ] {
        let granted: BTreeSet<(String, String)> = rights(&k8s, &token, ns)
            .difference(&rights(&k8s, &nobody, ns))
            .cloned()
            .collect();
        let mut want = pairs(everywhere);
        match ns {
            "default" => want.extend(pairs(&[("events.events.k8s.io", &["create", "patch"])])),
            LONGHORN_NAMESPACE => want.extend(pairs(&[("settings.longhorn.io", read)])),
            _ => {}
        }
        assert_eq!(granted, want, "rights in {ns}");
    }
    let can_i = |verb: &str, resource: &str, namespace: Option<&str>| {
        can_i(&k8s, &token, verb, resource, namespace)
    };
    let settings = "settings.longhorn.io";
    for verb in ["get", "list", "watch"] {
        assert!(
            can_i(verb, settings, Some(LONGHORN_NAMESPACE)),
            "{verb} settings"
        );
        assert!(can_i(verb, "nodes", None), "{verb} nodes");
    }
    for verb in ["create", "update", "patch", "delete"] {
        assert!(
            !can_i(verb, settings, Some(LONGHORN_NAMESPACE)),
            "{verb} settings"
        );
        assert!(!can_i(verb, "nodes", None), "{verb} nodes");
    }
    // The condition: patch (server-side apply) of the Nodes' status, no
    // other verb on it.
    assert!(can_i("patch", "nodes/status", None));
    for verb in ["get", "update", "create", "delete"] {
        assert!(!can_i(verb, "nodes/status", None), "{verb} nodes/status");
    }
    // Events: create and patch, events.k8s.io, in `default` only.
    let events = "events.events.k8s.io";
    for verb in ["create", "patch"] {
        assert!(can_i(verb, events, Some("default")), "{verb} events");
        for ns in [SERVICE_ACCOUNT_NAMESPACE, "kube-system", LONGHORN_NAMESPACE] {
            assert!(!can_i(verb, events, Some(ns)), "{verb} events in {ns}");
        }
        assert!(
            !can_i(verb, "events", Some("default")),
            "{verb} core events"
        );
    }
    for verb in ["get", "list", "watch", "update", "delete"] {
        assert!(!can_i(verb, events, Some("default")), "{verb} events");
    }
    // Settings anywhere else, other Longhorn objects, secrets, pods: none
    // of it.
    assert!(!can_i("list", settings, Some(SERVICE_ACCOUNT_NAMESPACE)));
    assert!(!can_i(
        "list",
        "volumes.longhorn.io",
        Some(LONGHORN_NAMESPACE)
    ));
    assert!(!can_i("get", "secrets", Some(LONGHORN_NAMESPACE)));
    assert!(!can_i("list", "pods", None));

    // Real requests with the token, not only the authorizer's answer.
    let as_daemon = |args: &[&str]| k8s.kubectl_with(&token, args, None);
    let as_daemon_with =
        |args: &[&str], stdin: &str| k8s.kubectl_with(&token, args, Some(stdin.as_bytes()));
    let read = as_daemon(&[
        "get",
        settings,
        "v2-data-engine",
        "--namespace",
        LONGHORN_NAMESPACE,
        "-o",
        "jsonpath={.value}",
    ]);
    assert!(read.status.success(), "{}", text(&read));
    assert_eq!(String::from_utf8_lossy(&read.stdout), "true");
    let nodes = as_daemon(&["get", "node", "node-1", "-o", "name"]);
    assert!(nodes.status.success(), "{}", text(&nodes));
    // A condition, applied as the daemon applies it.
    let condition = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"node-1"},"status":{"conditions":[{"type":"KernelModuleRequirementsMet","status":"True","reason":"RequirementsMet","message":"Met: base","lastTransitionTime":"2026-01-01T00:00:00Z","lastHeartbeatTime":"2026-01-01T00:00:00Z"}]}}"#;
    let applied = k8s.kubectl_with(
        &token,
        &[
            "apply",
            "--server-side",
            "--field-manager=kmod-monitor",
            "--subresource=status",
            "-f",
            "-",
        ],
        Some(condition.as_bytes()),
    );
    assert!(applied.status.success(), "{}", text(&applied));
    // An Event about it, in `default`; the same elsewhere is refused.
    let event = |ns: &str| {
        format!(
            r#"{{"apiVersion":"events.k8s.io/v1","kind":"Event","metadata":{{"name":"node-1.test","namespace":"{ns}"}},"eventTime":"2026-01-01T00:00:00.000000Z","regarding":{{"apiVersion":"v1","kind":"Node","name":"node-1"}},"action":"EvaluateRequirement","reason":"BaseRequirementUnmet","note":"test","type":"Warning","reportingController":"kmod-monitor.io/kmod-monitor","reportingInstance":"kmod-monitor-node-1"}}"#
        )
    };
    let created = as_daemon_with(&["create", "-f", "-"], &event("default"));
    assert!(created.status.success(), "{}", text(&created));
    let elsewhere = as_daemon_with(&["create", "-f", "-"], &event("kube-system"));
    assert!(
        !elsewhere.status.success() && text(&elsewhere).contains("Forbidden"),
        "{}",
        text(&elsewhere)
    );
    for denied in [
        vec![
            "patch",
            settings,
            "v2-data-engine",
            "--namespace",
            LONGHORN_NAMESPACE,
            "--type=merge",
            "--patch",
            r#"{"value":"false"}"#,
        ],
        vec!["label", "node", "node-1", "kmod-monitor.io/test=x"],
        vec!["get", "secrets", "--namespace", LONGHORN_NAMESPACE],
    ] {
        let out = as_daemon(&denied);
        let said = text(&out);
        assert!(
            !out.status.success() && said.contains("Forbidden"),
            "kubectl {} should be forbidden: {said}",
            denied.join(" ")
        );
    }
}

#[test]
fn the_node_labels_component_adds_patch_on_nodes_and_nothing_else() {
    let k8s = cluster();
    k8s.install_crds(&[LONGHORN_CRD]);
    k8s.apply_shipped_manifests();
    k8s.set_node("node-1", &[]);
    let token = k8s.service_account_kubeconfig();
    let namespaces = [
        "default",
        SERVICE_ACCOUNT_NAMESPACE,
        LONGHORN_NAMESPACE,
        "kube-system",
    ];
    let before: Vec<BTreeSet<(String, String)>> = namespaces
        .iter()
        .map(|ns| rights(&k8s, &token, ns))
        .collect();
    assert!(!can_i(&k8s, &token, "patch", "nodes", None));

    // The component, from an overlay as its kustomization.yaml shows.
    let overlay = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    // kustomize takes only relative paths: up to / and down again.
    let up = "../".repeat(overlay.path().components().count() - 1);
    let base = format!(
        "{up}{}",
        workspace_dir()
            .join("monitor/deploy/kubernetes")
            .display()
            .to_string()
            .trim_start_matches('/')
    );
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {base}\ncomponents:\n  - {base}/components/node-labels\n"
        ),
    )
    .unwrap_or_else(|e| panic!("writing the overlay: {e}"));
    k8s.kubectl(&[
        "apply",
        "--server-side",
        "--validate=strict",
        "-k",
        &overlay.path().display().to_string(),
    ]);
    for (ns, before) in namespaces.iter().zip(&before) {
        let after = rights(&k8s, &token, ns);
        let added: BTreeSet<(String, String)> = after.difference(before).cloned().collect();
        let removed: Vec<&(String, String)> = before.difference(&after).collect();
        assert_eq!(added, pairs(&[("nodes", &["patch"])]), "in {ns}");
        assert!(removed.is_empty(), "in {ns}: {removed:?}");
    }
    assert!(can_i(&k8s, &token, "patch", "nodes", None));
    // The DaemonSet now asks for the labels.
    let args = k8s.kubectl(&[
        "get",
        "daemonset",
        "kmod-monitor",
        "--namespace",
        SERVICE_ACCOUNT_NAMESPACE,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ]);
    let args = String::from_utf8_lossy(&args.stdout);
    assert!(args.contains("\"--k8s-node-labels\""), "{args}");
    // A real label write with the token.
    let labelled = k8s.kubectl_with(
        &token,
        &["label", "node", "node-1", "kmod-monitor.io/base=met"],
        None,
    );
    assert!(labelled.status.success(), "{}", text(&labelled));
}
