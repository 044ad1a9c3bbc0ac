//! `kmod-monitor check --fix`: turns a check report into a plan (which
//! modules to `modprobe` now, which to add to
//! `/etc/modules-load.d/kmod-monitor.conf` so they come back after a reboot)
//! and carries it out.
//!
//! - [`plan`] only reads. `--dry-run` prints the plan ([`FixPlan`]'s
//!   `Display`) and stops there.
//! - [`apply`] runs `modprobe` through an injected runner (so tests need no
//!   root and a fake host root loads nothing) and writes the file.
//! - Idempotent: what the first run fixed is loaded and persistent on the
//!   second, whose plan is empty.
//! - It never edits a file it did not create: the file's first line must be
//!   [`MANAGED_HEADER`]'s mark, or [`plan`] refuses with
//!   [`FixError::ForeignFile`]. A link is refused too.
//! - Every path is resolved inside the host root, as the host would resolve
//!   it ([`RootDir`]): an absolute link under `--host-root` means the host's
//!   path, never the container's. The file is written to a temporary file
//!   with a random name, created exclusively and never through a link, then
//!   renamed over the old one, and the directory is fsynced.
//! - An any-of group needs one member: the first that is loaded (or else
//!   the first that can be loaded) is loaded and persisted, and nothing is
//!   done when some member already comes back after a reboot.
//! - It carries out the steps of each module's remedy
//!   ([`crate::remedy`]) that are its own (`modprobe`, a line in its file),
//!   up to the first step that is a person's: a line to delete from a
//!   modprobe.d file, a kernel parameter, a kernel package. So it never
//!   writes a line that a blacklist would skip, never edits a file it did
//!   not write, and never loads a module that `install … /bin/false`
//!   disables. What is left is printed, step by step, with node paths, and
//!   the exit code is 1.
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use serde::Serialize;

use anyhow::Context as _;

use crate::check::{Evaluation, GroupCheck, ModuleCheck, Report};
use crate::config::flags::{CommonFlags, Output};
use crate::host::in_root::RootDir;
use crate::host::persistence::{Block, PersistSource, Persistence};
use crate::host::{HostRoot, NodePath};
use crate::names::ModuleName;
use crate::remedy::{Remedy, Step, render_steps};
use crate::requirements::GroupMode;
use crate::state::ModuleState;

/// `kmod-monitor check --fix [--dry-run]`: evaluates the node as `check`
/// does, then prints the plan (dry run, exit 0) or carries it out (exit 0
/// when every step succeeded and nothing is left for a person, 1
/// otherwise), as text or, with `--output json`, as the [`FixPlan`] or
/// [`FixReport`]. `modprobe` acts on the host: through `chroot` when the
/// host's `/` is mounted elsewhere (a container with `--host-root`).
///
/// # Errors
/// As [`crate::check::evaluate_node`], or the plan or the file cannot be
/// made.
pub fn command(common: &CommonFlags, dry_run: bool, output: Output) -> anyhow::Result<u8> {
    let Evaluation { report, boot, host } = crate::check::evaluate_node(common)?;
    let plan = plan(&report, &boot.persistence, &host)?;
    if dry_run {
        match output {
            Output::Text => print!("{plan}"),
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&plan).context("encoding the plan")?
            ),
        }
        return Ok(0);
    }
    let root = host.root().to_path_buf();
    let runner = |argv: &[&str]| {
        let mut cmd = if root == Path::new("/") {
            let mut c = std::process::Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        } else {
            let mut c = std::process::Command::new("chroot");
            c.arg(&root).args(argv);
            c
        };
        cmd.status()
    };
    let done = apply(&plan, &host, &runner)?;
    match output {
        Output::Text => print!("{done}"),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&done).context("encoding the report")?
        ),
    }
    Ok(u8::from(!done.ok()))
}

/// The first line of every file `check --fix` writes; a file whose first
/// line does not start with [`MANAGED_MARK`] is not kmod-monitor's.
pub const MANAGED_HEADER: &str =
    "# Managed by kmod-monitor: written by `kmod-monitor check --fix`.";
/// What the first line of a file kmod-monitor may rewrite starts with.
pub const MANAGED_MARK: &str = "# Managed by kmod-monitor";
/// The lines after [`MANAGED_HEADER`], before the modules.
const HEADER_REST: &str = "\
# systemd-modules-load loads the modules below at every boot. kmod-monitor
# only ever adds lines here; to drop a module, delete its line (and keep the
# first line, or kmod-monitor will refuse to touch this file again).
";

/// Why `check --fix` cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum FixError {
    /// The modules-load file exists but kmod-monitor did not write it.
    #[error(
        "{path}: not written by kmod-monitor (its first line is not {MANAGED_MARK:?}{}); refusing \
         to change it. Add the modules to it by hand, or move it away and run `check --fix` again",
        if *is_link { ", and it is a symbolic link" } else { "" }
    )]
    ForeignFile {
        /// The file.
        path: NodePath,
        /// Whether it is a symbolic link (never followed for writing).
        is_link: bool,
    },
    /// kmod-monitor's file has a line that is not a module name: someone
    /// edited it, and rewriting would lose the edit.
    #[error(
        "{path} line {line}: {text:?} is not a module name; fix or remove the line and run \
         `check --fix` again"
    )]
    EditedFile {
        /// The file.
        path: NodePath,
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// The file changed between [`plan`] and [`apply`].
    #[error("{path}: changed since the fix was planned; run `check --fix` again")]
    Changed {
        /// The file.
        path: NodePath,
    },
    /// Reading the file or its directory failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: NodePath,
        /// The OS error.
        source: io::Error,
    },
    /// Writing the file (or creating its directory) failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file or directory.
        path: NodePath,
        /// The OS error.
        source: io::Error,
    },
}

