//! The daemon's module layering, checked from the source: a module may use
//! modules of its own layer or a lower one, never a higher one, and no two
//! modules use each other. Data flows one way (kernel → source → tracker →
//! status, metrics, alerts, log), and the sinks never reach back into the
//! daemon that feeds them.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use kmod_monitor_tests::workspace_dir;

/// Top-level modules of `monitor/src`, by layer (1 is the bottom).
const LAYERS: &[(u8, &[&str])] = &[
    (
        1,
        &[
            "names",
            "state",
            "event",
            "requirements",
            "privileges",
            "stages",
        ],
    ),
    (2, &["host", "tracker", "remedy"]),
    (3, &["source", "longhorn", "forensic"]),
    (
        4,
        &["status", "metrics", "alerting", "http", "k8s", "config"],
    ),
    (5, &["daemon", "check", "fix"]),
];

/// Test support, compiled only for tests: exempt.
const EXEMPT: &[&str] = &["testing", "lib", "main"];

fn layer_of(module: &str) -> Option<u8> {
    LAYERS
        .iter()
        .find(|(_, ms)| ms.contains(&module))
        .map(|(l, _)| *l)
}

/// The top-level module a file under `src` belongs to.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let first = rel
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    first.trim_end_matches(".rs").to_owned()
}

/// The code of a file without comments and without its unit tests.
fn code(text: &str) -> String {
    let text = text
        .find("#[cfg(test)]\nmod tests")
        .map_or(text, |at| &text[..at]);
    text.lines()
        .map(|l| l.find("//").map_or(l, |at| &l[..at]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::X` a file's code names, with the braces of
/// `use crate::{a, b::c}` opened.
fn uses(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(inner) = rest.strip_prefix('{') {
            // Top-level names of the braced list.
            let mut depth = 1;
            let mut item = String::new();
            for ch in inner.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 || (depth == 1 && ch == ',') {
                    let name = item.trim().split("::").next().unwrap_or("").to_owned();
                    if !name.is_empty() {
                        found.insert(name);
                    }
                    item.clear();
                    if depth == 0 {
                        break;
                    }
                } else if depth >= 1 {
                    item.push(ch);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

fn rs_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn modules_use_only_their_own_layer_or_lower_and_never_each_other() {
    let src = workspace_dir().join("monitor/src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = module_of(&src, file);
        if EXEMPT.contains(&from.as_str()) {
            continue;
        }
        let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for to in uses(&code(&text)) {
            if to != from && to != "self" && !EXEMPT.contains(&to.as_str()) {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    let mut wrong = Vec::new();
    for (from, tos) in &edges {
        let Some(lf) = layer_of(from) else {
            wrong.push(format!("{from}: not in LAYERS (add it to a layer)"));
            continue;
        };
        for to in tos {
            match layer_of(to) {
                None => wrong.push(format!("{from} uses {to}, which is not in LAYERS")),
                Some(lt) if lt > lf => wrong.push(format!(
                    "{from} (layer {lf}) uses {to} (layer {lt}): a lower layer must not use a higher one"
                )),
                Some(_) => {}
            }
            if edges.get(to).is_some_and(|back| back.contains(from)) && from < to {
                wrong.push(format!("{from} and {to} use each other"));
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
    // The check is not vacuous: the daemon uses the tracker and the sinks.
    assert!(edges["daemon"].contains("tracker") && edges["http"].contains("status"));
}

#[test]
fn the_use_parser_opens_braces() {
    let got = uses("use crate::{a::{b, c}, d, e::f};\nlet x = crate::g::h();");
    assert_eq!(got, ["a", "d", "e", "g"].map(str::to_owned).into());
}
