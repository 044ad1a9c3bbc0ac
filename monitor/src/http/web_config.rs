//! The web config file (`--web.config.file`): TLS, basic auth, response
//! headers and a request rate limit for the HTTP listener, in the YAML
//! format Prometheus exporters share (node_exporter and every exporter
//! built on prometheus/exporter-toolkit; its `docs/web-configuration.md`
//! is the reference).
//!
//! The file is read once at start-up (a bad one stops `run` with exit 2,
//! naming the file and the key); the certificate and key files are then
//! re-read when they change (see [`super::tls`]). Everything else needs a
//! restart, like the other restart-only settings.
//!
//! Where kmod-monitor differs from exporter-toolkit, it says so with an
//! error rather than silently doing something else:
//! - TLS is rustls with the ring provider, so `min_version`/`max_version`
//!   accept `TLS12` and `TLS13` only, `cipher_suites` the six TLS 1.2
//!   AEAD suites ring implements (TLS 1.3 suites, as in Go, are not
//!   configurable), and `curve_preferences` `X25519`, `CurveP256` and
//!   `CurveP384`.
//! - `client_auth_type` takes `NoClientCert`, `VerifyClientCertIfGiven` and
//!   `RequireAndVerifyClientCert`. `RequestClientCert` and
//!   `RequireAnyClientCert` accept certificates nobody verified (the
//!   toolkit's own docs call them insecure) and are refused, as is
//!   `client_allowed_sans`.
//! - The listener speaks HTTP/1.1 only: `http_server_config.http2` is
//!   accepted (Go's default is `true`) and has no effect.
//!
//! Unknown keys are errors, as with the toolkit's strict YAML decoding.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::http::{HeaderName, HeaderValue};
use serde::Deserialize;

/// A web config file that cannot be used: the file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("web config file {}: {problem}", path.display())]
pub struct WebConfigError {
    /// The file, as given.
    pub path: PathBuf,
    /// What is wrong, naming the key.
    pub problem: String,
}

/// The file as written; every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    tls_server_config: Option<RawTls>,
    http_server_config: Option<RawHttp>,
    basic_auth_users: Option<BTreeMap<String, String>>,
    rate_limit: Option<RawRateLimit>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    client_allowed_sans: Option<Vec<String>>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<Vec<String>>,
    prefer_server_cipher_suites: Option<bool>,
    curve_preferences: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    http2: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    interval: Option<String>,
    burst: Option<u32>,
}

/// PEM text, inline in the file or in a file of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pem {
    /// `cert_file`, `key_file`, `client_ca_file`: re-read when changed.
    File(PathBuf),
    /// `cert`, `key`, `client_ca`.
    Inline(String),
}

/// `client_auth_type`, as far as it can be done safely with rustls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// `NoClientCert` (the default).
    None,
    /// `VerifyClientCertIfGiven`: a certificate is optional, but verified
    /// against `client_ca` when sent.
    VerifyIfGiven,
    /// `RequireAndVerifyClientCert`.
    Require,
}

/// A TLS protocol version rustls implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// `tls_server_config`, checked.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub cert: Pem,
    pub key: Pem,
    pub client_auth: ClientAuth,
    pub client_ca: Option<Pem>,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
    /// IANA names of the TLS 1.2 suites to offer, in order; `None` = all.
    pub cipher_suites: Option<Vec<String>>,
    /// The server's order of suites wins (`prefer_server_cipher_suites`).
    pub prefer_server_cipher_suites: bool,
    /// Key-exchange groups, in order; `None` = the provider's default.
    pub curves: Option<Vec<Curve>>,
}

/// `curve_preferences` entries ring implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Curve {
    X25519,
    P256,
    P384,
}

/// `rate_limit`: a token bucket over the requests that need auth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// One token per interval.
    pub interval: Duration,
    /// Tokens the bucket holds.
    pub burst: u32,
}

