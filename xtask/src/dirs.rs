//! Every fixed path xtask uses, in one place: the workspace, cargo's target
//! directory, the per-user cache of test kernels and the stable home of the
//! LLVM prefix bpf-linker links against.
use std::{
    env,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::arch::Arch;

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// cargo's target directory: `CARGO_TARGET_DIR` if set, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// Release binary `name` built for the host.
pub fn host_release_bin(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}

/// Static release binary `name` built for `arch`'s musl target
/// (`target/aarch64-unknown-linux-musl/release/kmod-monitor`).
pub fn musl_release_bin(arch: Arch, name: &str) -> PathBuf {
    target_dir()
        .join(arch.musl_target())
        .join("release")
        .join(name)
}

/// Where one kernel's VM test leaves its initramfs and console log
/// (`target/vm-test/aarch64/6.12`).
pub fn vm_test_dir(arch: Arch, series: &str) -> PathBuf {
    target_dir().join("vm-test").join(arch.name()).join(series)
}

fn home() -> Result<PathBuf> {
    match env::var_os("HOME") {
        Some(home) if !home.is_empty() => Ok(PathBuf::from(home)),
        _ => bail!("HOME is not set; cannot place the kernel cache or the LLVM prefix"),
    }
}

/// `${XDG_CACHE_HOME:-~/.cache}/kmod-monitor`: outside the repository, so
/// clean clones on the same machine reuse downloaded kernels.
pub fn cache_dir() -> Result<PathBuf> {
    let base = match env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => home()
            .context("finding the cache directory")?
            .join(".cache"),
    };
    Ok(base.join("kmod-monitor"))
}

/// Downloaded and unpacked test kernels, one folder per package.
pub fn kernels_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("kernels"))
}

/// Guest userland downloaded from Debian (busybox-static), one folder per
/// Debian architecture.
pub fn userland_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("userland"))
}

/// The deployment tests' validators (a Python venv and npm packages); the
/// tests look for them at the same path.
pub fn deploy_validate_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("deploy-validate"))
}

/// The test kube-apiserver and etcd (xtask/src/k8s.rs): one folder per
/// pinned Kubernetes version holding `bin/`, plus the Go module and build
/// caches. tests/src/apiserver.rs looks for the binaries at the same path.
pub fn k8s_servers_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("k8s"))
}

/// The private apt configuration (sources, lists, archives) for fetching
/// kernels from suites the system's apt does not know.
pub fn apt_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("apt"))
}

/// `${XDG_DATA_HOME:-~/.local/share}/kmod-monitor`: stable, because the
/// installed bpf-linker's RUNPATH points into it.
fn data_dir() -> Result<PathBuf> {
    let base = match env::var_os("XDG_DATA_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => home()
            .context("finding the data directory")?
            .join(".local")
            .join("share"),
    };
    Ok(base.join("kmod-monitor"))
}

/// The LLVM prefix bpf-linker was built against (libLLVM symlinks into the
/// nightly toolchain).
pub fn llvm_prefix() -> Result<PathBuf> {
    Ok(data_dir()?.join("llvm"))
}

/// Records the LLVM major the installed bpf-linker was built for.
pub fn llvm_stamp() -> Result<PathBuf> {
    Ok(data_dir()?.join("bpf-linker.llvm-major"))
}

/// The dated nightly that builds the eBPF crate, as `.cargo/config.toml`
/// sets it for every cargo-run process (`cargo xtask` included). The one
/// place it is written is that file.
pub fn ebpf_toolchain() -> Result<String> {
    const VAR: &str = "KMOD_MONITOR_EBPF_TOOLCHAIN";
    let name = std::env::var(VAR).with_context(|| {
        format!("{VAR} is not set: run xtask as `cargo xtask` from the workspace, whose .cargo/config.toml names the pinned nightly")
    })?;
    anyhow::ensure!(
        name.starts_with("nightly-") && name.len() == "nightly-YYYY-MM-DD".len(),
        "{VAR}={name:?}: expected a dated nightly such as nightly-2026-05-19"
    );
    Ok(name)
}
