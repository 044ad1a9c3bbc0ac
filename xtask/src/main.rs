//! `cargo xtask`: the project's automation entry point. Each subcommand is a
//! thin layer over one module: `setup` installs the toolchain, `build` makes
//! the release and static binaries (x86-64 and aarch64), `vm-test` runs the
//! kernel tests in QEMU, `test` runs everything, `run` starts the daemon on
//! this machine, `bench` measures it in QEMU and on the host.
mod arch;
mod bench;
mod binaries;
mod cmd;
mod cpio;
mod dirs;
mod elf;
mod initramfs;
mod k8s;
mod kernel;
mod setup;
mod suite;
mod vm;
mod vm_test;

use std::{ffi::OsString, os::unix::process::CommandExt as _, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "kmod-monitor project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent, fast when done).
    Setup,
    /// Release build for the host plus the static musl daemon for x86_64
    /// and aarch64; `--arch` builds only that static daemon.
    Build {
        /// Only the static daemon for this architecture (repeatable).
        #[arg(long = "arch", value_enum)]
        archs: Vec<arch::Arch>,
    },
    /// Boot Debian kernels in QEMU and run the guest test driver in each.
    VmTest(vm_test::Options),
    /// Run every test: setup, fmt, clippy, cargo test, vm-test on all kernels.
    Test {
        /// Also run what kernels skip by default for the CI budget (the soak
        /// on aarch64, the flood and the IOMMU machine beyond one kernel).
        #[arg(long, alias = "arm64-full")]
        full: bool,
    },
    /// Measure latency, throughput and footprint in QEMU and on the host
    /// (not part of `test`); `--check` checks the targets.
    Bench(bench::Options),
    /// Set up, build, and run `kmod-monitor run ARGS...` on this machine.
    Run {
        /// Arguments for `kmod-monitor run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let Cli { command } = Cli::parse();
    match dispatch(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Cmd) -> Result<()> {
    match command {
        Cmd::Setup => setup::setup(),
        Cmd::Build { archs } => {
            for (what, path) in binaries::build(&archs)? {
                println!("build: {what} {}", path.display());
            }
            Ok(())
        }
        Cmd::VmTest(options) => {
            let outcomes = vm_test::vm_test(&options)?;
            let failed: Vec<_> = outcomes
                .iter()
                .filter(|o| !o.ok())
                .map(vm_test::Outcome::label)
                .collect();
            let passed: usize = outcomes.iter().map(|o| o.passed).sum();
            let failures: usize = outcomes.iter().map(|o| o.failed.len()).sum();
            println!("vm-test: {passed} scenarios passed, {failures} failed");
            if failed.is_empty() {
                Ok(())
            } else {
                bail!("vm-test failed on {}", failed.join(", "))
            }
        }
        Cmd::Test { full } => suite::test(full),
        Cmd::Bench(options) => bench::bench(&options),
        Cmd::Run { args } => {
            setup::setup()?;
            let host = binaries::build_host_daemon()?;
            let mut daemon = std::process::Command::new(&host);
            daemon.arg("run").args(&args);
            println!("+ {}", cmd::describe(&daemon));
            let err = daemon.exec();
            Err(err).with_context(|| format!("executing {}", host.display()))
        }
    }
}
