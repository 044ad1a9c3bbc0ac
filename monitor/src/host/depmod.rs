//! modules.builtin and modules.dep under `/lib/modules/<release>`: which
//! modules are compiled in, and which exist as loadable files.
//!
//! - modules.builtin (written by the kernel build, installed by the package):
//!   one path per line, always `.ko` even though no file exists, e.g.
//!   `kernel/drivers/md/dm-mod.ko`.
//! - modules.dep (written by `depmod`): `path: dep-path dep-path ...`, paths
//!   relative to the module directory, e.g.
//!   `kernel/drivers/nvme/host/nvme-tcp.ko.xz: kernel/drivers/nvme/host/nvme-fabrics.ko.xz ...`.
//!   Since Debian 6.12 the files are `.ko.xz`; other distributions use
//!   `.ko.zst` or `.ko.gz`. All four endings are accepted.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use super::{LineIssues, Parsed};
use crate::names::ModuleName;

/// A loadable module file listed in modules.dep.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModuleFile {
    /// Path as written in modules.dep, relative to the module directory (or
    /// absolute, for modules depmod found outside it).
    pub path: Box<str>,
    /// Modules this one needs loaded first, as listed by depmod (the whole
    /// closure, nearest first).
    pub deps: Box<[ModuleName]>,
}

/// Parses modules.builtin read from `path` (used only to label skipped
/// lines).
#[must_use]
pub fn parse_modules_builtin(text: &str, path: &Path) -> Parsed<BTreeSet<ModuleName>> {
    let mut issues = LineIssues::new(path);
    let mut builtin = BTreeSet::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match ModuleName::from_module_path(line) {
            Some(name) => {
                builtin.insert(name);
            }
            None => issues.skip(index, format!("{line:?} is not a module path")),
        }
    }
    issues.finish(builtin)
}

