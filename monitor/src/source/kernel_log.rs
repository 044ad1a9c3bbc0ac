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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use log::Log as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// Records the target, level and message of every tracing event.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<(String, tracing::Level, String)>>>);

    struct Message(String);

    impl tracing::field::Visit for Message {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0 = format!("{value:?}");
            }
        }
    }

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            let mut message = Message(String::new());
            event.record(&mut message);
            let meta = event.metadata();
            self.0
                .lock()
                .unwrap()
                .push((meta.target().to_owned(), *meta.level(), message.0));
        }
    }

    #[test]
    fn each_record_keeps_its_level_under_the_ebpf_target() {
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry().with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            for level in [
                log::Level::Error,
                log::Level::Warn,
                log::Level::Info,
                log::Level::Debug,
                log::Level::Trace,
            ] {
                // aya-log names the program's module as the record's target.
                ToTracing.log(
                    &log::Record::builder()
                        .args(format_args!("layout field free_name is not set ({level})"))
                        .level(level)
                        .target("monitor")
                        .build(),
                );
            }
        });
        let seen = seen.0.lock().unwrap().clone();
        let want: Vec<(String, tracing::Level, String)> = [
            (tracing::Level::ERROR, "ERROR"),
            (tracing::Level::WARN, "WARN"),
            (tracing::Level::INFO, "INFO"),
            (tracing::Level::DEBUG, "DEBUG"),
            (tracing::Level::TRACE, "TRACE"),
        ]
        .into_iter()
        .map(|(level, name)| {
            (
                TARGET.to_owned(),
                level,
                format!("layout field free_name is not set ({name})"),
            )
        })
        .collect();
        assert_eq!(seen, want);
    }
}
