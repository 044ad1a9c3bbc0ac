//! The verdict where Kubernetes looks, against a real kube-apiserver and
//! etcd (`kmod_monitor_tests::apiserver`): the daemon's condition on its
//! Node, its Events, and the opt-in labels.
//!
//! Each scenario gets its own control plane with the daemon's namespace,
//! ServiceAccount and `rbac.yaml` applied as shipped, Longhorn's Setting
//! CRD (V2 off), and a Node whose status already holds the kubelet's
//! conditions (written as the kubelet writes them: a strategic merge patch
//! of `nodes/status` under the field manager `kubelet`) and another tool's
//! (server-side apply under `node-problem-detector`). The daemon runs with
//! the poll source on a fake host root and a token of the shipped
//! ServiceAccount, so a verb the RBAC lacks fails as in a cluster. What the
//! daemon sent is read back from the API and counted in the apiserver's
//! audit log.
use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use kmod_monitor_tests::{
    Daemon, FakeHost,
    apiserver::{Call, ControlPlane, LONGHORN_CRD, LONGHORN_NAMESPACE, SETTINGS_ROLEBINDING},
    args, workspace_dir,
};
use serde_json::{Value, json};

const NODE: &str = "node-1";
const CONDITION: &str = "KernelModuleRequirementsMet";
/// The poll source's period (1 s) plus a write (within a second), with a
/// margin for a loaded CI machine.
const CHANGE: Duration = Duration::from_secs(10);
/// Write retries back off up to 30 s; a recovery may wait one full step.
const RECOVER: Duration = Duration::from_secs(45);

struct Cluster {
    k8s: ControlPlane,
    /// The shipped ServiceAccount's token.
    kubeconfig: PathBuf,
    host: FakeHost,
    /// `proc/modules` as the fixture has it (dm_crypt loaded).
    modules: String,
}

/// The kubelet's conditions, as a kubelet writes them.
fn kubelet_conditions(heartbeat: &str) -> Value {
    json!([
        {
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "kubelet is posting ready status",
            "lastHeartbeatTime": heartbeat, "lastTransitionTime": "2026-01-01T00:00:00Z",
        },
        {
            "type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
            "message": "kubelet has sufficient memory available",
            "lastHeartbeatTime": heartbeat, "lastTransitionTime": "2026-01-01T00:00:00Z",
        },
    ])
}

