//! The TOML config file: parsed, then validated key by key into
//! [`FileConfig`] with the validators the flags use ([`super::validate`]),
//! so every error names the file, the line (and, for TOML errors, the
//! column) and the key. The settings resolver ([`super::settings`]) merges
//! it with the flags; the groups become [`crate::requirements`].
//!
//! # Format
//! Every key is optional; command-line flags override the daemon settings.
//! ```toml
//! listen = "0.0.0.0:9469"
//! source = "auto"            # auto|ebpf|uevent|poll
//! reconcile_interval = 60    # seconds, > 0
//! poll_interval = 1          # seconds, > 0 (poll source)
//! ring_buffer_size = 262144  # bytes, power of two >= 4096
//! host_root = "/host"        # absolute path
//! v2_data_engine = true      # switches the built-in v2-data-engine group on
//! alertmanager = ["http://alertmanager.monitoring:9093"]  # v2 API push targets
//! alert_resend_interval = 60 # seconds between re-sends of firing alerts, > 0
//! node_name = "node-1"       # the alerts' `instance` label (default: $NODE_NAME, else hostname)
//! runbook_url = "https://wiki.example/kmod-monitor"  # annotation on every alert
//! event_log = "/var/lib/kmod-monitor/events.jsonl"   # absolute; "" = no event log
//! fsync = "interval"         # always|interval (at most once a second)
//! event_log_max_bytes = 67108864  # rotate at this size, >= 4096
//! event_log_keep = 5         # rotated files kept, >= 1
//! longhorn = "auto"          # auto|off: learn V2 enablement from the cluster
//! longhorn_namespace = "longhorn-system"
//! kubeconfig = "/etc/kmod-monitor/kubeconfig"  # absolute; default: in-cluster, $KUBECONFIG, ~/.kube/config
//! longhorn_grace = 300       # seconds the cluster may be unreadable before the alert, > 0
//! v2_hugepages_2mi = 1024    # 2 MiB hugepages V2 needs; 0 = do not check
//! web_config_file = "/etc/kmod-monitor/web.yml"  # TLS and basic auth (exporter-toolkit format)
//! event_log_buffer_bytes = 8388608  # most bytes of records waiting for the disk
//! alertmanager_ca_file = "/etc/kmod-monitor/am-ca.pem"  # CA for https Alertmanagers
//! alertmanager_bearer_token_file = "/etc/kmod-monitor/am-token"  # or basic auth:
//! # alertmanager_basic_auth_username = "kmod"
//! # alertmanager_basic_auth_password_file = "/etc/kmod-monitor/am-password"
//! alertmanager_timeout = 10  # seconds per request, connection included
//! longhorn_version = "1.12"  # whose node requirements apply; default: the cluster's, else the newest known
//! k8s_report = "auto"        # auto|off: the Node condition and Events, in a cluster
//! k8s_heartbeat = 300        # seconds between heartbeat writes of the condition, > 0
//! k8s_node_labels = false    # kmod-monitor.io/<group>=met|unmet labels on the Node
//!
//! [groups.base]              # built-in; may be switched off
//! enabled = false
//!
//! [groups.spdk-driver]       # user group: exactly one of all_of / any_of / available
//! any_of = ["vfio_pci", "uio_pci_generic"]
//! severity = "warning"       # default "critical"; free-form label for alerts
//!
//! [groups.v1-iscsi]          # a cluster without V1 volumes
//! enabled = false
//!
//! [groups.nbd-client]        # loaded on demand: present and not blocked is enough
//! available = ["nbd"]
//! ```
//!
//! # Groups
//! - Built in: `base` = all_of [dm_crypt], enabled unless switched off;
//!   `v2-data-engine` = all_of [vfio_pci, uio_pci_generic, nvme_tcp], enabled
//!   by `v2_data_engine = true`, by `[groups.v2-data-engine] enabled = true`,
//!   by the command-line flag, or by the cluster: see
//!   [`crate::longhorn::enablement`] for the precedence; `v1-iscsi` =
//!   available [iscsi_tcp] and `rwx-nfs-client` = available [nfs, nfsv4],
//!   on at warning severity; `ublk` = all_of [ublk_drv], off. The checks
//!   ([`crate::requirements::BUILTIN_CHECKS`]: `v2-kernel`, `v2-iommu`,
//!   `host-commands`, …) take `enabled` and `severity` the same way.
//! - A built-in group's table accepts only `enabled` and `severity`. Giving
//!   it `all_of` or `any_of` is an error, not an override: a built-in group's
//!   name means the same modules on every node, so alerts and dashboards keyed
//!   on it stay comparable. To require other modules, disable it and define a
//!   group of your own.
//! - A user group needs exactly one of `all_of` (every module must be loaded or
//!   built in), `any_of` (at least one) and `available` (every module loaded,
//!   built in, or loadable and not blocked by modprobe.d or the kernel command
//!   line: for modules a tool loads on demand), with at least one module and
//!   none twice (`nvme-tcp` and `nvme_tcp` are the same module). `enabled`
//!   defaults to true. Group names use `[a-z0-9-]`.
//! - `v2_data_engine = true` together with `[groups.v2-data-engine]
//!   enabled = false` is an error: the file contradicts itself.
//!
//! # Errors
//! Every [`ConfigError`] reads `config file PATH, line N: problem` (with a
//! column for TOML syntax and type errors), and the CLI exits 2 on it.
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::validate;
use crate::forensic::FsyncPolicy;
use crate::names::{ModuleName, NameError};
use crate::requirements::{
    BASE_GROUP, BuiltinGroupSettings, DEFAULT_SEVERITY, GroupMode, GroupSettings, GroupSpec,
    UserGroup, V2_GROUP,
};
use crate::source::SourceKind;

/// The `event_log` key: a file, or `""` for none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventLogPath {
    /// `event_log = ""`: no event log, even as root.
    Off,
    /// `event_log = "/abs/path"`.
    At(PathBuf),
}

