//! Where one event's time goes, for `cargo xtask bench`: with the `bench`
//! feature, the source and the daemon stamp each module event with
//! CLOCK_BOOTTIME as it passes each stage (the ring thread woken for it,
//! taken from the ring, decoded, taken by the tracker, applied by it,
//! counted in the metrics, published, its actor enriched, its record
//! handed to the forensic log), and on a clean stop the daemon writes a
//! summary to the file named by `KMOD_MONITOR_BENCH_STAGES`. Without the
//! feature every function here is empty and compiles away: release builds
//! carry no stamps.
//!
//! Events are keyed by their in-kernel timestamp (`boot_ns`), so no type
//! on the event path changes. A stage that did not happen for an event (no
//! actor to enrich, no log to hand to) is absent from its chain; each
//! stage's time is measured from the stage before it in time.

/// A point an event passes on its way from the ring to the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The ring thread's poll(2) last returned before the record was
    /// taken. A record whose in-kernel time is later (it came while the
    /// thread was awake, or after a quiet-hold timeout or an interrupted
    /// poll, which reuse the last wake) is stamped at its own time, so it
    /// counts 0 here.
    Woke,
    /// Taken from the ring buffer by the reader: after the records taken
    /// before it in the same batch, and any wait for the shared lock or
    /// for room in the loop's queue.
    Drained,
    /// Decoded into an event.
    Decoded,
    /// Taken by the tracker (after the records drained before it in the
    /// same batch; for the uevent and poll sources, after the queue from
    /// their reader task and a turn of the daemon's loop).
    Received,
    /// Applied by the tracker (`applied_ns`).
    Tracked,
    /// Counted in the metrics.
    Metrics,
    /// The /status document for the state including it built.
    StatusBuilt,
    /// The gauges derived from that document set.
    GaugesSet,
    /// The set of alerts that should fire computed and handed over.
    AlertsComputed,
    /// The state including it published (the Kubernetes reporter told,
    /// /status swapped).
    Published,
    /// Its actor enriched from /proc.
    Enriched,
    /// Its forensic record handed to the log's writer.
    HandedOff,
}

impl Stage {
    /// Every stage, in index order.
    pub const ALL: [Self; 12] = [
        Self::Woke,
        Self::Drained,
        Self::Decoded,
        Self::Received,
        Self::Tracked,
        Self::Metrics,
        Self::StatusBuilt,
        Self::GaugesSet,
        Self::AlertsComputed,
        Self::Published,
        Self::Enriched,
        Self::HandedOff,
    ];

    /// What the time up to this stage is spent on, for the report.
    #[must_use]
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Woke => "ring wake-up (poll(2) returned)",
            Self::Drained => "ring drain (the batch's records before it)",
            Self::Decoded => "decode",
            Self::Received => "hand-over to the tracker",
            Self::Tracked => "tracker (applied_ns)",
            Self::Metrics => "metrics",
            Self::StatusBuilt => "publish: /status document built",
            Self::GaugesSet => "publish: gauges set",
            Self::AlertsComputed => "publish: alert set computed",
            Self::Published => "publish: Kubernetes hand-off, /status swap",
            Self::Enriched => "actor enrichment (/proc)",
            Self::HandedOff => "forensic record and hand-off",
        }
    }
}

/// CLOCK_BOOTTIME now in bench builds; 0 otherwise (never read then).
#[must_use]
#[inline]
pub fn now() -> u64 {
    if cfg!(feature = "bench") {
        crate::event::boot_ns_now()
    } else {
        0
    }
}

/// The ring thread's poll(2) returned: the records it takes next were
/// woken for at this moment (or were committed after it).
#[inline]
pub fn woke() {
    #[cfg(feature = "bench")]
    imp::set_woke(now());
}

/// Stamps [`Stage::Woke`] of the event `boot_ns` taken by this thread
/// after its last [`woke`] (nothing for a reader that never called it).
#[inline]
pub fn mark_woke(boot_ns: u64) {
    #[cfg(feature = "bench")]
    imp::mark_woke(boot_ns);
    #[cfg(not(feature = "bench"))]
    let _ = boot_ns;
}

/// Stamps `stage` of the event `boot_ns` now.
#[inline]
pub fn mark(boot_ns: u64, stage: Stage) {
    mark_at(boot_ns, stage, now());
}

