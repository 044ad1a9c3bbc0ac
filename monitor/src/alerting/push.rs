//! The pusher: one coordinator and one task per Alertmanager.
//!
//! The coordinator keeps the [`Book`] and turns every change of the wanted
//! set (and every re-send tick) into a [`Batch`]: the whole POST body at
//! that moment, numbered. It publishes the batch on a `watch` channel, a
//! single slot that holds only the latest, so nothing queues up behind a
//! slow target.
//!
//! Each target's task takes the latest batch and delivers it on its own:
//! - one request in flight at a time;
//! - on failure, up to [`ATTEMPTS`] attempts with back-off from
//!   [`FIRST_BACKOFF`], doubling, at most [`MAX_BACKOFF`]; then it waits
//!   for the next change or re-send (the book keeps everything, so the next
//!   batch carries it again);
//! - a newer batch supersedes the current one at once while it waits to
//!   retry: its remaining attempts are dropped and the newer one is sent;
//! - a newer batch that arrives while a request is in flight lets that
//!   request finish for at most [`OVERTAKEN_GRACE`], then cancels it and
//!   sends the newer one. A healthy Alertmanager answers in milliseconds,
//!   so a burst of changes cannot starve it; a hung one gets the newer
//!   batch after at most the grace, not after its request timeout.
//!
//! A target never sends an older batch after a newer one: it only ever
//! moves to the latest. A hung or slow target delays no other target, and
//! the other targets' tasks never wait for it.
use std::{future::Future, sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{Book, PostableAlert, WantedSet, transport::PostError};
use crate::metrics::{Delivery, Metrics};

/// Attempts per batch before waiting for the next change or re-send.
pub const ATTEMPTS: u32 = 4;
/// First back-off between attempts; doubles each time.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest back-off between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How much longer a request in flight may run once a newer batch waits.
pub const OVERTAKEN_GRACE: Duration = Duration::from_secs(1);

/// The whole POST body at one moment.
#[derive(Debug)]
pub struct Batch {
    /// Increases by one per batch; a target only moves forward.
    pub seq: u64,
    pub alerts: Vec<PostableAlert>,
    /// CLOCK_BOOTTIME of the event behind it, for the latency log.
    pub trigger_boot_ns: Option<u64>,
}

/// Delivers one batch to one target.
pub trait Post: Send + Sync + 'static {
    /// POSTs the batch.
    fn post(&self, batch: &Batch) -> impl Future<Output = Result<(), PostError>> + Send;
}

/// The back-off after failed attempt number `attempt` (from 1), or `None`
/// when that was the last attempt.
#[must_use]
pub fn backoff(attempt: u32) -> Option<Duration> {
    if attempt == 0 || attempt >= ATTEMPTS {
        return None;
    }
    let factor = 2_u32.saturating_pow(attempt - 1);
    Some(FIRST_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF))
}

/// Runs the coordinator until `cancel`: book-keeping here, delivery in one
/// task per target.
pub async fn coordinate<P: Post>(
    targets: Vec<(String, P)>,
    resend_interval: Duration,
    mut wanted: watch::Receiver<Arc<WantedSet>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let (batch_tx, batch_rx) = watch::channel(None::<Arc<Batch>>);
    // Stops the targets with the daemon, or when the wanted set ends.
    let stop_targets = cancel.child_token();
    let mut tasks = JoinSet::new();
    for (name, poster) in targets {
        tasks.spawn(deliver(
            name,
            poster,
            batch_rx.clone(),
            Arc::clone(&metrics),
            stop_targets.clone(),
        ));
    }
    drop(batch_rx);
    let mut book = Book::default();
    let mut resend = tokio::time::interval_at(Instant::now() + resend_interval, resend_interval);
    resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0;
    let set = wanted.borrow_and_update().clone();
    let mut trigger = set.trigger_boot_ns;
    let mut send_now = book.update(&set.alerts, std::time::SystemTime::now());
    loop {
        if send_now {
            seq += 1;
            let now = std::time::SystemTime::now();
            batch_tx.send_replace(Some(Arc::new(Batch {
                seq,
                alerts: book.postable(now, resend_interval),
                trigger_boot_ns: trigger.take(),
            })));
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            changed = wanted.changed() => {
                if changed.is_err() {
                    break;
                }
                let set = wanted.borrow_and_update().clone();
                trigger = set.trigger_boot_ns;
                send_now = book.update(&set.alerts, std::time::SystemTime::now());
            }
            _ = resend.tick() => {
                book.expire(std::time::SystemTime::now());
                send_now = !book.is_empty();
            }
        }
    }
    stop_targets.cancel();
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::warn!(error = %e, "an Alertmanager delivery task ended abnormally");
        }
    }
}

