//! Prometheus metrics: the process-wide recorder, the `GET /metrics` route,
//! one named function per thing Skald counts, and the sampler of outbox
//! gauges.
//!
//! The recorder of the `metrics` crate is process-global: [`install`] puts a
//! Prometheus recorder in place once (later calls are no-ops), and
//! [`router`] renders it. Call sites do not use the `metrics` macros
//! directly but the functions below, so that every name, label and unit is
//! defined here once and listed in the README.
//!
//! Label values are always bounded sets (saga types, step names, queue and
//! exchange names, reason classes): never ids, never free text, never a URL.

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const SAGAS_STARTED: &str = "skald_sagas_started_total";
pub const SAGAS_COMPLETED: &str = "skald_sagas_completed_total";
pub const SAGAS_COMPENSATED: &str = "skald_sagas_compensated_total";
pub const SAGAS_STUCK: &str = "skald_sagas_stuck_total";
pub const SAGA_DURATION: &str = "skald_saga_duration_seconds";
pub const STEP_DURATION: &str = "skald_step_duration_seconds";
pub const STEP_ATTEMPTS: &str = "skald_step_attempts_total";
pub const STEP_RETRIES: &str = "skald_step_retries_total";
pub const STEP_TIMEOUTS: &str = "skald_step_timeouts_total";
pub const STEP_TIMEOUTS_POSTPONED: &str = "skald_step_timeouts_postponed_total";
pub const OUTBOX_ROWS: &str = "skald_outbox_rows";
pub const OUTBOX_OLDEST_AGE: &str = "skald_outbox_oldest_age_seconds";
pub const MESSAGES_PUBLISHED: &str = "skald_messages_published_total";
pub const MESSAGES_CONSUMED: &str = "skald_messages_consumed_total";
pub const MESSAGES_DEAD_LETTERED: &str = "skald_messages_dead_lettered_total";
pub const COMMANDS_PROCESSED: &str = "skald_commands_processed_total";
pub const LOCK_ACQUISITIONS: &str = "skald_lock_acquisitions_total";
pub const LOCK_BUSY: &str = "skald_lock_busy_total";
pub const LOCK_TIMEOUTS: &str = "skald_lock_timeouts_total";
pub const FENCING_REJECTIONS: &str = "skald_fencing_rejections_total";
pub const BATCHES_RERUN: &str = "skald_participant_batches_rerun_total";

/// Buckets of one step attempt (command sent -> reply applied): 5 ms to 1 min.
pub const STEP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets of a whole saga (created -> final): 10 ms to 10 min.
pub const SAGA_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder for this process (once; later calls
/// return the same handle). If another recorder was installed first, the
/// handle renders a detached, empty registry and a warning is logged.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new();
        let builder = builder
            .set_buckets_for_metric(Matcher::Full(STEP_DURATION.to_owned()), STEP_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(SAGA_DURATION.to_owned()), SAGA_BUCKETS));
        let builder = match builder {
            Ok(b) => b,
            // Only an empty bucket list fails, and ours are constants.
            Err(e) => {
                tracing::warn!(error = %e, "histogram buckets refused; histograms render as summaries");
                PrometheusBuilder::new()
            }
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if let Err(e) = metrics::set_global_recorder(recorder) {
            tracing::warn!(error = %e, "a metrics recorder was already installed; /metrics stays empty");
        }
        describe();
        handle
    })
}

/// HELP text of every counter.
const COUNTERS: &[(&str, &str)] = &[
    (SAGAS_STARTED, "Sagas started, by saga type."),
    (SAGAS_COMPLETED, "Sagas that ended COMPLETED, by saga type."),
    (SAGAS_COMPENSATED, "Sagas that ended COMPENSATED, by saga type."),
    (
        SAGAS_STUCK,
        "Sagas that became STUCK (compensation kept failing), by saga type.",
    ),
    (STEP_ATTEMPTS, "Step attempts sent (commands), by step and kind."),
    (
        STEP_RETRIES,
        "Step attempts after the first (retries), by step and kind.",
    ),
    (STEP_TIMEOUTS, "Step attempts whose deadline passed without a reply."),
    (
        STEP_TIMEOUTS_POSTPONED,
        "Deadlines moved because the participant's queue still held commands, by participant.",
    ),
    (MESSAGES_PUBLISHED, "Messages confirmed by the broker, by exchange."),
    (
        MESSAGES_CONSUMED,
        "Deliveries acked after processing (dead-lettered ones included), by queue.",
    ),
    (
        MESSAGES_DEAD_LETTERED,
        "Messages sent to the dead-letter queue by Skald, by queue and reason.",
    ),
    (COMMANDS_PROCESSED, "Commands processed by a participant, by result."),
    (LOCK_ACQUISITIONS, "Redis locks acquired."),
    (LOCK_BUSY, "Lock attempts that found the lock held (contention)."),
    (LOCK_TIMEOUTS, "Lock waits that gave up (the command is retried)."),
    (
        FENCING_REJECTIONS,
        "Writes refused because their fencing token was stale.",
    ),
    (
        BATCHES_RERUN,
        "Batch transactions rolled back and run again command by command, by participant and reason.",
    ),
];

