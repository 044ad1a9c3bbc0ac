//! Tracepoint record layouts from tracefs `events/<group>/<event>/format`,
//! turned into the `TracepointLayout` global the eBPF program reads. Field
//! offsets differ between kernels; nothing here assumes one layout.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use monitor_common::{FieldOffset, TracepointLayout};

/// One `field:` line of a format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// The C declaration without the name, e.g. `__data_loc char[]`.
    pub ctype: String,
    pub offset: u32,
    pub size: u32,
}

/// Problems reading or interpreting a format file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// No tracefs mount with the event was found.
    #[error("tracepoint {event} not found under {searched}")]
    NotFound { event: String, searched: String },
    /// The format file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A `field:` line did not parse.
    #[error("{path} line {line}: {problem}")]
    Parse {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    /// A field the program needs is missing or has an unexpected type/size.
    #[error("{event}: field {field}: {problem}")]
    Field {
        event: String,
        field: String,
        problem: String,
    },
}

/// Parses the `field:` lines of a format file into name -> field.
///
/// # Errors
/// A `field:` line without offset/size, or with non-numeric values.
pub fn parse_format(text: &str, path: &Path) -> Result<BTreeMap<String, Field>, FormatError> {
    let mut fields = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let Some(rest) = line.trim().strip_prefix("field:") else {
            continue;
        };
        let err = |problem: &str| FormatError::Parse {
            path: path.to_path_buf(),
            line: line_no,
            problem: problem.to_owned(),
        };
        let mut parts = rest.split(';').map(str::trim);
        let decl = parts.next().ok_or_else(|| err("empty field line"))?;
        let mut offset = None;
        let mut size = None;
        for part in parts {
            if let Some(v) = part.strip_prefix("offset:") {
                offset = Some(
                    v.parse::<u32>()
                        .map_err(|_| err("offset is not a number"))?,
                );
            } else if let Some(v) = part.strip_prefix("size:") {
                size = Some(v.parse::<u32>().map_err(|_| err("size is not a number"))?);
            }
        }
        let (Some(offset), Some(size)) = (offset, size) else {
            return Err(err("field without offset or size"));
        };
        // The name is the last identifier; array suffixes stay in the type
        // (`__data_loc char[] name`, `char comm[16]`).
        let (ctype, name) = match decl.rsplit_once(' ') {
            Some((t, n)) => (t.trim(), n.trim()),
            None => return Err(err("field declaration without a name")),
        };
        let (name, ctype) = match name.split_once('[') {
            Some((n, dim)) => (n, format!("{ctype}[{dim}")),
            None => (name, ctype.to_owned()),
        };
        fields.insert(
            name.to_owned(),
            Field {
                ctype,
                offset,
                size,
            },
        );
    }
    Ok(fields)
}

