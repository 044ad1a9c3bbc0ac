//! The requirement model: what a node must have, as groups of modules.
//!
//! A group is a named set of modules with a mode (`all_of`, `any_of`) and a
//! severity. Two groups are built in: `base` (dm_crypt, every Longhorn node)
//! and `v2-data-engine` (vfio_pci, uio_pci_generic, nvme_tcp). Users add
//! their own in the config file. This module knows nothing of where the
//! settings come from: the config file's parser produces a
//! [`GroupSettings`], and [`resolve`] turns it, with the V2 decision, into
//! the groups the tracker follows.
use serde::Serialize;

use crate::names::ModuleName;

/// Name of the built-in group every Longhorn node needs.
pub const BASE_GROUP: &str = "base";
/// Name of the built-in group the v2 (SPDK) data engine needs.
pub const V2_GROUP: &str = "v2-data-engine";
/// Severity of a group that sets none.
pub const DEFAULT_SEVERITY: &str = "critical";

/// How a group's modules combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupMode {
    /// Every module must be loaded or built in.
    AllOf,
    /// At least one module must be loaded or built in.
    AnyOf,
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
    /// User groups, sorted by name (enabled or not).
    pub user: Vec<UserGroup>,
}

/// The enabled groups, in a stable order: `base`, `v2-data-engine`, then
/// user groups by name. `v2_on` is the V2 decision
/// ([`crate::longhorn::decide_v2`]: flag, cluster, file).
#[must_use]
pub fn resolve(settings: &GroupSettings, v2_on: bool) -> Vec<GroupSpec> {
    let GroupSettings { base, v2, user } = settings;
    let mut enabled = Vec::new();
    let [base_spec, v2_spec] = builtin_groups();
    if base.enabled.unwrap_or(true) {
        enabled.push(with_severity(base_spec, base.severity.as_deref()));
    }
    if v2_on {
        enabled.push(with_severity(v2_spec, v2.severity.as_deref()));
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

/// The built-in groups with their default severity: `[base, v2-data-engine]`.
#[must_use]
pub fn builtin_groups() -> [GroupSpec; 2] {
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
    fn defaults_are_base_then_v2_when_on() {
        let none = GroupSettings::default();
        let groups = resolve(&none, false);
        assert_eq!(names(&groups), ["base"]);
        assert_eq!(groups[0].modules, [name("dm_crypt")]);
        assert_eq!(groups[0].severity, DEFAULT_SEVERITY);
        let groups = resolve(&none, true);
        assert_eq!(names(&groups), ["base", "v2-data-engine"]);
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
            user: vec![user("zeta", true), user("off", false), user("alpha", true)],
        };
        let groups = resolve(&settings, true);
        assert_eq!(names(&groups), ["v2-data-engine", "alpha", "zeta"]);
        assert_eq!(v2_severity(&groups), "page");
        assert_eq!(names(&resolve(&settings, false)), ["alpha", "zeta"]);
    }
}
