//! The deployment files under `monitor/deploy/`: the Kubernetes
//! kustomization built by `kubectl kustomize` and validated against the
//! Kubernetes OpenAPI schemas and prometheus-operator's API schema, the
//! least-privilege properties the DaemonSet promises, the systemd unit
//! checked by `systemd-analyze`, and the sample configs parsed by the real
//! binary.
//!
//! The validators come from package registries and are installed by
//! `cargo xtask setup` under `${XDG_CACHE_HOME:-~/.cache}/kmod-monitor/
//! deploy-validate` from the pins in `tests/deploy-validate/`:
//! - `kubernetes-validate` (PyPI) bundles the Kubernetes schemas, so
//!   validation needs no cluster and no network;
//! - `@kubernetes-models/prometheus-operator` (npm) carries the JSON schema
//!   generated from prometheus-operator's API types, which is what its CRDs'
//!   OpenAPI schemas are generated from, for the ServiceMonitor and
//!   PrometheusRule.
use std::{
    collections::{BTreeMap, BTreeSet},
    env,
    ffi::OsString,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use kmod_monitor_tests::{FakeHost, args, check, kmod_monitor, kmod_monitor_bin, workspace_dir};
use serde_json::Value;

/// The Kubernetes versions the manifests must be valid for: the oldest
/// with `recursiveReadOnly` (1.30) to the newest the validator bundles.
const KUBERNETES_VERSIONS: &[&str] = &[
    "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0",
];

/// The capabilities the eBPF source needs (README.md in the kubernetes
/// directory says why each).
const CAPABILITIES: &[&str] = &["BPF", "PERFMON", "SYS_RESOURCE"];

/// The one writable host path.
const EVENT_LOG_DIR: &str = "/var/lib/kmod-monitor";

/// Every host path the DaemonSet mounts, read-only but the event log.
const HOST_PATHS: &[&str] = &[
    "/proc",
    "/sys/module",
    "/sys/kernel/tracing",
    "/sys/kernel/mm",
    "/sys/kernel/iommu_groups",
    "/lib/modules",
    "/usr",
    "/bin",
    "/sbin",
    "/boot",
    "/etc/modules",
    "/etc/modules-load.d",
    "/run/modules-load.d",
    "/lib/modules-load.d",
    "/etc/modprobe.d",
    "/run/modprobe.d",
    "/lib/modprobe.d",
    EVENT_LOG_DIR,
];

fn deploy_dir() -> PathBuf {
    workspace_dir().join("monitor/deploy")
}

/// Where `cargo xtask setup` installs the validators (the same path as
/// `xtask/src/dirs.rs`'s `deploy_validate_dir`).
fn tools_dir() -> PathBuf {
    let cache = match env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(
            env::var_os("HOME").unwrap_or_else(|| panic!("neither XDG_CACHE_HOME nor HOME is set")),
        )
        .join(".cache"),
    };
    cache.join("kmod-monitor/deploy-validate")
}

fn require(path: &Path, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: {what} is installed by `cargo xtask setup`",
        path.display()
    );
    path.to_path_buf()
}