/// How a request ended.
enum Sent {
    /// It ended; `newer` says whether a newer batch arrived meanwhile.
    Done {
        result: Result<(), PostError>,
        newer: bool,
    },
    /// Cancelled for a newer batch after [`OVERTAKEN_GRACE`].
    Overtaken,
    /// Shutting down.
    Stop,
}

/// One target's task: delivers the latest batch, with retries.
pub async fn deliver<P: Post>(
    name: String,
    poster: P,
    mut batches: watch::Receiver<Option<Arc<Batch>>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut last_seq = 0;
    loop {
        let Some(mut batch) = next_batch(&mut batches, last_seq, &cancel).await else {
            return;
        };
        let mut attempt = 1;
        loop {
            let (error, newer) = match send(&poster, &batch, &mut batches, &cancel).await {
                Sent::Stop => return,
                Sent::Overtaken => {
                    metrics.alert_delivery(Delivery::Failure);
                    tracing::warn!(alertmanager = %name, seq = batch.seq, "request overtaken by newer alerts and cancelled after {OVERTAKEN_GRACE:?}");
                    match latest(&mut batches) {
                        Some(newer) => batch = newer,
                        None => return,
                    }
                    attempt = 1;
                    continue;
                }
                Sent::Done { result: Ok(()), .. } => {
                    metrics.alert_delivery(Delivery::Success);
                    let since_event_ms = batch
                        .trigger_boot_ns
                        .map(|t| crate::event::boot_ns_now().saturating_sub(t) as f64 / 1e6);
                    tracing::info!(alertmanager = %name, alerts = batch.alerts.len(), attempt, since_event_ms, "alerts delivered");
                    break;
                }
                Sent::Done {
                    result: Err(error),
                    newer,
                } => (error, newer),
            };
            metrics.alert_delivery(Delivery::Failure);
            tracing::warn!(alertmanager = %name, attempt, attempts = ATTEMPTS, %error, "alert delivery failed");
            // Newer alerts arrived meanwhile: they replace these at once.
            if newer || batches.has_changed().unwrap_or(false) {
                match latest(&mut batches) {
                    Some(newer) => batch = newer,
                    None => return,
                }
                attempt = 1;
                continue;
            }
            let Some(wait) = backoff(attempt) else {
                tracing::error!(alertmanager = %name, "giving up until the next change or re-send; alerts are kept");
                break;
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => attempt += 1,
                changed = batches.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    match latest(&mut batches) {
                        Some(newer) => batch = newer,
                        None => return,
                    }
                    attempt = 1;
                }
            }
        }
        last_seq = batch.seq;
    }
}

/// Waits for a batch newer than `last_seq`.
async fn next_batch(
    batches: &mut watch::Receiver<Option<Arc<Batch>>>,
    last_seq: u64,
    cancel: &CancellationToken,
) -> Option<Arc<Batch>> {
    loop {
        if let Some(b) = batches.borrow_and_update().clone()
            && b.seq > last_seq
        {
            return Some(b);
        }
        tokio::select! {
            () = cancel.cancelled() => return None,
            changed = batches.changed() => changed.ok()?,
        }
    }
}

