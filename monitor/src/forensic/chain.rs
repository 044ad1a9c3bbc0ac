//! The hash chain: a record's canonical form, its SHA-256, and sealing a
//! record into the line that is written.
//!
//! # Canonical form
//! The canonical form of a JSON value is:
//! - an object: `{`, its members sorted by key (by Unicode code point, which
//!   is the byte order of their UTF-8), each as `"key":value`, separated by
//!   `,`, then `}`;
//! - an array: `[`, its elements in order, separated by `,`, then `]`;
//! - a string: `"`, the text with `"` written `\"`, `\` written `\\`, the
//!   control characters U+0008, U+0009, U+000A, U+000C, U+000D written `\b`,
//!   `\t`, `\n`, `\f`, `\r`, every other one below U+0020 written `\u00xx`
//!   (lower-case hex), and everything else as its UTF-8 bytes, then `"`;
//! - a number: its decimal integer digits (records hold only integers);
//! - `true`, `false`, `null`.
//!
//! No whitespace anywhere. This is what Python's `json.dumps(value,
//! sort_keys=True, separators=(",", ":"), ensure_ascii=False)` produces.
//!
//! A record's `hash` is the lower-case hex SHA-256 of the canonical form of
//! the record with its `hash` member removed (`prev_hash` stays, so each
//! hash covers the previous one). The line written is the canonical form of
//! the whole record, `hash` included, followed by `\n`.
use std::fmt::Write as _;

use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use super::record::Record;

/// `prev_hash` of the very first record: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The canonical form of `value` (see the module doc).
#[must_use]
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(&mut out, value);
    out
}

fn write_canonical(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => write_object(out, map, None),
    }
}

/// Writes `map` sorted by key, leaving out the member `skip`.
fn write_object(out: &mut String, map: &Map<String, Value>, skip: Option<&str>) {
    let mut members: Vec<(&String, &Value)> = map
        .iter()
        .filter(|(k, _)| Some(k.as_str()) != skip)
        .collect();
    members.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (key, value)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, key);
        out.push(':');
        write_canonical(out, value);
    }
    out.push('}');
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    // Runs of bytes that need no escape are copied whole; every byte that
    // does is ASCII, so the runs split the text at character boundaries.
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            b'\t' => "\\t",
            b'\n' => "\\n",
            0x0c => "\\f",
            b'\r' => "\\r",
            b if b < 0x20 => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            out.push_str(&format!("\\u{b:04x}"));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// The `hash` a record object must carry: SHA-256 of its canonical form
/// without `hash`.
#[must_use]
pub fn record_hash(record: &Map<String, Value>) -> String {
    let mut text = String::new();
    write_object(&mut text, record, Some("hash"));
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Hex SHA-256 of `bytes` (config digests).
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Where the chain stands: the last record written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Its seq (0 before the first record).
    pub seq: u64,
    /// Its hash ([`GENESIS`] before the first record).
    pub hash: String,
}

impl Head {
    /// The head of an empty log.
    #[must_use]
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

/// A record sealed onto the chain: the exact line to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// The canonical JSON and its `\n`.
    pub line: String,
    /// The new head once this line is written.
    pub head: Head,
}

/// Why a record cannot be sealed onto the chain.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The record cannot be turned into JSON (it always can: every member
    /// is a string, integer, bool or list of those).
    #[error("cannot encode it as JSON: {0}")]
    Encode(#[from] serde_json::Error),
    /// The chain's head has the largest seq there is; seq never wraps.
    #[error(
        "the chain is at seq {seq}, the largest seq there is, and seq never wraps; start a new log"
    )]
    SeqExhausted {
        /// The head's seq.
        seq: u64,
    },
}

/// Gives `record` the next seq after `head`, links it to `head`, hashes it
/// and sets its `hash`; returns the line to write.
///
/// # Errors
/// When the record cannot be turned into JSON, or `head` is at `u64::MAX`.
pub fn seal(record: &mut Record, head: &Head) -> Result<Sealed, SealError> {
    let mut line = Vec::new();
    let seq = seal_into(record, head, &mut line)?;
    // serde_json writes UTF-8 only (its `to_string` relies on the same).
    let line = String::from_utf8(line)
        .map_err(|e| SealError::Encode(serde::ser::Error::custom(format!("not UTF-8: {e}"))))?;
    Ok(Sealed {
        line,
        head: Head {
            seq,
            hash: record.hash.clone(),
        },
    })
}

