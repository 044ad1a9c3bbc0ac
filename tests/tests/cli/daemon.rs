//! `kmod-monitor run` against a fake host root with the poll source: /status
//! follows changes to /proc/modules, SIGHUP reloads the config (and keeps the
//! old one when the new one is bad), SIGTERM/SIGINT stop it with exit 0, and
//! the periodic reconcile corrects what the source missed.
use std::time::Duration;

use kmod_monitor_tests::{
    DEBIAN_6_1, DEV_6_18, Daemon, FakeHost, args, group, group_names, keys, log_records, met,
    module, pretty, state_of,
};
use rustix::process::Signal;
use serde_json::{Value, json};

/// How long a change to /proc/modules may take to show in /status with a
/// one-second poll or reconcile.
const FOLLOW: Duration = Duration::from_secs(3);
/// How long SIGTERM/SIGINT may take to stop the daemon.
const STOP: Duration = Duration::from_secs(5);

/// Every requirement of the captured 6.1 guest with V2 on: the module
/// groups, then the checks (Longhorn 1.12's table; CPU is not judged, the
/// guest's /proc/cpuinfo was not captured).
const V2_ON: [&str; 9] = [
    "base",
    "v2-data-engine",
    "v1-iscsi",
    "rwx-nfs-client",
    "v2-kernel",
    "v2-iommu",
    "v2-hugepages",
    "host-commands",
    "multipathd",
];

/// [`V2_ON`] with a user group, which comes after the built-in groups.
fn with_user_group(name: &str) -> Vec<&str> {
    let mut all = V2_ON.to_vec();
    all.insert(4, name);
    all
}

/// A poll-source daemon (one-second period) on `host` with `extra` flags.
fn polling(host: &FakeHost, extra: &[std::ffi::OsString]) -> Daemon {
    let mut args = Vec::from(args!["--source", "poll", "--poll-interval", "1"]);
    args.extend(extra.iter().cloned());
    Daemon::start(host, &args)
}

