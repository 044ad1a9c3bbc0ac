//! Refused unload attempts, aggregated. Anyone can call `delete_module`;
//! without CAP_SYS_MODULE the kernel refuses. Each refusal of a required
//! module is security-relevant, but one record per attempt would let an
//! unprivileged loop rotate the forensic log away. So attempts are gathered
//! per actor (uid, gid, comm, cgroup) and module over [`WINDOW`], and each
//! window ends in one `module_unload_denied` record per key, with the
//! count. At most [`MAX_KEYS`] keys per window; attempts beyond that are
//! counted as `other`. The bytes written are bounded per window whatever
//! the attempt rate.
use std::{collections::BTreeMap, time::Duration};

use tokio::time::Instant;

use crate::{event::Actor, names::ModuleName};

/// How long attempts are gathered before their records are written.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Distinct actor/module keys kept per window.
pub const MAX_KEYS: usize = 64;

/// Who tried, and on what.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub module: ModuleName,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub cgroup_id: u64,
}

/// One key's attempts in a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempts {
    pub count: u64,
    pub first_boot_ns: u64,
    pub last_boot_ns: u64,
    /// The last attempt's actor (its pid and tgid).
    pub last: Actor,
}

/// What a window gathered: every key's attempts, and the attempts that
/// came after [`MAX_KEYS`] keys were taken.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WindowSummary {
    pub keys: Vec<(Key, Attempts)>,
    pub other: u64,
}

/// The window being gathered.
#[derive(Debug, Default)]
pub struct Denied {
    /// When the current window ends; `None` while nothing is gathered.
    ends: Option<Instant>,
    keys: BTreeMap<Key, Attempts>,
    other: u64,
}

impl Denied {
    /// Adds one attempt. Returns true when it is the key's first in this
    /// window (the daemon logs that one at once).
    pub fn add(&mut self, module: ModuleName, actor: &Actor, boot_ns: u64, now: Instant) -> bool {
        self.ends.get_or_insert(now + WINDOW);
        let key = Key {
            module,
            uid: actor.uid,
            gid: actor.gid,
            comm: actor.comm.clone(),
            cgroup_id: actor.cgroup_id,
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

    /// Closes the window and returns what it gathered.
    pub fn flush(&mut self) -> WindowSummary {
        self.ends = None;
        WindowSummary {
            keys: std::mem::take(&mut self.keys).into_iter().collect(),
            other: std::mem::take(&mut self.other),
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
            assert!(!d.add(
                name("dm_crypt"),
                &actor(1000, 2 + i, "rmmod"),
                11 + u64::from(i),
                t0
            ));
        }
        assert_eq!(d.due(), Some(t0 + WINDOW));
        let s = d.flush();
        assert_eq!(s.other, 0);
        let [(key, a)] = s.keys.as_slice() else {
            panic!("one key: {s:?}");
        };
        assert_eq!(
            (key.uid, key.comm.as_str(), key.module.as_str()),
            (1000, "rmmod", "dm_crypt")
        );
        assert_eq!((a.count, a.first_boot_ns, a.last_boot_ns), (1500, 10, 1509));
        assert_eq!(a.last.pid, 1500);
        assert_eq!(d.due(), None, "closed");
        assert_eq!(d.flush(), WindowSummary::default());
    }

    #[test]
    fn keys_are_actor_and_module_and_bounded() {
        let mut d = Denied::default();
        let t0 = Instant::now();
        assert!(d.add(name("dm_crypt"), &actor(1000, 1, "rmmod"), 1, t0));
        assert!(d.add(name("nvme_tcp"), &actor(1000, 1, "rmmod"), 1, t0));
        assert!(d.add(name("dm_crypt"), &actor(1001, 1, "rmmod"), 1, t0));
        assert!(d.add(name("dm_crypt"), &actor(1000, 1, "x"), 1, t0));
        for uid in 0..200 {
            d.add(name("dm_crypt"), &actor(2000 + uid, 1, "rmmod"), 1, t0);
        }
        let s = d.flush();
        assert_eq!(s.keys.len(), MAX_KEYS);
        assert_eq!(s.other, 4 + 200 - MAX_KEYS as u64);
    }
}
