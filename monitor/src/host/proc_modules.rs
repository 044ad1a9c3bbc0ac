//! `/proc/modules`: the kernel's list of loaded modules and their state.
//!
//! Format (`kernel/module/procfs.c`, `m_show`, unchanged in shape since 2.6):
//! `name size refcount used_by state address [taints]`, e.g.
//! `nvme_core 212992 3 nvme_tcp,nvme_fabrics, Live 0x0000000000000000` or
//! `foo 16384 0 - Live 0xffffffffc0a2e000 (OE)`.
//! - `refcount` is `-` without `CONFIG_MODULE_UNLOAD`, and can be `-1` while
//!   a module is being unloaded.
//! - `used_by` lists the modules that use this one, each followed by `,`,
//!   plus the pseudo-entry `[permanent],` for a module without an exit
//!   function; `-` when empty.
//! - `address` is zero unless the reader may see kernel addresses.
//! - `taints` appears only for a tainted module; the kernel appends `+` while
//!   it is Loading and `-` while Unloading, e.g. `(OE+)`.
//!
//! Modules that are compiled in never appear here.
use std::path::Path;

use serde::Serialize;

use super::{HostError, HostRoot, LineIssues, Parsed, read_optional_text};
use crate::names::ModuleName;

/// The state column of /proc/modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcModuleState {
    /// `Live`: init has returned successfully.
    Live,
    /// `Loading`: `MODULE_STATE_COMING`, init is running.
    Loading,
    /// `Unloading`: `MODULE_STATE_GOING`, being removed (or init failed).
    Unloading,
}

impl ProcModuleState {
    fn parse(field: &str) -> Option<Self> {
        match field {
            "Live" => Some(Self::Live),
            "Loading" => Some(Self::Loading),
            "Unloading" => Some(Self::Unloading),
            _ => None,
        }
    }
}

/// One line of /proc/modules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcModule {
    /// The module's name.
    pub name: ModuleName,
    /// Memory used by the module, in bytes.
    pub size: u64,
    /// Reference count; `None` without `CONFIG_MODULE_UNLOAD` (`-`), or when
    /// the kernel prints a negative count (a module being unloaded).
    pub refcount: Option<u32>,
    /// Modules that use (depend on) this one, in kernel order. Note the
    /// direction: `nvme_core`'s line lists `nvme_tcp`, not the reverse.
    pub used_by: Vec<ModuleName>,
    /// `[permanent]` was listed: the module has no exit function and can never
    /// be unloaded.
    pub permanent: bool,
    /// Live, Loading or Unloading.
    pub state: ProcModuleState,
    /// Taint flags without parentheses and without the kernel's `+`/`-`
    /// state marks, e.g. `OE`; empty when untainted.
    pub taints: String,
}

/// Parses the text of /proc/modules read from `path` (used only to label
/// skipped lines).
#[must_use]
pub fn parse_proc_modules(text: &str, path: &Path) -> Parsed<Vec<ProcModule>> {
    let mut issues = LineIssues::new(path);
    let mut modules = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(module) => modules.push(module),
            Err(problem) => issues.skip(index, problem),
        }
    }
    issues.finish(modules)
}

fn parse_line(line: &str) -> Result<ProcModule, String> {
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    let [name, size, refcount, used_by, state, _address, rest @ ..] = fields.as_slice() else {
        return Err(format!("expected 6 or 7 fields, found {}", fields.len()));
    };
    let taints = match rest {
        [] => String::new(),
        [taints] => parse_taints(taints)?,
        _ => return Err(format!("expected 6 or 7 fields, found {}", fields.len())),
    };
    let name =
        ModuleName::from_kernel(name).ok_or_else(|| format!("{name:?} is not a module name"))?;
    let size = size
        .parse()
        .map_err(|_| format!("size {size:?} is not a number"))?;
    let refcount = parse_refcount(refcount)?;
    let (used_by, permanent) = parse_used_by(used_by)?;
    let state = ProcModuleState::parse(state)
        .ok_or_else(|| format!("state {state:?} is not Live, Loading or Unloading"))?;
    Ok(ProcModule {
        name,
        size,
        refcount,
        used_by,
        permanent,
        state,
        taints,
    })
}

fn parse_refcount(field: &str) -> Result<Option<u32>, String> {
    if field == "-" {
        return Ok(None);
    }
    match field.parse::<i64>() {
        Ok(n) => Ok(u32::try_from(n).ok()),
        Err(_) => Err(format!("refcount {field:?} is not a number")),
    }
}

