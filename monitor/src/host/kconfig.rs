//! The running kernel's build configuration (`/proc/config.gz` or
//! `/boot/config-<release>`), and which Kconfig symbol provides a module.
//!
//! Format (written by `scripts/kconfig/confdata.c`):
//! `CONFIG_DM_CRYPT=m`, `CONFIG_MODULES=y`, `CONFIG_LOCALVERSION=""`,
//! `CONFIG_HZ=250`, `# CONFIG_NVME_TCP is not set`, other `#` comments and
//! blank lines.
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use compact_str::CompactString;

use super::{HostError, HostRoot, LineIssues, Parsed, read_limited, read_optional_bytes};
use crate::names::ModuleName;

/// The value of one Kconfig symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigValue {
    /// `=y`: compiled into the kernel.
    Builtin,
    /// `=m`: built as a loadable module.
    Module,
    /// `# CONFIG_X is not set` (or the rare `=n`).
    NotSet,
    /// Any other value: a string (unquoted, unescaped) or a number as written.
    Value(String),
}

/// A parsed kernel config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    source: PathBuf,
    /// By symbol without its `CONFIG_` prefix: almost every one then fits
    /// inline, and a config has about 8,000 of them, kept for the daemon's
    /// life.
    values: BTreeMap<CompactString, ConfigValue>,
}

impl KernelConfig {
    /// The value of `symbol`, given with or without its `CONFIG_` prefix.
    /// `None` when the config does not mention it at all (its dependencies
    /// are off, or it does not exist in this kernel).
    #[must_use]
    pub fn get(&self, symbol: &str) -> Option<ConfigValue> {
        let bare = symbol.strip_prefix("CONFIG_").unwrap_or(symbol);
        self.values.get(bare).cloned()
    }

    /// Whether the kernel can load modules at all (`CONFIG_MODULES=y`).
    #[must_use]
    pub fn modules_enabled(&self) -> bool {
        self.get("CONFIG_MODULES") == Some(ConfigValue::Builtin)
    }

    /// The file this config was read from.
    #[must_use]
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// How many symbols the config mentions.
    #[must_use]
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the config mentions no symbol at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Parses a plain-text kernel config read from `path` (recorded as the
/// config's source and used to label skipped lines).
#[must_use]
pub fn parse_kernel_config(text: &str, path: &Path) -> Parsed<KernelConfig> {
    let mut issues = LineIssues::new(path);
    let mut values = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            if let Some(symbol) = comment
                .trim_start()
                .strip_suffix(" is not set")
                .filter(|s| is_symbol(s))
            {
                values.insert(bare(symbol), ConfigValue::NotSet);
            }
            continue;
        }
        match parse_assignment(line) {
            Ok((symbol, value)) => {
                values.insert(bare(symbol), value);
            }
            Err(problem) => issues.skip(index, problem),
        }
    }
    issues.finish(KernelConfig {
        source: path.to_path_buf(),
        values,
    })
}

/// A checked symbol's key: the name after `CONFIG_`.
fn bare(symbol: &str) -> CompactString {
    CompactString::new(symbol.strip_prefix("CONFIG_").unwrap_or(symbol))
}

/// `CONFIG_` followed by at least one of `[A-Za-z0-9_]`.
fn is_symbol(s: &str) -> bool {
    s.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

fn parse_assignment(line: &str) -> Result<(&str, ConfigValue), String> {
    let Some((symbol, raw)) = line.split_once('=') else {
        return Err("expected CONFIG_NAME=value or a # comment".to_owned());
    };
    if !is_symbol(symbol) {
        return Err(format!("{symbol:?} is not a CONFIG_ symbol"));
    }
    let value = match raw {
        "y" => ConfigValue::Builtin,
        "m" => ConfigValue::Module,
        "n" => ConfigValue::NotSet,
        "" => return Err(format!("{symbol} has an empty value")),
        quoted if quoted.starts_with('"') => ConfigValue::Value(
            unquote(quoted).ok_or_else(|| format!("{symbol} has a malformed string value"))?,
        ),
        other => ConfigValue::Value(other.to_owned()),
    };
    Ok((symbol, value))
}

/// Undoes confdata.c's string quoting: `"a \"b\" \\ c"` → `a "b" \ c`.
fn unquote(quoted: &str) -> Option<String> {
    let inner = quoted.strip_prefix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return chars.as_str().is_empty().then_some(out),
            c => out.push(c),
        }
    }
    None
}

