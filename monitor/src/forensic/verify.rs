//! `kmod-monitor log verify`: walks the hash chain through the given log
//! files (ordered by their first seq, whatever the command-line order) and
//! names the first line where it breaks, and how.
//!
//! Per record it checks: the line is a JSON object of schema version 1; its
//! `hash` matches its content; the line is in canonical form; its `seq` is
//! the previous one + 1 (it never wraps, and is never 0); its `prev_hash` is
//! the previous record's `hash`.
//! Unparsable lines (torn writes) are accepted only when the next record is
//! the `log_recovered` record that names exactly them.
//!
//! What it cannot see: the chain is anchored at the first record given.
//! Records cut from the start of the oldest file, or whole records cut from
//! the end of the newest, leave a shorter chain that is still intact;
//! compare the last `seq`/`hash` with the daemon's (`/status` →
//! `event_log`, or its "event log closed" line) to catch that. Anyone who
//! can write the files can also rewrite the whole chain after an edit; the
//! chain makes that detectable against any hash kept elsewhere.
use std::{
    collections::HashMap,
    fmt,
    fs::File,
    io::{self, BufRead as _, BufReader},
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};

use super::{
    chain::{GENESIS, Head, canonical, record_hash},
    record::{RecordKind, SCHEMA_VERSION, TornLine},
};

/// A log file that cannot be read at all (exit 2, not a verdict).
#[derive(Debug, thiserror::Error)]
#[error("event log {}: cannot read it: {error}", path.display())]
pub struct ReadError {
    /// The file.
    pub path: PathBuf,
    /// The OS error.
    pub error: io::Error,
}

/// What is wrong at a line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Defect {
    /// The content does not hash to the stored `hash`.
    #[error("edited record: its hash {stored} does not match its content (SHA-256 {computed})")]
    Edited {
        /// The `hash` in the line.
        stored: String,
        /// The hash of the line's content.
        computed: String,
    },
    /// The hash matches but the bytes are not the canonical form.
    #[error(
        "edited record: the line is not in canonical form (spacing, key order or a duplicate key was changed)"
    )]
    NotCanonical,
    /// A line that is not a record, with no recovery record naming it.
    #[error("not a record ({error}), and no log_recovered record names it")]
    Unparsable {
        /// Why it does not parse.
        error: String,
    },
    /// The file ends in a torn line that no recovery record names.
    #[error(
        "truncated file: torn last line ({bytes} bytes, no newline) and no log_recovered record after it (the writer was cut off and has not restarted since, or the file was cut)"
    )]
    Truncated {
        /// Its length.
        bytes: u64,
    },
    /// A JSON object that lacks a member every record has.
    #[error("not a valid record: {problem}")]
    Malformed {
        /// Which member is missing or of the wrong type.
        problem: String,
    },
    /// A schema version this build does not know.
    #[error("schema version v={v} is not supported (this build writes v={SCHEMA_VERSION})")]
    UnsupportedVersion {
        /// The `v` found.
        v: u64,
    },
    /// Records between two seqs are missing.
    #[error(
        "deleted record(s): seq jumps from {prev_seq} (at {prev_at}) to {seq}; seq {} missing",
        missing(*prev_seq + 1, *seq - 1)
    )]
    Deleted {
        /// The record before the gap.
        prev_seq: u64,
        /// Where it is, `FILE:LINE`.
        prev_at: String,
        /// This record's seq.
        seq: u64,
    },
    /// The record before has the largest seq there is, so nothing can
    /// follow it: seq never wraps.
    #[error(
        "seq wraps: seq {seq} follows seq {prev_seq} (at {prev_at}), the largest seq there is; seq never wraps, so no record can follow it"
    )]
    SeqWraps {
        /// This record's seq.
        seq: u64,
        /// The record before.
        prev_seq: u64,
        /// Where it is, `FILE:LINE`.
        prev_at: String,
    },
    /// Records are not in seq order.
    #[error("out of order: seq {seq} where seq {expected} should follow seq {prev_seq} (at {prev_at}){}", .found_at.as_ref().map(|at| format!("; seq {expected} is at {at}")).unwrap_or_default())]
    OutOfOrder {
        /// This record's seq.
        seq: u64,
        /// The seq that should be here.
        expected: u64,
        /// The record before.
        prev_seq: u64,
        /// Where it is, `FILE:LINE`.
        prev_at: String,
        /// Where the expected record is, if it is further on.
        found_at: Option<String>,
    },
    /// The seq follows but `prev_hash` does not link.
    #[error(
        "forged record: prev_hash {prev_hash} is not the hash of the previous record (seq {prev_seq} at {prev_at}, hash {expected}); this record was made up with a recomputed hash, or the previous one was altered and re-hashed"
    )]
    Forged {
        /// The `prev_hash` in the line.
        prev_hash: String,
        /// The previous record's seq.
        prev_seq: u64,
        /// Where it is, `FILE:LINE`.
        prev_at: String,
        /// Its hash.
        expected: String,
    },
    /// A `log_recovered` record that does not match the lines before it.
    #[error(
        "log_recovered record names torn line(s) {named:?}, but the unparsable line(s) before it are {found:?}"
    )]
    BadRecovery {
        /// The line numbers it names.
        named: Vec<u64>,
        /// The unparsable lines actually before it.
        found: Vec<u64>,
    },
}

