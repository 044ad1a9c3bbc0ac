//! The cluster path: the real daemon watching Longhorn's `v2-data-engine`
//! setting and its own Node's labels through kube-rs, against a real
//! kube-apiserver and etcd (`kmod_monitor_tests::apiserver`).
//!
//! Each scenario gets its own control plane with Longhorn's Setting CRD
//! (a copy of Longhorn's own), the daemon's namespace, ServiceAccount and
//! `rbac.yaml` applied as shipped, and a Node. The daemon runs with a token
//! of that ServiceAccount, so it can do what the shipped RBAC grants and
//! nothing else. Failures are made the way a cluster makes them: the
//! apiserver stopped and started, the RoleBinding deleted and re-applied,
//! the CRD not installed yet, the apiserver's connections cut (as a load
//! balancer drops them), etcd compacted. Alerts go to a real Alertmanager. Every
//! scenario also checks that the base group's result never changes.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use kmod_monitor_tests::{
    Daemon, FakeHost,
    apiserver::{
        ControlPlane, LONGHORN_CRD, LONGHORN_NAMESPACE, Options, SETTINGS_ROLEBINDING, rbac_yaml,
    },
    args, kmod_monitor,
    servers::Server,
};
use serde_json::{Value, json};

const NODE: &str = "node-1";
const V2: &str = "v2-data-engine";
const HUGEPAGE_SETTING: &str = "data-engine-hugepage-enabled";
/// How long a flip may take to show (watch latency is milliseconds; the
/// margin is for a loaded CI machine).
const FLIP: Duration = Duration::from_secs(5);
/// Retries back off up to 30 s (kube-rs's default); a recovery may wait
/// one full step.
const RECOVER: Duration = Duration::from_secs(45);

struct Cluster {
    k8s: ControlPlane,
    /// The shipped ServiceAccount's token.
    kubeconfig: PathBuf,
    am: Server,
    host: FakeHost,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A node that meets everything but V2's modules: the Debian 6.12 guest
    /// (dm_crypt, nvme_tcp and vfio_pci loaded, uio_pci_generic not), IOMMU
    /// groups, Longhorn's host packages, 1024 2 MiB hugepages that the
    /// kubelet registered; a control plane with Longhorn's CRD, `v2` as the
    /// setting, and an Alertmanager. Each scenario changes one thing.
    fn new(v2: Option<&str>) -> Self {
        Self::with(Options::default(), true, v2)
    }

