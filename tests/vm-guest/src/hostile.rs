//! Scenarios with an adversary on the node (issue 11): an unprivileged
//! user flooding refused unloads and module requests while root unloads a
//! required module, and a forged module uevent. The adversary is this same
//! binary re-run as a helper (`vm-guest as-user ...`), which drops to uid
//! [`USER`] itself: busybox has no `su`, and one helper process looping on
//! raw syscalls floods faster than a process per attempt.
use std::{
    ffi::CString,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    process::{Child, Command, ExitCode, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::{
    Outcome, ensure, kmod,
    more::{EVENT_LOG, boottime_ns, metric},
    report::Report,
    scenarios::Guest,
    status::Status,
};

/// The unprivileged user (and group) the helpers become.
pub const USER: u32 = 1000;
const BASE: &str = "base";
const V2: &str = "v2-data-engine";
const V2_MODULES: [&str; 3] = ["vfio_pci", "uio_pci_generic", "nvme_tcp"];
/// The required module the flood tries to unload.
const DENIED_MODULE: &str = "dm_crypt";
/// Refused unloads, and execs of an unknown format, in the flood.
const FLOOD: usize = 1500;
/// The bound on the event log's growth over the whole flood.
const LOG_GROWTH_LIMIT: u64 = 256 * 1024;
/// A file no binary format handler takes. Its first four bytes are not all
/// printable, so the kernel asks for a handler module named after bytes 2
/// and 3 (`request_module("binfmt-cafe")`) before failing with ENOEXEC.
const UNKNOWN_FORMAT: &str = "/tmp/unknown-format";
const UNKNOWN_FORMAT_BYTES: &[u8] = b"\x00\x01\xfe\xcaNOT A PROGRAM\n";
/// The forged message: what the kernel sends when dm_crypt is freed.
const FORGED_UEVENT: &[u8] = b"remove@/module/dm_crypt\0ACTION=remove\0DEVPATH=/module/dm_crypt\0SUBSYSTEM=module\0SEQNUM=4242424\0";
/// The kernel's uevent multicast group.
const UEVENT_GROUP: u32 = 1;
const CAP_NET_ADMIN: u32 = 12;

// ---- the helper, as the unprivileged user ----

/// `vm-guest as-user TASK ARGS...`: drops to uid/gid [`USER`] and runs
/// TASK. Prints its findings on stdout; exits 0 when everything happened
/// as the task expects.
pub fn as_user(args: &[String]) -> ExitCode {
    let result = match args {
        [task, n] if task == "flood" => n
            .parse()
            .map_err(|e| format!("flood count {n:?}: {e}"))
            .and_then(flood),
        [task] if task == "flood-until-eof" => flood_until_eof(false),
        [task] if task == "unloads-until-eof" => flood_until_eof(true),
        [task, n] if task == "burst" => n
            .parse()
            .map_err(|e| format!("burst count {n:?}: {e}"))
            .and_then(burst),
        [task, cap] if task == "uevent" => forge_uevent(cap == "net-admin"),
        _ => Err(format!("unknown helper task {args:?}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("ERROR {e}");
            ExitCode::FAILURE
        }
    }
}

/// The last OS error.
fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `capget`/`capset`'s header and one 32-bit half of the sets
/// (`_LINUX_CAPABILITY_VERSION_3`).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const CAP_VERSION_3: u32 = 0x2008_0522;

/// Becomes uid and gid [`USER`] with no supplementary groups. With
/// `net_admin`, keeps CAP_NET_ADMIN (and only it) effective, as a process
/// that holds it in the daemon's network namespace would; without, holds
/// no capability at all. Checks the result in /proc/self/status.
fn become_user(net_admin: bool) -> Result<(), String> {
    // SAFETY: setgroups with a zero count reads no memory.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(format!("setgroups: errno {}", errno()));
    }
    // SAFETY: plain integer arguments.
    if unsafe { libc::setgid(USER) } != 0 {
        return Err(format!("setgid({USER}): errno {}", errno()));
    }
    if net_admin {
        // SAFETY: plain integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
            return Err(format!("PR_SET_KEEPCAPS: errno {}", errno()));
        }
    }
    // SAFETY: plain integer arguments.
    if unsafe { libc::setuid(USER) } != 0 {
        return Err(format!("setuid({USER}): errno {}", errno()));
    }
    if net_admin {
        let header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        data[0].effective = 1 << CAP_NET_ADMIN;
        data[0].permitted = 1 << CAP_NET_ADMIN;
        // SAFETY: `header` and the two `data` halves are the layout capset
        // reads for version 3, and live across the call.
        let r = unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) };
        if r != 0 {
            return Err(format!("capset(CAP_NET_ADMIN): errno {}", errno()));
        }
    }
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("reading /proc/self/status: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    let uid = field("Uid:");
    let cap_eff = u64::from_str_radix(&field("CapEff:"), 16)
        .map_err(|e| format!("CapEff {:?}: {e}", field("CapEff:")))?;
    let want = if net_admin { 1 << CAP_NET_ADMIN } else { 0 };
    ensure!(
        uid.split_whitespace().all(|u| u == USER.to_string()) && cap_eff == want,
        "after the drop: Uid {uid:?}, CapEff {cap_eff:#x}, expected {USER} and {want:#x}"
    );
    Ok(())
}

