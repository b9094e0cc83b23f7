//! What committed transitions did, as metrics and trace spans.
//!
//! The store collects an [`Observed`] while it writes a batch of transitions
//! and calls [`Observed::record`] only after the commit, so a rolled-back
//! (and retried) transaction is never counted. Everything is derived from
//! the saga state as persisted: an attempt whose `finished_at` is the
//! transition's time ended in this transition, and so did a saga whose
//! `finished_at` is.
//!
//! Spans (exported only when OTLP export is on, see
//! [`skald_wire::telemetry`]): one per ended step attempt, from the
//! command's transition to the reply (or timeout), whose id is the one the
//! command's `traceparent` named; and the saga's root span when it ends.

use chrono::{DateTime, Utc};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use skald_engine::{AttemptOutcome, AttemptRecord, CommandSpec, Kind, SagaState, SagaStatus};
use skald_wire::{metrics, trace};
use uuid::Uuid;

/// A saga was created with its first commands (call after the commit).
pub fn saga_started(saga_type: &str, commands: &[CommandSpec]) {
    metrics::saga_started(saga_type);
    for c in commands {
        metrics::step_attempt(saga_type, &c.step, c.kind.as_str(), c.attempt);
    }
}

/// Transitions written in one transaction, to record once it committed.
#[derive(Debug, Default)]
#[must_use = "call record() after the commit"]
pub struct Observed {
    sent: Vec<Sent>,
    ended: Vec<Ended>,
    finished: Vec<Finished>,
}

#[derive(Debug)]
struct Sent {
    saga_type: String,
    step: String,
    kind: Kind,
    attempt: u32,
}

#[derive(Debug)]
struct Ended {
    saga_id: Uuid,
    saga_type: String,
    step: String,
    kind: Kind,
    attempt: AttemptRecord,
}

#[derive(Debug)]
struct Finished {
    saga_id: Uuid,
    saga_type: String,
    status: SagaStatus,
    created_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
    failure: Option<String>,
}

impl Observed {
    /// A saga changed by a transition at `now`, as it is persisted, with
    /// the commands the transition caused.
    pub fn changed(
        &mut self,
        saga_id: Uuid,
        saga_type: &str,
        state: &SagaState,
        commands: &[CommandSpec],
        now: DateTime<Utc>,
    ) {
        self.sent.extend(commands.iter().map(|c| Sent {
            saga_type: saga_type.to_owned(),
            step: c.step.clone(),
            kind: c.kind,
            attempt: c.attempt,
        }));
        for step in &state.steps {
            let attempts = step.attempts.iter().map(|a| (Kind::Action, a));
            let compensations = step.compensations.iter().map(|a| (Kind::Compensation, a));
            for (kind, a) in attempts.chain(compensations) {
                if a.finished_at == Some(now) {
                    self.ended.push(Ended {
                        saga_id,
                        saga_type: saga_type.to_owned(),
                        step: step.name.clone(),
                        kind,
                        attempt: a.clone(),
                    });
                }
            }
        }
        if state.status.is_final()
            && let Some(finished_at) = state.finished_at.filter(|f| *f == now)
        {
            self.finished.push(Finished {
                saga_id,
                saga_type: saga_type.to_owned(),
                status: state.status,
                created_at: state.created_at,
                finished_at,
                failure: state.failure.clone(),
            });
        }
    }

