//! `/sys/module/<m>/initstate`: whether a loadable module's init has finished.
//!
//! The kernel writes `live`, `coming` or `going` (`kernel/module/sysfs.c`,
//! `show_initstate`). Only loadable modules have the file: a built-in module
//! with parameters has `/sys/module/<m>/` but no `initstate`.
use serde::Serialize;

use super::{HostError, HostRoot, read_optional_text};
use crate::names::ModuleName;

/// A loaded module's init state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InitState {
    /// `live`: init returned successfully.
    Live,
    /// `coming`: init is running.
    Coming,
    /// `going`: being unloaded, or init failed.
    Going,
}

impl InitState {
    /// Parses the file's content (surrounding whitespace ignored).
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "live" => Some(Self::Live),
            "coming" => Some(Self::Coming),
            "going" => Some(Self::Going),
            _ => None,
        }
    }
}

/// Reads `/sys/module/<module>/initstate` under `root`.
///
/// `Ok(None)` when the file does not exist: the module is not loaded (or is
/// built in).
///
/// # Errors
/// [`HostError`] naming the path if the file cannot be read or holds
/// anything but `live`, `coming` or `going`.
pub fn read_initstate(
    root: &HostRoot,
    module: &ModuleName,
) -> Result<Option<InitState>, HostError> {
    let path = root.sys_module_initstate(module);
    let Some(text) = read_optional_text(&path)? else {
        return Ok(None);
    };
    InitState::parse(&text)
        .map(Some)
        .ok_or_else(|| HostError::Invalid {
            path,
            problem: format!(
                "unknown init state {:?} (expected live, coming or going)",
                text.trim()
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_state_and_absence() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        let m = ModuleName::parse("nvme-tcp").unwrap();
        assert_eq!(read_initstate(&root, &m).unwrap(), None);

        // A built-in module with parameters: directory, no initstate.
        std::fs::create_dir_all(root.sys_module(&m)).unwrap();
        assert_eq!(read_initstate(&root, &m).unwrap(), None);

        for (text, want) in [
            ("live\n", InitState::Live),
            ("coming\n", InitState::Coming),
            ("going\n", InitState::Going),
        ] {
            std::fs::write(root.sys_module_initstate(&m), text).unwrap();
            assert_eq!(read_initstate(&root, &m).unwrap(), Some(want));
        }

        std::fs::write(root.sys_module_initstate(&m), "unformed\n").unwrap();
        let err = read_initstate(&root, &m).unwrap_err().to_string();
        assert!(err.contains("sys/module/nvme_tcp/initstate"), "{err}");
        assert!(err.contains("unknown init state \"unformed\""), "{err}");
    }
}
