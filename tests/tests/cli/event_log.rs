//! The forensic event log of the real daemon: what `run --event-log` writes
//! for a module change, that `log verify` and `log show` read it back, that
//! a SIGKILL mid-burst leaves every complete record intact and the restart
//! recovers the torn line, that a full disk degrades the log (visible in
//! /status) without stopping the daemon, and writing resumes, that a flood
//! against a full disk keeps the daemon's memory within
//! `--event-log-buffer-bytes` and counts what it drops, and that a second
//! daemon is refused after rotations too. `log show` escapes control
//! characters; `log verify` rejects a seq that wraps.
//!
//! Records are made fast with SIGHUP: every reload of `--config` writes a
//! `config_reload` record, so a burst of signals is a burst of writes.
use std::{
    fs,
    os::unix::{fs::PermissionsExt as _, process::ExitStatusExt as _},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use kmod_monitor_tests::{
    Daemon, FakeHost, Finished, args, kmod_monitor, log_records, met, pretty,
};
use rustix::process::Signal;
use serde_json::Value;

/// How long a change may take to reach /status (one-second poll).
const FOLLOW: Duration = Duration::from_secs(5);
/// How long SIGTERM may take to stop the daemon.
const STOP: Duration = Duration::from_secs(10);

/// A poll-source daemon on `host` writing its event log to `log`.
fn logging(host: &FakeHost, log: &Path, extra: &[std::ffi::OsString]) -> Daemon {
    let mut args = Vec::from(args![
        "--source",
        "poll",
        "--poll-interval",
        "1",
        "--event-log",
        log
    ]);
    args.extend(extra.iter().cloned());
    Daemon::start(host, &args)
}

fn verify(log: &Path) -> Finished {
    kmod_monitor(&args!["log", "verify", log])
}

fn stop(mut daemon: Daemon) {
    daemon.signal(Signal::TERM);
    let status = daemon.wait_exit(STOP);
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM should end it with 0\n{daemon}"
    );
    assert!(!daemon.stderr().contains("panicked"), "{daemon}");
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// /status → event_log, once `ok` holds for it.
fn wait_log(
    daemon: &mut Daemon,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    daemon.wait_for(what, timeout, |s| ok(&s["event_log"]))["event_log"].clone()
}

#[test]
fn an_unload_is_logged_verified_and_shown() {
    let host = FakeHost::debian_6_1();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("state/events.jsonl");
    let mut daemon = logging(&host, &log, &args!["--v2-data-engine"]);
    let status = daemon.status();
    let el = &status["event_log"];
    assert_eq!(el["path"], log.display().to_string(), "{}", pretty(&status));
    assert_eq!(
        (el["degraded"].as_bool(), el["fsync"].as_str()),
        (Some(false), Some("interval"))
    );

    host.unload("dm_crypt");
    daemon.wait_for("base unmet", FOLLOW, |s| met(s, "base") == Some(false));
    // monitor_start, snapshot, module_unload, requirement_change.
    wait_log(&mut daemon, "four records written", FOLLOW, |l| {
        l["records"].as_u64() >= Some(4) && l["pending"] == 0
    });
    stop(daemon);

    assert_eq!(mode(&log), 0o600, "the log is private");
    assert_eq!(
        mode(log.parent().unwrap_or(&log)),
        0o700,
        "so is its new directory"
    );

    let out = verify(&log);
    out.expect_code(0);
    assert!(
        out.stdout
            .starts_with("OK 5 records in 1 file(s), seq 1..=5\n"),
        "{out}"
    );

    let shown = kmod_monitor(&args!["log", "show", "--module", "dm_crypt", &log]);
    shown.expect_code(0);
    let unload = shown
        .stdout
        .lines()
        .find(|l| l.contains("module_unload"))
        .unwrap_or_else(|| panic!("no module_unload line: {shown}"));
    assert!(
        unload.contains("dm_crypt")
            && unload.contains("actor unknown (poll)")
            && unload.contains("base: met → UNMET"),
        "{shown}"
    );
    assert!(
        !shown.stdout.contains("monitor_start"),
        "--module filters: {shown}"
    );

    let all = log_records(&log, &[]);
    let kinds: Vec<&str> = all.iter().filter_map(|r| r["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "monitor_start",
            "snapshot",
            "module_unload",
            "requirement_change",
            "monitor_stop"
        ]
    );
    let start = &all[0]["monitor"];
    assert_eq!(start["kernel_release"], host.release());
    assert_eq!(start["source"], "poll");
    assert_eq!(start["config_digest_of"], "groups");
    assert_eq!(start["config_digest"].as_str().map(str::len), Some(64));
    let snapshot = &all[1];
    assert!(
        snapshot["modules"].as_array().is_some_and(|ms| ms
            .iter()
            .any(|m| m["name"] == "dm_crypt" && m["state"] == "loaded")),
        "{}",
        pretty(snapshot)
    );
    let unload = &all[2];
    assert_eq!(unload["module"]["name"], "dm_crypt");
    assert_eq!(unload["source"], "poll");
    assert_eq!(unload["actor"], Value::Null, "polling cannot know who");
    assert_eq!(unload["state"]["from"], "loaded");
    assert_eq!(unload["state"]["to"], "available");
    assert_eq!(
        unload["requirements"],
        serde_json::json!([{"name": "base", "met": false, "changed": true}])
    );
    let change = &all[3];
    assert_eq!(
        change["requirement"],
        serde_json::json!({"name": "base", "was": true, "met": false})
    );
    assert_eq!(change["cause"], "module_unload");
    assert_eq!(all[4]["reason"], "SIGTERM");
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r["v"], 1);
        assert_eq!(r["seq"].as_u64(), Some(i as u64 + 1));
        assert_eq!(r["boot_id"], all[0]["boot_id"]);
        assert!(
            r["time"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z') && t.len() == 30),
            "{}",
            pretty(r)
        );
        if i > 0 {
            assert_eq!(
                r["prev_hash"],
                all[i - 1]["hash"],
                "record {i} links to the one before"
            );
        }
    }

    let only = log_records(
        &log,
        &args![
            "--kind",
            "requirement_change",
            "--since",
            "10m ago",
            "--until",
            "now"
        ],
    );
    assert_eq!(only.len(), 1, "{only:?}");
}

