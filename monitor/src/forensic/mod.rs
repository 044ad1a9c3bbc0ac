//! The forensic event log: a tamper-evident, crash-safe, append-only JSON
//! Lines record of every module event, start-up snapshot, drift, loss,
//! reload and requirement change, and the `log verify` / `log show` queries
//! over it.
//!
//! Layout:
//! - [`record`]: the record schema (one struct for writing and reading).
//! - [`chain`]: the canonical form, SHA-256 and sealing a record onto the chain.
//! - [`writer`]: the file on disk and its writer thread: torn-line recovery,
//!   one `write(2)` per record, rotation, fsync, holding records while the
//!   disk fails.
//! - [`verify`]: walking the chain and naming the first break.
//! - [`show`]: the timeline and its filters.
//! - [`actor`]: who caused an event, enriched from `/proc/<tgid>`.
//!
//! The daemon hands each record to [`EventLog::append`], which only stamps
//! it and sends it down an unbounded channel: the event path never waits for
//! the disk, and never fsyncs.
pub mod actor;
pub mod chain;
pub mod record;
pub mod show;
pub mod verify;
pub mod writer;

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use record::{Record, RecordKind};
pub use writer::OpenError;

use crate::host::HostRoot;

/// The log's path when running as root and none is configured.
pub const DEFAULT_PATH: &str = "/var/lib/kmod-monitor/events.jsonl";
/// Size at which the log is rotated, by default.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Rotated files kept, by default.
pub const DEFAULT_KEEP: u32 = 5;
/// The smallest `--event-log-max-bytes` accepted.
pub const MIN_MAX_BYTES: u64 = 4096;
/// Default bound on records waiting for the disk: 8 MiB, well inside the
/// DaemonSet's 64 Mi memory limit next to the daemon's ~12 MiB.
pub const DEFAULT_BUFFER_BYTES: u64 = 8 * 1024 * 1024;
/// How long shutdown waits for the writer to write what is pending.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// When the log is fsynced.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// After every record.
    Always,
    /// At most once a second while records are being written; never while
    /// idle.
    #[default]
    Interval,
}

impl FsyncPolicy {
    /// The name used in flags, config and /status.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::Interval => "interval",
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where and how the log is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventLogSettings {
    /// The current file; rotated ones are `PATH.1` (newest) to `PATH.keep`.
    pub path: PathBuf,
    pub fsync: FsyncPolicy,
    /// Rotate before a record would take the file past this size.
    pub max_bytes: u64,
    /// Rotated files kept (at least 1).
    pub keep: u32,
    /// Most bytes of records waiting for the disk (the queue into the
    /// writer plus what it holds while writes fail); past it, records are
    /// counted as dropped.
    pub buffer_bytes: u64,
}

/// The log as /status shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EventLogStatus {
    /// The current file.
    pub path: PathBuf,
    pub fsync: FsyncPolicy,
    /// Writes are failing; records are held in memory and retried.
    pub degraded: bool,
    /// The latest write or fsync error.
    pub last_error: Option<String>,
    /// Failed write and fsync attempts since start.
    pub write_errors: u64,
    /// Records waiting to be written.
    pub pending: u64,
    /// Records written since start.
    pub records: u64,
    /// Records dropped because too many were held back.
    pub dropped: u64,
    /// The chain head: seq and hash of the last record written (compare
    /// with `log verify` to see that nothing was cut from the end).
    pub last_seq: u64,
    pub last_hash: String,
}

/// `PATH.N`: the N-th newest rotated file.
#[must_use]
pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Fills in what every record carries: `v`, `time` (now, unless set),
/// `boot_id` and `host`.
pub fn stamp(record: &mut Record, boot_id: &str, host: &str) {
    record.v = record::SCHEMA_VERSION;
    if record.time.is_empty() {
        record.time = humantime::format_rfc3339_nanos(SystemTime::now()).to_string();
    }
    boot_id.clone_into(&mut record.boot_id);
    host.clone_into(&mut record.host);
}

/// The host's boot id (`proc/sys/kernel/random/boot_id` under the host
/// root), `""` when unreadable.
#[must_use]
pub fn read_boot_id(host: &HostRoot) -> String {
    std::fs::read_to_string(host.boot_id())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The daemon's handle on the log: append records, watch the status, close.
pub struct EventLog {
    tx: mpsc::Sender<writer::Msg>,
    status: watch::Receiver<EventLogStatus>,
    boot_id: String,
    host: String,
    thread: Option<thread::JoinHandle<()>>,
    /// The writer is gone (it never should be); said once.
    broken: bool,
}

impl EventLog {
    /// Opens the log (recovering a torn tail) and starts its writer thread.
    ///
    /// # Errors
    /// When the file or its directory cannot be created, opened, read or
    /// locked, or the thread cannot start.
    pub fn open(
        settings: EventLogSettings,
        boot_id: String,
        host: String,
    ) -> Result<Self, OpenError> {
        let (status_tx, status) = watch::channel(EventLogStatus {
            path: settings.path.clone(),
            fsync: settings.fsync,
            ..EventLogStatus::default()
        });
        let path = settings.path.clone();
        let w = writer::Writer::open(settings, boot_id.clone(), host.clone(), status_tx)?;
        let (tx, rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("event-log".to_owned())
            .spawn(move || w.run(&rx))
            .map_err(|error| OpenError::Thread { path, error })?;
        Ok(Self {
            tx,
            status,
            boot_id,
            host,
            thread: Some(thread),
            broken: false,
        })
    }

    /// Stamps `record` and queues it for the writer. Never blocks.
    pub fn append(&mut self, mut record: Record) {
        stamp(&mut record, &self.boot_id, &self.host);
        if self.tx.send(writer::Msg::Record(Box::new(record))).is_err() && !self.broken {
            self.broken = true;
            tracing::error!("event log writer has stopped; records are no longer written");
        }
    }

    /// Changes of the status (the daemon republishes /status on them).
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<EventLogStatus> {
        self.status.clone()
    }

    /// The status now.
    #[must_use]
    pub fn status(&self) -> EventLogStatus {
        self.status.borrow().clone()
    }

    /// Writes what is pending, fsyncs and stops the writer, waiting at most
    /// `timeout` (a hung disk must not hang shutdown).
    pub fn close(mut self, timeout: Duration) -> EventLogStatus {
        self.stop(timeout);
        self.status()
    }

    fn stop(&mut self, timeout: Duration) {
        if self.thread.is_none() {
            return;
        }
        let (ack_tx, ack_rx) = mpsc::channel();
        if self.tx.send(writer::Msg::Close(ack_tx)).is_ok() {
            match ack_rx.recv_timeout(timeout) {
                Ok(()) => {
                    if let Some(t) = self.thread.take() {
                        let _ = t.join();
                    }
                }
                Err(_) => tracing::error!(
                    ?timeout,
                    "event log writer did not finish in time; stopping without it"
                ),
            }
        }
        self.thread = None;
    }
}

impl Drop for EventLog {
    /// A log dropped without [`close`](Self::close) (the daemon failing)
    /// still gets what is pending written.
    fn drop(&mut self) {
        self.stop(CLOSE_TIMEOUT);
    }
}
