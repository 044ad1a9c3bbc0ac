//! The initramfs archive: "newc" cpio, the format the kernel unpacks
//! (Documentation/driver-api/early-userspace/buffer-format.rst), written
//! with the `cpio` crate. Entries go in order, so parents must come before
//! their children; all are owned by root with mtime 0, which keeps
//! archives reproducible.
use std::io::{self, Write};

use cpio::newc::Builder;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams cpio entries into `W`.
pub struct Writer<W: Write> {
    out: Option<W>,
    next_ino: u32,
}

impl<W: Write> Writer<W> {
    /// A writer with nothing written yet.
    pub const fn new(out: W) -> Self {
        Self {
            out: Some(out),
            next_ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: {} bytes do not fit a cpio header", data.len()),
            )
        })?;
        let out = self
            .out
            .take()
            .ok_or_else(|| io::Error::other("cpio writer used after an error"))?;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let mut entry = Builder::new(name)
            .ino(self.next_ino)
            .mode(mode)
            .uid(0)
            .gid(0)
            .nlink(nlink)
            .mtime(0)
            .rdev_major(rdev.0)
            .rdev_minor(rdev.1)
            .write(out, size);
        self.next_ino += 1;
        entry.write_all(data)?;
        self.out = Some(entry.finish()?);
        Ok(())
    }

    /// A directory with permission bits `perm`.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | perm, (0, 0), &[])
    }

    /// A regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, (major, minor), &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        let out = self
            .out
            .take()
            .ok_or_else(|| io::Error::other("cpio writer used after an error"))?;
        let mut out = cpio::newc::trailer(out)?;
        out.flush()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::Writer;

    #[test]
    fn entries_are_newc_and_four_byte_aligned() -> std::io::Result<()> {
        let mut w = Writer::new(Vec::new());
        w.dir("bin", 0o755)?;
        w.file("bin/x", 0o644, b"hello")?;
        w.symlink("sh", "/bin/busybox")?;
        let out = w.finish()?;

        // First header: magic, ino 1, directory mode, nlink 2, name "bin".
        assert_eq!(&out[..6], b"070701");
        assert_eq!(&out[6..14], b"00000001");
        assert_eq!(&out[14..22], b"000041ed");
        assert_eq!(&out[38..46], b"00000002");
        assert_eq!(&out[94..102], b"00000004", "namesize counts the NUL");
        assert_eq!(&out[110..114], b"bin\0");
        // 110 + 4 = 114 -> padded to 116: the next header starts there.
        assert_eq!(&out[116..122], b"070701");
        // Its data follows the padded name: 116 + 110 + "bin/x\0" = 232.
        assert_eq!(&out[232..237], b"hello");
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("sh\0"));
        assert!(text.contains("/bin/busybox"));
        assert!(text.contains("TRAILER!!!\0"));
        Ok(())
    }

    #[test]
    fn gnu_cpio_reads_the_archive() -> std::io::Result<()> {
        use std::{
            io::Write as _,
            process::{Command, Stdio},
        };
        let mut w = Writer::new(Vec::new());
        w.dir("lib", 0o755)?;
        w.dir("lib/modules", 0o755)?;
        w.file("lib/modules/modules.dep", 0o644, b"kernel/a.ko:\n")?;
        w.symlink("sh", "/bin/busybox")?;
        w.char_dev("console", 0o600, 5, 1)?;
        let archive = w.finish()?;

        // cpio is one of the packages `cargo xtask setup` installs.
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                std::io::Error::other(format!("cannot run cpio (run `cargo xtask setup`): {e}"))
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&archive)?;
        }
        let out = child.wait_with_output()?;
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "cpio -t failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 5, "{listing}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" lib"),
            "{listing}"
        );
        assert!(
            lines[2].starts_with("-rw-r--r--") && lines[2].ends_with(" lib/modules/modules.dep"),
            "{listing}"
        );
        assert!(
            lines[3].starts_with("lrwxrwxrwx") && lines[3].ends_with(" sh -> /bin/busybox"),
            "{listing}"
        );
        assert!(lines[4].starts_with("crw-------"), "{listing}");
        Ok(())
    }
}
