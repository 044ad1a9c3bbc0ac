//! Module-name validation and normalisation: one spelling (`_`) for a name the
//! kernel treats as the same whether written with `-` or `_`.
//!
//! The kernel stores a module's name as its object file's base name with every
//! `-` turned into `_` (kbuild's `KBUILD_MODNAME`), so `/proc/modules` and the
//! module tracepoints say `dm_crypt` while modules.dep, modules.builtin and
//! users say `dm-crypt`. [`ModuleName`] always holds the `_` form, so equality
//! is exact matching on the kernel's name: `nvme-tcp` == `nvme_tcp`, but
//! `vfio_pci` != `vfio_pci_core` and `nfs` != `nfsd`.
use std::fmt;
use std::str::FromStr;

use compact_str::CompactString;

/// The longest module name in bytes: the kernel's `MODULE_NAME_LEN` is 56
/// including the terminating NUL (`include/linux/module.h`, unchanged since
/// 2.6).
pub const MAX_LEN: usize = 55;

/// File name endings of a module file in modules.dep / modules.builtin, longest
/// compressed forms first. Debian compresses modules with xz from 6.12 on;
/// other distributions use zstd or gzip.
const MODULE_FILE_SUFFIXES: [&str; 4] = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"];

/// A kernel module name in normalised form (every `-` replaced by `_`).
///
/// Serialises as a plain string. Deserialising runs [`ModuleName::parse`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleName(CompactString);

/// What is wrong with a module name, without the name itself (so callers can
/// place it in their own message, e.g. "module name "x" in group "y" ...").
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    /// The name is the empty string.
    #[error("is empty")]
    Empty,
    /// The name is longer than the kernel allows.
    #[error("is {len} bytes long (the kernel allows at most {MAX_LEN})")]
    TooLong {
        /// Length of the input in bytes.
        len: usize,
    },
    /// The name contains a character that no module name can contain.
    #[error("contains {ch:?} (allowed: letters, digits, '_' and '-')")]
    BadChar {
        /// The first offending character.
        ch: char,
    },
}

/// A user-supplied module name (config file, command line) that is not a
/// valid module name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("module name {input:?} {problem}")]
pub struct NameError {
    /// The name as given.
    pub input: String,
    /// What is wrong with it.
    pub problem: NameProblem,
}

/// Checks `s` against the rules every module name follows.
fn check(s: &str) -> Result<(), NameProblem> {
    if s.is_empty() {
        return Err(NameProblem::Empty);
    }
    if let Some(ch) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(NameProblem::BadChar { ch });
    }
    // Checked after the characters, so a long line of garbage is reported for
    // its garbage rather than its length.
    if s.len() > MAX_LEN {
        return Err(NameProblem::TooLong { len: s.len() });
    }
    Ok(())
}

impl ModuleName {
    /// Validates and normalises a name typed by a person (config file, flag).
    ///
    /// # Errors
    /// [`NameError`] naming the input if it is empty, longer than
    /// [`MAX_LEN`] bytes, or contains anything but ASCII letters, digits,
    /// `_` and `-`.
    pub fn parse(input: &str) -> Result<Self, NameError> {
        match check(input) {
            Ok(()) => Ok(Self::normalised(input)),
            Err(problem) => Err(NameError {
                input: input.to_owned(),
                problem,
            }),
        }
    }

    /// Normalises a name taken from kernel data (a tracepoint's `name` field,
    /// a /proc/modules line, a module file's base name).
    ///
    /// Returns `None` if `raw` is empty or cannot be a module name (same rules
    /// as [`parse`](Self::parse)). `raw` must not include a terminating NUL;
    /// callers that decode C strings strip it first.
    #[must_use]
    pub fn from_kernel(raw: &str) -> Option<Self> {
        check(raw).ok().map(|()| Self::normalised(raw))
    }

    /// `s` (already checked) with every `-` written `_`; no heap block for
    /// a name of at most 24 bytes.
    fn normalised(s: &str) -> Self {
        if s.contains('-') {
            Self(s.chars().map(|c| if c == '-' { '_' } else { c }).collect())
        } else {
            Self(CompactString::new(s))
        }
    }

    /// The module name of a module file path as written in modules.dep or
    /// modules.builtin: `kernel/drivers/md/dm-crypt.ko.xz` → `dm_crypt`.
    ///
    /// Accepts `.ko`, `.ko.xz`, `.ko.zst` and `.ko.gz`; returns `None` for any
    /// other ending or a base name that is not a module name.
    #[must_use]
    pub fn from_module_path(path: &str) -> Option<Self> {
        let base = path.rsplit('/').next().unwrap_or(path);
        let stem = MODULE_FILE_SUFFIXES
            .iter()
            .find_map(|suffix| base.strip_suffix(suffix))?;
        Self::from_kernel(stem)
    }

