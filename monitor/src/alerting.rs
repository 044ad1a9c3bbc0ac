//! Alertmanager push (v2 API, `POST /api/v2/alerts`), following its client
//! contract: firing alerts are re-sent every `resend_interval` with
//! `endsAt = now + 4 × interval`; a resolved alert is sent at once with
//! `endsAt = now` and re-sent for 5 minutes. Delivery runs in its own
//! tasks, one per Alertmanager ([`push`]), over one client ([`transport`]):
//! the event path only publishes the wanted alert set and never waits, and
//! no Alertmanager waits for another.
mod push;
mod transport;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
pub use push::{ATTEMPTS, FIRST_BACKOFF, MAX_BACKOFF, OVERTAKEN_GRACE};
pub use transport::{CONNECT_TIMEOUT_MAX, TransportError, connect_timeout};

/// How long a resolved alert keeps being re-sent.
pub const RESOLVED_RESEND_FOR: Duration = Duration::from_secs(5 * 60);

pub const ALERT_UNMET: &str = "KernelModuleRequirementUnmet";
pub const ALERT_EVENTS_LOST: &str = "KernelModuleMonitorEventsLost";
pub const ALERT_SOURCE_DEGRADED: &str = "KernelModuleMonitorSourceDegraded";
pub const ALERT_NO_MODULE_SUPPORT: &str = "KernelModuleMonitorNoModuleSupport";
pub const ALERT_HUGEPAGES: &str = "KernelModuleMonitorHugepagesInsufficient";
pub const ALERT_CLUSTER_UNREADABLE: &str = "KernelModuleMonitorLonghornUnreadable";
/// A Longhorn node requirement other than modules is not met (kernel,
/// IOMMU, CPU, the kubelet's hugepages, host commands, multipathd, ublk).
pub const ALERT_NODE_REQUIREMENT: &str = "LonghornNodeRequirementUnmet";

/// Label or annotation set.
pub type Labels = BTreeMap<String, String>;

/// One alert the daemon wants firing now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub labels: Labels,
    pub annotations: Labels,
}

/// The whole wanted set, published by the daemon after every change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WantedSet {
    pub alerts: Vec<Wanted>,
    /// CLOCK_BOOTTIME of the event that last changed the set, to measure
    /// event-to-delivery latency.
    pub trigger_boot_ns: Option<u64>,
}

/// Delivery settings.
#[derive(Clone, Debug)]
pub struct AlertSettings {
    /// Alertmanager base URLs.
    pub urls: Vec<reqwest::Url>,
    pub resend_interval: Duration,
    /// How to reach them: TLS trust, credentials, timeout.
    pub client: AlertClient,
}

/// Default per-request timeout towards an Alertmanager, seconds
/// (Prometheus's `alertmanager_config.timeout` default).
pub const DEFAULT_ALERTMANAGER_TIMEOUT_SECS: u64 = 10;

/// How the pusher talks to Alertmanager, as Prometheus users configure it
/// in `alertmanager_config`: a CA for https, and a bearer token or basic
/// auth read from files (never from the command line, where `ps` shows
/// them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertClient {
    /// PEM CA bundle for https targets; `None` = the built-in web roots.
    pub ca_file: Option<std::path::PathBuf>,
    pub auth: Option<AlertAuth>,
    /// Per-request timeout, connection included.
    pub timeout: Duration,
}

impl Default for AlertClient {
    fn default() -> Self {
        Self {
            ca_file: None,
            auth: None,
            timeout: Duration::from_secs(DEFAULT_ALERTMANAGER_TIMEOUT_SECS),
        }
    }
}

/// Credentials for Alertmanager; the secrets stay in their files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AlertAuth {
    /// `Authorization: Bearer <file's content>`.
    Bearer { token_file: std::path::PathBuf },
    /// `Authorization: Basic`, the password from a file.
    Basic {
        username: String,
        password_file: std::path::PathBuf,
    },
}

