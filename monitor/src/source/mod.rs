//! Event sources and the choice between them: eBPF tracepoints (best),
//! netlink kobject uevents (event-driven, no BPF), /proc/modules polling
//! (always works). `auto` takes the best one that starts and records why
//! each better one could not.
pub mod ebpf;
pub mod kernel_log;
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

use tokio::sync::oneshot;

use crate::{
    event::{Actor, SourceEvent},
    host::HostRoot,
    names::ModuleName,
};

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

/// Capacity of the queue between a reader task (uevent, poll) and the
/// daemon. The eBPF ring needs none: the daemon's ring thread reads it,
/// and a ring it has not read yet absorbs a burst (losses counted
/// in-kernel).
pub const QUEUE_CAPACITY: usize = 8192;

/// Most messages the daemon takes in one go when it wants everything
/// already buffered (the initstate check; at start-up, the messages from
/// after the snapshot began): enough for any ring or socket backlog, and a
/// bound when a flood refills it as fast as it is read.
pub const SYNC_MAX: usize = 64 * ebpf::DRAIN_BATCH;

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
    /// A record could not be decoded (a program/daemon mismatch: events
    /// may have been misread); counted, logged, and the state reconciled.
    Undecodable { reason: String },
    /// A well-formed record about something that cannot be a module (a
    /// name userspace passed to `delete_module`); counted, not a loss.
    Ignored { reason: String },
    /// Someone without CAP_SYS_MODULE tried to unload a tracked module
    /// (eBPF only; rate-limited in the kernel).
    UnloadDenied {
        module: ModuleName,
        actor: Actor,
        boot_ns: u64,
    },
}

/// What the name filter in the kernel holds after a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackedOutcome {
    /// Names asked for.
    pub names: usize,
    /// Whether the kernel filters by them (false: they did not fit, and
    /// every request and unload attempt reaches the daemon).
    pub filtering: bool,
}

impl TrackedOutcome {
    /// One line for /status and the log.
    #[must_use]
    pub fn describe(&self) -> String {
        if self.filtering {
            format!(
                "in-kernel name filter: {} tracked names; other module requests and unload attempts are only counted",
                self.names
            )
        } else {
            format!(
                "in-kernel name filter OFF: {} names do not fit its {} slots; every module request reaches the daemon",
                self.names,
                monitor_common::TRACKED_SLOTS
            )
        }
    }
}

/// The kernel's name filter (eBPF only).
pub(crate) trait Tracking: Send + Sync {
    /// Replaces the tracked names.
    fn write(&self, names: &[ModuleName]) -> TrackedOutcome;
}

/// Counters of what the kernel kept out of the ring on purpose (eBPF).
pub trait Noise: Send + Sync {
    /// `module_request`s for names nobody tracks.
    fn requests_untracked(&self) -> u64;
    /// Refused unload attempts over the per-CPU rate limit.
    fn denied_suppressed(&self) -> u64;
}

/// Events the eBPF program could not deliver, by reason (running totals).
/// Each is also in the source's loss total, and each kind is logged by the
/// program, rate-limited ([`kernel_log`]).
pub trait KernelLoss: Send + Sync {
    /// Reserves in the event ring that failed: the ring was full.
    fn ring_reserve_failed(&self) -> u64;
    /// Events dropped because the module name could not be read.
    fn name_unreadable(&self) -> u64;
    /// Events dropped because the loader left a layout field unset.
    fn layout_unset(&self) -> u64;
}

/// What the daemon can ask of a running eBPF source.
pub(crate) struct Control {
    pub tracked: Box<dyn Tracking>,
    pub noise: Box<dyn Noise>,
    pub loss: Box<dyn KernelLoss>,
}

/// Asks a source's reader to read everything its kernel buffer (the ring,
/// the uevent socket) holds now, and answer.
pub(crate) type SyncRequests = mpsc::Sender<oneshot::Sender<()>>;

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
    /// The names the eBPF program lets through: required modules and their
    /// exact aliases (see [`TrackedNames`](monitor_common::TrackedNames)).
    pub tracked: Vec<ModuleName>,
}

/// Where the daemon takes a source's messages from.
enum Feed {
    /// A reader task's queue (uevent, poll).
    Queue(mpsc::Receiver<SourceMsg>),
    /// The eBPF ring, read by the daemon's own task until its ring thread
    /// takes it ([`RunningSource::take_ring`]).
    Ring(Box<ebpf::RingFeed>),
    /// The ring, taken over by the daemon's ring thread.
    Taken,
}

