//! Whether the V2 requirements apply to this node, decided from the flag,
//! the cluster (Longhorn setting, node label) and the config file, with one
//! documented precedence. Pure: the watch only feeds it facts.
//!
//! # Precedence (first that answers wins)
//! 1. `--v2-data-engine[=true|false]` on the command line: the operator of
//!    this process said so.
//! 2. The node label `node.longhorn.io/disable-v2-data-engine=true`: this
//!    node opted out (Longhorn schedules no V2 work on it).
//! 3. The Longhorn setting `v2-data-engine` (`false` also wins over an
//!    unreadable label: the cluster has V2 off).
//! 4. The config file's `v2_data_engine` / `[groups.v2-data-engine]`.
//! 5. Off.
//!
//! With the cluster watch on, an input that cannot be read makes the answer
//! `unknown` (with the reason) whenever that input could change it: a
//! setting of `true` with unreadable node labels is unknown, because the
//! node may have opted out; a label saying opt-out is final whatever the
//! setting. An unknown answer never enables the group and never touches the
//! others.
use serde::Serialize;

/// The node label with which a node opts out of the V2 data engine.
pub const OPT_OUT_LABEL: &str = "node.longhorn.io/disable-v2-data-engine";
/// The Longhorn setting that switches the V2 data engine on.
pub const V2_SETTING: &str = "v2-data-engine";
/// The Longhorn setting that says whether V2 uses hugepages.
pub const HUGEPAGE_SETTING: &str = "data-engine-hugepage-enabled";

/// What the cluster said about one input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "value", rename_all = "snake_case")]
pub enum Fact<T> {
    /// Not read yet, or the read failed; the reason says which.
    Unknown(String),
    /// Read, and not there (no such setting, no such label).
    Absent,
    /// Read.
    Value(T),
}

/// Everything the cluster watch knows, as one value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    /// The `v2-data-engine` setting.
    pub v2_setting: Fact<bool>,
    /// The `data-engine-hugepage-enabled` setting.
    pub hugepage_setting: Fact<bool>,
    /// Whether this node carries the opt-out label.
    pub node_opt_out: Fact<bool>,
    /// `current-longhorn-version`, as longhorn-manager writes it (`v1.10.1`).
    pub version: Fact<String>,
    /// `data-engine-memory-size` (1.10+), the V2 value in MiB.
    pub memory_size_mib: Fact<u64>,
    /// `v2-data-engine-hugepage-limit` (1.8, 1.9), in MiB.
    pub hugepage_limit_mib: Fact<u64>,
    /// The kubelet's `hugepages-2Mi` capacity on this Node, in 2 MiB pages
    /// (`Absent`: the kubelet registered none).
    pub kubelet_hugepages: Fact<u64>,
}

impl ClusterView {
    /// Before the first list returns.
    #[must_use]
    pub fn starting() -> Self {
        let waiting = || "waiting for the first list from the API server".to_owned();
        Self {
            v2_setting: Fact::Unknown(waiting()),
            hugepage_setting: Fact::Unknown(waiting()),
            node_opt_out: Fact::Unknown(waiting()),
            version: Fact::Unknown(waiting()),
            memory_size_mib: Fact::Unknown(waiting()),
            hugepage_limit_mib: Fact::Unknown(waiting()),
            kubelet_hugepages: Fact::Unknown(waiting()),
        }
    }

    /// Every fact unknown for `reason` (a read that timed out).
    #[must_use]
    pub fn unreadable(reason: &str) -> Self {
        let u = || reason.to_owned();
        Self {
            v2_setting: Fact::Unknown(u()),
            hugepage_setting: Fact::Unknown(u()),
            node_opt_out: Fact::Unknown(u()),
            version: Fact::Unknown(u()),
            memory_size_mib: Fact::Unknown(u()),
            hugepage_limit_mib: Fact::Unknown(u()),
            kubelet_hugepages: Fact::Unknown(u()),
        }
    }

    /// Why the settings cannot be read, if they cannot.
    #[must_use]
    pub fn settings_unreadable(&self) -> Option<&str> {
        match &self.v2_setting {
            Fact::Unknown(r) => Some(r),
            _ => None,
        }
    }

