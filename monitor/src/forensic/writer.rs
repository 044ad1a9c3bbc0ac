//! The log file on disk and the thread that writes it: opening with torn-line
//! recovery, one `write(2)` per record, size rotation, the fsync policy, and
//! holding records in memory (and retrying) while the disk fails, within
//! the [`Budget`] the daemon charged them to. Nothing here runs on the
//! daemon's event path.
//!
//! One writer per log: the writer holds an exclusive `flock` on a lock file
//! of its own beside the log ([`lock_path`]), which rotation never renames
//! or closes, so a second daemon is refused at every moment, rotation
//! included. The log file itself is locked too, as older versions did, so
//! they are kept off as well.
use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, BufRead as _, BufReader, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::{
        Arc,
        mpsc::{Receiver, RecvTimeoutError, Sender},
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use tokio::sync::watch;

use super::{
    EventLogSettings, EventLogStatus, FsyncPolicy,
    budget::Budget,
    chain::{self, Head},
    record::{Record, RecordKind, TornLine},
    rotated_path,
};
use crate::event::boot_ns_now;

/// How often the log is fsynced under `--fsync interval` while it is being
/// written (never while idle).
pub const FSYNC_INTERVAL: Duration = Duration::from_secs(1);
/// First retry after a failed write; doubled up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest wait between retries while the log is degraded.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// What a queued record costs beyond its [`Record::footprint`]: its slot in
/// the channel to the writer and then in the writer's held queue, rounded
/// up. Charged to the [`Budget`] with it.
pub const SLOT_BYTES: usize = 64;
/// A held queue that a flood grew past this many slots is given back to
/// the allocator once it is empty again.
const SHRINK_SLOTS: usize = 1024;

/// Why the event log cannot be used at all (start-up only; write failures
/// later make it degraded instead).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The log's directory could not be created.
    #[error("event log {}: cannot create its directory {}: {error}", path.display(), dir.display())]
    CreateDir {
        /// The log file.
        path: PathBuf,
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// The log file (or a rotated one) could not be opened or read.
    #[error("event log {}: {action}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done, e.g. `cannot open it`.
        action: &'static str,
        /// The OS error.
        error: io::Error,
    },
    /// Another process holds the log's lock.
    #[error(
        "event log {}: in use by another process (flock on {}); give each kmod-monitor its own --event-log",
        path.display(),
        lock.display()
    )]
    Locked {
        /// The log file.
        path: PathBuf,
        /// The file that is locked.
        lock: PathBuf,
    },
    /// The writer thread could not be started.
    #[error("event log {}: cannot start its writer thread: {error}", path.display())]
    Thread {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
}

/// What a pass over one log file found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Bytes in the file.
    pub size: u64,
    /// Lines, the unterminated last one included.
    pub lines: u64,
    /// The last line that parses as a record, and its line number.
    pub last_good: Option<(u64, Head)>,
    /// Lines after `last_good` that do not parse as records.
    pub trailing_bad: Vec<TornLine>,
    /// Whether the file ends without a newline.
    pub unterminated: bool,
}

/// The seq and hash of a line, if it is a JSON object with both.
fn head_of(line: &[u8]) -> Option<Head> {
    let Value::Object(map) = serde_json::from_slice::<Value>(line).ok()? else {
        return None;
    };
    Some(Head {
        seq: map.get("seq")?.as_u64()?,
        hash: map.get("hash")?.as_str()?.to_owned(),
    })
}

/// Reads `path` line by line. A missing file is an empty scan.
///
/// # Errors
/// When the file exists but cannot be read.
pub fn scan_file(path: &Path) -> io::Result<Scan> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Scan::default()),
        Err(e) => return Err(e),
    };
    let mut reader = BufReader::new(file);
    let mut scan = Scan::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        scan.size += n as u64;
        scan.lines += 1;
        let terminated = line.last() == Some(&b'\n');
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        scan.unterminated = !terminated;
        if let Some(head) = head_of(body) {
            scan.last_good = Some((scan.lines, head));
            scan.trailing_bad.clear();
        } else {
            scan.trailing_bad.push(TornLine {
                line: scan.lines,
                bytes: body.len() as u64,
                unterminated: !terminated,
            });
        }
    }
    Ok(scan)
}

/// The log file being appended to, its chain head, and the writer state.
pub struct Writer {
    settings: EventLogSettings,
    /// The lock file, `flock`ed for as long as the writer lives.
    _lock: File,
    boot_id: Arc<str>,
    host: Arc<str>,
    file: Option<File>,
    /// Bytes in the current file (what this process knows of).
    size: u64,
    head: Head,
    /// The current file ends without a newline: the next write starts with
    /// one.
    needs_newline: bool,
    /// A cut-short write could not be undone: scan the file again before
    /// the next write (it then gets a `log_recovered` record).
    needs_rescan: bool,
    pending: VecDeque<Pending>,
    /// The bytes of records queued and held, shared with the daemon, which
    /// charges them (and counts the drops).
    budget: Arc<Budget>,
    dirty: bool,
    last_sync: Instant,
    /// While degraded: when to try again, and the back-off that led there.
    retry: Option<(Instant, Duration)>,
    status: watch::Sender<EventLogStatus>,
    /// The batch buffer, kept between batches.
    batch: Vec<u8>,
    /// Emptied `time`, `prev_hash` and `hash` strings of written records,
    /// for the next records' seals (at most [`SPARE_STRINGS`]).
    spare: Vec<String>,
    /// Where written records' boxes go back for reuse, if anywhere.
    recycle: Option<std::sync::mpsc::SyncSender<Box<Record>>>,
}