/// Stamps `stage` of the event `boot_ns` at `at_ns`.
#[inline]
pub fn mark_at(boot_ns: u64, stage: Stage, at_ns: u64) {
    #[cfg(feature = "bench")]
    imp::mark_at(boot_ns, stage, at_ns);
    #[cfg(not(feature = "bench"))]
    let _ = (boot_ns, stage, at_ns);
}

/// Marks the event `boot_ns` as decisive: it changed whether a required
/// module meets its requirement (a load's result, a free). These are the
/// events the latency runs time, summarised on their own.
#[inline]
pub fn mark_decisive(boot_ns: u64) {
    #[cfg(feature = "bench")]
    imp::mark_decisive(boot_ns);
    #[cfg(not(feature = "bench"))]
    let _ = boot_ns;
}

/// Stamps `stage` now on every event the daemon has received and not yet
/// closed (a publish covers them all).
#[inline]
pub fn mark_received(stage: Stage) {
    #[cfg(feature = "bench")]
    imp::mark_received(stage, now());
    #[cfg(not(feature = "bench"))]
    let _ = stage;
}

/// Ends the daemon's loop turn: every received event is done (called only
/// when nothing applied waits for the loop).
#[inline]
pub fn close() {
    #[cfg(feature = "bench")]
    imp::close();
}

/// Writes the summary to `$KMOD_MONITOR_BENCH_STAGES`, if set.
#[inline]
pub fn dump() {
    #[cfg(feature = "bench")]
    imp::dump();
}

#[cfg(feature = "bench")]
mod imp {
    use std::sync::{Mutex, PoisonError};

    use serde_json::{Value, json};

    use super::Stage;

    const STAGES: usize = Stage::ALL.len();
    /// Events still on their way; past this the oldest is dropped (an
    /// event the daemon never receives as a module event).
    const OPEN_MAX: usize = 4096;
    /// Finished events kept for the summary.
    const DONE_MAX: usize = 200_000;

    /// An event's in-kernel time, its stamps (0: not passed) and whether
    /// it was decisive.
    type Stamps = (u64, [u64; STAGES], bool);

    struct State {
        open: Vec<Stamps>,
        done: Vec<Stamps>,
    }

    static STATE: Mutex<State> = Mutex::new(State {
        open: Vec::new(),
        done: Vec::new(),
    });