/// One unprivileged flooder's syscalls and what became of them: each round
/// is one refused `delete_module(dm_crypt)` and one exec of
/// [`UNKNOWN_FORMAT`] (which makes the kernel call
/// `request_module("binfmt-cafe")`). Each must fail as an unprivileged
/// call does: EPERM and ENOEXEC. Shared by the `unprivileged-flood`
/// scenario (a fixed count) and the benchmark (until told to stop).
struct Flooder {
    module: CString,
    path: CString,
    denied: u64,
    noexec: u64,
    other: Vec<String>,
}

impl Flooder {
    /// Drops to uid [`USER`] and gets ready to flood.
    fn become_user() -> Result<Self, String> {
        become_user(false)?;
        Ok(Self {
            module: CString::new(DENIED_MODULE).map_err(|e| e.to_string())?,
            path: CString::new(UNKNOWN_FORMAT).map_err(|e| e.to_string())?,
            denied: 0,
            noexec: 0,
            other: Vec::new(),
        })
    }

    /// One refused unload and one exec of an unknown format.
    fn round(&mut self) {
        self.refused_unload();
        self.unknown_format_exec();
    }

    /// One refused `delete_module` of [`DENIED_MODULE`].
    fn refused_unload(&mut self) {
        // SAFETY: a NUL-terminated name that outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_delete_module,
                self.module.as_ptr(),
                libc::O_NONBLOCK,
            )
        };
        match (r, errno()) {
            (-1, libc::EPERM) => self.denied += 1,
            (r, e) => self.other.push(format!("delete_module: {r} errno {e}")),
        }
    }

    /// One exec of [`UNKNOWN_FORMAT`].
    fn unknown_format_exec(&mut self) {
        let argv = [self.path.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // A failed execve returns: the kernel looks for a handler (and asks
        // for the module) before the point of no return.
        // SAFETY: NUL-terminated path and NULL-terminated argv and envp
        // arrays that outlive the call.
        let r = unsafe { libc::execve(self.path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        match (r, errno()) {
            (-1, libc::ENOEXEC) => self.noexec += 1,
            (r, e) => self.other.push(format!("execve: {r} errno {e}")),
        }
    }

    /// Prints `DONE denied=D noexec=E`; fails if any call did not fail as
    /// expected.
    fn done(self) -> Result<(), String> {
        println!("DONE denied={} noexec={}", self.denied, self.noexec);
        ensure!(
            self.other.is_empty(),
            "{} calls did not fail as expected, first: {}",
            self.other.len(),
            self.other[0]
        );
        Ok(())
    }
}

/// `n` flood rounds (see [`Flooder`]); prints `HALF` halfway and `DONE
/// denied=D noexec=E` at the end.
fn flood(n: usize) -> Result<(), String> {
    let mut flooder = Flooder::become_user()?;
    let mut out = std::io::stdout();
    for i in 0..n {
        flooder.round();
        if i + 1 == n / 2 {
            let _ = writeln!(out, "HALF");
            let _ = out.flush();
        }
    }
    flooder.done()
}

/// Flood rounds (see [`Flooder`]) until stdin closes; prints `READY` once
/// it is uid [`USER`] and `DONE denied=D noexec=E` at the end. With
/// `unloads_only`, each round is the refused unload alone: no exec, so no
/// usermode `modprobe` to wait for, as fast as the syscall goes.
fn flood_until_eof(unloads_only: bool) -> Result<(), String> {
    let mut flooder = Flooder::become_user()?;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "READY");
    let _ = out.flush();
    loop {
        let mut stdin = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd that lives across the call; no wait.
        let r = unsafe { libc::poll(&raw mut stdin, 1, 0) };
        ensure!(r >= 0, "poll(stdin): errno {}", errno());
        if r > 0 {
            // Input or hang-up: the driver is done with us.
            break;
        }
        if unloads_only {
            flooder.refused_unload();
        } else {
            flooder.round();
        }
    }
    flooder.done()
}

/// `n` refused `delete_module(dm_crypt)` calls as fast as they go; prints
/// `DONE denied=D`.
fn burst(n: usize) -> Result<(), String> {
    let mut flooder = Flooder::become_user()?;
    for _ in 0..n {
        flooder.refused_unload();
    }
    println!("DONE denied={}", flooder.denied);
    ensure!(
        flooder.other.is_empty(),
        "{} calls did not fail with EPERM, first: {}",
        flooder.other.len(),
        flooder.other[0]
    );
    Ok(())
}

/// Sends [`FORGED_UEVENT`] to the kernel's uevent group from a netlink
/// socket, as uid [`USER`], with or without CAP_NET_ADMIN. Prints `SENT
/// port=P` or `REFUSED errno=E`.
fn forge_uevent(net_admin: bool) -> Result<(), String> {
    become_user(net_admin)?;
    // SAFETY: plain integer arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_KOBJECT_UEVENT,
        )
    };
    ensure!(fd >= 0, "netlink socket: errno {}", errno());
    // SAFETY: sockaddr_nl is plain data; all zeroes is a valid value.
    let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    to.nl_family = u16::try_from(libc::AF_NETLINK).map_err(|e| e.to_string())?;
    to.nl_pid = 0;
    to.nl_groups = UEVENT_GROUP;
    let len = u32::try_from(std::mem::size_of::<libc::sockaddr_nl>()).map_err(|e| e.to_string())?;
    // SAFETY: the message and the address live across the call; the
    // lengths are theirs.
    let r = unsafe {
        libc::sendto(
            fd,
            FORGED_UEVENT.as_ptr().cast(),
            FORGED_UEVENT.len(),
            0,
            (&raw const to).cast(),
            len,
        )
    };
    let err = errno();
    let port = local_port(fd);
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(fd) };
    if r < 0 {
        println!("REFUSED errno={err}");
    } else {
        println!("SENT port={}", port?);
    }
    Ok(())
}

