//! Who caused an event: the kernel's view of the task, enriched right after
//! the event with what `/proc/<tgid>` still shows (parent, executable,
//! command line, cgroup, and the container and pod found in the cgroup path).
//!
//! These reads happen on the daemon's event task: a handful of small procfs
//! files (a few microseconds each, no disk I/O). A process that has already
//! exited leaves them null; a pid that now belongs to another process (its
//! `comm` differs from the event's) is treated the same way.
use std::path::Path;

use super::record::ActorInfo;
use crate::{event::Actor, host::HostRoot};

/// The most of `/proc/<tgid>/cmdline` kept, in bytes.
pub const CMDLINE_MAX: usize = 4096;
/// The most read of any one /proc file.
const READ_MAX: u64 = 64 * 1024;

/// The event's actor plus what `/proc/<tgid>` shows now.
#[must_use]
pub fn enrich(host: &HostRoot, actor: &Actor) -> ActorInfo {
    let Actor {
        pid,
        tgid,
        uid,
        gid,
        comm,
        cgroup_id,
    } = actor;
    let mut info = ActorInfo {
        pid: *pid,
        tgid: *tgid,
        uid: *uid,
        gid: *gid,
        comm: comm.as_str().into(),
        cgroup_id: *cgroup_id,
        read_late: true,
        ..ActorInfo::default()
    };
    let stat = read_small(&host.proc_pid_file(*tgid, "stat"));
    let Some((stat_comm, ppid)) = stat.as_deref().and_then(parse_stat) else {
        return info;
    };
    // The pid was reused by another program: nothing read now is about the
    // event's process.
    if stat_comm != *comm {
        return info;
    }
    info.ppid = Some(ppid);
    info.exe = std::fs::read_link(host.proc_pid_file(*tgid, "exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    info.cmdline = read_small_bytes(&host.proc_pid_file(*tgid, "cmdline"))
        .map(|b| parse_cmdline(&b))
        .filter(|args| !args.is_empty());
    if let Some(text) = read_small(&host.proc_pid_file(*tgid, "cgroup")) {
        let cg = parse_cgroup(&text);
        info.cgroup = cg.path;
        info.container_id = cg.container_id;
        info.pod_uid = cg.pod_uid;
    }
    info
}

fn read_small_bytes(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).ok()?;
    let mut buf = Vec::new();
    file.take(READ_MAX).read_to_end(&mut buf).ok()?;
    Some(buf)
}

fn read_small(path: &Path) -> Option<String> {
    // Valid UTF-8 (the usual case) keeps the buffer read: no second copy.
    read_small_bytes(path).map(|b| {
        String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    })
}

/// `comm` and `ppid` from `/proc/<pid>/stat` (`pid (comm) state ppid ...`;
/// the comm may itself hold spaces and parentheses, so it ends at the last
/// `)`).
#[must_use]
pub fn parse_stat(text: &str) -> Option<(String, u32)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let mut rest = text.get(close + 1..)?.split_ascii_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, ppid))
}

/// The arguments of a NUL-separated `/proc/<pid>/cmdline`, at most
/// [`CMDLINE_MAX`] bytes of them.
#[must_use]
pub fn parse_cmdline(bytes: &[u8]) -> Vec<String> {
    let bytes = &bytes[..bytes.len().min(CMDLINE_MAX)];
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// What a cgroup path tells about its process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// The cgroup v2 path (the `0::` line), else the first v1 path that is
    /// not `/`.
    pub path: Option<String>,
    /// A 64-hex container id (containerd, CRI-O, Docker, Podman).
    pub container_id: Option<String>,
    /// A Kubernetes pod UID, with dashes.
    pub pod_uid: Option<String>,
}