fn parse_used_by(field: &str) -> Result<(Vec<ModuleName>, bool), String> {
    let mut used_by = Vec::new();
    let mut permanent = false;
    if field == "-" {
        return Ok((used_by, permanent));
    }
    for entry in field.split(',').filter(|e| !e.is_empty()) {
        if entry == "[permanent]" {
            permanent = true;
        } else {
            used_by.push(
                ModuleName::from_kernel(entry)
                    .ok_or_else(|| format!("user {entry:?} is not a module name"))?,
            );
        }
    }
    Ok((used_by, permanent))
}

fn parse_taints(field: &str) -> Result<String, String> {
    let inner = field
        .strip_prefix('(')
        .and_then(|f| f.strip_suffix(')'))
        .ok_or_else(|| format!("taints {field:?} are not in parentheses"))?;
    Ok(inner.chars().filter(|c| !matches!(c, '+' | '-')).collect())
}

/// Reads and parses /proc/modules under `root`, keeping skipped lines.
///
/// `Ok(None)` when the file does not exist: a kernel built without
/// `CONFIG_MODULES`, or a host root without /proc mounted.
///
/// # Errors
/// [`HostError`] naming the path if the file exists but cannot be read.
pub fn load_proc_modules(root: &HostRoot) -> Result<Option<Parsed<Vec<ProcModule>>>, HostError> {
    let path = root.proc_modules();
    Ok(read_optional_text(&path)?.map(|text| parse_proc_modules(&text, &path)))
}

