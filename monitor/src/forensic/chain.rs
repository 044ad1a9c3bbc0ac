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

/// Gives `record` the next seq after `head`, links it to `head` and hashes
/// it.
///
/// # Errors
/// When the record cannot be turned into JSON, or `head` is at `u64::MAX`.
pub fn seal(record: &Record, head: &Head) -> Result<Sealed, SealError> {
    let seq = head
        .seq
        .checked_add(1)
        .ok_or(SealError::SeqExhausted { seq: head.seq })?;
    // The record as it is, then its chain members set in the tree: no
    // copy of the record itself.
    let Value::Object(mut map) = serde_json::to_value(record)? else {
        return Err(SealError::Encode(serde::ser::Error::custom(
            "a record is not a JSON object",
        )));
    };
    map.insert("seq".to_owned(), Value::from(seq));
    map.insert("prev_hash".to_owned(), Value::from(head.hash.as_str()));
    map.remove("hash");
    // The canonical form once, split where `hash` sorts in: the members
    // before it and after it. The hash covers the two joined; the line is
    // the same text with the hash member between them.
    let mut members: Vec<(&String, &Value)> = map.iter().collect();
    members.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let split = members.partition_point(|(k, _)| k.as_str() < "hash");
    let join = |part: &[(&String, &Value)]| {
        let mut out = String::new();
        for (i, (key, value)) in part.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_string(&mut out, key);
            out.push(':');
            write_canonical(&mut out, value);
        }
        out
    };
    let (before, after) = (join(&members[..split]), join(&members[split..]));
    let sep = if before.is_empty() || after.is_empty() {
        ""
    } else {
        ","
    };
    let hash = hex::encode(
        Sha256::new()
            .chain_update("{")
            .chain_update(&before)
            .chain_update(sep)
            .chain_update(&after)
            .chain_update("}")
            .finalize(),
    );
    let mut line = String::with_capacity(before.len() + after.len() + hash.len() + 16);
    line.push('{');
    line.push_str(&before);
    if !before.is_empty() {
        line.push(',');
    }
    line.push_str("\"hash\":\"");
    line.push_str(&hash);
    line.push('"');
    if !after.is_empty() {
        line.push(',');
        line.push_str(&after);
    }
    line.push_str("}\n");
    Ok(Sealed {
        line,
        head: Head { seq, hash },
    })
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
        let sealed = seal(&r, &Head::genesis()).unwrap();
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

    #[test]
    fn sealing_never_wraps_the_seq() {
        let r = Record::new(RecordKind::MonitorStart, 1);
        let head = Head {
            seq: u64::MAX,
            hash: GENESIS.to_owned(),
        };
        let err = seal(&r, &head).unwrap_err();
        assert!(
            matches!(err, SealError::SeqExhausted { seq: u64::MAX }),
            "{err}"
        );
        assert!(err.to_string().contains("18446744073709551615"), "{err}");
    }

    #[test]
    fn sealing_links_to_the_head() {
        let r = Record::new(RecordKind::MonitorStart, 1);
        let first = seal(&r, &Head::genesis()).unwrap();
        let second = seal(&r, &first.head).unwrap();
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