/// Parses `/proc/<pid>/cgroup` (`hierarchy:controllers:path` per line).
///
/// Recognised layouts, with the systemd or the cgroupfs driver:
/// - `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<64hex>.scope`
/// - `/kubepods/burstable/pod<uid>/<64hex>` (also `/kubepods/pod<uid>/<64hex>`)
/// - `crio-<64hex>.scope`, `docker-<64hex>.scope`, `libpod-<64hex>.scope`,
///   `/docker/<64hex>`
#[must_use]
pub fn parse_cgroup(text: &str) -> CgroupInfo {
    let paths: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let hierarchy = parts.next()?;
            let _controllers = parts.next()?;
            Some((hierarchy, parts.next()?))
        })
        .collect();
    let path = paths
        .iter()
        .find(|(h, _)| *h == "0")
        .or_else(|| paths.iter().find(|(_, p)| *p != "/"))
        .map(|(_, p)| (*p).to_owned());
    let mut info = CgroupInfo {
        path,
        ..CgroupInfo::default()
    };
    // The chosen path first, then any other hierarchy's.
    let ordered = info
        .path
        .iter()
        .map(String::as_str)
        .chain(paths.iter().map(|(_, p)| *p));
    for p in ordered {
        if info.container_id.is_none() {
            info.container_id = container_id(p);
        }
        if info.pod_uid.is_none() {
            info.pod_uid = pod_uid(p);
        }
    }
    info
}

fn container_id(path: &str) -> Option<String> {
    const PREFIXES: [&str; 5] = [
        "cri-containerd-",
        "crio-",
        "docker-",
        "libpod-",
        "containerd-",
    ];
    path.split('/').rev().find_map(|comp| {
        let comp = comp.strip_suffix(".scope").unwrap_or(comp);
        let id = PREFIXES
            .iter()
            .find_map(|p| comp.strip_prefix(p))
            .unwrap_or(comp);
        is_hex(id, 64).then(|| id.to_owned())
    })
}

