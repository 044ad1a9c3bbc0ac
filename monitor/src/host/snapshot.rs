//! The start-up snapshot: every host fact about modules read once, and the
//! state of any module in it ([`Snapshot::classify`]).
//!
//! Only an unreadable kernel release or an unreadable (but present)
//! /proc/modules fails a snapshot. Everything else that is missing or odd
//! (no module directory for the running kernel, no modules.dep, no kernel
//! config, skipped lines) becomes a warning naming the path: a node whose
//! /lib/modules vanished after a kernel upgrade is exactly what the monitor
//! must report, not crash on.
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Serialize;

use super::depmod::{ModuleFile, parse_modules_builtin, parse_modules_dep};
use super::initstate::{InitState, read_initstate};
use super::kconfig::{KernelConfig, builtin_by_config, read_kernel_config};
use super::paths::{MODULES_BUILTIN, MODULES_DEP};
use super::proc_modules::{ProcModule, ProcModuleState, load_proc_modules};
use super::{BadLine, HostError, HostRoot, Parsed, read_kernel_release, read_optional_text};
use crate::names::ModuleName;
use crate::state::ModuleState;

/// A module listed in /proc/modules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LoadedModule {
    /// Live, Loading or Unloading.
    pub state: ProcModuleState,
    /// Taint flags without parentheses, e.g. `OE`; empty when untainted.
    pub taints: String,
}

/// Every host fact about modules, read at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The running kernel's release (`uname -r`).
    pub kernel_release: String,
    /// Whether the kernel can load modules: /proc/modules exists, or the
    /// kernel config says `CONFIG_MODULES=y`.
    pub modules_supported: bool,
    /// Modules in /proc/modules, with their state.
    pub loaded: BTreeMap<ModuleName, LoadedModule>,
    /// Modules compiled into the kernel: modules.builtin, or, when that
    /// cannot be read, the known modules whose Kconfig symbol is `=y`.
    pub builtin: BTreeSet<ModuleName>,
    /// Loadable module files listed in modules.dep. Empty when the kernel
    /// cannot load modules.
    pub available: BTreeMap<ModuleName, ModuleFile>,
    /// The kernel config, if one could be read.
    pub kernel_config: Option<KernelConfig>,
    /// The module directory of the running kernel, if one exists.
    pub modules_dir: Option<PathBuf>,
    /// Everything that was missing or odd, each naming its path.
    pub warnings: Vec<String>,
}

impl Snapshot {
    /// Where `name` stands in this snapshot: Loaded / Loading / Unloading
    /// from /proc/modules, else Builtin, else Available, else Missing.
    #[must_use]
    pub fn classify(&self, name: &ModuleName) -> ModuleState {
        if let Some(loaded) = self.loaded.get(name) {
            match loaded.state {
                ProcModuleState::Live => ModuleState::Loaded,
                ProcModuleState::Loading => ModuleState::Loading,
                ProcModuleState::Unloading => ModuleState::Unloading,
            }
        } else if self.builtin.contains(name) {
            ModuleState::Builtin
        } else if self.available.contains_key(name) {
            ModuleState::Available
        } else {
            ModuleState::Missing
        }
    }
}

/// Collects snapshot warnings.
struct Warnings(Vec<String>);

impl Warnings {
    fn push(&mut self, warning: impl Into<String>) {
        self.0.push(warning.into());
    }

    /// The value of a parse, its skipped lines recorded.
    fn take<T>(&mut self, parsed: Parsed<T>) -> T {
        let Parsed { value, bad_lines } = parsed;
        self.0.extend(bad_lines.iter().map(BadLine::to_string));
        value
    }
}

