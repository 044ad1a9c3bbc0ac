//! kmod-monitor: watches the kernel modules Longhorn nodes need, from eBPF
//! module tracepoints (or uevents, or polling), and reports per requirement
//! group whether the node is fit.
//!
//! Layout, one concern per module:
//! - [`names`]: module-name validation and normalisation (`-` == `_`).
//! - [`host`]: everything read from the host (or `--host-root`): /proc/modules,
//!   modules.builtin, modules.dep, kernel config, initstate; the start-up
//!   snapshot.
//! - [`config`]: the TOML config file, validated into requirement groups.
//! - [`state`]: the per-module state vocabulary.
//! - [`event`]: the decoded module event every source produces.
//! - [`tracker`]: pure state machine: snapshot + events -> module states and
//!   group results.
//! - [`source`]: event sources (eBPF, uevent, poll) and the fallback between them.
//! - [`daemon`]: `run`: attach, snapshot, apply, reconcile, signals, reload.
//! - [`privileges`]: dropping capabilities (and the user) after attach.
//! - [`http`]: /status, /healthz and /metrics.
//! - [`metrics`]: the Prometheus metrics contract.
//! - [`check`]: the one-shot preflight and its remedies.
//! - [`alerting`]: the Alertmanager push and the alerts it sends.
//! - [`forensic`]: the tamper-evident event log, `log verify` and `log show`.
//! - [`longhorn`]: V2 enablement from the cluster (Longhorn setting, node
//!   label) and V2 readiness beyond modules (hugepages, CPU, kernel).
pub mod alerting;
pub mod check;
pub mod config;
pub mod daemon;
pub mod event;
pub mod fix;
pub mod forensic;
pub mod host;
pub mod http;
pub mod longhorn;
pub mod metrics;
pub mod names;
pub mod privileges;
pub mod remedy;
pub mod requirements;
pub mod source;
pub mod state;
pub mod status;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod tracker;
