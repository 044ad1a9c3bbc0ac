//! Longhorn's node requirements beyond kernel modules: the facts read from
//! the host ([`Readiness`]), and the checks judged from them under the
//! Longhorn version's row of the requirement table
//! ([`crate::requirements::table`]): the V2 kernel, IOMMU, the CPU, the
//! 2 MiB hugepages in sysfs and as the kubelet registered them, the host
//! commands Longhorn calls, multipathd, and the ublk kernel.
//!
//! Each check is a requirement like a module group (name, met, severity)
//! with a level (required, or a warning that never fails `check`), what was
//! found, the fix, and its upstream source.
use serde::Serialize;

use super::Fact;
use crate::{
    host::{
        HostRoot,
        cpu::{CpuFeature, read_cpu_feature},
        hugepages::{Hugepages2Mi, read_hugepages_2mi},
        node::{self, Distro, FoundCommand, HOST_COMMANDS},
    },
    requirements::{
        CheckInfo, GroupMode, GroupSettings, Level, LonghornVersion, UBLK_GROUP, WARNING_SEVERITY,
        table::{UBLK_KERNEL, UBLK_KERNEL_WARN_FROM},
    },
    tracker::GroupReport,
};

/// Longhorn's default hugepage requirement: 1024 × 2 MiB = 2 GiB (the
/// 2048 MiB default of `data-engine-memory-size`).
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

/// The CPU feature SPDK needs, and the vendor (for the IOMMU fix).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpuCheck {
    /// `sse4_2` (x86-64) or `asimd` (arm64); `None` when /proc/cpuinfo is
    /// missing or names neither.
    pub feature: Option<&'static str>,
    /// `None` when unknown.
    pub present: Option<bool>,
    /// `GenuineIntel`, `AuthenticAMD`; `None` elsewhere.
    pub vendor: Option<String>,
}

/// The running kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelCheck {
    pub release: String,
    /// `(major, minor)`; `None` when the release does not start so.
    pub version: Option<(u32, u32)>,
}

/// IOMMU groups under /sys/kernel/iommu_groups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IommuCheck {
    /// `None` when the directory could not be read.
    pub groups: Option<usize>,
    pub error: Option<String>,
}

/// multipathd on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MultipathdCheck {
    /// Its pid when running; `None` when not (or unknown, with `error`).
    pub pid: Option<u32>,
    pub error: Option<String>,
}

/// Everything read from the host for the checks, as /status and `check`
/// show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub hugepages: HugepagesCheck,
    pub cpu: CpuCheck,
    pub kernel: KernelCheck,
    pub iommu: IommuCheck,
    /// Where each command Longhorn calls on the host was found.
    pub commands: Vec<FoundCommand>,
    /// The distribution family, for the package names in fixes.
    pub distro: Option<Distro>,
    pub multipathd: MultipathdCheck,
}

/// Reads the pool only.
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