#[test]
fn bad_show_input_is_named_with_exit_2() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("events.jsonl");
    fs::write(&log, "").unwrap_or_else(|e| panic!("{e}"));
    kmod_monitor(&args!["log", "show", "--since", "yesterday", &log])
        .expect_code(2)
        .stderr_has(&["--since \"yesterday\": not a time"]);
    kmod_monitor(&args!["log", "show", "--kind", "unload", &log])
        .expect_code(2)
        .stderr_has(&["--kind \"unload\": unknown record kind", "module_unload"]);
    let missing = dir.path().join("nope.jsonl");
    kmod_monitor(&args!["log", "verify", &missing])
        .expect_code(2)
        .stderr_has(&[&missing.display().to_string(), "cannot read it"]);
}

#[test]
fn sigkill_mid_burst_keeps_complete_records_and_the_restart_recovers_the_torn_line() {
    let host = FakeHost::debian_6_1();
    let config = host.config("# no groups of our own\n");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("events.jsonl");
    let mut daemon = logging(&host, &log, &args!["--config", &config]);
    wait_log(&mut daemon, "the start records", FOLLOW, |l| {
        l["records"].as_u64() >= Some(2)
    });

    // A burst of reloads, each one a record, and SIGKILL in the middle of it.
    for _ in 0..300 {
        daemon.signal(Signal::HUP);
        thread::sleep(Duration::from_micros(200));
    }
    daemon.signal(Signal::KILL);
    let status = daemon.wait_exit(STOP);
    assert_eq!(status.signal(), Some(9), "{daemon}");

    let text = fs::read(&log).unwrap_or_else(|e| panic!("{e}"));
    let complete = text.split(|&b| b == b'\n').count() - 1;
    assert!(complete > 10, "the burst wrote records: only {complete}");
    let killed = verify(&log);
    let torn_by_kill = text.last() != Some(&b'\n');
    if torn_by_kill {
        // The kill itself cut a write: that line, and only it, is torn.
        killed.expect_code(1);
        assert!(
            killed
                .stdout
                .contains(&format!(":{}: truncated file", complete + 1)),
            "{killed}"
        );
    } else {
        killed.expect_code(0);
        // Simulate the write a crash cuts short: part of a record, no newline.
        let last = String::from_utf8_lossy(&text[..text.len() - 1]);
        let last = last.lines().last().unwrap_or_default();
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("{e}"));
        std::io::Write::write_all(&mut f, &last.as_bytes()[..last.len() / 2])
            .unwrap_or_else(|e| panic!("{e}"));
        let cut = verify(&log);
        cut.expect_code(1);
        assert!(
            cut.stdout
                .contains(&format!("events.jsonl:{}: truncated file", complete + 1)),
            "{cut}"
        );
    }
    let torn_line = complete as u64 + 1;
    let last_good = log_records(&log, &[]).last().cloned().unwrap_or_default();

    // Restart on the same log: it reports the torn line and carries on.
    let daemon = logging(&host, &log, &args!["--config", &config]);
    assert!(
        daemon.stderr().contains("torn line")
            && daemon.stderr().contains(&format!("line={torn_line}")),
        "the restart should report the torn line\n{daemon}"
    );
    stop(daemon);

    let out = verify(&log);
    out.expect_code(0);
    assert!(
        out.stdout
            .contains(&format!("events.jsonl:{torn_line}: torn line"))
            && out.stdout.contains("recovered by the log_recovered record"),
        "verify should report exactly the recovered torn line: {out}"
    );
    assert_eq!(out.stdout.matches("torn line").count(), 1, "{out}");
    let recovered = log_records(&log, &args!["--kind", "log_recovered"]);
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    let r = &recovered[0];
    assert_eq!(
        r["torn"][0]["line"].as_u64(),
        Some(torn_line),
        "{}",
        pretty(r)
    );
    assert_eq!(r["torn"][0]["unterminated"], true);
    assert_eq!(r["after_seq"], last_good["seq"]);
    assert_eq!(
        r["prev_hash"], last_good["hash"],
        "the chain continues from the last good record"
    );
    let after: Vec<Value> = log_records(&log, &[])
        .into_iter()
        .filter(|x| x["seq"].as_u64() > r["seq"].as_u64())
        .collect();
    assert_eq!(
        after.first().map(|x| x["kind"].clone()),
        Some("monitor_start".into())
    );
}