    /// Like [`new`](Self::new); without `longhorn`, the Setting CRD is not
    /// installed (and there are no settings).
    fn with(options: Options, longhorn: bool, v2: Option<&str>) -> Self {
        let k8s = ControlPlane::start_with(options);
        k8s.namespace(LONGHORN_NAMESPACE);
        if longhorn {
            k8s.install_crds(&[LONGHORN_CRD]);
            if let Some(v) = v2 {
                k8s.set_setting(V2, v);
            }
            k8s.set_setting(HUGEPAGE_SETTING, "true");
        }
        k8s.apply_daemon_rbac();
        k8s.set_node(NODE, &[]);
        k8s.set_node_hugepages(NODE, "2Gi");
        let kubeconfig = k8s.service_account_kubeconfig();
        let host = FakeHost::debian_6_12();
        host.with_longhorn_packages();
        host.write("sys/kernel/iommu_groups/0/type", "DMA\n");
        hugepages(&host, 1024);
        Self {
            k8s,
            kubeconfig,
            am: Server::alertmanager(),
            host,
            dir: tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")),
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("events.jsonl")
    }

    fn daemon(&self, extra: &[OsString]) -> Daemon {
        let mut a = Vec::from(args![
            "--source",
            "poll",
            "--kubeconfig",
            self.kubeconfig.as_path(),
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

    /// Takes the daemon's right to read the settings away, as an admin
    /// would: the shipped RoleBinding is deleted.
    fn revoke_rbac(&self) {
        self.k8s.delete(SETTINGS_ROLEBINDING);
    }

    /// Gives it back: `rbac.yaml` re-applied as shipped.
    fn restore_rbac(&self) {
        let rbac = rbac_yaml();
        self.k8s
            .kubectl(&["apply", "--server-side", "-f", &rbac.display().to_string()]);
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

    /// Waits until the daemon's requests of `verb` on settings, counted
    /// by the apiserver's audit log, exceed `than`.
    #[track_caller]
    fn wait_requests(&self, verb: &str, than: usize, d: &Daemon) {
        let deadline = Instant::now() + RECOVER;
        loop {
            let n = self.k8s.daemon_requests(verb, "settings");
            if n > than {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon made no new settings {verb} (still {n})\n{d}\n{}",
                self.k8s.logs()
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

/// The requirements while V2 is off: the base and V1 groups, the host
/// checks.
const V2_OFF: [&str; 5] = [
    "base",
    "v1-iscsi",
    "rwx-nfs-client",
    "host-commands",
    "multipathd",
];

/// The requirements while V2 is on with hugepages (CPU is not judged: the
/// fixture has no /proc/cpuinfo).
const V2_ON: [&str; 10] = [
    "base",
    V2,
    "v1-iscsi",
    "rwx-nfs-client",
    "v2-kernel",
    "v2-iommu",
    "v2-hugepages",
    "v2-hugepages-kubelet",
    "host-commands",
    "multipathd",
];

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
    let c = Cluster::new(Some("false"));
    let mut d = c.daemon(&[]);
    let s = d.wait_for("V2 off by the setting", FLIP, |s| enabled(s) == false);
    assert_eq!(v2(&s)["source"], "longhorn-setting", "{s:#}");
    assert_eq!(group_names(&s), V2_OFF);
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
        c.k8s.set_setting(V2, value);
        let s = d.wait_for(&format!("V2 {value}"), FLIP, |s| enabled(s) == on);
        eprintln!(
            "setting {value} written and reached /status in {:?}",
            flipped.elapsed()
        );
        base_met(&s);
        if on {
            assert_eq!(group_names(&s), V2_ON, "{s:#}");
            c.wait_alerts("the V2 module alerts", |a| a == v2_unmet_alerts());
        } else {
            assert_eq!(group_names(&s), V2_OFF);
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
    let c = Cluster::new(Some("true"));
    let mut d = c.daemon(&[]);
    d.wait_for("V2 on", FLIP, |s| enabled(s) == true);
    c.wait_alerts("the V2 module alerts", |a| a == v2_unmet_alerts());

    c.k8s
        .set_node(NODE, &[("node.longhorn.io/disable-v2-data-engine", "true")]);
    let s = d.wait_for("V2 off by the label", FLIP, |s| enabled(s) == false);
    assert_eq!(v2(&s)["source"], "node-label", "{s:#}");
    base_met(&s);
    c.wait_alerts("the V2 alerts to resolve", <[_]>::is_empty);
    // Another node's label is not ours.
    c.k8s.set_node(
        "node-2",
        &[("node.longhorn.io/disable-v2-data-engine", "true")],
    );

    // Apply drops the label the harness no longer sets.
    c.k8s.set_node(NODE, &[]);
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
    let mut c = Cluster::new(Some("true"));
    c.k8s.stop_apiserver();
    let mut d = c.daemon(&args!["--longhorn-grace", "1"]);
    let s = d.wait_for("V2 unknown", FLIP, |s| {
        v2(s)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("cannot reach the API server"))
    });
    assert_eq!(enabled(&s), Value::Null, "{s:#}");
    assert_eq!(group_names(&s), V2_OFF);
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

    // The same port, the same etcd data.
    c.k8s.start_apiserver();
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

/// The settings unreadable from the start: unknown with the reason, an
/// alert after the grace period, bounded retries; `fix` makes them
/// readable, and V2 comes on.
fn settings_unreadable(c: &Cluster, reason: &str, fix: impl FnOnce()) {
    let mut d = c.daemon(&args!["--longhorn-grace", "2"]);
    let s = d.wait_for("V2 unknown", FLIP, |s| {
        v2(s)["reason"].as_str().is_some_and(|r| r.contains(reason))
    });
    assert_eq!(enabled(&s), Value::Null);
    assert_eq!(group_names(&s), V2_OFF);
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
    // Backoff, not a hot loop: over 8 s, a handful of setting lists, as
    // the apiserver's audit log counts them.
    let before = c.k8s.daemon_requests("list", "settings");
    std::thread::sleep(Duration::from_secs(8));
    let lists = c.k8s.daemon_requests("list", "settings") - before;
    assert!(lists <= 8, "{lists} setting lists in 8 s: not backing off");
    assert!(lists >= 1, "no setting list in 8 s: not retrying");
    assert!(d.is_running(), "the daemon must not exit\n{d}");
    base_met(&d.status());

    fix();
    let s = d.wait_for("V2 on after the fix", RECOVER, |s| enabled(s) == true);
    base_met(&s);
    c.wait_alerts("the V2 alerts, and no unreadable alert", |a| {
        a == v2_unmet_alerts()
    });
}

#[test]
fn rbac_forbidden() {
    let c = Cluster::new(Some("true"));
    c.revoke_rbac();
    settings_unreadable(&c, "forbidden by RBAC (403)", || c.restore_rbac());
}

#[test]
fn crd_missing() {
    let c = Cluster::with(Options::default(), false, None);
    settings_unreadable(&c, "not found (404): is Longhorn installed?", || {
        // Longhorn installed: its CRD, then its settings.
        c.k8s.install_crds(&[LONGHORN_CRD]);
        c.k8s.set_setting(HUGEPAGE_SETTING, "true");
        c.k8s.set_setting(V2, "true");
    });
}

/// Moves etcd's revision on by writing something the daemon does not
/// watch.
fn unrelated_writes(k8s: &ControlPlane, n: usize) {
    for i in 0..n {
        k8s.apply(
            "/api/v1/namespaces/default/configmaps/unrelated",
            &json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "unrelated", "namespace": "default"},
                "data": {"i": i.to_string()},
            }),
        );
    }
}

/// The watch cache is off here, so etcd serves every watch and its
/// history decides whether a resourceVersion is still good (with the
/// cache on, the cache's own window decides, and compaction plays no
/// part).
#[test]
fn watch_cut_resumes_and_a_compaction_forces_a_relist() {
    let c = Cluster::with(Options { watch_cache: false }, true, Some("true"));
    let mut d = c.daemon(&[]);
    d.wait_for("V2 on", FLIP, |s| enabled(s) == true);
    c.wait_requests("watch", 0, &d);

    // The connections are cut; the change made meanwhile still arrives,
    // through the watch resumed from its resourceVersion: no relist.
    let lists = c.k8s.daemon_requests("list", "settings");
    let watches = c.k8s.daemon_requests("watch", "settings");
    c.k8s.cut_connections();
    c.k8s.set_setting(V2, "false");
    let s = d.wait_for("the change made across the cut", RECOVER, |s| {
        enabled(s) == false
    });
    base_met(&s);
    c.wait_requests("watch", watches, &d);
    assert_eq!(
        c.k8s.daemon_requests("list", "settings"),
        lists,
        "a cut watch must resume, not relist\n{d}"
    );

    // History compacted past the daemon's resourceVersion, then another
    // cut: the resumed watch gets 410 Gone, and the daemon relists.
    unrelated_writes(&c.k8s, 3);
    let revision = c.k8s.compact_etcd();
    eprintln!("etcd compacted at revision {revision}");
    c.k8s.cut_connections();
    c.k8s.set_setting(V2, "true");
    c.wait_requests("list", lists, &d);
    let s = d.wait_for("V2 on after the relist", RECOVER, |s| enabled(s) == true);
    base_met(&s);
    c.wait_alerts("the V2 module alerts", |a| a == v2_unmet_alerts());
    // A cut is not an outage: never unknown after the first list.
    let seen = c.transitions();
    assert_eq!(
        seen,
        [
            (Value::Null, true.into()),
            (true.into(), false.into()),
            (false.into(), true.into()),
        ],
        "{d}"
    );
}

/// How long the daemon keeps its last view through a connection-level
/// failure (`CONNECTION_GRACE` in monitor/src/longhorn/watch.rs).
const CONNECTION_GRACE: Duration = Duration::from_secs(30);

#[test]
fn watch_cut_by_an_apiserver_restart() {
    let mut c = Cluster::new(Some("true"));
    let mut d = c.daemon(&[]);
    d.wait_for("V2 on", FLIP, |s| enabled(s) == true);
    // The only apiserver goes down for longer than the connection grace:
    // the watch is cut, and once the grace is over the daemon cannot know
    // (unknown); once it is back, a change arrives.
    c.k8s.stop_apiserver();
    d.wait_for("V2 unknown while the API is down", RECOVER, |s| {
        v2(s)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("cannot reach the API server"))
    });
    c.k8s.start_apiserver();
    d.wait_for("V2 on once the API is back", RECOVER, |s| {
        enabled(s) == true
    });
    c.k8s.set_setting(V2, "false");
    let s = d.wait_for("the change after the restart", FLIP, |s| {
        enabled(s) == false
    });
    base_met(&s);
    assert_eq!(
        c.transitions(),
        [
            (Value::Null, true.into()),
            (true.into(), Value::Null),
            (Value::Null, true.into()),
            (true.into(), false.into()),
        ]
    );
}

/// A restart shorter than the connection grace (one apiserver, as in a
/// rolling upgrade of a small control plane): the daemon keeps its last
/// view, V2 never goes unknown and its alerts never resolve; the watch is
/// rebuilt with a fresh list once the server is back.
#[test]
fn an_apiserver_restart_within_the_grace_keeps_the_last_view() {
    let mut c = Cluster::new(Some("true"));
    let mut d = c.daemon(&[]);
    d.wait_for("V2 on", FLIP, |s| enabled(s) == true);
    c.wait_alerts("the V2 module alerts", |a| a == v2_unmet_alerts());
    let lists = c.k8s.daemon_requests("list", "settings");
    let down = Instant::now();
    c.k8s.stop_apiserver();
    d.wait_for_stderr("keeping_the_last_view_for", FLIP);
    // Down, and failing to reach it: still on, the alerts still firing.
    std::thread::sleep(Duration::from_secs(2));
    let s = d.status();
    assert_eq!(enabled(&s), true, "{s:#}");
    base_met(&s);
    assert!(
        d.metrics()
            .contains("kmod_monitor_longhorn_setting_readable 1")
    );
    c.wait_alerts("the V2 alerts during the restart", |a| {
        a == v2_unmet_alerts()
    });
    c.k8s.start_apiserver();
    let outage = down.elapsed();
    eprintln!("apiserver down for {:.1} s", outage.as_secs_f64());
    assert!(
        outage < CONNECTION_GRACE,
        "the restart took {outage:?}, longer than the grace this test is about"
    );
    c.wait_requests("list", lists, &d);
    // A change after the restart arrives.
    c.k8s.set_setting(V2, "false");
    let s = d.wait_for("the change after the restart", FLIP, |s| {
        enabled(s) == false
    });
    base_met(&s);
    assert_eq!(
        c.transitions(),
        [(Value::Null, true.into()), (true.into(), false.into())],
        "V2 went unknown during the restart\n{d}"
    );
}

#[test]
fn hugepages_alert_when_v2_is_on_and_the_pool_is_short() {
    let c = Cluster::new(Some("true"));
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
    c.k8s.set_setting(HUGEPAGE_SETTING, "false");
    let s = d.wait_for("no hugepage requirement", FLIP, |s| {
        s["v2"]["enablement"]["v2-hugepages"]["enabled"] == false
    });
    assert_eq!(
        group_names(&s),
        V2_ON
            .iter()
            .filter(|n| !n.starts_with("v2-hugepages"))
            .copied()
            .collect::<Vec<_>>()
    );
    c.wait_alerts("only the module alerts", |a| a == v2_unmet_alerts());
}

#[test]
fn check_reads_the_cluster_once() {
    let c = Cluster::new(Some("true"));
    let kubeconfig: &Path = &c.kubeconfig;
    let out = kmod_monitor_tests::check(
        &c.host,
        &args![
            "--kubeconfig",
            kubeconfig,
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
    assert_eq!(names, V2_ON, "{r:#}");
    // check judges the kubelet's hugepages as the daemon does, from one
    // read of the Node.
    let kubelet = r["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["name"] == "v2-hugepages-kubelet")
        .cloned()
        .unwrap_or_default();
    assert_eq!(kubelet["met"], true, "{kubelet:#}");
    // Opted out: exit 0, V2 not checked.
    c.k8s
        .set_node(NODE, &[("node.longhorn.io/disable-v2-data-engine", "true")]);
    let out = kmod_monitor_tests::check(
        &c.host,
        &args!["--kubeconfig", kubeconfig, "--node-name", NODE],
    );
    out.expect_code(0);
    assert!(
        out.stdout
            .contains("v2-data-engine: disabled (by node-label"),
        "{out}"
    );
    // Forbidden: V2 unknown, base still judged: exit 0 with a warning.
    c.revoke_rbac();
    c.k8s.set_node(NODE, &[]);
    let out = kmod_monitor_tests::check(
        &c.host,
        &args!["--kubeconfig", kubeconfig, "--node-name", NODE],
    );
    out.expect_code(0);
    assert!(out.stdout.contains("v2-data-engine: unknown"), "{out}");
    assert!(out.stdout.contains("forbidden by RBAC (403)"), "{out}");
    // Longhorn not installed: unknown too, as the daemon says, not "no
    // setting".
    c.restore_rbac();
    c.k8s.kubectl(&[
        "delete",
        "--wait",
        "customresourcedefinition",
        "settings.longhorn.io",
    ]);
    let out = kmod_monitor_tests::check(
        &c.host,
        &args!["--kubeconfig", kubeconfig, "--node-name", NODE],
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
    let c = Cluster::new(Some("true"));
    let mut d = c.daemon(&args!["--longhorn-grace", "1"]);
    d.wait_for("V2 on", FLIP, |s| enabled(s) == true);
    c.wait_alerts("the V2 module alerts", |a| a == v2_unmet_alerts());

    // Revoked. An apiserver authorizes a watch when it starts, so the open
    // one goes on; the next watch start is refused. In a cluster that is
    // at the latest when the watch times out (kube-rs asks for 290 s);
    // here the connections are cut at once.
    c.revoke_rbac();
    c.k8s.cut_connections();
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
    c.restore_rbac();
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

/// `(met, level)` of requirement `name` in a /status or check report.
fn item(status: &Value, name: &str) -> (Value, Value) {
    let g = status["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {status:#}"));
    (g["met"].clone(), g["check"]["level"].clone())
}

#[test]
fn the_clusters_longhorn_version_and_memory_size_drive_the_table() {
    let c = Cluster::new(Some("true"));
    let mut d = c.daemon(&args!["--reconcile-interval", "1"]);
    // No version setting yet (Longhorn writes it once its manager runs):
    // the newest table.
    let s = d.wait_for("V2 on", FLIP, |s| enabled(s) == true);
    assert_eq!(s["v2"]["longhorn_version"]["version"], "1.12");
    assert_eq!(s["v2"]["longhorn_version"]["source"], "default");
    assert_eq!(item(&s, "v2-iommu").1, "required");

    // Longhorn 1.11 records itself: 5.19 required, 6.7 recommended, the
    // IOMMU a warning.
    c.k8s.set_setting("current-longhorn-version", "v1.11.2");
    let s = d.wait_for("the 1.11 table", FLIP, |s| {
        s["v2"]["longhorn_version"]["version"] == "1.11"
    });
    assert_eq!(s["v2"]["longhorn_version"]["source"], "cluster");
    assert_eq!(item(&s, "v2-iommu").1, "warning");
    assert_eq!(
        item(&s, "v2-kernel-recommended"),
        (json!(true), json!("warning"))
    );
    base_met(&s);

    // data-engine-memory-size doubles: 2048 pages needed, the pool and the
    // kubelet's 1024 both short.
    c.k8s
        .set_setting("data-engine-memory-size", r#"{"v1":"0","v2":"4096"}"#);
    let s = d.wait_for("2048 pages required", FLIP, |s| {
        s["v2"]["required_hugepages"] == 2048
    });
    assert!(
        s["v2"]["required_hugepages_source"]
            .as_str()
            .is_some_and(|w| w.contains("data-engine-memory-size = 4096 MiB")),
        "{s:#}"
    );
    assert_eq!(item(&s, "v2-hugepages").0, false);
    assert_eq!(item(&s, "v2-hugepages-kubelet").0, false);

    // The pool is raised but the kubelet has not restarted: Longhorn still
    // sees 1024, and the fix says to restart kubelet.
    hugepages(&c.host, 2048);
    let s = d.wait_for("the pool met after a reconcile", FLIP, |s| {
        item(s, "v2-hugepages").0 == true
    });
    let kubelet = s["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == "v2-hugepages-kubelet"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(kubelet["met"], false, "{kubelet:#}");
    assert!(
        kubelet["check"]["fix"]
            .as_str()
            .is_some_and(|f| f.starts_with("restart kubelet")),
        "{kubelet:#}"
    );
    // The kubelet restarts and registers 4Gi.
    c.k8s.set_node_hugepages(NODE, "4Gi");
    d.wait_for("the kubelet's capacity met", FLIP, |s| {
        item(s, "v2-hugepages-kubelet").0 == true
    });

    // Longhorn 1.9 sized the pool by v2-data-engine-hugepage-limit.
    c.k8s.set_setting("current-longhorn-version", "v1.9.1");
    c.k8s.set_setting("v2-data-engine-hugepage-limit", "1024");
    let s = d.wait_for("512 pages under 1.9", FLIP, |s| {
        s["v2"]["required_hugepages"] == 512
    });
    assert!(
        s["v2"]["required_hugepages_source"]
            .as_str()
            .is_some_and(|w| w.contains("v2-data-engine-hugepage-limit")),
        "{s:#}"
    );
    base_met(&s);

    // A version given on the command line wins over the cluster's.
    drop(d);
    let d = c.daemon(&args!["--longhorn-version", "1.12"]);
    let s = d.status();
    assert_eq!(s["v2"]["longhorn_version"]["version"], "1.12");
    assert_eq!(s["v2"]["longhorn_version"]["source"], "flag");
}
