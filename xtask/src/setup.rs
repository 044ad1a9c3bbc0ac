//! `cargo xtask setup`: makes a fresh Debian 12 machine able to build and
//! test kmod-monitor, and does next to nothing when it already can.
//!
//! Installs the Debian packages the VM harness and the monitoring stack use,
//! the validators of the deployment files, the pinned nightly toolchain the
//! eBPF build needs (with rust-src), the musl targets for the static x86-64
//! and aarch64 binaries with the C (cross) compilers and QEMU emulators of
//! both (see [`Arch::apt_packages`]), clippy and rustfmt, bpf-linker built
//! against the LLVM of the nightly rustc (see `install_bpf_linker`), and
//! each guest architecture's busybox-static (private apt configuration);
//! and builds the real kube-apiserver and etcd the cluster tests run
//! against (`k8s.rs`).
use std::{fs, path::Path};

use anyhow::{Context as _, Result, bail};

use crate::{arch::Arch, cmd, dirs, kernel};

/// Debian packages the harness needs beyond each architecture's own
/// ([`Arch::apt_packages`]: its C compiler for ring's C code, TLS for the
/// Kubernetes client, and its QEMU): busybox-static (the ELF tests read
/// it), kmod for depmod/modprobe on the host, cpio/xz/zstd for kernel and
/// module archives, Prometheus and Alertmanager for the alerting-rule
/// tests, curl for smoke checks, and the archive keyring the private apt
/// setup trusts.
pub const APT_PACKAGES: &[&str] = &[
    "busybox-static",
    "kmod",
    "cpio",
    "xz-utils",
    "zstd",
    "prometheus",
    "prometheus-alertmanager",
    "curl",
    "debian-archive-keyring",
    "systemd",
    "python3-venv",
];

/// Commands the deployment tests (tests/tests/cli/deploy.rs) run, each with
/// the Debian package installed only when the command is not on PATH at all:
/// a machine may have kubectl or Node.js from elsewhere, whose files the
/// Debian package would clash with.
pub const APT_COMMANDS: &[(&str, &str)] = &[
    ("kubectl", "kubernetes-client"),
    ("node", "nodejs"),
    ("npm", "npm"),
];

/// Runs every setup step in order.
pub fn setup() -> Result<()> {
    println!("setup: checking Debian packages, Rust toolchains and bpf-linker");
    apt_packages().context("installing Debian packages")?;
    deploy_validators().context("installing the deployment validators")?;
    nightly().context("installing the nightly toolchain")?;
    rustup_components().context("installing rustup components and targets")?;
    install_bpf_linker().context("installing bpf-linker")?;
    guest_busybox().context("fetching the guests' busybox")?;
    crate::k8s::servers().context("building the test kube-apiserver and etcd")?;
    println!("setup: done");
    Ok(())
}

/// Every Debian package setup installs.
fn all_apt_packages() -> Vec<&'static str> {
    Arch::ALL
        .iter()
        .flat_map(|arch| arch.apt_packages().iter().copied())
        .chain(APT_PACKAGES.iter().copied())
        .collect()
}

