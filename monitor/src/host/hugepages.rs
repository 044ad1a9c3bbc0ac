//! The host's 2 MiB hugepage pool, from /sys/kernel/mm/hugepages and
//! /proc/meminfo.
//!
//! Longhorn's V2 data engine (SPDK) needs 2 MiB hugepages. /proc/meminfo's
//! `HugePages_*` lines describe only the *default* page size: on a host
//! booted with `default_hugepagesz=1G` they count 1 GiB pages, and the 2 MiB
//! pool is visible only in sysfs. So sysfs
//! (`hugepages-2048kB/{nr,free,resv,surplus}_hugepages`) is read first, and
//! /proc/meminfo only when sysfs has no hugepages directory at all (an old or
//! odd mount) and its `Hugepagesize` is 2048 kB.
use std::path::Path;

use serde::Serialize;

use super::{HostError, HostRoot, read_optional_text};

/// The 2 MiB pool, in pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Hugepages2Mi {
    /// Pages in the pool (`nr_hugepages`, `HugePages_Total`; includes
    /// surplus pages).
    pub total: u64,
    /// Pages not yet given to any mapping (`free_hugepages`).
    pub free: u64,
    /// Free pages promised to mappings that have not touched them yet
    /// (`resv_hugepages`): free, but not available to a new user.
    pub reserved: u64,
    /// Pages above `nr_hugepages` allocated by overcommit.
    pub surplus: u64,
    /// Where the numbers came from: `sysfs`, `meminfo`, or `none` when the
    /// kernel offers no 2 MiB pages (no hugetlbfs, or another base page
    /// size).
    pub source: &'static str,
}

/// The sysfs directory of the 2 MiB pool, under the host root.
const SYSFS_DIR: &str = "sys/kernel/mm/hugepages";
const SYSFS_2MI: &str = "hugepages-2048kB";

/// Reads the 2 MiB pool.
///
/// # Errors
/// [`HostError`] naming the file when a file exists but cannot be read or
/// does not hold a number.
pub fn read_hugepages_2mi(root: &HostRoot) -> Result<Hugepages2Mi, HostError> {
    let sysfs = root.root().join(SYSFS_DIR);
    if sysfs.is_dir() {
        let dir = sysfs.join(SYSFS_2MI);
        if !dir.is_dir() {
            return Ok(Hugepages2Mi {
                source: "none",
                ..Hugepages2Mi::default()
            });
        }
        return Ok(Hugepages2Mi {
            total: read_count(&dir.join("nr_hugepages"))?,
            free: read_count(&dir.join("free_hugepages"))?,
            reserved: read_count(&dir.join("resv_hugepages"))?,
            surplus: read_count(&dir.join("surplus_hugepages"))?,
            source: "sysfs",
        });
    }
    let path = root.root().join("proc/meminfo");
    let Some(text) = read_optional_text(&path)? else {
        return Ok(Hugepages2Mi {
            source: "none",
            ..Hugepages2Mi::default()
        });
    };
    parse_meminfo(&text).map_err(|problem| HostError::Invalid { path, problem })
}

/// The 2 MiB pool from /proc/meminfo, if its default page size is 2 MiB.
///
/// # Errors
/// A line `parse_meminfo` needs that is not `<key>: <number>[ kB]`.
pub fn parse_meminfo(text: &str) -> Result<Hugepages2Mi, String> {
    let mut size_kb = None;
    let mut pool = Hugepages2Mi {
        source: "meminfo",
        ..Hugepages2Mi::default()
    };
    for (n, line) in text.lines().enumerate() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let slot = match key.trim() {
            "Hugepagesize" => None,
            "HugePages_Total" => Some(&mut pool.total),
            "HugePages_Free" => Some(&mut pool.free),
            "HugePages_Rsvd" => Some(&mut pool.reserved),
            "HugePages_Surp" => Some(&mut pool.surplus),
            _ => continue,
        };
        let number = rest.trim().trim_end_matches("kB").trim();
        let value: u64 = number
            .parse()
            .map_err(|_| format!("line {}: {:?} is not a number", n + 1, rest.trim()))?;
        match slot {
            Some(slot) => *slot = value,
            None => size_kb = Some(value),
        }
    }
    match size_kb {
        Some(2048) => Ok(pool),
        // No hugetlbfs, or a default size that is not 2 MiB (and no sysfs
        // to ask about 2 MiB pages).
        _ => Ok(Hugepages2Mi {
            source: "none",
            ..Hugepages2Mi::default()
        }),
    }
}