/// The netlink port the kernel bound `fd` to.
fn local_port(fd: i32) -> Result<u32, String> {
    // SAFETY: sockaddr_nl is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut len =
        u32::try_from(std::mem::size_of::<libc::sockaddr_nl>()).map_err(|e| e.to_string())?;
    // SAFETY: `addr` and `len` are valid for writes of the given size.
    let r = unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &raw mut len) };
    ensure!(r == 0, "getsockname: errno {}", errno());
    Ok(addr.nl_pid)
}

// ---- the scenarios, as root ----

/// Runs `vm-guest as-user ARGS...` with piped stdout.
fn spawn_helper(args: &[&str]) -> Result<std::process::Child, String> {
    Command::new("/proc/self/exe")
        .arg("as-user")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting the as-user helper {args:?}: {e}"))
}

/// Writes [`UNKNOWN_FORMAT`], executable by everyone.
fn write_unknown_format() -> Result<(), String> {
    fs::write(UNKNOWN_FORMAT, UNKNOWN_FORMAT_BYTES)
        .and_then(|()| fs::set_permissions(UNKNOWN_FORMAT, fs::Permissions::from_mode(0o755)))
        .map_err(|e| format!("writing {UNKNOWN_FORMAT}: {e}"))
}

/// What a [`SustainedFlood`] did: its flooders' calls, each refused as an
/// unprivileged call is.
#[derive(Clone, Copy, Debug, Default)]
pub struct FloodDone {
    /// Refused `delete_module` of a required module (EPERM).
    pub denied: u64,
    /// Execs of an unknown binary format (ENOEXEC), each a
    /// `request_module("binfmt-…")` in the kernel.
    pub noexec: u64,
}

/// The `unprivileged-flood` scenario's flood, for the benchmark: helpers
/// as uid [`USER`], each doing flood rounds (see [`Flooder`]), or refused
/// unloads alone, from [`start`](Self::start) until [`stop`](Self::stop).
/// Killed when dropped.
pub struct SustainedFlood {
    helpers: Vec<Child>,
    lines: mpsc::Receiver<(usize, String)>,
}

