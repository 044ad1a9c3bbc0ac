//! kmod-monitor: watches the kernel modules Longhorn nodes need, from eBPF
//! module tracepoints (or uevents, or polling), and reports per requirement
//! group whether the node is fit.
//!
//! Data flows one way: kernel → [`source`] → [`tracker`] → [`status`],
//! [`metrics`], [`alerting`], [`k8s`], [`forensic`] log; the cluster watch
//! ([`longhorn`]) beside it decides what is required. Modules are layered;
//! each uses only its own layer or lower ones (`tests/cli/layers.rs` checks
//! it):
//!
//! 1. Vocabulary.
//!    - [`names`]: module-name validation and normalisation (`-` == `_`).
//!    - [`state`]: the per-module state vocabulary.
//!    - [`event`]: the decoded module event every source produces.
//!    - [`requirements`]: requirement groups, the built-in ones, resolution.
//!    - [`privileges`]: dropping capabilities (and the user) after attach.
//!    - [`stages`]: per-stage timestamps of an event (`bench` builds only).
//! 2. Facts and judgement.
//!    - [`host`]: everything read from the host (or `--host-root`):
//!      /proc/modules, modules.builtin, modules.dep, kernel config,
//!      initstate, boot-time configuration; the start-up snapshot.
//!    - [`tracker`]: pure state machine: snapshot + events → module states
//!      and group results.
//!    - [`remedy`]: what fixes a module now and after a reboot.
//! 3. Inputs and record.
//!    - [`source`]: event sources (eBPF, uevent, poll) and the fallback.
//!    - [`longhorn`]: V2 enablement from the cluster and V2 readiness.
//!    - [`forensic`]: the tamper-evident event log, `log verify`, `log show`.
//! 4. Outputs and settings.
//!    - [`status`]: the /status contract (data only).
//!    - [`metrics`]: the Prometheus metrics contract.
//!    - [`alerting`]: the alerts and the Alertmanager push.
//!    - [`http`]: /status, /healthz and /metrics.
//!    - [`k8s`]: the Node condition, Events and labels, and their writer.
//!    - [`config`]: flags, the config file, validators, the one resolver.
//! 5. Commands.
//!    - [`daemon`]: `run`: attach, snapshot, apply, reconcile, reload, publish.
//!    - [`check`]: the one-shot preflight.
//!    - [`fix`]: `check --fix`.
pub mod alerting;
pub mod check;
pub mod config;
pub mod daemon;
pub mod event;
pub mod fix;
pub mod forensic;
pub mod host;
pub mod http;
pub mod k8s;
pub mod longhorn;
pub mod metrics;
pub mod names;
pub mod privileges;
pub mod remedy;
pub mod requirements;
pub mod source;
pub mod stages;
pub mod state;
pub mod status;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod tracker;
