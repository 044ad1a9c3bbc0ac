//! `kmod-monitor check`: verdicts per group, module states, remedies, and
//! both output formats, on fake roots built from real Debian and dev-machine
//! files.
use kmod_monitor_tests::{
    DEBIAN_6_1, DEBIAN_6_12, DEV_6_18, FakeHost, MODULES_LOAD_FILE, args, check, fixture_text,
    group, group_names, keys, kmod_monitor, module, pretty,
};
use serde_json::{Value, json};

/// The JSON report of `check --output json EXTRA...`, asserting the exit
/// code first.
fn check_json(host: &FakeHost, extra: &[std::ffi::OsString], code: i32) -> Value {
    let mut args = Vec::from(args!["--output", "json"]);
    args.extend(extra.iter().cloned());
    check(host, &args).expect_code(code).json()
}

/// Whether some line of `text`, split on whitespace, ends with `tail`
/// (a table row: `GROUP MET MODULE STATE`, group columns blank on follow-up
/// rows).
fn has_row(text: &str, tail: &[&str]) -> bool {
    text.lines().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.ends_with(tail)
    })
}

#[test]
fn base_is_met_on_the_real_debian_6_1_root() {
    let host = FakeHost::debian_6_1();
    let report = check_json(&host, &[], 0);
    assert_eq!(report["kernel_release"], DEBIAN_6_1, "{}", pretty(&report));
    assert_eq!(report["modules_supported"], true, "{}", pretty(&report));
    assert_eq!(report["met"], true, "{}", pretty(&report));
    // Without --v2-data-engine: base, the V1 groups and the host checks.
    assert_eq!(
        group_names(&report),
        [
            "base",
            "v1-iscsi",
            "rwx-nfs-client",
            "host-commands",
            "multipathd"
        ],
        "{}",
        pretty(&report)
    );
    // The captured guest has no iscsiadm and friends: a warning, which does
    // not fail the check (met is true above).
    let commands = group(&report, "host-commands");
    assert_eq!(
        (&commands["met"], &commands["severity"]),
        (&json!(false), &json!("warning"))
    );
    assert_eq!(commands["check"]["level"], "warning");
    assert_eq!(group(&report, "v1-iscsi")["mode"], "available");
    let base = group(&report, "base");
    assert_eq!(base["mode"], "all_of");
    assert_eq!(base["met"], true);
    // Loaded, but nothing loads it at boot: the remedy is the line that
    // does, named as the node has it (and as read, under the host root).
    let conf = "/etc/modules-load.d/kmod-monitor.conf";
    assert_eq!(
        base["modules"],
        json!([{"name": "dm_crypt", "state": "loaded", "remedy": {
            "explanation": "nothing loads dm_crypt at boot",
            "steps": [{"action": "append_line", "path": conf,
                       "host_path": host.join(&conf[1..]), "line": "dm_crypt"}],
            "boot_source": null, "command": null, "persist_line": "dm_crypt",
            "persist_file": conf, "kernel_config": null,
        }, "persistence": {"persistent": false, "sources": [], "blocked_by": []}}]),
        "{}",
        pretty(base)
    );
    assert_eq!(report["remedies"]["dm_crypt"], base["modules"][0]["remedy"]);
    // Every file the daemon reads is present and well formed.
    assert_eq!(report["warnings"], json!([]), "{}", pretty(&report));
}

