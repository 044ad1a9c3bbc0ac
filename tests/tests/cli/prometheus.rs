//! Metrics and alerts against the real servers: /metrics as Prometheus
//! scrapes it, the shipped rules evaluated by Prometheus and by
//! `promtool test rules`, and alerts pushed to a real Alertmanager,
//! including one that was down when the requirement broke.
use std::{
    ffi::OsString,
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use kmod_monitor_tests::{Daemon, FakeHost, args, servers::Server, workspace_dir};
use serde_json::Value;

/// A poll-source daemon (one-second period) on `host` with `extra` flags.
fn polling(host: &FakeHost, extra: &[OsString]) -> Daemon {
    let mut args = Vec::from(args!["--source", "poll", "--poll-interval", "1"]);
    args.extend(extra.iter().cloned());
    Daemon::start(host, &args)
}

/// The value of the series whose line starts with `series ` (exact labels).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn wait_metrics(daemon: &Daemon, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = daemon.metrics();
        if ok(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{text}\n{daemon}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Alertmanager's active alerts named `alertname` for `module`.
fn am_alerts(body: &Value, alertname: &str, module: &str) -> Vec<Value> {
    body.as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["labels"]["alertname"] == alertname && a["labels"]["module"] == module)
        .cloned()
        .collect()
}

#[test]
fn metrics_follow_the_host_in_openmetrics() {
    let host = FakeHost::debian_6_1();
    let daemon = polling(&host, &args!["--v2-data-engine"]);
    let url = format!("http://{}/metrics", daemon.addr());
    let resp = ureq::get(&url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = daemon.metrics();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(
        value(&text, r#"kmod_monitor_requirement_met{requirement="base"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            r#"kmod_monitor_requirement_met{requirement="v2-data-engine"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&text, r#"kmod_monitor_event_source_info{source="poll"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(&text, r#"kmod_monitor_event_source_info{source="ebpf"}"#),
        Some(0.0)
    );
    for module in ["dm_crypt", "vfio_pci", "uio_pci_generic", "nvme_tcp"] {
        let states: Vec<f64> = [
            "loaded",
            "builtin",
            "loading",
            "unloading",
            "available",
            "missing",
        ]
        .iter()
        .map(|s| {
            value(
                &text,
                &format!(r#"kmod_monitor_module_state{{module="{module}",state="{s}"}}"#),
            )
            .unwrap_or_else(|| panic!("no {s} series for {module}:\n{text}"))
        })
        .collect();
        assert_eq!(
            states.iter().sum::<f64>(),
            1.0,
            "{module}: exactly one state is 1: {states:?}"
        );
        for event in ["load", "loaded", "load_failed", "unload", "request"] {
            let series =
                format!(r#"kmod_monitor_module_events_total{{module="{module}",event="{event}"}}"#);
            assert_eq!(
                value(&text, &series),
                Some(0.0),
                "{series} exported from the start"
            );
        }
    }
    assert_eq!(value(&text, "kmod_monitor_events_lost_total"), Some(0.0));
    assert_eq!(
        value(&text, "kmod_monitor_reconcile_drift_total"),
        Some(0.0)
    );

    host.unload("dm_crypt");
    let text = wait_metrics(&daemon, "base unmet", |t| {
        value(t, r#"kmod_monitor_requirement_met{requirement="base"}"#) == Some(0.0)
    });
    assert_eq!(
        value(
            &text,
            r#"kmod_monitor_module_state{module="dm_crypt",state="available"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            r#"kmod_monitor_module_events_total{module="dm_crypt",event="unload"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            r#"kmod_monitor_module_loaded{module="dm_crypt",requirement="base"}"#
        ),
        Some(0.0)
    );
    assert!(value(&text, "kmod_monitor_event_delivery_latency_seconds_count") >= Some(1.0));
    assert_eq!(
        value(
            &text,
            r#"kmod_monitor_requirement_met{requirement="v2-data-engine"}"#
        ),
        Some(0.0)
    );
}

#[test]
fn alert_reaches_alertmanager_then_resolves() {
    let am = Server::alertmanager();
    let host = FakeHost::debian_6_1();
    let _daemon = polling(
        &host,
        &args![
            "--alertmanager",
            format!("http://127.0.0.1:{}", am.port),
            "--alert-resend-interval",
            "2",
            "--node-name",
            "node-under-test"
        ],
    );
    let unloaded = Instant::now();
    host.unload("dm_crypt");
    let body = am.wait_for(
        "/api/v2/alerts",
        "the dm_crypt alert",
        Duration::from_secs(2),
        |b| !am_alerts(b, "KernelModuleRequirementUnmet", "dm_crypt").is_empty(),
    );
    let took = unloaded.elapsed();
    let alert = &am_alerts(&body, "KernelModuleRequirementUnmet", "dm_crypt")[0];
    let labels = &alert["labels"];
    assert_eq!(labels["requirement"], "base");
    assert_eq!(labels["instance"], "node-under-test");
    assert_eq!(labels["severity"], "critical");
    let description = alert["annotations"]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(description.contains("modprobe dm_crypt"), "{description}");
    assert!(
        alert["annotations"]["runbook_url"]
            .as_str()
            .is_some_and(|u| u.contains('#'))
    );
    assert_eq!(alert["status"]["state"], "active");
    eprintln!("unload to alert in Alertmanager (1 s poll source): {took:?}");

    host.write(
        "proc/modules",
        kmod_monitor_tests::fixture("proc_modules.debian-6.1"),
    );
    am.wait_for(
        "/api/v2/alerts",
        "the dm_crypt alert to resolve",
        Duration::from_secs(3),
        |b| am_alerts(b, "KernelModuleRequirementUnmet", "dm_crypt").is_empty(),
    );
}

#[test]
fn alert_arrives_after_alertmanager_comes_back() {
    let port = kmod_monitor_tests::free_port();
    let host = FakeHost::debian_6_1();
    let daemon = polling(
        &host,
        &args![
            "--alertmanager",
            format!("http://127.0.0.1:{port}"),
            "--alert-resend-interval",
            "1"
        ],
    );
    host.unload("dm_crypt");
    wait_metrics(
        &daemon,
        "failed deliveries to the absent Alertmanager",
        |t| {
            value(
                t,
                r#"kmod_monitor_alert_deliveries_total{result="failure"}"#,
            ) >= Some(1.0)
        },
    );
    let am = Server::alertmanager_on(port);
    am.wait_for(
        "/api/v2/alerts",
        "the held alert",
        Duration::from_secs(10),
        |b| !am_alerts(b, "KernelModuleRequirementUnmet", "dm_crypt").is_empty(),
    );
    let text = daemon.metrics();
    assert!(
        value(
            &text,
            r#"kmod_monitor_alert_deliveries_total{result="success"}"#
        ) >= Some(1.0)
    );
}

#[test]
fn prometheus_scrapes_and_the_shipped_rules_fire() {
    let rules = workspace_dir().join("monitor/deploy/prometheus/kmod-monitor.rules.yaml");
    let host = FakeHost::debian_6_1();
    // A slow poll and a fast reconcile: the unload is found as drift.
    let daemon = Daemon::start(
        &host,
        &args![
            "--source",
            "poll",
            "--poll-interval",
            "3600",
            "--reconcile-interval",
            "1"
        ],
    );
    let prom = Server::prometheus(&daemon.addr().to_string(), &rules);
    prom.wait_for(
        "/api/v1/query?query=kmod_monitor_requirement_met",
        "a scrape of base met",
        Duration::from_secs(15),
        |b| b["data"]["result"][0]["value"][1] == "1",
    );
    host.unload("dm_crypt");
    let body = prom.wait_for(
        "/api/v1/alerts",
        "unmet and drift alerts",
        Duration::from_secs(20),
        |b| {
            let alerts = b["data"]["alerts"].as_array().cloned().unwrap_or_default();
            let has = |name: &str, state: &str| {
                alerts
                    .iter()
                    .any(|a| a["labels"]["alertname"] == name && a["state"] == state)
            };
            has("KernelModuleMonitorDrift", "firing")
                && has("KernelModuleRequirementUnmet", "pending")
        },
    );
    let unmet = body["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["labels"]["alertname"] == "KernelModuleRequirementUnmet")
        .cloned()
        .unwrap_or_default();
    assert_eq!(unmet["labels"]["module"], "dm_crypt", "{body:#}");
    assert_eq!(unmet["labels"]["requirement"], "base");
    // The severity comes from kmod_monitor_requirement_info, not the rule.
    assert_eq!(unmet["labels"]["severity"], "critical", "{body:#}");
}

#[test]
fn promtool_rule_unit_tests_pass() {
    let dir = workspace_dir().join("monitor/deploy/prometheus");
    let out = Command::new("promtool")
        .args(["test", "rules", "kmod-monitor.rules.test.yaml"])
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| panic!("running promtool (Debian package prometheus): {e}"));
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The PrometheusRule must carry exactly the rules file's groups. Set
/// `KMOD_MONITOR_BLESS=1` to rewrite it after editing the rules.
#[test]
fn prometheusrule_matches_the_rules_file() {
    let root = workspace_dir().join("monitor/deploy");
    let rules = fs::read_to_string(root.join("prometheus/kmod-monitor.rules.yaml"))
        .unwrap_or_else(|e| panic!("reading the rules: {e}"));
    let groups = &rules[rules
        .find("groups:")
        .unwrap_or_else(|| panic!("rules file has no groups:"))..];
    let mut expected = String::from(
        "# Generated from ../prometheus/kmod-monitor.rules.yaml: the same rules for\n\
         # prometheus-operator. A test keeps the two identical; after editing the rules\n\
         # file, regenerate with `KMOD_MONITOR_BLESS=1 cargo test -p kmod-monitor-tests prometheusrule`.\n\
         apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n  name: kmod-monitor\n  \
         labels:\n    app.kubernetes.io/name: kmod-monitor\nspec:\n",
    );
    for line in groups.split_inclusive('\n') {
        if line.trim().is_empty() {
            expected.push_str(line);
        } else {
            expected.push_str("  ");
            expected.push_str(line);
        }
    }
    let path = root.join("kubernetes/prometheusrule.yaml");
    if std::env::var_os("KMOD_MONITOR_BLESS").is_some() {
        fs::write(&path, &expected).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
    let actual =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        actual == expected,
        "{} is out of date with the rules file; run KMOD_MONITOR_BLESS=1 cargo test -p kmod-monitor-tests prometheusrule",
        path.display()
    );
}

/// The metric names of the README's Metrics table, as written there.
fn readme_metrics() -> Vec<String> {
    let readme = fs::read_to_string(workspace_dir().join("README.md"))
        .unwrap_or_else(|e| panic!("README.md: {e}"));
    let table = readme
        .split("### Metrics")
        .nth(1)
        .and_then(|rest| rest.split("\n### ").next())
        .unwrap_or_else(|| panic!("no Metrics section in README.md"));
    let mut names: Vec<String> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `kmod_monitor_"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("kmod_monitor_{n}"))
        .collect();
    names.sort();
    names
}

#[test]
fn the_readme_lists_every_metric_the_daemon_exports_and_no_other() {
    let host = FakeHost::debian_6_1();
    let daemon = polling(&host, &args!["--v2-data-engine"]);
    let text = daemon.metrics();
    // `# TYPE name kind`; a counter's samples (and the README) add `_total`.
    let mut exported: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (name, kind) = (words.next()?, words.next()?);
            Some(if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            })
        })
        .collect();
    exported.sort();
    assert!(exported.len() > 20, "{text}");
    // Only these have no series until there is something to say: the
    // cluster's readability while no cluster is watched.
    let mut documented = readme_metrics();
    let unwatched = [
        "kmod_monitor_longhorn_node_readable",
        "kmod_monitor_longhorn_setting_readable",
    ];
    documented.retain(|m| !unwatched.contains(&m.as_str()));
    assert_eq!(
        documented, exported,
        "README.md's Metrics table and /metrics differ"
    );
}