    /// Why the node's labels cannot be read, if they cannot.
    #[must_use]
    pub fn node_unreadable(&self) -> Option<&str> {
        match &self.node_opt_out {
            Fact::Unknown(r) => Some(r),
            _ => None,
        }
    }
}

/// Where an answer came from (the `source` label of
/// `kmod_monitor_requirement_enabled`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Flag,
    NodeLabel,
    LonghornSetting,
    Config,
    Default,
}

impl Source {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Flag => "flag",
            Self::NodeLabel => "node-label",
            Self::LonghornSetting => "longhorn-setting",
            Self::Config => "config",
            Self::Default => "default",
        }
    }
}

/// Whether a requirement applies, where that came from, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// `None` = unknown.
    pub enabled: Option<bool>,
    /// The input that decided, or (unknown) the one that could not be read.
    pub source: Source,
    /// One sentence for people.
    pub reason: String,
}

impl Decision {
    fn known(enabled: bool, source: Source, reason: impl Into<String>) -> Self {
        Self {
            enabled: Some(enabled),
            source,
            reason: reason.into(),
        }
    }

    fn unknown(source: Source, reason: impl Into<String>) -> Self {
        Self {
            enabled: None,
            source,
            reason: reason.into(),
        }
    }

    /// `true`, `false` or `unknown`.
    #[must_use]
    pub const fn state(&self) -> &'static str {
        match self.enabled {
            Some(true) => "enabled",
            Some(false) => "disabled",
            None => "unknown",
        }
    }
}

/// The inputs that do not come from the cluster, as the settings resolver
/// ([`crate::config::settings`]) found them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalInputs {
    /// `--v2-data-engine[=bool]`.
    pub flag: Option<bool>,
    /// The config file's answer.
    pub file: Option<bool>,
    /// 2 MiB pages V2 needs (`v2_hugepages_2mi`; 0 = do not check).
    pub hugepages_2mi: u64,
    /// Where `hugepages_2mi` came from: the flag, the file or the default.
    pub hugepages_source: Source,
    /// `--longhorn-version` / `longhorn_version`, and which of the two.
    pub version: Option<(crate::requirements::LonghornVersion, &'static str)>,
}

impl Default for LocalInputs {
    fn default() -> Self {
        Self {
            flag: None,
            file: None,
            hugepages_2mi: super::readiness::DEFAULT_HUGEPAGES_2MI,
            hugepages_source: Source::Default,
            version: None,
        }
    }
}

/// Decides the V2 data engine group. `cluster` is `None` when the cluster
/// watch is off.
#[must_use]
pub fn decide_v2(local: LocalInputs, cluster: Option<&ClusterView>) -> Decision {
    if let Some(flag) = local.flag {
        return Decision::known(flag, Source::Flag, format!("--v2-data-engine={flag}"));
    }
    let fallback = || match local.file {
        Some(on) => Decision::known(
            on,
            Source::Config,
            format!("v2_data_engine = {on} in the config file"),
        ),
        None => Decision::known(
            false,
            Source::Default,
            "no input enables the V2 data engine",
        ),
    };
    let Some(c) = cluster else {
        return fallback();
    };
    if c.node_opt_out == Fact::Value(true) {
        return Decision::known(
            false,
            Source::NodeLabel,
            format!("this node has {OPT_OUT_LABEL}=true"),
        );
    }
    let from_setting = match &c.v2_setting {
        Fact::Value(false) => {
            return Decision::known(
                false,
                Source::LonghornSetting,
                format!("Longhorn setting {V2_SETTING} is false"),
            );
        }
        Fact::Value(true) => Decision::known(
            true,
            Source::LonghornSetting,
            format!("Longhorn setting {V2_SETTING} is true"),
        ),
        Fact::Unknown(reason) => {
            return Decision::unknown(
                Source::LonghornSetting,
                format!("Longhorn setting {V2_SETTING} cannot be read: {reason}"),
            );
        }
        Fact::Absent => fallback(),
    };
    match (&c.node_opt_out, from_setting.enabled) {
        (Fact::Unknown(reason), Some(true)) => Decision::unknown(
            Source::NodeLabel,
            format!(
                "{}, but this node's labels cannot be read ({OPT_OUT_LABEL} may opt it out): {reason}",
                from_setting.reason
            ),
        ),
        _ => from_setting,
    }
}