#[test]
fn a_second_daemon_on_the_same_log_is_refused_after_rotation_too() {
    let host = FakeHost::debian_6_1();
    let config = host.config("# no groups of our own\n");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("events.jsonl");
    let first = logging(
        &host,
        &log,
        &args!["--config", &config, "--event-log-max-bytes", "4096"],
    );
    let rotated = dir.path().join("events.jsonl.2");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rotated.exists() {
        assert!(Instant::now() < deadline, "no rotation\n{first}");
        first.signal(Signal::HUP);
        thread::sleep(Duration::from_millis(20));
    }
    let second = Daemon::try_start(&host, &args!["--source", "poll", "--event-log", &log]);
    let Err(out) = second else {
        panic!("a second daemon started on {}\n{first}", log.display());
    };
    out.expect_code(2).stderr_has(&[
        &format!("event log {}: in use by another process", log.display()),
        &dir.path().join(".events.jsonl.lock").display().to_string(),
    ]);
    stop(first);
    verify(&log).expect_code(0);
}

/// A tmpfs mounted for one test, unmounted (lazily, so a file still open
/// cannot keep it) when dropped.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system at `dir` with one file until it refuses more.
fn fill(path: &Path) {
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let chunk = vec![0u8; 1024];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    let _ = std::io::Write::flush(&mut f);
}

