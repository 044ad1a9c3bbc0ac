//! Dropping privileges once the eBPF programs are attached: every
//! capability goes (the ring buffer, maps and tracefs files are already
//! open, and reading them needs none), and with `--user` the daemon also
//! becomes an unprivileged user. Capabilities are per thread, so this runs
//! before any other thread starts.
//!
//! The bounding set is emptied by number, 0 to the kernel's
//! `/proc/sys/kernel/cap_last_cap`, in order and without stopping early: a
//! number this kernel does not know (EINVAL) is skipped. The calls go
//! through [`Prctl`], so tests can stand in for the kernel.
use std::collections::BTreeSet;

use caps::{CapSet, Capability};
use nix::errno::Errno;
use serde::Serialize;

/// Who to become (`--user NAME|UID[:GID]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// As given, for messages.
    pub spec: String,
}

/// Why `--user` or the drop failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// No such user in the passwd database, and not a number.
    #[error("--user {spec}: no such user")]
    UnknownUser { spec: String },
    /// A UID or GID that is not a number.
    #[error("--user {spec}: {part:?} is not a number")]
    BadNumber { spec: String, part: String },
    /// Looking the user up failed.
    #[error("--user {spec}: looking it up failed: {error}")]
    Lookup { spec: String, error: nix::Error },
    /// A capability set could not be changed.
    #[error("dropping capabilities ({set}): {error}")]
    Caps {
        set: &'static str,
        error: caps::errors::CapsError,
    },
    /// setgroups/setgid/setuid failed.
    #[error("switching to {what}: {error}")]
    Switch { what: String, error: nix::Error },
    /// `no_new_privs` could not be set, so an exec could regain privileges.
    #[error(
        "setting no_new_privs (prctl PR_SET_NO_NEW_PRIVS): {error}; refusing to run with privileges an exec could regain"
    )]
    NoNewPrivs { error: Errno },
}

impl User {
    /// Resolves `NAME`, `UID` or `UID:GID`.
    ///
    /// # Errors
    /// When the name is unknown or a number does not parse.
    pub fn resolve(spec: &str) -> Result<Self, PrivilegeError> {
        let number = |part: &str| {
            part.parse::<u32>().map_err(|_| PrivilegeError::BadNumber {
                spec: spec.to_owned(),
                part: part.to_owned(),
            })
        };
        if let Some((uid, gid)) = spec.split_once(':') {
            return Ok(Self {
                uid: number(uid)?,
                gid: number(gid)?,
                spec: spec.to_owned(),
            });
        }
        if spec.bytes().all(|b| b.is_ascii_digit()) && !spec.is_empty() {
            let uid = number(spec)?;
            return Ok(Self {
                uid,
                gid: uid,
                spec: spec.to_owned(),
            });
        }
        match nix::unistd::User::from_name(spec) {
            Ok(Some(u)) => Ok(Self {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
                spec: spec.to_owned(),
            }),
            Ok(None) => Err(PrivilegeError::UnknownUser {
                spec: spec.to_owned(),
            }),
            Err(error) => Err(PrivilegeError::Lookup {
                spec: spec.to_owned(),
                error,
            }),
        }
    }
}

/// The process's privileges, as /status shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Privileges {
    pub uid: u32,
    pub gid: u32,
    /// Effective capabilities, lower-case names (`cap_bpf`).
    pub effective: BTreeSet<String>,
    pub permitted: BTreeSet<String>,
    /// Whether the drop ran (false with `--keep-privileges`).
    pub dropped: bool,
    /// What could not be dropped and why (e.g. the bounding set without
    /// CAP_SETPCAP in a container); the effective set is still empty.
    pub notes: Vec<String>,
}

