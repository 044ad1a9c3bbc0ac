//! The real Prometheus and Alertmanager (Debian's `prometheus` and
//! `prometheus-alertmanager` packages) started on free loopback ports for a
//! test, with temporary storage, and killed by a drop guard even when the
//! test panics. Alertmanager can also serve https and check basic auth,
//! through the web config file Prometheus exporters share
//! (`--web.config.file`), with certificates made per test.
use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tempfile::TempDir;

use crate::free_port;

/// A server process and its scratch directory; killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
    dir: TempDir,
    name: &'static str,
    args: Vec<String>,
    /// `http` or `https`.
    scheme: &'static str,
    /// Trusts the server's CA when it serves https.
    agent: ureq::Agent,
    /// The `Authorization` header the server demands, if any.
    authorization: Option<String>,
}

/// How an Alertmanager serves its API: TLS and basic auth, as its
/// `--web.config.file` sets them.
#[cfg(not(target_env = "musl"))]
#[derive(Default)]
pub struct Web<'a> {
    /// Serve https with this PKI's serving certificate.
    pub tls: Option<&'a crate::pki::Pki>,
    /// Demand this user and password.
    pub basic_auth: Option<(&'a str, &'a str)>,
}

/// A plain-HTTP agent that ignores any proxy in the environment.
fn plain_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn require(binary: &str, package: &str) {
    assert!(
        Path::new(binary).exists(),
        "{binary} is missing: install Debian's {package} package (`cargo xtask setup` does)"
    );
}

impl Server {
    fn spawn(name: &'static str, binary: &str, port: u16, dir: TempDir, args: Vec<String>) -> Self {
        Self::spawn_with(name, binary, port, dir, args, ("http", plain_agent(), None))
    }

    fn spawn_with(
        name: &'static str,
        binary: &str,
        port: u16,
        dir: TempDir,
        args: Vec<String>,
        (scheme, agent, authorization): (&'static str, ureq::Agent, Option<String>),
    ) -> Self {
        let log = fs::File::create(dir.path().join("server.log"))
            .unwrap_or_else(|e| panic!("creating {name}'s log: {e}"));
        let err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cloning {name}'s log handle: {e}"));
        let child = Command::new(binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        let mut server = Self {
            child,
            port,
            dir,
            name,
            args,
            scheme,
            agent,
            authorization,
        };
        server.wait_ready();
        server
    }

    /// Alertmanager on a free loopback port, clustering off.
    #[must_use]
    pub fn alertmanager() -> Self {
        Self::alertmanager_on(free_port())
    }

    /// Alertmanager on `port` (to restart one where a client expects it).
    #[must_use]
    pub fn alertmanager_on(port: u16) -> Self {
        let (bin, dir, args) = Self::alertmanager_args(port);
        Self::spawn("alertmanager", bin, port, dir, args)
    }

    /// Alertmanager on a free loopback port serving its API as `web` says.
    #[cfg(not(target_env = "musl"))]
    #[must_use]
    pub fn alertmanager_web(web: &Web<'_>) -> Self {
        let port = free_port();
        let (bin, dir, mut args) = Self::alertmanager_args(port);
        let mut config = String::new();
        let (scheme, agent) = match web.tls {
            Some(pki) => {
                config.push_str(&format!(
                    "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
                    pki.cert.display(),
                    pki.key.display()
                ));
                ("https", pki.agent())
            }
            None => ("http", plain_agent()),
        };
        let authorization = web.basic_auth.map(|(user, password)| {
            // Cost 4, the lowest: the server checks it on every request.
            let hash = bcrypt::hash(password, 4)
                .unwrap_or_else(|e| panic!("hashing the basic-auth password: {e}"));
            config.push_str(&format!("basic_auth_users:\n  {user}: {hash:?}\n"));
            basic_authorization(user, password)
        });
        let path = dir.path().join("web.yml");
        fs::write(&path, config).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        args.push(format!("--web.config.file={}", path.display()));
        Self::spawn_with(
            "alertmanager",
            bin,
            port,
            dir,
            args,
            (scheme, agent, authorization),
        )
    }

    /// The binary, a scratch directory with the config, and the arguments.
    fn alertmanager_args(port: u16) -> (&'static str, TempDir, Vec<String>) {
        const BIN: &str = "/usr/bin/prometheus-alertmanager";
        require(BIN, "prometheus-alertmanager");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let config = dir.path().join("alertmanager.yml");
        fs::write(
            &config,
            "route:\n  receiver: 'null'\n  group_wait: 1s\nreceivers:\n  - name: 'null'\n",
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
        let args = vec![
            format!("--config.file={}", config.display()),
            format!("--storage.path={}", dir.path().join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--cluster.listen-address=".to_owned(),
            "--log.level=warn".to_owned(),
        ];
        (BIN, dir, args)
    }

    /// Prometheus scraping `target` (host:port) every second as job
    /// "kmod-monitor", evaluating `rules` every second.
    #[must_use]
    pub fn prometheus(target: &str, rules: &Path) -> Self {
        const BIN: &str = "/usr/bin/prometheus";
        require(BIN, "prometheus");
        let port = free_port();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: kmod-monitor\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
        let args = vec![
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--log.level=warn".to_owned(),
        ];
        Self::spawn("prometheus", BIN, port, dir, args)
    }

    fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.port)
    }

    /// The base URL a client pushes to.
    #[must_use]
    pub fn base_url(&self) -> String {
        self.url("")
    }

    /// `GET path` with the credentials the server demands.
    fn get(&self, path: &str) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut request = self.agent.get(self.url(path));
        if let Some(value) = &self.authorization {
            request = request.header("Authorization", value);
        }
        request.call()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.name,
                    self.log()
                );
            }
            if self.get("/-/ready").is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} ({:?}) not ready after 30 s:\n{}",
                self.name,
                self.args,
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's own log, for failure messages.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// `GET path` as JSON.
    ///
    /// # Panics
    /// When the request fails or the body is not JSON.
    #[must_use]
    pub fn get_json(&self, path: &str) -> Value {
        let url = self.url(path);
        let body = self
            .get(path)
            .unwrap_or_else(|e| panic!("GET {url}: {e}\n{}", self.log()))
            .body_mut()
            .read_to_string()
            .unwrap_or_else(|e| panic!("reading {url}: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url} is not JSON ({e}): {body}"))
    }

    /// Polls `GET path` until `ok` holds; returns that body.
    ///
    /// # Panics
    /// After `timeout`, with the last body and the server's log.
    pub fn wait_for(
        &self,
        path: &str,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let body = self.get_json(path);
            if ok(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what} in {} {path}; last:\n{body:#}\n{}",
                self.name,
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The `Authorization` header value for basic auth.
#[cfg(not(target_env = "musl"))]
#[must_use]
pub fn basic_authorization(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}
