//! The requirement model: what a node must have.
//!
//! Two kinds of requirement, reported alike (name, met, severity):
//! - **module groups**, judged by the tracker: a named set of modules with a
//!   mode (`all_of`, `any_of`, or `available`: each must be loadable on
//!   demand) and a severity. Built in: `base` (dm_crypt, every node),
//!   `v2-data-engine` (vfio_pci, uio_pci_generic, nvme_tcp), `v1-iscsi`
//!   (iscsi_tcp) and `rwx-nfs-client` (nfs, nfsv4), both on by default at
//!   warning severity, and `ublk` (ublk_drv), off by default. Users add their
//!   own in the config file.
//! - **checks** of the host and the cluster ([`BUILTIN_CHECKS`]): kernel
//!   version, IOMMU, hugepages (sysfs and the kubelet's view), CPU, host
//!   commands, multipathd. They are judged from facts by
//!   `longhorn::readiness`, per the Longhorn version's row in [`table`].
//!
//! Every built-in name can be switched off (`[groups.NAME] enabled =
//! false`) and given another severity. This module knows nothing of where
//! the settings come from: the config file's parser produces a
//! [`GroupSettings`], and [`resolve`] turns it, with the V2 decision, into
//! the groups the tracker follows.
pub mod table;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::names::ModuleName;
pub use table::{Level, LonghornVersion};

/// Name of the built-in group every Longhorn node needs.
pub const BASE_GROUP: &str = "base";
/// Name of the built-in group the v2 (SPDK) data engine needs.
pub const V2_GROUP: &str = "v2-data-engine";
/// Name of the built-in group V1 volumes' iSCSI frontend needs.
pub const V1_ISCSI_GROUP: &str = "v1-iscsi";
/// Name of the built-in group RWX volumes need (the NFSv4 client).
pub const NFS_GROUP: &str = "rwx-nfs-client";
/// Name of the built-in group the ublk frontend needs (off by default).
pub const UBLK_GROUP: &str = "ublk";
/// Severity of a group that sets none.
pub const DEFAULT_SEVERITY: &str = "critical";
/// Severity of the built-in requirements that only warn.
pub const WARNING_SEVERITY: &str = "warning";

/// The checks that are not module groups; each can be switched off or
/// given a severity like a built-in group.
pub const BUILTIN_CHECKS: [&str; 10] = [
    "v2-kernel",
    "v2-kernel-recommended",
    "v2-iommu",
    "v2-cpu",
    "v2-hugepages",
    "v2-hugepages-kubelet",
    "host-commands",
    "multipathd",
    "ublk-kernel",
    "ublk-kernel-known-issues",
];

/// Every built-in name a `[groups.NAME]` table may switch: the module
/// groups, then the checks.
#[must_use]
pub fn is_builtin(name: &str) -> bool {
    [BASE_GROUP, V2_GROUP, V1_ISCSI_GROUP, NFS_GROUP, UBLK_GROUP].contains(&name)
        || BUILTIN_CHECKS.contains(&name)
}

/// How a group's modules combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupMode {
    /// Every module must be loaded or built in.
    AllOf,
    /// At least one module must be loaded or built in.
    AnyOf,
    /// Every module must be loadable on demand: loaded, built in, or a
    /// module file the kernel has that nothing blacklists (iscsiadm and
    /// mount.nfs load theirs when they need them).
    Available,
    /// Not a module group: a check of the host or the cluster (see
    /// [`CheckInfo`]).
    Check,
}

/// What a check reports beyond met or not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckInfo {
    /// Whether unmet fails `check` and pages, or only warns.
    pub level: Level,
    /// What was found, in one sentence.
    pub detail: String,
    /// The step that makes it hold, when unmet.
    pub fix: Option<String>,
    /// Where Longhorn says so.
    pub source: String,
}

/// One requirement group, ready for the tracker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupSpec {
    /// `[a-z0-9-]+`.
    pub name: String,
    /// all_of or any_of.
    pub mode: GroupMode,
    /// At least one, no duplicates, in file order.
    pub modules: Vec<ModuleName>,
    /// Free-form label for alerts, default [`DEFAULT_SEVERITY`].
    pub severity: String,
    /// Whether this is one of the built-in groups.
    pub builtin: bool,
}

