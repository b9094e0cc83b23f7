//! Skald's saga engine: pure, no I/O.
//!
//! - [`definition`]: saga definitions as data, built with a small DSL
//!   (steps, participant, action, compensation, timeout, retry policy).
//! - [`state`]: the durable state of one saga (what the coordinator stores as JSON).
//! - [`transition`]: `(definition, state, event) -> (state', commands)`.
//!
//! Data flows one way: the coordinator loads a [`state::SagaState`], feeds an
//! [`transition::Event`] (a reply, a tick of the clock, an operator action)
//! to [`transition::apply`], and stores the new state together with the
//! [`transition::CommandSpec`]s it returned, in one database transaction.
//! Nothing here reads a clock or a random source: the caller passes both in
//! [`transition::Ctx`], so every transition is reproducible in tests.

pub mod definition;
pub mod state;
pub mod transition;

pub use definition::{DefinitionError, ParticipantName, RetryPolicy, SagaDefinition, StepDefinition};
pub use state::{AttemptOutcome, AttemptRecord, SagaState, SagaStatus, StepState, StepStatus};
pub use transition::{Applied, CommandSpec, Ctx, EngineError, Event, Outcome, Transition, apply, start};

use serde::{Deserialize, Serialize};

/// Whether a message runs a step's action or its compensation.
///
/// Part of the wire contract (`"action"` / `"compensation"`) and of the
/// participants' inbox key `(saga id, step, kind)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Action,
    Compensation,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Action => "action",
            Kind::Compensation => "compensation",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "action" => Ok(Kind::Action),
            "compensation" => Ok(Kind::Compensation),
            other => Err(format!("unknown kind {other:?}")),
        }
    }
}
