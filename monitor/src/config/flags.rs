//! The command-line flags of `run` and `check`, as clap parses them: raw,
//! every one optional, so that [`super::settings::resolve_run`] can tell a
//! flag that was given from one that was not (a flag wins over the config
//! file, which wins over the default). Validation happens there, with the
//! same validators as the file's keys. The defaults shown in `--help` are
//! the `DEFAULT_…` constants the resolver uses.
use std::path::PathBuf;

use clap::ValueEnum;

use super::settings::{
    DEFAULT_ALERT_RESEND_SECS, DEFAULT_K8S_HEARTBEAT_SECS, DEFAULT_LISTEN,
    DEFAULT_LONGHORN_GRACE_SECS, DEFAULT_POLL_INTERVAL_SECS, DEFAULT_RECONCILE_INTERVAL_SECS,
};
use crate::{
    forensic::{self, FsyncPolicy},
    k8s::ReportMode,
    longhorn::{self, LonghornMode},
    source::SourceKind,
};

/// `TEXT [default: VALUE]`, for help lines.
fn with_default(text: &str, default: impl std::fmt::Display) -> String {
    format!("{text} [default: {default}]")
}

/// Flags `run` and `check` share: what to judge and where to look.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct CommonFlags {
    /// TOML config file (groups, settings).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Require the V2 data engine (vfio_pci, uio_pci_generic, nvme_tcp, 2 MiB
    /// hugepages), or with =false never; overrides the cluster and the file.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub v2_data_engine: Option<bool>,
    /// Learn V2 enablement from the cluster (Longhorn's v2-data-engine
    /// setting, this node's labels) when running in one.
    #[arg(long, value_enum, help = with_default(
        "Learn V2 enablement from the cluster (Longhorn's v2-data-engine setting, this node's labels) when running in one",
        LonghornMode::default().to_possible_value().map_or_else(String::new, |v| v.get_name().to_owned()),
    ))]
    pub longhorn: Option<LonghornMode>,
    /// The Longhorn version whose node requirements apply (e.g. 1.12)
    /// [default: the cluster's current-longhorn-version, else the newest known].
    #[arg(long, value_name = "VERSION")]
    pub longhorn_version: Option<String>,
    /// Kubeconfig for --longhorn [default: in-cluster, $KUBECONFIG, ~/.kube/config].
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of Longhorn's settings.
    #[arg(long, value_name = "NS", help = with_default("Namespace of Longhorn's settings", longhorn::DEFAULT_NAMESPACE))]
    pub longhorn_namespace: Option<String>,
    /// 2 MiB hugepages the V2 data engine needs; 0 = do not check.
    #[arg(long, value_name = "PAGES", help = with_default(
        "2 MiB hugepages the V2 data engine needs; 0 = do not check",
        longhorn::readiness::DEFAULT_HUGEPAGES_2MI,
    ))]
    pub v2_hugepages_2mi: Option<u64>,
    /// This node's name: the alerts' `instance` label and the Node whose
    /// labels are watched [default: hostname].
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Read every host path under DIR (container with the host's / mounted there).
    #[arg(long, value_name = "DIR")]
    pub host_root: Option<PathBuf>,
}

