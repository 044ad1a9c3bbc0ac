//! The one place settings are resolved: command-line flag over config-file
//! key over default, each value checked by the same validator
//! ([`super::validate`]) wherever it came from. `run`, `check` and the
//! daemon's SIGHUP reload all go through [`resolve_common`] /
//! [`resolve_run`], so they cannot disagree.
//!
//! On SIGHUP, [`reload`] resolves again with the same flags and the new
//! file and sorts every key the file changed into: applied now, needing a
//! restart, or overridden by a flag (the flag still wins).
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use super::{
    file::{ConfigError, EventLogPath, FileConfig, load_config},
    flags::{CommonFlags, RunFlags},
    validate,
};
use crate::{
    alerting::{AlertAuth, AlertClient, DEFAULT_ALERTMANAGER_TIMEOUT_SECS},
    forensic::{self, EventLogSettings, FsyncPolicy},
    host::HostRoot,
    k8s::K8sSettings,
    longhorn::{self, ClusterSettings, LocalInputs, Source},
    privileges::{PrivilegeError, User},
    requirements::GroupSettings,
    source::SourceKind,
};

/// `listen` when neither flag nor file sets it.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9469";
/// `reconcile_interval`, seconds.
pub const DEFAULT_RECONCILE_INTERVAL_SECS: u64 = 60;
/// `poll_interval`, seconds.
pub const DEFAULT_POLL_INTERVAL_SECS: u64 = 1;
/// `alert_resend_interval`, seconds.
pub const DEFAULT_ALERT_RESEND_SECS: u64 = 60;
/// `longhorn_grace`, seconds.
pub const DEFAULT_LONGHORN_GRACE_SECS: u64 = 300;
/// `k8s_heartbeat`, seconds: the kubelet's own node status report period.
pub const DEFAULT_K8S_HEARTBEAT_SECS: u64 = 300;
/// `runbook_url`: the README's runbook.
pub const DEFAULT_RUNBOOK_URL: &str =
    "https://github.com/kmod-monitor/kmod-monitor/blob/main/README.md";

/// A flag's value that its validator rejects, or a config file that cannot
/// be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// `--flag VALUE: problem`.
    #[error("{flag} {value}: {problem}")]
    Flag {
        /// The flag, with its dashes.
        flag: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it (the same words as for the file's key).
        problem: String,
    },
    /// The config file.
    #[error(transparent)]
    File(#[from] ConfigError),
    /// `--user`.
    #[error("--user: {0}")]
    User(#[from] PrivilegeError),
    /// Settings that cannot go together, whichever input gave them.
    #[error("{0}")]
    Conflict(String),
}

/// What `run` and `check` share: where to look and what to require.
#[derive(Clone, Debug)]
pub struct CommonSettings {
    /// `--config`, if given.
    pub config_path: Option<PathBuf>,
    pub host: HostRoot,
    /// The alerts' `instance` label, the event log's `host`, and the Node
    /// the cluster watch follows.
    pub node_name: String,
    /// The built-in groups' switches and the user's groups.
    pub groups: GroupSettings,
    /// The V2 inputs that are not the cluster's (flag, file, hugepages).
    pub v2_local: LocalInputs,
    /// The cluster watch.
    pub cluster: ClusterSettings,
}

/// Everything `run` needs, validated.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub common: CommonSettings,
    pub listen: SocketAddr,
    pub source: SourceKind,
    pub reconcile_interval: Duration,
    pub poll_interval: Duration,
    pub ring_buffer_bytes: u32,
    /// Alertmanager base URLs; empty = no push.
    pub alertmanager: Vec<reqwest::Url>,
    pub alert_resend_interval: Duration,
    /// How to reach the Alertmanagers: CA, credentials, timeout.
    pub alert_client: AlertClient,
    /// `--web.config.file`: TLS and basic auth for the HTTP listener.
    pub web_config_file: Option<PathBuf>,
    pub runbook_url: String,
    /// `--user`: who to become after attaching.
    pub user: Option<User>,
    /// `--keep-privileges`: skip the drop.
    pub keep_privileges: bool,
    /// The forensic event log; `None` = no log.
    pub event_log: Option<EventLogSettings>,
    /// The Node condition, Events and labels.
    pub k8s: K8sSettings,
    /// What these were resolved from, for SIGHUP.
    pub inputs: Inputs,
}

/// The flags and the file a [`RunSettings`] came from.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub flags: RunFlags,
    pub file: Option<FileConfig>,
}