    /// The normalised name (`_`, never `-`).
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ModuleName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for ModuleName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for ModuleName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for ModuleName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::name;

    #[test]
    fn dash_and_underscore_are_the_same_module() {
        assert_eq!(name("nvme-tcp"), name("nvme_tcp"));
        assert_eq!(name("nvme-tcp").as_str(), "nvme_tcp");
        assert_eq!(name("dm-crypt").to_string(), "dm_crypt");
        assert_eq!(
            ModuleName::from_kernel("uio_pci_generic"),
            Some(name("uio-pci-generic"))
        );
    }

    #[test]
    fn matching_is_exact_not_prefix() {
        assert_ne!(name("vfio_pci"), name("vfio_pci_core"));
        assert_ne!(name("nfs"), name("nfsd"));
        assert_ne!(name("dm_mod"), name("dm-mod-x"));
        // Case is significant to the kernel (e.g. `BusLogic`).
        assert_ne!(name("BusLogic"), name("buslogic"));
    }

    #[test]
    fn parse_rejects_bad_input_and_says_why() {
        let err = ModuleName::parse("nvme tcp").unwrap_err();
        assert_eq!(err.problem, NameProblem::BadChar { ch: ' ' });
        assert_eq!(
            err.to_string(),
            "module name \"nvme tcp\" contains ' ' (allowed: letters, digits, '_' and '-')"
        );

        let err = ModuleName::parse("").unwrap_err();
        assert_eq!(err.problem, NameProblem::Empty);
        assert_eq!(err.to_string(), "module name \"\" is empty");

        for bad in ["dm.crypt", "dm/crypt", "dm_crypt\n", "ümlaut", "a\0b"] {
            assert!(
                matches!(
                    ModuleName::parse(bad).unwrap_err().problem,
                    NameProblem::BadChar { .. }
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn length_limit_is_module_name_len_minus_nul() {
        let longest = "a".repeat(MAX_LEN);
        assert_eq!(name(&longest).as_str().len(), 55);
        let err = ModuleName::parse(&"a".repeat(56)).unwrap_err();
        assert_eq!(err.problem, NameProblem::TooLong { len: 56 });
        assert!(err.to_string().contains("is 56 bytes long"), "{err}");
        assert!(err.to_string().contains("at most 55"), "{err}");
    }

    #[test]
    fn from_kernel_rejects_what_cannot_be_a_name() {
        assert_eq!(ModuleName::from_kernel(""), None);
        assert_eq!(ModuleName::from_kernel("dm_crypt\0"), None);
        assert_eq!(ModuleName::from_kernel("[permanent]"), None);
        assert_eq!(ModuleName::from_kernel(&"x".repeat(56)), None);
        assert_eq!(ModuleName::from_kernel("nvme-tcp"), Some(name("nvme_tcp")));
    }

    #[test]
    fn module_paths_in_every_compression() {
        for path in [
            "kernel/drivers/md/dm-crypt.ko",
            "kernel/drivers/md/dm-crypt.ko.xz",
            "kernel/drivers/md/dm-crypt.ko.zst",
            "kernel/drivers/md/dm-crypt.ko.gz",
            "/lib/modules/6.1.0-37-amd64/kernel/drivers/md/dm-crypt.ko",
            "dm-crypt.ko",
        ] {
            assert_eq!(
                ModuleName::from_module_path(path),
                Some(name("dm_crypt")),
                "{path}"
            );
        }
        for path in [
            "kernel/drivers/md/dm-crypt.o",
            "kernel/drivers/md/dm-crypt.ko.bz2",
            "kernel/drivers/md/dm-crypt",
            "kernel/drivers/md/.ko",
            "kernel/drivers/md/",
            "",
        ] {
            assert_eq!(ModuleName::from_module_path(path), None, "{path}");
        }
    }

    #[test]
    fn serde_is_a_plain_string_and_validates() {
        let json = serde_json::to_string(&name("nvme-tcp")).unwrap();
        assert_eq!(json, "\"nvme_tcp\"");
        let back: ModuleName = serde_json::from_str("\"dm-crypt\"").unwrap();
        assert_eq!(back, name("dm_crypt"));
        let err = serde_json::from_str::<ModuleName>("\"dm crypt\"").unwrap_err();
        assert!(err.to_string().contains("contains ' '"), "{err}");
    }

    #[test]
    fn from_str_is_parse() {
        assert_eq!("vfio-pci".parse::<ModuleName>(), Ok(name("vfio_pci")));
        assert!("".parse::<ModuleName>().is_err());
    }
}
