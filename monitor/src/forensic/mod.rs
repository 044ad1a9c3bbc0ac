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
//! - [`budget`]: the bound, in bytes, on records between the daemon and the
//!   disk.
//! - [`verify`]: walking the chain and naming the first break.
//! - [`show`]: the timeline and its filters.
//! - [`actor`]: who caused an event, enriched from `/proc/<tgid>`.
//!
//! The daemon hands each record to [`EventLog::append`], which only stamps
//! it, charges its size to the [`budget`] and sends it down a channel: the
//! event path never waits for the disk, never fsyncs, and never holds more
//! than `buffer_bytes` of records, queued or held while the disk fails.
//! Past that, records are counted as dropped, and a `log_dropped` record
//! says how many once writing resumes.
pub mod actor;
pub mod budget;
pub mod chain;
pub mod record;
pub mod show;
pub mod verify;
pub mod writer;

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
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
/// Default bound on records waiting for the disk: 8 MiB of records in
/// memory ([`Record::footprint`], some 6,000 module events), well inside
/// the DaemonSet's 64 Mi memory limit next to the daemon's ~12 MiB.
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
    /// Records waiting to be written: queued for the writer, or held while
    /// writes fail.
    pub pending: u64,
    /// Their size in memory, bytes.
    pub pending_bytes: u64,
    /// The bound on `pending_bytes` (`--event-log-buffer-bytes`).
    pub buffer_bytes: u64,
    /// Records written since start.
    pub records: u64,
    /// Records dropped since start because `buffer_bytes` was reached.
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

/// Fills in what every record carries: `v`, the time it was made (now,
/// unless `time` or `made` is set; sealing writes it into `time`),
/// `boot_id` and `host`.
pub fn stamp(record: &mut Record, boot_id: &Arc<str>, host: &Arc<str>) {
    record.v = record::SCHEMA_VERSION;
    if record.time.is_empty() && record.made.is_none() {
        record.made = Some(SystemTime::now());
    }
    record.boot_id = Arc::clone(boot_id);
    record.host = Arc::clone(host);
}

