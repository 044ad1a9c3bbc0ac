//! Every fixed host path kmod-monitor reads, resolved under one [`HostRoot`].
//!
//! `--host-root DIR` (like node_exporter's `--path.rootfs`) makes each of these
//! resolve under DIR, so a container with the host's `/` mounted at `/host`
//! reads `/host/proc/modules`. No other module spells a host path: add new
//! ones here.
//!
//! Symbolic links are followed as the OS follows them: a relative link such as
//! Debian's merged-/usr `lib -> usr/lib` stays inside the root, an absolute one
//! would escape it. That is why the module directory is looked up under both
//! `lib/modules` and `usr/lib/modules` rather than trusting `lib`.
use std::path::{Path, PathBuf};

use crate::names::ModuleName;

/// `depmod`'s output naming every module file and its dependencies.
pub const MODULES_DEP: &str = "modules.dep";
/// The kernel build's list of modules compiled into the kernel image.
pub const MODULES_BUILTIN: &str = "modules.builtin";

/// The directory the host's `/` is visible at (default `/`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoot {
    root: PathBuf,
}

impl Default for HostRoot {
    /// The real root: kmod-monitor running directly on the node.
    fn default() -> Self {
        Self::new("/")
    }
}

impl HostRoot {
    /// A host root at `root` (the `--host-root` value).
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory itself.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `rel` (written without a leading `/`) under the root.
    fn join(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// `/proc/modules`: loaded modules. Absent on kernels built without
    /// `CONFIG_MODULES`.
    #[must_use]
    pub fn proc_modules(&self) -> PathBuf {
        self.join("proc/modules")
    }

    /// `/proc/sys/kernel/osrelease`: the running kernel's release (`uname -r`).
    #[must_use]
    pub fn osrelease(&self) -> PathBuf {
        self.join("proc/sys/kernel/osrelease")
    }

    /// `/proc/config.gz`: the running kernel's config, gzipped
    /// (`CONFIG_IKCONFIG_PROC`; Debian kernels don't have it).
    #[must_use]
    pub fn proc_config_gz(&self) -> PathBuf {
        self.join("proc/config.gz")
    }

    /// `/boot/config-<release>`: the config the distribution installs beside
    /// the kernel image.
    #[must_use]
    pub fn boot_config(&self, release: &str) -> PathBuf {
        self.join(&format!("boot/config-{release}"))
    }

    /// Kernel config files in the order they are tried.
    #[must_use]
    pub fn kernel_config_candidates(&self, release: &str) -> [PathBuf; 2] {
        [self.proc_config_gz(), self.boot_config(release)]
    }

    /// Where the module tree of kernel `release` may be, in the order tried:
    /// `/lib/modules/<release>` (classic layout, Debian up to 12) then
    /// `/usr/lib/modules/<release>` (merged /usr; Debian 13 packages ship
    /// their modules there).
    #[must_use]
    pub fn modules_dir_candidates(&self, release: &str) -> [PathBuf; 2] {
        [
            self.join(&format!("lib/modules/{release}")),
            self.join(&format!("usr/lib/modules/{release}")),
        ]
    }

    /// `/sys/module/<module>`: present for loaded modules and for built-in
    /// modules that have parameters.
    #[must_use]
    pub fn sys_module(&self, module: &ModuleName) -> PathBuf {
        self.join(&format!("sys/module/{module}"))
    }

    /// `/sys/module/<module>/initstate`: `live`, `coming` or `going`; only
    /// loadable modules have it.
    #[must_use]
    pub fn sys_module_initstate(&self, module: &ModuleName) -> PathBuf {
        self.sys_module(module).join("initstate")
    }

    /// tracefs mount points in the order tried: `/sys/kernel/tracing`
    /// (Linux 4.1+) then the older `/sys/kernel/debug/tracing`.
    #[must_use]
    pub fn tracefs_candidates(&self) -> [PathBuf; 2] {
        [
            self.join("sys/kernel/tracing"),
            self.join("sys/kernel/debug/tracing"),
        ]
    }

    /// `/sys/kernel/btf/vmlinux`: the running kernel's BTF.
    #[must_use]
    pub fn btf_vmlinux(&self) -> PathBuf {
        self.join("sys/kernel/btf/vmlinux")
    }

    /// `/proc/sys/kernel/random/boot_id`: a UUID that changes every boot,
    /// stamped on each event-log record.
    #[must_use]
    pub fn boot_id(&self) -> PathBuf {
        self.join("proc/sys/kernel/random/boot_id")
    }

    /// `/proc/<pid>`: a process's directory, for `comm`, `cmdline`, `status`…
    #[must_use]
    pub fn proc_pid(&self, pid: u32) -> PathBuf {
        self.join(&format!("proc/{pid}"))
    }

    /// `/proc/<pid>/<file>`, e.g. `proc_pid_file(42, "comm")`.
    #[must_use]
    pub fn proc_pid_file(&self, pid: u32, file: &str) -> PathBuf {
        self.proc_pid(pid).join(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_root_gives_real_paths() {
        let root = HostRoot::default();
        assert_eq!(root.proc_modules(), Path::new("/proc/modules"));
        assert_eq!(root.osrelease(), Path::new("/proc/sys/kernel/osrelease"));
        assert_eq!(
            root.boot_config("6.1.0-37-amd64"),
            Path::new("/boot/config-6.1.0-37-amd64")
        );
        let dm_crypt = ModuleName::parse("dm-crypt").unwrap();
        assert_eq!(
            root.sys_module_initstate(&dm_crypt),
            Path::new("/sys/module/dm_crypt/initstate")
        );
        assert_eq!(root.proc_pid_file(1, "comm"), Path::new("/proc/1/comm"));
    }

    #[test]
    fn every_path_resolves_under_the_host_root() {
        let root = HostRoot::new("/host");
        let m = ModuleName::parse("nvme_tcp").unwrap();
        let mut all = vec![
            root.proc_modules(),
            root.osrelease(),
            root.proc_config_gz(),
            root.boot_config("r"),
            root.sys_module(&m),
            root.sys_module_initstate(&m),
            root.btf_vmlinux(),
            root.proc_pid(7),
            root.proc_pid_file(7, "cmdline"),
            root.boot_id(),
        ];
        all.extend(root.kernel_config_candidates("r"));
        all.extend(root.modules_dir_candidates("r"));
        all.extend(root.tracefs_candidates());
        for path in all {
            assert!(path.starts_with("/host"), "{}", path.display());
            assert_ne!(path, Path::new("/host"), "{}", path.display());
        }
        assert_eq!(
            root.modules_dir_candidates("6.12.38+deb13-amd64"),
            [
                PathBuf::from("/host/lib/modules/6.12.38+deb13-amd64"),
                PathBuf::from("/host/usr/lib/modules/6.12.38+deb13-amd64"),
            ]
        );
    }
}
