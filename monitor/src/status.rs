//! The /status contract: what the daemon publishes after every change, as
//! `GET /status` serves it (JSON). Data only: the daemon builds it, the
//! HTTP server and the alert builder read it.
use std::{collections::BTreeMap, path::PathBuf};

use serde::Serialize;

use crate::{
    forensic::EventLogStatus,
    host::persistence::{OtherKernel, Persistence},
    longhorn::v2::V2Status,
    names::ModuleName,
    privileges::Privileges,
    remedy::Remedy,
    source::{ActiveKind, Unavailable},
    tracker::GroupReport,
};

/// The event source as /status shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SourceStatus {
    pub active: ActiveKind,
    pub unavailable: Vec<Unavailable>,
    pub details: Vec<String>,
}

/// Event counters as /status shows them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EventCounts {
    pub received: u64,
    pub lost: u64,
    pub undecodable: u64,
    /// Well-formed events that cannot be about a module (ignored, not lost).
    pub ignored: u64,
    /// Refused unloads of a required module the kernel reported.
    pub unload_denied: u64,
    /// Kept out of the ring by the eBPF program on purpose (null for the
    /// other sources).
    pub kernel_filtered: Option<KernelFiltered>,
    /// What the eBPF program could not deliver, by reason; part of `lost`
    /// (null for the other sources).
    pub kernel_lost: Option<KernelLost>,
    pub by_kind: BTreeMap<&'static str, u64>,
}

/// What the eBPF program only counted.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KernelFiltered {
    /// `module_request`s for names nothing requires.
    pub requests_untracked: u64,
    /// Refused unloads over the per-CPU rate limit.
    pub unload_denied_over_limit: u64,
}

/// What the eBPF program could not deliver (each also counted in `lost`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct KernelLost {
    /// Reserves in the event ring that failed (the ring was full).
    pub ring_reserve_failed: u64,
    /// Events dropped because the module name could not be read.
    pub name_unreadable: u64,
    /// Events dropped because the loader left a layout field unset.
    pub layout_unset: u64,
}

/// The daemon's state for /status, rebuilt after every change.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub kernel_release: String,
    pub modules_supported: bool,
    pub host_root: PathBuf,
    pub source: SourceStatus,
    pub events: EventCounts,
    pub drift_total: u64,
    pub reconciles: u64,
    pub warnings: Vec<String>,
    pub groups: Vec<GroupReport>,
    /// Whether each required module will be there after a reboot, and why.
    pub persistence: BTreeMap<ModuleName, Persistence>,
    /// For every required module that needs something (loaded now, loaded
    /// at every boot, or loadable), the steps that make it so: the same
    /// remedies `check` prints.
    pub remedies: BTreeMap<ModuleName, Remedy>,
    /// Other installed kernels and the required modules each lacks.
    pub other_kernels: Vec<OtherKernel>,
    /// The forensic event log; null when there is none.
    pub event_log: Option<EventLogStatus>,
    /// uid, gid and capabilities after the drop.
    pub privileges: Privileges,
    /// V2 enablement (and where it came from), the cluster watch, and V2
    /// readiness beyond modules.
    pub v2: V2Status,
}
