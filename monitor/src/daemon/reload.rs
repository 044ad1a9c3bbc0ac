//! What is required changed: SIGHUP re-reads the config file, the cluster
//! watch flips V2 on or off, the hugepage pool is re-read. Each re-decides
//! the groups the tracker follows and records what changed and why.
use super::{Daemon, log_group, records};
use crate::{
    config::{FileConfig, Inputs, RunSettings, load_config, settings},
    event::boot_ns_now,
    forensic::{RecordKind, chain::sha256_hex},
    longhorn::{ClusterView, v2::Flip},
    requirements::{self, V2_GROUP},
    tracker::GroupChange,
};

impl Daemon {
    /// SIGHUP: re-read the config file and apply every key that can be
    /// applied live; list the others as needing a restart, or as still
    /// overridden by a flag. A bad file is rejected whole and the current
    /// settings stay.
    pub(super) fn reload(&mut self) {
        let Some(path) = self.settings.common.config_path.clone() else {
            tracing::info!("SIGHUP: no --config file; nothing to reload");
            return;
        };
        let bytes = std::fs::read(&path).ok();
        let digest = bytes.as_deref().map(sha256_hex);
        let file = path.display().to_string();
        let reloaded = load_config(&path)
            .map_err(|e| e.to_string())
            .and_then(|new: FileConfig| {
                settings::reload(&self.settings.inputs, new).map_err(|e| e.to_string())
            });
        let reload = match reloaded {
            Ok(r) => r,
            Err(error) => {
                tracing::error!(%error, "SIGHUP: new config rejected; keeping the current one");
                let r = records::config_reload(
                    &self.shared.lock().tracker,
                    records::ReloadInfo {
                        file,
                        digest,
                        outcome: Err(error),
                    },
                    boot_ns_now(),
                );
                self.append(r);
                return;
            }
        };
        apply_live(&mut self.settings, &reload.settings);
        self.v2.local = self.settings.common.v2_local;
        self.v2.grace = self.settings.common.cluster.grace;
        let flips = self.v2.decide();
        self.record_flips(&flips);
        let changes = self.track_groups();
        self.refresh_checks();
        let groups = records::group_names(&self.shared.lock().tracker);
        tracing::info!(
            path = %path.display(),
            applied = ?reload.applied,
            restart_required = ?reload.restart,
            overridden_by_flag = ?reload.overridden,
            groups = ?groups,
            "SIGHUP: config reloaded"
        );
        if !reload.restart.is_empty() {
            tracing::warn!(keys = ?reload.restart, "SIGHUP: these changed keys take effect only after a restart");
        }
        for c in &changes {
            tracing::info!(group = %c.group, met = c.met, "requirement after reload");
        }
        let r = records::config_reload(
            &self.shared.lock().tracker,
            records::ReloadInfo {
                file,
                digest,
                outcome: Ok(records::ReloadKeys {
                    applied: &reload.applied,
                    restart_required: &reload.restart,
                    overridden: &reload.overridden,
                    changes: &changes,
                }),
            },
            boot_ns_now(),
        );
        self.append(r);
        self.record_group_changes(&changes, RecordKind::ConfigReload);
        let report = self.shared.lock().tracker.report();
        for g in &report {
            log_group(g);
        }
    }

    /// The cluster watch saw a change.
    pub(super) fn on_view(&mut self, view: ClusterView) {
        tracing::debug!(?view, "longhorn: cluster view");
        let flips = self.v2.set_view(view);
        self.record_flips(&flips);
        if flips.iter().any(|f| f.requirement == V2_GROUP) {
            let changes = self.track_groups();
            self.record_group_changes(&changes, RecordKind::RequirementEnablement);
            let report = self.shared.lock().tracker.report();
            for g in &report {
                log_group(g);
            }
        }
        // The version in force, the memory size and the kubelet's capacity
        // change the checks without flipping any enablement.
        self.rejudge_checks();
    }

    /// Gives the tracker the groups the settings and the V2 decision enable;
    /// returns the groups that flipped.
    fn track_groups(&mut self) -> Vec<GroupChange> {
        let groups = requirements::resolve(
            &self.settings.common.groups,
            self.v2.v2.enabled == Some(true),
        );
        let changes = self.shared.lock().tracker.set_groups(groups);
        self.refresh_boot_facts();
        changes
    }

