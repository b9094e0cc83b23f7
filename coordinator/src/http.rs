//! The HTTP API of DESIGN.md (`/v1/orders`, `/v1/sagas`, `/healthz`,
//! `/readyz`). One error type, [`ApiError`], renders every failure as
//! `{"error": {"code", "message"}}`; internal causes are logged, not shown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use skald_engine::{Event, SagaStatus};
use uuid::Uuid;

use crate::domain::{IdempotencyKey, NewOrder, OrderRequest, ValidationError};
use crate::store::{self, Created, OrderRecord, SagaRecord, Store};

/// Shared by every handler.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub amqp_url: Arc<str>,
    pub redis_url: Arc<str>,
    /// Bearer token for operator actions; `None` disables them.
    pub admin_token: Option<Arc<str>>,
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
}

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    MalformedJson(String),
    #[error("{0}")]
    Validation(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("operator actions are disabled: set ADMIN_TOKEN")]
    OperatorDisabled,
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("a backing service is unavailable; retry later")]
    Unavailable(#[source] store::Error),
    #[error("internal error")]
    Internal(#[source] store::Error),
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::IdempotencyConflict(_) => ApiError::Conflict(e.to_string()),
            store::Error::SagaNotFound(id) => ApiError::NotFound(format!("saga {id}")),
            store::Error::Engine(skald_engine::EngineError::InvalidOperatorAction { .. }) => {
                ApiError::Conflict(e.to_string())
            }
            e if e.is_transient() => ApiError::Unavailable(e),
            e => ApiError::Internal(e),
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::Validation(e.0)
    }
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            ApiError::Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::OperatorDisabled => (StatusCode::FORBIDDEN, "operator_actions_disabled"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        match &self {
            ApiError::Unavailable(e) => tracing::warn!(error = %e, "request failed: service unavailable"),
            ApiError::Internal(e) => tracing::error!(error = %e, "request failed"),
            _ => {}
        }
        let body = json!({"error": {"code": code, "message": self.to_string()}});
        let mut resp = (status, Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

pub fn router(state: ApiState) -> Router {
    let body_limit = state.body_limit;
    Router::new()
        .route("/v1/orders", post(create_order).layer(DefaultBodyLimit::disable()))
        .route("/v1/orders/{id}", get(get_order))
        .route("/v1/sagas", get(list_sagas))
        .route("/v1/sagas/{id}", get(get_saga))
        .route("/v1/sagas/{id}/retry", post(retry_saga))
        .route("/v1/sagas/{id}/abort", post(abort_saga))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .merge(skald_wire::metrics::router())
        .fallback(|| async { ApiError::NotFound("route".to_owned()) })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

fn parse_id(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::BadRequest(format!("{what} id {raw:?} is not a UUID")))
}

#[tracing::instrument(skip_all)]
async fn create_order(State(state): State<ApiState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let body = read_limited(body, state.body_limit).await?;
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default();
        if !ct.starts_with("application/json") {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(IdempotencyKey::parse(v.to_str().unwrap_or_default())?),
        None => None,
    };
    let req: OrderRequest = serde_json::from_slice(&body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::Validation(e.to_string()),
        _ => ApiError::MalformedJson(format!("malformed JSON: {e}")),
    })?;
    let order = NewOrder::parse(req)?;
    // Hash of the parsed order: the same order with other whitespace is the same request.
    let canonical = serde_json::to_vec(&order).map_err(|e| ApiError::Internal(e.into()))?;
    let hash = hex::encode(Sha256::digest(&canonical));
    let ids = match state.store.create_order(&order, key.as_ref(), &hash).await? {
        Created::New(ids) | Created::Replayed(ids) => ids,
    };
    let location = format!("/v1/orders/{}", ids.order_id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(json!({"order_id": ids.order_id, "saga_id": ids.saga_id, "status": "PENDING"})),
    )
        .into_response())
}

/// Reads a request body of at most `limit` bytes. A larger one is read to
/// its end (up to 16 times the limit) and discarded before the 413, so that
/// the client, still sending, gets the JSON error instead of a reset
/// connection; past that, the connection is dropped.
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let drain_cap = limit.saturating_mul(16);
    let mut stream = body.into_data_stream();
    let mut kept = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
        total = total.saturating_add(chunk.len());
        if total <= limit {
            kept.extend_from_slice(&chunk);
        } else if total > drain_cap {
            break;
        }
    }
    if total > limit {
        return Err(ApiError::TooLarge(limit));
    }
    Ok(Bytes::from(kept))
}

