//! Reboot survival: `check` and /status say whether each required module
//! will be there after a reboot, `check --fix` makes it so (twice: the
//! second run changes nothing), and it never edits a file it did not write.
use std::time::Duration;

use kmod_monitor_tests::{Daemon, FakeHost, args, check, kmod_monitor};
use serde_json::json;

fn persistent(report: &serde_json::Value, module: &str) -> Option<bool> {
    report["groups"]
        .as_array()?
        .iter()
        .flat_map(|g| g["modules"].as_array().into_iter().flatten())
        .find(|m| m["name"] == module)
        .and_then(|m| m["persistence"]["persistent"].as_bool())
}

#[test]
fn loaded_by_hand_is_reported_not_persistent_until_listed() {
    let host = FakeHost::debian_6_1();
    let out = check(&host, &args!["--output", "json"]);
    out.expect_code(0);
    assert_eq!(persistent(&out.json(), "dm_crypt"), Some(false), "{out}");
    let text = check(&host, &[]);
    assert!(
        text.stdout.contains("Loaded now but NOT after a reboot:")
            && text
                .stdout
                .contains("echo dm_crypt >> /etc/modules-load.d/kmod-monitor.conf"),
        "{text}"
    );

    host.write("etc/modules-load.d/storage.conf", "# Longhorn\ndm-crypt\n");
    let out = check(&host, &args!["--output", "json"]);
    assert_eq!(persistent(&out.json(), "dm_crypt"), Some(true), "{out}");
    let sources = &out.json()["groups"][0]["modules"][0]["persistence"]["sources"];
    assert_eq!(sources[0]["kind"], "modules_load", "{out}");

    // A blacklist stops systemd-modules-load from loading it at boot.
    host.write("etc/modprobe.d/no-crypt.conf", "blacklist dm_crypt\n");
    let out = check(&host, &args!["--output", "json"]);
    assert_eq!(persistent(&out.json(), "dm_crypt"), Some(false), "{out}");
}

#[test]
fn fix_writes_its_own_file_once_and_the_second_run_changes_nothing() {
    let host = FakeHost::debian_6_1();
    let conf = host.join("etc/modules-load.d/kmod-monitor.conf");
    let dry = kmod_monitor(&args![
        "check",
        "--host-root",
        host.path(),
        "--fix",
        "--dry-run"
    ]);
    dry.expect_code(0);
    assert!(dry.stdout.contains("dm_crypt"), "{dry}");
    assert!(
        !conf.exists(),
        "--dry-run must not write {}",
        conf.display()
    );

    let first = kmod_monitor(&args!["check", "--host-root", host.path(), "--fix"]);
    first.expect_code(0);
    let written = std::fs::read_to_string(&conf).unwrap_or_else(|e| panic!("{e}\n{first}"));
    assert!(written.lines().any(|l| l == "dm_crypt"), "{written}");
    assert_eq!(
        persistent(&check(&host, &args!["--output", "json"]).json(), "dm_crypt"),
        Some(true)
    );

    let second = kmod_monitor(&args!["check", "--host-root", host.path(), "--fix"]);
    second.expect_code(0);
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap_or_default(),
        written,
        "the second run must change nothing: {second}"
    );
    let plan = kmod_monitor(&args![
        "check",
        "--host-root",
        host.path(),
        "--fix",
        "--dry-run"
    ]);
    assert!(plan.stdout.contains("Nothing to do"), "{plan}");
}

#[test]
fn fix_refuses_a_file_it_did_not_create() {
    let host = FakeHost::debian_6_1();
    host.write(
        "etc/modules-load.d/kmod-monitor.conf",
        "# mine, not yours\nfuse\n",
    );
    let out = kmod_monitor(&args!["check", "--host-root", host.path(), "--fix"]);
    out.expect_code(2);
    assert!(out.stderr.contains("kmod-monitor.conf"), "{out}");
    assert_eq!(
        host.read("etc/modules-load.d/kmod-monitor.conf"),
        "# mine, not yours\nfuse\n"
    );
}

