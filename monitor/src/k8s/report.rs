//! What the daemon wants the API server to show, built from its state after
//! every change: the Node condition, the opt-in labels, and per requirement
//! group a tally of its transitions (which the writer turns into Events).
//! Pure apart from the actor's enrichment, which reads `/proc/<tgid>` once
//! per transition (the forensic log's reads, done at the same moment).
//!
//! The condition's message is built from the state only (groups, module
//! states, remedies), never from times or actors, so it changes only when
//! the verdict does and a quiet node costs no writes beyond the heartbeat.
use std::collections::BTreeMap;

use crate::{
    forensic::{actor, record::ActorInfo},
    host::HostRoot,
    longhorn::Decision,
    names::ModuleName,
    remedy::Remedy,
    requirements::WARNING_SEVERITY,
    source::ActiveKind,
    tracker::{GroupReport, ModuleReport},
};

/// The condition type this daemon owns on its Node.
pub const CONDITION_TYPE: &str = "KernelModuleRequirementsMet";
/// Every label the daemon keeps is `kmod-monitor.io/<group>`.
pub const LABEL_PREFIX: &str = "kmod-monitor.io/";

/// Reasons of the condition (CamelCase, as Kubernetes writes them).
pub const REASON_MET: &str = "RequirementsMet";
/// Some module group is unmet (with or without a failed check).
pub const REASON_MODULES: &str = "KernelModulesMissing";
/// Only hugepages are short: the pool, or what the kubelet registered.
pub const REASON_HUGEPAGES: &str = "HugepagesInsufficient";
/// Only checks of the host or the cluster fail (kernel version, IOMMU,
/// CPU, a host tool), no module group and not only hugepages.
pub const REASON_NODE: &str = "NodeRequirementsUnmet";
/// Whether a requirement applies cannot be told (the cluster is
/// unreadable), and nothing known is unmet.
pub const REASON_UNKNOWN: &str = "EnablementUnknown";

/// Longest condition message and Event note, in bytes (the API caps a
/// note at 1024; a condition has no cap, but a Node is read by every
/// node watcher in the cluster).
pub const MESSAGE_MAX: usize = 1024;

/// `status` of the condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// The condition as it should read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub status: Status,
    pub reason: &'static str,
    pub message: String,
}

/// One group's verdict and how often it changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Met, unmet, or `None` while not judged (disabled, or its enablement
    /// unknown).
    pub met: Option<bool>,
    /// The last verdict while judged; kept across an unknown enablement, so
    /// an outage of the cluster view does not count as a change.
    pub last_known: Option<bool>,
    /// Transitions to unmet and to met so far (only ever grow).
    pub became_unmet: u64,
    pub became_met: u64,
    /// What the latest transition to unmet, and to met, was and who caused
    /// it: the Events' notes.
    pub unmet_note: String,
    pub met_note: String,
}

/// Everything the writer should make true in the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub condition: Condition,
    /// `kmod-monitor.io/<group>` → `met`, `unmet` or `unknown`.
    pub labels: BTreeMap<String, String>,
    /// Every group ever judged, by name.
    pub groups: BTreeMap<String, Tally>,
}

impl Report {
    /// Before the daemon's first publish: Unknown, which the writer's
    /// start-up wait keeps from being written.
    #[must_use]
    pub fn starting() -> Self {
        Self {
            condition: Condition {
                status: Status::Unknown,
                reason: REASON_UNKNOWN,
                message: "kmod-monitor is starting".to_owned(),
            },
            labels: BTreeMap::new(),
            groups: BTreeMap::new(),
        }
    }
}

/// What a report is built from: the daemon's state as /status has it.
pub struct Inputs<'a> {
    /// The judged groups and checks, as /status lists them.
    pub groups: &'a [GroupReport],
    /// `v2-data-engine` and `v2-hugepages`: on, off or unknown.
    pub enablement: &'a BTreeMap<&'static str, Decision>,
    /// The fix of every module that needs one, as /status has them.
    pub remedies: &'a BTreeMap<ModuleName, Remedy>,
    /// Where `/proc/<tgid>` of an actor is read.
    pub host: &'a HostRoot,
    /// The event source, to say why an actor is unknown.
    pub source: ActiveKind,
}

