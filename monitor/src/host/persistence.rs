//! Reboot and kernel-upgrade survival: whether each required module will be
//! there again after the node reboots, what would stop it, and whether the
//! other kernels installed beside the running one have it at all.
//!
//! # What makes a module come back
//! - It is built in (modules.builtin): nothing can stop it.
//! - It is listed in a `*.conf` file of a modules-load.d directory, which
//!   systemd-modules-load reads at boot: `/etc`, `/run`, `/usr/local/lib`,
//!   `/usr/lib` and `/lib` (`modules-load.d(5)`). A file hides a same-named
//!   file in a later directory, so `/etc/modules-load.d/x.conf` overrides
//!   `/usr/lib/modules-load.d/x.conf`, and a link to `/dev/null` masks it.
//!   Only names ending in `.conf` count. Lines starting with `#` or `;` are
//!   comments. The whole line is one name: systemd takes no parameters here,
//!   so `dm_crypt foo=1` loads nothing and is reported.
//! - It is listed in Debian's `/etc/modules`. On Debian and Ubuntu,
//!   systemd reads that file through the link
//!   `/etc/modules-load.d/modules.conf -> ../modules`, with the rules above
//!   (the file's own header still says "parameters can be specified after
//!   the module name", which is true only for the old kmod init script). Read
//!   directly, without that link, the first word of a line is the module.
//! - It is named in `modules-load=` or `rd.modules-load=` on the kernel
//!   command line (comma-separated; `rd.` is for the initramfs, whose loaded
//!   modules stay after the switch to the real root).
//! - A module listed in one of those needs it: modprobe loads the whole
//!   modules.dep closure first (`nvme_tcp` brings `nvme_fabrics`).
//!
//! A module udev autoloads for present hardware is not counted: that depends
//! on the hardware, not on the node's configuration.
//!
//! # What stops it (modprobe.d and the command line)
//! kmod reads `*.conf` in `/etc`, `/run`, `/usr/local/lib`, `/usr/lib` and
//! `/lib` `modprobe.d`, with the same same-name override; a line ending in
//! `\` continues on the next.
//! - `blacklist m`: libkmod ignores m's aliases, so udev does not autoload
//!   it, and `modprobe m` by name still loads it. But systemd-modules-load
//!   probes with `KMOD_PROBE_APPLY_BLACKLIST`, which also refuses the module
//!   by name: a blacklisted module listed in modules-load.d, /etc/modules or
//!   `modules-load=` is NOT loaded at boot ("Module 'm' is deny-listed"). It
//!   is still loaded as another module's dependency, and by the kmod init
//!   script, which calls plain `modprobe`.
//! - `modprobe.blacklist=m,...` on the kernel command line: the same as a
//!   blacklist line (libkmod reads it from /proc/cmdline).
//! - `install m /bin/false` (or `/bin/true`, any `true`/`false`): modprobe
//!   and libkmod run the command instead of loading m, so nothing that goes
//!   through them loads it, not even as a dependency. Other install commands
//!   (a wrapper that loads it and does more) are not judged.
//! - `module_blacklist=m,...` on the kernel command line: the kernel itself
//!   refuses to load m, however it is asked.
//! - A module the running kernel has no file for, or a kernel without
//!   loadable-module support, cannot be loaded by any list.
//!
//! # Where each rule is written
//! Every file and line is kept under both its names ([`NodePath`]): the
//! node's, which is what a person is shown and edits, and the one it was
//! read by under `--host-root`. A rule keeps its text and its last line
//! (a continued line spans several), and a command-line blacklist the
//! boot loader lines that set it (`GRUB_CMDLINE_LINUX*` in
//! `/etc/default/grub` and `/etc/default/grub.d/*.cfg`, and
//! `/etc/kernel/cmdline`), so that a remedy can name the line to change.
//!
//! [`read_persistence_config`] reads every file once (the daemon re-reads on
//! reconcile); [`persistence`] judges one module against it and a
//! [`Snapshot`]. [`other_kernels`] checks the other installed kernels.
//! Nothing here fails: an unreadable or odd file or line becomes a warning
//! naming the path and line, like everywhere else in [`crate::host`].
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::depmod::{parse_modules_builtin, parse_modules_dep};
use super::paths::{MODULES_BUILTIN, MODULES_DEP, NodePath};
use super::{HostRoot, Snapshot, read_optional_text};
use crate::names::ModuleName;

/// How many symbolic links in a row a config file may go through.
const MAX_LINK_HOPS: usize = 8;

/// The suffix every modules-load.d and modprobe.d file must have to be read.
const CONF_SUFFIX: &str = ".conf";

/// Why a module will be loaded again at boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PersistSource {
    /// Compiled into the kernel.
    Builtin,
    /// Listed in a modules-load.d file (read by systemd-modules-load).
    ModulesLoad {
        /// The file the line is in: for a link such as Debian's
        /// `modules.conf -> ../modules`, the link's target.
        #[serde(flatten)]
        file: NodePath,
        /// 1-based line number.
        line: usize,
    },
    /// Listed in /etc/modules, read without a modules-load.d link (the kmod
    /// init script).
    EtcModules {
        /// The file.
        #[serde(flatten)]
        file: NodePath,
        /// 1-based line number.
        line: usize,
    },
    /// Named in `modules-load=` or `rd.modules-load=` on the kernel
    /// command line.
    KernelCmdline {
        /// The parameter as written, e.g. `rd.modules-load=dm_crypt,nvme_tcp`.
        parameter: String,
    },
    /// A dependency (modules.dep) of a module that is itself loaded at boot.
    DependencyOf {
        /// The module that needs it.
        module: ModuleName,
        /// Why that module is loaded.
        source: Box<PersistSource>,
    },
}

impl fmt::Display for PersistSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Builtin => f.write_str("built into the kernel"),
            Self::ModulesLoad { file, line } | Self::EtcModules { file, line } => {
                write!(f, "listed in {file} line {line}")
            }
            Self::KernelCmdline { parameter } => {
                write!(f, "named on the kernel command line ({parameter})")
            }
            Self::DependencyOf { module, source } => {
                write!(f, "needed by {module}, which is {source}")
            }
        }
    }
}

