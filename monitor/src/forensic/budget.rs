//! The event log's memory bound: the bytes of records between
//! [`EventLog::append`](super::EventLog::append) and the disk, the queue into
//! the writer plus what the writer holds while writes fail, never more than
//! `buffer_bytes`.
//!
//! The daemon's thread charges a record's [`footprint`] before queueing it,
//! or counts it dropped when it does not fit; the writer thread releases the
//! charge once the record is written. Both sides only touch atomics, so
//! neither ever waits for the other. The writer's own records
//! (`log_recovered`, `log_dropped`: one or two, a few hundred bytes) are
//! not charged.
//!
//! [`footprint`]: super::Record::footprint
use std::sync::atomic::{AtomicU64, Ordering};

/// The bytes and records waiting for the disk, and what was dropped.
#[derive(Debug)]
pub struct Budget {
    /// Most bytes charged at once.
    limit: u64,
    /// Bytes charged now.
    bytes: AtomicU64,
    /// Records charged now.
    records: AtomicU64,
    /// Records refused since start.
    dropped: AtomicU64,
    /// Records refused since the writer last wrote a `log_dropped`.
    unreported: AtomicU64,
}

/// What [`Budget::charge`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charge {
    /// The record fits: queue it.
    Taken,
    /// It does not fit and was counted as dropped; `first` when it is the
    /// first drop since the last `log_dropped` record (worth one log line).
    Dropped {
        /// The first drop of this episode.
        first: bool,
    },
}

/// The budget now, for /status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// The bound.
    pub limit: u64,
    /// Bytes charged.
    pub bytes: u64,
    /// Records charged.
    pub records: u64,
    /// Records dropped since start.
    pub dropped: u64,
}

impl Budget {
    /// An empty budget of `limit` bytes.
    #[must_use]
    pub const fn new(limit: u64) -> Self {
        Self {
            limit,
            bytes: AtomicU64::new(0),
            records: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            unreported: AtomicU64::new(0),
        }
    }

    /// Charges one record of `bytes`, or counts it dropped when the bytes
    /// already charged plus these would pass the limit.
    pub fn charge(&self, bytes: u64) -> Charge {
        let fits = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                now.checked_add(bytes).filter(|&after| after <= self.limit)
            })
            .is_ok();
        if fits {
            self.records.fetch_add(1, Ordering::AcqRel);
            return Charge::Taken;
        }
        self.dropped.fetch_add(1, Ordering::AcqRel);
        let before = self.unreported.fetch_add(1, Ordering::AcqRel);
        Charge::Dropped { first: before == 0 }
    }

    /// Gives back the charge of `records` records of `bytes` in all, once
    /// they are written (or abandoned at shutdown).
    pub fn release(&self, records: u64, bytes: u64) {
        // Never below zero, even if a caller released more than it charged.
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                Some(now.saturating_sub(bytes))
            });
        let _ = self
            .records
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                Some(now.saturating_sub(records))
            });
    }

    /// The drops not yet reported by a `log_dropped` record, and from now on
    /// reported: the writer calls this when it makes that record.
    pub fn take_unreported(&self) -> u64 {
        self.unreported.swap(0, Ordering::AcqRel)
    }

    /// The budget now.
    #[must_use]
    pub fn usage(&self) -> Usage {
        Usage {
            limit: self.limit,
            bytes: self.bytes.load(Ordering::Acquire),
            records: self.records.load(Ordering::Acquire),
            dropped: self.dropped.load(Ordering::Acquire),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_up_to_the_limit_and_counts_the_rest_dropped() {
        let b = Budget::new(1000);
        assert_eq!(b.charge(600), Charge::Taken);
        assert_eq!(b.charge(400), Charge::Taken, "exactly the limit fits");
        assert_eq!(b.charge(1), Charge::Dropped { first: true });
        assert_eq!(b.charge(1), Charge::Dropped { first: false });
        assert_eq!(
            b.usage(),
            Usage {
                limit: 1000,
                bytes: 1000,
                records: 2,
                dropped: 2
            }
        );
        b.release(1, 600);
        assert_eq!(b.charge(500), Charge::Taken, "room again once written");
        assert_eq!(b.charge(200), Charge::Dropped { first: false });
        assert_eq!(b.take_unreported(), 3);
        assert_eq!(
            b.charge(u64::MAX),
            Charge::Dropped { first: true },
            "a new episode after the log_dropped record"
        );
        assert_eq!(b.usage().dropped, 4, "the total keeps counting");
        b.release(5, 5000);
        assert_eq!((b.usage().bytes, b.usage().records), (0, 0));
    }

    #[test]
    fn two_threads_never_pass_the_limit() {
        let b = std::sync::Arc::new(Budget::new(10_000));
        let spin = |b: std::sync::Arc<Budget>| {
            move || {
                let mut taken = 0_u64;
                for _ in 0..100_000 {
                    if b.charge(7) == Charge::Taken {
                        taken += 1;
                        assert!(b.usage().bytes <= 10_000);
                        if taken.is_multiple_of(3) {
                            b.release(1, 7);
                        }
                    }
                }
            }
        };
        let one = std::thread::spawn(spin(std::sync::Arc::clone(&b)));
        let two = std::thread::spawn(spin(std::sync::Arc::clone(&b)));
        one.join().unwrap();
        two.join().unwrap();
        let u = b.usage();
        assert!(u.bytes <= 10_000, "{u:?}");
        assert_eq!(u.bytes, u.records * 7, "{u:?}");
        assert_eq!(u.dropped, b.take_unreported());
    }
}
