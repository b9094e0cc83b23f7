//! The transition function: `(definition, state, event) -> (state', commands)`.
//!
//! Rules (DESIGN.md):
//! - steps run in order; a step's action is retried (new attempt, after a
//!   backoff) on a transient failure or a timeout, up to its retry policy;
//! - a business failure, or attempts exhausted, starts compensation: the
//!   compensations of the steps whose action may have run, newest first;
//!   the failing step itself is compensated only when its outcome is unknown
//!   (an attempt timed out);
//! - compensations are retried until they succeed; after the definition's
//!   number of failures in a row the saga is `STUCK`;
//! - a definitive reply (success, business failure; a compensation's
//!   success) from an earlier attempt of the step being run settles the step:
//!   the participant's barrier gives every attempt of a step the same answer,
//!   so there is no need to wait for the attempt in flight or retry again;
//! - any other reply that is not for the attempt in flight (transient
//!   failure of an earlier attempt, duplicate, unknown attempt, another
//!   step, a finished saga) changes nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::Kind;
use crate::definition::{ParticipantName, RetryPolicy, SagaDefinition};
use crate::state::{AttemptOutcome, AttemptRecord, SagaState, SagaStatus, StepState, StepStatus};

/// What the caller knows that the engine must not look up itself.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub now: DateTime<Utc>,
    /// A sample in `[0, 1)` used to spread backoffs.
    pub jitter: f64,
}

/// The outcome a participant reported.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success { data: Value },
    Failure { retryable: bool, reason: String },
}

/// Something that happened to a saga.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A participant replied to `(step, attempt, kind)`.
    Reply {
        step: String,
        attempt: u32,
        kind: Kind,
        outcome: Outcome,
    },
    /// The saga's `wake_at` has passed: a deadline expired or a backoff ended.
    Tick,
    /// The saga's `wake_at` has passed while the command of the attempt in
    /// flight, or its reply, may still be waiting in a queue (the caller saw
    /// the command queue of the participant it waits on, see
    /// [`SagaState::waiting_on`], or the reply queue, behind): it is waiting
    /// its turn, not lost, and a retry would only queue behind it. The attempt gets one more timeout, but no
    /// deadline moves past `max_wait` after the step's first attempt (of
    /// the action, or of the compensation) was sent; past that, or with no
    /// attempt in flight (a backoff ended), this is a [`Event::Tick`].
    QueueBacklog { max_wait: Duration },
    /// Operator: resume a `STUCK` saga's compensation.
    Retry,
    /// Operator: stop a `RUNNING` saga and compensate what may have run.
    Abort { reason: String },
}

/// A command the coordinator must send (through its outbox).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    pub step: String,
    pub attempt: u32,
    pub kind: Kind,
    pub participant: ParticipantName,
    /// AMQP `type`, e.g. `ChargePayment`.
    pub message_type: String,
}

/// Whether an event changed the saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Changed,
    /// Nothing to do (stale or duplicate reply, early tick): the reason, for logs.
    Ignored(&'static str),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub state: SagaState,
    pub commands: Vec<CommandSpec>,
    pub applied: Applied,
}

/// Events the engine refuses: the caller decides (dead-letter, 409, ...).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("saga type {saga_type:?} has no step {step:?}")]
    UnknownStep { saga_type: String, step: String },
    #[error("state does not match definition {0:?}")]
    StateMismatch(String),
    #[error("cannot {action} a saga that is {status}")]
    InvalidOperatorAction { action: &'static str, status: &'static str },
}

/// A new saga: its first step's first attempt.
pub fn start(def: &SagaDefinition, ctx: Ctx) -> Transition {
    let mut t = Machine {
        def,
        ctx,
        state: SagaState {
            status: SagaStatus::Running,
            steps: def.steps().iter().map(|s| StepState::new(&s.name)).collect(),
            cursor: 0,
            wake_at: None,
            failure: None,
            created_at: ctx.now,
            finished_at: None,
        },
        commands: Vec::new(),
    };
    t.send_action(0);
    t.done(Applied::Changed)
}

