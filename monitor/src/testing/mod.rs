//! Test support shared by the unit tests and the integration-test crate
//! (feature `test-support`): short constructors for validated values, the
//! real Debian 6.1 guest's module state as a snapshot, and [`FakeHost`],
//! the one fake host root. Nothing here is used by the daemon itself.
mod fake_host;

use std::path::Path;

pub use fake_host::{
    DEBIAN_6_1, DEBIAN_6_12, DEV_6_18, FakeHost, fixture, fixture_path, fixture_text,
};

use crate::{
    event::{Actor, Raw, SourceEvent},
    host::{LoadedModule, Snapshot, parse_modules_builtin, parse_modules_dep, parse_proc_modules},
    names::ModuleName,
    requirements::{GroupMode, GroupSpec},
};

/// A module name known to be valid; panics otherwise (test input).
///
/// # Panics
/// When `s` is not a valid module name.
#[must_use]
pub fn name(s: &str) -> ModuleName {
    ModuleName::parse(s).unwrap_or_else(|e| panic!("test module name {s:?}: {e}"))
}

/// The real 6.1 guest as a snapshot: dm_crypt, nvme_tcp and vfio_pci
/// loaded; uio_pci_generic available, not loaded (the captured
/// /proc/modules, modules.builtin and modules.dep).
#[must_use]
pub fn snapshot_debian_6_1() -> Snapshot {
    let p = Path::new("fixture");
    let loaded = parse_proc_modules(include_str!("../host/fixtures/proc_modules.debian-6.1"), p)
        .log_and_take()
        .into_iter()
        .map(|m| {
            (
                m.name,
                LoadedModule {
                    state: m.state,
                    taints: m.taints,
                },
            )
        })
        .collect();
    Snapshot {
        kernel_release: DEBIAN_6_1.into(),
        modules_supported: true,
        loaded,
        builtin: parse_modules_builtin(
            include_str!("../host/fixtures/modules.builtin.debian-6.1"),
            p,
        )
        .log_and_take(),
        available: parse_modules_dep(include_str!("../host/fixtures/modules.dep.debian-6.1"), p)
            .log_and_take(),
        kernel_config: None,
        modules_dir: None,
        warnings: Vec::new(),
    }
}

/// A user group of `modules`, severity critical.
#[must_use]
pub fn group(group_name: &str, mode: GroupMode, modules: &[&str]) -> GroupSpec {
    GroupSpec {
        name: group_name.into(),
        mode,
        modules: modules.iter().map(|m| name(m)).collect(),
        severity: "critical".into(),
        builtin: false,
    }
}

/// `base` and `v2-data-engine` with their modules.
#[must_use]
pub fn longhorn_groups() -> Vec<GroupSpec> {
    vec![
        group("base", GroupMode::AllOf, &["dm_crypt"]),
        group(
            "v2-data-engine",
            GroupMode::AllOf,
            &["vfio_pci", "uio_pci_generic", "nvme_tcp"],
        ),
    ]
}

/// An eBPF-style event at boot time `t` with an actor: `rmmod` for unloads,
/// `modprobe` otherwise, pid 100 + t.
///
/// # Panics
/// When `t` does not fit a pid.
#[must_use]
pub fn event(raw: Raw, module: &str, t: u64) -> SourceEvent {
    let pid = 100 + u32::try_from(t).unwrap_or_else(|_| panic!("event time {t} too large"));
    SourceEvent {
        raw,
        module: name(module),
        boot_ns: t,
        actor: Some(Actor {
            pid,
            tgid: pid,
            uid: 0,
            gid: 0,
            comm: if matches!(raw, Raw::UnloadBegin | Raw::UnloadResult { .. }) {
                "rmmod".into()
            } else {
                "modprobe".into()
            },
            cgroup_id: 1,
        }),
        taints: 0,
        wait: false,
        cpu: Some(0),
    }
}