/// The host's boot id (`proc/sys/kernel/random/boot_id` under the host
/// root), `""` when unreadable.
#[must_use]
pub fn read_boot_id(host: &HostRoot) -> String {
    std::fs::read_to_string(host.boot_id())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The log's status as other tasks (the HTTP server) read it, at the
/// moment they ask.
#[derive(Clone)]
pub struct StatusView {
    status: watch::Receiver<EventLogStatus>,
    budget: Arc<budget::Budget>,
}

impl StatusView {
    /// The writer's last word, with what is waiting and what was dropped
    /// counted as of now.
    #[must_use]
    pub fn now(&self) -> EventLogStatus {
        let mut status = self.status.borrow().clone();
        let budget::Usage {
            limit,
            bytes,
            records,
            dropped,
        } = self.budget.usage();
        status.pending = records;
        status.pending_bytes = bytes;
        status.buffer_bytes = limit;
        status.dropped = dropped;
        status
    }
}

/// The daemon's handle on the log: append records, watch the status, close.
pub struct EventLog {
    tx: mpsc::Sender<writer::Msg>,
    status: watch::Receiver<EventLogStatus>,
    budget: Arc<budget::Budget>,
    boot_id: Arc<str>,
    host: Arc<str>,
    thread: Option<thread::JoinHandle<()>>,
    /// The writer is gone (it never should be); said once.
    broken: bool,
    /// Boxes of written records the writer gave back, for [`Self::record`].
    spare: mpsc::Receiver<Box<Record>>,
}

/// How many written records' boxes wait for reuse at most (about 1 KiB
/// each).
const SPARE_RECORDS: usize = 64;

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
        let (boot_id, host): (Arc<str>, Arc<str>) = (boot_id.into(), host.into());
        let mut w =
            writer::Writer::open(settings, Arc::clone(&boot_id), Arc::clone(&host), status_tx)?;
        let budget = w.budget();
        let (spare_tx, spare) = mpsc::sync_channel(SPARE_RECORDS);
        w.recycle_into(spare_tx);
        let (tx, rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("event-log".to_owned())
            .spawn(move || w.run(&rx))
            .map_err(|error| OpenError::Thread { path, error })?;
        Ok(Self {
            tx,
            status,
            budget,
            boot_id,
            host,
            thread: Some(thread),
            broken: false,
            spare,
        })
    }

    /// A new record of `kind` about something at `boot_ns`, in the box of
    /// a record already written when the writer has given one back. The
    /// event path builds its records with this: with musl's allocator, a
    /// fresh box for every record (and the writer freeing each in bulk)
    /// had the two threads unmapping and faulting in pages all the time.
    #[must_use]
    pub fn record(&self, kind: RecordKind, boot_ns: u64) -> Box<Record> {
        match self.spare.try_recv() {
            Ok(mut spare) => {
                *spare = Record::new(kind, boot_ns);
                spare
            }
            Err(_) => Record::boxed(kind, boot_ns),
        }
    }

    /// Stamps `record` and queues it for the writer, or counts it dropped
    /// when `buffer_bytes` of records are already waiting for the disk.
    /// Never blocks.
    ///
    /// Takes a record or a boxed one: the event path builds its records in
    /// their boxes, so that none of them (about 1 KiB each) is copied on
    /// the way to the writer thread.
    pub fn append(&mut self, record: impl Into<Box<Record>>) {
        if let Some(charged) = self.charge(record.into()) {
            self.send(writer::Msg::Record(charged));
        }
    }

    /// [`append`](Self::append) for several records, in order, handed to
    /// the writer thread at once: one wake-up of it for a loop turn's
    /// records, not one for each.
    pub fn append_all(&mut self, records: impl IntoIterator<Item = Box<Record>>) {
        let mut charged = Vec::new();
        for record in records {
            match self.charge(record) {
                Some(c) => charged.push(c),
                // A drop is counted at once, and the writer reports it
                // once it has written what it holds: what came before the
                // dropped one goes to it now, as `append` would have sent
                // it.
                None => self.send_all(std::mem::take(&mut charged)),
            }
        }
        self.send_all(charged);
    }

    /// Sends `charged` as one message (none if empty).
    fn send_all(&mut self, mut charged: Vec<writer::Charged>) {
        match charged.len() {
            0 => {}
            1 => {
                if let Some(one) = charged.pop() {
                    self.send(writer::Msg::Record(one));
                }
            }
            _ => self.send(writer::Msg::Records(charged)),
        }
    }

    /// Stamps `record` and charges it to the budget; `None` when it is
    /// dropped.
    fn charge(&mut self, mut record: Box<Record>) -> Option<writer::Charged> {
        stamp(&mut record, &self.boot_id, &self.host);
        let bytes = (record.footprint() + writer::SLOT_BYTES) as u64;
        match self.budget.charge(bytes) {
            budget::Charge::Taken => Some(writer::Charged { record, bytes }),
            budget::Charge::Dropped { first } => {
                if first {
                    let usage = self.budget.usage();
                    tracing::warn!(
                        pending = usage.records,
                        pending_bytes = usage.bytes,
                        buffer_bytes = usage.limit,
                        "event log: records waiting for the disk fill the buffer; dropping records (counted, and a log_dropped record follows once writing catches up)"
                    );
                }
                None
            }
        }
    }

    /// Hands charged records to the writer thread.
    fn send(&mut self, msg: writer::Msg) {
        if let Err(mpsc::SendError(msg)) = self.tx.send(msg) {
            let (records, bytes) = match &msg {
                writer::Msg::Record(c) => (1, c.bytes),
                writer::Msg::Records(cs) => (cs.len() as u64, cs.iter().map(|c| c.bytes).sum()),
                writer::Msg::Close(_) => (0, 0),
            };
            self.budget.release(records, bytes);
            if !self.broken {
                self.broken = true;
                tracing::error!("event log writer has stopped; records are no longer written");
            }
        }
    }

    /// Changes that matter beyond /status (degraded, write errors): the
    /// daemon republishes the metrics and alerts on them. Records written
    /// and the queue's length change without a notification; /status reads
    /// them live through [`view`](Self::view), so a write never wakes the
    /// event loop.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<EventLogStatus> {
        self.status.clone()
    }

    /// The status now: the writer's, with what is waiting and what was
    /// dropped counted as of this moment (so a hung writer cannot hide it).
    #[must_use]
    pub fn status(&self) -> EventLogStatus {
        self.view().now()
    }

    /// A handle other tasks read the status through ([`StatusView::now`]).
    #[must_use]
    pub fn view(&self) -> StatusView {
        StatusView {
            status: self.status.clone(),
            budget: Arc::clone(&self.budget),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings for a log in `dir` holding up to `buffer_bytes`.
    fn settings(dir: &Path, buffer_bytes: u64) -> EventLogSettings {
        EventLogSettings {
            path: dir.join("events.jsonl"),
            fsync: FsyncPolicy::Interval,
            max_bytes: DEFAULT_MAX_BYTES,
            keep: DEFAULT_KEEP,
            buffer_bytes,
        }
    }

    #[test]
    fn append_past_the_buffer_counts_drops_and_log_dropped_follows() {
        let dir = tempfile::tempdir().unwrap();
        let settings = EventLogSettings {
            path: dir.path().join("events.jsonl"),
            fsync: FsyncPolicy::Interval,
            max_bytes: DEFAULT_MAX_BYTES,
            keep: DEFAULT_KEEP,
            // Smaller than any record: every one is dropped.
            buffer_bytes: 100,
        };
        let mut log = EventLog::open(settings.clone(), "boot".into(), "node".into()).unwrap();
        for _ in 0..5 {
            log.append(Record::new(RecordKind::Drift, 1));
        }
        let status = log.status();
        assert_eq!(
            (status.dropped, status.pending, status.pending_bytes),
            (5, 0, 0)
        );
        assert_eq!(status.buffer_bytes, 100);
        let closed = log.close(CLOSE_TIMEOUT);
        assert_eq!(closed.dropped, 5);
        let text = std::fs::read_to_string(&settings.path).unwrap();
        let records: Vec<Record> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(records.len(), 1, "{text}");
        assert_eq!(
            (records[0].kind, records[0].dropped),
            (RecordKind::LogDropped, Some(5))
        );
    }

    #[test]
    fn append_charges_the_record_and_its_queue_slot() {
        let mut probe = Record::new(RecordKind::Drift, 1);
        stamp(&mut probe, &"boot".into(), &"node".into());
        let charge = (probe.footprint() + writer::SLOT_BYTES) as u64;
        for (buffer_bytes, dropped) in [(charge - 1, 1), (charge, 0)] {
            let dir = tempfile::tempdir().unwrap();
            let settings = settings(dir.path(), buffer_bytes);
            let mut log = EventLog::open(settings, "boot".into(), "node".into()).unwrap();
            log.append(Record::new(RecordKind::Drift, 1));
            assert_eq!(log.status().dropped, dropped, "buffer {buffer_bytes}");
        }
    }

    #[test]
    fn what_is_queued_counts_until_written() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path(), DEFAULT_BUFFER_BYTES);
        let mut log = EventLog::open(settings, "boot".into(), "node".into()).unwrap();
        log.append(Record::new(RecordKind::Drift, 1));
        let queued = log.status();
        // Either still queued (charged) or already written (released).
        assert!(
            (queued.pending, queued.records) == (1, 0)
                || (queued.pending, queued.records) == (0, 1),
            "{queued:?}"
        );
        assert!(
            queued.pending == 0 || queued.pending_bytes > 0,
            "{queued:?}"
        );
        let closed = log.close(CLOSE_TIMEOUT);
        assert_eq!(
            (
                closed.pending,
                closed.pending_bytes,
                closed.records,
                closed.dropped
            ),
            (0, 0, 1, 0)
        );
    }
    #[test]
    fn append_all_writes_in_order_and_charges_each() {
        let dir = tempfile::tempdir().unwrap();
        let mut probe = Record::new(RecordKind::Drift, 1);
        stamp(&mut probe, &"boot".into(), &"node".into());
        let charge = (probe.footprint() + writer::SLOT_BYTES) as u64;
        // Room for three of the five: the rest are dropped and counted.
        let settings = settings(dir.path(), 3 * charge);
        let path = settings.path.clone();
        let mut log = EventLog::open(settings, "boot".into(), "node".into()).unwrap();
        let records: Vec<Box<Record>> = (1..=5).map(|n| log.record(RecordKind::Drift, n)).collect();
        log.append_all(records);
        let closed = log.close(CLOSE_TIMEOUT);
        // The three, then the log_dropped record for the other two.
        assert_eq!((closed.records, closed.dropped), (4, 2), "{closed:?}");
        let text = std::fs::read_to_string(&path).unwrap();
        let written: Vec<(RecordKind, u64)> = text
            .lines()
            .map(|l| serde_json::from_str::<Record>(l).unwrap())
            .map(|r| (r.kind, r.boot_ns))
            .collect();
        // The writer may report the drops as soon as they are counted
        // (here, before it has received the three): the records keep
        // their order around it.
        let drifts: Vec<u64> = written
            .iter()
            .filter(|(kind, _)| *kind == RecordKind::Drift)
            .map(|&(_, boot_ns)| boot_ns)
            .collect();
        assert_eq!(drifts, [1, 2, 3]);
        assert_eq!(
            written
                .iter()
                .filter(|(kind, _)| *kind == RecordKind::LogDropped)
                .count(),
            1
        );
        let report = verify::verify(std::slice::from_ref(&path)).unwrap();
        assert!(report.problem.is_none(), "{report}");
    }

    #[test]
    fn a_written_record_s_box_comes_back_empty_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path(), DEFAULT_BUFFER_BYTES);
        let mut log = EventLog::open(settings, "boot".into(), "node".into()).unwrap();
        let mut first = log.record(RecordKind::Drift, 1);
        first.reason = Some("x".repeat(100));
        let at: *const Record = &raw const *first;
        log.append(first);
        // The writer gives the box back once the record is written.
        let deadline = std::time::Instant::now() + CLOSE_TIMEOUT;
        let next = loop {
            let next = log.record(RecordKind::ModuleLoad, 2);
            if std::ptr::eq(&raw const *next, at) || std::time::Instant::now() > deadline {
                break next;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(
            std::ptr::eq(&raw const *next, at),
            "the written record's box was not reused"
        );
        assert_eq!(*next, Record::new(RecordKind::ModuleLoad, 2));
    }
}
