//! The HTTP API of DESIGN.md (`/v1/orders`, `/v1/sagas`, `/healthz`,
//! `/readyz`), the operators' views (`/v1/stats`, `/v1/dead-letters`,
//! `/v1/participants`), the OpenAPI document (`/v1/openapi.json`) and the
//! dashboard (`/`).
//!
//! Each handler carries a `#[utoipa::path]` annotation; [`api_routes`]
//! registers them through utoipa-axum, so the routes served and the routes
//! documented are one list. One error type, [`ApiError`], renders every
//! failure as `{"error": {"code", "message"}}`; internal causes are logged,
//! never shown.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use skald_engine::{Event, SagaStatus};
use utoipa::IntoParams;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::{IdempotencyKey, NewOrder, OrderRequest, ValidationError};
use crate::intake::OrderIntake;
use crate::participants::{BrokerInspector, PROBE_TIMEOUT, ParticipantsReport};
use crate::store::{self, Created, SagaFilter, Store};
use crate::views::{
    CheckResult, DeadLetterList, ErrorBody, ErrorCode, ErrorDetail, Health, OrderAccepted, OrderStatus, OrderView,
    Readiness, ReadyChecks, ReadyStatus, Replayed, SagaPage, SagaStats, SagaSummary, SagaView,
};
use crate::{dashboard, dlq, openapi};

/// Shared by every handler.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    /// Writes new orders, many per commit.
    pub intake: OrderIntake,
    /// Has credentials: never log it.
    pub amqp_url: Arc<str>,
    /// May have credentials: never log it.
    pub redis_url: Arc<str>,
    /// Bearer token for operator actions; `None` disables them.
    pub admin_token: Option<Arc<str>>,
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
    /// Participant queues: consumers, backlog (for `/v1/participants`, `/readyz`).
    pub broker: BrokerInspector,
    /// The saga types this coordinator runs (for the dashboard's filter).
    pub saga_types: Arc<[String]>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    #[error("this method is not allowed here")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("operator actions are disabled: set ADMIN_TOKEN")]
    OperatorDisabled,
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("a backing service is unavailable; retry later")]
    Unavailable(#[source] BoxError),
    #[error("internal error")]
    Internal(#[source] BoxError),
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::IdempotencyConflict(_) => ApiError::Conflict(e.to_string()),
            store::Error::SagaNotFound(id) => ApiError::NotFound(format!("saga {id}")),
            store::Error::Engine(skald_engine::EngineError::InvalidOperatorAction { .. }) => {
                ApiError::Conflict(e.to_string())
            }
            e if e.is_transient() => ApiError::Unavailable(e.into()),
            e => ApiError::Internal(e.into()),
        }
    }
}

impl From<dlq::Error> for ApiError {
    fn from(e: dlq::Error) -> Self {
        match e {
            dlq::Error::NotFound(id) => ApiError::NotFound(format!("dead letter {id:?}")),
            dlq::Error::NotReplayable { .. } => ApiError::Conflict(e.to_string()),
            dlq::Error::Amqp(_) => ApiError::Unavailable(e.into()),
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::Validation(e.0)
    }
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        match self {
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, ErrorCode::MalformedJson),
            ApiError::Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::ValidationFailed),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge),
            ApiError::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, ErrorCode::UnsupportedMediaType),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::MethodNotAllowed),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, ErrorCode::Conflict),
            ApiError::OperatorDisabled => (StatusCode::FORBIDDEN, ErrorCode::OperatorActionsDisabled),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
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
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
            },
        };
        let mut resp = (status, Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// Every documented route. The OpenAPI document is generated from it.
pub fn api_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(create_order).layer(DefaultBodyLimit::disable()))
        .routes(routes!(get_order))
        .routes(routes!(list_sagas))
        .routes(routes!(get_saga))
        .routes(routes!(retry_saga))
        .routes(routes!(abort_saga))
        .routes(routes!(saga_stats))
        .routes(routes!(list_dead_letters))
        .routes(routes!(replay_dead_letter))
        .routes(routes!(participants))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

