//! Test kernels and guest userland: Debian's own packages for each guest
//! architecture, resolved to the newest upload in the archive with a
//! private apt configuration (the system's apt setup is never touched),
//! downloaded once, unpacked (kernels also depmod'ed) into the per-user
//! cache, and reused by every later run and clean clone.
use std::{
    fmt,
    fs::{self, File},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{arch::Arch, cmd, dirs};

/// The kernel series the VM tests cover (each architecture boots the ones
/// [`Arch::series`] names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Series {
    /// Debian 11 (bullseye).
    #[value(name = "5.10")]
    V5_10,
    /// Debian 12 (bookworm).
    #[value(name = "6.1")]
    V6_1,
    /// Debian 13 (trixie); merged /usr, modules compressed as .ko.xz.
    #[value(name = "6.12")]
    V6_12,
    /// trixie-backports; signed images only (they boot the same).
    #[value(name = "6.17")]
    V6_17,
}

impl Series {
    /// Every series, oldest first.
    pub const ALL: [Self; 4] = [Self::V5_10, Self::V6_1, Self::V6_12, Self::V6_17];

    /// The name used on the command line and in paths (`6.1`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::V5_10 => "5.10",
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
            Self::V6_17 => "6.17",
        }
    }

    /// Splits a package name for `arch` into the prefix and suffix around
    /// the ABI or patch number that changes between Debian uploads. The
    /// unsigned image where the archive has one; 6.17 (trixie-backports)
    /// has only the signed image, on amd64 and arm64 alike, which boots
    /// the same under QEMU's `-kernel`.
    fn package_shape(self, arch: Arch) -> (&'static str, String) {
        let debian = arch.debian();
        match self {
            Self::V5_10 => ("linux-image-5.10.0-", format!("-{debian}-unsigned")),
            Self::V6_1 => ("linux-image-6.1.0-", format!("-{debian}-unsigned")),
            Self::V6_12 => ("linux-image-6.12.", format!("+deb13-{debian}-unsigned")),
            Self::V6_17 => ("linux-image-6.17.", format!("+deb13-{debian}")),
        }
    }

    /// The ABI/patch number if `package` is an image of this series for
    /// `arch` (`linux-image-6.1.0-28-amd64-unsigned` -> 28 for 6.1 on
    /// x86_64).
    pub fn package_number(self, arch: Arch, package: &str) -> Option<u32> {
        let (prefix, suffix) = self.package_shape(arch);
        let number = package
            .strip_prefix(prefix)?
            .strip_suffix(suffix.as_str())?;
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        number.parse().ok()
    }

    /// The newest image of this series for `arch` among `packages`.
    pub fn newest<'a>(
        self,
        arch: Arch,
        packages: impl IntoIterator<Item = &'a str>,
    ) -> Option<&'a str> {
        packages
            .into_iter()
            .filter_map(|p| Some((self.package_number(arch, p)?, p)))
            .max_by_key(|(n, _)| *n)
            .map(|(_, p)| p)
    }
}

impl fmt::Display for Series {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the private apt configuration fetches from. One list for all
/// series: `apt-get update` costs a few seconds and happens only when a
/// kernel has to be resolved.
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security trixie-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
";

/// The Debian release whose busybox-static the guests run: the host's own
/// (Debian 12), for every architecture, so all guests run one busybox.
const USERLAND_SUITE: &str = "bookworm";
const USERLAND_SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
";

/// What a private apt configuration fetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Kernel images, from every suite in [`SOURCES`].
    Kernels,
    /// Guest userland (busybox-static), from [`USERLAND_SUITE`] only.
    Userland,
}

/// Marks an unpacked, depmod'ed kernel folder as complete.
const READY_STAMP: &str = ".xtask-ready";

/// One unpacked test kernel.
#[derive(Debug)]
pub struct Kernel {
    /// The architecture it runs on.
    pub arch: Arch,
    /// The Debian package it came from.
    pub package: String,
    /// `uname -r` of the kernel (`6.1.0-28-amd64`).
    pub release: String,
    /// The bootable image.
    pub vmlinuz: PathBuf,
    /// The package's `/boot/config-RELEASE`.
    pub config: PathBuf,
    /// The base `depmod -b`/`modprobe -d` expect: the unpacked root, or its
    /// `usr/` for merged-/usr packages.
    pub module_base: PathBuf,
}

impl Kernel {
    /// `lib/modules/RELEASE` inside [`Self::module_base`].
    pub fn modules_dir(&self) -> PathBuf {
        self.module_base.join("lib/modules").join(&self.release)
    }