fn apt_packages() -> Result<()> {
    let wanted = all_apt_packages();
    let mut missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    missing.extend(
        APT_COMMANDS
            .iter()
            .filter(|(command, _)| !on_path(command))
            .map(|(_, pkg)| *pkg),
    );
    if missing.is_empty() {
        println!("setup: Debian packages present: {}", wanted.join(" "));
        return Ok(());
    }
    println!("setup: missing Debian packages: {}", missing.join(" "));
    cmd::run(cmd::new("apt-get", ["update"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    cmd::run(
        cmd::new("apt-get", ["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get install succeeded but dpkg still lacks {}",
            still.join(" ")
        );
    }
    Ok(())
}

/// Whether an executable `command` is in a directory of PATH.
fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
}

/// The validators tests/tests/cli/deploy.rs runs, at the versions pinned in
/// tests/deploy-validate/, under [`dirs::deploy_validate_dir`]:
/// kubernetes-validate (PyPI, with the Kubernetes schemas bundled) in a
/// venv, and @kubernetes-models/prometheus-operator (npm) for the
/// ServiceMonitor and PrometheusRule. Both steps do nothing when the pins
/// are already installed.
fn deploy_validators() -> Result<()> {
    let pins = dirs::workspace_root().join("tests/deploy-validate");
    let dir = dirs::deploy_validate_dir()?;
    let venv = dir.join("venv");
    if !venv.join("bin/python").is_file() {
        cmd::run(cmd::new("python3", ["-m", "venv"]).arg(&venv))?;
    }
    // pip asks no index when every pin is already satisfied.
    cmd::run(
        cmd::new(
            &venv.join("bin/pip").to_string_lossy(),
            ["install", "--quiet", "--disable-pip-version-check", "-r"],
        )
        .arg(pins.join("requirements.txt")),
    )?;

    let npm = dir.join("npm");
    let lock = pins.join("package-lock.json");
    let wanted = fs::read(&lock).with_context(|| format!("reading {}", lock.display()))?;
    let installed = fs::read(npm.join("package-lock.json")).ok();
    if installed.as_deref() == Some(wanted.as_slice()) && npm.join("node_modules").is_dir() {
        println!("setup: deployment validators present in {}", dir.display());
        return Ok(());
    }
    fs::create_dir_all(&npm).with_context(|| format!("creating {}", npm.display()))?;
    for file in ["package.json", "package-lock.json"] {
        fs::copy(pins.join(file), npm.join(file))
            .with_context(|| format!("copying {file} to {}", npm.display()))?;
    }
    cmd::run(
        cmd::new(
            "npm",
            [
                "ci",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--prefix",
            ],
        )
        .arg(&npm),
    )
}

fn dpkg_installed(pkg: &str) -> bool {
    cmd::stdout(&mut cmd::new(
        "dpkg-query",
        ["-W", "-f=${db:Status-Status}", pkg],
    ))
    .is_ok_and(|status| status.trim() == "installed")
}

/// Installs the pinned nightly ([`dirs::ebpf_toolchain`]) with rust-src
/// (build-std for the eBPF crate) and clippy (to lint it for its own
/// target), unless it is already there. The moving `nightly` channel is
/// never used: a machine without the pinned one downloads exactly it.
fn nightly() -> Result<()> {
    let toolchain = dirs::ebpf_toolchain()?;
    let plus = format!("+{toolchain}");
    if cmd::succeeds(&mut cmd::new("rustc", [plus.as_str(), "-vV"])) {
        println!("setup: {toolchain} present");
        return Ok(());
    }
    cmd::run(&mut cmd::new(
        "rustup",
        [
            "toolchain",
            "install",
            toolchain.as_str(),
            "--profile",
            "minimal",
            "--component",
            "rust-src,clippy",
        ],
    ))
}

fn rustup_components() -> Result<()> {
    let toolchain = dirs::ebpf_toolchain()?;
    let nightly_components = cmd::stdout(&mut cmd::new(
        "rustup",
        [
            "component",
            "list",
            "--installed",
            "--toolchain",
            toolchain.as_str(),
        ],
    ))?;
    // rust-src for build-std of the eBPF crate; clippy to lint it for its
    // own target (a minimal-profile nightly lacks both).
    let missing: Vec<&str> = ["rust-src", "clippy"]
        .into_iter()
        .filter(|c| !has_line_starting(&nightly_components, c))
        .collect();
    if missing.is_empty() {
        println!("setup: {toolchain} rust-src and clippy present");
    } else {
        cmd::run(
            cmd::new(
                "rustup",
                ["component", "add", "--toolchain", toolchain.as_str()],
            )
            .args(&missing),
        )?;
    }

    // The default toolchain builds the userspace crates, including the
    // static musl binaries of both architectures.
    let targets = cmd::stdout(&mut cmd::new("rustup", ["target", "list", "--installed"]))?;
    let missing: Vec<&str> = Arch::ALL
        .iter()
        .map(|arch| arch.musl_target())
        .filter(|target| !has_line_starting(&targets, target))
        .collect();
    if missing.is_empty() {
        println!("setup: musl targets present");
    } else {
        cmd::run(cmd::new("rustup", ["target", "add"]).args(&missing))?;
    }

    let components = cmd::stdout(&mut cmd::new(
        "rustup",
        ["component", "list", "--installed"],
    ))?;
    let missing: Vec<&str> = ["clippy", "rustfmt"]
        .into_iter()
        .filter(|c| !has_line_starting(&components, c))
        .collect();
    if missing.is_empty() {
        println!("setup: clippy and rustfmt present");
    } else {
        cmd::run(cmd::new("rustup", ["component", "add"]).args(&missing))?;
    }
    Ok(())
}

/// Each guest architecture's busybox-static and the 32-bit one for its
/// compat tasks, from Debian through a private apt configuration (cached;
/// nothing is installed on the host).
fn guest_busybox() -> Result<()> {
    for arch in Arch::ALL {
        let busybox = kernel::busybox(arch.debian(), false)?;
        println!("setup: {arch} guest busybox {}", busybox.display());
        let compat = kernel::busybox(arch.compat_debian(), false)?;
        println!(
            "setup: {arch} guest busybox for 32-bit compat tasks {}",
            compat.display()
        );
    }
    Ok(())
}

fn has_line_starting(list: &str, prefix: &str) -> bool {
    list.lines().any(|line| line.trim().starts_with(prefix))
}

/// The LLVM major version from `rustc -vV` output (`LLVM version: 22.1.4`).
pub fn llvm_major(rustc_vv: &str) -> Result<u32> {
    let version = rustc_vv
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .context("rustc -vV printed no `LLVM version:` line")?
        .trim();
    let major = version.split('.').next().unwrap_or(version);
    major
        .parse()
        .with_context(|| format!("rustc's LLVM version {version:?} has no numeric major"))
}

/// bpf-linker must link the same LLVM major as the nightly rustc that emits
/// the eBPF bitcode. Debian 12 has no matching LLVM, so it links rustc's own
/// libLLVM through symlinks in a stable prefix; the binary's RUNPATH points
/// there. The symlinks are re-pointed at the pinned nightly on every run
/// (cheap), so the linker never depends on some other toolchain that
/// happened to be installed when it was built. The major it was built for
/// is kept in a stamp file beside the prefix, so a nightly with a new LLVM
/// triggers a rebuild.
fn install_bpf_linker() -> Result<()> {
    let plus = format!("+{}", dirs::ebpf_toolchain()?);
    let rustc_vv = cmd::stdout(&mut cmd::new("rustc", [plus.as_str(), "-vV"]))?;
    let major = llvm_major(&rustc_vv)?;
    let prefix = dirs::llvm_prefix()?;
    let stamp = dirs::llvm_stamp()?;
    let stamped = fs::read_to_string(&stamp)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok());
    link_rustc_llvm(&prefix)?;
    let runs = cmd::succeeds(&mut cmd::new("bpf-linker", ["--version"]));
    if runs && stamped == Some(major) {
        println!("setup: bpf-linker present, built for LLVM {major}");
        return Ok(());
    }
    match (runs, stamped) {
        (false, _) => {
            println!("setup: bpf-linker missing or cannot start; building it for LLVM {major}")
        }
        (true, None) => println!(
            "setup: bpf-linker has no LLVM stamp at {}; rebuilding it for LLVM {major}",
            stamp.display()
        ),
        (true, Some(old)) => println!(
            "setup: bpf-linker was built for LLVM {old}, nightly has LLVM {major}; rebuilding"
        ),
    }

    cmd::run(
        cmd::new(
            "cargo",
            [
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
            ],
        )
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix),
    )?;
    if !cmd::succeeds(&mut cmd::new("bpf-linker", ["--version"])) {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails; is cargo's bin directory on PATH?"
        );
    }
    if let Some(parent) = stamp.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(&stamp, format!("{major}\n"))
        .with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

/// Points `PREFIX/lib/libLLVM.so` (and the versioned name) at the shared
/// object in the nightly sysroot. Beside it, `libLLVM-NN-*.so` is a linker
/// script, not the library, so the versioned `libLLVM.so.*` is the one.
fn link_rustc_llvm(prefix: &Path) -> Result<()> {
    let plus = format!("+{}", dirs::ebpf_toolchain()?);
    let sysroot = cmd::stdout(&mut cmd::new(
        "rustc",
        [plus.as_str(), "--print", "sysroot"],
    ))?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let mut shared_objects: Vec<_> = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("listing {}", sysroot_lib.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .collect();
    shared_objects.sort();
    let Some(so) = shared_objects.pop() else {
        bail!(
            "no libLLVM.so.* in the nightly sysroot {}",
            sysroot_lib.display()
        );
    };
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let file_name = so
        .file_name()
        .with_context(|| format!("{} has no file name", so.display()))?;
    for link in [lib.join("libLLVM.so"), lib.join(file_name)] {
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing old {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&so, &link)
            .with_context(|| format!("linking {} to {}", link.display(), so.display()))?;
    }
    println!(
        "setup: {} -> {}",
        lib.join("libLLVM.so").display(),
        so.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn llvm_major_from_real_rustc_output() {
        let text = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                    commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a\n\
                    host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\n\
                    LLVM version: 22.1.4\n";
        assert_eq!(llvm_major(text).ok(), Some(22));
    }

    #[test]
    fn llvm_major_missing_line_is_an_error() {
        assert!(llvm_major("rustc 1.0.0\n").is_err());
    }
}