/// The validated web config. [`WebConfig::default`] is plain HTTP, no
/// auth: the behaviour without `--web.config.file`.
#[derive(Clone, Debug, Default)]
pub struct WebConfig {
    /// The file it came from, for messages.
    pub path: Option<PathBuf>,
    pub tls: Option<TlsSettings>,
    /// `basic_auth_users`: user name to bcrypt hash. Empty = no auth.
    pub users: BTreeMap<String, String>,
    /// `http_server_config.headers`, added to every response.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub rate_limit: Option<RateLimit>,
    /// The rustls config built from `tls`, certificates loaded.
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
}

/// The TLS 1.2 suites ring implements, by their IANA (and Go) names.
pub const TLS12_SUITES: &[&str] = &[
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
];

/// The response headers exporter-toolkit lets a user set, and the values
/// it accepts for them (`None`: any).
const HEADERS: &[(&str, Option<&[&str]>)] = &[
    ("Content-Security-Policy", None),
    ("X-Frame-Options", Some(&["deny", "sameorigin"])),
    ("X-Content-Type-Options", Some(&["nosniff"])),
    ("X-XSS-Protection", None),
    ("Strict-Transport-Security", None),
];

/// The largest web config file read (it holds a few PEM blocks at most).
const MAX_FILE_BYTES: u64 = 1024 * 1024;

impl WebConfig {
    /// Reads and checks `path`; `None` gives the default (plain HTTP).
    ///
    /// # Errors
    /// The file cannot be read, is not valid YAML, has an unknown key or a
    /// value kmod-monitor cannot honour. The message names the file and
    /// the key.
    pub fn load(path: Option<&Path>) -> Result<Self, WebConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let fail = |problem: String| WebConfigError {
            path: path.to_path_buf(),
            problem,
        };
        let text = read_small(path, MAX_FILE_BYTES).map_err(&fail)?;
        let raw: RawFile = if text.trim().is_empty() {
            RawFile::default()
        } else {
            serde_saphyr::from_str(&text)
                .map_err(|e| fail(e.without_snippet().to_string().replace('\n', " ")))?
        };
        let mut config =
            Self::from_raw(raw, path.parent().unwrap_or_else(|| Path::new("."))).map_err(fail)?;
        config.path = Some(path.to_path_buf());
        config.server_tls = config
            .tls
            .as_ref()
            .map(super::tls::server_config)
            .transpose()
            .map_err(fail)?;
        Ok(config)
    }

    /// Whether requests other than /healthz need a user and password.
    #[must_use]
    pub fn auth_required(&self) -> bool {
        !self.users.is_empty()
    }

    fn from_raw(raw: RawFile, dir: &Path) -> Result<Self, String> {
        let RawFile {
            tls_server_config,
            http_server_config,
            basic_auth_users,
            rate_limit,
        } = raw;
        let tls = tls_server_config
            .map(|t| tls_settings(t, dir))
            .transpose()?;
        let users = basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            check_user(user, hash)?;
        }
        let headers = match http_server_config {
            Some(RawHttp { http2, headers }) => {
                if http2 == Some(true) {
                    tracing::debug!(
                        "http_server_config.http2 is ignored: the listener serves HTTP/1.1"
                    );
                }
                response_headers(headers.unwrap_or_default())?
            }
            None => Vec::new(),
        };
        let rate_limit = rate_limit.map(checked_rate_limit).transpose()?.flatten();
        Ok(Self {
            path: None,
            tls,
            users,
            headers,
            rate_limit,
            server_tls: None,
        })
    }
}

/// Reads a file of at most `max` bytes as UTF-8.
pub(super) fn read_small(path: &Path, max: u64) -> Result<String, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut text = String::new();
    file.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if text.len() as u64 > max {
        return Err(format!("larger than {max} bytes"));
    }
    Ok(text)
}

/// A path relative to the web config file's directory, as exporter-toolkit
/// resolves them.
fn relative_to(dir: &Path, path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        path
    } else {
        dir.join(path)
    }
}

