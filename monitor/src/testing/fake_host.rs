//! A fake host `/` in a temporary directory, for unit tests of the host
//! readers and for `--host-root` in the integration tests: laid out from
//! the real fixture files in `monitor/src/host/fixtures/`, written
//! atomically so a running daemon never reads a torn file, removed when
//! dropped. Helpers panic with a message naming what they were doing: a
//! test fails by panicking, and the message is the diagnosis.
use std::{
    fs,
    path::{Path, PathBuf},
};

/// `uname -r` of the Debian 12 guest the 6.1 fixtures come from.
pub const DEBIAN_6_1: &str = "6.1.0-56-amd64";
/// `uname -r` of the Debian 13 guest the 6.12 fixtures come from.
pub const DEBIAN_6_12: &str = "6.12.117+deb13-amd64";
/// `uname -r` of the development machine built without `CONFIG_MODULES`.
pub const DEV_6_18: &str = "6.18.44";

/// A fixture file captured from a real system (see the README there).
#[must_use]
pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/host/fixtures")
        .join(name)
}

/// The bytes of a fixture file.
///
/// # Panics
/// When the file cannot be read.
#[must_use]
pub fn fixture(name: &str) -> Vec<u8> {
    let path = fixture_path(name);
    fs::read(&path).unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()))
}