/// Something that keeps a module from being loaded at boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Block {
    /// `blacklist m` in a modprobe.d file: systemd-modules-load skips it and
    /// udev does not autoload it; a dependency or a `modprobe m` by hand
    /// still loads it.
    Blacklist {
        /// The modprobe.d file.
        #[serde(flatten)]
        file: NodePath,
        /// 1-based line number (of the line's start, for a continued line).
        line: usize,
        /// The line's last line: `line` unless it ends in `\`.
        last_line: usize,
        /// The rule as kmod reads it (a continued line joined).
        text: String,
    },
    /// `modprobe.blacklist=` on the kernel command line: like a blacklist
    /// line.
    CmdlineBlacklist {
        /// The parameter as written.
        parameter: String,
        /// The boot loader settings that put it there.
        set_in: Vec<ConfigLine>,
    },
    /// `install m /bin/false` (or `true`): modprobe runs the command instead
    /// of loading the module, so nothing that uses modprobe loads it.
    InstallDisabled {
        /// The modprobe.d file.
        #[serde(flatten)]
        file: NodePath,
        /// 1-based line number.
        line: usize,
        /// The line's last line: `line` unless it ends in `\`.
        last_line: usize,
        /// The rule as kmod reads it (a continued line joined).
        text: String,
        /// The command, as written.
        command: String,
    },
    /// `module_blacklist=` on the kernel command line: the kernel refuses to
    /// load the module at all.
    KernelBlacklist {
        /// The parameter as written.
        parameter: String,
        /// The boot loader settings that put it there.
        set_in: Vec<ConfigLine>,
    },
    /// The running kernel has no file for the module (not in modules.dep),
    /// so a list cannot load it.
    NoModuleFile {
        /// The running kernel's release.
        kernel_release: String,
    },
    /// The running kernel cannot load modules (`CONFIG_MODULES` off).
    ModulesUnsupported {
        /// The running kernel's release.
        kernel_release: String,
    },
}

impl Block {
    /// Whether this stops `source` from loading the module.
    #[must_use]
    pub fn stops(&self, source: &PersistSource) -> bool {
        match source {
            PersistSource::Builtin => false,
            // systemd-modules-load applies the blacklist to what it loads by
            // name; the kmod init script and dependency loads do not.
            PersistSource::ModulesLoad { .. } | PersistSource::KernelCmdline { .. } => true,
            PersistSource::EtcModules { .. } | PersistSource::DependencyOf { .. } => {
                self.stops_modprobe()
            }
        }
    }

    /// Whether this stops `modprobe <m>` run by hand now (a blacklist does
    /// not: modprobe ignores it for a module named on its command line).
    #[must_use]
    pub const fn stops_modprobe(&self) -> bool {
        !matches!(self, Self::Blacklist { .. } | Self::CmdlineBlacklist { .. })
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Blacklist { file, line, .. } => write!(
                f,
                "blacklisted in {file} line {line} (systemd-modules-load skips blacklisted modules)"
            ),
            Self::CmdlineBlacklist { parameter, .. } => write!(
                f,
                "blacklisted on the kernel command line ({parameter}; systemd-modules-load skips \
                 blacklisted modules)"
            ),
            Self::InstallDisabled {
                file,
                line,
                command,
                ..
            } => write!(
                f,
                "disabled by `install ... {command}` in {file} line {line} (modprobe runs the \
                 command instead of loading it)"
            ),
            Self::KernelBlacklist { parameter, .. } => write!(
                f,
                "refused by the kernel: {parameter} is on the kernel command line"
            ),
            Self::NoModuleFile { kernel_release } => write!(
                f,
                "kernel {kernel_release} has no file for it (not in modules.dep), so no list can \
                 load it"
            ),
            Self::ModulesUnsupported { kernel_release } => write!(
                f,
                "kernel {kernel_release} cannot load modules (CONFIG_MODULES is off)"
            ),
        }
    }
}

/// One line of a boot loader setting that puts a parameter on the kernel
/// command line (`GRUB_CMDLINE_LINUX_DEFAULT="quiet modprobe.blacklist=x"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigLine {
    /// The file.
    #[serde(flatten)]
    pub file: NodePath,
    /// 1-based line number.
    pub line: usize,
    /// The line as written.
    pub text: String,
}

/// Whether one module will be there after a reboot, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Persistence {
    /// Some source is not stopped by any block (or the module is built in).
    pub persistent: bool,
    /// Every reason it would be loaded, built-in first, then in the order
    /// systemd reads its files.
    pub sources: Vec<PersistSource>,
    /// Everything that would stop a source, even one that does not matter
    /// (a blacklisted built-in module is still built in).
    pub blocked_by: Vec<Block>,
}

/// One module named in a list, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Listed {
    module: ModuleName,
    source: PersistSource,
}

/// A `blacklist` or `install` rule from modprobe.d or the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    module: ModuleName,
    block: Block,
}

/// Everything on the host that decides what is loaded at boot, read once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PersistenceConfig {
    /// Every module named by modules-load.d, /etc/modules and the command
    /// line, in the order systemd reads them.
    listed: Vec<Listed>,
    /// Every blocking rule, in kmod's reading order.
    rules: Vec<Rule>,
    /// Files and lines that were skipped, unreadable, or do not do what they
    /// seem to, each naming its path (and line).
    warnings: Vec<String>,
}

impl PersistenceConfig {
    /// What was odd about the files read: unreadable files, dangling links,
    /// lines that load nothing. Each names the path and line.
    #[must_use]
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Every module some list names, without duplicates, in first-listed
    /// order (what a boot asks systemd-modules-load to load).
    #[must_use]
    pub fn listed_modules(&self) -> Vec<&ModuleName> {
        let mut seen = BTreeSet::new();
        self.listed
            .iter()
            .map(|l| &l.module)
            .filter(|m| seen.insert(*m))
            .collect()
    }
}

/// Reads modules-load.d, /etc/modules, modprobe.d and /proc/cmdline under
/// `host`. Never fails: what cannot be read becomes a warning.
#[must_use]
pub fn read_persistence_config(host: &HostRoot) -> PersistenceConfig {
    let mut config = PersistenceConfig::default();
    let etc_modules = normalize(&host.etc_modules());
    let mut etc_modules_linked = false;

    for file in conf_files(host, &host.modules_load_dirs(), &mut config.warnings) {
        if file.target.as_deref() == Some(etc_modules.as_path()) {
            etc_modules_linked = true;
        }
        let Some(text) = &file.text else { continue };
        // Lines are reported in the file a person edits: /etc/modules, not
        // the modules.conf link to it.
        parse_modules_load(text, &host.locate(file.lines_path()), &mut config);
    }
    if !etc_modules_linked {
        match read_optional_text(&etc_modules) {
            Ok(Some(text)) => parse_etc_modules(&text, &host.locate(&etc_modules), &mut config),
            Ok(None) => {}
            Err(e) => config.warnings.push(e.to_string()),
        }
    }
    for file in conf_files(host, &host.modprobe_dirs(), &mut config.warnings) {
        let Some(text) = &file.text else { continue };
        parse_modprobe_d(text, &host.locate(file.lines_path()), &mut config);
    }
    let cmdline = host.proc_cmdline();
    match read_optional_text(&cmdline) {
        Ok(Some(text)) => parse_cmdline(&text, &host.locate(&cmdline), &mut config),
        Ok(None) => config.warnings.push(format!(
            "{} does not exist: modules-load= and blacklists on the kernel command line are \
             unknown",
            host.node_path(&cmdline).display()
        )),
        Err(e) => config.warnings.push(e.to_string()),
    }
    let boot_lines = boot_cmdline_lines(host, &mut config.warnings);
    for rule in &mut config.rules {
        if let Block::CmdlineBlacklist { parameter, set_in }
        | Block::KernelBlacklist { parameter, set_in } = &mut rule.block
        {
            set_in.extend(
                boot_lines
                    .iter()
                    .filter(|l| has_word(&l.text, parameter))
                    .cloned(),
            );
        }
    }
    config
}