/// Reads everything the monitor needs to know about modules on the host.
///
/// # Errors
/// [`HostError`] naming the path when the kernel release cannot be read or
/// /proc/modules exists but cannot be read. Anything else missing becomes a
/// warning in [`Snapshot::warnings`].
pub fn take_snapshot(root: &HostRoot) -> Result<Snapshot, HostError> {
    let kernel_release = read_kernel_release(root)?;
    let mut warnings = Warnings(Vec::new());

    let proc_modules = load_proc_modules(root)?.map(|parsed| warnings.take(parsed));
    let kernel_config = match read_kernel_config(root, &kernel_release) {
        Ok(Some(parsed)) => Some(warnings.take(parsed)),
        Ok(None) => {
            let [a, b] = root.kernel_config_candidates(&kernel_release);
            warnings.push(format!(
                "no kernel config: neither {} nor {} exists",
                a.display(),
                b.display()
            ));
            None
        }
        Err(e) => {
            warnings.push(format!("kernel config unusable: {e}"));
            None
        }
    };
    let modules_supported = modules_supported(
        root,
        proc_modules.is_some(),
        kernel_config.as_ref(),
        &mut warnings,
    );

    let loaded = proc_modules
        .map(|modules| loaded_with_initstate(root, modules, &mut warnings))
        .unwrap_or_default();

    let modules_dir = find_modules_dir(root, &kernel_release);
    if modules_dir.is_none() && modules_supported {
        let [a, b] = root.modules_dir_candidates(&kernel_release);
        warnings.push(format!(
            "no module directory for the running kernel {kernel_release}: neither {} nor {} \
             exists, so no module can be loaded (were the modules removed by a kernel \
             upgrade before a reboot?)",
            a.display(),
            b.display()
        ));
    }

    let mut builtin = None;
    let mut available = BTreeMap::new();
    if let Some(dir) = &modules_dir {
        let path = dir.join(MODULES_BUILTIN);
        match read_optional_text(&path) {
            Ok(Some(text)) => builtin = Some(warnings.take(parse_modules_builtin(&text, &path))),
            Ok(None) => warnings.push(format!("{} does not exist", path.display())),
            Err(e) => warnings.push(e.to_string()),
        }
        if modules_supported {
            let path = dir.join(MODULES_DEP);
            match read_optional_text(&path) {
                Ok(Some(text)) => available = warnings.take(parse_modules_dep(&text, &path)),
                Ok(None) => warnings.push(format!(
                    "{} does not exist (depmod has not run?): no module counts as available",
                    path.display()
                )),
                Err(e) => warnings.push(e.to_string()),
            }
        }
    }
    let builtin = builtin.unwrap_or_else(|| match &kernel_config {
        Some(config) => {
            warnings.push(format!(
                "built-in modules taken from {} (known modules only) as modules.builtin is \
                 unavailable",
                config.source().display()
            ));
            builtin_by_config(config).into_iter().collect()
        }
        None => BTreeSet::new(),
    });

    Ok(Snapshot {
        kernel_release,
        modules_supported,
        loaded,
        builtin,
        available,
        kernel_config,
        modules_dir,
        warnings: warnings.0,
    })
}

/// /proc/modules is the evidence; the config only fills in when procfs is
/// missing under the host root. Disagreement is worth a warning either way.
fn modules_supported(
    root: &HostRoot,
    proc_modules_exists: bool,
    config: Option<&KernelConfig>,
    warnings: &mut Warnings,
) -> bool {
    let config_says = config.map(KernelConfig::modules_enabled);
    match (proc_modules_exists, config_says) {
        (false, Some(true)) => warnings.push(format!(
            "{} has CONFIG_MODULES=y but {} does not exist (is /proc mounted under the host \
             root?)",
            config.map_or_else(String::new, |c| c.source().display().to_string()),
            root.proc_modules().display()
        )),
        (true, Some(false)) => warnings.push(format!(
            "{} exists but {} says CONFIG_MODULES is off (config of another kernel?)",
            root.proc_modules().display(),
            config.map_or_else(String::new, |c| c.source().display().to_string())
        )),
        _ => {}
    }
    proc_modules_exists || config_says == Some(true)
}