    std::thread_local! {
        /// When this thread's poll(2) last returned (0: never).
        static WOKE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    pub fn set_woke(at_ns: u64) {
        WOKE.with(|w| w.set(at_ns));
    }

    pub fn mark_woke(boot_ns: u64) {
        let woke = WOKE.with(std::cell::Cell::get);
        if woke != 0 {
            mark_at(boot_ns, Stage::Woke, woke.max(boot_ns));
        }
    }

    fn index(stage: Stage) -> usize {
        Stage::ALL.iter().position(|s| *s == stage).unwrap_or(0)
    }

    pub fn mark_at(boot_ns: u64, stage: Stage, at_ns: u64) {
        let mut s = STATE.lock().unwrap_or_else(PoisonError::into_inner);
        let i = index(stage);
        if let Some(e) = s.open.iter_mut().rev().find(|e| e.0 == boot_ns) {
            if e.1[i] == 0 {
                e.1[i] = at_ns;
            }
            return;
        }
        if s.open.len() >= OPEN_MAX {
            s.open.remove(0);
        }
        let mut stamps = [0; STAGES];
        stamps[i] = at_ns;
        s.open.push((boot_ns, stamps, false));
    }

    pub fn mark_decisive(boot_ns: u64) {
        let mut s = STATE.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = s.open.iter_mut().rev().find(|e| e.0 == boot_ns) {
            e.2 = true;
        }
    }

    pub fn mark_received(stage: Stage, at_ns: u64) {
        let (received, i) = (index(Stage::Received), index(stage));
        let mut s = STATE.lock().unwrap_or_else(PoisonError::into_inner);
        for e in s.open.iter_mut().filter(|e| e.1[received] != 0) {
            if e.1[i] == 0 {
                e.1[i] = at_ns;
            }
        }
    }

    pub fn close() {
        let received = index(Stage::Received);
        let mut s = STATE.lock().unwrap_or_else(PoisonError::into_inner);
        let State { open, done } = &mut *s;
        let mut keep = Vec::with_capacity(open.len());
        for e in open.drain(..) {
            if e.1[received] == 0 {
                keep.push(e);
            } else if done.len() < DONE_MAX {
                done.push(e);
            }
        }
        *open = keep;
    }

    /// The `q` quantile of sorted `v` (nearest rank).
    fn quantile(v: &[f64], q: f64) -> f64 {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into a sample list"
        )]
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v.get(i).copied().unwrap_or(f64::NAN)
    }

    /// The stages of the decisive events (the ones the latency runs time)
    /// and, under `all`, of every finished event.
    pub fn summary(done: &[Stamps]) -> Value {
        let decisive: Vec<Stamps> = done.iter().filter(|e| e.2).copied().collect();
        let mut out = per_stage(&decisive);
        out["all"] = per_stage(done);
        out
    }

    /// Per stage, the time from the stage before it (in time; the kernel's
    /// event for the first), over `done`.
    fn per_stage(done: &[Stamps]) -> Value {
        let mut per: Vec<Vec<f64>> = vec![Vec::new(); STAGES];
        let mut total: Vec<Vec<f64>> = vec![Vec::new(); STAGES];
        for (boot_ns, stamps, _) in done {
            let mut chain: Vec<(u64, usize)> = stamps
                .iter()
                .enumerate()
                .filter(|(_, t)| **t != 0)
                .map(|(i, t)| (*t, i))
                .collect();
            chain.sort_unstable();
            let mut prev = *boot_ns;
            for (t, i) in chain {
                #[expect(clippy::cast_precision_loss, reason = "microseconds for a report")]
                {
                    per[i].push(t.saturating_sub(prev) as f64 / 1e3);
                    total[i].push(t.saturating_sub(*boot_ns) as f64 / 1e3);
                }
                prev = t;
            }
        }
        let mut rows: Vec<(f64, Value)> = Vec::new();
        for (i, stage) in Stage::ALL.iter().enumerate() {
            let (v, c) = (&mut per[i], &mut total[i]);
            if v.is_empty() {
                continue;
            }
            v.sort_by(f64::total_cmp);
            c.sort_by(f64::total_cmp);
            let since_event = quantile(c, 0.5);
            rows.push((
                since_event,
                json!({
                    "stage": stage.describe(),
                    "n": v.len(),
                    "p50_us": quantile(v, 0.5),
                    "p90_us": quantile(v, 0.9),
                    "p99_us": quantile(v, 0.99),
                    "since_event_p50_us": since_event,
                }),
            ));
        }
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        json!({
            "events": done.len(),
            "stages": rows.into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
        })
    }

    pub fn dump() {
        let Some(path) = std::env::var_os("KMOD_MONITOR_BENCH_STAGES") else {
            return;
        };
        let s = STATE.lock().unwrap_or_else(PoisonError::into_inner);
        let text = summary(&s.done).to_string();
        if let Err(e) = std::fs::write(&path, text) {
            tracing::warn!(path = ?path, error = %e, "could not write the bench stage summary");
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn each_stage_counts_from_the_one_before_it_in_time() {
            let mut a = [0; STAGES];
            a[index(Stage::Drained)] = 1_100_000;
            a[index(Stage::Tracked)] = 1_300_000;
            // Published before enrichment: enrichment counts from it.
            a[index(Stage::Published)] = 1_400_000;
            a[index(Stage::Enriched)] = 1_900_000;
            let s = summary(&[(1_000_000, a, true), (2_000_000, [0; STAGES], false)]);
            assert_eq!(s["events"], 1, "only the decisive event");
            assert_eq!(s["all"]["events"], 2);
            let names: Vec<&str> = s["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["stage"].as_str().unwrap())
                .collect();
            assert_eq!(
                names,
                [
                    "ring drain (the batch's records before it)",
                    "tracker (applied_ns)",
                    "publish: Kubernetes hand-off, /status swap",
                    "actor enrichment (/proc)"
                ]
            );
            let p50: Vec<f64> = s["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["p50_us"].as_f64().unwrap())
                .collect();
            assert_eq!(p50, [100.0, 200.0, 100.0, 500.0]);
        }
    }
}
