//! How the pusher reaches Alertmanager: one HTTP client for every target,
//! with connect and request timeouts, TLS through rustls with the `ring`
//! provider, and the credentials Prometheus users configure for
//! `alertmanager_config` (a bearer token or basic auth, each from a file).
//!
//! - **Timeouts.** Each request, connection and TLS handshake included,
//!   ends after the configured timeout (`--alertmanager-timeout`, 10 s).
//!   Connecting alone may take at most [`CONNECT_TIMEOUT_MAX`] (or the
//!   request timeout when that is shorter): enough for one lost SYN, which
//!   Linux re-sends after 1 s, and far more than a reachable Alertmanager
//!   on a cluster network needs.
//! - **TLS.** With a CA file, only its certificates are trusted (as
//!   Prometheus's `tls_config.ca_file`); without one, the system's roots
//!   (`/etc/ssl/certs`, or `SSL_CERT_FILE` / `SSL_CERT_DIR`), loaded only
//!   when some target is https.
//! - **Credentials.** Read and checked at start: a missing, unreadable or
//!   empty file is an error naming the file (exit 2). They are read again
//!   before each request, so a rotated token or password (a Kubernetes
//!   Secret update) is used without a restart; if that re-read fails, takes
//!   longer than 1 s, or an earlier one has not returned (a hung mount: at
//!   most one blocking thread per file waits on it), the last good value is
//!   used and a warning names the file. Secrets are never logged: the
//!   header is marked sensitive, [`Secret`] has no `Display` and its
//!   `Debug` prints nothing of it, and URLs are logged through
//!   [`super::redacted`].
//! - **Redirects** are not followed: Alertmanager's API never redirects a
//!   POST, and a redirect must not carry the credentials elsewhere.
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use reqwest::header::{AUTHORIZATION, HeaderValue};

use super::{AlertAuth, AlertClient, PostableAlert};

/// Longest time to set up a connection (TCP and TLS).
pub const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(3);
/// Longest wait for a credential file's re-read before a request.
const READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the pusher cannot start. Each names the file or URL and the flag
/// and key that set it; none carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The CA file cannot be read.
    #[error("Alertmanager CA file {} (--alertmanager-ca-file / alertmanager_ca_file): cannot read it: {source}", path.display())]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("Alertmanager CA file {} (--alertmanager-ca-file / alertmanager_ca_file): {problem}", path.display())]
    BadCa { path: PathBuf, problem: String },
    /// A credentials file cannot be read or holds nothing usable.
    #[error("Alertmanager {what} file {} ({flag} / {key}): {problem}", path.display())]
    Secret {
        /// "bearer token" or "basic-auth password".
        what: &'static str,
        flag: &'static str,
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
    /// An https target, no CA file, and no system roots.
    #[error(
        "https Alertmanager {url} needs trusted CA certificates: none could be loaded from the system ({problem}); set --alertmanager-ca-file / alertmanager_ca_file"
    )]
    NoSystemRoots { url: String, problem: String },
    /// rustls or reqwest refused the configuration.
    #[error("building the Alertmanager HTTP client: {0}")]
    Client(String),
}

/// A secret read from a file. Its `Debug` shows only its length, and it
/// has no `Display`, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Where a credential comes from, and the last value read.
#[derive(Debug)]
struct SecretFile {
    what: &'static str,
    flag: &'static str,
    key: &'static str,
    path: PathBuf,
    last: Mutex<Secret>,
    /// A re-read is running: a file on a hung mount then holds one
    /// blocking thread, not one per request.
    reading: AtomicBool,
}

impl SecretFile {
    fn error(&self, problem: String) -> TransportError {
        TransportError::Secret {
            what: self.what,
            flag: self.flag,
            key: self.key,
            path: self.path.clone(),
            problem,
        }
    }

    /// Reads and checks the file, as Prometheus does: surrounding
    /// whitespace is trimmed; empty or control characters are refused.
    fn read(&self) -> Result<Secret, TransportError> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| self.error(format!("cannot read it: {e}")))?;
        let value = text.trim();
        if value.is_empty() {
            return Err(self.error("is empty".to_owned()));
        }
        if value.chars().any(char::is_control) {
            return Err(self.error(
                "holds control characters, which cannot go into an HTTP header".to_owned(),
            ));
        }
        Ok(Secret(value.to_owned()))
    }

    /// The current value: re-read now, or the last good one if that fails
    /// or an earlier re-read is still stuck.
    async fn current(self: &Arc<Self>) -> Secret {
        if self.reading.swap(true, Ordering::AcqRel) {
            tracing::warn!(file = %self.path.display(), "an earlier read of the Alertmanager credential has not returned; using the value read before");
            return self.last().clone();
        }
        let me = Arc::clone(self);
        // A file on a hung mount must not stall the runtime's one thread.
        let read = tokio::task::spawn_blocking(move || {
            let result = me.read();
            me.reading.store(false, Ordering::Release);
            result
        });
        let fresh = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(Ok(Ok(secret))) => Ok(secret),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(e)) => Err(format!("reading it failed: {e}")),
            Err(_) => Err(format!("reading it took longer than {READ_TIMEOUT:?}")),
        };
        let mut last = self.last();
        match fresh {
            Ok(secret) => {
                *last = secret;
            }
            Err(error) => {
                tracing::warn!(file = %self.path.display(), %error, "cannot re-read the Alertmanager credential; using the value read before");
            }
        }
        last.clone()
    }

    fn last(&self) -> std::sync::MutexGuard<'_, Secret> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The credentials, their files kept for re-reading.