/// Decides the V2 hugepage requirement, given the V2 decision: off with V2
/// or with `v2_hugepages_2mi = 0`; else Longhorn's
/// `data-engine-hugepage-enabled` (unknown while unreadable); else on.
#[must_use]
pub fn decide_hugepages(
    v2: &Decision,
    local: LocalInputs,
    cluster: Option<&ClusterView>,
) -> Decision {
    match v2.enabled {
        None => return Decision::unknown(v2.source, v2.reason.clone()),
        Some(false) => {
            return Decision::known(false, v2.source, format!("V2 is off: {}", v2.reason));
        }
        Some(true) => {}
    }
    if local.hugepages_2mi == 0 {
        let said = match local.hugepages_source {
            Source::Flag => "--v2-hugepages-2mi 0 on the command line",
            _ => "v2_hugepages_2mi = 0 in the config file",
        };
        return Decision::known(false, local.hugepages_source, said);
    }
    match cluster.map(|c| &c.hugepage_setting) {
        Some(Fact::Value(on)) => {
            return Decision::known(
                *on,
                Source::LonghornSetting,
                format!("Longhorn setting {HUGEPAGE_SETTING} is {on}"),
            );
        }
        // Longhorn may have hugepages off: do not demand them blind.
        Some(Fact::Unknown(reason)) => {
            return Decision::unknown(
                Source::LonghornSetting,
                format!("Longhorn setting {HUGEPAGE_SETTING} cannot be read: {reason}"),
            );
        }
        Some(Fact::Absent) | None => {}
    }
    Decision::known(
        true,
        Source::Default,
        format!("V2 is on and needs {} 2 MiB pages", local.hugepages_2mi),
    )
}

/// The Longhorn setting that records the running version.
pub const VERSION_SETTING: &str = crate::requirements::table::VERSION_SETTING;
/// The Longhorn 1.10+ setting that sizes V2's hugepages (MiB, per engine).
pub const MEMORY_SIZE_SETTING: &str = "data-engine-memory-size";
/// The Longhorn 1.8/1.9 setting that sized V2's hugepages (MiB).
pub const HUGEPAGE_LIMIT_SETTING: &str = "v2-data-engine-hugepage-limit";

/// Parses a MiB setting: a plain integer (`2048`), or the per-engine JSON
/// form whose `v2` member is one (`{"v2":"2048"}`).
///
/// # Errors
/// A value that is neither, described for the reason text.
pub fn parse_mib_setting(value: &str) -> Result<u64, String> {
    let plain = |s: &str| s.trim().parse::<u64>().ok();
    if let Some(n) = plain(value) {
        return Ok(n);
    }
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(value) {
        match map.get("v2") {
            Some(serde_json::Value::String(s)) => {
                if let Some(n) = plain(s) {
                    return Ok(n);
                }
            }
            Some(serde_json::Value::Number(n)) => {
                if let Some(n) = n.as_u64() {
                    return Ok(n);
                }
            }
            _ => {}
        }
    }
    Err(format!(
        "value {value:?} is not a size in MiB (nor {{\"v2\":\"MiB\"}})"
    ))
}

/// Parses a Kubernetes quantity as the kubelet writes capacities (`2Gi`,
/// `2048Mi`, `0`, `2147483648`, `2G`) into bytes.
///
/// # Errors
/// Not an integer with an optional binary or decimal suffix, or too large.
pub fn parse_quantity_bytes(q: &str) -> Result<u64, String> {
    let q = q.trim();
    let digits = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (number, suffix) = q.split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("quantity {q:?} does not start with an integer"))?;
    let factor: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        other => return Err(format!("quantity {q:?} has an unknown suffix {other:?}")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("quantity {q:?} is too large"))
}