/// The states of a group's modules, in order, as `(name, state)`.
fn states(status: &Value, group_name: &str) -> Vec<(String, String)> {
    group(status, group_name)["modules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_owned(),
                m["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn status_follows_an_unload_and_a_reload_in_proc_modules() {
    let host = FakeHost::debian_6_1();
    let original = host.read("proc/modules");
    let mut daemon = polling(&host, &args!["--v2-data-engine"]);

    let status = daemon.status();
    assert_eq!(status["source"]["active"], "poll", "{daemon}");
    assert_eq!(
        status["source"]["unavailable"],
        json!([]),
        "poll was asked for"
    );
    assert_eq!(status["kernel_release"], DEBIAN_6_1);
    assert_eq!(status["modules_supported"], true);
    assert_eq!(status["host_root"], host.path().display().to_string());
    // V2 on (by the flag) brings its checks: kernel, IOMMU, hugepages
    // (none here).
    assert_eq!(group_names(&status), V2_ON);
    assert_eq!(met(&status, "v2-hugepages"), Some(false));
    assert_eq!(met(&status, "base"), Some(true), "{}", pretty(&status));
    let dm_crypt = module(group(&status, "base"), "dm_crypt");
    assert_eq!(dm_crypt["state"], "loaded");
    assert_eq!(dm_crypt["last_event"], Value::Null, "nothing happened yet");
    assert_eq!(met(&status, "v2-data-engine"), Some(false));
    let v2_before = states(&status, "v2-data-engine");
    assert_eq!(
        state_of(&status, "v2-data-engine", "uio_pci_generic"),
        "available"
    );

    host.unload("dm_crypt");
    let status = daemon.wait_for(
        "base to become unmet after dm_crypt vanished",
        FOLLOW,
        |s| met(s, "base") == Some(false),
    );
    let dm_crypt = module(group(&status, "base"), "dm_crypt");
    assert_eq!(dm_crypt["state"], "available", "{}", pretty(&status));
    let last = &dm_crypt["last_event"];
    assert_eq!(last["kind"], "unload", "{}", pretty(&status));
    assert_eq!(
        last["actor"],
        Value::Null,
        "polling cannot know who unloaded it"
    );
    assert!(
        last["boot_ns"].as_u64().is_some_and(|ns| ns > 0),
        "{}",
        pretty(last)
    );
    assert!(
        status["events"]["by_kind"]["unload"].as_u64() >= Some(1),
        "{}",
        pretty(&status["events"])
    );
    assert_eq!(
        met(&status, "v2-data-engine"),
        Some(false),
        "v2's verdict is its own"
    );
    assert_eq!(states(&status, "v2-data-engine"), v2_before);

    host.set_proc_modules_with_initstate(&original);
    let status = daemon.wait_for(
        "base to be met again after dm_crypt came back",
        FOLLOW,
        |s| met(s, "base") == Some(true),
    );
    let dm_crypt = module(group(&status, "base"), "dm_crypt");
    assert_eq!(dm_crypt["state"], "loaded", "{}", pretty(&status));
    assert_eq!(
        dm_crypt["last_event"]["kind"],
        "loaded",
        "{}",
        pretty(&status)
    );
    assert_eq!(states(&status, "v2-data-engine"), v2_before);
}

#[test]
fn status_and_endpoints_have_the_documented_shape() {
    let host = FakeHost::debian_6_1();
    let mut daemon = polling(&host, &[]);
    assert_eq!(daemon.get("/healthz").ok(), Some((200, "ok\n".to_owned())));
    let (code, body) = daemon
        .get("/metricz")
        .unwrap_or_else(|e| panic!("GET /metricz: {e}\n{daemon}"));
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("/metricz"),
        "404 body should name the path: {body}"
    );

    host.unload("dm_crypt");
    let status = daemon.wait_for("dm_crypt's unload", FOLLOW, |s| {
        state_of(s, "base", "dm_crypt") == "available"
    });
    assert_eq!(
        keys(&status),
        [
            "drift_total",
            "event_log",
            "events",
            "groups",
            "host_root",
            "kernel_release",
            "modules_supported",
            "other_kernels",
            "persistence",
            "privileges",
            "reconciles",
            "remedies",
            "source",
            "v2",
            "version",
            "warnings"
        ]
    );
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    // The unloaded module's remedy, as `check` gives it.
    assert_eq!(
        keys(&status["remedies"]["dm_crypt"]),
        [
            "boot_source",
            "command",
            "explanation",
            "kernel_config",
            "persist_file",
            "persist_line",
            "steps"
        ]
    );
    assert_eq!(
        status["remedies"]["dm_crypt"]["command"],
        "modprobe dm_crypt"
    );
    assert_eq!(
        status["event_log"],
        Value::Null,
        "the harness passes --no-event-log"
    );
    assert_eq!(
        keys(&status["source"]),
        ["active", "details", "unavailable"]
    );
    assert_eq!(
        keys(&status["events"]),
        [
            "by_kind",
            "ignored",
            "kernel_filtered",
            "kernel_lost",
            "lost",
            "received",
            "undecodable",
            "unload_denied"
        ]
    );
    assert_eq!(
        status["events"]["kernel_filtered"],
        Value::Null,
        "only the eBPF source filters in the kernel"
    );
    assert_eq!(
        status["events"]["kernel_lost"],
        Value::Null,
        "only the eBPF source has a program that can drop events"
    );
    let base = group(&status, "base");
    assert_eq!(keys(base), ["met", "mode", "modules", "name", "severity"]);
    assert_eq!(base["severity"], "critical", "the default severity");
    let dm_crypt = module(base, "dm_crypt");
    assert_eq!(keys(dm_crypt), ["last_event", "name", "state"]);
    assert_eq!(
        keys(&dm_crypt["last_event"]),
        ["actor", "applied_ns", "boot_ns", "kind"]
    );
}

#[test]
fn sighup_reloads_the_config_and_keeps_it_when_the_new_one_is_bad() {
    let host = FakeHost::debian_6_1();
    let config = host.config("# nothing yet\n");
    let mut daemon = polling(&host, &args!["--config", &config, "--v2-data-engine"]);
    assert_eq!(group_names(&daemon.status()), V2_ON);

    host.config(
        "[groups.spdk-driver]\nany_of = [\"vfio_pci\", \"uio_pci_generic\"]\nseverity = \"warning\"\n",
    );
    daemon.signal(Signal::HUP);
    let status = daemon.wait_for("the reloaded config's new group", FOLLOW, |s| {
        group_names(s).iter().any(|g| g == "spdk-driver")
    });
    // The --v2-data-engine flag still holds after a reload.
    assert_eq!(group_names(&status), with_user_group("spdk-driver"));
    let spdk = group(&status, "spdk-driver");
    assert_eq!(spdk["mode"], "any_of");
    assert_eq!(spdk["severity"], "warning");
    assert_eq!(spdk["met"], true, "vfio_pci is loaded: {}", pretty(spdk));

    host.config("[groups.spdk-driver]\nany_of = []\n");
    daemon.signal(Signal::HUP);
    let stderr = daemon.wait_for_stderr("new config rejected", FOLLOW);
    assert!(
        stderr.contains(&config.display().to_string()) && stderr.contains("any_of is empty"),
        "the rejection should name the file and the problem\n{daemon}"
    );
    assert!(
        daemon.is_running(),
        "a bad config must not stop the daemon\n{daemon}"
    );
    let status = daemon.status();
    assert_eq!(
        group_names(&status),
        with_user_group("spdk-driver"),
        "the old groups are kept"
    );
    assert_eq!(group(&status, "spdk-driver")["severity"], "warning");
}

#[test]
fn sighup_applies_live_keys_and_names_the_ones_that_need_a_restart() {
    let host = FakeHost::debian_6_1();
    let config = host.config("reconcile_interval = 3600\n");
    let log = host.join("events.jsonl");
    let mut daemon = polling(&host, &args!["--config", &config, "--event-log", &log]);
    let reconciles = |s: &Value| s["reconciles"].as_u64().unwrap_or_default();
    std::thread::sleep(Duration::from_millis(2500));
    let before = reconciles(&daemon.status());
    assert_eq!(before, 0, "no reconcile within the first hour: {before}");

    // reconcile_interval applies live; event_log_keep needs a restart;
    // source is decided by the --source flag, which still wins.
    host.config("reconcile_interval = 1\nevent_log_keep = 3\nsource = \"uevent\"\n");
    daemon.signal(Signal::HUP);
    daemon.wait_for(
        "a reconcile every second after the reload",
        FOLLOW * 2,
        |s| reconciles(s) >= 2,
    );
    let stderr = daemon.wait_for_stderr("take effect only after a restart", FOLLOW);
    assert!(stderr.contains("event_log_keep"), "{daemon}");
    assert_eq!(
        daemon.status()["source"]["active"],
        "poll",
        "the flag still decides the source"
    );
    let reloads: Vec<Value> = log_records(&log, &args!["--kind", "config_reload"]);
    let [reload] = reloads.as_slice() else {
        panic!("one config_reload record expected: {reloads:?}");
    };
    let c = &reload["config"];
    assert_eq!(c["accepted"], true, "{}", pretty(reload));
    assert_eq!(
        c["applied"],
        json!(["reconcile_interval"]),
        "{}",
        pretty(reload)
    );
    assert_eq!(
        c["restart_required"],
        json!(["event_log_keep"]),
        "{}",
        pretty(reload)
    );
    assert_eq!(c["overridden"], json!(["source"]), "{}", pretty(reload));
}

/// Sends `signal` to a running daemon and expects exit 0 within [`STOP`]:
/// exit 0 (not death by the signal) shows the handler ran and the daemon
/// shut down on its own.
fn stops_cleanly_on(signal: Signal) {
    let host = FakeHost::debian_6_1();
    let mut daemon = polling(&host, &[]);
    daemon.signal(signal);
    let status = daemon.wait_exit(STOP);
    assert_eq!(
        status.code(),
        Some(0),
        "{signal:?} should end the daemon with exit 0\n{daemon}"
    );
    assert!(!daemon.stderr().contains("panicked"), "{daemon}");
}

#[test]
fn sigterm_stops_cleanly() {
    stops_cleanly_on(Signal::TERM);
}

#[test]
fn sigint_stops_cleanly() {
    stops_cleanly_on(Signal::INT);
}

#[test]
fn reconcile_corrects_what_the_source_missed() {
    let host = FakeHost::debian_6_1();
    // The poll source reads once at start and then not for an hour: only
    // the one-second reconcile can notice the change.
    let mut daemon = Daemon::start(
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
    let status = daemon.status();
    assert_eq!(status["drift_total"], 0, "{}", pretty(&status));
    assert_eq!(met(&status, "base"), Some(true));

    host.unload("dm_crypt");
    let status = daemon.wait_for("the reconcile to find dm_crypt gone", FOLLOW, |s| {
        s["drift_total"].as_u64() >= Some(1)
    });
    assert_eq!(met(&status, "base"), Some(false), "{}", pretty(&status));
    let dm_crypt = module(group(&status, "base"), "dm_crypt");
    assert_eq!(dm_crypt["state"], "available");
    assert_eq!(
        dm_crypt["last_event"]["kind"],
        "drift",
        "{}",
        pretty(dm_crypt)
    );
    assert!(
        status["reconciles"].as_u64() >= Some(1),
        "{}",
        pretty(&status)
    );
    assert_eq!(
        status["events"]["received"],
        0,
        "the correction came from the reconcile, not the source: {}",
        pretty(&status)
    );
}

#[test]
fn kernel_without_module_support_leaves_base_unmet() {
    let host = FakeHost::dev_6_18_no_modules();
    let daemon = polling(&host, &[]);
    let status = daemon.status();
    assert_eq!(status["kernel_release"], DEV_6_18);
    assert_eq!(status["modules_supported"], false, "{}", pretty(&status));
    assert_eq!(status["source"]["active"], "poll");
    assert_eq!(met(&status, "base"), Some(false), "{}", pretty(&status));
    assert_eq!(state_of(&status, "base", "dm_crypt"), "missing");
}

#[test]
fn json_logs_are_one_object_per_line_and_report_a_lost_group() {
    let host = FakeHost::debian_6_1();
    let mut daemon = polling(&host, &args!["--log-format", "json"]);
    host.unload("dm_crypt");
    daemon.wait_for("base to become unmet", FOLLOW, |s| {
        met(s, "base") == Some(false)
    });
    let stderr = daemon.wait_for_stderr("NO LONGER met", FOLLOW);
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}\n{daemon}"))
        })
        .collect();
    for line in &lines {
        assert!(
            line["level"].is_string() && line["message"].is_string(),
            "every line has a level and a message: {line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "ERROR" && l["group"] == "base"),
        "losing base should be logged as an error naming the group\n{daemon}"
    );
}

