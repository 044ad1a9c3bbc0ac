//! The in-guest VM test driver: runs as the initramfs's only real program
//! (started by its /init), as root, on a Debian kernel in QEMU, and checks
//! the real kmod-monitor binary against real module loads and unloads. Each
//! scenario prints one `VMTEST PASS name` or `VMTEST FAIL name: why` line,
//! so one failure does not hide the rest; the host harness (`cargo xtask
//! vm-test`, which builds this package statically for each guest
//! architecture) reads them.
mod api;
mod bench;
mod compat;
mod daemon;
mod diagnostics;
mod hostile;
mod kmod;
mod loss;
mod more;
mod race;
mod report;
mod scenarios;
mod soak;
mod status;
mod ublk;

use std::process::ExitCode;

/// A scenario's verdict: `Err` carries the reason, on one line or many.
pub type Outcome = Result<(), String>;

/// Returns `Err(format!(...))` from the enclosing function unless `cond`.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

fn main() -> ExitCode {
    // This loads and unloads kernel modules: never on a developer's host.
    if std::env::var_os("KMOD_MONITOR_VM_GUEST").is_none_or(|v| v != "1") {
        eprintln!(
            "vm-guest loads and unloads kernel modules and only runs inside the test VM \
             (its /init sets KMOD_MONITOR_VM_GUEST=1); use `cargo xtask vm-test`"
        );
        return ExitCode::from(2);
    }
    // The scenarios re-run this binary as an unprivileged helper.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(("as-user", task)) = args.split_first().map(|(a, t)| (a.as_str(), t)) {
        return hostile::as_user(task);
    }
    // `cargo xtask bench` boots the same initramfs with this flag.
    let ok = if bench::wanted() {
        bench::run()
    } else {
        scenarios::run_all()
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