#[derive(Debug)]
enum Credentials {
    Bearer(Arc<SecretFile>),
    Basic {
        username: String,
        password: Arc<SecretFile>,
    },
}

/// The shared client and credentials for every target.
#[derive(Debug)]
pub struct Transport {
    client: reqwest::Client,
    credentials: Option<Credentials>,
}

/// How a request failed, in words that carry no secret.
pub type PostError = String;

impl Transport {
    /// Reads the CA and credential files and builds the client.
    ///
    /// # Errors
    /// A file that cannot be read or holds nothing usable, an https target
    /// with neither a CA file nor system roots, or a client rustls refuses.
    pub fn new(urls: &[reqwest::Url], settings: &AlertClient) -> Result<Self, TransportError> {
        let AlertClient {
            ca_file,
            auth,
            timeout,
        } = settings;
        let tls = tls_config(urls, ca_file.as_deref())?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(*timeout)
            .connect_timeout(connect_timeout(*timeout))
            .redirect(reqwest::redirect::Policy::none())
            // One request at a time per target: one idle connection each.
            .pool_max_idle_per_host(1)
            .build()
            .map_err(|e| TransportError::Client(error_chain(&e)))?;
        let credentials = match auth {
            None => None,
            Some(AlertAuth::Bearer { token_file }) => {
                Some(Credentials::Bearer(secret_file(SecretFile {
                    what: "bearer token",
                    flag: "--alertmanager-bearer-token-file",
                    key: "alertmanager_bearer_token_file",
                    path: token_file.clone(),
                    last: Mutex::new(Secret(String::new())),
                    reading: AtomicBool::new(false),
                })?))
            }
            Some(AlertAuth::Basic {
                username,
                password_file,
            }) => Some(Credentials::Basic {
                username: username.clone(),
                password: secret_file(SecretFile {
                    what: "basic-auth password",
                    flag: "--alertmanager-basic-auth-password-file",
                    key: "alertmanager_basic_auth_password_file",
                    path: password_file.clone(),
                    last: Mutex::new(Secret(String::new())),
                    reading: AtomicBool::new(false),
                })?,
            }),
        };
        Ok(Self {
            client,
            credentials,
        })
    }

    /// POSTs `alerts` to `url` (the full `/api/v2/alerts` URL).
    ///
    /// # Errors
    /// Connection, TLS, timeout or a non-2xx answer, described without the
    /// URL's user info or any credential.
    pub async fn post(
        &self,
        url: &reqwest::Url,
        alerts: &[PostableAlert],
    ) -> Result<(), PostError> {
        let mut request = self.client.post(url.clone()).json(alerts);
        match &self.credentials {
            None => {}
            Some(Credentials::Bearer(file)) => {
                let Secret(token) = file.current().await;
                let mut value =
                    HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                        format!(
                            "the bearer token in {} is not a valid header value",
                            file.path.display()
                        )
                    })?;
                value.set_sensitive(true);
                request = request.header(AUTHORIZATION, value);
            }
            Some(Credentials::Basic { username, password }) => {
                let Secret(password) = password.current().await;
                request = request.basic_auth(username, Some(password));
            }
        }
        match request.send().await {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(format!("HTTP {}", resp.status())),
            Err(e) => Err(error_chain(&e.without_url())),
        }
    }
}

/// Reads a credential once at start, so a bad file stops the daemon.
fn secret_file(file: SecretFile) -> Result<Arc<SecretFile>, TransportError> {
    let secret = file.read()?;
    *file.last() = secret;
    Ok(Arc::new(file))
}

/// The connect timeout for a request timeout: [`CONNECT_TIMEOUT_MAX`] or
/// the request timeout, whichever is shorter.
#[must_use]
pub fn connect_timeout(request: Duration) -> Duration {
    request.min(CONNECT_TIMEOUT_MAX)
}

