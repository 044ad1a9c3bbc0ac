//! Whether an x86-64 ELF executable is statically linked: no `PT_INTERP`
//! (program interpreter) and no `DT_NEEDED` shared-library dependencies.
//! A static-pie binary still has a `PT_DYNAMIC` segment (for
//! self-relocation) and counts as static. Parsing is the `object` crate's.
use std::{fs, path::Path};

use anyhow::{Context as _, Result, anyhow};
use object::{
    Endianness,
    elf::{DT_NEEDED, FileHeader64, PT_INTERP},
    read::elf::{Dyn as _, FileHeader as _, ProgramHeader as _},
};

/// How an ELF executable is linked.
#[derive(Debug, PartialEq, Eq)]
pub enum Linkage {
    /// No interpreter, no shared libraries.
    Static,
    /// Needs a program interpreter or shared libraries.
    Dynamic {
        /// The `PT_INTERP` path, if any.
        interpreter: Option<String>,
        /// How many `DT_NEEDED` entries the dynamic section has.
        needed: usize,
    },
}

/// Reads `path` and tells how it is linked.
///
/// # Errors
/// When the file cannot be read or is not a 64-bit ELF file.
pub fn linkage(path: &Path) -> Result<Linkage> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    linkage_of(&data).with_context(|| format!("reading the ELF headers of {}", path.display()))
}

fn linkage_of(data: &[u8]) -> Result<Linkage> {
    let header = FileHeader64::<Endianness>::parse(data).map_err(|e| anyhow!("{e}"))?;
    let endian = header.endian().map_err(|e| anyhow!("{e}"))?;
    let mut interpreter = None;
    let mut needed = 0;
    for ph in header
        .program_headers(endian, data)
        .map_err(|e| anyhow!("{e}"))?
    {
        if ph.p_type(endian) == PT_INTERP {
            let bytes = ph
                .data(endian, data)
                .map_err(|()| anyhow!("PT_INTERP points outside the file"))?;
            let path = bytes.split(|&b| b == 0).next().unwrap_or_default();
            interpreter = Some(String::from_utf8_lossy(path).into_owned());
        }
        if let Some(entries) = ph
            .dynamic(endian, data)
            .map_err(|e| anyhow!("bad PT_DYNAMIC: {e}"))?
        {
            needed += entries
                .iter()
                .filter(|d| d.d_tag(endian) == DT_NEEDED)
                .count();
        }
    }
    Ok(if interpreter.is_none() && needed == 0 {
        Linkage::Static
    } else {
        Linkage::Dynamic {
            interpreter,
            needed,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_is_dynamic_with_an_interpreter() {
        // Test binaries are linked against glibc: an interpreter and libc.
        let exe = std::env::current_exe().unwrap();
        let Linkage::Dynamic {
            interpreter,
            needed,
        } = linkage(&exe).unwrap()
        else {
            panic!("{} should be dynamic", exe.display());
        };
        assert!(interpreter.is_some_and(|i| i.contains("ld-linux")));
        assert!(needed >= 1);
    }

    #[test]
    fn busybox_static_is_static() {
        // Debian's busybox-static, which every VM initramfs carries (setup
        // installs it).
        let busybox = Path::new("/bin/busybox");
        assert_eq!(
            linkage(busybox).unwrap(),
            Linkage::Static,
            "{}",
            busybox.display()
        );
    }

    #[test]
    fn non_elf_input_is_an_error() {
        assert!(linkage_of(b"#!/bin/sh\necho not elf\n").is_err());
        assert!(linkage_of(&[]).is_err());
    }
}