/// Reads the running kernel's config: `/proc/config.gz` first, then
/// `/boot/config-<release>`. Either may be gzipped or plain (checked by the
/// gzip magic number).
///
/// `Ok(None)` when neither exists.
///
/// # Errors
/// [`HostError`] naming the path if the first existing candidate cannot be
/// read, is not valid gzip, or contains no `CONFIG_` line at all.
pub fn read_kernel_config(
    root: &HostRoot,
    release: &str,
) -> Result<Option<Parsed<KernelConfig>>, HostError> {
    for path in root.kernel_config_candidates(release) {
        let Some(bytes) = read_optional_bytes(&path)? else {
            continue;
        };
        let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
            let decoder = flate2::read::GzDecoder::new(bytes.as_slice());
            gunzip(decoder, &path)?
        } else {
            bytes
        };
        let text = String::from_utf8_lossy(&bytes);
        let parsed = parse_kernel_config(&text, &path);
        if parsed.value.is_empty() {
            return Err(HostError::Invalid {
                path,
                problem: "no CONFIG_ line: not a kernel config".to_owned(),
            });
        }
        return Ok(Some(parsed));
    }
    Ok(None)
}

fn gunzip(decoder: impl Read, path: &Path) -> Result<Vec<u8>, HostError> {
    read_limited(decoder, path).map_err(|e| match e {
        HostError::Read { path, error } => HostError::Invalid {
            path,
            problem: format!("not valid gzip: {error}"),
        },
        other => other,
    })
}

/// Modules whose Kconfig symbol is not `CONFIG_<NAME IN UPPER CASE>`, or that
/// Longhorn needs and were checked against Debian's 6.1 config and
/// modules.dep (the `known_symbols_match_debian_6_1` test).
const KNOWN_SYMBOLS: &[(&str, &str)] = &[
    // Device mapper: dm-crypt for encrypted volumes.
    ("dm_mod", "CONFIG_BLK_DEV_DM"),
    ("dm_crypt", "CONFIG_DM_CRYPT"),
    ("dm_snapshot", "CONFIG_DM_SNAPSHOT"),
    ("dm_thin_pool", "CONFIG_DM_THIN_PROVISIONING"),
    ("dm_multipath", "CONFIG_DM_MULTIPATH"),
    ("dm_verity", "CONFIG_DM_VERITY"),
    // NVMe over TCP: the v2 data engine's frontend.
    ("nvme_core", "CONFIG_NVME_CORE"),
    ("nvme", "CONFIG_BLK_DEV_NVME"),
    ("nvme_fabrics", "CONFIG_NVME_FABRICS"),
    ("nvme_tcp", "CONFIG_NVME_TCP"),
    // Userspace PCI drivers for SPDK (v2 data engine).
    ("vfio", "CONFIG_VFIO"),
    ("vfio_iommu_type1", "CONFIG_VFIO_IOMMU_TYPE1"),
    ("vfio_pci_core", "CONFIG_VFIO_PCI_CORE"),
    ("vfio_pci", "CONFIG_VFIO_PCI"),
    ("uio", "CONFIG_UIO"),
    ("uio_pci_generic", "CONFIG_UIO_PCI_GENERIC"),
    // iSCSI (v1 data engine frontend) and NFS (RWX volumes).
    ("iscsi_tcp", "CONFIG_ISCSI_TCP"),
    ("scsi_transport_iscsi", "CONFIG_SCSI_ISCSI_ATTRS"),
    ("nfs", "CONFIG_NFS_FS"),
    ("nfsv3", "CONFIG_NFS_V3"),
    ("nfsv4", "CONFIG_NFS_V4"),
    // The ublk frontend (Longhorn 1.9+).
    ("ublk_drv", "CONFIG_BLK_DEV_UBLK"),
    ("fuse", "CONFIG_FUSE_FS"),
    ("nbd", "CONFIG_BLK_DEV_NBD"),
];

/// The Kconfig symbol that builds `module`, for remedies ("rebuild with
/// CONFIG_DM_CRYPT=m") and for telling built-in from missing when a host has
/// no modules.builtin.
///
/// Known modules come from a table checked against a real Debian config.
/// Anything else falls back to `CONFIG_<NAME IN UPPER CASE>`, which is right
/// for many drivers (`CONFIG_VFIO`, `CONFIG_UIO`) but only a guess: it is
/// wrong for e.g. `dm_mod` (`CONFIG_BLK_DEV_DM`) and `ext4` (`CONFIG_EXT4_FS`),
/// which is why those are in the table.
#[must_use]
pub fn config_symbol_for(module: &ModuleName) -> String {
    KNOWN_SYMBOLS
        .iter()
        .find(|(name, _)| *name == module.as_str())
        .map_or_else(
            || format!("CONFIG_{}", module.as_str().to_ascii_uppercase()),
            |(_, symbol)| (*symbol).to_owned(),
        )
}