/// Reads `--config`, if given.
///
/// # Errors
/// The file cannot be read or is invalid (file, line, problem).
pub fn load_file(flags: &CommonFlags) -> Result<Option<FileConfig>, ConfigError> {
    flags.config.as_deref().map(load_config).transpose()
}

fn flag_error(flag: &'static str, value: impl std::fmt::Display, problem: String) -> SettingsError {
    SettingsError::Flag {
        flag,
        value: value.to_string(),
        problem,
    }
}

/// A number flag through its validator.
fn checked<T, U>(
    flag: &'static str,
    value: Option<T>,
    validator: impl Fn(T) -> Result<U, String>,
) -> Result<Option<U>, SettingsError>
where
    T: Copy + std::fmt::Display,
{
    value
        .map(|v| validator(v).map_err(|problem| flag_error(flag, v, problem)))
        .transpose()
}

/// A text flag through its validator (the value shown quoted).
fn checked_text<U>(
    flag: &'static str,
    value: Option<&str>,
    validator: impl Fn(&str) -> Result<U, String>,
) -> Result<Option<U>, SettingsError> {
    value
        .map(|v| validator(v).map_err(|problem| flag_error(flag, format!("{v:?}"), problem)))
        .transpose()
}

/// A path flag: made absolute, then checked like the file's key.
fn checked_path(
    flag: &'static str,
    value: Option<&std::path::Path>,
) -> Result<Option<PathBuf>, SettingsError> {
    value
        .map(|p| {
            validate::flag_path(p)
                .map_err(|problem| flag_error(flag, format!("{:?}", p.display()), problem))
        })
        .transpose()
}

/// Resolves what `run` and `check` share.
///
/// # Errors
/// A flag its validator rejects.
pub fn resolve_common(
    flags: &CommonFlags,
    file: Option<&FileConfig>,
) -> Result<CommonSettings, SettingsError> {
    let CommonFlags {
        config,
        v2_data_engine,
        longhorn,
        longhorn_version,
        kubeconfig,
        longhorn_namespace,
        v2_hugepages_2mi,
        node_name,
        host_root,
    } = flags;
    let host = HostRoot::new(
        checked_path("--host-root", host_root.as_deref())?
            .or_else(|| file.and_then(|f| f.host_root.clone()))
            .unwrap_or_else(|| PathBuf::from("/")),
    );
    // $NODE_NAME may be set but empty (an unset downward-API field): that
    // is no answer, not an error.
    let node_flag = node_name.as_deref().filter(|n| !n.trim().is_empty());
    let node_name = checked_text("--node-name", node_flag, validate::one_line)?
        .or_else(|| file.and_then(|f| f.node_name.clone()))
        .or_else(|| hostname(&host))
        .unwrap_or_else(|| "unknown".to_owned());
    let hugepages_flag = checked(
        "--v2-hugepages-2mi",
        *v2_hugepages_2mi,
        validate::v2_hugepages_2mi,
    )?;
    let (hugepages_2mi, hugepages_source) =
        match (hugepages_flag, file.and_then(|f| f.v2_hugepages_2mi)) {
            (Some(pages), _) => (pages, Source::Flag),
            (None, Some(pages)) => (pages, Source::Config),
            (None, None) => (longhorn::readiness::DEFAULT_HUGEPAGES_2MI, Source::Default),
        };
    let namespace = checked_text(
        "--longhorn-namespace",
        longhorn_namespace.as_deref(),
        validate::namespace,
    )?
    .or_else(|| file.and_then(|f| f.longhorn_namespace.clone()))
    .unwrap_or_else(|| longhorn::DEFAULT_NAMESPACE.to_owned());
    Ok(CommonSettings {
        config_path: config.clone(),
        host,
        node_name,
        groups: file.map(|f| f.groups.clone()).unwrap_or_default(),
        v2_local: LocalInputs {
            flag: *v2_data_engine,
            file: file.and_then(FileConfig::v2_switch),
            hugepages_2mi,
            hugepages_source,
            version: match checked_text(
                "--longhorn-version",
                longhorn_version.as_deref(),
                validate::longhorn_version,
            )? {
                Some(v) => Some((v, "flag")),
                None => file.and_then(|f| f.longhorn_version).map(|v| (v, "config")),
            },
        },
        cluster: ClusterSettings {
            mode: longhorn
                .or_else(|| file.and_then(|f| f.longhorn))
                .unwrap_or_default(),
            kubeconfig: checked_path("--kubeconfig", kubeconfig.as_deref())?
                .or_else(|| file.and_then(|f| f.kubeconfig.clone())),
            namespace,
            grace: file
                .and_then(|f| f.longhorn_grace)
                .unwrap_or(Duration::from_secs(DEFAULT_LONGHORN_GRACE_SECS)),
        },
    })
}