/// Like [`load_proc_modules`], but logs skipped lines as warnings.
///
/// # Errors
/// [`HostError`] naming the path if the file exists but cannot be read.
pub fn read_proc_modules(root: &HostRoot) -> Result<Option<Vec<ProcModule>>, HostError> {
    Ok(load_proc_modules(root)?.map(Parsed::log_and_take))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::name;

    fn parse(text: &str) -> Parsed<Vec<ProcModule>> {
        parse_proc_modules(text, Path::new("/host/proc/modules"))
    }

    #[test]
    fn plain_and_tainted_lines() {
        let parsed = parse(
            "dm_crypt 61440 0 - Live 0x0000000000000000\n\
             nvme_tcp 49152 0 - Live 0x0000000000000000 (E)\n",
        );
        assert_eq!(parsed.bad_lines, []);
        assert_eq!(
            parsed.value,
            [
                ProcModule {
                    name: name("dm_crypt"),
                    size: 61440,
                    refcount: Some(0),
                    used_by: vec![],
                    permanent: false,
                    state: ProcModuleState::Live,
                    taints: String::new(),
                },
                ProcModule {
                    name: name("nvme_tcp"),
                    size: 49152,
                    refcount: Some(0),
                    used_by: vec![],
                    permanent: false,
                    state: ProcModuleState::Live,
                    taints: "E".to_owned(),
                },
            ]
        );
    }

    #[test]
    fn used_by_column_permanent_and_state_marks() {
        let parsed = parse(
            "nvme_core 212992 3 nvme_tcp,nvme_fabrics, Live 0x0000000000000000\n\
             crc32_pclmul 16384 0 [permanent], Live 0x0000000000000000\n\
             foo 16384 1 bar,[permanent], Loading 0xffffffffc0a2e000 (OE+)\n\
             dying 16384 -1 - Unloading 0x0000000000000000 (O-)\n\
             nounload 16384 - - Live 0x0000000000000000\n",
        );
        assert_eq!(parsed.bad_lines, []);
        let m = &parsed.value;
        assert_eq!(m[0].used_by, [name("nvme_tcp"), name("nvme_fabrics")]);
        assert_eq!(m[0].refcount, Some(3));
        assert!(!m[0].permanent);
        assert!(m[1].permanent);
        assert_eq!(m[1].used_by, []);
        assert_eq!(m[2].state, ProcModuleState::Loading);
        assert_eq!(m[2].taints, "OE");
        assert_eq!(m[2].used_by, [name("bar")]);
        assert!(m[2].permanent);
        assert_eq!(m[3].state, ProcModuleState::Unloading);
        assert_eq!(m[3].refcount, None);
        assert_eq!(m[3].taints, "O");
        assert_eq!(m[4].refcount, None);
    }

    #[test]
    fn malformed_lines_are_skipped_with_file_and_line() {
        let parsed = parse(
            "dm_crypt 61440 0 - Live 0x0000000000000000\n\
             \n\
             short 1 2\n\
             bad.name 1 0 - Live 0x0\n\
             x 12k 0 - Live 0x0\n\
             x 1 zero - Live 0x0\n\
             x 1 0 - Dead 0x0\n\
             x 1 0 a,b.c, Live 0x0\n\
             x 1 0 - Live 0x0 OE\n\
             x 1 0 - Live 0x0 (OE) extra\n\
             nvme_tcp 49152 0 - Live 0x0000000000000000 (E)\n",
        );
        let names: Vec<&str> = parsed.value.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["dm_crypt", "nvme_tcp"]);
        let got: Vec<(usize, &str)> = parsed
            .bad_lines
            .iter()
            .map(|b| (b.line, b.problem.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (3, "expected 6 or 7 fields, found 3"),
                (4, "\"bad.name\" is not a module name"),
                (5, "size \"12k\" is not a number"),
                (6, "refcount \"zero\" is not a number"),
                (7, "state \"Dead\" is not Live, Loading or Unloading"),
                (8, "user \"b.c\" is not a module name"),
                (9, "taints \"OE\" are not in parentheses"),
                (10, "expected 6 or 7 fields, found 8"),
            ]
        );
        assert_eq!(
            parsed.bad_lines[0].to_string(),
            "/host/proc/modules line 3: expected 6 or 7 fields, found 3 (line skipped)"
        );
    }

    #[test]
    fn real_debian_6_1_guest() {
        let parsed = parse(include_str!("fixtures/proc_modules.debian-6.1"));
        assert_eq!(parsed.bad_lines, []);
        let m = &parsed.value;
        assert_eq!(m.len(), 17);
        assert!(m.iter().all(|m| m.state == ProcModuleState::Live));
        assert!(m.iter().all(|m| m.taints.is_empty() && !m.permanent));
        let nvme_core = m.iter().find(|m| m.name == name("nvme-core")).unwrap();
        assert_eq!(nvme_core.size, 163_840);
        assert_eq!(nvme_core.refcount, Some(2));
        assert_eq!(nvme_core.used_by, [name("nvme_tcp"), name("nvme_fabrics")]);
        let crct10dif_common = m
            .iter()
            .find(|m| m.name == name("crct10dif_common"))
            .unwrap();
        assert_eq!(crct10dif_common.used_by.len(), 3);
        assert_eq!(m.last().unwrap().name, name("dm_mod"));
    }

    #[test]
    fn real_debian_6_12_guest() {
        let parsed = parse(include_str!("fixtures/proc_modules.debian-6.12"));
        assert_eq!(parsed.bad_lines, []);
        let names: Vec<&str> = parsed.value.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "vfio_pci",
                "vfio_pci_core",
                "vfio",
                "irqbypass",
                "nvme_tcp",
                "nvme_fabrics",
                "nvme_keyring",
                "nvme_core",
                "nvme_auth",
                "dm_crypt",
                "dm_mod",
            ]
        );
    }

    #[test]
    fn real_module_in_init_and_exit() {
        let slowinit = |text: &str| -> ProcModule {
            let parsed = parse(text);
            assert_eq!(parsed.bad_lines, []);
            assert_eq!(parsed.value.len(), 3);
            parsed.value[0].clone()
        };
        let loading = slowinit(include_str!(
            "fixtures/proc_modules.slowinit-loading.debian-6.1"
        ));
        assert_eq!(loading.name, name("slowinit"));
        assert_eq!(loading.state, ProcModuleState::Loading);
        assert_eq!(loading.taints, "OE");
        assert_eq!(loading.refcount, Some(1));
        assert_eq!(loading.size, 28_672);

        let live = slowinit(include_str!(
            "fixtures/proc_modules.slowinit-live.debian-6.1"
        ));
        assert_eq!(live.state, ProcModuleState::Live);
        assert_eq!(live.taints, "OE");
        assert_eq!(live.refcount, Some(0));

        let unloading = slowinit(include_str!(
            "fixtures/proc_modules.slowinit-unloading.debian-6.1"
        ));
        assert_eq!(unloading.state, ProcModuleState::Unloading);
        assert_eq!(unloading.taints, "OE");
        // The kernel prints -1 during exit.
        assert_eq!(unloading.refcount, None);
    }

    #[test]
    fn real_permanent_module() {
        let parsed = parse(include_str!(
            "fixtures/proc_modules.noexit-permanent.debian-6.1"
        ));
        assert_eq!(parsed.bad_lines, []);
        let noexit = &parsed.value[0];
        assert_eq!(noexit.name, name("noexit"));
        assert!(noexit.permanent);
        assert_eq!(noexit.used_by, []);
        assert_eq!(noexit.taints, "OE");
        assert!(!parsed.value[1].permanent);
    }

    #[test]
    fn missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_proc_modules(&HostRoot::new(dir.path())).unwrap(), None);
    }
}