/// Applies `event` to `state`.
pub fn apply(def: &SagaDefinition, state: SagaState, event: Event, ctx: Ctx) -> Result<Transition, EngineError> {
    if state.steps.len() != def.steps().len() || state.cursor >= state.steps.len() {
        return Err(EngineError::StateMismatch(def.name().to_owned()));
    }
    let mut m = Machine {
        def,
        ctx,
        state,
        commands: Vec::new(),
    };
    let applied = match event {
        Event::Reply {
            step,
            attempt,
            kind,
            outcome,
        } => {
            let index = def.step_index(&step).ok_or_else(|| EngineError::UnknownStep {
                saga_type: def.name().to_owned(),
                step: step.clone(),
            })?;
            m.on_reply(index, attempt, kind, outcome)
        }
        Event::Tick => m.on_tick(),
        Event::QueueBacklog { max_wait } => m.on_queue_backlog(max_wait),
        Event::Retry => m.on_retry()?,
        Event::Abort { reason } => m.on_abort(reason)?,
    };
    Ok(m.done(applied))
}

struct Machine<'a> {
    def: &'a SagaDefinition,
    ctx: Ctx,
    state: SagaState,
    commands: Vec<CommandSpec>,
}

impl Machine<'_> {
    fn done(self, applied: Applied) -> Transition {
        Transition {
            state: self.state,
            commands: self.commands,
            applied,
        }
    }

    fn on_reply(&mut self, index: usize, attempt: u32, kind: Kind, outcome: Outcome) -> Applied {
        let (saga_status, in_flight_status, waiting_status) = match kind {
            Kind::Action => (SagaStatus::Running, StepStatus::Running, StepStatus::RetryWait),
            Kind::Compensation => (
                SagaStatus::Compensating,
                StepStatus::Compensating,
                StepStatus::CompensationWait,
            ),
        };
        let step = &self.state.steps[index];
        let latest = match kind {
            Kind::Action => step.attempts.last(),
            Kind::Compensation => step.compensations.last(),
        }
        .map(|a| a.number);
        let Some(latest) = latest else {
            return Applied::Ignored("reply is not for the attempt in flight");
        };
        if self.state.status != saga_status || self.state.cursor != index {
            return Applied::Ignored("reply is not for the attempt in flight");
        }
        let for_attempt_in_flight = step.status == in_flight_status && attempt == latest;
        // Every attempt of a step meets the same barrier row, so a definitive
        // answer from an earlier attempt is the answer any later attempt will
        // get: it settles the step now instead of waiting for (or retrying
        // after) the attempt in flight. This is what keeps a backlog from
        // turning into a retry storm.
        let definitive = match (kind, &outcome) {
            (Kind::Action, Outcome::Success { .. }) => true,
            (Kind::Action, Outcome::Failure { retryable, .. }) => !retryable,
            (Kind::Compensation, Outcome::Success { .. }) => true,
            (Kind::Compensation, Outcome::Failure { .. }) => false,
        };
        let settles_earlier = definitive
            && (1..=latest).contains(&attempt)
            && (step.status == waiting_status || (step.status == in_flight_status && attempt < latest));
        if !for_attempt_in_flight && !settles_earlier {
            return Applied::Ignored("reply is not for the attempt in flight");
        }
        if step.status == waiting_status {
            // No attempt is in flight: the last one already ended (its record
            // says how); the step's answer comes from the barrier instead.
            return self.settle_from_waiting(index, kind, outcome);
        }
        match (kind, outcome) {
            (Kind::Action, Outcome::Success { data }) => {
                self.finish_attempt(index, kind, AttemptOutcome::Succeeded);
                self.action_succeeded(index, data);
            }
            (Kind::Action, Outcome::Failure { retryable, reason }) => {
                self.finish_attempt(
                    index,
                    kind,
                    AttemptOutcome::Failed {
                        retryable,
                        reason: reason.clone(),
                    },
                );
                if retryable {
                    self.action_failed_transiently(index, reason);
                } else {
                    self.action_refused(index, &reason);
                }
            }
            (Kind::Compensation, Outcome::Success { .. }) => {
                self.finish_attempt(index, kind, AttemptOutcome::Succeeded);
                self.compensation_succeeded(index);
            }
            (Kind::Compensation, Outcome::Failure { retryable, reason }) => {
                self.finish_attempt(index, kind, AttemptOutcome::Failed { retryable, reason });
                self.compensation_failed(index);
            }
        }
        Applied::Changed
    }

    /// A definitive answer for a step waiting out a backoff: as if the
    /// attempt in flight had given it, without touching the records of the
    /// attempts that already ended.
    fn settle_from_waiting(&mut self, index: usize, kind: Kind, outcome: Outcome) -> Applied {
        match (kind, outcome) {
            (Kind::Action, Outcome::Success { data }) => self.action_succeeded(index, data),
            (Kind::Action, Outcome::Failure { reason, .. }) => self.action_refused(index, &reason),
            (Kind::Compensation, _) => self.compensation_succeeded(index),
        }
        Applied::Changed
    }

    fn on_tick(&mut self) -> Applied {
        match self.state.wake_at {
            Some(at) if at <= self.ctx.now && self.state.status.is_active() => {}
            _ => return Applied::Ignored("nothing is due"),
        }
        let index = self.state.cursor;
        match self.state.steps[index].status {
            StepStatus::Running => {
                self.finish_attempt(index, Kind::Action, AttemptOutcome::TimedOut);
                self.state.steps[index].may_have_run = true;
                let reason = format!("{}: attempt timed out", self.def.steps()[index].name);
                self.action_failed_transiently(index, reason);
            }
            StepStatus::RetryWait => self.send_action(index),
            StepStatus::Compensating => {
                self.finish_attempt(index, Kind::Compensation, AttemptOutcome::TimedOut);
                self.compensation_failed(index);
            }
            StepStatus::CompensationWait => self.send_compensation(index),
            _ => return Applied::Ignored("no step is waiting"),
        }
        Applied::Changed
    }

    fn on_queue_backlog(&mut self, max_wait: Duration) -> Applied {
        match self.state.wake_at {
            Some(at) if at <= self.ctx.now && self.state.status.is_active() => {}
            _ => return Applied::Ignored("nothing is due"),
        }
        let index = self.state.cursor;
        let step = &mut self.state.steps[index];
        let (timeout, records) = match step.status {
            StepStatus::Running => (self.def.steps()[index].timeout, &mut step.attempts),
            StepStatus::Compensating => (self.def.compensation_timeout(), &mut step.compensations),
            _ => return self.on_tick(),
        };
        // The wait is counted from the phase's first attempt, so that once
        // it is over the step's retries run as they would without a backlog.
        let first_sent = records.first().map(|r| r.sent_at);
        let (Some(first_sent), Some(record)) = (first_sent, records.last_mut()) else {
            return self.on_tick();
        };
        let deadline = (self.ctx.now + timeout).min(first_sent + max_wait);
        if deadline <= self.ctx.now {
            return self.on_tick();
        }
        record.deadline = deadline;
        self.state.wake_at = Some(deadline);
        Applied::Changed
    }

    fn on_retry(&mut self) -> Result<Applied, EngineError> {
        if self.state.status != SagaStatus::Stuck {
            return Err(EngineError::InvalidOperatorAction {
                action: "retry",
                status: self.state.status.as_str(),
            });
        }
        let index = self.state.cursor;
        self.state.status = SagaStatus::Compensating;
        self.state.finished_at = None;
        self.state.steps[index].failures_in_a_row = 0;
        self.send_compensation(index);
        Ok(Applied::Changed)
    }

    fn on_abort(&mut self, reason: String) -> Result<Applied, EngineError> {
        if self.state.status != SagaStatus::Running {
            return Err(EngineError::InvalidOperatorAction {
                action: "abort",
                status: self.state.status.as_str(),
            });
        }
        let index = self.state.cursor;
        if self.state.steps[index].status == StepStatus::Running {
            // The attempt in flight may still take effect: compensate it too.
            self.finish_attempt(index, Kind::Action, AttemptOutcome::Abandoned);
            self.state.steps[index].may_have_run = true;
        }
        self.state.steps[index].status = StepStatus::Failed;
        self.begin_compensation(index, format!("aborted: {reason}"));
        Ok(Applied::Changed)
    }

    fn action_succeeded(&mut self, index: usize, data: Value) {
        let step = &mut self.state.steps[index];
        step.status = StepStatus::Succeeded;
        step.may_have_run = true;
        step.failures_in_a_row = 0;
        step.data = data;
        if index + 1 < self.state.steps.len() {
            self.state.cursor = index + 1;
            self.send_action(index + 1);
        } else {
            self.finish(SagaStatus::Completed);
        }
    }

    /// A business failure: the step failed for good and the saga compensates.
    fn action_refused(&mut self, index: usize, reason: &str) {
        self.state.steps[index].status = StepStatus::Failed;
        self.begin_compensation(index, format!("{}: {reason}", self.def.steps()[index].name));
    }

    fn compensation_succeeded(&mut self, index: usize) {
        let step = &mut self.state.steps[index];
        step.status = StepStatus::Compensated;
        step.failures_in_a_row = 0;
        self.compensate_from(index);
    }

    fn action_failed_transiently(&mut self, index: usize, reason: String) {
        let policy = &self.def.steps()[index].retry;
        let step = &mut self.state.steps[index];
        step.failures_in_a_row += 1;
        if (step.attempts.len() as u32) < policy.max_attempts {
            step.status = StepStatus::RetryWait;
            let delay = policy.backoff(step.failures_in_a_row, self.ctx.jitter);
            self.state.wake_at = Some(self.ctx.now + delay);
        } else {
            step.status = StepStatus::Failed;
            let attempts = step.attempts.len();
            self.begin_compensation(index, format!("{reason} (after {attempts} attempts)"));
        }
    }

    fn compensation_failed(&mut self, index: usize) {
        let policy: &RetryPolicy = self.def.compensation_retry();
        let step = &mut self.state.steps[index];
        step.failures_in_a_row += 1;
        if step.failures_in_a_row >= policy.max_attempts {
            self.finish(SagaStatus::Stuck);
        } else {
            step.status = StepStatus::CompensationWait;
            let delay = policy.backoff(step.failures_in_a_row, self.ctx.jitter);
            self.state.wake_at = Some(self.ctx.now + delay);
        }
    }

    fn begin_compensation(&mut self, failed: usize, reason: String) {
        self.state.status = SagaStatus::Compensating;
        self.state.failure = Some(reason);
        self.compensate_from(failed);
    }

    /// Compensates the newest step at or before `from` that needs it, or
    /// ends the saga `COMPENSATED` when none is left.
    fn compensate_from(&mut self, from: usize) {
        let next = (0..=from).rev().find(|&i| {
            let step = &self.state.steps[i];
            step.may_have_run && step.status != StepStatus::Compensated && self.def.steps()[i].compensation.is_some()
        });
        match next {
            Some(i) => {
                self.state.cursor = i;
                self.state.steps[i].failures_in_a_row = 0;
                self.send_compensation(i);
            }
            None => self.finish(SagaStatus::Compensated),
        }
    }

    fn send_action(&mut self, index: usize) {
        let def = &self.def.steps()[index];
        let step = &mut self.state.steps[index];
        let number = step.attempts.len() as u32 + 1;
        let deadline = self.ctx.now + def.timeout;
        step.attempts.push(AttemptRecord {
            number,
            sent_at: self.ctx.now,
            deadline,
            finished_at: None,
            outcome: None,
        });
        step.status = StepStatus::Running;
        self.state.wake_at = Some(deadline);
        self.commands.push(CommandSpec {
            step: def.name.clone(),
            attempt: number,
            kind: Kind::Action,
            participant: def.participant.clone(),
            message_type: def.action.clone(),
        });
    }

    fn send_compensation(&mut self, index: usize) {
        let def = &self.def.steps()[index];
        let Some((participant, message_type)) = def.compensation.clone() else {
            // compensate_from never picks such a step; stay safe anyway.
            self.compensate_from(index.saturating_sub(1));
            return;
        };
        let step = &mut self.state.steps[index];
        let number = step.compensations.len() as u32 + 1;
        let deadline = self.ctx.now + self.def.compensation_timeout();
        step.compensations.push(AttemptRecord {
            number,
            sent_at: self.ctx.now,
            deadline,
            finished_at: None,
            outcome: None,
        });
        step.status = StepStatus::Compensating;
        self.state.wake_at = Some(deadline);
        self.commands.push(CommandSpec {
            step: def.name.clone(),
            attempt: number,
            kind: Kind::Compensation,
            participant,
            message_type,
        });
    }

    fn finish_attempt(&mut self, index: usize, kind: Kind, outcome: AttemptOutcome) {
        let step = &mut self.state.steps[index];
        let record = match kind {
            Kind::Action => step.attempts.last_mut(),
            Kind::Compensation => step.compensations.last_mut(),
        };
        if let Some(r) = record {
            r.finished_at = Some(self.ctx.now);
            r.outcome = Some(outcome);
        }
    }

    fn finish(&mut self, status: SagaStatus) {
        self.state.status = status;
        self.state.wake_at = None;
        self.state.finished_at = Some(self.ctx.now);
    }
}