/// The host's hostname (under the host root), when it has one.
fn hostname(host: &HostRoot) -> Option<String> {
    std::fs::read_to_string(host.root().join("proc/sys/kernel/hostname"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && !s.chars().any(char::is_control))
}

/// Whether this process runs as root (the event log's default depends on it).
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Resolves `run`'s settings.
///
/// # Errors
/// A flag its validator rejects, or an unknown `--user`.
pub fn resolve_run(
    flags: &RunFlags,
    file: Option<FileConfig>,
) -> Result<RunSettings, SettingsError> {
    let f = file.as_ref();
    let RunFlags {
        common,
        listen,
        source,
        reconcile_interval,
        poll_interval,
        ring_buffer_size,
        alertmanager,
        alert_resend_interval,
        longhorn_grace,
        runbook_url,
        user,
        keep_privileges,
        event_log,
        no_event_log,
        fsync,
        event_log_max_bytes,
        event_log_keep,
        event_log_buffer_bytes,
        web_config_file,
        alertmanager_ca_file,
        alertmanager_bearer_token_file,
        alertmanager_basic_auth_username,
        alertmanager_basic_auth_password_file,
        alertmanager_timeout,
        k8s_report,
        k8s_heartbeat,
        k8s_node_labels,
        log_format: _,
    } = flags;
    let mut common_settings = resolve_common(common, f)?;
    if let Some(grace) = checked(
        "--longhorn-grace",
        *longhorn_grace,
        validate::longhorn_grace,
    )? {
        common_settings.cluster.grace = grace;
    }
    let alertmanager = if alertmanager.is_empty() {
        f.map(|f| f.alertmanager.clone()).unwrap_or_default()
    } else {
        alertmanager
            .iter()
            .map(|url| {
                validate::alertmanager_url(url).map_err(|problem| {
                    // Shown without user info, so refused credentials stay unprinted.
                    let shown = crate::alerting::redact_userinfo(url);
                    flag_error("--alertmanager", format!("{shown:?}"), problem)
                })
            })
            .collect::<Result<_, _>>()?
    };
    let event_log = resolve_event_log(
        EventLogFlags {
            path: event_log.as_deref(),
            off: *no_event_log,
            fsync: *fsync,
            max_bytes: *event_log_max_bytes,
            keep: *event_log_keep,
            buffer_bytes: *event_log_buffer_bytes,
        },
        f,
    )?;
    let alert_client = resolve_alert_client(
        AlertClientFlags {
            ca_file: alertmanager_ca_file.as_deref(),
            bearer_token_file: alertmanager_bearer_token_file.as_deref(),
            username: alertmanager_basic_auth_username.as_deref(),
            password_file: alertmanager_basic_auth_password_file.as_deref(),
            timeout: *alertmanager_timeout,
        },
        f,
    )?;
    Ok(RunSettings {
        common: common_settings,
        listen: match checked_text("--listen", listen.as_deref(), validate::listen)? {
            Some(addr) => addr,
            None => match f.and_then(|f| f.listen) {
                Some(addr) => addr,
                None => validate::listen(DEFAULT_LISTEN)
                    .map_err(|problem| flag_error("--listen", DEFAULT_LISTEN, problem))?,
            },
        },
        source: source
            .or_else(|| f.and_then(|f| f.source))
            .unwrap_or_default(),
        reconcile_interval: checked(
            "--reconcile-interval",
            *reconcile_interval,
            validate::reconcile_interval,
        )?
        .or_else(|| f.and_then(|f| f.reconcile_interval))
        .unwrap_or(Duration::from_secs(DEFAULT_RECONCILE_INTERVAL_SECS)),
        poll_interval: checked("--poll-interval", *poll_interval, validate::poll_interval)?
            .or_else(|| f.and_then(|f| f.poll_interval))
            .unwrap_or(Duration::from_secs(DEFAULT_POLL_INTERVAL_SECS)),
        ring_buffer_bytes: checked(
            "--ring-buffer-size",
            *ring_buffer_size,
            validate::ring_buffer_size,
        )?
        .or_else(|| f.and_then(|f| f.ring_buffer_size))
        .unwrap_or(monitor_common::DEFAULT_RING_BYTES),
        alertmanager,
        alert_resend_interval: checked(
            "--alert-resend-interval",
            *alert_resend_interval,
            validate::alert_resend_interval,
        )?
        .or_else(|| f.and_then(|f| f.alert_resend_interval))
        .unwrap_or(Duration::from_secs(DEFAULT_ALERT_RESEND_SECS)),
        alert_client,
        web_config_file: checked_path("--web.config.file", web_config_file.as_deref())?
            .or_else(|| f.and_then(|f| f.web_config_file.clone())),
        runbook_url: checked_text("--runbook-url", runbook_url.as_deref(), validate::one_line)?
            .or_else(|| f.and_then(|f| f.runbook_url.clone()))
            .unwrap_or_else(|| DEFAULT_RUNBOOK_URL.to_owned()),
        user: user.as_deref().map(User::resolve).transpose()?,
        keep_privileges: *keep_privileges,
        event_log,
        k8s: K8sSettings {
            mode: k8s_report
                .or_else(|| f.and_then(|f| f.k8s_report))
                .unwrap_or_default(),
            heartbeat: checked("--k8s-heartbeat", *k8s_heartbeat, validate::k8s_heartbeat)?
                .or_else(|| f.and_then(|f| f.k8s_heartbeat))
                .unwrap_or(Duration::from_secs(DEFAULT_K8S_HEARTBEAT_SECS)),
            node_labels: k8s_node_labels
                .or_else(|| f.and_then(|f| f.k8s_node_labels))
                .unwrap_or(false),
        },
        inputs: Inputs {
            flags: flags.clone(),
            file,
        },
    })
}

/// The run flags about the event log.
struct EventLogFlags<'a> {
    path: Option<&'a std::path::Path>,
    off: bool,
    fsync: Option<FsyncPolicy>,
    max_bytes: Option<u64>,
    keep: Option<u32>,
    buffer_bytes: Option<u64>,
}

