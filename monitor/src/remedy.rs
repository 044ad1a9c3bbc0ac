//! Remedies: for a required module, the steps that make its requirement
//! hold, now and after every reboot; and the boot-time facts
//! (modules-load.d, modprobe.d, the command line, other installed kernels)
//! that decide whether a module will be there after a reboot. `check`
//! prints the remedies, /status and the alerts carry them, `check --fix`
//! carries out the steps it may and prints the others.
//!
//! # Every remedy works
//! A remedy is not advice but the exact change, in order, after which the
//! requirement holds:
//! - a module the kernel lacks: the kernel package, or the `CONFIG_` option
//!   a kernel needs ([`Step::Kernel`]);
//! - a module something blocks (a modprobe.d `blacklist` or
//!   `install … /bin/false`, `modprobe.blacklist=` or `module_blacklist=`
//!   on the kernel command line): the line to delete or change, in the
//!   file the node has ([`Step::DeleteLines`], [`Step::KernelCmdline`]),
//!   then what loads it ([`Remedy::boot_source`], or the line the remedy
//!   adds). A line a blacklist would skip is never the remedy on its own;
//! - a module that is not loaded: `modprobe` ([`Step::Run`]), placed after
//!   whatever would make it fail;
//! - a module that nothing loads at boot: the modules-load.d line
//!   ([`Step::AppendLine`]).
//!
//! Paths are the node's ([`NodePath`]): a person reads `/etc/...`, never
//! the `--host-root` they were read under. JSON carries both.
use std::{collections::BTreeMap, fmt};

use serde::Serialize;

use crate::{
    host::{
        ConfigValue, HostRoot, NodePath, Snapshot, config_symbol_for,
        persistence::{
            self, Block, ConfigLine, OtherKernel, PersistSource, Persistence, PersistenceConfig,
        },
    },
    names::ModuleName,
    requirements::{GroupMode, GroupSpec},
    state::ModuleState,
    tracker::GroupReport,
};

/// Where `check` suggests persisting module loads.
pub const MODULES_LOAD_FILE: &str = "/etc/modules-load.d/kmod-monitor.conf";

/// What a requirement asks of one module. A module in several groups asks
/// for the union ([`Need::merge`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Need {
    /// Loaded (or built in) now.
    pub load: bool,
    /// Loaded again at every boot.
    pub persist: bool,
    /// Loadable on demand (an `available` group): present in the kernel and
    /// not blocked.
    pub loadable: bool,
}

impl Need {
    /// Both needs at once.
    #[must_use]
    pub const fn merge(self, other: Self) -> Self {
        Self {
            load: self.load || other.load,
            persist: self.persist || other.persist,
            loadable: self.loadable || other.loadable,
        }
    }

    /// What `group` asks of its member `module` (in `state`), given the
    /// persistence of every member.
    #[must_use]
    pub fn in_group(
        group: &GroupReport,
        state: ModuleState,
        persistence: &BTreeMap<ModuleName, Persistence>,
    ) -> Self {
        match group.mode {
            // Every member, loaded now and at every boot.
            GroupMode::AllOf => Self {
                load: true,
                persist: true,
                loadable: false,
            },
            // One member loaded now and one at every boot: while the group
            // is met, only a loaded member can be the one to persist; while
            // it is not, each member is an alternative.
            GroupMode::AnyOf => {
                let some_persistent = group
                    .modules
                    .iter()
                    .any(|m| persistence.get(&m.name).is_some_and(|p| p.persistent));
                Self {
                    load: !group.met,
                    persist: !some_persistent && (!group.met || state.satisfies()),
                    loadable: false,
                }
            }
            // Loaded on demand by iscsiadm or mount.nfs.
            GroupMode::Available => Self {
                load: false,
                persist: false,
                loadable: !group.met,
            },
            GroupMode::Check => Self::default(),
        }
    }
}

/// One line or a run of continued lines (`\` at the end) of a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LineSpan {
    /// 1-based number of the first line.
    pub first: usize,
    /// 1-based number of the last line (the same as `first` unless the line
    /// is continued).
    pub last: usize,
    /// What it says, continued lines joined.
    pub text: String,
}

impl fmt::Display for LineSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self { first, last, text } = self;
        if first == last {
            write!(f, "line {first} (`{text}`)")
        } else {
            write!(f, "lines {first}-{last} (`{text}`)")
        }
    }
}

/// A kernel parameter to take out of the command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParameterChange {
    /// As /proc/cmdline has it: `modprobe.blacklist=evbug,nvme_tcp`.
    pub parameter: String,
    /// What it becomes without the module (`modprobe.blacklist=evbug`);
    /// `None` when nothing is left and the parameter goes.
    pub replacement: Option<String>,
}

