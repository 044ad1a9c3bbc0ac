//! A throw-away certificate authority and a serving certificate for
//! 127.0.0.1, made with rcgen for one test (host builds only).
use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use tempfile::TempDir;

/// A CA and a serving certificate signed by it, as PEM files.
pub struct Pki {
    /// The CA certificate a client trusts.
    pub ca: PathBuf,
    /// The serving certificate (127.0.0.1 and localhost) and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: TempDir,
}

fn fail(what: &str, e: rcgen::Error) -> ! {
    panic!("rcgen: {what}: {e}")
}

impl Pki {
    /// A new CA named `name` and a serving certificate for 127.0.0.1.
    ///
    /// # Panics
    /// When a key or certificate cannot be made or written.
    #[must_use]
    pub fn generate(name: &str) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let key = || KeyPair::generate().unwrap_or_else(|e| fail("generating a key", e));
        let write = |file: &str, text: String| {
            let path = dir.path().join(file);
            fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            path
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new())
            .unwrap_or_else(|e| fail("CA parameters", e));
        ca_params.distinguished_name.push(DnType::CommonName, name);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, key())
            .unwrap_or_else(|e| fail("self-signing the CA", e));
        let mut serving =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .unwrap_or_else(|e| fail("serving certificate parameters", e));
        serving
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_key = key();
        let serving_cert = serving
            .signed_by(&serving_key, &ca)
            .unwrap_or_else(|e| fail("signing the serving certificate", e));
        Self {
            ca: write("ca.pem", ca.pem()),
            cert: write("server.pem", serving_cert.pem()),
            key: write("server.key", serving_key.serialize_pem()),
            _dir: dir,
        }
    }

    /// An https agent trusting only this CA, ignoring proxies.
    ///
    /// # Panics
    /// When the CA file cannot be read or parsed.
    #[must_use]
    pub fn agent(&self) -> ureq::Agent {
        use ureq::tls::{Certificate, RootCerts, TlsConfig};
        let read =
            |p: &Path| fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
        let ca = Certificate::from_pem(&read(&self.ca))
            .unwrap_or_else(|e| panic!("parsing {}: {e}", self.ca.display()));
        ureq::Agent::config_builder()
            .tls_config(
                TlsConfig::builder()
                    .root_certs(RootCerts::Specific(Arc::new(vec![ca])))
                    .build(),
            )
            .proxy(None)
            .timeout_global(Some(std::time::Duration::from_secs(10)))
            .build()
            .into()
    }
}
