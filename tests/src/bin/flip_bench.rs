//! Part of `cargo xtask bench`: how long a flip of Longhorn's
//! `v2-data-engine` setting takes to reach the daemon's /status (watch
//! write accepted by the apiserver → watch event → kube-rs watcher →
//! decision → publish), and what the cluster watch costs in memory. The
//! control plane is the real kube-apiserver and etcd of the cluster tests
//! (`apiserver`), on loopback; the daemon is the real binary with the
//! shipped ServiceAccount's token. Prints one JSON object.
use std::{
    ffi::OsString,
    process::ExitCode,
    time::{Duration, Instant},
};

use kmod_monitor_tests::{
    Daemon, FakeHost,
    apiserver::{ControlPlane, LONGHORN_CRD, LONGHORN_NAMESPACE},
    args,
};
use serde_json::{Value, json};

const V2: &str = "v2-data-engine";
const NODE: &str = "node-1";
/// Flips measured (alternating true/false).
const FLIPS: usize = 200;

fn enabled(d: &Daemon) -> Value {
    d.status()["v2"]["enablement"][V2]["enabled"].clone()
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short sample"
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> ExitCode {
    let k8s = ControlPlane::start();
    k8s.namespace(LONGHORN_NAMESPACE);
    k8s.install_crds(&[LONGHORN_CRD]);
    k8s.apply_daemon_rbac();
    k8s.set_setting(V2, "false");
    k8s.set_setting("data-engine-hugepage-enabled", "true");
    k8s.set_node(NODE, &[]);
    let host = FakeHost::debian_6_1();
    let kubeconfig = k8s.service_account_kubeconfig();
    let common: Vec<OsString> = Vec::from(args!["--source", "poll", "--node-name", NODE]);

    let mut off = common.clone();
    off.extend(args!["--longhorn", "off"]);
    let baseline = Daemon::start(&host, &off);
    std::thread::sleep(Duration::from_secs(2));
    let rss_off = rss_kib(baseline.pid());
    drop(baseline);

    let mut on = common;
    on.extend(args!["--kubeconfig", kubeconfig.as_path()]);
    let mut d = Daemon::start(&host, &on);
    d.wait_for("the first list", Duration::from_secs(10), |s| {
        s["v2"]["enablement"][V2]["enabled"] == false
    });
    std::thread::sleep(Duration::from_secs(2));
    let rss_on_start = rss_kib(d.pid());

    let mut ms = Vec::with_capacity(FLIPS);
    for i in 0..FLIPS {
        let want = i % 2 == 0;
        let t0 = Instant::now();
        k8s.set_setting(V2, if want { "true" } else { "false" });
        loop {
            if enabled(&d) == want {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "flip {i} to {want} not seen in 10 s"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let rss_on_end = rss_kib(d.pid());
    ms.sort_by(f64::total_cmp);
    #[expect(clippy::cast_precision_loss, reason = "a sample count")]
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    let out = json!({
        "flips": FLIPS,
        "flip_to_status_ms": {
            "p50": percentile(&ms, 0.5),
            "p99": percentile(&ms, 0.99),
            "max": ms.last(),
            "mean": mean,
        },
        "rss_kib": {
            "longhorn_off": rss_off,
            "watching_start": rss_on_start,
            "watching_after_flips": rss_on_end,
        },
    });
    println!("{out}");
    ExitCode::SUCCESS
}