fn pod_uid(path: &str) -> Option<String> {
    path.split('/').find_map(|comp| {
        let raw = if let Some(slice) = comp.strip_suffix(".slice") {
            // kubepods-burstable-pod<uid_with_underscores>.slice
            slice.rsplit_once("-pod").map(|(_, uid)| uid)?
        } else {
            // cgroupfs: pod<uid>
            comp.strip_prefix("pod")?
        };
        let uid = raw.replace('_', "-");
        is_pod_uid(&uid).then_some(uid)
    })
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A UUID (`8-4-4-4-12` hex) or a static pod's 32-hex config hash.
fn is_pod_uid(s: &str) -> bool {
    if is_hex(s, 32) {
        return true;
    }
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| is_hex(g, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "3f2a1b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a";
    const POD: &str = "8a1c5b6e-2f3d-4e5f-9a0b-1c2d3e4f5a6b";

    #[test]
    fn cgroup_v2_systemd_driver_containerd() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope\n",
            POD.replace('-', "_")
        );
        let info = parse_cgroup(&text);
        assert_eq!(info.container_id.as_deref(), Some(CID));
        assert_eq!(info.pod_uid.as_deref(), Some(POD));
        assert!(info.path.unwrap().starts_with("/kubepods.slice/"));
    }

    #[test]
    fn cgroup_v2_besteffort_crio() {
        let text = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{CID}.scope\n",
            POD.replace('-', "_")
        );
        let info = parse_cgroup(&text);
        assert_eq!(info.container_id.as_deref(), Some(CID));
        assert_eq!(info.pod_uid.as_deref(), Some(POD));
    }

    #[test]
    fn cgroup_v2_guaranteed_pod_has_no_qos_slice() {
        let text = format!(
            "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{CID}.scope\n",
            POD.replace('-', "_")
        );
        let info = parse_cgroup(&text);
        assert_eq!(info.pod_uid.as_deref(), Some(POD));
        assert_eq!(info.container_id.as_deref(), Some(CID));
    }

    #[test]
    fn cgroupfs_driver_v1_hybrid() {
        let text = format!(
            "12:pids:/kubepods/burstable/pod{POD}/{CID}\n\
             11:memory:/kubepods/burstable/pod{POD}/{CID}\n\
             1:name=systemd:/kubepods/burstable/pod{POD}/{CID}\n\
             0::/\n"
        );
        let info = parse_cgroup(&text);
        assert_eq!(
            info.path.as_deref(),
            Some("/"),
            "the v2 line wins for the path"
        );
        assert_eq!(info.container_id.as_deref(), Some(CID));
        assert_eq!(info.pod_uid.as_deref(), Some(POD));
        let guaranteed = parse_cgroup(&format!("0::/kubepods/pod{POD}/{CID}\n"));
        assert_eq!(guaranteed.pod_uid.as_deref(), Some(POD));
    }

    #[test]
    fn docker_and_podman_outside_kubernetes() {
        for text in [
            format!("0::/system.slice/docker-{CID}.scope\n"),
            format!("0::/docker/{CID}\n"),
            format!("0::/machine.slice/libpod-{CID}.scope/container\n"),
        ] {
            let info = parse_cgroup(&text);
            assert_eq!(info.container_id.as_deref(), Some(CID), "{text}");
            assert_eq!(info.pod_uid, None, "{text}");
        }
    }

    #[test]
    fn host_processes_have_no_container() {
        for text in [
            "0::/user.slice/user-0.slice/session-3.scope\n",
            "0::/system.slice/systemd-modules-load.service\n",
            "0::/init.scope\n",
            // docker.service itself is not a container.
            "0::/system.slice/docker.service\n",
        ] {
            let info = parse_cgroup(text);
            assert_eq!((info.container_id, info.pod_uid), (None, None), "{text}");
            assert_eq!(
                info.path.as_deref(),
                text.strip_prefix("0::").map(str::trim_end)
            );
        }
        assert_eq!(parse_cgroup(""), CgroupInfo::default());
    }

    #[test]
    fn stat_comm_may_hold_parentheses_and_spaces() {
        assert_eq!(
            parse_stat("4242 (rmmod) R 4100 4242 4100 34816 4242 4194304 98 0 0 0"),
            Some(("rmmod".into(), 4100))
        );
        assert_eq!(
            parse_stat("77 (a) b (c)) S 1 77 77 0 -1"),
            Some(("a) b (c)".into(), 1))
        );
        assert_eq!(parse_stat("77 (trunc"), None);
    }

    #[test]
    fn cmdline_is_split_on_nul_and_capped() {
        assert_eq!(parse_cmdline(b"rmmod\0nvme_tcp\0"), ["rmmod", "nvme_tcp"]);
        assert_eq!(parse_cmdline(b"kthread"), ["kthread"]);
        assert!(parse_cmdline(b"").is_empty());
        let long = vec![b'a'; CMDLINE_MAX * 2];
        assert_eq!(parse_cmdline(&long)[0].len(), CMDLINE_MAX);
    }

    #[test]
    fn enrich_reads_proc_under_the_host_root_and_tolerates_a_gone_process() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostRoot::new(dir.path());
        let proc = dir.path().join("proc/4242");
        std::fs::create_dir_all(&proc).unwrap();
        std::fs::write(proc.join("stat"), "4242 (rmmod) R 4100 4242 4100 0 -1\n").unwrap();
        std::fs::write(proc.join("cmdline"), b"rmmod\0nvme_tcp\0").unwrap();
        std::fs::write(
            proc.join("cgroup"),
            format!("0::/system.slice/docker-{CID}.scope\n"),
        )
        .unwrap();
        std::os::unix::fs::symlink("/usr/sbin/rmmod", proc.join("exe")).unwrap();
        let actor = Actor {
            pid: 4242,
            tgid: 4242,
            uid: 0,
            gid: 0,
            comm: "rmmod".into(),
            cgroup_id: 9,
        };
        let info = enrich(&host, &actor);
        assert_eq!(info.ppid, Some(4100));
        assert_eq!(info.exe.as_deref(), Some("/usr/sbin/rmmod"));
        assert_eq!(info.cmdline, Some(vec!["rmmod".into(), "nvme_tcp".into()]));
        assert_eq!(info.container_id.as_deref(), Some(CID));
        assert!(info.read_late);

        // The pid now belongs to someone else: nothing late is kept.
        let reused = enrich(
            &host,
            &Actor {
                comm: "modprobe".into(),
                ..actor.clone()
            },
        );
        assert_eq!(
            (reused.ppid, reused.exe, reused.cmdline),
            (None, None, None)
        );
        assert_eq!(reused.comm, "modprobe");

        // Gone: the kernel's fields stay, the late ones are null.
        let gone = enrich(
            &host,
            &Actor {
                tgid: 9999,
                ..actor
            },
        );
        assert_eq!(gone.tgid, 9999);
        assert_eq!((gone.ppid, gone.container_id), (None, None));
    }
}