/// Whether `path` is a symbolic link (not followed).
fn is_link(path: &std::path::Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

#[test]
fn fix_follows_no_link_planted_at_its_temporary_file_or_its_file() {
    let host = FakeHost::debian_6_1();
    // A file outside the host root, say the container's own /etc/passwd.
    let outside = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let victim = outside.path().join("passwd");
    let passwd = "root:x:0:0:root:/root:/bin/bash\n";
    std::fs::write(&victim, passwd).unwrap_or_else(|e| panic!("{e}"));
    // Planted where a temporary file with a fixed name would be opened.
    let planted = "etc/modules-load.d/kmod-monitor.conf.kmod-monitor-tmp";
    host.link(&victim, planted);

    let out = kmod_monitor(&args!["check", "--host-root", host.path(), "--fix"]);
    out.expect_code(0);
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap_or_default(),
        passwd,
        "the file the planted link points to is untouched: {out}"
    );
    let conf = host.join("etc/modules-load.d/kmod-monitor.conf");
    assert!(!is_link(&conf), "the file written is a file, not a link");
    assert!(
        host.read("etc/modules-load.d/kmod-monitor.conf")
            .lines()
            .any(|l| l == "dm_crypt"),
        "{out}"
    );
    assert!(
        is_link(&host.join(planted)),
        "the planted link is left alone"
    );

    // A link planted at the file itself is refused, and not followed.
    std::fs::remove_file(&conf).unwrap_or_else(|e| panic!("{e}"));
    host.link(&victim, "etc/modules-load.d/kmod-monitor.conf");
    let out = kmod_monitor(&args!["check", "--host-root", host.path(), "--fix"]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("kmod-monitor.conf") && out.stderr.contains("symbolic link"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap_or_default(), passwd);
}

#[test]
fn fix_resolves_absolute_links_inside_the_host_root() {
    let host = FakeHost::debian_6_1();
    // On this host /etc/modules-load.d is an absolute link. It means the
    // host's directory: <host root>/<target>, never the container's own
    // <target>.
    let outside = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let target = outside.path().join("modules-load.d");
    std::fs::create_dir(&target).unwrap_or_else(|e| panic!("{e}"));
    host.link(&target, "etc/modules-load.d");
    let inside = host.join(target.strip_prefix("/").unwrap_or(&target));
    std::fs::create_dir_all(&inside).unwrap_or_else(|e| panic!("{e}"));

    let out = kmod_monitor(&args!["check", "--host-root", host.path(), "--fix"]);
    out.expect_code(0);
    assert!(
        std::fs::read_dir(&target)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false),
        "nothing may be written outside the host root, in {}: {out}",
        target.display()
    );
    let written = std::fs::read_to_string(inside.join("kmod-monitor.conf"))
        .unwrap_or_else(|e| panic!("the file belongs in {}: {e}\n{out}", inside.display()));
    assert!(written.lines().any(|l| l == "dm_crypt"), "{written}");
}

#[test]
fn status_and_metrics_report_persistence() {
    let host = FakeHost::debian_6_1();
    host.write(
        "etc/modules",
        "# /etc/modules: kernel modules to load at boot time.\nnvme_tcp\n",
    );
    let mut daemon = Daemon::start(
        &host,
        &args![
            "--source",
            "poll",
            "--poll-interval",
            "1",
            "--v2-data-engine",
            "--reconcile-interval",
            "1"
        ],
    );
    let status = daemon.status();
    assert_eq!(
        status["persistence"]["nvme_tcp"]["persistent"], true,
        "{status:#}"
    );
    assert_eq!(
        status["persistence"]["dm_crypt"]["persistent"], false,
        "{status:#}"
    );
    // Paths as the node has them, and as read under the host root.
    let source = &status["persistence"]["nvme_tcp"]["sources"][0];
    assert_eq!(
        (&source["path"], &source["host_path"]),
        (&json!("/etc/modules"), &json!(host.join("etc/modules"))),
        "{status:#}"
    );
    // The remedies, as check gives them: every required module but
    // nvme_tcp, which /etc/modules loads.
    assert_eq!(
        kmod_monitor_tests::keys(&status["remedies"]),
        ["dm_crypt", "uio_pci_generic", "vfio_pci"],
        "{status:#}"
    );
    let conf = "/etc/modules-load.d/kmod-monitor.conf";
    assert_eq!(
        status["remedies"]["dm_crypt"],
        json!({
            "explanation": "nothing loads dm_crypt at boot",
            "steps": [{"action": "append_line", "path": conf,
                       "host_path": host.join(&conf[1..]), "line": "dm_crypt"}],
            "boot_source": null, "command": null, "persist_line": "dm_crypt",
            "persist_file": conf, "kernel_config": null,
        }),
        "{status:#}"
    );
    let (_, metrics) = daemon.get("/metrics").unwrap_or_else(|e| panic!("{e}"));
    assert!(
        metrics.contains("kmod_monitor_module_persistent{module=\"nvme_tcp\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kmod_monitor_module_persistent{module=\"dm_crypt\"} 0"),
        "{metrics}"
    );

    // A change on disk is picked up by the next reconcile.
    host.write("etc/modules-load.d/crypt.conf", "dm_crypt\n");
    daemon.wait_for("dm_crypt persistent", Duration::from_secs(5), |s| {
        s["persistence"]["dm_crypt"]["persistent"] == true && s["remedies"]["dm_crypt"].is_null()
    });
}
