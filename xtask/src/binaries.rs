//! `cargo xtask build`: the release daemon for the host and the static musl
//! daemon and guest driver that go into the test VMs. A musl binary that
//! turns out dynamically linked fails the build: it would not start in a
//! busybox initramfs.
use std::{env, path::PathBuf, process::Command};

use anyhow::{Result, bail};

use crate::{cmd, dirs, elf};

/// The daemon's package and binary name.
pub const DAEMON: &str = "kmod-monitor";
/// The package holding the in-guest test driver.
const GUEST_PACKAGE: &str = "kmod-monitor-vm-guest";
/// The in-guest test driver's binary name.
pub const GUEST_DRIVER: &str = "vm-guest";

fn cargo() -> Command {
    // Use the cargo that runs us (`cargo xtask`), so toolchain overrides
    // carry through.
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(dirs::workspace_root());
    // ring (rustls, for the Kubernetes client) compiles C; cc-rs looks for
    // `x86_64-linux-musl-gcc`, which Debian's musl-tools calls `musl-gcc`.
    if env::var_os("CC_x86_64_unknown_linux_musl").is_none() {
        cmd.env("CC_x86_64_unknown_linux_musl", "musl-gcc");
    }
    cmd
}

/// Paths of the daemon builds.
pub struct DaemonBinaries {
    /// glibc build for running on this machine.
    pub host: PathBuf,
    /// Static musl build for the test VMs.
    pub musl: PathBuf,
}

/// Builds the release daemon for this machine only (what `xtask run`
/// needs).
pub fn build_host_daemon() -> Result<PathBuf> {
    cmd::run(cargo().args(["build", "--release", "--package", DAEMON]))?;
    let host = dirs::host_release_bin(DAEMON);
    if !host.is_file() {
        bail!(
            "cargo build succeeded but {} does not exist",
            host.display()
        );
    }
    Ok(host)
}

/// Builds the daemon as a static musl binary and checks that it is static
/// (what the test VMs need).
pub fn build_static_daemon() -> Result<PathBuf> {
    cmd::run(cargo().args([
        "build",
        "--release",
        "--target",
        dirs::MUSL_TARGET,
        "--package",
        DAEMON,
    ]))?;
    let musl = dirs::musl_release_bin(DAEMON);
    ensure_static(&musl)?;
    Ok(musl)
}

/// Builds the daemon for the host and as a static musl binary.
pub fn build_daemon() -> Result<DaemonBinaries> {
    let host = build_host_daemon()?;
    let musl = build_static_daemon()?;
    Ok(DaemonBinaries { host, musl })
}

/// Builds the static musl guest driver.
pub fn build_guest_driver() -> Result<PathBuf> {
    cmd::run(cargo().args([
        "build",
        "--release",
        "--target",
        dirs::MUSL_TARGET,
        "--package",
        GUEST_PACKAGE,
        "--bin",
        GUEST_DRIVER,
    ]))?;
    let path = dirs::musl_release_bin(GUEST_DRIVER);
    ensure_static(&path)?;
    Ok(path)
}

fn ensure_static(path: &std::path::Path) -> Result<()> {
    match elf::linkage(path)? {
        elf::Linkage::Static => {
            println!("build: {} is statically linked", path.display());
            Ok(())
        }
        elf::Linkage::Dynamic {
            interpreter,
            needed,
        } => bail!(
            "{} is NOT statically linked (interpreter {}, {needed} shared-library dependencies); \
             it cannot run in the busybox test VMs",
            path.display(),
            interpreter.as_deref().unwrap_or("none"),
        ),
    }
}