#[test]
fn a_fatal_error_is_a_json_line_too_under_json_logs() {
    let host = FakeHost::debian_6_1();
    let missing = host.join("not-mounted");
    let out = kmod_monitor_tests::kmod_monitor(&args![
        "run",
        "--log-format",
        "json",
        "--source",
        "poll",
        "--no-event-log",
        "--listen",
        format!("127.0.0.1:{}", kmod_monitor_tests::free_port()),
        "--host-root",
        &missing
    ]);
    out.expect_code(2);
    let lines: Vec<Value> = out
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{out}")))
        .collect();
    let last = lines
        .last()
        .unwrap_or_else(|| panic!("no log lines: {out}"));
    assert_eq!(last["level"], "ERROR", "{out}");
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("is not a directory")),
        "the error names the missing host root: {out}"
    );
}

#[test]
fn capabilities_are_dropped_after_start_and_user_switches() {
    let host = FakeHost::debian_6_1();
    let daemon = polling(&host, &[]);
    let p = daemon.status()["privileges"].clone();
    assert_eq!(p["dropped"], true, "{p}");
    assert_eq!(p["effective"], json!([]), "no capability is left: {p}");
    assert_eq!(p["permitted"], json!([]), "{p}");
    // What the kernel says of the daemon's main thread: no_new_privs set,
    // and (as root, holding CAP_SETPCAP) an empty bounding set.
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid()))
        .unwrap_or_else(|e| panic!("reading the daemon's /proc status: {e}"));
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in:\n{proc_status}"))
            .to_owned()
    };
    assert_eq!(field("NoNewPrivs:"), "1", "{proc_status}");
    if rustix::process::geteuid().is_root() {
        assert_eq!(field("CapBnd:"), "0000000000000000", "{proc_status}");
    }
    if rustix::process::geteuid().is_root() {
        // As root (CI), --user also switches the uid, and the daemon keeps
        // following the host afterwards. Like a real host's /proc and
        // /lib/modules, the fake root must be readable by everyone (a temp
        // dir is 0700).
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(host.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", host.path().display()));
        let mut daemon = polling(&host, &args!["--user", "65534:65534"]);
        let p = daemon.status()["privileges"].clone();
        assert_eq!(
            (p["uid"].as_u64(), p["gid"].as_u64()),
            (Some(65534), Some(65534)),
            "{p}"
        );
        host.unload("dm_crypt");
        daemon.wait_for("base unmet after the user switch", FOLLOW, |s| {
            met(s, "base") == Some(false)
        });
    } else {
        eprintln!("not root: --user switch not exercised (CI runs as root)");
    }
}
