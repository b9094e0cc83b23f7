//! Saga definitions as data, and the builder DSL that makes them read like
//! the business process.
//!
//! ```
//! use std::time::Duration;
//! use skald_engine::SagaDefinition;
//! let def = SagaDefinition::builder("transfer")
//!     .step("debit")
//!         .invoke("bank_a", "Debit")
//!         .compensate("bank_a", "Credit")
//!         .timeout(Duration::from_secs(2))
//!     .step("credit")
//!         .invoke("bank_b", "Credit")
//!     .build()
//!     .unwrap();
//! assert_eq!(def.steps().len(), 2);
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a definition was refused by [`SagaBuilder::build`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DefinitionError {
    #[error("saga {0:?} has no steps")]
    NoSteps(String),
    #[error("step {0:?} has no action (call .invoke)")]
    NoAction(String),
    #[error("step name {0:?} is used twice")]
    DuplicateStep(String),
    #[error("invalid name {0:?}: use 1-64 characters a-z, 0-9, '_' or '-'")]
    InvalidName(String),
    #[error("retry policy of {0:?}: max_attempts must be at least 1")]
    NoAttempts(String),
}

/// The name of a participant: also its AMQP routing key and queue name part
/// (`skald.<participant>.commands`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ParticipantName(String);

impl ParticipantName {
    pub fn parse(s: &str) -> Result<Self, DefinitionError> {
        valid_name(s)
            .then(|| Self(s.to_owned()))
            .ok_or_else(|| DefinitionError::InvalidName(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ParticipantName {
    type Error = DefinitionError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<ParticipantName> for String {
    fn from(p: ParticipantName) -> String {
        p.0
    }
}

impl std::fmt::Display for ParticipantName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Exponential backoff with jitter, computed without a random source: the
/// caller passes a jitter sample in `[0, 1)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. For compensations: failures in a
    /// row before the saga is marked `STUCK`.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// The wait before the attempt that follows failed attempt number
    /// `failed` (1-based). "Equal jitter": half the exponential delay is kept,
    /// the other half is scaled by `jitter`, so retries of many sagas that
    /// failed together spread out but never fire at once.
    pub fn backoff(&self, failed: u32, jitter: f64) -> Duration {
        let exp = self.multiplier.max(1.0).powi(failed.saturating_sub(1).min(64) as i32);
        let base = self.initial_backoff.as_secs_f64() * exp;
        let capped = base.min(self.max_backoff.as_secs_f64()).max(0.0);
        let jitter = jitter.clamp(0.0, 1.0);
        Duration::from_secs_f64(capped / 2.0 + capped / 2.0 * jitter)
    }
}

/// One step of a saga: an action on a participant and, optionally, the
/// compensation that undoes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDefinition {
    pub name: String,
    pub participant: ParticipantName,
    /// Message type of the action command (AMQP `type`), e.g. `ChargePayment`.
    pub action: String,
    /// Participant and message type of the compensation. `None` for a step
    /// that cannot or need not be undone (the last step of a saga).
    pub compensation: Option<(ParticipantName, String)>,
    /// How long one attempt may take before it counts as timed out.
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

/// A saga type: its ordered steps and how hard to try compensations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaDefinition {
    name: String,
    steps: Vec<StepDefinition>,
    /// Backoff between compensation attempts; `max_attempts` is the number of
    /// failures in a row after which the saga is marked `STUCK`.
    compensation_retry: RetryPolicy,
    compensation_timeout: Duration,
}

impl SagaDefinition {
    pub fn builder(name: &str) -> SagaBuilder {
        SagaBuilder {
            name: name.to_owned(),
            steps: Vec::new(),
            default_timeout: Duration::from_secs(10),
            default_retry: RetryPolicy::default(),
            compensation_retry: RetryPolicy {
                max_attempts: 10,
                initial_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(30),
                multiplier: 2.0,
            },
            compensation_timeout: Duration::from_secs(10),
            error: None,
        }
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn steps(&self) -> &[StepDefinition] {
        &self.steps
    }
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
    pub fn compensation_retry(&self) -> &RetryPolicy {
        &self.compensation_retry
    }
    pub fn compensation_timeout(&self) -> Duration {
        self.compensation_timeout
    }
}

/// Builds a [`SagaDefinition`]; step methods apply to the last `.step(..)`.
#[derive(Debug)]
pub struct SagaBuilder {
    name: String,
    steps: Vec<PartialStep>,
    default_timeout: Duration,
    default_retry: RetryPolicy,
    compensation_retry: RetryPolicy,
    compensation_timeout: Duration,
    error: Option<DefinitionError>,
}

#[derive(Debug)]
struct PartialStep {
    name: String,
    action: Option<(ParticipantName, String)>,
    compensation: Option<(ParticipantName, String)>,
    timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
}

impl SagaBuilder {
    /// Starts a new step; the calls that follow configure it.
    pub fn step(mut self, name: &str) -> Self {
        if !valid_name(name) {
            self.fail(DefinitionError::InvalidName(name.to_owned()));
        } else if self.steps.iter().any(|s| s.name == name) {
            self.fail(DefinitionError::DuplicateStep(name.to_owned()));
        }
        self.steps.push(PartialStep {
            name: name.to_owned(),
            action: None,
            compensation: None,
            timeout: None,
            retry: None,
        });
        self
    }
    /// The action of the current step: a command of type `message_type` sent to `participant`.
    pub fn invoke(mut self, participant: &str, message_type: &str) -> Self {
        let target = self.target(participant, message_type);
        if let (Some(step), Some(t)) = (self.steps.last_mut(), target) {
            step.action = Some(t);
        }
        self
    }
    /// The compensation of the current step.
    pub fn compensate(mut self, participant: &str, message_type: &str) -> Self {
        let target = self.target(participant, message_type);
        if let (Some(step), Some(t)) = (self.steps.last_mut(), target) {
            step.compensation = Some(t);
        }
        self
    }
    /// Deadline of one attempt of the current step.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        if let Some(step) = self.steps.last_mut() {
            step.timeout = Some(timeout);
        }
        self
    }
    /// Retry policy of the current step's action.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        if policy.max_attempts == 0 {
            let name = self.steps.last().map_or(self.name.clone(), |s| s.name.clone());
            self.fail(DefinitionError::NoAttempts(name));
        }
        if let Some(step) = self.steps.last_mut() {
            step.retry = Some(policy);
        }
        self
    }
    /// Timeout of steps that do not set their own.
    pub fn default_timeout(mut self, timeout: Duration) -> Self {
        self.default_timeout = timeout;
        self
    }
    /// Retry policy of steps that do not set their own.
    pub fn default_retry(mut self, policy: RetryPolicy) -> Self {
        self.default_retry = policy;
        self
    }
    /// How compensations are retried, and after how many failures in a row the saga is `STUCK`.
    pub fn compensation_retry(mut self, policy: RetryPolicy, timeout: Duration) -> Self {
        if policy.max_attempts == 0 {
            self.fail(DefinitionError::NoAttempts(self.name.clone()));
        }
        self.compensation_retry = policy;
        self.compensation_timeout = timeout;
        self
    }

    pub fn build(self) -> Result<SagaDefinition, DefinitionError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.steps.is_empty() {
            return Err(DefinitionError::NoSteps(self.name));
        }
        if !valid_name(&self.name) {
            return Err(DefinitionError::InvalidName(self.name));
        }
        let mut steps = Vec::with_capacity(self.steps.len());
        for s in self.steps {
            let (participant, action) = s.action.ok_or_else(|| DefinitionError::NoAction(s.name.clone()))?;
            steps.push(StepDefinition {
                name: s.name,
                participant,
                action,
                compensation: s.compensation,
                timeout: s.timeout.unwrap_or(self.default_timeout),
                retry: s.retry.unwrap_or_else(|| self.default_retry.clone()),
            });
        }
        Ok(SagaDefinition {
            name: self.name,
            steps,
            compensation_retry: self.compensation_retry,
            compensation_timeout: self.compensation_timeout,
        })
    }

    fn target(&mut self, participant: &str, message_type: &str) -> Option<(ParticipantName, String)> {
        match ParticipantName::parse(participant) {
            Ok(p) if !message_type.is_empty() => Some((p, message_type.to_owned())),
            Ok(_) => {
                self.fail(DefinitionError::InvalidName(message_type.to_owned()));
                None
            }
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    fn fail(&mut self, e: DefinitionError) {
        self.error.get_or_insert(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_rejects_bad_definitions() {
        assert_eq!(
            SagaDefinition::builder("x").build().unwrap_err(),
            DefinitionError::NoSteps("x".into())
        );
        assert_eq!(
            SagaDefinition::builder("x").step("a").build().unwrap_err(),
            DefinitionError::NoAction("a".into())
        );
        assert_eq!(
            SagaDefinition::builder("x")
                .step("a")
                .invoke("p", "A")
                .step("a")
                .invoke("p", "A")
                .build()
                .unwrap_err(),
            DefinitionError::DuplicateStep("a".into())
        );
        assert!(matches!(
            SagaDefinition::builder("x").step("a").invoke("Bad Name", "A").build(),
            Err(DefinitionError::InvalidName(_))
        ));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            multiplier: 2.0,
        };
        assert_eq!(p.backoff(1, 0.0), Duration::from_millis(50));
        assert_eq!(p.backoff(1, 1.0), Duration::from_millis(100));
        assert_eq!(p.backoff(3, 1.0), Duration::from_millis(400));
        assert_eq!(p.backoff(10, 1.0), Duration::from_millis(1000));
        assert!(p.backoff(2, 0.5) > p.backoff(2, 0.0));
    }
}
