//! The cluster path: the real daemon watching Longhorn's `v2-data-engine`
//! setting and its own Node's labels through kube-rs.
//!
//! No Kubernetes API server can be installed on the test machines, so the
//! daemon talks (over a kubeconfig, plain HTTP) to `kube_api::FakeKubeApi`,
//! an in-test server that speaks the real list+watch protocol: lists with a
//! resourceVersion, streamed ADDED/MODIFIED/DELETED events, bookmarks, and
//! 410 Gone forcing a relist, with Setting objects shaped like Longhorn's
//! (settings.longhorn.io/v1beta2) and core/v1 Nodes. Alerts go to a real
//! Alertmanager. Every scenario also checks that the base group's result
//! never changes.
use std::{
    ffi::OsString,
    path::Path,
    time::{Duration, Instant},
};

use kmod_monitor_tests::{
    Daemon, FakeHost, args, kmod_monitor,
    kube_api::{FakeKubeApi, Kind, Mode},
    servers::Server,
};
use serde_json::Value;

const NODE: &str = "node-1";
const V2: &str = "v2-data-engine";
/// How long a flip may take to show (watch latency is milliseconds; the
/// margin is for a loaded CI machine).
const FLIP: Duration = Duration::from_secs(5);
/// Retries back off up to 30 s (kube-rs's default); a recovery may wait
/// one full step.
const RECOVER: Duration = Duration::from_secs(45);

struct Cluster {
    api: FakeKubeApi,
    am: Server,
    host: FakeHost,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A Debian 6.1 host (dm_crypt loaded, the V2 modules not), 1024 2 MiB
    /// hugepages, an API server with `v2` as the setting, and an
    /// Alertmanager.
    fn new(api: FakeKubeApi, v2: Option<&str>) -> Self {
        if let Some(v) = v2 {
            api.set_setting(V2, v);
        }
        api.set_setting("data-engine-hugepage-enabled", "true");
        api.set_node(NODE, &[]);
        let host = FakeHost::debian_6_1();
        hugepages(&host, 1024);
        Self {
            api,
            am: Server::alertmanager(),
            host,
            dir: tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")),
        }
    }

    fn log(&self) -> std::path::PathBuf {
        self.dir.path().join("events.jsonl")
    }

    fn daemon(&self, extra: &[OsString]) -> Daemon {
        let kubeconfig = self.api.write_kubeconfig(self.dir.path());
        let mut a = Vec::from(args![
            "--source",
            "poll",
            "--kubeconfig",
            kubeconfig,
            "--node-name",
            NODE,
            "--alertmanager",
            format!("http://127.0.0.1:{}", self.am.port),
            "--alert-resend-interval",
            "1",
            "--event-log",
            self.log()
        ]);
        a.extend(extra.iter().cloned());
        Daemon::start(&self.host, &a)
    }

