//! Integration tests of the real `kmod-monitor` binary against fake host
//! roots built from real fixture files, all in one test binary (like
//! ripgrep's). Shared setup lives in `kmod_monitor_tests` (src/lib.rs):
//! building the binary, laying out roots, running commands and daemons.
//!
//! - `check`: the one-shot preflight's verdicts, remedies and output.
//! - `bad_input`: every rejected input exits 2 with a message naming it.
//! - `daemon`: `run` following a host's /proc/modules, signals, reconcile.
//! - `source`: choosing the event source where eBPF cannot work.
//! - `event_log`: the forensic event log written by `run`, `log verify`
//!   and `log show`, a SIGKILL mid-burst, and a full disk.
//! - `persistence`: reboot survival in check, /status and metrics; check --fix.
//! - `remedy`: every combination of loaded, listed and blocked gets the
//!   remedy that works; applied, the requirement holds and persists.
//! - `prometheus`: /metrics, the shipped rules and alert delivery against
//!   the real Prometheus and Alertmanager.
//! - `alertmanager`: delivery with a hung Alertmanager listed first, https
//!   with a CA file, basic auth and bearer tokens, and no secret shown.
//! - `deploy`: the Kubernetes manifests and systemd unit, validated.
//! - `http`: the listener's limits under hostile clients (idle
//!   connections against 1,024 descriptors, unfinished huge headers,
//!   stalled headers), TLS, client certificates, basic auth and bad web
//!   config files.
//! - `kube_manifests`: the Kubernetes manifests against a real
//!   kube-apiserver: server-side validation and apply, and what the shipped
//!   RBAC lets the daemon's token do.
//! - `k8s_report`: the Node condition, Events and labels the daemon writes,
//!   against a real kube-apiserver, beside the kubelet's conditions.
//! - `layers`: the daemon's modules use only their own layer or lower ones.
//! - `longhorn`: the cluster watch (V2 enablement from Longhorn's setting and
//!   the node label) against a real kube-apiserver and etcd; hugepages.
mod alertmanager;
mod bad_input;
mod check;
mod daemon;
mod deploy;
mod event_log;
mod http;
mod k8s_report;
mod kube_manifests;
mod layers;
mod longhorn;
mod persistence;
mod prometheus;
mod remedy;
mod requirements;
mod source;
