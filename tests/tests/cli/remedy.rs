//! Remedies that work, case by case: for every combination of nvme_tcp
//! {loaded, not loaded} × {listed in modules-load.d, not listed} ×
//! {`blacklist` in modprobe.d, `install … /bin/false`,
//! `modprobe.blacklist=` on the kernel command line, nothing}, `check`
//! gives exactly the remedy, with node paths; applying it to the fake host
//! root (`check --fix` for its own steps, the test for the steps it prints
//! for a person) and checking again finds the requirement met and
//! persistent; and `check --fix` never edits a file it does not own nor
//! writes a line a blacklist would skip.
use std::{ffi::OsString, fmt};

use kmod_monitor_tests::{FakeHost, args, check, kmod_monitor, pretty};
use serde_json::{Value, json};

/// What keeps nvme_tcp from loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    /// Nothing.
    None,
    /// `blacklist nvme_tcp` in /etc/modprobe.d/x.conf.
    Blacklist,
    /// `install nvme_tcp /bin/false` in /etc/modprobe.d/x.conf.
    InstallFalse,
    /// `modprobe.blacklist=evbug,nvme_tcp` on the kernel command line, set
    /// in /etc/default/grub.
    CmdlineBlacklist,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    loaded: bool,
    listed: bool,
    rule: Rule,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            loaded,
            listed,
            rule,
        } = self;
        write!(
            f,
            "nvme_tcp {}, {}, rule {rule:?}",
            if *loaded { "loaded" } else { "not loaded" },
            if *listed { "listed" } else { "not listed" }
        )
    }
}

const MODPROBE_D: &str = "etc/modprobe.d/x.conf";
const GRUB: &str = "etc/default/grub";
const GRUB_LINE: &str = "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet modprobe.blacklist=evbug,nvme_tcp\"";
/// Debian 12's stock /etc/default/grub (its comments left out), with the
/// parameter added on line 4.
const GRUB_FILE: &str = "GRUB_DEFAULT=0\nGRUB_TIMEOUT=5\nGRUB_DISTRIBUTOR=`lsb_release -i -s 2> \
                         /dev/null || echo Debian`\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet \
                         modprobe.blacklist=evbug,nvme_tcp\"\nGRUB_CMDLINE_LINUX=\"\"\n";

/// The Debian 12 guest, with dm_crypt persistent so that nvme_tcp (its own
/// group) is the only module that may need a remedy.
fn host_for(case: Case) -> (FakeHost, String) {
    let host = FakeHost::debian_6_1();
    host.write("etc/modules-load.d/base.conf", "dm_crypt\n");
    let proc_line = host
        .read("proc/modules")
        .lines()
        .find(|l| l.starts_with("nvme_tcp "))
        .unwrap_or_else(|| panic!("the fixture's proc/modules lists nvme_tcp"))
        .to_owned();
    if !case.loaded {
        host.unload("nvme_tcp");
    }
    if case.listed {
        host.write("etc/modules-load.d/lh.conf", "nvme_tcp\n");
    }
    match case.rule {
        Rule::None => {}
        Rule::Blacklist => {
            host.write(MODPROBE_D, "# local policy\nblacklist nvme_tcp\n");
        }
        Rule::InstallFalse => {
            host.write(MODPROBE_D, "# local policy\ninstall nvme_tcp /bin/false\n");
        }
        Rule::CmdlineBlacklist => {
            host.write(GRUB, GRUB_FILE);
            let cmdline = host.read("proc/cmdline");
            host.write(
                "proc/cmdline",
                format!("{} modprobe.blacklist=evbug,nvme_tcp\n", cmdline.trim_end()),
            );
        }
    }
    (host, proc_line)
}