/// `loaded` from /proc/modules; a Live module whose initstate still says
/// `coming` (read between the two files) counts as Loading.
fn loaded_with_initstate(
    root: &HostRoot,
    modules: Vec<ProcModule>,
    warnings: &mut Warnings,
) -> BTreeMap<ModuleName, LoadedModule> {
    modules
        .into_iter()
        .map(|module| {
            let ProcModule {
                name,
                state,
                taints,
                ..
            } = module;
            let state = match state {
                ProcModuleState::Live => match read_initstate(root, &name) {
                    Ok(Some(InitState::Coming)) => ProcModuleState::Loading,
                    Ok(_) => state,
                    Err(e) => {
                        warnings.push(e.to_string());
                        state
                    }
                },
                ProcModuleState::Loading | ProcModuleState::Unloading => state,
            };
            (name, LoadedModule { state, taints })
        })
        .collect()
}

/// The first module-directory candidate holding modules.dep, else the first
/// that exists at all.
fn find_modules_dir(root: &HostRoot, release: &str) -> Option<PathBuf> {
    let candidates = root.modules_dir_candidates(release);
    candidates
        .iter()
        .find(|dir| dir.join(MODULES_DEP).is_file())
        .or_else(|| candidates.iter().find(|dir| dir.is_dir()))
        .cloned()
}

