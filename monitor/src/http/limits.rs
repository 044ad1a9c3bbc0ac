//! What bounds the HTTP listener, whoever is on the other end: how many
//! connections it holds, how long a connection may idle or dribble, and how
//! many file descriptors it may take from the rest of the daemon.
//!
//! - **Connections**: at most [`MAX_CONNECTIONS`], and never more than
//!   RLIMIT_NOFILE minus [`FD_RESERVE`], so that the event source, the
//!   reconcile's /proc reads, the event log, the Alertmanager and cluster
//!   clients always have descriptors left. The soft limit is first raised to
//!   the hard one ([`raise_nofile`]).
//! - **When full**, a new connection takes the place of the oldest *idle*
//!   one (connected, no request being answered), as nginx reuses its idle
//!   keep-alive connections when it runs short. Idle connections cost an
//!   attacker nothing to hold, so they must not be able to lock out the
//!   kubelet's probe or Prometheus. Only when every slot is busy answering
//!   is the newcomer accepted and closed at once. Either way the listener
//!   keeps accepting, so the kernel's backlog never fills with connections
//!   nobody will serve, and it never spins: each accept is one connection.
//! - **Slots are [`Slot`]s**: a connection's descriptor is closed before its
//!   slot is given back, so open descriptors never exceed the cap plus the
//!   one just accepted.
//! - **Writes**: a response whose bytes the client does not take within
//!   [`WRITE_TIMEOUT`] of the first write that had to wait closes the
//!   connection ([`Guarded`]), so a slow reader pins a response in memory
//!   for that long at most. The clock runs from the first blocked write
//!   until everything is flushed, and a trickle of progress does not reset
//!   it.
use std::{
    collections::BTreeMap,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tokio_util::sync::CancellationToken;

/// The most connections served at once, when RLIMIT_NOFILE allows it.
/// Prometheus (one or two) and the kubelet's probes need a handful; the
/// rest is headroom. Each costs at most [`MAX_BUF_BYTES`] of read buffer
/// plus one response (tens of KiB), so the cap also bounds memory.
pub const MAX_CONNECTIONS: usize = 512;
/// Descriptors kept for everything but HTTP clients. The daemon holds about
/// 20 of its own (more with eBPF: programs, links, maps); the rest covers the
/// reconcile's and the forensic log's /proc reads, the event log and its
/// rotation, and the Alertmanager and cluster connections.
pub const FD_RESERVE: u64 = 256;
/// The fewest connections served, however low RLIMIT_NOFILE is.
pub const MIN_CONNECTIONS: usize = 16;
/// From the moment the server waits for a request until its header is
/// complete. hyper starts this clock again whenever it waits for the next
/// request, so it is also the idle (keep-alive) timeout, and the TLS
/// handshake gets as long.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection idle between requests is closed after this (see
/// [`HEADER_READ_TIMEOUT`], which it equals).
pub const IDLE_TIMEOUT: Duration = HEADER_READ_TIMEOUT;
/// From the first write that had to wait until the response is flushed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The request line and headers together; past it, 431 and the connection
/// is closed. Prometheus sends about 300 bytes, with basic auth 400.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// hyper's read buffer per connection (its minimum is 8 KiB).
pub const MAX_BUF_BYTES: usize = 16 * 1024;
/// How long a stopping daemon lets open connections finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// How long an accept waits for the slot of the idle connection it
/// evicted.
pub const EVICT_WAIT: Duration = Duration::from_millis(100);
/// The pause after accept fails for want of descriptors or memory; the
/// failed connection stays in the backlog and would fail again at once.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// RLIMIT_NOFILE as the listener found and left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nofile {
    /// The soft limit before raising it.
    pub was: u64,
    /// The soft limit now (the hard limit, unless raising failed).
    pub now: u64,
}

/// Raises RLIMIT_NOFILE's soft limit to the hard one (no privilege needed)
/// and returns both; a failure to raise keeps the old limit.
#[must_use]
pub fn raise_nofile() -> Nofile {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        // Cannot even read it: assume the common default.
        return Nofile {
            was: 1024,
            now: 1024,
        };
    };
    let now = if hard > soft && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    Nofile { was: soft, now }
}

/// The connection cap for a soft RLIMIT_NOFILE of `nofile`.
#[must_use]
pub fn connection_cap(nofile: u64) -> usize {
    let room = usize::try_from(nofile.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    room.clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

/// What a connection is doing, as the accept loop sees it.
#[derive(Debug, Default)]
pub struct ConnState {
    /// Requests handed to the router and not yet answered.
    in_flight: AtomicUsize,
    /// Response bytes are waiting for the client to read.
    write_blocked: AtomicBool,
    /// Cancelled when the accept loop evicts this connection.
    evict: CancellationToken,
}

impl ConnState {
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && !self.write_blocked.load(Ordering::Acquire)
            && !self.evict.is_cancelled()
    }

    /// Resolves when the accept loop evicts the connection.
    pub async fn evicted(&self) {
        self.evict.cancelled().await;
    }

    /// Marks a request as being answered until the guard is dropped.
    #[must_use]
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }
}

