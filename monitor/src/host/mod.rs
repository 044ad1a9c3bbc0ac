//! Everything kmod-monitor reads from the host, under a [`HostRoot`]:
//! /proc/modules, modules.builtin, modules.dep, the kernel config, module
//! initstate, and the start-up [`Snapshot`] built from them.
//!
//! Layout:
//! - [`paths`] spells every fixed host path, in one place.
//! - [`proc_modules`] parses the loaded-module list.
//! - [`depmod`] parses modules.builtin and modules.dep.
//! - [`kconfig`] reads the kernel config and names a module's Kconfig symbol.
//! - [`initstate`] reads `/sys/module/<m>/initstate`.
//! - [`snapshot`] combines all of the above and classifies a module in it.
//! - [`hugepages`] reads the 2 MiB hugepage pool; [`cpu`] the CPU feature
//!   SPDK needs.
//! - [`persistence`] says whether a module comes back after a reboot, and
//!   which other installed kernels lack it.
//! - [`in_root`] resolves directories inside the root as the host would
//!   (absolute links and `..` stay inside), for the one writer, `check --fix`.
//!
//! # Malformed lines
//! The parsers never panic on kernel data and never fail a whole file for one
//! line they don't understand: such a line is skipped and reported as a
//! [`BadLine`] (path, line number, problem) in [`Parsed::bad_lines`]. For an
//! always-on monitor one odd line (an out-of-tree module, a future kernel's new
//! column) must not blank out every other module at 3 a.m.; the skipped line
//! still shows up, in [`Snapshot::warnings`] or as a `tracing` warning from the
//! `read_*` helpers. Errors ([`HostError`]) are for files that cannot be read
//! at all.
pub mod aliases;
pub mod cpu;
pub mod depmod;
pub mod hugepages;
pub mod in_root;
pub mod initstate;
pub mod kconfig;
pub mod node;
pub mod paths;
pub mod persistence;
pub mod proc_modules;
pub mod snapshot;

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

pub use aliases::{parse_modules_alias, read_modules_alias};
pub use depmod::{ModuleFile, parse_modules_builtin, parse_modules_dep};
pub use initstate::{InitState, read_initstate};
pub use kconfig::{ConfigValue, KernelConfig, config_symbol_for, parse_kernel_config};
pub use paths::{HostRoot, NodePath};
pub use proc_modules::{ProcModule, ProcModuleState, parse_proc_modules, read_proc_modules};
pub use snapshot::{LoadedModule, Snapshot, read_loaded, take_snapshot};

/// The most we read from any one host file. The largest real one,
/// modules.dep, is about 0.5 MiB on Debian; this only stops a runaway read.
pub const MAX_FILE_SIZE: u64 = 64 * 1024 * 1024;

/// A host file could not be read or makes no sense as a whole.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Opening or reading the file failed (a missing file is only an error
    /// where the file is required).
    #[error("{}: {error}", path.display())]
    Read {
        /// The file, under the host root.
        path: PathBuf,
        /// The OS error (in the message, not a separate cause, so the CLI's
        /// error chain names it once).
        error: io::Error,
    },
    /// The file is larger than [`MAX_FILE_SIZE`].
    #[error("{}: larger than {limit} bytes", path.display())]
    TooLarge {
        /// The file, under the host root.
        path: PathBuf,
        /// The limit that was hit.
        limit: u64,
    },
    /// The file could be read but its content is unusable.
    #[error("{}: {problem}", path.display())]
    Invalid {
        /// The file, under the host root.
        path: PathBuf,
        /// What is wrong with it, e.g. `empty` or `unknown value "x"`.
        problem: String,
    },
}

/// One line a parser skipped because it did not understand it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadLine {
    /// The file the line came from.
    pub path: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with the line.
    pub problem: String,
}

impl fmt::Display for BadLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            path,
            line,
            problem,
        } = self;
        write!(
            f,
            "{} line {line}: {problem} (line skipped)",
            path.display()
        )
    }
}

/// A parser's result: what it understood, plus the lines it skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed<T> {
    /// The parsed content.
    pub value: T,
    /// Lines that were skipped, in file order.
    pub bad_lines: Vec<BadLine>,
}

impl<T> Parsed<T> {
    /// Logs each skipped line as a `tracing` warning and returns the value.
    /// For callers that have nowhere to record warnings (periodic re-reads):
    /// a line that stays bad is logged once per process, not once per poll.
    pub fn log_and_take(self) -> T {
        for bad in &self.bad_lines {
            if first_report(bad) {
                tracing::warn!("{bad}");
            }
        }
        self.value
    }
}

/// How many distinct skipped lines [`first_report`] remembers; past that it
/// reports everything again rather than grow.
const REPORTED_LIMIT: usize = 1024;

/// Whether `bad` has not been logged by this process before.
fn first_report(bad: &BadLine) -> bool {
    static REPORTED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut reported = REPORTED.lock().unwrap_or_else(PoisonError::into_inner);
    if reported.len() >= REPORTED_LIMIT {
        reported.clear();
    }
    reported.insert(bad.to_string())
}

/// Collects [`BadLine`]s for one file while a parser walks it.
pub(crate) struct LineIssues<'a> {
    path: &'a Path,
    bad_lines: Vec<BadLine>,
}

impl<'a> LineIssues<'a> {
    pub(crate) const fn new(path: &'a Path) -> Self {
        Self {
            path,
            bad_lines: Vec::new(),
        }
    }