fn order_status(s: SagaStatus) -> &'static str {
    match s {
        SagaStatus::Completed => "APPROVED",
        SagaStatus::Compensated => "CANCELLED",
        SagaStatus::Running | SagaStatus::Compensating | SagaStatus::Stuck => "PENDING",
    }
}

fn order_json(o: &OrderRecord) -> Value {
    json!({
        "order_id": o.order_id,
        "saga_id": o.saga_id,
        "status": order_status(o.saga_status),
        "saga_status": o.saga_status,
        "customer_id": o.customer_id,
        "currency": o.currency,
        "total_cents": o.total_cents,
        "items": o.items,
        "created_at": o.created_at,
    })
}

async fn get_order(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id, "order")?;
    let order = state
        .store
        .order(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("order {id}")))?;
    Ok(Json(order_json(&order)))
}

/// The saga as the API shows it: status, times, and every step with its attempts.
pub fn saga_json(s: &SagaRecord) -> Value {
    json!({
        "saga_id": s.id,
        "saga_type": s.saga_type,
        "status": s.status,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
        "finished_at": s.finished_at,
        "failure": s.state.failure,
        "wake_at": s.state.wake_at,
        "payload": s.payload,
        "steps": s.state.steps,
    })
}

async fn get_saga(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id, "saga")?;
    let saga = state
        .store
        .saga(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("saga {id}")))?;
    Ok(Json(saga_json(&saga)))
}

async fn list_sagas(
    State(state): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let status = match q.get("status").map(String::as_str) {
        None | Some("") => None,
        Some(s) => Some(s.parse::<SagaStatus>().map_err(ApiError::BadRequest)?),
    };
    let limit = match q.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=500).contains(l))
            .ok_or_else(|| ApiError::BadRequest("limit must be between 1 and 500".to_owned()))?,
    };
    let after = match q.get("after").map(String::as_str) {
        None | Some("") => None,
        Some(a) => Some(parse_id(a, "after")?),
    };
    let sagas = state.store.list_sagas(status, limit, after).await?;
    let next = (sagas.len() as i64 == limit)
        .then(|| sagas.last().map(|s| s.id))
        .flatten();
    let items: Vec<Value> = sagas
        .iter()
        .map(|s| {
            json!({
                "saga_id": s.id,
                "saga_type": s.saga_type,
                "status": s.status,
                "created_at": s.created_at,
                "finished_at": s.finished_at,
                "failure": s.state.failure,
            })
        })
        .collect();
    Ok(Json(json!({"sagas": items, "next": next})))
}

fn authorize(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = state.admin_token.as_deref() else {
        return Err(ApiError::OperatorDisabled);
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time comparison: a token must not leak through timing.
    let ok = given.is_some_and(|g| {
        g.len() == expected.len() && g.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    ok.then_some(()).ok_or(ApiError::Unauthorized)
}

async fn retry_saga(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let id = parse_id(&id, "saga")?;
    let saga = state.store.operate(id, Event::Retry).await?;
    tracing::info!(saga_id = %id, "operator retried saga");
    Ok(Json(saga_json(&saga)))
}

async fn abort_saga(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let id = parse_id(&id, "saga")?;
    let saga = state
        .store
        .operate(
            id,
            Event::Abort {
                reason: "operator request".to_owned(),
            },
        )
        .await?;
    tracing::info!(saga_id = %id, "operator aborted saga");
    Ok(Json(saga_json(&saga)))
}

async fn readyz(State(state): State<ApiState>) -> Response {
    let limit = Duration::from_secs(2);
    let pg = tokio::time::timeout(limit, sqlx::query("SELECT 1").execute(state.store.pool())).await;
    let pg = matches!(pg, Ok(Ok(_)));
    let amqp = tokio::time::timeout(limit, async {
        let conn = skald_wire::amqp::connect(&state.amqp_url, "skald-readyz").await?;
        let _ = conn.close(200, "readyz".into()).await;
        Ok::<_, skald_wire::amqp::Error>(())
    })
    .await;
    let amqp = matches!(amqp, Ok(Ok(())));
    let redis = tokio::time::timeout(limit, async {
        let client = redis::Client::open(&*state.redis_url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    })
    .await;
    let redis = matches!(redis, Ok(Ok(_)));
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    let ready = pg && amqp && redis;
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {"postgres": word(pg), "rabbitmq": word(amqp), "redis": word(redis)},
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}
