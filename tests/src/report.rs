//! Reading a /status document or a `check --output json` report: groups,
//! modules and their states, for assertions with useful messages.
use serde_json::Value;

/// `value` as indented JSON, for messages.
#[must_use]
pub fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// The group called `name` in a `check --output json` report or a /status.
///
/// # Panics
/// When there is none, listing the groups there are.
#[must_use]
#[track_caller]
pub fn group<'a>(report: &'a Value, name: &str) -> &'a Value {
    let groups = report["groups"]
        .as_array()
        .unwrap_or_else(|| panic!("no groups array in:\n{}", pretty(report)));
    groups
        .iter()
        .find(|g| g["name"] == name)
        .unwrap_or_else(|| panic!("no group {name:?} in:\n{}", pretty(report)))
}

/// The names of the groups of a report, in order.
#[must_use]
pub fn group_names(report: &Value) -> Vec<String> {
    report["groups"]
        .as_array()
        .map(|gs| {
            gs.iter()
                .filter_map(|g| g["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The module called `name` in a group.
///
/// # Panics
/// When the group does not list it.
#[must_use]
#[track_caller]
pub fn module<'a>(group: &'a Value, name: &str) -> &'a Value {
    group["modules"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no module {name:?} in group:\n{}", pretty(group)))
}

/// The state of module `name` in group `group_name`, `""` if absent (for
/// `wait_for` predicates, which must not panic while the state settles).
#[must_use]
pub fn state_of<'a>(report: &'a Value, group_name: &str, name: &str) -> &'a str {
    report["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["name"] == group_name))
        .and_then(|g| g["modules"].as_array())
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .and_then(|m| m["state"].as_str())
        .unwrap_or("")
}

/// Whether group `name` is met (`None` if there is no such group).
#[must_use]
pub fn met(report: &Value, name: &str) -> Option<bool> {
    report["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["name"] == name))
        .and_then(|g| g["met"].as_bool())
}

/// The sorted keys of a JSON object (empty for anything else).
#[must_use]
pub fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    keys
}