impl fmt::Display for ParameterChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.replacement {
            Some(r) => write!(f, "change `{}` to `{r}`", self.parameter),
            None => write!(f, "remove `{}`", self.parameter),
        }
    }
}

/// One line of a boot loader setting, changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LineEdit {
    /// The file.
    #[serde(flatten)]
    pub file: NodePath,
    /// 1-based line number.
    pub line: usize,
    /// The line as it is.
    pub text: String,
    /// The line as it should be.
    pub replacement: String,
}

/// One thing to do. `run` and `append_line` are what `check --fix` does;
/// the others are a person's: kmod-monitor never edits a file it did not
/// write, nor the boot loader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Step {
    /// Run a command on the node now.
    Run {
        /// The command, e.g. `modprobe nvme_tcp`.
        command: String,
    },
    /// Append a line to a modules-load.d file, so systemd-modules-load
    /// loads the module at every boot.
    AppendLine {
        /// The file: always kmod-monitor's own.
        #[serde(flatten)]
        file: NodePath,
        /// The line: the module's name.
        line: String,
    },
    /// Delete rules (`blacklist`, `install … /bin/false`) from a modprobe.d
    /// file. Several lines of one file are one step, last line first, so
    /// the numbers stay right while deleting.
    DeleteLines {
        /// The file to edit: for a rule in a package's file (`/usr/lib`,
        /// `/lib`, `/run`), the same name in /etc/modprobe.d, which hides
        /// it and survives package upgrades.
        #[serde(flatten)]
        file: NodePath,
        /// The package's file to copy to `file` first, if any.
        copy_from: Option<NodePath>,
        /// The lines, last first.
        lines: Vec<LineSpan>,
    },
    /// Take parameters off the kernel command line: in the boot loader's
    /// settings, then reboot. The running kernel keeps its command line
    /// until then.
    KernelCmdline {
        /// What changes on the command line.
        parameters: Vec<ParameterChange>,
        /// The boot loader's lines that set it, changed; empty when none
        /// of the files kmod-monitor knows sets it.
        edits: Vec<LineEdit>,
    },
    /// Put the module into the kernel: a package, or another kernel.
    Kernel {
        /// The kernel option that builds the module.
        config_option: String,
        /// What to do.
        what: String,
    },
    /// The module is between states; judge it again.
    CheckAgain,
}

impl Step {
    /// Whether `check --fix` carries out this step (once every step before
    /// it is done).
    #[must_use]
    pub const fn by_fix(&self) -> bool {
        matches!(self, Self::Run { .. } | Self::AppendLine { .. })
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Run { command } => f.write_str(command),
            Self::AppendLine { file, line } => write!(f, "echo {line} >> {file}"),
            Self::DeleteLines {
                file,
                copy_from,
                lines,
            } => {
                let spans: Vec<String> = lines.iter().map(ToString::to_string).collect();
                match copy_from {
                    Some(from) => write!(
                        f,
                        "copy {from} to {file} (a file there hides the packaged one) and in the \
                         copy delete {}",
                        spans.join(", then ")
                    ),
                    None => write!(f, "in {file}, delete {}", spans.join(", then ")),
                }
            }
            Self::KernelCmdline { parameters, edits } => {
                let changes: Vec<String> = parameters.iter().map(ToString::to_string).collect();
                if edits.is_empty() {
                    return write!(
                        f,
                        "on the kernel command line, {}: in the boot loader's settings (none of \
                         /etc/default/grub, /etc/default/grub.d/*.cfg and /etc/kernel/cmdline \
                         sets it), then reboot",
                        changes.join(" and ")
                    );
                }
                let mut grub = false;
                for (i, e) in edits.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    grub |= e.file.path.starts_with("/etc/default");
                    write!(
                        f,
                        "in {}, change line {} from `{}` to `{}`",
                        e.file, e.line, e.text, e.replacement
                    )?;
                }
                if grub {
                    f.write_str(
                        "; then run update-grub (elsewhere than Debian and Ubuntu: grub2-mkconfig \
                         -o /boot/grub2/grub.cfg)",
                    )?;
                }
                if edits
                    .iter()
                    .any(|e| !e.file.path.starts_with("/etc/default"))
                {
                    f.write_str("; then rebuild the boot entries (kernel-install add)")?;
                }
                f.write_str("; then reboot")
            }
            Self::Kernel { what, .. } => f.write_str(what),
            Self::CheckAgain => f.write_str("run the check again in a moment"),
        }
    }
}

