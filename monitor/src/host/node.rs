//! Host facts Longhorn needs beyond kernel modules: IOMMU groups, the
//! commands its volumes call on the host (iscsiadm, mount.nfs, cryptsetup,
//! dmsetup), the distribution (to name the package that holds each), and
//! whether multipathd runs (it grabs Longhorn's block devices). Each reader
//! is bounded and reads only under the host root.
use std::{fs, io, path::Path};

use serde::Serialize;

use super::HostRoot;

/// How many IOMMU groups `/sys/kernel/iommu_groups` lists. A missing
/// directory is zero groups (the kernel has no IOMMU support, or it is
/// off).
///
/// # Errors
/// The directory exists but cannot be read.
pub fn iommu_groups(root: &HostRoot) -> Result<usize, String> {
    let dir = root.iommu_groups();
    match fs::read_dir(&dir) {
        Ok(entries) => Ok(entries.filter_map(Result::ok).count()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

/// A host package manager family, from os-release `ID` and `ID_LIKE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distro {
    /// Debian, Ubuntu (apt).
    Debian,
    /// RHEL, CentOS, Fedora, Rocky, Alma, Oracle Linux (dnf).
    Rhel,
    /// SUSE, openSUSE (zypper).
    Suse,
    /// Arch (pacman).
    Arch,
}

impl Distro {
    /// The command that installs `packages`.
    #[must_use]
    pub fn install_command(self, packages: &[&str]) -> String {
        let list = packages.join(" ");
        match self {
            Self::Debian => format!("apt-get install -y {list}"),
            Self::Rhel => format!("dnf install -y {list}"),
            Self::Suse => format!("zypper install -y {list}"),
            Self::Arch => format!("pacman -S --noconfirm {list}"),
        }
    }
}

/// The distribution family of the host, if its os-release names a known
/// one.
#[must_use]
pub fn distro(root: &HostRoot) -> Option<Distro> {
    root.os_release_candidates()
        .iter()
        .find_map(|p| fs::read_to_string(p).ok())
        .and_then(|text| parse_os_release(&text))
}

/// The family named by os-release's `ID`, else by its `ID_LIKE`.
#[must_use]
pub fn parse_os_release(text: &str) -> Option<Distro> {
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').to_ascii_lowercase())
    };
    let family = |id: &str| match id {
        "debian" | "ubuntu" => Some(Distro::Debian),
        "rhel" | "centos" | "fedora" | "rocky" | "almalinux" | "ol" => Some(Distro::Rhel),
        "sles" | "suse" | "opensuse" | "opensuse-leap" | "opensuse-tumbleweed" | "sle-micro" => {
            Some(Distro::Suse)
        }
        "arch" => Some(Distro::Arch),
        _ => None,
    };
    value("ID")
        .and_then(|id| family(&id))
        .or_else(|| value("ID_LIKE")?.split_whitespace().find_map(family))
}

/// A command Longhorn runs on the host, and the package that holds it per
/// family (longhornctl `pkg/local/preflight/checker.go` and longhorn-manager
/// `environment_check_monitor.go` list the same four).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct HostCommand {
    pub command: &'static str,
    /// What needs it.
    pub purpose: &'static str,
    pub debian: &'static str,
    pub rhel: &'static str,
    pub suse: &'static str,
    pub arch: &'static str,
}

impl HostCommand {
    /// The package that holds it on `distro`.
    #[must_use]
    pub const fn package(&self, distro: Distro) -> &'static str {
        match distro {
            Distro::Debian => self.debian,
            Distro::Rhel => self.rhel,
            Distro::Suse => self.suse,
            Distro::Arch => self.arch,
        }
    }
}

/// The commands Longhorn needs on every node.
pub const HOST_COMMANDS: [HostCommand; 4] = [
    HostCommand {
        command: "iscsiadm",
        purpose: "V1 volumes: the iSCSI frontend",
        debian: "open-iscsi",
        rhel: "iscsi-initiator-utils",
        suse: "open-iscsi",
        arch: "open-iscsi",
    },
    HostCommand {
        command: "mount.nfs",
        purpose: "RWX volumes and backups to NFS",
        debian: "nfs-common",
        rhel: "nfs-utils",
        suse: "nfs-client",
        arch: "nfs-utils",
    },
    HostCommand {
        command: "cryptsetup",
        purpose: "encrypted volumes",
        debian: "cryptsetup",
        rhel: "cryptsetup",
        suse: "cryptsetup",
        arch: "cryptsetup",
    },
    HostCommand {
        command: "dmsetup",
        purpose: "encrypted volumes: the device mapper",
        debian: "dmsetup",
        rhel: "device-mapper",
        suse: "device-mapper",
        arch: "device-mapper",
    },
];