/// Runs `cmd` with `stdin` as its input; panics naming it unless it succeeds.
fn run(cmd: &mut Command, stdin: &[u8]) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {shown}: {e}"));
    child
        .stdin
        .take()
        .unwrap_or_else(|| unreachable!())
        .write_all(stdin)
        .unwrap_or_else(|e| panic!("writing to {shown}: {e}"));
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `kubectl kustomize monitor/deploy/kubernetes`, validated against every
/// version in [`KUBERNETES_VERSIONS`] and prometheus-operator's schema,
/// as JSON documents.
fn built_and_validated() -> Vec<Value> {
    let kustomization = deploy_dir().join("kubernetes");
    let yaml = run(
        Command::new("kubectl").arg("kustomize").arg(&kustomization),
        b"",
    )
    .stdout;

    let tools = tools_dir();
    let python = require(&tools.join("venv/bin/python"), "kubernetes-validate's venv");
    let script = workspace_dir().join("tests/deploy-validate/validate_k8s.py");
    let out = run(
        Command::new(python).arg(script).args(KUBERNETES_VERSIONS),
        &yaml,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The custom resources are left to the next validator, and nothing else.
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            "not validated here: monitoring.coreos.com/v1 PrometheusRule kmod-monitor",
            "not validated here: monitoring.coreos.com/v1 ServiceMonitor kmod-monitor",
        ],
        "validate_k8s.py skipped something else"
    );
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("validate_k8s.py printed no JSON array: {e}"));

    let node_modules = require(
        &tools.join("npm/node_modules/@kubernetes-models/prometheus-operator"),
        "@kubernetes-models/prometheus-operator",
    );
    let node_modules = node_modules
        .ancestors()
        .nth(2)
        .unwrap_or_else(|| unreachable!())
        .to_path_buf();
    let script = workspace_dir().join("tests/deploy-validate/validate_crds.mjs");
    let out = run(
        Command::new("node").arg(script).arg(node_modules),
        &out.stdout,
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        [
            "valid: PrometheusRule kmod-monitor",
            "valid: ServiceMonitor kmod-monitor"
        ]
    );
    docs
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_else(|| panic!("not a string: {v}")))
        .collect()
}