#[test]
fn a_full_disk_degrades_the_log_and_writing_resumes() {
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "\n!!! SKIPPED a_full_disk_degrades_the_log_and_writing_resumes: it mounts a tmpfs and needs root (CI runs as root) !!!\n"
        );
        return;
    }
    let host = FakeHost::debian_6_1();
    let config = host.config("# no groups of our own\n");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mnt = dir.path().join("small");
    fs::create_dir(&mnt).unwrap_or_else(|e| panic!("{e}"));
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap_or_else(|e| panic!("running mount: {e}"));
    assert!(
        mounted.success(),
        "mount -t tmpfs -o size=64k failed as root: {mounted}"
    );
    let _tmpfs = Tmpfs(mnt.clone());
    let log = mnt.join("events.jsonl");

    let mut daemon = logging(&host, &log, &args!["--config", &config]);
    wait_log(&mut daemon, "the start records", FOLLOW, |l| {
        l["records"].as_u64() >= Some(2)
    });
    let filler = mnt.join("filler");
    fill(&filler);

    // Records keep coming; the writes start failing once the log's last
    // page is full too.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut hups = 0;
    loop {
        daemon.signal(Signal::HUP);
        hups += 1;
        thread::sleep(Duration::from_millis(50));
        if daemon.status()["event_log"]["degraded"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no write failed after {hups} records\n{daemon}"
        );
    }
    // Two more while degraded: held, not lost.
    daemon.signal(Signal::HUP);
    thread::sleep(Duration::from_millis(100));
    daemon.signal(Signal::HUP);
    let el = wait_log(&mut daemon, "records held back", FOLLOW, |l| {
        l["pending"].as_u64() >= Some(2)
    });
    assert!(el["write_errors"].as_u64() >= Some(1), "{}", pretty(&el));
    let error = el["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("events.jsonl")
            && (error.contains("No space left") || error.contains("disk full")),
        "{}",
        pretty(&el)
    );
    assert!(
        daemon.is_running() && daemon.get("/healthz").is_ok(),
        "{daemon}"
    );
    assert!(
        daemon.stderr().contains("event log write failed"),
        "the failure is logged\n{daemon}"
    );
    let (_, metrics) = daemon
        .get("/metrics")
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
    assert!(
        metrics.contains("kmod_monitor_event_log_degraded 1"),
        "the degraded log shows in the metrics:\n{metrics}"
    );
    assert!(
        !metrics.contains("kmod_monitor_event_log_write_errors_total 0"),
        "write errors are counted:\n{metrics}"
    );

    fs::remove_file(&filler).unwrap_or_else(|e| panic!("{e}"));
    let el = wait_log(
        &mut daemon,
        "writing to resume",
        Duration::from_secs(20),
        |l| l["degraded"] == false && l["pending"] == 0,
    );
    assert!(
        daemon.stderr().contains("event log writable again"),
        "{daemon}"
    );
    let last_seq = el["last_seq"].clone();
    stop(daemon);

    let out = verify(&log);
    out.expect_code(0);
    let all = log_records(&log, &[]);
    let reloads = all.iter().filter(|r| r["kind"] == "config_reload").count();
    assert!(
        reloads >= 3,
        "the held records were written: {reloads} reloads"
    );
    assert!(all.iter().any(|r| r["seq"] == last_seq), "{out}");
    assert_eq!(
        all.last().map(|r| r["kind"].clone()),
        Some("monitor_stop".into())
    );
    assert!(
        !out.stdout.contains("torn"),
        "a failed write is undone, not left torn: {out}"
    );
}

/// `field` (`VmRSS`, `VmHWM`) of `pid` in bytes.
fn vm_bytes(pid: u32, field: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {path}:\n{text}"));
    kib * 1024
}

/// Mounts a tmpfs of `size` at `dir/small` for one test.
fn small_tmpfs(dir: &Path, size: &str) -> Tmpfs {
    let mnt = dir.join("small");
    fs::create_dir(&mnt).unwrap_or_else(|e| panic!("{e}"));
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap_or_else(|e| panic!("running mount: {e}"));
    assert!(
        mounted.success(),
        "mount -t tmpfs -o size={size} failed as root: {mounted}"
    );
    Tmpfs(mnt)
}

