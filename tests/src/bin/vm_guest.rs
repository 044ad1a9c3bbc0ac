//! The VM test driver: runs inside a test kernel's initramfs (started by its
//! /init) and checks kmod-monitor against real module events. See
//! `tests/src/vm/mod.rs`; the host side is `cargo xtask vm-test`.
#[path = "../vm/mod.rs"]
mod vm;

use std::process::ExitCode;

fn main() -> ExitCode {
    // This loads and unloads kernel modules: never on a developer's host.
    if std::env::var_os("KMOD_MONITOR_VM_GUEST").is_none_or(|v| v != "1") {
        eprintln!(
            "vm_guest loads and unloads kernel modules and only runs inside the test VM \
             (its /init sets KMOD_MONITOR_VM_GUEST=1); use `cargo xtask vm-test`"
        );
        return ExitCode::from(2);
    }
    // `cargo xtask bench` boots the same initramfs with this flag.
    let ok = if vm::bench::wanted() {
        vm::bench::run()
    } else {
        vm::scenarios::run_all()
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