/// A module `check --fix` cannot fix on its own: why, and what a person
/// must do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unfixable {
    /// The module.
    pub module: ModuleName,
    /// What stands in the way.
    pub reason: String,
    /// The rest of the module's remedy, from the first step that is a
    /// person's: `check --fix` did (or does) the steps before it.
    pub steps: Vec<Step>,
    /// What loads the module at boot once the steps are done, when that
    /// is already on the node.
    pub boot_source: Option<PersistSource>,
}

impl fmt::Display for Unfixable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            module,
            reason,
            steps,
            boot_source,
        } = self;
        writeln!(f, "cannot: {module}: {reason}")?;
        if !steps.is_empty() {
            writeln!(
                f,
                "        to do by hand (check --fix edits no file but its own):"
            )?;
            f.write_str(&render_steps(steps, boot_source.as_ref(), "        "))?;
        }
        Ok(())
    }
}

/// The change to kmod-monitor's modules-load file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PersistChange {
    /// The file.
    #[serde(flatten)]
    pub path: NodePath,
    /// Every module the file lists after the change: the old ones, then the
    /// added ones.
    pub modules: Vec<ModuleName>,
    /// The modules this change adds.
    pub added: Vec<ModuleName>,
    /// The file's content when the plan was made (`None`: it did not
    /// exist), so [`apply`] can refuse a file that changed since.
    #[serde(skip)]
    previous: Option<String>,
}

/// What `check --fix` will do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FixPlan {
    /// Modules to `modprobe` now, in report order.
    pub load: Vec<ModuleName>,
    /// The modules-load file change, if the file needs one.
    pub persist: Option<PersistChange>,
    /// Modules a command cannot fix, with the reason, in report order.
    pub cannot_fix: Vec<Unfixable>,
}

impl FixPlan {
    /// Whether there is nothing to run and nothing to write (what a second
    /// run finds).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.load.is_empty() && self.persist.is_none()
    }

    /// The commands [`apply`] runs, in order (`["modprobe", "dm_crypt"]`).
    #[must_use]
    pub fn commands(&self) -> Vec<[&str; 2]> {
        self.load.iter().map(|m| ["modprobe", m.as_str()]).collect()
    }
}

impl fmt::Display for FixPlan {
    /// The plan as `--dry-run` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            writeln!(
                f,
                "Nothing to do: every module that can be fixed is loaded and persistent."
            )?;
        }
        for [program, module] in self.commands() {
            writeln!(f, "run:    {program} {module}")?;
        }
        if let Some(change) = &self.persist {
            let verb = if change.previous.is_some() {
                "add to"
            } else {
                "create"
            };
            let added: Vec<&str> = change.added.iter().map(ModuleName::as_str).collect();
            writeln!(f, "write:  {verb} {}: {}", change.path, added.join(" "))?;
        }
        for unfixable in &self.cannot_fix {
            write!(f, "{unfixable}")?;
        }
        Ok(())
    }
}

/// A `modprobe` that did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LoadFailure {
    /// The module.
    pub module: ModuleName,
    /// How it failed: the exit status or the error starting modprobe.
    pub problem: String,
}

/// What [`apply`] did, and what it left to a person.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FixReport {
    /// Modules modprobe loaded.
    pub loaded: Vec<ModuleName>,
    /// Modules modprobe failed to load.
    pub failed: Vec<LoadFailure>,
    /// The file written, if any.
    pub wrote: Option<NodePath>,
    /// The modules added to it.
    pub persisted: Vec<ModuleName>,
    /// What a person must still do (the plan's [`FixPlan::cannot_fix`]).
    pub cannot_fix: Vec<Unfixable>,
}

impl FixReport {
    /// Whether every command succeeded and nothing is left to a person.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && self.cannot_fix.is_empty()
    }
}

impl fmt::Display for FixReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for module in &self.loaded {
            writeln!(f, "loaded:  {module}")?;
        }
        for LoadFailure { module, problem } in &self.failed {
            writeln!(f, "FAILED:  modprobe {module}: {problem}")?;
        }
        if let Some(path) = &self.wrote {
            let added: Vec<&str> = self.persisted.iter().map(ModuleName::as_str).collect();
            writeln!(f, "wrote:   {path}: {}", added.join(" "))?;
        }
        for unfixable in &self.cannot_fix {
            write!(f, "{unfixable}")?;
        }
        Ok(())
    }
}

/// What kmod-monitor's file says now.
struct ManagedFile {
    /// Its content, `None` if it does not exist.
    text: Option<String>,
    /// The modules it lists, in file order.
    modules: Vec<ModuleName>,
}

/// kmod-monitor's modules-load file inside the host root: its directory
/// relative to the root, and its name.
struct InRoot<'a> {
    host: &'a HostRoot,
    /// The file, for messages.
    path: NodePath,
    dir: PathBuf,
    name: OsString,
}

impl<'a> InRoot<'a> {
    /// `path`, which [`HostRoot`] spelled under `host`'s root.
    fn new(host: &'a HostRoot, path: &Path) -> Result<Self, FixError> {
        let rel = path.strip_prefix(host.root()).ok();
        let (Some(dir), Some(name)) = (rel.and_then(Path::parent), rel.and_then(Path::file_name))
        else {
            return Err(FixError::Read {
                path: host.locate(path),
                source: io::Error::other(format!(
                    "not a file under the host root {}",
                    host.root().display()
                )),
            });
        };
        Ok(Self {
            host,
            path: host.locate(path),
            dir: dir.to_path_buf(),
            name: name.to_owned(),
        })
    }

    /// The directory the file is in, for messages.
    fn dir_path(&self) -> NodePath {
        let parent = |p: &Path| p.parent().unwrap_or(p).to_path_buf();
        NodePath {
            path: parent(&self.path.path),
            host_path: parent(&self.path.host_path),
        }
    }

