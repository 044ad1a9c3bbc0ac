//! `kmod-monitor check`: the one-shot preflight. Reads the settings, the
//! cluster and the host once, judges every group on its own, and for each
//! unmet module says exactly how to fix it now and across reboots
//! (remedies come from [`crate::remedy`]). `--fix` ([`crate::fix`]) acts
//! on the same evaluation.
use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use serde::Serialize;

use anyhow::Context as _;

use crate::{
    config::{
        CommonSettings,
        flags::{CommonFlags, Output},
        settings,
    },
    host::{
        self, HostRoot, Snapshot,
        persistence::{OtherKernel, Persistence},
    },
    longhorn::{self, ClusterSettings, LonghornMode},
    names::ModuleName,
    remedy::{self, BootFacts, Need, Remedy},
    requirements,
    requirements::GroupMode,
    state::ModuleState,
    tracker::{GroupReport, Tracker},
};

#[derive(Clone, Debug, Serialize)]
pub struct ModuleCheck {
    pub name: ModuleName,
    pub state: ModuleState,
    /// What makes this group's requirement of the module hold, now and
    /// after a reboot; `None` when it holds.
    pub remedy: Option<Remedy>,
    /// Whether it will be there after a reboot, and why (or why not).
    pub persistence: Persistence,
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupCheck {
    pub name: String,
    pub mode: GroupMode,
    pub met: bool,
    /// `warning` requirements never fail `check` on their own.
    pub severity: String,
    pub modules: Vec<ModuleCheck>,
    /// For checks of the host and cluster (mode `check`): level, what was
    /// found, the fix, the source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<requirements::CheckInfo>,
}

/// The whole report, as `--output json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel_release: String,
    pub modules_supported: bool,
    pub met: bool,
    pub groups: Vec<GroupCheck>,
    /// Other installed kernels and the required modules each would lose.
    pub other_kernels: Vec<OtherKernel>,
    /// Every required module that needs something, with what all its
    /// groups ask of it together: the node's to-do list.
    pub remedies: BTreeMap<ModuleName, Remedy>,
    pub warnings: Vec<String>,
    /// The Longhorn version in force, V2 enablement, the host facts.
    pub v2: Option<longhorn::v2::V2Status>,
    /// How the cluster was consulted (or why not).
    pub cluster: String,
}

impl Report {
    /// Exit code: 0 when every requirement but the warnings is met, 1
    /// otherwise.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        u8::from(!self.met)
    }
}

/// The node judged once: the report (groups, V2 readiness, other kernels)
/// and what it was judged from, for `check` to print and `check --fix` to
/// act on.
pub struct Evaluation {
    pub report: Report,
    pub boot: BootFacts,
    pub host: HostRoot,
}

/// Reads the settings, the cluster (once, with a timeout) and the host,
/// and judges every group on its own.
///
/// # Errors
/// Bad flags or config (exit 2 in `main`), an unreadable host.
pub fn evaluate_node(flags: &CommonFlags) -> anyhow::Result<Evaluation> {
    let file = settings::load_file(flags)?;
    let CommonSettings {
        config_path: _,
        host,
        node_name,
        groups,
        v2_local,
        cluster,
    } = settings::resolve_common(flags, file.as_ref())?;
    let (view, cluster_note) = read_cluster_once(&cluster, &node_name)?;
    let snapshot = host::take_snapshot(&host).context("reading the host")?;
    // The daemon's own Longhorn state, fed one read instead of a watch, so
    // `check` and `run` judge alike.
    let mut state = longhorn::v2::V2State::new(
        v2_local,
        if view.is_some() {
            Ok(())
        } else {
            Err(cluster_note.clone())
        },
        cluster.namespace.clone(),
        node_name,
        cluster.grace,
        &host,
        &snapshot.kernel_release,
    );
    if let Some(view) = view {
        state.set_view(view);
    }
    state.refresh_facts(&host);
    let module_groups = requirements::resolve(&groups, state.v2.enabled == Some(true));
    let mut tracker = Tracker::new(&snapshot, module_groups);
    let boot = crate::remedy::boot_facts(&host, &snapshot, tracker.groups());
    tracker.set_blocked(boot.blocked());
    let mut report = evaluate(&snapshot, &tracker, &boot, &host);
    let v2_severity = requirements::v2_severity(tracker.groups()).to_owned();
    for verdict in state.checks(&groups, &v2_severity) {
        match verdict.met {
            Some(met) => report.groups.push(GroupCheck {
                name: verdict.name.to_owned(),
                mode: GroupMode::Check,
                met,
                severity: verdict.severity,
                modules: Vec::new(),
                check: Some(verdict.info),
            }),
            None => report.warnings.push(format!(
                "{} not judged: {}",
                verdict.name, verdict.info.detail
            )),
        }
    }
    if state.v2.enabled.is_none() {
        report.warnings.push(format!(
            "V2 data engine enablement unknown, its requirements were not checked: {}",
            state.v2.reason
        ));
    }
    report.met = report
        .groups
        .iter()
        .all(|g| g.met || g.severity == requirements::WARNING_SEVERITY);
    report.v2 = Some(state.status());
    report.cluster = cluster_note;
    Ok(Evaluation { report, boot, host })
}