fn pem_source(
    inline: Option<String>,
    file: Option<PathBuf>,
    inline_key: &str,
    file_key: &str,
    dir: &Path,
) -> Result<Option<Pem>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(format!(
            "tls_server_config: both {inline_key} and {file_key} are set; give one"
        )),
        (Some(text), None) if text.trim().is_empty() => {
            Err(format!("tls_server_config.{inline_key} is empty"))
        }
        (Some(text), None) => Ok(Some(Pem::Inline(text))),
        (None, Some(path)) if path.as_os_str().is_empty() => {
            Err(format!("tls_server_config.{file_key} is empty"))
        }
        (None, Some(path)) => Ok(Some(Pem::File(relative_to(dir, path)))),
        (None, None) => Ok(None),
    }
}

fn tls_settings(raw: RawTls, dir: &Path) -> Result<TlsSettings, String> {
    let RawTls {
        cert,
        key,
        client_ca,
        cert_file,
        key_file,
        client_auth_type,
        client_ca_file,
        client_allowed_sans,
        min_version,
        max_version,
        cipher_suites,
        prefer_server_cipher_suites,
        curve_preferences,
    } = raw;
    let cert = pem_source(cert, cert_file, "cert", "cert_file", dir)?;
    let key = pem_source(key, key_file, "key", "key_file", dir)?;
    let client_ca = pem_source(
        client_ca,
        client_ca_file,
        "client_ca",
        "client_ca_file",
        dir,
    )?;
    let (cert, key) = match (cert, key) {
        (Some(c), Some(k)) => (c, k),
        (None, _) => {
            return Err(
                "tls_server_config: no certificate (cert_file or cert) is given".to_owned(),
            );
        }
        (_, None) => {
            return Err("tls_server_config: no key (key_file or key) is given".to_owned());
        }
    };
    let client_auth = match client_auth_type.as_deref().unwrap_or("NoClientCert") {
        "NoClientCert" => ClientAuth::None,
        "VerifyClientCertIfGiven" => ClientAuth::VerifyIfGiven,
        "RequireAndVerifyClientCert" => ClientAuth::Require,
        unsafe_kind @ ("RequestClientCert" | "RequireAnyClientCert") => {
            return Err(format!(
                "tls_server_config.client_auth_type = {unsafe_kind}: not supported: it accepts client certificates nobody verified; use RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with client_ca_file"
            ));
        }
        other => {
            return Err(format!(
                "tls_server_config.client_auth_type = {other}: unknown; expected NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert"
            ));
        }
    };
    match (client_auth, &client_ca) {
        (ClientAuth::None, Some(_)) => {
            return Err(
                "tls_server_config: a client CA is given but client_auth_type is NoClientCert, so no client certificate would be checked; set client_auth_type: RequireAndVerifyClientCert"
                    .to_owned(),
            );
        }
        (ClientAuth::VerifyIfGiven | ClientAuth::Require, None) => {
            return Err(
                "tls_server_config: client_auth_type verifies client certificates, but no client_ca_file (or client_ca) is given".to_owned(),
            );
        }
        _ => {}
    }
    if client_allowed_sans.is_some_and(|s| !s.is_empty()) {
        return Err(
            "tls_server_config.client_allowed_sans: not supported by kmod-monitor; issue client certificates from a CA of their own instead".to_owned(),
        );
    }
    let min_version = tls_version("min_version", min_version.as_deref().unwrap_or("TLS12"))?;
    let max_version = tls_version("max_version", max_version.as_deref().unwrap_or("TLS13"))?;
    if min_version > max_version {
        return Err("tls_server_config: min_version is above max_version".to_owned());
    }
    let cipher_suites = cipher_suites
        .filter(|s| !s.is_empty())
        .map(|names| {
            names
                .into_iter()
                .map(|n| {
                    canonical_suite(&n).map(str::to_owned).ok_or_else(|| {
                        format!(
                            "tls_server_config.cipher_suites: {n}: not supported; supported: {}",
                            TLS12_SUITES.join(", ")
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let curves = curve_preferences
        .filter(|c| !c.is_empty())
        .map(|names| {
            names
                .iter()
                .map(|n| match n.as_str() {
                    "X25519" => Ok(Curve::X25519),
                    "CurveP256" => Ok(Curve::P256),
                    "CurveP384" => Ok(Curve::P384),
                    other => Err(format!(
                        "tls_server_config.curve_preferences: {other}: not supported; supported: X25519, CurveP256, CurveP384"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(TlsSettings {
        cert,
        key,
        client_auth,
        client_ca,
        min_version,
        max_version,
        cipher_suites,
        prefer_server_cipher_suites: prefer_server_cipher_suites.unwrap_or(true),
        curves,
    })
}

fn tls_version(key: &str, value: &str) -> Result<TlsVersion, String> {
    match value {
        "TLS12" => Ok(TlsVersion::Tls12),
        "TLS13" => Ok(TlsVersion::Tls13),
        "TLS10" | "TLS11" => Err(format!(
            "tls_server_config.{key} = {value}: not supported (rustls implements TLS12 and TLS13 only)"
        )),
        other => Err(format!(
            "tls_server_config.{key} = {other}: unknown; expected TLS12 or TLS13"
        )),
    }
}

/// A suite's IANA name, also for Go's older names without `_SHA256`.
fn canonical_suite(name: &str) -> Option<&'static str> {
    TLS12_SUITES
        .iter()
        .find(|s| **s == name || s.strip_suffix("_SHA256") == Some(name))
        .copied()
}

fn check_user(user: &str, hash: &str) -> Result<(), String> {
    if user.is_empty() {
        return Err("basic_auth_users: an empty user name".to_owned());
    }
    if user.contains(':') {
        return Err(format!(
            "basic_auth_users: user {user:?}: a user name cannot contain ':' (basic auth splits on it)"
        ));
    }
    // The value is not echoed: it may be a password typed in by mistake.
    hash.parse::<bcrypt::HashParts>().map(|_| ()).map_err(|_| {
        format!(
            "basic_auth_users: user {user:?}: not a bcrypt hash ($2a$, $2b$ or $2y$, cost 4 to 31); make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`"
        )
    })
}

fn response_headers(
    headers: BTreeMap<String, String>,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut out = Vec::new();
    for (name, value) in headers {
        let Some((known, allowed)) = HEADERS.iter().find(|(h, _)| h.eq_ignore_ascii_case(&name))
        else {
            return Err(format!(
                "http_server_config.headers: {name}: this header cannot be configured; the ones that can: {}",
                HEADERS
                    .iter()
                    .map(|(h, _)| *h)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        if value.is_empty() {
            continue;
        }
        if let Some(allowed) = allowed
            && !allowed.iter().any(|a| a.eq_ignore_ascii_case(&value))
        {
            return Err(format!(
                "http_server_config.headers.{known} = {value}: expected {}",
                allowed.join(" or ")
            ));
        }
        let header_value = HeaderValue::from_str(&value).map_err(|_| {
            format!("http_server_config.headers.{known} = {value:?}: not a valid header value")
        })?;
        let header_name = HeaderName::from_bytes(known.as_bytes())
            .map_err(|_| format!("http_server_config.headers: {known}: not a header name"))?;
        out.push((header_name, header_value));
    }
    Ok(out)
}

fn checked_rate_limit(raw: RawRateLimit) -> Result<Option<RateLimit>, String> {
    let RawRateLimit { interval, burst } = raw;
    let interval = match interval.as_deref() {
        None | Some("0" | "0s") => return Ok(None),
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| format!("rate_limit.interval = {text}: {e}"))?,
    };
    if interval.is_zero() {
        return Ok(None);
    }
    if interval > Duration::from_secs(3600) {
        return Err(format!(
            "rate_limit.interval = {}: at most 1h",
            humantime::format_duration(interval)
        ));
    }
    let burst = burst.unwrap_or(1);
    if burst == 0 || burst > 10_000 {
        return Err(format!("rate_limit.burst = {burst}: expected 1 to 10000"));
    }
    Ok(Some(RateLimit { interval, burst }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<WebConfig, String> {
        let raw: RawFile = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        WebConfig::from_raw(raw, Path::new("/etc/kmod-monitor"))
    }

    const HASH: &str = "$2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7EsimhC7zG";

    #[test]
    fn a_full_exporter_toolkit_file_is_understood() {
        let c = parse(&format!(
            "tls_server_config:\n  cert_file: tls.crt\n  key_file: /k/tls.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n  min_version: TLS13\n  cipher_suites: [TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305]\n  curve_preferences: [X25519, CurveP256]\nhttp_server_config:\n  http2: true\n  headers:\n    X-Frame-Options: deny\n    x-content-type-options: nosniff\nbasic_auth_users:\n  prometheus: '{HASH}'\nrate_limit:\n  interval: 100ms\n  burst: 5\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let tls = c.tls.clone().unwrap_or_else(|| panic!("no tls"));
        assert_eq!(tls.cert, Pem::File("/etc/kmod-monitor/tls.crt".into()));
        assert_eq!(tls.key, Pem::File("/k/tls.key".into()));
        assert_eq!(tls.client_auth, ClientAuth::Require);
        assert_eq!(tls.min_version, TlsVersion::Tls13);
        assert_eq!(
            tls.cipher_suites,
            Some(vec![
                "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256".to_owned()
            ])
        );
        assert_eq!(tls.curves, Some(vec![Curve::X25519, Curve::P256]));
        assert!(tls.prefer_server_cipher_suites);
        assert!(c.auth_required());
        assert_eq!(c.headers.len(), 2);
        assert_eq!(
            c.rate_limit,
            Some(RateLimit {
                interval: Duration::from_millis(100),
                burst: 5
            })
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        for (yaml, needle) in [
            ("tls_server_config:\n  cert_file: a\n", "no key"),
            ("tls_server_config:\n  key_file: a\n", "no certificate"),
            (
                "tls_server_config:\n  cert_file: a\n  cert: x\n  key_file: b\n",
                "both cert and cert_file",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS10\n",
                "min_version = TLS10: not supported",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAnyClientCert\n",
                "RequireAnyClientCert: not supported",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n",
                "no client_ca_file",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: c\n",
                "client_auth_type is NoClientCert",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [TLS_RSA_WITH_AES_128_CBC_SHA]\n",
                "TLS_RSA_WITH_AES_128_CBC_SHA: not supported",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  curve_preferences: [CurveP521]\n",
                "CurveP521: not supported",
            ),
            (
                "basic_auth_users:\n  alice: secret\n",
                "not a bcrypt hash ($2a$",
            ),
            (
                "http_server_config:\n  headers:\n    Server: x\n",
                "Server: this header cannot be configured",
            ),
            (
                "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
                "expected deny or sameorigin",
            ),
            (
                "rate_limit:\n  interval: soon\n",
                "rate_limit.interval = soon",
            ),
        ] {
            let err = parse(yaml)
                .err()
                .unwrap_or_else(|| panic!("{yaml} was accepted"));
            assert!(err.contains(needle), "{yaml}: {err} lacks {needle:?}");
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(parse("tls_config:\n  cert_file: a\n").is_err());
        assert!(parse("tls_server_config:\n  certfile: a\n").is_err());
    }

    #[test]
    fn load_names_the_file_and_the_line() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("web.yml");
        std::fs::write(&path, "basic_auth_users:\n  alice: [1, 2]\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let err = WebConfig::load(Some(&path))
            .err()
            .unwrap_or_else(|| panic!("accepted"))
            .to_string();
        assert!(
            err.starts_with(&format!("web config file {}: ", path.display())),
            "{err}"
        );
        assert!(err.contains("line 2"), "{err}");
        let missing = WebConfig::load(Some(&dir.path().join("nope.yml")))
            .err()
            .unwrap_or_else(|| panic!("accepted"))
            .to_string();
        assert!(missing.contains("nope.yml: cannot read it"), "{missing}");
        std::fs::write(&path, "").unwrap_or_else(|e| panic!("{e}"));
        assert!(WebConfig::load(Some(&path)).is_ok_and(|c| c.tls.is_none() && !c.auth_required()));
    }
}
