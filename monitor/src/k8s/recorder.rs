//! Events on the Node, aggregated the way client-go's events.k8s.io/v1
//! recorder (`k8s.io/client-go/tools/events`) and kube-rs's `Recorder` do:
//! occurrences with the same key (the group and the Event type, hence the
//! same reason and action) within [`SERIES_WINDOW`] of the previous one
//! are one Event whose `series.count` grows. The note is the first
//! occurrence's: the API makes it immutable after creation. Pure: the
//! writer asks what is due and reports what it did.
//!
//! # Bound
//! Per group and type (so per reason): at most one new Event per
//! [`SERIES_WINDOW`] (a new series starts only after a quiet window), one
//! patch at its second occurrence (as client-go does, so a repeat shows at
//! once), then at most one patch per refresh interval (the heartbeat) and
//! one last patch when the series ends. A module that flaps without pause
//! for an hour costs each of its groups two Events (a Warning and a
//! Normal series) and, with the default 5-minute refresh, about 2 × 14
//! requests; never one request per flap.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime},
};

/// How long after its last occurrence a series still takes repeats
/// (client-go's `finishTime`, kube-rs's `CACHE_TTL`).
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// `type` of an Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventType {
    /// The group is met again.
    Normal,
    /// The group became unmet.
    Warning,
}

impl EventType {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

/// What makes occurrences one series.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub group: String,
    pub type_: EventType,
}

/// One series, as far as it has been written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Series {
    /// The Event's name once created.
    pub name: Option<String>,
    /// The first occurrence's note.
    pub note: String,
    /// When the first occurrence happened (`eventTime`).
    pub first: SystemTime,
    /// Occurrences so far.
    pub count: u64,
    /// The count the API holds (0 before the create).
    pub written: u64,
    /// The latest occurrence (`series.lastObservedTime`).
    pub last_observed: Instant,
    pub last_observed_wall: SystemTime,
    /// When the last patch was written.
    pub last_patch: Option<Instant>,
}

impl Series {
    /// When its next write is due, if one is pending.
    fn due(&self, refresh: Duration) -> Option<Instant> {
        if self.name.is_none() {
            return Some(self.last_observed);
        }
        if self.count <= self.written {
            return None;
        }
        if self.written <= 1 {
            // The second occurrence: show the repeat at once.
            return Some(self.last_observed);
        }
        let refresh_at = self.last_patch.map_or(self.last_observed, |t| t + refresh);
        Some(refresh_at.min(self.last_observed + SERIES_WINDOW))
    }
}

/// A write the writer should make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create the Event of this series (with `series` when `count > 1`).
    Create { key: Key, series: Series },
    /// Patch `series.count` and `series.lastObservedTime` of the Event.
    Patch { key: Key, series: Series },
}

/// What came of an [`Action`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Created under this name.
    Created(String),
    /// Patched to the count the action carried.
    Patched,
    /// The Event is gone (expired from the API): write it again as new.
    Gone,
}

/// Every live series.
#[derive(Debug, Default)]
pub struct Recorder {
    active: BTreeMap<Key, Series>,
    /// Series replaced by a new one while their last count was unwritten.
    finishing: Vec<(Key, Series)>,
}

impl Recorder {
    /// `times` more occurrences of `key` at `at` (`wall`), the latest with
    /// `note`.
    pub fn observe(&mut self, key: Key, note: &str, times: u64, at: Instant, wall: SystemTime) {
        if times == 0 {
            return;
        }
        if let Some(s) = self.active.get_mut(&key)
            && at.saturating_duration_since(s.last_observed) < SERIES_WINDOW
        {
            s.count += times;
            s.last_observed = at;
            s.last_observed_wall = wall;
            return;
        }
        let fresh = Series {
            name: None,
            note: note.to_owned(),
            first: wall,
            count: times,
            written: 0,
            last_observed: at,
            last_observed_wall: wall,
            last_patch: None,
        };
        if let Some(old) = self.active.insert(key.clone(), fresh)
            && old.name.is_some()
            && old.count > old.written
        {
            self.finishing.push((key, old));
        }
    }

    /// The first write due at `now`, if any.
    #[must_use]
    pub fn next(&self, now: Instant, refresh: Duration) -> Option<Action> {
        if let Some((key, series)) = self.finishing.first() {
            return Some(Action::Patch {
                key: key.clone(),
                series: series.clone(),
            });
        }
        self.active
            .iter()
            .filter(|(_, s)| s.due(refresh).is_some_and(|at| at <= now))
            .min_by_key(|(_, s)| s.due(refresh))
            .map(|(key, s)| {
                if s.name.is_none() {
                    Action::Create {
                        key: key.clone(),
                        series: s.clone(),
                    }
                } else {
                    Action::Patch {
                        key: key.clone(),
                        series: s.clone(),
                    }
                }
            })
    }

    /// When the next write becomes due (for the writer's timer).
    #[must_use]
    pub fn next_due(&self, refresh: Duration) -> Option<Instant> {
        if !self.finishing.is_empty() {
            return Some(Instant::now());
        }
        self.active.values().filter_map(|s| s.due(refresh)).min()
    }

