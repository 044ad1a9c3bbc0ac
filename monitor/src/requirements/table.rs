//! What each Longhorn version needs on a node, as data in one place. Every
//! row names its upstream source; where Longhorn's own sources disagree or
//! are silent, the row says which one it follows.
//!
//! The version in force comes from `--longhorn-version` (or the config
//! file), else from the cluster (the `current-longhorn-version` setting
//! longhorn-manager keeps), else [`NEWEST`].
use std::fmt;

use serde::Serialize;

/// A Longhorn release line, `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct LonghornVersion {
    pub major: u32,
    pub minor: u32,
}

impl LonghornVersion {
    #[must_use]
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// Parses `v1.10.1`, `1.10`, `v1.12.0-rc1` (patch and suffix ignored).
    ///
    /// # Errors
    /// Not `[v]MAJOR.MINOR[...]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let t = t.strip_prefix('v').unwrap_or(t);
        let mut parts = t.split(['.', '-', '+']);
        let number = |p: Option<&str>| p.and_then(|s| s.parse::<u32>().ok());
        match (number(parts.next()), number(parts.next())) {
            (Some(major), Some(minor)) => Ok(Self { major, minor }),
            _ => Err(format!(
                "{text:?} is not a Longhorn version (expected e.g. v1.10.1 or 1.12)"
            )),
        }
    }

    /// The table row in force: the newest row not newer than this version,
    /// the oldest row for anything older, the newest for anything newer.
    #[must_use]
    pub fn table(self) -> &'static Row {
        ROWS.iter()
            .rev()
            .find(|r| r.version <= self)
            .unwrap_or(&ROWS[0])
    }
}

impl fmt::Display for LonghornVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The newest version the table knows; used when nothing says otherwise.
pub const NEWEST: LonghornVersion = LonghornVersion::new(1, 12);

/// Whether an item fails `check` (and pages) or only warns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Required,
    Warning,
}

/// The Longhorn setting that sizes the V2 data engine's hugepages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct HugepageSetting {
    pub name: &'static str,
    /// Whether the value is the per-data-engine JSON form `{"v2":"2048"}`.
    pub per_engine: bool,
}

/// What one Longhorn release line needs. `source` fields name where each
/// fact comes from.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Row {
    pub version: LonghornVersion,
    /// V2: the kernel below which V2 must not run, and its source.
    pub v2_kernel_required: (u32, u32),
    /// V2: the kernel Longhorn recommends (a warning below it).
    pub v2_kernel_recommended: (u32, u32),
    pub v2_kernel_source: &'static str,
    /// V2: IOMMU groups present.
    pub v2_iommu: Level,
    pub v2_iommu_source: &'static str,
    /// V2: the setting that sizes the hugepages (MiB).
    pub v2_hugepage_setting: HugepageSetting,
    pub v2_hugepage_source: &'static str,
    /// Whether the ublk frontend exists in this release.
    pub ublk: bool,
    pub ublk_source: &'static str,
}

const PREREQ_DOC: &str =
    "longhorn.io docs v2-data-engine/prerequisites: 5.19 required (NVMe over TCP), 6.7 recommended";
const INTERRUPT_DOC: &str = "longhorn.io docs 1.10-1.12 v2-data-engine interrupt mode: IOMMU must be enabled for NVMe disks";
const HUGEPAGE_LIMIT: HugepageSetting = HugepageSetting {
    name: "v2-data-engine-hugepage-limit",
    per_engine: false,
};
const MEMORY_SIZE: HugepageSetting = HugepageSetting {
    name: "data-engine-memory-size",
    per_engine: true,
};
const HUGEPAGE_LIMIT_SOURCE: &str = "longhorn-manager types/setting.go: v2-data-engine-hugepage-limit, MiB, default 2048; compared with Node capacity hugepages-2Mi (datastore ValidateV2DataEngineEnabled)";
const MEMORY_SIZE_SOURCE: &str = "longhorn-manager types/setting.go (1.10+): data-engine-memory-size, DataEngineSpecific, MiB, default {\"v2\":\"2048\"}; v2-data-engine-hugepage-limit listed in replacedSettingNames";

