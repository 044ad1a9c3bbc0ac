//! Longhorn's node requirement set beyond the module groups, on fake roots
//! built from real Debian files: the V1 groups judged as "available", the
//! V2 kernel per Longhorn version, IOMMU, CPU, the hugepage pool, host
//! commands, multipathd and the optional ublk group; each in both states,
//! through `check` (exit code, JSON and text) and the daemon (re-judged on
//! reconcile and on SIGHUP).
use std::time::Duration;

use kmod_monitor_tests::{
    Daemon, FakeHost, args, check, group, group_names, kmod_monitor, module, pretty,
};
use rustix::process::Signal;
use serde_json::Value;

/// How long the daemon may take to follow a change (1 s reconcile).
const FOLLOW: Duration = Duration::from_secs(5);

/// The JSON report of `check --output json EXTRA...`, asserting the exit
/// code first.
fn check_json(host: &FakeHost, extra: &[std::ffi::OsString], code: i32) -> Value {
    let mut args = Vec::from(args!["--output", "json"]);
    args.extend(extra.iter().cloned());
    check(host, &args).expect_code(code).json()
}

/// A Debian 13 node ready for Longhorn 1.12 with V2: modules loaded, host
/// commands installed, an IOMMU group, an Intel CPU with SSE4.2 and a
/// 1024-page 2 MiB pool.
fn ready_6_12() -> FakeHost {
    let host = FakeHost::debian_6_12();
    host.with_longhorn_packages();
    host.write("sys/kernel/iommu_groups/0/type", "DMA\n");
    host.write(
        "proc/cpuinfo",
        "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx\n\n",
    );
    pool(&host, 1024);
    host.write("etc/os-release", "ID=debian\nVERSION_ID=\"13\"\n");
    host
}

/// Sets the 2 MiB hugepage pool in sysfs to `pages`, all free.
fn pool(host: &FakeHost, pages: u64) {
    let dir = "sys/kernel/mm/hugepages/hugepages-2048kB";
    host.write(format!("{dir}/nr_hugepages"), format!("{pages}\n"));
    host.write(format!("{dir}/free_hugepages"), format!("{pages}\n"));
    host.write(format!("{dir}/resv_hugepages"), "0\n");
    host.write(format!("{dir}/surplus_hugepages"), "0\n");
}

/// Adds `uio_pci_generic` to proc/modules so the V2 module group is met.
fn load_uio(host: &FakeHost) {
    let mut modules = host.read("proc/modules");
    modules.push_str("uio_pci_generic 16384 0 - Live 0x0000000000000000\n");
    host.set_proc_modules_with_initstate(&modules);
}

/// The check named `name` in a report: `(met, level, fix)`.
fn item(report: &Value, name: &str) -> (Value, String, Value) {
    let g = group(report, name);
    assert_eq!(g["mode"], "check", "{}", pretty(g));
    (
        g["met"].clone(),
        g["check"]["level"].as_str().unwrap_or_default().to_owned(),
        g["check"]["fix"].clone(),
    )
}

#[test]
fn a_ready_1_12_node_meets_every_item_and_check_exits_0() {
    let host = ready_6_12();
    load_uio(&host);
    let report = check_json(&host, &args!["--v2-data-engine"], 0);
    assert_eq!(report["met"], true, "{}", pretty(&report));
    for name in ["v2-kernel", "v2-iommu", "v2-cpu", "v2-hugepages"] {
        assert_eq!(
            item(&report, name),
            (Value::Bool(true), "required".to_owned(), Value::Null),
            "{name}"
        );
    }
    for name in ["host-commands", "multipathd"] {
        assert_eq!(item(&report, name).0, true, "{name}");
    }
    // Which table is in force, and why.
    let version = &report["v2"]["longhorn_version"];
    assert_eq!(version["version"], "1.12");
    assert_eq!(version["source"], "default");
    assert_eq!(version["table_row"], "1.12");
}

