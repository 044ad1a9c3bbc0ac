//! Refused unload attempts, aggregated. Anyone can call `delete_module`;
//! without CAP_SYS_MODULE the kernel refuses. Each refusal of a required
//! module is security-relevant, but one record per attempt would let an
//! unprivileged loop rotate the forensic log away. So attempts are gathered
//! per uid and module over a window, and each window ends in one
//! `module_unload_denied` record per key, with the count and the last
//! attempt's actor (its comm and cgroup). The key leaves out what an
//! unprivileged process can vary at will (its pid, comm, gid, a delegated
//! cgroup). At most [`MAX_KEYS`] keys per window; attempts beyond that are
//! counted as `other`.
//!
//! The window starts at [`WINDOW`] and doubles, up to [`MAX_WINDOW`], while
//! attempts keep coming (a window that opens less than one window length
//! after the last one closed); a quiet window length resets it. A sustained
//! flood by one user on one module therefore writes one record every ten
//! minutes, whatever its rate: the log's growth is bounded in bytes per
//! hour, not only per window.
use std::{collections::BTreeMap, time::Duration};

use tokio::time::Instant;

use crate::{event::Actor, names::ModuleName};

/// The first window: how long attempts are gathered before their records
/// are written.
pub const WINDOW: Duration = Duration::from_secs(10);
/// The longest window, reached after six busy windows in a row.
pub const MAX_WINDOW: Duration = Duration::from_secs(600);
/// Distinct uid/module keys kept per window.
pub const MAX_KEYS: usize = 64;

/// Who tried, and on what.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub module: ModuleName,
    pub uid: u32,
}

/// One key's attempts in a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempts {
    pub count: u64,
    pub first_boot_ns: u64,
    pub last_boot_ns: u64,
    /// The last attempt's actor (pid, tgid, gid, comm, cgroup).
    pub last: Actor,
}

/// What a window gathered: every key's attempts, the attempts that came
/// after [`MAX_KEYS`] keys were taken, and how long the window was.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WindowSummary {
    pub keys: Vec<(Key, Attempts)>,
    pub other: u64,
    pub window: Duration,
}

/// The window being gathered.
#[derive(Debug, Default)]
pub struct Denied {
    /// When the current window ends; `None` while nothing is gathered.
    ends: Option<Instant>,
    /// The current (or, while closed, the last) window's length.
    length: Duration,
    /// When the last window closed.
    closed_at: Option<Instant>,
    keys: BTreeMap<Key, Attempts>,
    other: u64,
}

impl Denied {
    /// Adds one attempt. Returns true when it is the key's first in this
    /// window (the daemon logs that one at once).
    pub fn add(&mut self, module: ModuleName, actor: &Actor, boot_ns: u64, now: Instant) -> bool {
        if self.ends.is_none() {
            let busy = self
                .closed_at
                .is_some_and(|closed| now.saturating_duration_since(closed) < self.length);
            self.length = if busy {
                (self.length * 2).min(MAX_WINDOW)
            } else {
                WINDOW
            };
            self.ends = Some(now + self.length);
        }
        let key = Key {
            module,
            uid: actor.uid,
        };
        if let Some(a) = self.keys.get_mut(&key) {
            a.count += 1;
            a.first_boot_ns = a.first_boot_ns.min(boot_ns);
            a.last_boot_ns = a.last_boot_ns.max(boot_ns);
            a.last = actor.clone();
            return false;
        }
        if self.keys.len() >= MAX_KEYS {
            self.other += 1;
            return false;
        }
        self.keys.insert(
            key,
            Attempts {
                count: 1,
                first_boot_ns: boot_ns,
                last_boot_ns: boot_ns,
                last: actor.clone(),
            },
        );
        true
    }

    /// When the current window ends, if one is open.
    pub const fn due(&self) -> Option<Instant> {
        self.ends
    }

