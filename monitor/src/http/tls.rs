//! TLS for the HTTP listener: the rustls server config built from the web
//! config's `tls_server_config` (ring provider only), and a certificate
//! resolver that picks up a renewed certificate and key without a restart.
//!
//! Reload: at most once a second, a handshake looks at the certificate and
//! key files' size, modification time and inode. When either changed, both
//! are read again; a pair that does not load (half-written, or a key that
//! does not match) is logged and the previous pair kept, and it is tried
//! again once the files change again. Inline PEM (`cert`, `key`) never
//! changes. The client CA and every other key need a restart.
use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use rustls::{
    RootCertStore, ServerConfig, SupportedProtocolVersion,
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};

use super::web_config::{ClientAuth, Curve, Pem, TlsSettings, TlsVersion, read_small};

/// How often a handshake may look at the certificate files.
const RELOAD_CHECK_EVERY: Duration = Duration::from_secs(1);
/// The largest PEM file read (a long chain is a few KiB).
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Builds the rustls config; every problem names the key or file.
///
/// # Errors
/// A certificate, key or CA that cannot be read or used, or a setting the
/// ring provider cannot honour.
pub fn server_config(settings: &TlsSettings) -> Result<Arc<ServerConfig>, String> {
    let TlsSettings {
        cert,
        key,
        client_auth,
        client_ca,
        min_version,
        max_version,
        cipher_suites,
        prefer_server_cipher_suites,
        curves,
    } = settings;
    let provider = Arc::new(provider(cipher_suites.as_deref(), curves.as_deref()));
    let versions: Vec<&'static SupportedProtocolVersion> = [
        (TlsVersion::Tls12, &rustls::version::TLS12),
        (TlsVersion::Tls13, &rustls::version::TLS13),
    ]
    .into_iter()
    .filter(|(v, _)| (*min_version..=*max_version).contains(v))
    .map(|(_, p)| p)
    .collect();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&versions)
        .map_err(|e| format!("tls_server_config: {e}"))?;
    let builder = match (client_auth, client_ca) {
        (ClientAuth::None, _) | (_, None) => builder.with_no_client_auth(),
        (auth, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for der in certificates(ca, "client CA")? {
                roots
                    .add(der)
                    .map_err(|e| format!("{}: not a usable CA certificate: {e}", ca.name()))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
            let verifier = if *auth == ClientAuth::VerifyIfGiven {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("{}: {e}", ca.name()))?,
            )
        }
    };
    let resolver = ReloadingCert::new(cert.clone(), key.clone(), Arc::clone(&provider))?;
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.ignore_client_order = *prefer_server_cipher_suites;
    // HTTP/1.1 only (see web_config's `http2`).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// ring with the suites (TLS 1.2 ones filtered and ordered as listed; TLS
/// 1.3 ones always, as in Go) and key-exchange groups asked for.
fn provider(suites: Option<&[String]>, curves: Option<&[Curve]>) -> CryptoProvider {
    let mut provider = ring::default_provider();
    if let Some(names) = suites {
        let all = provider.cipher_suites.clone();
        let mut chosen: Vec<_> = all
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS13)
            .copied()
            .collect();
        for name in names {
            chosen.extend(all.iter().filter(|s| suite_name(s) == *name).copied());
        }
        provider.cipher_suites = chosen;
    }
    if let Some(curves) = curves {
        let wanted = |c: &Curve| match c {
            Curve::X25519 => rustls::NamedGroup::X25519,
            Curve::P256 => rustls::NamedGroup::secp256r1,
            Curve::P384 => rustls::NamedGroup::secp384r1,
        };
        let all = provider.kx_groups.clone();
        provider.kx_groups = curves
            .iter()
            .filter_map(|c| all.iter().find(|g| g.name() == wanted(c)).copied())
            .collect();
    }
    provider
}

fn suite_name(suite: &rustls::SupportedCipherSuite) -> String {
    format!("{:?}", suite.suite())
}