    /// Records what became of `action`, done at `now`.
    pub fn done(&mut self, action: &Action, outcome: Outcome, now: Instant) {
        let (key, wrote) = match action {
            Action::Create { key, series } | Action::Patch { key, series } => (key, series),
        };
        if let Some(at) = self
            .finishing
            .iter()
            .position(|(k, s)| k == key && s.name == wrote.name && wrote.name.is_some())
        {
            // A finished series: written or gone, it is done either way.
            self.finishing.remove(at);
            return;
        }
        let Some(s) = self.active.get_mut(key) else {
            return;
        };
        match outcome {
            Outcome::Created(name) => {
                s.name = Some(name);
                s.written = wrote.count;
                s.last_patch = Some(now);
            }
            Outcome::Patched => {
                s.written = wrote.count;
                s.last_patch = Some(now);
            }
            Outcome::Gone => {
                s.name = None;
                s.written = 0;
            }
        }
    }

    /// Forgets series that ended (no occurrence for [`SERIES_WINDOW`])
    /// and are fully written.
    pub fn expire(&mut self, now: Instant) {
        self.active.retain(|_, s| {
            now.saturating_duration_since(s.last_observed) < SERIES_WINDOW
                || s.name.is_none()
                || s.count > s.written
        });
    }

    /// How many series are live (for tests and logs).
    #[must_use]
    pub fn len(&self) -> usize {
        self.active.len() + self.finishing.len()
    }

    /// Whether no series is live.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(type_: EventType) -> Key {
        Key {
            group: "base".to_owned(),
            type_,
        }
    }

    /// Performs every due action at `now`, all succeeding; returns them.
    fn drain(r: &mut Recorder, now: Instant, refresh: Duration) -> Vec<Action> {
        let mut done = Vec::new();
        while let Some(a) = r.next(now, refresh) {
            let outcome = match &a {
                Action::Create { .. } => Outcome::Created(format!("node-1.{}", done.len())),
                Action::Patch { .. } => Outcome::Patched,
            };
            r.done(&a, outcome, now);
            done.push(a);
            assert!(done.len() < 100, "no end to the actions");
        }
        done
    }

    #[test]
    fn a_repeat_joins_the_series_and_shows_at_once() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let refresh = Duration::from_secs(300);
        let mut r = Recorder::default();
        r.observe(key(EventType::Warning), "first", 1, t0, wall);
        let a = drain(&mut r, t0, refresh);
        assert!(
            matches!(&a[..], [Action::Create { series, .. }] if series.count == 1 && series.note == "first")
        );
        let t1 = t0 + Duration::from_secs(10);
        r.observe(key(EventType::Warning), "second", 1, t1, wall);
        let a = drain(&mut r, t1, refresh);
        assert!(
            matches!(&a[..], [Action::Patch { series, .. }] if series.count == 2 && series.note == "first"),
            "{a:?}"
        );
        // The third waits for the refresh.
        let t2 = t1 + Duration::from_secs(10);
        r.observe(key(EventType::Warning), "third", 1, t2, wall);
        assert!(drain(&mut r, t2, refresh).is_empty());
        assert_eq!(r.next_due(refresh), Some(t1 + refresh));
        let a = drain(&mut r, t1 + refresh, refresh);
        assert!(matches!(&a[..], [Action::Patch { series, .. }] if series.count == 3));
    }

    #[test]
    fn a_quiet_window_ends_the_series() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let refresh = Duration::from_secs(300);
        let mut r = Recorder::default();
        r.observe(key(EventType::Warning), "a", 1, t0, wall);
        drain(&mut r, t0, refresh);
        let later = t0 + SERIES_WINDOW;
        r.expire(later);
        assert!(r.is_empty());
        r.observe(key(EventType::Warning), "b", 1, later, wall);
        let a = drain(&mut r, later, refresh);
        assert!(matches!(&a[..], [Action::Create { series, .. }] if series.note == "b"));
    }

    #[test]
    fn a_gone_event_is_written_again_with_its_count() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let refresh = Duration::from_secs(300);
        let mut r = Recorder::default();
        r.observe(key(EventType::Normal), "a", 1, t0, wall);
        drain(&mut r, t0, refresh);
        r.observe(key(EventType::Normal), "a", 4, t0, wall);
        let Some(a @ Action::Patch { .. }) = r.next(t0, refresh) else {
            panic!("a patch is due")
        };
        r.done(&a, Outcome::Gone, t0);
        let a = drain(&mut r, t0, refresh);
        assert!(matches!(&a[..], [Action::Create { series, .. }] if series.count == 5));
    }

    /// The documented bound: a module flapping every second for an hour,
    /// with a 5-minute refresh, costs each type one create and about 14
    /// patches.
    #[test]
    fn an_hour_of_flapping_is_bounded() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let refresh = Duration::from_secs(300);
        let mut r = Recorder::default();
        let mut writes = Vec::new();
        for s in 0..3600 {
            let now = t0 + Duration::from_secs(s);
            let type_ = if s % 2 == 0 {
                EventType::Warning
            } else {
                EventType::Normal
            };
            r.observe(key(type_), "flap", 1, now, wall);
            writes.extend(drain(&mut r, now, refresh));
        }
        // Then quiet: the last counts are written when the series end.
        for s in (3600..3600 + 600).step_by(10) {
            let now = t0 + Duration::from_secs(s);
            writes.extend(drain(&mut r, now, refresh));
            r.expire(now);
        }
        let creates = writes
            .iter()
            .filter(|a| matches!(a, Action::Create { .. }))
            .count();
        assert_eq!(creates, 2, "one Event per type");
        assert!(writes.len() <= 2 * 15, "{} writes", writes.len());
        assert!(r.is_empty());
        let last_counts: Vec<u64> = writes
            .iter()
            .rev()
            .take(2)
            .map(|a| match a {
                Action::Create { series, .. } | Action::Patch { series, .. } => series.count,
            })
            .collect();
        assert_eq!(last_counts, [1800, 1800], "every flap counted");
    }
}