    fn read_error(&self) -> impl Fn(io::Error) -> FixError + '_ {
        |source| FixError::Read {
            path: self.path.clone(),
            source,
        }
    }

    /// The file's content, `None` when it or its directory does not exist.
    /// A link is refused, never followed; so is anything but a regular
    /// file (a FIFO would block the read).
    fn read(&self) -> Result<Option<String>, FixError> {
        let root = RootDir::open(self.host.root()).map_err(self.read_error())?;
        let dir = match root.open_dir(&self.dir) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.read_error()(e)),
        };
        let fd = match rustix::fs::openat(
            &dir,
            self.name.as_os_str(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(rustix::io::Errno::LOOP) => {
                return Err(FixError::ForeignFile {
                    path: self.path.clone(),
                    is_link: true,
                });
            }
            Err(e) => return Err(self.read_error()(e.into())),
        };
        let kind = rustix::fs::fstat(&fd)
            .map(|st| FileType::from_raw_mode(st.st_mode))
            .map_err(|e| self.read_error()(e.into()))?;
        if kind != FileType::RegularFile {
            return Err(self.read_error()(io::Error::other(format!(
                "not a regular file ({kind:?})"
            ))));
        }
        let mut text = String::new();
        File::from(fd)
            .read_to_string(&mut text)
            .map_err(self.read_error())?;
        Ok(Some(text))
    }

    /// Writes `text` as the file: into a new temporary file beside it (a
    /// random name that does not end in `.conf`, so systemd never reads it
    /// half-written; created exclusively, never through a link), fsynced,
    /// renamed over the file, and the directory fsynced so the rename
    /// survives a crash. Missing directories are made inside the root.
    fn write_atomic(&self, text: &str) -> Result<(), FixError> {
        let dir_error = |source| FixError::Write {
            path: self.dir_path(),
            source,
        };
        let root = RootDir::open(self.host.root()).map_err(dir_error)?;
        let dir = root.create_dir_all(&self.dir).map_err(dir_error)?;
        let (tmp, file) = create_temporary(&dir, &self.name).map_err(dir_error)?;
        let written = (|| -> io::Result<()> {
            // The mode, whatever the umask: systemd-modules-load reads it as
            // root, but people read it too.
            rustix::fs::fchmod(&file, Mode::from_raw_mode(0o644))?;
            let mut file = File::from(file);
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            drop(file);
            rustix::fs::renameat(&dir, tmp.as_os_str(), &dir, self.name.as_os_str())?;
            Ok(())
        })();
        if let Err(source) = written {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_os_str(), AtFlags::empty());
            return Err(FixError::Write {
                path: self.path.clone(),
                source,
            });
        }
        match rustix::fs::fsync(&dir) {
            // EINVAL: a file system that cannot sync a directory at all.
            Ok(()) | Err(rustix::io::Errno::INVAL) => Ok(()),
            Err(e) => Err(dir_error(e.into())),
        }
    }
}

/// How many random temporary names are tried before giving up.
const TEMPORARY_TRIES: usize = 16;

/// Creates a new file `NAME.<16 hex>.tmp` in `dir`: exclusively
/// (`O_CREAT|O_EXCL`, so an existing file or a planted link at that name
/// fails rather than being opened) and without following a link
/// (`O_NOFOLLOW`). Returns its name and descriptor.
fn create_temporary(dir: &OwnedFd, name: &OsStr) -> io::Result<(OsString, OwnedFd)> {
    let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
    for _ in 0..TEMPORARY_TRIES {
        let mut random = [0_u8; 8];
        rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty())?;
        let mut tmp = name.to_owned();
        tmp.push(format!(".{:016x}.tmp", u64::from_ne_bytes(random)));
        match rustix::fs::openat(
            dir,
            tmp.as_os_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        ) {
            Ok(fd) => return Ok((tmp, fd)),
            Err(rustix::io::Errno::EXIST) => last = rustix::io::Errno::EXIST.into(),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last)
}

/// Reads kmod-monitor's modules-load file, refusing one it did not write.
fn read_managed(file: &InRoot<'_>) -> Result<ManagedFile, FixError> {
    let path = &file.path;
    let Some(text) = file.read()? else {
        return Ok(ManagedFile {
            text: None,
            modules: Vec::new(),
        });
    };
    if !text.starts_with(MANAGED_MARK) {
        return Err(FixError::ForeignFile {
            path: path.clone(),
            is_link: false,
        });
    }
    let mut modules = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let entry = line.trim();
        if entry.is_empty() || entry.starts_with(['#', ';']) {
            continue;
        }
        let module = ModuleName::parse(entry).map_err(|_| FixError::EditedFile {
            path: path.clone(),
            line: index + 1,
            text: line.to_owned(),
        })?;
        if !modules.contains(&module) {
            modules.push(module);
        }
    }
    Ok(ManagedFile {
        text: Some(text),
        modules,
    })
}

/// The content of kmod-monitor's file listing `modules`.
fn render_managed(modules: &[ModuleName]) -> String {
    let mut text = format!("{MANAGED_HEADER}\n{HEADER_REST}");
    for module in modules {
        text.push_str(module.as_str());
        text.push('\n');
    }
    text
}

/// What [`plan`] collects while it walks the groups.
#[derive(Default)]
struct Planner {
    load: Vec<ModuleName>,
    persist: Vec<ModuleName>,
    cannot_fix: Vec<Unfixable>,
}

impl Planner {
    fn load(&mut self, module: &ModuleName) {
        if !self.load.contains(module) {
            self.load.push(module.clone());
        }
    }

    fn persist(&mut self, module: &ModuleName) {
        if !self.persist.contains(module) {
            self.persist.push(module.clone());
        }
    }