/// The most the batch buffer keeps between batches: what a burst of small
/// records needs; larger batches allocate theirs.
const KEEP_BUFFER_BYTES: usize = 64 * 1024;
/// How many emptied strings the writer keeps for reuse: three per record
/// of a batch of this many records' worth, about 7 KiB in all.
const SPARE_STRINGS: usize = 3 * 32;
/// The size of the strings a seal fills in (a hash is 64 bytes, a time
/// 30), and of those kept for reuse.
const SPARE_STRING_BYTES: usize = 64;

/// Most bytes one batched `write(2)` carries.
const BATCH_BYTES: usize = 256 * 1024;

/// A record waiting to be written.
struct Pending {
    record: Box<Record>,
    /// Must land in the current file, before any rotation (a
    /// `log_recovered` names lines of the file it is in).
    pinned: bool,
    /// What it was charged to the budget; 0 for the writer's own records.
    bytes: u64,
}

/// A record the daemon charged to the budget.
pub struct Charged {
    /// The record.
    pub record: Box<Record>,
    /// Its charge: [`Record::footprint`] plus [`SLOT_BYTES`].
    pub bytes: u64,
}

/// What the daemon sends the writer thread.
pub enum Msg {
    /// Append this record.
    Record(Charged),
    /// Append these records, in order.
    Records(Vec<Charged>),
    /// Write what is pending (one try), fsync, acknowledge and stop.
    Close(Sender<()>),
}