/// A request being answered (see [`ConnState::request`]).
pub struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection slots: a semaphore for the cap and, per open connection,
/// its state, oldest first.
pub struct Slots {
    permits: Arc<Semaphore>,
    cap: usize,
    open: Mutex<BTreeMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
}

/// One connection's slot; dropping it frees the slot. Drop it only after
/// the connection's socket is closed.
pub struct Slot {
    id: u64,
    slots: Arc<Slots>,
    pub state: Arc<ConnState>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Slots {
    /// `cap` slots.
    #[must_use]
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(cap)),
            cap,
            open: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    /// The cap.
    #[must_use]
    pub const fn cap(&self) -> usize {
        self.cap
    }

    fn slot(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Slot {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::default());
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&state));
        Slot {
            id,
            slots: Arc::clone(self),
            state,
            _permit: permit,
        }
    }

    /// A free slot now, if there is one.
    #[must_use]
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        Arc::clone(&self.permits)
            .try_acquire_owned()
            .ok()
            .map(|p| self.slot(p))
    }

    /// Evicts the oldest idle connection and waits (at most [`EVICT_WAIT`])
    /// for its slot. `None` when no connection is idle.
    pub async fn take_from_idle(self: &Arc<Self>) -> Option<Slot> {
        let victim = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .find(|s| s.idle())
            .cloned()?;
        victim.evict.cancel();
        let permit = tokio::time::timeout(EVICT_WAIT, Arc::clone(&self.permits).acquire_owned())
            .await
            .ok()?
            .ok()?;
        Some(self.slot(permit))
    }

    /// Waits up to `grace` until every connection has closed.
    pub async fn drained(&self, grace: Duration) -> bool {
        let all = u32::try_from(self.cap).unwrap_or(u32::MAX);
        tokio::time::timeout(grace, self.permits.acquire_many(all))
            .await
            .is_ok_and(|p| p.is_ok())
    }
}

/// A connection's socket with the write deadline (see the module doc), and
/// the write state the accept loop reads to tell idle connections.
pub struct Guarded<T> {
    inner: T,
    state: Arc<ConnState>,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<T> Guarded<T> {
    /// Wraps `inner` for the connection whose state is `state`.
    pub const fn new(inner: T, state: Arc<ConnState>) -> Self {
        Self {
            inner,
            state,
            deadline: None,
        }
    }

    /// A write could not complete: start the clock (if not running) and
    /// fail once it has run out.
    fn blocked(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.state.write_blocked.store(true, Ordering::Release);
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not read the response in time",
            )));
        }
        Poll::Pending
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }

    fn timed_out() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not read the response in time",
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(Self::timed_out()));
        }
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.blocked(cx),
            done => done,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(Self::timed_out()));
        }
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.blocked(cx),
            done => done,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// Everything the writer above buffered has been handed to the kernel:
    /// the clock stops.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(Self::timed_out()));
        }
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.deadline = None;
                self.state.write_blocked.store(false, Ordering::Release);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => self.blocked(cx).map_ok(|_| ()),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_the_reserve_and_stays_within_bounds() {
        assert_eq!(connection_cap(1024), 512);
        assert_eq!(connection_cap(700), 700 - 256);
        assert_eq!(connection_cap(100), MIN_CONNECTIONS);
        assert_eq!(connection_cap(u64::MAX), MAX_CONNECTIONS);
    }

    #[tokio::test]
    async fn a_full_house_gives_the_oldest_idle_slot_to_a_newcomer() {
        let slots = Slots::new(2);
        let a = slots.try_take().unwrap_or_else(|| panic!("slot a"));
        let b = slots.try_take().unwrap_or_else(|| panic!("slot b"));
        assert!(slots.try_take().is_none());
        // a is answering a request, so b (idle) is the one evicted.
        let busy = a.state.request();
        let b_state = Arc::clone(&b.state);
        let closer = tokio::spawn(async move {
            b_state.evicted().await;
            drop(b);
        });
        let c = slots.take_from_idle().await;
        assert!(c.is_some(), "no slot from the idle connection");
        closer.await.unwrap_or_else(|e| panic!("{e}"));
        // Now a is busy and c idle-but-fresh; with a busy and c evictable
        // the next newcomer takes c's slot, never a's.
        drop(busy);
        let _busy_again = a.state.request();
        assert!(!a.state.idle());
    }

    #[tokio::test]
    async fn no_idle_connection_means_no_slot() {
        let slots = Slots::new(1);
        let a = slots.try_take().unwrap_or_else(|| panic!("slot a"));
        let _busy = a.state.request();
        assert!(slots.take_from_idle().await.is_none());
    }
}