/// The OpenAPI document, as served at `/v1/openapi.json`.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    api_routes().into_openapi()
}

pub fn router(state: ApiState) -> Router {
    let body_limit = state.body_limit;
    let (api, doc) = api_routes().split_for_parts();
    // Serialized once: it never changes while the process runs.
    let doc: Bytes = serde_json::to_vec(&doc).unwrap_or_default().into();
    api.route(
        "/v1/openapi.json",
        axum::routing::get(move || async move { ([(header::CONTENT_TYPE, "application/json")], doc.clone()) }),
    )
    .merge(dashboard::router())
    .merge(skald_wire::metrics::router())
    .fallback(|| async { ApiError::NotFound("route".to_owned()) })
    .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
    .layer(DefaultBodyLimit::max(body_limit))
    .with_state(state)
}

/// `Query`, with a rejection in the API's JSON error shape.
struct ApiQuery<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Query::try_from_uri(&parts.uri)
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// One path parameter, as text, with a rejection in the API's JSON error shape.
struct ApiPath(String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| ApiPath(p))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// An optional query parameter parsed with `FromStr`; empty counts as absent.
fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let raw: Option<String> = Option::deserialize(d)?;
    match raw.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}"))),
    }
}

fn parse_id(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::BadRequest(format!("{what} id {raw:?} is not a UUID")))
}

/// Starts an order saga.
#[utoipa::path(
    post,
    path = "/v1/orders",
    tag = "orders",
    request_body(content = OrderRequest, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header,
         description = "1-200 visible ASCII characters. The same key with the same body returns the same ids; with another body, 409."),
    ),
    responses(
        (status = 202, description = "Accepted: the saga runs.", body = OrderAccepted,
         headers(("Location" = String, description = "`/v1/orders/{order_id}`"))),
        (status = 400, description = "Not JSON.", body = ErrorBody),
        (status = 409, description = "The Idempotency-Key was used with another body.", body = ErrorBody),
        (status = 413, description = "Body larger than HTTP_BODY_LIMIT.", body = ErrorBody),
        (status = 415, description = "Content-Type is not application/json.", body = ErrorBody),
        (status = 422, description = "Not a valid order, or a bad Idempotency-Key.", body = ErrorBody),
        (status = 503, description = "PostgreSQL unreachable.", body = ErrorBody),
    )
)]
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
    let ids = match state.intake.create(order, key, hash).await? {
        Created::New(ids) | Created::Replayed(ids) => ids,
    };
    let location = format!("/v1/orders/{}", ids.order_id);
    let body = OrderAccepted {
        order_id: ids.order_id,
        saga_id: ids.saga_id,
        status: OrderStatus::Pending,
    };
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(body)).into_response())
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

/// An order, with a status that follows its saga.
#[utoipa::path(
    get,
    path = "/v1/orders/{id}",
    tag = "orders",
    params(("id" = Uuid, Path, description = "The order id.")),
    responses(
        (status = 200, description = "The order.", body = OrderView),
        (status = 400, description = "The id is not a UUID.", body = ErrorBody),
        (status = 404, description = "No such order or saga.", body = ErrorBody),
        (status = 503, description = "PostgreSQL unreachable.", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(order_id = %id.0))]
async fn get_order(State(state): State<ApiState>, id: ApiPath) -> Result<Json<OrderView>, ApiError> {
    let id = parse_id(&id.0, "order")?;
    let order = state
        .store
        .order(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("order {id}")))?;
    Ok(Json(OrderView::from(&order)))
}

/// A saga: status, times, and every step with its attempts, times and errors.
#[utoipa::path(
    get,
    path = "/v1/sagas/{id}",
    tag = "sagas",
    params(("id" = Uuid, Path, description = "The saga id.")),
    responses(
        (status = 200, description = "The saga.", body = SagaView),
        (status = 400, description = "The id is not a UUID.", body = ErrorBody),
        (status = 404, description = "No such order or saga.", body = ErrorBody),
        (status = 503, description = "PostgreSQL unreachable.", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(saga_id = %id.0))]
