//! Longhorn awareness: what the cluster says about the V2 data engine on
//! this node, and the V2 prerequisites beyond modules.
//!
//! - [`enablement`] decides, purely, whether the V2 requirements apply and
//!   where that answer came from.
//! - [`watch`] feeds it from the API server (Longhorn's settings, this
//!   node's labels) with kube-rs watchers.
//! - [`readiness`] judges hugepages, the CPU and the kernel version.
//! - [`v2`] holds the daemon's V2 state and says what each update changed.
pub mod enablement;
pub mod readiness;
pub mod v2;
pub mod watch;

use std::path::PathBuf;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

pub use enablement::{
    ClusterView, Decision, Fact, LocalInputs, Source, decide_hugepages, decide_v2,
};

/// `--longhorn`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LonghornMode {
    /// Watch the cluster when running in one: an in-cluster service account,
    /// `--kubeconfig`, `$KUBECONFIG` or `~/.kube/config`.
    #[default]
    Auto,
    /// Never talk to the API server.
    Off,
}

/// The cluster watch's settings.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    pub mode: LonghornMode,
    /// `--kubeconfig`: use this file (and fail if it is unusable).
    pub kubeconfig: Option<PathBuf>,
    /// Longhorn's namespace.
    pub namespace: String,
    /// How long the cluster may stay unreadable before the alert fires.
    pub grace: std::time::Duration,
}

/// The default Longhorn namespace.
pub const DEFAULT_NAMESPACE: &str = "longhorn-system";

/// Builds a client, or says why there is none.
///
/// # Errors
/// An explicit `--kubeconfig` that cannot be read or used: bad input, said
/// at start-up. Without one, finding no cluster is not an error (`Ok(None)`
/// with the reason logged).
pub async fn client(settings: &ClusterSettings) -> anyhow::Result<Option<kube::Client>> {
    if settings.mode == LonghornMode::Off {
        tracing::info!("--longhorn off: not watching the cluster");
        return Ok(None);
    }
    let client = connect(settings.kubeconfig.as_deref()).await?;
    if client.is_some() {
        tracing::info!(namespace = %settings.namespace, "longhorn: watching settings and this node's labels");
    }
    Ok(client)
}

/// A client from `--kubeconfig`, or else the in-cluster service account,
/// `$KUBECONFIG` or `~/.kube/config`; `None` (logged) when none is found.
///
/// # Errors
/// An explicit `kubeconfig` that cannot be read or used.
pub async fn connect(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Option<kube::Client>> {
    use anyhow::Context as _;
    let config = if let Some(path) = kubeconfig {
        let kc = kube::config::Kubeconfig::read_from(path)
            .with_context(|| format!("--kubeconfig {}: cannot read it", path.display()))?;
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("--kubeconfig {}: unusable", path.display()))?
    } else {
        match kube::Config::infer().await {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(reason = %e, "not in a cluster (no service account, no kubeconfig): V2 enablement comes from the flag and the config file, and nothing is written to the API");
                return Ok(None);
            }
        }
    };
    let url = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    tracing::info!(api_server = %url, "Kubernetes API server");
    Ok(Some(client))
}

#[cfg(test)]
mod tests {
    /// The cluster tests speak plain HTTP; a real cluster is HTTPS. The TLS
    /// stack (rustls on ring) must be usable without a process-level
    /// provider being installed first, or the first in-cluster connection
    /// would fail.
    #[tokio::test(flavor = "current_thread")]
    async fn an_https_client_builds_and_fails_only_to_connect() {
        let url = "https://127.0.0.1:1".parse().unwrap();
        let client = kube::Client::try_from(kube::Config::new(url)).unwrap();
        let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
        let err = api.get_opt("node-1").await.unwrap_err().to_string();
        // A connect error, not a TLS set-up panic or error.
        assert!(err.contains("Connect"), "{err}");
    }
}
