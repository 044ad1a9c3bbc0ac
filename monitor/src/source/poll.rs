//! The poll source: re-reads /proc/modules every `poll_interval` and
//! reports what appeared and disappeared. Works everywhere (containers,
//! fake host roots, kernels without BPF), at the cost of latency.
use std::collections::BTreeMap;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{SourceMsg, SourceOptions, StartError, Started};
use crate::{
    event::{Raw, SourceEvent, boot_ns_now},
    host::{self, LoadedModule, ProcModuleState},
    names::ModuleName,
};

/// Module -> live (true) or in transition (false).
type View = BTreeMap<ModuleName, bool>;

fn view(loaded: &BTreeMap<ModuleName, LoadedModule>) -> View {
    loaded
        .iter()
        .map(|(n, m)| (n.clone(), m.state == ProcModuleState::Live))
        .collect()
}

/// The events that turn `before` into `after`: a module that became live
/// is `Present`, one that vanished is `Absent`. Transitional states
/// (Loading, Unloading) wait for the next poll.
#[must_use]
pub fn diff(before: &View, after: &View) -> Vec<(Raw, ModuleName)> {
    let mut out = Vec::new();
    for (name, &live) in after {
        if live && before.get(name) != Some(&true) {
            out.push((Raw::Present, name.clone()));
        }
    }
    for name in before.keys() {
        if !after.contains_key(name) {
            out.push((Raw::Absent, name.clone()));
        }
    }
    out
}

pub(crate) async fn start(
    opts: &SourceOptions,
    tx: mpsc::Sender<SourceMsg>,
    cancel: CancellationToken,
) -> Result<Started, StartError> {
    let host = opts.host.clone();
    let read = move || -> Result<View, String> {
        match host::read_loaded(&host) {
            Ok(Some(loaded)) => Ok(view(&loaded)),
            // No /proc/modules: nothing can ever load; an empty view is right.
            Ok(None) => Ok(View::new()),
            Err(e) => Err(e.to_string()),
        }
    };
    let mut before = read().map_err(StartError::new)?;
    let period = opts.poll_interval;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let after = match read() {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "poll: reading /proc/modules failed; retrying next period");
                    continue;
                }
            };
            let now = boot_ns_now();
            for (raw, module) in diff(&before, &after) {
                if tx
                    .send(SourceMsg::Event(SourceEvent::observed(raw, module, now)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            before = after;
        }
    });
    Ok(Started {
        details: vec![format!("polling /proc/modules every {}", humantime(period))],
        guard: None,
        control: None,
        sync: None,
        ring: None,
    })
}

fn humantime(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[(&str, bool)]) -> View {
        items
            .iter()
            .map(|(n, l)| (ModuleName::from_kernel(n).unwrap(), *l))
            .collect()
    }

    #[test]
    fn diff_reports_appear_vanish_and_finished_loads() {
        let before = v(&[("dm_crypt", true), ("nvme_tcp", false), ("vfio_pci", true)]);
        let after = v(&[("dm_crypt", true), ("nvme_tcp", true), ("uio", false)]);
        let d = diff(&before, &after);
        let names: Vec<(Raw, &str)> = d.iter().map(|(r, n)| (*r, n.as_str())).collect();
        assert_eq!(
            names,
            vec![(Raw::Present, "nvme_tcp"), (Raw::Absent, "vfio_pci")]
        );
    }
}
