//! The durable state of one saga. Serialized as JSON into the coordinator's
//! `sagas.state` column; it carries the whole history an operator needs
//! (every attempt of every step, with times and errors).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::definition::{ParticipantName, SagaDefinition};

/// Lifecycle of a saga, as exposed by the HTTP API.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SagaStatus {
    Running,
    Compensating,
    Completed,
    Compensated,
    /// A compensation kept failing: an operator must look (retry or fix by hand).
    Stuck,
}

impl SagaStatus {
    pub const ALL: [SagaStatus; 5] = [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Stuck,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "RUNNING",
            SagaStatus::Compensating => "COMPENSATING",
            SagaStatus::Completed => "COMPLETED",
            SagaStatus::Compensated => "COMPENSATED",
            SagaStatus::Stuck => "STUCK",
        }
    }
    /// Whether the engine still has work to do on its own (timeouts, retries).
    pub fn is_active(self) -> bool {
        matches!(self, SagaStatus::Running | SagaStatus::Compensating)
    }
    /// `COMPLETED`, `COMPENSATED` or `STUCK`: nothing happens without an operator.
    pub fn is_final(self) -> bool {
        !self.is_active()
    }
}

impl std::str::FromStr for SagaStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SagaStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown saga status {s:?}"))
    }
}

/// Where one step stands.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started yet.
    Pending,
    /// An action attempt is in flight.
    Running,
    /// The last action attempt failed transiently or timed out; the next one
    /// is sent at the saga's `wake_at`.
    RetryWait,
    Succeeded,
    /// The action failed for good (business failure, or attempts exhausted).
    Failed,
    /// A compensation attempt is in flight.
    Compensating,
    /// The last compensation attempt failed; the next one goes at `wake_at`.
    CompensationWait,
    Compensated,
}

/// How one attempt ended.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AttemptOutcome {
    Succeeded,
    Failed {
        retryable: bool,
        reason: String,
    },
    TimedOut,
    /// An operator aborted the saga while this attempt was in flight.
    Abandoned,
}

/// One attempt of an action or a compensation.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub number: u32,
    pub sent_at: DateTime<Utc>,
    pub deadline: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<AttemptOutcome>,
}

/// The state of one step.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    pub name: String,
    pub status: StepStatus,
    pub attempts: Vec<AttemptRecord>,
    pub compensations: Vec<AttemptRecord>,
    /// The action may have taken effect: it succeeded, or an attempt ended
    /// with an unknown outcome (timeout, abort in flight). Only such steps are
    /// compensated.
    pub may_have_run: bool,
    /// Failures in a row in the current phase (action or compensation); reset
    /// when the phase changes or an operator retries.
    pub failures_in_a_row: u32,
    /// What the participant returned on success (for operators and later steps).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl StepState {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            status: StepStatus::Pending,
            attempts: Vec::new(),
            compensations: Vec::new(),
            may_have_run: false,
            failures_in_a_row: 0,
            data: serde_json::Value::Null,
        }
    }
}

/// The whole state of a saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    pub status: SagaStatus,
    pub steps: Vec<StepState>,
    /// Index of the step being run (`RUNNING`) or compensated (`COMPENSATING`).
    pub cursor: usize,
    /// When the engine wants a [`crate::Event::Tick`]: the deadline of the
    /// attempt in flight, or the end of a backoff. `None` once final.
    pub wake_at: Option<DateTime<Utc>>,
    /// Why the saga compensates (the failure that started it).
    pub failure: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl SagaState {
    pub fn current_step(&self) -> Option<&StepState> {
        self.steps.get(self.cursor)
    }

    /// The participant whose reply the attempt in flight waits for (the
    /// action's or the compensation's); `None` when no attempt is in flight
    /// (a backoff, a final saga).
    pub fn waiting_on<'d>(&self, def: &'d SagaDefinition) -> Option<&'d ParticipantName> {
        if !self.status.is_active() {
            return None;
        }
        let step = def.steps().get(self.cursor)?;
        match self.steps.get(self.cursor)?.status {
            StepStatus::Running => Some(&step.participant),
            StepStatus::Compensating => step.compensation.as_ref().map(|(participant, _)| participant),
            _ => None,
        }
    }
}