/// A validated config file. `None` fields were not given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    /// The file this came from.
    pub origin: PathBuf,
    /// `listen`: address of the HTTP server.
    pub listen: Option<SocketAddr>,
    /// `source`: which event source to use.
    pub source: Option<SourceKind>,
    /// `reconcile_interval`: how often /proc/modules is re-read; > 0.
    pub reconcile_interval: Option<Duration>,
    /// `poll_interval`: the poll source's period; > 0.
    pub poll_interval: Option<Duration>,
    /// `ring_buffer_size`: eBPF ring buffer bytes; a power of two >= 4096.
    pub ring_buffer_size: Option<u32>,
    /// `host_root`: where the host's `/` is mounted; absolute.
    pub host_root: Option<PathBuf>,
    /// `v2_data_engine`: switches the v2-data-engine group on.
    pub v2_data_engine: Option<bool>,
    /// `alertmanager`: base URLs of Alertmanagers to push to (http or https).
    pub alertmanager: Vec<reqwest::Url>,
    /// `alert_resend_interval`: re-send period of firing alerts; > 0.
    pub alert_resend_interval: Option<Duration>,
    /// `node_name`: the alerts' `instance` label.
    pub node_name: Option<String>,
    /// `runbook_url`: the alerts' `runbook_url` annotation.
    pub runbook_url: Option<String>,
    /// `event_log`: the forensic event log's file, or off.
    pub event_log: Option<EventLogPath>,
    /// `fsync`: when the event log is fsynced.
    pub fsync: Option<FsyncPolicy>,
    /// `event_log_max_bytes`: rotate at this size; >= 4096.
    pub event_log_max_bytes: Option<u64>,
    /// `event_log_keep`: rotated files kept; >= 1.
    pub event_log_keep: Option<u32>,
    /// `longhorn`: watch the cluster for V2 enablement (`auto`) or not.
    pub longhorn: Option<crate::longhorn::LonghornMode>,
    /// `longhorn_namespace`: where Longhorn's settings live.
    pub longhorn_namespace: Option<String>,
    /// `kubeconfig`: the kubeconfig file to use instead of inferring one.
    pub kubeconfig: Option<PathBuf>,
    /// `longhorn_grace`: how long the cluster may be unreadable before the
    /// alert fires; > 0.
    pub longhorn_grace: Option<Duration>,
    /// `v2_hugepages_2mi`: 2 MiB hugepages V2 needs; 0 = do not check.
    pub v2_hugepages_2mi: Option<u64>,
    /// `web_config_file`: TLS and basic auth for the HTTP listener, in the
    /// exporter-toolkit format; absolute.
    pub web_config_file: Option<PathBuf>,
    /// `event_log_buffer_bytes`: most bytes of records waiting for the disk.
    pub event_log_buffer_bytes: Option<u64>,
    /// `alertmanager_ca_file`: PEM CA bundle for https Alertmanagers.
    pub alertmanager_ca_file: Option<PathBuf>,
    /// `alertmanager_bearer_token_file`: the bearer token's file.
    pub alertmanager_bearer_token_file: Option<PathBuf>,
    /// `alertmanager_basic_auth_username`.
    pub alertmanager_basic_auth_username: Option<String>,
    /// `alertmanager_basic_auth_password_file`: the password's file.
    pub alertmanager_basic_auth_password_file: Option<PathBuf>,
    /// `alertmanager_timeout`: per-request timeout, connection included.
    pub alertmanager_timeout: Option<Duration>,
    /// `longhorn_version`: whose requirements apply.
    pub longhorn_version: Option<crate::requirements::LonghornVersion>,
    /// `k8s_report`: write the Node condition and Events (`auto`) or not.
    pub k8s_report: Option<crate::k8s::ReportMode>,
    /// `k8s_heartbeat`: least time between heartbeat writes; > 0.
    pub k8s_heartbeat: Option<Duration>,
    /// `k8s_node_labels`: keep one label per requirement group on the Node.
    pub k8s_node_labels: Option<bool>,
    /// `[groups.*]`: the built-in groups' switches and the user's groups.
    pub groups: GroupSettings,
}

/// What is wrong with a config file, without the file and line (see
/// [`ConfigError`]).
#[derive(Debug, thiserror::Error)]
pub enum ConfigProblem {
    /// The file could not be read.
    #[error("cannot read it: {error}")]
    Read {
        /// The OS error.
        error: io::Error,
    },
    /// TOML syntax error, unknown key, duplicate key or wrong value type.
    #[error("{message}")]
    Toml {
        /// The TOML parser's description.
        message: String,
    },
    /// A module name in a group is not a valid module name.
    #[error("module name {:?} in group {group:?} {}", .error.input, .error.problem)]
    ModuleName {
        /// The group.
        group: String,
        /// What is wrong with the name.
        error: NameError,
    },
    /// `all_of = []` or `any_of = []`.
    #[error("group {group:?}: {key} is empty (list at least one module)")]
    EmptyGroup {
        /// The group.
        group: String,
        /// `all_of` or `any_of`.
        key: &'static str,
    },
    /// A user group gives more than one of `all_of`, `any_of` and
    /// `available`.
    #[error("group {group:?} sets more than one of all_of, any_of and available (set exactly one)")]
    BothModes {
        /// The group.
        group: String,
    },
    /// A user group gives none of `all_of`, `any_of` and `available`.
    #[error("group {group:?} sets none of all_of, any_of and available (set exactly one)")]
    NoMode {
        /// The group.
        group: String,
    },
    /// A group name outside `[a-z0-9-]+`.
    #[error("group name {group:?} {problem} (allowed: lower-case letters, digits and '-')")]
    GroupName {
        /// The name as written.
        group: String,
        /// `is empty` or `contains 'X'`.
        problem: String,
    },
    /// A module listed twice in one group (after `-`/`_` normalisation).
    #[error(
        "group {group:?} lists module {module} twice (first on line {first_line}; '-' and '_' \
         are the same)"
    )]
    DuplicateModule {
        /// The group.
        group: String,
        /// The normalised module name.
        module: ModuleName,
        /// Line of the first mention.
        first_line: usize,
    },
    /// A built-in group's table redefines its modules.
    #[error(
        "group {group:?} is built in: it accepts only enabled and severity, not {key} (to \
         require other modules, disable it and define a group of your own)"
    )]
    BuiltinModules {
        /// The built-in group.
        group: String,
        /// `all_of` or `any_of`.
        key: &'static str,
    },
    /// An empty severity, or one with control characters.
    #[error("severity {severity:?} of group {group:?} must be non-empty text on one line")]
    Severity {
        /// The group.
        group: String,
        /// The value as written.
        severity: String,
    },
    /// A key's value that its validator ([`super::validate`]) rejects; the
    /// problem is worded as for the matching flag.
    #[error("{key} = {value}: {problem}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// The value as written (strings quoted).
        value: Box<str>,
        /// What is wrong with it.
        problem: Box<str>,
    },
    /// `v2_data_engine = true` and `[groups.v2-data-engine] enabled = false`.
    #[error("[groups.{V2_GROUP}] enabled = false contradicts v2_data_engine = true")]
    V2Conflict,
}

/// A config file that cannot be used: the file, where in it, and why.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The config file.
    pub path: PathBuf,
    /// 1-based line, where the problem has one.
    pub line: Option<usize>,
    /// 1-based column (in characters), for TOML syntax and type errors.
    pub column: Option<usize>,
    /// What is wrong.
    pub problem: ConfigProblem,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            path,
            line,
            column,
            problem,
        } = self;
        write!(f, "config file {}", path.display())?;
        if let Some(line) = line {
            write!(f, ", line {line}")?;
            if let Some(column) = column {
                write!(f, ", column {column}")?;
            }
        }
        write!(f, ": {problem}")
    }
}

/// Reads and validates the config file at `path`.
///
/// # Errors
/// [`ConfigError`] naming `path` if it cannot be read or is invalid.
pub fn load_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
        path: path.to_path_buf(),
        line: None,
        column: None,
        problem: ConfigProblem::Read { error },
    })?;
    parse_config(&text, path)
}

/// Validates config text read from `origin` (named in errors).
///
/// # Errors
/// [`ConfigError`] naming `origin`, the line and the problem.
pub fn parse_config(text: &str, origin: &Path) -> Result<FileConfig, ConfigError> {
    let located = Locator { text, origin };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let span = e.span();
        let (line, column) = span
            .as_ref()
            .map(|span| located.line_column(span.start))
            .unzip();
        let mut message = e.message().trim_end().to_owned();
        // toml says only "duplicate key"; its span is the key.
        if message == "duplicate key"
            && let Some(key) = span.and_then(|s| text.get(s))
        {
            message = format!("duplicate key `{key}`");
        }
        ConfigError {
            path: origin.to_path_buf(),
            line,
            column,
            problem: ConfigProblem::Toml { message },
        }
    })?;
    located.validate(raw)
}