/// Every line of the boot loader settings ([`HostRoot::boot_cmdline_files`]
/// and `/etc/default/grub.d/*.cfg`, in the order GRUB's scripts read them)
/// that is not a comment. A file that does not exist is not a problem; one
/// that cannot be read is a warning.
fn boot_cmdline_lines(host: &HostRoot, warnings: &mut Vec<String>) -> Vec<ConfigLine> {
    let [grub, kernel_cmdline] = host.boot_cmdline_files();
    let mut files = vec![grub];
    let grub_d = host.grub_default_d();
    match fs::read_dir(&grub_d) {
        Ok(entries) => {
            let mut cfgs: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "cfg"))
                .collect();
            cfgs.sort();
            files.extend(cfgs);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warnings.push(format!("{}: {e}", host.node_path(&grub_d).display())),
    }
    files.push(kernel_cmdline);
    let mut lines = Vec::new();
    for path in files {
        let text = match read_optional_text(&path) {
            Ok(Some(text)) => text,
            Ok(None) => continue,
            Err(e) => {
                warnings.push(e.to_string());
                continue;
            }
        };
        let file = host.locate(&path);
        lines.extend(
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim_start().starts_with('#'))
                .map(|(index, l)| ConfigLine {
                    file: file.clone(),
                    line: index + 1,
                    text: l.to_owned(),
                }),
        );
    }
    lines
}

/// Whether `word` occurs in `line` as a whole kernel parameter: between
/// the line's ends, whitespace or quotes.
#[must_use]
pub fn has_word(line: &str, word: &str) -> bool {
    word_at(line, word).is_some()
}

/// Where `word` first occurs in `line` as a whole kernel parameter (see
/// [`has_word`]).
#[must_use]
pub fn word_at(line: &str, word: &str) -> Option<usize> {
    if word.is_empty() {
        return None;
    }
    let boundary = |c: Option<char>| c.is_none_or(|c| c.is_whitespace() || c == '"' || c == '\'');
    line.match_indices(word).map(|(at, _)| at).find(|&at| {
        boundary(line[..at].chars().next_back()) && boundary(line[at + word.len()..].chars().next())
    })
}

/// Whether `module` will be there after a reboot, by `config` and the
/// running kernel's `snapshot` (built-in modules, module files and their
/// dependencies).
#[must_use]
pub fn persistence(
    config: &PersistenceConfig,
    snapshot: &Snapshot,
    module: &ModuleName,
) -> Persistence {
    let builtin = snapshot.builtin.contains(module);
    let mut sources = Vec::new();
    if builtin {
        sources.push(PersistSource::Builtin);
    }
    sources.extend(direct_sources(config, module));

    // Modules whose boot-time load pulls this one in. One source per
    // parent: the first one that its own blocks do not stop.
    let mut parents = BTreeSet::new();
    for listed in &config.listed {
        let parent = &listed.module;
        if parent == module || parents.contains(parent) {
            continue;
        }
        let needs_it = snapshot
            .available
            .get(parent)
            .is_some_and(|file| file.deps.contains(module));
        if !needs_it {
            continue;
        }
        let parent_blocks = blocks(config, snapshot, parent);
        if let Some(source) = direct_sources(config, parent)
            .into_iter()
            .find(|s| !parent_blocks.iter().any(|b| b.stops(s)))
        {
            parents.insert(parent.clone());
            sources.push(PersistSource::DependencyOf {
                module: parent.clone(),
                source: Box::new(source),
            });
        }
    }

    let blocked_by = blocks(config, snapshot, module);
    let persistent = builtin
        || sources
            .iter()
            .any(|s| !blocked_by.iter().any(|b| b.stops(s)));
    Persistence {
        persistent,
        sources,
        blocked_by,
    }
}

/// The lists that name `module` itself.
fn direct_sources(config: &PersistenceConfig, module: &ModuleName) -> Vec<PersistSource> {
    config
        .listed
        .iter()
        .filter(|l| &l.module == module)
        .map(|l| l.source.clone())
        .collect()
}

/// Every rule against `module`, plus the running kernel's inability to load
/// it (unless it is built in, which needs no loading).
fn blocks(config: &PersistenceConfig, snapshot: &Snapshot, module: &ModuleName) -> Vec<Block> {
    let mut blocks: Vec<Block> = config
        .rules
        .iter()
        .filter(|r| &r.module == module)
        .map(|r| r.block.clone())
        .collect();
    if !snapshot.builtin.contains(module) {
        let kernel_release = snapshot.kernel_release.clone();
        if !snapshot.modules_supported {
            blocks.push(Block::ModulesUnsupported { kernel_release });
        } else if !snapshot.available.contains_key(module) {
            blocks.push(Block::NoModuleFile { kernel_release });
        }
    }
    blocks
}

/// A config file in effect after the same-name override.
struct ConfFile {
    /// The file as found in its directory.
    path: PathBuf,
    /// Where its links lead, under the host root, if it is a link.
    target: Option<PathBuf>,
    /// Its content; `None` when it is masked (a link to /dev/null) or could
    /// not be read (a warning says why).
    text: Option<String>,
}

impl ConfFile {
    /// The file its lines come from: the link's target, or itself.
    fn lines_path(&self) -> &Path {
        self.target.as_deref().unwrap_or(&self.path)
    }
}

/// The `*.conf` files of `dirs` (highest precedence first) that are in
/// effect, sorted by file name as systemd and kmod read them.
fn conf_files(host: &HostRoot, dirs: &[PathBuf], warnings: &mut Vec<String>) -> Vec<ConfFile> {
    let mut chosen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in dirs {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                warnings.push(format!("{}: {e}", host.node_path(dir).display()));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    warnings.push(format!("{}: {e}", host.node_path(dir).display()));
                    continue;
                }
            };
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with('.') || !name.ends_with(CONF_SUFFIX) {
                continue;
            }
            // An earlier directory's file of the same name wins.
            chosen.entry(name).or_insert_with(|| entry.path());
        }
    }
    chosen
        .into_values()
        .filter_map(|path| read_conf_file(host, path, warnings))
        .collect()
}