/// Oldest first. A version between rows takes the row below it.
pub const ROWS: [Row; 5] = [
    Row {
        version: LonghornVersion::new(1, 8),
        v2_kernel_required: (5, 19),
        v2_kernel_recommended: (6, 7),
        v2_kernel_source: PREREQ_DOC,
        v2_iommu: Level::Warning,
        v2_iommu_source: "not checked by longhornctl before 1.13 (longhorn/cli PR #582, longhorn/longhorn#12076); a warning here",
        v2_hugepage_setting: HUGEPAGE_LIMIT,
        v2_hugepage_source: HUGEPAGE_LIMIT_SOURCE,
        ublk: false,
        ublk_source: "longhorn.io docs 1.9.0 ublk-frontend-support: \"Starting with v1.9.0, Longhorn supports UBLK frontend\"",
    },
    Row {
        version: LonghornVersion::new(1, 9),
        v2_kernel_required: (5, 19),
        v2_kernel_recommended: (6, 7),
        v2_kernel_source: PREREQ_DOC,
        v2_iommu: Level::Warning,
        v2_iommu_source: "not checked by longhornctl before 1.13 (longhorn/cli PR #582); a warning here",
        v2_hugepage_setting: HUGEPAGE_LIMIT,
        v2_hugepage_source: HUGEPAGE_LIMIT_SOURCE,
        ublk: true,
        ublk_source: "longhorn.io docs 1.9.0 ublk-frontend-support: kernel v6.0+ and `modprobe ublk_drv`",
    },
    Row {
        version: LonghornVersion::new(1, 10),
        v2_kernel_required: (5, 19),
        v2_kernel_recommended: (6, 7),
        v2_kernel_source: PREREQ_DOC,
        v2_iommu: Level::Warning,
        v2_iommu_source: INTERRUPT_DOC,
        v2_hugepage_setting: MEMORY_SIZE,
        v2_hugepage_source: MEMORY_SIZE_SOURCE,
        ublk: true,
        ublk_source: "longhorn.io docs ublk-frontend-support: kernel v6.0+ and `modprobe ublk_drv`",
    },
    Row {
        version: LonghornVersion::new(1, 11),
        v2_kernel_required: (5, 19),
        v2_kernel_recommended: (6, 7),
        v2_kernel_source: PREREQ_DOC,
        v2_iommu: Level::Warning,
        v2_iommu_source: INTERRUPT_DOC,
        v2_hugepage_setting: MEMORY_SIZE,
        v2_hugepage_source: MEMORY_SIZE_SOURCE,
        ublk: true,
        ublk_source: "longhorn.io docs ublk-frontend-support: kernel v6.0+ and `modprobe ublk_drv`",
    },
    Row {
        version: LonghornVersion::new(1, 12),
        v2_kernel_required: (6, 7),
        v2_kernel_recommended: (6, 7),
        v2_kernel_source: "longhorn.io docs 1.12.0 deploy/install: \"Linux kernel 6.7 or later for NVMe/TCP support and better stability\" (the V2 GA release; the prerequisites page still says 5.19 required, 6.7 recommended; the install page is followed)",
        v2_iommu: Level::Required,
        v2_iommu_source: "longhorn.io docs 1.12/1.13 install: V2 nodes need IOMMU group isolation; longhornctl --enable-spdk checks /sys/kernel/iommu_groups (longhorn/cli PR #582)",
        v2_hugepage_setting: MEMORY_SIZE,
        v2_hugepage_source: MEMORY_SIZE_SOURCE,
        ublk: true,
        ublk_source: "longhorn.io docs 1.12 ublk-frontend-support: kernel v6.0+; v6.17 may panic (longhorn/longhorn#13509)",
    },
];

/// The Longhorn setting that records the running version.
pub const VERSION_SETTING: &str = "current-longhorn-version";

/// ublk needs this kernel (all releases that have it).
pub const UBLK_KERNEL: (u32, u32) = (6, 0);
/// ublk is known to misbehave from this kernel (a warning).
pub const UBLK_KERNEL_WARN_FROM: (u32, u32) = (6, 17);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_as_longhorn_writes_them() {
        assert_eq!(
            LonghornVersion::parse("v1.10.1"),
            Ok(LonghornVersion::new(1, 10))
        );
        assert_eq!(
            LonghornVersion::parse("1.12"),
            Ok(LonghornVersion::new(1, 12))
        );
        assert_eq!(
            LonghornVersion::parse("v1.12.0-rc1"),
            Ok(LonghornVersion::new(1, 12))
        );
        assert_eq!(
            LonghornVersion::parse("v1.5.1-dev"),
            Ok(LonghornVersion::new(1, 5))
        );
        for bad in ["", "latest", "v1", "one.two"] {
            assert!(LonghornVersion::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn each_version_takes_its_row() {
        let row = |major, minor| LonghornVersion::new(major, minor).table().version;
        assert_eq!(row(1, 12), LonghornVersion::new(1, 12));
        assert_eq!(
            row(1, 13),
            LonghornVersion::new(1, 12),
            "newer: the newest row"
        );
        assert_eq!(row(1, 10), LonghornVersion::new(1, 10));
        assert_eq!(
            row(1, 5),
            LonghornVersion::new(1, 8),
            "older: the oldest row"
        );
        assert_eq!(NEWEST.table().version, NEWEST);
        // The 1.12 change the issue is about.
        assert_eq!(
            LonghornVersion::new(1, 12).table().v2_kernel_required,
            (6, 7)
        );
        assert_eq!(
            LonghornVersion::new(1, 11).table().v2_kernel_required,
            (5, 19)
        );
        assert_eq!(
            LonghornVersion::new(1, 9).table().v2_hugepage_setting.name,
            "v2-data-engine-hugepage-limit"
        );
        assert!(!LonghornVersion::new(1, 8).table().ublk);
        let sorted = ROWS.windows(2).all(|w| w[0].version < w[1].version);
        assert!(sorted, "rows oldest first");
    }
}
