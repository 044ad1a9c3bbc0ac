//! `kmod-monitor log show`: the records of one or more log files, in seq
//! order, as a readable timeline or as their raw JSON lines, filtered by
//! module, time and kind (filters combine: a record must pass all of them).
//!
//! Times for `--since`/`--until` are RFC 3339 in UTC
//! (`2026-11-25T12:29:53Z`, fractions allowed, `T` or a space, `Z` optional),
//! a date alone (`2026-11-25`, midnight UTC), `now`, or a duration ago
//! (`10m ago`, `2h 30m ago`, `3days ago`). `--since` is inclusive, `--until`
//! exclusive.
//!
//! The timeline never writes a control character: every text in a record
//! can come from an actor (a process sets its own `comm`) or from whoever
//! edited the file, so it is escaped ([`escape_controls`]) before it
//! reaches a terminal. `--json` prints the lines as they are; JSON already
//! escapes every character below U+0020.
use std::{
    borrow::Cow,
    fmt::Write as _,
    io::{self, Write},
    path::PathBuf,
    time::{Duration, SystemTime},
};

use super::{
    record::{Record, RecordKind, RequirementEffect},
    verify::{self, ReadError},
};
use crate::names::{ModuleName, NameError};

/// Bad `log show` input, or a file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ShowError {
    /// `--since`/`--until` is not a time.
    #[error(
        "{flag} {input:?}: not a time (give RFC 3339 UTC like 2026-11-25T12:29:53Z, a date like 2026-11-25, \"now\", or a duration ago like \"10m ago\")"
    )]
    BadTime {
        /// `--since` or `--until`.
        flag: &'static str,
        /// The value as given.
        input: String,
    },
    /// `--kind` is not a record kind.
    #[error("--kind {input:?}: unknown record kind (known: {})", known_kinds())]
    UnknownKind {
        /// The value as given.
        input: String,
    },
    /// `--module` is not a module name.
    #[error("--module {:?}: {}", .error.input, .error.problem)]
    BadModule {
        /// What is wrong with it.
        error: NameError,
    },
    /// A log file cannot be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Standard output failed.
    #[error("writing the output: {0}")]
    Write(#[from] io::Error),
}

fn known_kinds() -> String {
    RecordKind::ALL
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which records to show.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Records about this module (and snapshots listing it).
    pub module: Option<ModuleName>,
    /// At or after this time.
    pub since: Option<SystemTime>,
    /// Before this time.
    pub until: Option<SystemTime>,
    /// Any of these kinds (all when empty).
    pub kinds: Vec<RecordKind>,
}

impl Filter {
    /// Whether `r` passes every filter.
    #[must_use]
    pub fn matches(&self, r: &Record) -> bool {
        if let Some(m) = &self.module {
            let about = r.module_name() == Some(m.as_str())
                || (r.kind == RecordKind::Snapshot
                    && r.modules.iter().any(|s| s.name == m.as_str()));
            if !about {
                return false;
            }
        }
        if !self.kinds.is_empty() && !self.kinds.contains(&r.kind) {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Ok(t) = humantime::parse_rfc3339_weak(&r.time) else {
                return false;
            };
            if self.since.is_some_and(|since| t < since)
                || self.until.is_some_and(|until| t >= until)
            {
                return false;
            }
        }
        true
    }
}

/// Parses a `--since`/`--until` value (see the module doc); `now` is the
/// reference for `... ago`.
///
/// # Errors
/// [`ShowError::BadTime`] naming the flag and the input.
pub fn parse_time(
    flag: &'static str,
    input: &str,
    now: SystemTime,
) -> Result<SystemTime, ShowError> {
    let bad = || ShowError::BadTime {
        flag,
        input: input.to_owned(),
    };
    let text = input.trim();
    if text == "now" {
        return Ok(now);
    }
    if let Some(ago) = text.strip_suffix("ago") {
        let d: Duration = humantime::parse_duration(ago.trim()).map_err(|_| bad())?;
        return now.checked_sub(d).ok_or_else(bad);
    }
    if text.len() == "2026-11-25".len() {
        return humantime::parse_rfc3339_weak(&format!("{text}T00:00:00Z")).map_err(|_| bad());
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| bad())
}

