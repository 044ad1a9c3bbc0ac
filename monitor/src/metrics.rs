//! Prometheus metrics (OpenMetrics text via prometheus-client). The names
//! and labels are a contract users build dashboards and rules on; every
//! series that can exist is exported from the start with value 0.
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::{
    event::Kind,
    names::ModuleName,
    source::ActiveKind,
    state::ModuleState,
    tracker::{GroupReport, Outcome},
};

/// A module name as a label value, as it reads.
impl EncodeLabelValue for ModuleName {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Content type of `GET /metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The event kinds the event counters carry (the contract's `event` label).
pub const EVENT_LABELS: [Kind; 5] = [
    Kind::Load,
    Kind::Loaded,
    Kind::LoadFailed,
    Kind::Unload,
    Kind::Request,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequirementLabels {
    requirement: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModuleRequirementLabels {
    module: String,
    requirement: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModuleLabels {
    module: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModuleStateLabels {
    module: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModuleEventLabels {
    // Neither allocates: an event's count is looked up on the event loop
    // for every event (a module name of up to 24 bytes, as Longhorn's all
    // are, is held inline).
    module: ModuleName,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequirementInfoLabels {
    requirement: String,
    /// `modules` (a module group) or `check` (a host or cluster check).
    kind: String,
    severity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// The `reason` label values of `kmod_monitor_kernel_filtered_total`.
pub const FILTERED_REQUEST_UNTRACKED: &str = "request_untracked";
/// See [`FILTERED_REQUEST_UNTRACKED`].
pub const FILTERED_DENIED_OVER_LIMIT: &str = "unload_denied_over_limit";

/// The `reason` label values of `kmod_monitor_kernel_lost_total`, in the
/// order of `kernel_lost_seen`.
pub const KERNEL_LOST_REASONS: [&str; 3] =
    ["ring_reserve_failed", "name_unreadable", "layout_unset"];

/// Every `source` label of `requirement_enabled`.
const ENABLED_SOURCES: [&str; 6] = [
    "flag",
    "node-label",
    "longhorn-setting",
    "config",
    "default",
    "unknown",
];

/// A series without labels that may be absent (an empty label list).
type NoLabels = Vec<(String, String)>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnabledLabels {
    requirement: String,
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
    table_row: String,
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    kernel_release: String,
}

/// Result label values of `kmod_monitor_alert_deliveries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Alertmanager accepted the POST (2xx).
    Success,
    /// The POST failed (connection, timeout, non-2xx).
    Failure,
}

impl Delivery {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }
}

/// `kind` label values of `kmod_monitor_k8s_writes_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum K8sWrite {
    /// The Node condition (server-side apply on `nodes/status`), and the
    /// read of the Node that precedes the first one.
    Condition,
    /// The opt-in node labels (server-side apply on the Node).
    Labels,
    /// An Event created, or its series patched.
    Event,
}