    /// Reads an unpacked package folder.
    fn open(arch: Arch, package: &str, root: &Path) -> Result<Self> {
        let boot = root.join("boot");
        let mut release = None;
        for entry in fs::read_dir(&boot).with_context(|| format!("listing {}", boot.display()))? {
            let entry = entry.with_context(|| format!("listing {}", boot.display()))?;
            if let Some(rel) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
            {
                release = Some(rel.to_owned());
            }
        }
        let Some(release) = release else {
            bail!("{} holds no vmlinuz-*", boot.display());
        };
        let module_base = if root.join("usr/lib/modules").join(&release).is_dir() {
            root.join("usr")
        } else if root.join("lib/modules").join(&release).is_dir() {
            root.to_path_buf()
        } else {
            bail!(
                "{} has no lib/modules/{release} (nor usr/lib/modules)",
                root.display()
            );
        };
        let kernel = Self {
            arch,
            package: package.to_owned(),
            vmlinuz: boot.join(format!("vmlinuz-{release}")),
            config: boot.join(format!("config-{release}")),
            module_base,
            release,
        };
        if !kernel.config.is_file() {
            bail!("{} is missing from {package}", kernel.config.display());
        }
        Ok(kernel)
    }
}

/// The private apt configuration for one Debian architecture and
/// [`Purpose`], updated at most once per run.
pub struct Apt {
    dir: PathBuf,
    debian_arch: &'static str,
    updated: bool,
}

impl Apt {
    /// Prepares the private apt folders of `debian_arch` (`amd64`, `arm64`,
    /// `i386`, `armhf`) for `purpose` under the cache.
    pub fn new(debian_arch: &'static str, purpose: Purpose) -> Result<Self> {
        let (dir, list) = match purpose {
            Purpose::Kernels => (dirs::apt_dir()?.join(debian_arch), SOURCES),
            Purpose::Userland => (
                dirs::apt_dir()?.join(format!("{debian_arch}-userland")),
                USERLAND_SOURCES,
            ),
        };
        for sub in ["lists/partial", "cache/archives/partial", "etc"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        let sources = dir.join("etc/sources.list");
        fs::write(&sources, list).with_context(|| format!("writing {}", sources.display()))?;
        Ok(Self {
            dir,
            debian_arch,
            updated: false,
        })
    }

    fn command(&self, prog: &str) -> Command {
        let dir = &self.dir;
        let mut cmd = Command::new(prog);
        cmd.arg("-o")
            .arg(format!(
                "Dir::Etc::sourcelist={}",
                dir.join("etc/sources.list").display()
            ))
            .args(["-o", "Dir::Etc::sourceparts=-"])
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", dir.join("lists").display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", dir.join("cache").display()))
            // The lists live in root's cache, which the _apt sandbox user
            // cannot write to.
            .args(["-o", "APT::Sandbox::User=root"])
            // Only this architecture's indexes, whatever the host's is, and
            // no look at the host's installed packages: nothing here is
            // installed, only downloaded.
            .arg("-o")
            .arg(format!("APT::Architecture={}", self.debian_arch))
            .arg("-o")
            .arg(format!("APT::Architectures={}", self.debian_arch))
            .args(["-o", "Dir::State::status=/dev/null"]);
        cmd
    }

    fn update(&mut self) -> Result<()> {
        if !self.updated {
            cmd::run(self.command("apt-get").args(["-q", "update"]))
                .context("updating the private apt lists (Debian archive reachable?)")?;
            self.updated = true;
        }
        Ok(())
    }

    /// The newest image package of `series` for `arch` in the archive.
    fn resolve(&mut self, arch: Arch, series: Series) -> Result<String> {
        self.update()?;
        let names = cmd::stdout(self.command("apt-cache").args(["pkgnames", "linux-image-"]))?;
        series
            .newest(arch, names.lines().map(str::trim))
            .map(str::to_owned)
            .with_context(|| {
                format!(
                    "the archive has no {} linux-image package for {series}",
                    self.debian_arch
                )
            })
    }

    /// Downloads `package` (optionally `package/suite`) into `dest` and
    /// returns the .deb's path.
    fn download(&mut self, package: &str, suite: Option<&str>, dest: &Path) -> Result<PathBuf> {
        self.update()?;
        fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
        let wanted = match suite {
            Some(suite) => format!("{package}/{suite}"),
            None => package.to_owned(),
        };
        cmd::run(
            self.command("apt-get")
                .args(["-q", "download", wanted.as_str()])
                .current_dir(dest),
        )?;
        let prefix = format!("{package}_");
        for entry in fs::read_dir(dest).with_context(|| format!("listing {}", dest.display()))? {
            let path = entry
                .with_context(|| format!("listing {}", dest.display()))?
                .path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with(&prefix) && name.ends_with(&format!("_{}.deb", self.debian_arch)) {
                return Ok(path);
            }
        }
        bail!(
            "apt-get download {package} left no .deb in {}",
            dest.display()
        );
    }
}

