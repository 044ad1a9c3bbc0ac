//! Issue 12's optional `ublk` group on a real kernel: switched on in the
//! config file, it follows `rmmod ublk_drv` and `modprobe ublk_drv` (with
//! their actors), and its `ublk-kernel` check (≥ 6.0) is met on 6.x and
//! unmet on 5.10. Where the kernel ships no ublk_drv (Debian's 5.10 and
//! 6.1 are built without CONFIG_BLK_DEV_UBLK), the group is unmet with
//! the module `missing`.
use std::fs;

use crate::{Outcome, ensure, kmod, report::Report, scenarios::Guest, status::Status};

const GROUP: &str = "ublk";
const MODULE: &str = "ublk_drv";
const KERNEL_CHECK: &str = "ublk-kernel";

/// Whether this kernel ships `ublk_drv` as a module (modules.dep).
fn shipped(release: &str) -> Result<bool, String> {
    let dep = format!("/lib/modules/{release}/modules.dep");
    let text = fs::read_to_string(&dep).map_err(|e| format!("reading {dep}: {e}"))?;
    Ok(text.lines().any(|l| {
        l.split(':')
            .next()
            .and_then(|path| path.rsplit('/').next())
            .is_some_and(|file| file.starts_with("ublk_drv.ko"))
    }))
}

/// Whether `release` (`uname -r`) is at least 6.0, as `ublk-kernel` asks.
fn at_least_6_0(release: &str) -> Result<bool, String> {
    let major = release
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .ok_or_else(|| format!("no major version in the kernel release {release:?}"))?;
    Ok(major >= 6)
}

/// The load or unload of [`MODULE`] just seen must name `comm` pid `pid`.
fn expect_actor(status: &Status, kinds: &[&str], comm: &str, pid: u32) -> Outcome {
    let event = status
        .module(GROUP, MODULE)?
        .last_event
        .clone()
        .ok_or_else(|| format!("{MODULE} has no last_event: {}", status.summary()))?;
    let actor = event.actor.ok_or("the event has no actor")?;
    ensure!(
        kinds.contains(&event.kind.as_str()) && actor.comm == comm && actor.tgid == pid,
        "{MODULE}'s last event is {} by {} pid {}, expected {kinds:?} by {comm} pid {pid}",
        event.kind,
        actor.comm,
        actor.tgid
    );
    Ok(())
}

/// `[groups.ublk] enabled = true`: unmet on `rmmod ublk_drv`, met on
/// `modprobe ublk_drv`; `ublk-kernel` met exactly on kernels ≥ 6.0.
pub fn ublk_group(g: &mut Guest, config: &str) -> Outcome {
    let release = kmod::kernel_release()?;
    let shipped = shipped(&release)?;
    let original = fs::read_to_string(config).map_err(|e| format!("reading {config}: {e}"))?;
    fs::write(
        config,
        format!("{original}\n[groups.{GROUP}]\nenabled = true\n"),
    )
    .map_err(|e| format!("writing {config}: {e}"))?;
    let result = run(g, shipped);
    fs::write(config, original).map_err(|e| format!("restoring {config}: {e}"))?;
    g.stop_daemon();
    result
}

fn run(g: &mut Guest, shipped: bool) -> Outcome {
    if shipped {
        kmod::ensure_unloaded(MODULE)?;
    }
    let first = g.start_daemon_with("ebpf", &[])?;
    let new_enough = at_least_6_0(&first.kernel_release)?;
    ensure!(
        first.met(KERNEL_CHECK)? == new_enough,
        "{KERNEL_CHECK} is {} on {}: {}",
        if new_enough { "unmet" } else { "met" },
        first.kernel_release,
        first.summary()
    );
    if !shipped {
        let state = first.state(GROUP, MODULE)?;
        ensure!(
            state == "missing" && !first.met(GROUP)?,
            "{} ships no {MODULE}, yet it is {state:?}: {}",
            first.kernel_release,
            first.summary()
        );
        Report::note(&format!(
            "ublk: {} ships no {MODULE}: the group is unmet with it missing",
            first.kernel_release
        ));
        return Ok(());
    }
    ensure!(
        first.state(GROUP, MODULE)? == "available" && !first.met(GROUP)?,
        "{MODULE} not loaded, yet: {}",
        first.summary()
    );
    let load = kmod::modprobe(MODULE)?;
    let loaded = g.api().wait_for("ublk met", |s| {
        Ok(s.state(GROUP, MODULE)? == "loaded" && s.met(GROUP)?)
    })?;
    expect_actor(&loaded, &["load", "loaded"], "modprobe", load.pid)?;
    let unload = kmod::rmmod(MODULE)?;
    let gone = g.api().wait_for("ublk unmet", |s| {
        Ok(s.state(GROUP, MODULE)? == "available" && !s.met(GROUP)?)
    })?;
    expect_actor(&gone, &["unload"], "rmmod", unload.pid)?;
    let load = kmod::modprobe(MODULE)?;
    let back = g.api().wait_for("ublk met again", |s| s.met(GROUP))?;
    expect_actor(&back, &["load", "loaded"], "modprobe", load.pid)?;
    ensure!(
        back.drift_total == 0 && back.met(KERNEL_CHECK)?,
        "after the cycle: {}",
        back.summary()
    );
    kmod::rmmod(MODULE)?;
    Ok(())
}