impl SustainedFlood {
    /// Starts `rounds` flooders of the scenario's rounds and
    /// `unloads_only` of refused unloads alone, and waits until each is
    /// uid [`USER`] and flooding.
    pub fn start(rounds: usize, unloads_only: usize) -> Result<Self, String> {
        write_unknown_format()?;
        let procs = rounds + unloads_only;
        let (tx, lines) = mpsc::channel();
        let mut flood = Self {
            helpers: Vec::with_capacity(procs),
            lines,
        };
        for i in 0..procs {
            let mut helper = Command::new("/proc/self/exe")
                .arg("as-user")
                .arg(if i < rounds {
                    "flood-until-eof"
                } else {
                    "unloads-until-eof"
                })
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("starting flooder {i}: {e}"))?;
            let stdout = helper
                .stdout
                .take()
                .ok_or("the flooder's stdout is not piped")?;
            flood.helpers.push(helper);
            let tx = tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send((i, line)).is_err() {
                        return;
                    }
                }
            });
        }
        let mut ready = 0;
        while ready < procs {
            match flood.lines.recv_timeout(Duration::from_secs(30)) {
                Ok((_, line)) if line == "READY" => ready += 1,
                Ok((i, line)) => return Err(format!("flooder {i} said {line:?} before READY")),
                Err(e) => return Err(format!("{ready} of {procs} flooders ready in 30 s: {e}")),
            }
        }
        Ok(flood)
    }

    /// Closes every flooder's stdin, which stops it, and adds up what
    /// they did.
    pub fn stop(&mut self) -> Result<FloodDone, String> {
        for helper in &mut self.helpers {
            drop(helper.stdin.take());
        }
        let mut done = FloodDone::default();
        let mut finished = 0;
        let mut said = Vec::new();
        while finished < self.helpers.len() {
            let (i, line) = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .map_err(|e| {
                    format!(
                        "{finished} of {} flooders reported within 30 s of stop ({e}): {}",
                        self.helpers.len(),
                        said.join(" | ")
                    )
                })?;
            let counts = line.strip_prefix("DONE ").and_then(|rest| {
                let (d, n) = rest.split_once(' ')?;
                Some((
                    d.strip_prefix("denied=")?.parse::<u64>().ok()?,
                    n.strip_prefix("noexec=")?.parse::<u64>().ok()?,
                ))
            });
            match counts {
                Some((d, n)) => {
                    done.denied += d;
                    done.noexec += n;
                    finished += 1;
                }
                None => said.push(format!("{i}: {line}")),
            }
        }
        for (i, helper) in self.helpers.iter_mut().enumerate() {
            let status = helper
                .wait()
                .map_err(|e| format!("waiting for flooder {i}: {e}"))?;
            ensure!(
                status.success(),
                "flooder {i} exited {status}: {}",
                said.join(" | ")
            );
        }
        Ok(done)
    }
}

impl Drop for SustainedFlood {
    fn drop(&mut self) {
        for helper in &mut self.helpers {
            let _ = helper.kill();
            let _ = helper.wait();
        }
    }
}

/// The event log's size now.
fn log_size() -> Result<u64, String> {
    fs::metadata(EVENT_LOG)
        .map(|m| m.len())
        .map_err(|e| format!("stat {EVENT_LOG}: {e}"))
}

/// The event log's records written at or after `since_ns` (CLOCK_BOOTTIME).
fn records_since(since_ns: u64) -> Result<Vec<serde_json::Value>, String> {
    let text = fs::read_to_string(EVENT_LOG).map_err(|e| format!("reading {EVENT_LOG}: {e}"))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["boot_ns"].as_u64().is_some_and(|t| t >= since_ns))
        .collect())
}

/// A counter from /metrics, 0 when the series is absent.
fn counter(text: &str, series: &str) -> f64 {
    metric(text, series).unwrap_or(0.0)
}

/// Loads dm_crypt and the V2 modules where they are not, and waits until
/// the daemon sees base and V2 met.
fn all_met(g: &Guest) -> Result<Status, String> {
    for m in [DENIED_MODULE].into_iter().chain(V2_MODULES) {
        if !kmod::listed(m)? {
            kmod::modprobe(m)?;
        }
    }
    g.api()
        .wait_for("base and V2 met", |s| Ok(s.met(BASE)? && s.met(V2)?))
}

