//! The eBPF program's own log lines (aya-log), forwarded into `tracing`
//! under the target [`TARGET`] at the level the program chose.
//!
//! The program logs only what userspace cannot see otherwise (a name it
//! could not read, a layout field the loader did not set, a failed reserve
//! in the event ring), each kind at most once a second per CPU. The lines
//! travel in their own small ring (`AYA_LOGS`,
//! [`LOG_RING_BYTES`](monitor_common::LOG_RING_BYTES)), read here by a task
//! of its own: a line that does not fit is dropped by the kernel, and
//! nothing here can hold up the event ring's reader.
use std::panic::{self, AssertUnwindSafe};

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};
use tokio_util::sync::CancellationToken;

/// The `tracing` target of every line the eBPF program logs.
pub const TARGET: &str = "kmod_monitor::ebpf";

/// Hands each aya-log record to `tracing`, at its level, under [`TARGET`].
pub struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: TARGET, "{message}"),
            log::Level::Warn => tracing::warn!(target: TARGET, "{message}"),
            log::Level::Info => tracing::info!(target: TARGET, "{message}"),
            log::Level::Debug => tracing::debug!(target: TARGET, "{message}"),
            log::Level::Trace => tracing::trace!(target: TARGET, "{message}"),
        }
    }

    fn flush(&self) {}
}

/// Takes the program's log ring out of `ebpf` and starts forwarding its
/// lines until `cancel`.
///
/// # Errors
/// When the object has no `AYA_LOGS` ring or it cannot be polled.
pub fn start(ebpf: &mut Ebpf, cancel: CancellationToken) -> Result<(), String> {
    let logger = EbpfLogger::init_with_logger(ebpf, ToTracing)
        .map_err(|e| format!("the eBPF program's log ring: {e}"))?;
    // SAFETY: the EbpfLogger owns its ring's map fd for as long as it
    // lives, and the AsyncFd owns the EbpfLogger, so the fd stays open and
    // unchanged for the AsyncFd's whole lifetime.
    let fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| format!("polling the eBPF program's log ring: {e}"))?;
    tokio::spawn(forward(fd, cancel));
    Ok(())
}

/// Drains the log ring whenever it is readable.
async fn forward(mut fd: AsyncFd<EbpfLogger<ToTracing>>, cancel: CancellationToken) {
    loop {
        let mut guard = tokio::select! {
            () = cancel.cancelled() => return,
            g = fd.readable_mut() => match g {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "polling the eBPF program's log ring failed; its lines are no longer forwarded (events are not affected)");
                    return;
                }
            },
        };
        // Drain, clear readiness, then drain once more: a line committed
        // between the two would otherwise wait for the next one.
        let flushed = flush(guard.get_inner_mut()) && {
            guard.clear_ready();
            flush(guard.get_inner_mut())
        };
        if !flushed {
            return;
        }
    }
}

/// Forwards every line in the ring; false when a record could not be
/// decoded. aya-log 0.3 panics on a malformed record (a program built
/// against another aya-log-common); that ends the forwarding, not the
/// daemon.
fn flush(logger: &mut EbpfLogger<ToTracing>) -> bool {
    if panic::catch_unwind(AssertUnwindSafe(|| logger.flush())).is_ok() {
        return true;
    }
    tracing::error!(
        "a log record from the eBPF program could not be decoded; its lines are no longer forwarded (events are not affected)"
    );
    false
}
