//! Builds the eBPF crate for bpfel-unknown-none (the pinned nightly +
//! bpf-linker) and leaves the object in OUT_DIR, where main embeds it.
//!
//! The nightly is the one `.cargo/config.toml` names in
//! `KMOD_MONITOR_EBPF_TOOLCHAIN` (a dated nightly, never the moving
//! `nightly` channel), so every machine builds the program with the same
//! compiler and LLVM.
//!
//! `AYA_BUILD_SKIP=1` skips that build and embeds an empty stub instead, so
//! `cargo check`/`clippy` of the userspace crates work before bpf-linker is
//! installed. The stub is never used silently: the build prints a warning,
//! and the eBPF source refuses an empty object at start-up, saying the
//! binary was built without it (so `auto` falls back and reports why).
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Names the nightly toolchain; set by `.cargo/config.toml`.
const TOOLCHAIN_VAR: &str = "KMOD_MONITOR_EBPF_TOOLCHAIN";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out_dir =
            PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
        fs::write(out_dir.join("monitor"), []).context("writing the empty eBPF stub object")?;
        println!(
            "cargo:warning=AYA_BUILD_SKIP is set: this kmod-monitor has no eBPF object and cannot use --source ebpf"
        );
        return Ok(());
    }
    let ebpf = Package {
        name: "monitor-ebpf",
        root_dir: "../monitor-ebpf",
        ..Default::default()
    };
    println!("cargo:rerun-if-env-changed={TOOLCHAIN_VAR}");
    let toolchain = env::var(TOOLCHAIN_VAR).with_context(|| {
        format!("{TOOLCHAIN_VAR} is not set: build from the workspace, whose .cargo/config.toml names the pinned nightly")
    })?;
    aya_build::build_ebpf([ebpf], Toolchain::Custom(&toolchain)).with_context(|| {
        format!("building the eBPF program with {toolchain} (needs that toolchain with rust-src, and bpf-linker; `cargo xtask setup` installs them, or set AYA_BUILD_SKIP=1 for a check-only build)")
    })
}