/// What the settings say about a built-in group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuiltinGroupSettings {
    /// `enabled = ...`, if given.
    pub enabled: Option<bool>,
    /// `severity = ...`, if given.
    pub severity: Option<String>,
}

/// A group the user defined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserGroup {
    /// The validated group.
    pub spec: GroupSpec,
    /// `enabled = ...`, default true.
    pub enabled: bool,
}

/// Everything the settings say about groups (the config file's
/// `[groups.*]` tables).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupSettings {
    /// `[groups.base]`.
    pub base: BuiltinGroupSettings,
    /// `[groups.v2-data-engine]`.
    pub v2: BuiltinGroupSettings,
    /// The other built-in groups' and checks' tables, by name.
    pub builtin: BTreeMap<String, BuiltinGroupSettings>,
    /// User groups, sorted by name (enabled or not).
    pub user: Vec<UserGroup>,
}

impl GroupSettings {
    /// Whether built-in `name` is on, `default` when the file says nothing.
    #[must_use]
    pub fn enabled(&self, name: &str, default: bool) -> bool {
        self.builtin
            .get(name)
            .and_then(|b| b.enabled)
            .unwrap_or(default)
    }

    /// Built-in `name`'s severity, `default` when the file says nothing.
    #[must_use]
    pub fn severity<'a>(&'a self, name: &str, default: &'a str) -> &'a str {
        self.builtin
            .get(name)
            .and_then(|b| b.severity.as_deref())
            .unwrap_or(default)
    }
}

/// The enabled groups, in a stable order: `base`, `v2-data-engine`,
/// `v1-iscsi`, `rwx-nfs-client`, `ublk`, then user groups by name. `v2_on`
/// is the V2 decision ([`crate::longhorn::decide_v2`]: flag, cluster,
/// file).
#[must_use]
pub fn resolve(settings: &GroupSettings, v2_on: bool) -> Vec<GroupSpec> {
    let GroupSettings {
        base,
        v2,
        builtin,
        user,
    } = settings;
    let mut enabled = Vec::new();
    let [base_spec, v2_spec, iscsi, nfs, ublk] = builtin_groups();
    if base.enabled.unwrap_or(true) {
        enabled.push(with_severity(base_spec, base.severity.as_deref()));
    }
    if v2_on {
        enabled.push(with_severity(v2_spec, v2.severity.as_deref()));
    }
    for (spec, default) in [(iscsi, true), (nfs, true), (ublk, false)] {
        let own = builtin.get(&spec.name);
        if own.and_then(|b| b.enabled).unwrap_or(default) {
            let severity = own.and_then(|b| b.severity.as_deref());
            enabled.push(with_severity(spec, severity));
        }
    }
    let mut user: Vec<&UserGroup> = user.iter().filter(|g| g.enabled).collect();
    user.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    enabled.extend(user.into_iter().map(|g| g.spec.clone()));
    enabled
}

fn with_severity(mut spec: GroupSpec, severity: Option<&str>) -> GroupSpec {
    if let Some(severity) = severity {
        severity.clone_into(&mut spec.severity);
    }
    spec
}

/// The built-in module groups with their default severity: `[base,
/// v2-data-engine, v1-iscsi, rwx-nfs-client, ublk]`.
///
/// Sources: base and V2 from longhorn-manager's `KernelModulesLoaded`
/// condition (dm_crypt; vfio_pci, uio_pci_generic, nvme_tcp while V2 is on);
/// iscsi_tcp from longhornctl's preflight (longhorn/longhorn#11706); the
/// NFSv4 client from longhornctl's NFSv4 check (CONFIG_NFS_V4* built in or
/// loadable; longhorn/longhorn#11712 for built-ins); ublk_drv from the
/// ublk frontend docs (1.9+).
#[must_use]
pub fn builtin_groups() -> [GroupSpec; 5] {
    let names = |names: &[&str]| -> Vec<ModuleName> {
        names
            .iter()
            .filter_map(|n| ModuleName::from_kernel(n))
            .collect()
    };
    [
        GroupSpec {
            name: BASE_GROUP.to_owned(),
            mode: GroupMode::AllOf,
            modules: names(&["dm_crypt"]),
            severity: DEFAULT_SEVERITY.to_owned(),
            builtin: true,
        },
        GroupSpec {
            name: V2_GROUP.to_owned(),
            mode: GroupMode::AllOf,
            modules: names(&["vfio_pci", "uio_pci_generic", "nvme_tcp"]),
            severity: DEFAULT_SEVERITY.to_owned(),
            builtin: true,
        },
        GroupSpec {
            name: V1_ISCSI_GROUP.to_owned(),
            mode: GroupMode::Available,
            modules: names(&["iscsi_tcp"]),
            severity: WARNING_SEVERITY.to_owned(),
            builtin: true,
        },
        GroupSpec {
            name: NFS_GROUP.to_owned(),
            mode: GroupMode::Available,
            modules: names(&["nfs", "nfsv4"]),
            severity: WARNING_SEVERITY.to_owned(),
            builtin: true,
        },
        GroupSpec {
            name: UBLK_GROUP.to_owned(),
            mode: GroupMode::AllOf,
            modules: names(&["ublk_drv"]),
            severity: DEFAULT_SEVERITY.to_owned(),
            builtin: true,
        },
    ]
}