/// Parses a `--kind` value.
///
/// # Errors
/// [`ShowError::UnknownKind`] listing the known kinds.
pub fn parse_kind(input: &str) -> Result<RecordKind, ShowError> {
    RecordKind::parse(input.trim()).ok_or_else(|| ShowError::UnknownKind {
        input: input.to_owned(),
    })
}

/// Parses a `--module` value.
///
/// # Errors
/// [`ShowError::BadModule`] when it cannot be a module name.
pub fn parse_module(input: &str) -> Result<ModuleName, ShowError> {
    ModuleName::parse(input).map_err(|error| ShowError::BadModule { error })
}

/// Writes the records of `paths` that pass `filter` to `out`, as a timeline
/// or (`json`) as the exact lines of the files. Returns warnings about lines
/// that are not records (for stderr).
///
/// # Errors
/// When a file cannot be read or `out` fails.
pub fn show(
    paths: &[PathBuf],
    filter: &Filter,
    json: bool,
    out: &mut dyn Write,
) -> Result<Vec<String>, ShowError> {
    let (ordered, _) = verify::order_files(paths)?;
    let mut warnings = Vec::new();
    for path in &ordered {
        let text = std::fs::read(path).map_err(|error| ReadError {
            path: path.clone(),
            error,
        })?;
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let record: Record = match serde_json::from_slice(line) {
                Ok(r) => r,
                Err(e) => {
                    // serde's message can quote the line's content.
                    warnings.push(
                        escape_controls(&format!(
                            "{}:{}: not a record, skipped ({e})",
                            path.display(),
                            i + 1
                        ))
                        .into_owned(),
                    );
                    continue;
                }
            };
            if !filter.matches(&record) {
                continue;
            }
            if json {
                out.write_all(line)?;
                out.write_all(b"\n")?;
            } else {
                writeln!(out, "{}", timeline(&record))?;
            }
        }
    }
    Ok(warnings)
}

/// One record as a timeline line: time, seq, kind, module, then what
/// happened (actor, state, requirement effect), with every control
/// character escaped ([`escape_controls`]).
#[must_use]
pub fn timeline(r: &Record) -> String {
    let module = r.module_name().unwrap_or("-");
    let line = format!(
        "{}  #{:<6} {:<20} {:<16} {}",
        r.time,
        r.seq,
        r.kind.as_str(),
        module,
        detail(r)
    );
    escape_controls(line.trim_end()).into_owned()
}

/// Whether `c` could steer a terminal or hide text: a control character
/// (C0, DEL, C1: ESC, CR, BEL, CSI, ...), a bidirectional formatting
/// character (which reorders what follows it), or a line or paragraph
/// separator.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// `text` as it can be printed on a terminal: every character
/// [`is_unsafe`] as its Rust escape (`\u{1b}`, `\r`, `\u{202e}`), and `\`
/// as `\\`, so an escape in the output always stands for the character.
/// Printable text, other scripts and symbols (`→`) stay as they are.
#[must_use]
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c == '\\' || is_unsafe(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c == '\\' || is_unsafe(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "UNMET" }
}

