//! The external AMQP contract of DESIGN.md: names, envelopes, headers.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::Kind;

/// Direct, durable: commands, routed by participant name.
pub const COMMANDS_EXCHANGE: &str = "skald.commands";
/// Direct, durable: replies to the coordinator.
pub const REPLIES_EXCHANGE: &str = "skald.replies";
pub const REPLIES_QUEUE: &str = "skald.coordinator.replies";
pub const REPLIES_ROUTING_KEY: &str = "coordinator";
/// Fanout, durable: everything that could not be processed.
pub const DLX_EXCHANGE: &str = "skald.dlx";
pub const DEAD_LETTER_QUEUE: &str = "skald.dead-letters";

/// Why a message was dead-lettered (set by Skald when it dead-letters a message itself).
pub const HEADER_REASON: &str = "x-skald-reason";
/// Where the message was first published, so that it can be replayed.
pub const HEADER_ORIGINAL_EXCHANGE: &str = "x-skald-original-exchange";
pub const HEADER_ORIGINAL_ROUTING_KEY: &str = "x-skald-original-routing-key";
/// The queue it was consumed from.
pub const HEADER_ORIGINAL_QUEUE: &str = "x-skald-original-queue";
/// W3C trace context.
pub const HEADER_TRACEPARENT: &str = "traceparent";

pub const CONTENT_TYPE_JSON: &str = "application/json";

/// The command queue of a participant: `skald.<participant>.commands`.
pub fn command_queue(participant: &str) -> String {
    format!("skald.{participant}.commands")
}

/// A command from the coordinator to a participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandEnvelope {
    pub saga_id: Uuid,
    pub step: String,
    pub attempt: u32,
    pub kind: Kind,
    pub payload: Value,
}

/// `"success"` or `"failure"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyOutcome {
    Success,
    Failure,
}

/// A participant's reply to one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyEnvelope {
    pub saga_id: Uuid,
    pub step: String,
    pub attempt: u32,
    pub kind: Kind,
    pub outcome: ReplyOutcome,
    /// Only meaningful for failures: an infrastructure problem worth another attempt.
    pub retryable: bool,
    pub reason: Option<String>,
    #[serde(default)]
    pub data: Value,
}

impl ReplyEnvelope {
    pub fn success(cmd: &CommandEnvelope, data: Value) -> Self {
        Self {
            saga_id: cmd.saga_id,
            step: cmd.step.clone(),
            attempt: cmd.attempt,
            kind: cmd.kind,
            outcome: ReplyOutcome::Success,
            retryable: false,
            reason: None,
            data,
        }
    }
    pub fn failure(cmd: &CommandEnvelope, retryable: bool, reason: impl Into<String>) -> Self {
        Self {
            saga_id: cmd.saga_id,
            step: cmd.step.clone(),
            attempt: cmd.attempt,
            kind: cmd.kind,
            outcome: ReplyOutcome::Failure,
            retryable,
            reason: Some(reason.into()),
            data: Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_match_the_documented_json() {
        let cmd: CommandEnvelope = serde_json::from_str(
            r#"{"saga_id":"0190b3a0-0000-7000-8000-000000000001","step":"charge_payment","attempt":2,"kind":"action","payload":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(cmd.kind, Kind::Action);
        let reply = ReplyEnvelope::failure(&cmd, true, "lock busy");
        let json = serde_json::to_value(&reply).unwrap();
        assert_eq!(json["outcome"], "failure");
        assert_eq!(json["kind"], "action");
        assert_eq!(json["attempt"], 2);
        assert_eq!(json["retryable"], true);
        assert_eq!(json["reason"], "lock busy");
        assert!(serde_json::from_str::<CommandEnvelope>(r#"{"saga_id":"nope"}"#).is_err());
    }
}