/// Where each of [`HOST_COMMANDS`] was found (host path), or `None`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FoundCommand {
    pub command: &'static str,
    pub found_at: Option<String>,
}

/// Looks for each of [`HOST_COMMANDS`] in the host's bin directories. A
/// file or a symbolic link of that name counts (a link is not followed:
/// its absolute target is a host path this process cannot resolve safely).
#[must_use]
pub fn host_commands(root: &HostRoot) -> Vec<FoundCommand> {
    HOST_COMMANDS
        .iter()
        .map(|c| FoundCommand {
            command: c.command,
            found_at: root.bin_dirs().iter().find_map(|dir| {
                let path = dir.join(c.command);
                fs::symlink_metadata(&path)
                    .ok()
                    .filter(|m| m.is_file() || m.is_symlink())
                    .map(|_| root.node_path(&path).display().to_string())
            }),
        })
        .collect()
}

/// Most `/proc/<pid>` entries looked at for multipathd: a bound on the
/// work per reconcile whatever the host runs.
pub const PROC_SCAN_LIMIT: usize = 65_536;

/// The pid of a running multipathd on the host, if any, from
/// `/proc/<pid>/comm`.
///
/// # Errors
/// The host's /proc cannot be listed.
pub fn multipathd(root: &HostRoot) -> Result<Option<u32>, String> {
    let proc_dir = root.proc_dir();
    let entries = fs::read_dir(&proc_dir).map_err(|e| format!("{}: {e}", proc_dir.display()))?;
    for entry in entries.filter_map(Result::ok).take(PROC_SCAN_LIMIT) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if comm_is(&entry.path().join("comm"), "multipathd") {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

fn comm_is(path: &Path, name: &str) -> bool {
    fs::read_to_string(path).is_ok_and(|c| c.trim_end() == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeHost;

    #[test]
    fn iommu_groups_counted_and_absence_is_zero() {
        let host = FakeHost::with_release("6.12.0");
        assert_eq!(iommu_groups(&host.root()), Ok(0));
        for g in ["0", "1", "7"] {
            host.link(
                "../../../devices/pci0000:00/0000:00:01.0",
                format!("sys/kernel/iommu_groups/{g}/devices/x"),
            );
        }
        assert_eq!(iommu_groups(&host.root()), Ok(3));
    }

    #[test]
    fn distributions_from_real_os_release_files() {
        assert_eq!(
            parse_os_release(
                "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nID=debian\n"
            ),
            Some(Distro::Debian)
        );
        assert_eq!(
            parse_os_release(
                "NAME=\"Rocky Linux\"\nID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n"
            ),
            Some(Distro::Rhel)
        );
        assert_eq!(
            parse_os_release("NAME=\"Linux Mint\"\nID=linuxmint\nID_LIKE=\"ubuntu debian\"\n"),
            Some(Distro::Debian)
        );
        assert_eq!(parse_os_release("ID=\"sles\"\n"), Some(Distro::Suse));
        assert_eq!(parse_os_release("ID=talos\n"), None);
        assert_eq!(
            Distro::Debian.install_command(&["open-iscsi", "nfs-common"]),
            "apt-get install -y open-iscsi nfs-common"
        );
    }

    #[test]
    fn commands_found_in_any_bin_dir_and_links_count() {
        let host = FakeHost::with_release("6.12.0");
        host.write("usr/sbin/iscsiadm", "#!/bin/sh\n");
        host.link("../usr/sbin/cryptsetup", "sbin/cryptsetup");
        let found = host_commands(&host.root());
        let at = |c: &str| {
            found
                .iter()
                .find(|f| f.command == c)
                .and_then(|f| f.found_at.clone())
        };
        assert_eq!(at("iscsiadm").as_deref(), Some("/usr/sbin/iscsiadm"));
        assert_eq!(at("cryptsetup").as_deref(), Some("/sbin/cryptsetup"));
        assert_eq!(at("mount.nfs"), None);
        assert_eq!(at("dmsetup"), None);
    }

    #[test]
    fn multipathd_found_by_comm() {
        let host = FakeHost::with_release("6.12.0");
        host.write("proc/1/comm", "systemd\n");
        host.write("proc/self/comm", "multipathd\n");
        assert_eq!(multipathd(&host.root()), Ok(None), "only numeric entries");
        host.write("proc/812/comm", "multipathd\n");
        assert_eq!(multipathd(&host.root()), Ok(Some(812)));
    }
}
