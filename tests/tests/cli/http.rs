//! The HTTP listener under hostile clients and with `--web.config.file`,
//! against the real binary (poll source, fake host root) and real clients:
//! - a thousand idle connections against a daemon limited to 1,024
//!   descriptors neither stop /healthz nor blind the poll source;
//! - unfinished 380 KB headers on 150 connections do not grow memory, an
//!   8 KiB+ header gets 431, and a stalled header is cut off;
//! - TLS (with the CA, without it, plain HTTP to it, client certificates,
//!   a renewed certificate picked up), basic auth and its bcrypt budget,
//!   the rate limit, and bad web config files.
use std::{
    ffi::OsString,
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use kmod_monitor_tests::{
    Daemon, FakeHost, Launch, args, free_port, kmod_monitor, met, raise_own_nofile,
};

/// The poll source, one-second period, plus `extra`.
fn polling_args(extra: &[OsString]) -> Vec<OsString> {
    let mut a = Vec::from(args!["--source", "poll", "--poll-interval", "1"]);
    a.extend(extra.iter().cloned());
    a
}

/// A client of its own (fresh connections, nothing pooled) with `timeout`.
fn plain_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .max_idle_connections(0)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// `GET url` with an optional `Authorization` header: the status code.
fn get(agent: &ureq::Agent, url: &str, authorization: Option<&str>) -> Result<u16, ureq::Error> {
    let mut request = agent.get(url);
    if let Some(a) = authorization {
        request = request.header("Authorization", a);
    }
    let mut response = request.call()?;
    let code = response.status().as_u16();
    let _ = response.body_mut().read_to_string();
    Ok(code)
}

/// `user:password` as a Basic authorization header.
fn basic(user: &str, password: &str) -> String {
    // A tiny base64 encoder, to keep the test free of another crate.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = format!("{user}:{password}").into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/stat: {e}"));
    // Fields after the command name (which may hold spaces) start at state.
    let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 here, in
    // USER_HZ ticks, which Linux fixes at 100 for userspace.
    (ticks(11) + ticks(12)) / 100.0
}

#[test]
fn a_thousand_idle_connections_leave_healthz_and_the_poll_source_working() {
    const IDLE: usize = 1_100;
    const NOFILE: u64 = 1_024;
    let own = raise_own_nofile();
    assert!(
        own > 2 * IDLE as u64,
        "the test needs {} descriptors of its own; RLIMIT_NOFILE's hard limit is {own}",
        2 * IDLE
    );
    let host = FakeHost::debian_6_1();
    let mut daemon = Daemon::start_with(
        &host,
        &polling_args(&[]),
        &Launch {
            nofile: Some(NOFILE),
            ..Launch::default()
        },
    );
    let fds_before = daemon.open_fds();
    let rss_before = daemon.proc_status_kib("VmRSS");

    // The attacker: connections that never send a byte.
    let mut idle = Vec::with_capacity(IDLE);
    let mut refused = 0;
    for _ in 0..IDLE {
        match TcpStream::connect_timeout(&daemon.addr(), Duration::from_millis(500)) {
            Ok(s) => idle.push(s),
            Err(_) => refused += 1,
        }
    }
    thread::sleep(Duration::from_millis(300));
    let fds_under_attack = daemon.open_fds();
    let rss_under_attack = daemon.proc_status_kib("VmRSS");

    // /healthz, on a connection of its own, within a second, every time.
    let agent = plain_agent(Duration::from_secs(1));
    let mut slowest = Duration::ZERO;
    for round in 0..5 {
        let started = Instant::now();
        let answer = get(&agent, &daemon.url("/healthz"), None);
        let took = started.elapsed();
        assert!(
            matches!(answer, Ok(200)) && took < Duration::from_secs(1),
            "round {round}: /healthz answered {answer:?} after {took:?} with {} idle connections open ({refused} refused); daemon fds {fds_under_attack}\n{daemon}",
            idle.len()
        );
        slowest = slowest.max(took);
    }

    // The poll source still reads /proc/modules: a removal shows within the
    // poll interval (1 s), plus a second for a loaded machine.
    let removed = Instant::now();
    host.unload("dm_crypt");
    daemon.wait_for(
        "dm_crypt's removal with the idle connections open",
        Duration::from_secs(2),
        |s| met(s, "base") == Some(false),
    );
    let detected = removed.elapsed();
    let fds_after = daemon.open_fds();
    let stderr = daemon.stderr();
    assert!(
        !stderr.contains("Too many open files"),
        "the daemon ran out of descriptors:\n{daemon}"
    );
    assert!(
        fds_under_attack < 600 && fds_after < 600,
        "HTTP clients took {fds_under_attack} descriptors (then {fds_after}); the cap is 512 plus the daemon's own\n{daemon}"
    );
    eprintln!(
        "figures: {IDLE} idle connections ({} open, {refused} refused), RLIMIT_NOFILE {NOFILE}: daemon fds {fds_before} before, {fds_under_attack} under attack, {fds_after} after; VmRSS {rss_before} KiB before, {rss_under_attack} KiB under attack; slowest /healthz {slowest:?}; removal detected after {detected:?}",
        idle.len()
    );
    drop(idle);
}

#[test]
fn unfinished_huge_headers_do_not_grow_memory() {
    const CONNECTIONS: usize = 150;
    const HEADER_BYTES: usize = 380 * 1024;
    let host = FakeHost::debian_6_1();
    let daemon = Daemon::start(&host, &polling_args(&[]));
    let _ = daemon.status();
    let rss_before = daemon.proc_status_kib("VmRSS");

    let filler = vec![b'a'; HEADER_BYTES];
    let mut open = Vec::with_capacity(CONNECTIONS);
    let mut cut_off = 0;
    for _ in 0..CONNECTIONS {
        let mut s = TcpStream::connect(daemon.addr())
            .unwrap_or_else(|e| panic!("connecting to {}: {e}\n{daemon}", daemon.addr()));
        s.set_write_timeout(Some(Duration::from_secs(2)))
            .unwrap_or_else(|e| panic!("{e}"));
        // A header that never ends: no CRLF after the filler.
        let sent = s
            .write_all(b"GET /status HTTP/1.1\r\nHost: kmod-monitor\r\nX-Filler: ")
            .and_then(|()| s.write_all(&filler));
        if sent.is_err() {
            // The daemon closed it (431 past 8 KiB): what it should do.
            cut_off += 1;
        }
        open.push(s);
    }
    thread::sleep(Duration::from_millis(500));
    let rss = daemon.proc_status_kib("VmRSS");
    let peak = daemon.proc_status_kib("VmHWM");
    eprintln!(
        "figures: {CONNECTIONS} connections x {HEADER_BYTES} bytes of unfinished header ({cut_off} cut off while sending): VmRSS {rss_before} KiB before, {rss} KiB after, peak (VmHWM) {peak} KiB"
    );
    assert!(
        peak < 64 * 1024,
        "peak RSS {peak} KiB is past the DaemonSet's 64 Mi limit\n{daemon}"
    );
    assert!(
        rss < rss_before + 16 * 1024,
        "RSS grew from {rss_before} KiB to {rss} KiB; each connection may buffer 16 KiB at most\n{daemon}"
    );
    drop(open);
    // Still serving.
    assert!(daemon.get("/healthz").is_ok_and(|(c, _)| c == 200));
}

#[test]
fn an_oversized_header_gets_431_and_a_stalled_one_is_cut_off() {
    let host = FakeHost::debian_6_1();
    let daemon = Daemon::start(&host, &polling_args(&[]));

    let mut s = TcpStream::connect(daemon.addr()).unwrap_or_else(|e| panic!("{e}"));
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}"));
    let big = format!(
        "GET /status HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(9 * 1024)
    );
    let _ = s.write_all(big.as_bytes());
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "a 9 KiB header was answered: {answer:?}"
    );

    // Half a request line, then silence: closed after the header-read
    // timeout (10 s).
    let mut slow = TcpStream::connect(daemon.addr()).unwrap_or_else(|e| panic!("{e}"));
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap_or_else(|e| panic!("{e}"));
    slow.write_all(b"GET /status HT")
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let read = slow.read(&mut buf);
    let took = started.elapsed();
    assert!(
        matches!(read, Ok(0) | Err(_)) || buf.starts_with(b"HTTP/1.1 408"),
        "the stalled connection got data: {read:?}"
    );
    assert!(
        took >= Duration::from_secs(8) && took < Duration::from_secs(15),
        "the stalled connection was closed after {took:?}, not the 10 s header-read timeout"
    );
}

