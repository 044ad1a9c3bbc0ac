//! The HTTP listener: `GET /status` (JSON) and `GET /healthz`. Read-only;
//! it never touches the event path, only the latest published status.
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

use crate::daemon::Status;

type Shared = watch::Receiver<Arc<Status>>;

/// Binds `addr` and serves until `cancel` fires.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    status: Shared,
    cancel: CancellationToken,
) -> std::io::Result<JoinHandle<std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = router(status);
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
        .fallback(not_found)
        .with_state(status)
}

async fn get_status(State(status): State<Shared>) -> Json<Arc<Status>> {
    Json(Arc::clone(&status.borrow()))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn not_found(uri: axum::http::Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({
            "error": format!("no such endpoint {}; try /status, /healthz", uri.path())
        })),
    )
        .into_response()
}