/// Re-reads only /proc/modules, for the periodic reconcile. Skipped lines are
/// logged as warnings.
///
/// `Ok(None)` when /proc/modules does not exist.
///
/// # Errors
/// [`HostError`] naming the path if /proc/modules exists but cannot be read.
pub fn read_loaded(
    root: &HostRoot,
) -> Result<Option<BTreeMap<ModuleName, LoadedModule>>, HostError> {
    Ok(load_proc_modules(root)?.map(|parsed| {
        parsed
            .log_and_take()
            .into_iter()
            .map(|module| {
                let ProcModule {
                    name,
                    state,
                    taints,
                    ..
                } = module;
                (name, LoadedModule { state, taints })
            })
            .collect()
    }))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::testing::{DEBIAN_6_1 as REL_6_1, DEBIAN_6_12 as REL_6_12, FakeHost, name};

    const PROC_MODULES_6_1: &str = include_str!("fixtures/proc_modules.debian-6.1");
    const PROC_MODULES_6_12: &str = include_str!("fixtures/proc_modules.debian-6.12");
    const BUILTIN_6_1: &str = include_str!("fixtures/modules.builtin.debian-6.1");
    const BUILTIN_6_12: &str = include_str!("fixtures/modules.builtin.debian-6.12");
    const DEP_6_1: &str = include_str!("fixtures/modules.dep.debian-6.1");
    const DEP_6_12: &str = include_str!("fixtures/modules.dep.debian-6.12");
    const CONFIG_6_1: &str = include_str!("fixtures/config.debian-6.1");
    const CONFIG_DEV: &[u8] = include_bytes!("fixtures/config.gz.dev-6.18");

    /// `rel` under the root, as messages show it.
    fn shown(host: &FakeHost, rel: &str) -> String {
        host.join(rel).display().to_string()
    }

    /// A Debian 12 node: /lib/modules, /boot/config.
    fn debian_6_1() -> FakeHost {
        FakeHost::debian_6_1()
    }

    #[test]
    fn classic_layout_debian_6_1() {
        let host = debian_6_1();
        let snap = take_snapshot(&host.root()).unwrap();
        assert_eq!(snap.warnings, Vec::<String>::new());
        assert_eq!(snap.kernel_release, REL_6_1);
        assert!(snap.modules_supported);
        assert_eq!(
            snap.modules_dir.as_deref(),
            Some(Path::new(&shown(&host, &format!("lib/modules/{REL_6_1}"))))
        );
        assert_eq!(snap.loaded.len(), 17);
        assert_eq!(snap.builtin.len(), 186);
        assert_eq!(snap.available.len(), 4023);
        let config = snap.kernel_config.as_ref().unwrap();
        assert!(config.modules_enabled());

        assert_eq!(snap.classify(&name("dm-crypt")), ModuleState::Loaded);
        assert_eq!(snap.classify(&name("nvme_tcp")), ModuleState::Loaded);
        assert_eq!(snap.classify(&name("vfio_pci")), ModuleState::Loaded);
        // Not loaded in that guest, but its file is there.
        assert_eq!(
            snap.classify(&name("uio_pci_generic")),
            ModuleState::Available
        );
        assert_eq!(snap.classify(&name("mq-deadline")), ModuleState::Builtin);
        assert_eq!(snap.classify(&name("no_such_module")), ModuleState::Missing);
    }

    #[test]
    fn merged_usr_layout_debian_6_12() {
        let host = FakeHost::with_release(REL_6_12);
        host.write("proc/modules", PROC_MODULES_6_12)
            .write(
                format!("usr/lib/modules/{REL_6_12}/modules.builtin"),
                BUILTIN_6_12,
            )
            .write(format!("usr/lib/modules/{REL_6_12}/modules.dep"), DEP_6_12);
        let snap = take_snapshot(&host.root()).unwrap();
        assert_eq!(
            snap.modules_dir.as_deref(),
            Some(Path::new(&shown(
                &host,
                &format!("usr/lib/modules/{REL_6_12}")
            )))
        );
        // No config anywhere: one warning naming both places looked at.
        assert!(snap.kernel_config.is_none());
        assert_eq!(snap.warnings.len(), 1, "{:?}", snap.warnings);
        assert!(snap.warnings[0].contains(&shown(&host, "proc/config.gz")));
        assert!(snap.warnings[0].contains(&shown(&host, &format!("boot/config-{REL_6_12}"))));
        assert!(snap.modules_supported);
        assert_eq!(snap.classify(&name("nvme_keyring")), ModuleState::Loaded);
        assert_eq!(
            snap.classify(&name("uio_pci_generic")),
            ModuleState::Available
        );
        assert!(
            snap.available[&name("uio_pci_generic")]
                .path
                .ends_with(".ko.xz")
        );
        assert_eq!(snap.classify(&name("vfio_virqfd")), ModuleState::Missing);
    }

    #[test]
    fn lib_without_modules_dep_falls_through_to_usr_lib() {
        let host = FakeHost::with_release(REL_6_12);
        host.write("proc/modules", PROC_MODULES_6_12)
            .write(format!("lib/modules/{REL_6_12}/leftover"), "")
            .write(
                format!("usr/lib/modules/{REL_6_12}/modules.builtin"),
                BUILTIN_6_12,
            )
            .write(format!("usr/lib/modules/{REL_6_12}/modules.dep"), DEP_6_12);
        let snap = take_snapshot(&host.root()).unwrap();
        assert_eq!(
            snap.modules_dir.as_deref(),
            Some(Path::new(&shown(
                &host,
                &format!("usr/lib/modules/{REL_6_12}")
            )))
        );
        assert_eq!(snap.available.len(), 4230);
    }

    #[test]
    fn modules_off_kernel_is_builtin_or_missing() {
        let host = FakeHost::with_release("6.18.44-fc-v657");
        host.write("proc/config.gz", CONFIG_DEV);
        let snap = take_snapshot(&host.root()).unwrap();
        assert!(!snap.modules_supported);
        assert!(snap.loaded.is_empty());
        assert!(snap.available.is_empty());
        assert_eq!(snap.modules_dir, None);
        // Built-ins come from the config's known symbols only, and say so.
        assert_eq!(snap.builtin, BTreeSet::from([name("fuse")]));
        assert_eq!(snap.warnings.len(), 1, "{:?}", snap.warnings);
        assert!(snap.warnings[0].contains("known modules only"));
        assert!(snap.warnings[0].contains(&shown(&host, "proc/config.gz")));

        assert_eq!(snap.classify(&name("fuse")), ModuleState::Builtin);
        for module in ["dm_crypt", "nvme_tcp", "vfio_pci", "uio_pci_generic", "x"] {
            assert_eq!(
                snap.classify(&name(module)),
                ModuleState::Missing,
                "{module}"
            );
        }
    }

    #[test]
    fn modules_vanished_after_upgrade_is_a_warning() {
        // Running 6.1.0-56, but only a newer kernel's modules are on disk.
        let host = FakeHost::with_release(REL_6_1);
        host.write("proc/modules", PROC_MODULES_6_1)
            .write("lib/modules/6.1.0-57-amd64/modules.dep", DEP_6_1)
            .write(format!("boot/config-{REL_6_1}"), CONFIG_6_1);
        let snap = take_snapshot(&host.root()).unwrap();
        assert!(snap.modules_supported);
        assert_eq!(snap.modules_dir, None);
        assert!(snap.available.is_empty());
        let vanished = snap
            .warnings
            .iter()
            .find(|w| w.contains("no module directory"))
            .expect("a warning about the module directory");
        assert!(vanished.contains(REL_6_1), "{vanished}");
        assert!(vanished.contains(&shown(&host, &format!("lib/modules/{REL_6_1}"))));
        assert!(vanished.contains(&shown(&host, &format!("usr/lib/modules/{REL_6_1}"))));
        // What is loaded is still known; what is not cannot be loaded.
        assert_eq!(snap.classify(&name("dm_crypt")), ModuleState::Loaded);
        assert_eq!(
            snap.classify(&name("uio_pci_generic")),
            ModuleState::Missing
        );
    }

    #[test]
    fn missing_modules_dep_and_builtin_are_warnings() {
        let host = FakeHost::with_release(REL_6_1);
        host.write("proc/modules", PROC_MODULES_6_1)
            .write(format!("lib/modules/{REL_6_1}/kernel/README"), "");
        let snap = take_snapshot(&host.root()).unwrap();
        let dir = shown(&host, &format!("lib/modules/{REL_6_1}"));
        assert!(
            snap.warnings
                .iter()
                .any(|w| w == &format!("{dir}/modules.builtin does not exist")),
            "{:?}",
            snap.warnings
        );
        assert!(
            snap.warnings
                .iter()
                .any(|w| w.starts_with(&format!("{dir}/modules.dep does not exist"))),
            "{:?}",
            snap.warnings
        );
        assert_eq!(
            snap.classify(&name("uio_pci_generic")),
            ModuleState::Missing
        );
    }

    #[test]
    fn loading_and_unloading_from_real_lines() {
        for (text, want) in [
            (
                include_str!("fixtures/proc_modules.slowinit-loading.debian-6.1"),
                ModuleState::Loading,
            ),
            (
                include_str!("fixtures/proc_modules.slowinit-live.debian-6.1"),
                ModuleState::Loaded,
            ),
            (
                include_str!("fixtures/proc_modules.slowinit-unloading.debian-6.1"),
                ModuleState::Unloading,
            ),
        ] {
            let host = debian_6_1();
            host.write("proc/modules", text);
            let snap = take_snapshot(&host.root()).unwrap();
            assert_eq!(snap.classify(&name("slowinit")), want);
            assert_eq!(snap.loaded[&name("slowinit")].taints, "OE");
            assert_eq!(snap.classify(&name("dm_crypt")), ModuleState::Loaded);
        }
    }

    #[test]
    fn live_but_initstate_coming_is_loading() {
        let host = debian_6_1();
        host.write(
            "proc/modules",
            include_str!("fixtures/proc_modules.slowinit-live.debian-6.1"),
        )
        .write("sys/module/slowinit/initstate", "coming\n")
        .write("sys/module/dm_crypt/initstate", "live\n")
        .write("sys/module/dm_mod/initstate", "sideways\n");
        let snap = take_snapshot(&host.root()).unwrap();
        assert_eq!(snap.classify(&name("slowinit")), ModuleState::Loading);
        assert_eq!(snap.classify(&name("dm_crypt")), ModuleState::Loaded);
        // An odd initstate is a warning, and /proc/modules stands.
        assert_eq!(snap.classify(&name("dm_mod")), ModuleState::Loaded);
        assert_eq!(snap.warnings.len(), 1, "{:?}", snap.warnings);
        assert!(snap.warnings[0].contains("sys/module/dm_mod/initstate"));
    }

    #[test]
    fn bad_lines_become_warnings_not_failures() {
        let host = debian_6_1();
        host.write("proc/modules", format!("{PROC_MODULES_6_1}garbage line\n"));
        let snap = take_snapshot(&host.root()).unwrap();
        assert_eq!(snap.loaded.len(), 17);
        assert_eq!(
            snap.warnings,
            [format!(
                "{} line 18: expected 6 or 7 fields, found 2 (line skipped)",
                shown(&host, "proc/modules")
            )]
        );
    }

    #[test]
    fn proc_modules_without_config_modules_is_flagged() {
        let host = FakeHost::with_release("6.18.44");
        host.write("proc/config.gz", CONFIG_DEV).write(
            "proc/modules",
            "dm_crypt 61440 0 - Live 0x0000000000000000\n",
        );
        let snap = take_snapshot(&host.root()).unwrap();
        assert!(snap.modules_supported);
        assert!(
            snap.warnings
                .iter()
                .any(|w| w.contains("says CONFIG_MODULES is off")),
            "{:?}",
            snap.warnings
        );
    }

    #[test]
    fn config_modules_without_proc_modules_is_flagged() {
        let host = FakeHost::with_release(REL_6_1);
        host.write(format!("boot/config-{REL_6_1}"), CONFIG_6_1)
            .write(
                format!("lib/modules/{REL_6_1}/modules.builtin"),
                BUILTIN_6_1,
            )
            .write(format!("lib/modules/{REL_6_1}/modules.dep"), DEP_6_1);
        let snap = take_snapshot(&host.root()).unwrap();
        assert!(snap.modules_supported);
        assert!(snap.loaded.is_empty());
        assert!(
            snap.warnings
                .iter()
                .any(|w| w.contains("is /proc mounted under the host root?")),
            "{:?}",
            snap.warnings
        );
        assert_eq!(snap.classify(&name("dm_crypt")), ModuleState::Available);
    }

    #[test]
    fn fatal_errors_name_the_path() {
        let host = FakeHost::with_release(REL_6_1);
        std::fs::remove_file(host.join("proc/sys/kernel/osrelease")).unwrap();
        let err = take_snapshot(&host.root()).unwrap_err().to_string();
        assert!(
            err.starts_with(&shown(&host, "proc/sys/kernel/osrelease")),
            "{err}"
        );

        // /proc/modules present but unreadable (here: a directory).
        let host = FakeHost::with_release(REL_6_1);
        std::fs::create_dir_all(host.join("proc/modules")).unwrap();
        let err = take_snapshot(&host.root()).unwrap_err().to_string();
        assert!(err.starts_with(&shown(&host, "proc/modules")), "{err}");
    }

    #[test]
    fn read_loaded_rereads_proc_modules_only() {
        let host = debian_6_1();
        let loaded = read_loaded(&host.root()).unwrap().unwrap();
        assert_eq!(loaded.len(), 17);
        assert_eq!(
            loaded[&name("nvme_tcp")],
            LoadedModule {
                state: ProcModuleState::Live,
                taints: String::new()
            }
        );
        host.write(
            "proc/modules",
            include_str!("fixtures/proc_modules.slowinit-unloading.debian-6.1"),
        );
        let loaded = read_loaded(&host.root()).unwrap().unwrap();
        assert_eq!(loaded.len(), 3);
        assert_eq!(loaded[&name("slowinit")].state, ProcModuleState::Unloading);

        let empty = FakeHost::with_release("6.18.44");
        assert_eq!(read_loaded(&empty.root()).unwrap(), None);
    }
}