fn describe() {
    for (name, help) in COUNTERS {
        describe_counter!(*name, *help);
    }
    describe_histogram!(
        SAGA_DURATION,
        Unit::Seconds,
        "End-to-end saga latency, from creation to its final status."
    );
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "Step attempt latency, from the command's transition to the applied reply."
    );
    describe_gauge!(OUTBOX_ROWS, "Outbox rows waiting to be published (sampled).");
    describe_gauge!(
        OUTBOX_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest outbox row, 0 when empty (sampled)."
    );
}

/// The process's handle (installing the recorder if needed).
pub fn handle() -> &'static PrometheusHandle {
    install()
}

/// `GET /metrics` in the Prometheus text format. Generic over the state so
/// it merges into any router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/metrics", get(render))
}

async fn render() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        handle().render(),
    )
}

// ---- coordinator: sagas and steps ----

pub fn saga_started(saga_type: &str) {
    counter!(SAGAS_STARTED, "saga_type" => saga_type.to_owned()).increment(1);
}

/// A saga reached a final status (`COMPLETED`, `COMPENSATED`, `STUCK`) after `latency`.
pub fn saga_finished(saga_type: &str, status: &str, latency: Duration) {
    let name = match status {
        "COMPLETED" => SAGAS_COMPLETED,
        "COMPENSATED" => SAGAS_COMPENSATED,
        "STUCK" => SAGAS_STUCK,
        _ => return,
    };
    counter!(name, "saga_type" => saga_type.to_owned()).increment(1);
    histogram!(SAGA_DURATION, "saga_type" => saga_type.to_owned(), "status" => status.to_owned())
        .record(latency.as_secs_f64());
}

/// A command for attempt `attempt` of `(step, kind)` was sent.
pub fn step_attempt(saga_type: &str, step: &str, kind: &str, attempt: u32) {
    let labels = [
        ("saga_type", saga_type.to_owned()),
        ("step", step.to_owned()),
        ("kind", kind.to_owned()),
    ];
    counter!(STEP_ATTEMPTS, &labels).increment(1);
    if attempt > 1 {
        counter!(STEP_RETRIES, &labels).increment(1);
    }
}

/// The reply to an attempt was applied (`outcome`: `success` or `failure`).
pub fn step_replied(saga_type: &str, step: &str, kind: &str, outcome: &str, latency: Duration) {
    histogram!(
        STEP_DURATION,
        "saga_type" => saga_type.to_owned(),
        "step" => step.to_owned(),
        "kind" => kind.to_owned(),
        "outcome" => outcome.to_owned()
    )
    .record(latency.as_secs_f64());
}

pub fn step_timeouts_postponed(participant: &str, n: u64) {
    counter!(STEP_TIMEOUTS_POSTPONED, "participant" => participant.to_owned()).increment(n);
}

pub fn step_timed_out(saga_type: &str, step: &str, kind: &str) {
    counter!(
        STEP_TIMEOUTS,
        "saga_type" => saga_type.to_owned(),
        "step" => step.to_owned(),
        "kind" => kind.to_owned()
    )
    .increment(1);
}

// ---- messaging ----

/// `n` messages to `exchange` were confirmed by the broker.
pub fn published(exchange: &str, n: u64) {
    counter!(MESSAGES_PUBLISHED, "exchange" => exchange.to_owned()).increment(n);
}

/// `n` deliveries from `queue` were acked.
pub fn consumed(queue: &str, n: u64) {
    counter!(MESSAGES_CONSUMED, "queue" => queue.to_owned()).increment(n);
}

/// A message from `queue` was dead-lettered; `reason` is classified into a
/// bounded label by [`reason_class`].
pub fn dead_lettered(queue: &str, reason: &str) {
    counter!(
        MESSAGES_DEAD_LETTERED,
        "queue" => queue.to_owned(),
        "reason" => reason_class(reason)
    )
    .increment(1);
}

