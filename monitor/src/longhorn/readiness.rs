//! V2 readiness beyond modules: the 2 MiB hugepage pool, the CPU feature
//! SPDK needs, and the recommended kernel version, read from the host and
//! judged.
use serde::Serialize;

use crate::host::{
    HostRoot,
    cpu::{CpuFeature, read_cpu_feature},
    hugepages::{Hugepages2Mi, read_hugepages_2mi},
};

/// The kernel Longhorn recommends for the V2 data engine.
pub const RECOMMENDED_KERNEL: (u32, u32) = (6, 7);
/// Longhorn's default hugepage requirement: 1024 × 2 MiB = 2 GiB.
pub const DEFAULT_HUGEPAGES_2MI: u64 = 1024;

/// The hugepage pool against the requirement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HugepagesCheck {
    /// `None` when the pool could not be read (`error` says why).
    pub pool: Option<Hugepages2Mi>,
    /// Pages required.
    pub required: u64,
    /// `total >= required`; `None` when unreadable.
    pub met: Option<bool>,
    pub error: Option<String>,
}

/// The CPU feature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpuCheck {
    /// `sse4_2` (x86-64) or `asimd` (arm64); `None` when /proc/cpuinfo is
    /// missing or names neither.
    pub feature: Option<&'static str>,
    /// `None` when unknown.
    pub present: Option<bool>,
}

/// The kernel version against the recommendation (a warning only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelCheck {
    pub release: String,
    pub recommended: String,
    /// `None` when the release does not start with `major.minor`.
    pub recommended_or_later: Option<bool>,
}

/// All three, as /status and `check` show them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub hugepages: HugepagesCheck,
    pub cpu: CpuCheck,
    pub kernel: KernelCheck,
}

/// What `check` says about V2.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct V2Check {
    /// `v2-data-engine` and `v2-hugepages`.
    pub enablement: std::collections::BTreeMap<&'static str, crate::longhorn::Decision>,
    /// How the cluster was consulted (or why not).
    pub cluster: String,
    pub readiness: Readiness,
    /// False when V2 applies and the hugepages or the CPU fall short.
    pub met: bool,
    /// Problems that fail the check.
    pub problems: Vec<String>,
    /// Advice that does not (kernel version, unknown enablement).
    pub warnings: Vec<String>,
}

/// Judges V2 readiness under the two decisions.
#[must_use]
pub fn judge(
    v2: crate::longhorn::Decision,
    hugepages_on: crate::longhorn::Decision,
    readiness: Readiness,
    cluster: String,
) -> V2Check {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    if v2.enabled.is_none() {
        warnings.push(format!(
            "V2 data engine enablement unknown, its requirements were not checked: {}",
            v2.reason
        ));
    }
    if v2.enabled == Some(true) {
        if hugepages_on.enabled == Some(true) {
            let h = &readiness.hugepages;
            match (h.met, &h.pool) {
                (Some(false), Some(p)) => problems.push(format!(
                    "2 MiB hugepages: {} of {} configured. Fix now: `sysctl -w vm.nr_hugepages={}`; after reboot: `echo vm.nr_hugepages={} > /etc/sysctl.d/90-longhorn-hugepages.conf`",
                    p.total, h.required, h.required, h.required
                )),
                (None, _) | (_, None) => problems.push(format!(
                    "2 MiB hugepages cannot be read: {}",
                    h.error.as_deref().unwrap_or("unknown error")
                )),
                (Some(true), Some(_)) => {}
            }
        }
        if let (Some(feature), Some(false)) = (readiness.cpu.feature, readiness.cpu.present) {
            problems.push(format!(
                "CPU lacks {feature}, which SPDK (the V2 data engine) requires"
            ));
        }
        if readiness.kernel.recommended_or_later == Some(false) {
            warnings.push(format!(
                "kernel {} is older than {}, which Longhorn recommends for the V2 data engine",
                readiness.kernel.release, readiness.kernel.recommended
            ));
        }
    }
    V2Check {
        enablement: [
            (crate::requirements::V2_GROUP, v2),
            (crate::longhorn::v2::HUGEPAGES_REQUIREMENT, hugepages_on),
        ]
        .into_iter()
        .collect(),
        cluster,
        readiness,
        met: problems.is_empty(),
        problems,
        warnings,
    }
}