/// The severity of the V2 group as configured (the hugepage requirement,
/// which belongs with it, shares it).
#[must_use]
pub fn v2_severity(groups: &[GroupSpec]) -> &str {
    groups
        .iter()
        .find(|g| g.name == V2_GROUP)
        .map_or(DEFAULT_SEVERITY, |g| g.severity.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::name;

    fn names(groups: &[GroupSpec]) -> Vec<&str> {
        groups.iter().map(|g| g.name.as_str()).collect()
    }

    fn user(name_: &str, enabled: bool) -> UserGroup {
        UserGroup {
            spec: GroupSpec {
                name: name_.to_owned(),
                mode: GroupMode::AnyOf,
                modules: vec![name("nbd")],
                severity: "warning".to_owned(),
                builtin: false,
            },
            enabled,
        }
    }

    #[test]
    fn defaults_are_base_v1_and_nfs_then_v2_when_on() {
        let none = GroupSettings::default();
        let groups = resolve(&none, false);
        assert_eq!(names(&groups), ["base", "v1-iscsi", "rwx-nfs-client"]);
        assert_eq!(groups[0].modules, [name("dm_crypt")]);
        assert_eq!(groups[0].severity, DEFAULT_SEVERITY);
        assert_eq!(groups[1].mode, GroupMode::Available);
        assert_eq!(groups[1].severity, WARNING_SEVERITY);
        assert_eq!(groups[2].modules, [name("nfs"), name("nfsv4")]);
        let groups = resolve(&none, true);
        assert_eq!(
            names(&groups),
            ["base", "v2-data-engine", "v1-iscsi", "rwx-nfs-client"]
        );
        assert_eq!(
            groups[1].modules,
            [name("vfio_pci"), name("uio_pci_generic"), name("nvme_tcp")]
        );
        assert_eq!(v2_severity(&groups), DEFAULT_SEVERITY);
    }

    #[test]
    fn switches_severities_and_user_order() {
        let settings = GroupSettings {
            base: BuiltinGroupSettings {
                enabled: Some(false),
                severity: None,
            },
            v2: BuiltinGroupSettings {
                enabled: None,
                severity: Some("page".to_owned()),
            },
            builtin: [
                (
                    "v1-iscsi".to_owned(),
                    BuiltinGroupSettings {
                        enabled: Some(false),
                        severity: None,
                    },
                ),
                (
                    "ublk".to_owned(),
                    BuiltinGroupSettings {
                        enabled: Some(true),
                        severity: Some("warning".to_owned()),
                    },
                ),
            ]
            .into(),
            user: vec![user("zeta", true), user("off", false), user("alpha", true)],
        };
        let groups = resolve(&settings, true);
        assert_eq!(
            names(&groups),
            ["v2-data-engine", "rwx-nfs-client", "ublk", "alpha", "zeta"]
        );
        assert_eq!(v2_severity(&groups), "page");
        assert_eq!(groups[2].severity, "warning");
        assert_eq!(
            names(&resolve(&settings, false)),
            ["rwx-nfs-client", "ublk", "alpha", "zeta"]
        );
        assert!(settings.enabled("ublk", false));
        assert!(!settings.enabled("multipathd", false));
        assert_eq!(settings.severity("nothing", "warning"), "warning");
        assert!(is_builtin("v2-iommu") && is_builtin("rwx-nfs-client") && !is_builtin("alpha"));
    }
}