/// Flags over the config file over defaults; `None` = no event log.
fn resolve_event_log(
    flags: EventLogFlags<'_>,
    file: Option<&FileConfig>,
) -> Result<Option<EventLogSettings>, SettingsError> {
    let EventLogFlags {
        path,
        off,
        fsync,
        max_bytes,
        keep,
        buffer_bytes,
    } = flags;
    let buffer_bytes = checked(
        "--event-log-buffer-bytes",
        buffer_bytes,
        validate::event_log_buffer_bytes,
    )?
    .or_else(|| file.and_then(|f| f.event_log_buffer_bytes))
    .unwrap_or(forensic::DEFAULT_BUFFER_BYTES);
    let max_bytes = checked(
        "--event-log-max-bytes",
        max_bytes,
        validate::event_log_max_bytes,
    )?
    .or_else(|| file.and_then(|f| f.event_log_max_bytes))
    .unwrap_or(forensic::DEFAULT_MAX_BYTES);
    let keep = checked("--event-log-keep", keep, validate::event_log_keep)?
        .or_else(|| file.and_then(|f| f.event_log_keep))
        .unwrap_or(forensic::DEFAULT_KEEP);
    let path = if off {
        None
    } else if let Some(p) = path {
        if p.as_os_str().is_empty() {
            None
        } else {
            checked_path("--event-log", Some(p))?
        }
    } else {
        match file.and_then(|f| f.event_log.clone()) {
            Some(EventLogPath::Off) => None,
            Some(EventLogPath::At(p)) => Some(p),
            None => is_root().then(|| PathBuf::from(forensic::DEFAULT_PATH)),
        }
    };
    Ok(path.map(|path| EventLogSettings {
        path,
        fsync: fsync
            .or_else(|| file.and_then(|f| f.fsync))
            .unwrap_or_default(),
        max_bytes,
        keep,
        buffer_bytes,
    }))
}

/// The run flags about the Alertmanager client.
struct AlertClientFlags<'a> {
    ca_file: Option<&'a std::path::Path>,
    bearer_token_file: Option<&'a std::path::Path>,
    username: Option<&'a str>,
    password_file: Option<&'a std::path::Path>,
    timeout: Option<u64>,
}