/// Issue 11's "unprivileged flood": as uid 1000, [`FLOOD`] refused unloads
/// of dm_crypt and [`FLOOD`] execs of an unknown binary format, while root
/// unloads nvme_tcp halfway. The unload is seen with root's actor and the
/// V2 group drops; no event is lost; /status answers throughout; the
/// refusals are counted (per attempt in the metric, aggregated in the
/// log); the event log grows by less than 256 KiB, the SIGTERM flush
/// included.
#[expect(
    clippy::too_many_lines,
    reason = "one scenario's steps, in the order they happen"
)]
pub fn unprivileged_flood(g: &mut Guest) -> Outcome {
    // A daemon of its own: one left by an earlier scenario may have a
    // one-page ring (loss-never-silent) or other settings.
    g.start_daemon_with("ebpf", &[])?;
    all_met(g)?;
    write_unknown_format()?;
    let before = g.api().metrics()?;
    let size_before = log_size()?;
    let start_ns = boottime_ns();
    let start = Instant::now();
    let mut helper = spawn_helper(&["flood", &FLOOD.to_string()])?;
    let stdout = helper
        .stdout
        .take()
        .ok_or("the helper's stdout is not piped")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // Poll /status all along; unload nvme_tcp as root when the helper is
    // halfway.
    let mut lines = Vec::new();
    let mut answers = 0_u32;
    let mut slowest = Duration::ZERO;
    let mut unanswered = Vec::new();
    let mut unload = None;
    let exit = loop {
        let asked = Instant::now();
        match g.api().status() {
            Ok(_) => {
                answers += 1;
                slowest = slowest.max(asked.elapsed());
            }
            Err(e) => unanswered.push(format!("{:.1} s: {e}", start.elapsed().as_secs_f64())),
        }
        while let Ok(line) = rx.try_recv() {
            if line == "HALF" && unload.is_none() {
                let at = start.elapsed();
                unload = Some((kmod::rmmod("nvme_tcp")?, at));
            }
            lines.push(line);
        }
        if let Some(status) = helper
            .try_wait()
            .map_err(|e| format!("waiting for the helper: {e}"))?
        {
            break status;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(300),
            "the flood did not end within 300 s"
        );
        thread::sleep(Duration::from_millis(100));
    };
    let flood_took = start.elapsed();
    // The reader thread ends with the pipe; take its last lines.
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
        lines.push(line);
    }
    ensure!(
        exit.success()
            && lines
                .iter()
                .any(|l| *l == format!("DONE denied={FLOOD} noexec={FLOOD}")),
        "the flood helper exited {exit}: {}",
        lines.join(" | ")
    );
    ensure!(
        unanswered.is_empty(),
        "/status did not answer {} times during the flood: {}",
        unanswered.len(),
        unanswered.join("; ")
    );
    let Some((rmmod, unload_at)) = unload else {
        return Err(format!(
            "the helper never reported its halfway point: {}",
            lines.join(" | ")
        ));
    };
    // Root's unload: seen, with root's actor, and the group drops.
    let status = g.api().wait_for("nvme_tcp unloaded", |s| {
        Ok(s.state(V2, "nvme_tcp")? == "available")
    })?;
    ensure!(
        !status.met(V2)? && status.met(BASE)?,
        "after root's rmmod nvme_tcp during the flood: {}",
        status.summary()
    );
    let event = status
        .module(V2, "nvme_tcp")?
        .last_event
        .clone()
        .ok_or("nvme_tcp has no last_event after rmmod")?;
    let actor = event.actor.ok_or("the unload has no actor")?;
    ensure!(
        event.kind == "unload"
            && actor.uid == 0
            && actor.comm == "rmmod"
            && actor.tgid == rmmod.pid,
        "nvme_tcp's last event is {} by {} pid {} uid {}, expected unload by rmmod pid {} uid 0",
        event.kind,
        actor.comm,
        actor.tgid,
        actor.uid,
        rmmod.pid
    );
    ensure!(
        status.events.lost == 0,
        "events.lost is {} after the flood: {}",
        status.events.lost,
        status.summary()
    );
    ensure!(
        kmod::listed(DENIED_MODULE)? && status.met(BASE)?,
        "dm_crypt was unloaded by an unprivileged user"
    );
    // Every refusal is counted: reported one by one, or (past the kernel's
    // per-CPU rate limit) counted in the kernel.
    let after = g.api().metrics()?;
    let delta = |series: &str| counter(&after, series) - counter(&before, series);
    let reported = delta(&format!(
        "kmod_monitor_unload_denied_total{{module=\"{DENIED_MODULE}\"}}"
    ));
    let over_limit =
        delta("kmod_monitor_kernel_filtered_total{reason=\"unload_denied_over_limit\"}");
    let untracked = delta("kmod_monitor_kernel_filtered_total{reason=\"request_untracked\"}");
    #[expect(clippy::cast_precision_loss, reason = "a count of 1500")]
    let flood = FLOOD as f64;
    ensure!(
        (reported + over_limit - flood).abs() < 0.5 && reported >= 1.0,
        "refusals counted: {reported} reported + {over_limit} over the kernel's limit, expected {FLOOD} in all"
    );
    // The execs did make the kernel ask for modules (so the absence of
    // their records below means something), and the kernel kept them out
    // of the ring. The counter is refreshed when the daemon next wakes, so
    // the last few may not be in yet.
    ensure!(
        untracked.total_cmp(&(flood / 2.0)).is_ge(),
        "only {untracked} untracked module requests counted in the kernel for {FLOOD} unknown-format execs"
    );
    let size_flood = log_size()?;
    // SIGTERM flushes the refusal window still open: its records count.
    g.terminate_daemon()?;
    let size_end = log_size()?;
    let growth = size_end.saturating_sub(size_before);
    ensure!(
        growth < LOG_GROWTH_LIMIT,
        "the event log grew by {growth} bytes over the flood, limit {LOG_GROWTH_LIMIT}"
    );
    let records = records_since(start_ns)?;
    let denied: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["kind"] == "module_unload_denied")
        .collect();
    let logged: u64 = denied
        .iter()
        .filter_map(|r| r["denied"]["count"].as_u64())
        .sum();
    ensure!(
        denied
            .iter()
            .all(|r| r["module"]["name"] == DENIED_MODULE && r["actor"]["uid"] == USER),
        "module_unload_denied records not all about dm_crypt by uid {USER}: {denied:?}"
    );
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a whole count below 1500"
    )]
    let reported_count = reported as u64;
    ensure!(
        logged == reported_count,
        "the log's module_unload_denied records count {logged} attempts, the metric {reported_count}"
    );
    ensure!(
        records.iter().any(|r| r["kind"] == "module_unload"
            && r["module"]["name"] == "nvme_tcp"
            && r["actor"]["pid"] == rmmod.pid
            && r["actor"]["uid"] == 0),
        "no module_unload record of nvme_tcp by rmmod pid {}",
        rmmod.pid
    );
    // Root's rmmod writes its own unload_begin; the flood must write none.
    let per_attempt = [
        "module_unload_begin",
        "module_unload_failed",
        "module_request",
    ];
    let noise: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| per_attempt.iter().any(|k| r["kind"] == *k))
        .filter(|r| {
            r["actor"]["uid"] == USER
                || r["module"]["name"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("binfmt"))
        })
        .collect();
    ensure!(
        noise.is_empty(),
        "{} per-attempt records of the flood written: {:?}",
        noise.len(),
        noise.first()
    );
    Report::note(&format!(
        "unprivileged-flood: {FLOOD} refused unloads + {FLOOD} unknown-format execs as uid {USER} in {:.1} s \
         (root's rmmod nvme_tcp at {:.1} s); event log +{} bytes during the flood, +{growth} bytes with the SIGTERM flush \
         ({} records: {} module_unload_denied counting {logged}); refusals {reported} reported + {over_limit} over the kernel limit; \
         {untracked} untracked module requests filtered in the kernel; /status answered {answers} times, slowest {:.0} ms",
        flood_took.as_secs_f64(),
        unload_at.as_secs_f64(),
        size_flood.saturating_sub(size_before),
        records.len(),
        denied.len(),
        slowest.as_secs_f64() * 1000.0
    ));
    Ok(())
}