impl Pem {
    /// How the key names it in messages.
    fn name(&self) -> String {
        match self {
            Self::File(path) => path.display().to_string(),
            Self::Inline(_) => "the inline PEM".to_owned(),
        }
    }

    fn text(&self) -> Result<String, String> {
        match self {
            Self::File(path) => {
                read_small(path, MAX_PEM_BYTES).map_err(|e| format!("{}: {e}", path.display()))
            }
            Self::Inline(text) => Ok(text.clone()),
        }
    }
}

fn certificates(pem: &Pem, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = pem.text()?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM certificates ({what}): {e}", pem.name()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no CERTIFICATE block in it ({what})",
            pem.name()
        ));
    }
    Ok(certs)
}

fn certified_key(cert: &Pem, key: &Pem, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let chain = certificates(cert, "server certificate")?;
    let key_text = key.text()?;
    let key_der = PrivateKeyDer::from_pem_slice(key_text.as_bytes())
        .map_err(|e| format!("{}: no usable private key in it: {e}", key.name()))?;
    CertifiedKey::from_der(chain, key_der, provider).map_err(|e| {
        format!(
            "{} and {}: the key cannot be used with the certificate: {e}",
            cert.name(),
            key.name()
        )
    })
}

/// What identifies a file's content without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp(Vec<Option<(u64, u64, Option<SystemTime>)>>);

fn stamp(sources: &[&Pem]) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    Stamp(
        sources
            .iter()
            .map(|s| match s {
                Pem::File(path) => std::fs::metadata(path)
                    .ok()
                    .map(|m| (m.ino(), m.len(), m.modified().ok())),
                Pem::Inline(_) => None,
            })
            .collect(),
    )
}

/// The serving certificate, re-read when its files change.
struct ReloadingCert {
    cert: Pem,
    key: Pem,
    provider: Arc<CryptoProvider>,
    state: Mutex<Loaded>,
}

struct Loaded {
    key: Arc<CertifiedKey>,
    /// The files as last looked at (loaded or not).
    seen: Stamp,
    checked: Instant,
}

impl ReloadingCert {
    fn new(cert: Pem, key: Pem, provider: Arc<CryptoProvider>) -> Result<Self, String> {
        let seen = stamp(&[&cert, &key]);
        let loaded = certified_key(&cert, &key, &provider)?;
        Ok(Self {
            state: Mutex::new(Loaded {
                key: Arc::new(loaded),
                seen,
                checked: Instant::now(),
            }),
            cert,
            key,
            provider,
        })
    }

    fn files(&self) -> Vec<&Path> {
        [&self.cert, &self.key]
            .into_iter()
            .filter_map(|p| match p {
                Pem::File(path) => Some(path.as_path()),
                Pem::Inline(_) => None,
            })
            .collect()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.checked.elapsed() >= RELOAD_CHECK_EVERY && !self.files().is_empty() {
            state.checked = Instant::now();
            let now = stamp(&[&self.cert, &self.key]);
            if now != state.seen {
                state.seen = now;
                match certified_key(&self.cert, &self.key, &self.provider) {
                    Ok(key) => {
                        tracing::info!(files = ?self.files(), "TLS certificate reloaded");
                        state.key = Arc::new(key);
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "TLS certificate changed but cannot be loaded; still serving the previous one"
                    ),
                }
            }
        }
        Some(Arc::clone(&state.key))
    }
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("files", &self.files())
            .finish_non_exhaustive()
    }
}

/// The files a TLS config reads, for the start-up log.
#[must_use]
pub fn files(settings: &TlsSettings) -> Vec<PathBuf> {
    [&settings.cert, &settings.key]
        .into_iter()
        .chain(settings.client_ca.as_ref())
        .filter_map(|p| match p {
            Pem::File(path) => Some(path.clone()),
            Pem::Inline(_) => None,
        })
        .collect()
}