/// Flags over the config file over defaults, then the credentials checked
/// as a whole: a bearer token or basic auth, not both, and basic auth
/// needs both its user and its password file.
fn resolve_alert_client(
    flags: AlertClientFlags<'_>,
    file: Option<&FileConfig>,
) -> Result<AlertClient, SettingsError> {
    let AlertClientFlags {
        ca_file,
        bearer_token_file,
        username,
        password_file,
        timeout,
    } = flags;
    let ca_file = checked_path("--alertmanager-ca-file", ca_file)?
        .or_else(|| file.and_then(|f| f.alertmanager_ca_file.clone()));
    let token = checked_path("--alertmanager-bearer-token-file", bearer_token_file)?
        .or_else(|| file.and_then(|f| f.alertmanager_bearer_token_file.clone()));
    let username = checked_text(
        "--alertmanager-basic-auth-username",
        username,
        validate::one_line,
    )?
    .or_else(|| file.and_then(|f| f.alertmanager_basic_auth_username.clone()));
    let password = checked_path("--alertmanager-basic-auth-password-file", password_file)?
        .or_else(|| file.and_then(|f| f.alertmanager_basic_auth_password_file.clone()));
    let timeout = checked(
        "--alertmanager-timeout",
        timeout,
        validate::alertmanager_timeout,
    )?
    .or_else(|| file.and_then(|f| f.alertmanager_timeout))
    .unwrap_or(Duration::from_secs(DEFAULT_ALERTMANAGER_TIMEOUT_SECS));
    let auth = match (token, username, password) {
        (None, None, None) => None,
        (Some(token_file), None, None) => Some(AlertAuth::Bearer { token_file }),
        (None, Some(username), Some(password_file)) => Some(AlertAuth::Basic {
            username,
            password_file,
        }),
        (Some(_), _, _) => {
            return Err(SettingsError::Conflict(
                "Alertmanager credentials: a bearer token file and basic auth are both set (alertmanager_bearer_token_file / --alertmanager-bearer-token-file and alertmanager_basic_auth_*); choose one"
                    .to_owned(),
            ));
        }
        (None, Some(_), None) => {
            return Err(SettingsError::Conflict(
                "Alertmanager basic auth: a user name is set but no password file (alertmanager_basic_auth_password_file / --alertmanager-basic-auth-password-file)"
                    .to_owned(),
            ));
        }
        (None, None, Some(_)) => {
            return Err(SettingsError::Conflict(
                "Alertmanager basic auth: a password file is set but no user name (alertmanager_basic_auth_username / --alertmanager-basic-auth-username)"
                    .to_owned(),
            ));
        }
    };
    Ok(AlertClient {
        ca_file,
        auth,
        timeout,
    })
}

/// What a config-file key's change does on SIGHUP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnReload {
    /// Applied at once.
    Live,
    /// Takes effect at the next start.
    Restart,
}

/// One config-file key: its flag (if any) and what a SIGHUP does with it.
#[derive(Clone, Copy, Debug)]
pub struct Key {
    pub name: &'static str,
    pub flag: Option<&'static str>,
    pub on_reload: OnReload,
}

const fn key(name: &'static str, flag: Option<&'static str>, on_reload: OnReload) -> Key {
    Key {
        name,
        flag,
        on_reload,
    }
}

/// Every config-file key. `groups` stands for all `[groups.*]` tables.
pub const KEYS: &[Key] = &[
    key("listen", Some("--listen"), OnReload::Restart),
    key("source", Some("--source"), OnReload::Restart),
    key(
        "reconcile_interval",
        Some("--reconcile-interval"),
        OnReload::Live,
    ),
    key("poll_interval", Some("--poll-interval"), OnReload::Restart),
    key(
        "ring_buffer_size",
        Some("--ring-buffer-size"),
        OnReload::Restart,
    ),
    key("host_root", Some("--host-root"), OnReload::Restart),
    key("v2_data_engine", Some("--v2-data-engine"), OnReload::Live),
    key("alertmanager", Some("--alertmanager"), OnReload::Restart),
    key(
        "alert_resend_interval",
        Some("--alert-resend-interval"),
        OnReload::Restart,
    ),
    key("node_name", Some("--node-name"), OnReload::Restart),
    key("runbook_url", Some("--runbook-url"), OnReload::Live),
    key("event_log", Some("--event-log"), OnReload::Restart),
    key("fsync", Some("--fsync"), OnReload::Restart),
    key(
        "event_log_max_bytes",
        Some("--event-log-max-bytes"),
        OnReload::Restart,
    ),
    key(
        "event_log_keep",
        Some("--event-log-keep"),
        OnReload::Restart,
    ),
    key("longhorn", Some("--longhorn"), OnReload::Restart),
    key(
        "longhorn_namespace",
        Some("--longhorn-namespace"),
        OnReload::Restart,
    ),
    key("kubeconfig", Some("--kubeconfig"), OnReload::Restart),
    key("longhorn_grace", Some("--longhorn-grace"), OnReload::Live),
    key(
        "v2_hugepages_2mi",
        Some("--v2-hugepages-2mi"),
        OnReload::Live,
    ),
    key(
        "web_config_file",
        Some("--web.config.file"),
        OnReload::Restart,
    ),
    key(
        "event_log_buffer_bytes",
        Some("--event-log-buffer-bytes"),
        OnReload::Restart,
    ),
    key(
        "alertmanager_ca_file",
        Some("--alertmanager-ca-file"),
        OnReload::Restart,
    ),
    key(
        "alertmanager_bearer_token_file",
        Some("--alertmanager-bearer-token-file"),
        OnReload::Restart,
    ),
    key(
        "alertmanager_basic_auth_username",
        Some("--alertmanager-basic-auth-username"),
        OnReload::Restart,
    ),
    key(
        "alertmanager_basic_auth_password_file",
        Some("--alertmanager-basic-auth-password-file"),
        OnReload::Restart,
    ),
    key(
        "alertmanager_timeout",
        Some("--alertmanager-timeout"),
        OnReload::Restart,
    ),
    key(
        "longhorn_version",
        Some("--longhorn-version"),
        OnReload::Live,
    ),
    key("k8s_report", Some("--k8s-report"), OnReload::Restart),
    key("k8s_heartbeat", Some("--k8s-heartbeat"), OnReload::Restart),
    key(
        "k8s_node_labels",
        Some("--k8s-node-labels"),
        OnReload::Restart,
    ),
    key("groups", None, OnReload::Live),
];