    /// Active alerts in Alertmanager, as (alertname, requirement, module).
    fn alerts(&self) -> Vec<(String, String, String)> {
        let body = self.am.get_json("/api/v2/alerts");
        let mut out: Vec<_> = body
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["status"]["state"] == "active")
            .map(|a| {
                let l = |k: &str| a["labels"][k].as_str().unwrap_or_default().to_owned();
                (l("alertname"), l("requirement"), l("module"))
            })
            .collect();
        out.sort();
        out
    }

    #[track_caller]
    fn wait_alerts(&self, what: &str, ok: impl Fn(&[(String, String, String)]) -> bool) {
        let deadline = Instant::now() + FLIP;
        loop {
            let alerts = self.alerts();
            if ok(&alerts) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; active alerts: {alerts:?}\n{}",
                self.am.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `requirement_enablement` records as (requirement, was, enabled, source).
    fn enablement_records(&self) -> Vec<(String, Value, Value, String)> {
        let out = kmod_monitor(&args![
            "log",
            "show",
            "--json",
            "--kind",
            "requirement_enablement",
            self.log()
        ]);
        out.expect_code(0);
        out.stdout
            .lines()
            .map(|l| {
                let r: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                let e = &r["enablement"];
                (
                    e["requirement"].as_str().unwrap_or_default().to_owned(),
                    e["was"].clone(),
                    e["enabled"].clone(),
                    e["source"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .filter(|r| r.0 == V2)
            .collect()
    }

    /// `(was, enabled)` of each V2 `requirement_enablement` record.
    fn transitions(&self) -> Vec<(Value, Value)> {
        self.enablement_records()
            .into_iter()
            .map(|r| (r.1, r.2))
            .collect()
    }

    /// Setting lists (not watches) the API server answered since `since`.
    fn setting_lists(&self, since: Option<Instant>) -> usize {
        self.api
            .requests()
            .iter()
            .filter(|r| since.is_none_or(|t| r.at >= t))
            .filter(|r| r.path.contains("/settings") && !r.watch)
            .count()
    }
}

/// Lays out the sysfs 2 MiB pool with `pages` pages, all free.
fn hugepages(host: &FakeHost, pages: u64) {
    let dir = Path::new("sys/kernel/mm/hugepages/hugepages-2048kB");
    for (file, value) in [
        ("nr_hugepages", pages),
        ("free_hugepages", pages),
        ("resv_hugepages", 0),
        ("surplus_hugepages", 0),
    ] {
        host.write(dir.join(file), format!("{value}\n"));
    }
}

fn v2(status: &Value) -> &Value {
    &status["v2"]["enablement"][V2]
}

fn enabled(status: &Value) -> Value {
    v2(status)["enabled"].clone()
}

fn group_names(status: &Value) -> Vec<String> {
    status["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["name"].as_str().map(str::to_owned))
        .collect()
}

/// The base group is there and met: nothing about V2 may touch it.
#[track_caller]
fn base_met(status: &Value) {
    let base = status["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == "base"))
        .unwrap_or_else(|| panic!("no base group in {status:#}"));
    assert_eq!(base["met"], true, "{status:#}");
}

/// The V2 alert of the Debian 6.1 fixture: vfio_pci and nvme_tcp are
/// loaded there, uio_pci_generic is not.
fn v2_unmet_alerts() -> Vec<(String, String, String)> {
    vec![(
        "KernelModuleRequirementUnmet".to_owned(),
        V2.to_owned(),
        "uio_pci_generic".to_owned(),
    )]
}

#[test]
fn setting_flips_true_false_true() {
    let c = Cluster::new(FakeKubeApi::start(), Some("false"));
    let mut d = c.daemon(&[]);
    let s = d.wait_for("V2 off by the setting", FLIP, |s| enabled(s) == false);
    assert_eq!(v2(&s)["source"], "longhorn-setting", "{s:#}");
    assert_eq!(group_names(&s), ["base"]);
    base_met(&s);
    let m = d.metrics();
    assert!(m.contains("kmod_monitor_requirement_enabled{requirement=\"v2-data-engine\",source=\"longhorn-setting\"} 0"), "{m}");
    assert!(
        m.contains("kmod_monitor_longhorn_setting_readable 1"),
        "{m}"
    );
    assert!(
        m.contains("kmod_monitor_hugepages_2mi{kind=\"total\"} 1024"),
        "{m}"
    );

    for (value, on) in [("true", true), ("false", false), ("true", true)] {
        let flipped = Instant::now();
        c.api.set_setting(V2, value);
        let s = d.wait_for(&format!("V2 {value}"), FLIP, |s| enabled(s) == on);
        eprintln!("setting {value} reached /status in {:?}", flipped.elapsed());
        base_met(&s);
        if on {
            assert_eq!(group_names(&s), ["base", V2, "v2-hugepages"], "{s:#}");
            c.wait_alerts("the V2 module alerts", |a| a == v2_unmet_alerts());
        } else {
            assert_eq!(group_names(&s), ["base"]);
            c.wait_alerts("the V2 alerts to resolve", <[_]>::is_empty);
        }
    }
    let m = d.metrics();
    assert!(m.contains("kmod_monitor_requirement_enabled{requirement=\"v2-data-engine\",source=\"longhorn-setting\"} 1"), "{m}");
    assert!(
        m.contains("kmod_monitor_requirement_met{requirement=\"base\"} 1"),
        "{m}"
    );
    let seen: Vec<(Value, Value)> = c
        .enablement_records()
        .into_iter()
        .map(|(_, was, now, source)| {
            assert_eq!(source, "longhorn-setting");
            (was, now)
        })
        .collect();
    assert_eq!(
        seen,
        [
            (Value::Null, false.into()),
            (false.into(), true.into()),
            (true.into(), false.into()),
            (false.into(), true.into()),
        ]
    );
}

#[test]
fn node_label_opts_out_then_back_in() {
    let c = Cluster::new(FakeKubeApi::start(), Some("true"));
    let mut d = c.daemon(&[]);
    d.wait_for("V2 on", FLIP, |s| enabled(s) == true);
    c.wait_alerts("the V2 module alerts", |a| a == v2_unmet_alerts());

    c.api
        .set_node(NODE, &[("node.longhorn.io/disable-v2-data-engine", "true")]);
    let s = d.wait_for("V2 off by the label", FLIP, |s| enabled(s) == false);
    assert_eq!(v2(&s)["source"], "node-label", "{s:#}");
    base_met(&s);
    c.wait_alerts("the V2 alerts to resolve", <[_]>::is_empty);
    // Another node's label is not ours.
    c.api.set_node(
        "node-2",
        &[("node.longhorn.io/disable-v2-data-engine", "true")],
    );

    c.api.set_node(NODE, &[]);
    let s = d.wait_for("V2 on again", FLIP, |s| enabled(s) == true);
    assert_eq!(v2(&s)["source"], "longhorn-setting", "{s:#}");
    base_met(&s);
    c.wait_alerts("the V2 module alerts again", |a| a == v2_unmet_alerts());
    let sources: Vec<String> = c.enablement_records().into_iter().map(|r| r.3).collect();
    assert_eq!(
        sources,
        ["longhorn-setting", "node-label", "longhorn-setting"]
    );
}

#[test]
fn api_server_down_at_start_then_up() {
    let api = FakeKubeApi::reserve();
    let c = Cluster::new(api, Some("true"));
    let mut d = c.daemon(&args!["--longhorn-grace", "1"]);
    let s = d.wait_for("V2 unknown", FLIP, |s| {
        v2(s)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("cannot reach the API server"))
    });
    assert_eq!(enabled(&s), Value::Null, "{s:#}");
    assert_eq!(group_names(&s), ["base"]);
    base_met(&s);
    assert!(
        d.metrics()
            .contains("kmod_monitor_longhorn_setting_readable 0")
    );
    assert!(d.metrics().contains(
        "kmod_monitor_requirement_enabled{requirement=\"v2-data-engine\",source=\"unknown\"} 0"
    ));
    c.wait_alerts("the unreadable alert after the grace period", |a| {
        a.iter()
            .any(|x| x.0 == "KernelModuleMonitorLonghornUnreadable")
    });

    c.api.listen();
    let s = d.wait_for("V2 on once the API is up", RECOVER, |s| enabled(s) == true);
    base_met(&s);
    assert!(
        d.metrics()
            .contains("kmod_monitor_longhorn_setting_readable 1")
    );
    c.wait_alerts("the V2 alerts, and no unreadable alert", |a| {
        a == v2_unmet_alerts()
    });
    let seen = c.transitions();
    assert_eq!(seen, [(Value::Null, true.into())]);
}

/// A failure mode on the settings from the start: unknown with the reason,
/// an alert after the grace period, bounded retries, recovery.
fn settings_unreadable(mode: Mode, reason: &str) {
    let api = FakeKubeApi::start();
    api.set_mode(Kind::Setting, mode);
    let c = Cluster::new(api, Some("true"));
    let mut d = c.daemon(&args!["--longhorn-grace", "2"]);
    let s = d.wait_for("V2 unknown", FLIP, |s| {
        v2(s)["reason"].as_str().is_some_and(|r| r.contains(reason))
    });
    assert_eq!(enabled(&s), Value::Null);
    assert_eq!(group_names(&s), ["base"]);
    base_met(&s);
    assert!(
        d.metrics()
            .contains("kmod_monitor_longhorn_setting_readable 0")
    );
    // Not before the grace period ...
    assert!(
        !c.alerts()
            .iter()
            .any(|x| x.0 == "KernelModuleMonitorLonghornUnreadable"),
        "{:?}",
        c.alerts()
    );
    // ... then yes.
    c.wait_alerts("the unreadable alert", |a| {
        a.iter()
            .any(|x| x.0 == "KernelModuleMonitorLonghornUnreadable")
    });
    // Backoff, not a hot loop: over 8 s, a handful of setting lists.
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    let lists = c.setting_lists(Some(t0));
    assert!(lists <= 8, "{lists} setting lists in 8 s: not backing off");
    assert!(d.is_running(), "the daemon must not exit\n{d}");
    base_met(&d.status());

    c.api.set_mode(Kind::Setting, Mode::Normal);
    let s = d.wait_for("V2 on after the fix", RECOVER, |s| enabled(s) == true);
    base_met(&s);
    c.wait_alerts("the V2 alerts, and no unreadable alert", |a| {
        a == v2_unmet_alerts()
    });
}

#[test]
fn rbac_forbidden() {
    settings_unreadable(Mode::Forbidden, "forbidden by RBAC (403)");
}

#[test]
fn crd_missing() {
    settings_unreadable(Mode::NotFound, "not found (404): is Longhorn installed?");
}

#[test]
fn watch_cut_mid_stream_and_410_relist() {
    let c = Cluster::new(FakeKubeApi::start(), Some("true"));
    let mut d = c.daemon(&[]);
    d.wait_for("V2 on", FLIP, |s| enabled(s) == true);
    c.api.wait_for_watches(Kind::Setting, 1, FLIP);

    // Cut: the watch resumes from its resourceVersion; a change made while
    // it was down still arrives.
    c.api.cut_watches();
    c.api.set_setting(V2, "false");
    let s = d.wait_for("the change made during the cut", RECOVER, |s| {
        enabled(s) == false
    });
    base_met(&s);
    c.api.bookmark();

    // 410 Gone: history expired while the watch was down: it relists.
    c.api.wait_for_watches(Kind::Setting, 1, RECOVER);
    let lists_before = c.setting_lists(None);
    c.api.set_setting(V2, "true");
    c.api.expire_history();
    c.api.cut_watches();
    let s = d.wait_for("V2 on after the relist", RECOVER, |s| enabled(s) == true);
    base_met(&s);
    // The change may have come on the live watch before the cut; the relist
    // after the 410 must follow either way.
    let deadline = Instant::now() + RECOVER;
    loop {
        if c.setting_lists(None) > lists_before {
            break;
        }
        assert!(Instant::now() < deadline, "no relist after 410 Gone");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(enabled(&d.status()), true);
    c.wait_alerts("the V2 module alerts", |a| a == v2_unmet_alerts());
    // A cut is not an outage: never unknown after the first list.
    let seen = c.transitions();
    assert_eq!(
        seen,
        [
            (Value::Null, true.into()),
            (true.into(), false.into()),
            (false.into(), true.into()),
        ]
    );
}

#[test]
fn hugepages_alert_when_v2_is_on_and_the_pool_is_short() {
    let c = Cluster::new(FakeKubeApi::start(), Some("true"));
    hugepages(&c.host, 512);
    let mut d = c.daemon(&args!["--reconcile-interval", "1"]);
    let s = d.wait_for("the hugepage requirement unmet", FLIP, |s| {
        s["groups"].as_array().is_some_and(|g| {
            g.iter()
                .any(|g| g["name"] == "v2-hugepages" && g["met"] == false)
        })
    });
    base_met(&s);
    let mut want = v2_unmet_alerts();
    want.push((
        "KernelModuleMonitorHugepagesInsufficient".to_owned(),
        "v2-hugepages".to_owned(),
        String::new(),
    ));
    want.sort();
    c.wait_alerts("the hugepage alert", |a| a == want);
    // Fixed on the host: the next reconcile sees it.
    hugepages(&c.host, 1024);
    c.wait_alerts("the hugepage alert to resolve", |a| a == v2_unmet_alerts());
    // Longhorn says V2 runs without hugepages: not required at all.
    hugepages(&c.host, 0);
    c.api.set_setting("data-engine-hugepage-enabled", "false");
    let s = d.wait_for("no hugepage requirement", FLIP, |s| {
        s["v2"]["enablement"]["v2-hugepages"]["enabled"] == false
    });
    assert_eq!(group_names(&s), ["base", V2]);
    c.wait_alerts("only the module alerts", |a| a == v2_unmet_alerts());
}

#[test]
fn check_reads_the_cluster_once() {
    let c = Cluster::new(FakeKubeApi::start(), Some("true"));
    let kubeconfig = c.api.write_kubeconfig(c.dir.path());
    let out = kmod_monitor_tests::check(
        &c.host,
        &args![
            "--kubeconfig",
            kubeconfig.as_path(),
            "--node-name",
            NODE,
            "--output",
            "json"
        ],
    );
    out.expect_code(1);
    let r = out.json();
    assert_eq!(r["v2"]["enablement"][V2]["enabled"], true, "{r:#}");
    assert_eq!(r["v2"]["enablement"][V2]["source"], "longhorn-setting");
    let names: Vec<&str> = r["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert_eq!(names, ["base", V2]);
    // Opted out: exit 0, V2 not checked.
    c.api
        .set_node(NODE, &[("node.longhorn.io/disable-v2-data-engine", "true")]);
    let out = kmod_monitor_tests::check(
        &c.host,
        &args!["--kubeconfig", kubeconfig.as_path(), "--node-name", NODE],
    );
    out.expect_code(0);
    assert!(
        out.stdout
            .contains("v2-data-engine: disabled (by node-label"),
        "{out}"
    );
    // Forbidden: V2 unknown, base still judged: exit 0 with a warning.
    c.api.set_mode(Kind::Setting, Mode::Forbidden);
    c.api.set_node(NODE, &[]);
    let out = kmod_monitor_tests::check(
        &c.host,
        &args!["--kubeconfig", kubeconfig.as_path(), "--node-name", NODE],
    );
    out.expect_code(0);
    assert!(out.stdout.contains("v2-data-engine: unknown"), "{out}");
    assert!(out.stdout.contains("forbidden by RBAC (403)"), "{out}");
    // Longhorn not installed: unknown too, as the daemon says, not "no
    // setting".
    c.api.set_mode(Kind::Setting, Mode::NotFound);
    let out = kmod_monitor_tests::check(
        &c.host,
        &args!["--kubeconfig", kubeconfig.as_path(), "--node-name", NODE],
    );
    out.expect_code(0);
    assert!(out.stdout.contains("v2-data-engine: unknown"), "{out}");
    assert!(out.stdout.contains("is Longhorn installed?"), "{out}");
}

#[test]
fn an_unusable_kubeconfig_or_namespace_is_named() {
    let host = FakeHost::debian_6_1();
    let out = kmod_monitor_tests::check(&host, &args!["--kubeconfig", "/nonexistent/kubeconfig"]);
    out.expect_code(2)
        .stderr_has(&["--kubeconfig /nonexistent/kubeconfig", "cannot read it"]);
    out.assert_no_panic();
    let garbage = host.config("clusters: [not a kubeconfig\n");
    let out = kmod_monitor_tests::check(&host, &args!["--kubeconfig", garbage.as_path()]);
    out.expect_code(2)
        .stderr_has(&["--kubeconfig", "cannot read it"]);
    out.assert_no_panic();
    let out = kmod_monitor_tests::check(&host, &args!["--longhorn-namespace", "Longhorn_System"]);
    out.expect_code(2).stderr_has(&[
        "--longhorn-namespace \"Longhorn_System\"",
        "not a Kubernetes namespace name",
    ]);
}

#[test]
fn rbac_revoked_mid_run_then_restored_with_nothing_changed() {
    let c = Cluster::new(FakeKubeApi::start(), Some("true"));
    let mut d = c.daemon(&args!["--longhorn-grace", "1"]);
    d.wait_for("V2 on", FLIP, |s| enabled(s) == true);
    c.wait_alerts("the V2 module alerts", |a| a == v2_unmet_alerts());

    // Revoked: the open watch ends, the re-list is refused.
    c.api.set_mode(Kind::Setting, Mode::Forbidden);
    let s = d.wait_for("V2 unknown", RECOVER, |s| {
        v2(s)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("forbidden by RBAC (403)"))
    });
    assert_eq!(enabled(&s), Value::Null);
    base_met(&s);
    c.wait_alerts("the unreadable alert, and no V2 module alert", |a| {
        a.len() == 1 && a[0].0 == "KernelModuleMonitorLonghornUnreadable"
    });

    // Restored, the setting unchanged: no watch event will say anything,
    // yet V2 must come back.
    c.api.set_mode(Kind::Setting, Mode::Normal);
    let s = d.wait_for("V2 on again", RECOVER, |s| enabled(s) == true);
    base_met(&s);
    assert!(
        d.metrics()
            .contains("kmod_monitor_longhorn_setting_readable 1")
    );
    c.wait_alerts("the V2 module alerts again", |a| a == v2_unmet_alerts());
    let seen = c.transitions();
    assert_eq!(
        seen,
        [
            (Value::Null, true.into()),
            (true.into(), Value::Null),
            (Value::Null, true.into()),
        ]
    );
}