#[test]
fn the_v2_kernel_follows_the_longhorn_version_in_force() {
    // 6.1 under 1.12: 6.7 required, a critical failure.
    let host = FakeHost::debian_6_1();
    host.with_longhorn_packages();
    let report = check_json(
        &host,
        &args!["--v2-data-engine", "--longhorn-version", "v1.12.0"],
        1,
    );
    let (met, level, fix) = item(&report, "v2-kernel");
    assert_eq!((met, level.as_str()), (Value::Bool(false), "required"));
    assert!(
        fix.as_str().is_some_and(|f| f.contains("6.7 or later")),
        "{fix}"
    );
    assert_eq!(report["v2"]["longhorn_version"]["source"], "flag");
    assert!(!group_names(&report).contains(&"v2-kernel-recommended".to_owned()));

    // 6.1 under 1.11: 5.19 required (met) and 6.7 only recommended.
    let report = check_json(
        &host,
        &args!["--v2-data-engine", "--longhorn-version", "1.11"],
        1,
    );
    assert_eq!(item(&report, "v2-kernel").0, true);
    let (met, level, _) = item(&report, "v2-kernel-recommended");
    assert_eq!((met, level.as_str()), (Value::Bool(false), "warning"));
    assert_eq!(
        group(&report, "v2-kernel-recommended")["severity"],
        "warning"
    );

    // The same from the config file; the flag wins over it.
    let config = host.config("longhorn_version = \"1.11\"\n");
    let report = check_json(&host, &args!["--v2-data-engine", "--config", &config], 1);
    assert_eq!(report["v2"]["longhorn_version"]["version"], "1.11");
    assert_eq!(report["v2"]["longhorn_version"]["source"], "config");
    assert_eq!(item(&report, "v2-kernel").0, true);
    let report = check_json(
        &host,
        &args![
            "--v2-data-engine",
            "--config",
            &config,
            "--longhorn-version",
            "1.12"
        ],
        1,
    );
    assert_eq!(report["v2"]["longhorn_version"]["source"], "flag");
    assert_eq!(item(&report, "v2-kernel").0, false);

    // 6.12 under 1.12: met.
    let report = check_json(
        &ready_6_12(),
        &args!["--v2-data-engine", "--longhorn-version", "1.12"],
        1,
    );
    assert_eq!(item(&report, "v2-kernel").0, true);
}

#[test]
fn a_version_that_is_not_one_is_refused_with_exit_2() {
    let host = FakeHost::debian_6_1();
    let out = check(&host, &args!["--longhorn-version", "latest"]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("--longhorn-version")
            && out.stderr.contains("\"latest\" is not a Longhorn version"),
        "{out}"
    );
    let config = host.config("longhorn_version = \"one.twelve\"\n");
    let out = check(&host, &args!["--config", &config]);
    out.expect_code(2);
    assert!(
        out.stderr.contains(&config.display().to_string()) && out.stderr.contains("line 1"),
        "the error names the file and the line: {out}"
    );
}

#[test]
fn iommu_absent_is_unmet_with_the_parameter_for_this_cpu() {
    let host = ready_6_12();
    load_uio(&host);
    host.remove("sys/kernel/iommu_groups");
    let report = check_json(&host, &args!["--v2-data-engine"], 1);
    let (met, level, fix) = item(&report, "v2-iommu");
    assert_eq!((met, level.as_str()), (Value::Bool(false), "required"));
    assert!(
        fix.as_str().is_some_and(|f| f.contains("intel_iommu=on")),
        "{fix}"
    );
    // An empty directory (CONFIG_IOMMU_API, no IOMMU) is absence too.
    std::fs::create_dir_all(host.join("sys/kernel/iommu_groups")).unwrap_or_else(|e| panic!("{e}"));
    host.write(
        "proc/cpuinfo",
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse4_2\n\n",
    );
    let report = check_json(&host, &args!["--v2-data-engine"], 1);
    let fix = item(&report, "v2-iommu").2;
    assert!(
        fix.as_str().is_some_and(|f| f.contains("amd_iommu=on")),
        "{fix}"
    );
    // Before 1.12 the IOMMU is only a warning: the check passes.
    let report = check_json(
        &host,
        &args!["--v2-data-engine", "--longhorn-version", "1.11"],
        0,
    );
    let (met, level, _) = item(&report, "v2-iommu");
    assert_eq!((met, level.as_str()), (Value::Bool(false), "warning"));
}

