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
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::names::ModuleName;

/// `depmod`'s output naming every module file and its dependencies.
pub const MODULES_DEP: &str = "modules.dep";
/// The kernel build's list of modules compiled into the kernel image.
pub const MODULES_BUILTIN: &str = "modules.builtin";

/// A host file under both of its names: the one the node itself uses, which
/// is what a person is shown (`/etc/modprobe.d/x.conf`), and the one
/// kmod-monitor read it by (`/host/etc/modprobe.d/x.conf` with
/// `--host-root /host`). JSON carries both; `Display` is the node's.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NodePath {
    /// The path on the node, `--host-root` stripped.
    pub path: PathBuf,
    /// The same file as kmod-monitor read it, under `--host-root`.
    pub host_path: PathBuf,
}

impl fmt::Display for NodePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.path.display().fmt(f)
    }
}

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

    /// `/proc/<pid>/<file>`, e.g. `proc_pid_file(42, "comm")`. One
    /// allocation: the daemon builds several of these for every event's
    /// actor.
    #[must_use]
    pub fn proc_pid_file(&self, pid: u32, file: &str) -> PathBuf {
        let mut digits = itoa::Buffer::new();
        let pid = digits.format(pid);
        let root = self.root.as_os_str();
        let mut path =
            PathBuf::with_capacity(root.len() + "/proc//".len() + pid.len() + file.len());
        path.push(root);
        path.push("proc");
        path.push(pid);
        path.push(file);
        path
    }

    /// `/sys/kernel/iommu_groups`: one directory per IOMMU group.
    #[must_use]
    pub fn iommu_groups(&self) -> PathBuf {
        self.join("sys/kernel/iommu_groups")
    }

    /// Where a host's commands live (`$PATH` of a root shell, merged-/usr
    /// and not).
    #[must_use]
    pub fn bin_dirs(&self) -> [PathBuf; 6] {
        [
            self.join("usr/local/sbin"),
            self.join("usr/local/bin"),
            self.join("usr/sbin"),
            self.join("usr/bin"),
            self.join("sbin"),
            self.join("bin"),
        ]
    }

    /// The host's os-release: `/etc/os-release`, else
    /// `/usr/lib/os-release`.
    #[must_use]
    pub fn os_release_candidates(&self) -> [PathBuf; 2] {
        [self.join("etc/os-release"), self.join("usr/lib/os-release")]
    }

    /// `/proc`, for scanning the host's processes.
    #[must_use]
    pub fn proc_dir(&self) -> PathBuf {
        self.join("proc")
    }

    /// `/proc/cmdline`: the running kernel's command line (`modules-load=`,
    /// `modprobe.blacklist=`, `module_blacklist=`).
    #[must_use]
    pub fn proc_cmdline(&self) -> PathBuf {
        self.join("proc/cmdline")
    }

    /// The directories systemd-modules-load reads `*.conf` lists of modules
    /// to load at boot from, highest precedence first: a file in an earlier
    /// directory hides a same-named one in a later directory
    /// (`modules-load.d(5)`; `lib` only matters without merged /usr).
    #[must_use]
    pub fn modules_load_dirs(&self) -> [PathBuf; 5] {
        [
            self.join("etc/modules-load.d"),
            self.join("run/modules-load.d"),
            self.join("usr/local/lib/modules-load.d"),
            self.join("usr/lib/modules-load.d"),
            self.join("lib/modules-load.d"),
        ]
    }

    /// `/etc/modules`: Debian's list of modules to load at boot (read by
    /// systemd through the `/etc/modules-load.d/modules.conf` link, or by
    /// the kmod init script).
    #[must_use]
    pub fn etc_modules(&self) -> PathBuf {
        self.join("etc/modules")
    }

    /// `/etc/modules-load.d/kmod-monitor.conf`: the one file `check --fix`
    /// writes, and only if it wrote it before or it does not exist.
    #[must_use]
    pub fn kmod_monitor_modules_load(&self) -> PathBuf {
        self.join("etc/modules-load.d/kmod-monitor.conf")
    }

    /// The directories kmod (modprobe, libkmod) reads `*.conf` from
    /// (`blacklist`, `install`, ...), highest precedence first, with the same
    /// same-name override as [`modules_load_dirs`](Self::modules_load_dirs)
    /// (`modprobe.d(5)`; `usr/lib` from kmod 33 on, `lib` before).
    #[must_use]
    pub fn modprobe_dirs(&self) -> [PathBuf; 5] {
        [
            self.join("etc/modprobe.d"),
            self.join("run/modprobe.d"),
            self.join("usr/local/lib/modprobe.d"),
            self.join("usr/lib/modprobe.d"),
            self.join("lib/modprobe.d"),
        ]
    }

    /// `/etc/modprobe.d`: where an administrator's `*.conf` hides a
    /// same-named file of a package's (`/usr/lib/modprobe.d`,
    /// `/lib/modprobe.d`) or of `/run`.
    #[must_use]
    pub fn etc_modprobe_d(&self) -> PathBuf {
        self.join("etc/modprobe.d")
    }

    /// The boot loader settings that put parameters on the kernel command
    /// line, as files to read whole: GRUB's `/etc/default/grub`
    /// (`GRUB_CMDLINE_LINUX`, `GRUB_CMDLINE_LINUX_DEFAULT`) and
    /// kernel-install's `/etc/kernel/cmdline` (systemd-boot, unified kernel
    /// images).
    #[must_use]
    pub fn boot_cmdline_files(&self) -> [PathBuf; 2] {
        [
            self.join("etc/default/grub"),
            self.join("etc/kernel/cmdline"),
        ]
    }

    /// `/etc/default/grub.d`: `*.cfg` files GRUB's scripts read after
    /// `/etc/default/grub` (Debian, Ubuntu cloud images).
    #[must_use]
    pub fn grub_default_d(&self) -> PathBuf {
        self.join("etc/default/grub.d")
    }

    /// The directories holding one module tree per installed kernel, in the
    /// order [`modules_dir_candidates`](Self::modules_dir_candidates) tries
    /// them.
    #[must_use]
    pub fn modules_roots(&self) -> [PathBuf; 2] {
        [self.join("lib/modules"), self.join("usr/lib/modules")]
    }

    /// Where the kernel image of `release` may be, in the order tried:
    /// `/boot/vmlinuz-<release>` (Debian, Ubuntu) then
    /// `<modules dir>/vmlinuz` (Fedora, Arch).
    #[must_use]
    pub fn kernel_image_candidates(&self, release: &str) -> [PathBuf; 3] {
        [
            self.join(&format!("boot/vmlinuz-{release}")),
            self.join(&format!("usr/lib/modules/{release}/vmlinuz")),
            self.join(&format!("lib/modules/{release}/vmlinuz")),
        ]
    }

    /// An absolute path as the host sees it (a symbolic link's target, say)
    /// resolved under the root: `/etc/modules` under `/host` is
    /// `/host/etc/modules`. A relative `path` is returned unchanged.
    #[must_use]
    pub fn host_path(&self, path: &Path) -> PathBuf {
        match path.strip_prefix("/") {
            Ok(rel) => self.root.join(rel),
            Err(_) => path.to_path_buf(),
        }
    }

    /// `read`, a path under the root, under both its names: see
    /// [`NodePath`].
    #[must_use]
    pub fn locate(&self, read: &Path) -> NodePath {
        NodePath {
            path: self.node_path(read),
            host_path: read.to_path_buf(),
        }
    }

    /// The inverse of [`Self::host_path`]: a path under the root as the
    /// node itself names it (`/host/etc/x` → `/etc/x`), for everything shown
    /// to a person. A path outside the root is returned unchanged.
    #[must_use]
    pub fn node_path(&self, local: &Path) -> PathBuf {
        match local.strip_prefix(&self.root) {
            Ok(rel) => Path::new("/").join(rel),
            Err(_) => local.to_path_buf(),
        }
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
            root.proc_cmdline(),
            root.etc_modules(),
            root.etc_modprobe_d(),
            root.grub_default_d(),
            root.kmod_monitor_modules_load(),
            root.host_path(Path::new("/etc/modules")),
            root.boot_id(),
        ];
        all.extend(root.kernel_config_candidates("r"));
        all.extend(root.modules_dir_candidates("r"));
        all.extend(root.tracefs_candidates());
        all.extend(root.modules_load_dirs());
        all.extend(root.modprobe_dirs());
        all.extend(root.boot_cmdline_files());
        all.extend(root.modules_roots());
        all.extend(root.kernel_image_candidates("r"));
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

    #[test]
    fn node_paths_strip_the_root() {
        let root = HostRoot::new("/host");
        assert_eq!(
            root.node_path(Path::new("/host/etc/modprobe.d/x.conf")),
            Path::new("/etc/modprobe.d/x.conf")
        );
        assert_eq!(
            root.node_path(&root.host_path(Path::new("/usr/sbin/iscsiadm"))),
            Path::new("/usr/sbin/iscsiadm")
        );
        assert_eq!(
            root.node_path(Path::new("/elsewhere")),
            Path::new("/elsewhere")
        );
        assert_eq!(
            HostRoot::new("/").node_path(Path::new("/etc/x")),
            Path::new("/etc/x")
        );
        let both = root.locate(Path::new("/host/etc/modprobe.d/x.conf"));
        assert_eq!(both.path, Path::new("/etc/modprobe.d/x.conf"));
        assert_eq!(both.host_path, Path::new("/host/etc/modprobe.d/x.conf"));
        assert_eq!(both.to_string(), "/etc/modprobe.d/x.conf");
    }
}