/// How to make one module's requirement hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Remedy {
    /// What is wrong, in one sentence a person can act on.
    pub explanation: String,
    /// What to do, in order. After the last step the requirement holds now
    /// and after every reboot.
    pub steps: Vec<Step>,
    /// What loads the module at boot once the steps are done, when that is
    /// something already on the node (the steps remove what blocked it);
    /// `None` when a step adds it, or nothing needs to.
    pub boot_source: Option<PersistSource>,
    /// The command among the steps (`modprobe …`), if any.
    pub command: Option<String>,
    /// The line the steps add to `persist_file`, if any.
    pub persist_line: Option<String>,
    pub persist_file: Option<&'static str>,
    /// The kernel option a missing module needs.
    pub kernel_config: Option<String>,
}

impl Remedy {
    fn new(explanation: String, steps: Vec<Step>, boot_source: Option<PersistSource>) -> Self {
        let command = steps.iter().find_map(|s| match s {
            Step::Run { command } => Some(command.clone()),
            _ => None,
        });
        let persist_line = steps.iter().find_map(|s| match s {
            Step::AppendLine { line, .. } => Some(line.clone()),
            _ => None,
        });
        let kernel_config = steps.iter().find_map(|s| match s {
            Step::Kernel { config_option, .. } => Some(config_option.clone()),
            _ => None,
        });
        Self {
            explanation,
            persist_file: persist_line.is_some().then_some(MODULES_LOAD_FILE),
            steps,
            boot_source,
            command,
            persist_line,
            kernel_config,
        }
    }

    /// Whether `check --fix` can carry out every step.
    #[must_use]
    pub fn by_fix(&self) -> bool {
        self.steps.iter().all(Step::by_fix)
    }

    /// The steps as [`render_steps`] prints them.
    #[must_use]
    pub fn render_steps(&self, indent: &str) -> String {
        render_steps(&self.steps, self.boot_source.as_ref(), indent)
    }

    /// The steps in one line, for an alert's description.
    #[must_use]
    pub fn steps_inline(&self) -> String {
        let mut out: Vec<String> = self
            .steps
            .iter()
            .map(|s| match s {
                Step::Run { .. } | Step::AppendLine { .. } => format!("`{s}`"),
                _ => s.to_string(),
            })
            .collect();
        if let Some(source) = &self.boot_source {
            out.push(format!("then at every boot it is {source}"));
        }
        out.join("; then ")
    }
}

/// `steps` numbered, one a line, each starting with `indent`; where some
/// step is a person's, the ones `check --fix` does are marked; then what
/// loads the module at boot, if that is `boot_source`.
#[must_use]
pub fn render_steps(steps: &[Step], boot_source: Option<&PersistSource>, indent: &str) -> String {
    use fmt::Write as _;
    let mut out = String::new();
    let mark = steps.iter().any(|s| !s.by_fix());
    for (i, step) in steps.iter().enumerate() {
        let by_fix = if mark && step.by_fix() {
            "   (check --fix does this)"
        } else {
            ""
        };
        let _ = writeln!(out, "{indent}{}. {step}{by_fix}", i + 1);
    }
    if let Some(source) = boot_source {
        let _ = writeln!(out, "{indent}then at every boot: {source}");
    }
    out
}

/// What decides the node's state after a reboot or a kernel upgrade, read
/// once from the host.
#[derive(Clone, Debug, Default)]
pub struct BootFacts {
    /// For every required module.
    pub persistence: BTreeMap<ModuleName, Persistence>,
    pub other_kernels: Vec<OtherKernel>,
    pub warnings: Vec<String>,
}

impl BootFacts {
    /// The required modules something blocks from loading (blacklisted,
    /// `install … /bin/false`, `module_blacklist=`): an `available` group
    /// cannot count on them.
    #[must_use]
    pub fn blocked(&self) -> std::collections::BTreeSet<ModuleName> {
        self.persistence
            .iter()
            .filter(|(_, p)| !p.blocked_by.is_empty())
            .map(|(m, _)| m.clone())
            .collect()
    }
}

/// Reads the boot-time configuration (modules-load.d, /etc/modules, the
/// kernel command line, modprobe.d) and the other installed kernels, for
/// the modules `groups` require.
#[must_use]
pub fn boot_facts(host: &HostRoot, snapshot: &Snapshot, groups: &[GroupSpec]) -> BootFacts {
    let config: PersistenceConfig = persistence::read_persistence_config(host);
    let mut required: Vec<ModuleName> = groups
        .iter()
        .flat_map(|g| g.modules.iter().cloned())
        .collect();
    required.sort();
    required.dedup();
    BootFacts {
        persistence: required
            .iter()
            .map(|m| (m.clone(), persistence::persistence(&config, snapshot, m)))
            .collect(),
        other_kernels: persistence::other_kernels(host, &snapshot.kernel_release, &required),
        warnings: config.warnings().to_vec(),
    }
}

