//! The HTTP listener: `GET /status` (JSON), `GET /healthz` and
//! `GET /metrics` (OpenMetrics). Read-only; it never touches the event
//! path, only the latest published status and the metric atomics.
use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{metrics::Metrics, status::Status};

#[derive(Clone)]
struct Shared {
    status: watch::Receiver<Arc<Status>>,
    metrics: Arc<Metrics>,
}

/// Binds `addr` and serves until `cancel` fires.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    status: watch::Receiver<Arc<Status>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> std::io::Result<JoinHandle<std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = router(Shared { status, metrics });
    Ok(tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await
    }))
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
    Json(Arc::clone(&shared.status.borrow()))
}

async fn get_metrics(State(shared): State<Shared>) -> Response {
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
