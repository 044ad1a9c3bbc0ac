//! The HTTP listener: `GET /status` (JSON), `GET /healthz` and
//! `GET /metrics` (OpenMetrics). Read-only; it never touches the event
//! path, only the latest published status and the metric atomics.
//!
//! The listener is exposed to the network and to every process on the
//! node, so whatever a client does is bounded (README, "HTTP"):
//! - [`limits`]: the connection cap under RLIMIT_NOFILE with a reserve for
//!   the rest of the daemon, eviction of idle connections when full, the
//!   header-read (and idle) timeout, the header and buffer sizes, and the
//!   write deadline for slow readers;
//! - [`web_config`], [`tls`], [`auth`]: `--web.config.file` in the
//!   exporter-toolkit format: TLS (rustls), basic auth (bcrypt, cached and
//!   spaced out), response headers and a rate limit.
//!
//! The accept loop is ours rather than `axum::serve`'s, which has no
//! connection cap and no way to set hyper's limits; each connection is
//! served by hyper's HTTP/1 connection with the axum router as its service.
pub mod auth;
pub mod limits;
pub mod tls;
pub mod web_config;

use std::{io, net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use self::web_config::{WebConfig, WebConfigError};
use self::{
    auth::Gate,
    limits::{Guarded, Slot, Slots},
};
use crate::{forensic::StatusView, metrics::Metrics, status::Status};

#[derive(Clone)]
struct Shared {
    status: watch::Receiver<Arc<Status>>,
    /// The event log's status, read when /status is asked for: the writer
    /// does not wake the daemon after every record.
    event_log: Option<StatusView>,
    metrics: Arc<Metrics>,
}

/// The listener's settings: where, and the web config (loaded at start-up,
/// before privileges are dropped, so root-only key files can be read).
pub struct Listener {
    pub addr: SocketAddr,
    pub web: WebConfig,
}

/// Binds the address and serves until `cancel` fires; then lets open
/// connections finish for at most [`limits::SHUTDOWN_GRACE`].
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    listener: Listener,
    status: watch::Receiver<Arc<Status>>,
    event_log: Option<StatusView>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> io::Result<JoinHandle<io::Result<()>>> {
    let Listener { addr, web } = listener;
    let tls = web.server_tls.clone().map(TlsAcceptor::from);
    let nofile = limits::raise_nofile();
    let slots = Slots::new(limits::connection_cap(nofile.now));
    let tcp = TcpListener::bind(addr).await?;
    tracing::info!(
        %addr,
        tls = tls.is_some(),
        basic_auth = web.auth_required(),
        max_connections = slots.cap(),
        nofile_soft_limit = nofile.now,
        nofile_raised_from = nofile.was,
        header_read_timeout = ?limits::HEADER_READ_TIMEOUT,
        "HTTP listener limits"
    );
    let gate = Arc::new(Gate::new(&web));
    let app = router(Shared {
        status,
        event_log,
        metrics,
    })
    .layer(axum::middleware::from_fn_with_state(gate, auth::guard));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits::HEADER_READ_TIMEOUT)
        .max_buf_size(limits::MAX_BUF_BYTES)
        .max_header_size(limits::MAX_HEADER_BYTES)
        .keep_alive(true);
    let server = Server {
        http: Arc::new(http),
        app,
        tls,
        cancel,
    };
    Ok(tokio::spawn(async move {
        server.accept_loop(&tcp, &slots).await;
        if !slots.drained(limits::SHUTDOWN_GRACE).await {
            tracing::debug!("HTTP connections still open at stop; dropped");
        }
        Ok(())
    }))
}

/// What every connection is served with.
#[derive(Clone)]
struct Server {
    http: Arc<hyper::server::conn::http1::Builder>,
    app: Router,
    tls: Option<TlsAcceptor>,
    cancel: CancellationToken,
}