/// A running source: the daemon takes its messages with
/// [`recv`](Self::recv) and [`try_recv`](Self::try_recv), or, for the eBPF
/// ring after start-up, gives the ring to its ring thread
/// ([`take_ring`](Self::take_ring)); dropping the handle (or cancelling
/// its token) stops it.
pub struct RunningSource {
    pub kind: ActiveKind,
    pub unavailable: Vec<Unavailable>,
    feed: Feed,
    /// Events known lost so far (in-kernel counter or netlink overflow).
    pub lost: Arc<AtomicU64>,
    /// Extra live facts for /status (e.g. which eBPF programs attached).
    pub details: Vec<String>,
    cancel: CancellationToken,
    /// Keeps the eBPF object (programs, links, maps) alive.
    _guard: Option<Box<dyn Send + Sync>>,
    /// The eBPF source's name filter and counters.
    control: Option<Control>,
    /// Where a source with a kernel buffer ahead of its reader takes sync
    /// requests.
    sync: Option<SyncRequests>,
}

impl RunningSource {
    /// The next message of a reader task's queue (uevent, poll), waiting
    /// for one; `None` once the source has stopped (the daemon falls
    /// back). Never resolves for the eBPF ring, which the daemon reads
    /// itself ([`try_recv`](Self::try_recv), then its ring thread).
    /// Cancel-safe.
    pub async fn recv(&mut self) -> Option<SourceMsg> {
        match &mut self.feed {
            Feed::Queue(rx) => rx.recv().await,
            Feed::Ring(_) | Feed::Taken => std::future::pending().await,
        }
    }

    /// A message that is already waiting, if any.
    pub fn try_recv(&mut self) -> Option<SourceMsg> {
        match &mut self.feed {
            Feed::Queue(rx) => rx.try_recv().ok(),
            Feed::Ring(ring) => ring.try_recv(),
            Feed::Taken => None,
        }
    }

    /// Whether no message of a reader task's queue is waiting (the ring's
    /// reader knows its own).
    pub fn is_empty(&self) -> bool {
        match &self.feed {
            Feed::Queue(rx) => rx.is_empty(),
            Feed::Ring(_) | Feed::Taken => true,
        }
    }

    /// The eBPF ring, for the daemon's ring thread; `None` for the other
    /// sources (and once taken).
    pub(crate) fn take_ring(&mut self) -> Option<ebpf::RingFeed> {
        match std::mem::replace(&mut self.feed, Feed::Taken) {
            Feed::Ring(ring) => Some(*ring),
            other => {
                self.feed = other;
                None
            }
        }
    }

    /// Events lost so far.
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Replaces the names the kernel lets through (eBPF; `None` for the
    /// other sources, which filter nothing).
    pub fn set_tracked(&self, names: &[ModuleName]) -> Option<TrackedOutcome> {
        self.control.as_ref().map(|c| c.tracked.write(names))
    }

    /// What the kernel kept out of the ring on purpose (eBPF only).
    #[must_use]
    pub fn noise(&self) -> Option<&dyn Noise> {
        self.control.as_ref().map(|c| &*c.noise)
    }

    /// What the kernel could not deliver, by reason (eBPF only).
    #[must_use]
    pub fn kernel_loss(&self) -> Option<&dyn KernelLoss> {
        self.control.as_ref().map(|c| &*c.loss)
    }

    /// Waits until every event the source had buffered when called can be
    /// taken with [`try_recv`](Self::try_recv): the uevent reader drains
    /// its socket and answers (or is gone). The eBPF ring needs none (it is
    /// read directly: by `try_recv`, then by the ring thread), and polling
    /// has no buffer ahead of its reader.
    pub async fn sync(&self) {
        let Some(sync) = &self.sync else {
            return;
        };
        let (ack, done) = oneshot::channel();
        if sync.send(ack).await.is_ok() {
            let _ = done.await;
        }
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
    pub control: Option<Control>,
    pub sync: Option<SyncRequests>,
    /// The ring the daemon reads itself (eBPF); the others send on the
    /// queue.
    pub ring: Option<ebpf::RingFeed>,
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
            ActiveKind::Ebpf => ebpf::start(opts, Arc::clone(&lost), &cancel),
            ActiveKind::Uevent => uevent::start(tx, Arc::clone(&lost), cancel.clone()),
            ActiveKind::Poll => poll::start(opts, tx, cancel.clone()).await,
        };
        match started {
            Ok(Started {
                details,
                guard,
                control,
                sync,
                ring,
            }) => {
                return Ok(RunningSource {
                    kind,
                    unavailable,
                    feed: ring.map_or(Feed::Queue(rx), |r| Feed::Ring(Box::new(r))),
                    lost,
                    details,
                    cancel,
                    _guard: guard,
                    control,
                    sync,
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