/// Reads every fact (at start, on each reconcile, on SIGHUP).
#[must_use]
pub fn read(host: &HostRoot, kernel_release: &str, required_pages: u64) -> Readiness {
    let cpu = match read_cpu_feature(host) {
        Ok(Some(CpuFeature {
            feature,
            present,
            vendor,
        })) => CpuCheck {
            feature,
            present: feature.map(|_| present),
            vendor,
        },
        Ok(None) => CpuCheck {
            feature: None,
            present: None,
            vendor: None,
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot read /proc/cpuinfo");
            CpuCheck {
                feature: None,
                present: None,
                vendor: None,
            }
        }
    };
    let (groups, iommu_error) = match node::iommu_groups(host) {
        Ok(n) => (Some(n), None),
        Err(e) => (None, Some(e)),
    };
    let (pid, multipathd_error) = match node::multipathd(host) {
        Ok(pid) => (pid, None),
        Err(e) => (None, Some(e)),
    };
    Readiness {
        hugepages: hugepages(host, required_pages),
        cpu,
        kernel: KernelCheck {
            release: kernel_release.to_owned(),
            version: kernel_version(kernel_release),
        },
        iommu: IommuCheck {
            groups,
            error: iommu_error,
        },
        commands: node::host_commands(host),
        distro: node::distro(host),
        multipathd: MultipathdCheck {
            pid,
            error: multipathd_error,
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

/// What the checks are judged under.
#[derive(Clone, Copy, Debug)]
pub struct CheckInputs<'a> {
    /// The Longhorn version in force, and where it came from.
    pub version: LonghornVersion,
    pub version_source: &'a str,
    /// Whether V2 applies (`None`: unknown, its checks are not judged).
    pub v2: Option<bool>,
    /// Whether V2 uses hugepages (`None`: unknown).
    pub hugepages_on: Option<bool>,
    /// Pages V2 needs, and which input said so.
    pub required_pages: u64,
    pub required_pages_source: &'a str,
    /// `hugepages-2Mi` in the kubelet's Node capacity, in pages; `None`
    /// while the cluster is not watched.
    pub kubelet_pages: Option<&'a Fact<u64>>,
    /// The config's switches and severities.
    pub settings: &'a GroupSettings,
    /// The V2 group's severity, for V2's required checks.
    pub v2_severity: &'a str,
    pub readiness: &'a Readiness,
}

/// One check's verdict; `met: None` when it cannot be judged now (then it
/// is listed as a warning, never as met or unmet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub name: &'static str,
    pub met: Option<bool>,
    pub severity: String,
    pub info: CheckInfo,
}

impl Verdict {
    /// As a requirement entry of /status `groups`, while it has a verdict.
    #[must_use]
    pub fn report(&self) -> Option<GroupReport> {
        self.met.map(|met| GroupReport {
            name: self.name.to_owned(),
            mode: GroupMode::Check,
            met,
            severity: self.severity.clone(),
            modules: Vec::new(),
            check: Some(self.info.clone()),
        })
    }
}

fn version_text((major, minor): (u32, u32)) -> String {
    format!("{major}.{minor}")
}

/// Judges every check that applies, in a stable order.
#[must_use]
pub fn judge(inputs: &CheckInputs<'_>) -> Vec<Verdict> {
    let CheckInputs {
        version,
        version_source,
        v2,
        hugepages_on,
        required_pages,
        required_pages_source,
        kubelet_pages,
        settings,
        v2_severity,
        readiness: r,
    } = *inputs;
    let row = version.table();
    let mut out = Vec::new();
    let mut push = |name: &'static str,
                    level: Level,
                    met: Option<bool>,
                    detail: String,
                    fix: Option<String>,
                    source: &str| {
        // The ublk items follow the ublk group (off unless switched on);
        // each can still be switched off on its own.
        let default_on = if name.starts_with("ublk-") {
            settings.enabled(UBLK_GROUP, false)
        } else {
            true
        };
        if !settings.enabled(name, default_on) {
            return;
        }
        let default_severity = match level {
            Level::Required => v2_severity,
            Level::Warning => WARNING_SEVERITY,
        };
        out.push(Verdict {
            name,
            met,
            severity: settings.severity(name, default_severity).to_owned(),
            info: CheckInfo {
                level,
                detail,
                fix: if met == Some(false) { fix } else { None },
                source: source.to_owned(),
            },
        });
    };
    let kernel = r.kernel.version;
    let release = &r.kernel.release;
    if v2 == Some(true) {
        let need = row.v2_kernel_required;
        push(
            "v2-kernel",
            Level::Required,
            kernel.map(|k| k >= need),
            format!(
                "kernel {release}; Longhorn {version} ({version_source}) needs {} or later for the V2 data engine",
                version_text(need)
            ),
            Some(format!(
                "boot a kernel {} or later (Debian 12: linux-image-amd64 from bookworm-backports; Ubuntu: the HWE kernel)",
                version_text(need)
            )),
            row.v2_kernel_source,
        );
        if row.v2_kernel_recommended > need {
            let rec = row.v2_kernel_recommended;
            push(
                "v2-kernel-recommended",
                Level::Warning,
                kernel.map(|k| k >= rec),
                format!(
                    "kernel {release}; Longhorn recommends {} or later for the V2 data engine",
                    version_text(rec)
                ),
                Some(format!("boot a kernel {} or later", version_text(rec))),
                row.v2_kernel_source,
            );
        }
        let iommu_fix = match (r.cpu.vendor.as_deref(), r.cpu.feature) {
            (Some("GenuineIntel"), _) => {
                "enable VT-d in the firmware and add `intel_iommu=on iommu=pt` to the kernel command line (GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub), and reboot"
            }
            (Some("AuthenticAMD"), _) => {
                "enable AMD-Vi/IOMMU in the firmware and add `amd_iommu=on iommu=pt` to the kernel command line (GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub), and reboot"
            }
            (_, Some("asimd")) => {
                "enable the SMMU in the firmware (ACPI IORT or device tree) and boot with `iommu.passthrough=1`"
            }
            _ => {
                "enable the IOMMU in the firmware and on the kernel command line (`intel_iommu=on` or `amd_iommu=on`, with `iommu=pt`), and reboot"
            }
        };
        push(
            "v2-iommu",
            row.v2_iommu,
            r.iommu.groups.map(|n| n > 0),
            match (r.iommu.groups, &r.iommu.error) {
                (Some(n), _) => format!("{n} IOMMU groups in /sys/kernel/iommu_groups"),
                (None, e) => format!(
                    "IOMMU groups cannot be read: {}",
                    e.as_deref().unwrap_or("?")
                ),
            },
            Some(iommu_fix.to_owned()),
            row.v2_iommu_source,
        );
        push(
            "v2-cpu",
            Level::Required,
            r.cpu.present,
            match r.cpu.feature {
                Some(f) => format!(
                    "{f}: {}",
                    if r.cpu.present == Some(true) {
                        "yes"
                    } else {
                        "NO"
                    }
                ),
                None => "no sse4_2 or asimd flag line in /proc/cpuinfo".to_owned(),
            },
            Some(
                "run the V2 data engine on a node whose CPU has SSE4.2 (x86-64) or ASIMD (arm64)"
                    .to_owned(),
            ),
            "longhorn.io docs 1.12 v2-data-engine/prerequisites: AMD64 CPUs require SSE4.2; longhornctl checks sse4_2 and (arm64, longhorn/cli PR #292) asimd",
        );
        if hugepages_on == Some(true) {
            let h = &r.hugepages;
            // A detail is the verdict's text (alert descriptions, the Node
            // condition): nothing in it may move without the verdict, so
            // the pool's free and reserved counts stay in /metrics and
            // v2.readiness (and multipathd's pid below stays out too).
            push(
                "v2-hugepages",
                Level::Required,
                h.pool.as_ref().map(|p| p.total >= required_pages),
                match &h.pool {
                    Some(p) => format!(
                        "{} of {required_pages} 2 MiB hugepages in the pool ({required_pages_source}, from {})",
                        p.total, p.source
                    ),
                    None => format!(
                        "the 2 MiB hugepage pool cannot be read: {}",
                        h.error.as_deref().unwrap_or("?")
                    ),
                },
                Some(format!(
                    "now: `sysctl -w vm.nr_hugepages={required_pages}`; after reboot: `echo vm.nr_hugepages={required_pages} > /etc/sysctl.d/90-longhorn-hugepages.conf`; then restart kubelet so it registers them"
                )),
                row.v2_hugepage_source,
            );
            if let Some(kubelet) = kubelet_pages {
                let pool_ok = h.pool.as_ref().is_some_and(|p| p.total >= required_pages);
                let (met, detail) = match kubelet {
                    Fact::Value(pages) => (
                        Some(*pages >= required_pages),
                        format!(
                            "the kubelet registered {pages} of {required_pages} 2 MiB hugepages (Node capacity hugepages-2Mi); Longhorn compares with this, not with the pool"
                        ),
                    ),
                    Fact::Absent => (
                        Some(false),
                        format!(
                            "the kubelet registered no 2 MiB hugepages (no hugepages-2Mi in the Node's capacity); {required_pages} needed"
                        ),
                    ),
                    Fact::Unknown(why) => {
                        (None, format!("the Node's capacity cannot be read: {why}"))
                    }
                };
                let fix = if pool_ok {
                    "restart kubelet (`systemctl restart kubelet`): it registers hugepages only when it starts, so a pool raised later stays invisible to Longhorn".to_owned()
                } else {
                    format!(
                        "raise the pool (`sysctl -w vm.nr_hugepages={required_pages}`), then restart kubelet so it registers the pages"
                    )
                };
                push(
                    "v2-hugepages-kubelet",
                    Level::Required,
                    met,
                    detail,
                    Some(fix),
                    "longhorn-manager datastore ValidateV2DataEngineEnabled and the HugePagesAvailable condition compare the setting with Node status.capacity[\"hugepages-2Mi\"]",
                );
            }
        }
    }
    let missing: Vec<&FoundCommand> = r.commands.iter().filter(|c| c.found_at.is_none()).collect();
    let packages: Vec<&str> = missing
        .iter()
        .filter_map(|m| HOST_COMMANDS.iter().find(|c| c.command == m.command))
        .filter_map(|c| r.distro.map(|d| c.package(d)))
        .collect();
    push(
        "host-commands",
        Level::Warning,
        Some(missing.is_empty()),
        if missing.is_empty() {
            format!(
                "found {}",
                r.commands
                    .iter()
                    .filter_map(|c| c.found_at.as_deref())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            format!(
                "not found on the host: {}",
                missing
                    .iter()
                    .map(|m| {
                        let why = HOST_COMMANDS
                            .iter()
                            .find(|c| c.command == m.command)
                            .map_or("", |c| c.purpose);
                        format!("{} ({why})", m.command)
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        Some(match r.distro {
            Some(d) => d.install_command(&packages),
            None => format!(
                "install the packages that provide {} (Debian: open-iscsi nfs-common cryptsetup dmsetup; RHEL: iscsi-initiator-utils nfs-utils cryptsetup device-mapper)",
                missing
                    .iter()
                    .map(|m| m.command)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
        "longhorn-manager environment_check_monitor.go RequiredPackages; longhornctl pkg/local/preflight/checker.go package checks",
    );
    push(
        "multipathd",
        Level::Warning,
        match (&r.multipathd.error, r.multipathd.pid) {
            (Some(_), _) => None,
            (None, pid) => Some(pid.is_none()),
        },
        match (&r.multipathd.error, r.multipathd.pid) {
            (Some(e), _) => format!("cannot tell whether multipathd runs: {e}"),
            (None, Some(_)) => {
                "multipathd runs; it can claim Longhorn's block devices".to_owned()
            }
            (None, None) => "multipathd is not running".to_owned(),
        },
        Some(
            "stop it (`systemctl disable --now multipathd.service multipathd.socket`), or blacklist Longhorn's devices in /etc/multipath.conf (`blacklist { devnode \"^sd[a-z0-9]+\" }`); see https://longhorn.io/kb/troubleshooting-volume-with-multipath/"
                .to_owned(),
        ),
        "longhornctl checker.go: warning when multipathd.service runs; longhorn-manager Multipathd condition",
    );
    if row.ublk {
        push(
            "ublk-kernel",
            Level::Required,
            kernel.map(|k| k >= UBLK_KERNEL),
            format!(
                "kernel {release}; the ublk frontend needs {} or later",
                version_text(UBLK_KERNEL)
            ),
            Some(format!(
                "boot a kernel {} or later",
                version_text(UBLK_KERNEL)
            )),
            row.ublk_source,
        );
        push(
            "ublk-kernel-known-issues",
            Level::Warning,
            kernel.map(|k| k < UBLK_KERNEL_WARN_FROM),
            format!(
                "kernel {release}; ublk volumes may fail or panic on {} and later (longhorn/longhorn#11977, #13509)",
                version_text(UBLK_KERNEL_WARN_FROM)
            ),
            Some("use the NVMe-oF or iSCSI frontend on this kernel".to_owned()),
            row.ublk_source,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::requirements::BuiltinGroupSettings;

    fn fixture_root(case: &str) -> HostRoot {
        HostRoot::new(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("src/host/fixtures/hugepages")
                .join(case),
        )
    }

    fn inputs<'a>(
        r: &'a Readiness,
        settings: &'a GroupSettings,
        version: LonghornVersion,
    ) -> CheckInputs<'a> {
        CheckInputs {
            version,
            version_source: "test",
            v2: Some(true),
            hugepages_on: Some(true),
            required_pages: DEFAULT_HUGEPAGES_2MI,
            required_pages_source: "default",
            kubelet_pages: None,
            settings,
            v2_severity: "critical",
            readiness: r,
        }
    }

    fn met<'a>(verdicts: &'a [Verdict], name: &str) -> Option<&'a Verdict> {
        verdicts.iter().find(|v| v.name == name)
    }

    #[test]
    fn kernel_versions_of_the_test_kernels() {
        assert_eq!(kernel_version("5.10.0-46-amd64"), Some((5, 10)));
        assert_eq!(kernel_version("6.1.0-56-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("6.12.118+deb13-amd64"), Some((6, 12)));
        assert_eq!(kernel_version("weird"), None);
    }

    #[test]
    fn the_v2_kernel_follows_the_version_in_force() {
        let settings = GroupSettings::default();
        let r = read(&fixture_root("two-mi-fewer"), "6.1.0-56-amd64", 1024);
        let v12 = judge(&inputs(&r, &settings, LonghornVersion::new(1, 12)));
        let k = met(&v12, "v2-kernel").unwrap();
        assert_eq!(k.met, Some(false), "6.1 < 6.7 under 1.12");
        assert_eq!(k.info.level, Level::Required);
        assert!(k.info.fix.is_some());
        assert!(met(&v12, "v2-kernel-recommended").is_none(), "6.7 is both");
        let v11 = judge(&inputs(&r, &settings, LonghornVersion::new(1, 11)));
        assert_eq!(
            met(&v11, "v2-kernel").unwrap().met,
            Some(true),
            "6.1 >= 5.19"
        );
        let rec = met(&v11, "v2-kernel-recommended").unwrap();
        assert_eq!((rec.met, rec.info.level), (Some(false), Level::Warning));
        assert_eq!(rec.severity, "warning");
        let r = read(&fixture_root("two-mi-1024"), "6.12.118+deb13-amd64", 1024);
        let v12 = judge(&inputs(&r, &settings, LonghornVersion::new(1, 12)));
        assert_eq!(met(&v12, "v2-kernel").unwrap().met, Some(true));
        assert_eq!(met(&v12, "v2-hugepages").unwrap().met, Some(true));
        assert_eq!(
            met(&v12, "v2-hugepages").unwrap().info.fix,
            None,
            "no fix when met"
        );
    }

    #[test]
    fn v2_checks_only_while_v2_is_on_and_switches_hold() {
        let r = read(&fixture_root("none"), "6.12.118+deb13-amd64", 1024);
        let mut settings = GroupSettings::default();
        let mut i = inputs(&r, &settings, LonghornVersion::new(1, 12));
        i.v2 = Some(false);
        let names: Vec<&str> = judge(&i).iter().map(|v| v.name).collect();
        assert_eq!(
            names,
            ["host-commands", "multipathd"],
            "ublk checks are off by default"
        );
        settings.builtin.insert(
            "multipathd".into(),
            BuiltinGroupSettings {
                enabled: Some(false),
                severity: None,
            },
        );
        settings.builtin.insert(
            "ublk-kernel".into(),
            BuiltinGroupSettings {
                enabled: Some(true),
                severity: None,
            },
        );
        let mut i = inputs(&r, &settings, LonghornVersion::new(1, 12));
        i.v2 = Some(false);
        let names: Vec<&str> = judge(&i).iter().map(|v| v.name).collect();
        assert_eq!(names, ["host-commands", "ublk-kernel"]);
        // The 'none' fixture has no pool: hugepages unmet while V2 is on.
        let v = judge(&inputs(&r, &settings, LonghornVersion::new(1, 12)));
        assert_eq!(met(&v, "v2-hugepages").unwrap().met, Some(false));
        assert_eq!(met(&v, "v2-cpu").unwrap().met, Some(true));
    }

    #[test]
    fn the_kubelet_view_of_hugepages_is_its_own_problem() {
        let settings = GroupSettings::default();
        let r = read(&fixture_root("two-mi-1024"), "6.12.118+deb13-amd64", 1024);
        let mut i = inputs(&r, &settings, LonghornVersion::new(1, 12));
        let none = Fact::Value(0);
        i.kubelet_pages = Some(&none);
        let v = judge(&i);
        let k = met(&v, "v2-hugepages-kubelet").unwrap();
        assert_eq!(k.met, Some(false));
        assert!(
            k.info
                .fix
                .as_deref()
                .unwrap()
                .starts_with("restart kubelet"),
            "pool is fine: restarting kubelet is the fix: {:?}",
            k.info.fix
        );
        assert_eq!(met(&v, "v2-hugepages").unwrap().met, Some(true));
        let enough = Fact::Value(1024);
        i.kubelet_pages = Some(&enough);
        assert_eq!(
            met(&judge(&i), "v2-hugepages-kubelet").unwrap().met,
            Some(true)
        );
        let unreadable = Fact::Unknown("403".into());
        i.kubelet_pages = Some(&unreadable);
        let v = judge(&i);
        let k = met(&v, "v2-hugepages-kubelet").unwrap();
        assert_eq!(k.met, None);
        assert!(
            k.report().is_none(),
            "unknown is not reported as met or unmet"
        );
    }
}