#[test]
fn a_flood_on_a_full_disk_stays_within_the_buffer_bytes_and_drops_are_counted() {
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "\n!!! SKIPPED a_flood_on_a_full_disk_stays_within_the_buffer_bytes_and_drops_are_counted: it mounts a tmpfs and needs root (CI runs as root) !!!\n"
        );
        return;
    }
    /// The bound under test: records waiting for the disk, in bytes.
    const BUFFER: u64 = 4 * 1024 * 1024;
    /// What the daemon may grow by beyond the buffer while a flood of
    /// thousands of modules is polled (its views of /proc/modules, the
    /// tracker's states, the allocator's slack).
    const SLACK: u64 = 12 * 1024 * 1024;
    /// Modules that appear and vanish at once, every poll.
    const FLOOD: usize = 5_000;
    let host = FakeHost::debian_6_1();
    let config = host.config("# no groups of our own\n");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let tmpfs = small_tmpfs(dir.path(), "32m");
    let log = tmpfs.0.join("events.jsonl");
    let mut daemon = logging(
        &host,
        &log,
        &args![
            "--config",
            &config,
            "--event-log-buffer-bytes",
            BUFFER.to_string()
        ],
    );
    wait_log(&mut daemon, "the start records", FOLLOW, |l| {
        l["records"].as_u64() >= Some(2)
    });
    let filler = tmpfs.0.join("filler");
    fill(&filler);
    let before = vm_bytes(daemon.pid(), "VmRSS");

    // Thousands of modules come and go every second: each poll is a record
    // per module, and none of them can be written.
    let base = host.read("proc/modules");
    let flooded: String = (0..FLOOD)
        .map(|i| format!("floodmod_{i} 16384 0 - Live 0x0000000000000000\n"))
        .collect();
    let with_flood = format!("{base}{flooded}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut on = false;
    let mut status = daemon.status();
    while status["event_log"]["dropped"].as_u64() < Some(4 * FLOOD as u64) {
        assert!(
            Instant::now() < deadline,
            "the flood dropped too little: {}\n{daemon}",
            pretty(&status["event_log"])
        );
        on = !on;
        host.write("proc/modules", if on { &with_flood } else { &base });
        thread::sleep(Duration::from_millis(1100));
        status = daemon.status();
    }
    host.write("proc/modules", &base);
    let peak = vm_bytes(daemon.pid(), "VmHWM");
    let el = &status["event_log"];
    eprintln!(
        "flood on a full disk: RSS {} KiB before, peak {} KiB (+{} KiB), buffer {} KiB; {}",
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / 1024,
        BUFFER / 1024,
        el
    );
    assert!(
        peak.saturating_sub(before) <= BUFFER + SLACK,
        "the daemon grew by {} KiB during the flood (before {} KiB, peak {} KiB), past the \
         {} KiB buffer and {} KiB of slack: {}",
        peak.saturating_sub(before) / 1024,
        before / 1024,
        peak / 1024,
        BUFFER / 1024,
        SLACK / 1024,
        pretty(el)
    );
    assert_eq!(el["degraded"], true, "{}", pretty(el));
    let dropped = el["dropped"].as_u64().unwrap_or_default();
    let (_, metrics) = daemon
        .get("/metrics")
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kmod_monitor_event_log_dropped_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no kmod_monitor_event_log_dropped_total:\n{metrics}"));
    assert!(counted >= dropped, "metric {counted}, /status {dropped}");

    // Space returns: what was held is written, then a log_dropped record.
    fs::remove_file(&filler).unwrap_or_else(|e| panic!("{e}"));
    wait_log(
        &mut daemon,
        "writing to resume",
        Duration::from_secs(30),
        |l| l["degraded"] == false && l["pending"] == 0,
    );
    let dropped = daemon.status()["event_log"]["dropped"]
        .as_u64()
        .unwrap_or_default();
    stop(daemon);

    verify(&log).expect_code(0);
    let reported: u64 = log_records(&log, &args!["--kind", "log_dropped"])
        .iter()
        .filter_map(|r| r["dropped"].as_u64())
        .sum();
    assert_eq!(
        reported, dropped,
        "log_dropped records account for every dropped record"
    );
}

