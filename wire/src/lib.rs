//! The wire contract and the plumbing shared by the coordinator and every
//! participant. Participants depend on this crate, never on the coordinator.
//!
//! - [`contract`]: AMQP topology names, command and reply envelopes (the
//!   documented JSON), dead-letter headers.
//! - [`amqp`]: connecting with backoff, declaring the topology, a publisher
//!   that counts a message as sent only on a broker `Ack`.
//! - [`outbox`]: the transactional outbox (rows written in the caller's
//!   transaction) and the relay that publishes them in batches.
//! - [`db`]: create-if-missing, pool, migrations.
//! - [`faults`]: failure injection (`SKALD_FAULTS`), off by default.
//! - [`telemetry`], [`shutdown`]: logs (and OTLP trace export) and signals
//!   for every binary.
//! - [`metrics`]: the Prometheus recorder, `GET /metrics`, one function per
//!   metric, the outbox gauges' sampler.
//! - [`trace`]: W3C `traceparent` of commands and replies (the saga id is the
//!   trace id), span ids derived from the step attempt.
//!
//! Data flow: a business transaction inserts its messages with [`outbox::insert`];
//! [`outbox::Relay`] claims them, publishes through [`amqp::Publisher`] and
//! deletes them only once the broker confirmed every one.

pub mod alarm;
pub mod amqp;
pub mod contract;
pub mod db;
pub mod faults;
pub mod linger;
pub mod metrics;
pub mod outbox;
pub mod redelivery;
pub mod shutdown;
pub mod telemetry;
pub mod trace;

pub use skald_engine::Kind;
