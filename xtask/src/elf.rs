//! Reads just enough of a 64-bit little-endian ELF file to tell whether it
//! is statically linked: no `PT_INTERP` (no program interpreter) and no
//! `DT_NEEDED` shared-library dependencies. A static-pie binary still has a
//! `PT_DYNAMIC` segment (for self-relocation) and counts as static.
use std::{fs, path::Path};

use anyhow::{Context as _, Result, bail, ensure};

const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;

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

fn u16_at(data: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(data.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(data: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(data: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(off..off + 8)?.try_into().ok()?))
}
fn usize_at(data: &[u8], off: usize) -> Option<usize> {
    usize::try_from(u64_at(data, off)?).ok()
}

/// Classifies the ELF file at `path`.
pub fn linkage(path: &Path) -> Result<Linkage> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    linkage_of(&data).with_context(|| format!("reading ELF headers of {}", path.display()))
}

fn linkage_of(data: &[u8]) -> Result<Linkage> {
    ensure!(data.get(..4) == Some(b"\x7fELF"), "not an ELF file");
    ensure!(data.get(4) == Some(&2), "not a 64-bit ELF file");
    ensure!(data.get(5) == Some(&1), "not a little-endian ELF file");
    let truncated = || anyhow::anyhow!("ELF header is truncated");
    let phoff = usize_at(data, 0x20).ok_or_else(truncated)?;
    let phentsize = usize::from(u16_at(data, 0x36).ok_or_else(truncated)?);
    let phnum = usize::from(u16_at(data, 0x38).ok_or_else(truncated)?);
    ensure!(
        phentsize >= 0x38,
        "program header entries of {phentsize} bytes are too small"
    );

    let mut interpreter = None;
    let mut needed = 0;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type = u32_at(data, ph).ok_or_else(truncated)?;
        let p_offset = usize_at(data, ph + 0x08).ok_or_else(truncated)?;
        let p_filesz = usize_at(data, ph + 0x20).ok_or_else(truncated)?;
        let Some(segment) = data.get(p_offset..p_offset.saturating_add(p_filesz)) else {
            bail!("program header {i} points past the end of the file");
        };
        match p_type {
            PT_INTERP => {
                let path = segment.split(|&b| b == 0).next().unwrap_or(segment);
                interpreter = Some(String::from_utf8_lossy(path).into_owned());
            }
            PT_DYNAMIC => {
                for entry in segment.chunks_exact(16) {
                    let tag = u64_at(entry, 0).ok_or_else(truncated)?;
                    if tag == DT_NULL {
                        break;
                    }
                    if tag == DT_NEEDED {
                        needed += 1;
                    }
                }
            }
            _ => {}
        }
    }
    if interpreter.is_none() && needed == 0 {
        Ok(Linkage::Static)
    } else {
        Ok(Linkage::Dynamic {
            interpreter,
            needed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Linkage, linkage, linkage_of};

    #[test]
    fn this_test_binary_is_dynamic_with_an_interpreter() {
        // The host test binary is a glibc executable: it must be reported
        // as dynamic, naming ld-linux, and needing libc.
        let exe = std::env::current_exe();
        let Ok(exe) = exe else {
            panic!("cannot find the running test binary: {exe:?}");
        };
        match linkage(&exe) {
            Ok(Linkage::Dynamic {
                interpreter: Some(interp),
                needed,
            }) => {
                assert!(interp.contains("ld-linux"), "interpreter {interp}");
                assert!(
                    needed >= 1,
                    "a glibc binary needs libc, found {needed} DT_NEEDED"
                );
            }
            other => panic!("expected a dynamic glibc binary, got {other:?}"),
        }
    }

    /// A minimal ELF64 image: header, then `phdrs` program headers of
    /// (type, payload); payloads follow the headers.
    fn synthetic(phdrs: &[(u32, &[u8])]) -> Vec<u8> {
        let mut data = vec![0u8; 64];
        data[..6].copy_from_slice(b"\x7fELF\x02\x01");
        data[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        data[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        let count = u16::try_from(phdrs.len()).unwrap_or(u16::MAX);
        data[0x38..0x3a].copy_from_slice(&count.to_le_bytes());
        let mut payload_off = 64 + 56 * phdrs.len();
        let mut payloads = Vec::new();
        for (p_type, payload) in phdrs {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&p_type.to_le_bytes());
            ph[0x08..0x10].copy_from_slice(&(payload_off as u64).to_le_bytes());
            ph[0x20..0x28].copy_from_slice(&(payload.len() as u64).to_le_bytes());
            data.extend_from_slice(&ph);
            payloads.extend_from_slice(payload);
            payload_off += payload.len();
        }
        data.extend_from_slice(&payloads);
        data
    }

    #[test]
    fn load_only_is_static() {
        assert_eq!(
            linkage_of(&synthetic(&[(1, b"")])).ok(),
            Some(Linkage::Static)
        );
    }

    #[test]
    fn static_pie_dynamic_section_without_needed_is_static() {
        // DT_RELA (7) then DT_NULL: what a static-pie musl binary carries.
        let mut dynamic = Vec::new();
        for (tag, val) in [(7u64, 0x1000u64), (0, 0)] {
            dynamic.extend_from_slice(&tag.to_le_bytes());
            dynamic.extend_from_slice(&val.to_le_bytes());
        }
        assert_eq!(
            linkage_of(&synthetic(&[(1, b""), (2, &dynamic)])).ok(),
            Some(Linkage::Static)
        );
    }

    #[test]
    fn interpreter_or_needed_is_dynamic() {
        let interp = b"/lib/ld-musl-x86_64.so.1\0";
        assert_eq!(
            linkage_of(&synthetic(&[(3, interp)])).ok(),
            Some(Linkage::Dynamic {
                interpreter: Some("/lib/ld-musl-x86_64.so.1".to_owned()),
                needed: 0
            })
        );
        let mut dynamic = Vec::new();
        for (tag, val) in [(1u64, 1u64), (1, 9), (0, 0), (1, 5)] {
            dynamic.extend_from_slice(&tag.to_le_bytes());
            dynamic.extend_from_slice(&val.to_le_bytes());
        }
        assert_eq!(
            linkage_of(&synthetic(&[(2, &dynamic)])).ok(),
            Some(Linkage::Dynamic {
                interpreter: None,
                needed: 2
            })
        );
    }

    #[test]
    fn non_elf_input_is_an_error() {
        assert!(linkage_of(b"#!/bin/sh\n").is_err());
        assert!(linkage_of(b"\x7fELF\x02\x01").is_err());
    }
}