/// The report for `inputs`, its tallies carried on from `previous`.
#[must_use]
pub fn build(inputs: &Inputs<'_>, previous: &Report) -> Report {
    let unknown: Vec<(&str, &Decision)> = inputs
        .enablement
        .iter()
        .filter(|(_, d)| d.enabled.is_none())
        .map(|(name, d)| (*name, d))
        .collect();
    let mut groups = previous.groups.clone();
    for tally in groups.values_mut() {
        tally.met = None;
    }
    for g in inputs.groups {
        let tally = groups.entry(g.name.clone()).or_default();
        tally.met = Some(g.met);
        match (tally.last_known, g.met) {
            (Some(true) | None, false) => {
                tally.became_unmet += 1;
                tally.unmet_note = note(inputs, g);
            }
            (Some(false), true) => {
                tally.became_met += 1;
                tally.met_note = note(inputs, g);
            }
            _ => {}
        }
        tally.last_known = Some(g.met);
    }
    // A group that is no longer judged starts afresh when it was switched
    // off. While some enablement is unknown (the cluster cannot be read),
    // the groups it governs (V2's checks too) are not judged rather than
    // off: they keep their last verdict, so a blip of the API server is no
    // change, and their labels say `unknown`.
    let mut labels: BTreeMap<String, String> = inputs
        .groups
        .iter()
        .filter_map(|g| label_key(&g.name).map(|k| (k, met_word(g.met).to_owned())))
        .collect();
    for (name, tally) in &mut groups {
        if tally.met.is_some() {
            continue;
        }
        let governed = unknown.iter().any(|(u, _)| u == name)
            || (!unknown.is_empty() && tally.last_known.is_some());
        if governed {
            if let Some(k) = label_key(name) {
                labels.insert(k, "unknown".to_owned());
            }
        } else {
            tally.last_known = None;
        }
    }
    for (name, _) in &unknown {
        if let Some(k) = label_key(name) {
            labels.insert(k, "unknown".to_owned());
        }
    }
    Report {
        condition: condition(inputs, &unknown),
        labels,
        groups,
    }
}

const fn met_word(met: bool) -> &'static str {
    if met { "met" } else { "unmet" }
}

/// `kmod-monitor.io/<group>`, when the group's name fits a label name (at
/// most 63 characters; the config allows only `[a-z0-9-]`).
#[must_use]
pub fn label_key(group: &str) -> Option<String> {
    let ok = !group.is_empty()
        && group.len() <= 63
        && group
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !group.starts_with('-')
        && !group.ends_with('-');
    ok.then(|| format!("{LABEL_PREFIX}{group}"))
}

/// Whether an unmet `g` makes the condition False: everything but a
/// warning, as `check` fails on everything but a warning.
fn fails(g: &GroupReport) -> bool {
    !g.met && g.severity != WARNING_SEVERITY
}

fn condition(inputs: &Inputs<'_>, unknown: &[(&str, &Decision)]) -> Condition {
    let unmet: Vec<&GroupReport> = inputs.groups.iter().filter(|g| fails(g)).collect();
    let warnings: Vec<String> = inputs
        .groups
        .iter()
        .filter(|g| !g.met && !fails(g))
        .map(|g| unmet_group(inputs, g))
        .collect();
    let warned = |text: String| {
        if warnings.is_empty() {
            text
        } else {
            format!("{text}. Warnings: {}", warnings.join(" | "))
        }
    };
    if !unmet.is_empty() {
        let reason = if unmet.iter().any(|g| g.check.is_none()) {
            REASON_MODULES
        } else if unmet.iter().all(|g| g.name.starts_with("v2-hugepages")) {
            REASON_HUGEPAGES
        } else {
            REASON_NODE
        };
        let mut parts: Vec<String> = unmet.iter().map(|g| unmet_group(inputs, g)).collect();
        for (name, d) in unknown {
            parts.push(format!("{name}: not judged ({})", d.reason));
        }
        return Condition {
            status: Status::False,
            reason,
            message: truncate(warned(format!("Unmet: {}", parts.join(" | ")))),
        };
    }
    if !unknown.is_empty() {
        let parts: Vec<String> = unknown
            .iter()
            .map(|(name, d)| format!("{name}: {}", d.reason))
            .collect();
        return Condition {
            status: Status::Unknown,
            reason: REASON_UNKNOWN,
            message: truncate(warned(format!(
                "Whether these requirements apply cannot be told: {}. Met: {}",
                parts.join(" | "),
                names(inputs.groups)
            ))),
        };
    }
    Condition {
        status: Status::True,
        reason: REASON_MET,
        message: truncate(warned(format!("Met: {}", names(inputs.groups)))),
    }
}