/// `kmod-monitor check`: prints the report; exit code 0 met, 1 not met.
///
/// # Errors
/// As [`evaluate_node`], or the report cannot be encoded.
pub fn command(common: &CommonFlags, output: Output) -> anyhow::Result<u8> {
    let Evaluation { report, .. } = evaluate_node(common)?;
    match output {
        Output::Text => print!("{}", render_text(&report)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the report")?
        ),
    }
    Ok(report.exit_code())
}

/// `check`'s one read of the cluster: the view, and a note on how it was
/// read (or why not).
fn read_cluster_once(
    cluster: &ClusterSettings,
    node: &str,
) -> anyhow::Result<(Option<longhorn::ClusterView>, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let Some(client) = longhorn::client(cluster).await? else {
            let why = match cluster.mode {
                LonghornMode::Off => "not asked (--longhorn off)",
                LonghornMode::Auto => {
                    "not asked: not in a cluster (no service account, no kubeconfig)"
                }
            };
            return Ok((None, why.to_owned()));
        };
        let target = longhorn::watch::WatchTarget {
            namespace: cluster.namespace.clone(),
            node: node.to_owned(),
        };
        let view = tokio::time::timeout(
            CHECK_CLUSTER_TIMEOUT,
            longhorn::watch::read_once(client, &target),
        )
        .await
        .unwrap_or_else(|_| {
            longhorn::ClusterView::unreadable(&format!(
                "no answer from the API server within {CHECK_CLUSTER_TIMEOUT:?}"
            ))
        });
        Ok((
            Some(view),
            format!("asked (namespace {}, node {node})", cluster.namespace),
        ))
    })
}

/// How long `check` waits for the API server.
const CHECK_CLUSTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Judges `groups` (already resolved) against a snapshot of the host
/// under `host`.
#[must_use]
pub fn evaluate(
    snapshot: &Snapshot,
    tracker: &Tracker,
    boot: &BootFacts,
    host: &HostRoot,
) -> Report {
    let reports = tracker.report();
    let remedies = remedy::remedies(&reports, &boot.persistence, snapshot, host);
    let groups: Vec<GroupCheck> = reports
        .into_iter()
        .map(|g: GroupReport| {
            let modules = g
                .modules
                .iter()
                .map(|m| {
                    let persistence = boot.persistence.get(&m.name).cloned().unwrap_or_default();
                    let need = Need::in_group(&g, m.state, &boot.persistence);
                    ModuleCheck {
                        remedy: remedy::remedy(
                            snapshot,
                            host,
                            &persistence,
                            &m.name,
                            m.state,
                            need,
                        ),
                        persistence,
                        name: m.name.clone(),
                        state: m.state,
                    }
                })
                .collect();
            GroupCheck {
                modules,
                name: g.name,
                mode: g.mode,
                met: g.met,
                severity: g.severity,
                check: g.check,
            }
        })
        .collect();
    Report {
        kernel_release: snapshot.kernel_release.clone(),
        modules_supported: snapshot.modules_supported,
        met: groups.iter().all(|g| g.met),
        v2: None,
        cluster: String::new(),
        groups,
        other_kernels: boot.other_kernels.clone(),
        remedies,
        warnings: snapshot
            .warnings
            .iter()
            .chain(&boot.warnings)
            .cloned()
            .collect(),
    }
}