/// [`seal`] for the log's writer thread: appends the line and its `\n`
/// to `out` and returns the new head's seq (its hash is the record's
/// `hash` now). The caller keeps `out` between records, so that sealing a
/// record allocates at most its strings the writer fills in (`time` and
/// the two hashes), and none when it has given the record reused ones:
/// with musl's allocator, which takes one lock for every thread, each
/// allocation here also stalls the daemon's other threads.
///
/// The record's derived serialisation is its canonical form (see
/// [`Record`]), and it is written once: with a placeholder `hash`, which
/// the hash of the line without its `hash` member then replaces. Nothing
/// but the record's own `hash` member can be the first `"hash":"` of the
/// line: no struct in a record has another member of that name before it,
/// and a quote inside a string is escaped.
///
/// On an error nothing is appended to `out`.
///
/// # Errors
/// When the record cannot be turned into JSON, or `head` is at `u64::MAX`.
pub fn seal_into(record: &mut Record, head: &Head, out: &mut Vec<u8>) -> Result<u64, SealError> {
    /// The `hash` member's key and the value's opening quote.
    const KEY: &[u8] = b"\"hash\":\"";
    let seq = head
        .seq
        .checked_add(1)
        .ok_or(SealError::SeqExhausted { seq: head.seq })?;
    record.seq = seq;
    if record.time.is_empty()
        && let Some(made) = record.made
    {
        // Into the record's own buffer, which the writer may have given it.
        write!(record.time, "{}", humantime::format_rfc3339_nanos(made))
            .map_err(|e| SealError::Encode(serde::ser::Error::custom(e)))?;
    }
    record.prev_hash.clone_from(&head.hash);
    record.hash.clear();
    record.hash.push_str(GENESIS);
    let start = out.len();
    let placed = serde_json::to_writer(&mut *out, &*record)
        .map_err(SealError::from)
        .and_then(|()| {
            let line = &out[start..];
            let at = line
                .windows(KEY.len())
                .position(|w| w == KEY)
                .ok_or_else(|| SealError::Encode(serde::ser::Error::custom("no hash member")))?;
            let value = at + KEY.len();
            // The closing quote and the comma: `host` (always written) or
            // `historical` follows.
            let after = value + GENESIS.len() + 2;
            if line.get(value + GENESIS.len()..after) != Some(b"\",".as_slice()) {
                return Err(SealError::Encode(serde::ser::Error::custom(
                    "the hash member is not followed by another",
                )));
            }
            let mut sha = Sha256::new();
            sha.update(&line[..at]);
            sha.update(&line[after..]);
            Ok((at, value, after, sha.finalize()))
        });
    let (at, value, after, digest) = match placed {
        Ok(placed) => placed,
        Err(e) => {
            out.truncate(start);
            return Err(e);
        }
    };
    let hex = &mut out[start + value..start + value + GENESIS.len()];
    if let Err(e) = hex::encode_to_slice(digest, hex) {
        out.truncate(start);
        return Err(SealError::Encode(serde::ser::Error::custom(format!(
            "hex of a digest: {e}"
        ))));
    }
    record.hash.clear();
    record.hash.extend(hex.iter().map(|&b| char::from(b)));
    #[cfg(debug_assertions)]
    {
        let line = &out[start..];
        let body = [&line[..at], &line[after..]].concat();
        check_canonical(line, &body);
    }
    #[cfg(not(debug_assertions))]
    let _ = (at, after);
    out.push(b'\n');
    Ok(seq)
}

