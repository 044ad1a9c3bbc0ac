//! Shared support for the CLI integration tests (`tests/cli/main.rs`), one
//! module per job:
//! - the fake host root and fixtures: [`kmod_monitor::testing`], shared with
//!   the daemon's unit tests and re-exported here;
//! - [`process`]: the real `kmod-monitor` binary, built once, and child
//!   processes that a drop guard always kills;
//! - [`cli`]: one-shot commands and their results;
//! - [`daemon`]: `run` daemons on loopback, polled through /status;
//! - [`report`]: reading /status and `check` JSON;
//! - [`servers`]: the real Prometheus and Alertmanager; `apiserver`: the
//!   real kube-apiserver and etcd (host builds only, not the static guest);
//!   `pki`: certificates for a test's https server (host builds only);
//! - [`stand_ins`]: Alertmanager stand-ins where the real one cannot play
//!   the part: one that never answers, one that checks a bearer token.
//!
//! Every helper panics with a message naming what it was doing (and, for a
//! command or daemon, its arguments and output) rather than returning an
//! error: a test fails by panicking, and the message is the diagnosis.
#[cfg(not(target_env = "musl"))]
pub mod apiserver;
pub mod cli;
pub mod daemon;
#[cfg(not(target_env = "musl"))]
pub mod pki;
pub mod process;
pub mod report;
pub mod servers;
pub mod stand_ins;

use std::path::{Path, PathBuf};

pub use cli::{Finished, check, kmod_monitor, log_records};
pub use daemon::{Daemon, Launch, free_port};
pub use kmod_monitor::testing::{
    DEBIAN_6_1, DEBIAN_6_12, DEV_6_18, FakeHost, fixture, fixture_path, fixture_text,
};
pub use process::{kmod_monitor_bin, raise_own_nofile};
pub use report::{group, group_names, keys, met, module, pretty, state_of};

/// What `check` suggests appending the module name to.
pub const MODULES_LOAD_FILE: &str = "/etc/modules-load.d/kmod-monitor.conf";

/// The workspace root (the directory holding `monitor/` and `tests/`).
#[must_use]
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent", env!("CARGO_MANIFEST_DIR")))
        .to_path_buf()
}

/// An array of arguments of mixed types (`&str`, `&Path`, `String`), as
/// `OsString`s.
#[macro_export]
macro_rules! args {
    ($($arg:expr),* $(,)?) => {
        [$(::std::ffi::OsString::from($arg)),*]
    };
}