    /// Records that 0-based line `index` was skipped because of `problem`.
    pub(crate) fn skip(&mut self, index: usize, problem: impl Into<String>) {
        self.bad_lines.push(BadLine {
            path: self.path.to_path_buf(),
            line: index + 1,
            problem: problem.into(),
        });
    }

    pub(crate) fn finish<T>(self, value: T) -> Parsed<T> {
        Parsed {
            value,
            bad_lines: self.bad_lines,
        }
    }
}

/// Reads a whole file as bytes, `Ok(None)` if it does not exist.
pub(crate) fn read_optional_bytes(path: &Path) -> Result<Option<Vec<u8>>, HostError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(HostError::Read {
                path: path.to_path_buf(),
                error,
            });
        }
    };
    read_limited(file, path).map(Some)
}

/// Reads at most [`MAX_FILE_SIZE`] bytes from `reader` (the content of
/// `path`).
pub(crate) fn read_limited(reader: impl Read, path: &Path) -> Result<Vec<u8>, HostError> {
    let mut buf = Vec::new();
    reader
        .take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut buf)
        .map_err(|error| HostError::Read {
            path: path.to_path_buf(),
            error,
        })?;
    if buf.len() as u64 > MAX_FILE_SIZE {
        return Err(HostError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_FILE_SIZE,
        });
    }
    Ok(buf)
}

/// Reads a text file, `Ok(None)` if it does not exist. Bytes that are not
/// UTF-8 become U+FFFD, so one odd byte spoils one line, not the file.
pub(crate) fn read_optional_text(path: &Path) -> Result<Option<String>, HostError> {
    Ok(
        read_optional_bytes(path)?.map(|bytes| match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }),
    )
}

/// Reads the running kernel's release from `proc/sys/kernel/osrelease`.
///
/// # Errors
/// [`HostError`] naming the path if it is missing, unreadable or empty:
/// without a release no module tree can be found.
pub fn read_kernel_release(root: &HostRoot) -> Result<String, HostError> {
    let path = root.osrelease();
    let Some(text) = read_optional_text(&path)? else {
        let root_dir = root.root();
        let problem = if root_dir.is_dir() {
            "does not exist (is the host's /proc mounted under the host root?)".to_owned()
        } else {
            format!(
                "does not exist: the host root {} is not a directory",
                root_dir.display()
            )
        };
        return Err(HostError::Invalid { path, problem });
    };
    let release = text.trim();
    if release.is_empty() {
        return Err(HostError::Invalid {
            path,
            problem: "empty".to_owned(),
        });
    }
    if release.contains(['/', '\0']) || release.contains(char::is_whitespace) {
        return Err(HostError::Invalid {
            path,
            problem: format!("{release:?} is not a kernel release"),
        });
    }
    Ok(release.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (rel, content) in files {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        dir
    }

    #[test]
    fn kernel_release_is_trimmed() {
        let dir = root_with(&[("proc/sys/kernel/osrelease", b"6.1.0-37-amd64\n")]);
        let root = HostRoot::new(dir.path());
        assert_eq!(read_kernel_release(&root).unwrap(), "6.1.0-37-amd64");
    }

    #[test]
    fn missing_or_bad_kernel_release_names_the_path() {
        let dir = root_with(&[]);
        let root = HostRoot::new(dir.path());
        let err = read_kernel_release(&root).unwrap_err().to_string();
        assert!(err.contains("proc/sys/kernel/osrelease"), "{err}");
        assert!(err.contains(dir.path().to_str().unwrap()), "{err}");

        let dir = root_with(&[("proc/sys/kernel/osrelease", b"\n")]);
        let err = read_kernel_release(&HostRoot::new(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("proc/sys/kernel/osrelease: empty"), "{err}");

        let dir = root_with(&[("proc/sys/kernel/osrelease", b"../../etc\n")]);
        let err = read_kernel_release(&HostRoot::new(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a kernel release"), "{err}");
    }

    #[test]
    fn unreadable_is_an_error_missing_is_none() {
        let dir = root_with(&[]);
        assert_eq!(read_optional_text(&dir.path().join("nope")).unwrap(), None);
        // A directory cannot be read as a file: an error naming the path.
        let err = read_optional_text(dir.path()).unwrap_err().to_string();
        assert!(err.starts_with(dir.path().to_str().unwrap()), "{err}");
    }

    #[test]
    fn invalid_utf8_spoils_only_its_line() {
        let dir = root_with(&[("f", b"good\nb\xffd\nalso good\n")]);
        let text = read_optional_text(&dir.path().join("f")).unwrap().unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, ["good", "b\u{fffd}d", "also good"]);
    }

    #[test]
    fn a_persistent_bad_line_is_logged_once() {
        let bad = BadLine {
            path: PathBuf::from("/test/first_report"),
            line: 3,
            problem: "odd".to_owned(),
        };
        assert!(first_report(&bad));
        assert!(!first_report(&bad));
        let other = BadLine {
            line: 4,
            ..bad.clone()
        };
        assert!(first_report(&other));
        assert!(!first_report(&bad));
    }

    #[test]
    fn bad_line_display_names_file_and_line() {
        let bad = BadLine {
            path: PathBuf::from("/host/proc/modules"),
            line: 7,
            problem: "expected 6 or 7 fields, found 3".to_owned(),
        };
        assert_eq!(
            bad.to_string(),
            "/host/proc/modules line 7: expected 6 or 7 fields, found 3 (line skipped)"
        );
    }
}