#[test]
fn kubernetes_manifests_are_valid_and_least_privilege() {
    let docs = built_and_validated();
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "PrometheusRule",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ServiceMonitor"
        ])
    );
    for doc in &docs {
        let namespace = match (doc["kind"].as_str(), doc["metadata"]["name"].as_str()) {
            (Some("Namespace" | "ClusterRole" | "ClusterRoleBinding"), _) => Value::Null,
            // Longhorn's settings are read where Longhorn keeps them.
            (Some("Role" | "RoleBinding"), Some("kmod-monitor-longhorn-settings")) => {
                "longhorn-system".into()
            }
            // Events about the (cluster-scoped) Node go to `default`.
            (Some("Role" | "RoleBinding"), Some("kmod-monitor-events")) => "default".into(),
            _ => "kmod-monitor".into(),
        };
        assert_eq!(doc["metadata"]["namespace"], namespace, "{doc}");
    }
    // Least privilege: read the settings and the nodes; patch the nodes'
    // status (the condition); create and patch Events; nothing else.
    let rules_of = |kind: &str, name: &str| -> Vec<(Vec<&str>, Vec<&str>, Vec<&str>)> {
        let doc = docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"));
        doc["rules"]
            .as_array()
            .unwrap_or_else(|| panic!("{kind} {name} has no rules"))
            .iter()
            .map(|r| {
                (
                    strings(&r["apiGroups"]),
                    strings(&r["resources"]),
                    strings(&r["verbs"]),
                )
            })
            .collect()
    };
    let read_only = vec!["get", "list", "watch"];
    assert_eq!(
        rules_of("ClusterRole", "kmod-monitor-nodes"),
        [
            (vec![""], vec!["nodes"], read_only.clone()),
            (vec![""], vec!["nodes/status"], vec!["patch"]),
        ]
    );
    assert_eq!(
        rules_of("Role", "kmod-monitor-longhorn-settings"),
        [(vec!["longhorn.io"], vec!["settings"], read_only)]
    );
    assert_eq!(
        rules_of("Role", "kmod-monitor-events"),
        [(
            vec!["events.k8s.io"],
            vec!["events"],
            vec!["create", "patch"]
        )]
    );
    let roles = docs.iter().filter(|d| d["kind"] == "Role").count();
    let cluster_roles = docs.iter().filter(|d| d["kind"] == "ClusterRole").count();
    assert_eq!((roles, cluster_roles), (2, 1));
    for doc in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
    {
        let subjects = &doc["subjects"];
        assert_eq!(subjects.as_array().map(Vec::len), Some(1), "{subjects}");
        assert_eq!(subjects[0]["kind"], "ServiceAccount");
        assert_eq!(subjects[0]["name"], "kmod-monitor");
        assert_eq!(subjects[0]["namespace"], "kmod-monitor");
        assert_eq!(
            doc["roleRef"]["name"], doc["metadata"]["name"],
            "each binding grants its own role: {doc}"
        );
    }
    assert_eq!(
        one(&docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );

    let ds = one(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    for key in ["hostPID", "hostNetwork", "hostIPC"] {
        assert_ne!(pod[key], true, "{key}");
    }
    // The token is how the daemon reads Longhorn's settings (rbac.yaml).
    assert_eq!(pod["automountServiceAccountToken"], true);
    assert_eq!(pod["serviceAccountName"], "kmod-monitor");
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_ne!(pod["securityContext"]["privileged"], true);
    // Every node: one toleration that matches every taint.
    assert!(
        pod["tolerations"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null())),
        "{}",
        pod["tolerations"]
    );
    // And every architecture: the image is a manifest list for amd64 and
    // arm64, so a mixed cluster gets a pod on every node. Nothing may pick
    // nodes by label (kubernetes.io/arch or otherwise).
    for key in ["nodeSelector", "affinity", "nodeName"] {
        assert!(pod[key].is_null(), "the pod spec sets {key}: {}", pod[key]);
    }
    assert!(
        !ds.to_string().contains("kubernetes.io/arch"),
        "the DaemonSet mentions kubernetes.io/arch: {ds}"
    );

    let containers = pod["containers"]
        .as_array()
        .unwrap_or_else(|| panic!("no containers"));
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(
        c["image"],
        format!(
            "ghcr.io/kmod-monitor/kmod-monitor:{}",
            env!("CARGO_PKG_VERSION")
        ),
        "the image tag follows the workspace version"
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<&str> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    assert_eq!(added, CAPABILITIES.iter().copied().collect());

    let args = strings(&c["args"]);
    assert_eq!(args[0], "run");
    let flags: BTreeMap<&str, &str> = args[1..]
        .chunks(2)
        .map(|pair| (pair[0], pair.get(1).copied().unwrap_or("")))
        .collect();
    assert_eq!(flags["--host-root"], "/host");
    assert_eq!(flags["--listen"], "0.0.0.0:9469");
    assert_eq!(flags["--event-log"], "/var/lib/kmod-monitor/events.jsonl");
    assert_eq!(flags["--config"], "/etc/kmod-monitor/config.toml");
    assert_flags_exist(flags.keys().copied(), "the DaemonSet's args");
    assert_eq!(c["env"][0]["name"], "NODE_NAME");
    assert_eq!(
        c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert_eq!(c["ports"][0]["containerPort"], 9469);
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    for (kind, resource) in [
        ("requests", "cpu"),
        ("requests", "memory"),
        ("limits", "cpu"),
        ("limits", "memory"),
    ] {
        assert!(
            c["resources"][kind][resource].is_string(),
            "{kind}.{resource}"
        );
    }

    // Volumes: host paths read-only, mounted where --host-root expects
    // them, except the event log (writable) and tracefs (where aya looks).
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("no volumes"))
        .iter()
        .map(|v| (v["name"].as_str().unwrap_or_default(), v))
        .collect();
    let mut host_paths = BTreeSet::new();
    for mount in c["volumeMounts"]
        .as_array()
        .unwrap_or_else(|| panic!("no mounts"))
    {
        let name = mount["name"].as_str().unwrap_or_default();
        let mount_path = mount["mountPath"].as_str().unwrap_or_default();
        let volume = volumes
            .get(name)
            .unwrap_or_else(|| panic!("mount {name} has no volume"));
        if volume["configMap"].is_object() {
            assert_eq!(mount_path, "/etc/kmod-monitor");
            assert_eq!(mount["readOnly"], true);
            continue;
        }
        let host_path = volume["hostPath"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("volume {name} is neither a ConfigMap nor a hostPath"));
        host_paths.insert(host_path);
        assert!(
            ["Directory", "DirectoryOrCreate", "FileOrCreate"]
                .contains(&volume["hostPath"]["type"].as_str().unwrap_or_default()),
            "{name}: hostPath type {}",
            volume["hostPath"]["type"]
        );
        if host_path == EVENT_LOG_DIR {
            assert_eq!(mount_path, EVENT_LOG_DIR);
            assert_ne!(mount["readOnly"], true, "the event log is writable");
            continue;
        }
        assert_eq!(mount["readOnly"], true, "{host_path} is mounted read-only");
        if host_path == "/sys/kernel/tracing" {
            assert_eq!(mount_path, host_path);
        } else {
            assert_eq!(
                mount_path,
                format!("/host{host_path}"),
                "{host_path} is where --host-root /host reads it"
            );
        }
    }
    assert_eq!(host_paths, HOST_PATHS.iter().copied().collect());

    // The config file comes from the generated ConfigMap.
    let cm = one(&docs, "ConfigMap");
    let cm_name = cm["metadata"]["name"].as_str().unwrap_or_default();
    assert!(cm_name.starts_with("kmod-monitor-config-"), "{cm_name}");
    assert_eq!(volumes["config"]["configMap"]["name"], cm_name);
    let shipped = fs::read_to_string(deploy_dir().join("kubernetes/config.toml"))
        .unwrap_or_else(|e| panic!("reading config.toml: {e}"));
    assert_eq!(cm["data"]["config.toml"], shipped.as_str());

    // Service -> pods, ServiceMonitor -> Service, and the labels the shipped
    // rules and the pushed alerts use.
    let svc = one(&docs, "Service");
    assert_eq!(svc["spec"]["ports"][0]["name"], "metrics");
    assert_eq!(svc["spec"]["ports"][0]["port"], 9469);
    for (key, value) in svc["spec"]["selector"]
        .as_object()
        .unwrap_or_else(|| panic!("no selector"))
    {
        assert_eq!(&pod_labels[key], value, "Service selector {key}");
    }
    let sm = one(&docs, "ServiceMonitor");
    for (key, value) in sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap_or_else(|| panic!("no ServiceMonitor selector"))
    {
        assert_eq!(
            &svc["metadata"]["labels"][key], value,
            "ServiceMonitor selector {key}"
        );
    }
    let job_label = sm["spec"]["jobLabel"].as_str().unwrap_or_default();
    assert_eq!(
        svc["metadata"]["labels"][job_label], "kmod-monitor",
        "jobLabel {job_label:?} gives job=\"kmod-monitor\", which the rules match"
    );
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(endpoint["path"], "/metrics");
    assert!(
        endpoint["relabelings"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| {
                r["targetLabel"] == "instance"
                    && r["sourceLabels"] == serde_json::json!(["__meta_kubernetes_pod_node_name"])
                    && (r["action"].is_null() || r["action"] == "replace")
            })),
        "instance is relabelled to the node name: {}",
        endpoint["relabelings"]
    );
    let rules = one(&docs, "PrometheusRule");
    assert!(
        rules.to_string().contains(r#"job=\"kmod-monitor\""#),
        "the rules match job=\"kmod-monitor\""
    );
}

/// Asserts `kmod-monitor run --help` knows every flag in `flags`.
fn assert_flags_exist<'a>(flags: impl IntoIterator<Item = &'a str>, whose: &str) {
    let help = kmod_monitor(&args!["run", "--help"]);
    help.expect_code(0);
    for flag in flags {
        assert!(
            help.stdout.contains(&format!("{flag} ")) || help.stdout.contains(&format!("{flag}=")),
            "{whose} pass {flag}, which `kmod-monitor run` does not know:\n{}",
            help.stdout
        );
    }
}

