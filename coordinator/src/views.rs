//! The JSON bodies of the HTTP API, one type each. They derive
//! [`utoipa::ToSchema`], so the OpenAPI document (`GET /v1/openapi.json`)
//! is generated from the very types the handlers serialize.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use skald_engine::{SagaStatus, StepState};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::store::{OrderRecord, SagaRecord};

/// Every error: `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// For people; never contains internal causes or secrets.
    pub message: String,
}

/// What went wrong, for programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not JSON.
    MalformedJson,
    /// 400: a path or query parameter is invalid.
    BadRequest,
    /// 422: the JSON does not describe a valid order.
    ValidationFailed,
    /// 413
    PayloadTooLarge,
    /// 415
    UnsupportedMediaType,
    /// 404
    NotFound,
    /// 405
    MethodNotAllowed,
    /// 409: an `Idempotency-Key` reused with another body, or an operator
    /// action that does not fit the saga's status.
    Conflict,
    /// 401: operator action without the right bearer token.
    Unauthorized,
    /// 403: operator actions are disabled (no `ADMIN_TOKEN` configured).
    OperatorActionsDisabled,
    /// 503: PostgreSQL or RabbitMQ is unreachable; retry later.
    Unavailable,
    /// 500: the cause is logged, not returned.
    Internal,
}

/// What `POST /v1/orders` answers (202).
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderAccepted {
    pub order_id: Uuid,
    pub saga_id: Uuid,
    /// Always `PENDING`: the saga has just started.
    pub status: OrderStatus,
}

/// An order's status; it follows its saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    /// The saga is running, compensating or STUCK.
    Pending,
    /// The saga completed.
    Approved,
    /// The saga compensated.
    Cancelled,
}

impl From<SagaStatus> for OrderStatus {
    fn from(s: SagaStatus) -> Self {
        match s {
            SagaStatus::Completed => OrderStatus::Approved,
            SagaStatus::Compensated => OrderStatus::Cancelled,
            SagaStatus::Running | SagaStatus::Compensating | SagaStatus::Stuck => OrderStatus::Pending,
        }
    }
}

/// One line of an order, as accepted.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderLineView {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// `GET /v1/orders/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderView {
    pub order_id: Uuid,
    pub saga_id: Uuid,
    pub status: OrderStatus,
    /// The saga's own status, so that a `STUCK` saga shows.
    pub saga_status: SagaStatus,
    pub customer_id: String,
    pub currency: String,
    pub total_cents: i64,
    /// The lines as accepted.
    #[schema(value_type = Vec<OrderLineView>)]
    pub items: Value,
    pub created_at: DateTime<Utc>,
}

impl From<&OrderRecord> for OrderView {
    fn from(o: &OrderRecord) -> Self {
        Self {
            order_id: o.order_id,
            saga_id: o.saga_id,
            status: o.saga_status.into(),
            saga_status: o.saga_status,
            customer_id: o.customer_id.clone(),
            currency: o.currency.clone(),
            total_cents: o.total_cents,
            items: o.items.clone(),
            created_at: o.created_at,
        }
    }
}

/// One saga in a list; [`SagaView`] has these fields too.
#[derive(Debug, Serialize, ToSchema)]
pub struct SagaSummary {
    pub saga_id: Uuid,
    pub saga_type: String,
    pub status: SagaStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Null while the saga is running or compensating.
    pub finished_at: Option<DateTime<Utc>>,
    /// Why the saga compensates: the failure that started it.
    pub failure: Option<String>,
    /// The step being run or compensated; null once the saga is final.
    pub current_step: Option<String>,
}

impl From<&SagaRecord> for SagaSummary {
    fn from(s: &SagaRecord) -> Self {
        Self {
            saga_id: s.id,
            saga_type: s.saga_type.clone(),
            status: s.status,
            created_at: s.created_at,
            updated_at: s.updated_at,
            finished_at: s.finished_at,
            failure: s.state.failure.clone(),
            current_step: s
                .status
                .is_active()
                .then(|| s.state.current_step().map(|st| st.name.clone()))
                .flatten(),
        }
    }
}

/// `GET /v1/sagas/{id}`: status, times, and every step with its attempts.
#[derive(Debug, Serialize, ToSchema)]
pub struct SagaView {
    #[serde(flatten)]
    pub summary: SagaSummary,
    /// When the engine acts next on its own: the deadline of the attempt in
    /// flight, or the end of a backoff.
    pub wake_at: Option<DateTime<Utc>>,
    /// The saga's input, sent in every command of its steps.
    #[schema(value_type = Object)]
    pub payload: Value,
    pub steps: Vec<StepState>,
}

impl From<&SagaRecord> for SagaView {
    fn from(s: &SagaRecord) -> Self {
        Self {
            summary: s.into(),
            wake_at: s.state.wake_at,
            payload: s.payload.clone(),
            steps: s.state.steps.clone(),
        }
    }
}

/// `GET /v1/sagas`: one page.
#[derive(Debug, Serialize, ToSchema)]
pub struct SagaPage {
    pub sagas: Vec<SagaSummary>,
    /// Pass as `after` for the next page; null on the last page.
    pub next: Option<Uuid>,
}

/// Sagas per status.
#[derive(Debug, Default, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct StatusCounts {
    pub running: i64,
    pub compensating: i64,
    pub completed: i64,
    pub compensated: i64,
    pub stuck: i64,
}

/// `GET /v1/sagas/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SagaStats {
    pub by_status: StatusCounts,
    pub total: i64,
    /// The saga types this coordinator runs.
    pub saga_types: Vec<String>,
}

impl SagaStats {
    pub fn from_counts(counts: &[(String, i64)], saga_types: Vec<String>) -> Self {
        let mut by_status = StatusCounts::default();
        for (status, n) in counts {
            let slot = match status.parse::<SagaStatus>() {
                Ok(SagaStatus::Running) => &mut by_status.running,
                Ok(SagaStatus::Compensating) => &mut by_status.compensating,
                Ok(SagaStatus::Completed) => &mut by_status.completed,
                Ok(SagaStatus::Compensated) => &mut by_status.compensated,
                Ok(SagaStatus::Stuck) => &mut by_status.stuck,
                Err(_) => continue,
            };
            *slot += n;
        }
        let total = counts.iter().map(|(_, n)| n).sum();
        Self {
            by_status,
            total,
            saga_types,
        }
    }
}

/// `GET /v1/dead-letters`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterList {
    /// Oldest first.
    pub dead_letters: Vec<crate::dlq::DeadLetter>,
    /// More letters are in the queue than were listed.
    pub truncated: bool,
}

/// `POST /v1/dead-letters/{message_id}/replay`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    /// The letter as it was in the queue (it is gone from it now).
    pub dead_letter: crate::dlq::DeadLetter,
    /// The id of the copy sent to the original exchange.
    pub new_message_id: Uuid,
}

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub status: ReadyStatus,
    pub checks: ReadyChecks,
    /// Participant command queues that no consumer reads; empty when all
    /// are served (or when RabbitMQ is unreachable: then nothing is known).
    pub queues_without_consumers: Vec<String>,
}

/// `ready` (200), `degraded` (200: the coordinator works, but a participant
/// queue has no consumer, so sagas wait there) or `not_ready` (503).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReadyStatus {
    Ready,
    Degraded,
    NotReady,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyChecks {
    pub postgres: CheckResult,
    pub rabbitmq: CheckResult,
    pub redis: CheckResult,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckResult {
    Ok,
    Unreachable,
}

impl From<bool> for CheckResult {
    fn from(ok: bool) -> Self {
        if ok { CheckResult::Ok } else { CheckResult::Unreachable }
    }
}
