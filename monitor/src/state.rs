//! The vocabulary of module states shared by the tracker, /status,
//! `check`, the metrics and the alerts.
use serde::Serialize;

/// Where one module stands on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleState {
    /// In /proc/modules and its init has succeeded (`initstate` = live).
    Loaded,
    /// Compiled into the kernel (modules.builtin). Satisfies a requirement.
    Builtin,
    /// `module_load` seen (or /proc/modules says Loading); init still running.
    Loading,
    /// An unload is in progress (`delete_module` entered, or /proc/modules
    /// says Unloading).
    Unloading,
    /// Not loaded, but a module file for this kernel exists (modules.dep
    /// lists a .ko, .ko.xz, .ko.zst or .ko.gz).
    Available,
    /// Not in this kernel at all: neither loaded, built in nor available.
    Missing,
}

impl ModuleState {
    /// Every state, in display order (metrics export one series per state).
    pub const ALL: [Self; 6] = [
        Self::Loaded,
        Self::Builtin,
        Self::Loading,
        Self::Unloading,
        Self::Available,
        Self::Missing,
    ];

    /// Whether this state satisfies a requirement for the module.
    ///
    /// `Unloading` still does: the module works until it is freed, and most
    /// unloads that begin are refused (`rmmod` of a module in use returns
    /// EBUSY at once). Counting them as lost would page someone for an
    /// unload that never happened; a real unload is reported when the
    /// module is freed, microseconds later.
    #[must_use]
    pub const fn satisfies(self) -> bool {
        matches!(self, Self::Loaded | Self::Builtin | Self::Unloading)
    }

    /// The lower-case name used in JSON, text output and metric labels.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Loaded => "loaded",
            Self::Builtin => "builtin",
            Self::Loading => "loading",
            Self::Unloading => "unloading",
            Self::Available => "available",
            Self::Missing => "missing",
        }
    }
}

impl std::fmt::Display for ModuleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