/// Parses modules.dep read from `path` (used only to label skipped lines).
///
/// A dependency path that is not a module path is dropped with a warning but
/// keeps its module; a module listed twice keeps its first entry, as modprobe
/// does.
#[must_use]
pub fn parse_modules_dep(text: &str, path: &Path) -> Parsed<BTreeMap<ModuleName, ModuleFile>> {
    let mut issues = LineIssues::new(path);
    let mut modules: BTreeMap<ModuleName, ModuleFile> = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let Some((module_path, deps_field)) = line.split_once(':') else {
            issues.skip(index, "no ':' after the module path");
            continue;
        };
        let module_path = module_path.trim();
        let Some(name) = ModuleName::from_module_path(module_path) else {
            issues.skip(index, format!("{module_path:?} is not a module path"));
            continue;
        };
        if let Some(first) = modules.get(&name) {
            issues.skip(
                index,
                format!(
                    "module {name} listed again (keeping the first entry, {:?})",
                    first.path
                ),
            );
            continue;
        }
        let mut deps = Vec::new();
        for dep in deps_field.split_ascii_whitespace() {
            match ModuleName::from_module_path(dep) {
                Some(dep) => deps.push(dep),
                None => issues.skip(
                    index,
                    format!("dependency {dep:?} of {name} is not a module path (dropped)"),
                ),
            }
        }
        modules.insert(
            name,
            // Exactly sized: a snapshot holds one per module of the kernel
            // (about 4,000) for the daemon's life.
            ModuleFile {
                path: module_path.into(),
                deps: deps.into_boxed_slice(),
            },
        );
    }
    issues.finish(modules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::name;

    #[test]
    fn builtin_lines() {
        let parsed = parse_modules_builtin(
            "kernel/drivers/md/dm-mod.ko\n\nkernel/mm/zswap.ko\nkernel/fs/oops\n",
            Path::new("/lib/modules/r/modules.builtin"),
        );
        assert_eq!(
            parsed.value,
            BTreeSet::from([name("dm_mod"), name("zswap")])
        );
        assert_eq!(parsed.bad_lines.len(), 1);
        assert_eq!(parsed.bad_lines[0].line, 4);
        assert_eq!(
            parsed.bad_lines[0].to_string(),
            "/lib/modules/r/modules.builtin line 4: \"kernel/fs/oops\" is not a module path (line skipped)"
        );
    }

    #[test]
    fn dep_lines_in_every_compression() {
        let parsed = parse_modules_dep(
            "kernel/drivers/md/dm-mod.ko:\n\
             kernel/drivers/md/dm-crypt.ko.zst: kernel/drivers/md/dm-mod.ko\n\
             kernel/drivers/nvme/host/nvme-tcp.ko.xz: kernel/drivers/nvme/host/nvme-fabrics.ko.xz kernel/drivers/nvme/host/nvme-core.ko.xz\n\
             kernel/drivers/uio/uio_pci_generic.ko.gz: kernel/drivers/uio/uio.ko.gz\n",
            Path::new("modules.dep"),
        );
        assert_eq!(parsed.bad_lines, []);
        let m = &parsed.value;
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[&name("nvme_tcp")],
            ModuleFile {
                path: "kernel/drivers/nvme/host/nvme-tcp.ko.xz".into(),
                deps: vec![name("nvme_fabrics"), name("nvme_core")].into(),
            }
        );
        assert_eq!(m[&name("dm_mod")].deps[..], []);
        assert_eq!(m[&name("dm_crypt")].deps[..], [name("dm_mod")]);
        assert_eq!(m[&name("uio_pci_generic")].deps[..], [name("uio")]);
    }

    /// Modules Longhorn needs; Debian builds every one as a loadable module.
    const LONGHORN: [&str; 8] = [
        "dm_crypt",
        "dm_mod",
        "nvme_tcp",
        "nvme_fabrics",
        "nvme_core",
        "vfio_pci",
        "vfio",
        "uio_pci_generic",
    ];

    #[test]
    fn real_debian_builtin_lists() {
        for (text, count) in [
            (include_str!("fixtures/modules.builtin.debian-6.1"), 186),
            (include_str!("fixtures/modules.builtin.debian-6.12"), 191),
        ] {
            let parsed = parse_modules_builtin(text, Path::new("modules.builtin"));
            assert_eq!(parsed.bad_lines, []);
            assert_eq!(parsed.value.len(), count);
            assert!(parsed.value.contains(&name("crypto_algapi")));
            assert!(parsed.value.contains(&name("mq-deadline")));
            for module in LONGHORN {
                assert!(!parsed.value.contains(&name(module)), "{module}");
            }
        }
    }

    #[test]
    fn real_debian_6_1_modules_dep() {
        let parsed = parse_modules_dep(
            include_str!("fixtures/modules.dep.debian-6.1"),
            Path::new("modules.dep"),
        );
        assert_eq!(parsed.bad_lines, []);
        let m = &parsed.value;
        assert_eq!(m.len(), 4023);
        for module in LONGHORN {
            assert!(m[&name(module)].path.ends_with(".ko"), "{module}");
        }
        assert_eq!(
            m[&name("nvme_tcp")].deps[..],
            [
                "nvme_fabrics",
                "nvme_core",
                "t10_pi",
                "crc64_rocksoft",
                "crc_t10dif",
                "crc64",
                "crct10dif_common"
            ]
            .map(name)
        );
        assert_eq!(
            m[&name("dm_crypt")].path.as_ref(),
            "kernel/drivers/md/dm-crypt.ko"
        );
        assert_eq!(m[&name("dm_crypt")].deps[..], [name("dm_mod")]);
        assert_eq!(
            m[&name("vfio_pci")].deps[..],
            ["vfio_pci_core", "vfio_virqfd", "vfio", "irqbypass"].map(name)
        );
    }

    #[test]
    fn real_debian_6_12_modules_dep_is_xz() {
        let parsed = parse_modules_dep(
            include_str!("fixtures/modules.dep.debian-6.12"),
            Path::new("modules.dep"),
        );
        assert_eq!(parsed.bad_lines, []);
        let m = &parsed.value;
        assert_eq!(m.len(), 4230);
        assert!(m.values().all(|f| f.path.ends_with(".ko.xz")));
        for module in LONGHORN {
            assert!(m.contains_key(&name(module)), "{module}");
        }
        assert_eq!(
            m[&name("nvme_tcp")].deps[..],
            ["nvme_fabrics", "nvme_keyring", "nvme_core", "nvme_auth"].map(name)
        );
        assert_eq!(m[&name("uio_pci_generic")].deps[..], [name("uio")]);
    }

    #[test]
    fn dep_malformed_lines() {
        let parsed = parse_modules_dep(
            "kernel/a.ko: kernel/b.ko\n\
             no colon here\n\
             kernel/c.txt: kernel/b.ko\n\
             kernel/d.ko: kernel/b.ko kernel/weird.o\n\
             updates/a.ko: kernel/b.ko\n",
            Path::new("/x/modules.dep"),
        );
        let got: Vec<(usize, &str)> = parsed
            .bad_lines
            .iter()
            .map(|b| (b.line, b.problem.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (2, "no ':' after the module path"),
                (3, "\"kernel/c.txt\" is not a module path"),
                (
                    4,
                    "dependency \"kernel/weird.o\" of d is not a module path (dropped)"
                ),
                (
                    5,
                    "module a listed again (keeping the first entry, \"kernel/a.ko\")"
                ),
            ]
        );
        // d is kept with the dependency that made sense.
        assert_eq!(parsed.value[&name("d")].deps[..], [name("b")]);
        assert_eq!(parsed.value[&name("a")].path.as_ref(), "kernel/a.ko");
        assert_eq!(parsed.value.len(), 2);
    }
}