/// Parses a Longhorn setting's `value`: `true`/`false`, or (Longhorn 1.10's
/// data-engine-specific settings) a JSON object whose `v2` member is one.
///
/// # Errors
/// A value that is neither, described for the reason text.
pub fn parse_bool_setting(value: &str) -> Result<bool, String> {
    let plain = |s: &str| match s.trim().to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    };
    if let Some(b) = plain(value) {
        return Ok(b);
    }
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(value) {
        match map.get("v2") {
            Some(serde_json::Value::String(s)) => {
                if let Some(b) = plain(s) {
                    return Ok(b);
                }
            }
            Some(serde_json::Value::Bool(b)) => return Ok(*b),
            _ => {}
        }
    }
    Err(format!(
        "value {value:?} is neither true nor false (nor {{\"v2\":\"true|false\"}})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(v2: Fact<bool>, label: Fact<bool>) -> ClusterView {
        ClusterView {
            version: Fact::Absent,
            memory_size_mib: Fact::Absent,
            hugepage_limit_mib: Fact::Absent,
            kubelet_hugepages: Fact::Absent,
            v2_setting: v2,
            hugepage_setting: Fact::Absent,
            node_opt_out: label,
        }
    }

    fn unknown() -> Fact<bool> {
        Fact::Unknown("403 Forbidden".to_owned())
    }

    fn outcome(d: &Decision) -> (Option<bool>, &'static str) {
        (d.enabled, d.source.as_str())
    }

    const NONE: LocalInputs = LocalInputs {
        flag: None,
        file: None,
        hugepages_2mi: 1024,
        hugepages_source: Source::Default,
        version: None,
    };

    #[test]
    fn the_precedence_table() {
        use Fact::{Absent, Value};
        let file_on = LocalInputs {
            file: Some(true),
            ..NONE
        };
        let flag_off = LocalInputs {
            flag: Some(false),
            ..file_on
        };
        type Case = (
            LocalInputs,
            Option<ClusterView>,
            (Option<bool>, &'static str),
        );
        let cases: Vec<Case> = vec![
            (NONE, None, (Some(false), "default")),
            (file_on, None, (Some(true), "config")),
            (
                flag_off,
                Some(view(Value(true), Absent)),
                (Some(false), "flag"),
            ),
            (
                LocalInputs {
                    flag: Some(true),
                    ..NONE
                },
                Some(view(unknown(), unknown())),
                (Some(true), "flag"),
            ),
            (
                NONE,
                Some(view(Value(true), Absent)),
                (Some(true), "longhorn-setting"),
            ),
            (
                NONE,
                Some(view(Value(true), Value(false))),
                (Some(true), "longhorn-setting"),
            ),
            (
                file_on,
                Some(view(Value(false), Absent)),
                (Some(false), "longhorn-setting"),
            ),
            (
                NONE,
                Some(view(Value(true), Value(true))),
                (Some(false), "node-label"),
            ),
            // Opt-out is final even when the setting is unreadable.
            (
                NONE,
                Some(view(unknown(), Value(true))),
                (Some(false), "node-label"),
            ),
            // Off cluster-wide is final even when the labels are unreadable.
            (
                NONE,
                Some(view(Value(false), unknown())),
                (Some(false), "longhorn-setting"),
            ),
            (
                NONE,
                Some(view(unknown(), Absent)),
                (None, "longhorn-setting"),
            ),
            (
                NONE,
                Some(view(Value(true), unknown())),
                (None, "node-label"),
            ),
            // No setting object: the file decides, the label can still veto.
            (file_on, Some(view(Absent, Absent)), (Some(true), "config")),
            (
                file_on,
                Some(view(Absent, Value(true))),
                (Some(false), "node-label"),
            ),
            (file_on, Some(view(Absent, unknown())), (None, "node-label")),
            (
                NONE,
                Some(view(Absent, unknown())),
                (Some(false), "default"),
            ),
        ];
        for (i, (local, cluster, want)) in cases.iter().enumerate() {
            let d = decide_v2(*local, cluster.as_ref());
            assert_eq!(outcome(&d), *want, "case {i}: {d:?}");
            if d.enabled.is_none() {
                assert!(d.reason.contains("403 Forbidden"), "case {i}: {}", d.reason);
            }
        }
    }

    #[test]
    fn hugepages_follow_v2_and_their_setting() {
        let on = view(Fact::Value(true), Fact::Absent);
        let v2 = decide_v2(NONE, Some(&on));
        assert_eq!(
            outcome(&decide_hugepages(&v2, NONE, Some(&on))),
            (Some(true), "default")
        );
        let off_in_longhorn = ClusterView {
            hugepage_setting: Fact::Value(false),
            ..on.clone()
        };
        assert_eq!(
            outcome(&decide_hugepages(&v2, NONE, Some(&off_in_longhorn))),
            (Some(false), "longhorn-setting")
        );
        // V2 on by the flag, the hugepage setting unreadable: unknown, not
        // demanded blind.
        let flag = LocalInputs {
            flag: Some(true),
            ..NONE
        };
        let blind = ClusterView {
            hugepage_setting: unknown(),
            ..on.clone()
        };
        let v2_flag = decide_v2(flag, Some(&blind));
        assert_eq!(
            outcome(&decide_hugepages(&v2_flag, flag, Some(&blind))),
            (None, "longhorn-setting")
        );
        let zero = LocalInputs {
            hugepages_2mi: 0,
            hugepages_source: Source::Config,
            ..NONE
        };
        assert_eq!(
            outcome(&decide_hugepages(&v2, zero, Some(&on))),
            (Some(false), "config")
        );
        // The flag's 0 is the flag's, not the file's.
        let zero_flag = LocalInputs {
            hugepages_source: Source::Flag,
            ..zero
        };
        let d = decide_hugepages(&v2, zero_flag, Some(&on));
        assert_eq!(outcome(&d), (Some(false), "flag"));
        assert!(d.reason.contains("--v2-hugepages-2mi 0"), "{}", d.reason);
        let v2_unknown = decide_v2(NONE, Some(&view(unknown(), Fact::Absent)));
        assert_eq!(decide_hugepages(&v2_unknown, NONE, None).enabled, None);
        let v2_off = decide_v2(NONE, None);
        assert_eq!(decide_hugepages(&v2_off, NONE, None).enabled, Some(false));
    }

    #[test]
    fn sizes_and_quantities_as_longhorn_and_the_kubelet_write_them() {
        assert_eq!(parse_mib_setting("2048"), Ok(2048));
        assert_eq!(parse_mib_setting(r#"{"v2":"4096"}"#), Ok(4096));
        assert_eq!(parse_mib_setting(r#"{"v1":"1","v2":1024}"#), Ok(1024));
        assert!(parse_mib_setting(r#"{"v1":"1"}"#).is_err());
        assert!(parse_mib_setting("two gigs").is_err());
        assert_eq!(parse_quantity_bytes("2Gi"), Ok(2 << 30));
        assert_eq!(parse_quantity_bytes("2048Mi"), Ok(2 << 30));
        assert_eq!(parse_quantity_bytes("0"), Ok(0));
        assert_eq!(parse_quantity_bytes("2147483648"), Ok(2 << 30));
        assert_eq!(parse_quantity_bytes("2G"), Ok(2_000_000_000));
        assert!(parse_quantity_bytes("1.5Gi").is_err());
        assert!(parse_quantity_bytes("99999999999Ei").is_err());
        assert!(parse_quantity_bytes("18446744073709551615Ki").is_err());
    }

    #[test]
    fn setting_values_as_longhorn_writes_them() {
        assert_eq!(parse_bool_setting("true"), Ok(true));
        assert_eq!(parse_bool_setting("False"), Ok(false));
        assert_eq!(parse_bool_setting(r#"{"v2":"true"}"#), Ok(true));
        assert_eq!(
            parse_bool_setting(r#"{"v1":"true","v2":"false"}"#),
            Ok(false)
        );
        let e = parse_bool_setting("yes").unwrap_err();
        assert!(e.contains("\"yes\""), "{e}");
        assert!(parse_bool_setting(r#"{"v1":"true"}"#).is_err());
    }
}
