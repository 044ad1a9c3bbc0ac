//! `cargo xtask build`: the release daemon for the host, and for each
//! architecture the static musl daemon (what the container image and the
//! test VMs carry) and the static guest driver. Every static binary is
//! checked after the build: for the right machine, statically linked (a
//! dynamic one would not start in a FROM-scratch image or a busybox
//! initramfs), and the daemon with its eBPF object embedded.
use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{arch::Arch, cmd, dirs, elf};

/// The daemon's package and binary name.
pub const DAEMON: &str = "kmod-monitor";
/// The package holding the in-guest test driver.
const GUEST_PACKAGE: &str = "kmod-monitor-vm-guest";
/// The in-guest test driver's binary name.
pub const GUEST_DRIVER: &str = "vm-guest";

/// The cargo that runs us (`cargo xtask`), so toolchain
/// overrides carry through, with `arch`'s C compiler and linker for a
/// static build.
fn cargo(arch: Option<Arch>) -> Command {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(dirs::workspace_root());
    for (var, value) in arch.map(Arch::cargo_env).unwrap_or_default() {
        // A developer's own setting wins.
        if env::var_os(var).is_none() {
            cmd.env(var, value);
        }
    }
    cmd
}

/// Builds the release daemon for this machine only (what `xtask run`
/// needs).
pub fn build_host_daemon() -> Result<PathBuf> {
    cmd::run(cargo(None).args(["build", "--release", "--package", DAEMON]))?;
    let host = dirs::host_release_bin(DAEMON);
    if !host.is_file() {
        bail!(
            "cargo build succeeded but {} does not exist",
            host.display()
        );
    }
    Ok(host)
}

/// `cargo rustc` of `bin` of `package` as a static release binary for
/// `arch`, with `features`, and [`Arch::last_crate_rustflags`].
fn static_build(arch: Arch, package: &str, bin: &str, features: &[&str]) -> Command {
    let mut cmd = cargo(Some(arch));
    cmd.args([
        "rustc",
        "--release",
        "--target",
        arch.musl_target(),
        "--package",
        package,
        "--bin",
        bin,
    ]);
    for f in features {
        cmd.args(["--features", f]);
    }
    cmd.arg("--").args(arch.last_crate_rustflags());
    cmd
}

/// Builds `bin` of `package` as a static musl binary for `arch` and checks
/// it (see the module docs).
fn build_static(arch: Arch, package: &str, bin: &str, want_bpf: bool) -> Result<PathBuf> {
    cmd::run(&mut static_build(arch, package, bin, &[]))
        .with_context(|| format!("building {bin} for {}", arch.musl_target()))?;
    let path = dirs::musl_release_bin(arch, bin);
    println!("build: {}", elf::check_static(&path, arch, want_bpf)?);
    Ok(path)
}

/// Builds the daemon as a static musl binary for `arch`, with its eBPF
/// object, and checks it.
pub fn build_static_daemon(arch: Arch) -> Result<PathBuf> {
    build_static(arch, DAEMON, DAEMON, true)
}

/// The floor binary of `cargo xtask bench` (monitor, `bench` feature).
pub const FLOOR: &str = "kmod-monitor-floor";

/// Builds, for `cargo xtask bench`, the daemon with the `bench` feature
/// (per-stage timestamps) and the floor, static for `arch`, and copies
/// them to `into` as `kmod-monitor-bench` and `kmod-monitor-floor`: the
/// feature build lands where the product daemon does, so neither may be
/// read from cargo's path afterwards. Returns (daemon, floor).
pub fn build_bench_binaries(arch: Arch, into: &std::path::Path) -> Result<(PathBuf, PathBuf)> {
    // One `cargo rustc` per binary (its flags go to one target), so the
    // two whole-program links run one after the other.
    for bin in [DAEMON, FLOOR] {
        cmd::run(&mut static_build(arch, DAEMON, bin, &["bench"])).with_context(|| {
            format!("building the bench binary {bin} for {}", arch.musl_target())
        })?;
    }
    std::fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
    let mut out = Vec::new();
    for (bin, name) in [(DAEMON, "kmod-monitor-bench"), (FLOOR, FLOOR)] {
        let built = dirs::musl_release_bin(arch, bin);
        let to = into.join(name);
        std::fs::copy(&built, &to)
            .with_context(|| format!("copying {} to {}", built.display(), to.display()))?;
        println!("build: {}", elf::check_static(&to, arch, true)?);
        out.push(to);
    }
    let [daemon, floor]: [PathBuf; 2] = out
        .try_into()
        .map_err(|_| anyhow::anyhow!("two bench binaries expected"))?;
    Ok((daemon, floor))
}

/// Builds the static musl guest driver for `arch`.
pub fn build_guest_driver(arch: Arch) -> Result<PathBuf> {
    build_static(arch, GUEST_PACKAGE, GUEST_DRIVER, false)
}

/// `cargo xtask build`: with no `--arch`, the host daemon and the static
/// daemon for every architecture; with `--arch`, only those static
/// daemons. Returns what was built, for the summary.
pub fn build(asked: &[Arch]) -> Result<Vec<(String, PathBuf)>> {
    let mut built = Vec::new();
    if asked.is_empty() {
        built.push(("host binary".to_owned(), build_host_daemon()?));
    }
    for arch in crate::arch::selected(asked) {
        built.push((format!("static {arch} binary"), build_static_daemon(arch)?));
    }
    Ok(built)
}