/// The remedy of every required module that needs one, by what all its
/// groups ask of it together: what /status shows and `check` prints.
#[must_use]
pub fn remedies(
    groups: &[GroupReport],
    persistence: &BTreeMap<ModuleName, Persistence>,
    snapshot: &Snapshot,
    host: &HostRoot,
) -> BTreeMap<ModuleName, Remedy> {
    let mut needs: BTreeMap<&ModuleName, (ModuleState, Need)> = BTreeMap::new();
    for group in groups {
        for m in &group.modules {
            let need = Need::in_group(group, m.state, persistence);
            needs
                .entry(&m.name)
                .and_modify(|(_, n)| *n = n.merge(need))
                .or_insert((m.state, need));
        }
    }
    let unknown = Persistence::default();
    needs
        .into_iter()
        .filter_map(|(name, (state, need))| {
            let p = persistence.get(name).unwrap_or(&unknown);
            Some((name.clone(), remedy(snapshot, host, p, name, state, need)?))
        })
        .collect()
}

/// The remedy for module `name` in `state`, whose boot-time facts are
/// `p`, so that `need` holds; `None` when it already does.
#[must_use]
pub fn remedy(
    snapshot: &Snapshot,
    host: &HostRoot,
    p: &Persistence,
    name: &ModuleName,
    state: ModuleState,
    need: Need,
) -> Option<Remedy> {
    let load = need.load && !state.satisfies();
    let persist = need.persist && !p.persistent;
    let loadable = need.loadable && !state.satisfies() && {
        state == ModuleState::Missing || p.blocked_by.iter().any(is_rule)
    };
    if !(load || persist || loadable) {
        return None;
    }
    match state {
        ModuleState::Missing if load || loadable => return Some(missing(snapshot, host, name)),
        ModuleState::Loading if load => {
            return Some(Remedy::new(
                format!("{name} is loading right now"),
                vec![Step::CheckAgain],
                None,
            ));
        }
        _ => {}
    }

    let mut problems = Vec::new();
    let mut remove: Vec<&Block> = Vec::new();
    let modprobe_blocks: Vec<&Block> = p.blocked_by.iter().filter(|b| b.stops_modprobe()).collect();
    if load {
        problems.push(format!(
            "{name} is available for kernel {} but not loaded",
            snapshot.kernel_release
        ));
        if !modprobe_blocks.is_empty() {
            problems.push(format!(
                "modprobe cannot load it: {}",
                joined(&modprobe_blocks)
            ));
            remove.extend(&modprobe_blocks);
        }
    }
    if loadable {
        let rules: Vec<&Block> = p.blocked_by.iter().filter(|b| is_rule(b)).collect();
        problems.push(format!(
            "{name} must be loadable on demand, but it is {}",
            joined(&rules)
        ));
        remove.extend(&rules);
    }
    let mut boot_source = None;
    if persist {
        // The source that needs the fewest rules removed; a new line in
        // kmod-monitor's file when nothing names the module.
        let stopping = |s: &PersistSource| -> Vec<&Block> {
            p.blocked_by.iter().filter(|b| b.stops(s)).collect()
        };
        let best = p
            .sources
            .iter()
            .map(|s| (s, stopping(s)))
            .min_by_key(|(_, blocks)| blocks.len());
        match best {
            Some((source, blocks)) => {
                problems.push(format!(
                    "at boot {name} is {source}, but {}",
                    joined(&blocks)
                ));
                remove.extend(blocks);
                boot_source = Some(source.clone());
            }
            None => {
                let new_line = PersistSource::ModulesLoad {
                    file: host.locate(&host.kmod_monitor_modules_load()),
                    line: 0,
                };
                let blocks = stopping(&new_line);
                // Rules named above already: the steps remove them first.
                let news: Vec<&Block> = blocks
                    .iter()
                    .copied()
                    .filter(|b| !remove.contains(b))
                    .collect();
                if news.is_empty() {
                    problems.push(format!("nothing loads {name} at boot"));
                } else {
                    problems.push(format!(
                        "nothing loads {name} at boot, and a modules-load.d line would not: {}",
                        joined(&news)
                    ));
                }
                remove.extend(blocks);
            }
        }
    }
    let mut unique: Vec<&Block> = Vec::new();
    for b in remove {
        if !unique.contains(&b) {
            unique.push(b);
        }
    }

    let mut steps = Vec::new();
    let modprobe = Step::Run {
        command: format!("modprobe {name}"),
    };
    let modprobe_now = load && modprobe_blocks.is_empty();
    if modprobe_now {
        steps.push(modprobe.clone());
    }
    steps.extend(removal_steps(host, name, &unique));
    if load && !modprobe_now {
        steps.push(modprobe);
    }
    if persist && boot_source.is_none() {
        steps.push(Step::AppendLine {
            file: host.locate(&host.kmod_monitor_modules_load()),
            line: name.to_string(),
        });
    }
    Some(Remedy::new(problems.join("; "), steps, boot_source))
}

