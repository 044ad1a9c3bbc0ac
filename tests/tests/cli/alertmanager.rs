//! Alert delivery under a hostile or faulty Alertmanager side: a hung
//! replica listed first must not delay a healthy one; https with a CA
//! file, against a real Alertmanager serving TLS; basic auth checked by
//! the real Alertmanager and a bearer token checked by a stand-in; a
//! rotated token used without a restart; and no credential ever in the
//! daemon's output, /status or /metrics.
use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use kmod_monitor::event::boot_ns_now;
use kmod_monitor_tests::{
    Daemon, FakeHost, Finished, args, fixture, group, module,
    pki::Pki,
    servers::{Server, Web},
    stand_ins::{BearerEndpoint, Hung},
};
use serde_json::Value;

/// The poll source's period, seconds: how late it may see a removal.
const POLL_SECS: u64 = 1;

/// A poll-source daemon on `host` with `extra` flags.
fn polling(host: &FakeHost, extra: &[OsString]) -> Daemon {
    let mut args = Vec::from(args![
        "--source",
        "poll",
        "--poll-interval",
        POLL_SECS.to_string()
    ]);
    args.extend(extra.iter().cloned());
    Daemon::start(host, &args)
}

/// Active `KernelModuleRequirementUnmet` alerts for `module` from `instance`.
fn unmet(body: &Value, module: &str, instance: &str) -> usize {
    body.as_array()
        .into_iter()
        .flatten()
        .filter(|a| {
            a["labels"]["alertname"] == "KernelModuleRequirementUnmet"
                && a["labels"]["module"] == module
                && a["labels"]["instance"] == instance
        })
        .count()
}

/// The value of the series whose line starts with `series `.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

const SUCCESS: &str = r#"kmod_monitor_alert_deliveries_total{result="success"}"#;
const FAILURE: &str = r#"kmod_monitor_alert_deliveries_total{result="failure"}"#;

fn wait_metric(daemon: &Daemon, series: &str, at_least: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = daemon.metrics();
        if value(&text, series) >= Some(at_least) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {series} >= {at_least}:\n{text}\n{daemon}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// CLOCK_BOOTTIME of dm_crypt's last event as the daemon saw it.
fn seen_ns(daemon: &Daemon) -> u64 {
    let status = daemon.status();
    module(group(&status, "base"), "dm_crypt")["last_event"]["boot_ns"]
        .as_u64()
        .unwrap_or_else(|| panic!("dm_crypt has no last_event: {status:#}"))
}

/// Writes `text` to a file of its own in `dir`.
fn secret(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// Asserts that no `secrets` appear in the daemon's output, /status or
/// /metrics.
#[track_caller]
fn never_shown(daemon: &Daemon, secrets: &[&str]) {
    let places = [
        ("stderr", daemon.stderr()),
        ("/status", daemon.status().to_string()),
        ("/metrics", daemon.metrics()),
    ];
    for (place, text) in places {
        for s in secrets {
            assert!(!text.contains(s), "{place} shows the secret {s:?}:\n{text}");
        }
    }
}

/// The issue's scenario: a replica that accepts connections and never
/// answers is listed before a healthy one. The healthy one must show the
/// alert within 1 s of the daemon seeing the removal (the poll source
/// itself may take up to its period to see it), and the next change too.
#[test]
fn a_hung_alertmanager_listed_first_delays_no_other() {
    let hung = Hung::start();
    let am = Server::alertmanager();
    let host = FakeHost::debian_6_1();
    let daemon = polling(
        &host,
        &args![
            "--alertmanager",
            hung.base_url(),
            "--alertmanager",
            am.base_url(),
            "--node-name",
            "hung-first"
        ],
    );
    let removed = Instant::now();
    host.unload("dm_crypt");
    am.wait_for(
        "/api/v2/alerts",
        "the dm_crypt alert at the healthy Alertmanager",
        Duration::from_secs(POLL_SECS + 1),
        |b| unmet(b, "dm_crypt", "hung-first") == 1,
    );
    let shown_ns = boot_ns_now();
    let since_removal = removed.elapsed();
    let since_seen = Duration::from_nanos(shown_ns.saturating_sub(seen_ns(&daemon)));
    // The stand-in takes connections off its backlog every 20 ms: allow it that.
    let deadline = Instant::now() + Duration::from_secs(2);
    while hung.accepted() == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        hung.accepted() >= 1,
        "the hung Alertmanager was never tried, so it proves nothing"
    );
    eprintln!(
        "hung replica first: alert at the healthy one {since_seen:?} after the daemon saw the removal, {since_removal:?} after the removal (1 s poll)"
    );
    assert!(
        since_seen < Duration::from_secs(1),
        "took {since_seen:?} from detection to delivery\n{daemon}"
    );

    // The next change is not held up either: the hung request is still open.
    host.write("proc/modules", fixture("proc_modules.debian-6.1"));
    am.wait_for(
        "/api/v2/alerts",
        "the dm_crypt alert to resolve at the healthy Alertmanager",
        Duration::from_secs(POLL_SECS + 1),
        |b| unmet(b, "dm_crypt", "hung-first") == 0,
    );
    let resolved_after = Duration::from_nanos(boot_ns_now().saturating_sub(seen_ns(&daemon)));
    eprintln!(
        "hung replica first: resolution at the healthy one {resolved_after:?} after the daemon saw the load"
    );
    assert!(resolved_after < Duration::from_secs(1), "{daemon}");
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("alerts delivered"),
        "no delivery logged:\n{stderr}"
    );
}