/// The modules of the known-symbol table whose symbol is `=y` in `config`:
/// what can be said to be built in when modules.builtin cannot be read.
#[must_use]
pub fn builtin_by_config(config: &KernelConfig) -> Vec<ModuleName> {
    KNOWN_SYMBOLS
        .iter()
        .filter(|(_, symbol)| config.get(symbol) == Some(ConfigValue::Builtin))
        .filter_map(|(name, _)| ModuleName::from_kernel(name))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::testing::name;

    fn parse(text: &str) -> Parsed<KernelConfig> {
        parse_kernel_config(text, Path::new("/boot/config-x"))
    }

    #[test]
    fn values_of_every_kind() {
        let parsed = parse(
            "#\n# Automatically generated file; DO NOT EDIT.\n#\n\
             CONFIG_MODULES=y\n\
             CONFIG_DM_CRYPT=m\n\
             # CONFIG_NVME_TCP is not set\n\
             CONFIG_LOCALVERSION=\"\"\n\
             CONFIG_DEFAULT_HOSTNAME=\"a \\\"b\\\" \\\\ c\"\n\
             CONFIG_HZ=250\n\
             CONFIG_PHYSICAL_START=0x1000000\n\
             CONFIG_OLD_STYLE=n\n",
        );
        assert_eq!(parsed.bad_lines, []);
        let c = &parsed.value;
        assert!(c.modules_enabled());
        assert_eq!(c.get("CONFIG_DM_CRYPT"), Some(ConfigValue::Module));
        assert_eq!(c.get("DM_CRYPT"), Some(ConfigValue::Module));
        assert_eq!(c.get("CONFIG_NVME_TCP"), Some(ConfigValue::NotSet));
        assert_eq!(c.get("CONFIG_VFIO"), None);
        assert_eq!(
            c.get("CONFIG_LOCALVERSION"),
            Some(ConfigValue::Value(String::new()))
        );
        assert_eq!(
            c.get("CONFIG_DEFAULT_HOSTNAME"),
            Some(ConfigValue::Value("a \"b\" \\ c".to_owned()))
        );
        assert_eq!(c.get("HZ"), Some(ConfigValue::Value("250".to_owned())));
        assert_eq!(
            c.get("PHYSICAL_START"),
            Some(ConfigValue::Value("0x1000000".to_owned()))
        );
        assert_eq!(c.get("OLD_STYLE"), Some(ConfigValue::NotSet));
        assert_eq!(c.len(), 8);
        assert_eq!(c.source(), Path::new("/boot/config-x"));
    }

    #[test]
    fn modules_disabled() {
        let c = parse("# CONFIG_MODULES is not set\nCONFIG_BLK_DEV_DM=y\n").value;
        assert!(!c.modules_enabled());
        assert!(!parse("CONFIG_MODULES=m\n").value.modules_enabled());
        assert!(!parse("CONFIG_X=y\n").value.modules_enabled());
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let parsed = parse(
            "CONFIG_A=y\n\
             garbage\n\
             OTHER_B=y\n\
             CONFIG_=y\n\
             CONFIG_C=\n\
             CONFIG_D=\"open\n\
             CONFIG_E=\"a\"b\"\n\
             CONFIG_F=m\n",
        );
        let got: Vec<(usize, &str)> = parsed
            .bad_lines
            .iter()
            .map(|b| (b.line, b.problem.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (2, "expected CONFIG_NAME=value or a # comment"),
                (3, "\"OTHER_B\" is not a CONFIG_ symbol"),
                (4, "\"CONFIG_\" is not a CONFIG_ symbol"),
                (5, "CONFIG_C has an empty value"),
                (6, "CONFIG_D has a malformed string value"),
                (7, "CONFIG_E has a malformed string value"),
            ]
        );
        assert_eq!(parsed.value.len(), 2);
    }

    #[test]
    fn symbols_from_table_and_fallback() {
        assert_eq!(config_symbol_for(&name("dm-crypt")), "CONFIG_DM_CRYPT");
        assert_eq!(config_symbol_for(&name("dm_mod")), "CONFIG_BLK_DEV_DM");
        assert_eq!(config_symbol_for(&name("nvme-tcp")), "CONFIG_NVME_TCP");
        assert_eq!(config_symbol_for(&name("nvme")), "CONFIG_BLK_DEV_NVME");
        assert_eq!(config_symbol_for(&name("vfio_pci")), "CONFIG_VFIO_PCI");
        assert_eq!(
            config_symbol_for(&name("uio_pci_generic")),
            "CONFIG_UIO_PCI_GENERIC"
        );
        // Fallback: upper-cased name.
        assert_eq!(config_symbol_for(&name("kvm-intel")), "CONFIG_KVM_INTEL");
        // Every table entry names a valid module.
        for (module, symbol) in KNOWN_SYMBOLS {
            assert!(ModuleName::from_kernel(module).is_some(), "{module}");
            assert!(is_symbol(symbol), "{symbol}");
        }
    }

    #[test]
    fn real_debian_6_1_config() {
        let parsed = parse(include_str!("fixtures/config.debian-6.1"));
        assert_eq!(parsed.bad_lines, []);
        let c = &parsed.value;
        assert!(c.modules_enabled());
        assert_eq!(c.get("CONFIG_DM_CRYPT"), Some(ConfigValue::Module));
        assert_eq!(
            c.get("CONFIG_LOCALVERSION"),
            Some(ConfigValue::Value(String::new()))
        );
        assert_eq!(
            c.get("CONFIG_MODULE_SIG_HASH"),
            Some(ConfigValue::Value("sha256".to_owned()))
        );
        assert!(builtin_by_config(c).is_empty());
    }

    /// The table is only worth having if it is right: on Debian 6.1 every
    /// listed module is `=m` and has a file in modules.dep.
    #[test]
    fn known_symbols_match_debian_6_1() {
        let config = parse(include_str!("fixtures/config.debian-6.1")).value;
        let dep = crate::host::parse_modules_dep(
            include_str!("fixtures/modules.dep.debian-6.1"),
            Path::new("modules.dep"),
        )
        .value;
        let dep_6_12 = crate::host::parse_modules_dep(
            include_str!("fixtures/modules.dep.debian-6.12"),
            Path::new("modules.dep"),
        )
        .value;
        for (module, symbol) in KNOWN_SYMBOLS {
            let module = name(module);
            assert_eq!(config_symbol_for(&module), *symbol);
            if *symbol == "CONFIG_BLK_DEV_UBLK" {
                // Not built for 6.1 ("is not set" still names the real
                // symbol); a module on 6.12.
                assert_eq!(config.get(symbol), Some(ConfigValue::NotSet), "{symbol}");
                assert!(dep_6_12.contains_key(&module), "{module} not in 6.12");
                continue;
            }
            assert_eq!(config.get(symbol), Some(ConfigValue::Module), "{symbol}");
            assert!(dep.contains_key(&module), "{module} not in modules.dep");
        }
    }

    #[test]
    fn real_dev_machine_config_without_modules() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::write(
            root.proc_config_gz(),
            include_bytes!("fixtures/config.gz.dev-6.18"),
        )
        .unwrap();
        let parsed = read_kernel_config(&root, "6.18.44").unwrap().unwrap();
        assert_eq!(parsed.bad_lines, []);
        let c = parsed.value;
        assert!(!c.modules_enabled());
        assert_eq!(c.get("CONFIG_MODULES"), Some(ConfigValue::NotSet));
        assert_eq!(c.get("CONFIG_NVME_TCP"), Some(ConfigValue::NotSet));
        // Device mapper is off, so dm-crypt is not mentioned at all.
        assert_eq!(c.get("CONFIG_DM_CRYPT"), None);
        assert_eq!(builtin_by_config(&c), [name("fuse")]);
    }

    #[test]
    fn builtin_by_config_uses_only_the_table() {
        let c = parse("CONFIG_BLK_DEV_DM=y\nCONFIG_DM_CRYPT=m\nCONFIG_KVM=y\n").value;
        assert_eq!(builtin_by_config(&c), [name("dm_mod")]);
    }

    #[test]
    fn reads_gzip_from_proc_before_boot() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        assert!(read_kernel_config(&root, "r").unwrap().is_none());

        std::fs::create_dir_all(dir.path().join("boot")).unwrap();
        std::fs::write(root.boot_config("r"), "CONFIG_MODULES=y\n").unwrap();
        let c = read_kernel_config(&root, "r").unwrap().unwrap().value;
        assert!(c.modules_enabled());
        assert_eq!(c.source(), root.boot_config("r"));

        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"# CONFIG_MODULES is not set\n").unwrap();
        std::fs::write(root.proc_config_gz(), gz.finish().unwrap()).unwrap();
        let c = read_kernel_config(&root, "r").unwrap().unwrap().value;
        assert!(!c.modules_enabled());
        assert_eq!(c.source(), root.proc_config_gz());
    }

    #[test]
    fn broken_gzip_and_non_config_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::write(root.proc_config_gz(), [0x1f, 0x8b, 8, 0, 1, 2, 3]).unwrap();
        let err = read_kernel_config(&root, "r").unwrap_err().to_string();
        assert!(err.contains("proc/config.gz: not valid gzip"), "{err}");

        std::fs::write(root.proc_config_gz(), "hello\n").unwrap();
        let err = read_kernel_config(&root, "r").unwrap_err().to_string();
        assert!(err.contains("proc/config.gz: no CONFIG_ line"), "{err}");
    }
}