/// Debug builds: `line` (and `body`, the same without `hash`) are the
/// canonical form of what they encode, i.e. every struct in [`Record`]
/// still declares its members in the byte order of their names.
#[cfg(debug_assertions)]
fn check_canonical(line: &[u8], body: &[u8]) {
    let parsed = |text: &[u8]| match serde_json::from_slice::<Value>(text) {
        Ok(v) => v,
        Err(e) => panic!("a sealed record does not parse back: {e}"),
    };
    assert_eq!(
        canonical(&parsed(line)).as_bytes(),
        line,
        "a record's members are not in canonical order (see Record)"
    );
    assert_eq!(
        canonical(&parsed(body)).as_bytes(),
        body,
        "a record's members are not in canonical order (see Record)"
    );
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::forensic::record::{ModuleInfo, RecordKind};

    #[test]
    fn canonical_sorts_keys_recursively_without_whitespace() {
        let v = json!({"b": [3, {"z": null, "a": true}], "a": "x", "ä": 1, "Z": false});
        assert_eq!(
            canonical(&v),
            r#"{"Z":false,"a":"x","b":[3,{"a":true,"z":null}],"ä":1}"#
        );
    }

    #[test]
    fn canonical_escapes_like_python_json_dumps() {
        let v = json!("q\"b\\ \u{8}\t\n\u{c}\r\u{1}\u{1f}\u{7f} é ✓");
        // json.dumps(s, ensure_ascii=False) gives exactly this.
        assert_eq!(
            canonical(&v),
            "\"q\\\"b\\\\ \\b\\t\\n\\f\\r\\u0001\\u001f\u{7f} é ✓\""
        );
        // And serde_json reads it back unchanged.
        let back: Value = serde_json::from_str(&canonical(&v)).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn hash_leaves_out_only_the_hash_member() {
        let v = json!({"seq": 1, "prev_hash": GENESIS, "hash": "anything"});
        let Value::Object(map) = v else {
            unreachable!()
        };
        let expected = sha256_hex(format!(r#"{{"prev_hash":"{GENESIS}","seq":1}}"#).as_bytes());
        assert_eq!(record_hash(&map), expected);
        let mut other = map.clone();
        other.insert("hash".into(), json!("different"));
        assert_eq!(record_hash(&other), expected);
        other.insert("prev_hash".into(), json!("1".repeat(64)));
        assert_ne!(record_hash(&other), expected, "prev_hash is covered");
    }

    #[test]
    fn a_string_that_reads_like_the_hash_member_is_not_taken_for_it() {
        // boot_id sorts before hash: its text comes first in the line.
        let lookalike = format!("\"hash\":\"{GENESIS}\",");
        let mut r = Record::new(RecordKind::ModuleLoad, 1);
        r.boot_id = lookalike.as_str().into();
        r.host = "h".into();
        let sealed = seal(&mut r, &Head::genesis()).unwrap();
        let Value::Object(map) = serde_json::from_str::<Value>(&sealed.line).unwrap() else {
            panic!("not an object: {}", sealed.line)
        };
        assert_eq!(map["boot_id"], json!(lookalike));
        assert_eq!(map["hash"], json!(record_hash(&map)));
        assert_eq!(sealed.head.hash, record_hash(&map));
        assert_eq!(sealed.line, format!("{}\n", canonical(&Value::Object(map))));
    }

    #[test]
    fn known_answer() {
        // A fixed record and its hash, so a change of the canonical form
        // (which would orphan every existing log) cannot go unnoticed.
        // Checked independently with Python:
        //   r = json.loads(line); h = r.pop("hash")
        //   sha256(json.dumps(r, sort_keys=True, separators=(",", ":"),
        //          ensure_ascii=False).encode()).hexdigest() == h
        let mut r = Record::new(RecordKind::ModuleUnload, 123_456_789);
        r.time = "2026-11-25T12:29:53.656000000Z".into();
        r.boot_id = "8b09e399-70cd-41a0-ab7f-c56e132b458f".into();
        r.host = "node-a".into();
        r.module = Some(ModuleInfo {
            name: "nvme_tcp".into(),
            taints: None,
        });
        let sealed = seal(&mut r, &Head::genesis()).unwrap();
        assert_eq!(
            sealed.line,
            concat!(
                r#"{"boot_id":"8b09e399-70cd-41a0-ab7f-c56e132b458f","boot_ns":123456789,"#,
                r#""hash":"7a719ebcc16176ca7d281f86bada85fcd4b58e71ad405428c1a4338507bc15ea","#,
                r#""host":"node-a","kind":"module_unload","module":{"name":"nvme_tcp","taints":null},"#,
                r#""prev_hash":"0000000000000000000000000000000000000000000000000000000000000000","#,
                r#""seq":1,"time":"2026-11-25T12:29:53.656000000Z","v":1}"#,
                "\n"
            )
        );
        assert_eq!(sealed.head.seq, 1);
    }

    /// Every member of every struct in a record set (no `None`, no empty
    /// list, `historical` true): the line `seal` writes straight from serde
    /// is the canonical form of what it encodes, so no member is declared
    /// out of order, and its hash is what `log verify` computes.
    #[test]
    fn a_record_with_every_member_seals_to_its_canonical_form() {
        use crate::forensic::record::{
            ActorInfo, ConfigInfo, DeniedInfo, EnablementInfo, ModuleStateInfo, MonitorInfo,
            RequirementEffect, RequirementFlip, StateChange, TornLine,
        };
        let some = |s: &str| Some(s.to_owned());
        let mut r = Record::new(RecordKind::ModuleLoad, 7);
        r.time = "2026-11-27T20:00:00.000000000Z".into();
        r.boot_id = "b".into();
        r.host = "h\u{1}\"é".into();
        r.module = Some(ModuleInfo {
            name: "nvme_tcp".into(),
            taints: Some("OE".into()),
        });
        r.actor = Some(ActorInfo {
            cgroup: some("/kubepods"),
            cgroup_id: 9,
            cmdline: Some(vec!["modprobe".into(), "a\tb".into()]),
            comm: "modprobe".into(),
            container_id: some("c"),
            exe: some("/usr/bin/kmod"),
            gid: 0,
            pid: 1,
            pod_uid: some("p"),
            ppid: Some(2),
            read_late: true,
            tgid: 1,
            uid: 0,
        });
        r.source = Some("ebpf".into());
        r.historical = true;
        r.state = Some(StateChange {
            from: "available".into(),
            to: "loaded".into(),
        });
        r.requirements = vec![RequirementEffect {
            changed: true,
            met: true,
            name: "base".into(),
        }];
        r.requirement = Some(RequirementFlip {
            met: true,
            name: "base".into(),
            was: false,
        });
        r.cause = Some(RecordKind::ModuleLoad);
        r.modules = vec![ModuleStateInfo {
            name: "dm_crypt".into(),
            state: "loaded".into(),
            taints: some(""),
        }];
        r.monitor = Some(MonitorInfo {
            config_digest: "d".into(),
            config_digest_of: "file".into(),
            config_file: some("/etc/k.toml"),
            groups: vec!["base".into()],
            kernel_release: "6.1".into(),
            pid: 3,
            source: "ebpf".into(),
            version: "0.1.0".into(),
        });
        r.enablement = Some(EnablementInfo {
            enabled: Some(true),
            reason: "r".into(),
            requirement: "v2-data-engine".into(),
            source: "flag".into(),
            was: Some(false),
        });
        r.denied = Some(DeniedInfo {
            count: 1,
            first_boot_ns: 2,
            last_boot_ns: 3,
            suppressed_in_window: 4,
            window_secs: 5,
        });
        r.config = Some(ConfigInfo {
            accepted: true,
            applied: vec!["a".into()],
            digest: some("d"),
            error: some("e"),
            file: "f".into(),
            groups: vec!["base".into()],
            overridden: vec!["o".into()],
            restart_required: vec!["r".into()],
        });
        r.lost_total = Some(1);
        r.reason = some("why");
        r.torn = vec![TornLine {
            bytes: 1,
            line: 2,
            unterminated: true,
        }];
        r.after_seq = Some(4);
        r.dropped = Some(5);
        r.hash = "stale".into();
        let sealed = seal(&mut r, &Head::genesis()).unwrap();
        let v: Value = serde_json::from_str(&sealed.line).unwrap();
        assert_eq!(canonical(&v) + "\n", sealed.line);
        let Value::Object(map) = v else {
            unreachable!()
        };
        assert_eq!(record_hash(&map), sealed.head.hash);
        assert_eq!(r.hash, sealed.head.hash, "the record carries its hash");
        // Every member is in the line: none was left out as empty.
        assert_eq!(map.len(), 27, "{}", sealed.line);
    }

    #[test]
    fn sealing_never_wraps_the_seq() {
        let mut r = Record::new(RecordKind::MonitorStart, 1);
        let head = Head {
            seq: u64::MAX,
            hash: GENESIS.to_owned(),
        };
        let err = seal(&mut r, &head).unwrap_err();
        assert!(
            matches!(err, SealError::SeqExhausted { seq: u64::MAX }),
            "{err}"
        );
        assert!(err.to_string().contains("18446744073709551615"), "{err}");
    }

    #[test]
    fn sealing_links_to_the_head() {
        let mut r = Record::new(RecordKind::MonitorStart, 1);
        let first = seal(&mut r, &Head::genesis()).unwrap();
        let second = seal(&mut r, &first.head).unwrap();
        let v: Value = serde_json::from_str(&second.line).unwrap();
        assert_eq!(v["seq"], 2);
        assert_eq!(v["prev_hash"], first.head.hash.as_str());
        let Value::Object(map) = v else {
            unreachable!()
        };
        assert_eq!(record_hash(&map), second.head.hash);
        assert_eq!(
            canonical(&Value::Object(map)) + "\n",
            second.line,
            "the line is canonical"
        );
    }
}