/// The text of a fixture file.
///
/// # Panics
/// When the file cannot be read or is not UTF-8.
#[must_use]
pub fn fixture_text(name: &str) -> String {
    String::from_utf8(fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: not UTF-8: {e}"))
}

/// A fake host `/` in a temporary directory, for `--host-root`. Removed
/// when dropped.
pub struct FakeHost {
    dir: tempfile::TempDir,
    release: String,
}

impl FakeHost {
    /// An empty root whose kernel release is `release`
    /// (`proc/sys/kernel/osrelease` only).
    ///
    /// # Panics
    /// When the temporary directory cannot be created.
    #[must_use]
    pub fn with_release(release: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kmod-monitor-host-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temporary host root: {e}"));
        let host = Self {
            dir,
            release: release.to_owned(),
        };
        host.write("proc/sys/kernel/osrelease", format!("{release}\n"));
        // Every real host has one; a Debian default install's, for this
        // release.
        host.write(
            "proc/cmdline",
            format!(
                "BOOT_IMAGE=/boot/vmlinuz-{release} root=UUID=0a8b1a2c-5f7e-4a4e-9d55-3c1f0e2b7d61 ro quiet\n"
            ),
        );
        host
    }

    /// The Debian 12 guest (6.1.0-56-amd64) as captured: dm_crypt, nvme_tcp
    /// and vfio_pci loaded with their dependencies, uio_pci_generic only
    /// available; modules under `lib/modules`, config in `boot/`, and
    /// `sys/module/<m>/initstate` = `live` for every loaded module.
    #[must_use]
    pub fn debian_6_1() -> Self {
        let host = Self::with_release(DEBIAN_6_1);
        let dir = format!("lib/modules/{DEBIAN_6_1}");
        host.write(
            format!("{dir}/modules.builtin"),
            fixture("modules.builtin.debian-6.1"),
        );
        host.write(
            format!("{dir}/modules.dep"),
            fixture("modules.dep.debian-6.1"),
        );
        host.write(
            format!("boot/config-{DEBIAN_6_1}"),
            fixture("config.debian-6.1"),
        );
        host.set_proc_modules_with_initstate(&fixture_text("proc_modules.debian-6.1"));
        host
    }

    /// The Debian 13 guest (6.12.117): same modules loaded, module tree
    /// under `usr/lib/modules` (merged /usr) with `.ko.xz` files. No kernel
    /// config was captured for it, so there is none.
    #[must_use]
    pub fn debian_6_12() -> Self {
        let host = Self::with_release(DEBIAN_6_12);
        let dir = format!("usr/lib/modules/{DEBIAN_6_12}");
        host.write(
            format!("{dir}/modules.builtin"),
            fixture("modules.builtin.debian-6.12"),
        );
        host.write(
            format!("{dir}/modules.dep"),
            fixture("modules.dep.debian-6.12"),
        );
        host.set_proc_modules_with_initstate(&fixture_text("proc_modules.debian-6.12"));
        host
    }

    /// The development machine: 6.18.44 built without `CONFIG_MODULES`, so
    /// no `proc/modules` and no module tree; only its `proc/config.gz`.
    #[must_use]
    pub fn dev_6_18_no_modules() -> Self {
        let host = Self::with_release(DEV_6_18);
        host.write("proc/config.gz", fixture("config.gz.dev-6.18"));
        host
    }

    /// The root directory, for `--host-root`.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The kernel release this root reports.
    #[must_use]
    pub fn release(&self) -> &str {
        &self.release
    }

    /// `rel` (no leading `/`) under the root.
    #[must_use]
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The module directory this root's kernel uses (whichever of
    /// `lib/modules/<rel>` and `usr/lib/modules/<rel>` exists).
    ///
    /// # Panics
    /// When the root has no module directory.
    #[must_use]
    pub fn modules_dir(&self) -> PathBuf {
        ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| self.join(d).join(&self.release))
            .find(|d| d.is_dir())
            .unwrap_or_else(|| {
                panic!(
                    "{} has no module directory for {}",
                    self.path().display(),
                    self.release
                )
            })
    }

    /// Writes `content` to `rel` atomically (temporary file, then rename),
    /// creating parent directories: a daemon reading the file sees either
    /// the old or the new content, never a torn one.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn write(&self, rel: impl AsRef<Path>, content: impl AsRef<[u8]>) -> &Self {
        write_atomic(&self.join(rel), content.as_ref());
        self
    }

    /// Makes `rel` a symbolic link to `target` (as written, relative or
    /// absolute), creating parent directories.
    ///
    /// # Panics
    /// When the link cannot be made.
    pub fn link(&self, target: impl AsRef<Path>, rel: impl AsRef<Path>) -> &Self {
        let path = self.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        }
        std::os::unix::fs::symlink(target.as_ref(), &path)
            .unwrap_or_else(|e| panic!("linking {}: {e}", path.display()));
        self
    }

    /// The root as the daemon's readers take it.
    #[must_use]
    pub fn root(&self) -> crate::host::HostRoot {
        crate::host::HostRoot::new(self.path())
    }

    /// The text of `rel`.
    ///
    /// # Panics
    /// When the file cannot be read.
    #[must_use]
    pub fn read(&self, rel: impl AsRef<Path>) -> String {
        let path = self.join(rel);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    /// Replaces the one occurrence of `from` in `rel` by `to`.
    ///
    /// # Panics
    /// Unless `from` occurs exactly once (so an edit of a fixture that
    /// changed under the test cannot silently do nothing).
    pub fn replace(&self, rel: impl AsRef<Path>, from: &str, to: &str) {
        let rel = rel.as_ref();
        let text = self.read(rel);
        let count = text.matches(from).count();
        assert_eq!(
            count,
            1,
            "{} contains {from:?} {count} times, expected once",
            rel.display()
        );
        self.write(rel, text.replacen(from, to, 1));
    }

    /// Removes the file or directory tree `rel`.
    ///
    /// # Panics
    /// When it does not exist or cannot be removed.
    pub fn remove(&self, rel: impl AsRef<Path>) {
        let path = self.join(rel);
        let done = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        done.unwrap_or_else(|e| panic!("removing {}: {e}", path.display()));
    }

    /// Removes from `rel` every line for which `drop` holds.
    ///
    /// # Panics
    /// Unless exactly one line is removed.
    pub fn remove_line(&self, rel: impl AsRef<Path>, drop: impl Fn(&str) -> bool) {
        let rel = rel.as_ref();
        let text = self.read(rel);
        let kept: String = text
            .lines()
            .filter(|l| !drop(l))
            .map(|l| format!("{l}\n"))
            .collect();
        let removed = text.lines().count() - kept.lines().count();
        assert_eq!(
            removed,
            1,
            "{}: removed {removed} lines, expected one",
            rel.display()
        );
        self.write(rel, kept);
    }

    /// Whether `proc/modules` lists `module`.
    #[must_use]
    pub fn is_loaded(&self, module: &str) -> bool {
        proc_modules_names(&self.read("proc/modules")).any(|n| n == module)
    }

    /// Removes `module`'s line from `proc/modules` (atomically, as the
    /// kernel's view changes at once) and its `sys/module` directory.
    ///
    /// # Panics
    /// Unless the module was listed.
    pub fn unload(&self, module: &str) {
        self.remove_line("proc/modules", |l| l.split(' ').next() == Some(module));
        let dir = self.join("sys/module").join(module);
        if dir.exists() {
            fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
        }
    }

    /// Writes `proc/modules` and `sys/module/<m>/initstate` = `live` for
    /// every module it lists.
    pub fn set_proc_modules_with_initstate(&self, text: &str) {
        for name in proc_modules_names(text) {
            self.write(format!("sys/module/{name}/initstate"), "live\n");
        }
        self.write("proc/modules", text);
    }

    /// Puts the commands Longhorn calls on the host in place (iscsiadm,
    /// mount.nfs, cryptsetup, dmsetup, as Debian installs them): a node
    /// with open-iscsi, nfs-common, cryptsetup and dmsetup.
    pub fn with_longhorn_packages(&self) -> &Self {
        for path in [
            "usr/sbin/iscsiadm",
            "sbin/mount.nfs",
            "usr/sbin/cryptsetup",
            "usr/sbin/dmsetup",
        ] {
            self.write(path, "#!/bin/sh\n");
        }
        self
    }

    /// Writes a config file (outside the host root's well-known paths) and
    /// returns its path, for `--config`.
    pub fn config(&self, text: &str) -> PathBuf {
        let path = self.join("etc/kmod-monitor/config.toml");
        write_atomic(&path, text.as_bytes());
        path
    }
}

/// The module names of a `/proc/modules` text (first field of each line).
fn proc_modules_names(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .filter_map(|l| l.split(' ').next())
        .filter(|n| !n.is_empty())
}

/// Writes `content` to `path` through a temporary file in the same directory
/// and a rename.
fn write_atomic(path: &Path, content: &[u8]) {
    let dir = path
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent directory", path.display()));
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .unwrap_or_else(|e| panic!("temporary file in {}: {e}", dir.display()));
    std::io::Write::write_all(&mut tmp, content)
        .unwrap_or_else(|e| panic!("writing a temporary file for {}: {e}", path.display()));
    // Host files are world-readable (a temporary file is 0600), so a daemon
    // that dropped to an unprivileged user still reads them.
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .unwrap_or_else(|e| panic!("chmod 0644 {}: {e}", path.display()));
    tmp.persist(path)
        .unwrap_or_else(|e| panic!("renaming onto {}: {e}", path.display()));
}
