//! `kmod-monitor-floor`: the benchmark's floor (`cargo xtask bench`, the
//! `bench` feature only). It loads and attaches the daemon's own eBPF
//! program exactly as `run --source ebpf` does, then blocks in poll(2) on
//! the ring buffer and, for every record, reads CLOCK_BOOTTIME as soon as
//! the record is taken: no tracker, no log, no HTTP, no async runtime. The
//! difference from the record's `bpf_ktime_get_boot_ns` is the least
//! detection latency this kernel and machine allow; the daemon is judged
//! against it.
//!
//! Usage: `kmod-monitor-floor [--host-root DIR] [--track NAME]...`. It
//! prints `FLOOR READY` once attached, then one line per record:
//! `FLOOR <kind> <ret> <name> <boot_ns> <taken_ns>`, and stops when its
//! stdin closes (the driver that started it is done or gone).
use std::{
    io::{self, BufWriter},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::ExitCode,
};

use kmod_monitor::{
    event::boot_ns_now,
    host::HostRoot,
    names::ModuleName,
    source::{SourceOptions, ebpf},
};
use monitor_common::{DEFAULT_RING_BYTES, ModuleEvent, NAME_LEN};

/// One record as taken: what the driver needs to pick the records the
/// daemon's state changes come from.
struct Taken {
    kind: u32,
    ret: i64,
    name: String,
    boot_ns: u64,
    taken_ns: u64,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmod-monitor-floor: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn args() -> Result<(HostRoot, Vec<ModuleName>), String> {
    let mut root = PathBuf::from("/");
    let mut tracked = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--host-root" => root = PathBuf::from(value),
            "--track" => tracked
                .push(ModuleName::parse(&value).map_err(|e| format!("--track {value:?}: {e}"))?),
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok((HostRoot::new(root), tracked))
}

/// Writes one line and flushes it, so the driver sees it at once.
fn line(out: &mut impl io::Write, text: &str) -> Result<(), String> {
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing to stdout: {e}"))
}

fn run() -> Result<(), String> {
    let (host, tracked) = args()?;
    let opts = SourceOptions {
        host,
        ring_buffer_bytes: DEFAULT_RING_BYTES,
        poll_interval: std::time::Duration::from_secs(1),
        tracked,
    };
    let mut attached = ebpf::attach_all(&opts, None).map_err(|e| e.to_string())?;
    let mut out = BufWriter::new(io::stdout().lock());
    line(&mut out, "FLOOR READY")?;
    let ring_fd = attached.ring.as_raw_fd();
    let mut taken = Vec::with_capacity(64);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: ring_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: libc::STDIN_FILENO,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the call's
        // duration; both descriptors stay open (the ring's is owned by
        // `attached`, stdin by the process).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        // Every record the ring holds, each stamped the moment it is taken.
        while let Some(item) = attached.ring.next() {
            let taken_ns = boot_ns_now();
            if item.len() < size_of::<ModuleEvent>() {
                continue;
            }
            // SAFETY: the record holds at least one ModuleEvent (checked
            // above), a repr(C) plain-data type valid for any bytes; the
            // read is unaligned-safe.
            let ev = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ModuleEvent>()) };
            let end = ev.name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
            taken.push(Taken {
                kind: ev.kind,
                ret: ev.ret,
                name: String::from_utf8_lossy(&ev.name[..end]).into_owned(),
                boot_ns: ev.boot_ns,
                taken_ns,
            });
        }
        for t in taken.drain(..) {
            let Taken {
                kind,
                ret,
                name,
                boot_ns,
                taken_ns,
            } = t;
            line(
                &mut out,
                &format!("FLOOR {kind} {ret} {name} {boot_ns} {taken_ns}"),
            )?;
        }
        // stdin readable means closed (the driver writes nothing to it).
        if fds[1].revents != 0 {
            line(&mut out, &format!("FLOOR LOST {}", attached.lost()))?;
            return Ok(());
        }
    }
}
