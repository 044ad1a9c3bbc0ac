//! Remedies: for a module that does not satisfy its requirement, what to
//! run now, what makes it survive a reboot, and what the kernel lacks when
//! nothing can load it; and the boot-time facts (modules-load.d,
//! modprobe.d, the command line, other installed kernels) that decide
//! whether a module will be there after a reboot. `check` prints these,
//! the alerts carry them, `check --fix` applies them.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    host::{
        ConfigValue, HostRoot, Snapshot, config_symbol_for,
        persistence::{self, OtherKernel, Persistence, PersistenceConfig},
    },
    names::ModuleName,
    requirements::GroupSpec,
    state::ModuleState,
};

/// Where `check` suggests persisting module loads.
pub const MODULES_LOAD_FILE: &str = "/etc/modules-load.d/kmod-monitor.conf";

/// How to fix one module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Remedy {
    /// Command that fixes it now, where one exists.
    pub command: Option<String>,
    /// Line for `persist_file` that makes the fix survive a reboot.
    pub persist_line: Option<String>,
    pub persist_file: Option<&'static str>,
    /// The kernel option a missing module needs.
    pub kernel_config: Option<String>,
    /// One sentence a person can act on.
    pub explanation: String,
}

/// What decides the node's state after a reboot or a kernel upgrade, read
/// once from the host.
#[derive(Clone, Debug, Default)]
pub struct BootFacts {
    /// For every required module.
    pub persistence: BTreeMap<ModuleName, Persistence>,
    pub other_kernels: Vec<OtherKernel>,
    pub warnings: Vec<String>,
}

impl BootFacts {
    /// The required modules something blocks from loading (blacklisted,
    /// `install … /bin/false`, `module_blacklist=`): an `available` group
    /// cannot count on them.
    #[must_use]
    pub fn blocked(&self) -> std::collections::BTreeSet<ModuleName> {
        self.persistence
            .iter()
            .filter(|(_, p)| !p.blocked_by.is_empty())
            .map(|(m, _)| m.clone())
            .collect()
    }
}

/// Reads the boot-time configuration (modules-load.d, /etc/modules, the
/// kernel command line, modprobe.d) and the other installed kernels, for
/// the modules `groups` require.
#[must_use]
pub fn boot_facts(host: &HostRoot, snapshot: &Snapshot, groups: &[GroupSpec]) -> BootFacts {
    let config: PersistenceConfig = persistence::read_persistence_config(host);
    let mut required: Vec<ModuleName> = groups
        .iter()
        .flat_map(|g| g.modules.iter().cloned())
        .collect();
    required.sort();
    required.dedup();
    BootFacts {
        persistence: required
            .iter()
            .map(|m| (m.clone(), persistence::persistence(&config, snapshot, m)))
            .collect(),
        other_kernels: persistence::other_kernels(host, &snapshot.kernel_release, &required),
        warnings: config.warnings().to_vec(),
    }
}

/// The fix for one module in `state`.
#[must_use]
pub fn remedy(snapshot: &Snapshot, name: &ModuleName, state: ModuleState) -> Remedy {
    let persist = |r: Remedy| Remedy {
        persist_line: Some(name.to_string()),
        persist_file: Some(MODULES_LOAD_FILE),
        ..r
    };
    match state {
        ModuleState::Available => persist(Remedy {
            command: Some(format!("modprobe {name}")),
            persist_line: None,
            persist_file: None,
            kernel_config: None,
            explanation: format!(
                "{name} is available for kernel {} but not loaded",
                snapshot.kernel_release
            ),
        }),
        ModuleState::Loading | ModuleState::Unloading => Remedy {
            command: None,
            persist_line: None,
            persist_file: None,
            kernel_config: None,
            explanation: format!("{name} is {state} right now; run the check again in a moment"),
        },
        ModuleState::Missing => missing(snapshot, name),
        ModuleState::Loaded | ModuleState::Builtin => Remedy {
            command: None,
            persist_line: None,
            persist_file: None,
            kernel_config: None,
            explanation: format!("{name} is {state}"),
        },
    }
}

fn missing(snapshot: &Snapshot, name: &ModuleName) -> Remedy {
    let symbol = config_symbol_for(name);
    let rel = &snapshot.kernel_release;
    let modules_dir = snapshot.modules_dir.as_ref().map_or_else(
        || format!("/lib/modules/{rel} (absent)"),
        |d| d.display().to_string(),
    );
    let setting = snapshot.kernel_config.as_ref().and_then(|c| c.get(&symbol));
    let explanation = match (&setting, snapshot.modules_supported) {
        (_, false) => format!(
            "kernel {rel} cannot load modules (CONFIG_MODULES is off) and {name} is not built in; boot a kernel with {symbol}=y"
        ),
        (Some(ConfigValue::NotSet), true) => format!(
            "{name} is not part of kernel {rel}: {symbol} is not set; use a kernel built with {symbol}=m"
        ),
        (Some(ConfigValue::Module), true) => format!(
            "kernel {rel} was built with {symbol}=m but no {name} module file is installed under {modules_dir}; install the kernel's modules package (on Ubuntu: linux-modules-extra-{rel})"
        ),
        (Some(ConfigValue::Builtin), true) => format!(
            "kernel {rel} has {symbol}=y but {name} is not listed in {modules_dir}/modules.builtin"
        ),
        (Some(ConfigValue::Value(v)), true) => format!(
            "{name} is not part of kernel {rel} ({symbol}={v}); use a kernel built with {symbol}=m"
        ),
        (None, true) => format!(
            "{name} is not in kernel {rel} (no module file, not built in; the kernel config is unreadable or lacks {symbol}); install the kernel's modules package or use a kernel with {symbol}=m"
        ),
    };
    Remedy {
        command: None,
        persist_line: None,
        persist_file: None,
        kernel_config: Some(symbol),
        explanation,
    }
}