/// Whether the flag of config key `name` was given on the command line.
fn flag_given(flags: &RunFlags, name: &str) -> bool {
    let RunFlags {
        common,
        listen,
        source,
        reconcile_interval,
        poll_interval,
        ring_buffer_size,
        alertmanager,
        alert_resend_interval,
        longhorn_grace,
        runbook_url,
        user: _,
        keep_privileges: _,
        event_log,
        no_event_log,
        fsync,
        event_log_max_bytes,
        event_log_keep,
        event_log_buffer_bytes,
        web_config_file,
        alertmanager_ca_file,
        alertmanager_bearer_token_file,
        alertmanager_basic_auth_username,
        alertmanager_basic_auth_password_file,
        alertmanager_timeout,
        k8s_report,
        k8s_heartbeat,
        k8s_node_labels,
        log_format: _,
    } = flags;
    let CommonFlags {
        config: _,
        v2_data_engine,
        longhorn,
        longhorn_version,
        kubeconfig,
        longhorn_namespace,
        v2_hugepages_2mi,
        node_name,
        host_root,
    } = common;
    match name {
        "listen" => listen.is_some(),
        "source" => source.is_some(),
        "reconcile_interval" => reconcile_interval.is_some(),
        "poll_interval" => poll_interval.is_some(),
        "ring_buffer_size" => ring_buffer_size.is_some(),
        "host_root" => host_root.is_some(),
        "v2_data_engine" => v2_data_engine.is_some(),
        "alertmanager" => !alertmanager.is_empty(),
        "alert_resend_interval" => alert_resend_interval.is_some(),
        "node_name" => node_name.as_deref().is_some_and(|n| !n.trim().is_empty()),
        "runbook_url" => runbook_url.is_some(),
        "event_log" => event_log.is_some() || *no_event_log,
        "fsync" => fsync.is_some(),
        "event_log_max_bytes" => event_log_max_bytes.is_some(),
        "event_log_keep" => event_log_keep.is_some(),
        "longhorn" => longhorn.is_some(),
        "longhorn_namespace" => longhorn_namespace.is_some(),
        "kubeconfig" => kubeconfig.is_some(),
        "longhorn_grace" => longhorn_grace.is_some(),
        "v2_hugepages_2mi" => v2_hugepages_2mi.is_some(),
        "web_config_file" => web_config_file.is_some(),
        "event_log_buffer_bytes" => event_log_buffer_bytes.is_some(),
        "alertmanager_ca_file" => alertmanager_ca_file.is_some(),
        "alertmanager_bearer_token_file" => alertmanager_bearer_token_file.is_some(),
        "alertmanager_basic_auth_username" => alertmanager_basic_auth_username.is_some(),
        "alertmanager_basic_auth_password_file" => alertmanager_basic_auth_password_file.is_some(),
        "alertmanager_timeout" => alertmanager_timeout.is_some(),
        "longhorn_version" => longhorn_version.is_some(),
        "k8s_report" => k8s_report.is_some(),
        "k8s_heartbeat" => k8s_heartbeat.is_some(),
        "k8s_node_labels" => k8s_node_labels.is_some(),
        _ => false,
    }
}