async fn get_saga(State(state): State<ApiState>, id: ApiPath) -> Result<Json<SagaView>, ApiError> {
    let id = parse_id(&id.0, "saga")?;
    let saga = state
        .store
        .saga(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("saga {id}")))?;
    Ok(Json(SagaView::from(&saga)))
}

/// Listing order of `GET /v1/sagas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ListOrder {
    /// Oldest first (the default).
    Asc,
    /// Newest first.
    Desc,
}

impl std::str::FromStr for ListOrder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "asc" => Ok(ListOrder::Asc),
            "desc" => Ok(ListOrder::Desc),
            _ => Err("order must be asc or desc".to_owned()),
        }
    }
}

/// Filters and paging of `GET /v1/sagas`. An empty value counts as absent.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SagaListQuery {
    /// Only sagas in this status.
    #[serde(default, deserialize_with = "lenient")]
    status: Option<SagaStatus>,
    /// Only sagas of this type, e.g. `order`.
    #[serde(default, deserialize_with = "lenient")]
    #[param(max_length = 64)]
    saga_type: Option<String>,
    /// Only sagas created at or after this time (RFC 3339, e.g. `2025-01-31T12:00:00Z`).
    #[serde(default, deserialize_with = "lenient")]
    created_after: Option<DateTime<Utc>>,
    /// Only sagas created before this time (RFC 3339).
    #[serde(default, deserialize_with = "lenient")]
    created_before: Option<DateTime<Utc>>,
    /// Page size.
    #[serde(default, deserialize_with = "lenient")]
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<i64>,
    /// Keyset paging: the `next` of the previous page.
    #[serde(default, deserialize_with = "lenient")]
    after: Option<Uuid>,
    /// `asc` (oldest first, the default) or `desc` (newest first).
    #[serde(default, deserialize_with = "lenient")]
    #[param(inline)]
    order: Option<ListOrder>,
}

/// Lists sagas, filtered, one page at a time (keyset paging by saga id,
/// which follows creation time).
#[utoipa::path(
    get,
    path = "/v1/sagas",
    tag = "sagas",
    params(SagaListQuery),
    responses(
        (status = 200, description = "One page of sagas.", body = SagaPage),
        (status = 400, description = "A parameter is invalid.", body = ErrorBody),
        (status = 503, description = "PostgreSQL unreachable.", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all)]
async fn list_sagas(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<SagaListQuery>,
) -> Result<Json<SagaPage>, ApiError> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be between 1 and 500".to_owned()));
    }
    if let Some(t) = &q.saga_type
        && (t.len() > 64 || t.chars().any(char::is_control))
    {
        return Err(ApiError::BadRequest(
            "saga_type must be at most 64 characters, none of them control characters".to_owned(),
        ));
    }
    let filter = SagaFilter {
        status: q.status,
        saga_type: q.saga_type,
        created_after: q.created_after,
        created_before: q.created_before,
        after: q.after,
        newest_first: q.order == Some(ListOrder::Desc),
        limit,
    };
    let sagas = state.store.list_sagas_page(&filter).await?;
    let next = (sagas.len() as i64 == limit)
        .then(|| sagas.last().map(|s| s.id))
        .flatten();
    Ok(Json(SagaPage {
        sagas: sagas.iter().map(SagaSummary::from).collect(),
        next,
    }))
}

/// How many sagas are in each status, and which saga types this coordinator runs.
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "sagas",
    responses(
        (status = 200, description = "Counts by status.", body = SagaStats),
        (status = 503, description = "PostgreSQL unreachable.", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all)]
async fn saga_stats(State(state): State<ApiState>) -> Result<Json<SagaStats>, ApiError> {
    let counts = state.store.count_by_status().await?;
    Ok(Json(SagaStats::from_counts(&counts, state.saga_types.to_vec())))
}

/// Checks the operator's bearer token (constant time).
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