impl Writer {
    /// Opens (creating) the log, takes its lock, finds the chain head (in
    /// the newest rotated file if the current one has no record) and queues
    /// a `log_recovered` record if the file ends in torn lines.
    ///
    /// # Errors
    /// When the directory or file cannot be created, opened, locked or read.
    pub fn open(
        settings: EventLogSettings,
        boot_id: Arc<str>,
        host: Arc<str>,
        status: watch::Sender<EventLogStatus>,
    ) -> Result<Self, OpenError> {
        let path = settings.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|error| OpenError::CreateDir {
                    path: path.clone(),
                    dir: dir.to_path_buf(),
                    error,
                })?;
        }
        let lock = take_lock(&path)?;
        let file = open_locked(&path)?;
        let scan = scan_file(&path).map_err(|error| OpenError::Io {
            path: path.clone(),
            action: "cannot read it",
            error,
        })?;
        let head = match &scan.last_good {
            Some((_, head)) => head.clone(),
            None => rotated_head(&settings)?,
        };
        let mut writer = Self {
            _lock: lock,
            boot_id,
            host,
            file: Some(file),
            size: scan.size,
            head,
            needs_newline: scan.unterminated,
            needs_rescan: false,
            pending: VecDeque::new(),
            budget: Arc::new(Budget::new(settings.buffer_bytes)),
            dirty: false,
            last_sync: Instant::now(),
            retry: None,
            status,
            settings,
            batch: Vec::new(),
            spare: Vec::new(),
            recycle: None,
        };
        writer.queue_recovery(&scan);
        let head = writer.head.clone();
        writer.status.send_modify(|s| {
            s.last_seq = head.seq;
            s.last_hash = head.hash;
        });
        writer.publish();
        Ok(writer)
    }

    /// Gives the boxes of written records back through `tx` (a bounded
    /// channel: what does not fit is freed here).
    pub fn recycle_into(&mut self, tx: std::sync::mpsc::SyncSender<Box<Record>>) {
        self.recycle = Some(tx);
    }

    /// The chain head the log continues from.
    #[must_use]
    pub const fn head(&self) -> &Head {
        &self.head
    }

    /// The budget the daemon charges records to before sending them here.
    #[must_use]
    pub fn budget(&self) -> Arc<Budget> {
        Arc::clone(&self.budget)
    }

    /// Queues a `log_recovered` record (first in line) if `scan` found torn
    /// lines after the last good record, and says so in the daemon's log.
    fn queue_recovery(&mut self, scan: &Scan) {
        if scan.trailing_bad.is_empty() {
            return;
        }
        let path = self.settings.path.display().to_string();
        for torn in &scan.trailing_bad {
            tracing::warn!(
                file = %path,
                line = torn.line,
                bytes = torn.bytes,
                unterminated = torn.unterminated,
                after_seq = self.head.seq,
                "event log: torn line (an interrupted write); the chain continues from the last good record"
            );
        }
        let mut record = Record::new(RecordKind::LogRecovered, boot_ns_now());
        record.torn.clone_from(&scan.trailing_bad);
        record.after_seq = Some(self.head.seq);
        self.stamp(&mut record);
        self.pending.push_front(Pending {
            record: Box::new(record),
            pinned: true,
            bytes: 0,
        });
    }

    /// Fills in what the writer itself knows for records it makes.
    fn stamp(&self, record: &mut Record) {
        super::stamp(record, &self.boot_id, &self.host);
    }

    /// Runs the writer until it is told to close or the daemon goes away.
    pub fn run(mut self, rx: &Receiver<Msg>) {
        // Whatever open() queued (a recovery record) goes out first.
        self.flush();
        self.publish();
        loop {
            let msg = match self.deadline() {
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let mut close = None;
            match msg {
                Ok(msg) => close = self.receive(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.close();
                    return;
                }
            }
            // Take everything already queued before touching the disk.
            while close.is_none()
                && let Ok(msg) = rx.try_recv()
            {
                close = self.receive(msg);
            }
            if let Some(ack) = close {
                self.close();
                // The daemon may have stopped waiting.
                let _ = ack.send(());
                return;
            }
            if self.retry.is_none_or(|(at, _)| Instant::now() >= at) {
                self.flush();
            }
            if self.dirty && Instant::now() >= self.last_sync + FSYNC_INTERVAL {
                self.sync();
            }
            self.publish();
        }
    }

    /// Takes a message in: records are queued; a close request is handed
    /// back.
    fn receive(&mut self, msg: Msg) -> Option<Sender<()>> {
        match msg {
            Msg::Record(r) => self.accept(r),
            Msg::Records(rs) => rs.into_iter().for_each(|r| self.accept(r)),
            Msg::Close(ack) => return Some(ack),
        }
        None
    }

    /// The next time the thread must wake without a message: a retry while
    /// degraded, an fsync while dirty. `None` when idle.
    fn deadline(&self) -> Option<Instant> {
        let retry = self.retry.map(|(at, _)| at);
        let sync = self.dirty.then_some(self.last_sync + FSYNC_INTERVAL);
        match (retry, sync) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Queues a record the daemon charged to the budget; its charge is
    /// released once it is written.
    pub fn accept(&mut self, charged: Charged) {
        let Charged { record, bytes } = charged;
        self.pending.push_back(Pending {
            record,
            pinned: false,
            bytes,
        });
    }

    /// Gives back the budget of records that were written.
    fn release<'a>(&self, written: impl IntoIterator<Item = &'a Pending>) {
        let (records, bytes) = written
            .into_iter()
            .filter(|p| p.bytes > 0)
            .fold((0, 0), |(n, b), p| (n + 1, b + p.bytes));
        if records > 0 {
            self.budget.release(records, bytes);
        }
    }

    /// Writes what is pending, in order, until done or a write fails.
    pub fn flush(&mut self) {
        loop {
            if self.needs_rescan
                && let Err(error) = self.rescan()
            {
                self.degrade(&error);
                return;
            }
            while !self.pending.is_empty() {
                match self.write_batch() {
                    Ok(0) => {}
                    Ok(_) => continue,
                    Err(error) => {
                        self.degrade(&error);
                        return;
                    }
                }
                // A rotation or a pinned record: one at a time.
                let Some(mut p) = self.pending.pop_front() else {
                    break;
                };
                if let Err(error) = self.write_one(&mut p) {
                    self.pending.push_front(p);
                    self.degrade(&error);
                    return;
                }
                self.release([&p]);
            }
            let dropped = self.budget.take_unreported();
            if dropped == 0 {
                break;
            }
            let mut record = Record::new(RecordKind::LogDropped, boot_ns_now());
            record.dropped = Some(dropped);
            self.stamp(&mut record);
            tracing::error!(
                dropped,
                buffer_bytes = self.settings.buffer_bytes,
                "event log: records were dropped while the disk could not keep up"
            );
            self.pending.push_back(Pending {
                record: Box::new(record),
                pinned: false,
                bytes: 0,
            });
        }
        if self.pending.capacity() > SHRINK_SLOTS {
            // A flood is over: give its slots back.
            self.pending.shrink_to_fit();
        }
        if self.retry.take().is_some() {
            tracing::info!(
                path = %self.settings.path.display(),
                seq = self.head.seq,
                "event log writable again; held records written"
            );
            self.status.send_modify(|s| s.degraded = false);
        }
        if self.dirty && self.settings.fsync == FsyncPolicy::Always {
            self.sync();
        }
    }

    /// Seals the pending records that fit in the current file, in order,
    /// into one buffer and writes it with a single `write(2)`. Each record
    /// is still a complete line inside one write, so a crash can only cut
    /// the last line, as with one write per record; the batch only saves
    /// the per-record syscall and status update when events come in bursts.
    /// Returns how many records it wrote: 0 when the first one needs
    /// [`write_one`](Self::write_one) (it is pinned, or the file must rotate
    /// first).
    fn write_batch(&mut self) -> Result<usize, String> {
        // Reused from batch to batch (see `chain::seal_into`), up to
        // KEEP_BUFFER_BYTES.
        let mut buf = std::mem::take(&mut self.batch);
        buf.clear();
        let mut head = self.head.clone();
        let mut n = 0;
        for p in &mut self.pending {
            if p.pinned {
                break;
            }
            // The strings this seal fills in, each of SPARE_STRING_BYTES:
            // written records' when there are any (no allocation, and none
            // freed later). Record::footprint counts each as that size.
            for s in [
                &mut p.record.time,
                &mut p.record.prev_hash,
                &mut p.record.hash,
            ] {
                if s.capacity() == 0 {
                    *s = self
                        .spare
                        .pop()
                        .unwrap_or_else(|| String::with_capacity(SPARE_STRING_BYTES));
                }
            }
            let start = buf.len();
            if n == 0 && self.needs_newline {
                buf.push(b'\n');
            }
            let seq = match chain::seal_into(&mut p.record, &head, &mut buf) {
                Ok(seq) => seq,
                Err(e) => return Err(format!("sealing a {} record: {e}", p.record.kind)),
            };
            let would_be = self.size + buf.len() as u64;
            let too_big = (self.size > 0 || n > 0) && would_be > self.settings.max_bytes;
            if too_big || (n > 0 && buf.len() > BATCH_BYTES) {
                buf.truncate(start);
                break;
            }
            head.seq = seq;
            head.hash.clone_from(&p.record.hash);
            n += 1;
        }
        let result = self.write_buf(&buf, n, head);
        if buf.capacity() <= KEEP_BUFFER_BYTES {
            // A flood's large batches do not keep theirs either.
            self.batch = buf;
        }
        result
    }

    /// Writes the `n` sealed records in `buf` and moves the chain to `head`
    /// (see [`write_batch`](Self::write_batch)).
    fn write_buf(&mut self, buf: &[u8], n: usize, head: Head) -> Result<usize, String> {
        if n == 0 {
            return Ok(0);
        }
        if self.file.is_none() {
            self.open_current().map_err(|e| e.to_string())?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(format!("{} is not open", self.settings.path.display()));
        };
        let before = self.size;
        match file.write(buf) {
            Ok(written) if written == buf.len() => {
                self.size += written as u64;
                self.needs_newline = false;
                self.head = head;
                self.dirty = true;
                self.release(self.pending.range(..n));
                for mut p in self.pending.drain(..n) {
                    let r = &mut *p.record;
                    let taken = [&mut r.time, &mut r.prev_hash, &mut r.hash].map(std::mem::take);
                    for mut s in taken {
                        // Only the writer's own (a caller's time of another
                        // size would not fit what footprint counts).
                        if self.spare.len() < SPARE_STRINGS && s.capacity() == SPARE_STRING_BYTES {
                            s.clear();
                            self.spare.push(s);
                        }
                    }
                    // Its box back to the daemon, emptied here, for a next
                    // record (see `EventLog::record`); freed here when
                    // enough wait.
                    if let Some(recycle) = &self.recycle {
                        *p.record = Record::default();
                        let _ = recycle.try_send(p.record);
                    }
                }
                self.count_written(n as u64);
                if self.settings.fsync == FsyncPolicy::Always {
                    self.sync();
                }
                Ok(n)
            }
            Ok(written) => {
                // Undo the partial batch so the file stays whole; if that
                // fails too, the next try finds it and records it torn.
                if file.set_len(before).is_err() {
                    self.needs_rescan = true;
                }
                Err(format!(
                    "writing {}: only {written} of {} bytes written (disk full?)",
                    self.settings.path.display(),
                    buf.len()
                ))
            }
            Err(e) => Err(format!("writing {}: {e}", self.settings.path.display())),
        }
    }

    /// Seals and writes one record with a single `write(2)`.
    fn write_one(&mut self, p: &mut Pending) -> Result<(), String> {
        let path = self.settings.path.clone();
        let sealed = chain::seal(&mut p.record, &self.head)
            .map_err(|e| format!("sealing a {} record: {e}", p.record.kind))?;
        let mut bytes = Vec::with_capacity(sealed.line.len() + 1);
        if self.needs_newline {
            bytes.push(b'\n');
        }
        bytes.extend_from_slice(sealed.line.as_bytes());
        let len = bytes.len() as u64;
        if !p.pinned && self.size > 0 && self.size + len > self.settings.max_bytes {
            self.rotate()
                .map_err(|e| format!("rotating {}: {e}", path.display()))?;
            // A fresh file needs no newline before its first line.
            bytes = sealed.line.clone().into_bytes();
        }
        if self.file.is_none() {
            self.open_current().map_err(|e| e.to_string())?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(format!("{} is not open", path.display()));
        };
        let before = self.size;
        match file.write(&bytes) {
            Ok(n) if n == bytes.len() => {
                self.size += n as u64;
                self.needs_newline = false;
                self.head = sealed.head;
                self.dirty = true;
                self.count_written(1);
                if self.settings.fsync == FsyncPolicy::Always {
                    self.sync();
                }
                Ok(())
            }
            Ok(n) => {
                // Undo the partial line so the file stays whole; if that
                // fails too, the next try finds it and records it torn.
                if file.set_len(before).is_err() {
                    self.needs_rescan = true;
                }
                Err(format!(
                    "writing {}: only {n} of {} bytes written (disk full?)",
                    path.display(),
                    bytes.len()
                ))
            }
            Err(e) => Err(format!("writing {}: {e}", path.display())),
        }
    }

    /// A cut-short write could not be undone: find the torn line it left
    /// and queue a `log_recovered` record in front of what is pending.
    fn rescan(&mut self) -> Result<(), String> {
        let path = &self.settings.path;
        let scan = scan_file(path).map_err(|e| format!("re-reading {}: {e}", path.display()))?;
        self.size = scan.size;
        self.needs_newline = scan.unterminated;
        self.needs_rescan = false;
        self.queue_recovery(&scan);
        Ok(())
    }

    /// The write failed: keep the records, retry later with back-off.
    fn degrade(&mut self, error: &str) {
        let back_off = self
            .retry
            .map_or(RETRY_FIRST, |(_, d)| (d * 2).min(RETRY_MAX));
        if self.retry.is_none() {
            tracing::error!(
                path = %self.settings.path.display(),
                %error,
                pending = self.pending.len(),
                "event log write failed; holding records in memory and retrying"
            );
        }
        self.retry = Some((Instant::now() + back_off, back_off));
        self.status.send_modify(|s| {
            s.degraded = true;
            s.write_errors += 1;
            s.last_error = Some(error.to_owned());
        });
    }

    /// `events.jsonl` -> `.1` -> ... -> `.keep`, then a fresh file.
    fn rotate(&mut self) -> io::Result<()> {
        if let Some(file) = &self.file {
            file.sync_data()?;
        }
        self.file = None;
        self.dirty = false;
        let path = self.settings.path.clone();
        let path = &path;
        for i in (1..self.settings.keep).rev() {
            rename_if_exists(&rotated_path(path, i), &rotated_path(path, i + 1))?;
        }
        rename_if_exists(path, &rotated_path(path, 1))?;
        self.size = 0;
        self.needs_newline = false;
        self.open_current()
            .map_err(|e| io::Error::other(e.to_string()))?;
        sync_dir(path);
        tracing::info!(path = %path.display(), keep = self.settings.keep, seq = self.head.seq, "event log rotated");
        Ok(())
    }

    fn open_current(&mut self) -> Result<(), OpenError> {
        let file = open_locked(&self.settings.path)?;
        self.size = file.metadata().map(|m| m.len()).unwrap_or(self.size);
        self.file = Some(file);
        Ok(())
    }

    fn sync(&mut self) {
        let Some(file) = &self.file else { return };
        match file.sync_data() {
            Ok(()) => self.dirty = false,
            Err(e) => {
                tracing::error!(path = %self.settings.path.display(), error = %e, "event log fsync failed");
                self.status.send_modify(|s| {
                    s.write_errors += 1;
                    s.last_error = Some(format!("fsync {}: {e}", self.settings.path.display()));
                });
                // Try again at the next interval, not in a tight loop.
            }
        }
        self.last_sync = Instant::now();
    }

    /// One last try at what is pending, then fsync.
    fn close(&mut self) {
        self.flush();
        self.sync();
        if !self.pending.is_empty() {
            tracing::error!(
                path = %self.settings.path.display(),
                unwritten = self.pending.len(),
                "event log: records could not be written before stopping"
            );
        }
        tracing::info!(path = %self.settings.path.display(), seq = self.head.seq, hash = %self.head.hash, "event log closed");
        self.publish();
    }

    /// The queue's length for /status, without a notification (see
    /// [`count_written`](Self::count_written)).
    fn publish(&self) {
        let pending = self.pending.len() as u64;
        self.status.send_if_modified(|s| {
            s.pending = pending;
            false
        });
    }

    /// `n` more records are on disk. Readers see it at their next look; no
    /// one is woken: the daemon would otherwise republish after every
    /// write, and that work would sit in front of the next event.
    fn count_written(&self, n: u64) {
        self.status.send_if_modified(|s| {
            s.records += n;
            s.last_seq = self.head.seq;
            s.last_hash.clone_from(&self.head.hash);
            false
        });
    }
}