/// A SIGHUP's outcome: the new settings, and every key the file changed,
/// sorted by what happens to it.
#[derive(Clone, Debug)]
pub struct Reload {
    pub settings: RunSettings,
    /// Changed and applied now.
    pub applied: Vec<&'static str>,
    /// Changed, but only a restart applies them.
    pub restart: Vec<&'static str>,
    /// Changed, but a flag on the command line still decides them.
    pub overridden: Vec<&'static str>,
}

/// Resolves the settings again from the original flags and the `new` file,
/// and sorts the keys that changed since `old`.
///
/// # Errors
/// As [`resolve_run`] (a flag that was valid stays valid, so in practice
/// none).
pub fn reload(old: &Inputs, new: FileConfig) -> Result<Reload, SettingsError> {
    let changed = FileConfig::changed_keys(old.file.as_ref(), Some(&new));
    let mut applied = Vec::new();
    let mut restart = Vec::new();
    let mut overridden = Vec::new();
    for name in changed {
        let Some(k) = KEYS.iter().find(|k| k.name == name) else {
            continue;
        };
        if flag_given(&old.flags, k.name) {
            overridden.push(k.name);
        } else if k.on_reload == OnReload::Live {
            applied.push(k.name);
        } else {
            restart.push(k.name);
        }
    }
    Ok(Reload {
        settings: resolve_run(&old.flags, Some(new))?,
        applied,
        restart,
        overridden,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::parse_config;

    /// `run`'s flags as clap parses them.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: RunFlags,
    }

    fn flags(args: &[&str]) -> RunFlags {
        Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .unwrap()
            .flags
    }

    /// Every key set, as in the README's example.
    const FULL: &str = r#"
listen = "127.0.0.1:9469"
source = "poll"
reconcile_interval = 61
poll_interval = 2
ring_buffer_size = 8192
host_root = "/host"
v2_data_engine = true
alertmanager = ["http://am:9093"]
alert_resend_interval = 30
node_name = "n1"
runbook_url = "http://r"
event_log = "/var/log/k.jsonl"
fsync = "always"
event_log_max_bytes = 8192
event_log_keep = 2
longhorn = "off"
longhorn_namespace = "lh"
kubeconfig = "/k"
longhorn_grace = 5
v2_hugepages_2mi = 8
web_config_file = "/w.yml"
event_log_buffer_bytes = 65536
alertmanager_ca_file = "/ca.pem"
alertmanager_bearer_token_file = "/t"
alertmanager_basic_auth_username = "u"
alertmanager_basic_auth_password_file = "/p"
alertmanager_timeout = 3
longhorn_version = "1.10"
k8s_report = "off"
k8s_heartbeat = 30
k8s_node_labels = true
[groups.g]
all_of = ["nbd"]
"#;

    #[test]
    fn every_key_is_known_and_every_flag_is_seen() {
        let full = parse_config(FULL, std::path::Path::new("/c")).unwrap();
        let changed = FileConfig::changed_keys(None, Some(&full));
        let known: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
        assert_eq!(
            changed, known,
            "KEYS lists exactly the file's keys, in order"
        );
        let all = flags(&[
            "--listen=127.0.0.1:1",
            "--source=poll",
            "--reconcile-interval=1",
            "--poll-interval=1",
            "--ring-buffer-size=4096",
            "--host-root=/h",
            "--v2-data-engine",
            "--alertmanager=http://a:1",
            "--alert-resend-interval=1",
            "--node-name=n",
            "--runbook-url=u",
            "--event-log=/e",
            "--fsync=always",
            "--event-log-max-bytes=4096",
            "--event-log-keep=1",
            "--longhorn=off",
            "--longhorn-namespace=n",
            "--kubeconfig=/k",
            "--longhorn-grace=1",
            "--v2-hugepages-2mi=1",
            "--web.config.file=/w",
            "--event-log-buffer-bytes=65536",
            "--alertmanager-ca-file=/c",
            "--alertmanager-bearer-token-file=/t",
            "--alertmanager-basic-auth-username=u",
            "--alertmanager-basic-auth-password-file=/p",
            "--alertmanager-timeout=1",
            "--longhorn-version=1.9",
            "--k8s-report=off",
            "--k8s-heartbeat=1",
            "--k8s-node-labels",
        ]);
        for k in KEYS {
            assert_eq!(flag_given(&all, k.name), k.flag.is_some(), "{}", k.name);
            assert!(!flag_given(&RunFlags::default(), k.name), "{}", k.name);
        }
    }

    #[test]
    fn flag_over_file_over_default() {
        let file = parse_config(
            "reconcile_interval = 7\npoll_interval = 3\n",
            std::path::Path::new("/c"),
        )
        .unwrap();
        let s = resolve_run(&flags(&["--reconcile-interval=9"]), Some(file)).unwrap();
        assert_eq!(s.reconcile_interval, Duration::from_secs(9));
        assert_eq!(s.poll_interval, Duration::from_secs(3));
        assert_eq!(
            s.alert_resend_interval,
            Duration::from_secs(DEFAULT_ALERT_RESEND_SECS)
        );
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(s.common.v2_local.hugepages_source, Source::Default);
        assert_eq!(
            s.k8s,
            K8sSettings {
                mode: crate::k8s::ReportMode::Auto,
                heartbeat: Duration::from_secs(DEFAULT_K8S_HEARTBEAT_SECS),
                node_labels: false,
            }
        );
        let file = parse_config(
            "k8s_heartbeat = 60\nk8s_node_labels = true\n",
            std::path::Path::new("/c"),
        )
        .unwrap();
        let s = resolve_run(
            &flags(&["--k8s-heartbeat=5", "--k8s-report=off"]),
            Some(file),
        )
        .unwrap();
        assert_eq!(s.k8s.heartbeat, Duration::from_secs(5));
        assert_eq!(s.k8s.mode, crate::k8s::ReportMode::Off);
        assert!(s.k8s.node_labels);
        let s = resolve_run(&flags(&["--k8s-node-labels=false"]), None).unwrap();
        assert!(!s.k8s.node_labels);
    }

    #[test]
    fn a_bad_flag_names_itself_with_the_file_keys_words() {
        let err = resolve_run(&flags(&["--ring-buffer-size=1000"]), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--ring-buffer-size 1000: must be a power of two of at least 4096 and at most 268435456 bytes"
        );
        let err = resolve_run(&flags(&["--longhorn-namespace=A_B"]), None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--longhorn-namespace \"A_B\": not a Kubernetes namespace name"),
            "{err}"
        );
    }

    #[test]
    fn reload_sorts_changed_keys() {
        let old_file =
            parse_config("reconcile_interval = 60\n", std::path::Path::new("/c")).unwrap();
        let old = Inputs {
            flags: flags(&["--source=poll"]),
            file: Some(old_file),
        };
        let new = parse_config(
            "reconcile_interval = 1\nsource = \"uevent\"\nlisten = \"127.0.0.1:2\"\n",
            std::path::Path::new("/c"),
        )
        .unwrap();
        let r = reload(&old, new).unwrap();
        assert_eq!(r.applied, ["reconcile_interval"]);
        assert_eq!(r.restart, ["listen"]);
        assert_eq!(r.overridden, ["source"]);
        assert_eq!(r.settings.reconcile_interval, Duration::from_secs(1));
        assert_eq!(r.settings.source, SourceKind::Poll, "the flag still wins");
    }
}

