//! Event sources and the choice between them: eBPF tracepoints (best),
//! netlink kobject uevents (event-driven, no BPF), /proc/modules polling
//! (always works). `auto` takes the best one that starts and records why
//! each better one could not.
pub mod ebpf;
pub mod poll;
pub mod tracefs;
pub mod uevent;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{event::SourceEvent, host::HostRoot};

/// Which event source the daemon uses.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// eBPF if it attaches, else uevent, else poll.
    #[default]
    Auto,
    /// eBPF programs on the module tracepoints.
    Ebpf,
    /// Kernel uevents over netlink.
    Uevent,
    /// Re-reading /proc/modules every `poll_interval`.
    Poll,
}

impl SourceKind {
    /// The lower-case name used in the config file, on the command line and
    /// in output.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Ebpf => "ebpf",
            Self::Uevent => "uevent",
            Self::Poll => "poll",
        }
    }
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Capacity of the queue between a source and the daemon. A full queue
/// makes the eBPF reader wait, so the ring buffer (counted in-kernel)
/// absorbs the burst: nothing is dropped in userspace.
pub const QUEUE_CAPACITY: usize = 8192;

/// What a source sends to the daemon.
#[derive(Debug)]
pub enum SourceMsg {
    /// A module event.
    Event(SourceEvent),
    /// A `module_request` for an alias (not a module name); counted only.
    AliasRequest { alias: String },
    /// The source knows events were lost (ring buffer full, netlink
    /// ENOBUFS); `total` is its running total. The daemon reconciles at once.
    Lost { total: u64 },
    /// A record could not be decoded; counted and logged.
    Undecodable { reason: String },
}

/// The source kinds that can actually run (not `auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActiveKind {
    Ebpf,
    Uevent,
    Poll,
}

impl ActiveKind {
    pub const ALL: [Self; 3] = [Self::Ebpf, Self::Uevent, Self::Poll];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Uevent => "uevent",
            Self::Poll => "poll",
        }
    }
}

impl std::fmt::Display for ActiveKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A better source that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unavailable {
    pub source: ActiveKind,
    pub reason: String,
}

/// Options every source may need.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    pub host: HostRoot,
    /// eBPF ring buffer size in bytes.
    pub ring_buffer_bytes: u32,
    /// Poll source period.
    pub poll_interval: Duration,
}

/// A running source: its events arrive on `rx`; dropping the handle (or
/// cancelling its token) stops it.
pub struct RunningSource {
    pub kind: ActiveKind,
    pub unavailable: Vec<Unavailable>,
    pub rx: mpsc::Receiver<SourceMsg>,
    /// Events known lost so far (in-kernel counter or netlink overflow).
    pub lost: Arc<AtomicU64>,
    /// Extra live facts for /status (e.g. which eBPF programs attached).
    pub details: Vec<String>,
    cancel: CancellationToken,
    /// Keeps the eBPF object (programs, links, maps) alive.
    _guard: Option<Box<dyn Send + Sync>>,
}

impl RunningSource {
    /// Events lost so far.
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for RunningSource {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Why a source could not start.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct StartError {
    pub reason: String,
}

impl StartError {
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// What a source's start function returns.
pub(crate) struct Started {
    pub details: Vec<String>,
    pub guard: Option<Box<dyn Send + Sync>>,
}

/// Starts the requested source; with `auto`, the best one that starts.
///
/// # Errors
/// When an explicitly requested source cannot start, or (auto) none can.
pub async fn start(
    wanted: SourceKind,
    opts: &SourceOptions,
) -> Result<RunningSource, Vec<Unavailable>> {
    let order: &[ActiveKind] = match wanted {
        SourceKind::Auto => &ActiveKind::ALL,
        SourceKind::Ebpf => &[ActiveKind::Ebpf],
        SourceKind::Uevent => &[ActiveKind::Uevent],
        SourceKind::Poll => &[ActiveKind::Poll],
    };
    let mut unavailable = Vec::new();
    for &kind in order {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let lost = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        let started = match kind {
            ActiveKind::Ebpf => ebpf::start(opts, tx, Arc::clone(&lost), cancel.clone()),
            ActiveKind::Uevent => uevent::start(tx, Arc::clone(&lost), cancel.clone()),
            ActiveKind::Poll => poll::start(opts, tx, cancel.clone()).await,
        };
        match started {
            Ok(Started { details, guard }) => {
                return Ok(RunningSource {
                    kind,
                    unavailable,
                    rx,
                    lost,
                    details,
                    cancel,
                    _guard: guard,
                });
            }
            Err(e) => unavailable.push(Unavailable {
                source: kind,
                reason: e.reason,
            }),
        }
    }
    Err(unavailable)
}