/// The latest batch, marked as taken.
fn latest(batches: &mut watch::Receiver<Option<Arc<Batch>>>) -> Option<Arc<Batch>> {
    batches.borrow_and_update().clone()
}

/// Sends `batch`; cancels it [`OVERTAKEN_GRACE`] after a newer batch
/// arrives.
async fn send<P: Post>(
    poster: &P,
    batch: &Batch,
    batches: &mut watch::Receiver<Option<Arc<Batch>>>,
    cancel: &CancellationToken,
) -> Sent {
    let request = poster.post(batch);
    tokio::pin!(request);
    let mut overtaken_at: Option<Instant> = None;
    loop {
        let give_up = async {
            match overtaken_at {
                Some(at) => tokio::time::sleep_until(at + OVERTAKEN_GRACE).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return Sent::Stop,
            result = &mut request => {
                return Sent::Done {
                    result,
                    newer: overtaken_at.is_some(),
                };
            }
            changed = batches.changed(), if overtaken_at.is_none() => {
                if changed.is_err() {
                    return Sent::Stop;
                }
                overtaken_at = Some(Instant::now());
            }
            () = give_up => return Sent::Overtaken,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// What the fake target saw: (batch seq, when the request started).
    type Log = Arc<Mutex<Vec<(u64, Duration)>>>;

    /// A target that answers each request after `delay` with `ok`.
    struct Fake {
        start: Instant,
        log: Log,
        /// (delay, ok) for each request in turn; the last repeats.
        script: Vec<(Duration, bool)>,
    }

    impl Post for Fake {
        fn post(&self, batch: &Batch) -> impl Future<Output = Result<(), PostError>> + Send {
            let n = {
                let mut log = self.log.lock().unwrap();
                log.push((batch.seq, self.start.elapsed()));
                log.len()
            };
            let (delay, ok) = self.script[(n - 1).min(self.script.len() - 1)];
            async move {
                tokio::time::sleep(delay).await;
                if ok {
                    Ok(())
                } else {
                    Err("HTTP 503".to_owned())
                }
            }
        }
    }

    fn batch(seq: u64) -> Option<Arc<Batch>> {
        Some(Arc::new(Batch {
            seq,
            alerts: Vec::new(),
            trigger_boot_ns: None,
        }))
    }

    struct Harness {
        tx: watch::Sender<Option<Arc<Batch>>>,
        log: Log,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        start: Instant,
    }

    fn harness(script: Vec<(Duration, bool)>) -> Harness {
        let (tx, rx) = watch::channel(None);
        let log = Log::default();
        let cancel = CancellationToken::new();
        let start = Instant::now();
        let task = tokio::spawn(deliver(
            "am".into(),
            Fake {
                start,
                log: Arc::clone(&log),
                script,
            },
            rx,
            Arc::new(Metrics::new("test")),
            cancel.clone(),
        ));
        Harness {
            tx,
            log,
            cancel,
            task,
            start,
        }
    }

    impl Harness {
        async fn at(&self, ms: u64) {
            tokio::time::sleep_until(self.start + Duration::from_millis(ms)).await;
        }

        async fn finish(self) -> Vec<(u64, u64)> {
            self.cancel.cancel();
            self.task.await.unwrap();
            self.log
                .lock()
                .unwrap()
                .iter()
                .map(|(seq, at)| (*seq, u64::try_from(at.as_millis()).unwrap()))
                .collect()
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_up_to_its_bound_and_attempts_are_finite() {
        assert_eq!(backoff(1), Some(FIRST_BACKOFF));
        assert_eq!(backoff(2), Some(2 * FIRST_BACKOFF));
        assert_eq!(backoff(3), Some(4 * FIRST_BACKOFF));
        assert_eq!(backoff(ATTEMPTS), None);
        assert_eq!(backoff(u32::MAX), None);
        assert!((1..ATTEMPTS).all(|a| backoff(a).is_some_and(|d| d <= MAX_BACKOFF)));
        let worst: Duration = (1..ATTEMPTS).filter_map(backoff).sum();
        assert!(worst <= Duration::from_secs(2), "{worst:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_target_retries_with_backoff_then_waits() {
        let h = harness(vec![(MS, false)]);
        h.tx.send_replace(batch(1));
        h.at(10_000).await;
        // Attempts at 0, then 1 + 250, + 1 + 500, + 1 + 1000.
        assert_eq!(h.finish().await, [(1, 0), (1, 251), (1, 752), (1, 1753)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_newer_batch_supersedes_the_retry_loop_at_once() {
        let h = harness(vec![(MS, false), (MS, false), (MS, true)]);
        h.tx.send_replace(batch(1));
        h.at(300).await; // attempt 2 failed at 252; back-off until 752
        h.tx.send_replace(batch(2));
        h.at(10_000).await;
        assert_eq!(
            h.finish().await,
            [(1, 0), (1, 251), (2, 300)],
            "batch 1's third attempt never happens; batch 2 goes at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_request_overtaken_finishes_then_the_newer_goes() {
        let h = harness(vec![(Duration::from_millis(100), true)]);
        h.tx.send_replace(batch(1));
        h.at(50).await;
        h.tx.send_replace(batch(2));
        h.tx.send_replace(batch(3));
        h.at(10_000).await;
        assert_eq!(
            h.finish().await,
            [(1, 0), (3, 100)],
            "batch 2 is skipped, never sent after 3"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_request_is_cancelled_for_a_newer_batch_after_the_grace() {
        let hung = Duration::from_secs(3600);
        let h = harness(vec![(hung, true), (MS, true)]);
        h.tx.send_replace(batch(1));
        h.at(5_000).await;
        h.tx.send_replace(batch(2));
        h.at(20_000).await;
        assert_eq!(h.finish().await, [(1, 0), (2, 6_000)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_with_a_newer_batch_waiting_sends_it_without_backoff() {
        let h = harness(vec![(Duration::from_millis(100), false), (MS, true)]);
        h.tx.send_replace(batch(1));
        h.at(50).await;
        h.tx.send_replace(batch(2));
        h.at(10_000).await;
        assert_eq!(h.finish().await, [(1, 0), (2, 100)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_target_never_delays_another() {
        let (wanted_tx, wanted_rx) = watch::channel(Arc::new(WantedSet::default()));
        let start = Instant::now();
        let hung_log = Log::default();
        let ok_log = Log::default();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(coordinate(
            vec![
                (
                    "hung".to_owned(),
                    Fake {
                        start,
                        log: Arc::clone(&hung_log),
                        script: vec![(Duration::from_secs(3600), true)],
                    },
                ),
                (
                    "ok".to_owned(),
                    Fake {
                        start,
                        log: Arc::clone(&ok_log),
                        script: vec![(MS, true)],
                    },
                ),
            ],
            Duration::from_secs(60),
            wanted_rx,
            Arc::new(Metrics::new("test")),
            cancel.clone(),
        ));
        let wanted = |module: &str| {
            Arc::new(WantedSet {
                alerts: vec![super::super::Wanted {
                    labels: [("alertname".to_owned(), module.to_owned())].into(),
                    annotations: super::super::Labels::new(),
                }],
                trigger_boot_ns: None,
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        wanted_tx.send_replace(wanted("a"));
        tokio::time::sleep(Duration::from_millis(10)).await;
        wanted_tx.send_replace(wanted("b"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        cancel.cancel();
        task.await.unwrap();
        let ms = |log: &Log| -> Vec<(u64, u128)> {
            log.lock()
                .unwrap()
                .iter()
                .map(|(s, at)| (*s, at.as_millis()))
                .collect()
        };
        assert_eq!(ms(&ok_log), [(1, 10), (2, 20)], "each change at once");
        assert_eq!(
            ms(&hung_log),
            [(1, 10), (2, 1020)],
            "cancelled after the grace"
        );
    }
}
