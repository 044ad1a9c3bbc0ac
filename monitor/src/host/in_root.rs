//! Directories under the host root, resolved the way the host itself would
//! resolve them: `..` never climbs above the root, and a symbolic link with
//! an absolute target (`etc/modules-load.d -> /usr/lib/modules-load.d`)
//! means that path *on the host*, under the root, never the same path in
//! the container kmod-monitor runs in. `check --fix`, the one command that
//! writes to the host, opens its directory through this.
//!
//! Linux 5.6 and later do this in the kernel: `openat2(2)` with
//! `RESOLVE_IN_ROOT`. Where openat2 is missing (ENOSYS: an older kernel) or
//! refused (EPERM: a seccomp profile that predates it), [`RootDir`] walks the
//! path itself, one component at a time: each is opened with `O_NOFOLLOW`,
//! a link is read with `readlinkat` and its target walked in its place (an
//! absolute target from the root), and `..` pops the walk's own stack of
//! open directories, so it cannot leave the root either.
use std::{
    cell::Cell,
    collections::VecDeque,
    ffi::OsString,
    io,
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::ffi::OsStringExt as _,
    },
    path::{Component, Path, PathBuf},
};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

/// The most links one resolution follows, as the kernel (`MAXSYMLINKS`).
const MAX_LINKS: usize = 40;
/// How often a resolution is retried when a concurrent rename made the
/// kernel give up (EAGAIN from `RESOLVE_IN_ROOT`).
const RETRIES: usize = 8;

/// The host root, open, for resolving directories inside it.
pub struct RootDir {
    fd: OwnedFd,
    /// Whether to try openat2 (cleared once it proved unavailable).
    openat2: Cell<bool>,
}

/// One step of a walk.
enum Step {
    /// `..`: back to the parent, never above the root.
    Parent,
    /// Into the entry of that name.
    Name(OsString),
}

/// The steps of `path`, read relative to the root whether or not it starts
/// with `/`.
fn steps(path: &Path) -> VecDeque<Step> {
    path.components()
        .filter_map(|c| match c {
            Component::ParentDir => Some(Step::Parent),
            Component::Normal(name) => Some(Step::Name(name.to_owned())),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

impl RootDir {
    /// Opens the root directory `root`.
    ///
    /// # Errors
    /// When it cannot be opened or is not a directory.
    pub fn open(root: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self {
            fd,
            openat2: Cell::new(true),
        })
    }

    /// The directory `rel` inside the root, opened for reading (for the
    /// `*at` calls and fsync).
    ///
    /// # Errors
    /// As opening it: ENOENT when some component does not exist, ENOTDIR
    /// when one is not a directory, ELOOP after too many links.
    pub fn open_dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        if self.openat2.get() {
            match self.openat2(rel) {
                Err(e)
                    if matches!(
                        rustix::io::Errno::from_io_error(&e),
                        Some(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM)
                    ) =>
                {
                    tracing::debug!(error = %e, "openat2 unavailable; resolving paths in the host root component by component");
                    self.openat2.set(false);
                }
                other => return other,
            }
        }
        walk(self.fd.as_fd(), rel)
    }

    /// Like [`open_dir`](Self::open_dir), creating each missing directory
    /// (mode 0755, as systemd's and kmod's are) inside the root first.
    ///
    /// # Errors
    /// As [`open_dir`](Self::open_dir), or when a directory cannot be made.
    pub fn create_dir_all(&self, rel: &Path) -> io::Result<OwnedFd> {
        match self.open_dir(rel) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return Err(io::ErrorKind::NotFound.into());
        };
        let parent = self.create_dir_all(parent)?;
        match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755)) {
            // EEXIST: made meanwhile, or a link to a directory that does not
            // exist (opening it says so).
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        self.open_dir(rel)
    }

    /// openat2 with `RESOLVE_IN_ROOT`, retried on EAGAIN.
    fn openat2(&self, rel: &Path) -> io::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let mut tries = 0;
        loop {
            match rustix::fs::openat2(
                &self.fd,
                rel,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            ) {
                Err(rustix::io::Errno::AGAIN) if tries < RETRIES => tries += 1,
                other => return other.map_err(io::Error::from),
            }
        }
    }

    /// Resolves `rel` by the walk alone, as on a kernel without openat2.
    #[cfg(test)]
    fn without_openat2(self) -> Self {
        self.openat2.set(false);
        self
    }
}

