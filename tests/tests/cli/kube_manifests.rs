//! `monitor/deploy/kubernetes` against a real kube-apiserver
//! (`kmod_monitor_tests::apiserver`): the kustomization passes the
//! server's own validation (`--dry-run=server`, strict field validation)
//! with the CRDs it needs installed, applies with server-side apply, and
//! the shipped ServiceAccount's token can do what `rbac.yaml` grants and
//! nothing more. The overlay with the optional NetworkPolicy component
//! (`kubernetes-with-network-policy`) validates and applies the same way.
use std::process::Output;

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
    "role.rbac.authorization.k8s.io/kmod-monitor-longhorn-settings",
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

    let can_i = |verb: &str, resource: &str, namespace: Option<&str>| -> bool {
        let mut args = vec!["auth", "can-i", verb, resource];
        if let Some(ns) = namespace {
            args.extend(["--namespace", ns]);
        }
        let out = k8s.kubectl_with(&token, &args, None);
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        match (out.status.code(), answer.as_str()) {
            (Some(0), "yes") => true,
            (Some(1), "no") => false,
            _ => panic!(
                "kubectl auth can-i {verb} {resource} {namespace:?}: {}",
                text(&out)
            ),
        }
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
    // Settings anywhere else, other Longhorn objects, the Node's status,
    // secrets, pods, events: none of it.
    assert!(!can_i("list", settings, Some(SERVICE_ACCOUNT_NAMESPACE)));
    assert!(!can_i(
        "list",
        "volumes.longhorn.io",
        Some(LONGHORN_NAMESPACE)
    ));
    assert!(!can_i("patch", "nodes/status", None));
    assert!(!can_i("get", "secrets", Some(LONGHORN_NAMESPACE)));
    assert!(!can_i("list", "pods", None));
    assert!(!can_i("create", "events", Some(SERVICE_ACCOUNT_NAMESPACE)));

    // Real requests with the token, not only the authorizer's answer.
    let as_daemon = |args: &[&str]| k8s.kubectl_with(&token, args, None);
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
