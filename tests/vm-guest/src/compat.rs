//! A 32-bit compat task loading and unloading a module: Debian's 32-bit
//! busybox (i386 on x86-64, armhf on arm64), which the host harness puts
//! into the initramfs, runs modprobe and rmmod. The kernel calls the module
//! syscalls of such a task by their compat numbers and skips it at the
//! `syscalls:*` tracepoints, so the eBPF program sees only `module_load`
//! and `module_free`. The daemon must still track both, with the task as
//! the actor, confirm the load through initstate, and native loads
//! afterwards must still be confirmed by their syscall's exit.
use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    Outcome, api::POLL_EVERY, daemon::BINARY, ensure, kmod, more::EVENT_LOG, report::Report,
    scenarios::Guest, status::Status,
};

/// The 32-bit busybox; its file name is the comm of every applet run
/// through it.
pub const COMPAT_BUSYBOX: &str = "/usr/bin/busybox-compat";
const COMM: &str = "busybox-compat";
/// A V2 module (so /status lists it) with one dependency.
const MODULE: &str = "uio_pci_generic";
const V2: &str = "v2-data-engine";

/// Runs `applet args` through the 32-bit busybox, which must succeed.
fn compat(applet: &str, args: &[&str]) -> Result<kmod::Ran, String> {
    let mut all = vec![applet];
    all.extend_from_slice(args);
    let ran = kmod::run(COMPAT_BUSYBOX, &all)?;
    ensure!(
        ran.success,
        "{COMPAT_BUSYBOX} {} failed ({}): {}",
        all.join(" "),
        ran.status,
        ran.stderr
    );
    Ok(ran)
}

/// The forensic records about `MODULE`, in order.
fn records() -> Result<Vec<Value>, String> {
    let out = Command::new(BINARY)
        .args(["log", "show", "--json", "--module", MODULE, EVENT_LOG])
        .output()
        .map_err(|e| format!("running log show: {e}"))?;
    ensure!(
        out.status.success(),
        "log show failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// The `module_load` record by `pid` and the `module_loaded` record that
/// follows it; waits for the log writer.
fn load_records(pid: u32, comm: &str) -> Result<(Value, Value), String> {
    let start = Instant::now();
    loop {
        let all = records()?;
        let load = all.iter().position(|r| {
            r["kind"] == "module_load" && r["actor"]["pid"] == pid && r["actor"]["comm"] == comm
        });
        if let Some(at) = load
            && let Some(loaded) = all[at..].iter().find(|r| r["kind"] == "module_loaded")
        {
            return Ok((all[at].clone(), loaded.clone()));
        }
        ensure!(
            start.elapsed() < Duration::from_secs(5),
            "no module_load by {comm} pid {pid} followed by module_loaded in {EVENT_LOG}: {all:?}"
        );
        thread::sleep(POLL_EVERY);
    }
}

fn wait_state(g: &Guest, state: &str) -> Result<Status, String> {
    g.api().wait_for(&format!("{MODULE} {state}"), |s| {
        Ok(s.state(V2, MODULE)? == state)
    })
}

/// A compat modprobe and rmmod are tracked with their actor; the load is
/// confirmed through initstate, a native one after it by its syscall.
pub fn compat_task(g: &mut Guest) -> Outcome {
    g.ensure_daemon("ebpf")?;
    kmod::ensure_unloaded(MODULE)?;
    wait_state(g, "available")?;

    let ran = compat("modprobe", &[MODULE])?;
    let status = wait_state(g, "loaded")?;
    ensure!(
        status.drift_total == 0,
        "drift after the compat load: {}",
        status.summary()
    );
    let (load, loaded) = load_records(ran.pid, COMM)?;
    ensure!(
        load["source"] == "ebpf",
        "the compat load was not seen by eBPF: {load}"
    );
    ensure!(
        loaded["source"] == "initstate",
        "the compat load (no syscall tracepoint fires for it) should be confirmed \
         through initstate, but was by {}: {loaded}",
        loaded["source"]
    );

    let ran = compat("rmmod", &[MODULE])?;
    let status = wait_state(g, "available")?;
    let event = status
        .module(V2, MODULE)?
        .last_event
        .clone()
        .ok_or("no last_event after the compat rmmod")?;
    let actor = event.actor.ok_or("the compat unload has no actor")?;
    ensure!(
        event.kind == "unload" && actor.pid == ran.pid && actor.comm == COMM,
        "the compat rmmod shows as {} by {} pid {}, expected unload by {COMM} pid {}",
        event.kind,
        actor.comm,
        actor.pid,
        ran.pid
    );

    // A native load after them is still confirmed by finit_module's exit:
    // the compat load left nothing behind in the program's per-thread map.
    let ran = kmod::modprobe(MODULE)?;
    let status = wait_state(g, "loaded")?;
    let (_, loaded) = load_records(ran.pid, "modprobe")?;
    ensure!(
        loaded["source"] == "ebpf",
        "a native modprobe should be confirmed by its syscall's exit (source ebpf), \
         but was by {}: {loaded}",
        loaded["source"]
    );
    ensure!(
        status.drift_total == 0,
        "drift after the compat cycle: {}",
        status.summary()
    );
    Report::note(&format!(
        "compat-task: {COMPAT_BUSYBOX} modprobe/rmmod {MODULE} tracked, load confirmed through initstate"
    ));
    Ok(())
}