/// Resolves the directory `rel` inside `root` one component at a time (see
/// the module doc) and opens it for reading.
fn walk(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    // The directories below the root on the way, deepest last.
    let mut stack: Vec<OwnedFd> = Vec::new();
    let mut todo = steps(rel);
    let mut links = 0;
    while let Some(step) = todo.pop_front() {
        let name = match step {
            Step::Parent => {
                stack.pop();
                continue;
            }
            Step::Name(name) => name,
        };
        let dir = stack.last().map_or(root, |fd| fd.as_fd());
        let fd = rustix::fs::openat(
            dir,
            name.as_os_str(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        match FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) {
            FileType::Directory => stack.push(fd),
            FileType::Symlink => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(rustix::io::Errno::LOOP.into());
                }
                let target = rustix::fs::readlinkat(dir, name.as_os_str(), Vec::new())?;
                let target = PathBuf::from(OsString::from_vec(target.into_bytes()));
                if target.has_root() {
                    stack.clear();
                }
                let mut next = steps(&target);
                next.append(&mut todo);
                todo = next;
            }
            _ => return Err(rustix::io::Errno::NOTDIR.into()),
        }
    }
    let dir = stack.last().map_or(root, |fd| fd.as_fd());
    rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink};

    use super::*;

    /// The inode of an open directory, to compare with a path's.
    fn ino(fd: &OwnedFd) -> u64 {
        rustix::fs::fstat(fd).unwrap().st_ino
    }

    fn ino_of(path: &Path) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&fs::metadata(path).unwrap())
    }

    /// Both resolvers, for every test: the kernel's and the walk.
    fn both(root: &Path) -> [RootDir; 2] {
        [
            RootDir::open(root).unwrap(),
            RootDir::open(root).unwrap().without_openat2(),
        ]
    }

    #[test]
    fn absolute_links_and_dot_dot_stay_inside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // The same absolute path exists outside the root and inside it.
        let target = outside.path().join("modules-load.d");
        fs::create_dir_all(&target).unwrap();
        let inside = r.join(target.strip_prefix("/").unwrap());
        fs::create_dir_all(&inside).unwrap();
        fs::create_dir_all(r.join("etc")).unwrap();
        symlink(&target, r.join("etc/modules-load.d")).unwrap();
        // Relative links climbing above the root end at the root.
        symlink("../../../../..", r.join("etc/up")).unwrap();
        fs::create_dir_all(r.join("usr/lib")).unwrap();
        for dir in both(r) {
            let fd = dir.open_dir(Path::new("etc/modules-load.d")).unwrap();
            assert_eq!(ino(&fd), ino_of(&inside), "the host's directory");
            assert_ne!(ino(&fd), ino_of(&target));
            let fd = dir.open_dir(Path::new("etc/up/usr/lib")).unwrap();
            assert_eq!(ino(&fd), ino_of(&r.join("usr/lib")));
            let fd = dir.open_dir(Path::new("../../..")).unwrap();
            assert_eq!(ino(&fd), ino_of(r), "never above the root");
            let fd = dir.open_dir(Path::new("/etc")).unwrap();
            assert_eq!(ino(&fd), ino_of(&r.join("etc")), "/ is the root");
        }
    }

    #[test]
    fn files_loops_and_missing_components_are_errors() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("etc/file"), "x").unwrap();
        symlink("loop", r.join("etc/loop")).unwrap();
        symlink("/nowhere", r.join("etc/dangling")).unwrap();
        for dir in both(r) {
            let kind = |rel: &str| dir.open_dir(Path::new(rel)).unwrap_err().raw_os_error();
            assert_eq!(kind("etc/file"), Some(libc::ENOTDIR));
            assert_eq!(kind("etc/loop"), Some(libc::ELOOP));
            assert_eq!(kind("etc/missing"), Some(libc::ENOENT));
            assert_eq!(kind("etc/dangling"), Some(libc::ENOENT));
        }
    }

    #[test]
    fn missing_directories_are_made_inside_the_root() {
        for openat2 in [true, false] {
            let outside = tempfile::tempdir().unwrap();
            let root = tempfile::tempdir().unwrap();
            let r = root.path();
            let target = outside.path().join("made");
            fs::create_dir_all(r.join("etc")).unwrap();
            // A link to a directory that exists neither outside nor inside.
            symlink(&target, r.join("etc/modules-load.d")).unwrap();
            let dir = RootDir::open(r).unwrap();
            let dir = if openat2 { dir } else { dir.without_openat2() };
            let fd = dir.create_dir_all(Path::new("run/modules-load.d")).unwrap();
            assert_eq!(ino(&fd), ino_of(&r.join("run/modules-load.d")));
            // Through the link: its target is not made, inside or out (a
            // link to nothing is not a directory to write into).
            let err = dir
                .create_dir_all(Path::new("etc/modules-load.d"))
                .unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
            assert!(!target.exists());
            assert!(!r.join(target.strip_prefix("/").unwrap()).exists());
        }
    }
}