/// The actions of the remedy the case needs, in order.
fn expected_actions(case: Case) -> Vec<&'static str> {
    let Case {
        loaded,
        listed,
        rule,
    } = case;
    let mut actions = Vec::new();
    // modprobe by name ignores a blacklist: it loads the module at once.
    // `install … /bin/false` must go first.
    if !loaded && rule != Rule::InstallFalse {
        actions.push("run");
    }
    match rule {
        Rule::None => {}
        Rule::Blacklist | Rule::InstallFalse => actions.push("delete_lines"),
        Rule::CmdlineBlacklist => actions.push("kernel_cmdline"),
    }
    if !loaded && rule == Rule::InstallFalse {
        actions.push("run");
    }
    // A listed module needs no second line: once the rule is gone, the
    // listing loads it.
    if !listed {
        actions.push("append_line");
    }
    actions
}

/// The rule's step, as JSON, with node paths and the paths as read.
fn expected_rule_step(host: &FakeHost, rule: Rule) -> Option<Value> {
    let delete = |text: &str| {
        json!({
            "action": "delete_lines",
            "path": "/etc/modprobe.d/x.conf",
            "host_path": host.join(MODPROBE_D),
            "copy_from": null,
            "lines": [{"first": 2, "last": 2, "text": text}],
        })
    };
    match rule {
        Rule::None => None,
        Rule::Blacklist => Some(delete("blacklist nvme_tcp")),
        Rule::InstallFalse => Some(delete("install nvme_tcp /bin/false")),
        Rule::CmdlineBlacklist => Some(json!({
            "action": "kernel_cmdline",
            "parameters": [{
                "parameter": "modprobe.blacklist=evbug,nvme_tcp",
                "replacement": "modprobe.blacklist=evbug",
            }],
            "edits": [{
                "path": "/etc/default/grub",
                "host_path": host.join(GRUB),
                "line": 4,
                "text": GRUB_LINE,
                "replacement": "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet modprobe.blacklist=evbug\"",
            }],
        })),
    }
}

/// The rule's step as text output prints it.
fn expected_rule_text(rule: Rule) -> Option<&'static str> {
    match rule {
        Rule::None => None,
        Rule::Blacklist => Some("in /etc/modprobe.d/x.conf, delete line 2 (`blacklist nvme_tcp`)"),
        Rule::InstallFalse => {
            Some("in /etc/modprobe.d/x.conf, delete line 2 (`install nvme_tcp /bin/false`)")
        }
        Rule::CmdlineBlacklist => Some(
            "in /etc/default/grub, change line 4 from `GRUB_CMDLINE_LINUX_DEFAULT=\"quiet \
             modprobe.blacklist=evbug,nvme_tcp\"` to `GRUB_CMDLINE_LINUX_DEFAULT=\"quiet \
             modprobe.blacklist=evbug\"`; then run update-grub",
        ),
    }
}

/// What a successful `modprobe nvme_tcp` leaves behind. The test cannot run
/// modprobe (`check --fix` runs it through chroot into the fake root,
/// which has none, so it fails); a real node's kernel would list the module
/// in /proc/modules, and this writes that line, as the kernel would.
fn simulate_modprobe(host: &FakeHost, proc_line: &str) {
    if host.is_loaded("nvme_tcp") {
        return;
    }
    let mut modules = host.read("proc/modules");
    modules.push_str(proc_line);
    modules.push('\n');
    host.write("sys/module/nvme_tcp/initstate", "live\n");
    host.write("proc/modules", modules);
}