    /// `module` is left to a person: the steps of `remedy` from the first
    /// one that is not `check --fix`'s.
    fn cannot(&mut self, module: &ModuleName, reason: String, remedy: Option<&Remedy>) {
        if self.cannot_fix.iter().any(|u| &u.module == module) {
            return;
        }
        let (steps, boot_source) = remedy.map_or_else(
            || (Vec::new(), None),
            |r| {
                let first = r.steps.iter().position(|s| !s.by_fix()).unwrap_or(0);
                (r.steps[first..].to_vec(), r.boot_source.clone())
            },
        );
        self.cannot_fix.push(Unfixable {
            module: module.clone(),
            reason,
            steps,
            boot_source,
        });
    }
}

/// The blocks that keep `modprobe <m>` from loading the module now.
fn load_blocks(p: &Persistence) -> Vec<&Block> {
    p.blocked_by.iter().filter(|b| b.stops_modprobe()).collect()
}

/// The blocks that keep a modules-load.d line from loading the module at
/// boot.
fn persist_blocks(p: &Persistence) -> Vec<&Block> {
    let line = PersistSource::ModulesLoad {
        file: NodePath {
            path: PathBuf::new(),
            host_path: PathBuf::new(),
        },
        line: 0,
    };
    p.blocked_by.iter().filter(|b| b.stops(&line)).collect()
}

fn joined(blocks: &[&Block]) -> String {
    blocks
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Plans the fix for `report`, with the [`Persistence`] of its modules
/// (from [`crate::host::persistence::persistence`]; a module without an
/// entry counts as not persistent and not blocked), against kmod-monitor's
/// modules-load file under `host`.
///
/// # Errors
/// [`FixError::ForeignFile`] if that file exists and kmod-monitor did not
/// write it (or it is a link), [`FixError::EditedFile`] if it has a line
/// that is not a module name, [`FixError::Read`] if it cannot be read.
pub fn plan(
    report: &Report,
    persistence: &BTreeMap<ModuleName, Persistence>,
    host: &HostRoot,
) -> Result<FixPlan, FixError> {
    let file = InRoot::new(host, &host.kmod_monitor_modules_load())?;
    let managed = read_managed(&file)?;
    let unknown = Persistence::default();
    let of = |m: &ModuleName| persistence.get(m).unwrap_or(&unknown);
    let mut planner = Planner::default();
    for group in &report.groups {
        match group.mode {
            // Every member, by its remedy. For an `available` group (loaded
            // on demand by iscsiadm or mount.nfs) the remedy only ever
            // removes what keeps the module from loading, which is a
            // person's step.
            GroupMode::AllOf | GroupMode::Available => {
                for module in &group.modules {
                    plan_module(&mut planner, module);
                }
            }
            GroupMode::AnyOf => plan_any_of(&mut planner, group, &of, report),
            // Checks of the host and cluster: `check` prints their fixes.
            GroupMode::Check => {}
        }
    }
    let path = file.path;

    let added: Vec<ModuleName> = planner
        .persist
        .iter()
        .filter(|m| !managed.modules.contains(m))
        .cloned()
        .collect();
    let persist = (!added.is_empty()).then(|| PersistChange {
        path,
        modules: managed.modules.iter().chain(&added).cloned().collect(),
        added,
        previous: managed.text,
    });
    Ok(FixPlan {
        load: planner.load,
        persist,
        cannot_fix: planner.cannot_fix,
    })
}

/// One module its group needs: the steps of its remedy that are `check
/// --fix`'s own (`modprobe`, a line in its file), up to the first that is
/// a person's, which it leaves, with the rest, to be printed. A line that
/// a blacklist would skip, or a `modprobe` that `install … /bin/false`
/// defeats, only ever comes after the step that removes the rule.
fn plan_module(planner: &mut Planner, module: &ModuleCheck) {
    let Some(remedy) = &module.remedy else { return };
    let name = &module.name;
    for step in &remedy.steps {
        match step {
            Step::Run { .. } => planner.load(name),
            Step::AppendLine { .. } => planner.persist(name),
            Step::DeleteLines { .. }
            | Step::KernelCmdline { .. }
            | Step::Kernel { .. }
            | Step::CheckAgain => {
                planner.cannot(name, remedy.explanation.clone(), Some(remedy));
                return;
            }
        }
    }
}

/// An any-of group: one member loaded now and one that comes back.
fn plan_any_of<'a>(
    planner: &mut Planner,
    group: &GroupCheck,
    of: &dyn Fn(&ModuleName) -> &'a Persistence,
    report: &Report,
) {
    let members = &group.modules;
    let satisfied = members.iter().find(|m| m.state.satisfies());
    let loadable = || {
        members
            .iter()
            .find(|m| m.state == ModuleState::Available && load_blocks(of(&m.name)).is_empty())
    };
    let chosen = match satisfied {
        Some(module) => Some(module),
        None => {
            let chosen = loadable();
            if let Some(module) = chosen {
                planner.load(&module.name);
            }
            chosen
        }
    };
    if members.iter().any(|m| of(&m.name).persistent) {
        return;
    }
    // Persist the member that is (or is being) loaded, else the first
    // whose line would work.
    let persistable = |m: &&ModuleCheck| {
        m.state != ModuleState::Missing && persist_blocks(of(&m.name)).is_empty()
    };
    let target = chosen
        .filter(persistable)
        .or_else(|| members.iter().find(persistable));
    match target {
        Some(module) => planner.persist(&module.name),
        None => {
            let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
            let reasons: Vec<String> = members
                .iter()
                .map(|m| {
                    let blocks = persist_blocks(of(&m.name));
                    if blocks.is_empty() {
                        format!("{}: {}", m.name, m.state)
                    } else {
                        format!("{}: {}", m.name, joined(&blocks))
                    }
                })
                .collect();
            // Config validation guarantees a group has a module. The steps
            // are those of the member that is loaded, else the first.
            let Some(first) = chosen.or_else(|| members.first()) else {
                return;
            };
            planner.cannot(
                &first.name,
                format!(
                    "no member of group {} ({}) can be made persistent in kernel {}: {}",
                    group.name,
                    names.join(" | "),
                    report.kernel_release,
                    reasons.join("; ")
                ),
                first.remedy.as_ref(),
            );
        }
    }
}