/// The V2 section of `check`'s text output.
#[must_use]
pub fn render(c: &V2Check) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "
V2 data engine
",
    );
    for (name, d) in &c.enablement {
        let _ = writeln!(
            out,
            "  {name}: {} (by {}: {})",
            d.state(),
            d.source.as_str(),
            d.reason
        );
    }
    let _ = writeln!(out, "  cluster: {}", c.cluster);
    let h = &c.readiness.hugepages;
    match &h.pool {
        Some(p) => {
            let _ = writeln!(
                out,
                "  2 MiB hugepages: total {} free {} reserved {} (need {}; from {})",
                p.total, p.free, p.reserved, h.required, p.source
            );
        }
        None => {
            let _ = writeln!(
                out,
                "  2 MiB hugepages: unreadable: {}",
                h.error.as_deref().unwrap_or("?")
            );
        }
    }
    let cpu = match (c.readiness.cpu.feature, c.readiness.cpu.present) {
        (Some(f), Some(true)) => format!("{f} yes"),
        (Some(f), _) => format!("{f} NO"),
        (None, _) => "unknown (no sse4_2/asimd flag line in /proc/cpuinfo)".to_owned(),
    };
    let _ = writeln!(out, "  CPU: {cpu}");
    let k = &c.readiness.kernel;
    let kernel = match k.recommended_or_later {
        Some(true) => "yes",
        Some(false) => "no (a warning only)",
        None => "unknown",
    };
    let _ = writeln!(out, "  kernel {} >= {}: {kernel}", k.release, k.recommended);
    for p in &c.problems {
        let _ = writeln!(out, "  PROBLEM: {p}");
    }
    for w in &c.warnings {
        let _ = writeln!(out, "  warning: {w}");
    }
    out
}

/// Reads the pool only (every reconcile).
#[must_use]
pub fn hugepages(host: &HostRoot, required: u64) -> HugepagesCheck {
    match read_hugepages_2mi(host) {
        Ok(pool) => HugepagesCheck {
            met: Some(pool.total >= required),
            pool: Some(pool),
            required,
            error: None,
        },
        Err(e) => HugepagesCheck {
            pool: None,
            required,
            met: None,
            error: Some(e.to_string()),
        },
    }
}

/// Reads everything.
#[must_use]
pub fn read(host: &HostRoot, kernel_release: &str, required_pages: u64) -> Readiness {
    let cpu = match read_cpu_feature(host) {
        Ok(Some(CpuFeature { feature, present })) => CpuCheck {
            feature,
            present: feature.map(|_| present),
        },
        Ok(None) => CpuCheck {
            feature: None,
            present: None,
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot read /proc/cpuinfo");
            CpuCheck {
                feature: None,
                present: None,
            }
        }
    };
    Readiness {
        hugepages: hugepages(host, required_pages),
        cpu,
        kernel: KernelCheck {
            release: kernel_release.to_owned(),
            recommended: format!("{}.{}", RECOMMENDED_KERNEL.0, RECOMMENDED_KERNEL.1),
            recommended_or_later: kernel_version(kernel_release).map(|v| v >= RECOMMENDED_KERNEL),
        },
    }
}

/// `(major, minor)` of a release such as `6.12.118+deb13-amd64`.
#[must_use]
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_of_the_test_kernels() {
        assert_eq!(kernel_version("5.10.0-46-amd64"), Some((5, 10)));
        assert_eq!(kernel_version("6.1.0-56-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("6.12.118+deb13-amd64"), Some((6, 12)));
        assert_eq!(kernel_version("6.18.0"), Some((6, 18)));
        assert_eq!(kernel_version("weird"), None);
        assert!(kernel_version("6.1.0-56-amd64").unwrap() < RECOMMENDED_KERNEL);
        assert!(kernel_version("6.7.0").unwrap() >= RECOMMENDED_KERNEL);
        assert!(kernel_version("6.12.118+deb13-amd64").unwrap() >= RECOMMENDED_KERNEL);
    }

    #[test]
    fn readiness_of_real_guests() {
        let root = |case: &str| {
            HostRoot::new(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("src/host/fixtures/hugepages")
                    .join(case),
            )
        };
        let r = read(
            &root("two-mi-1024"),
            "6.12.118+deb13-amd64",
            DEFAULT_HUGEPAGES_2MI,
        );
        assert_eq!(r.hugepages.met, Some(true));
        assert_eq!(r.kernel.recommended_or_later, Some(true));
        let r = read(
            &root("two-mi-fewer"),
            "6.1.0-56-amd64",
            DEFAULT_HUGEPAGES_2MI,
        );
        assert_eq!(r.hugepages.met, Some(false));
        assert_eq!(r.kernel.recommended_or_later, Some(false));
        let r = read(&root("none"), "6.12.118+deb13-amd64", DEFAULT_HUGEPAGES_2MI);
        assert_eq!((r.hugepages.met, r.cpu.present), (Some(false), Some(true)));
        // The 2 MiB pool of a 1 GiB-default host: 16 pages, not 1024.
        let r = read(&root("one-gi"), "6.12.118+deb13-amd64", 16);
        assert_eq!(r.hugepages.met, Some(true));
        assert_eq!(read(&root("one-gi"), "6.12", 17).hugepages.met, Some(false));
    }
}