fn names(set: CapSet) -> BTreeSet<String> {
    caps::read(None, set)
        .map(|s| {
            s.iter()
                .map(|c| c.to_string().to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default()
}

/// The current thread's privileges.
#[must_use]
pub fn current(dropped: bool) -> Privileges {
    Privileges {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        effective: names(CapSet::Effective),
        permitted: names(CapSet::Permitted),
        dropped,
        notes: Vec::new(),
    }
}

/// The highest capability number there can be: the kernel's sets are 64
/// bits wide.
const CAP_NUMBER_MAX: u32 = 63;

/// The kernel calls the privilege drop makes beyond the `caps` crate's set
/// clearing, so that tests can stand in for the kernel (and need no root).
pub trait Prctl {
    /// The highest capability number this kernel knows
    /// (`/proc/sys/kernel/cap_last_cap`), or why it cannot be read.
    fn cap_last_cap(&self) -> Result<u32, String>;
    /// Whether this thread may shrink its bounding set (CAP_SETPCAP in its
    /// effective set).
    fn may_shrink_bounding_set(&self) -> bool;
    /// `prctl(PR_CAPBSET_DROP, cap)`.
    ///
    /// # Errors
    /// EINVAL for a number the kernel does not know, EPERM without
    /// CAP_SETPCAP.
    fn capbset_drop(&mut self, cap: u32) -> Result<(), Errno>;
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
    ///
    /// # Errors
    /// As the kernel returns.
    fn set_no_new_privs(&mut self) -> Result<(), Errno>;
}

/// The real kernel, for the calling thread.
struct Kernel;

/// Where the kernel says which capability number is its last.
const CAP_LAST_CAP: &str = "/proc/sys/kernel/cap_last_cap";

impl Prctl for Kernel {
    fn cap_last_cap(&self) -> Result<u32, String> {
        let text = std::fs::read_to_string(CAP_LAST_CAP)
            .map_err(|e| format!("reading {CAP_LAST_CAP}: {e}"))?;
        text.trim()
            .parse()
            .map_err(|_| format!("{CAP_LAST_CAP}: {:?} is not a number", text.trim()))
    }

    fn may_shrink_bounding_set(&self) -> bool {
        caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false)
    }

    fn capbset_drop(&mut self, cap: u32) -> Result<(), Errno> {
        // SAFETY: PR_CAPBSET_DROP takes the capability number by value and
        // reads or writes no memory of ours; the unused arguments are 0.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if rc == 0 { Ok(()) } else { Err(Errno::last()) }
    }

    fn set_no_new_privs(&mut self) -> Result<(), Errno> {
        nix::sys::prctl::set_no_new_privs()
    }
}

/// The name of capability number `cap` (`cap_bpf`), or the number when the
/// `caps` crate does not know it (newer than it).
fn cap_name(cap: u32) -> String {
    caps::all()
        .into_iter()
        .find(|c| u32::from(c.index()) == cap)
        .map_or_else(
            || format!("capability {cap}"),
            |c| c.to_string().to_ascii_lowercase(),
        )
}

/// Empties the bounding set: every number from 0 to the kernel's last, in
/// order, skipping the ones it does not know, never stopping early. What
/// could not be dropped is said in `notes` (with no_new_privs set and the
/// other sets empty, the bounding set only matters to an exec that
/// no_new_privs already stops from gaining anything).
fn drop_bounding_set(kernel: &mut impl Prctl, notes: &mut Vec<String>) {
    // A container that was given only BPF/PERFMON lacks CAP_SETPCAP; its
    // runtime already bounds the set.
    if !kernel.may_shrink_bounding_set() {
        notes.push("bounding set left to the runtime (no CAP_SETPCAP)".to_owned());
        return;
    }
    let last = match kernel.cap_last_cap() {
        Ok(last) => last.min(CAP_NUMBER_MAX),
        Err(e) => {
            notes.push(format!(
                "bounding set: {e}; trying every capability number up to {CAP_NUMBER_MAX}"
            ));
            CAP_NUMBER_MAX
        }
    };
    let mut failed = Vec::new();
    for cap in 0..=last {
        match kernel.capbset_drop(cap) {
            // EINVAL: not a capability of this kernel, nothing to drop.
            Ok(()) | Err(Errno::EINVAL) => {}
            Err(e) => failed.push(format!("{}: {e}", cap_name(cap))),
        }
    }
    if !failed.is_empty() {
        notes.push(format!(
            "bounding set: could not drop {}",
            failed.join(", ")
        ));
    }
}

/// Drops every capability and, with `user`, switches to it. Sets
/// no_new_privs so nothing exec'd later can regain them.
///
/// # Errors
/// When the effective or permitted set cannot be cleared, the user switch
/// fails, or no_new_privs cannot be set: the daemon must not run with
/// privileges it claims to have dropped.
pub fn drop_all(user: Option<&User>) -> Result<Privileges, PrivilegeError> {
    drop_all_with(&mut Kernel, user)
}

/// [`drop_all`] through `kernel`.
fn drop_all_with(
    kernel: &mut impl Prctl,
    user: Option<&User>,
) -> Result<Privileges, PrivilegeError> {
    let mut notes = Vec::new();
    drop_bounding_set(kernel, &mut notes);
    let clear = |set: CapSet, name: &'static str| {
        caps::clear(None, set).map_err(|error| PrivilegeError::Caps { set: name, error })
    };
    clear(CapSet::Ambient, "ambient")?;
    clear(CapSet::Inheritable, "inheritable")?;
    if let Some(u) = user {
        let gid = nix::unistd::Gid::from_raw(u.gid);
        let uid = nix::unistd::Uid::from_raw(u.uid);
        let switch = |what: String, r: nix::Result<()>| {
            r.map_err(|error| PrivilegeError::Switch { what, error })
        };
        switch(
            format!("groups [{}]", u.gid),
            nix::unistd::setgroups(&[gid]),
        )?;
        switch(format!("gid {}", u.gid), nix::unistd::setgid(gid))?;
        // From uid 0 to another uid the kernel clears the permitted and
        // effective sets itself (no keepcaps).
        switch(
            format!("uid {} ({})", u.uid, u.spec),
            nix::unistd::setuid(uid),
        )?;
    }
    clear(CapSet::Effective, "effective")?;
    clear(CapSet::Permitted, "permitted")?;
    kernel
        .set_no_new_privs()
        .map_err(|error| PrivilegeError::NoNewPrivs { error })?;
    let mut now = current(true);
    now.notes = notes;
    Ok(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_specs() {
        assert_eq!(
            User::resolve("65534:65533").unwrap(),
            User {
                uid: 65534,
                gid: 65533,
                spec: "65534:65533".into()
            }
        );
        assert_eq!(User::resolve("1000").unwrap().gid, 1000);
        assert_eq!(User::resolve("root").unwrap().uid, 0);
        let e = User::resolve("no-such-user-kmod").unwrap_err();
        assert_eq!(e.to_string(), "--user no-such-user-kmod: no such user");
        let e = User::resolve("1:x").unwrap_err();
        assert_eq!(e.to_string(), "--user 1:x: \"x\" is not a number");
    }

    /// A kernel that knows capabilities up to `last` (and says so, or not),
    /// refuses some, and records every call.
    struct FakeKernel {
        last: Result<u32, String>,
        setpcap: bool,
        known_up_to: u32,
        refused: Vec<u32>,
        tried: Vec<u32>,
        no_new_privs: Result<(), Errno>,
    }

    impl FakeKernel {
        fn new(last: u32) -> Self {
            Self {
                last: Ok(last),
                setpcap: true,
                known_up_to: last,
                refused: Vec::new(),
                tried: Vec::new(),
                no_new_privs: Ok(()),
            }
        }
    }

    impl Prctl for FakeKernel {
        fn cap_last_cap(&self) -> Result<u32, String> {
            self.last.clone()
        }

        fn may_shrink_bounding_set(&self) -> bool {
            self.setpcap
        }

        fn capbset_drop(&mut self, cap: u32) -> Result<(), Errno> {
            self.tried.push(cap);
            if cap > self.known_up_to {
                Err(Errno::EINVAL)
            } else if self.refused.contains(&cap) {
                Err(Errno::EPERM)
            } else {
                Ok(())
            }
        }

        fn set_no_new_privs(&mut self) -> Result<(), Errno> {
            self.no_new_privs
        }
    }

    #[test]
    fn the_bounding_set_is_dropped_in_order_up_to_cap_last_cap() {
        // Linux 5.8: CAP_CHECKPOINT_RESTORE (40) came in 5.9.
        let mut kernel = FakeKernel::new(39);
        let mut notes = Vec::new();
        drop_bounding_set(&mut kernel, &mut notes);
        assert_eq!(kernel.tried, (0..=39).collect::<Vec<_>>());
        assert_eq!(notes, Vec::<String>::new());
        // A kernel newer than the caps crate: numbers it has no name for.
        let mut kernel = FakeKernel::new(45);
        drop_bounding_set(&mut kernel, &mut notes);
        assert_eq!(kernel.tried, (0..=45).collect::<Vec<_>>());
    }

    #[test]
    fn unknown_numbers_are_skipped_and_a_failure_does_not_stop_the_rest() {
        // cap_last_cap unreadable: every number a set can hold is tried,
        // and the ones this kernel lacks (EINVAL) are skipped quietly.
        let mut kernel = FakeKernel::new(40);
        kernel.last = Err("reading /proc/sys/kernel/cap_last_cap: gone".into());
        kernel.refused = vec![3, 21];
        let mut notes = Vec::new();
        drop_bounding_set(&mut kernel, &mut notes);
        assert_eq!(kernel.tried, (0..=63).collect::<Vec<_>>(), "no early break");
        assert_eq!(
            notes,
            [
                "bounding set: reading /proc/sys/kernel/cap_last_cap: gone; trying every capability number up to 63",
                "bounding set: could not drop cap_fowner: EPERM: Operation not permitted, cap_sys_admin: EPERM: Operation not permitted",
            ]
        );
        // Without CAP_SETPCAP nothing is tried.
        let mut kernel = FakeKernel::new(40);
        kernel.setpcap = false;
        let mut notes = Vec::new();
        drop_bounding_set(&mut kernel, &mut notes);
        assert!(kernel.tried.is_empty());
        assert_eq!(notes, ["bounding set left to the runtime (no CAP_SETPCAP)"]);
    }

    #[test]
    fn a_failed_no_new_privs_is_an_error() {
        // Capabilities are per thread: drop in a scratch thread so the test
        // process keeps its own.
        let err = std::thread::spawn(|| {
            let mut kernel = FakeKernel::new(40);
            kernel.no_new_privs = Err(Errno::EINVAL);
            drop_all_with(&mut kernel, None)
        })
        .join()
        .unwrap()
        .unwrap_err();
        assert!(matches!(err, PrivilegeError::NoNewPrivs { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("setting no_new_privs (prctl PR_SET_NO_NEW_PRIVS): EINVAL"),
            "{err}"
        );
    }

    #[test]
    fn dropping_in_a_thread_leaves_no_capability() {
        // Capabilities are per thread: drop in a scratch thread so the test
        // process keeps its own.
        let after = std::thread::spawn(|| drop_all(None))
            .join()
            .unwrap()
            .unwrap();
        assert!(after.effective.is_empty(), "{after:?}");
        assert!(after.permitted.is_empty(), "{after:?}");
        assert!(after.dropped);
    }
}