/// The groups that are met, by name.
fn names(groups: &[GroupReport]) -> String {
    let met: Vec<&str> = groups
        .iter()
        .filter(|g| g.met)
        .map(|g| g.name.as_str())
        .collect();
    if met.is_empty() {
        return if groups.is_empty() {
            "no requirement is enabled".to_owned()
        } else {
            "none".to_owned()
        };
    }
    met.into_iter().collect::<Vec<_>>().join(", ")
}

/// `group: module state (fix); …` for an unmet group.
fn unmet_group(inputs: &Inputs<'_>, g: &GroupReport) -> String {
    let (mode, detail) = unmet_detail(inputs, g);
    format!("{}{mode}: {detail}", g.name)
}

/// For an unmet group: `" (any one of)"` or `""`, and what is missing with
/// its fix (a check's finding and fix, or each module's state and remedy).
fn unmet_detail(inputs: &Inputs<'_>, g: &GroupReport) -> (&'static str, String) {
    if let Some(check) = &g.check {
        let detail = match &check.fix {
            Some(fix) => format!("{} (fix: {fix})", check.detail),
            None => check.detail.clone(),
        };
        return ("", detail);
    }
    let modules: Vec<String> = g
        .modules
        .iter()
        .filter(|m| !m.state.satisfies())
        .map(|m| module_fix(inputs.remedies, m))
        .collect();
    let mode = match g.mode {
        crate::requirements::GroupMode::AnyOf => " (any one of)",
        _ => "",
    };
    (mode, modules.join("; "))
}

/// `name is state (fix: steps)`, the steps as an alert's description has
/// them, with the node's paths.
fn module_fix(remedies: &BTreeMap<ModuleName, Remedy>, m: &ModuleReport) -> String {
    match remedies.get(&m.name) {
        Some(fix) => format!("{} is {} (fix: {})", m.name, m.state, fix.steps_inline()),
        None => format!("{} is {}", m.name, m.state),
    }
}

/// The Event's note for a group that just changed: its verdict, the module
/// whose event caused it and who did it (where the source says).
fn note(inputs: &Inputs<'_>, g: &GroupReport) -> String {
    let verdict = if g.met {
        format!("{} is met again", g.name)
    } else {
        let (mode, detail) = unmet_detail(inputs, g);
        format!("{} is unmet{mode}: {detail}", g.name)
    };
    let cause = g
        .modules
        .iter()
        .filter_map(|m| m.last_event.as_ref().map(|e| (m, e)))
        .max_by_key(|(_, e)| e.applied_ns);
    let text = match cause {
        None => verdict,
        Some((m, e)) => match &e.actor {
            Some(a) => format!(
                "{verdict}. Last event: {} {} by {}",
                m.name,
                e.kind,
                who(&actor::enrich(inputs.host, a))
            ),
            None => format!(
                "{verdict}. Last event: {} {} (actor unknown: {} source)",
                m.name, e.kind, inputs.source
            ),
        },
    };
    truncate(text)
}

/// `comm (pid P, uid U, pod UID)`, the pod where the cgroup names one.
fn who(a: &ActorInfo) -> String {
    let mut text = format!("{} (pid {}, uid {}", a.comm, a.tgid, a.uid);
    if let Some(pod) = &a.pod_uid {
        text.push_str(&format!(", pod {pod}"));
    } else if let Some(cg) = &a.cgroup {
        text.push_str(&format!(", cgroup {cg}"));
    }
    text.push(')');
    text
}