/// `[Section] Key=value` lines of a unit file, `(section, key, value)`, in
/// order; comments and blank lines dropped.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("kmod-monitor.service line {}: no '=': {line}", index + 1));
        assert!(
            !section.is_empty(),
            "line {}: key before any section",
            index + 1
        );
        entries.push((
            section.clone(),
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    entries
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let path = deploy_dir().join("systemd/kmod-monitor.service");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));

    // What the unit promises, checked on its text whatever systemd says.
    let entries = unit_entries(&text);
    let service = |key: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|(s, k, _)| s == "Service" && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    let expect = [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelTunables", "yes"),
        // Would hide /usr/lib/modules, which the daemon reads.
        ("ProtectKernelModules", "no"),
        ("ReadWritePaths", EVENT_LOG_DIR),
        ("StateDirectory", "kmod-monitor"),
        ("Restart", "on-failure"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("LimitMEMLOCK", "infinity"),
    ];
    for (key, value) in expect {
        assert_eq!(service(key), [value], "{key}");
    }
    let caps: BTreeSet<&str> = service("CapabilityBoundingSet")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    assert_eq!(caps, BTreeSet::from(["CAP_BPF", "CAP_PERFMON"]));
    assert_eq!(
        service("User"),
        [] as [&str; 0],
        "runs as root (tracefs is root-only)"
    );
    let exec = service("ExecStart");
    assert_eq!(exec.len(), 1);
    let argv: Vec<&str> = exec[0].split_whitespace().collect();
    assert_eq!(argv[..2], ["/usr/local/bin/kmod-monitor", "run"]);
    assert_eq!(
        argv[2..],
        [
            "--config",
            "/etc/kmod-monitor/config.toml",
            "--event-log",
            "/var/lib/kmod-monitor/events.jsonl"
        ]
    );
    assert_flags_exist(["--config", "--event-log"], "the unit's ExecStart");

    // systemd's own reading. verify exits 0 even for unknown keys and
    // unparsable values (it only warns), so any output is a failure. The
    // binary must exist, so the copy runs the one just built.
    let analyze = Path::new("/usr/bin/systemd-analyze");
    assert!(
        analyze.exists(),
        "{} is missing: install Debian's systemd package (`cargo xtask setup` does); without \
         it the unit is checked only by the key assertions above",
        analyze.display()
    );
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let copy = dir.path().join("kmod-monitor.service");
    fs::write(
        &copy,
        text.replace(
            "/usr/local/bin/kmod-monitor",
            &kmod_monitor_bin().display().to_string(),
        ),
    )
    .unwrap_or_else(|e| panic!("writing {}: {e}", copy.display()));
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap_or_else(|e| panic!("running systemd-analyze verify: {e}"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {} ({}):\n{said}",
        path.display(),
        out.status
    );

    // The exposure score of `systemd-analyze security` (0 = fully locked
    // down, 10 = none): what the hardening buys, pinned so that dropping a
    // setting fails here.
    let out = Command::new(analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy)
        .output()
        .unwrap_or_else(|e| panic!("running systemd-analyze security: {e}"));
    let report = String::from_utf8_lossy(&out.stdout);
    let score: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for kmod-monitor.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(score <= 3.0, "exposure {score} > 3.0:\n{report}");
}

#[test]
fn sample_configs_are_accepted_by_the_binary() {
    let host = FakeHost::debian_6_1();
    for rel in ["systemd/config.toml", "kubernetes/config.toml"] {
        let path = deploy_dir().join(rel);
        let out = check(&host, &args![OsString::from("--config"), path.clone()]);
        // 0 or 1 is a verdict on the host; 2 is a rejected config.
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "{} is rejected:\n{out}",
            path.display()
        );
    }
}

