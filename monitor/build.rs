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
    })?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    strip_dwarf(&out_dir.join("monitor"))
}

/// Removes the DWARF sections (`.debug_*` and their relocations) from the
/// eBPF object in place. bpf-linker needs the DWARF to write the BTF, and
/// keeps it; nothing loads it, yet embedded it is most of the object
/// (1.5 of 1.8 MB) and pages of it end up resident when aya parses the
/// object at start-up.
fn strip_dwarf(path: &std::path::Path) -> anyhow::Result<()> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut elf = object::build::elf::Builder::read(&*data)
        .with_context(|| format!("parsing the eBPF object {}", path.display()))?;
    for section in &mut elf.sections {
        let name = section.name.as_slice();
        if name.starts_with(b".debug_") || name.starts_with(b".rel.debug_") {
            section.delete = true;
        }
    }
    // bpf-linker names the sections from the symbol string table; the
    // writer keeps section names in a table of their own.
    if !elf
        .sections
        .iter()
        .any(|s| matches!(s.data, object::build::elf::SectionData::SectionString))
    {
        let names = elf.sections.add();
        names.name = (&b".shstrtab"[..]).into();
        names.sh_type = object::elf::SHT_STRTAB;
        names.data = object::build::elf::SectionData::SectionString;
    }
    let mut out = Vec::with_capacity(data.len());
    elf.write(&mut out)
        .with_context(|| format!("writing the stripped eBPF object {}", path.display()))?;
    fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}