/// https to a real Alertmanager serving TLS and checking basic auth: the
/// right CA and password deliver; a wrong CA and a wrong password fail,
/// are counted, and are logged without any secret.
#[test]
fn https_with_a_ca_file_and_basic_auth_reaches_a_real_alertmanager() {
    const PASSWORD: &str = "pw-7f3a9c-never-logged";
    let pki = Pki::generate("kmod-monitor-tests-am-ca");
    let other = Pki::generate("some-other-ca");
    let am = Server::alertmanager_web(&Web {
        tls: Some(&pki),
        basic_auth: Some(("kmod", PASSWORD)),
    });
    assert!(am.base_url().starts_with("https://"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let password = secret(dir.path(), "password", &format!("{PASSWORD}\n"));
    let wrong_password = secret(dir.path(), "wrong", "not-the-password-0c1d");
    let run = |node: &str, ca: &Path, password_file: &Path| {
        let host = FakeHost::debian_6_1();
        let daemon = polling(
            &host,
            &args![
                "--alertmanager",
                am.base_url(),
                "--alertmanager-ca-file",
                ca,
                "--alertmanager-basic-auth-username",
                "kmod",
                "--alertmanager-basic-auth-password-file",
                password_file,
                "--node-name",
                node
            ],
        );
        host.unload("dm_crypt");
        (host, daemon)
    };

    let (_host, good) = run("tls-good", &pki.ca, &password);
    am.wait_for(
        "/api/v2/alerts",
        "the alert over https with basic auth",
        Duration::from_secs(POLL_SECS + 2),
        |b| unmet(b, "dm_crypt", "tls-good") == 1,
    );
    wait_metric(&good, SUCCESS, 1.0);
    never_shown(&good, &[PASSWORD]);

    let (_host, wrong_ca) = run("tls-wrong-ca", &other.ca, &password);
    let text = wait_metric(&wrong_ca, FAILURE, 1.0);
    assert_eq!(value(&text, SUCCESS), Some(0.0), "{text}");
    let stderr = wrong_ca.stderr();
    assert!(
        stderr.contains("alert delivery failed") && stderr.contains("certificate"),
        "the TLS failure should be logged and say why:\n{stderr}"
    );
    never_shown(&wrong_ca, &[PASSWORD]);

    let (_host, wrong_pw) = run("tls-wrong-password", &pki.ca, &wrong_password);
    let text = wait_metric(&wrong_pw, FAILURE, 1.0);
    assert_eq!(value(&text, SUCCESS), Some(0.0), "{text}");
    assert!(wrong_pw.stderr().contains("401"), "{wrong_pw}");
    never_shown(&wrong_pw, &[PASSWORD, "not-the-password-0c1d"]);

    let body = am.get_json("/api/v2/alerts");
    assert_eq!(unmet(&body, "dm_crypt", "tls-wrong-ca"), 0, "{body:#}");
    assert_eq!(
        unmet(&body, "dm_crypt", "tls-wrong-password"),
        0,
        "{body:#}"
    );
}

/// A bearer token from a file reaches an endpoint that checks it; a
/// rotated token is read again for the next push, without a restart.
#[test]
fn a_bearer_token_is_sent_and_a_rotated_one_is_picked_up() {
    const FIRST: &str = "tok-first-5b2e81";
    const SECOND: &str = "tok-second-c94d07";
    let endpoint = BearerEndpoint::start(FIRST);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let token = secret(dir.path(), "token", &format!("{FIRST}\n"));
    let host = FakeHost::debian_6_1();
    let daemon = polling(
        &host,
        &args![
            "--alertmanager",
            endpoint.base_url(),
            "--alertmanager-bearer-token-file",
            &token,
            "--alert-resend-interval",
            "3600"
        ],
    );
    host.unload("dm_crypt");
    let got = endpoint.wait_for(
        "the alert with the first token",
        Duration::from_secs(POLL_SECS + 2),
        |r| {
            r.iter()
                .any(|r| r.authorized && r.body.contains("dm_crypt"))
        },
    );
    assert!(got.iter().all(|r| r.authorized), "{got:#?}");

    // Rotate, as a Kubernetes Secret update would: the file, then the server.
    fs::write(&token, SECOND).unwrap_or_else(|e| panic!("rotating the token: {e}"));
    endpoint.set_token(SECOND);
    host.write("proc/modules", fixture("proc_modules.debian-6.1"));
    let got = endpoint.wait_for(
        "the resolution with the rotated token",
        Duration::from_secs(POLL_SECS + 2),
        |r| r.len() >= 2 && r.last().is_some_and(|r| r.authorized),
    );
    assert!(got.iter().all(|r| r.authorized), "{got:#?}");
    wait_metric(&daemon, SUCCESS, 2.0);
    assert_eq!(value(&daemon.metrics(), FAILURE), Some(0.0));
    never_shown(&daemon, &[FIRST, SECOND]);
}

/// Start-up refuses a client it could not use, naming the file; a URL
/// with credentials is refused without printing them.
#[test]
fn unusable_client_settings_exit_2_naming_the_file() {
    let host = FakeHost::debian_6_1();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let absent = dir.path().join("absent");
    let empty = secret(dir.path(), "empty", "\n");
    let not_pem = secret(dir.path(), "ca.pem", "no certificate here\n");
    let refused = |extra: &[OsString]| -> Finished {
        let mut args = Vec::from(args![
            "--source",
            "poll",
            "--alertmanager",
            "http://127.0.0.1:9"
        ]);
        args.extend(extra.iter().cloned());
        match Daemon::try_start(&host, &args) {
            Ok(daemon) => panic!("started despite {extra:?}\n{daemon}"),
            Err(finished) => finished,
        }
    };
    let absent_text = absent.display().to_string();
    refused(&args!["--alertmanager-bearer-token-file", &absent])
        .expect_code(2)
        .stderr_has(&[
            &absent_text,
            "--alertmanager-bearer-token-file",
            "cannot read it",
        ]);
    refused(&args![
        "--alertmanager-basic-auth-username",
        "kmod",
        "--alertmanager-basic-auth-password-file",
        &empty
    ])
    .expect_code(2)
    .stderr_has(&[&empty.display().to_string(), "is empty"]);
    refused(&args!["--alertmanager-ca-file", &absent])
        .expect_code(2)
        .stderr_has(&[&absent_text, "--alertmanager-ca-file", "cannot read it"]);
    refused(&args!["--alertmanager-ca-file", &not_pem])
        .expect_code(2)
        .stderr_has(&[&not_pem.display().to_string(), "no PEM certificate"]);

    let out = refused(&args![
        "--alertmanager",
        "http://kmod:hunter2-secret@127.0.0.1:9093"
    ]);
    out.expect_code(2).stderr_has(&[
        "--alertmanager",
        "must not carry credentials",
        "***@127.0.0.1",
    ]);
    assert!(!out.stderr.contains("hunter2"), "{out}");
    let config = host.config("alertmanager = [\"https://kmod:hunter2-secret@am:9093\"]\n");
    let out = refused(&args!["--config", &config]);
    out.expect_code(2)
        .stderr_has(&["line 1", "must not carry credentials"]);
    assert!(!out.stderr.contains("hunter2"), "{out}");
}