fn read_count(path: &Path) -> Result<u64, HostError> {
    let Some(text) = read_optional_text(path)? else {
        return Err(HostError::Invalid {
            path: path.to_path_buf(),
            problem: "does not exist".to_owned(),
        });
    };
    text.trim().parse().map_err(|_| HostError::Invalid {
        path: path.to_path_buf(),
        problem: format!("{:?} is not a page count", text.trim()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(case: &str) -> HostRoot {
        HostRoot::new(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("src/host/fixtures/hugepages")
                .join(case),
        )
    }

    fn read(case: &str) -> Hugepages2Mi {
        read_hugepages_2mi(&fixture(case)).unwrap()
    }

    #[test]
    fn no_pages_configured() {
        let p = read("none");
        assert_eq!((p.total, p.free, p.reserved, p.source), (0, 0, 0, "sysfs"));
    }

    #[test]
    fn the_longhorn_default_of_1024() {
        for case in ["two-mi-1024", "two-mi-1024-6.1"] {
            let p = read(case);
            assert_eq!((p.total, p.free, p.source), (1024, 1024, "sysfs"), "{case}");
        }
    }

    #[test]
    fn fewer_than_needed() {
        let p = read("two-mi-fewer");
        assert_eq!((p.total, p.free), (512, 512));
    }

    #[test]
    fn reserved_pages_are_free_but_promised() {
        let p = read("two-mi-reserved");
        assert!(p.reserved > 0, "{p:?}");
        assert!(p.free < p.total, "{p:?}");
        assert!(p.reserved <= p.free, "{p:?}");
    }

    #[test]
    fn with_1gi_default_pages_the_2mi_pool_comes_from_sysfs() {
        let root = fixture("one-gi");
        let meminfo = std::fs::read_to_string(root.root().join("proc/meminfo")).unwrap();
        // meminfo speaks of the 1 GiB pool only ...
        assert!(meminfo.contains("Hugepagesize:    1048576 kB"), "{meminfo}");
        assert_eq!(parse_meminfo(&meminfo).unwrap().source, "none");
        // ... so the 2 MiB numbers are sysfs's.
        let p = read_hugepages_2mi(&root).unwrap();
        assert_eq!((p.total, p.source), (16, "sysfs"));
    }

    #[test]
    fn a_short_1gi_allocation_does_not_touch_the_2mi_count() {
        // The guest asked for two 1 GiB pages and got one (QEMU's 4 GiB
        // memory map); meminfo says 1, the 2 MiB pool is still 16.
        let root = fixture("one-gi-partial");
        let meminfo = std::fs::read_to_string(root.root().join("proc/meminfo")).unwrap();
        assert!(meminfo.contains("HugePages_Total:       1\n"), "{meminfo}");
        let p = read_hugepages_2mi(&root).unwrap();
        assert_eq!((p.total, p.free, p.source), (16, 16, "sysfs"));
    }

    #[test]
    fn meminfo_alone_when_sysfs_is_absent() {
        let text = std::fs::read_to_string(fixture("two-mi-reserved").root().join("proc/meminfo"))
            .unwrap();
        let p = parse_meminfo(&text).unwrap();
        assert_eq!(p.source, "meminfo");
        assert_eq!(
            p,
            Hugepages2Mi {
                source: "meminfo",
                ..read("two-mi-reserved")
            }
        );
    }

    #[test]
    fn garbage_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("sys/kernel/mm/hugepages/hugepages-2048kB");
        std::fs::create_dir_all(&d).unwrap();
        for f in [
            "nr_hugepages",
            "free_hugepages",
            "resv_hugepages",
            "surplus_hugepages",
        ] {
            std::fs::write(d.join(f), "0\n").unwrap();
        }
        std::fs::write(d.join("free_hugepages"), "lots\n").unwrap();
        let e = read_hugepages_2mi(&HostRoot::new(dir.path())).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("free_hugepages") && msg.contains("\"lots\" is not a page count"),
            "{msg}"
        );
        assert!(
            parse_meminfo("HugePages_Total: many\n")
                .unwrap_err()
                .contains("line 1")
        );
    }

    #[test]
    fn no_hugetlb_at_all() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::write(dir.path().join("proc/meminfo"), "MemTotal: 1000 kB\n").unwrap();
        assert_eq!(
            read_hugepages_2mi(&HostRoot::new(dir.path()))
                .unwrap()
                .source,
            "none"
        );
    }
}
