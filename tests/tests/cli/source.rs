//! Choosing the event source where eBPF cannot work: `--source ebpf` refuses
//! to start and says why; `--source auto` falls back and reports the reason
//! in /status.
//!
//! Assumption: the eBPF source needs the kernel's `module:module_load`
//! tracepoint. The daemon looks for it under the host root, then in the real
//! `/sys/kernel/tracing` and `/sys/kernel/debug/tracing`; a fake root has
//! none, so only the real machine decides. Where this test process cannot
//! read the tracepoint's format (a kernel without `CONFIG_MODULES`, like the
//! development machine, or no tracefs, or no permission), eBPF must fail and
//! the strict assertions apply. Where it can (a root CI runner on a stock
//! kernel), eBPF may legitimately start, and the tests accept exactly that
//! alternative: running with `source.active == "ebpf"`.
use std::path::Path;

use kmod_monitor_tests::{Daemon, FakeHost, args, pretty};
use serde_json::Value;

/// Whether this process can read the real module tracepoint's format.
fn module_tracepoint_readable() -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|d| std::fs::File::open(Path::new(d).join("events/module/module_load/format")).is_ok())
}

/// Whether `reason` says why eBPF is unusable here: the tracepoint it could
/// not find or read, or a binary built without the eBPF object.
fn explains_ebpf_failure(reason: &str) -> bool {
    reason.contains("module_load") || reason.contains("AYA_BUILD_SKIP")
}

#[test]
fn ebpf_source_without_module_tracepoints_exits_2_and_says_why() {
    let host = FakeHost::debian_6_1();
    let started = Daemon::try_start(&host, &args!["--source", "ebpf"]);
    let out = match started {
        Ok(daemon) => {
            let status = daemon.status();
            assert!(
                module_tracepoint_readable(),
                "--source ebpf started without module tracepoints: {}\n{daemon}",
                pretty(&status)
            );
            // The other legitimate outcome (see the module doc).
            assert_eq!(status["source"]["active"], "ebpf", "{daemon}");
            return;
        }
        Err(out) => out,
    };
    out.expect_code(2)
        .stderr_has(&["event source ebpf could not start", "ebpf: "]);
    if !module_tracepoint_readable() {
        let reason = out
            .stderr
            .split_once("ebpf: ")
            .map(|(_, r)| r)
            .unwrap_or_default();
        assert!(
            explains_ebpf_failure(reason),
            "the message should name the missing tracepoint (or the eBPF-less build): {out}"
        );
    }
}

#[test]
fn auto_source_falls_back_and_reports_why_ebpf_is_unavailable() {
    let host = FakeHost::debian_6_1();
    let daemon = Daemon::start(&host, &args!["--source", "auto", "--poll-interval", "1"]);
    let status = daemon.status();
    let source = &status["source"];
    let active = source["active"].as_str().unwrap_or_default();
    let unavailable = source["unavailable"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if active == "ebpf" {
        assert!(
            module_tracepoint_readable(),
            "eBPF cannot run without module tracepoints: {}",
            pretty(source)
        );
        assert_eq!(unavailable, Vec::<Value>::new(), "{}", pretty(source));
        return;
    }
    // auto tries ebpf, uevent, poll in that order: everything before the
    // active one is listed as unavailable, in order, with a reason.
    let order = ["ebpf", "uevent", "poll"];
    let position = order
        .iter()
        .position(|s| *s == active)
        .unwrap_or_else(|| panic!("unknown active source {active:?}: {}", pretty(source)));
    let listed: Vec<&str> = unavailable
        .iter()
        .filter_map(|u| u["source"].as_str())
        .collect();
    assert_eq!(listed, order[..position], "{}", pretty(source));
    for u in &unavailable {
        let reason = u["reason"].as_str().unwrap_or_default();
        assert!(
            !reason.trim().is_empty(),
            "empty reason: {}",
            pretty(source)
        );
    }
    if !module_tracepoint_readable() {
        let reason = unavailable[0]["reason"].as_str().unwrap_or_default();
        assert!(
            explains_ebpf_failure(reason),
            "ebpf's reason should name the missing tracepoint: {}",
            pretty(source)
        );
    }
}