/// The human-readable table.
#[must_use]
pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    let modules = if r.modules_supported {
        "yes"
    } else {
        "NO (CONFIG_MODULES off: only built-in modules count)"
    };
    let _ = writeln!(
        out,
        "kernel {}   loadable modules: {modules}",
        r.kernel_release
    );
    for w in &r.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let mode_suffix = |mode: GroupMode| match mode {
        GroupMode::AllOf | GroupMode::Check => "",
        GroupMode::AnyOf => " (any of)",
        GroupMode::Available => " (on demand)",
    };
    let gw = r
        .groups
        .iter()
        .filter(|g| g.check.is_none())
        .map(|g| g.name.len() + mode_suffix(g.mode).len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mw = r
        .groups
        .iter()
        .flat_map(|g| g.modules.iter().map(|m| m.name.as_str().len()))
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(
        out,
        "\n{:gw$}  {:4}  {:mw$}  {:9}  AFTER REBOOT",
        "GROUP", "MET", "MODULE", "STATE"
    );
    for g in &r.groups {
        for (i, m) in g.modules.iter().enumerate() {
            let (name, met) = if i == 0 {
                let mode = mode_suffix(g.mode);
                (
                    format!("{}{mode}", g.name),
                    if g.met { "yes" } else { "NO" },
                )
            } else {
                (String::new(), "")
            };
            let after = if m.persistence.persistent {
                "yes"
            } else if g.mode == GroupMode::Available {
                "on demand"
            } else if m.state.satisfies() {
                "NO (gone after reboot)"
            } else {
                "no"
            };
            let _ = writeln!(
                out,
                "{name:gw$}  {met:4}  {:mw$}  {:9}  {after}",
                m.name.as_str(),
                m.state.as_str()
            );
        }
    }
    // Each module once, in report order, with what all its groups ask.
    let mut seen = std::collections::BTreeSet::new();
    let todo: Vec<(&ModuleCheck, &Remedy)> = r
        .groups
        .iter()
        .flat_map(|g| g.modules.iter())
        .filter(|m| seen.insert(&m.name))
        .filter_map(|m| Some((m, r.remedies.get(&m.name)?)))
        .collect();
    let (fragile, unmet): (Vec<_>, Vec<_>) =
        todo.into_iter().partition(|(m, _)| m.state.satisfies());
    if !unmet.is_empty() {
        let _ = writeln!(out, "\nTo fix:");
        for (m, fix) in unmet {
            let _ = writeln!(out, "  {} ({}): {}", m.name, m.state, fix.explanation);
            out.push_str(&fix.render_steps("      "));
        }
    }
    // Loaded today, gone after the next reboot (longhorn/longhorn#12067).
    if !fragile.is_empty() {
        let _ = writeln!(out, "\nLoaded now but NOT after a reboot:");
        for (m, fix) in fragile {
            let _ = writeln!(out, "  {}: {}", m.name, fix.explanation);
            out.push_str(&fix.render_steps("      "));
        }
    }
    for k in &r.other_kernels {
        if k.missing.is_empty() {
            continue;
        }
        let names: Vec<&str> = k.missing.iter().map(ModuleName::as_str).collect();
        let _ = writeln!(
            out,
            "\nInstalled kernel {} lacks {}: booting it would lose them (install its extra modules package)",
            k.release,
            names.join(", ")
        );
    }
    if let Some(v2) = &r.v2 {
        render_longhorn(&mut out, r, v2);
    }
    let failing: Vec<&str> = r
        .groups
        .iter()
        .filter(|g| !g.met && g.severity != requirements::WARNING_SEVERITY)
        .map(|g| g.name.as_str())
        .collect();
    let warned: Vec<&str> = r
        .groups
        .iter()
        .filter(|g| !g.met && g.severity == requirements::WARNING_SEVERITY)
        .map(|g| g.name.as_str())
        .collect();
    if failing.is_empty() {
        let _ = writeln!(
            out,
            "\nAll {} requirements met.",
            r.groups.len() - warned.len()
        );
    } else {
        let _ = writeln!(
            out,
            "\n{} of {} requirements NOT met: {}",
            failing.len(),
            r.groups.len(),
            failing.join(", ")
        );
    }
    if !warned.is_empty() {
        let _ = writeln!(
            out,
            "{} warning(s), which do not fail the check: {}",
            warned.len(),
            warned.join(", ")
        );
    }
    out
}

/// The Longhorn section: the version in force, V2's enablement, and one row
/// per check with its state and fix.
fn render_longhorn(out: &mut String, r: &Report, v2: &longhorn::v2::V2Status) {
    let version = &v2.longhorn_version;
    let _ = writeln!(
        out,
        "\nLonghorn {} node requirements (version from {}; table row {})",
        version.version, version.source, version.table_row
    );
    for (name, d) in &v2.enablement {
        let _ = writeln!(
            out,
            "  {name}: {} (by {}: {})",
            d.state(),
            d.source.as_str(),
            d.reason
        );
    }
    let _ = writeln!(out, "  cluster: {}", r.cluster);
    let checks: Vec<&GroupCheck> = r.groups.iter().filter(|g| g.check.is_some()).collect();
    if checks.is_empty() {
        return;
    }
    let nw = checks
        .iter()
        .map(|g| g.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(out, "\n  {:nw$}  {:8}  {:4}  FOUND", "ITEM", "LEVEL", "MET");
    for g in &checks {
        let Some(c) = &g.check else { continue };
        let level = match c.level {
            requirements::Level::Required => "required",
            requirements::Level::Warning => "warning",
        };
        let met = match (g.met, c.level) {
            (true, _) => "yes",
            (false, requirements::Level::Warning) => "warn",
            (false, requirements::Level::Required) => "NO",
        };
        let _ = writeln!(out, "  {:nw$}  {level:8}  {met:4}  {}", g.name, c.detail);
    }
    let fixes: Vec<(&str, &str)> = checks
        .iter()
        .filter_map(|g| Some((g.name.as_str(), g.check.as_ref()?.fix.as_deref()?)))
        .collect();
    if !fixes.is_empty() {
        let _ = writeln!(out, "\n  To fix:");
        for (name, fix) in fixes {
            let _ = writeln!(out, "    {name}: {fix}");
        }
    }
}
