//! `kmod-monitor check`: the one-shot preflight. Reads the settings, the
//! cluster and the host once, judges every group on its own, and for each
//! unmet module says exactly how to fix it now and across reboots
//! (remedies come from [`crate::remedy`]). `--fix` ([`crate::fix`]) acts
//! on the same evaluation.
use std::{fmt::Write as _, time::Duration};

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
    remedy::{BootFacts, MODULES_LOAD_FILE, Remedy, remedy},
    requirements,
    requirements::GroupMode,
    state::ModuleState,
    tracker::{GroupReport, Tracker},
};

#[derive(Clone, Debug, Serialize)]
pub struct ModuleCheck {
    pub name: ModuleName,
    pub state: ModuleState,
    pub remedy: Option<Remedy>,
    /// Whether it will be there after a reboot, and why (or why not).
    pub persistence: Persistence,
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupCheck {
    pub name: String,
    pub mode: GroupMode,
    pub met: bool,
    pub modules: Vec<ModuleCheck>,
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
    pub warnings: Vec<String>,
    /// V2 enablement and readiness beyond modules; `met` includes it.
    pub v2: Option<crate::longhorn::readiness::V2Check>,
}

impl Report {
    /// Exit code: 0 when every group is met, 1 otherwise.
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
    let v2 = longhorn::decide_v2(v2_local, view.as_ref());
    let hugepages_on = longhorn::decide_hugepages(&v2, v2_local, view.as_ref());
    let groups = requirements::resolve(&groups, v2.enabled == Some(true));
    let snapshot = host::take_snapshot(&host).context("reading the host")?;
    let tracker = Tracker::new(&snapshot, groups);
    let boot = crate::remedy::boot_facts(&host, &snapshot, tracker.groups());
    let mut report = evaluate(&snapshot, &tracker, &boot);
    let readiness =
        longhorn::readiness::read(&host, &snapshot.kernel_release, v2_local.hugepages_2mi);
    let v2_check = longhorn::readiness::judge(v2, hugepages_on, readiness, cluster_note);
    report.met &= v2_check.met;
    report.v2 = Some(v2_check);
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
            let r = format!("no answer from the API server within {CHECK_CLUSTER_TIMEOUT:?}");
            longhorn::ClusterView {
                v2_setting: longhorn::Fact::Unknown(r.clone()),
                hugepage_setting: longhorn::Fact::Unknown(r.clone()),
                node_opt_out: longhorn::Fact::Unknown(r),
            }
        });
        Ok((
            Some(view),
            format!("asked (namespace {}, node {node})", cluster.namespace),
        ))
    })
}

/// How long `check` waits for the API server.
const CHECK_CLUSTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Judges `groups` (already resolved) against a snapshot.
#[must_use]
pub fn evaluate(snapshot: &Snapshot, tracker: &Tracker, boot: &BootFacts) -> Report {
    let groups: Vec<GroupCheck> =
        tracker
            .report()
            .into_iter()
            .map(|g: GroupReport| GroupCheck {
                modules: g
                    .modules
                    .into_iter()
                    .map(|m| ModuleCheck {
                        remedy: (!g.met && !m.state.satisfies())
                            .then(|| remedy(snapshot, &m.name, m.state)),
                        persistence: boot.persistence.get(&m.name).cloned().unwrap_or(
                            Persistence {
                                persistent: false,
                                sources: Vec::new(),
                                blocked_by: Vec::new(),
                            },
                        ),
                        name: m.name,
                        state: m.state,
                    })
                    .collect(),
                name: g.name,
                mode: g.mode,
                met: g.met,
            })
            .collect();
    Report {
        kernel_release: snapshot.kernel_release.clone(),
        modules_supported: snapshot.modules_supported,
        met: groups.iter().all(|g| g.met),
        v2: None,
        groups,
        other_kernels: boot.other_kernels.clone(),
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
        GroupMode::AllOf => "",
        GroupMode::AnyOf => " (any of)",
    };
    let gw = r
        .groups
        .iter()
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
    let fixes: Vec<&ModuleCheck> = r
        .groups
        .iter()
        .flat_map(|g| g.modules.iter())
        .filter(|m| m.remedy.is_some())
        .collect();
    if !fixes.is_empty() {
        let _ = writeln!(out, "\nTo fix:");
        let mut seen = std::collections::BTreeSet::new();
        for m in fixes {
            if !seen.insert(&m.name) {
                continue;
            }
            let Some(fix) = &m.remedy else { continue };
            let _ = writeln!(out, "  {} ({}): {}", m.name, m.state, fix.explanation);
            if let Some(cmd) = &fix.command {
                let _ = writeln!(out, "      now:         {cmd}");
            }
            if let (Some(line), Some(file)) = (&fix.persist_line, fix.persist_file) {
                let _ = writeln!(out, "      after boot:  echo {line} >> {file}");
            }
        }
    }
    // Loaded today, gone after the next reboot (longhorn/longhorn#12067).
    let mut seen = std::collections::BTreeSet::new();
    let fragile: Vec<&ModuleCheck> = r
        .groups
        .iter()
        .flat_map(|g| g.modules.iter())
        .filter(|m| m.state.satisfies() && !m.persistence.persistent && seen.insert(&m.name))
        .collect();
    if !fragile.is_empty() {
        let _ = writeln!(out, "\nLoaded now but NOT after a reboot:");
        for m in fragile {
            let _ = writeln!(out, "  {}: nothing loads it at boot", m.name);
            for b in &m.persistence.blocked_by {
                let _ = writeln!(out, "      blocked: {b}");
            }
            let _ = writeln!(out, "      fix:     echo {} >> {MODULES_LOAD_FILE}", m.name);
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
    let unmet: Vec<&str> = r
        .groups
        .iter()
        .filter(|g| !g.met)
        .map(|g| g.name.as_str())
        .collect();
    if unmet.is_empty() {
        let _ = writeln!(out, "\nAll {} requirement groups met.", r.groups.len());
    } else {
        let _ = writeln!(
            out,
            "\n{} of {} requirement groups NOT met: {}",
            unmet.len(),
            r.groups.len(),
            unmet.join(", ")
        );
    }
    if let Some(v2) = &r.v2 {
        out.push_str(&crate::longhorn::readiness::render(v2));
    }
    out
}
