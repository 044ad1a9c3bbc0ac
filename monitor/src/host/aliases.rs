//! modules.alias under `/lib/modules/<release>` (written by `depmod`): the
//! names modprobe also accepts for a module, e.g. `alias fs-nfs4 nfs`. The
//! kernel's `request_module("fs-nfs4")` asks by such a name, so a request
//! for a required module may carry an alias rather than the module's own
//! name. Only exact aliases matter here; glob patterns (`pci:v*d*…`) are
//! device matches, never what a request names.
use std::{collections::BTreeMap, path::Path};

use super::{LineIssues, Parsed};
use crate::names::ModuleName;

/// Parses modules.alias read from `path`: exact alias → module, both with
/// `-` written `_` (the module-name rule; the eBPF filter compares names
/// the same way). Glob patterns and aliases that cannot be module-shaped
/// names are skipped silently: they are device matches, not request names.
#[must_use]
pub fn parse_modules_alias(text: &str, path: &Path) -> Parsed<BTreeMap<ModuleName, ModuleName>> {
    let mut issues = LineIssues::new(path);
    let mut aliases = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some("alias"), Some(pattern), Some(module), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            issues.skip(index, format!("{line:?} is not `alias PATTERN MODULE`"));
            continue;
        };
        if pattern.contains(['*', '?', '[']) {
            continue;
        }
        let Some(module) = ModuleName::from_kernel(module) else {
            issues.skip(index, format!("{module:?} is not a module name"));
            continue;
        };
        if let Some(alias) = ModuleName::from_kernel(pattern) {
            aliases.entry(alias).or_insert(module);
        }
    }
    issues.finish(aliases)
}

/// The exact aliases of the running kernel's modules, from
/// `modules_dir/modules.alias`; empty when the file is absent or
/// unreadable (the filter then knows only the modules' own names).
#[must_use]
pub fn read_modules_alias(modules_dir: &Path) -> BTreeMap<ModuleName, ModuleName> {
    let path = modules_dir.join("modules.alias");
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_modules_alias(&text, &path).log_and_take(),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "no modules.alias");
            BTreeMap::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::name;

    #[test]
    fn real_debian_6_1_exact_aliases_only() {
        let text = include_str!("fixtures/modules.alias.debian-6.1");
        let parsed = parse_modules_alias(text, Path::new("modules.alias"));
        assert!(parsed.bad_lines.is_empty(), "{:?}", parsed.bad_lines);
        let aliases = parsed.value;
        for (alias, module) in [
            ("nfs4", "nfs"),
            ("fs-nfs4", "nfs"),
            ("fs-nfs", "nfs"),
            ("fs-xfs", "xfs"),
            ("fs-binfmt_misc", "binfmt_misc"),
            ("char-major-10-236", "dm_mod"),
            ("net-pf-10-proto-132", "sctp"),
            ("net-pf-2-proto-132", "sctp"),
        ] {
            assert_eq!(aliases.get(&name(alias)), Some(&name(module)), "{alias}");
        }
        // Globs and `devname:` paths are not request names.
        assert!(!aliases.values().any(|m| m.as_str() == "intel_uncore"));
        assert!(!aliases.values().any(|m| m.as_str() == "vfio_pci"));
        assert!(!aliases.keys().any(|a| a.as_str().starts_with("devname")));
        assert_eq!(aliases.len(), 8);
    }

    #[test]
    fn malformed_lines_are_reported() {
        let parsed = parse_modules_alias(
            "alias only-two\nalias a b c\nnot an alias line\nalias ok-name dm_crypt\n",
            Path::new("m"),
        );
        assert_eq!(parsed.bad_lines.len(), 3, "{:?}", parsed.bad_lines);
        assert_eq!(parsed.value.get(&name("ok_name")), Some(&name("dm_crypt")));
    }
}
