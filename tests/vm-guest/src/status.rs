//! The `/status` document as the daemon's HTTP contract defines it, typed
//! strictly enough that a missing or mistyped field is a test failure that
//! names the field.
use serde::Deserialize;

/// `GET /status`.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    /// The daemon's version.
    pub version: String,
    /// `uname -r` as the daemon sees it.
    pub kernel_release: String,
    /// Whether the kernel supports loadable modules.
    pub modules_supported: bool,
    /// Which event source is active and why others are not.
    pub source: Source,
    /// Event counters.
    pub events: Events,
    /// How many times reconciliation found the tracked state wrong.
    pub drift_total: u64,
    /// How many times the tracked state was reconciled with /proc/modules.
    pub reconciles: u64,
    /// Requirement groups with their modules.
    pub groups: Vec<Group>,
    /// uid, gid and capabilities after the privilege drop.
    #[serde(default)]
    pub privileges: Option<Privileges>,
}

/// `status.privileges`.
#[derive(Debug, Clone, Deserialize)]
pub struct Privileges {
    pub uid: u32,
    pub gid: u32,
    pub effective: Vec<String>,
    pub permitted: Vec<String>,
    pub dropped: bool,
}

/// `status.source`.
#[derive(Debug, Clone, Deserialize)]
pub struct Source {
    /// `ebpf`, `uevent` or `poll`.
    pub active: String,
    /// Sources that could not be used, with reasons.
    pub unavailable: Vec<Unavailable>,
    /// Live facts about the active source (for eBPF: `attached: ...`).
    pub details: Vec<String>,
}

/// One entry of `source.unavailable`.
#[derive(Debug, Clone, Deserialize)]
pub struct Unavailable {
    /// The source's name.
    pub source: String,
    /// Why it is unavailable.
    pub reason: String,
}

/// `status.events`.
#[derive(Debug, Clone, Deserialize)]
pub struct Events {
    /// Events received from the active source.
    pub received: u64,
    /// Events the kernel side dropped.
    pub lost: u64,
    /// Records that could not be decoded.
    pub undecodable: u64,
    /// Refused unloads of a required module the kernel reported.
    pub unload_denied: u64,
    /// What the eBPF program kept out of the ring on purpose (eBPF only).
    pub kernel_filtered: Option<KernelFiltered>,
    /// What the eBPF program could not deliver, by reason (eBPF only).
    pub kernel_lost: Option<KernelLost>,
}

/// `status.events.kernel_filtered`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct KernelFiltered {
    /// `module_request`s for names nothing requires.
    pub requests_untracked: u64,
    /// Refused unloads over the kernel's per-CPU rate limit.
    pub unload_denied_over_limit: u64,
}

/// `status.events.kernel_lost`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct KernelLost {
    pub ring_reserve_failed: u64,
    pub name_unreadable: u64,
    pub layout_unset: u64,
}

/// One requirement group.
#[derive(Debug, Clone, Deserialize)]
pub struct Group {
    /// `base`, `v2-data-engine`, or a name from the config file.
    pub name: String,
    /// `all_of` (or another mode from the config file).
    pub mode: String,
    /// Whether the node satisfies the group.
    pub met: bool,
    /// The group's modules.
    pub modules: Vec<Module>,
}

/// One module of a group.
#[derive(Debug, Clone, Deserialize)]
pub struct Module {
    /// Normalised module name (`dm_crypt`).
    pub name: String,
    /// `loaded`, `builtin`, `loading`, `unloading`, `available` or `missing`.
    pub state: String,
    /// The most recent event for the module, if any.
    pub last_event: Option<Event>,
}

/// `last_event`.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    /// `load`, `loaded`, `load_failed`, `unload_begin`, `unload`,
    /// `unload_failed`, `request` or `drift`.
    pub kind: String,
    /// CLOCK_BOOTTIME of the event, in nanoseconds.
    pub boot_ns: u64,
    /// CLOCK_BOOTTIME when the daemon's tracker applied it.
    pub applied_ns: u64,
    /// Who caused it, when the source knows.
    pub actor: Option<Actor>,
}

/// The process behind an event.
#[derive(Debug, Clone, Deserialize)]
pub struct Actor {
    /// Thread id.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// The task's comm (`rmmod`).
    pub comm: String,
    /// cgroup v2 id.
    pub cgroup_id: u64,
}

impl Status {
    /// The group called `name`.
    pub fn group(&self, name: &str) -> Result<&Group, String> {
        self.groups
            .iter()
            .find(|g| g.name == name)
            .ok_or_else(|| format!("/status has no group {name:?}; it has: {}", self.summary()))
    }

    /// Module `name` as listed in group `group`.
    pub fn module(&self, group: &str, name: &str) -> Result<&Module, String> {
        self.group(group)?
            .modules
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| format!("group {group} has no module {name:?}: {}", self.summary()))
    }

    /// The state of module `name` in group `group`.
    pub fn state(&self, group: &str, name: &str) -> Result<&str, String> {
        Ok(&self.module(group, name)?.state)
    }

    /// Whether group `name` is met.
    pub fn met(&self, name: &str) -> Result<bool, String> {
        Ok(self.group(name)?.met)
    }

    /// One line for failure messages:
    /// `source=ebpf base=met[dm_crypt:loaded/unload] ...`.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "source={} received={} lost={} drift={}",
            self.source.active, self.events.received, self.events.lost, self.drift_total
        );
        for g in &self.groups {
            let modules: Vec<String> = g
                .modules
                .iter()
                .map(|m| {
                    let last = m.last_event.as_ref().map_or("-", |e| e.kind.as_str());
                    format!("{}:{}/{last}", m.name, m.state)
                })
                .collect();
            out.push_str(&format!(
                " {}={}[{}]",
                g.name,
                if g.met { "met" } else { "unmet" },
                modules.join(",")
            ));
        }
        out
    }
}