    fn record_group_changes(&mut self, changes: &[GroupChange], cause: RecordKind) {
        for r in records::group_changes(None, changes, cause, boot_ns_now()) {
            self.append(r);
        }
    }

    /// Logs and records enablement flips.
    fn record_flips(&mut self, flips: &[Flip]) {
        for f in flips {
            match f.now.enabled {
                Some(true) => {
                    tracing::warn!(requirement = f.requirement, source = f.now.source.as_str(), reason = %f.now.reason, "requirement now ENABLED");
                }
                Some(false) => {
                    tracing::info!(requirement = f.requirement, source = f.now.source.as_str(), reason = %f.now.reason, "requirement now disabled");
                }
                None => {
                    tracing::error!(requirement = f.requirement, reason = %f.now.reason, "requirement now UNKNOWN");
                }
            }
            self.append(records::enablement(f, boot_ns_now()));
        }
    }

    /// Re-reads the host facts and re-judges the checks; records and logs
    /// each check whose verdict changed.
    pub(super) fn refresh_checks(&mut self) {
        self.v2.refresh_facts(&self.settings.common.host);
        self.rejudge_checks();
    }

    /// Re-judges the checks from the facts already read (after a cluster
    /// change or a reload); records and logs what changed.
    pub(super) fn rejudge_checks(&mut self) {
        let severity =
            crate::requirements::v2_severity(self.shared.lock().tracker.groups()).to_owned();
        let now = self.v2.checks(&self.settings.common.groups, &severity);
        for v in &now {
            let was = self
                .checks
                .iter()
                .find(|c| c.name == v.name)
                .and_then(|c| c.met);
            let (Some(was), Some(met)) = (was, v.met) else {
                continue;
            };
            if was == met {
                continue;
            }
            if met {
                tracing::info!(requirement = v.name, detail = %v.info.detail, "requirement met again");
            } else {
                tracing::error!(requirement = v.name, severity = %v.severity, detail = %v.info.detail, fix = ?v.info.fix, "requirement NO LONGER met");
            }
            self.append(records::requirement_flip(
                v.name,
                was,
                met,
                v.info.detail.clone(),
                boot_ns_now(),
            ));
        }
        self.checks = now;
    }
}

/// Copies the keys that apply live ([`settings::KEYS`]) from a reload's
/// settings into the running ones; the rest keep their start-up values
/// until a restart. Destructured in full, so a new setting must be sorted
/// here.
fn apply_live(running: &mut RunSettings, new: &RunSettings) {
    let RunSettings {
        common,
        listen: _,
        source: _,
        reconcile_interval,
        poll_interval: _,
        ring_buffer_bytes: _,
        alertmanager: _,
        alert_resend_interval: _,
        alert_client: _,
        web_config_file: _,
        runbook_url,
        user: _,
        keep_privileges: _,
        event_log: _,
        k8s: _,
        inputs,
    } = new;
    running.reconcile_interval = *reconcile_interval;
    running.runbook_url.clone_from(runbook_url);
    running.common.groups.clone_from(&common.groups);
    running.common.v2_local = common.v2_local;
    running.common.cluster.grace = common.cluster.grace;
    // The next SIGHUP compares with this file.
    running.inputs = Inputs {
        flags: inputs.flags.clone(),
        file: inputs.file.clone(),
    };
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{flags::RunFlags, parse_config, settings::resolve_run};

    fn settings(text: &str) -> RunSettings {
        let file = parse_config(text, std::path::Path::new("/c.toml")).unwrap();
        resolve_run(&RunFlags::default(), Some(file)).unwrap()
    }

    #[test]
    fn live_keys_are_copied_and_restart_keys_are_not() {
        let mut running = settings("reconcile_interval = 3600\nlisten = \"127.0.0.1:1\"\n");
        let new = settings(
            "reconcile_interval = 1\nlisten = \"127.0.0.1:2\"\nrunbook_url = \"http://r\"\nlonghorn_grace = 9\n",
        );
        apply_live(&mut running, &new);
        assert_eq!(running.reconcile_interval, Duration::from_secs(1));
        assert_eq!(running.runbook_url, "http://r");
        assert_eq!(running.common.cluster.grace, Duration::from_secs(9));
        assert_eq!(running.listen.port(), 1, "listen needs a restart");
        assert_eq!(running.inputs.file, new.inputs.file);
    }
}