impl FileConfig {
    /// What the file says about the V2 data engine: `v2_data_engine` or
    /// `[groups.v2-data-engine] enabled` (validation rejects a
    /// contradiction).
    #[must_use]
    pub fn v2_switch(&self) -> Option<bool> {
        self.v2_data_engine.or(self.groups.v2.enabled)
    }

    /// The keys whose value differs between `old` and `new` (a missing
    /// file sets no key), named as in the file; `groups` stands for every
    /// `[groups.*]` table.
    #[must_use]
    pub fn changed_keys(old: Option<&Self>, new: Option<&Self>) -> Vec<&'static str> {
        let none = Self::default();
        let Self {
            origin: _,
            listen,
            source,
            reconcile_interval,
            poll_interval,
            ring_buffer_size,
            host_root,
            v2_data_engine,
            alertmanager,
            alert_resend_interval,
            node_name,
            runbook_url,
            event_log,
            fsync,
            event_log_max_bytes,
            event_log_keep,
            longhorn,
            longhorn_namespace,
            kubeconfig,
            longhorn_grace,
            v2_hugepages_2mi,
            web_config_file,
            event_log_buffer_bytes,
            alertmanager_ca_file,
            alertmanager_bearer_token_file,
            alertmanager_basic_auth_username,
            alertmanager_basic_auth_password_file,
            alertmanager_timeout,
            longhorn_version,
            k8s_report,
            k8s_heartbeat,
            k8s_node_labels,
            groups,
        } = old.unwrap_or(&none);
        let new = new.unwrap_or(&none);
        [
            ("listen", *listen != new.listen),
            ("source", *source != new.source),
            (
                "reconcile_interval",
                *reconcile_interval != new.reconcile_interval,
            ),
            ("poll_interval", *poll_interval != new.poll_interval),
            (
                "ring_buffer_size",
                *ring_buffer_size != new.ring_buffer_size,
            ),
            ("host_root", *host_root != new.host_root),
            ("v2_data_engine", *v2_data_engine != new.v2_data_engine),
            ("alertmanager", *alertmanager != new.alertmanager),
            (
                "alert_resend_interval",
                *alert_resend_interval != new.alert_resend_interval,
            ),
            ("node_name", *node_name != new.node_name),
            ("runbook_url", *runbook_url != new.runbook_url),
            ("event_log", *event_log != new.event_log),
            ("fsync", *fsync != new.fsync),
            (
                "event_log_max_bytes",
                *event_log_max_bytes != new.event_log_max_bytes,
            ),
            ("event_log_keep", *event_log_keep != new.event_log_keep),
            ("longhorn", *longhorn != new.longhorn),
            (
                "longhorn_namespace",
                *longhorn_namespace != new.longhorn_namespace,
            ),
            ("kubeconfig", *kubeconfig != new.kubeconfig),
            ("longhorn_grace", *longhorn_grace != new.longhorn_grace),
            (
                "v2_hugepages_2mi",
                *v2_hugepages_2mi != new.v2_hugepages_2mi,
            ),
            ("web_config_file", *web_config_file != new.web_config_file),
            (
                "event_log_buffer_bytes",
                *event_log_buffer_bytes != new.event_log_buffer_bytes,
            ),
            (
                "alertmanager_ca_file",
                *alertmanager_ca_file != new.alertmanager_ca_file,
            ),
            (
                "alertmanager_bearer_token_file",
                *alertmanager_bearer_token_file != new.alertmanager_bearer_token_file,
            ),
            (
                "alertmanager_basic_auth_username",
                *alertmanager_basic_auth_username != new.alertmanager_basic_auth_username,
            ),
            (
                "alertmanager_basic_auth_password_file",
                *alertmanager_basic_auth_password_file != new.alertmanager_basic_auth_password_file,
            ),
            (
                "alertmanager_timeout",
                *alertmanager_timeout != new.alertmanager_timeout,
            ),
            (
                "longhorn_version",
                *longhorn_version != new.longhorn_version,
            ),
            ("k8s_report", *k8s_report != new.k8s_report),
            ("k8s_heartbeat", *k8s_heartbeat != new.k8s_heartbeat),
            ("k8s_node_labels", *k8s_node_labels != new.k8s_node_labels),
            ("groups", *groups != new.groups),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }
}

/// The file as TOML gives it, with spans for line numbers.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    listen: Option<Spanned<String>>,
    source: Option<SourceKind>,
    reconcile_interval: Option<Spanned<u64>>,
    poll_interval: Option<Spanned<u64>>,
    ring_buffer_size: Option<Spanned<u32>>,
    host_root: Option<Spanned<String>>,
    v2_data_engine: Option<bool>,
    #[serde(default)]
    alertmanager: Vec<Spanned<String>>,
    alert_resend_interval: Option<Spanned<u64>>,
    node_name: Option<Spanned<String>>,
    runbook_url: Option<Spanned<String>>,
    event_log: Option<Spanned<String>>,
    fsync: Option<FsyncPolicy>,
    event_log_max_bytes: Option<Spanned<u64>>,
    event_log_keep: Option<Spanned<u32>>,
    longhorn: Option<crate::longhorn::LonghornMode>,
    longhorn_namespace: Option<Spanned<String>>,
    kubeconfig: Option<Spanned<String>>,
    longhorn_grace: Option<Spanned<u64>>,
    v2_hugepages_2mi: Option<Spanned<u64>>,
    web_config_file: Option<Spanned<String>>,
    event_log_buffer_bytes: Option<Spanned<u64>>,
    alertmanager_ca_file: Option<Spanned<String>>,
    alertmanager_bearer_token_file: Option<Spanned<String>>,
    alertmanager_basic_auth_username: Option<Spanned<String>>,
    alertmanager_basic_auth_password_file: Option<Spanned<String>>,
    alertmanager_timeout: Option<Spanned<u64>>,
    longhorn_version: Option<Spanned<String>>,
    k8s_report: Option<crate::k8s::ReportMode>,
    k8s_heartbeat: Option<Spanned<u64>>,
    k8s_node_labels: Option<bool>,
    #[serde(default)]
    groups: BTreeMap<Spanned<String>, RawGroup>,
}

/// A list of module names with the place of each in the file.
type ModuleList = Spanned<Vec<Spanned<String>>>;

/// One `[groups.NAME]` table as TOML gives it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    enabled: Option<Spanned<bool>>,
    all_of: Option<ModuleList>,
    any_of: Option<ModuleList>,
    available: Option<ModuleList>,
    severity: Option<Spanned<String>>,
}

/// Turns byte spans of one file into line numbers and errors.
struct Locator<'a> {
    text: &'a str,
    origin: &'a Path,
}