/// Reads one config file, following links under the host root. `None` for
/// a directory, which systemd and kmod skip.
fn read_conf_file(host: &HostRoot, path: PathBuf, warnings: &mut Vec<String>) -> Option<ConfFile> {
    let mut current = path.clone();
    let mut target = None;
    for _ in 0..MAX_LINK_HOPS {
        let meta = match fs::symlink_metadata(&current) {
            Ok(meta) => meta,
            Err(e) => {
                warnings.push(link_problem(host, &path, &current, &e.to_string()));
                return Some(ConfFile {
                    path,
                    target,
                    text: None,
                });
            }
        };
        if meta.is_dir() {
            return None;
        }
        if !meta.file_type().is_symlink() {
            let text = match read_optional_text(&current) {
                Ok(Some(text)) => Some(text),
                Ok(None) => {
                    warnings.push(link_problem(host, &path, &current, "does not exist"));
                    None
                }
                Err(e) => {
                    warnings.push(e.to_string());
                    None
                }
            };
            return Some(ConfFile { path, target, text });
        }
        let link = match fs::read_link(&current) {
            Ok(link) => link,
            Err(e) => {
                warnings.push(format!("{}: {e}", host.node_path(&current).display()));
                return Some(ConfFile {
                    path,
                    target,
                    text: None,
                });
            }
        };
        if link == Path::new("/dev/null") {
            // Masked: it hides same-named files and says nothing itself.
            return Some(ConfFile {
                path,
                target: Some(host.host_path(&link)),
                text: None,
            });
        }
        let next = if link.is_absolute() {
            host.host_path(&link)
        } else {
            current
                .parent()
                .map_or_else(|| link.clone(), |dir| dir.join(&link))
        };
        let next = normalize(&next);
        target = Some(next.clone());
        current = next;
    }
    warnings.push(format!(
        "{}: more than {MAX_LINK_HOPS} symbolic links in a row; file skipped",
        host.node_path(&path).display()
    ));
    Some(ConfFile {
        path,
        target,
        text: None,
    })
}

/// A warning about `path`, which leads to `current` through links, both
/// named as the node names them.
fn link_problem(host: &HostRoot, path: &Path, current: &Path, problem: &str) -> String {
    if path == current {
        format!(
            "{}: {problem}; file skipped",
            host.node_path(path).display()
        )
    } else {
        format!(
            "{}: links to {}, which {problem}; file skipped",
            host.node_path(path).display(),
            host.node_path(current).display()
        )
    }
}

/// Removes `.` and `..` components without touching the file system, so a
/// link `modules.conf -> ../modules` names `/etc/modules`, not
/// `/etc/modules-load.d/../modules`.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// A modules-load.d file, by systemd-modules-load's rules.
fn parse_modules_load(text: &str, file: &NodePath, config: &mut PersistenceConfig) {
    for (index, line) in text.lines().enumerate() {
        let entry = line.trim();
        if entry.is_empty() || entry.starts_with(['#', ';']) {
            continue;
        }
        let line_no = index + 1;
        match ModuleName::parse(entry) {
            Ok(module) => config.listed.push(Listed {
                module,
                source: PersistSource::ModulesLoad {
                    file: file.clone(),
                    line: line_no,
                },
            }),
            Err(_) if entry.contains(char::is_whitespace) => config.warnings.push(format!(
                "{file} line {line_no}: {entry:?} loads nothing at boot: systemd-modules-load \
                 takes the whole line as one module name (module parameters go in \
                 /etc/modprobe.d as `options <module> <parameters>`)"
            )),
            Err(_) => config.warnings.push(format!(
                "{file} line {line_no}: {entry:?} is not a module name (an alias?); not matched \
                 against required modules"
            )),
        }
    }
}

/// /etc/modules read directly, as Debian's kmod init script does: the first
/// word of each line not starting with `#` is a module, the rest its
/// parameters.
fn parse_etc_modules(text: &str, file: &NodePath, config: &mut PersistenceConfig) {
    for (index, line) in text.lines().enumerate() {
        let Some(word) = line.split_whitespace().next() else {
            continue;
        };
        if word.starts_with('#') {
            continue;
        }
        match ModuleName::parse(word) {
            Ok(module) => config.listed.push(Listed {
                module,
                source: PersistSource::EtcModules {
                    file: file.clone(),
                    line: index + 1,
                },
            }),
            Err(e) => config
                .warnings
                .push(format!("{file} line {}: {e}; line skipped", index + 1)),
        }
    }
}

/// One line as kmod reads it: lines ending in `\` joined with the next.
struct LogicalLine {
    /// 1-based number of its first line.
    first: usize,
    /// 1-based number of its last line.
    last: usize,
    /// The joined text.
    text: String,
}

/// Joins lines ending in `\` with the next, as kmod does, keeping the
/// 1-based numbers of each joined line's first and last lines.
fn logical_lines(text: &str) -> Vec<LogicalLine> {
    let mut out = Vec::new();
    let mut pending: Option<LogicalLine> = None;
    for (index, line) in text.lines().enumerate() {
        let mut joined = pending.take().unwrap_or(LogicalLine {
            first: index + 1,
            last: index + 1,
            text: String::new(),
        });
        joined.last = index + 1;
        match line.strip_suffix('\\') {
            Some(head) => {
                joined.text.push_str(head);
                joined.text.push(' ');
                pending = Some(joined);
            }
            None => {
                joined.text.push_str(line);
                out.push(joined);
            }
        }
    }
    out.extend(pending);
    out
}

/// A modprobe.d file: the `blacklist` and `install` lines that can stop a
/// module; the other commands are known and ignored.
fn parse_modprobe_d(text: &str, file: &NodePath, config: &mut PersistenceConfig) {
    for logical in logical_lines(text) {
        let LogicalLine {
            first: line,
            last: last_line,
            text: logical,
        } = logical;
        let rule_text = logical.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut words = logical.split_whitespace();
        let Some(command) = words.next() else {
            continue;
        };
        if command.starts_with('#') {
            continue;
        }
        let skip = |config: &mut PersistenceConfig, problem: String| {
            config
                .warnings
                .push(format!("{file} line {line}: {problem}; line skipped"));
        };
        match command {
            "blacklist" | "install" => {
                let Some(raw) = words.next() else {
                    skip(config, format!("`{command}` without a module name"));
                    continue;
                };
                let Ok(module) = ModuleName::parse(raw) else {
                    skip(config, format!("{raw:?} is not a module name"));
                    continue;
                };
                if command == "blacklist" {
                    config.rules.push(Rule {
                        module,
                        block: Block::Blacklist {
                            file: file.clone(),
                            line,
                            last_line,
                            text: rule_text,
                        },
                    });
                    continue;
                }
                let words: Vec<&str> = words.collect();
                if words.is_empty() {
                    skip(config, format!("`install {raw}` without a command"));
                } else if install_disables(&words) {
                    config.rules.push(Rule {
                        module,
                        block: Block::InstallDisabled {
                            file: file.clone(),
                            line,
                            last_line,
                            text: rule_text,
                            command: words.join(" "),
                        },
                    });
                }
            }
            "alias" | "options" | "remove" | "softdep" | "weakdep" => {}
            other => skip(config, format!("unknown command {other:?}")),
        }
    }
}

/// Whether an install command only runs `true` or `false`: the module is
/// never loaded.
fn install_disables(words: &[&str]) -> bool {
    let program = words.first().map(|w| w.rsplit('/').next().unwrap_or(w));
    matches!(program, Some("true" | "false"))
}