/// A CA and a serving certificate for 127.0.0.1 signed by it (written to
/// `dir` as `tls.crt` and `tls.key`, replacing what is there), plus a client
/// certificate; the CA is also written as `PREFIX-ca.crt`.
struct Pki {
    ca_pem: String,
    ca: PathBuf,
    client_cert_pem: String,
    client_key_pem: String,
}

fn pki(dir: &Path, prefix: &str) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let fail = |what: &str, e: rcgen::Error| -> ! { panic!("rcgen: {what}: {e}") };
    let key = || KeyPair::generate().unwrap_or_else(|e| fail("key", e));
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| fail("CA", e));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{prefix} test CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, key()).unwrap_or_else(|e| fail("CA", e));
    let mut serving =
        CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap_or_else(|e| fail("serving", e));
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_key = key();
    let serving_cert = serving
        .signed_by(&serving_key, &ca)
        .unwrap_or_else(|e| fail("serving", e));
    let mut client =
        CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| fail("client", e));
    client
        .distinguished_name
        .push(DnType::CommonName, "prometheus");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = key();
    let client_cert = client
        .signed_by(&client_key, &ca)
        .unwrap_or_else(|e| fail("client", e));
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        // Write beside and rename, as cert-manager and kubelet do.
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
        fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
        path
    };
    // The key first: a reload between the two renames sees a mismatched
    // pair, which the daemon refuses and retries on the next change.
    write("tls.key", &serving_key.serialize_pem());
    write("tls.crt", &serving_cert.pem());
    Pki {
        ca_pem: ca.pem(),
        ca: write(&format!("{prefix}-ca.crt"), &ca.pem()),
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

/// An https client trusting `ca_pem` only, with a client certificate when
/// given.
fn tls_agent(ca_pem: &str, client: Option<(&str, &str)>) -> ureq::Agent {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
    let ca =
        Certificate::from_pem(ca_pem.as_bytes()).unwrap_or_else(|e| panic!("parsing the CA: {e}"));
    let mut tls = TlsConfig::builder().root_certs(RootCerts::Specific(Arc::new(vec![ca])));
    if let Some((cert, key)) = client {
        let cert = Certificate::from_pem(cert.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let key = PrivateKey::from_pem(key.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        tls = tls.client_cert(Some(ClientCert::new_with_certs(&[cert], key)));
    }
    ureq::Agent::config_builder()
        .tls_config(tls.build())
        .proxy(None)
        .http_status_as_error(false)
        .max_idle_connections(0)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into()
}

#[test]
fn tls_serves_clients_that_trust_the_ca_and_picks_up_a_renewed_certificate() {
    let host = FakeHost::debian_6_1();
    let dir = host.join("etc/kmod-monitor");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let first = pki(&dir, "first");
    let web = dir.join("web.yml");
    // Relative paths are relative to the web config file.
    fs::write(
        &web,
        "tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n  min_version: TLS12\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::start_with(
        &host,
        &polling_args(&args!["--web.config.file", &web]),
        &Launch {
            https: Some(tls_agent(&first.ca_pem, None)),
            ..Launch::default()
        },
    );
    let status = daemon.status();
    assert_eq!(status["source"]["active"], "poll", "{daemon}");
    assert!(daemon.metrics().contains("kmod_monitor_requirement_met"));

    // Plain HTTP to the TLS port gets no answer.
    let plain = get(
        &plain_agent(Duration::from_secs(3)),
        &format!("http://{}/status", daemon.addr()),
        None,
    );
    assert!(
        !matches!(plain, Ok(200)),
        "plain HTTP to the TLS port answered {plain:?}"
    );
    // A client that does not trust the CA refuses the daemon.
    let elsewhere = host.join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap_or_else(|e| panic!("{e}"));
    let stranger = pki(&elsewhere, "stranger");
    let untrusting = get(
        &tls_agent(&stranger.ca_pem, None),
        &daemon.url("/status"),
        None,
    );
    assert!(untrusting.is_err(), "{untrusting:?}");

    // A renewed certificate from another CA is served without a restart.
    let second = pki(&dir, "second");
    let renewed = tls_agent(&second.ca_pem, None);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match get(&renewed, &daemon.url("/healthz"), None) {
            Ok(200) => break,
            other => assert!(
                Instant::now() < deadline,
                "the renewed certificate was not picked up: {other:?}\n{daemon}"
            ),
        }
        thread::sleep(Duration::from_millis(200));
    }
    assert!(
        daemon.stderr().contains("TLS certificate reloaded"),
        "{daemon}"
    );
}

#[test]
fn client_certificates_are_required_and_verified_when_configured() {
    let host = FakeHost::debian_6_1();
    let dir = host.join("etc/kmod-monitor");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let pki = pki(&dir, "mtls");
    let web = dir.join("web.yml");
    fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n",
            pki.ca.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let with_cert = tls_agent(
        &pki.ca_pem,
        Some((&pki.client_cert_pem, &pki.client_key_pem)),
    );
    let daemon = Daemon::start_with(
        &host,
        &polling_args(&args!["--web.config.file", &web]),
        &Launch {
            https: Some(with_cert),
            ..Launch::default()
        },
    );
    assert_eq!(daemon.status()["source"]["active"], "poll");
    let without = get(&tls_agent(&pki.ca_pem, None), &daemon.url("/status"), None);
    assert!(
        without.is_err(),
        "a client without a certificate got {without:?}"
    );
}

/// Retries while the daemon answers 429 (the bcrypt budget), for a test
/// that wants the verdict on the credentials. The wait is generous: on a
/// loaded machine one bcrypt check takes far longer than its 70 ms, and the
/// budget spaces them out.
fn verdict(agent: &ureq::Agent, url: &str, authorization: Option<&str>) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let code = get(agent, url, authorization).unwrap_or_else(|e| panic!("GET {url}: {e}"));
        if code != 429 || Instant::now() > deadline {
            return code;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn basic_auth_guards_status_and_metrics_and_bcrypt_cannot_be_made_to_burn_a_core() {
    let host = FakeHost::debian_6_1();
    // Cost 10, as `htpasswd -nBC 10` makes: about 70 ms per check here.
    let hash = bcrypt::hash("s3cret", 10).unwrap_or_else(|e| panic!("{e}"));
    let web = host.join("etc/kmod-monitor/web.yml");
    fs::create_dir_all(host.join("etc/kmod-monitor")).unwrap_or_else(|e| panic!("{e}"));
    fs::write(
        &web,
        format!(
            "basic_auth_users:\n  prometheus: '{hash}'\nhttp_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::start(&host, &polling_args(&args!["--web.config.file", &web]));
    let agent = plain_agent(Duration::from_secs(5));
    let right = basic("prometheus", "s3cret");
    for path in ["/status", "/metrics"] {
        let url = daemon.url(path);
        assert_eq!(
            verdict(&agent, &url, None),
            401,
            "{path} without credentials"
        );
        assert_eq!(
            verdict(&agent, &url, Some(&basic("prometheus", "wrong"))),
            401,
            "{path} with a wrong password"
        );
        assert_eq!(
            verdict(&agent, &url, Some(&basic("mallory", "s3cret"))),
            401,
            "{path} as an unknown user"
        );
        assert_eq!(
            verdict(&agent, &url, Some(&right)),
            200,
            "{path} with the password"
        );
    }
    // Kubernetes probes cannot send credentials.
    assert_eq!(verdict(&agent, &daemon.url("/healthz"), None), 200);
    let response = agent
        .get(daemon.url("/status"))
        .header("Authorization", &right)
        .call()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        response
            .headers()
            .get("x-content-type-options")
            .and_then(|v| v.to_str().ok()),
        Some("nosniff")
    );

    // A flood of wrong passwords: bcrypt runs one at a time and spaced out,
    // so the daemon's CPU stays far below what 60 checks would cost.
    let cpu_before = cpu_seconds(daemon.pid());
    let started = Instant::now();
    let (mut denied, mut throttled) = (0, 0);
    for i in 0..60 {
        thread::sleep(Duration::from_millis(20));
        match get(
            &agent,
            &daemon.url("/metrics"),
            Some(&basic("prometheus", &format!("guess{i}"))),
        ) {
            Ok(401) => denied += 1,
            Ok(429) => throttled += 1,
            other => panic!("guess {i}: {other:?}"),
        }
    }
    // The right password, already verified, is still let in at once.
    assert_eq!(
        get(&agent, &daemon.url("/metrics"), Some(&right)).ok(),
        Some(200)
    );
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(daemon.pid()) - cpu_before;
    eprintln!(
        "figures: 60 wrong passwords in {wall:.2} s: {denied} checked (401), {throttled} refused unchecked (429); daemon CPU {cpu:.2} s"
    );
    assert!(throttled > 0, "no attempt was refused unchecked");
    assert!(
        cpu < 0.2 * wall + 0.3,
        "bcrypt used {cpu:.2} s of CPU in {wall:.2} s\n{daemon}"
    );
}

#[test]
fn the_rate_limit_answers_429_past_the_burst() {
    let host = FakeHost::debian_6_1();
    let web = host.join("web.yml");
    fs::write(&web, "rate_limit:\n  interval: 1h\n  burst: 2\n").unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::start(&host, &polling_args(&args!["--web.config.file", &web]));
    let agent = plain_agent(Duration::from_secs(5));
    let codes: Vec<u16> = (0..3)
        .map(|_| get(&agent, &daemon.url("/metrics"), None).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert_eq!(codes, [200, 200, 429], "{daemon}");
    assert_eq!(get(&agent, &daemon.url("/healthz"), None).ok(), Some(200));
}

#[test]
fn a_bad_web_config_file_exits_2_naming_it() {
    let host = FakeHost::debian_6_1();
    let run = |web: &Path| {
        kmod_monitor(&args![
            "run",
            "--listen",
            SocketAddr::from(([127, 0, 0, 1], free_port())).to_string(),
            "--source",
            "poll",
            "--host-root",
            host.path(),
            "--no-event-log",
            "--web.config.file",
            web
        ])
    };
    let dir = host.join("etc/kmod-monitor");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    for (name, text, problem) in [
        ("missing.yml", None, "cannot read it"),
        (
            "syntax.yml",
            Some("tls_server_config: [\n"),
            "web config file",
        ),
        (
            "unknown.yml",
            Some("tls_config:\n  cert_file: a\n"),
            "tls_config",
        ),
        (
            "tls10.yml",
            Some("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS10\n"),
            "min_version = TLS10: not supported",
        ),
        (
            "nocert.yml",
            Some("tls_server_config:\n  cert_file: absent.crt\n  key_file: absent.key\n"),
            "absent.crt: cannot read it",
        ),
        (
            "hash.yml",
            Some("basic_auth_users:\n  prometheus: plaintext\n"),
            "not a bcrypt hash",
        ),
    ] {
        let path = dir.join(name);
        if let Some(text) = text {
            fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        }
        let out = run(&path);
        out.expect_code(2)
            .stderr_has(&[&format!("web config file {}", path.display()), problem]);
        // A password put where the hash belongs is not echoed.
        assert!(!out.stderr.contains("plaintext"), "{out}");
    }
}
