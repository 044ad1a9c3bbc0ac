//! A writer for the "newc" cpio format the kernel unpacks as an initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst). Entries are
//! written in order, so parents must come before their children; all are
//! owned by root with mtime 0, which keeps archives reproducible.
use std::io::{self, Write};

/// Newc magic: ASCII, no checksums.
const MAGIC: &[u8; 6] = b"070701";
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams cpio entries into `W`.
pub struct Writer<W: Write> {
    out: W,
    next_ino: u32,
    offset: usize,
}

impl<W: Write> Writer<W> {
    /// A writer with nothing written yet.
    pub const fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            offset: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len();
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - self.offset % 4) % 4;
        self.put(&[0u8; 3][..pad])
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let too_big = |what| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: {what} does not fit a cpio header"),
            )
        };
        let size = u32::try_from(data.len()).map_err(|_| too_big("size"))?;
        let namesize = u32::try_from(name.len() + 1).map_err(|_| too_big("name"))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink: u32 = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.put(MAGIC)?;
        for field in fields {
            self.put(format!("{field:08x}").as_bytes())?;
        }
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()?;
        self.put(data)?;
        self.pad4()
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
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
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