/// The kernel command line: `modules-load=`, `rd.modules-load=`,
/// `modprobe.blacklist=` and `module_blacklist=`. Like the kernel, `-` and
/// `_` in a parameter name are the same, and double quotes group.
fn parse_cmdline(text: &str, file: &NodePath, config: &mut PersistenceConfig) {
    for word in cmdline_words(text) {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let key = key.replace('-', "_");
        let make: fn(ModuleName, String, &mut PersistenceConfig) = match key.as_str() {
            "modules_load" | "rd.modules_load" => |module, parameter, config| {
                config.listed.push(Listed {
                    module,
                    source: PersistSource::KernelCmdline { parameter },
                });
            },
            "modprobe.blacklist" => |module, parameter, config| {
                config.rules.push(Rule {
                    module,
                    block: Block::CmdlineBlacklist {
                        parameter,
                        set_in: Vec::new(),
                    },
                });
            },
            "module_blacklist" => |module, parameter, config| {
                config.rules.push(Rule {
                    module,
                    block: Block::KernelBlacklist {
                        parameter,
                        set_in: Vec::new(),
                    },
                });
            },
            _ => continue,
        };
        for name in value.split(',').filter(|n| !n.is_empty()) {
            match ModuleName::parse(name) {
                Ok(module) => make(module, word.clone(), config),
                Err(_) => config.warnings.push(format!(
                    "{file}: {name:?} in {word} is not a module name; ignored"
                )),
            }
        }
    }
}

/// Splits a command line at unquoted whitespace, dropping the quotes.
fn cmdline_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Another installed kernel, and which required modules it lacks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OtherKernel {
    /// Its release, the name of its module directory.
    pub release: String,
    /// The module directory that was read.
    pub modules_dir: PathBuf,
    /// Its kernel image, if one is installed (without one it is a leftover
    /// module tree, not a kernel that can boot).
    pub kernel_image: Option<PathBuf>,
    /// Required modules that are neither built in nor available as a file
    /// in that kernel: booting it loses them.
    pub missing: Vec<ModuleName>,
    /// Files that were missing or odd, each naming its path.
    pub warnings: Vec<String>,
}

/// Every kernel with a module tree under /lib/modules or /usr/lib/modules
/// other than `running_release`, sorted by release, with the `modules`
/// each one lacks. A directory with neither modules.dep nor modules.builtin
/// (what a removed kernel's DKMS modules leave behind) is not a kernel and
/// is left out.
#[must_use]
pub fn other_kernels(
    host: &HostRoot,
    running_release: &str,
    modules: &[ModuleName],
) -> Vec<OtherKernel> {
    let mut releases = BTreeSet::new();
    for root in host.modules_roots() {
        let Ok(entries) = fs::read_dir(&root) else {
            continue;
        };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name != running_release && entry.path().is_dir() {
                releases.insert(name);
            }
        }
    }
    releases
        .into_iter()
        .filter_map(|release| other_kernel(host, release, modules))
        .collect()
}