    /// Closes the window (at `now`) and returns what it gathered.
    pub fn flush(&mut self, now: Instant) -> WindowSummary {
        if self.ends.take().is_some() {
            self.closed_at = Some(now);
        }
        WindowSummary {
            keys: std::mem::take(&mut self.keys).into_iter().collect(),
            other: std::mem::take(&mut self.other),
            window: self.length,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::name;

    fn actor(uid: u32, pid: u32, comm: &str) -> Actor {
        Actor {
            pid,
            tgid: pid,
            uid,
            gid: uid,
            comm: comm.into(),
            cgroup_id: 7,
        }
    }

    #[test]
    fn a_flood_is_one_key_with_a_count() {
        let mut d = Denied::default();
        let t0 = Instant::now();
        assert!(d.add(name("dm_crypt"), &actor(1000, 1, "rmmod"), 10, t0));
        for i in 0..1499 {
            // A new process, and a new comm, every time: still one key.
            assert!(!d.add(
                name("dm_crypt"),
                &actor(1000, 2 + i, &format!("x{i}")),
                11 + u64::from(i),
                t0
            ));
        }
        assert_eq!(d.due(), Some(t0 + WINDOW));
        let s = d.flush(t0 + WINDOW);
        assert_eq!((s.other, s.window), (0, WINDOW));
        let [(key, a)] = s.keys.as_slice() else {
            panic!("one key: {s:?}");
        };
        assert_eq!((key.uid, key.module.as_str()), (1000, "dm_crypt"));
        assert_eq!((a.count, a.first_boot_ns, a.last_boot_ns), (1500, 10, 1509));
        assert_eq!((a.last.pid, a.last.comm.as_str()), (1500, "x1498"));
        assert_eq!(d.due(), None, "closed");
        assert!(d.flush(t0 + WINDOW).keys.is_empty());
    }

    #[test]
    fn keys_are_uid_and_module_and_bounded() {
        let mut d = Denied::default();
        let t0 = Instant::now();
        assert!(d.add(name("dm_crypt"), &actor(1000, 1, "rmmod"), 1, t0));
        assert!(d.add(name("nvme_tcp"), &actor(1000, 1, "rmmod"), 1, t0));
        assert!(d.add(name("dm_crypt"), &actor(1001, 1, "rmmod"), 1, t0));
        assert!(!d.add(name("dm_crypt"), &actor(1000, 1, "x"), 1, t0));
        for uid in 0..200 {
            d.add(name("dm_crypt"), &actor(2000 + uid, 1, "rmmod"), 1, t0);
        }
        let s = d.flush(t0);
        assert_eq!(s.keys.len(), MAX_KEYS);
        assert_eq!(s.other, 3 + 200 - MAX_KEYS as u64);
    }

    #[test]
    fn a_sustained_flood_stretches_the_window_and_quiet_resets_it() {
        let mut d = Denied::default();
        let mut now = Instant::now();
        let mut lengths = Vec::new();
        // One attempt a second for two hours: each window opens one second
        // after the last closed.
        let mut records = 0;
        while lengths.iter().sum::<Duration>() < Duration::from_secs(7200) {
            d.add(name("dm_crypt"), &actor(1000, 1, "rmmod"), 1, now);
            let ends = d.due().unwrap_or(now);
            let s = d.flush(ends);
            records += s.keys.len();
            lengths.push(s.window);
            now = ends + Duration::from_secs(1);
        }
        assert_eq!(
            lengths[..8]
                .iter()
                .map(Duration::as_secs)
                .collect::<Vec<_>>(),
            [10, 20, 40, 80, 160, 320, 600, 600]
        );
        // The six ramp-up windows, then one per ten minutes.
        assert_eq!(records, 6 + (7200 - 630_usize).div_ceil(600), "{lengths:?}");
        // Quiet for one window length: back to the first window.
        now += MAX_WINDOW;
        d.add(name("dm_crypt"), &actor(1000, 1, "rmmod"), 1, now);
        assert_eq!(d.due(), Some(now + WINDOW));
    }
}