/// A rule someone wrote (modprobe.d, the command line), as opposed to what
/// the kernel lacks.
const fn is_rule(b: &Block) -> bool {
    !matches!(
        b,
        Block::NoModuleFile { .. } | Block::ModulesUnsupported { .. }
    )
}

fn joined(blocks: &[&Block]) -> String {
    blocks
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; and ")
}

/// The steps that take `blocks` away: one per modprobe.d file, one for the
/// kernel command line, one for what the kernel lacks.
fn removal_steps(host: &HostRoot, name: &ModuleName, blocks: &[&Block]) -> Vec<Step> {
    let mut files: BTreeMap<&NodePath, Vec<LineSpan>> = BTreeMap::new();
    let mut order: Vec<&NodePath> = Vec::new();
    let mut parameters = Vec::new();
    let mut settings: Vec<&ConfigLine> = Vec::new();
    let mut steps = Vec::new();
    for block in blocks {
        match block {
            Block::Blacklist {
                file,
                line,
                last_line,
                text,
            }
            | Block::InstallDisabled {
                file,
                line,
                last_line,
                text,
                ..
            } => {
                if !files.contains_key(file) {
                    order.push(file);
                }
                files.entry(file).or_default().push(LineSpan {
                    first: *line,
                    last: *last_line,
                    text: text.clone(),
                });
            }
            Block::CmdlineBlacklist { parameter, set_in }
            | Block::KernelBlacklist { parameter, set_in } => {
                parameters.push(ParameterChange {
                    parameter: parameter.clone(),
                    replacement: without_module(parameter, name),
                });
                for l in set_in {
                    if !settings.contains(&l) {
                        settings.push(l);
                    }
                }
            }
            Block::NoModuleFile { kernel_release } => steps.push(Step::Kernel {
                config_option: config_symbol_for(name),
                what: format!(
                    "install {name} for kernel {kernel_release} so that modules.dep lists it \
                     (the kernel's modules package, or the out-of-tree module rebuilt, then \
                     `depmod {kernel_release}`)"
                ),
            }),
            Block::ModulesUnsupported { kernel_release } => {
                let symbol = config_symbol_for(name);
                steps.push(Step::Kernel {
                    what: format!(
                        "kernel {kernel_release} cannot load modules: boot a kernel with \
                         {symbol}=y"
                    ),
                    config_option: symbol,
                });
            }
        }
    }
    let mut edits = Vec::new();
    for file in order {
        let mut lines = files.remove(file).unwrap_or_default();
        lines.sort_by_key(|l| std::cmp::Reverse(l.first));
        lines.dedup();
        let (target, copy_from) = edit_target(host, file);
        edits.push(Step::DeleteLines {
            file: target,
            copy_from,
            lines,
        });
    }
    if !parameters.is_empty() {
        let line_edits = settings
            .into_iter()
            .map(|l| {
                let replacement = parameters.iter().fold(l.text.clone(), |text, change| {
                    replace_word(&text, &change.parameter, change.replacement.as_deref())
                });
                LineEdit {
                    file: l.file.clone(),
                    line: l.line,
                    text: l.text.clone(),
                    replacement,
                }
            })
            .collect();
        edits.push(Step::KernelCmdline {
            parameters,
            edits: line_edits,
        });
    }
    edits.extend(steps);
    edits
}

/// Where to delete a rule in `file`: the file itself when an administrator
/// owns it (`/etc`, `/usr/local`); else the same name in /etc/modprobe.d,
/// copied from `file` first, which hides the package's file and outlives
/// its upgrades.
fn edit_target(host: &HostRoot, file: &NodePath) -> (NodePath, Option<NodePath>) {
    let owned = file.path.starts_with("/etc") || file.path.starts_with("/usr/local");
    match file.host_path.file_name() {
        Some(base) if !owned => (
            host.locate(&host.etc_modprobe_d().join(base)),
            Some(file.clone()),
        ),
        _ => (file.clone(), None),
    }
}