/// One alert as the v2 API takes it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PostableAlert {
    pub labels: Labels,
    pub annotations: Labels,
    pub starts_at: String,
    pub ends_at: String,
}

/// An alert the pusher knows about.
#[derive(Clone, Debug)]
struct Tracked {
    annotations: Labels,
    starts_at: SystemTime,
    /// When it was resolved; `None` while firing.
    resolved_at: Option<SystemTime>,
}

/// Firing and recently resolved alerts, and what to send for them.
#[derive(Debug, Default)]
pub struct Book {
    alerts: BTreeMap<Labels, Tracked>,
}

impl Book {
    /// Applies a new wanted set at `now`. Returns whether something started
    /// firing or resolved (which must be sent at once).
    pub fn update(&mut self, wanted: &[Wanted], now: SystemTime) -> bool {
        let mut changed = false;
        for w in wanted {
            match self.alerts.get_mut(&w.labels) {
                Some(t) if t.resolved_at.is_none() => t.annotations.clone_from(&w.annotations),
                _ => {
                    // New, or firing again after a resolution: a new episode.
                    self.alerts.insert(
                        w.labels.clone(),
                        Tracked {
                            annotations: w.annotations.clone(),
                            starts_at: now,
                            resolved_at: None,
                        },
                    );
                    changed = true;
                }
            }
        }
        for (labels, t) in &mut self.alerts {
            if t.resolved_at.is_none() && !wanted.iter().any(|w| &w.labels == labels) {
                t.resolved_at = Some(now);
                changed = true;
            }
        }
        changed
    }

    /// Forgets resolutions older than [`RESOLVED_RESEND_FOR`].
    pub fn expire(&mut self, now: SystemTime) {
        self.alerts.retain(|_, t| {
            t.resolved_at
                .is_none_or(|r| now.duration_since(r).unwrap_or_default() < RESOLVED_RESEND_FOR)
        });
    }