/// A netlink socket of root's that listens to the uevent group, to see
/// what every member of the group (the daemon among them) receives.
struct Witness(i32);

impl Witness {
    fn open() -> Result<Self, String> {
        // SAFETY: plain integer arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_KOBJECT_UEVENT,
            )
        };
        ensure!(fd >= 0, "witness netlink socket: errno {}", errno());
        let witness = Self(fd);
        // SAFETY: sockaddr_nl is plain data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = u16::try_from(libc::AF_NETLINK).map_err(|e| e.to_string())?;
        addr.nl_groups = UEVENT_GROUP;
        let len =
            u32::try_from(std::mem::size_of::<libc::sockaddr_nl>()).map_err(|e| e.to_string())?;
        // SAFETY: `addr` lives across the call and `len` is its size.
        let r = unsafe { libc::bind(fd, (&raw const addr).cast(), len) };
        ensure!(
            r == 0,
            "binding the witness to the uevent group: errno {}",
            errno()
        );
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        let tlen =
            u32::try_from(std::mem::size_of::<libc::timeval>()).map_err(|e| e.to_string())?;
        // SAFETY: `timeout` lives across the call and `tlen` is its size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                tlen,
            )
        };
        ensure!(r == 0, "SO_RCVTIMEO on the witness: errno {}", errno());
        Ok(witness)
    }

    /// The sender ports of the copies of [`FORGED_UEVENT`] received
    /// within `within`.
    fn forged_from(&self, within: Duration) -> Vec<u32> {
        let start = Instant::now();
        let mut ports = Vec::new();
        let mut buf = vec![0_u8; 8192];
        while start.elapsed() < within {
            // SAFETY: sockaddr_nl is plain data; all zeroes is valid.
            let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut len = u32::try_from(std::mem::size_of::<libc::sockaddr_nl>()).unwrap_or(12);
            // SAFETY: `buf`, `from` and `len` are valid for writes of the
            // sizes given.
            let n = unsafe {
                libc::recvfrom(
                    self.0,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut from).cast(),
                    &raw mut len,
                )
            };
            if let Ok(n) = usize::try_from(n)
                && buf[..n] == *FORGED_UEVENT
            {
                ports.push(from.nl_pid);
            }
        }
        ports
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.0) };
    }
}