impl K8sWrite {
    /// Every kind, for the series exported from the start.
    pub const ALL: [Self; 3] = [Self::Condition, Self::Labels, Self::Event];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Condition => "condition",
            Self::Labels => "labels",
            Self::Event => "event",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct K8sWriteLabels {
    kind: String,
    result: String,
}

/// The label sets of per-group series created so far.
#[derive(Default)]
struct Known {
    requirements: Vec<RequirementLabels>,
    infos: Vec<RequirementInfoLabels>,
    module_requirements: Vec<ModuleRequirementLabels>,
    modules: std::collections::BTreeSet<ModuleName>,
    version: Option<VersionLabels>,
}

/// Every metric of the daemon.
pub struct Metrics {
    registry: Registry,
    requirement_met: Family<RequirementLabels, Gauge>,
    requirement_info: Family<RequirementInfoLabels, Gauge>,
    module_loaded: Family<ModuleRequirementLabels, Gauge>,
    module_state: Family<ModuleStateLabels, Gauge>,
    module_events: Family<ModuleEventLabels, Counter>,
    events: Family<EventLabels, Counter>,
    events_lost: Counter,
    /// What `events_lost` was last raised to (sources report running totals).
    lost_seen: AtomicU64,
    drift: Counter,
    source_info: Family<SourceLabels, Gauge>,
    latency: Histogram,
    last_transition: Family<RequirementLabels, Gauge<f64, AtomicU64>>,
    alert_deliveries: Family<ResultLabels, Counter>,
    build_info: Family<BuildLabels, Gauge>,
    module_persistent: Family<ModuleLabels, Gauge>,
    log_degraded: Gauge,
    log_write_errors: Counter,
    log_dropped: Counter,
    requirement_enabled: Family<EnabledLabels, Gauge>,
    /// No series while the cluster watch is off.
    setting_readable: Family<NoLabels, Gauge>,
    node_readable: Family<NoLabels, Gauge>,
    hugepages: Family<KindLabels, Gauge>,
    longhorn_version: Family<VersionLabels, Gauge>,
    /// What `log_write_errors` was last raised to (the log reports a total).
    log_errors_seen: AtomicU64,
    unload_denied: Family<ModuleLabels, Counter>,
    kernel_filtered: Family<ReasonLabels, Counter>,
    /// What each `kernel_filtered` series was last raised to.
    filtered_seen: [AtomicU64; 2],
    kernel_lost: Family<ReasonLabels, Counter>,
    /// What each `kernel_lost` series was last raised to.
    kernel_lost_seen: [AtomicU64; 3],
    events_ignored: Counter,
    /// What `log_dropped` was last raised to (the log reports a total).
    log_dropped_seen: AtomicU64,
    k8s_writes: Family<K8sWriteLabels, Counter>,
    known: std::sync::Mutex<Known>,
}

impl Metrics {
    /// Registers every metric under the `kmod_monitor_` prefix.
    #[must_use]
    pub fn new(kernel_release: &str) -> Self {
        let mut registry = Registry::with_prefix("kmod_monitor");
        let m = Self {
            requirement_met: Family::default(),
            requirement_info: Family::default(),
            module_loaded: Family::default(),
            module_state: Family::default(),
            module_events: Family::default(),
            events: Family::default(),
            events_lost: Counter::default(),
            lost_seen: AtomicU64::new(0),
            drift: Counter::default(),
            source_info: Family::default(),
            // 10 µs .. ~42 s: eBPF deliveries sit at the low end, polls at
            // the high end.
            latency: Histogram::new(exponential_buckets(0.000_01, 4.0, 12)),
            last_transition: Family::default(),
            alert_deliveries: Family::default(),
            build_info: Family::default(),
            module_persistent: Family::default(),
            log_degraded: Gauge::default(),
            log_write_errors: Counter::default(),
            log_dropped: Counter::default(),
            requirement_enabled: Family::default(),
            setting_readable: Family::default(),
            node_readable: Family::default(),
            hugepages: Family::default(),
            longhorn_version: Family::default(),
            log_errors_seen: AtomicU64::new(0),
            unload_denied: Family::default(),
            kernel_filtered: Family::default(),
            filtered_seen: [AtomicU64::new(0), AtomicU64::new(0)],
            kernel_lost: Family::default(),
            kernel_lost_seen: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            events_ignored: Counter::default(),
            log_dropped_seen: AtomicU64::new(0),
            k8s_writes: Family::default(),
            known: std::sync::Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requirement_met",
            "1 when the requirement group is met on this node",
            m.requirement_met.clone(),
        );
        registry.register(
            "requirement_info",
            "1 for every requirement in force, with its kind (modules or check) and severity, for rules to join on",
            m.requirement_info.clone(),
        );
        registry.register(
            "module_loaded",
            "1 when the required module is loaded or built in",
            m.module_loaded.clone(),
        );
        registry.register(
            "module_state",
            "State of each required module: exactly one state series is 1",
            m.module_state.clone(),
        );
        registry.register(
            "module_events",
            "Events about required modules",
            m.module_events.clone(),
        );
        registry.register("events", "Module events of all modules", m.events.clone());
        registry.register(
            "events_lost",
            "Module events lost (in-kernel ring buffer full, or netlink overflow)",
            m.events_lost.clone(),
        );
        registry.register(
            "reconcile_drift",
            "Differences between the tracked state and /proc/modules found by the reconcile",
            m.drift.clone(),
        );
        registry.register(
            "event_source_info",
            "1 for the event source in use (ebpf, uevent, poll)",
            m.source_info.clone(),
        );
        registry.register_with_unit(
            "event_delivery_latency",
            "From the event's timestamp (in-kernel for eBPF) to the state update",
            Unit::Seconds,
            m.latency.clone(),
        );
        registry.register_with_unit(
            "requirement_last_transition_timestamp",
            "Unix time of the requirement group's last change of verdict",
            Unit::Seconds,
            m.last_transition.clone(),
        );
        registry.register(
            "alert_deliveries",
            "Alertmanager POSTs by result",
            m.alert_deliveries.clone(),
        );
        registry.register(
            "build_info",
            "Version of kmod-monitor and the kernel it watches",
            m.build_info.clone(),
        );
        registry.register(
            "module_persistent",
            "1 when the required module will be there after a reboot (built in, modules-load.d, /etc/modules or the kernel command line, and not blocked)",
            m.module_persistent.clone(),
        );
        registry.register(
            "event_log_degraded",
            "1 while forensic log writes fail (records are held in memory and retried)",
            m.log_degraded.clone(),
        );
        registry.register(
            "event_log_write_errors",
            "Failed forensic log writes and fsyncs",
            m.log_write_errors.clone(),
        );
        registry.register(
            "event_log_dropped",
            "Forensic log records dropped because the records waiting for the disk filled --event-log-buffer-bytes",
            m.log_dropped.clone(),
        );
        registry.register(
            "requirement_enabled",
            "1 when the requirement applies to this node, 0 when not; source says which input decided (flag, node-label, longhorn-setting, config, default), or unknown",
            m.requirement_enabled.clone(),
        );
        registry.register(
            "longhorn_setting_readable",
            "1 when Longhorn's settings can be read from the API server, 0 when not (no series while the cluster watch is off)",
            m.setting_readable.clone(),
        );
        registry.register(
            "longhorn_node_readable",
            "1 when this node's labels can be read from the API server, 0 when not (no series while the cluster watch is off)",
            m.node_readable.clone(),
        );
        registry.register(
            "longhorn_version_info",
            "1 for the Longhorn version whose node requirements are judged: version, the table row in force, and source (flag, config, cluster, default)",
            m.longhorn_version.clone(),
        );
        registry.register(
            "hugepages_2mi",
            "The 2 MiB hugepage pool in pages: total, free, reserved",
            m.hugepages.clone(),
        );
        registry.register(
            "unload_denied",
            "Attempts to unload a required module refused for lack of CAP_SYS_MODULE, as the kernel reported them (the kernel rate-limits; see kernel_filtered)",
            m.unload_denied.clone(),
        );
        registry.register(
            "kernel_filtered",
            "Events the eBPF program kept out of the ring buffer on purpose: module requests for names nothing requires, refused unloads over the per-CPU rate limit",
            m.kernel_filtered.clone(),
        );
        registry.register(
            "events_ignored",
            "Well-formed kernel events that cannot be about a module (a name no module can have); not a loss",
            m.events_ignored.clone(),
        );
        registry.register(
            "k8s_writes",
            "Writes to the Kubernetes API (kind: condition, labels, event) by result (success, failure); failures are retried with back-off",
            m.k8s_writes.clone(),
        );
        for kind in K8sWrite::ALL {
            for result in ["success", "failure"] {
                let _ = m.k8s_writes.get_or_create(&K8sWriteLabels {
                    kind: kind.as_str().into(),
                    result: result.into(),
                });
            }
        }
        registry.register(
            "kernel_lost",
            "Events the eBPF program could not deliver, by reason: ring_reserve_failed (the event ring was full), name_unreadable, layout_unset (a field the loader did not set); each is also in events_lost, and the program logs each kind at most once a second per CPU",
            m.kernel_lost.clone(),
        );
        for reason in KERNEL_LOST_REASONS {
            let _ = m.kernel_lost.get_or_create(&ReasonLabels {
                reason: reason.into(),
            });
        }
        for reason in [FILTERED_REQUEST_UNTRACKED, FILTERED_DENIED_OVER_LIMIT] {
            let _ = m.kernel_filtered.get_or_create(&ReasonLabels {
                reason: reason.into(),
            });
        }
        for result in [Delivery::Success, Delivery::Failure] {
            let _ = m.alert_deliveries.get_or_create(&ResultLabels {
                result: result.as_str().into(),
            });
        }
        for kind in EVENT_LABELS {
            let _ = m.events.get_or_create(&EventLabels {
                event: kind.as_str(),
            });
        }
        m.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
                kernel_release: kernel_release.into(),
            })
            .set(1);
        Self { registry, ..m }
    }

    /// Sets the source series: 1 for `active`, 0 for the others.
    pub fn set_source(&self, active: ActiveKind) {
        for kind in ActiveKind::ALL {
            self.source_info
                .get_or_create(&SourceLabels {
                    source: kind.as_str().into(),
                })
                .set(i64::from(kind == active));
        }
    }

    /// Makes the per-group and per-module series match `groups`: creates
    /// every series of the enabled groups and removes those of groups and
    /// modules that are gone (config reload).
    pub fn set_groups(&self, groups: &[GroupReport], now_unix: f64) {
        let mut keep_req = Vec::new();
        let mut keep_info = Vec::new();
        let mut keep_mod_req = Vec::new();
        let mut keep_mod = std::collections::BTreeSet::new();
        for g in groups {
            let req = RequirementLabels {
                requirement: g.name.clone(),
            };
            let met = i64::from(g.met);
            let gauge = self.requirement_met.get_or_create(&req);
            let before = gauge.set(met);
            drop(gauge);
            let transition = self.last_transition.get_or_create(&req);
            if before != met || transition.get() == 0.0 {
                transition.set(now_unix);
            }
            drop(transition);
            keep_req.push(req);
            let info = RequirementInfoLabels {
                requirement: g.name.clone(),
                kind: if g.check.is_some() {
                    "check"
                } else {
                    "modules"
                }
                .into(),
                severity: g.severity.clone(),
            };
            self.requirement_info.get_or_create(&info).set(1);
            keep_info.push(info);
            for m in &g.modules {
                let labels = ModuleRequirementLabels {
                    module: m.name.to_string(),
                    requirement: g.name.clone(),
                };
                self.module_loaded
                    .get_or_create(&labels)
                    .set(i64::from(m.state.satisfies()));
                keep_mod_req.push(labels);
                if keep_mod.insert(m.name.clone()) {
                    for state in ModuleState::ALL {
                        self.module_state
                            .get_or_create(&ModuleStateLabels {
                                module: m.name.to_string(),
                                state: state.as_str().into(),
                            })
                            .set(i64::from(state == m.state));
                    }
                    for kind in EVENT_LABELS {
                        let _ = self.module_events.get_or_create(&ModuleEventLabels {
                            module: m.name.clone(),
                            event: kind.as_str(),
                        });
                    }
                    let _ = self.unload_denied.get_or_create(&ModuleLabels {
                        module: m.name.to_string(),
                    });
                }
            }
        }
        // Family cannot be iterated, so remove what the previous call
        // created and this one did not.
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for req in known.requirements.iter().filter(|r| !keep_req.contains(r)) {
            self.requirement_met.remove(req);
            self.last_transition.remove(req);
        }
        for info in known.infos.iter().filter(|i| !keep_info.contains(i)) {
            self.requirement_info.remove(info);
        }
        for l in known
            .module_requirements
            .iter()
            .filter(|l| !keep_mod_req.contains(l))
        {
            self.module_loaded.remove(l);
        }
        for module in known.modules.iter().filter(|m| !keep_mod.contains(*m)) {
            for state in ModuleState::ALL {
                self.module_state.remove(&ModuleStateLabels {
                    module: module.to_string(),
                    state: state.as_str().into(),
                });
            }
            for kind in EVENT_LABELS {
                self.module_events.remove(&ModuleEventLabels {
                    module: module.clone(),
                    event: kind.as_str(),
                });
            }
            self.module_persistent.remove(&ModuleLabels {
                module: module.to_string(),
            });
            self.unload_denied.remove(&ModuleLabels {
                module: module.to_string(),
            });
        }
        known.requirements = keep_req;
        known.infos = keep_info;
        known.module_requirements = keep_mod_req;
        known.modules = keep_mod;
    }

    /// Sets whether each required module survives a reboot.
    pub fn set_persistent<'a>(&self, modules: impl IntoIterator<Item = (&'a str, bool)>) {
        for (module, persistent) in modules {
            self.module_persistent
                .get_or_create(&ModuleLabels {
                    module: module.to_owned(),
                })
                .set(i64::from(persistent));
        }
    }

    /// Counts an applied event and its delivery latency.
    pub fn on_event(&self, outcome: &Outcome, latency_secs: Option<f64>) {
        if let Some(secs) = latency_secs {
            self.latency.observe(secs);
        }
        let Some(kind) = outcome.kind else { return };
        if !EVENT_LABELS.contains(&kind) {
            return;
        }
        self.events
            .get_or_create(&EventLabels {
                event: kind.as_str(),
            })
            .inc();
        if outcome.required {
            self.module_events
                .get_or_create(&ModuleEventLabels {
                    module: outcome.module.clone(),
                    event: kind.as_str(),
                })
                .inc();
        }
    }

    /// Counts a `module_request` for an alias (no module to attribute).
    pub fn on_alias_request(&self) {
        self.events
            .get_or_create(&EventLabels {
                event: Kind::Request.as_str(),
            })
            .inc();
    }

    /// Raises the loss counter to a source's running total.
    pub fn set_lost_total(&self, total: u64) {
        let seen = self.lost_seen.fetch_max(total, Ordering::Relaxed);
        if total > seen {
            self.events_lost.inc_by(total - seen);
        }
    }

    /// Counts a refused unload of `module`.
    pub fn on_unload_denied(&self, module: &str) {
        self.unload_denied
            .get_or_create(&ModuleLabels {
                module: module.into(),
            })
            .inc();
    }

    /// Raises the kernel-filtered counters to the program's running totals.
    pub fn set_kernel_filtered(&self, requests_untracked: u64, denied_over_limit: u64) {
        for (i, (reason, total)) in [
            (FILTERED_REQUEST_UNTRACKED, requests_untracked),
            (FILTERED_DENIED_OVER_LIMIT, denied_over_limit),
        ]
        .into_iter()
        .enumerate()
        {
            let seen = self.filtered_seen[i].fetch_max(total, Ordering::Relaxed);
            if total > seen {
                self.kernel_filtered
                    .get_or_create(&ReasonLabels {
                        reason: reason.into(),
                    })
                    .inc_by(total - seen);
            }
        }
    }

    /// Raises the kernel-lost counters to the program's running totals.
    /// `totals` are in [`KERNEL_LOST_REASONS`]' order.
    pub fn set_kernel_lost(&self, totals: [u64; 3]) {
        for ((reason, total), seen) in KERNEL_LOST_REASONS
            .into_iter()
            .zip(totals)
            .zip(&self.kernel_lost_seen)
        {
            let before = seen.fetch_max(total, Ordering::Relaxed);
            if total > before {
                self.kernel_lost
                    .get_or_create(&ReasonLabels {
                        reason: reason.into(),
                    })
                    .inc_by(total - before);
            }
        }
    }

    /// Counts an event that cannot be about a module.
    pub fn on_ignored(&self) {
        self.events_ignored.inc();
    }

    /// Counts events lost outside the sources' totals (undecodable records).
    pub fn add_lost(&self, n: u64) {
        self.events_lost.inc_by(n);
    }

    /// Mirrors the forensic log's health: degraded now, and its running
    /// total of write errors.
    pub fn set_event_log(&self, degraded: bool, write_errors_total: u64) {
        self.log_degraded.set(i64::from(degraded));
        let seen = self
            .log_errors_seen
            .fetch_max(write_errors_total, Ordering::Relaxed);
        if write_errors_total > seen {
            self.log_write_errors.inc_by(write_errors_total - seen);
        }
    }

    /// Raises the dropped-records counter to the forensic log's running
    /// total.
    pub fn set_event_log_dropped(&self, dropped_total: u64) {
        let seen = self
            .log_dropped_seen
            .fetch_max(dropped_total, Ordering::Relaxed);
        if dropped_total > seen {
            self.log_dropped.inc_by(dropped_total - seen);
        }
    }

    /// One series per requirement, labelled with the deciding source.
    pub fn set_enabled<'a>(
        &self,
        decisions: impl IntoIterator<Item = (&'a str, &'a crate::longhorn::Decision)>,
    ) {
        // Replace only what changed: clearing the family would leave a
        // scrape in between without the series (and restart `for:`).
        for (requirement, d) in decisions {
            let source = match d.enabled {
                Some(_) => d.source.as_str(),
                None => "unknown",
            };
            for other in ENABLED_SOURCES.iter().filter(|s| **s != source) {
                self.requirement_enabled.remove(&EnabledLabels {
                    requirement: requirement.to_owned(),
                    source: (*other).to_owned(),
                });
            }
            self.requirement_enabled
                .get_or_create(&EnabledLabels {
                    requirement: requirement.to_owned(),
                    source: source.to_owned(),
                })
                .set(i64::from(d.enabled == Some(true)));
        }
    }

    /// Whether the settings and the node can be read; `None` = watch off.
    pub fn set_cluster_readable(&self, readable: Option<(bool, bool)>) {
        match readable {
            Some((settings, node)) => {
                self.setting_readable
                    .get_or_create(&NoLabels::new())
                    .set(i64::from(settings));
                self.node_readable
                    .get_or_create(&NoLabels::new())
                    .set(i64::from(node));
            }
            None => {
                self.setting_readable.clear();
                self.node_readable.clear();
            }
        }
    }

    /// The Longhorn version in force: one series, replaced when it changes.
    pub fn set_longhorn_version(&self, version: &str, table_row: &str, source: &str) {
        let labels = VersionLabels {
            version: version.to_owned(),
            table_row: table_row.to_owned(),
            source: source.to_owned(),
        };
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.version.as_ref() == Some(&labels) {
            return;
        }
        if let Some(old) = known.version.replace(labels.clone()) {
            self.longhorn_version.remove(&old);
        }
        self.longhorn_version.get_or_create(&labels).set(1);
    }

    /// The 2 MiB pool; no series when it cannot be read.
    pub fn set_hugepages(&self, pool: Option<&crate::host::hugepages::Hugepages2Mi>) {
        let Some(p) = pool else {
            self.hugepages.clear();
            return;
        };
        for (kind, value) in [
            ("total", p.total),
            ("free", p.free),
            ("reserved", p.reserved),
        ] {
            self.hugepages
                .get_or_create(&KindLabels {
                    kind: kind.to_owned(),
                })
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    pub fn inc_drift(&self) {
        self.drift.inc();
    }

    pub fn alert_delivery(&self, result: Delivery) {
        self.alert_deliveries
            .get_or_create(&ResultLabels {
                result: result.as_str().into(),
            })
            .inc();
    }

    /// Counts one write to the Kubernetes API.
    pub fn k8s_write(&self, kind: K8sWrite, success: bool) {
        self.k8s_writes
            .get_or_create(&K8sWriteLabels {
                kind: kind.as_str().into(),
                result: if success { "success" } else { "failure" }.into(),
            })
            .inc();
    }

    /// The OpenMetrics text.
    ///
    /// # Errors
    /// Only if formatting into a String fails, which it does not.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(8192);
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{names::ModuleName, requirements::GroupMode, tracker::ModuleReport};

    fn report(name: &str, met: bool, modules: &[(&str, ModuleState)]) -> GroupReport {
        GroupReport {
            name: name.into(),
            mode: GroupMode::AllOf,
            met,
            severity: "critical".into(),
            modules: modules
                .iter()
                .map(|(m, s)| ModuleReport {
                    name: ModuleName::parse(m).unwrap(),
                    state: *s,
                    last_event: None,
                })
                .collect(),
            check: None,
        }
    }

    fn lines_with<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn kernel_lost_starts_at_zero_per_reason_and_follows_the_totals() {
        let m = Metrics::new("6.1.0-56-amd64");
        let text = m.encode().unwrap();
        for reason in KERNEL_LOST_REASONS {
            assert!(
                text.contains(&format!(
                    "kmod_monitor_kernel_lost_total{{reason=\"{reason}\"}} 0\n"
                )),
                "{reason}: {text}"
            );
        }
        m.set_kernel_lost([2, 0, 5]);
        m.set_kernel_lost([3, 0, 5]);
        // A total never goes down, even if asked.
        m.set_kernel_lost([1, 0, 4]);
        let text = m.encode().unwrap();
        for (reason, want) in KERNEL_LOST_REASONS.into_iter().zip([3, 0, 5]) {
            assert!(
                text.contains(&format!(
                    "kmod_monitor_kernel_lost_total{{reason=\"{reason}\"}} {want}\n"
                )),
                "{reason}: {text}"
            );
        }
    }

    #[test]
    fn every_series_exists_from_the_start() {
        let m = Metrics::new("6.1.0-56-amd64");
        m.set_source(ActiveKind::Ebpf);
        m.set_groups(
            &[
                report("base", true, &[("dm_crypt", ModuleState::Loaded)]),
                report(
                    "v2-data-engine",
                    false,
                    &[("nvme_tcp", ModuleState::Available)],
                ),
            ],
            1000.0,
        );
        let text = m.encode().unwrap();
        assert!(text.contains("kmod_monitor_requirement_met{requirement=\"base\"} 1"));
        assert!(text.contains("kmod_monitor_requirement_met{requirement=\"v2-data-engine\"} 0"));
        assert!(text.contains(
            "kmod_monitor_module_loaded{module=\"nvme_tcp\",requirement=\"v2-data-engine\"} 0"
        ));
        // One series per state per module, exactly one of them 1.
        let states = lines_with(&text, "kmod_monitor_module_state{module=\"nvme_tcp\"");
        assert_eq!(states.len(), 6, "{states:?}");
        assert_eq!(states.iter().filter(|l| l.ends_with(" 1")).count(), 1);
        assert!(
            text.contains("kmod_monitor_module_state{module=\"nvme_tcp\",state=\"available\"} 1")
        );
        assert_eq!(
            lines_with(&text, "kmod_monitor_module_events_total{").len(),
            10
        );
        assert_eq!(lines_with(&text, "kmod_monitor_events_total{").len(), 5);
        assert!(text.contains("kmod_monitor_events_lost_total 0"));
        assert!(text.contains("kmod_monitor_reconcile_drift_total 0"));
        assert!(text.contains("kmod_monitor_event_source_info{source=\"ebpf\"} 1"));
        assert!(text.contains("kmod_monitor_event_source_info{source=\"poll\"} 0"));
        assert!(text.contains("kmod_monitor_event_delivery_latency_seconds_count 0"));
        assert!(text.contains("kmod_monitor_requirement_last_transition_timestamp_seconds{requirement=\"base\"} 1000.0"));
        assert!(text.contains("kmod_monitor_alert_deliveries_total{result=\"failure\"} 0"));
        assert!(text.contains("kmod_monitor_build_info{version=\""));
        assert!(text.contains("kmod_monitor_event_log_degraded 0"));
        assert!(text.contains("kmod_monitor_event_log_write_errors_total 0"));
        assert!(text.contains("kmod_monitor_event_log_dropped_total 0"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn transitions_stamp_time_and_reload_drops_old_series() {
        let m = Metrics::new("6.1");
        let base = |met, s| report("base", met, &[("dm_crypt", s)]);
        m.set_groups(&[base(true, ModuleState::Loaded)], 10.0);
        m.set_groups(&[base(true, ModuleState::Loaded)], 20.0);
        let text = m.encode().unwrap();
        assert!(
            text.contains("last_transition_timestamp_seconds{requirement=\"base\"} 10.0"),
            "no change, no new stamp"
        );
        m.set_groups(&[base(false, ModuleState::Available)], 30.0);
        let text = m.encode().unwrap();
        assert!(text.contains("last_transition_timestamp_seconds{requirement=\"base\"} 30.0"));
        m.set_groups(
            &[report("other", true, &[("nvme_tcp", ModuleState::Builtin)])],
            40.0,
        );
        let text = m.encode().unwrap();
        assert!(
            !text.contains("dm_crypt"),
            "series of a dropped group's modules are removed"
        );
        assert!(!text.contains("requirement=\"base\""));
        assert!(
            text.contains(
                "kmod_monitor_module_loaded{module=\"nvme_tcp\",requirement=\"other\"} 1"
            )
        );
    }

    #[test]
    fn event_log_health_follows_the_log_status() {
        let m = Metrics::new("6.1");
        m.set_event_log(true, 3);
        m.set_event_log(true, 3);
        let text = m.encode().unwrap();
        assert!(text.contains("kmod_monitor_event_log_degraded 1"), "{text}");
        assert!(
            text.contains("kmod_monitor_event_log_write_errors_total 3"),
            "{text}"
        );
        m.set_event_log(false, 5);
        let text = m.encode().unwrap();
        assert!(text.contains("kmod_monitor_event_log_degraded 0"), "{text}");
        assert!(
            text.contains("kmod_monitor_event_log_write_errors_total 5"),
            "{text}"
        );
        m.set_event_log_dropped(40);
        m.set_event_log_dropped(40);
        m.set_event_log_dropped(42);
        let text = m.encode().unwrap();
        assert!(
            text.contains("kmod_monitor_event_log_dropped_total 42"),
            "{text}"
        );
    }

    #[test]
    fn lost_counter_follows_running_totals() {
        let m = Metrics::new("6.1");
        m.set_lost_total(5);
        m.set_lost_total(3);
        m.set_lost_total(7);
        m.add_lost(1);
        assert!(
            m.encode()
                .unwrap()
                .contains("kmod_monitor_events_lost_total 8")
        );
    }
}