/// Carries out a person's step on the fake root, as the operator would,
/// after checking that the file still says what the step says it does.
fn apply_person_step(host: &FakeHost, step: &Value, case: Case, proc_line: &str) {
    let rel = |node: &Value| -> String {
        let node = node
            .as_str()
            .unwrap_or_else(|| panic!("{case}: a step's path is a string: {}", pretty(step)));
        assert!(
            node.starts_with('/') && !node.starts_with(&host.path().display().to_string()),
            "{case}: a path shown to a person is the node's: {node}"
        );
        node.trim_start_matches('/').to_owned()
    };
    match step["action"].as_str() {
        Some("delete_lines") => {
            assert_eq!(step["copy_from"], Value::Null, "{case}: {}", pretty(step));
            let file = rel(&step["path"]);
            let mut lines: Vec<String> = host.read(&file).lines().map(str::to_owned).collect();
            for span in step["lines"].as_array().into_iter().flatten() {
                let first = span["first"].as_u64().unwrap_or(0) as usize;
                let last = span["last"].as_u64().unwrap_or(0) as usize;
                assert!(first >= 1 && last >= first && last <= lines.len(), "{case}");
                assert_eq!(
                    lines[first - 1..last].join(" "),
                    span["text"].as_str().unwrap_or_default(),
                    "{case}: the line to delete says what the step says"
                );
                lines.drain(first - 1..last);
            }
            host.write(
                &file,
                lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
            );
        }
        Some("kernel_cmdline") => {
            for edit in step["edits"].as_array().into_iter().flatten() {
                let file = rel(&edit["path"]);
                let line = edit["line"].as_u64().unwrap_or(0) as usize;
                let mut lines: Vec<String> = host.read(&file).lines().map(str::to_owned).collect();
                assert_eq!(
                    lines.get(line.wrapping_sub(1)).map(String::as_str),
                    edit["text"].as_str()
                );
                lines[line - 1] = edit["replacement"].as_str().unwrap_or_default().to_owned();
                host.write(
                    &file,
                    lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
                );
            }
            // The reboot the step ends with: the kernel's command line is
            // now the boot loader's, without the parameter.
            let mut cmdline = host.read("proc/cmdline");
            for change in step["parameters"].as_array().into_iter().flatten() {
                let from = change["parameter"].as_str().unwrap_or_default();
                let to = change["replacement"].as_str().unwrap_or_default();
                assert!(cmdline.contains(from), "{case}: {cmdline}");
                cmdline = cmdline.replace(from, to);
            }
            host.write("proc/cmdline", cmdline);
        }
        // Loading after the rule is gone: see simulate_modprobe.
        Some("run") => {
            assert_eq!(step["command"], "modprobe nvme_tcp", "{case}");
            simulate_modprobe(host, proc_line);
        }
        // The line is check --fix's to write, on its next run.
        Some("append_line") => {}
        other => panic!("{case}: unexpected step {other:?}: {}", pretty(step)),
    }
}

/// The foreign files the case wrote, and their content.
fn foreign_files(host: &FakeHost) -> Vec<(String, Option<String>)> {
    [
        MODPROBE_D,
        GRUB,
        "etc/modules-load.d/lh.conf",
        "proc/cmdline",
    ]
    .iter()
    .map(|rel| {
        let path = host.join(rel);
        ((*rel).to_owned(), path.exists().then(|| host.read(rel)))
    })
    .collect()
}

/// `check --host-root ROOT COMMON... EXTRA...`.
fn check_with(
    host: &FakeHost,
    common: &[OsString],
    extra: &[OsString],
) -> kmod_monitor_tests::Finished {
    let mut all = Vec::from(args!["check", "--host-root", host.path()]);
    all.extend_from_slice(common);
    all.extend_from_slice(extra);
    kmod_monitor(&all)
}

fn kmod_monitor_conf_lists_nvme_tcp(host: &FakeHost) -> bool {
    let path = host.join("etc/modules-load.d/kmod-monitor.conf");
    path.exists() && host.read(&path).lines().any(|l| l == "nvme_tcp")
}