/// The lock file of the log at `path`: `.NAME.lock` in the same directory
/// (hidden, so `events.jsonl*` does not match it). It is never renamed or
/// deleted: removing a lock file that another process may be opening
/// invites two holders.
#[must_use]
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or(path.as_os_str()));
    name.push(".lock");
    path.with_file_name(name)
}

/// Opens (creating, 0600) the lock file of the log at `path` and takes an
/// exclusive `flock` on it, held for as long as the returned file is open.
fn take_lock(path: &Path) -> Result<File, OpenError> {
    let lock = lock_path(path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&lock)
        .map_err(|error| OpenError::Io {
            path: lock.clone(),
            action: "cannot open the log's lock file",
            error,
        })?;
    flock_exclusive(&file, path, &lock)?;
    Ok(file)
}

/// Takes an exclusive `flock` on `file` (`lock`, guarding the log at
/// `path`) without waiting.
fn flock_exclusive(file: &File, path: &Path, lock: &Path) -> Result<(), OpenError> {
    // SAFETY: flock only reads the descriptor number, which `file` keeps
    // open for the whole call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    Err(if err.kind() == io::ErrorKind::WouldBlock {
        OpenError::Locked {
            path: path.to_path_buf(),
            lock: lock.to_path_buf(),
        }
    } else {
        OpenError::Io {
            path: lock.to_path_buf(),
            action: "cannot lock it",
            error: err,
        }
    })
}

