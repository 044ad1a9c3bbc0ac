//! Rejected input: every bad config, flag or host root makes `check` and
//! `run` exit 2 with a message that names the input and what is wrong with
//! it, and never panics.
use std::ffi::OsString;

use kmod_monitor_tests::{FakeHost, Finished, args, check, free_port, kmod_monitor};

/// `run` with everything it needs to start (poll source, a free loopback
/// port) plus `extra`; each test expects it to refuse before it serves.
fn run(host: &FakeHost, extra: &[OsString]) -> Finished {
    let mut args = Vec::from(args![
        "run",
        "--listen",
        format!("127.0.0.1:{}", free_port()),
        "--source",
        "poll",
        "--host-root",
        host.path()
    ]);
    args.extend(extra.iter().cloned());
    kmod_monitor(&args)
}

/// Both subcommands with `--config` pointing at a file holding `text`;
/// each must exit 2 and say `needles` on stderr.
fn rejects_config(text: &str, needles: &[&str]) {
    let host = FakeHost::debian_6_1();
    let config = host.config(text);
    let path = config.display().to_string();
    for out in [
        check(&host, &args!["--config", &config]),
        run(&host, &args!["--config", &config]),
    ] {
        out.expect_code(2).stderr_has(&[&path]).stderr_has(needles);
    }
}

#[test]
fn unknown_config_key_names_file_line_and_key() {
    rejects_config(
        "source = \"poll\"\nreconcile_intervall = 5\n",
        &["line 2", "reconcile_intervall", "unknown field"],
    );
}

#[test]
fn unknown_key_in_a_group_names_file_line_and_key() {
    rejects_config(
        "[groups.spdk]\nany_of = [\"vfio_pci\"]\nmodules = [\"nvme_tcp\"]\n",
        &["line 3", "modules", "unknown field"],
    );
}

#[test]
fn invalid_module_name_names_file_line_group_and_name() {
    rejects_config(
        "[groups.crypt]\n\nall_of = [\"dm_crypt\", \"dm crypt\"]\n",
        &["line 3", "\"dm crypt\"", "\"crypt\"", "contains ' '"],
    );
}

#[test]
fn empty_group_names_file_line_and_group() {
    rejects_config(
        "[groups.nothing]\nany_of = []\n",
        &["line 2", "\"nothing\"", "any_of is empty"],
    );
}

#[test]
fn toml_syntax_error_names_file_and_line() {
    rejects_config("source = \"poll\"\n[groups.x\n", &["line 2"]);
}

#[test]
fn unreadable_config_path_is_named() {
    let host = FakeHost::debian_6_1();
    let missing = host.join("etc/kmod-monitor/no-such.toml");
    // A directory cannot be read as a file, even by root (tests may run as
    // root, where permission bits would not stop the read).
    let directory = host.join("etc");
    std::fs::create_dir_all(&directory).unwrap_or_else(|e| panic!("{e}"));
    for path in [&missing, &directory] {
        let shown = path.display().to_string();
        for out in [
            check(&host, &args!["--config", path]),
            run(&host, &args!["--config", path]),
        ] {
            out.expect_code(2)
                .stderr_has(&[&format!("config file {shown}"), "cannot read it"]);
        }
    }
}

#[test]
fn nonexistent_host_root_is_named() {
    let host = FakeHost::debian_6_1();
    let root = host.join("not-mounted");
    let shown = root.display().to_string();
    // "reading the host: ROOT/proc/sys/kernel/osrelease: does not exist:
    // the host root ROOT is not a directory".
    let check_out = kmod_monitor(&args!["check", "--host-root", &root]);
    let run_out = kmod_monitor(&args![
        "run",
        "--listen",
        format!("127.0.0.1:{}", free_port()),
        "--source",
        "poll",
        "--host-root",
        &root
    ]);
    for out in [check_out, run_out] {
        out.expect_code(2).stderr_has(&[
            &format!("{shown}/proc/sys/kernel/osrelease"),
            &format!("the host root {shown} is not a directory"),
        ]);
    }
}