/// Newest complete cached kernel of `series` for `arch`, if any.
fn cached(arch: Arch, series: Series, kernels: &Path) -> Result<Option<Kernel>> {
    if !kernels.is_dir() {
        return Ok(None);
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(kernels).with_context(|| format!("listing {}", kernels.display()))? {
        let entry = entry.with_context(|| format!("listing {}", kernels.display()))?;
        if let Some(name) = entry.file_name().to_str()
            && entry.path().join(READY_STAMP).is_file()
        {
            names.push(name.to_owned());
        }
    }
    match series.newest(arch, names.iter().map(String::as_str)) {
        Some(package) => Ok(Some(Kernel::open(arch, package, &kernels.join(package))?)),
        None => Ok(None),
    }
}

/// Returns the `arch` test kernel for `series`: the cached one, unless
/// there is none or `refresh` asks to look for a newer upload in the
/// archive. `apt` must be `arch`'s.
pub fn prepare(arch: Arch, series: Series, refresh: bool, apt: &mut Apt) -> Result<Kernel> {
    let label = format!("{arch} {series}");
    let kernels = dirs::kernels_dir()?;
    fs::create_dir_all(&kernels).with_context(|| format!("creating {}", kernels.display()))?;
    // Two runs on one machine (a developer and CI) must not unpack into the
    // same folder at once.
    let lock_path = kernels.join(".lock");
    let lock =
        File::create(&lock_path).with_context(|| format!("opening {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;

    if !refresh && let Some(kernel) = cached(arch, series, &kernels)? {
        println!(
            "vm-test {label}: using cached {} ({})",
            kernel.package, kernel.release
        );
        return Ok(kernel);
    }
    let package = apt.resolve(arch, series)?;
    let root = kernels.join(&package);
    if root.join(READY_STAMP).is_file() {
        println!("vm-test {label}: {package} is the newest and already cached");
        return Kernel::open(arch, &package, &root);
    }

    println!("vm-test {label}: fetching {package}");
    let partial = kernels.join(format!("{package}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial)
            .with_context(|| format!("removing stale {}", partial.display()))?;
    }
    let downloads = kernels.join(".downloads");
    let deb = apt.download(&package, None, &downloads)?;
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    let kernel = Kernel::open(arch, &package, &partial)
        .with_context(|| format!("reading the unpacked {package}"))?;
    // Debian ships modules.builtin and modules.order but no modules.dep;
    // depmod writes it (and the .bin indexes modprobe uses).
    cmd::run(
        Command::new("depmod")
            .arg("-b")
            .arg(&kernel.module_base)
            .arg(&kernel.release),
    )?;
    fs::write(partial.join(READY_STAMP), format!("{package}\n"))
        .with_context(|| format!("writing the stamp in {}", partial.display()))?;
    if root.exists() {
        fs::remove_dir_all(&root)
            .with_context(|| format!("removing incomplete {}", root.display()))?;
    }
    fs::rename(&partial, &root)
        .with_context(|| format!("moving {} to {}", partial.display(), root.display()))?;
    fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    Kernel::open(arch, &package, &root)
}

/// A static busybox for `debian_arch` (a guest's own, or the 32-bit one its
/// compat tasks run): Debian's busybox-static from [`USERLAND_SUITE`],
/// downloaded once into the cache (again only with `refresh`).
pub fn busybox(debian_arch: &'static str, refresh: bool) -> Result<PathBuf> {
    let dir = dirs::userland_dir()?.join(debian_arch);
    let busybox = dir.join("busybox");
    if !refresh && busybox.is_file() {
        return Ok(busybox);
    }
    println!("fetching busybox-static/{USERLAND_SUITE} for {debian_arch}");
    let mut apt = Apt::new(debian_arch, Purpose::Userland)?;
    let downloads = dir.join(".downloads");
    if downloads.exists() {
        fs::remove_dir_all(&downloads)
            .with_context(|| format!("removing stale {}", downloads.display()))?;
    }
    let deb = apt.download("busybox-static", Some(USERLAND_SUITE), &downloads)?;
    let unpacked = downloads.join("root");
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let Some(found) = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|rel| unpacked.join(rel))
        .find(|path| path.is_file())
    else {
        bail!(
            "{} has neither bin/busybox nor usr/bin/busybox",
            deb.display()
        );
    };
    // Renamed into place, so a concurrent run sees the old file or the
    // whole new one.
    let partial = dir.join("busybox.partial");
    fs::copy(&found, &partial)
        .with_context(|| format!("copying {} to {}", found.display(), partial.display()))?;
    fs::rename(&partial, &busybox)
        .with_context(|| format!("moving {} to {}", partial.display(), busybox.display()))?;
    fs::remove_dir_all(&downloads).with_context(|| format!("removing {}", downloads.display()))?;
    Ok(busybox)
}

#[cfg(test)]
mod tests {
    use super::{Arch, Series};

    #[test]
    fn package_numbers_match_only_their_series() {
        let x86 = Arch::X86_64;
        assert_eq!(
            Series::V5_10.package_number(x86, "linux-image-5.10.0-46-amd64-unsigned"),
            Some(46)
        );
        assert_eq!(
            Series::V6_1.package_number(x86, "linux-image-6.1.0-56-amd64-unsigned"),
            Some(56)
        );
        assert_eq!(
            Series::V6_12.package_number(x86, "linux-image-6.12.117+deb13-amd64-unsigned"),
            Some(117)
        );
        assert_eq!(
            Series::V6_17.package_number(x86, "linux-image-6.17.13+deb13-amd64"),
            Some(13)
        );
        // Other flavours, debug packages and neighbouring series are not ours.
        for (series, package) in [
            (Series::V6_1, "linux-image-6.1.0-56-cloud-amd64-unsigned"),
            (Series::V6_1, "linux-image-6.1.0-56-amd64-dbg"),
            (Series::V6_1, "linux-image-6.12.117+deb13-amd64-unsigned"),
            (Series::V6_17, "linux-image-6.17.13+deb13-amd64-unsigned"),
            (Series::V6_17, "linux-image-6.17.13+deb13-rt-amd64"),
            (Series::V6_12, "linux-image-6.12.117+deb12-amd64-unsigned"),
        ] {
            assert_eq!(series.package_number(x86, package), None, "{package}");
        }
    }

    #[test]
    fn arm64_packages_are_not_amd64_ones() {
        // Names as `apt-cache pkgnames` lists them for arm64 (2026-11).
        let arm = Arch::Aarch64;
        assert_eq!(
            Series::V6_1.package_number(arm, "linux-image-6.1.0-56-arm64-unsigned"),
            Some(56)
        );
        assert_eq!(
            Series::V6_12.package_number(arm, "linux-image-6.12.118+deb13-arm64-unsigned"),
            Some(118)
        );
        assert_eq!(
            Series::V6_17.package_number(arm, "linux-image-6.17.13+deb13-arm64"),
            Some(13)
        );
        for (series, package) in [
            (Series::V6_1, "linux-image-6.1.0-56-amd64-unsigned"),
            (Series::V6_1, "linux-image-6.1.0-56-cloud-arm64-unsigned"),
            (Series::V6_12, "linux-image-6.12.118+deb13-arm64-16k"),
            (
                Series::V6_12,
                "linux-image-6.12.118+deb13-rt-arm64-unsigned",
            ),
            (Series::V6_17, "linux-image-6.17.13+deb13-amd64"),
        ] {
            assert_eq!(series.package_number(arm, package), None, "{package}");
        }
        assert_eq!(
            Series::V6_1.package_number(Arch::X86_64, "linux-image-6.1.0-56-arm64-unsigned"),
            None
        );
    }

    #[test]
    fn newest_compares_numbers_not_strings() {
        // apt-cache pkgnames output order, as seen in the archive.
        let names = [
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-56-amd64-unsigned",
            "linux-image-6.1.0-47-amd64-unsigned",
            "linux-image-6.1.0-56-amd64",
            "linux-image-6.1.0-57-arm64-unsigned",
        ];
        assert_eq!(
            Series::V6_1.newest(Arch::X86_64, names),
            Some("linux-image-6.1.0-56-amd64-unsigned")
        );
        assert_eq!(
            Series::V6_1.newest(Arch::Aarch64, names),
            Some("linux-image-6.1.0-57-arm64-unsigned")
        );
        assert_eq!(Series::V5_10.newest(Arch::X86_64, names), None);
    }
}