/// Opens `path` for appending (0600, created if missing) and takes an
/// exclusive `flock` on it (what versions before the lock file relied on).
fn open_locked(path: &Path) -> Result<File, OpenError> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|error| OpenError::Io {
            path: path.to_path_buf(),
            action: "cannot open it for appending",
            error,
        })?;
    let meta = file.metadata().map_err(|error| OpenError::Io {
        path: path.to_path_buf(),
        action: "cannot stat it",
        error,
    })?;
    if meta.permissions().mode() & 0o777 != 0o600 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "event log was not mode 0600; fixing");
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|error| OpenError::Io {
                path: path.to_path_buf(),
                action: "cannot make it mode 0600",
                error,
            })?;
    }
    flock_exclusive(&file, path, path)?;
    sync_dir(path);
    Ok(file)
}

/// The head of the newest rotated file that has a record, else genesis.
fn rotated_head(settings: &EventLogSettings) -> Result<Head, OpenError> {
    for i in 1..=settings.keep {
        let path = rotated_path(&settings.path, i);
        let scan = scan_file(&path).map_err(|error| OpenError::Io {
            path: path.clone(),
            action: "cannot read it",
            error,
        })?;
        if let Some((_, head)) = scan.last_good {
            return Ok(head);
        }
    }
    Ok(Head::genesis())
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Makes a new or renamed directory entry durable; failure only costs
/// durability of the name, so it is ignored.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forensic::verify;

    fn settings(dir: &Path, max_bytes: u64, keep: u32) -> EventLogSettings {
        EventLogSettings {
            path: dir.join("log/events.jsonl"),
            fsync: FsyncPolicy::Interval,
            max_bytes,
            keep,
            buffer_bytes: crate::forensic::DEFAULT_BUFFER_BYTES,
        }
    }

    fn writer(s: &EventLogSettings) -> Writer {
        let (tx, _rx) = watch::channel(EventLogStatus::default());
        Writer::open(s.clone(), "boot".into(), "node".into(), tx).unwrap()
    }

    fn record(kind: RecordKind) -> Record {
        let mut r = Record::new(kind, 1);
        super::super::stamp(&mut r, &"boot".into(), &"node".into());
        r
    }

    /// Charges `r` to the budget and queues it, as `EventLog::append` does;
    /// false when it was dropped.
    fn queue(w: &mut Writer, r: Record) -> bool {
        let bytes = (r.footprint() + SLOT_BYTES) as u64;
        match w.budget.charge(bytes) {
            crate::forensic::budget::Charge::Taken => {
                w.accept(Charged {
                    record: Box::new(r),
                    bytes,
                });
                true
            }
            crate::forensic::budget::Charge::Dropped { .. } => false,
        }
    }

    fn write(w: &mut Writer, n: usize) {
        for _ in 0..n {
            assert!(queue(w, record(RecordKind::ConfigReload)));
        }
        w.flush();
        assert!(w.pending.is_empty(), "{:?}", w.status.borrow());
    }

    fn all_files(s: &EventLogSettings) -> Vec<PathBuf> {
        let mut files = vec![s.path.clone()];
        files.extend(
            (1..=s.keep)
                .map(|i| rotated_path(&s.path, i))
                .filter(|p| p.exists()),
        );
        files
    }

    #[test]
    fn creates_dir_0700_and_file_0600_and_continues_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), 1 << 20, 2);
        let mut w = writer(&s);
        write(&mut w, 3);
        drop(w);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&s.path), 0o600);
        assert_eq!(mode(s.path.parent().unwrap()), 0o700);
        let mut w = writer(&s);
        assert_eq!(w.head().seq, 3, "the chain continues after a restart");
        write(&mut w, 2);
        let report = verify::verify(std::slice::from_ref(&s.path)).unwrap();
        assert!(report.problem.is_none(), "{report}");
        assert_eq!(report.records, 5);
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), 1 << 20, 2);
        let _first = writer(&s);
        let (tx, _rx) = watch::channel(EventLogStatus::default());
        let err = Writer::open(s.clone(), "".into(), "".into(), tx)
            .err()
            .unwrap();
        assert!(matches!(err, OpenError::Locked { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("events.jsonl: in use by another process")
                && err.to_string().contains(".events.jsonl.lock"),
            "{err}"
        );
    }

    #[test]
    fn the_lock_file_is_hidden_beside_the_log_and_outlives_rotation() {
        assert_eq!(
            lock_path(Path::new("/var/lib/kmod-monitor/events.jsonl")),
            Path::new("/var/lib/kmod-monitor/.events.jsonl.lock")
        );
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), 1500, 2);
        let mut w = writer(&s);
        let lock = lock_path(&s.path);
        let held = |lock: &Path| {
            let probe = File::open(lock).unwrap();
            // SAFETY: flock only reads the descriptor number of `probe`,
            // open for the whole call.
            let rc = unsafe { libc::flock(probe.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            rc != 0
        };
        assert!(held(&lock));
        let inode = || std::os::unix::fs::MetadataExt::ino(&fs::metadata(&lock).unwrap());
        let before = inode();
        write(&mut w, 40);
        assert!(rotated_path(&s.path, 2).exists(), "it rotated");
        assert!(held(&lock), "still locked after rotating");
        assert_eq!(inode(), before, "the same lock file");
        drop(w);
        assert!(!held(&lock), "released with the writer");
        assert!(lock.exists(), "never deleted");
    }

    #[test]
    fn a_second_writer_is_refused_at_every_moment_across_rotation() {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        };
        let dir = tempfile::tempdir().unwrap();
        // A rotation every few records.
        let s = settings(dir.path(), 4096, 2);
        let mut w = writer(&s);
        let done = Arc::new(AtomicBool::new(false));
        let tries = Arc::new(AtomicU64::new(0));
        // A second daemon trying to open the same log, as fast as it can,
        // while the first one rotates.
        let intruder = {
            let (s, done, tries) = (s.clone(), Arc::clone(&done), Arc::clone(&tries));
            std::thread::spawn(move || {
                let mut got_in = 0_u64;
                while !done.load(Ordering::Relaxed) {
                    let (tx, _rx) = watch::channel(EventLogStatus::default());
                    match Writer::open(s.clone(), "".into(), "".into(), tx) {
                        Err(OpenError::Locked { .. }) => {}
                        Ok(_) => got_in += 1,
                        Err(e) => panic!("{e}"),
                    }
                    tries.fetch_add(1, Ordering::Relaxed);
                }
                got_in
            })
        };
        let mut rotations = 0;
        while rotations < 300 || tries.load(Ordering::Relaxed) < 1000 {
            let before = w.size;
            queue(&mut w, record(RecordKind::ConfigReload));
            w.flush();
            assert!(
                !w.status.borrow().degraded,
                "the writer lost its own log to the intruder after {rotations} rotations: {:?}",
                w.status.borrow()
            );
            if w.size < before {
                rotations += 1;
            }
        }
        done.store(true, Ordering::Relaxed);
        let got_in = intruder.join().unwrap();
        assert_eq!(
            got_in,
            0,
            "a second writer opened the log {got_in} times in {} tries across {rotations} rotations",
            tries.load(Ordering::Relaxed)
        );
        drop(w);
        let report = verify::verify(&all_files(&s)).unwrap();
        assert!(report.problem.is_none(), "{report}");
    }

    #[test]
    fn rotation_keeps_n_files_and_the_chain_verifiable() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), 1500, 3);
        let mut w = writer(&s);
        write(&mut w, 40);
        drop(w);
        let files = all_files(&s);
        assert_eq!(files.len(), 4, "current + 3 rotated: {files:?}");
        assert!(!rotated_path(&s.path, 4).exists());
        for f in &files {
            assert!(fs::metadata(f).unwrap().len() <= 1500, "{}", f.display());
        }
        // In any order on the command line.
        let mut shuffled = files.clone();
        shuffled.reverse();
        let report = verify::verify(&shuffled).unwrap();
        assert!(report.problem.is_none(), "{report}");
        assert_eq!(report.last.as_ref().unwrap().seq, 40);
        // The oldest were rotated away: the chain is anchored, not complete.
        assert!(report.first_seq > 1);
        // A restart after rotation continues from the current file.
        let mut w = writer(&s);
        assert_eq!(w.head().seq, 40);
        write(&mut w, 1);
        // Without the current file's record, the newest rotated one is the head.
        drop(w);
        fs::remove_file(&s.path).unwrap();
        let w = writer(&s);
        assert!(w.head().seq < 41 && w.head().seq > 30, "{:?}", w.head());
    }

    #[test]
    fn a_torn_last_line_is_recovered_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), 1 << 20, 2);
        let mut w = writer(&s);
        write(&mut w, 3);
        drop(w);
        // A crash mid-write: half of a fourth line, no newline.
        let text = fs::read_to_string(&s.path).unwrap();
        let half = &text.lines().last().unwrap()[..60];
        fs::OpenOptions::new()
            .append(true)
            .open(&s.path)
            .unwrap()
            .write_all(half.as_bytes())
            .unwrap();
        let before = verify::verify(std::slice::from_ref(&s.path)).unwrap();
        let problem = before.problem.as_ref().unwrap();
        assert_eq!(problem.line, 4, "{before}");
        assert!(problem.to_string().contains("torn"), "{before}");

        let mut w = writer(&s);
        assert_eq!(w.head().seq, 3);
        w.flush();
        write(&mut w, 1);
        drop(w);
        let text = fs::read_to_string(&s.path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[3], half, "the torn bytes are kept, now terminated");
        let recovered: Record = serde_json::from_str(lines[4]).unwrap();
        assert_eq!(recovered.kind, RecordKind::LogRecovered);
        assert_eq!(recovered.seq, 4);
        assert_eq!(recovered.after_seq, Some(3));
        assert_eq!(
            recovered.torn,
            [TornLine {
                line: 4,
                bytes: 60,
                unterminated: true
            }]
        );
        let report = verify::verify(std::slice::from_ref(&s.path)).unwrap();
        assert!(report.problem.is_none(), "{report}");
        assert_eq!(report.records, 5);
        assert!(
            report.notes.iter().any(|n| n.contains(":4: torn line")),
            "{report}"
        );
    }

    #[test]
    fn a_failing_disk_holds_records_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), 1 << 20, 2);
        let mut w = writer(&s);
        write(&mut w, 2);
        // Make writes fail: swap the file for a read-only descriptor.
        w.file = Some(File::open(&s.path).unwrap());
        queue(&mut w, record(RecordKind::Drift));
        queue(&mut w, record(RecordKind::Drift));
        w.flush();
        {
            let st = w.status.borrow();
            assert!(st.degraded);
            assert_eq!(st.write_errors, 1);
            assert!(
                st.last_error.as_deref().unwrap().contains("events.jsonl"),
                "{st:?}"
            );
        }
        assert_eq!(w.pending.len(), 2);
        assert!(
            w.retry.is_some(),
            "a retry is scheduled only while degraded"
        );
        w.file = None; // the next try reopens it for appending
        w.flush();
        assert!(w.pending.is_empty());
        assert!(!w.status.borrow().degraded);
        assert!(w.retry.is_none());
        drop(w);
        let report = verify::verify(std::slice::from_ref(&s.path)).unwrap();
        assert!(report.problem.is_none(), "{report}");
        assert_eq!(report.records, 4);
    }

    #[test]
    fn an_idle_writer_has_no_wakeup() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), 1 << 20, 2);
        let mut w = writer(&s);
        assert_eq!(w.deadline(), None, "nothing written: nothing to wake for");
        write(&mut w, 1);
        let at = w.deadline().expect("an fsync is due after a write");
        assert!(at <= Instant::now() + FSYNC_INTERVAL);
        w.sync();
        assert_eq!(w.deadline(), None, "synced and idle");

        let always = EventLogSettings {
            fsync: FsyncPolicy::Always,
            path: dir.path().join("always.jsonl"),
            ..s
        };
        let mut w = writer(&always);
        write(&mut w, 2);
        assert_eq!(w.deadline(), None, "fsync=always leaves nothing for later");
    }

    #[test]
    fn a_cut_short_write_that_could_not_be_undone_is_recovered_next() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), 1 << 20, 2);
        let mut w = writer(&s);
        write(&mut w, 2);
        // What a short write leaves when truncating it back failed too.
        fs::OpenOptions::new()
            .append(true)
            .open(&s.path)
            .unwrap()
            .write_all(b"{\"boot_id\":\"bo")
            .unwrap();
        w.needs_rescan = true;
        write(&mut w, 1);
        drop(w);
        let text = fs::read_to_string(&s.path).unwrap();
        let kinds: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Record>(l).ok())
            .map(|r| r.kind.to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "config_reload",
                "config_reload",
                "log_recovered",
                "config_reload"
            ]
        );
        let report = verify::verify(std::slice::from_ref(&s.path)).unwrap();
        assert!(report.problem.is_none(), "{report}");
        assert_eq!(report.records, 4);
    }

    #[test]
    fn held_records_stay_within_the_buffer_bytes_and_drops_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let s = EventLogSettings {
            buffer_bytes: 64 * 1024,
            ..settings(dir.path(), 1 << 20, 2)
        };
        let mut w = writer(&s);
        write(&mut w, 1);
        // The disk fails: records are held, up to the bound, then dropped.
        w.file = Some(File::open(&s.path).unwrap());
        let (mut queued, mut dropped) = (0_u64, 0_u64);
        for _ in 0..1000 {
            if queue(&mut w, record(RecordKind::Drift)) {
                queued += 1;
            } else {
                dropped += 1;
            }
            w.flush();
        }
        assert!(w.status.borrow().degraded);
        let usage = w.budget.usage();
        assert!(usage.bytes <= 64 * 1024, "{usage:?}");
        let held: usize = w
            .pending
            .iter()
            .map(|p| p.record.footprint() + SLOT_BYTES)
            .sum();
        assert_eq!(held as u64, usage.bytes, "the budget is what is held");
        assert_eq!((usage.records, usage.dropped), (queued, dropped));
        assert_eq!(w.pending.len() as u64, queued);
        assert!(
            queued > 10 && dropped > 500,
            "{queued} held, {dropped} dropped"
        );

        // Space returns: what was held is written, then log_dropped, and the
        // budget is free again.
        w.file = None;
        w.flush();
        assert!(w.pending.is_empty());
        assert!(w.pending.capacity() <= SHRINK_SLOTS);
        assert_eq!((w.budget.usage().bytes, w.budget.usage().records), (0, 0));
        drop(w);
        let report = verify::verify(std::slice::from_ref(&s.path)).unwrap();
        assert!(report.problem.is_none(), "{report}");
        let text = fs::read_to_string(&s.path).unwrap();
        let records: Vec<Record> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let drifts = records
            .iter()
            .filter(|r| r.kind == RecordKind::Drift)
            .count();
        assert_eq!(drifts as u64, queued, "every held record was written");
        let last = records.last().unwrap();
        assert_eq!(
            (last.kind, last.dropped),
            (RecordKind::LogDropped, Some(dropped))
        );
    }
}
