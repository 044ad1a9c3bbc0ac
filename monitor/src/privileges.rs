//! Dropping privileges once the eBPF programs are attached: every
//! capability goes (the ring buffer, maps and tracefs files are already
//! open, and reading them needs none), and with `--user` the daemon also
//! becomes an unprivileged user. Capabilities are per thread, so this runs
//! before any other thread starts.
use std::collections::BTreeSet;

use caps::{CapSet, Capability};
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

/// Drops every capability and, with `user`, switches to it. Sets
/// no_new_privs so nothing exec'd later can regain them.
///
/// # Errors
/// When the effective or permitted set cannot be cleared, or the user
/// switch fails: the daemon must not run with privileges it claims to have
/// dropped.
pub fn drop_all(user: Option<&User>) -> Result<Privileges, PrivilegeError> {
    let mut notes = Vec::new();
    // The bounding set needs CAP_SETPCAP to shrink; a container that was
    // given only BPF/PERFMON lacks it, and then its runtime already bounds it.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all() {
            if let Err(e) = caps::drop(None, CapSet::Bounding, cap) {
                notes.push(format!("bounding set: {cap}: {e}"));
                break;
            }
        }
    } else {
        notes.push("bounding set left to the runtime (no CAP_SETPCAP)".to_owned());
    }
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
    if let Err(e) = nix::sys::prctl::set_no_new_privs() {
        notes.push(format!("no_new_privs: {e}"));
    }
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