/// The rustls configuration: the CA file's certificates, or the system's
/// roots when some target is https, or none (plain http only).
fn tls_config(
    urls: &[reqwest::Url],
    ca_file: Option<&Path>,
) -> Result<rustls::ClientConfig, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|source| TransportError::ReadCa {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |problem: String| TransportError::BadCa {
            path: path.to_path_buf(),
            problem,
        };
        let certs = rustls_pemfile_certs(&pem).map_err(&bad)?;
        if certs.is_empty() {
            return Err(bad("holds no PEM certificate".to_owned()));
        }
        for (i, cert) in certs.into_iter().enumerate() {
            roots
                .add(cert)
                .map_err(|e| bad(format!("certificate {}: {e}", i + 1)))?;
        }
    } else if let Some(https) = urls.iter().find(|u| u.scheme() == "https") {
        let found = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let problem = found
                .errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            return Err(TransportError::NoSystemRoots {
                url: super::redacted(https),
                problem: if problem.is_empty() {
                    "no certificate found".to_owned()
                } else {
                    problem
                },
            });
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The certificates of a PEM bundle.
fn rustls_pemfile_certs(
    pem: &[u8],
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate bundle ({e})"))
}

/// An error and its causes, `: `-joined (reqwest's own `Display` stops at
/// "error sending request"; the cause is what an operator needs).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn client(
        auth: Option<AlertAuth>,
        ca_file: Option<PathBuf>,
    ) -> Result<Transport, TransportError> {
        Transport::new(
            &[reqwest::Url::parse("http://127.0.0.1:9093").unwrap()],
            &AlertClient {
                ca_file,
                auth,
                timeout: Duration::from_secs(10),
            },
        )
    }

    #[test]
    fn connect_timeout_is_bounded_by_both() {
        assert_eq!(
            connect_timeout(Duration::from_secs(10)),
            CONNECT_TIMEOUT_MAX
        );
        assert_eq!(
            connect_timeout(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn credential_files_are_checked_at_start_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let token = file(&dir, "token", "  s3cret-token\n");
        let t = client(Some(AlertAuth::Bearer { token_file: token }), None).unwrap();
        let shown = format!("{t:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("Secret(12 bytes)"), "trimmed: {shown}");

        let missing = dir.path().join("absent");
        let e = client(
            Some(AlertAuth::Bearer {
                token_file: missing.clone(),
            }),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(&missing.display().to_string()), "{e}");
        assert!(e.contains("--alertmanager-bearer-token-file"), "{e}");
        assert!(e.contains("cannot read it"), "{e}");

        let empty = file(&dir, "empty", "\n");
        let e = client(
            Some(AlertAuth::Basic {
                username: "kmod".into(),
                password_file: empty,
            }),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("basic-auth password") && e.contains("is empty"),
            "{e}"
        );

        let control = file(&dir, "control", "pass\u{1b}word");
        let e = client(
            Some(AlertAuth::Bearer {
                token_file: control,
            }),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("control characters"), "{e}");
        assert!(!e.contains("pass"), "the content is never shown: {e}");
    }

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.pem");
        let e = client(None, Some(missing.clone())).unwrap_err().to_string();
        assert!(
            e.contains(&missing.display().to_string()) && e.contains("cannot read it"),
            "{e}"
        );
        let junk = file(&dir, "junk.pem", "not a certificate\n");
        let e = client(None, Some(junk)).unwrap_err().to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
    }

    #[tokio::test]
    async fn a_rotated_secret_is_used_and_a_vanished_one_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(&dir, "token", "one");
        let f = secret_file(SecretFile {
            what: "bearer token",
            flag: "--alertmanager-bearer-token-file",
            key: "alertmanager_bearer_token_file",
            path: path.clone(),
            last: Mutex::new(Secret(String::new())),
            reading: AtomicBool::new(false),
        })
        .unwrap();
        assert_eq!(f.current().await, Secret("one".into()));
        std::fs::write(&path, "two\n").unwrap();
        assert_eq!(f.current().await, Secret("two".into()));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            f.current().await,
            Secret("two".into()),
            "the last good value"
        );
    }

    #[tokio::test]
    async fn a_hung_read_holds_one_thread_and_the_last_value_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(&dir, "token", "one");
        let f = secret_file(SecretFile {
            what: "bearer token",
            flag: "--alertmanager-bearer-token-file",
            key: "alertmanager_bearer_token_file",
            path: path.clone(),
            last: Mutex::new(Secret(String::new())),
            reading: AtomicBool::new(false),
        })
        .unwrap();
        // A FIFO without a writer blocks its reader, like a hung mount.
        std::fs::remove_file(&path).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let started = std::time::Instant::now();
        assert_eq!(f.current().await, Secret("one".into()));
        assert!(started.elapsed() >= READ_TIMEOUT, "{:?}", started.elapsed());
        let started = std::time::Instant::now();
        assert_eq!(f.current().await, Secret("one".into()));
        assert!(
            started.elapsed() < READ_TIMEOUT / 2,
            "no second read while the first is stuck: {:?}",
            started.elapsed()
        );
        // Unblock the stuck reader; then a plain file is read again.
        std::fs::write(&path, "ignored").unwrap();
        while f.reading.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "three").unwrap();
        assert_eq!(f.current().await, Secret("three".into()));
    }
}
