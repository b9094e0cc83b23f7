//! W3C trace context for sagas: one trace per saga, whose trace id is the
//! saga id (a UUID has the 128 bits of a trace id), so that a saga's trace is
//! found by its id.
//!
//! Span ids are derived, not random, wherever a span outlives one process or
//! one transaction, so that they can be recomputed from what is stored:
//! - the saga's root span: [`Role::Saga`];
//! - the coordinator's span of one step attempt (command sent -> reply
//!   applied): [`Role::Attempt`], keyed by `(step, attempt, kind)`. A command's
//!   `traceparent` names this span as its parent, so the header can be
//!   written into the outbox in the transaction that causes the command;
//! - the participant's span handling that command: a child of the header's
//!   span. When OpenTelemetry export is on, it is a real span with its own id;
//!   otherwise its id is [`Role::Handler`]'s. The reply's `traceparent` names
//!   it as the parent.
//!
//! The coordinator's spans are emitted after the fact, when the attempt or
//! the saga has ended (their start and end are in the saga state), through
//! [`emit_span`]; the participant's are ordinary `tracing` spans (target
//! [`TARGET`]) exported by `tracing-opentelemetry`. See [`crate::telemetry`].

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::SystemTime;

use lapin::BasicProperties;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::Kind;
use crate::contract::HEADER_TRACEPARENT;

/// The `tracing` target of the spans that are exported (others are only logged).
pub const TARGET: &str = "skald_trace";

/// Whose span a derived id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The saga's root span.
    Saga,
    /// The coordinator's span of one step attempt; the parent of its command.
    Attempt,
    /// The participant's handling of one command (when no exported span exists).
    Handler,
}

impl Role {
    fn tag(self) -> u8 {
        match self {
            Role::Saga => 1,
            Role::Attempt => 2,
            Role::Handler => 3,
        }
    }
}

/// The trace of a saga: its id's 16 bytes.
pub fn trace_id(saga_id: Uuid) -> TraceId {
    TraceId::from_bytes(*saga_id.as_bytes())
}

/// A span id derived from the saga, the step attempt and the role (FNV-1a
/// 64, never zero). For [`Role::Saga`], `step`, `attempt` and `kind` are ignored.
pub fn span_id(saga_id: Uuid, step: &str, attempt: u32, kind: Kind, role: Role) -> SpanId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(saga_id.as_bytes());
    eat(&[role.tag()]);
    if role != Role::Saga {
        eat(&[match kind {
            Kind::Action => 1,
            Kind::Compensation => 2,
        }]);
        eat(&attempt.to_le_bytes());
        eat(step.as_bytes());
    }
    SpanId::from_bytes(h.max(1).to_be_bytes())
}

/// The root span's id.
pub fn saga_span_id(saga_id: Uuid) -> SpanId {
    span_id(saga_id, "", 0, Kind::Action, Role::Saga)
}

/// `00-<trace id>-<parent span id>-01` (version 00, sampled).
pub fn traceparent(saga_id: Uuid, parent: SpanId) -> String {
    format!("00-{}-{}-01", saga_id.simple(), parent)
}

/// Parses a `traceparent` header (version 00). `None` if malformed or all-zero.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let is_hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !is_hex(trace) || !is_hex(span) || !is_hex(flags) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, TraceState::default());
    sc.is_valid().then_some(sc)
}

/// Headers of a command: its `traceparent` names the coordinator's attempt span.
pub fn command_headers(saga_id: Uuid, step: &str, attempt: u32, kind: Kind) -> BTreeMap<String, String> {
    let parent = span_id(saga_id, step, attempt, kind, Role::Attempt);
    BTreeMap::from([(HEADER_TRACEPARENT.to_owned(), traceparent(saga_id, parent))])
}

/// Headers of a reply: its `traceparent` names the participant's span that
/// handled the command (the current span, when it is exported and belongs
/// to this saga's trace), else the derived [`Role::Handler`] id.
pub fn reply_headers(saga_id: Uuid, step: &str, attempt: u32, kind: Kind) -> BTreeMap<String, String> {
    let current = tracing::Span::current().context();
    let current = current.span().span_context().clone();
    let parent = if current.is_valid() && current.trace_id() == trace_id(saga_id) {
        current.span_id()
    } else {
        span_id(saga_id, step, attempt, kind, Role::Handler)
    };
    BTreeMap::from([(HEADER_TRACEPARENT.to_owned(), traceparent(saga_id, parent))])
}

/// The span a participant handles one delivery in: logged with the saga id,
/// step, attempt and kind (recorded once decoded), and exported as a child
/// of the delivery's `traceparent`.
pub fn command_span(participant: &'static str, props: &BasicProperties) -> tracing::Span {
    let message_type = props.kind().as_ref().map_or("command", |k| k.as_str());
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "command",
        otel.name = format!("{participant} {message_type}"),
        otel.kind = "consumer",
        participant,
        saga_id = tracing::field::Empty,
        step = tracing::field::Empty,
        attempt = tracing::field::Empty,
        kind = tracing::field::Empty,
    );
    if let Some(parent) = crate::amqp::header_str(props, HEADER_TRACEPARENT)
        .as_deref()
        .and_then(parse_traceparent)
    {
        // Fails only when no OpenTelemetry layer is installed: nothing to link then.
        let _ = span.set_parent(Context::new().with_remote_span_context(parent));
    }
    span
}

