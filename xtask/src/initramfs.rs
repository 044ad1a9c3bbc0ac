//! The initramfs each test kernel boots: a static busybox for the kernel's
//! architecture (its applet links made at boot), the kernel's own module
//! tree metadata (modules.dep, modules.builtin, ...) with the real module
//! files of the modules under test and their dependencies, the kernel
//! config, the static daemon and guest driver built for that architecture,
//! and an `/init` that prepares the guest, runs the driver and powers off.
use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::BufWriter,
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use flate2::{Compression, write::GzEncoder};

use crate::{cmd, cpio, kernel::Kernel};

/// The modules the guest driver loads on every architecture: Longhorn's
/// base and V2-data-engine requirements. [`crate::arch::Arch::failing_module`]
/// (whose init fails in every TCG guest) comes on top.
const REQUIRED_MODULES: &[&str] = &["dm_crypt", "vfio_pci", "uio_pci_generic", "nvme_tcp"];

/// Modules the guest driver uses where the kernel ships them: `ublk_drv`
/// (Longhorn's ublk frontend; Debian's 6.1 is built without it, 6.12 and
/// later have it). A kernel without one gets none of its files, and the
/// driver reports the module missing.
const OPTIONAL_MODULES: &[&str] = &["ublk_drv"];

/// Where the daemon, the driver and the 32-bit busybox live in the guest
/// (the driver's `compat.rs` names the same path).
pub const GUEST_DAEMON: &str = "usr/bin/kmod-monitor";
const GUEST_DRIVER: &str = "usr/bin/vm-guest";
const GUEST_COMPAT_BUSYBOX: &str = "usr/bin/busybox-compat";

/// The guest's `/init`. busybox makes its applet links first (it knows
/// its own applets; the host cannot run a foreign architecture's busybox
/// to ask). Console loglevel 1 keeps kernel messages from tearing the
/// driver's result lines; the dmesg tail is printed when the driver fails.
const INIT: &str = r#"#!/bin/sh
/bin/busybox --install -s || echo "VMTEST NOTE busybox --install failed"
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tracefs tracefs /sys/kernel/tracing || echo "VMTEST NOTE no tracefs at /sys/kernel/tracing"
mount -t debugfs debugfs /sys/kernel/debug || echo "VMTEST NOTE no debugfs"
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
dmesg -n 1
echo "VMTEST BOOTED $(uname -r)"
KMOD_MONITOR_VM_GUEST=1 /usr/bin/vm-guest
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "VMTEST NOTE driver exited $rc; last kernel messages:"
    dmesg | tail -n 40 | sed 's/^/VMTEST DMESG /'
fi
echo "VMTEST EXIT $rc"
poweroff -f
"#;

/// The static binaries that go into one guest, all for its architecture.
pub struct Binaries<'a> {
    /// busybox-static.
    pub busybox: &'a Path,
    /// The 32-bit busybox-static the guest's compat tasks run.
    pub compat_busybox: &'a Path,
    /// kmod-monitor.
    pub daemon: &'a Path,
    /// The guest driver.
    pub driver: &'a Path,
    /// More files for `usr/bin` (the benchmark's floor and bench daemon):
    /// (name in the guest, file on the host).
    pub extras: &'a [(String, std::path::PathBuf)],
}