fn effects(reqs: &[RequirementEffect]) -> String {
    reqs.iter()
        .map(|e| {
            if e.changed {
                format!("{}: {} → {}", e.name, verdict(!e.met), verdict(e.met))
            } else {
                format!("{}: {}", e.name, verdict(e.met))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn actor(r: &Record) -> String {
    let Some(a) = &r.actor else {
        return match &r.source {
            Some(source) => format!("actor unknown ({source})"),
            None => "actor unknown".to_owned(),
        };
    };
    let mut s = format!("by {} (pid {}, uid {}", a.comm, a.tgid, a.uid);
    if let Some(id) = &a.container_id {
        let _ = write!(s, ", container {}", id.get(..12).unwrap_or(id));
    }
    if let Some(pod) = &a.pod_uid {
        let _ = write!(s, ", pod {pod}");
    }
    s.push(')');
    s
}

fn join(parts: &[String]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join("  ")
}

fn detail(r: &Record) -> String {
    match r.kind {
        RecordKind::ModuleLoad
        | RecordKind::ModuleLoaded
        | RecordKind::ModuleLoadFailed
        | RecordKind::ModuleUnloadBegin
        | RecordKind::ModuleUnload
        | RecordKind::ModuleUnloadFailed
        | RecordKind::ModuleRequest => join(&[
            actor(r),
            if r.historical {
                "(before start-up: history only)".to_owned()
            } else {
                String::new()
            },
            r.module
                .as_ref()
                .and_then(|m| m.taints.as_deref())
                .filter(|t| !t.is_empty())
                .map(|t| format!("taints {t}"))
                .unwrap_or_default(),
            effects(&r.requirements),
        ]),
        RecordKind::Drift => join(&[
            r.state
                .as_ref()
                .map(|s| format!("tracked {}, actually {}", s.from, s.to))
                .unwrap_or_default(),
            effects(&r.requirements),
        ]),
        RecordKind::Snapshot => join(&[
            r.modules
                .iter()
                .map(|m| format!("{}={}", m.name, m.state))
                .collect::<Vec<_>>()
                .join(" "),
            effects(&r.requirements),
        ]),
        RecordKind::EventsLost => join(&[
            r.lost_total
                .map(|n| format!("{n} events lost in all"))
                .unwrap_or_default(),
            r.reason.clone().unwrap_or_default(),
        ]),
        RecordKind::MonitorStart => r.monitor.as_ref().map_or_else(String::new, |m| {
            format!(
                "kmod-monitor {} on kernel {}, source {}, groups {}, config {} sha256 {}",
                m.version,
                m.kernel_release,
                m.source,
                m.groups.join(","),
                m.config_file.as_deref().unwrap_or("(none)"),
                m.config_digest.get(..12).unwrap_or(&m.config_digest)
            )
        }),
        RecordKind::MonitorStop => r.reason.clone().unwrap_or_default(),
        RecordKind::ConfigReload => r.config.as_ref().map_or_else(String::new, |c| {
            if c.accepted {
                join(&[
                    format!(
                        "{} accepted (sha256 {}), groups {}",
                        c.file,
                        c.digest
                            .as_deref()
                            .map_or("?", |d| d.get(..12).unwrap_or(d)),
                        c.groups.join(",")
                    ),
                    effects(&r.requirements),
                ])
            } else {
                format!(
                    "{} REJECTED, old config kept: {}",
                    c.file,
                    c.error.as_deref().unwrap_or("?")
                )
            }
        }),
        RecordKind::RequirementChange => r.requirement.as_ref().map_or_else(String::new, |q| {
            let mut s = format!("{}: {} → {}", q.name, verdict(q.was), verdict(q.met));
            if let Some(cause) = r.cause {
                let _ = write!(s, " (after {cause}");
                if let Some(m) = r.module_name() {
                    let _ = write!(s, " of {m}");
                }
                s.push(')');
            }
            s
        }),
        RecordKind::LogRecovered => {
            let lines = r
                .torn
                .iter()
                .map(|t| {
                    format!(
                        "line {} ({} bytes{})",
                        t.line,
                        t.bytes,
                        if t.unterminated { ", no newline" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "torn {lines}; the chain continues after seq {}",
                r.after_seq.unwrap_or_default()
            )
        }
        RecordKind::LogDropped => format!(
            "{} records could not be held while the disk failed",
            r.dropped.unwrap_or_default()
        ),
        RecordKind::ModuleUnloadDenied => join(&[
            actor(r),
            r.denied
                .as_ref()
                .map(|d| {
                    format!(
                        "{} refused attempt(s) in {} s (and {} more by anyone over the kernel's rate limit)",
                        d.count, d.window_secs, d.suppressed_in_window
                    )
                })
                .unwrap_or_default(),
        ]),
        RecordKind::RequirementEnablement => r.enablement.as_ref().map_or_else(String::new, |e| {
            let word = |b: Option<bool>| match b {
                Some(true) => "enabled",
                Some(false) => "disabled",
                None => "unknown",
            };
            format!(
                "{}: {} → {} by {}: {}",
                e.requirement,
                word(e.was),
                word(e.enabled),
                e.source,
                e.reason
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::forensic::{
        chain::{Head, seal},
        record::{ActorInfo, ModuleInfo, RequirementFlip},
        stamp,
    };

    const CID: &str = "3f2a1b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a";

    fn unload(module: &str, time: &str) -> Record {
        let mut r = Record::new(RecordKind::ModuleUnload, 77);
        stamp(&mut r, &"boot".into(), &"node-a".into());
        r.time = time.into();
        r.module = Some(ModuleInfo {
            name: module.into(),
            taints: None,
        });
        r.actor = Some(ActorInfo {
            pid: 105,
            tgid: 105,
            comm: "rmmod".into(),
            container_id: Some(CID.into()),
            read_late: true,
            ..ActorInfo::default()
        });
        r.source = Some("ebpf".into());
        r.requirements = vec![RequirementEffect {
            name: "v2-data-engine".into(),
            met: false,
            changed: true,
        }];
        r
    }

    fn change(time: &str) -> Record {
        let mut r = Record::new(RecordKind::RequirementChange, 77);
        stamp(&mut r, &"boot".into(), &"node-a".into());
        r.time = time.into();
        r.module = Some(ModuleInfo {
            name: "nvme_tcp".into(),
            taints: None,
        });
        r.requirement = Some(RequirementFlip {
            name: "v2-data-engine".into(),
            was: true,
            met: false,
        });
        r.cause = Some(RecordKind::ModuleUnload);
        r
    }

    fn log_file(dir: &std::path::Path, records: &[Record]) -> PathBuf {
        let mut head = Head::genesis();
        let mut text = String::new();
        for r in records {
            let sealed = seal(&mut r.clone(), &head).unwrap();
            text.push_str(&sealed.line);
            head = sealed.head;
        }
        let path = dir.join("events.jsonl");
        fs::write(&path, text).unwrap();
        path
    }

    fn run(paths: &[PathBuf], filter: &Filter, json: bool) -> String {
        let mut out = Vec::new();
        show(paths, filter, json, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn timeline_names_time_kind_module_actor_and_effect() {
        let mut r = unload("nvme_tcp", "2026-11-25T12:29:53.656000000Z");
        r.seq = 42;
        assert_eq!(
            timeline(&r),
            "2026-11-25T12:29:53.656000000Z  #42     module_unload        nvme_tcp         \
             by rmmod (pid 105, uid 0, container 3f2a1b9c8d7e)  v2-data-engine: met → UNMET"
        );
        let mut c = change("2026-11-25T12:29:53.656000001Z");
        c.seq = 43;
        assert!(
            timeline(&c).ends_with("v2-data-engine: met → UNMET (after module_unload of nvme_tcp)"),
            "{}",
            timeline(&c)
        );
        let mut poll = unload("dm_crypt", "t");
        poll.actor = None;
        poll.source = Some("poll".into());
        poll.requirements[0].changed = false;
        assert!(
            timeline(&poll).ends_with("actor unknown (poll)  v2-data-engine: UNMET"),
            "{}",
            timeline(&poll)
        );
    }

    #[test]
    fn control_characters_in_any_field_are_escaped() {
        let mut r = unload("nvme_tcp", "2026-11-25T12:29:53.656000000Z\u{1b}[1A");
        r.actor.as_mut().unwrap().comm = "\u{1b}[2K\rrmmod\u{7}".into();
        r.actor.as_mut().unwrap().pod_uid = Some("pod\u{9b}0m\u{202e}".into());
        r.requirements[0].name = "v2\nforged line".into();
        let line = timeline(&r);
        assert!(
            !line.chars().any(is_unsafe),
            "nothing that steers a terminal: {line:?}"
        );
        assert!(
            line.contains(r"by \u{1b}[2K\rrmmod\u{7} (pid 105"),
            "{line}"
        );
        assert!(line.contains(r"pod pod\u{9b}0m\u{202e})"), "{line}");
        assert!(line.contains(r"v2\nforged line: met → UNMET"), "{line}");
        assert!(line.contains(r"53.656000000Z\u{1b}[1A  #"), "{line}");
        for kind in RecordKind::ALL {
            let mut r = Record::new(kind, 1);
            r.reason = Some("\u{1b}]0;title\u{7}".into());
            r.time = "\u{7f}".into();
            let line = timeline(&r);
            assert!(!line.chars().any(is_unsafe), "{kind}: {line:?}");
        }
    }

    #[test]
    fn escaping_is_unambiguous_and_leaves_plain_text_alone() {
        assert!(matches!(
            escape_controls("by rmmod → UNMET, ünïcode"),
            Cow::Borrowed(_)
        ));
        // A literal backslash sequence cannot pass for an escaped character.
        assert_eq!(escape_controls(r"\u{1b}"), r"\\u{1b}");
        assert_eq!(escape_controls("\u{1b}"), r"\u{1b}");
        assert_eq!(escape_controls("a\tb\0"), r"a\tb\0");
    }

    #[test]
    fn filters_combine() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_file(
            dir.path(),
            &[
                unload("dm_crypt", "2026-11-25T10:00:00.000000000Z"),
                unload("nvme_tcp", "2026-11-25T11:00:00.000000000Z"),
                change("2026-11-25T11:00:00.000000001Z"),
                unload("nvme_tcp", "2026-11-25T12:00:00.000000000Z"),
            ],
        );
        let paths = [path];
        let all = run(&paths, &Filter::default(), false);
        assert_eq!(all.lines().count(), 4, "{all}");

        let nvme = Filter {
            module: Some(parse_module("nvme-tcp").unwrap()),
            ..Filter::default()
        };
        assert_eq!(run(&paths, &nvme, false).lines().count(), 3);

        let window = Filter {
            since: Some(parse_time("--since", "2026-11-25T11:00:00Z", SystemTime::now()).unwrap()),
            until: Some(parse_time("--until", "2026-11-25 12:00:00", SystemTime::now()).unwrap()),
            kinds: vec![RecordKind::ModuleUnload],
            module: Some(parse_module("nvme_tcp").unwrap()),
        };
        let out = run(&paths, &window, false);
        assert_eq!(
            out.lines().count(),
            1,
            "since inclusive, until exclusive: {out}"
        );
        assert!(out.contains("11:00:00.000000000Z"), "{out}");

        let json = run(&paths, &window, true);
        let text = fs::read_to_string(&paths[0]).unwrap();
        assert_eq!(
            json,
            format!("{}\n", text.lines().nth(1).unwrap()),
            "the exact line"
        );
    }

    #[test]
    fn unparsable_lines_are_skipped_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_file(dir.path(), &[unload("dm_crypt", "t")]);
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("{\"v\":1,\"se");
        fs::write(&path, text).unwrap();
        let mut out = Vec::new();
        let warnings = show(&[path], &Filter::default(), false, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 1);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("events.jsonl:2: not a record"),
            "{warnings:?}"
        );
    }

    #[test]
    fn bad_times_kinds_and_modules_name_the_input() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        for bad in ["yesterday", "2026-13-01", "10 parsecs ago", ""] {
            let err = parse_time("--since", bad, now).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("--since {bad:?}: not a time")),
                "{err}"
            );
        }
        assert_eq!(
            parse_time("--until", "10m ago", now).unwrap(),
            now - Duration::from_secs(600)
        );
        assert_eq!(parse_time("--until", "now", now).unwrap(), now);
        assert_eq!(
            parse_time("--since", "1970-01-02", now).unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(86_400)
        );
        let err = parse_kind("unload").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("--kind \"unload\": unknown record kind (known: module_load, "),
            "{msg}"
        );
        assert!(msg.contains("module_unload"), "{msg}");
        assert_eq!(parse_kind("drift").unwrap(), RecordKind::Drift);
        let err = parse_module("nvme tcp").unwrap_err();
        assert!(
            err.to_string().starts_with("--module \"nvme tcp\": "),
            "{err}"
        );
    }
}