impl Cluster {
    fn new() -> Self {
        let k8s = ControlPlane::start();
        k8s.namespace(LONGHORN_NAMESPACE);
        k8s.install_crds(&[LONGHORN_CRD]);
        k8s.set_setting("v2-data-engine", "false");
        k8s.set_setting("data-engine-hugepage-enabled", "true");
        k8s.apply_daemon_rbac();
        k8s.set_node(NODE, &[("kubernetes.io/hostname", NODE)]);
        k8s.kubelet_status(NODE, &kubelet_conditions("2026-01-01T00:00:00Z"));
        // Another tool's condition, written with server-side apply.
        let (code, body) = k8s.request(
            "PATCH",
            &format!("/api/v1/nodes/{NODE}/status?fieldManager=node-problem-detector&force=true"),
            Some((
                "application/apply-patch+yaml",
                &json!({
                    "apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
                    "status": {"conditions": [{
                        "type": "KernelDeadlock", "status": "False", "reason": "KernelHasNoDeadlock",
                        "message": "kernel has no deadlock",
                        "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                    }]},
                }),
            )),
        );
        assert_eq!(code, 200, "node-problem-detector's apply: {body}");
        let kubeconfig = k8s.service_account_kubeconfig();
        // A node where Longhorn runs: its host commands in place, so that
        // the only changes are the ones a test makes.
        let host = FakeHost::debian_6_1();
        host.with_longhorn_packages();
        let modules = host.read("proc/modules");
        Self {
            k8s,
            kubeconfig,
            host,
            modules,
        }
    }

    fn daemon(&self, extra: &[OsString]) -> Daemon {
        let mut a = Vec::from(args![
            "--source",
            "poll",
            "--poll-interval",
            "1",
            "--kubeconfig",
            self.kubeconfig.as_path(),
            "--node-name",
            NODE
        ]);
        a.extend(extra.iter().cloned());
        Daemon::start(&self.host, &a)
    }

    fn unload(&self) {
        self.host.unload("dm_crypt");
    }

    fn reload(&self) {
        self.host.set_proc_modules_with_initstate(&self.modules);
    }

    /// The Node's conditions by type.
    fn conditions(&self) -> BTreeMap<String, Value> {
        self.k8s.node(NODE)["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| (c["type"].as_str().unwrap_or_default().to_owned(), c.clone()))
            .collect()
    }

    /// Waits until our condition satisfies `ok`, and returns it.
    #[track_caller]
    fn wait_condition(
        &self,
        what: &str,
        timeout: Duration,
        d: &Daemon,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let ours = self.conditions().remove(CONDITION);
            if let Some(c) = &ours
                && ok(c)
            {
                return c.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for the condition to be {what}; it is {ours:?}\n{d}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's writes so far (anything but get, list and watch).
    fn writes(&self) -> Vec<Call> {
        self.k8s
            .daemon_calls()
            .into_iter()
            .filter(|c| !["get", "list", "watch"].contains(&c.verb.as_str()))
            .collect()
    }

    /// Its condition writes (server-side apply of nodes/status) since `from`.
    fn condition_writes(&self, from: SystemTime) -> Vec<Call> {
        self.writes()
            .into_iter()
            .filter(|c| c.what() == "patch nodes/status" && c.at >= from)
            .collect()
    }
}

/// The daemon's `kmod_monitor_k8s_writes_total{kind,result}`.
fn writes_metric(d: &Daemon, kind: &str, result: &str) -> u64 {
    let needle = format!("kmod_monitor_k8s_writes_total{{kind=\"{kind}\",result=\"{result}\"}} ");
    d.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {needle} series\n{}", d.metrics()))
}

fn base_met(status: &Value) -> Option<bool> {
    status["groups"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == "base")
        .and_then(|g| g["met"].as_bool())
}

/// CLOCK_BOOTTIME now, to date the daemon's `applied_ns` on the wall clock.
fn boot_epoch() -> SystemTime {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let since_boot = Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or_default(),
        u32::try_from(ts.tv_nsec).unwrap_or_default(),
    );
    SystemTime::now() - since_boot
}

/// When the daemon applied dm_crypt's last event, on the wall clock.
fn applied_at(status: &Value) -> SystemTime {
    let module = status["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == "base"))
        .and_then(|g| g["modules"].as_array())
        .and_then(|m| m.iter().find(|m| m["name"] == "dm_crypt"))
        .unwrap_or_else(|| panic!("no dm_crypt in {status:#}"));
    let ns = module["last_event"]["applied_ns"]
        .as_u64()
        .unwrap_or_else(|| panic!("dm_crypt has no last_event.applied_ns: {module:#}"));
    boot_epoch() + Duration::from_nanos(ns)
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The entries of `managedFields` by manager and subresource.
fn managers(node: &Value) -> Vec<(String, String, Value)> {
    node["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["manager"].as_str().unwrap_or_default().to_owned(),
                m["subresource"].as_str().unwrap_or_default().to_owned(),
                m["fieldsV1"].clone(),
            )
        })
        .collect()
}

#[test]
fn the_condition_follows_unload_and_reload_beside_the_kubelets() {
    let c = Cluster::new();
    let others = c.conditions();
    assert_eq!(others.len(), 3, "{others:#?}");
    let mut d = c.daemon(&args!["--k8s-heartbeat", "2"]);
    let first = c.wait_condition("True", CHANGE, &d, |x| x["status"] == "True");
    assert_eq!(first["reason"], "RequirementsMet", "{first:#}");
    assert_eq!(first["message"], ALL_MET, "{first:#}");

    // Our field manager owns our condition's entry and nothing else.
    let node = c.k8s.node(NODE);
    let ours: Vec<Value> = managers(&node)
        .into_iter()
        .filter(|(m, _, _)| m == "kmod-monitor")
        .map(|(_, sub, fields)| {
            assert_eq!(sub, "status", "{fields}");
            fields
        })
        .collect();
    assert_eq!(ours.len(), 1, "{:#}", node["metadata"]["managedFields"]);
    let owned: Vec<&String> = ours[0]["f:status"]["f:conditions"]
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    assert_eq!(
        owned,
        [&format!("k:{{\"type\":\"{CONDITION}\"}}")],
        "{}",
        ours[0]
    );

    // Unloaded: False within a second of the daemon seeing it.
    let unloaded = SystemTime::now();
    c.unload();
    let s = d.wait_for("base unmet", CHANGE, |s| base_met(s) == Some(false));
    let seen = applied_at(&s);
    let unmet = c.wait_condition("False", CHANGE, &d, |x| x["status"] == "False");
    assert_eq!(unmet["reason"], "KernelModulesMissing", "{unmet:#}");
    let message = unmet["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(
            "base: dm_crypt is available (fix: `modprobe dm_crypt`; then `echo dm_crypt >> /etc/modules-load.d/kmod-monitor.conf`)"
        ),
        "{message}"
    );
    assert!(unmet["lastTransitionTime"].as_str() >= first["lastTransitionTime"].as_str());
    let write = c
        .condition_writes(unloaded)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no condition write after the unload"));
    let latency = write.at.duration_since(seen).unwrap_or_default();
    eprintln!(
        "unload: seen by the poll source {:.3} s after it happened, condition written {:.3} s after that",
        seconds(seen.duration_since(unloaded).unwrap_or_default()),
        seconds(latency)
    );
    assert!(latency < Duration::from_secs(1), "{latency:?}");

    // Reloaded: True again, with a new transition time.
    c.reload();
    let back = c.wait_condition("True again", CHANGE, &d, |x| x["status"] == "True");
    assert_eq!(back["message"], ALL_MET);

    // Steady: only heartbeats, at least --k8s-heartbeat (2 s) apart and at
    // most 10 % more, the transition time unchanged.
    let steady = SystemTime::now();
    std::thread::sleep(Duration::from_secs(11));
    let beats = c.condition_writes(steady);
    let gaps: Vec<f64> = beats
        .windows(2)
        .map(|w| seconds(w[1].at.duration_since(w[0].at).unwrap_or_default()))
        .collect();
    eprintln!("heartbeat gaps (s): {gaps:.3?}");
    assert!(beats.len() >= 4, "{} heartbeats in 11 s", beats.len());
    for gap in &gaps {
        // The timer sleeps at least the interval; 0.5 s of margin for the
        // machine's load on the way to the apiserver.
        assert!((2.0..=2.2 + 0.5).contains(gap), "gap {gap} s: {gaps:?}");
    }
    let now = c.conditions().remove(CONDITION).unwrap_or_default();
    assert_eq!(now["lastTransitionTime"], back["lastTransitionTime"]);
    assert_ne!(now["lastHeartbeatTime"], back["lastHeartbeatTime"]);

    // The kubelet and the other tool kept theirs through all of it, and a
    // kubelet write after ours leaves ours alone.
    let after = c.conditions();
    for (t, cond) in &others {
        assert_eq!(&after[t], cond, "{t} changed");
    }
    c.k8s
        .kubelet_status(NODE, &kubelet_conditions("2026-01-01T00:05:00Z"));
    let after = c.conditions();
    assert_eq!(after.len(), 4, "{after:#?}");
    assert_eq!(after[CONDITION]["status"], "True");
    assert_eq!(after["Ready"]["lastHeartbeatTime"], "2026-01-01T00:05:00Z");
    assert_eq!(after["KernelDeadlock"], others["KernelDeadlock"]);
    assert_eq!(writes_metric(&d, "condition", "failure"), 0);
    assert!(writes_metric(&d, "condition", "success") >= 7);
    // Nothing but the condition was written: no label, and the Events.
    for w in c.writes() {
        assert!(
            [
                "patch nodes/status",
                "create events.k8s.io/events",
                "patch events.k8s.io/events"
            ]
            .contains(&w.what().as_str())
                && w.code < 300,
            "unexpected write {w:?}"
        );
    }
}

/// The Events of the daemon about the node, by reason.
fn events_by_reason(c: &Cluster) -> BTreeMap<String, Value> {
    c.k8s
        .node_events(NODE)
        .into_iter()
        .filter(|e| e["reportingController"] == "kmod-monitor.io/kmod-monitor")
        .map(|e| (e["reason"].as_str().unwrap_or_default().to_owned(), e))
        .collect()
}

fn series_count(e: &Value) -> u64 {
    e["series"]["count"].as_u64().unwrap_or(1)
}

#[test]
fn events_appear_and_a_flapping_module_aggregates_into_one_series_per_type() {
    const FLAPS: u64 = 6;
    const HEARTBEAT: u64 = 3;
    let c = Cluster::new();
    let mut d = c.daemon(&args!["--k8s-heartbeat", HEARTBEAT.to_string()]);
    c.wait_condition("True", CHANGE, &d, |x| x["status"] == "True");
    assert!(
        events_by_reason(&c).is_empty(),
        "met from the start: no Event"
    );

    let started = SystemTime::now();
    let calls_before = c.k8s.daemon_calls().len();
    for i in 0..FLAPS {
        c.unload();
        d.wait_for(&format!("flap {i}: unmet"), CHANGE, |s| {
            base_met(s) == Some(false)
        });
        c.reload();
        d.wait_for(&format!("flap {i}: met"), CHANGE, |s| {
            base_met(s) == Some(true)
        });
    }
    let flapped = SystemTime::now()
        .duration_since(started)
        .unwrap_or_default();
    // The last counts arrive with the next refresh (the heartbeat).
    let deadline = Instant::now() + Duration::from_secs(HEARTBEAT * 2 + 5);
    let events = loop {
        let events = events_by_reason(&c);
        let counts: Vec<u64> = events.values().map(series_count).collect();
        if counts == [FLAPS, FLAPS] {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "the Events did not reach {FLAPS} each: {events:#?}\n{d}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let unmet = &events["BaseRequirementUnmet"];
    assert_eq!(unmet["type"], "Warning");
    assert_eq!(unmet["action"], "EvaluateRequirement");
    assert_eq!(
        unmet["regarding"]["uid"],
        c.k8s.node(NODE)["metadata"]["uid"]
    );
    let note = unmet["note"].as_str().unwrap_or_default();
    assert!(
        note.starts_with("base is unmet: dm_crypt is available (fix: `modprobe dm_crypt`"),
        "{note}"
    );
    assert!(
        note.ends_with("Last event: dm_crypt unload (actor unknown: poll source)"),
        "{note}"
    );
    let met = &events["BaseRequirementMet"];
    assert_eq!(met["type"], "Normal");
    assert!(
        met["note"]
            .as_str()
            .is_some_and(|n| n.starts_with("base is met again")),
        "{met:#}"
    );

    // What it cost, counted by the apiserver.
    let calls: Vec<Call> = c.k8s.daemon_calls().split_off(calls_before);
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for call in &calls {
        *tally.entry(call.what()).or_default() += 1;
    }
    let creates = tally
        .get("create events.k8s.io/events")
        .copied()
        .unwrap_or(0);
    let patches = tally
        .get("patch events.k8s.io/events")
        .copied()
        .unwrap_or(0);
    let conditions = tally.get("patch nodes/status").copied().unwrap_or(0);
    let window = SystemTime::now()
        .duration_since(started)
        .unwrap_or_default();
    eprintln!(
        "{FLAPS} flaps in {:.1} s ({:.1} s window): {tally:?}; {:.0} requests per hour at this rate",
        seconds(flapped),
        seconds(window),
        calls.len() as f64 * 3600.0 / seconds(window)
    );
    assert_eq!(creates, 2, "one Event per type: {tally:?}");
    // Per type: one patch at the second occurrence, then one per refresh
    // interval, and the last.
    let refreshes = (window.as_secs() / HEARTBEAT) as usize + 2;
    assert!(patches <= 2 * refreshes, "{patches} patches: {tally:?}");
    // Condition writes: a burst of 10, then one per 10 s (changes and
    // heartbeats alike), and never more than one a second.
    assert!(
        conditions as u64 <= (10 + window.as_secs() / 10 + 1).min(window.as_secs() + 1),
        "{conditions} condition writes in {window:?}"
    );
    // The latest state gets out all the same.
    c.wait_condition(
        "True after the flapping",
        Duration::from_secs(15),
        &d,
        |x| x["status"] == "True",
    );
    assert_eq!(writes_metric(&d, "event", "failure"), 0);

    // kubectl describe shows them (the core/v1 view of the same Events).
    let describe = c.k8s.kubectl(&["describe", "node", NODE]);
    let text = String::from_utf8_lossy(&describe.stdout);
    assert!(
        text.contains("BaseRequirementUnmet") && text.contains("BaseRequirementMet"),
        "{text}"
    );
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

fn our_labels(c: &Cluster) -> BTreeMap<String, String> {
    c.k8s.node(NODE)["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("kmod-monitor.io/"))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// The condition's message on the fixture host with nothing changed: every
/// requirement that is on by default is met.
const ALL_MET: &str = "Met: base, v1-iscsi, rwx-nfs-client, host-commands, multipathd";

/// Waits until our labels are `want`, beside the requirements that are on
/// by default and met on the fixture host throughout.
#[track_caller]
fn wait_labels(c: &Cluster, d: &Daemon, want: &[(&str, &str)], timeout: Duration) {
    let always_met = ["v1-iscsi", "rwx-nfs-client", "host-commands", "multipathd"];
    let want: BTreeMap<String, String> = always_met
        .iter()
        .map(|g| (format!("kmod-monitor.io/{g}"), "met".to_owned()))
        .chain(want.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())))
        .collect();
    let deadline = Instant::now() + timeout;
    loop {
        let have = our_labels(c);
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "labels {have:?}, want {want:?}\n{d}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn labels_appear_only_with_the_flag_and_the_component() {
    let c = Cluster::new();
    hugepages(&c.host, 1024);
    {
        let mut d = c.daemon(&[]);
        c.wait_condition("True", CHANGE, &d, |x| x["status"] == "True");
        std::thread::sleep(Duration::from_secs(2));
        assert!(our_labels(&c).is_empty(), "labels without the flag");
        assert!(
            !c.writes().iter().any(|w| w.what() == "patch nodes"),
            "the Node written without the flag"
        );
        assert!(d.is_running());
    }
    // The flag, but the base RBAC: refused and counted; the condition and
    // everything else still written.
    let d = c.daemon(&args!["--k8s-node-labels"]);
    let deadline = Instant::now() + CHANGE;
    while writes_metric(&d, "labels", "failure") == 0 {
        assert!(Instant::now() < deadline, "no refused label write\n{d}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        c.writes()
            .iter()
            .any(|w| w.what() == "patch nodes" && w.code == 403),
        "{:?}",
        c.writes()
    );
    assert!(our_labels(&c).is_empty());
    // The optional component's RBAC: the labels follow (after the retry's
    // back-off), and the harness's own label stays.
    let component =
        workspace_dir().join("monitor/deploy/kubernetes/components/node-labels/rbac.yaml");
    c.k8s.kubectl(&[
        "apply",
        "--server-side",
        "-f",
        &component.display().to_string(),
    ]);
    wait_labels(&c, &d, &[("kmod-monitor.io/base", "met")], RECOVER);
    c.unload();
    wait_labels(&c, &d, &[("kmod-monitor.io/base", "unmet")], CHANGE);
    c.reload();
    c.k8s.set_setting("v2-data-engine", "true");
    // The 6.1 fixture lacks uio_pci_generic, its kernel is older than
    // Longhorn 1.12's 6.7, it has no IOMMU groups, and the test's Node has
    // no hugepage capacity registered: each is its own label.
    wait_labels(
        &c,
        &d,
        &[
            ("kmod-monitor.io/base", "met"),
            ("kmod-monitor.io/v2-data-engine", "unmet"),
            ("kmod-monitor.io/v2-hugepages", "met"),
            ("kmod-monitor.io/v2-hugepages-kubelet", "unmet"),
            ("kmod-monitor.io/v2-iommu", "unmet"),
            ("kmod-monitor.io/v2-kernel", "unmet"),
        ],
        CHANGE,
    );
    c.k8s.set_setting("v2-data-engine", "false");
    wait_labels(&c, &d, &[("kmod-monitor.io/base", "met")], CHANGE);
    let node = c.k8s.node(NODE);
    assert_eq!(node["metadata"]["labels"]["kubernetes.io/hostname"], NODE);
    // The labels' owner is our field manager, on the Node itself.
    let fields: Vec<Value> = managers(&node)
        .into_iter()
        .filter(|(m, sub, _)| m == "kmod-monitor" && sub.is_empty())
        .map(|(_, _, f)| f)
        .collect();
    assert_eq!(fields.len(), 1, "{:#}", node["metadata"]["managedFields"]);
    let owned: Vec<&String> = fields[0]["f:metadata"]["f:labels"]
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    // Only the labels of the groups still on: V2's went with it.
    assert_eq!(
        owned,
        [
            "f:kmod-monitor.io/base",
            "f:kmod-monitor.io/host-commands",
            "f:kmod-monitor.io/multipathd",
            "f:kmod-monitor.io/rwx-nfs-client",
            "f:kmod-monitor.io/v1-iscsi"
        ],
        "{}",
        fields[0]
    );
}

#[test]
fn api_down_then_up_the_condition_is_written_when_it_returns() {
    let mut c = Cluster::new();
    let mut d = c.daemon(&args!["--k8s-heartbeat", "2"]);
    c.wait_condition("True", CHANGE, &d, |x| x["status"] == "True");
    c.k8s.stop_apiserver();
    c.unload();
    // The event path does not wait for the API.
    d.wait_for("base unmet while the API is down", CHANGE, |s| {
        base_met(s) == Some(false)
    });
    let deadline = Instant::now() + CHANGE;
    while writes_metric(&d, "condition", "failure") == 0 {
        assert!(Instant::now() < deadline, "no failed write counted\n{d}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Back: the condition that could not be written is written.
    c.k8s.start_apiserver();
    let unmet = c.wait_condition("False once the API is back", RECOVER, &d, |x| {
        x["status"] == "False"
    });
    assert_eq!(unmet["reason"], "KernelModulesMissing");
    // And its Event too.
    let deadline = Instant::now() + RECOVER;
    while !events_by_reason(&c).contains_key("BaseRequirementUnmet") {
        assert!(Instant::now() < deadline, "no Event after the outage\n{d}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn report_off_writes_nothing_and_an_unreadable_cluster_is_unknown() {
    let c = Cluster::new();
    {
        let mut d = c.daemon(&args!["--k8s-report", "off"]);
        d.wait_for("V2 off by the setting", CHANGE, |s| {
            s["v2"]["enablement"]["v2-data-engine"]["enabled"] == false
        });
        std::thread::sleep(Duration::from_secs(3));
        assert!(c.writes().is_empty(), "{:?}", c.writes());
        assert!(!c.conditions().contains_key(CONDITION));
        assert_eq!(writes_metric(&d, "condition", "success"), 0);
    }
    // The settings unreadable (their RoleBinding gone) and nothing unmet:
    // whether V2 applies cannot be told, and the condition says so (after
    // the start-up wait for the cluster view).
    c.k8s.delete(SETTINGS_ROLEBINDING);
    let d = c.daemon(&[]);
    let unknown = c.wait_condition("Unknown", CHANGE * 2, &d, |x| x["status"] == "Unknown");
    assert_eq!(unknown["reason"], "EnablementUnknown");
    let message = unknown["message"].as_str().unwrap_or_default();
    assert!(message.contains("forbidden by RBAC (403)"), "{message}");
    // Known unmet beats unknown.
    c.unload();
    c.wait_condition("False", CHANGE, &d, |x| x["status"] == "False");
}

/// The daemon's requests from `from` to `to`, by kind, and their rate per
/// hour.
fn requests_per_hour(
    c: &Cluster,
    from: SystemTime,
    to: SystemTime,
) -> (BTreeMap<String, usize>, f64) {
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut n = 0;
    for call in c.k8s.daemon_calls() {
        if call.at >= from && call.at < to {
            *tally.entry(call.what()).or_default() += 1;
            n += 1;
        }
    }
    let hours = seconds(to.duration_since(from).unwrap_or_default()) / 3600.0;
    (tally, n as f64 / hours)
}

/// The scale note's figures (README, "Scale"): the API requests one node
/// makes, counted in the apiserver's audit log, at the default settings
/// (5-minute heartbeat, kube-rs's 290 s watch timeout), first steady for
/// 10 minutes after a minute of start-up, then with dm_crypt flapping
/// (unloaded and reloaded every 3 s) for 10 minutes. It takes 22 minutes:
/// `cargo test -p kmod-monitor-tests --test cli -- --ignored k8s_report::scale`.
#[test]
#[ignore = "22 minutes; run for the README's scale figures"]
fn scale_requests_per_node_per_hour() {
    const STEADY: Duration = Duration::from_secs(600);
    const FLAPPING: Duration = Duration::from_secs(600);
    let c = Cluster::new();
    let d = c.daemon(&[]);
    c.wait_condition("True", CHANGE, &d, |x| x["status"] == "True");
    std::thread::sleep(Duration::from_secs(60));
    let from = SystemTime::now();
    std::thread::sleep(STEADY);
    let to = SystemTime::now();
    let (tally, rate) = requests_per_hour(&c, from, to);
    eprintln!("steady: {rate:.1} requests per node per hour: {tally:?} in {STEADY:?}");
    // Two heartbeats in ten minutes, and nothing written otherwise.
    assert_eq!(
        tally.get("patch nodes/status").copied(),
        Some(2),
        "{tally:?}"
    );

    let from = SystemTime::now();
    let flapping_until = Instant::now() + FLAPPING;
    let mut flaps = 0;
    while Instant::now() < flapping_until {
        c.unload();
        std::thread::sleep(Duration::from_millis(1500));
        c.reload();
        std::thread::sleep(Duration::from_millis(1500));
        flaps += 1;
    }
    let to = SystemTime::now();
    let (tally, rate) = requests_per_hour(&c, from, to);
    eprintln!(
        "flapping ({flaps} flaps): {rate:.1} requests per node per hour: {tally:?} in {FLAPPING:?}"
    );
    let events = events_by_reason(&c);
    eprintln!(
        "Events: {:?}",
        events
            .iter()
            .map(|(r, e)| (r.clone(), series_count(e)))
            .collect::<Vec<_>>()
    );
    assert_eq!(events.len(), 2, "one series per type: {events:#?}");
    // The Node-write budget: a burst of 10, then one per 10 s.
    assert!(
        tally.get("patch nodes/status").copied().unwrap_or(0) <= 10 + 60 + 1,
        "{tally:?}"
    );
}
