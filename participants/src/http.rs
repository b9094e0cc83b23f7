//! The participant's small HTTP server: `GET /healthz` (process up) and
//! `GET /metrics` (Prometheus text format). Participants have no API.

use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub fn router() -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .merge(skald_wire::metrics::router())
}

/// Serves [`router`] on `listener` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, shutdown: CancellationToken) {
    let server = axum::serve(listener, router()).with_graceful_shutdown(async move { shutdown.cancelled().await });
    if let Err(e) = server.await {
        tracing::warn!(error = %e, "metrics HTTP server failed");
    }
}