/// At most [`MESSAGE_MAX`] bytes, cut at a character boundary with `…`.
fn truncate(mut text: String) -> String {
    if text.len() <= MESSAGE_MAX {
        return text;
    }
    let mut end = MESSAGE_MAX - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{Actor, Kind},
        longhorn::Source,
        requirements::GroupMode,
        state::ModuleState,
        testing::{FakeHost, name},
        tracker::LastEvent,
    };

    fn module(n: &str, state: ModuleState, last: Option<(Kind, u64, bool)>) -> ModuleReport {
        ModuleReport {
            name: name(n),
            state,
            last_event: last.map(|(kind, at, with_actor)| LastEvent {
                kind,
                boot_ns: at,
                applied_ns: at,
                actor: with_actor.then(|| Actor {
                    pid: 105,
                    tgid: 105,
                    uid: 0,
                    gid: 0,
                    comm: "rmmod".into(),
                    cgroup_id: 1,
                }),
            }),
        }
    }

    fn group(n: &str, modules: Vec<ModuleReport>) -> GroupReport {
        GroupReport {
            name: n.to_owned(),
            mode: GroupMode::AllOf,
            met: modules.iter().all(|m| m.state.satisfies()),
            severity: "critical".to_owned(),
            modules,
            check: None,
        }
    }

    /// A check of the host, as the readiness layer reports one.
    fn check(n: &str, met: bool, severity: &str, detail: &str, fix: &str) -> GroupReport {
        GroupReport {
            name: n.to_owned(),
            mode: GroupMode::Check,
            met,
            severity: severity.to_owned(),
            modules: Vec::new(),
            check: Some(crate::requirements::CheckInfo {
                level: if severity == WARNING_SEVERITY {
                    crate::requirements::Level::Warning
                } else {
                    crate::requirements::Level::Required
                },
                detail: detail.to_owned(),
                fix: (!met).then(|| fix.to_owned()),
                source: "longhornctl".to_owned(),
            }),
        }
    }

    fn decision(enabled: Option<bool>) -> Decision {
        Decision {
            enabled,
            source: Source::LonghornSetting,
            reason: "settings.longhorn.io: cannot reach the API server".to_owned(),
        }
    }

    struct World {
        host: FakeHost,
        snapshot: crate::host::Snapshot,
    }

    impl World {
        fn new() -> Self {
            Self {
                host: FakeHost::debian_6_1(),
                snapshot: crate::testing::snapshot_debian_6_1(),
            }
        }

        fn report(&self, groups: &[GroupReport], v2: Option<bool>, previous: &Report) -> Report {
            let enablement: BTreeMap<&'static str, Decision> =
                [("v2-data-engine", decision(v2))].into_iter().collect();
            let host = self.host.root();
            // The remedies as the daemon has them: the real ones, for
            // boot-time facts of a host where nothing loads a module.
            let remedies = crate::remedy::remedies(groups, &BTreeMap::new(), &self.snapshot, &host);
            build(
                &Inputs {
                    groups,
                    enablement: &enablement,
                    remedies: &remedies,
                    host: &host,
                    source: ActiveKind::Ebpf,
                },
                previous,
            )
        }
    }

    #[test]
    fn true_false_and_unknown_with_reasons_and_fixes() {
        let w = World::new();
        let base_ok = group("base", vec![module("dm_crypt", ModuleState::Loaded, None)]);
        let r = w.report(
            std::slice::from_ref(&base_ok),
            Some(false),
            &Report::starting(),
        );
        assert_eq!(r.condition.status, Status::True);
        assert_eq!(r.condition.reason, REASON_MET);
        assert_eq!(r.condition.message, "Met: base");
        assert_eq!(r.labels["kmod-monitor.io/base"], "met");

        let base_gone = group(
            "base",
            vec![module(
                "dm_crypt",
                ModuleState::Available,
                Some((Kind::Unload, 7, true)),
            )],
        );
        let r = w.report(&[base_gone], None, &r);
        assert_eq!(r.condition.status, Status::False);
        assert_eq!(r.condition.reason, REASON_MODULES);
        assert_eq!(
            r.condition.message,
            "Unmet: base: dm_crypt is available (fix: `modprobe dm_crypt`; then `echo dm_crypt >> /etc/modules-load.d/kmod-monitor.conf`) | v2-data-engine: not judged (settings.longhorn.io: cannot reach the API server)"
        );
        assert_eq!(r.labels["kmod-monitor.io/base"], "unmet");
        assert_eq!(r.labels["kmod-monitor.io/v2-data-engine"], "unknown");
        let t = &r.groups["base"];
        assert_eq!((t.became_unmet, t.became_met), (1, 0));
        assert!(
            t.unmet_note
                .starts_with("base is unmet: dm_crypt is available (fix: `modprobe dm_crypt`"),
            "{}",
            t.unmet_note
        );
        assert!(
            t.unmet_note
                .ends_with("Last event: dm_crypt unload by rmmod (pid 105, uid 0)"),
            "{}",
            t.unmet_note
        );

        // Met again, V2 still unknown: the condition is Unknown, not True.
        let r = w.report(std::slice::from_ref(&base_ok), None, &r);
        assert_eq!(r.condition.status, Status::Unknown);
        assert_eq!(r.condition.reason, REASON_UNKNOWN);
        assert!(r.condition.message.contains("cannot reach the API server"));
        assert_eq!(
            (r.groups["base"].became_unmet, r.groups["base"].became_met),
            (1, 1)
        );
        assert_eq!(r.groups["base"].met_note, "base is met again");
    }

    /// The actor's pod comes from its cgroup, read from `/proc/<tgid>`
    /// under the host root when the transition is counted.
    #[test]
    fn the_note_names_the_actors_pod() {
        let w = World::new();
        let pod = "5d3c1f2e-8a4b-4c6d-9e0f-112233445566";
        let cid = "ab".repeat(32);
        w.host
            .write(
                "proc/105/stat",
                "105 (rmmod) S 99 105 99 0 -1 4194560 0 0\n",
            )
            .write(
                "proc/105/cgroup",
                format!("0::/kubepods/besteffort/pod{pod}/{cid}\n"),
            );
        let base_gone = group(
            "base",
            vec![module(
                "dm_crypt",
                ModuleState::Available,
                Some((Kind::Unload, 7, true)),
            )],
        );
        let r = w.report(&[base_gone], Some(false), &Report::starting());
        assert!(
            r.groups["base"].unmet_note.ends_with(&format!(
                "Last event: dm_crypt unload by rmmod (pid 105, uid 0, pod {pod})"
            )),
            "{}",
            r.groups["base"].unmet_note
        );
    }

    #[test]
    fn an_unknown_enablement_is_not_a_change_but_switching_off_is() {
        let w = World::new();
        let base = group("base", vec![module("dm_crypt", ModuleState::Loaded, None)]);
        let v2_unmet = group(
            "v2-data-engine",
            vec![module("uio_pci_generic", ModuleState::Available, None)],
        );
        // A check V2 governs: not judged while V2's enablement is unknown.
        let iommu = check(
            "v2-iommu",
            false,
            "critical",
            "0 IOMMU groups",
            "turn on the IOMMU",
        );
        let on = w.report(
            &[base.clone(), v2_unmet.clone(), iommu.clone()],
            Some(true),
            &Report::starting(),
        );
        assert_eq!(on.groups["v2-data-engine"].became_unmet, 1);
        assert_eq!(on.groups["v2-iommu"].became_unmet, 1);
        assert_eq!(
            on.groups["base"].became_unmet, 0,
            "met from the start: no change"
        );
        // The cluster becomes unreadable, then readable: no new transition,
        // and V2's groups are labelled unknown meanwhile.
        let unknown = w.report(std::slice::from_ref(&base), None, &on);
        assert_eq!(unknown.groups["v2-data-engine"].met, None);
        assert_eq!(unknown.labels["kmod-monitor.io/v2-data-engine"], "unknown");
        assert_eq!(unknown.labels["kmod-monitor.io/v2-iommu"], "unknown");
        let back = w.report(
            &[base.clone(), v2_unmet.clone(), iommu.clone()],
            Some(true),
            &unknown,
        );
        assert_eq!(back.groups["v2-data-engine"].became_unmet, 1);
        assert_eq!(
            back.groups["v2-iommu"].became_unmet, 1,
            "a blip is no change"
        );
        // Switched off, then on again: a new transition.
        let off = w.report(std::slice::from_ref(&base), Some(false), &back);
        assert!(!off.labels.contains_key("kmod-monitor.io/v2-data-engine"));
        assert!(!off.labels.contains_key("kmod-monitor.io/v2-iommu"));
        let again = w.report(&[base, v2_unmet, iommu], Some(true), &off);
        assert_eq!(again.groups["v2-data-engine"].became_unmet, 2);
        assert_eq!(again.groups["v2-iommu"].became_unmet, 2);
    }

    #[test]
    fn checks_carry_their_finding_and_fix_and_warnings_do_not_fail() {
        let w = World::new();
        let base = group("base", vec![module("dm_crypt", ModuleState::Loaded, None)]);
        let pool = check(
            "v2-hugepages",
            false,
            "critical",
            "512 of 1024 2 MiB hugepages",
            "sysctl -w vm.nr_hugepages=1024",
        );
        let recommended = check(
            "v2-kernel-recommended",
            false,
            WARNING_SEVERITY,
            "kernel 6.1.0-44-amd64 is older than 6.7",
            "upgrade the kernel to 6.7 or newer",
        );
        let r = w.report(
            &[base.clone(), pool.clone(), recommended.clone()],
            Some(true),
            &Report::starting(),
        );
        assert_eq!(r.condition.status, Status::False);
        assert_eq!(r.condition.reason, REASON_HUGEPAGES);
        assert_eq!(
            r.condition.message,
            "Unmet: v2-hugepages: 512 of 1024 2 MiB hugepages (fix: sysctl -w vm.nr_hugepages=1024). Warnings: v2-kernel-recommended: kernel 6.1.0-44-amd64 is older than 6.7 (fix: upgrade the kernel to 6.7 or newer)"
        );
        assert_eq!(
            r.groups["v2-hugepages"].unmet_note,
            "v2-hugepages is unmet: 512 of 1024 2 MiB hugepages (fix: sysctl -w vm.nr_hugepages=1024)"
        );
        assert_eq!(
            r.groups["v2-kernel-recommended"].became_unmet, 1,
            "a warning still gets its Event"
        );

        let iommu = check(
            "v2-iommu",
            false,
            "critical",
            "no IOMMU groups",
            "turn on the IOMMU",
        );
        let r = w.report(&[base.clone(), pool, iommu], Some(true), &r);
        assert_eq!(r.condition.reason, REASON_NODE, "not only hugepages");

        // Nothing but an unmet warning: True, and nothing is said to be met.
        let r = w.report(std::slice::from_ref(&recommended), Some(true), &r);
        assert_eq!(r.condition.status, Status::True);
        assert!(
            r.condition
                .message
                .starts_with("Met: none. Warnings: v2-kernel-recommended"),
            "{}",
            r.condition.message
        );

        // Only a warning is unmet: the condition is True and says so.
        let r = w.report(&[base, recommended], Some(true), &r);
        assert_eq!(r.condition.status, Status::True);
        assert_eq!(
            r.condition.message,
            "Met: base. Warnings: v2-kernel-recommended: kernel 6.1.0-44-amd64 is older than 6.7 (fix: upgrade the kernel to 6.7 or newer)"
        );
    }

    #[test]
    fn labels_only_for_names_a_label_can_carry() {
        assert_eq!(
            label_key("v2-data-engine").as_deref(),
            Some("kmod-monitor.io/v2-data-engine")
        );
        assert_eq!(label_key(&"a".repeat(64)), None);
        assert_eq!(label_key("-a"), None);
    }

    #[test]
    fn messages_are_capped_at_a_character_boundary() {
        let long = "é".repeat(MESSAGE_MAX);
        let cut = truncate(long);
        assert!(cut.len() <= MESSAGE_MAX);
        assert!(cut.ends_with('…'));
    }
}
