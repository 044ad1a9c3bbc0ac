//! What a built executable is, read from its ELF headers: the machine it
//! is for, whether it is statically linked, and the eBPF objects embedded
//! in it. Parsing is the `object` crate's.
//!
//! - Static means no `PT_INTERP` (program interpreter) and no `DT_NEEDED`
//!   shared-library dependencies. A static-pie binary still has a
//!   `PT_DYNAMIC` segment (for self-relocation) and counts as static.
//! - An embedded eBPF object is an ELF file for `EM_BPF` inside the
//!   executable's bytes (`include_bytes_aligned!` of aya-build's output);
//!   its programs are the function symbols of its `tracepoint` sections.
use std::{fs, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use object::{
    Endianness, LittleEndian,
    elf::{DT_NEEDED, EM_AARCH64, EM_BPF, EM_X86_64, FileHeader64, Machine, PT_INTERP, STT_FUNC},
    read::elf::{Dyn as _, FileHeader as _, ProgramHeader as _},
};

use crate::arch::Arch;

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

/// An eBPF object found inside an executable.
#[derive(Debug, PartialEq, Eq)]
pub struct BpfObject {
    /// Where it starts in the executable's bytes.
    pub offset: usize,
    /// Function symbols of its `tracepoint` sections, sorted.
    pub programs: Vec<String>,
}

/// What [`inspect`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Executable {
    /// `e_machine` (`EM_X86_64`, `EM_AARCH64`, ...).
    pub machine: Machine,
    /// How it is linked.
    pub linkage: Linkage,
    /// eBPF objects embedded in it.
    pub bpf_objects: Vec<BpfObject>,
}

/// A readable name for an `e_machine` value.
pub fn machine_name(machine: Machine) -> String {
    match machine {
        EM_X86_64 => "x86-64 (EM_X86_64)".to_owned(),
        EM_AARCH64 => "AArch64 (EM_AARCH64)".to_owned(),
        EM_BPF => "BPF (EM_BPF)".to_owned(),
        Machine(other) => format!("e_machine {other}"),
    }
}

/// Reads `path`'s machine, linkage and embedded eBPF objects.
///
/// # Errors
/// When the file cannot be read or is not a 64-bit ELF file.
pub fn inspect(path: &Path) -> Result<Executable> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    inspect_bytes(&data).with_context(|| format!("reading the ELF headers of {}", path.display()))
}

/// Checks that `path` is what a static build for `arch` must produce: an
/// executable for `arch`'s machine, statically linked, and (with
/// `want_bpf`) carrying an eBPF object with programs. Returns a one-line
/// description for the build log.
///
/// # Errors
/// Naming the file and each property it lacks.
pub fn check_static(path: &Path, arch: Arch, want_bpf: bool) -> Result<String> {
    let exe = inspect(path)?;
    let mut problems = Vec::new();
    if exe.machine != arch.elf_machine() {
        problems.push(format!(
            "it is for {}, not {} ({arch})",
            machine_name(exe.machine),
            machine_name(arch.elf_machine())
        ));
    }
    if let Linkage::Dynamic {
        interpreter,
        needed,
    } = &exe.linkage
    {
        problems.push(format!(
            "it is NOT statically linked (interpreter {}, {needed} shared-library dependencies), \
             so it cannot run in a FROM-scratch image or the busybox test VMs",
            interpreter.as_deref().unwrap_or("none"),
        ));
    }
    let programs: Vec<&str> = exe
        .bpf_objects
        .iter()
        .flat_map(|o| o.programs.iter().map(String::as_str))
        .collect();
    if want_bpf && programs.is_empty() {
        problems.push(if exe.bpf_objects.is_empty() {
            "it carries no eBPF object (built with AYA_BUILD_SKIP=1?)".to_owned()
        } else {
            "its embedded eBPF object has no tracepoint programs".to_owned()
        });
    }
    if !problems.is_empty() {
        bail!("{}: {}", path.display(), problems.join("; "));
    }
    let mut line = format!("{}: static, {}", path.display(), machine_name(exe.machine));
    if want_bpf {
        line.push_str(&format!(", eBPF programs {}", programs.join(" ")));
    }
    Ok(line)
}

fn inspect_bytes(data: &[u8]) -> Result<Executable> {
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
    let linkage = if interpreter.is_none() && needed == 0 {
        Linkage::Static
    } else {
        Linkage::Dynamic {
            interpreter,
            needed,
        }
    };
    Ok(Executable {
        machine: header.e_machine(endian),
        linkage,
        bpf_objects: embedded_bpf(data),
    })
}

/// Every little-endian eBPF ELF object inside `data` (past its own
/// header). A match of the ELF magic that does not parse as one is data
/// that merely looks like it, and is skipped.
fn embedded_bpf(data: &[u8]) -> Vec<BpfObject> {
    const MAGIC: &[u8] = b"\x7fELF";
    let mut found = Vec::new();
    let mut from = 1;
    while let Some(at) = data
        .get(from..)
        .and_then(|rest| rest.windows(MAGIC.len()).position(|w| w == MAGIC))
    {
        let offset = from + at;
        from = offset + 1;
        if let Some(programs) = data.get(offset..).and_then(bpf_programs) {
            found.push(BpfObject { offset, programs });
        }
    }
    found
}