/// Builds the gzip-compressed initramfs for `kernel` at `out`.
pub fn build(kernel: &Kernel, binaries: &Binaries<'_>, out: &Path) -> Result<()> {
    let Binaries {
        busybox,
        compat_busybox,
        daemon,
        driver,
        extras,
    } = binaries;
    let module_files = module_closure(kernel)?;
    let modules_dir = kernel.modules_dir();
    let release = &kernel.release;

    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let gz = GzEncoder::new(BufWriter::new(file), Compression::fast());
    let mut w = cpio::Writer::new(gz);
    let io = |e| anyhow::Error::from(e).context(format!("writing {}", out.display()));

    let mut dirs = BTreeSet::new();
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "etc",
        "root",
        "boot",
        "lib",
        "lib/modules",
    ] {
        dirs.insert(d.to_owned());
    }
    let mod_root = format!("lib/modules/{release}");
    dirs.insert(mod_root.clone());
    for rel in &module_files {
        let mut parent = Path::new(rel).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(format!("{mod_root}/{}", p.display()));
            parent = p.parent();
        }
    }
    // BTreeSet order puts every parent before its children.
    for d in &dirs {
        w.dir(d, 0o755).map_err(io)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1).map_err(io)?;

    // busybox and the shell /init runs in; /init has busybox link its other
    // applets into bin, sbin, usr/bin and usr/sbin, which exist above.
    add_file(&mut w, "bin/busybox", 0o755, busybox)?;
    w.symlink("bin/sh", "/bin/busybox").map_err(io)?;

    // The module metadata the daemon and busybox modprobe read, exactly as
    // the package and depmod left it.
    let mut meta = Vec::new();
    for entry in
        fs::read_dir(&modules_dir).with_context(|| format!("listing {}", modules_dir.display()))?
    {
        let entry = entry.with_context(|| format!("listing {}", modules_dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("modules.") && entry.path().is_file() {
            meta.push(name);
        }
    }
    meta.sort();
    for required in ["modules.dep", "modules.builtin", "modules.order"] {
        if !meta.iter().any(|m| m == required) {
            bail!("{} has no {required}", modules_dir.display());
        }
    }
    for name in &meta {
        add_file(
            &mut w,
            &format!("{mod_root}/{name}"),
            0o644,
            &modules_dir.join(name),
        )?;
    }
    for rel in &module_files {
        add_file(
            &mut w,
            &format!("{mod_root}/{rel}"),
            0o644,
            &modules_dir.join(rel),
        )?;
    }

    add_file(
        &mut w,
        &format!("boot/config-{release}"),
        0o644,
        &kernel.config,
    )?;
    add_file(&mut w, GUEST_DAEMON, 0o755, daemon)?;
    add_file(&mut w, GUEST_DRIVER, 0o755, driver)?;
    add_file(&mut w, GUEST_COMPAT_BUSYBOX, 0o755, compat_busybox)?;
    for (name, path) in *extras {
        add_file(&mut w, &format!("usr/bin/{name}"), 0o755, path)?;
    }
    w.file("init", 0o755, INIT.as_bytes()).map_err(io)?;

    let gz = w.finish().map_err(io)?;
    gz.finish()
        .and_then(|mut buf| std::io::Write::flush(&mut buf))
        .map_err(io)?;
    Ok(())
}

fn add_file<W: std::io::Write>(
    w: &mut cpio::Writer<W>,
    name: &str,
    perm: u32,
    src: &Path,
) -> Result<()> {
    let data = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    w.file(name, perm, &data)
        .with_context(|| format!("adding {} to the initramfs", src.display()))
}

/// Module files (relative to `lib/modules/RELEASE`) for
/// [`REQUIRED_MODULES`], the architecture's failing module and those of
/// [`OPTIONAL_MODULES`] the kernel ships, and everything they pull in, as
/// kmod's own resolver sees it: modules.dep dependencies and softdeps.
fn module_closure(kernel: &Kernel) -> Result<BTreeSet<String>> {
    let modules_dir = kernel.modules_dir();
    let mut files = BTreeSet::new();
    let shipped = modules_dep_names(&modules_dir)?;
    let optional = OPTIONAL_MODULES
        .iter()
        .copied()
        .filter(|m| shipped.contains(*m));
    for module in REQUIRED_MODULES
        .iter()
        .copied()
        .chain([kernel.arch.failing_module()])
        .chain(optional)
    {
        let plan = cmd::stdout(
            Command::new("modprobe")
                .arg("-d")
                .arg(&kernel.module_base)
                .args(["-S", &kernel.release, "--show-depends", module]),
        )
        .with_context(|| format!("resolving {module} in {}", kernel.package))?;
        let mut found = false;
        for line in plan.lines() {
            let Some(path) = line.strip_prefix("insmod ") else {
                continue;
            };
            let path = Path::new(path.trim());
            let Ok(rel) = path.strip_prefix(&modules_dir) else {
                bail!(
                    "modprobe resolved {module} to {}, outside {}",
                    path.display(),
                    modules_dir.display()
                );
            };
            files.insert(rel.display().to_string());
            found = true;
        }
        if !found {
            bail!(
                "{module} is not a loadable module in {} (built in?): {plan}",
                kernel.package
            );
        }
    }
    Ok(files)
}

/// The module names modules.dep lists (`ublk_drv` for
/// `kernel/drivers/block/ublk_drv.ko.xz`), `-` written `_`.
fn modules_dep_names(modules_dir: &Path) -> Result<BTreeSet<String>> {
    let dep = modules_dir.join("modules.dep");
    let text = fs::read_to_string(&dep).with_context(|| format!("reading {}", dep.display()))?;
    Ok(text.lines().filter_map(dep_line_module).collect())
}

/// The module a modules.dep line is about.
fn dep_line_module(line: &str) -> Option<String> {
    let path = line.split(':').next()?;
    let file = path.rsplit('/').next()?;
    let name = file.split(".ko").next()?;
    (!name.is_empty() && file.contains(".ko")).then(|| name.replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::dep_line_module;

    #[test]
    fn module_names_from_modules_dep_lines() {
        assert_eq!(
            dep_line_module("kernel/drivers/block/ublk_drv.ko.xz:").as_deref(),
            Some("ublk_drv")
        );
        assert_eq!(
            dep_line_module(
                "kernel/drivers/nvme/host/nvme-tcp.ko: kernel/drivers/nvme/host/nvme-fabrics.ko"
            )
            .as_deref(),
            Some("nvme_tcp")
        );
        assert_eq!(dep_line_module(""), None);
        assert_eq!(dep_line_module("# comment"), None);
    }
}
