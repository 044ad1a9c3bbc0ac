//! The ring thread: the eBPF ring read the way the bench's floor reads it,
//! by a thread blocked in poll(2) on the ring's descriptor, which applies
//! each module event to the tracker as it takes it ([`Shared`]).
//!
//! Between a record and its state change there is then only the wake-up,
//! the decode and the tracker: no turn of the daemon's event loop, no
//! other task's work, and no scheduling behind the thread that serves
//! HTTP. What an event leads to besides the state change (metrics, the log
//! line, the record, the publish) is queued for the daemon's task, at most
//! [`OUT_MAX`](super::shared::OUT_MAX) messages ahead of it.
use std::{
    os::fd::OwnedFd,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::Arc,
    thread::JoinHandle,
};

use anyhow::Context as _;
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, eventfd, poll};

use super::shared::Shared;
use crate::source::ebpf::{DRAIN_BATCH, RingFeed};

/// The running ring thread; dropping it stops the thread and waits for it
/// (it holds the lock for one batch at most).
pub(super) struct RingThread {
    shared: Arc<Shared>,
    /// Written to end the thread's poll(2).
    stop: OwnedFd,
    handle: Option<JoinHandle<()>>,
}

/// Gives `ring` to `shared` and starts the thread that reads it.
///
/// # Errors
/// When the stop descriptor or the thread cannot be made.
pub(super) fn spawn(shared: &Arc<Shared>, ring: RingFeed) -> anyhow::Result<RingThread> {
    let wake = ring
        .fd()
        .try_clone_to_owned()
        .context("duplicating the ring buffer's descriptor");
    // The ring is the shared state's even if the thread cannot start, so
    // what it holds is not lost with it.
    shared.lock().set_ring(ring);
    let wake = wake?;
    let stop = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
        .context("creating the ring thread's stop descriptor")?;
    let stop_rx = stop
        .try_clone()
        .context("duplicating the ring thread's stop descriptor")?;
    let for_thread = Arc::clone(shared);
    let handle = std::thread::Builder::new()
        .name("kmod-ring".to_owned())
        .spawn(move || {
            // A panic here would otherwise leave the daemon reporting a
            // source nobody reads: it falls back instead.
            if catch_unwind(AssertUnwindSafe(|| read(&for_thread, &wake, &stop_rx))).is_err() {
                for_thread.ring_failed("the ring thread panicked".to_owned());
            }
        })
        .context("starting the ring thread")?;
    Ok(RingThread {
        shared: Arc::clone(shared),
        stop,
        handle: Some(handle),
    })
}

impl Drop for RingThread {
    fn drop(&mut self) {
        self.shared.stop();
        if let Err(e) = rustix::io::write(&self.stop, &1u64.to_ne_bytes()) {
            // It may be blocked in poll(2) for good: leave it (it holds no
            // lock there, and ends with the process).
            tracing::warn!(error = %e, "signalling the ring thread to stop; leaving it");
            return;
        }
        if let Some(h) = self.handle.take()
            && h.join().is_err()
        {
            tracing::error!("the ring thread ended in a panic");
        }
    }
}

/// The thread: takes and applies what the ring holds, a batch per lock,
/// until a batch comes back short; then waits in poll(2) until the ring
/// holds a record again, or until the quiet time of a kept batch ends
/// ([`QUIET_MAX`](super::shared::QUIET_MAX)). (It starts by taking, since the start-up drain
/// may have left messages in the feed's hands that the ring no longer
/// signals.)
fn read(shared: &Shared, ring: &OwnedFd, stop: &OwnedFd) {
    // Whether poll(2) said readable, and how many such wake-ups in a row
    // found nothing to take.
    let mut woken = false;
    let mut idle_wakes: u32 = 0;
    loop {
        // How many messages it took, and until when what it queued is kept
        // from the loop.
        let Some((taken, quiet_until)) = take_all(shared) else {
            return;
        };
        if woken && taken == 0 {
            // Readable yet nothing to take: a record reserved and not yet
            // committed (poll(2) reports the producer's position). Let its
            // producer finish rather than spin: yield once, then back off
            // from 16 µs up to 1 ms while it lasts.
            if idle_wakes == 0 {
                std::thread::yield_now();
            } else {
                let micros = (8u64 << idle_wakes.min(7)).min(1000);
                std::thread::sleep(std::time::Duration::from_micros(micros));
            }
            idle_wakes = idle_wakes.saturating_add(1);
        } else {
            idle_wakes = 0;
        }
        let mut fds = [
            PollFd::new(ring, PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
        ];
        let timeout = quiet_until.map(|until: std::time::Instant| {
            Timespec::try_from(until.saturating_duration_since(std::time::Instant::now()))
                .unwrap_or(Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                })
        });
        match poll(&mut fds, timeout.as_ref()) {
            Ok(0) if quiet_until.is_some() => {
                shared.end_quiet();
                woken = false;
                continue;
            }
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "ring buffer poll failed; eBPF source stopped");
                shared.ring_failed(format!("polling the ring buffer: {e}"));
                return;
            }
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        let ready = fds[0].revents();
        if ready.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL) {
            tracing::error!(events = ?ready, "ring buffer poll reported an error; eBPF source stopped");
            shared.ring_failed(format!("the ring buffer's descriptor reported {ready:?}"));
            return;
        }
        woken = true;
        crate::stages::woke();
    }
}

/// Takes what the ring holds, a batch per lock, until a batch comes back
/// short of its limit (a full queue limits it further: the next take then
/// waits for room, never in poll(2), which would not signal a message the
/// feed already holds); returns how many messages and until when the
/// queue is kept from the loop, or `None` when the daemon is stopping.
fn take_all(shared: &Shared) -> Option<(usize, Option<std::time::Instant>)> {
    let mut taken = 0;
    loop {
        let t = shared.take_from_ring(DRAIN_BATCH)?;
        taken += t.taken;
        if !t.more {
            return Some((taken, t.quiet_until));
        }
    }
}