fn other_kernel(host: &HostRoot, release: String, modules: &[ModuleName]) -> Option<OtherKernel> {
    let candidates = host.modules_dir_candidates(&release);
    let modules_dir = candidates
        .iter()
        .find(|dir| dir.join(MODULES_DEP).is_file())
        .or_else(|| {
            candidates
                .iter()
                .find(|dir| dir.join(MODULES_BUILTIN).is_file())
        })?
        .clone();
    let mut warnings = Vec::new();
    let mut present = BTreeSet::new();

    let path = modules_dir.join(MODULES_BUILTIN);
    match read_optional_text(&path) {
        Ok(Some(text)) => {
            let parsed = parse_modules_builtin(&text, &path);
            warnings.extend(parsed.bad_lines.iter().map(ToString::to_string));
            present.extend(parsed.value);
        }
        Ok(None) => warnings.push(format!("{} does not exist", path.display())),
        Err(e) => warnings.push(e.to_string()),
    }
    let path = modules_dir.join(MODULES_DEP);
    match read_optional_text(&path) {
        Ok(Some(text)) => {
            let parsed = parse_modules_dep(&text, &path);
            warnings.extend(parsed.bad_lines.iter().map(ToString::to_string));
            present.extend(parsed.value.into_keys());
        }
        Ok(None) => warnings.push(format!(
            "{} does not exist (depmod has not run for this kernel?): only built-in modules \
             count",
            path.display()
        )),
        Err(e) => warnings.push(e.to_string()),
    }
    let kernel_image = host
        .kernel_image_candidates(&release)
        .into_iter()
        .find(|p| p.is_file());
    let missing = modules
        .iter()
        .filter(|m| !present.contains(*m))
        .cloned()
        .collect();
    Some(OtherKernel {
        release,
        modules_dir,
        kernel_image,
        missing,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        host::take_snapshot,
        testing::{DEBIAN_6_1 as REL_6_1, DEBIAN_6_12 as REL_6_12, FakeHost, name},
    };

    // Real files: see fixtures/persistence/README.md for where each is from.
    const ETC_MODULES_DEBIAN: &str = include_str!("fixtures/persistence/etc-modules.debian-12");
    const ALIASES_DEBIAN: &str =
        include_str!("fixtures/persistence/modprobe.d-aliases.conf.debian-12");
    const FBDEV_DEBIAN: &str =
        include_str!("fixtures/persistence/modprobe.d-fbdev-blacklist.conf.debian-12");
    const SYSTEMD_DEBIAN: &str =
        include_str!("fixtures/persistence/modprobe.d-systemd.conf.debian-12");
    const MULTIPATH_DEBIAN: &str =
        include_str!("fixtures/persistence/modules-load.d-multipath.conf.debian-12");
    const BLACKLIST_UBUNTU: &str =
        include_str!("fixtures/persistence/modprobe.d-blacklist.conf.ubuntu");
    // A Longhorn node's own edits, written in the style of the files above.
    const ETC_MODULES_NODE: &str = include_str!("fixtures/persistence/etc-modules.longhorn-node");
    const LONGHORN_CONF_NODE: &str =
        include_str!("fixtures/persistence/modules-load.d-longhorn.conf.node");
    const CIS_NODE: &str = include_str!("fixtures/persistence/modprobe.d-cis-hardening.conf.node");

    const DEP_6_1: &str = include_str!("fixtures/modules.dep.debian-6.1");
    const BUILTIN_6_1: &str = include_str!("fixtures/modules.builtin.debian-6.1");
    const DEP_6_12: &str = include_str!("fixtures/modules.dep.debian-6.12");
    const BUILTIN_6_12: &str = include_str!("fixtures/modules.builtin.debian-6.12");
    const CMDLINE: &str = "BOOT_IMAGE=/boot/vmlinuz-6.1.0-56-amd64 \
        root=UUID=5d6b1e4c-7d0a-4b8e-9a57-2f8f1c2d3e4f ro quiet rd.modules-load=nvme_tcp \
        \"modprobe.blacklist=evbug,snd_pcsp\" module_blacklist=floppy\n";

    /// A Debian 12 host root (kernel 6.1): the shared fake host with
    /// this module's constructors.
    struct Host {
        fake: FakeHost,
    }

    impl Host {
        fn debian_6_1() -> Self {
            let fake = FakeHost::with_release(REL_6_1);
            fake.write(format!("lib/modules/{REL_6_1}/modules.dep"), DEP_6_1)
                .write(
                    format!("lib/modules/{REL_6_1}/modules.builtin"),
                    BUILTIN_6_1,
                )
                .write("proc/modules", "");
            Self { fake }
        }

        /// Debian's stock files: /etc/modules with only its header and the
        /// modules.conf link to it, kmod's and systemd's modprobe.d files.
        fn with_debian_defaults(self) -> Self {
            self.write("etc/modules", ETC_MODULES_DEBIAN);
            self.link("../modules", "etc/modules-load.d/modules.conf");
            self.write("lib/modprobe.d/aliases.conf", ALIASES_DEBIAN);
            self.write("lib/modprobe.d/fbdev-blacklist.conf", FBDEV_DEBIAN);
            self.write("lib/modprobe.d/systemd.conf", SYSTEMD_DEBIAN);
            self
        }

        /// A Longhorn node: the admin's /etc/modules, a modules-load.d
        /// file, multipath-tools, Ubuntu's blacklist, CIS hardening and a
        /// kernel command line.
        fn longhorn_node() -> Self {
            let host = Self::debian_6_1().with_debian_defaults();
            host.write("etc/modules", ETC_MODULES_NODE);
            host.write("etc/modules-load.d/longhorn.conf", LONGHORN_CONF_NODE);
            host.write("lib/modules-load.d/multipath.conf", MULTIPATH_DEBIAN);
            host.write("etc/modprobe.d/blacklist.conf", BLACKLIST_UBUNTU);
            host.write("etc/modprobe.d/cis-hardening.conf", CIS_NODE);
            host.write("proc/cmdline", CMDLINE);
            host
        }

        fn write(&self, rel: &str, content: &str) {
            self.fake.write(rel, content);
        }

        fn link(&self, target: &str, rel: &str) {
            self.fake.link(target, rel);
        }

        fn root(&self) -> HostRoot {
            self.fake.root()
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.fake.join(rel)
        }

        /// `rel` under both its names.
        fn file(&self, rel: &str) -> NodePath {
            self.root().locate(&self.path(rel))
        }

        fn judge(&self, module: &str) -> Persistence {
            let root = self.root();
            let config = read_persistence_config(&root);
            let snapshot = take_snapshot(&root).unwrap();
            persistence(&config, &snapshot, &name(module))
        }
    }

    fn modules_load(host: &Host, rel: &str, line: usize) -> PersistSource {
        PersistSource::ModulesLoad {
            file: host.file(rel),
            line,
        }
    }

    #[test]
    fn stock_debian_persists_nothing_and_warns_about_nothing() {
        let host = Host::debian_6_1().with_debian_defaults();
        host.write("proc/cmdline", CMDLINE);
        let config = read_persistence_config(&host.root());
        assert_eq!(config.warnings(), [] as [String; 0]);
        // Only the command line's rd.modules-load names a module.
        assert_eq!(config.listed_modules(), [&name("nvme_tcp")]);
        let dm_crypt = host.judge("dm_crypt");
        assert!(!dm_crypt.persistent);
        assert_eq!(dm_crypt.sources, []);
        assert_eq!(dm_crypt.blocked_by, []);
    }

    #[test]
    fn etc_modules_through_debians_link_follows_systemd_rules() {
        let host = Host::longhorn_node();
        // "iscsi_tcp" on line 8 of /etc/modules, read by systemd through
        // modules.conf; reported in the file the admin edits.
        let iscsi = host.judge("iscsi_tcp");
        assert!(iscsi.persistent, "{iscsi:?}");
        assert_eq!(iscsi.sources, [modules_load(&host, "etc/modules", 8)]);

        // "vfio-pci ids=8086:0953": systemd takes the whole line as a name.
        let config = read_persistence_config(&host.root());
        // Named as the node has it, not under the host root.
        let etc_modules = "/etc/modules";
        assert!(
            config.warnings().iter().any(|w| w.starts_with(&format!(
                "{etc_modules} line 11: \"vfio-pci ids=8086:0953\" loads nothing at boot"
            ))),
            "{:#?}",
            config.warnings()
        );
        // ...but vfio_pci is persistent through longhorn.conf's tab-indented
        // line.
        let vfio = host.judge("vfio-pci");
        assert!(vfio.persistent);
        assert_eq!(
            vfio.sources,
            [modules_load(&host, "etc/modules-load.d/longhorn.conf", 5)]
        );
    }

    #[test]
    fn etc_modules_without_the_link_takes_parameters() {
        let host = Host::debian_6_1();
        host.write("etc/modules", ETC_MODULES_NODE);
        host.write("proc/cmdline", "ro quiet\n");
        let vfio = host.judge("vfio_pci");
        assert!(vfio.persistent);
        assert_eq!(
            vfio.sources,
            [PersistSource::EtcModules {
                file: host.file("etc/modules"),
                line: 11
            }]
        );
        // The commented-out nvme_tcp does not count.
        assert!(!host.judge("nvme_tcp").persistent);
        assert_eq!(
            read_persistence_config(&host.root()).warnings(),
            [] as [String; 0]
        );
    }

    #[test]
    fn install_bin_false_defeats_every_list() {
        let host = Host::longhorn_node();
        let dm_crypt = host.judge("dm_crypt");
        assert!(!dm_crypt.persistent, "{dm_crypt:?}");
        // Listed in /etc/modules; "dm_crypt foo=1" in longhorn.conf is not
        // a listing.
        assert_eq!(dm_crypt.sources, [modules_load(&host, "etc/modules", 9)]);
        assert_eq!(
            dm_crypt.blocked_by,
            [Block::InstallDisabled {
                file: host.file("etc/modprobe.d/cis-hardening.conf"),
                line: 13,
                last_line: 13,
                text: "install dm_crypt /bin/false".to_owned(),
                command: "/bin/false".to_owned(),
            }]
        );
        let config = read_persistence_config(&host.root());
        assert!(
            config.warnings().iter().any(|w| w.starts_with(
                "/etc/modules-load.d/longhorn.conf line 6: \"dm_crypt foo=1\" loads nothing at boot"
            )),
            "{:#?}",
            config.warnings()
        );
        assert!(
            dm_crypt.blocked_by[0]
                .to_string()
                .contains("modprobe runs the command instead of loading it")
        );
    }

    #[test]
    fn a_wrapping_install_command_is_not_a_block() {
        // install nvme_tcp /sbin/modprobe --ignore-install nvme_tcp && \ ...
        let host = Host::longhorn_node();
        let nvme_tcp = host.judge("nvme_tcp");
        assert!(nvme_tcp.persistent);
        assert_eq!(nvme_tcp.blocked_by, []);
        assert_eq!(
            nvme_tcp.sources,
            [
                modules_load(&host, "etc/modules-load.d/longhorn.conf", 3),
                PersistSource::KernelCmdline {
                    parameter: "rd.modules-load=nvme_tcp".to_owned()
                },
            ]
        );
    }

    #[test]
    fn blacklist_stops_modules_load_but_not_a_dependency() {
        let host = Host::longhorn_node();
        // `blacklist \` + `    uio_pci_generic`: one logical line from 16.
        let uio = host.judge("uio_pci_generic");
        assert!(!uio.persistent, "{uio:?}");
        assert_eq!(
            uio.sources,
            [modules_load(&host, "etc/modules-load.d/longhorn.conf", 4)]
        );
        assert_eq!(
            uio.blocked_by,
            [Block::Blacklist {
                file: host.file("etc/modprobe.d/cis-hardening.conf"),
                line: 16,
                last_line: 17,
                text: "blacklist uio_pci_generic".to_owned(),
            }]
        );

        // A blacklisted module that a listed module depends on is loaded
        // all the same: dm-multipath (multipath-tools' file) needs dm_mod.
        host.write("etc/modprobe.d/dm.conf", "blacklist dm-mod\n");
        let dm_mod = host.judge("dm_mod");
        assert!(dm_mod.persistent, "{dm_mod:?}");
        assert_eq!(
            dm_mod.sources,
            [
                // dm_crypt needs it too, but dm_crypt is disabled.
                PersistSource::DependencyOf {
                    module: name("dm_multipath"),
                    source: Box::new(modules_load(&host, "lib/modules-load.d/multipath.conf", 3)),
                },
            ]
        );
        assert_eq!(
            dm_mod.sources[0].to_string(),
            "needed by dm_multipath, which is listed in /lib/modules-load.d/multipath.conf line 3"
        );
        // An install line, unlike a blacklist, stops dependency loads too.
        host.write("etc/modprobe.d/dm.conf", "install dm_mod /usr/bin/false\n");
        assert!(!host.judge("dm_mod").persistent);
    }

    #[test]
    fn kernel_command_line_blacklists() {
        let host = Host::longhorn_node();
        host.write("etc/modules-load.d/sound.conf", "snd-pcsp\nfloppy\n");
        let pcsp = host.judge("snd_pcsp");
        assert!(!pcsp.persistent);
        assert_eq!(
            pcsp.blocked_by,
            [
                Block::Blacklist {
                    file: host.file("etc/modprobe.d/blacklist.conf"),
                    line: 42,
                    last_line: 42,
                    text: "blacklist snd_pcsp".to_owned(),
                },
                Block::CmdlineBlacklist {
                    parameter: "modprobe.blacklist=evbug,snd_pcsp".to_owned(),
                    set_in: Vec::new(),
                },
            ]
        );
        let floppy = host.judge("floppy");
        assert!(!floppy.persistent);
        assert_eq!(
            floppy.blocked_by,
            [Block::KernelBlacklist {
                parameter: "module_blacklist=floppy".to_owned(),
                set_in: Vec::new(),
            }]
        );
    }

    #[test]
    fn command_line_blacklists_name_the_boot_loader_lines_that_set_them() {
        let host = Host::longhorn_node();
        // Debian's stock /etc/default/grub, with the parameters added, and
        // an Ubuntu cloud image's grub.d file.
        host.write(
            "etc/default/grub",
            "GRUB_DEFAULT=0\nGRUB_TIMEOUT=5\nGRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || \
             echo Debian`\n#GRUB_CMDLINE_LINUX_DEFAULT=\"quiet modprobe.blacklist=evbug,snd_pcsp\"\n\
             GRUB_CMDLINE_LINUX_DEFAULT=\"quiet modprobe.blacklist=evbug,snd_pcsp\"\n\
             GRUB_CMDLINE_LINUX=\"\"\n",
        );
        host.write(
            "etc/default/grub.d/50-cloudimg-settings.cfg",
            "GRUB_CMDLINE_LINUX_DEFAULT=\"$GRUB_CMDLINE_LINUX_DEFAULT module_blacklist=floppy\"\n",
        );
        host.write(
            "etc/kernel/cmdline",
            "root=UUID=x ro module_blacklist=floppy2\n",
        );
        let pcsp = host.judge("snd_pcsp");
        assert_eq!(
            pcsp.blocked_by[1],
            Block::CmdlineBlacklist {
                parameter: "modprobe.blacklist=evbug,snd_pcsp".to_owned(),
                // Not the commented-out line 4.
                set_in: vec![ConfigLine {
                    file: host.file("etc/default/grub"),
                    line: 5,
                    text: "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet modprobe.blacklist=evbug,snd_pcsp\""
                        .to_owned(),
                }],
            }
        );
        // A whole parameter only: not module_blacklist=floppy2.
        assert_eq!(
            host.judge("floppy").blocked_by,
            [Block::KernelBlacklist {
                parameter: "module_blacklist=floppy".to_owned(),
                set_in: vec![ConfigLine {
                    file: host.file("etc/default/grub.d/50-cloudimg-settings.cfg"),
                    line: 1,
                    text: "GRUB_CMDLINE_LINUX_DEFAULT=\"$GRUB_CMDLINE_LINUX_DEFAULT \
                           module_blacklist=floppy\""
                        .to_owned(),
                }],
            }]
        );
    }

    #[test]
    fn whole_parameters_are_found_between_spaces_and_quotes() {
        assert_eq!(word_at("a=\"x=1 y=2\"", "x=1"), Some(3));
        assert_eq!(word_at("a=\"x=1 y=2\"", "y=2"), Some(7));
        assert_eq!(word_at("xx=1 x=1", "x=1"), Some(5));
        assert_eq!(word_at("x=12", "x=1"), None);
        assert_eq!(word_at("x=1", ""), None);
    }

    #[test]
    fn same_named_files_override_and_dev_null_masks() {
        let host = Host::longhorn_node();
        // /etc's longhorn.conf hides /usr/lib's, whatever /usr/lib's says.
        host.write(
            "usr/lib/modules-load.d/longhorn.conf",
            "iscsi_tcp\nsquashfs\n",
        );
        assert_eq!(host.judge("squashfs").sources, []);
        // A link to /dev/null in /etc masks multipath-tools' file.
        assert!(host.judge("dm_multipath").persistent);
        host.link("/dev/null", "etc/modules-load.d/multipath.conf");
        let dm_multipath = host.judge("dm_multipath");
        assert!(!dm_multipath.persistent);
        assert_eq!(dm_multipath.sources, []);
        // Only *.conf is read: not a dpkg leftover, not a README, not a
        // hidden file, not a directory.
        host.write(
            "etc/modules-load.d/multipath.conf.dpkg-old",
            "dm-multipath\n",
        );
        host.write("etc/modules-load.d/README", "dm-multipath\n");
        host.write("etc/modules-load.d/.multipath.conf", "dm-multipath\n");
        fs::create_dir_all(host.path("run/modules-load.d/dir.conf")).unwrap();
        assert!(!host.judge("dm_multipath").persistent);
        assert_eq!(read_persistence_config(&host.root()).warnings().len(), 2);
    }

    #[test]
    fn absolute_links_resolve_under_the_host_root_and_dangling_ones_warn() {
        let host = Host::debian_6_1();
        host.write("proc/cmdline", "ro\n");
        host.write("usr/share/longhorn/modules.conf", "dm_crypt\n");
        host.link(
            "/usr/share/longhorn/modules.conf",
            "etc/modules-load.d/a.conf",
        );
        host.link("/usr/share/gone.conf", "etc/modules-load.d/b.conf");
        let dm_crypt = host.judge("dm_crypt");
        assert!(dm_crypt.persistent);
        assert_eq!(
            dm_crypt.sources,
            [modules_load(&host, "usr/share/longhorn/modules.conf", 1)]
        );
        let config = read_persistence_config(&host.root());
        assert_eq!(
            config.warnings(),
            [
                "/etc/modules-load.d/b.conf: links to /usr/share/gone.conf, which No such file or \
              directory (os error 2); file skipped"
            ]
        );
    }

    #[test]
    fn built_in_needs_no_list_and_ignores_blocks() {
        let host = Host::debian_6_1();
        host.write("proc/cmdline", "ro\n");
        host.write(
            "etc/modprobe.d/x.conf",
            "install crypto_algapi /bin/false\n",
        );
        let algapi = host.judge("crypto_algapi");
        assert!(algapi.persistent);
        assert_eq!(algapi.sources, [PersistSource::Builtin]);
        assert_eq!(algapi.blocked_by.len(), 1);
    }

    #[test]
    fn a_listed_module_the_kernel_lacks_is_not_persistent() {
        // ZFS listed, but its DKMS build failed for this kernel.
        let host = Host::debian_6_1();
        host.write("proc/cmdline", "ro\n");
        host.write("etc/modules-load.d/zfs.conf", "zfs\n");
        let zfs = host.judge("zfs");
        assert!(!zfs.persistent);
        assert_eq!(
            zfs.blocked_by,
            [Block::NoModuleFile {
                kernel_release: REL_6_1.to_owned()
            }]
        );
    }

    #[test]
    fn without_module_support_only_built_in_counts() {
        let host = Host::debian_6_1();
        fs::remove_file(host.path("proc/modules")).unwrap();
        host.write(
            &format!("boot/config-{REL_6_1}"),
            "# CONFIG_MODULES is not set\n",
        );
        host.write("proc/cmdline", "modules-load=dm_crypt\n");
        let dm_crypt = host.judge("dm_crypt");
        assert!(!dm_crypt.persistent);
        assert_eq!(
            dm_crypt.blocked_by,
            [Block::ModulesUnsupported {
                kernel_release: REL_6_1.to_owned()
            }]
        );
    }

    #[test]
    fn odd_lines_are_reported_with_file_and_line() {
        let host = Host::debian_6_1();
        host.write("proc/cmdline", "modules-load=dm_crypt,,b@d\n");
        host.write(
            "etc/modprobe.d/odd.conf",
            "blacklist\ninstall dm_crypt\nfrobnicate dm_crypt\n  # indented comment\n",
        );
        let config = read_persistence_config(&host.root());
        let odd = "/etc/modprobe.d/odd.conf";
        let cmdline = "/proc/cmdline";
        assert_eq!(
            config.warnings(),
            [
                format!("{odd} line 1: `blacklist` without a module name; line skipped"),
                format!("{odd} line 2: `install dm_crypt` without a command; line skipped"),
                format!("{odd} line 3: unknown command \"frobnicate\"; line skipped"),
                format!(
                    "{cmdline}: \"b@d\" in modules-load=dm_crypt,,b@d is not a module name; ignored"
                ),
            ]
        );
        assert!(host.judge("dm_crypt").persistent);
    }

    #[test]
    fn a_missing_command_line_is_a_warning() {
        let host = Host::debian_6_1();
        fs::remove_file(host.path("proc/cmdline")).unwrap();
        let config = read_persistence_config(&host.root());
        assert_eq!(config.warnings().len(), 1);
        assert!(config.warnings()[0].contains("proc/cmdline does not exist"));
    }

    #[test]
    fn command_line_quotes_group_words() {
        assert_eq!(
            cmdline_words("a \"b=c d\" e=\"f g\"\n"),
            ["a", "b=c d", "e=f g"]
        );
    }

    #[test]
    fn other_kernels_report_what_an_upgrade_would_lose() {
        let host = Host::debian_6_1();
        // The upgrade target, merged-/usr layout, with its image.
        host.write(&format!("usr/lib/modules/{REL_6_12}/modules.dep"), DEP_6_12);
        host.write(
            &format!("usr/lib/modules/{REL_6_12}/modules.builtin"),
            BUILTIN_6_12,
        );
        host.write(&format!("boot/vmlinuz-{REL_6_12}"), "");
        // An Ubuntu-style kernel without its -extra modules package: the
        // 6.1 tree without nvme-tcp.
        let generic = "6.8.0-45-generic";
        let without_nvme_tcp: String = DEP_6_1
            .lines()
            .filter(|l| !l.starts_with("kernel/drivers/nvme/host/nvme-tcp.ko:"))
            .map(|l| format!("{l}\n"))
            .collect();
        host.write(
            &format!("lib/modules/{generic}/modules.dep"),
            &without_nvme_tcp,
        );
        host.write(
            &format!("lib/modules/{generic}/modules.builtin"),
            BUILTIN_6_1,
        );
        // A kernel whose depmod never ran: only built-in modules count.
        host.write("lib/modules/6.9.0-1-amd64/modules.builtin", BUILTIN_6_1);
        // What a removed kernel's DKMS build leaves behind: not a kernel.
        host.write("lib/modules/5.10.0-30-amd64/updates/dkms/zfs.ko", "");

        let required = [
            name("dm_crypt"),
            name("vfio_pci"),
            name("uio_pci_generic"),
            name("nvme_tcp"),
        ];
        let others = other_kernels(&host.root(), REL_6_1, &required);
        let summary: Vec<(&str, Vec<&str>, bool)> = others
            .iter()
            .map(|k| {
                (
                    k.release.as_str(),
                    k.missing.iter().map(ModuleName::as_str).collect(),
                    k.kernel_image.is_some(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (REL_6_12, vec![], true),
                (generic, vec!["nvme_tcp"], false),
                (
                    "6.9.0-1-amd64",
                    vec!["dm_crypt", "vfio_pci", "uio_pci_generic", "nvme_tcp"],
                    false
                ),
            ]
        );
        assert_eq!(
            others[0].modules_dir,
            host.path(&format!("usr/lib/modules/{REL_6_12}"))
        );
        assert_eq!(others[0].warnings, [] as [String; 0]);
        assert!(others[2].warnings[0].contains("depmod has not run"));
    }
}