fn missing(first: u64, last: u64) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}..={last}")
    }
}

/// The first place the chain breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: u64,
    /// What is wrong there.
    pub defect: Defect,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.defect)
    }
}

/// The verdict on a set of files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The files in chain order.
    pub files: Vec<PathBuf>,
    /// Records checked (up to the problem, if any).
    pub records: u64,
    /// Seq of the first record (0 when there is none).
    pub first_seq: u64,
    /// Whether the first record is the first ever (seq 1, genesis
    /// prev_hash), rather than an anchor after rotated-away records.
    pub from_genesis: bool,
    /// The last good record.
    pub last: Option<Head>,
    /// Things worth knowing that are not tampering (recovered torn lines,
    /// where the chain starts).
    pub notes: Vec<String>,
    /// The first break, if any.
    pub problem: Option<Problem>,
}

impl Report {
    /// 0 when intact, 1 when broken.
    #[must_use]
    pub const fn exit_code(&self) -> u8 {
        if self.problem.is_some() { 1 } else { 0 }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(problem) = &self.problem {
            writeln!(f, "FAILED {problem}")?;
        } else {
            let span = match &self.last {
                Some(last) => format!("seq {}..={}", self.first_seq, last.seq),
                None => "no records".to_owned(),
            };
            writeln!(
                f,
                "OK {} records in {} file(s), {span}",
                self.records,
                self.files.len()
            )?;
            if let Some(last) = &self.last {
                writeln!(f, "last hash {}", last.hash)?;
            }
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

/// One line of a file.
struct Line {
    number: u64,
    /// Without its newline.
    body: Vec<u8>,
    terminated: bool,
}

/// Calls `each` for every line of `path`.
fn for_each_line(path: &Path, mut each: impl FnMut(Line) -> bool) -> Result<(), ReadError> {
    let err = |error| ReadError {
        path: path.to_path_buf(),
        error,
    };
    let mut reader = BufReader::new(File::open(path).map_err(err)?);
    let mut number = 0;
    loop {
        let mut body = Vec::new();
        if reader.read_until(b'\n', &mut body).map_err(err)? == 0 {
            return Ok(());
        }
        number += 1;
        let terminated = body.last() == Some(&b'\n');
        if terminated {
            body.pop();
        }
        if !each(Line {
            number,
            body,
            terminated,
        }) {
            return Ok(());
        }
    }
}

fn seq_of(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(body)
        .ok()?
        .get("seq")?
        .as_u64()
}

/// Where each seq first occurs: file and line.
pub type SeqIndex = HashMap<u64, (PathBuf, u64)>;

/// `paths` in chain order (by first seq; files without a record last), with
/// each seq's first position as (order index, line).
///
/// # Errors
/// When a file cannot be read.
pub fn order_files(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, SeqIndex), ReadError> {
    let mut firsts = Vec::new();
    let mut seqs = HashMap::new();
    for path in paths {
        let mut first = None;
        for_each_line(path, |line| {
            if let Some(seq) = seq_of(&line.body) {
                first.get_or_insert(seq);
                seqs.entry(seq).or_insert((path.clone(), line.number));
            }
            true
        })?;
        firsts.push((first.unwrap_or(u64::MAX), path.clone()));
    }
    firsts.sort_by_key(|(first, _)| *first);
    Ok((firsts.into_iter().map(|(_, p)| p).collect(), seqs))
}

/// Verifies the chain through `paths`.
///
/// # Errors
/// When a file cannot be read (not a verdict: the caller exits 2).
pub fn verify(paths: &[PathBuf]) -> Result<Report, ReadError> {
    let (ordered, seqs) = order_files(paths)?;
    let mut v = Verifier {
        report: Report {
            files: ordered.clone(),
            ..Report::default()
        },
        seqs,
        order: ordered.clone(),
        prev: None,
        bad: Vec::new(),
    };
    for (index, path) in ordered.iter().enumerate() {
        let mut any = false;
        for_each_line(path, |line| {
            any = true;
            v.line(index, path, &line);
            v.report.problem.is_none()
        })?;
        if v.report.problem.is_some() {
            break;
        }
        v.end_of_file(path);
        if v.report.problem.is_some() {
            break;
        }
        if !any {
            v.report
                .notes
                .push(format!("{}: empty file", path.display()));
        }
    }
    Ok(v.report)
}

/// An unparsable line waiting for its recovery record.
struct Bad {
    file: PathBuf,
    torn: TornLine,
    error: String,
}

struct Verifier {
    report: Report,
    seqs: SeqIndex,
    order: Vec<PathBuf>,
    /// The last good record and where it is.
    prev: Option<(Head, String)>,
    bad: Vec<Bad>,
}

impl Verifier {
    fn fail(&mut self, path: &Path, line: u64, defect: Defect) {
        self.report.problem = Some(Problem {
            file: path.to_path_buf(),
            line,
            defect,
        });
    }

    fn line(&mut self, index: usize, path: &Path, line: &Line) {
        let map = match serde_json::from_slice::<Value>(&line.body) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return self.bad_line(path, line, "not a JSON object".to_owned()),
            Err(e) => return self.bad_line(path, line, e.to_string()),
        };
        if let Err(defect) = self.check_record(&map, &line.body) {
            return self.fail(path, line.number, defect);
        }
        let (seq, hash, prev_hash) = match fields(&map) {
            Ok(f) => f,
            Err(defect) => return self.fail(path, line.number, defect),
        };
        if let Err(problem) = self.check_recovery(&map, path, line.number, seq) {
            self.report.problem = Some(problem);
            return;
        }
        if let Err(defect) = self.check_link(index, seq, &prev_hash) {
            return self.fail(path, line.number, defect);
        }
        if self.prev.is_none() {
            self.report.first_seq = seq;
            self.report.from_genesis = seq == 1 && prev_hash == GENESIS;
            self.report.notes.push(if self.report.from_genesis {
                "the chain starts at seq 1, the first record ever".to_owned()
            } else {
                format!(
                    "the chain starts at seq {seq} ({}:{}); the records before it are not among the given files (rotated away?)",
                    path.display(),
                    line.number
                )
            });
        }
        self.report.records += 1;
        let head = Head { seq, hash };
        self.report.last = Some(head.clone());
        self.prev = Some((head, format!("{}:{}", path.display(), line.number)));
    }

    fn bad_line(&mut self, path: &Path, line: &Line, error: String) {
        self.bad.push(Bad {
            file: path.to_path_buf(),
            torn: TornLine {
                line: line.number,
                bytes: line.body.len() as u64,
                unterminated: !line.terminated,
            },
            error,
        });
    }

    /// Version, hash and canonical form of one record.
    fn check_record(&self, map: &Map<String, Value>, body: &[u8]) -> Result<(), Defect> {
        let v = map
            .get("v")
            .and_then(Value::as_u64)
            .ok_or_else(|| malformed("no integer \"v\""))?;
        if v != u64::from(SCHEMA_VERSION) {
            return Err(Defect::UnsupportedVersion { v });
        }
        let stored = map
            .get("hash")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("no string \"hash\""))?;
        let computed = record_hash(map);
        if stored != computed {
            return Err(Defect::Edited {
                stored: stored.to_owned(),
                computed,
            });
        }
        if canonical(&Value::Object(map.clone())).as_bytes() != body {
            return Err(Defect::NotCanonical);
        }
        Ok(())
    }

    /// Unparsable lines before this record must be exactly the ones it
    /// names as torn (and it must be a `log_recovered` in the same file).
    fn check_recovery(
        &mut self,
        map: &Map<String, Value>,
        path: &Path,
        line: u64,
        seq: u64,
    ) -> Result<(), Problem> {
        let is_recovery =
            map.get("kind").and_then(Value::as_str) == Some(RecordKind::LogRecovered.as_str());
        let named: Vec<u64> = if is_recovery {
            map.get("torn")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.get("line").and_then(Value::as_u64))
                        .collect()
                })
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let found: Vec<u64> = self
            .bad
            .iter()
            .filter(|b| b.file == path)
            .map(|b| b.torn.line)
            .collect();
        if let Some(first) = self.bad.first()
            && (!is_recovery || first.file != path)
        {
            // Not explained: report the first such line itself.
            return Err(Problem {
                file: first.file.clone(),
                line: first.torn.line,
                defect: Defect::Unparsable {
                    error: first.error.clone(),
                },
            });
        }
        if named != found {
            return Err(Problem {
                file: path.to_path_buf(),
                line,
                defect: Defect::BadRecovery { named, found },
            });
        }
        for bad in self.bad.drain(..) {
            self.report.notes.push(format!(
                "{}:{}: torn line ({} bytes{}) recovered by the log_recovered record at {}:{line} (seq {seq})",
                bad.file.display(),
                bad.torn.line,
                bad.torn.bytes,
                if bad.torn.unterminated {
                    ", no newline"
                } else {
                    ""
                },
                path.display(),
            ));
        }
        Ok(())
    }

    /// `seq` is the previous one + 1 (never wrapping) and `prev_hash` links
    /// to the previous record. The first record given may start anywhere
    /// but at 0: seq 1 is the first record ever.
    fn check_link(&self, index: usize, seq: u64, prev_hash: &str) -> Result<(), Defect> {
        let Some((prev, prev_at)) = &self.prev else {
            if seq == 0 {
                return Err(malformed("seq 0, but seq 1 is the first record ever"));
            }
            return Ok(());
        };
        let Some(expected) = prev.seq.checked_add(1) else {
            return Err(Defect::SeqWraps {
                seq,
                prev_seq: prev.seq,
                prev_at: prev_at.clone(),
            });
        };
        if seq == expected {
            if prev_hash == prev.hash {
                return Ok(());
            }
            return Err(Defect::Forged {
                prev_hash: prev_hash.to_owned(),
                prev_seq: prev.seq,
                prev_at: prev_at.clone(),
                expected: prev.hash.clone(),
            });
        }
        // Is the record that belongs here further on (reordered), or gone?
        let later = self.seqs.get(&expected).filter(|(file, _)| {
            self.order
                .iter()
                .position(|p| p == file)
                .is_some_and(|i| i >= index)
        });
        if seq > expected && later.is_none() {
            return Err(Defect::Deleted {
                prev_seq: prev.seq,
                prev_at: prev_at.clone(),
                seq,
            });
        }
        Err(Defect::OutOfOrder {
            seq,
            expected,
            prev_seq: prev.seq,
            prev_at: prev_at.clone(),
            found_at: later.map(|(file, line)| format!("{}:{line}", file.display())),
        })
    }

    /// Unparsable lines at the end of a file that nothing recovered.
    fn end_of_file(&mut self, path: &Path) {
        let Some(first) = self.bad.first() else {
            return;
        };
        let defect = if first.torn.unterminated {
            Defect::Truncated {
                bytes: first.torn.bytes,
            }
        } else {
            Defect::Unparsable {
                error: first.error.clone(),
            }
        };
        let line = first.torn.line;
        self.fail(path, line, defect);
    }
}