/// Where to look for tracefs, in order: the host root's mounts first
/// (`--host-root`), then the daemon's own, both the modern mount point and
/// the debugfs one.
#[must_use]
pub fn candidate_dirs(host_tracing: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs = host_tracing.to_vec();
    for d in crate::host::HostRoot::default().tracefs_candidates() {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// Reads `events/<group>/<event>/format` from the first directory that has it.
///
/// # Errors
/// When no directory has the event, or it cannot be read/parsed.
pub fn read_event(
    dirs: &[PathBuf],
    group: &str,
    event: &str,
) -> Result<BTreeMap<String, Field>, FormatError> {
    for dir in dirs {
        let path = dir.join("events").join(group).join(event).join("format");
        match fs::read_to_string(&path) {
            Ok(text) => return parse_format(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(FormatError::Read { path, source }),
        }
    }
    Err(FormatError::NotFound {
        event: format!("{group}:{event}"),
        searched: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Looks up `field` and checks its type and size.
fn pick(
    fields: &BTreeMap<String, Field>,
    event: &str,
    field: &str,
    want_type: &[&str],
    want_size: u32,
) -> Result<FieldOffset, FormatError> {
    let bad = |problem: String| FormatError::Field {
        event: event.to_owned(),
        field: field.to_owned(),
        problem,
    };
    let f = fields
        .get(field)
        .ok_or_else(|| bad("not in the format".to_owned()))?;
    if !want_type.iter().any(|t| f.ctype == *t) {
        return Err(bad(format!(
            "type {:?}, expected one of {want_type:?}",
            f.ctype
        )));
    }
    if f.size != want_size {
        return Err(bad(format!("size {}, expected {want_size}", f.size)));
    }
    Ok(FieldOffset {
        offset: f.offset,
        present: 1,
    })
}

const DATA_LOC: &[&str] = &["__data_loc char[]"];

/// The module tracepoints' layout. All three are required.
///
/// # Errors
/// When a tracepoint is missing or a field has an unexpected shape.
pub fn module_layout(
    load: &BTreeMap<String, Field>,
    free: &BTreeMap<String, Field>,
    request: &BTreeMap<String, Field>,
) -> Result<TracepointLayout, FormatError> {
    Ok(TracepointLayout {
        load_name: pick(load, "module:module_load", "name", DATA_LOC, 4)?,
        load_taints: pick(load, "module:module_load", "taints", &["unsigned int"], 4)?,
        free_name: pick(free, "module:module_free", "name", DATA_LOC, 4)?,
        request_name: pick(request, "module:module_request", "name", DATA_LOC, 4)?,
        request_wait: pick(
            request,
            "module:module_request",
            "wait",
            &["bool", "_Bool"],
            1,
        )?,
        ..TracepointLayout::default()
    })
}

/// Fills in a syscall-exit `ret` field (`long ret`, 8 bytes).
///
/// # Errors
/// When `ret` is missing or not a long.
pub fn syscall_ret(
    fields: &BTreeMap<String, Field>,
    event: &str,
) -> Result<FieldOffset, FormatError> {
    pick(fields, event, "ret", &["long"], 8)
}

/// The `delete_module` entry's user name pointer.
///
/// # Errors
/// When `name_user` is missing or not a pointer.
pub fn delete_name(fields: &BTreeMap<String, Field>) -> Result<FieldOffset, FormatError> {
    pick(
        fields,
        "syscalls:sys_enter_delete_module",
        "name_user",
        &["const char *"],
        8,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> BTreeMap<String, Field> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/source/fixtures")
            .join(name);
        let text = fs::read_to_string(&path).unwrap();
        parse_format(&text, &path).unwrap()
    }

    #[test]
    fn parses_module_load_6_1() {
        let f = fixture("module_load.format.debian-6.1");
        assert_eq!(
            f["name"],
            Field {
                ctype: "__data_loc char[]".into(),
                offset: 12,
                size: 4
            }
        );
        assert_eq!(f["taints"].offset, 8);
        assert_eq!(f["common_pid"].offset, 4);
    }

    #[test]
    fn layout_from_real_formats_of_every_test_kernel() {
        for k in [
            "5.10",
            "6.1",
            "6.12",
            "6.17",
            "6.1-arm64",
            "6.12-arm64",
            "6.17-arm64",
        ] {
            let f = |e: &str| fixture(&format!("{e}.format.debian-{k}"));
            let layout = module_layout(&f("module_load"), &f("module_free"), &f("module_request"))
                .unwrap_or_else(|e| panic!("{k}: {e}"));
            assert_eq!(
                (layout.load_name.offset, layout.load_taints.offset),
                (12, 8),
                "{k}"
            );
            assert_eq!(layout.free_name.offset, 8, "{k}");
            assert_eq!(
                (layout.request_wait.offset, layout.request_name.offset),
                (16, 20),
                "{k}"
            );
            for exit in [
                "sys_exit_finit_module",
                "sys_exit_init_module",
                "sys_exit_delete_module",
            ] {
                let ret = syscall_ret(&f(exit), exit).unwrap_or_else(|e| panic!("{k}: {e}"));
                assert_eq!(
                    ret,
                    FieldOffset {
                        offset: 16,
                        present: 1
                    },
                    "{k} {exit}"
                );
            }
            let name = delete_name(&f("sys_enter_delete_module")).unwrap();
            assert_eq!(name.offset, 16, "{k}");
        }
    }

    #[test]
    fn rejects_a_changed_field_type() {
        let mut load = fixture("module_load.format.debian-6.1");
        load.get_mut("name").unwrap().ctype = "char[56]".into();
        let err = module_layout(
            &load,
            &fixture("module_free.format.debian-6.1"),
            &fixture("module_request.format.debian-6.1"),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("module:module_load: field name: type"),
            "{err}"
        );
    }

    #[test]
    fn bad_line_names_file_and_line() {
        let text = "name: x\nformat:\n\tfield:int a;\toffset:zz;\tsize:4;\n";
        let err = parse_format(text, Path::new("/t/format")).unwrap_err();
        assert_eq!(err.to_string(), "/t/format line 3: offset is not a number");
    }

    #[test]
    fn missing_event_names_what_was_searched() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_event(&[dir.path().to_path_buf()], "module", "module_load").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("tracepoint module:module_load not found under ")
        );
    }
}