/// The failures that retry and abort share.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only its documentation is used
enum SagaActionErrors {
    #[response(status = 400, description = "The id is not a UUID.")]
    BadRequest(ErrorBody),
    #[response(status = 401, description = "Missing or wrong bearer token.")]
    Unauthorized(ErrorBody),
    #[response(status = 403, description = "Operator actions are disabled (no ADMIN_TOKEN).")]
    Disabled(ErrorBody),
    #[response(status = 404, description = "No such saga.")]
    NotFound(ErrorBody),
    #[response(status = 503, description = "PostgreSQL unreachable.")]
    Unavailable(ErrorBody),
}

/// Operator: resumes the compensation of a `STUCK` saga.
#[utoipa::path(
    post,
    path = "/v1/sagas/{id}/retry",
    tag = "operator",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The saga id.")),
    responses(
        (status = 200, description = "The saga, now COMPENSATING.", body = SagaView),
        (status = 409, description = "The saga is not STUCK.", body = ErrorBody),
        SagaActionErrors,
    )
)]
#[tracing::instrument(skip_all, fields(saga_id = %id.0))]
async fn retry_saga(
    State(state): State<ApiState>,
    headers: HeaderMap,
    id: ApiPath,
) -> Result<Json<SagaView>, ApiError> {
    operate(&state, &headers, &id, Event::Retry).await
}

/// Operator: aborts a `RUNNING` saga; it compensates what may have run.
#[utoipa::path(
    post,
    path = "/v1/sagas/{id}/abort",
    tag = "operator",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The saga id.")),
    responses(
        (status = 200, description = "The saga, now COMPENSATING.", body = SagaView),
        (status = 409, description = "The saga is not RUNNING.", body = ErrorBody),
        SagaActionErrors,
    )
)]
#[tracing::instrument(skip_all, fields(saga_id = %id.0))]
async fn abort_saga(
    State(state): State<ApiState>,
    headers: HeaderMap,
    id: ApiPath,
) -> Result<Json<SagaView>, ApiError> {
    let abort = Event::Abort {
        reason: "operator request".to_owned(),
    };
    operate(&state, &headers, &id, abort).await
}

async fn operate(
    state: &ApiState,
    headers: &HeaderMap,
    id: &ApiPath,
    event: Event,
) -> Result<Json<SagaView>, ApiError> {
    authorize(state, headers)?;
    let id = parse_id(&id.0, "saga")?;
    let action = if matches!(event, Event::Retry) {
        "retried"
    } else {
        "aborted"
    };
    let saga = state.store.operate(id, event).await?;
    tracing::info!(saga_id = %id, "operator {action} saga");
    Ok(Json(SagaView::from(&saga)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeadLetterQuery {
    /// How many letters to show at most.
    #[serde(default, deserialize_with = "lenient")]
    #[param(minimum = 1, maximum = 500, default = 100)]
    limit: Option<usize>,
}

/// Browses `skald.dead-letters`, oldest first, without consuming anything.
#[utoipa::path(
    get,
    path = "/v1/dead-letters",
    tag = "dead-letters",
    params(DeadLetterQuery),
    responses(
        (status = 200, description = "The letters, oldest first.", body = DeadLetterList),
        (status = 400, description = "A parameter is invalid.", body = ErrorBody),
        (status = 503, description = "RabbitMQ unreachable.", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all)]
async fn list_dead_letters(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<DeadLetterQuery>,
) -> Result<Json<DeadLetterList>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be between 1 and 500".to_owned()));
    }
    let (dead_letters, truncated) = dlq::list(&state.amqp_url, limit).await?;
    Ok(Json(DeadLetterList {
        dead_letters,
        truncated,
    }))
}

/// Operator: re-sends a dead letter to the exchange and routing key it was
/// first published to (under a new message id), then removes it.
#[utoipa::path(
    post,
    path = "/v1/dead-letters/{message_id}/replay",
    tag = "operator",
    security(("bearer" = [])),
    params(("message_id" = String, Path, description = "The dead letter's AMQP message id.")),
    responses(
        (status = 200, description = "Re-sent (confirmed by the broker) and removed.", body = Replayed),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 403, description = "Operator actions are disabled (no ADMIN_TOKEN).", body = ErrorBody),
        (status = 404, description = "No dead letter has this message id.", body = ErrorBody),
        (status = 409, description = "The letter records no original exchange or routing key.", body = ErrorBody),
        (status = 503, description = "RabbitMQ unreachable.", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(message_id = %message_id.0))]