#[test]
fn check_json_has_exactly_the_documented_fields() {
    let host = FakeHost::debian_6_1();
    let report = check_json(&host, &args!["--v2-data-engine"], 1);
    assert_eq!(
        keys(&report),
        [
            "cluster",
            "groups",
            "kernel_release",
            "met",
            "modules_supported",
            "other_kernels",
            "remedies",
            "v2",
            "warnings"
        ]
    );
    let v2 = group(&report, "v2-data-engine");
    assert_eq!(keys(v2), ["met", "mode", "modules", "name", "severity"]);
    let kernel = group(&report, "v2-kernel");
    assert_eq!(
        keys(kernel),
        ["check", "met", "mode", "modules", "name", "severity"]
    );
    assert_eq!(keys(&kernel["check"]), ["detail", "fix", "level", "source"]);
    assert_eq!(
        keys(module(v2, "vfio_pci")),
        ["name", "persistence", "remedy", "state"]
    );
    assert_eq!(
        keys(&module(v2, "vfio_pci")["persistence"]),
        ["blocked_by", "persistent", "sources"]
    );
    assert_eq!(
        keys(&module(v2, "uio_pci_generic")["remedy"]),
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
}

#[test]
fn v2_data_engine_unmet_names_the_module_and_its_fix() {
    let host = FakeHost::debian_6_1();
    let report = check_json(&host, &args!["--v2-data-engine"], 1);
    assert_eq!(report["met"], false, "{}", pretty(&report));
    assert_eq!(
        group_names(&report),
        [
            "base",
            "v2-data-engine",
            "v1-iscsi",
            "rwx-nfs-client",
            "v2-kernel",
            "v2-iommu",
            "v2-hugepages",
            "host-commands",
            "multipathd"
        ]
    );
    assert_eq!(group(&report, "base")["met"], true, "{}", pretty(&report));

    let v2 = group(&report, "v2-data-engine");
    assert_eq!(v2["mode"], "all_of");
    assert_eq!(v2["met"], false);
    let names: Vec<&str> = v2["modules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, ["vfio_pci", "uio_pci_generic", "nvme_tcp"]);
    for loaded in ["vfio_pci", "nvme_tcp"] {
        let m = module(v2, loaded);
        assert_eq!(m["state"], "loaded", "{}", pretty(v2));
        // Nothing to load; only the line that brings it back after a
        // reboot.
        assert_eq!(m["remedy"]["command"], Value::Null, "{}", pretty(v2));
        assert_eq!(m["remedy"]["persist_line"], loaded, "{}", pretty(v2));
        assert_eq!(
            m["remedy"]["steps"].as_array().map(Vec::len),
            Some(1),
            "{}",
            pretty(v2)
        );
    }

    let uio = module(v2, "uio_pci_generic");
    assert_eq!(uio["state"], "available", "{}", pretty(v2));
    let remedy = &uio["remedy"];
    assert_eq!(remedy["command"], "modprobe uio_pci_generic");
    assert_eq!(remedy["persist_line"], "uio_pci_generic");
    let actions: Vec<&str> = remedy["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["action"].as_str())
        .collect();
    assert_eq!(actions, ["run", "append_line"], "{}", pretty(remedy));
    assert_eq!(remedy["persist_file"], MODULES_LOAD_FILE);
    assert_eq!(remedy["kernel_config"], Value::Null, "{}", pretty(remedy));
    let explanation = remedy["explanation"].as_str().unwrap_or_default();
    assert!(
        explanation.contains("uio_pci_generic") && explanation.contains(DEBIAN_6_1),
        "explanation should name the module and the kernel: {explanation:?}"
    );
}

#[test]
fn text_output_has_a_row_per_module_and_the_fixes() {
    let host = FakeHost::debian_6_1();
    let out = check(&host, &args!["--v2-data-engine"]);
    out.expect_code(1);
    let text = &out.stdout;
    assert!(
        text.starts_with(&format!("kernel {DEBIAN_6_1}")) && text.contains("loadable modules: yes"),
        "{out}"
    );
    // The last column says whether the module will be there after a
    // reboot: nothing on this host loads any of them at boot.
    for row in [
        &[
            "base", "yes", "dm_crypt", "loaded", "NO", "(gone", "after", "reboot)",
        ][..],
        &[
            "v2-data-engine",
            "NO",
            "vfio_pci",
            "loaded",
            "NO",
            "(gone",
            "after",
            "reboot)",
        ],
        &["uio_pci_generic", "available", "no"],
        &["nvme_tcp", "loaded", "NO", "(gone", "after", "reboot)"],
    ] {
        assert!(has_row(text, row), "no table row ending in {row:?}: {out}");
    }
    let fixes = text
        .split_once("To fix:")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no \"To fix:\" section: {out}"));
    for line in [
        "uio_pci_generic (available):",
        "\n      1. modprobe uio_pci_generic\n",
        &format!("\n      2. echo uio_pci_generic >> {MODULES_LOAD_FILE}\n"),
    ] {
        assert!(fixes.contains(line), "\"To fix\" lacks {line:?}: {out}");
    }
    // Modules that are fine get no fix.
    for fine in ["dm_crypt", "vfio_pci", "nvme_tcp"] {
        assert!(
            !fixes.contains(&format!("{fine} (")),
            "{fine} should not be in \"To fix\": {out}"
        );
    }
    assert!(
        text.contains(
            "4 of 9 requirements NOT met: v2-data-engine, v2-kernel, v2-iommu, v2-hugepages"
        ),
        "{out}"
    );
    assert!(
        text.contains("1 warning(s), which do not fail the check: host-commands"),
        "{out}"
    );
}

#[test]
fn text_output_when_all_groups_are_met_has_no_fixes() {
    let host = FakeHost::debian_6_1();
    host.with_longhorn_packages();
    let out = check(&host, &[]);
    out.expect_code(0);
    assert!(
        has_row(
            &out.stdout,
            &[
                "base", "yes", "dm_crypt", "loaded", "NO", "(gone", "after", "reboot)"
            ]
        ),
        "{out}"
    );
    assert!(!out.stdout.contains("To fix"), "{out}");
    assert!(out.stdout.contains("All 5 requirements met."), "{out}");
    assert!(!out.stdout.contains("warning(s)"), "{out}");
    assert!(!out.stdout.contains("\nwarning:"), "{out}");
}

/// Takes uio_pci_generic out of the module tree, as on a kernel that
/// does not ship it.
fn without_uio_pci_generic_file(host: &FakeHost) {
    let dep = host.modules_dir().join("modules.dep");
    host.remove_line(&dep, |l| {
        l.starts_with("kernel/drivers/uio/uio_pci_generic.ko:")
    });
    assert!(
        !host
            .read(host.modules_dir().join("modules.builtin"))
            .contains("uio_pci_generic"),
        "the fixture's modules.builtin must not list uio_pci_generic"
    );
}

#[test]
fn missing_module_names_the_kernel_option_that_is_not_set() {
    let host = FakeHost::debian_6_1();
    without_uio_pci_generic_file(&host);
    host.replace(
        format!("boot/config-{DEBIAN_6_1}"),
        "\nCONFIG_UIO_PCI_GENERIC=m\n",
        "\n# CONFIG_UIO_PCI_GENERIC is not set\n",
    );
    let report = check_json(&host, &args!["--v2-data-engine"], 1);
    let uio = module(group(&report, "v2-data-engine"), "uio_pci_generic");
    assert_eq!(uio["state"], "missing", "{}", pretty(&report));
    let remedy = &uio["remedy"];
    assert_eq!(
        remedy["kernel_config"],
        "CONFIG_UIO_PCI_GENERIC",
        "{}",
        pretty(remedy)
    );
    // Nothing to modprobe or persist for a module the kernel lacks.
    assert_eq!(remedy["command"], Value::Null, "{}", pretty(remedy));
    assert_eq!(remedy["persist_line"], Value::Null, "{}", pretty(remedy));
    assert_eq!(remedy["persist_file"], Value::Null, "{}", pretty(remedy));
    let explanation = remedy["explanation"].as_str().unwrap_or_default();
    assert!(
        explanation.contains("CONFIG_UIO_PCI_GENERIC is not set"),
        "explanation should say the option is not set: {explanation:?}"
    );
}

#[test]
fn missing_module_of_a_modular_option_points_at_the_modules_package() {
    // Same missing file, but the config still says =m: the module was built
    // and is not installed, which is a different fix than "not set".
    let host = FakeHost::debian_6_1();
    without_uio_pci_generic_file(&host);
    let report = check_json(&host, &args!["--v2-data-engine"], 1);
    let uio = module(group(&report, "v2-data-engine"), "uio_pci_generic");
    assert_eq!(uio["state"], "missing", "{}", pretty(&report));
    let remedy = &uio["remedy"];
    assert_eq!(remedy["kernel_config"], "CONFIG_UIO_PCI_GENERIC");
    let explanation = remedy["explanation"].as_str().unwrap_or_default();
    assert!(
        explanation.contains("CONFIG_UIO_PCI_GENERIC=m") && !explanation.contains("is not set"),
        "explanation should say the option is =m but no file is installed: {explanation:?}"
    );
}

#[test]
fn kernel_without_module_support_says_so() {
    let host = FakeHost::dev_6_18_no_modules();
    let report = check_json(&host, &[], 1);
    assert_eq!(report["kernel_release"], DEV_6_18);
    assert_eq!(report["modules_supported"], false, "{}", pretty(&report));
    assert_eq!(report["met"], false);
    let base = group(&report, "base");
    assert_eq!(base["met"], false);
    let dm_crypt = module(base, "dm_crypt");
    assert_eq!(dm_crypt["state"], "missing", "{}", pretty(base));
    let remedy = &dm_crypt["remedy"];
    assert_eq!(remedy["kernel_config"], "CONFIG_DM_CRYPT");
    assert_eq!(remedy["command"], Value::Null, "no modprobe can help here");
    let explanation = remedy["explanation"].as_str().unwrap_or_default();
    assert!(
        explanation.contains("CONFIG_MODULES is off"),
        "explanation should say the kernel cannot load modules: {explanation:?}"
    );

    let out = check(&host, &[]);
    out.expect_code(1);
    assert!(
        out.stdout
            .contains("loadable modules: NO (CONFIG_MODULES off"),
        "text output should say modules are unsupported: {out}"
    );
    assert!(
        has_row(&out.stdout, &["base", "NO", "dm_crypt", "missing", "no"]),
        "{out}"
    );
}

#[test]
fn merged_usr_module_tree_of_debian_6_12_is_found() {
    let host = FakeHost::debian_6_12();
    assert!(
        !host.join("lib/modules").exists(),
        "this root must only have usr/lib/modules"
    );
    let report = check_json(&host, &args!["--v2-data-engine"], 1);
    assert_eq!(report["kernel_release"], DEBIAN_6_12);
    assert_eq!(group(&report, "base")["met"], true, "{}", pretty(&report));
    let v2 = group(&report, "v2-data-engine");
    // Only reachable through usr/lib/modules/<rel>/modules.dep (.ko.xz).
    assert_eq!(
        module(v2, "uio_pci_generic")["state"],
        "available",
        "{}",
        pretty(v2)
    );
    assert_eq!(module(v2, "vfio_pci")["state"], "loaded");
    assert_eq!(module(v2, "nvme_tcp")["state"], "loaded");
}

#[test]
fn dash_and_underscore_name_the_same_module() {
    let host = FakeHost::debian_6_1();
    let config = host.config("[groups.nvme]\nall_of = [\"nvme-tcp\"]\n");
    let report = check_json(&host, &args!["--config", &config], 0);
    let nvme = group(&report, "nvme");
    assert_eq!(nvme["met"], true, "{}", pretty(&report));
    let modules = nvme["modules"].as_array().cloned().unwrap_or_default();
    assert_eq!(modules.len(), 1, "{}", pretty(nvme));
    let nvme_tcp = &modules[0];
    assert_eq!(
        (&nvme_tcp["name"], &nvme_tcp["state"]),
        (&json!("nvme_tcp"), &json!("loaded")),
        "nvme-tcp is reported under the kernel's name: {}",
        pretty(nvme)
    );
    assert_eq!(
        nvme_tcp["remedy"]["persist_line"],
        "nvme_tcp",
        "and persisted under it: {}",
        pretty(nvme)
    );
}

#[test]
fn a_module_whose_name_is_a_prefix_of_a_loaded_one_is_not_loaded() {
    let host = FakeHost::debian_6_1();
    host.unload("vfio_pci");
    assert!(
        host.is_loaded("vfio_pci_core"),
        "vfio_pci_core must stay loaded"
    );
    let config = host.config("[groups.vfio]\nall_of = [\"vfio_pci\"]\n");
    let report = check_json(&host, &args!["--config", &config], 1);
    let vfio = group(&report, "vfio");
    assert_eq!(vfio["met"], false, "{}", pretty(&report));
    assert_eq!(
        module(vfio, "vfio_pci")["state"],
        "available",
        "{}",
        pretty(vfio)
    );
    assert_eq!(
        module(vfio, "vfio_pci")["remedy"]["command"],
        "modprobe vfio_pci"
    );
}

#[test]
fn any_of_group_is_met_by_one_module_and_groups_are_judged_alone() {
    let host = FakeHost::debian_6_1();
    let config = host.config(
        "[groups.spdk-driver]\nany_of = [\"vfio_pci\", \"uio_pci_generic\"]\nseverity = \"warning\"\n",
    );
    let report = check_json(&host, &args!["--config", &config, "--v2-data-engine"], 1);
    assert_eq!(
        group_names(&report),
        [
            "base",
            "v2-data-engine",
            "v1-iscsi",
            "rwx-nfs-client",
            "spdk-driver",
            "v2-kernel",
            "v2-iommu",
            "v2-hugepages",
            "host-commands",
            "multipathd"
        ]
    );
    let spdk = group(&report, "spdk-driver");
    assert_eq!(spdk["mode"], "any_of");
    assert_eq!(
        spdk["met"],
        true,
        "vfio_pci alone meets it: {}",
        pretty(spdk)
    );
    assert_eq!(module(spdk, "vfio_pci")["state"], "loaded");
    let uio = module(spdk, "uio_pci_generic");
    assert_eq!(uio["state"], "available");
    assert_eq!(uio["remedy"], Value::Null, "a met group needs no fix");

    // The same module is judged per group: unmet v2 keeps its fix...
    let v2 = group(&report, "v2-data-engine");
    assert_eq!(v2["met"], false);
    assert_eq!(
        module(v2, "uio_pci_generic")["remedy"]["command"],
        "modprobe uio_pci_generic"
    );
    // ...and does not change base's verdict.
    assert_eq!(group(&report, "base")["met"], true);
    assert_eq!(report["met"], false, "one unmet group makes the node unmet");

    let out = check(&host, &args!["--config", &config, "--v2-data-engine"]);
    out.expect_code(1);
    assert!(
        has_row(
            &out.stdout,
            &[
                "spdk-driver",
                "(any",
                "of)",
                "yes",
                "vfio_pci",
                "loaded",
                "NO",
                "(gone",
                "after",
                "reboot)"
            ]
        ),
        "{out}"
    );
}

#[test]
fn unmet_base_does_not_change_other_verdicts() {
    let host = FakeHost::debian_6_1();
    host.unload("dm_crypt");
    let report = check_json(&host, &args!["--v2-data-engine"], 1);
    let base = group(&report, "base");
    assert_eq!(base["met"], false);
    assert_eq!(module(base, "dm_crypt")["state"], "available");
    assert_eq!(
        module(base, "dm_crypt")["remedy"]["command"],
        "modprobe dm_crypt"
    );
    let v2 = group(&report, "v2-data-engine");
    assert_eq!(v2["met"], false);
    assert_eq!(module(v2, "vfio_pci")["state"], "loaded");
    assert_eq!(module(v2, "nvme_tcp")["state"], "loaded");
}

#[test]
fn modules_in_transition_take_their_state_from_proc_modules() {
    // /proc/modules of a real 6.1 guest read while an out-of-tree module
    // was in its init and in its exit, and the same after `insmod` of a
    // module without exit ([permanent]).
    let config = "[groups.slow]\nall_of = [\"slowinit\"]\n";
    for (fixture, state, met) in [
        ("proc_modules.slowinit-loading.debian-6.1", "loading", false),
        ("proc_modules.slowinit-live.debian-6.1", "loaded", true),
        (
            "proc_modules.slowinit-unloading.debian-6.1",
            "unloading",
            true,
        ),
    ] {
        let host = FakeHost::debian_6_1();
        host.set_proc_modules_with_initstate(&fixture_text(fixture));
        let config = host.config(config);
        let report = check_json(&host, &args!["--config", &config], if met { 0 } else { 1 });
        let slow = group(&report, "slow");
        assert_eq!(
            module(slow, "slowinit")["state"],
            state,
            "{fixture}: {}",
            pretty(slow)
        );
        assert_eq!(slow["met"], met, "{fixture}: {}", pretty(slow));
    }

    let host = FakeHost::debian_6_1();
    host.set_proc_modules_with_initstate(&fixture_text("proc_modules.noexit-permanent.debian-6.1"));
    let config = host.config("[groups.noexit]\nall_of = [\"noexit\"]\n");
    let report = check_json(&host, &args!["--config", &config], 0);
    assert_eq!(
        module(group(&report, "noexit"), "noexit")["state"],
        "loaded"
    );
}

#[test]
fn a_live_module_whose_init_is_still_coming_is_loading() {
    // Read between /proc/modules (Live) and initstate (coming): the init
    // has not finished, so the module does not count yet.
    let host = FakeHost::debian_6_1();
    host.write("sys/module/dm_crypt/initstate", "coming\n");
    let report = check_json(&host, &[], 1);
    let dm_crypt = module(group(&report, "base"), "dm_crypt");
    assert_eq!(dm_crypt["state"], "loading", "{}", pretty(&report));
    assert_eq!(
        dm_crypt["remedy"]["steps"],
        json!([{"action": "check_again"}]),
        "a module in transition should be checked again: {}",
        pretty(dm_crypt)
    );
}

#[test]
fn host_root_may_come_from_the_config_file() {
    let host = FakeHost::debian_6_1();
    let config = host.config(&format!(
        "host_root = {:?}\n",
        host.path().display().to_string()
    ));
    let out = kmod_monitor(&args!["check", "--output", "json", "--config", &config]);
    let report = out.expect_code(0).json();
    assert_eq!(
        report["kernel_release"], DEBIAN_6_1,
        "read from the config's host_root"
    );

    // The flag wins over the file.
    let other = FakeHost::dev_6_18_no_modules();
    let report = check_json(&other, &args!["--config", &config], 1);
    assert_eq!(
        report["kernel_release"], DEV_6_18,
        "--host-root wins over host_root"
    );
}

#[test]
fn a_hugepage_requirement_switched_off_by_the_flag_says_so() {
    let host = FakeHost::debian_6_1();
    let report = check_json(
        &host,
        &args![
            "--v2-data-engine",
            "--v2-hugepages-2mi",
            "0",
            "--longhorn",
            "off"
        ],
        1,
    );
    let hugepages = &report["v2"]["enablement"]["v2-hugepages"];
    assert_eq!(hugepages["enabled"], false, "{}", pretty(&report["v2"]));
    assert_eq!(hugepages["source"], "flag", "{}", pretty(hugepages));
    assert!(
        hugepages["reason"]
            .as_str()
            .is_some_and(|r| r.contains("--v2-hugepages-2mi 0")),
        "{}",
        pretty(hugepages)
    );
    let config = host.config("v2_hugepages_2mi = 0\n");
    let report = check_json(
        &host,
        &args!["--v2-data-engine", "--config", &config, "--longhorn", "off"],
        1,
    );
    assert_eq!(
        report["v2"]["enablement"]["v2-hugepages"]["source"],
        "config"
    );
}