/// The programs of the eBPF object at the start of `data`, or `None` when
/// it is not one.
fn bpf_programs(data: &[u8]) -> Option<Vec<String>> {
    let endian = LittleEndian;
    let header = FileHeader64::<LittleEndian>::parse(data).ok()?;
    if header.e_machine(endian) != EM_BPF {
        return None;
    }
    let sections = header.sections(endian, data).ok()?;
    let symbols = sections
        .symbols(endian, data, object::elf::SHT_SYMTAB)
        .ok()?;
    let mut programs = Vec::new();
    for (index, symbol) in symbols.enumerate() {
        if symbol.st_type() != STT_FUNC {
            continue;
        }
        let Ok(Some(section)) = symbols.symbol_section(endian, symbol, index) else {
            continue;
        };
        let Ok(section) = sections.section(section) else {
            continue;
        };
        let in_tracepoint = sections
            .section_name(endian, section)
            .is_ok_and(|name| name == b"tracepoint" || name.starts_with(b"tracepoint/"));
        if in_tracepoint && let Ok(name) = symbols.symbol_name(endian, symbol) {
            programs.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    programs.sort();
    Some(programs)
}

#[cfg(test)]
mod tests {
    use object::{
        Architecture, BinaryFormat, SectionKind, SymbolFlags, SymbolKind, SymbolScope,
        write::{Object, Symbol, SymbolSection},
    };

    use super::*;

    fn linkage(path: &Path) -> Result<Linkage> {
        Ok(inspect(path)?.linkage)
    }

    /// The architecture these tests run on.
    fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::X86_64
        }
    }

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
        assert_eq!(inspect(&exe).unwrap().machine, host().elf_machine());
    }

    #[test]
    fn busybox_static_is_static() {
        // Debian's busybox-static (setup installs it).
        let busybox = Path::new("/bin/busybox");
        assert_eq!(
            linkage(busybox).unwrap(),
            Linkage::Static,
            "{}",
            busybox.display()
        );
        // It is the host's busybox, for the host's machine, with no eBPF.
        let host = host();
        let line = check_static(busybox, host, false).unwrap();
        assert!(line.contains("static"), "{line}");
        let err = check_static(busybox, host, true).unwrap_err().to_string();
        assert!(err.contains("carries no eBPF object"), "{err}");
        let other = if host == Arch::X86_64 {
            Arch::Aarch64
        } else {
            Arch::X86_64
        };
        let err = check_static(busybox, other, false).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "it is for {}, not {}",
                machine_name(host.elf_machine()),
                machine_name(other.elf_machine())
            )),
            "{err}"
        );
    }

    #[test]
    fn non_elf_input_is_an_error() {
        assert!(inspect_bytes(b"#!/bin/sh\necho not elf\n").is_err());
        assert!(inspect_bytes(&[]).is_err());
    }

    /// An eBPF object like aya-build's: a `tracepoint` section with
    /// function symbols, a license, and a function elsewhere.
    fn bpf_object(programs: &[&str]) -> Vec<u8> {
        let mut obj = Object::new(
            BinaryFormat::Elf,
            Architecture::Bpf,
            object::Endianness::Little,
        );
        let tracepoint = obj.add_section(Vec::new(), b"tracepoint".to_vec(), SectionKind::Text);
        let text = obj.add_section(Vec::new(), b".text".to_vec(), SectionKind::Text);
        let license = obj.add_section(Vec::new(), b"license".to_vec(), SectionKind::Data);
        obj.append_section_data(license, b"GPL\0", 1);
        for (i, name) in programs.iter().enumerate() {
            let at = obj.append_section_data(tracepoint, &[0x95, 0, 0, 0, 0, 0, 0, 0], 8);
            obj.add_symbol(Symbol {
                name: name.as_bytes().to_vec(),
                value: at,
                size: 8,
                kind: SymbolKind::Text,
                scope: SymbolScope::Dynamic,
                weak: false,
                section: SymbolSection::Section(tracepoint),
                flags: SymbolFlags::None,
            });
            assert_eq!(at, 8 * i as u64);
        }
        let helper = obj.append_section_data(text, &[0x95, 0, 0, 0, 0, 0, 0, 0], 8);
        obj.add_symbol(Symbol {
            name: b"memcpy".to_vec(),
            value: helper,
            size: 8,
            kind: SymbolKind::Text,
            scope: SymbolScope::Dynamic,
            weak: false,
            section: SymbolSection::Section(text),
            flags: SymbolFlags::None,
        });
        obj.write().unwrap()
    }

    #[test]
    fn finds_the_programs_of_an_embedded_bpf_object() {
        // The host's busybox with an eBPF object and a stray magic inside,
        // as include_bytes_aligned! leaves it in .rodata.
        let mut data = fs::read("/bin/busybox").unwrap();
        data.extend_from_slice(b"\x7fELF but not an object");
        let offset = data.len();
        data.extend_from_slice(&bpf_object(&["module_load", "module_free"]));
        let exe = inspect_bytes(&data).unwrap();
        assert_eq!(exe.linkage, Linkage::Static);
        assert_eq!(
            exe.bpf_objects,
            [BpfObject {
                offset,
                programs: vec!["module_free".to_owned(), "module_load".to_owned()]
            }]
        );
        // An object of another machine is not an eBPF object.
        let mut other = bpf_object(&["module_load"]);
        other[18..20].copy_from_slice(&EM_AARCH64.0.to_le_bytes());
        assert!(bpf_programs(&other).is_none());
    }
}