async fn replay_dead_letter(
    State(state): State<ApiState>,
    headers: HeaderMap,
    message_id: ApiPath,
) -> Result<Json<Replayed>, ApiError> {
    authorize(&state, &headers)?;
    let (dead_letter, new_message_id) = dlq::replay(&state.amqp_url, &message_id.0).await?;
    Ok(Json(Replayed {
        dead_letter,
        new_message_id,
    }))
}

/// The participants' command queues: live consumers, backlog and
/// unacknowledged messages, from RabbitMQ's management API (or, when it
/// cannot be reached, a passive declare over AMQP).
#[utoipa::path(
    get,
    path = "/v1/participants",
    tag = "participants",
    responses(
        (status = 200, description = "One entry per participant queue.", body = ParticipantsReport),
        (status = 503, description = "RabbitMQ unreachable.", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all)]
async fn participants(State(state): State<ApiState>) -> Result<Json<ParticipantsReport>, ApiError> {
    state
        .broker
        .report()
        .await
        .map(Json)
        .map_err(|e| ApiError::Unavailable(e.into()))
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "Up.", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
    })
}

/// Whether this coordinator can do its work: PostgreSQL, RabbitMQ and
/// Redis reachable (else 503 `not_ready`), and every participant command
/// queue read by at least one consumer (else 200 `degraded`, naming the
/// queues: the coordinator still takes orders, whose sagas wait there).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "`ready`, or `degraded` with the queues that have no consumer.", body = Readiness),
        (status = 503, description = "`not_ready`: a backing service is unreachable.", body = Readiness),
    )
)]
async fn readyz(State(state): State<ApiState>) -> Response {
    let limit = PROBE_TIMEOUT;
    let pg = async {
        let pg = tokio::time::timeout(limit, sqlx::query("SELECT 1").execute(state.store.pool())).await;
        matches!(pg, Ok(Ok(_)))
    };
    // One connection: reachability, then exact consumer counts by passive declares.
    let amqp = async {
        let probe = tokio::time::timeout(limit, async {
            let conn = skald_wire::amqp::connect(&state.amqp_url, "skald-readyz").await?;
            let queues = state.broker.via_amqp(&conn).await;
            let _ = conn.close(200, "readyz".into()).await;
            queues
        })
        .await;
        match probe {
            Ok(Ok(queues)) => Some(queues),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readyz: RabbitMQ check failed");
                None
            }
            Err(_) => None,
        }
    };
    let redis = async {
        let ping = tokio::time::timeout(limit, async {
            let client = redis::Client::open(&*state.redis_url)?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        })
        .await;
        matches!(ping, Ok(Ok(_)))
    };
    let (pg, queues, redis) = tokio::join!(pg, amqp, redis);
    let idle: Vec<String> = queues
        .iter()
        .flatten()
        .filter(|q| q.consumers == 0)
        .map(|q| q.queue.clone())
        .collect();
    let status = match (pg && queues.is_some() && redis, idle.is_empty()) {
        (false, _) => ReadyStatus::NotReady,
        (true, false) => ReadyStatus::Degraded,
        (true, true) => ReadyStatus::Ready,
    };
    let body = Readiness {
        status,
        checks: ReadyChecks {
            postgres: pg.into(),
            rabbitmq: CheckResult::from(queues.is_some()),
            redis: redis.into(),
        },
        queues_without_consumers: idle,
    };
    let code = if status == ReadyStatus::NotReady {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(body)).into_response()
}