/// Writes `records` to `path` as a sealed chain from seq 1.
fn sealed_log(path: &Path, records: &[kmod_monitor::forensic::Record]) {
    use kmod_monitor::forensic::chain::{Head, seal};
    let mut head = Head::genesis();
    let mut text = String::new();
    for r in records {
        let sealed = seal(&mut r.clone(), &head).unwrap_or_else(|e| panic!("{e}"));
        text.push_str(&sealed.line);
        head = sealed.head;
    }
    fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A record of `kind`, stamped as the daemon would.
fn stamped(kind: kmod_monitor::forensic::RecordKind) -> kmod_monitor::forensic::Record {
    let mut r = kmod_monitor::forensic::Record::new(kind, 1);
    kmod_monitor::forensic::stamp(&mut r, &"boot".into(), &"node-a".into());
    r
}

#[test]
fn log_show_escapes_control_characters_and_json_is_the_raw_line() {
    use kmod_monitor::forensic::{
        RecordKind,
        record::{ActorInfo, ModuleInfo},
    };
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("events.jsonl");
    // A process can name itself anything: erase the line, return, beep,
    // set the terminal's title, reverse the text.
    let comm = "\u{1b}[2K\rrmmod\u{7}";
    let mut unload = stamped(RecordKind::ModuleUnload);
    unload.module = Some(ModuleInfo {
        name: "dm_crypt".into(),
        taints: None,
    });
    unload.actor = Some(ActorInfo {
        pid: 66,
        tgid: 66,
        comm: comm.into(),
        cmdline: Some(vec!["\u{1b}]0;owned\u{7}".into(), "dm_crypt\n".into()]),
        read_late: true,
        ..ActorInfo::default()
    });
    unload.source = Some("ebpf".into());
    let mut lost = stamped(RecordKind::EventsLost);
    lost.reason = Some("undecodable\u{1b}[1A\u{1b}[2K\u{9b}31m \u{202e}txet".into());
    sealed_log(&log, &[unload, lost]);

    let shown = kmod_monitor(&args!["log", "show", &log]);
    shown.expect_code(0);
    for c in shown.stdout.chars() {
        assert!(
            c == '\n' || !(c.is_control() || c == '\u{202e}'),
            "{c:?} reached the terminal: {:?}",
            shown.stdout
        );
    }
    assert!(
        shown.stdout.contains(r"by \u{1b}[2K\rrmmod\u{7} (pid 66"),
        "the name is shown, escaped: {}",
        shown.stdout
    );
    assert!(
        shown
            .stdout
            .contains(r"undecodable\u{1b}[1A\u{1b}[2K\u{9b}31m \u{202e}txet"),
        "{}",
        shown.stdout
    );

    let json = kmod_monitor(&args!["log", "show", "--json", &log]);
    json.expect_code(0);
    assert_eq!(
        json.stdout,
        fs::read_to_string(&log).unwrap_or_else(|e| panic!("{e}")),
        "--json prints the lines exactly as they are"
    );

    // verify quotes what it found in a tampered file: escaped too.
    let text = fs::read_to_string(&log).unwrap_or_else(|e| panic!("{e}"));
    let hash = log_records(&log, &[])[0]["hash"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    fs::write(&log, text.replacen(&hash, r"\u001b[2J\u001b[H", 1))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = verify(&log);
    out.expect_code(1);
    assert!(
        out.stdout
            .contains(r"edited record: its hash \u{1b}[2J\u{1b}[H does not match")
            && !out.stdout.contains('\u{1b}'),
        "{out}"
    );
}

#[test]
fn log_verify_rejects_a_seq_that_wraps() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("events.jsonl");
    // Three records numbered u64::MAX, 0, 1, each correctly hashed and
    // linked to the one before: only the seq is wrong.
    let mut prev_hash = kmod_monitor::forensic::chain::GENESIS.to_owned();
    let mut text = String::new();
    for seq in [u64::MAX, 0, 1] {
        let r = stamped(kmod_monitor::forensic::RecordKind::ConfigReload);
        let Value::Object(mut map) = serde_json::to_value(&r).unwrap_or_else(|e| panic!("{e}"))
        else {
            unreachable!("a record is an object")
        };
        map.insert("seq".into(), Value::from(seq));
        map.insert("prev_hash".into(), Value::from(prev_hash.clone()));
        map.remove("hash");
        let hash = kmod_monitor::forensic::chain::record_hash(&map);
        map.insert("hash".into(), Value::from(hash.clone()));
        text.push_str(&kmod_monitor::forensic::chain::canonical(&Value::Object(
            map,
        )));
        text.push('\n');
        prev_hash = hash;
    }
    fs::write(&log, text).unwrap_or_else(|e| panic!("{e}"));
    let out = verify(&log);
    out.expect_code(1);
    assert!(
        out.stdout
            .starts_with(&format!("FAILED {}:2: ", log.display()))
            && out.stdout.contains("18446744073709551615"),
        "{out}"
    );
}