fn malformed(problem: &str) -> Defect {
    Defect::Malformed {
        problem: problem.to_owned(),
    }
}

fn fields(map: &Map<String, Value>) -> Result<(u64, String, String), Defect> {
    let seq = map
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or_else(|| malformed("no integer \"seq\""))?;
    let hash = map
        .get("hash")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("no string \"hash\""))?;
    let prev = map
        .get("prev_hash")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("no string \"prev_hash\""))?;
    Ok((seq, hash.to_owned(), prev.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::forensic::{
        chain::{Sealed, seal},
        record::{ModuleInfo, Record},
        stamp,
    };

    /// `n` sealed lines, seq 1..=n, alternating kinds.
    fn chain(n: u64) -> Vec<String> {
        let mut head = Head::genesis();
        (0..n)
            .map(|i| {
                let mut r = Record::new(
                    if i % 2 == 0 {
                        RecordKind::ModuleUnload
                    } else {
                        RecordKind::ModuleLoaded
                    },
                    1000 + i,
                );
                stamp(&mut r, &"boot".into(), &"node-a".into());
                r.module = Some(ModuleInfo {
                    name: "dm_crypt".into(),
                    taints: None,
                });
                let Sealed { line, head: next } = seal(&mut r, &head).unwrap();
                head = next;
                line
            })
            .collect()
    }

    fn write_file(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, lines.concat()).unwrap();
        path
    }

    fn problem_of(paths: &[PathBuf]) -> Problem {
        let report = verify(paths).unwrap();
        report
            .problem
            .clone()
            .unwrap_or_else(|| panic!("expected a problem, got:\n{report}"))
    }

    fn reseal(line: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        let Value::Object(mut map) = serde_json::from_str(line).unwrap() else {
            unreachable!()
        };
        edit(&mut map);
        let hash = record_hash(&map);
        map.insert("hash".into(), Value::String(hash));
        canonical(&Value::Object(map)) + "\n"
    }

    #[test]
    fn an_intact_chain_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), "events.jsonl", &chain(5));
        let report = verify(&[path]).unwrap();
        assert_eq!(report.problem, None, "{report}");
        assert_eq!((report.records, report.first_seq), (5, 1));
        assert!(report.from_genesis);
        assert_eq!(report.exit_code(), 0);
        assert!(
            report
                .to_string()
                .starts_with("OK 5 records in 1 file(s), seq 1..=5\n")
        );
    }

    #[test]
    fn an_edited_record_is_named_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(5);
        lines[2] = lines[2].replace("dm_crypt", "dm_crypz");
        let path = write_file(dir.path(), "events.jsonl", &lines);
        let p = problem_of(std::slice::from_ref(&path));
        assert_eq!((p.file.as_path(), p.line), (path.as_path(), 3));
        assert!(matches!(p.defect, Defect::Edited { .. }), "{p}");
        assert!(
            p.to_string().contains("events.jsonl:3: edited record"),
            "{p}"
        );
    }

    #[test]
    fn whitespace_edits_are_caught_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(3);
        lines[1] = lines[1].replacen(",", ", ", 1);
        let path = write_file(dir.path(), "events.jsonl", &lines);
        let p = problem_of(&[path]);
        assert_eq!((p.line, &p.defect), (2, &Defect::NotCanonical));
    }

    #[test]
    fn a_deleted_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(6);
        lines.remove(3); // seq 4
        let path = write_file(dir.path(), "events.jsonl", &lines);
        let p = problem_of(&[path]);
        assert_eq!(p.line, 4, "{p}");
        assert_eq!(
            p.defect,
            Defect::Deleted {
                prev_seq: 3,
                prev_at: format!("{}:3", p.file.display()),
                seq: 5
            }
        );
        assert!(p.to_string().contains("seq 4 missing"), "{p}");
    }

    #[test]
    fn reordered_records_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(6);
        lines.swap(2, 3);
        let path = write_file(dir.path(), "events.jsonl", &lines);
        let p = problem_of(std::slice::from_ref(&path));
        assert_eq!(p.line, 3, "{p}");
        assert!(
            matches!(&p.defect, Defect::OutOfOrder { seq: 4, expected: 3, found_at: Some(at), .. } if at.ends_with(":4")),
            "{p}"
        );
    }

    #[test]
    fn a_truncated_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(4);
        lines[3] = lines[3][..40].to_owned();
        let path = write_file(dir.path(), "events.jsonl", &lines);
        let p = problem_of(&[path]);
        assert_eq!((p.line, &p.defect), (4, &Defect::Truncated { bytes: 40 }));
        assert!(p.to_string().contains("truncated file"), "{p}");
    }

    #[test]
    fn a_forged_record_with_a_recomputed_hash_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(5);
        // Changed and re-hashed, but it cannot know the real prev_hash: the
        // forger made one up.
        lines[2] = reseal(&lines[2], |m| {
            m.insert("host".into(), Value::String("elsewhere".into()));
            m.insert("prev_hash".into(), Value::String("ab".repeat(32)));
        });
        let path = write_file(dir.path(), "events.jsonl", &lines);
        let p = problem_of(&[path]);
        assert_eq!(p.line, 3, "{p}");
        assert!(
            matches!(p.defect, Defect::Forged { prev_seq: 2, .. }),
            "{p}"
        );
        assert!(p.to_string().contains("forged record"), "{p}");
    }

    #[test]
    fn an_edit_rehashed_with_the_right_prev_hash_breaks_the_next_link() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = chain(5);
        lines[2] = reseal(&lines[2], |m| {
            m.insert("host".into(), Value::String("elsewhere".into()));
        });
        let path = write_file(dir.path(), "events.jsonl", &lines);
        let p = problem_of(&[path]);
        assert_eq!(p.line, 4, "{p}");
        assert!(
            matches!(&p.defect, Defect::Forged { prev_seq: 3, prev_at, .. } if prev_at.ends_with(":3")),
            "{p}"
        );
    }

    #[test]
    fn files_in_any_order_and_a_missing_middle_file() {
        let dir = tempfile::tempdir().unwrap();
        let lines = chain(9);
        let a = write_file(dir.path(), "events.jsonl.2", &lines[..3]);
        let b = write_file(dir.path(), "events.jsonl.1", &lines[3..6]);
        let c = write_file(dir.path(), "events.jsonl", &lines[6..]);
        let report = verify(&[c.clone(), a.clone(), b]).unwrap();
        assert_eq!(report.problem, None, "{report}");
        assert_eq!(
            report.files,
            [a.clone(), dir.path().join("events.jsonl.1"), c.clone()]
        );
        let p = problem_of(&[c.clone(), a]);
        assert_eq!((p.file, p.line), (c, 1));
        assert!(
            matches!(
                p.defect,
                Defect::Deleted {
                    prev_seq: 3,
                    seq: 7,
                    ..
                }
            ),
            "{}",
            p.defect
        );
    }

    /// `lines` renumbered with `seqs`, each re-hashed and linked to the one
    /// before, so only the seqs are wrong.
    fn renumbered(lines: &[String], seqs: &[u64]) -> Vec<String> {
        let mut prev_hash: Option<String> = None;
        lines
            .iter()
            .zip(seqs)
            .map(|(line, &seq)| {
                let sealed = reseal(line, |m| {
                    m.insert("seq".into(), Value::from(seq));
                    if let Some(h) = &prev_hash {
                        m.insert("prev_hash".into(), Value::String(h.clone()));
                    }
                });
                let v: Value = serde_json::from_str(&sealed).unwrap();
                prev_hash = Some(v["hash"].as_str().unwrap().to_owned());
                sealed
            })
            .collect()
    }

    #[test]
    fn a_seq_that_wraps_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let lines = renumbered(&chain(3), &[u64::MAX, 0, 1]);
        let path = write_file(dir.path(), "events.jsonl", &lines);
        let p = problem_of(std::slice::from_ref(&path));
        assert_eq!((p.file.as_path(), p.line), (path.as_path(), 2), "{p}");
        let text = p.to_string();
        assert!(
            text.contains("events.jsonl:2: ") && text.contains(&u64::MAX.to_string()),
            "{text}"
        );
        // Anything else that does not add exactly one is named too.
        let lines = renumbered(&chain(3), &[7, 8, 8]);
        let path = write_file(dir.path(), "events.jsonl", &lines);
        assert_eq!(problem_of(&[path]).line, 3);
    }

    #[test]
    fn a_record_with_seq_0_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let lines = renumbered(&chain(2), &[0, 1]);
        let path = write_file(dir.path(), "events.jsonl", &lines);
        let p = problem_of(&[path]);
        assert_eq!(p.line, 1, "{p}");
        assert!(p.to_string().contains("seq 0"), "{p}");
    }

    #[test]
    fn rotated_away_records_anchor_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let lines = chain(6);
        let path = write_file(dir.path(), "events.jsonl", &lines[2..]);
        let report = verify(&[path]).unwrap();
        assert_eq!(report.problem, None);
        assert!(!report.from_genesis);
        assert_eq!(report.first_seq, 3);
        assert!(report.notes[0].contains("rotated away"), "{report}");
    }

    #[test]
    fn a_recovery_must_name_exactly_the_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let lines = chain(3);
        let mut recovery = Record::new(RecordKind::LogRecovered, 5);
        stamp(&mut recovery, &"boot".into(), &"node-a".into());
        recovery.torn = vec![TornLine {
            line: 3,
            bytes: 10,
            unterminated: true,
        }];
        let head = Head {
            seq: 1,
            hash: serde_json::from_str::<Value>(&lines[0]).unwrap()["hash"]
                .as_str()
                .unwrap()
                .to_owned(),
        };
        let sealed = seal(&mut recovery, &head).unwrap();
        // Names line 3 (itself) but the torn line is line 2.
        let torn = "{\"v\":1,\"se\n".to_owned();
        let path = write_file(
            dir.path(),
            "events.jsonl",
            &[lines[0].clone(), torn, sealed.line],
        );
        let p = problem_of(&[path]);
        assert_eq!(
            (p.line, p.defect),
            (
                3,
                Defect::BadRecovery {
                    named: vec![3],
                    found: vec![2]
                }
            )
        );

        // A torn line in the middle that nothing recovers is named itself.
        let torn = "garbage\n".to_owned();
        let path = write_file(
            dir.path(),
            "events.jsonl",
            &[lines[0].clone(), torn, lines[1].clone()],
        );
        let p = problem_of(&[path]);
        assert_eq!(p.line, 2, "{p}");
        assert!(matches!(p.defect, Defect::Unparsable { .. }), "{p}");
    }
}