/// The class of a dead-letter reason (the full text stays in the message's
/// `x-skald-reason` header): a small fixed set, safe as a label.
pub fn reason_class(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.starts_with("redelivered") {
        "redelivered"
    } else if r.starts_with("undecodable") {
        "undecodable"
    } else if r.starts_with("unknown message type") {
        "unknown_type"
    } else if r.starts_with("unknown saga") || r.contains("has no definition") || r.contains("no definition for") {
        "unknown_saga"
    } else if r.contains("has no step") || r.starts_with("unknown step") {
        "unknown_step"
    } else if r.starts_with("invalid payload") {
        "invalid_payload"
    } else {
        "other"
    }
}

// ---- participants ----

/// A participant processed a command: `result` is `executed`, `replayed` or `retryable`.
pub fn command_processed(participant: &str, kind: &str, result: &str) {
    counter!(
        COMMANDS_PROCESSED,
        "participant" => participant.to_owned(),
        "kind" => kind.to_owned(),
        "result" => result.to_owned()
    )
    .increment(1);
}

pub fn lock_acquired(resource: &str) {
    counter!(LOCK_ACQUISITIONS, "resource" => resource.to_owned()).increment(1);
}

pub fn lock_busy(resource: &str) {
    counter!(LOCK_BUSY, "resource" => resource.to_owned()).increment(1);
}

pub fn lock_timed_out(resource: &str) {
    counter!(LOCK_TIMEOUTS, "resource" => resource.to_owned()).increment(1);
}

pub fn fencing_rejected(resource: &str) {
    counter!(FENCING_REJECTIONS, "resource" => resource.to_owned()).increment(1);
}

/// A participant's batch transaction failed as a whole and its commands
/// run again one by one; `reason` is `barrier_race` (a barrier row written
/// meanwhile, or twice in the batch) or `error`.
pub fn batch_rerun(participant: &'static str, reason: &'static str) {
    counter!(BATCHES_RERUN, "participant" => participant, "reason" => reason).increment(1);
}

// ---- outbox gauges ----

/// Samples an outbox table's backlog and the age of its oldest row into
/// gauges labelled `outbox` (whose outbox) and `database` (its index when
/// a participant's data spans several databases), and runs the recorder's
/// upkeep. Several coordinators sharing a database report the same table:
/// aggregate with `max`, not `sum`.
pub struct OutboxSampler {
    pub pool: PgPool,
    pub outbox: String,
    pub database: usize,
    pub interval: Duration,
}

impl OutboxSampler {
    #[tracing::instrument(name = "outbox_sampler", skip_all, fields(outbox = %self.outbox, database = self.database))]
    pub async fn run(self, shutdown: CancellationToken) {
        let labels = [("outbox", self.outbox.clone()), ("database", self.database.to_string())];
        while !shutdown.is_cancelled() {
            match sample(&self.pool).await {
                Ok((rows, age)) => {
                    gauge!(OUTBOX_ROWS, &labels).set(rows as f64);
                    gauge!(OUTBOX_OLDEST_AGE, &labels).set(age);
                }
                Err(e) => tracing::debug!(error = %e, "cannot sample the outbox"),
            }
            handle().run_upkeep();
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }
}

/// Rows in the outbox and the age in seconds of the oldest (0 when empty).
pub async fn sample(pool: &PgPool) -> Result<(i64, f64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*)::bigint,
                COALESCE(EXTRACT(EPOCH FROM now() - (SELECT created_at FROM outbox ORDER BY id LIMIT 1)), 0)::float8
         FROM outbox",
    )
    .fetch_one(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::reason_class;

    #[test]
    fn reasons_fall_into_a_bounded_set() {
        assert_eq!(reason_class("redelivered 11 times"), "redelivered");
        assert_eq!(reason_class("undecodable reply: expected value"), "undecodable");
        assert_eq!(reason_class("undecodable command: eof"), "undecodable");
        assert_eq!(reason_class("unknown message type \"Nope\""), "unknown_type");
        assert_eq!(
            reason_class("unknown saga 0190b3a0-0000-7000-8000-000000000001"),
            "unknown_saga"
        );
        assert_eq!(reason_class("saga type \"order\" has no step \"x\""), "unknown_step");
        assert_eq!(reason_class("invalid payload: missing order_id"), "invalid_payload");
        assert_eq!(reason_class("something new"), "other");
    }
}