impl Locator<'_> {
    /// 1-based line and column (in characters) of byte `offset`.
    fn line_column(&self, offset: usize) -> (usize, usize) {
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        (line, column)
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.line_column(span.start).0
    }

    fn error(&self, span: &Range<usize>, problem: ConfigProblem) -> ConfigError {
        ConfigError {
            path: self.origin.to_path_buf(),
            line: Some(self.line(span)),
            column: None,
            problem,
        }
    }

    fn validate(&self, raw: RawFile) -> Result<FileConfig, ConfigError> {
        let RawFile {
            listen,
            source,
            reconcile_interval,
            poll_interval,
            ring_buffer_size,
            host_root,
            v2_data_engine,
            alertmanager,
            alert_resend_interval,
            node_name,
            runbook_url,
            event_log,
            fsync,
            event_log_max_bytes,
            event_log_keep,
            longhorn,
            longhorn_namespace,
            kubeconfig,
            longhorn_grace,
            v2_hugepages_2mi,
            web_config_file,
            event_log_buffer_bytes,
            alertmanager_ca_file,
            alertmanager_bearer_token_file,
            alertmanager_basic_auth_username,
            alertmanager_basic_auth_password_file,
            alertmanager_timeout,
            longhorn_version,
            k8s_report,
            k8s_heartbeat,
            k8s_node_labels,
            groups: raw_groups,
        } = raw;
        let longhorn_namespace = self.check_text(
            longhorn_namespace,
            "longhorn_namespace",
            validate::namespace,
        )?;
        let kubeconfig = self.check_path(kubeconfig, "kubeconfig")?;
        let longhorn_grace =
            self.check(longhorn_grace, "longhorn_grace", validate::longhorn_grace)?;
        let event_log = event_log
            .map(|value| {
                if value.get_ref().is_empty() {
                    return Ok(EventLogPath::Off);
                }
                self.check_str(&value, "event_log", |text| {
                    validate::absolute_path(Path::new(text))
                        .map_err(|p| format!("{p} (or \"\" for no event log)"))
                })
                .map(EventLogPath::At)
            })
            .transpose()?;
        let event_log_max_bytes = self.check(
            event_log_max_bytes,
            "event_log_max_bytes",
            validate::event_log_max_bytes,
        )?;
        let event_log_keep =
            self.check(event_log_keep, "event_log_keep", validate::event_log_keep)?;
        let alertmanager = alertmanager
            .into_iter()
            .map(|value| {
                // The value is shown without user info: a refused URL with
                // credentials must not print them.
                validate::alertmanager_url(value.get_ref()).map_err(|problem| {
                    self.error(
                        &value.span(),
                        ConfigProblem::Invalid {
                            key: "alertmanager",
                            value: format!(
                                "{:?}",
                                crate::alerting::redact_userinfo(value.get_ref())
                            )
                            .into(),
                            problem: problem.into(),
                        },
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let alert_resend_interval = self.check(
            alert_resend_interval,
            "alert_resend_interval",
            validate::alert_resend_interval,
        )?;
        let node_name = self.check_text(node_name, "node_name", validate::one_line)?;
        let runbook_url = self.check_text(runbook_url, "runbook_url", validate::one_line)?;
        let listen = self.check_text(listen, "listen", validate::listen)?;
        let reconcile_interval = self.check(
            reconcile_interval,
            "reconcile_interval",
            validate::reconcile_interval,
        )?;
        let poll_interval = self.check(poll_interval, "poll_interval", validate::poll_interval)?;
        let ring_buffer_size = self.check(
            ring_buffer_size,
            "ring_buffer_size",
            validate::ring_buffer_size,
        )?;
        let host_root = self.check_path(host_root, "host_root")?;
        let v2_hugepages_2mi = self.check(
            v2_hugepages_2mi,
            "v2_hugepages_2mi",
            validate::v2_hugepages_2mi,
        )?;
        let web_config_file = self.check_path(web_config_file, "web_config_file")?;
        let event_log_buffer_bytes = self.check(
            event_log_buffer_bytes,
            "event_log_buffer_bytes",
            validate::event_log_buffer_bytes,
        )?;
        let alertmanager_ca_file = self.check_path(alertmanager_ca_file, "alertmanager_ca_file")?;
        let alertmanager_bearer_token_file = self.check_path(
            alertmanager_bearer_token_file,
            "alertmanager_bearer_token_file",
        )?;
        let alertmanager_basic_auth_username = self.check_text(
            alertmanager_basic_auth_username,
            "alertmanager_basic_auth_username",
            validate::one_line,
        )?;
        let alertmanager_basic_auth_password_file = self.check_path(
            alertmanager_basic_auth_password_file,
            "alertmanager_basic_auth_password_file",
        )?;
        let alertmanager_timeout = self.check(
            alertmanager_timeout,
            "alertmanager_timeout",
            validate::alertmanager_timeout,
        )?;
        let longhorn_version = self.check_text(
            longhorn_version,
            "longhorn_version",
            validate::longhorn_version,
        )?;
        let k8s_heartbeat = self.check(k8s_heartbeat, "k8s_heartbeat", validate::k8s_heartbeat)?;

        let mut base_group = BuiltinGroupSettings::default();
        let mut v2_group = BuiltinGroupSettings::default();
        let mut v2_enabled_span = None;
        let mut builtin = BTreeMap::new();
        let mut groups = Vec::new();
        for (name, group) in raw_groups {
            self.check_group_name(&name)?;
            match name.get_ref().as_str() {
                BASE_GROUP => base_group = self.builtin_settings(BASE_GROUP, group)?,
                V2_GROUP => {
                    v2_enabled_span = group.enabled.as_ref().map(Spanned::span);
                    v2_group = self.builtin_settings(V2_GROUP, group)?;
                }
                other if crate::requirements::is_builtin(other) => {
                    let settings = self.builtin_settings(other, group)?;
                    builtin.insert(other.to_owned(), settings);
                }
                _ => groups.push(self.user_group(&name, group)?),
            }
        }
        if let (Some(true), Some(false), Some(span)) =
            (v2_data_engine, v2_group.enabled, v2_enabled_span)
        {
            return Err(self.error(&span, ConfigProblem::V2Conflict));
        }

        Ok(FileConfig {
            origin: self.origin.to_path_buf(),
            listen,
            source,
            reconcile_interval,
            poll_interval,
            ring_buffer_size,
            host_root,
            v2_data_engine,
            alertmanager,
            alert_resend_interval,
            node_name,
            runbook_url,
            event_log,
            fsync,
            event_log_max_bytes,
            event_log_keep,
            longhorn,
            longhorn_namespace,
            kubeconfig,
            longhorn_grace,
            v2_hugepages_2mi,
            web_config_file,
            event_log_buffer_bytes,
            alertmanager_ca_file,
            alertmanager_bearer_token_file,
            alertmanager_basic_auth_username,
            alertmanager_basic_auth_password_file,
            alertmanager_timeout,
            longhorn_version,
            k8s_report,
            k8s_heartbeat,
            k8s_node_labels,
            groups: GroupSettings {
                base: base_group,
                v2: v2_group,
                builtin,
                user: groups,
            },
        })
    }

    /// Runs a number's validator; an error carries the key and the line.
    fn check<T, U, E>(
        &self,
        value: Option<Spanned<T>>,
        key: &'static str,
        validator: impl Fn(T) -> Result<U, E>,
    ) -> Result<Option<U>, ConfigError>
    where
        T: Copy + fmt::Display,
        E: fmt::Display,
    {
        let Some(value) = value else { return Ok(None) };
        let raw = *value.get_ref();
        validator(raw).map(Some).map_err(|problem| {
            self.error(
                &value.span(),
                ConfigProblem::Invalid {
                    key,
                    value: raw.to_string().into(),
                    problem: problem.to_string().into(),
                },
            )
        })
    }

    /// Runs a string's validator; an error carries the key, the quoted
    /// value and the line.
    fn check_str<U>(
        &self,
        value: &Spanned<String>,
        key: &'static str,
        validator: impl Fn(&str) -> Result<U, String>,
    ) -> Result<U, ConfigError> {
        validator(value.get_ref()).map_err(|problem| {
            self.error(
                &value.span(),
                ConfigProblem::Invalid {
                    key,
                    value: format!("{:?}", value.get_ref()).into(),
                    problem: problem.into(),
                },
            )
        })
    }

    /// [`Self::check_str`] for a key that may be absent.
    fn check_text<U>(
        &self,
        value: Option<Spanned<String>>,
        key: &'static str,
        validator: impl Fn(&str) -> Result<U, String>,
    ) -> Result<Option<U>, ConfigError> {
        value
            .map(|v| self.check_str(&v, key, validator))
            .transpose()
    }

    /// An absolute path key.
    fn check_path(
        &self,
        value: Option<Spanned<String>>,
        key: &'static str,
    ) -> Result<Option<PathBuf>, ConfigError> {
        self.check_text(value, key, |text| validate::absolute_path(Path::new(text)))
    }

    fn check_group_name(&self, name: &Spanned<String>) -> Result<(), ConfigError> {
        let group = name.get_ref();
        let problem = if group.is_empty() {
            "is empty".to_owned()
        } else if let Some(ch) = group
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            format!("contains {ch:?}")
        } else {
            return Ok(());
        };
        Err(self.error(
            &name.span(),
            ConfigProblem::GroupName {
                group: group.clone(),
                problem,
            },
        ))
    }

    fn severity(
        &self,
        group: &str,
        severity: Option<Spanned<String>>,
    ) -> Result<Option<String>, ConfigError> {
        let Some(severity) = severity else {
            return Ok(None);
        };
        let text = severity.get_ref();
        if text.trim().is_empty() || text.chars().any(char::is_control) {
            return Err(self.error(
                &severity.span(),
                ConfigProblem::Severity {
                    group: group.to_owned(),
                    severity: text.clone(),
                },
            ));
        }
        Ok(Some(severity.into_inner()))
    }

    fn builtin_settings(
        &self,
        group: &str,
        raw: RawGroup,
    ) -> Result<BuiltinGroupSettings, ConfigError> {
        let RawGroup {
            enabled,
            all_of,
            any_of,
            available,
            severity,
        } = raw;
        for (key, list) in [
            ("all_of", all_of),
            ("any_of", any_of),
            ("available", available),
        ] {
            if let Some(list) = list {
                return Err(self.error(
                    &list.span(),
                    ConfigProblem::BuiltinModules {
                        group: group.to_owned(),
                        key,
                    },
                ));
            }
        }
        Ok(BuiltinGroupSettings {
            enabled: enabled.map(Spanned::into_inner),
            severity: self.severity(group, severity)?,
        })
    }

    fn user_group(&self, name: &Spanned<String>, raw: RawGroup) -> Result<UserGroup, ConfigError> {
        let group = name.get_ref();
        let RawGroup {
            enabled,
            all_of,
            any_of,
            available,
            severity,
        } = raw;
        let mut given: Vec<(GroupMode, &'static str, ModuleList)> = [
            (GroupMode::AllOf, "all_of", all_of),
            (GroupMode::AnyOf, "any_of", any_of),
            (GroupMode::Available, "available", available),
        ]
        .into_iter()
        .filter_map(|(mode, key, list)| list.map(|l| (mode, key, l)))
        .collect();
        // The error points at the later of two keys, as TOML reads them.
        given.sort_by_key(|(_, _, list)| list.span().start);
        let (mode, key, list) = match given.len() {
            1 => given.remove(0),
            0 => {
                return Err(self.error(
                    &name.span(),
                    ConfigProblem::NoMode {
                        group: group.clone(),
                    },
                ));
            }
            _ => {
                return Err(self.error(
                    &given[1].2.span(),
                    ConfigProblem::BothModes {
                        group: group.clone(),
                    },
                ));
            }
        };
        let list_span = list.span();
        let entries = list.into_inner();
        if entries.is_empty() {
            return Err(self.error(
                &list_span,
                ConfigProblem::EmptyGroup {
                    group: group.clone(),
                    key,
                },
            ));
        }
        let mut first_lines: HashMap<ModuleName, usize> = HashMap::new();
        let mut modules = Vec::with_capacity(entries.len());
        for entry in entries {
            let span = entry.span();
            let module = ModuleName::parse(entry.get_ref()).map_err(|error| {
                self.error(
                    &span,
                    ConfigProblem::ModuleName {
                        group: group.clone(),
                        error,
                    },
                )
            })?;
            if let Some(&first_line) = first_lines.get(&module) {
                return Err(self.error(
                    &span,
                    ConfigProblem::DuplicateModule {
                        group: group.clone(),
                        module,
                        first_line,
                    },
                ));
            }
            first_lines.insert(module.clone(), self.line(&span));
            modules.push(module);
        }
        let severity = self
            .severity(group, severity)?
            .unwrap_or_else(|| DEFAULT_SEVERITY.to_owned());
        Ok(UserGroup {
            spec: GroupSpec {
                name: group.clone(),
                mode,
                modules,
                severity,
                builtin: false,
            },
            enabled: enabled.is_none_or(Spanned::into_inner),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "/etc/kmod-monitor/config.toml";

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        parse_config(text, Path::new(ORIGIN))
    }

    /// Parses `text`, expecting an error; checks it names the file and line.
    fn error_at(text: &str, line: usize) -> ConfigError {
        let err = parse(text).expect_err("config should be rejected");
        assert_eq!(err.line, Some(line), "wrong line in: {err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("config file {ORIGIN}, line {line}")),
            "{msg}"
        );
        err
    }

    use crate::testing::name;

    /// The groups the file enables, given the V2 decision.
    fn resolve_groups(file: Option<&FileConfig>, v2_on: bool) -> Vec<GroupSpec> {
        crate::requirements::resolve(&file.map(|f| f.groups.clone()).unwrap_or_default(), v2_on)
    }

    fn group_names(groups: &[GroupSpec]) -> Vec<&str> {
        groups.iter().map(|g| g.name.as_str()).collect()
    }

    const FULL: &str = r#"# optional daemon settings (CLI flags override them)
listen = "0.0.0.0:9469"
source = "auto"            # auto|ebpf|uevent|poll
reconcile_interval = 60    # seconds, > 0
poll_interval = 1          # seconds, > 0 (poll source)
ring_buffer_size = 262144  # bytes, power of two >= 4096
host_root = "/host"
v2_data_engine = true      # switches the built-in v2-data-engine group on
alertmanager = ["http://alertmanager.monitoring:9093"]
alert_resend_interval = 60
node_name = "node-1"
runbook_url = "https://wiki.example/kmod-monitor"
event_log = "/var/lib/kmod-monitor/events.jsonl"
fsync = "interval"
event_log_max_bytes = 67108864
event_log_keep = 5
longhorn = "auto"          # auto|off: learn V2 enablement from the cluster
longhorn_namespace = "longhorn-system"
kubeconfig = "/etc/kmod-monitor/kubeconfig"  # absolute; default: in-cluster, $KUBECONFIG, ~/.kube/config
longhorn_grace = 300       # seconds the cluster may be unreadable before the alert, > 0
v2_hugepages_2mi = 1024    # 2 MiB hugepages V2 needs; 0 = do not check
web_config_file = "/etc/kmod-monitor/web.yml"  # TLS and basic auth (exporter-toolkit format)
event_log_buffer_bytes = 8388608  # most bytes of records waiting for the disk
alertmanager_ca_file = "/etc/kmod-monitor/am-ca.pem"  # CA for https Alertmanagers
alertmanager_bearer_token_file = "/etc/kmod-monitor/am-token"  # or basic auth:
# alertmanager_basic_auth_username = "kmod"
# alertmanager_basic_auth_password_file = "/etc/kmod-monitor/am-password"
alertmanager_timeout = 10  # seconds per request, connection included
longhorn_version = "1.12"  # whose node requirements apply; default: the cluster's, else the newest known
k8s_report = "auto"        # auto|off: the Node condition and Events, in a cluster
k8s_heartbeat = 300        # seconds between heartbeat writes of the condition, > 0
k8s_node_labels = false    # kmod-monitor.io/<group>=met|unmet labels on the Node

[groups.base]              # built-in; may be switched off
enabled = false

[groups.spdk-driver]       # user group: exactly one of all_of / any_of
any_of = ["vfio_pci", "uio_pci_generic"]
severity = "warning"       # default "critical"; free-form label for alerts
"#;

    #[test]
    fn alertmanager_urls_are_checked() {
        for (value, problem) in [
            ("http://user:secret@am:9093", "must not carry credentials"),
            ("ftp://am", "scheme \"ftp\" is not http"),
            ("am:9093", "scheme \"am\" is not http"),
            ("http://am:9093/?x=1", "must not have a query"),
            ("not a url", "not a URL"),
        ] {
            let err = error_at(
                &format!("\n\nalertmanager = [\"http://ok:9093\", {value:?}]\n"),
                3,
            );
            assert!(err.to_string().contains(problem), "{value}: {err}");
        }
        let err = error_at("node_name = \"  \"\n", 1);
        assert!(err.to_string().contains("node_name"), "{err}");
    }

    #[test]
    fn documented_example_parses() {
        let c = parse(FULL).unwrap();
        let FileConfig {
            origin,
            listen,
            source,
            reconcile_interval,
            poll_interval,
            ring_buffer_size,
            host_root,
            v2_data_engine,
            alertmanager,
            alert_resend_interval,
            node_name,
            runbook_url,
            event_log,
            fsync,
            event_log_max_bytes,
            event_log_keep,
            longhorn,
            longhorn_namespace,
            kubeconfig,
            longhorn_grace,
            v2_hugepages_2mi,
            web_config_file,
            event_log_buffer_bytes,
            alertmanager_ca_file,
            alertmanager_bearer_token_file,
            alertmanager_basic_auth_username,
            alertmanager_basic_auth_password_file,
            alertmanager_timeout,
            longhorn_version,
            k8s_report,
            k8s_heartbeat,
            k8s_node_labels,
            groups:
                GroupSettings {
                    base: base_group,
                    v2: v2_group,
                    builtin: _,
                    user: groups,
                },
        } = c.clone();
        assert_eq!(longhorn, Some(crate::longhorn::LonghornMode::Auto));
        assert_eq!(longhorn_namespace.as_deref(), Some("longhorn-system"));
        assert_eq!(
            kubeconfig,
            Some(PathBuf::from("/etc/kmod-monitor/kubeconfig"))
        );
        assert_eq!(longhorn_grace, Some(Duration::from_secs(300)));
        assert_eq!(v2_hugepages_2mi, Some(1024));
        assert_eq!(
            web_config_file,
            Some(PathBuf::from("/etc/kmod-monitor/web.yml"))
        );
        assert_eq!(event_log_buffer_bytes, Some(8 * 1024 * 1024));
        assert_eq!(
            alertmanager_ca_file,
            Some(PathBuf::from("/etc/kmod-monitor/am-ca.pem"))
        );
        assert_eq!(
            alertmanager_bearer_token_file,
            Some(PathBuf::from("/etc/kmod-monitor/am-token"))
        );
        assert_eq!(alertmanager_basic_auth_username, None);
        assert_eq!(alertmanager_basic_auth_password_file, None);
        assert_eq!(alertmanager_timeout, Some(Duration::from_secs(10)));
        assert_eq!(k8s_report, Some(crate::k8s::ReportMode::Auto));
        assert_eq!(k8s_heartbeat, Some(Duration::from_secs(300)));
        assert_eq!(k8s_node_labels, Some(false));
        assert_eq!(
            longhorn_version,
            Some(crate::requirements::LonghornVersion::new(1, 12))
        );
        assert_eq!(
            event_log,
            Some(EventLogPath::At(PathBuf::from(
                "/var/lib/kmod-monitor/events.jsonl"
            )))
        );
        assert_eq!(fsync, Some(FsyncPolicy::Interval));
        assert_eq!(event_log_max_bytes, Some(64 * 1024 * 1024));
        assert_eq!(event_log_keep, Some(5));
        assert_eq!(
            alertmanager,
            vec![reqwest::Url::parse("http://alertmanager.monitoring:9093").unwrap()]
        );
        assert_eq!(alert_resend_interval, Some(Duration::from_secs(60)));
        assert_eq!(node_name.as_deref(), Some("node-1"));
        assert_eq!(
            runbook_url.as_deref(),
            Some("https://wiki.example/kmod-monitor")
        );
        assert_eq!(origin, Path::new(ORIGIN));
        assert_eq!(listen, Some("0.0.0.0:9469".parse().unwrap()));
        assert_eq!(source, Some(SourceKind::Auto));
        assert_eq!(reconcile_interval, Some(Duration::from_secs(60)));
        assert_eq!(poll_interval, Some(Duration::from_secs(1)));
        assert_eq!(ring_buffer_size, Some(262_144));
        assert_eq!(host_root, Some(PathBuf::from("/host")));
        assert_eq!(v2_data_engine, Some(true));
        assert_eq!(
            base_group,
            BuiltinGroupSettings {
                enabled: Some(false),
                severity: None
            }
        );
        assert_eq!(v2_group, BuiltinGroupSettings::default());
        assert_eq!(
            groups,
            [UserGroup {
                spec: GroupSpec {
                    name: "spdk-driver".to_owned(),
                    mode: GroupMode::AnyOf,
                    modules: vec![name("vfio_pci"), name("uio_pci_generic")],
                    severity: "warning".to_owned(),
                    builtin: false,
                },
                enabled: true,
            }]
        );
        // base off, v2 on by the file, then the any_of group.
        assert_eq!(c.v2_switch(), Some(true));
        let resolved = resolve_groups(Some(&c), true);
        assert_eq!(
            group_names(&resolved),
            [
                "v2-data-engine",
                "v1-iscsi",
                "rwx-nfs-client",
                "spdk-driver"
            ]
        );
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(
            parse("").unwrap(),
            FileConfig {
                origin: PathBuf::from(ORIGIN),
                ..FileConfig::default()
            }
        );
    }

    #[test]
    fn every_source_kind() {
        for (text, kind) in [
            ("auto", SourceKind::Auto),
            ("ebpf", SourceKind::Ebpf),
            ("uevent", SourceKind::Uevent),
            ("poll", SourceKind::Poll),
        ] {
            let c = parse(&format!("source = \"{text}\"")).unwrap();
            assert_eq!(c.source, Some(kind));
            assert_eq!(kind.to_string(), text);
            assert_eq!(
                <SourceKind as clap::ValueEnum>::from_str(text, false),
                Ok(kind)
            );
        }
        let err = error_at("\n\nsource = \"bpf\"\n", 3);
        assert!(err.to_string().contains("unknown variant `bpf`"), "{err}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = error_at("listen = \"127.0.0.1:1\"\nlisten_addr = \"x\"\n", 2);
        let msg = err.to_string();
        assert!(msg.contains("unknown field `listen_addr`"), "{msg}");
        assert_eq!(err.column, Some(1));

        let err = error_at("[groups.x]\nall_of = [\"a\"]\nseverty = \"low\"\n", 3);
        assert!(err.to_string().contains("unknown field `severty`"), "{err}");
    }

    #[test]
    fn syntax_and_type_errors_have_line_and_column() {
        let err = error_at("listen = \"127.0.0.1:1\"\nsource = \n", 2);
        assert!(err.column.is_some(), "{err}");
        assert!(matches!(err.problem, ConfigProblem::Toml { .. }), "{err}");

        let err = error_at("reconcile_interval = \"60s\"\n", 1);
        assert_eq!(err.column, Some(22), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("config file {ORIGIN}, line 1, column 22: ")),
            "{err}"
        );

        let err = error_at("poll_interval = -1\n", 1);
        assert!(matches!(err.problem, ConfigProblem::Toml { .. }), "{err}");

        let err = error_at("listen = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\n", 2);
        assert!(err.to_string().ends_with("duplicate key `listen`"), "{err}");
    }

    #[test]
    fn invalid_module_name_message() {
        let text = "# spdk group\n\n\n\n[groups.spdk]\nany_of = [\n  \"nvme tcp\",\n]\n";
        let err = error_at(text, 7);
        assert_eq!(
            err.to_string(),
            "config file /etc/kmod-monitor/config.toml, line 7: module name \"nvme tcp\" in \
             group \"spdk\" contains ' ' (allowed: letters, digits, '_' and '-')"
        );
        let err = error_at("[groups.g]\nall_of = [\"\"]\n", 2);
        assert!(
            err.to_string()
                .ends_with("module name \"\" in group \"g\" is empty"),
            "{err}"
        );
    }

    #[test]
    fn empty_group() {
        let err = error_at("[groups.g]\n\nall_of = []\n", 3);
        assert!(
            err.to_string()
                .ends_with("group \"g\": all_of is empty (list at least one module)"),
            "{err}"
        );
    }

    #[test]
    fn both_or_neither_mode() {
        let err = error_at(
            "[groups.g]\nall_of = [\"dm_crypt\"]\nany_of = [\"nvme_tcp\"]\n",
            3,
        );
        assert!(
            err.to_string()
                .contains("group \"g\" sets more than one of all_of, any_of and available"),
            "{err}"
        );
        let err = error_at(
            "[groups.g]\navailable = [\"iscsi_tcp\"]\n\nall_of = [\"dm_crypt\"]\n",
            4,
        );
        assert!(err.to_string().contains("more than one"), "{err}");
        let err = error_at("\n[groups.g]\nseverity = \"low\"\n", 2);
        assert!(
            err.to_string()
                .contains("group \"g\" sets none of all_of, any_of and available"),
            "{err}"
        );
    }

    #[test]
    fn available_is_a_user_group_mode_and_not_for_built_ins() {
        let c =
            parse("[groups.nbd-client]\navailable = [\"nbd\"]\nseverity = \"warning\"\n").unwrap();
        assert_eq!(c.groups.user[0].spec.mode, GroupMode::Available);
        assert_eq!(c.groups.user[0].spec.modules, [name("nbd")]);
        let err = error_at("[groups.v1-iscsi]\navailable = [\"iscsi_tcp\"]\n", 2);
        assert!(err.to_string().contains("not available"), "{err}");
    }

    #[test]
    fn bad_group_names() {
        let err = error_at("[groups.Spdk]\nall_of = [\"a\"]\n", 1);
        assert!(
            err.to_string().ends_with(
                "group name \"Spdk\" contains 'S' (allowed: lower-case letters, digits and '-')"
            ),
            "{err}"
        );
        let err = error_at("\n[groups.spdk_drv]\nall_of = [\"a\"]\n", 2);
        assert!(err.to_string().contains("contains '_'"), "{err}");
        let err = error_at("[groups.\"\"]\nall_of = [\"a\"]\n", 1);
        assert!(
            err.to_string().contains("group name \"\" is empty"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_module_after_normalisation() {
        let err = error_at(
            "[groups.nvme]\nall_of = [\n  \"nvme-tcp\",\n  \"nvme_core\",\n  \"nvme_tcp\",\n]\n",
            5,
        );
        assert!(
            err.to_string()
                .contains("group \"nvme\" lists module nvme_tcp twice (first on line 3"),
            "{err}"
        );
    }

    #[test]
    fn builtin_group_cannot_be_redefined() {
        let err = error_at("[groups.base]\nenabled = true\nall_of = [\"dm_mod\"]\n", 3);
        assert!(
            err.to_string().contains(
                "group \"base\" is built in: it accepts only enabled and severity, not all_of"
            ),
            "{err}"
        );
        let err = error_at("[groups.v2-data-engine]\nany_of = [\"vfio_pci\"]\n", 2);
        assert!(err.to_string().contains("not any_of"), "{err}");
    }

    #[test]
    fn ring_buffer_size_must_be_page_power_of_two() {
        for bad in [0_u32, 1000, 2048, 262_145, 1 << 29, 1 << 31] {
            let err = error_at(&format!("\nring_buffer_size = {bad}\n"), 2);
            assert!(
                err.to_string().ends_with(&format!(
                    "ring_buffer_size = {bad}: must be a power of two of at least 4096 and at most 268435456 bytes"
                )),
                "{err}"
            );
        }
        for good in [4096_u32, 1 << 20, 1 << 28] {
            let c = parse(&format!("ring_buffer_size = {good}")).unwrap();
            assert_eq!(c.ring_buffer_size, Some(good));
        }
        // Beyond u32: a TOML type error, still with its line.
        error_at("\n\nring_buffer_size = 8589934592\n", 3);
    }

    #[test]
    fn zero_intervals() {
        let err = error_at("reconcile_interval = 0\n", 1);
        assert!(
            err.to_string()
                .ends_with("reconcile_interval = 0: must be at least 1 second"),
            "{err}"
        );
        let err = error_at("reconcile_interval = 5\npoll_interval = 0\n", 2);
        assert!(err.to_string().contains("poll_interval = 0"), "{err}");
    }

    #[test]
    fn listen_host_root_and_severity() {
        let err = error_at("listen = \"localhost:9469\"\n", 1);
        assert!(
            err.to_string()
                .contains("listen = \"localhost:9469\": not an IP address and port"),
            "{err}"
        );
        let ok = parse("listen = \"[::1]:9469\"\n").unwrap();
        assert_eq!(ok.listen, Some("[::1]:9469".parse().unwrap()));

        let err = error_at("\nhost_root = \"host\"\n", 2);
        assert!(
            err.to_string()
                .ends_with("host_root = \"host\": is not an absolute path"),
            "{err}"
        );

        let err = error_at("[groups.g]\nall_of = [\"a\"]\nseverity = \" \"\n", 3);
        assert!(
            err.to_string()
                .contains("severity \" \" of group \"g\" must be non-empty text"),
            "{err}"
        );
        let err = error_at("[groups.base]\nseverity = \"a\\nb\"\n", 2);
        assert!(
            matches!(err.problem, ConfigProblem::Severity { .. }),
            "{err}"
        );
    }

    #[test]
    fn event_log_keys() {
        let off = parse("event_log = \"\"\nfsync = \"always\"\n").unwrap();
        assert_eq!(off.event_log, Some(EventLogPath::Off));
        assert_eq!(off.fsync, Some(FsyncPolicy::Always));
        let err = error_at("\nevent_log = \"events.jsonl\"\n", 2);
        assert!(
            err.to_string().ends_with(
                "event_log = \"events.jsonl\": is not an absolute path (or \"\" for no event log)"
            ),
            "{err}"
        );
        let err = error_at("fsync = \"sometimes\"\n", 1);
        assert!(
            err.to_string().contains("unknown variant `sometimes`"),
            "{err}"
        );
        let err = error_at("event_log_max_bytes = 100\n", 1);
        assert!(
            err.to_string().ends_with(
                "event_log_max_bytes = 100: must be at least 4096 and at most 68719476736 bytes"
            ),
            "{err}"
        );
        let err = error_at("\n\nevent_log_keep = 0\n", 3);
        assert!(
            err.to_string().ends_with("keep at least 1 rotated file"),
            "{err}"
        );
    }

    #[test]
    fn v2_switch_contradiction() {
        let err = error_at(
            "v2_data_engine = true\n\n[groups.v2-data-engine]\nenabled = false\n",
            4,
        );
        assert!(
            err.to_string().ends_with(
                "[groups.v2-data-engine] enabled = false contradicts v2_data_engine = true"
            ),
            "{err}"
        );
    }

    #[test]
    fn unreadable_file_names_path_and_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.toml");
        let err = load_config(&path).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("config file {}: cannot read it: ", path.display())),
            "{msg}"
        );
        assert!(msg.contains("No such file or directory"), "{msg}");
        assert_eq!(err.line, None);

        // A directory is not a readable file either.
        let err = load_config(dir.path()).unwrap_err();
        assert!(matches!(err.problem, ConfigProblem::Read { .. }), "{err}");

        std::fs::write(&path, "poll_interval = 0\n").unwrap();
        let err = load_config(&path).unwrap_err();
        assert_eq!(err.path, path);
        assert_eq!(err.line, Some(1));
    }

    #[test]
    fn resolve_without_file_is_base_then_flag() {
        let groups = resolve_groups(None, false);
        assert_eq!(group_names(&groups), ["base", "v1-iscsi", "rwx-nfs-client"]);
        assert_eq!(groups[0].modules, [name("dm_crypt")]);
        assert_eq!(groups[0].mode, GroupMode::AllOf);
        assert!(groups[0].builtin);
        assert_eq!(groups[0].severity, "critical");

        let groups = resolve_groups(None, true);
        assert_eq!(
            group_names(&groups),
            ["base", "v2-data-engine", "v1-iscsi", "rwx-nfs-client"]
        );
        assert_eq!(
            groups[1].modules,
            [name("vfio_pci"), name("uio_pci_generic"), name("nvme_tcp")]
        );
    }

    #[test]
    fn resolve_v2_switches() {
        // The file's answer, for crate::longhorn::decide_v2.
        let by_key = parse("v2_data_engine = true").unwrap();
        assert_eq!(by_key.v2_switch(), Some(true));
        let by_table =
            parse("[groups.v2-data-engine]\nenabled = true\nseverity = \"page\"\n").unwrap();
        assert_eq!(by_table.v2_switch(), Some(true));
        let groups = resolve_groups(Some(&by_table), true);
        assert_eq!(&group_names(&groups)[..2], ["base", "v2-data-engine"]);
        assert_eq!(groups[1].severity, "page");
        let off = parse("[groups.v2-data-engine]\nenabled = false\n").unwrap();
        assert_eq!(off.v2_switch(), Some(false));
        let no = parse("v2_data_engine = false").unwrap();
        assert_eq!(no.v2_switch(), Some(false));
        assert_eq!(parse("").unwrap().v2_switch(), None);
        // The decision, not the file, switches the group.
        assert_eq!(
            group_names(&resolve_groups(Some(&by_key), false)),
            ["base", "v1-iscsi", "rwx-nfs-client"]
        );
        assert_eq!(
            &group_names(&resolve_groups(Some(&off), true))[..2],
            ["base", "v2-data-engine"]
        );
    }

    #[test]
    fn resolve_user_groups_sorted_and_filtered() {
        let c = parse(
            "[groups.zeta]\nall_of = [\"nfs\"]\n\n\
             [groups.base]\nenabled = false\n\n\
             [groups.alpha]\nany_of = [\"vfio-pci\", \"uio_pci_generic\"]\n\n\
             [groups.off]\nall_of = [\"nbd\"]\nenabled = false\n\n\
             [groups.v1-iscsi]\nenabled = false\n\n\
             [groups.rwx-nfs-client]\nenabled = false\n",
        )
        .unwrap();
        let groups = resolve_groups(Some(&c), false);
        assert_eq!(group_names(&groups), ["alpha", "zeta"]);
        assert_eq!(groups[0].mode, GroupMode::AnyOf);
        assert_eq!(
            groups[0].modules,
            [name("vfio_pci"), name("uio_pci_generic")]
        );
        assert_eq!(groups[0].severity, "critical");
        assert!(!groups[0].builtin);
        assert_eq!(groups[1].mode, GroupMode::AllOf);
        let groups = resolve_groups(Some(&c), true);
        assert_eq!(group_names(&groups), ["v2-data-engine", "alpha", "zeta"]);
    }

    #[test]
    fn builtin_severity_override() {
        let c = parse("[groups.base]\nseverity = \"warning\"\n").unwrap();
        let groups = resolve_groups(Some(&c), false);
        assert_eq!(groups[0].severity, "warning");
        assert!(groups[0].builtin);
    }

    #[test]
    fn line_column_counts_characters() {
        let l = Locator {
            text: "a\nüü = 1\n",
            origin: Path::new("x"),
        };
        assert_eq!(l.line_column(0), (1, 1));
        assert_eq!(l.line_column(2), (2, 1));
        // "üü" is 4 bytes; the '=' after "üü " is character 4.
        assert_eq!(l.line_column(7), (2, 4));
    }
}