/// A connection's byte stream, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Server {
    async fn accept_loop(&self, tcp: &TcpListener, slots: &Arc<Slots>) {
        let mut refused: u64 = 0;
        loop {
            let stream = tokio::select! {
                () = self.cancel.cancelled() => return,
                accepted = tcp.accept() => match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(e) => {
                        accept_failed(&e).await;
                        continue;
                    }
                },
            };
            let slot = match slots.try_take() {
                Some(slot) => slot,
                None => match slots.take_from_idle().await {
                    Some(slot) => slot,
                    None => {
                        // Every slot is answering a request: refuse this one.
                        drop(stream);
                        refused += 1;
                        if refused.is_power_of_two() {
                            tracing::warn!(
                                refused,
                                max_connections = slots.cap(),
                                "HTTP connections refused: every slot is busy"
                            );
                        }
                        continue;
                    }
                },
            };
            let server = self.clone();
            tokio::spawn(async move { server.connection(stream, slot).await });
        }
    }

    /// Serves one connection until it ends, is evicted, or the daemon
    /// stops. The socket is closed before the slot is given back: locals
    /// (which own it) drop before the parameters (`slot`).
    async fn connection(self, stream: TcpStream, slot: Slot) {
        let state = Arc::clone(&slot.state);
        let guarded = Guarded::new(stream, Arc::clone(&state));
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(guarded),
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(limits::HEADER_READ_TIMEOUT, acceptor.accept(guarded));
                tokio::select! {
                    done = handshake => match done {
                        Ok(Ok(tls)) => Box::new(tls),
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    },
                    () = state.evicted() => return,
                    () = self.cancel.cancelled() => return,
                }
            }
        };
        let service = TowerToHyperService::new(self.app.clone());
        let counted = Arc::clone(&state);
        let service = hyper::service::service_fn(move |request| {
            let answering = counted.request();
            let response = hyper::service::Service::call(&service, request);
            async move {
                let response = response.await;
                drop(answering);
                response
            }
        });
        let conn = self.http.serve_connection(TokioIo::new(io), service);
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
            }
            () = state.evicted() => {}
            () = self.cancel.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(limits::SHUTDOWN_GRACE, conn.as_mut()).await;
            }
        }
    }
}

/// An accept that failed. Running out of descriptors (EMFILE, ENFILE) or
/// memory leaves the connection in the backlog, so accepting again at once
/// would spin: pause instead. Anything else (a connection reset before it
/// was accepted) is the client's business.
async fn accept_failed(e: &io::Error) {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            tracing::warn!(error = %e, "HTTP accept failed; pausing");
            tokio::time::sleep(limits::ACCEPT_ERROR_PAUSE).await;
        }
        _ => tracing::debug!(error = %e, "HTTP accept failed"),
    }
}

fn router(status: Shared) -> Router {
    Router::new()
        .route("/status", get(get_status))
        .route("/healthz", get(healthz))
        .route("/metrics", get(get_metrics))
        .fallback(not_found)
        .with_state(status)
}

async fn get_status(State(shared): State<Shared>) -> Json<Arc<Status>> {
    let published = Arc::clone(&shared.status.borrow());
    let Some(view) = &shared.event_log else {
        return Json(published);
    };
    let mut status = Status::clone(&published);
    status.event_log = Some(view.now());
    Json(Arc::new(status))
}

async fn get_metrics(State(shared): State<Shared>) -> Response {
    // The log's figures as of now, as /status shows them: records are
    // dropped after the daemon's publish, which would leave them stale.
    if let Some(view) = &shared.event_log {
        let log = view.now();
        shared.metrics.set_event_log(log.degraded, log.write_errors);
        shared.metrics.set_event_log_dropped(log.dropped);
    }
    match shared.metrics.encode() {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::metrics::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn not_found(uri: axum::http::Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({
            "error": format!("no such endpoint {}; try /status, /healthz, /metrics", uri.path())
        })),
    )
        .into_response()
}