thread_local! {
    /// Ids for the next span built on this thread by [`SagaIdGenerator`].
    static NEXT_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
    static NEXT_SPAN_ID: Cell<Option<SpanId>> = const { Cell::new(None) };
}

/// The tracer provider's id generator: random ids, except for the span that
/// [`emit_span`] is building on this thread, which gets the derived ids.
#[derive(Debug, Default)]
pub struct SagaIdGenerator {
    random: RandomIdGenerator,
}

impl IdGenerator for SagaIdGenerator {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE_ID.take().unwrap_or_else(|| self.random.new_trace_id())
    }
    fn new_span_id(&self) -> SpanId {
        NEXT_SPAN_ID.take().unwrap_or_else(|| self.random.new_span_id())
    }
}

/// A finished span to export after the fact, with the ids it must have.
#[derive(Debug, Clone)]
pub struct PastSpan {
    pub name: String,
    pub saga_id: Uuid,
    pub span_id: SpanId,
    /// `None` for the saga's root span.
    pub parent: Option<SpanId>,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    /// A failure to show on the span (`Status::Error`).
    pub error: Option<String>,
}

/// Exports `span` through the global tracer when OpenTelemetry export is on
/// (a no-op otherwise).
pub fn emit_span(span: PastSpan) {
    if !crate::telemetry::otel_enabled() {
        return;
    }
    let tracer = opentelemetry::global::tracer("skald");
    let trace = trace_id(span.saga_id);
    let cx = match span.parent {
        Some(parent) => Context::new().with_remote_span_context(SpanContext::new(
            trace,
            parent,
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        )),
        None => Context::new(),
    };
    NEXT_TRACE_ID.set(Some(trace));
    NEXT_SPAN_ID.set(Some(span.span_id));
    let mut otel = tracer
        .span_builder(span.name)
        .with_kind(span.kind)
        .with_start_time(span.start)
        .with_attributes(span.attributes)
        .start_with_context(&tracer, &cx);
    // Not consumed if the provider is shut down: do not leak them to another span.
    NEXT_TRACE_ID.set(None);
    NEXT_SPAN_ID.set(None);
    if let Some(e) = span.error {
        opentelemetry::trace::Span::set_status(&mut otel, Status::error(e));
    }
    opentelemetry::trace::Span::end_with_timestamp(&mut otel, span.end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_carries_the_saga_id_and_round_trips() {
        let saga = Uuid::parse_str("0190b3a0-1234-7000-8000-00000000abcd").unwrap();
        let id = span_id(saga, "charge_payment", 2, Kind::Action, Role::Attempt);
        let header = traceparent(saga, id);
        assert_eq!(header, format!("00-0190b3a012347000800000000000abcd-{id}-01"));
        let sc = parse_traceparent(&header).unwrap();
        assert_eq!(sc.trace_id(), trace_id(saga));
        assert_eq!(sc.span_id(), id);
        assert!(sc.is_sampled());
        assert_eq!(
            command_headers(saga, "charge_payment", 2, Kind::Action)[HEADER_TRACEPARENT],
            header
        );
    }

    #[test]
    fn derived_ids_differ_by_step_attempt_kind_and_role() {
        let saga = Uuid::now_v7();
        let a = span_id(saga, "s", 1, Kind::Action, Role::Attempt);
        assert_eq!(a, span_id(saga, "s", 1, Kind::Action, Role::Attempt));
        for other in [
            span_id(saga, "s", 2, Kind::Action, Role::Attempt),
            span_id(saga, "s", 1, Kind::Compensation, Role::Attempt),
            span_id(saga, "t", 1, Kind::Action, Role::Attempt),
            span_id(saga, "s", 1, Kind::Action, Role::Handler),
            saga_span_id(saga),
            span_id(Uuid::now_v7(), "s", 1, Kind::Action, Role::Attempt),
        ] {
            assert_ne!(a, other);
        }
        assert_ne!(a, SpanId::INVALID);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-0190b3a012347000800000000000abcd-00f067aa0ba902b7",
            "01-0190b3a012347000800000000000abcd-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-0190b3a012347000800000000000abcd-0000000000000000-01",
            "00-0190B3A012347000800000000000ABCD-00f067aa0ba902b7-01",
            "00-0190b3a012347000800000000000abcd-00f067aa0ba902b7-01-xx",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn without_a_span_replies_name_the_derived_handler_span() {
        let saga = Uuid::now_v7();
        let expected = traceparent(saga, span_id(saga, "s", 3, Kind::Compensation, Role::Handler));
        assert_eq!(
            reply_headers(saga, "s", 3, Kind::Compensation)[HEADER_TRACEPARENT],
            expected
        );
    }
}