#[cfg(test)]
mod alert_client_tests {
    use super::*;
    use crate::config::parse_config;

    fn client(text: &str) -> Result<AlertClient, SettingsError> {
        let file = parse_config(text, std::path::Path::new("/c")).unwrap();
        resolve_run(&RunFlags::default(), Some(file)).map(|s| s.alert_client)
    }

    #[test]
    fn credentials_are_one_kind_and_complete() {
        assert_eq!(client("").unwrap(), AlertClient::default());
        assert_eq!(
            client("alertmanager_bearer_token_file = \"/t\"\n")
                .unwrap()
                .auth,
            Some(AlertAuth::Bearer {
                token_file: "/t".into()
            })
        );
        assert_eq!(
            client("alertmanager_basic_auth_username = \"u\"\nalertmanager_basic_auth_password_file = \"/p\"\n")
                .unwrap()
                .auth,
            Some(AlertAuth::Basic {
                username: "u".into(),
                password_file: "/p".into()
            })
        );
        for (text, needle) in [
            (
                "alertmanager_bearer_token_file = \"/t\"\nalertmanager_basic_auth_username = \"u\"\n",
                "both set",
            ),
            (
                "alertmanager_basic_auth_username = \"u\"\n",
                "no password file",
            ),
            (
                "alertmanager_basic_auth_password_file = \"/p\"\n",
                "no user name",
            ),
        ] {
            let err = client(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