fn run_case(case: Case) {
    let (host, proc_line) = host_for(case);
    let config = host.config("[groups.nvme]\nall_of = [\"nvme_tcp\"]\n");
    let common = args!["--config", &config, "--longhorn", "off"];
    let root = host.path().display().to_string();

    // 1. The remedy, in JSON.
    let out = check_with(&host, &common, &args!["--output", "json"]);
    out.expect_code(if case.loaded { 0 } else { 1 });
    let report = out.json();
    let remedy = &report["remedies"]["nvme_tcp"];
    let expected = expected_actions(case);
    let actions: Vec<&str> = remedy["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["action"].as_str())
        .collect();
    assert_eq!(actions, expected, "{case}: {}", pretty(remedy));
    if expected.is_empty() {
        assert_eq!(remedy, &Value::Null, "{case}");
    }
    let remedies: Vec<&String> = report["remedies"]
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    assert!(
        remedies.iter().all(|m| *m == "nvme_tcp"),
        "{case}: only nvme_tcp needs anything: {}",
        pretty(&report["remedies"])
    );
    if let Some(step) = expected_rule_step(&host, case.rule) {
        assert!(
            remedy["steps"]
                .as_array()
                .is_some_and(|steps| steps.contains(&step)),
            "{case}: the remedy holds\n{}\nbut not\n{}",
            pretty(remedy),
            pretty(&step)
        );
    }
    let boot_source = if case.listed && case.rule != Rule::None {
        json!({"kind": "modules_load", "path": "/etc/modules-load.d/lh.conf",
               "host_path": host.join("etc/modules-load.d/lh.conf"), "line": 1})
    } else {
        Value::Null
    };
    if !expected.is_empty() {
        assert_eq!(
            remedy["boot_source"],
            boot_source,
            "{case}: {}",
            pretty(remedy)
        );
    }
    let group = kmod_monitor_tests::group(&report, "nvme");
    assert_eq!(
        kmod_monitor_tests::module(group, "nvme_tcp")["remedy"],
        *remedy,
        "{case}: the group's remedy is the node's"
    );

    // 2. The same in text, with node paths only.
    let text = check(&host, &common);
    assert!(
        !text.stdout.contains(&root),
        "{case}: a host-root path: {text}"
    );
    if let Some(step) = expected_rule_text(case.rule) {
        assert!(text.stdout.contains(step), "{case}: lacks {step:?}: {text}");
    }
    if case.listed && case.rule != Rule::None {
        assert!(
            text.stdout
                .contains("then at every boot: listed in /etc/modules-load.d/lh.conf line 1"),
            "{case}: what loads it once the rule is gone: {text}"
        );
    }
    let dry = check_with(&host, &common, &args!["--fix", "--dry-run"]);
    dry.expect_code(0);
    assert!(!dry.stdout.contains(&root), "{case}: {dry}");
    if let Some(step) = expected_rule_text(case.rule) {
        assert!(dry.stdout.contains("cannot: nvme_tcp: "), "{case}: {dry}");
        assert!(dry.stdout.contains(step), "{case}: lacks {step:?}: {dry}");
    }

    // 3. Apply: `check --fix` does its steps, the test the person's, until
    // nothing is left.
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds <= 2, "{case}: still not fixed after two rounds");
        let before = foreign_files(&host);
        let fix = check_with(&host, &common, &args!["--fix", "--output", "json"]);
        fix.assert_no_panic();
        let done = fix.json();
        assert_eq!(
            foreign_files(&host),
            before,
            "{case}: check --fix edits no file but its own"
        );
        // While the rule stands (the first round), no line for it.
        if case.rule != Rule::None && rounds == 1 {
            assert!(
                !kmod_monitor_conf_lists_nvme_tcp(&host),
                "{case}: a line the rule would skip was written: {fix}"
            );
        }
        for failed in done["failed"].as_array().into_iter().flatten() {
            assert_eq!(failed["module"], "nvme_tcp", "{case}: {fix}");
            simulate_modprobe(&host, &proc_line);
        }
        let cannot = done["cannot_fix"].as_array().cloned().unwrap_or_default();
        if cannot.is_empty() && done["failed"].as_array().is_none_or(Vec::is_empty) {
            fix.expect_code(0);
            break;
        }
        fix.expect_code(1);
        for u in &cannot {
            assert_eq!(u["module"], "nvme_tcp", "{case}: {fix}");
            // What is left starts with the person's step: --fix did what
            // came before it.
            let steps = u["steps"].as_array().cloned().unwrap_or_default();
            assert_eq!(
                steps.first(),
                expected_rule_step(&host, case.rule).as_ref(),
                "{case}: {fix}"
            );
            for step in &steps {
                apply_person_step(&host, step, case, &proc_line);
            }
        }
    }
    let expected_rounds = if case.loaded && case.rule == Rule::None {
        1
    } else {
        2
    };
    assert_eq!(rounds, expected_rounds, "{case}");

    // 4. Checked again: met now, and after a reboot.
    let out = check_with(&host, &common, &args!["--output", "json"]);
    out.expect_code(0);
    let report = out.json();
    let nvme_tcp =
        kmod_monitor_tests::module(kmod_monitor_tests::group(&report, "nvme"), "nvme_tcp");
    assert_eq!(nvme_tcp["state"], "loaded", "{case}: {}", pretty(nvme_tcp));
    assert_eq!(
        nvme_tcp["persistence"]["persistent"],
        true,
        "{case}: {}",
        pretty(nvme_tcp)
    );
    assert_eq!(nvme_tcp["persistence"]["blocked_by"], json!([]), "{case}");
    assert_eq!(nvme_tcp["remedy"], Value::Null, "{case}");
    assert_eq!(report["remedies"], json!({}), "{case}");
    // What loads it: the listing the case had, or the line --fix wrote.
    let source = &nvme_tcp["persistence"]["sources"][0];
    let file = if case.listed {
        "/etc/modules-load.d/lh.conf"
    } else {
        "/etc/modules-load.d/kmod-monitor.conf"
    };
    assert_eq!(
        (&source["kind"], &source["path"]),
        (&json!("modules_load"), &json!(file)),
        "{case}: {}",
        pretty(nvme_tcp)
    );
    let again = check_with(&host, &common, &args!["--fix", "--dry-run"]);
    assert!(again.stdout.contains("Nothing to do"), "{case}: {again}");
}