    /// Records the metrics and exports the spans. Call after the commit.
    pub fn record(self) {
        for s in &self.sent {
            metrics::step_attempt(&s.saga_type, &s.step, s.kind.as_str(), s.attempt);
        }
        for e in self.ended {
            let a = &e.attempt;
            let end = a.finished_at.unwrap_or(a.sent_at);
            let latency = (end - a.sent_at).to_std().unwrap_or_default();
            let kind = e.kind.as_str();
            let (outcome, error) = match &a.outcome {
                Some(AttemptOutcome::Succeeded) => ("success", None),
                Some(AttemptOutcome::Failed { reason, .. }) => ("failure", Some(reason.clone())),
                Some(AttemptOutcome::TimedOut) => ("timed_out", Some("timed out".to_owned())),
                Some(AttemptOutcome::Abandoned) | None => ("abandoned", Some("abandoned".to_owned())),
            };
            tracing::debug!(
                saga_id = %e.saga_id,
                step = %e.step,
                attempt = a.number,
                kind,
                outcome,
                latency_ms = latency.as_millis() as u64,
                "step attempt ended"
            );
            match outcome {
                "success" | "failure" => metrics::step_replied(&e.saga_type, &e.step, kind, outcome, latency),
                "timed_out" => metrics::step_timed_out(&e.saga_type, &e.step, kind),
                _ => {}
            }
            trace::emit_span(trace::PastSpan {
                name: format!("{} {kind}", e.step),
                saga_id: e.saga_id,
                span_id: trace::span_id(e.saga_id, &e.step, a.number, e.kind, trace::Role::Attempt),
                parent: Some(trace::saga_span_id(e.saga_id)),
                kind: SpanKind::Producer,
                start: a.sent_at.into(),
                end: end.into(),
                attributes: vec![
                    KeyValue::new("saga.id", e.saga_id.to_string()),
                    KeyValue::new("saga.type", e.saga_type.clone()),
                    KeyValue::new("saga.step", e.step.clone()),
                    KeyValue::new("saga.attempt", i64::from(a.number)),
                    KeyValue::new("saga.kind", kind),
                    KeyValue::new("saga.outcome", outcome),
                ],
                error,
            });
        }
        for f in self.finished {
            let latency = (f.finished_at - f.created_at).to_std().unwrap_or_default();
            tracing::debug!(saga_id = %f.saga_id, status = f.status.as_str(), latency_ms = latency.as_millis() as u64, "saga finished");
            metrics::saga_finished(&f.saga_type, f.status.as_str(), latency);
            trace::emit_span(trace::PastSpan {
                name: format!("saga {}", f.saga_type),
                saga_id: f.saga_id,
                span_id: trace::saga_span_id(f.saga_id),
                parent: None,
                kind: SpanKind::Internal,
                start: f.created_at.into(),
                end: f.finished_at.into(),
                attributes: vec![
                    KeyValue::new("saga.id", f.saga_id.to_string()),
                    KeyValue::new("saga.type", f.saga_type.clone()),
                    KeyValue::new("saga.status", f.status.as_str()),
                ],
                error: (f.status != SagaStatus::Completed)
                    .then(|| f.failure.unwrap_or_else(|| f.status.as_str().to_owned())),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use skald_engine::{StepState, StepStatus};

    fn attempt(number: u32, sent: DateTime<Utc>, finished: Option<DateTime<Utc>>) -> AttemptRecord {
        AttemptRecord {
            number,
            sent_at: sent,
            deadline: sent + Duration::seconds(10),
            finished_at: finished,
            outcome: finished.map(|_| AttemptOutcome::Succeeded),
        }
    }

    #[test]
    fn only_what_ended_at_this_transition_is_observed() {
        let t0 = Utc::now();
        let now = t0 + Duration::milliseconds(300);
        let state = SagaState {
            status: SagaStatus::Completed,
            steps: vec![
                StepState {
                    name: "a".into(),
                    status: StepStatus::Succeeded,
                    attempts: vec![attempt(1, t0, Some(t0 + Duration::milliseconds(100)))],
                    compensations: vec![],
                    may_have_run: true,
                    failures_in_a_row: 0,
                    data: serde_json::Value::Null,
                },
                StepState {
                    name: "b".into(),
                    status: StepStatus::Succeeded,
                    attempts: vec![attempt(1, t0, Some(t0)), attempt(2, t0, Some(now))],
                    compensations: vec![],
                    may_have_run: true,
                    failures_in_a_row: 0,
                    data: serde_json::Value::Null,
                },
            ],
            cursor: 1,
            wake_at: None,
            failure: None,
            created_at: t0,
            finished_at: Some(now),
        };
        let mut o = Observed::default();
        o.changed(Uuid::now_v7(), "order", &state, &[], now);
        assert_eq!(o.ended.len(), 1);
        assert_eq!((o.ended[0].step.as_str(), o.ended[0].attempt.number), ("b", 2));
        assert_eq!(o.finished.len(), 1);
        assert_eq!(o.finished[0].status, SagaStatus::Completed);
        let mut later = Observed::default();
        later.changed(Uuid::now_v7(), "order", &state, &[], now + Duration::milliseconds(1));
        assert!(later.ended.is_empty() && later.finished.is_empty());
    }
}