    /// The POST body at `now`.
    #[must_use]
    pub fn postable(&self, now: SystemTime, resend_interval: Duration) -> Vec<PostableAlert> {
        self.alerts
            .iter()
            .map(|(labels, t)| PostableAlert {
                labels: labels.clone(),
                annotations: t.annotations.clone(),
                starts_at: rfc3339(t.starts_at),
                ends_at: rfc3339(t.resolved_at.unwrap_or(now + 4 * resend_interval)),
            })
            .collect()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.alerts.is_empty()
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `url` as text without its user name and password, for logs and
/// messages. URLs with credentials are refused when settings are
/// validated; this is the second line of defence.
#[must_use]
pub fn redacted(url: &reqwest::Url) -> String {
    redact_userinfo(url.as_str())
}

/// `text` (a URL as given, parsable or not) with anything between `://`
/// and the last `@` of the authority replaced by `***`.
#[must_use]
pub fn redact_userinfo(text: &str) -> String {
    let Some(start) = text.find("://").map(|i| i + 3) else {
        return text.to_owned();
    };
    let rest = &text[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => format!("{}***@{}", &text[..start], &rest[at + 1..]),
        None => text.to_owned(),
    }
}

/// The pusher, its files read and its client built, ready to start.
#[derive(Debug)]
pub struct Pusher {
    settings: AlertSettings,
    transport: Arc<transport::Transport>,
}

/// One Alertmanager: its POST URL and the shared client.
struct Target {
    url: reqwest::Url,
    transport: Arc<transport::Transport>,
}

impl push::Post for Target {
    fn post(
        &self,
        batch: &push::Batch,
    ) -> impl std::future::Future<Output = Result<(), transport::PostError>> + Send {
        self.transport.post(&self.url, &batch.alerts)
    }
}

impl Pusher {
    /// Reads the CA and credential files and builds the client. Call it
    /// after dropping privileges: the files are read again before each
    /// push, by the same user.
    ///
    /// # Errors
    /// A file that cannot be read or holds nothing usable (named in the
    /// error), or no trusted roots for an https target.
    pub fn new(settings: AlertSettings) -> Result<Self, TransportError> {
        let transport = transport::Transport::new(&settings.urls, &settings.client)?;
        Ok(Self {
            settings,
            transport: Arc::new(transport),
        })
    }

    /// Starts delivery; it runs until `cancel`.
    #[must_use]
    pub fn spawn(
        self,
        wanted: watch::Receiver<Arc<WantedSet>>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let Self {
            settings,
            transport,
        } = self;
        let AlertSettings {
            urls,
            resend_interval,
            client,
        } = settings;
        let mut targets = Vec::new();
        for base in &urls {
            match base.join("api/v2/alerts") {
                Ok(url) => targets.push((
                    redacted(base),
                    Target {
                        url,
                        transport: Arc::clone(&transport),
                    },
                )),
                Err(e) => {
                    tracing::error!(alertmanager = %redacted(base), error = %e, "bad Alertmanager URL; not pushing to it");
                }
            }
        }
        tracing::info!(
            alertmanager = ?targets.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(),
            timeout = ?client.timeout,
            connect_timeout = ?connect_timeout(client.timeout),
            ca_file = ?client.ca_file,
            auth = match &client.auth {
                None => "none",
                Some(AlertAuth::Bearer { .. }) => "bearer token",
                Some(AlertAuth::Basic { .. }) => "basic",
            },
            "pushing alerts, to each Alertmanager on its own"
        );
        tokio::spawn(push::coordinate(
            targets,
            resend_interval,
            wanted,
            metrics,
            cancel,
        ))
    }
}

/// What the wanted alert set is computed from.
pub struct AlertInputs<'a> {
    /// The `instance` label: the node's name.
    pub instance: &'a str,
    pub runbook_url: &'a str,
    pub groups: &'a [crate::tracker::GroupReport],
    /// For remedies: the kernel config of missing modules, …
    pub snapshot: &'a crate::host::Snapshot,
    /// … what loads and blocks each required module at boot, …
    pub persistence: &'a BTreeMap<crate::names::ModuleName, crate::host::persistence::Persistence>,
    /// … and the host root, so paths are shown as the node has them.
    pub host: &'a crate::host::HostRoot,
    pub source: &'a crate::status::SourceStatus,
    pub modules_supported: bool,
    /// Events were lost within the last [`LOST_ALERT_FOR`].
    pub lost_recently: bool,
    pub lost_total: u64,
    /// Unix time of CLOCK_BOOTTIME zero, to date events.
    pub boot_epoch: SystemTime,
    /// Why the cluster cannot be read, once that has lasted the grace period.
    pub cluster_unreadable: Option<String>,
}

/// The alert of an unmet check: `KernelModuleMonitorHugepagesInsufficient`
/// for the hugepage pool (its name since before the other checks),
/// [`ALERT_NODE_REQUIREMENT`] for the others; the description carries what
/// was found and the fix.
fn check_alert(
    inputs: &AlertInputs<'_>,
    g: &crate::tracker::GroupReport,
    check: &crate::requirements::CheckInfo,
) -> Wanted {
    let name = if g.name == crate::longhorn::v2::HUGEPAGES_REQUIREMENT {
        ALERT_HUGEPAGES
    } else {
        ALERT_NODE_REQUIREMENT
    };
    let mut description = check.detail.clone();
    if let Some(fix) = &check.fix {
        description.push_str(&format!(". Fix: {fix}"));
    }
    Wanted {
        labels: labels(&[
            ("alertname", name),
            ("requirement", &g.name),
            ("instance", inputs.instance),
            ("severity", &g.severity),
        ]),
        annotations: labels(&[
            (
                "summary",
                &format!(
                    "Longhorn requirement {} is not met on {}",
                    g.name, inputs.instance
                ),
            ),
            ("description", &description),
            (
                "runbook_url",
                &format!("{}#{}", inputs.runbook_url, name.to_ascii_lowercase()),
            ),
        ]),
    }
}

/// How long the events-lost alert fires after the last loss.
pub const LOST_ALERT_FOR: Duration = Duration::from_secs(15 * 60);

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn module_line(
    inputs: &AlertInputs<'_>,
    g: &crate::tracker::GroupReport,
    m: &crate::tracker::ModuleReport,
) -> String {
    let mut line = format!("{} is {}", m.name, m.state);
    if let Some(e) = &m.last_event {
        let when = rfc3339(inputs.boot_epoch + Duration::from_nanos(e.boot_ns));
        match &e.actor {
            Some(a) => line.push_str(&format!(
                "; last event: {} by {} (pid {}, uid {}, cgroup {}) at {when}",
                e.kind, a.comm, a.tgid, a.uid, a.cgroup_id
            )),
            None => line.push_str(&format!(
                "; last event: {} at {when} (actor unknown: {} source)",
                e.kind, inputs.source.active
            )),
        }
    }
    let unknown = crate::host::persistence::Persistence::default();
    let persistence = inputs.persistence.get(&m.name).unwrap_or(&unknown);
    let need = crate::remedy::Need::in_group(g, m.state, inputs.persistence);
    if let Some(fix) = crate::remedy::remedy(
        inputs.snapshot,
        inputs.host,
        persistence,
        &m.name,
        m.state,
        need,
    ) {
        line.push_str(&format!(
            ". {}. Fix: {}",
            fix.explanation,
            fix.steps_inline()
        ));
    }
    line
}

/// The alerts that should be firing now.
#[must_use]
pub fn wanted_alerts(inputs: &AlertInputs<'_>) -> Vec<Wanted> {
    let mut out = Vec::new();
    let runbook = |name: &str| format!("{}#{}", inputs.runbook_url, name.to_ascii_lowercase());
    for g in inputs.groups.iter().filter(|g| !g.met) {
        if let Some(check) = &g.check {
            out.push(check_alert(inputs, g, check));
            continue;
        }
        let unmet: Vec<_> = g.modules.iter().filter(|m| !m.state.satisfies()).collect();
        let per_module: Vec<(String, Vec<&crate::tracker::ModuleReport>)> = match g.mode {
            crate::requirements::GroupMode::AllOf
            | crate::requirements::GroupMode::Available
            | crate::requirements::GroupMode::Check => unmet
                .iter()
                .map(|m| (m.name.to_string(), vec![*m]))
                .collect(),
            crate::requirements::GroupMode::AnyOf => vec![(
                g.modules
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join("|"),
                unmet.clone(),
            )],
        };
        for (module, mods) in per_module {
            let summary = match g.mode {
                crate::requirements::GroupMode::AllOf | crate::requirements::GroupMode::Check => {
                    format!(
                        "Kernel module {module} required by {} is not loaded on {}",
                        g.name, inputs.instance
                    )
                }
                crate::requirements::GroupMode::Available => format!(
                    "Kernel module {module} required by {} cannot be loaded on demand on {} (not in this kernel, or blacklisted)",
                    g.name, inputs.instance
                ),
                crate::requirements::GroupMode::AnyOf => format!(
                    "None of the kernel modules {module} required by {} is loaded on {}",
                    g.name, inputs.instance
                ),
            };
            let description = mods
                .iter()
                .map(|m| module_line(inputs, g, m))
                .collect::<Vec<_>>()
                .join("\n");
            out.push(Wanted {
                labels: labels(&[
                    ("alertname", ALERT_UNMET),
                    ("requirement", &g.name),
                    ("module", &module),
                    ("instance", inputs.instance),
                    ("severity", &g.severity),
                ]),
                annotations: labels(&[
                    ("summary", &summary),
                    ("description", &description),
                    ("runbook_url", &runbook(ALERT_UNMET)),
                ]),
            });
        }
    }
    let health = |name: &str, summary: String, description: String| Wanted {
        labels: labels(&[
            ("alertname", name),
            ("instance", inputs.instance),
            ("severity", "warning"),
        ]),
        annotations: labels(&[
            ("summary", &summary),
            ("description", &description),
            ("runbook_url", &runbook(name)),
        ]),
    };
    if let Some(reason) = &inputs.cluster_unreadable {
        out.push(health(
            ALERT_CLUSTER_UNREADABLE,
            format!("kmod-monitor on {} cannot read Longhorn's V2 setting or its node", inputs.instance),
            format!("Whether the V2 data engine's requirements apply here is unknown, so they are not checked; the base requirements are. Why: {reason}"),
        ));
    }
    if inputs.lost_recently {
        out.push(health(
            ALERT_EVENTS_LOST,
            format!("kmod-monitor on {} lost module events", inputs.instance),
            format!(
                "{} events lost in total (ring buffer full or uevent overflow); the state was reconciled from /proc/modules, but who changed what in that window is unknown. Consider a larger ring_buffer_size.",
                inputs.lost_total
            ),
        ));
    }
    if !inputs.modules_supported {
        out.push(health(
            ALERT_NO_MODULE_SUPPORT,
            format!("Kernel on {} cannot load modules", inputs.instance),
            "CONFIG_MODULES is off: only built-in modules can satisfy a requirement, and nothing can be loaded to fix one.".to_owned(),
        ));
    } else if inputs.source.active != crate::source::ActiveKind::Ebpf
        && inputs
            .source
            .unavailable
            .iter()
            .any(|u| u.source == crate::source::ActiveKind::Ebpf)
    {
        // Only a fallback counts: a source chosen on purpose is no fault.
        let why = inputs
            .source
            .unavailable
            .iter()
            .map(|u| format!("{}: {}", u.source, u.reason))
            .collect::<Vec<_>>()
            .join("; ");
        out.push(health(
            ALERT_SOURCE_DEGRADED,
            format!(
                "kmod-monitor on {} fell back from eBPF to the {} source",
                inputs.instance, inputs.source.active
            ),
            format!("Module events are still tracked, but without the actor and with more latency. Why: {why}"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(module: &str) -> Wanted {
        Wanted {
            labels: [("alertname", ALERT_UNMET), ("module", module)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            annotations: Labels::new(),
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn firing_alerts_end_four_intervals_ahead() {
        let mut book = Book::default();
        assert!(book.update(&[wanted("nvme_tcp")], at(0)));
        assert!(
            !book.update(&[wanted("nvme_tcp")], at(10)),
            "still firing: no immediate send"
        );
        let p = book.postable(at(10), Duration::from_secs(60));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].starts_at, "2023-11-14T22:13:20.000Z");
        assert_eq!(p[0].ends_at, "2023-11-14T22:17:30.000Z", "now + 4 × 60 s");
    }

    #[test]
    fn resolution_is_sent_at_once_and_kept_for_five_minutes() {
        let mut book = Book::default();
        book.update(&[wanted("nvme_tcp")], at(0));
        assert!(
            book.update(&[], at(30)),
            "a resolution must be sent at once"
        );
        let p = book.postable(at(31), Duration::from_secs(60));
        assert_eq!(
            p[0].ends_at, "2023-11-14T22:13:50.000Z",
            "endsAt = resolution time"
        );
        book.expire(at(30 + 299));
        assert!(!book.is_empty(), "still re-sent within 5 minutes");
        book.expire(at(30 + 300));
        assert!(book.is_empty());
    }

    #[test]
    fn user_info_is_redacted_from_urls_and_text() {
        assert_eq!(
            redact_userinfo("http://kmod:s3cret@am:9093/p@th"),
            "http://***@am:9093/p@th"
        );
        assert_eq!(redact_userinfo("https://tok@am"), "https://***@am");
        assert_eq!(redact_userinfo("http://am:9093/a@b"), "http://am:9093/a@b");
        assert_eq!(redact_userinfo("not a url"), "not a url");
        assert_eq!(redact_userinfo("http://a b:c d@am"), "http://***@am");
        let url = reqwest::Url::parse("http://u:p@am:9093/").unwrap();
        assert_eq!(redacted(&url), "http://***@am:9093/");
    }

    #[test]
    fn firing_again_starts_a_new_episode() {
        let mut book = Book::default();
        book.update(&[wanted("dm_crypt")], at(0));
        book.update(&[], at(5));
        assert!(book.update(&[wanted("dm_crypt")], at(9)));
        let p = book.postable(at(9), Duration::from_secs(60));
        assert_eq!(p[0].starts_at, "2023-11-14T22:13:29.000Z");
        assert_eq!(p.len(), 1);
    }
}

#[cfg(test)]
mod wanted_tests {
    use super::*;
    use crate::{
        event::{Actor, Kind},
        host::Snapshot,
        names::ModuleName,
        requirements::GroupMode,
        source::{ActiveKind, Unavailable},
        state::ModuleState,
        status::SourceStatus,
        tracker::{GroupReport, LastEvent, ModuleReport},
    };

    fn module(name: &str, state: ModuleState) -> ModuleReport {
        ModuleReport {
            name: ModuleName::parse(name).unwrap(),
            state,
            last_event: None,
        }
    }

    fn group(name: &str, mode: GroupMode, met: bool, modules: Vec<ModuleReport>) -> GroupReport {
        GroupReport {
            name: name.into(),
            mode,
            met,
            severity: "critical".into(),
            modules,
            check: None,
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            kernel_release: "6.1.0-56-amd64".into(),
            modules_supported: true,
            loaded: BTreeMap::new(),
            builtin: std::collections::BTreeSet::new(),
            available: BTreeMap::new(),
            kernel_config: None,
            modules_dir: None,
            warnings: Vec::new(),
        }
    }

    fn source(active: ActiveKind, fell_back: bool) -> SourceStatus {
        SourceStatus {
            active,
            unavailable: if fell_back {
                vec![Unavailable {
                    source: ActiveKind::Ebpf,
                    reason: "no BTF".into(),
                }]
            } else {
                Vec::new()
            },
            details: Vec::new(),
        }
    }

    fn names(alerts: &[Wanted]) -> Vec<(String, String)> {
        alerts
            .iter()
            .map(|a| {
                (
                    a.labels["alertname"].clone(),
                    a.labels.get("module").cloned().unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn one_alert_per_unmet_module_and_one_per_any_of_group() {
        let mut nvme = module("nvme_tcp", ModuleState::Available);
        nvme.last_event = Some(LastEvent {
            kind: Kind::Unload,
            boot_ns: 5_000_000_000,
            applied_ns: 5_000_100_000,
            actor: Some(Actor {
                pid: 105,
                tgid: 105,
                uid: 0,
                gid: 0,
                comm: "rmmod".into(),
                cgroup_id: 1,
            }),
        });
        let groups = vec![
            group(
                "base",
                GroupMode::AllOf,
                true,
                vec![module("dm_crypt", ModuleState::Loaded)],
            ),
            group(
                "v2-data-engine",
                GroupMode::AllOf,
                false,
                vec![
                    module("vfio_pci", ModuleState::Loaded),
                    module("uio_pci_generic", ModuleState::Missing),
                    nvme,
                ],
            ),
            group(
                "spdk-driver",
                GroupMode::AnyOf,
                false,
                vec![
                    module("vfio_pci", ModuleState::Available),
                    module("uio_pci_generic", ModuleState::Missing),
                ],
            ),
        ];
        let snap = snapshot();
        let src = source(ActiveKind::Ebpf, false);
        let alerts = wanted_alerts(&AlertInputs {
            instance: "node-a",
            runbook_url: "https://r",
            groups: &groups,
            snapshot: &snap,
            persistence: &BTreeMap::new(),
            host: &crate::host::HostRoot::default(),
            source: &src,
            modules_supported: true,
            lost_recently: false,
            lost_total: 0,
            boot_epoch: SystemTime::UNIX_EPOCH,
            cluster_unreadable: None,
        });
        assert_eq!(
            names(&alerts),
            [
                (ALERT_UNMET.to_owned(), "uio_pci_generic".to_owned()),
                (ALERT_UNMET.to_owned(), "nvme_tcp".to_owned()),
                (
                    ALERT_UNMET.to_owned(),
                    "vfio_pci|uio_pci_generic".to_owned()
                ),
            ]
        );
        let nvme = &alerts[1];
        assert_eq!(nvme.labels["requirement"], "v2-data-engine");
        assert_eq!(nvme.labels["instance"], "node-a");
        assert_eq!(nvme.labels["severity"], "critical");
        let d = &nvme.annotations["description"];
        assert!(d.contains("unload by rmmod (pid 105, uid 0"), "{d}");
        assert!(d.contains("1970-01-01T00:00:05.000Z"), "{d}");
        assert!(
            d.contains("`modprobe nvme_tcp`") || d.contains("not in kernel"),
            "{d}"
        );
        assert_eq!(
            nvme.annotations["runbook_url"],
            "https://r#kernelmodulerequirementunmet"
        );
        assert!(alerts[2].annotations["description"].contains("vfio_pci is available"));
    }

    #[test]
    fn the_fix_in_a_description_is_the_one_that_works_with_node_paths() {
        // nvme_tcp unloaded, and `install nvme_tcp /bin/false` in the
        // host's modprobe.d, read under /host: `modprobe nvme_tcp` alone
        // would run /bin/false.
        let host = crate::host::HostRoot::new("/host");
        let file = host.locate(std::path::Path::new("/host/etc/modprobe.d/x.conf"));
        let persistence: BTreeMap<ModuleName, crate::host::persistence::Persistence> = [(
            ModuleName::parse("nvme_tcp").unwrap(),
            crate::host::persistence::Persistence {
                persistent: false,
                sources: Vec::new(),
                blocked_by: vec![crate::host::persistence::Block::InstallDisabled {
                    file,
                    line: 3,
                    last_line: 3,
                    text: "install nvme_tcp /bin/false".into(),
                    command: "/bin/false".into(),
                }],
            },
        )]
        .into();
        let groups = vec![group(
            "v2-data-engine",
            GroupMode::AllOf,
            false,
            vec![module("nvme_tcp", ModuleState::Available)],
        )];
        let snap = snapshot();
        let src = source(ActiveKind::Ebpf, false);
        let alerts = wanted_alerts(&AlertInputs {
            instance: "node-a",
            runbook_url: "https://r",
            groups: &groups,
            snapshot: &snap,
            persistence: &persistence,
            host: &host,
            source: &src,
            modules_supported: true,
            lost_recently: false,
            lost_total: 0,
            boot_epoch: SystemTime::UNIX_EPOCH,
            cluster_unreadable: None,
        });
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(
            alerts[0].annotations["description"],
            "nvme_tcp is available. nvme_tcp is available for kernel 6.1.0-56-amd64 but not \
             loaded; modprobe cannot load it: disabled by `install ... /bin/false` in \
             /etc/modprobe.d/x.conf line 3 (modprobe runs the command instead of loading it); \
             nothing loads nvme_tcp at boot. Fix: in /etc/modprobe.d/x.conf, delete line 3 \
             (`install nvme_tcp /bin/false`); then `modprobe nvme_tcp`; then `echo nvme_tcp >> \
             /etc/modules-load.d/kmod-monitor.conf`"
        );
    }

    #[test]
    fn health_alerts() {
        let snap = snapshot();
        let run = |src: &SourceStatus, supported: bool, lost: bool| {
            names(&wanted_alerts(&AlertInputs {
                instance: "n",
                runbook_url: "r",
                groups: &[],
                snapshot: &snap,
                persistence: &BTreeMap::new(),
                host: &crate::host::HostRoot::default(),
                source: src,
                modules_supported: supported,
                lost_recently: lost,
                lost_total: 3,
                boot_epoch: SystemTime::UNIX_EPOCH,
                cluster_unreadable: None,
            }))
            .into_iter()
            .map(|(a, _)| a)
            .collect::<Vec<_>>()
        };
        assert!(
            run(&source(ActiveKind::Poll, false), true, false).is_empty(),
            "poll chosen on purpose"
        );
        assert_eq!(
            run(&source(ActiveKind::Uevent, true), true, false),
            [ALERT_SOURCE_DEGRADED]
        );
        assert_eq!(
            run(&source(ActiveKind::Ebpf, false), true, true),
            [ALERT_EVENTS_LOST]
        );
        assert_eq!(
            run(&source(ActiveKind::Uevent, true), false, false),
            [ALERT_NO_MODULE_SUPPORT]
        );
    }

    #[test]
    fn check_and_cluster_alerts() {
        let snap = snapshot();
        let src = source(ActiveKind::Ebpf, false);
        let check = |name: &str, severity: &str, detail: &str, fix: &str| GroupReport {
            name: name.into(),
            mode: GroupMode::Check,
            met: false,
            severity: severity.into(),
            modules: Vec::new(),
            check: Some(crate::requirements::CheckInfo {
                level: crate::requirements::Level::Required,
                detail: detail.into(),
                fix: Some(fix.into()),
                source: "test".into(),
            }),
        };
        let groups = [
            check(
                "v2-hugepages",
                "warning",
                "512 of 1024 2 MiB hugepages in the pool",
                "sysctl -w vm.nr_hugepages=1024",
            ),
            check(
                "v2-iommu",
                "critical",
                "0 IOMMU groups in /sys/kernel/iommu_groups",
                "add intel_iommu=on iommu=pt",
            ),
        ];
        let alerts = wanted_alerts(&AlertInputs {
            instance: "node-a",
            runbook_url: "https://r",
            groups: &groups,
            snapshot: &snap,
            persistence: &BTreeMap::new(),
            host: &crate::host::HostRoot::default(),
            source: &src,
            modules_supported: true,
            lost_recently: false,
            lost_total: 0,
            boot_epoch: SystemTime::UNIX_EPOCH,
            cluster_unreadable: Some("settings.longhorn.io: forbidden by RBAC (403)".to_owned()),
        });
        assert_eq!(alerts.len(), 3, "{alerts:?}");
        let h = &alerts[0];
        assert_eq!(h.labels["alertname"], ALERT_HUGEPAGES);
        assert_eq!(h.labels["requirement"], "v2-hugepages");
        assert_eq!(h.labels["severity"], "warning");
        assert!(
            h.annotations["description"].contains("512 of 1024"),
            "{h:?}"
        );
        assert!(
            h.annotations["description"].contains("vm.nr_hugepages=1024"),
            "{h:?}"
        );
        let i = &alerts[1];
        assert_eq!(i.labels["alertname"], ALERT_NODE_REQUIREMENT);
        assert_eq!(
            (
                i.labels["requirement"].as_str(),
                i.labels["severity"].as_str()
            ),
            ("v2-iommu", "critical")
        );
        assert!(
            i.annotations["description"].contains("Fix: add intel_iommu=on"),
            "{i:?}"
        );
        assert!(i.annotations["runbook_url"].ends_with("#longhornnoderequirementunmet"));
        let c = &alerts[2];
        assert_eq!(c.labels["alertname"], ALERT_CLUSTER_UNREADABLE);
        assert!(
            c.annotations["description"].contains("forbidden by RBAC (403)"),
            "{c:?}"
        );
    }
}
