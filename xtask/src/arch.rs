//! The two architectures kmod-monitor ships and tests: x86-64 and aarch64
//! (arm64). Everything that differs between them lives here: Rust's musl
//! target and the C cross compiler ring needs, Debian's architecture name
//! and kernel flavour, the QEMU system emulator with its machine and serial
//! console, the ELF machine of the binaries, and the kernel series and
//! modules the VM tests use.
use std::fmt;

use crate::kernel::Series;

/// A CPU architecture of the static binaries and the test guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Arch {
    /// x86-64 (Debian `amd64`).
    #[value(name = "x86_64", alias = "amd64", alias = "x86_64-unknown-linux-musl")]
    X86_64,
    /// 64-bit Arm (Debian `arm64`).
    #[value(
        name = "aarch64",
        alias = "arm64",
        alias = "aarch64-unknown-linux-musl"
    )]
    Aarch64,
}

impl Arch {
    /// Both, in the order builds and VM tests run them.
    pub const ALL: [Self; 2] = [Self::X86_64, Self::Aarch64];

    /// The name on the command line and in paths (`aarch64`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        }
    }

    /// The Rust target of the static binaries.
    pub const fn musl_target(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-unknown-linux-musl",
            Self::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }

    /// Debian's (and the OCI platform's) name for it.
    pub const fn debian(self) -> &'static str {
        match self {
            Self::X86_64 => "amd64",
            Self::Aarch64 => "arm64",
        }
    }

    /// `e_machine` of its ELF executables.
    pub const fn elf_machine(self) -> object::elf::Machine {
        match self {
            Self::X86_64 => object::elf::EM_X86_64,
            Self::Aarch64 => object::elf::EM_AARCH64,
        }
    }

    /// Environment for a cargo build with `--target` [`Self::musl_target`] on an
    /// x86-64 Debian host: the C compiler cc-rs uses for ring's C code, and
    /// for aarch64 the linker driver (rustc's default `cc` is the host's).
    /// Debian's musl-tools calls its x86-64 wrapper `musl-gcc`, where cc-rs
    /// looks for `x86_64-linux-musl-gcc`. For aarch64 Debian has no musl
    /// cross compiler; its glibc cross gcc compiles ring (whose C code
    /// needs only `<stdint.h>`-level headers, which the glibc cross headers
    /// provide) and drives the link, against the self-contained musl CRT
    /// objects and libc that rustup ships with the target.
    pub const fn cargo_env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::X86_64 => &[("CC_x86_64_unknown_linux_musl", "musl-gcc")],
            Self::Aarch64 => &[
                ("CC_aarch64_unknown_linux_musl", "aarch64-linux-gnu-gcc"),
                (
                    "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER",
                    "aarch64-linux-gnu-gcc",
                ),
            ],
        }
    }

    /// rustc flags for the last crate of a static build only (given to
    /// `cargo rustc`, never to the dependencies: fat LTO compiles the whole
    /// program in that crate, whose target features every function without
    /// features of its own inherits, and rustc's warning about them is
    /// printed once rather than once per crate). Measured: 1,944 inline
    /// copies this way against 1,965 with the flags on every crate; a
    /// developer's own `RUSTFLAGS` with a `target-feature` would give
    /// every dependency's functions features of their own, and leave them
    /// to musl's `memcpy`.
    ///
    /// x86-64: a copy of a length known only at run time (every string
    /// the forensic log's JSON is built from, every `Vec` extend), and a
    /// fixed-size one too large for LLVM to expand into moves (over about
    /// 128 bytes), becomes an inline `rep movsb` instead of a call to
    /// musl's `memcpy`, which pays an alignment loop and a `rep movsq`
    /// start-up on every call: on
    /// the 2-core Intel Xeon this was measured on, 52 ns for a 3 to 15
    /// byte `extend_from_slice` against 8.6 inline, and the host pipeline
    /// with the log went from about 165,000 to 230,000 to 290,000 events/s
    /// (`monitor/benches/pipeline.rs`). `rep movsb` exists on every x86-64
    /// CPU; on those that do not report fast short `rep movsb` (FSRM:
    /// Intel before Ice Lake, AMD before Zen 3) a short one costs about
    /// what musl's `rep movsq` start-up does. `fsrm` is not a feature
    /// rustc knows, hence its warning; LLVM reads it, and lowers to `rep
    /// movsb` only with `-x86-use-fsrm-for-memcpy` as well.
    ///
    /// Under QEMU's TCG (the test and bench guests), `rep movsb` is
    /// emulated a byte at a time, where musl's `rep movsq` moves eight: a
    /// 400-byte move took 565 ns against 125 in `qemu-x86_64` on this
    /// machine, while short copies were still faster (22 against 39 ns).
    /// If a toolchain stops accepting either flag (rustc may make unknown
    /// target features an error; the LLVM option is a hidden one), the
    /// static build fails saying so: empty this list.
    ///
    /// aarch64: none; musl's aarch64 `memcpy` is already written for
    /// short copies.
    pub const fn last_crate_rustflags(self) -> &'static [&'static str] {
        match self {
            Self::X86_64 => &[
                "-C",
                "target-feature=+fsrm",
                "-C",
                "llvm-args=-x86-use-fsrm-for-memcpy",
            ],
            Self::Aarch64 => &[],
        }
    }

    /// Debian packages that build for it and boot it: the C (cross)
    /// compiler of [`Self::cargo_env`] and the QEMU system emulator.
    pub const fn apt_packages(self) -> &'static [&'static str] {
        match self {
            Self::X86_64 => &["musl-tools", "qemu-system-x86"],
            // The cross gcc's C library headers are only a Recommends.
            Self::Aarch64 => &[
                "gcc-aarch64-linux-gnu",
                "libc6-dev-arm64-cross",
                "qemu-system-arm",
            ],
        }
    }

    /// Debian's name for the 32-bit architecture its kernels run as
    /// compat tasks (Debian's amd64 and arm64 kernels have
    /// CONFIG_IA32_EMULATION and CONFIG_COMPAT).
    pub const fn compat_debian(self) -> &'static str {
        match self {
            Self::X86_64 => "i386",
            Self::Aarch64 => "armhf",
        }
    }

    /// The QEMU system emulator.
    pub const fn qemu(self) -> &'static str {
        match self {
            Self::X86_64 => "qemu-system-x86_64",
            Self::Aarch64 => "qemu-system-aarch64",
        }
    }

    /// QEMU's machine, accelerator and CPU: TCG on both (KVM does not work
    /// on these machines, and an arm64 guest on an x86 host has none),
    /// with the most capable CPU model. On aarch64, `pauth-impdef=on`
    /// keeps `-cpu max`'s pointer authentication (Debian's kernels use it)
    /// but with QEMU's cheap implementation-defined algorithm instead of
    /// emulating QARMA, which otherwise dominates TCG time.
    pub const fn qemu_machine(self) -> &'static [&'static str] {
        match self {
            Self::X86_64 => &["-accel", "tcg", "-cpu", "max"],
            Self::Aarch64 => &[
                "-machine",
                "virt",
                "-accel",
                "tcg",
                "-cpu",
                "max,pauth-impdef=on",
            ],
        }
    }

    /// Kernel command line arguments its guests need beyond the console.
    /// x86-64: `no_timer_check`: under TCG on a busy host the kernel's
    /// IO-APIC timer check can miss its window and panic ("IO-APIC + timer
    /// doesn't work!"), as 6.17 did once while the host compiled; the check
    /// exists for broken hardware, which an emulated PIT is not. arm64 has
    /// no such check (and would hand the unknown word to /init).
    pub const fn kernel_args(self) -> &'static str {
        match self {
            Self::X86_64 => "no_timer_check",
            Self::Aarch64 => "",
        }
    }

    /// The guest's serial console device.
    pub const fn console(self) -> &'static str {
        match self {
            Self::X86_64 => "ttyS0",
            Self::Aarch64 => "ttyAMA0",
        }
    }

    /// The Debian kernel series the VM tests boot. arm64 starts at 6.1:
    /// the issue asks for 6.1, 6.12 and 6.17, and bullseye's 5.10 is
    /// covered on x86-64.
    pub const fn series(self) -> &'static [Series] {
        match self {
            Self::X86_64 => &Series::ALL,
            Self::Aarch64 => &[Series::V6_1, Series::V6_12, Series::V6_17],
        }
    }

    /// Scenarios its VM tests leave out on kernel `series` unless `--full`
    /// asks for them (the CI budget; README, "VM tests and CI"):
    /// - on aarch64 the 1000-cycle soak: it is 85 % of the arm64 guests'
    ///   scenario time, and it exercises daemon logic that does not depend
    ///   on the architecture, which the x86-64 kernels soak on every run;
    /// - the unprivileged flood (200 s a guest: every exec runs modprobe)
    ///   everywhere but x86-64 6.1, the kernel the attack was first shown
    ///   on; the kernel's side of it (the refused-unload limit, the
    ///   request filter) runs on every kernel in `denied-rate-limit`;
    /// - the emulated IOMMU (a boot of its own) everywhere but x86-64 6.12;
    ///   its absence is asserted on every kernel by `check-exit-codes`.
    #[must_use]
    pub fn skipped_by_default(self, series: Series) -> &'static [&'static str] {
        const FLOOD: &str = "unprivileged-flood";
        const IOMMU: &str = "iommu-present";
        const SOAK: &str = "soak-1000-cycles-under-scrapes";
        match (self, series) {
            (Self::X86_64, Series::V6_1) => &[IOMMU],
            (Self::X86_64, Series::V6_12) => &[FLOOD],
            (Self::X86_64, _) => &[FLOOD, IOMMU],
            (Self::Aarch64, _) => &[SOAK, FLOOD],
        }
    }

    /// The module whose init fails in every TCG guest of this
    /// architecture after the `module_load` tracepoint has fired (so
    /// `module_load` is followed by `module_free`), plus the modules the
    /// kernel needs for it. The guest driver names the same module for
    /// its architecture.
    ///
    /// - x86-64: `kvm_intel`. QEMU's TCG `-cpu max` is an AMD model with
    ///   SVM but no VMX, so `vmx_init` returns -EOPNOTSUPP ("kvm: no
    ///   hardware support" on 5.10/6.1, "kvm_intel: VMX not supported by
    ///   CPU 0" on 6.12/6.17). Its dependency kvm loads fine.
    /// - aarch64: `cppc_cpufreq`. QEMU's `virt` machine booted with
    ///   `-kernel` describes itself by device tree, so ACPI is off, no CPU
    ///   has a valid _CPC, and `cppc_cpufreq_init` returns -ENODEV. (KVM
    ///   is built in on arm64, so there is no kvm module to fail.)
    pub const fn failing_module(self) -> &'static str {
        match self {
            Self::X86_64 => "kvm_intel",
            Self::Aarch64 => "cppc_cpufreq",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The architectures `--arch` asked for (repeatable), sorted and without
/// duplicates; all of them when none was given.
pub fn selected(asked: &[Arch]) -> Vec<Arch> {
    if asked.is_empty() {
        return Arch::ALL.to_vec();
    }
    let mut archs = asked.to_vec();
    archs.sort();
    archs.dedup();
    archs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_defaults_to_both_and_dedups() {
        assert_eq!(selected(&[]), Arch::ALL);
        assert_eq!(
            selected(&[Arch::Aarch64, Arch::X86_64, Arch::Aarch64]),
            Arch::ALL
        );
        assert_eq!(selected(&[Arch::Aarch64]), [Arch::Aarch64]);
    }

    #[test]
    fn names_agree_with_rust_and_debian() {
        for arch in Arch::ALL {
            assert!(arch.musl_target().starts_with(arch.name()), "{arch}");
            assert!(
                arch.musl_target().ends_with("-unknown-linux-musl"),
                "{arch}"
            );
            for (var, _) in arch.cargo_env() {
                let triple = arch.musl_target().replace('-', "_");
                assert!(
                    var.contains(&triple) || var.contains(&triple.to_uppercase()),
                    "{var} is not about {}",
                    arch.musl_target()
                );
            }
        }
        assert_eq!(Arch::X86_64.debian(), "amd64");
        assert_eq!(Arch::Aarch64.debian(), "arm64");
    }
}