#[test]
fn a_cpu_without_sse4_2_fails_v2() {
    let host = ready_6_12();
    load_uio(&host);
    host.write(
        "proc/cpuinfo",
        "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse sse2 ssse3\n\n",
    );
    let report = check_json(&host, &args!["--v2-data-engine"], 1);
    assert_eq!(item(&report, "v2-cpu").0, false);
    assert_eq!(report["v2"]["readiness"]["cpu"]["feature"], "sse4_2");
}

#[test]
fn the_hugepage_pool_against_the_required_count() {
    let host = ready_6_12();
    load_uio(&host);
    pool(&host, 512);
    let report = check_json(&host, &args!["--v2-data-engine"], 1);
    let (met, _, fix) = item(&report, "v2-hugepages");
    assert_eq!(met, false);
    assert!(
        fix.as_str()
            .is_some_and(|f| f.contains("vm.nr_hugepages=1024")),
        "{fix}"
    );
    // A smaller need (from the flag, outside a cluster) is met by 512.
    let report = check_json(
        &host,
        &args!["--v2-data-engine", "--v2-hugepages-2mi", "512"],
        0,
    );
    assert_eq!(item(&report, "v2-hugepages").0, true, "{}", pretty(&report));
    assert_eq!(report["v2"]["required_hugepages"], 512);
}

#[test]
fn missing_host_commands_warn_with_the_distributions_install_line() {
    let host = ready_6_12();
    load_uio(&host);
    host.remove("usr/sbin/iscsiadm");
    host.remove("sbin/mount.nfs");
    // A warning alone never fails the check.
    let report = check_json(&host, &args!["--v2-data-engine"], 0);
    let (met, level, fix) = item(&report, "host-commands");
    assert_eq!((met, level.as_str()), (Value::Bool(false), "warning"));
    assert_eq!(
        fix,
        "apt-get install -y open-iscsi nfs-common",
        "{}",
        pretty(&report)
    );
    let text = check(&host, &args!["--v2-data-engine"])
        .expect_code(0)
        .stdout
        .clone();
    assert!(
        text.contains("iscsiadm") && text.contains("mount.nfs"),
        "{text}"
    );

    host.write(
        "etc/os-release",
        "ID=\"opensuse-leap\"\nID_LIKE=\"suse opensuse\"\n",
    );
    let report = check_json(&host, &args!["--v2-data-engine"], 0);
    assert_eq!(
        item(&report, "host-commands").2,
        "zypper install -y open-iscsi nfs-client"
    );
    host.write(
        "etc/os-release",
        "ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n",
    );
    let report = check_json(&host, &args!["--v2-data-engine"], 0);
    assert_eq!(
        item(&report, "host-commands").2,
        "dnf install -y iscsi-initiator-utils nfs-utils"
    );
}

#[test]
fn a_running_multipathd_is_a_warning() {
    let host = ready_6_12();
    load_uio(&host);
    host.write("proc/812/comm", "multipathd\n");
    host.write("proc/900/comm", "multipathd-not\n");
    let report = check_json(&host, &args!["--v2-data-engine"], 0);
    let (met, level, fix) = item(&report, "multipathd");
    assert_eq!((met, level.as_str()), (Value::Bool(false), "warning"));
    assert!(
        fix.as_str().is_some_and(|f| f.contains("multipathd")),
        "{fix}"
    );
    // The detail is the verdict's text (alerts, the Node condition), so
    // it holds no pid, which changes on every restart of multipathd; the
    // pid is in the readiness facts.
    assert_eq!(
        group(&report, "multipathd")["check"]["detail"],
        "multipathd runs; it can claim Longhorn's block devices"
    );
    assert_eq!(report["v2"]["readiness"]["multipathd"]["pid"], 812);
}