/// One instruction of a Containerfile, continuation lines joined.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(
        current.is_empty(),
        "a continued line ends the file: {current}"
    );
    out
}

/// The platforms of the image's manifest list, with the static binary
/// `cargo xtask build` makes for each (`xtask/src/arch.rs`).
const PLATFORMS: &[(&str, &str)] = &[
    (
        "amd64",
        "target/x86_64-unknown-linux-musl/release/kmod-monitor",
    ),
    (
        "arm64",
        "target/aarch64-unknown-linux-musl/release/kmod-monitor",
    ),
];

#[test]
fn container_file_builds_one_scratch_image_per_platform() {
    let path = deploy_dir().join("container/Containerfile");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let all = instructions(&text);
    // Stages: (FROM argument, instructions after it).
    let mut global = Vec::new();
    let mut stages: Vec<(String, Vec<String>)> = Vec::new();
    for ins in &all {
        if let Some(from) = ins.strip_prefix("FROM ") {
            stages.push((from.trim().to_owned(), Vec::new()));
        } else if let Some((_, body)) = stages.last_mut() {
            body.push(ins.clone());
        } else {
            global.push(ins.clone());
        }
    }
    // TARGETARCH, which BuildKit and buildah set per platform, is declared
    // where a FROM can use it.
    assert_eq!(global, ["ARG TARGETARCH"], "{text}");
    // Nothing runs at build time, so no emulator is needed for arm64.
    assert!(!all.iter().any(|i| i.starts_with("RUN")), "{text}");
    let (last_from, last) = stages.last().unwrap_or_else(|| panic!("no FROM: {text}"));
    assert_eq!(last_from, "binary-${TARGETARCH}", "{text}");
    assert!(
        last.contains(&r#"ENTRYPOINT ["/usr/local/bin/kmod-monitor"]"#.to_owned()),
        "{text}"
    );
    assert!(!last.iter().any(|i| i.starts_with("COPY")), "{text}");
    // Every platform's final image is a FROM-scratch stage holding exactly
    // that platform's static binary, and the build context references
    // both binaries and nothing else.
    let mut sources = Vec::new();
    for (arch, binary) in PLATFORMS {
        let name = last_from.replace("${TARGETARCH}", arch);
        let (from, body) = stages
            .iter()
            .find(|(from, _)| *from == format!("scratch AS {name}"))
            .unwrap_or_else(|| panic!("no `FROM scratch AS {name}` stage for {arch}: {text}"));
        assert_eq!(
            body,
            &[format!("COPY {binary} /usr/local/bin/kmod-monitor")],
            "{from}"
        );
    }
    for ins in &all {
        if let Some(copy) = ins.strip_prefix("COPY ") {
            sources.push(
                copy.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    sources.sort();
    let mut wanted: Vec<String> = PLATFORMS.iter().map(|(_, b)| (*b).to_owned()).collect();
    wanted.sort();
    assert_eq!(sources, wanted, "{text}");
}

/// The value of the first `key:` line in `yaml` after the line `after:`
/// (a plain text scan, enough for the shipped files).
fn yaml_value<'a>(yaml: &'a str, after: &str, key: &str) -> &'a str {
    yaml.lines()
        .skip_while(|l| l.trim() != format!("{after}:"))
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .map(|v| v.split('#').next().unwrap_or(v).trim())
        .unwrap_or_else(|| panic!("no {key}: after {after}: in:\n{yaml}"))
}

#[test]
fn kubernetes_readme_matches_the_manifests() {
    let dir = deploy_dir().join("kubernetes");
    let read =
        |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let readme = read("README.md");
    let daemonset = read("daemonset.yaml");
    let rbac = read("rbac.yaml");
    // The token: what the README says the pod does is what it does.
    let automount = daemonset
        .lines()
        .find_map(|l| l.trim().strip_prefix("automountServiceAccountToken:"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("daemonset.yaml sets no automountServiceAccountToken"));
    assert!(
        readme.contains(&format!("`automountServiceAccountToken: {automount}`")),
        "the README must state automountServiceAccountToken: {automount}"
    );
    assert!(
        !readme.contains("no token and no role")
            && !readme.contains("never calls the\n  Kubernetes API"),
        "the README still says the pod has no token"
    );
    // The roles rbac.yaml grants (their exact rules are asserted in
    // `kubernetes_manifests_are_valid_and_least_privilege`), and that the
    // README names every verb they grant.
    for kind in ["ClusterRole", "Role"] {
        assert!(
            rbac.contains(&format!("kind: {kind}\n")),
            "rbac.yaml has a {kind}"
        );
        assert!(readme.contains(kind), "the README names the {kind}");
    }
    assert!(
        !readme.contains("no write verb anywhere"),
        "the README says the token cannot write"
    );
    for line in rbac.lines().filter(|l| l.trim().starts_with("verbs:")) {
        for verb in ["get", "list", "watch", "create", "patch"] {
            if line.contains(&format!("\"{verb}\"")) {
                assert!(readme.contains(verb), "the README never says {verb}");
            }
        }
    }
    // Requests and limits.
    let requests = (
        yaml_value(&daemonset, "requests", "cpu"),
        yaml_value(&daemonset, "requests", "memory"),
    );
    let limits = (
        yaml_value(&daemonset, "limits", "cpu"),
        yaml_value(&daemonset, "limits", "memory"),
    );
    let said = format!(
        "The requests are {} CPU and {} of memory; the limits are {} and {}.",
        requests.0, requests.1, limits.0, limits.1
    );
    assert!(readme.contains(&said), "the README must say: {said}");
}
