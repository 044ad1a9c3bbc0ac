//! The in-guest VM test driver: runs as the initramfs's only real program,
//! as root, on a Debian kernel in QEMU, and checks the real kmod-monitor
//! binary against real module loads and unloads. Each scenario prints one
//! `VMTEST PASS name` or `VMTEST FAIL name: why` line, so one failure does
//! not hide the rest; the host harness (`cargo xtask vm-test`) reads them.
pub mod api;
pub mod bench;
pub mod daemon;
pub mod kmod;
pub mod loss;
pub mod more;
pub mod report;
pub mod scenarios;
pub mod soak;
pub mod status;

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