/// Runs the forging helper; returns its one-line verdict.
fn run_forger(cap: &str) -> Result<String, String> {
    let helper = spawn_helper(&["uevent", cap])?;
    let out = helper
        .wait_with_output()
        .map_err(|e| format!("waiting for the uevent helper: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(
        out.status.success(),
        "the uevent helper ({cap}) exited {}: {text}",
        out.status
    );
    Ok(text)
}

/// Issue 11: a forged `remove@/module/dm_crypt` uevent from userspace
/// changes nothing. As uid 1000 without capabilities the kernel refuses
/// to send it (EPERM: the uevent group takes CAP_NET_ADMIN to send to);
/// with CAP_NET_ADMIN it is delivered (a witness socket receives it, from
/// a non-zero port), and the daemon, with `--source uevent`, ignores it
/// and says so once: dm_crypt stays loaded and base met. A real rmmod
/// afterwards is still seen.
pub fn forged_uevent_ignored(g: &mut Guest) -> Outcome {
    let status = g.start_daemon_with("uevent", &[])?;
    ensure!(
        status.source.active == "uevent",
        "source.active is {:?}, expected uevent",
        status.source.active
    );
    if !kmod::listed(DENIED_MODULE)? {
        kmod::modprobe(DENIED_MODULE)?;
    }
    let before = g.api().wait_for("dm_crypt loaded", |s| {
        Ok(s.state(BASE, DENIED_MODULE)? == "loaded" && s.met(BASE)?)
    })?;
    let witness = Witness::open()?;
    let plain = run_forger("none")?;
    ensure!(
        plain == format!("REFUSED errno={}", libc::EPERM),
        "uid {USER} without capabilities: expected the kernel to refuse the send with EPERM, got {plain:?}"
    );
    ensure!(
        witness.forged_from(Duration::from_millis(300)).is_empty(),
        "the refused forgery reached the uevent group"
    );
    let sent = run_forger("net-admin")?;
    let port: u32 = sent
        .strip_prefix("SENT port=")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("uid {USER} with CAP_NET_ADMIN could not send: {sent:?}"))?;
    let seen = witness.forged_from(Duration::from_secs(1));
    ensure!(
        seen == [port] && port != 0,
        "the witness saw the forgery from ports {seen:?}, expected once from {port}"
    );
    // The daemon got it too; it must say it ignored it, and change nothing.
    let log = g.daemon_log().ok_or("no daemon log")?;
    let start = Instant::now();
    let said = loop {
        let text =
            fs::read_to_string(&log).map_err(|e| format!("reading {}: {e}", log.display()))?;
        if text.contains("ignored a message from a userspace sender") {
            break true;
        }
        if start.elapsed() > Duration::from_secs(5) {
            break false;
        }
        thread::sleep(Duration::from_millis(50));
    };
    ensure!(
        said,
        "the daemon did not log that it ignored the userspace uevent"
    );
    let after = g.api().status()?;
    ensure!(
        after.state(BASE, DENIED_MODULE)? == "loaded"
            && after.met(BASE)?
            && after.events.received == before.events.received
            && kmod::listed(DENIED_MODULE)?,
        "after the forged uevent: {} (before: {})",
        after.summary(),
        before.summary()
    );
    // The kernel's own uevents still count.
    kmod::rmmod(DENIED_MODULE)?;
    let gone = g.api().wait_for("dm_crypt unloaded", |s| {
        Ok(s.state(BASE, DENIED_MODULE)? == "available")
    })?;
    ensure!(
        !gone.met(BASE)?,
        "base met without dm_crypt: {}",
        gone.summary()
    );
    kmod::modprobe(DENIED_MODULE)?;
    g.api().wait_for("dm_crypt back", |s| s.met(BASE))?;
    Report::note(&format!(
        "forged-uevent: refused without CAP_NET_ADMIN (EPERM); with it, delivered from port {port} and ignored by the daemon"
    ));
    g.stop_daemon();
    Ok(())
}