#[test]
fn the_nfs_client_built_in_counts_and_a_missing_one_only_warns() {
    let host = FakeHost::debian_6_12();
    host.with_longhorn_packages();
    let dep = format!("usr/lib/modules/{}/modules.dep", host.release());
    let builtin = format!("usr/lib/modules/{}/modules.builtin", host.release());
    // As modules: available, loaded on demand by mount.nfs.
    let report = check_json(&host, &[], 0);
    let nfs = group(&report, "rwx-nfs-client");
    assert_eq!(
        (
            nfs["met"].clone(),
            nfs["mode"].clone(),
            nfs["severity"].clone()
        ),
        (Value::Bool(true), "available".into(), "warning".into())
    );
    assert_eq!(module(nfs, "nfsv4")["state"], "available");

    // Built in (CONFIG_NFS_FS=y, CONFIG_NFS_V4=y): met, as longhorn#11712 asks.
    host.remove_line(&dep, |l| l.starts_with("kernel/fs/nfs/nfs.ko"));
    host.remove_line(&dep, |l| l.starts_with("kernel/fs/nfs/nfsv4.ko"));
    let mut text = host.read(&builtin);
    text.push_str("kernel/fs/nfs/nfs.ko\nkernel/fs/nfs/nfsv4.ko\n");
    host.write(&builtin, &text);
    let report = check_json(&host, &[], 0);
    let nfs = group(&report, "rwx-nfs-client");
    assert_eq!(nfs["met"], true, "{}", pretty(nfs));
    assert_eq!(module(nfs, "nfs")["state"], "builtin");
    assert_eq!(module(nfs, "nfsv4")["state"], "builtin");

    // Neither: unmet, a warning, so the check still passes.
    host.remove_line(&builtin, |l| l.starts_with("kernel/fs/nfs/nfsv4.ko"));
    let report = check_json(&host, &[], 0);
    let nfs = group(&report, "rwx-nfs-client");
    assert_eq!(nfs["met"], false);
    assert_eq!(module(nfs, "nfsv4")["state"], "missing");
    let text = check(&host, &[]).expect_code(0).stdout.clone();
    assert!(
        text.contains("which do not fail the check: rwx-nfs-client"),
        "{text}"
    );

    // Switched off for a cluster without RWX volumes: gone.
    let config = host.config("[groups.rwx-nfs-client]\nenabled = false\n");
    let report = check_json(&host, &args!["--config", &config], 0);
    assert!(!group_names(&report).contains(&"rwx-nfs-client".to_owned()));
}

#[test]
fn a_blacklisted_iscsi_tcp_is_unavailable_on_demand() {
    let host = FakeHost::debian_6_12();
    host.with_longhorn_packages();
    let report = check_json(&host, &[], 0);
    assert_eq!(group(&report, "v1-iscsi")["met"], true);

    host.write(
        "etc/modprobe.d/no-iscsi.conf",
        "# local policy\nblacklist iscsi_tcp\n",
    );
    let report = check_json(&host, &[], 0);
    let g = group(&report, "v1-iscsi");
    assert_eq!(g["met"], false, "{}", pretty(g));
    assert_eq!(g["severity"], "warning");
    let blocked = &module(g, "iscsi_tcp")["persistence"]["blocked_by"];
    assert!(
        blocked.to_string().contains("no-iscsi.conf"),
        "the blacklist line is named: {blocked}"
    );
    // A severity raised in the config file makes it fail the check.
    let config = host.config("[groups.v1-iscsi]\nseverity = \"critical\"\n");
    check_json(&host, &args!["--config", &config], 1);
}

#[test]
fn ublk_is_off_by_default_and_judged_with_its_kernel_when_on() {
    let host = ready_6_12();
    let report = check_json(&host, &[], 0);
    assert!(
        !group_names(&report).iter().any(|g| g.starts_with("ublk")),
        "{:?}",
        group_names(&report)
    );

    let config = host.config("[groups.ublk]\nenabled = true\n");
    // On 6.12 ublk_drv is a module not loaded yet: the group is unmet, the
    // kernel item met.
    let report = check_json(&host, &args!["--config", &config], 1);
    assert_eq!(group(&report, "ublk")["met"], false);
    assert_eq!(
        module(group(&report, "ublk"), "ublk_drv")["state"],
        "available"
    );
    assert_eq!(item(&report, "ublk-kernel").0, true);
    let mut modules = host.read("proc/modules");
    modules.push_str("ublk_drv 57344 0 - Live 0x0000000000000000\n");
    host.set_proc_modules_with_initstate(&modules);
    let report = check_json(&host, &args!["--config", &config], 0);
    assert_eq!(group(&report, "ublk")["met"], true);

    // Debian 12's 6.1 was built without it: the fix is the kernel option.
    let old = FakeHost::debian_6_1();
    let config = old.config("[groups.ublk]\nenabled = true\n");
    let report = check_json(&old, &args!["--config", &config], 1);
    let ublk = module(group(&report, "ublk"), "ublk_drv");
    assert_eq!(ublk["state"], "missing");
    assert_eq!(ublk["remedy"]["kernel_config"], "CONFIG_BLK_DEV_UBLK");
}