#[test]
fn every_remedy_makes_the_requirement_hold_and_persist() {
    let mut cases = Vec::new();
    for loaded in [true, false] {
        for listed in [true, false] {
            for rule in [
                Rule::None,
                Rule::Blacklist,
                Rule::InstallFalse,
                Rule::CmdlineBlacklist,
            ] {
                cases.push(Case {
                    loaded,
                    listed,
                    rule,
                });
            }
        }
    }
    assert_eq!(cases.len(), 16);
    for case in cases {
        run_case(case);
    }
}

#[test]
fn the_issues_node_is_told_to_remove_the_blacklist_not_to_add_a_line() {
    // Loaded, listed in /etc/modules-load.d/lh.conf, blacklisted in
    // /etc/modprobe.d/x.conf line 1 (issue 17), under a host root.
    let host = FakeHost::debian_6_1();
    host.write("etc/modules-load.d/base.conf", "dm_crypt\n");
    host.write("etc/modules-load.d/lh.conf", "nvme_tcp\n");
    host.write("etc/modprobe.d/x.conf", "blacklist nvme_tcp\n");
    let config = host.config("[groups.nvme]\nall_of = [\"nvme_tcp\"]\n");
    let common = args!["--config", &config, "--longhorn", "off"];
    let out = check(&host, &common);
    out.expect_code(0);
    assert!(
        out.stdout.contains(
            "Loaded now but NOT after a reboot:\n  nvme_tcp: at boot nvme_tcp is listed in \
             /etc/modules-load.d/lh.conf line 1, but blacklisted in /etc/modprobe.d/x.conf line \
             1 (systemd-modules-load skips blacklisted modules)\n      1. in \
             /etc/modprobe.d/x.conf, delete line 1 (`blacklist nvme_tcp`)\n      then at every \
             boot: listed in /etc/modules-load.d/lh.conf line 1\n"
        ),
        "{out}"
    );
    assert!(!out.stdout.contains("echo nvme_tcp >>"), "{out}");
    let fix = check_with(&host, &common, &args!["--fix"]);
    fix.expect_code(1);
    assert_eq!(
        fix.stdout,
        "cannot: nvme_tcp: at boot nvme_tcp is listed in /etc/modules-load.d/lh.conf line 1, but \
         blacklisted in /etc/modprobe.d/x.conf line 1 (systemd-modules-load skips blacklisted \
         modules)\n        to do by hand (check --fix edits no file but its own):\n        1. in \
         /etc/modprobe.d/x.conf, delete line 1 (`blacklist nvme_tcp`)\n        then at every \
         boot: listed in /etc/modules-load.d/lh.conf line 1\n",
        "{fix}"
    );
    assert_eq!(host.read("etc/modprobe.d/x.conf"), "blacklist nvme_tcp\n");
    assert!(!kmod_monitor_conf_lists_nvme_tcp(&host), "{fix}");
}