#[test]
fn unreadable_host_file_states_its_cause_once() {
    // /proc/modules that cannot be read (a directory, readable by nobody
    // as a file) fails the snapshot, naming the file and the cause once.
    let host = FakeHost::debian_6_1();
    let proc_modules = host.join("proc/modules");
    std::fs::remove_file(&proc_modules).unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir(&proc_modules).unwrap_or_else(|e| panic!("{e}"));
    let shown = proc_modules.display().to_string();
    for out in [check(&host, &[]), run(&host, &[])] {
        out.expect_code(2).stderr_has(&[&shown]);
        let line = out
            .stderr
            .lines()
            .find(|l| l.contains(&shown))
            .unwrap_or_default();
        let cause = line.rsplit(": ").next().unwrap_or_default();
        assert_eq!(
            line.matches(cause).count(),
            1,
            "the cause {cause:?} should be stated once: {out}"
        );
    }

    // A host root that does not exist at all is named as the problem.
    let root = host.join("not-mounted");
    let out = kmod_monitor(&args!["check", "--host-root", &root]);
    out.expect_code(2).stderr_has(&[&format!(
        "the host root {} is not a directory",
        root.display()
    )]);
    assert_eq!(
        out.stderr.matches("does not exist").count(),
        1,
        "the cause should be stated once: {out}"
    );
}

#[test]
fn ring_buffer_size_must_be_a_power_of_two_of_a_page() {
    let host = FakeHost::debian_6_1();
    run(&host, &args!["--ring-buffer-size", "1000"])
        .expect_code(2)
        .stderr_has(&["--ring-buffer-size 1000", "power of two", "4096"]);
}

#[test]
fn zero_intervals_are_rejected() {
    let host = FakeHost::debian_6_1();
    for flag in ["--reconcile-interval", "--poll-interval", "--k8s-heartbeat"] {
        run(&host, &args![flag, "0"])
            .expect_code(2)
            .stderr_has(&[flag, "at least 1 second"]);
    }
    rejects_config(
        "reconcile_interval = 0\n",
        &["line 1", "reconcile_interval = 0"],
    );
    rejects_config(
        "\nk8s_heartbeat = 0\n",
        &["line 2", "k8s_heartbeat = 0", "at least 1 second"],
    );
}

#[test]
fn unknown_flag_values_are_usage_errors() {
    let host = FakeHost::debian_6_1();
    check(&host, &args!["--output", "yaml"])
        .expect_code(2)
        .stderr_has(&["--output", "yaml"]);
    kmod_monitor(&args![
        "run",
        "--listen",
        format!("127.0.0.1:{}", free_port()),
        "--source",
        "kprobe",
        "--host-root",
        host.path()
    ])
    .expect_code(2)
    .stderr_has(&["--source", "kprobe"]);
}

#[test]
fn an_invalid_namespace_is_rejected_alike_from_the_flag_and_the_file() {
    let host = FakeHost::debian_6_1();
    let bad = "Longhorn_System";
    let from_flag = check(&host, &args!["--longhorn-namespace", bad]);
    let config = host.config(&format!("\nlonghorn_namespace = {bad:?}\n"));
    let from_file = check(&host, &args!["--config", &config]);
    from_flag
        .expect_code(2)
        .stderr_has(&[&format!("--longhorn-namespace {bad:?}: ")]);
    from_file.expect_code(2).stderr_has(&[
        &config.display().to_string(),
        "line 2",
        &format!("longhorn_namespace = {bad:?}: "),
    ]);
    // The same words after the value, whichever input said it.
    let problem = |out: &Finished| {
        let needle = format!("{bad:?}: ");
        let at = out.stderr.find(&needle).map_or(0, |i| i + needle.len());
        out.stderr[at..].trim().to_owned()
    };
    assert_eq!(problem(&from_flag), problem(&from_file));
    assert!(
        problem(&from_flag).starts_with("not a Kubernetes namespace name"),
        "{from_flag}"
    );
}

#[test]
fn intervals_too_large_for_a_timer_are_rejected_not_a_panic() {
    let host = FakeHost::debian_6_1();
    for flag in [
        "--reconcile-interval",
        "--poll-interval",
        "--alert-resend-interval",
        "--longhorn-grace",
        "--k8s-heartbeat",
    ] {
        let out = run(&host, &args![flag, "18446744073709551615"]);
        out.assert_no_panic();
        out.expect_code(2).stderr_has(&[flag, "must be at most"]);
    }
}