#[test]
fn the_daemon_rejudges_items_on_reconcile_and_on_sighup() {
    let host = ready_6_12();
    load_uio(&host);
    host.remove("sys/kernel/iommu_groups");
    let config = host.config("longhorn_version = \"1.12\"\n");
    let mut daemon = Daemon::start(
        &host,
        &args![
            "--source",
            "poll",
            "--poll-interval",
            "1",
            "--reconcile-interval",
            "1",
            "--v2-data-engine",
            "--config",
            &config
        ],
    );
    let met = |s: &Value, name: &str| group(s, name)["met"].clone();
    let status = daemon.status();
    assert_eq!(met(&status, "v2-iommu"), false, "{}", pretty(&status));
    assert!(
        daemon
            .metrics()
            .contains(r#"kmod_monitor_requirement_met{requirement="v2-iommu"} 0"#),
        "{}",
        daemon.metrics()
    );
    // The IOMMU appears (a reboot with intel_iommu=on, as a reconcile sees it).
    host.write("sys/kernel/iommu_groups/3/type", "DMA\n");
    daemon.wait_for("v2-iommu met after a reconcile", FOLLOW, |s| {
        met(s, "v2-iommu") == true
    });

    // A config naming an older Longhorn moves the kernel item to its row.
    host.config("longhorn_version = \"1.11\"\n");
    daemon.signal(Signal::HUP);
    let status = daemon.wait_for("the 1.11 table after SIGHUP", FOLLOW, |s| {
        s["v2"]["longhorn_version"]["version"] == "1.11"
    });
    assert_eq!(status["v2"]["longhorn_version"]["source"], "config");
    assert_eq!(met(&status, "v2-kernel"), true);
    let text = daemon.metrics();
    let versions: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("kmod_monitor_longhorn_version_info{"))
        .collect();
    assert_eq!(
        versions,
        [
            r#"kmod_monitor_longhorn_version_info{version="1.11",table_row="1.11",source="config"} 1"#
        ],
        "one series, replaced on the change"
    );
    assert!(
        text.contains(r#"kmod_monitor_requirement_info{requirement="v2-kernel",kind="check",severity="critical"} 1"#),
        "{text}"
    );
}

#[test]
fn the_daemon_refuses_a_bad_version_too() {
    let host = FakeHost::debian_6_1();
    let out = kmod_monitor(&args![
        "run",
        "--host-root",
        host.path(),
        "--longhorn-version",
        "x"
    ]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("\"x\" is not a Longhorn version"),
        "{out}"
    );
}

#[test]
fn a_user_group_can_be_judged_as_available_too() {
    let host = FakeHost::debian_6_12();
    host.with_longhorn_packages();
    let config = host.config("[groups.nbd-client]\navailable = [\"nbd\"]\n");
    let report = check_json(&host, &args!["--config", &config], 0);
    let g = group(&report, "nbd-client");
    assert_eq!(
        (g["mode"].clone(), g["met"].clone(), g["severity"].clone()),
        ("available".into(), Value::Bool(true), "critical".into()),
        "{}",
        pretty(g)
    );
    // `install nbd /bin/false` stops every modprobe of it: unmet, and as a
    // critical group it fails the check.
    host.write("etc/modprobe.d/site.conf", "install nbd /bin/false\n");
    let report = check_json(&host, &args!["--config", &config], 1);
    assert_eq!(group(&report, "nbd-client")["met"], false);
}