/// Refused unloads in one burst, far above the kernel's limit of
/// [`DENIED_PER_SECOND_PER_CPU`] a second per CPU.
const BURST: usize = 400;
/// The kernel's per-CPU budget of refusals a second
/// (`monitor_common::DENIED_PER_SECOND_PER_CPU`).
const DENIED_PER_SECOND_PER_CPU: f64 = 20.0;

/// The in-kernel rate limit on refused unloads: as uid 1000, [`BURST`]
/// refused `delete_module(dm_crypt)` calls in a tight loop. The kernel
/// passes at most its budget a second per CPU to the ring and counts the
/// rest; once the daemon's window has closed (and so republished the
/// counters), reported plus counted is exactly [`BURST`], most of them
/// counted, and the window's record names uid 1000 with the reported
/// count.
pub fn denied_rate_limit(g: &mut Guest) -> Outcome {
    g.start_daemon_with("ebpf", &[])?;
    if !kmod::listed(DENIED_MODULE)? {
        kmod::modprobe(DENIED_MODULE)?;
    }
    g.api().wait_for("base met", |s| s.met(BASE))?;
    let before = g.api().metrics()?;
    let start_ns = boottime_ns();
    let start = Instant::now();
    let helper = spawn_helper(&["burst", &BURST.to_string()])?;
    let out = helper
        .wait_with_output()
        .map_err(|e| format!("waiting for the burst helper: {e}"))?;
    let took = start.elapsed();
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(
        out.status.success() && said == format!("DONE denied={BURST}"),
        "the burst helper exited {}: {said}",
        out.status
    );
    // The window (10 s from the first refusal the daemon saw) closes with
    // its record, and the daemon publishes the kernel's counters then.
    let deadline = Instant::now() + Duration::from_secs(30);
    let record = loop {
        let found = records_since(start_ns)?
            .into_iter()
            .find(|r| r["kind"] == "module_unload_denied");
        if let Some(r) = found {
            break r;
        }
        ensure!(
            Instant::now() < deadline,
            "no module_unload_denied record within 30 s of the burst"
        );
        thread::sleep(Duration::from_millis(200));
    };
    let after = g.api().metrics()?;
    let delta = |series: &str| counter(&after, series) - counter(&before, series);
    let reported = delta(&format!(
        "kmod_monitor_unload_denied_total{{module=\"{DENIED_MODULE}\"}}"
    ));
    let over_limit =
        delta("kmod_monitor_kernel_filtered_total{reason=\"unload_denied_over_limit\"}");
    #[expect(clippy::cast_precision_loss, reason = "a count of 400")]
    let burst = BURST as f64;
    // The budget is per second and per CPU: at most two seconds' worth
    // while the burst ran (it straddles at most one second boundary more
    // than it lasts).
    let cpus = thread::available_parallelism().map_or(1, std::num::NonZero::get);
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let budget = DENIED_PER_SECOND_PER_CPU * (took.as_secs_f64().ceil() + 1.0) * cpus as f64;
    let all_counted = (reported + over_limit - burst).abs() < 0.5;
    ensure!(
        all_counted,
        "refusals: {reported} reported + {over_limit} counted in the kernel, expected {BURST} in all"
    );
    let limited = reported >= 1.0 && reported <= budget && over_limit >= 1.0;
    ensure!(
        limited,
        "{reported} refusals reached the daemon in {:.2} s on {cpus} CPU(s) (budget {budget}), {over_limit} were only counted",
        took.as_secs_f64()
    );
    ensure!(
        record["module"]["name"] == DENIED_MODULE
            && record["actor"]["uid"] == USER
            && record["denied"]["count"].as_f64() == Some(reported),
        "the window's record: {record}"
    );
    let status = g.api().status()?;
    ensure!(
        status.events.lost == 0,
        "events.lost is {} after the burst",
        status.events.lost
    );
    Report::note(&format!(
        "denied-rate-limit: {BURST} refusals in {:.2} s: {reported} reached the daemon, {over_limit} counted in the kernel; the record says suppressed_in_window={}",
        took.as_secs_f64(),
        record["denied"]["suppressed_in_window"]
    ));
    g.stop_daemon();
    Ok(())
}