/// `parameter` (`key=a,b,c`) without `module` among its values: `None`
/// when no value is left.
fn without_module(parameter: &str, module: &ModuleName) -> Option<String> {
    let (key, values) = parameter.split_once('=')?;
    let kept: Vec<&str> = values
        .split(',')
        .filter(|v| !v.is_empty() && ModuleName::parse(v).ok().as_ref() != Some(module))
        .collect();
    (!kept.is_empty()).then(|| format!("{key}={}", kept.join(",")))
}

/// `line` with the parameter `word` replaced by `with`, or removed with
/// the space before it (after it, at the start).
fn replace_word(line: &str, word: &str, with: Option<&str>) -> String {
    let Some(at) = persistence::word_at(line, word) else {
        return line.to_owned();
    };
    let end = at + word.len();
    if let Some(with) = with {
        return format!("{}{with}{}", &line[..at], &line[end..]);
    }
    let before = &line[..at];
    let after = &line[end..];
    match (before.strip_suffix(' '), after.strip_prefix(' ')) {
        (Some(b), _) => format!("{b}{after}"),
        (None, Some(a)) => format!("{before}{a}"),
        (None, None) => format!("{before}{after}"),
    }
}

fn missing(snapshot: &Snapshot, host: &HostRoot, name: &ModuleName) -> Remedy {
    let symbol = config_symbol_for(name);
    let rel = &snapshot.kernel_release;
    let modules_dir = snapshot.modules_dir.as_ref().map_or_else(
        || format!("/lib/modules/{rel} (absent)"),
        |d| host.node_path(d).display().to_string(),
    );
    let setting = snapshot.kernel_config.as_ref().and_then(|c| c.get(&symbol));
    let (explanation, what) = match (&setting, snapshot.modules_supported) {
        (_, false) => (
            format!(
                "kernel {rel} cannot load modules (CONFIG_MODULES is off) and {name} is not \
                 built in"
            ),
            format!("boot a kernel with {symbol}=y"),
        ),
        (Some(ConfigValue::NotSet), true) => (
            format!("{name} is not part of kernel {rel}: {symbol} is not set"),
            format!("boot a kernel built with {symbol}=m"),
        ),
        (Some(ConfigValue::Module), true) => (
            format!(
                "kernel {rel} was built with {symbol}=m but no {name} module file is installed \
                 under {modules_dir}"
            ),
            format!(
                "install the kernel's modules package (Ubuntu: linux-modules-extra-{rel}; RHEL, \
                 Fedora: kernel-modules-extra-{rel}; Debian: reinstall linux-image-{rel})"
            ),
        ),
        (Some(ConfigValue::Builtin), true) => (
            format!(
                "kernel {rel} has {symbol}=y but {name} is not listed in \
                 {modules_dir}/modules.builtin"
            ),
            format!("reinstall kernel {rel}'s package, whose modules.builtin should list {name}"),
        ),
        (Some(ConfigValue::Value(v)), true) => (
            format!("{name} is not part of kernel {rel} ({symbol}={v})"),
            format!("boot a kernel built with {symbol}=m"),
        ),
        (None, true) => (
            format!(
                "{name} is not in kernel {rel} (no module file, not built in; the kernel config \
                 is unreadable or lacks {symbol})"
            ),
            format!("install the kernel's modules package, or boot a kernel with {symbol}=m"),
        ),
    };
    Remedy::new(
        explanation,
        vec![Step::Kernel {
            config_option: symbol,
            what,
        }],
        None,
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::testing::{name, snapshot_debian_6_1};

    const ALL: Need = Need {
        load: true,
        persist: true,
        loadable: false,
    };

    fn host() -> HostRoot {
        HostRoot::new("/host")
    }

    fn file(node: &str) -> NodePath {
        host().locate(&Path::new("/host").join(node.trim_start_matches('/')))
    }

    fn blacklist(node: &str, line: usize, module: &str) -> Block {
        Block::Blacklist {
            file: file(node),
            line,
            last_line: line,
            text: format!("blacklist {module}"),
        }
    }

    fn install(node: &str, line: usize, module: &str) -> Block {
        Block::InstallDisabled {
            file: file(node),
            line,
            last_line: line,
            text: format!("install {module} /bin/false"),
            command: "/bin/false".to_owned(),
        }
    }

    fn blocked(blocked_by: Vec<Block>) -> Persistence {
        Persistence {
            persistent: false,
            sources: Vec::new(),
            blocked_by,
        }
    }

    fn fix(p: &Persistence, module: &str, state: ModuleState) -> Remedy {
        remedy(
            &snapshot_debian_6_1(),
            &host(),
            p,
            &name(module),
            state,
            ALL,
        )
        .unwrap_or_else(|| panic!("{module} needs a remedy"))
    }

    #[test]
    fn nothing_is_needed_of_a_loaded_persistent_module() {
        let p = Persistence {
            persistent: true,
            sources: vec![PersistSource::Builtin],
            blocked_by: vec![install("/etc/modprobe.d/x.conf", 1, "dm_crypt")],
        };
        let snapshot = snapshot_debian_6_1();
        for state in [ModuleState::Loaded, ModuleState::Builtin] {
            assert_eq!(
                remedy(&snapshot, &host(), &p, &name("dm_crypt"), state, ALL),
                None
            );
        }
    }

    #[test]
    fn a_rule_in_a_packaged_file_is_overridden_from_etc() {
        // Debian ships fbdev-blacklist.conf in /lib/modprobe.d: an edit
        // there is undone by the next upgrade; a copy in /etc hides it.
        let p = blocked(vec![blacklist(
            "/lib/modprobe.d/fbdev-blacklist.conf",
            7,
            "vfio_pci",
        )]);
        let r = fix(&p, "vfio_pci", ModuleState::Loaded);
        assert_eq!(
            r.steps,
            [
                Step::DeleteLines {
                    file: file("/etc/modprobe.d/fbdev-blacklist.conf"),
                    copy_from: Some(file("/lib/modprobe.d/fbdev-blacklist.conf")),
                    lines: vec![LineSpan {
                        first: 7,
                        last: 7,
                        text: "blacklist vfio_pci".to_owned()
                    }],
                },
                Step::AppendLine {
                    file: file("/etc/modules-load.d/kmod-monitor.conf"),
                    line: "vfio_pci".to_owned()
                },
            ]
        );
        assert_eq!(
            r.steps[0].to_string(),
            "copy /lib/modprobe.d/fbdev-blacklist.conf to /etc/modprobe.d/fbdev-blacklist.conf \
             (a file there hides the packaged one) and in the copy delete line 7 (`blacklist \
             vfio_pci`)"
        );
    }

    #[test]
    fn rules_in_one_file_are_one_step_last_line_first() {
        let p = blocked(vec![
            blacklist("/etc/modprobe.d/cis.conf", 2, "nvme_tcp"),
            install("/etc/modprobe.d/cis.conf", 9, "nvme_tcp"),
        ]);
        let r = fix(&p, "nvme_tcp", ModuleState::Available);
        assert_eq!(
            r.steps.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "in /etc/modprobe.d/cis.conf, delete line 9 (`install nvme_tcp /bin/false`), \
                 then line 2 (`blacklist nvme_tcp`)",
                "modprobe nvme_tcp",
                "echo nvme_tcp >> /etc/modules-load.d/kmod-monitor.conf",
            ]
        );
        assert_eq!(r.command.as_deref(), Some("modprobe nvme_tcp"));
        assert_eq!(r.persist_line.as_deref(), Some("nvme_tcp"));
        assert_eq!(r.persist_file, Some(MODULES_LOAD_FILE));
        assert!(!r.by_fix());
    }

    #[test]
    fn a_command_line_blacklist_names_the_grub_line_and_keeps_the_other_modules() {
        let setting = ConfigLine {
            file: file("/etc/default/grub"),
            line: 9,
            text: "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet modprobe.blacklist=evbug,nvme_tcp \
                   module_blacklist=nvme_tcp\""
                .to_owned(),
        };
        let p = blocked(vec![
            Block::CmdlineBlacklist {
                parameter: "modprobe.blacklist=evbug,nvme_tcp".to_owned(),
                set_in: vec![setting.clone()],
            },
            Block::KernelBlacklist {
                parameter: "module_blacklist=nvme_tcp".to_owned(),
                set_in: vec![setting],
            },
        ]);
        let r = fix(&p, "nvme_tcp", ModuleState::Loaded);
        // Both parameters, one edit of the one line.
        assert_eq!(
            r.steps[0],
            Step::KernelCmdline {
                parameters: vec![
                    ParameterChange {
                        parameter: "modprobe.blacklist=evbug,nvme_tcp".to_owned(),
                        replacement: Some("modprobe.blacklist=evbug".to_owned()),
                    },
                    ParameterChange {
                        parameter: "module_blacklist=nvme_tcp".to_owned(),
                        replacement: None,
                    },
                ],
                edits: vec![LineEdit {
                    file: file("/etc/default/grub"),
                    line: 9,
                    text: "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet modprobe.blacklist=evbug,nvme_tcp \
                           module_blacklist=nvme_tcp\""
                        .to_owned(),
                    replacement: "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet modprobe.blacklist=evbug\""
                        .to_owned(),
                }],
            }
        );
        assert!(
            r.steps[0].to_string().starts_with(
                "in /etc/default/grub, change line 9 from `GRUB_CMDLINE_LINUX_DEFAULT=\"quiet \
                 modprobe.blacklist=evbug,nvme_tcp module_blacklist=nvme_tcp\"` to \
                 `GRUB_CMDLINE_LINUX_DEFAULT=\"quiet modprobe.blacklist=evbug\"`; then run \
                 update-grub"
            ) && r.steps[0].to_string().ends_with("; then reboot"),
            "{}",
            r.steps[0]
        );
        // Without a boot loader file that sets it: the parameter, and where
        // it was looked for.
        let p = blocked(vec![Block::CmdlineBlacklist {
            parameter: "modprobe.blacklist=nvme_tcp".to_owned(),
            set_in: Vec::new(),
        }]);
        assert_eq!(
            fix(&p, "nvme_tcp", ModuleState::Loaded).steps[0].to_string(),
            "on the kernel command line, remove `modprobe.blacklist=nvme_tcp`: in the boot \
             loader's settings (none of /etc/default/grub, /etc/default/grub.d/*.cfg and \
             /etc/kernel/cmdline sets it), then reboot"
        );
    }

    #[test]
    fn a_module_the_kernel_refuses_is_loaded_only_after_the_reboot() {
        let p = blocked(vec![Block::KernelBlacklist {
            parameter: "module_blacklist=nvme_tcp".to_owned(),
            set_in: Vec::new(),
        }]);
        let r = fix(&p, "nvme_tcp", ModuleState::Available);
        assert!(matches!(
            r.steps.as_slice(),
            [
                Step::KernelCmdline { .. },
                Step::Run { .. },
                Step::AppendLine { .. }
            ]
        ));
    }

    #[test]
    fn a_blocked_listing_is_freed_not_doubled() {
        // The node: listed, loaded, blacklisted. A second line
        // would be skipped by the same blacklist: the remedy removes the
        // blacklist, and the listing already there loads it.
        let lh = PersistSource::ModulesLoad {
            file: file("/etc/modules-load.d/lh.conf"),
            line: 1,
        };
        let p = Persistence {
            persistent: false,
            sources: vec![lh.clone()],
            blocked_by: vec![blacklist("/etc/modprobe.d/x.conf", 1, "nvme_tcp")],
        };
        let r = fix(&p, "nvme_tcp", ModuleState::Loaded);
        assert_eq!(r.boot_source, Some(lh));
        assert_eq!(r.steps.len(), 1, "no second line: {:?}", r.steps);
        assert_eq!(
            r.render_steps("  "),
            "  1. in /etc/modprobe.d/x.conf, delete line 1 (`blacklist nvme_tcp`)\n  then at \
             every boot: listed in /etc/modules-load.d/lh.conf line 1\n"
        );
    }

    #[test]
    fn an_on_demand_module_needs_its_rules_gone_not_a_line() {
        let p = blocked(vec![blacklist("/etc/modprobe.d/x.conf", 4, "iscsi_tcp")]);
        let r = remedy(
            &snapshot_debian_6_1(),
            &host(),
            &p,
            &name("iscsi_tcp"),
            ModuleState::Available,
            Need {
                load: false,
                persist: false,
                loadable: true,
            },
        )
        .unwrap_or_else(|| panic!("blocked"));
        assert_eq!(r.steps.len(), 1);
        assert!(matches!(r.steps[0], Step::DeleteLines { .. }));
        assert!(
            r.explanation
                .starts_with("iscsi_tcp must be loadable on demand, but it is blacklisted in"),
            "{}",
            r.explanation
        );
    }

    #[test]
    fn parameters_lose_only_the_module() {
        let m = name("nvme_tcp");
        assert_eq!(
            without_module("modprobe.blacklist=a,nvme-tcp,b", &m).as_deref(),
            Some("modprobe.blacklist=a,b")
        );
        assert_eq!(without_module("modprobe.blacklist=nvme_tcp", &m), None);
        assert_eq!(replace_word("a x=1 b", "x=1", None), "a b");
        assert_eq!(replace_word("\"x=1 b\"", "x=1", None), "\"b\"");
        assert_eq!(replace_word("a x=1,2", "x=1,2", Some("x=1")), "a x=1");
    }
}