/// Carries out `plan` on `host`: runs `modprobe <m>` through `runner` for
/// each module to load (a failure is recorded and the rest go on), then
/// writes kmod-monitor's modules-load file atomically, mode 0644.
///
/// With a host root other than `/`, `runner` decides how modprobe reaches
/// the host (e.g. `chroot /host modprobe ...`); it gets
/// `["modprobe", module]`.
///
/// # Errors
/// [`FixError::Changed`] if the file is no longer what the plan saw (the
/// modprobe commands have run by then), [`FixError::Write`] if it cannot be
/// written.
pub fn apply(
    plan: &FixPlan,
    host: &HostRoot,
    runner: &dyn Fn(&[&str]) -> io::Result<ExitStatus>,
) -> Result<FixReport, FixError> {
    let mut report = FixReport {
        cannot_fix: plan.cannot_fix.clone(),
        ..FixReport::default()
    };
    for name in &plan.load {
        let (program, module) = ("modprobe", name.as_str());
        let name = name.clone();
        match runner(&[program, module]) {
            Ok(status) if status.success() => report.loaded.push(name),
            Ok(status) => report.failed.push(LoadFailure {
                module: name,
                problem: format!("{program} {status}"),
            }),
            Err(e) => report.failed.push(LoadFailure {
                module: name,
                problem: format!("cannot run {program}: {e}"),
            }),
        }
    }
    let Some(change) = &plan.persist else {
        return Ok(report);
    };
    // The plan's path is the host's; a different host root is a caller bug
    // we refuse rather than write to the wrong tree.
    let file = InRoot::new(host, &host.kmod_monitor_modules_load())?;
    if file.path != change.path {
        return Err(FixError::Changed { path: file.path });
    }
    if file.read()? != change.previous {
        return Err(FixError::Changed { path: file.path });
    }
    file.write_atomic(&render_managed(&change.modules))?;
    report.wrote = Some(file.path);
    report.persisted.clone_from(&change.added);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::fs;
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;
    use crate::check::evaluate;
    use crate::host::take_snapshot;
    use crate::requirements::GroupSpec;
    use crate::testing::{DEBIAN_6_1 as REL, FakeHost, name};
    use crate::tracker::Tracker;

    const DEP_6_1: &str = include_str!("host/fixtures/modules.dep.debian-6.1");
    const BUILTIN_6_1: &str = include_str!("host/fixtures/modules.builtin.debian-6.1");
    const PROC_MODULES_6_1: &str = include_str!("host/fixtures/proc_modules.debian-6.1");
    const ETC_MODULES_DEBIAN: &str =
        include_str!("host/fixtures/persistence/etc-modules.debian-12");
    const CIS_NODE: &str =
        include_str!("host/fixtures/persistence/modprobe.d-cis-hardening.conf.node");

    /// A Debian 12 node (kernel 6.1, stock /etc/modules and its link) whose
    /// /proc/modules is the real one minus `unloaded`.
    struct Node {
        fake: FakeHost,
    }

    impl Node {
        fn new(unloaded: &[&str]) -> Self {
            let fake = FakeHost::with_release(REL);
            fake.write(format!("lib/modules/{REL}/modules.dep"), DEP_6_1)
                .write(format!("lib/modules/{REL}/modules.builtin"), BUILTIN_6_1)
                .write("etc/modules", ETC_MODULES_DEBIAN)
                .link("../modules", "etc/modules-load.d/modules.conf");
            let proc_modules: String = PROC_MODULES_6_1
                .lines()
                .filter(|l| !unloaded.contains(&l.split(' ').next().unwrap_or("")))
                .map(|l| format!("{l}\n"))
                .collect();
            fake.write("proc/modules", &proc_modules);
            Self { fake }
        }

        fn write(&self, rel: &str, content: &str) {
            self.fake.write(rel, content);
        }

        /// `rel` under the root, its parent directory created.
        fn path(&self, rel: &str) -> PathBuf {
            let path = self.fake.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            path
        }

        fn root(&self) -> HostRoot {
            self.fake.root()
        }

        /// `check` and the persistence of every required module, as the
        /// CLI will compute them.
        fn plan(&self, groups: Vec<GroupSpec>) -> Result<FixPlan, FixError> {
            let root = self.root();
            let snapshot = take_snapshot(&root).unwrap();
            let tracker = Tracker::new(&snapshot, groups);
            let boot = crate::remedy::boot_facts(&root, &snapshot, tracker.groups());
            let report = evaluate(&snapshot, &tracker, &boot, &root);
            let persistence: BTreeMap<ModuleName, Persistence> = boot.persistence;
            plan(&report, &persistence, &root)
        }

        /// A runner that "loads" a module by adding it to /proc/modules,
        /// recording each command.
        fn runner<'a>(
            &'a self,
            calls: &'a RefCell<Vec<String>>,
        ) -> impl Fn(&[&str]) -> io::Result<ExitStatus> + 'a {
            move |argv: &[&str]| {
                calls.borrow_mut().push(argv.join(" "));
                let path = self.path("proc/modules");
                let mut text = fs::read_to_string(&path)?;
                text.push_str(&format!("{} 16384 0 - Live 0x0000000000000000\n", argv[1]));
                fs::write(&path, text)?;
                Ok(ExitStatus::from_raw(0))
            }
        }
    }

    fn v2() -> Vec<GroupSpec> {
        crate::requirements::resolve(&crate::requirements::GroupSettings::default(), true)
    }

    #[test]
    fn plan_loads_what_is_available_and_persists_every_required_module() {
        // The real 6.1 guest had dm_crypt, nvme_tcp and vfio_pci loaded by
        // hand: all three are lost at the next boot; uio_pci_generic is not
        // loaded at all.
        let node = Node::new(&["dm_crypt"]);
        let plan = node.plan(v2()).unwrap();
        assert_eq!(plan.load, [name("dm_crypt"), name("uio_pci_generic")]);
        let change = plan.persist.as_ref().unwrap();
        assert_eq!(
            change.path.host_path,
            node.path("etc/modules-load.d/kmod-monitor.conf")
        );
        assert_eq!(
            change.path.path,
            Path::new("/etc/modules-load.d/kmod-monitor.conf"),
            "shown as the node names it"
        );
        let all = [
            name("dm_crypt"),
            name("vfio_pci"),
            name("uio_pci_generic"),
            name("nvme_tcp"),
        ];
        assert_eq!(change.added, all);
        assert_eq!(change.modules, all);
        assert_eq!(plan.cannot_fix, []);
        assert_eq!(
            plan.to_string(),
            "run:    modprobe dm_crypt\nrun:    modprobe uio_pci_generic\nwrite:  create \
             /etc/modules-load.d/kmod-monitor.conf: dm_crypt vfio_pci uio_pci_generic nvme_tcp\n"
        );
        // Planning wrote nothing.
        assert!(!change.path.host_path.exists());
    }

    #[test]
    fn apply_twice_the_second_run_changes_nothing() {
        let node = Node::new(&["dm_crypt", "nvme_tcp"]);
        let calls = RefCell::new(Vec::new());
        let first = node.plan(v2()).unwrap();
        let report = apply(&first, &node.root(), &node.runner(&calls)).unwrap();
        assert!(report.ok());
        assert_eq!(
            calls.borrow().as_slice(),
            [
                "modprobe dm_crypt",
                "modprobe uio_pci_generic",
                "modprobe nvme_tcp"
            ]
        );
        let path = node.path("etc/modules-load.d/kmod-monitor.conf");
        assert_eq!(
            report.wrote.as_ref().map(|w| w.host_path.as_path()),
            Some(path.as_path())
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(&format!("{MANAGED_HEADER}\n")), "{text}");
        assert!(
            text.ends_with("\ndm_crypt\nvfio_pci\nuio_pci_generic\nnvme_tcp\n"),
            "{text}"
        );
        let mode = fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o644
        );
        // No temporary file left beside it.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        let second = node.plan(v2()).unwrap();
        assert!(second.is_empty(), "{second:?}");
        assert_eq!(
            second.to_string(),
            "Nothing to do: every module that can be fixed is loaded and persistent.\n"
        );
        let report = apply(&second, &node.root(), &node.runner(&calls)).unwrap();
        assert_eq!(report, FixReport::default());
        assert_eq!(calls.borrow().len(), 3);
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn a_file_kmod_monitor_did_not_write_is_refused() {
        let node = Node::new(&[]);
        let path = node.path("etc/modules-load.d/kmod-monitor.conf");
        fs::write(&path, "# my own list\ndm_crypt\n").unwrap();
        let err = node.plan(v2()).unwrap_err();
        assert!(matches!(err, FixError::ForeignFile { is_link: false, .. }));
        // The node's path: the operator edits /etc/..., not the host root.
        assert_eq!(
            err.to_string(),
            "/etc/modules-load.d/kmod-monitor.conf: not written by kmod-monitor (its first line \
             is not \"# Managed by kmod-monitor\"); refusing to change it. Add the modules to it \
             by hand, or move it away and run `check --fix` again"
        );
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "# my own list\ndm_crypt\n"
        );

        // A link, even to a file of ours, is not followed.
        fs::remove_file(&path).unwrap();
        node.write("srv/ours.conf", &render_managed(&[name("dm_crypt")]));
        std::os::unix::fs::symlink(node.path("srv/ours.conf"), &path).unwrap();
        assert!(matches!(
            node.plan(v2()).unwrap_err(),
            FixError::ForeignFile { is_link: true, .. }
        ));
    }

    #[test]
    fn a_link_planted_beside_the_file_is_never_followed() {
        let node = Node::new(&[]);
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("passwd");
        fs::write(&victim, "root:x:0:0::/root:/bin/sh\n").unwrap();
        // Where a temporary file with a fixed name used to be opened, and a
        // guess at the new pattern: neither is ever opened.
        let dir = node.path("etc/modules-load.d/x");
        let dir = dir.parent().unwrap();
        for planted in [
            "kmod-monitor.conf.kmod-monitor-tmp",
            "kmod-monitor.conf.0000000000000000.tmp",
        ] {
            std::os::unix::fs::symlink(&victim, dir.join(planted)).unwrap();
        }
        let plan = node.plan(v2()).unwrap();
        let calls = RefCell::new(Vec::new());
        let report = apply(&plan, &node.root(), &node.runner(&calls)).unwrap();
        let path = node.path("etc/modules-load.d/kmod-monitor.conf");
        assert_eq!(
            report.wrote.as_ref().map(|w| w.host_path.as_path()),
            Some(path.as_path())
        );
        assert_eq!(
            fs::read_to_string(&victim).unwrap(),
            "root:x:0:0::/root:/bin/sh\n"
        );
        assert!(!fs::symlink_metadata(&path).unwrap().is_symlink());
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "kmod-monitor.conf",
                "kmod-monitor.conf.0000000000000000.tmp",
                "kmod-monitor.conf.kmod-monitor-tmp",
                "modules.conf"
            ],
            "no temporary file left, the planted links untouched"
        );
    }

    #[test]
    fn the_temporary_file_is_new_and_random() {
        let dir = tempfile::tempdir().unwrap();
        let fd = rustix::fs::open(
            dir.path(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        let (a, _) = create_temporary(&fd, OsStr::new("kmod-monitor.conf")).unwrap();
        let (b, _) = create_temporary(&fd, OsStr::new("kmod-monitor.conf")).unwrap();
        assert_ne!(a, b);
        for name in [&a, &b] {
            let name = name.to_str().unwrap();
            let random = name
                .strip_prefix("kmod-monitor.conf.")
                .and_then(|r| r.strip_suffix(".tmp"))
                .unwrap_or_else(|| panic!("{name}"));
            assert!(
                random.len() == 16 && random.bytes().all(|b| b.is_ascii_hexdigit()),
                "{name}"
            );
            assert!(!name.ends_with(".conf"), "systemd must not read it");
        }
    }

    #[test]
    fn an_absolute_link_under_the_host_root_is_the_hosts_path() {
        let node = Node::new(&[]);
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("modules-load.d");
        fs::create_dir(&target).unwrap();
        // etc/modules-load.d holds the stock modules.conf link: replace the
        // directory with an absolute link, as some distributions ship it.
        fs::remove_dir_all(node.path("etc/modules-load.d/x").parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&target, node.path("etc/modules-load.d")).unwrap();
        // The host's directory it names, under the root.
        let inside = node.path(
            target
                .join("kmod-monitor.conf")
                .strip_prefix("/")
                .unwrap()
                .to_str()
                .unwrap(),
        );
        let plan = node.plan(v2()).unwrap();
        let calls = RefCell::new(Vec::new());
        apply(&plan, &node.root(), &node.runner(&calls)).unwrap();
        assert_eq!(fs::read_dir(&target).unwrap().count(), 0, "nothing outside");
        assert!(
            fs::read_to_string(&inside)
                .unwrap()
                .starts_with(MANAGED_HEADER),
            "written to the host's {}",
            inside.display()
        );
        // And read back from there: the second run has nothing to add.
        let second = node.plan(v2()).unwrap();
        assert!(second.persist.is_none(), "{second:?}");
    }

    #[test]
    fn an_edited_file_of_ours_is_kept_and_extended_or_refused() {
        let node = Node::new(&[]);
        let path = node.path("etc/modules-load.d/kmod-monitor.conf");
        fs::write(
            &path,
            format!("{}# added by ops\nnvme-tcp\n", render_managed(&[])),
        )
        .unwrap();
        let plan = node.plan(v2()).unwrap();
        let change = plan.persist.unwrap();
        assert_eq!(
            change.added,
            [name("dm_crypt"), name("vfio_pci"), name("uio_pci_generic")]
        );
        assert_eq!(change.modules[0], name("nvme_tcp"));

        fs::write(&path, format!("{}dm_crypt foo=1\n", render_managed(&[]))).unwrap();
        let err = node.plan(v2()).unwrap_err().to_string();
        assert_eq!(
            err,
            "/etc/modules-load.d/kmod-monitor.conf line 5: \"dm_crypt foo=1\" is not a module \
             name; fix or remove the line and run `check --fix` again"
        );
    }

    #[test]
    fn a_file_changed_after_planning_is_not_overwritten() {
        let node = Node::new(&[]);
        let plan = node.plan(v2()).unwrap();
        let path = node.path("etc/modules-load.d/kmod-monitor.conf");
        fs::write(&path, "dm_crypt\n").unwrap();
        let calls = RefCell::new(Vec::new());
        let err = apply(&plan, &node.root(), &node.runner(&calls)).unwrap_err();
        assert!(matches!(err, FixError::Changed { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "dm_crypt\n");
    }

    #[test]
    fn disabled_and_blacklisted_modules_are_explained_not_attempted() {
        // CIS hardening: `install dm_crypt /bin/false`, and
        // `blacklist uio_pci_generic`.
        let node = Node::new(&["dm_crypt"]);
        node.write("etc/modprobe.d/cis-hardening.conf", CIS_NODE);
        let plan = node.plan(v2()).unwrap();
        // modprobe by name ignores a blacklist, so uio_pci_generic is still
        // loaded now...
        assert_eq!(plan.load, [name("uio_pci_generic")]);
        // ...but a modules-load.d line would not bring it back.
        assert_eq!(
            plan.persist.as_ref().unwrap().added,
            [name("vfio_pci"), name("nvme_tcp")]
        );
        let root = node.root();
        let cis = root.locate(&node.path("etc/modprobe.d/cis-hardening.conf"));
        let conf = root.locate(&node.path("etc/modules-load.d/kmod-monitor.conf"));
        let delete = |first: usize, last: usize, text: &str| Step::DeleteLines {
            file: cis.clone(),
            copy_from: None,
            lines: vec![crate::remedy::LineSpan {
                first,
                last,
                text: text.to_owned(),
            }],
        };
        let append = |module: &str| Step::AppendLine {
            file: conf.clone(),
            line: module.to_owned(),
        };
        assert_eq!(
            plan.cannot_fix,
            [
                // Nothing to run first: modprobe would run /bin/false.
                Unfixable {
                    module: name("dm_crypt"),
                    reason: "dm_crypt is available for kernel 6.1.0-56-amd64 but not loaded; \
                             modprobe cannot load it: disabled by `install ... /bin/false` in \
                             /etc/modprobe.d/cis-hardening.conf line 13 (modprobe runs the \
                             command instead of loading it); nothing loads dm_crypt at boot"
                        .to_owned(),
                    steps: vec![
                        delete(13, 13, "install dm_crypt /bin/false"),
                        Step::Run {
                            command: "modprobe dm_crypt".to_owned()
                        },
                        append("dm_crypt"),
                    ],
                    boot_source: None,
                },
                // modprobe is planned; the line only after the blacklist
                // (two lines, continued) is gone.
                Unfixable {
                    module: name("uio_pci_generic"),
                    reason: "uio_pci_generic is available for kernel 6.1.0-56-amd64 but not \
                             loaded; nothing loads uio_pci_generic at boot, and a modules-load.d \
                             line would not: blacklisted in /etc/modprobe.d/cis-hardening.conf \
                             line 16 (systemd-modules-load skips blacklisted modules)"
                        .to_owned(),
                    steps: vec![
                        delete(16, 17, "blacklist uio_pci_generic"),
                        append("uio_pci_generic"),
                    ],
                    boot_source: None,
                },
            ]
        );
        let text = plan.to_string();
        assert!(
            text.contains(
                "cannot: uio_pci_generic: uio_pci_generic is available for kernel \
                 6.1.0-56-amd64 but not loaded; nothing loads uio_pci_generic at boot, and a \
                 modules-load.d line would not: blacklisted in \
                 /etc/modprobe.d/cis-hardening.conf line 16 (systemd-modules-load skips \
                 blacklisted modules)\n        to do by hand (check --fix edits no file but its \
                 own):\n        1. in /etc/modprobe.d/cis-hardening.conf, delete lines 16-17 \
                 (`blacklist uio_pci_generic`)\n        2. echo uio_pci_generic >> \
                 /etc/modules-load.d/kmod-monitor.conf   (check --fix does this)\n"
            ),
            "{text}"
        );
        assert!(
            !text.contains(&node.path("").display().to_string()),
            "{text}"
        );

        // Applying it leaves the two to a person: not ok (exit 1).
        let calls = RefCell::new(Vec::new());
        let report = apply(&plan, &root, &node.runner(&calls)).unwrap();
        assert_eq!(report.cannot_fix, plan.cannot_fix);
        assert!(!report.ok());
        assert_eq!(
            fs::read_to_string(node.path("etc/modprobe.d/cis-hardening.conf")).unwrap(),
            CIS_NODE,
            "never edited"
        );
    }

    #[test]
    fn any_of_group_gets_one_member() {
        let spdk = GroupSpec {
            name: "spdk-driver".to_owned(),
            mode: GroupMode::AnyOf,
            modules: vec![name("uio_pci_generic"), name("vfio_pci")],
            severity: "warning".to_owned(),
            builtin: false,
        };
        // Neither loaded: the first one that can be loaded is loaded and
        // persisted, the other left alone.
        let node = Node::new(&["vfio_pci"]);
        let plan = node.plan(vec![spdk.clone()]).unwrap();
        assert_eq!(plan.load, [name("uio_pci_generic")]);
        assert_eq!(plan.persist.unwrap().added, [name("uio_pci_generic")]);

        // vfio_pci loaded by hand: it is the one persisted.
        let node = Node::new(&[]);
        let plan = node.plan(vec![spdk.clone()]).unwrap();
        assert_eq!(plan.load, []);
        assert_eq!(plan.persist.unwrap().added, [name("vfio_pci")]);

        // uio_pci_generic comes back after a reboot: nothing to do, even
        // though only vfio_pci is loaded now.
        node.write("etc/modules-load.d/spdk.conf", "uio_pci_generic\n");
        assert!(node.plan(vec![spdk]).unwrap().is_empty());
    }

    #[test]
    fn a_module_the_kernel_lacks_is_left_to_the_kernel_remedy() {
        let node = Node::new(&["nvme_tcp"]);
        let dep = fs::read_to_string(node.path(&format!("lib/modules/{REL}/modules.dep"))).unwrap();
        let dep: String = dep
            .lines()
            .filter(|l| !l.starts_with("kernel/drivers/nvme/host/nvme-tcp.ko:"))
            .map(|l| format!("{l}\n"))
            .collect();
        node.write(&format!("lib/modules/{REL}/modules.dep"), &dep);
        let plan = node.plan(v2()).unwrap();
        assert!(!plan.load.contains(&name("nvme_tcp")));
        assert!(!plan.persist.unwrap().added.contains(&name("nvme_tcp")));
        assert_eq!(plan.cannot_fix.len(), 1);
        assert_eq!(plan.cannot_fix[0].module, name("nvme_tcp"));
        assert!(
            matches!(
                plan.cannot_fix[0].steps.as_slice(),
                [Step::Kernel { config_option, .. }] if config_option == "CONFIG_NVME_TCP"
            ),
            "{:?}",
            plan.cannot_fix[0]
        );
    }

    #[test]
    fn a_failed_modprobe_is_reported_and_the_rest_goes_on() {
        let node = Node::new(&["dm_crypt", "nvme_tcp"]);
        let plan = node.plan(v2()).unwrap();
        let runner = |argv: &[&str]| -> io::Result<ExitStatus> {
            if argv[1] == "dm_crypt" {
                Ok(ExitStatus::from_raw(1 << 8))
            } else if argv[1] == "nvme_tcp" {
                Err(io::Error::from(io::ErrorKind::NotFound))
            } else {
                Ok(ExitStatus::from_raw(0))
            }
        };
        let report = apply(&plan, &node.root(), &runner).unwrap();
        assert!(!report.ok());
        assert_eq!(report.loaded, [name("uio_pci_generic")]);
        assert_eq!(
            report.failed,
            [
                LoadFailure {
                    module: name("dm_crypt"),
                    problem: "modprobe exit status: 1".to_owned()
                },
                LoadFailure {
                    module: name("nvme_tcp"),
                    problem: "cannot run modprobe: entity not found".to_owned()
                },
            ]
        );
        assert!(report.wrote.is_some());
        assert!(
            report
                .to_string()
                .contains("FAILED:  modprobe dm_crypt: modprobe exit status: 1")
        );
    }
}