/// The flags of `kmod-monitor run`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RunFlags {
    #[command(flatten)]
    pub common: CommonFlags,
    /// Address for /status, /healthz and /metrics.
    #[arg(long, value_name = "ADDR", help = with_default("Address for /status, /healthz and /metrics", DEFAULT_LISTEN))]
    pub listen: Option<String>,
    /// Event source (auto = ebpf, else uevent, else poll).
    #[arg(long, value_enum, help = with_default(
        "Event source (auto = ebpf, else uevent, else poll)",
        SourceKind::default(),
    ))]
    pub source: Option<SourceKind>,
    /// Seconds between reconciles against /proc/modules.
    #[arg(long, value_name = "SECS", help = with_default(
        "Seconds between reconciles against /proc/modules",
        DEFAULT_RECONCILE_INTERVAL_SECS,
    ))]
    pub reconcile_interval: Option<u64>,
    /// Seconds between /proc/modules reads for the poll source.
    #[arg(long, value_name = "SECS", help = with_default(
        "Seconds between /proc/modules reads for the poll source",
        DEFAULT_POLL_INTERVAL_SECS,
    ))]
    pub poll_interval: Option<u64>,
    /// eBPF ring buffer size in bytes (a power of two, at least 4096).
    #[arg(long, value_name = "BYTES", help = with_default(
        "eBPF ring buffer size in bytes (a power of two, at least 4096)",
        monitor_common::DEFAULT_RING_BYTES,
    ))]
    pub ring_buffer_size: Option<u32>,
    /// Alertmanager base URL to push alerts to (v2 API); repeatable.
    #[arg(long = "alertmanager", value_name = "URL")]
    pub alertmanager: Vec<String>,
    /// Seconds between re-sends of firing alerts.
    #[arg(long, value_name = "SECS", help = with_default(
        "Seconds between re-sends of firing alerts",
        DEFAULT_ALERT_RESEND_SECS,
    ))]
    pub alert_resend_interval: Option<u64>,
    /// Seconds the cluster may be unreadable before the alert fires.
    #[arg(long, value_name = "SECS", help = with_default(
        "Seconds the cluster may be unreadable before the alert fires",
        DEFAULT_LONGHORN_GRACE_SECS,
    ))]
    pub longhorn_grace: Option<u64>,
    /// Runbook link put on every alert [default: the README's runbook].
    #[arg(long, value_name = "URL")]
    pub runbook_url: Option<String>,
    /// After attaching, also become this user (NAME, UID or UID:GID); the
    /// event log's directory must then be writable by it.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Keep all capabilities after attaching (debugging only; by default
    /// every capability is dropped once the eBPF programs are attached).
    #[arg(long, conflicts_with = "user")]
    pub keep_privileges: bool,
    /// Forensic event log file; "" for none.
    #[arg(long, value_name = "PATH", overrides_with = "no_event_log", help = with_default(
        "Forensic event log file; \"\" for none",
        format_args!("{} when run as root, else none", forensic::DEFAULT_PATH),
    ))]
    pub event_log: Option<PathBuf>,
    /// Write no forensic event log (the last of --event-log/--no-event-log wins).
    #[arg(long, overrides_with = "event_log")]
    pub no_event_log: bool,
    /// When the event log is fsynced.
    #[arg(long, value_enum, help = with_default(
        "When the event log is fsynced",
        "interval, at most once a second",
    ))]
    pub fsync: Option<FsyncPolicy>,
    /// Rotate the event log before it grows past BYTES (at least 4096).
    #[arg(long, value_name = "BYTES", help = with_default(
        "Rotate the event log before it grows past BYTES (at least 4096)",
        forensic::DEFAULT_MAX_BYTES,
    ))]
    pub event_log_max_bytes: Option<u64>,
    /// Rotated event log files kept, events.jsonl.1 to .N (at least 1).
    #[arg(long, value_name = "N", help = with_default(
        "Rotated event log files kept, events.jsonl.1 to .N (at least 1)",
        forensic::DEFAULT_KEEP,
    ))]
    pub event_log_keep: Option<u32>,
    /// Most bytes of event-log records waiting for the disk (queue plus
    /// what is held while writes fail); past it they are counted as dropped.
    #[arg(long, value_name = "BYTES", help = with_default(
        "Most bytes of event-log records waiting for the disk; past it they are counted as dropped",
        forensic::DEFAULT_BUFFER_BYTES,
    ))]
    pub event_log_buffer_bytes: Option<u64>,
    /// TLS and basic auth for /status, /healthz and /metrics: a web config
    /// file in the format Prometheus exporters share (exporter-toolkit).
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,
    /// PEM CA bundle that signs https Alertmanagers [default: the built-in web roots].
    #[arg(long, value_name = "FILE")]
    pub alertmanager_ca_file: Option<PathBuf>,
    /// File holding the bearer token sent to Alertmanager.
    #[arg(long, value_name = "FILE")]
    pub alertmanager_bearer_token_file: Option<PathBuf>,
    /// Basic-auth user name for Alertmanager (with --alertmanager-basic-auth-password-file).
    #[arg(long, value_name = "NAME")]
    pub alertmanager_basic_auth_username: Option<String>,
    /// File holding the basic-auth password for Alertmanager.
    #[arg(long, value_name = "FILE")]
    pub alertmanager_basic_auth_password_file: Option<PathBuf>,
    /// Seconds an Alertmanager request may take, connection included.
    #[arg(long, value_name = "SECS", help = with_default(
        "Seconds an Alertmanager request may take, connection included",
        crate::alerting::DEFAULT_ALERTMANAGER_TIMEOUT_SECS,
    ))]
    pub alertmanager_timeout: Option<u64>,
    /// Write the verdict to this node's Node (a condition and Events) when
    /// running in a cluster.
    #[arg(long, value_enum, help = with_default(
        "Write the verdict to this node's Node (a condition and Events) when running in a cluster",
        ReportMode::default().to_possible_value().map_or_else(String::new, |v| v.get_name().to_owned()),
    ))]
    pub k8s_report: Option<ReportMode>,
    /// Seconds between heartbeat writes of the Node condition (plus up to 10 % jitter).
    #[arg(long, value_name = "SECS", help = with_default(
        "Seconds between heartbeat writes of the Node condition (plus up to 10 % jitter)",
        DEFAULT_K8S_HEARTBEAT_SECS,
    ))]
    pub k8s_heartbeat: Option<u64>,
    /// Keep a kmod-monitor.io/<group>=met|unmet label per requirement group
    /// on this node's Node (needs patch on nodes: the node-labels component).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub k8s_node_labels: Option<bool>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The flags of `kmod-monitor check`.
#[derive(clap::Args, Clone, Debug)]
pub struct CheckFlags {
    #[command(flatten)]
    pub common: CommonFlags,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Load the missing modules now (modprobe) and list the required ones
    /// in /etc/modules-load.d/kmod-monitor.conf so they survive a reboot.
    /// Never touches a file kmod-monitor did not create.
    #[arg(long)]
    pub fix: bool,
    /// With --fix: print what would be done, change nothing.
    #[arg(long, requires = "fix")]
    pub dry_run: bool,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `check --output`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Text,
    Json,
}
