//! Skald's coordinator.
//!
//! - [`domain`]: newtypes of the orders API, built by parsing.
//! - [`sagas`]: saga definitions (the order saga) and their registry.
//! - [`store`]: PostgreSQL store; applies the pure engine and writes state
//!   and outbox rows in one transaction.
//! - [`manager`]: the reply consumer and the timeout sweeper.
//! - [`retention`]: deletes finished sagas and their rows after `RETENTION_SECS`.
//! - [`observe`]: metrics and trace spans of committed transitions.
//! - [`http`]: the HTTP API; [`views`]: its response bodies; [`openapi`]:
//!   the generated OpenAPI document's frame; [`dashboard`]: the operators'
//!   web page (embedded HTML, CSS and JS).
//! - [`dlq`]: browse and replay dead letters (API and `sagactl`).
//! - [`participants`]: participant queues as RabbitMQ sees them.
//! - [`app`]: configuration, start-up and graceful shutdown.
//!
//! Flow: `POST /v1/orders` -> [`store::Store::create_order`] (saga row +
//! first command in the outbox) -> outbox relay -> RabbitMQ -> participant
//! -> reply -> [`manager::ReplyConsumer`] -> engine -> store (next command
//! in the outbox) ... until the saga is final. Deadlines and backoffs are
//! driven by [`manager::Sweeper`].

pub mod app;
pub mod dashboard;
pub mod dlq;
pub mod domain;
pub mod http;
pub mod intake;
pub mod manager;
pub mod observe;
pub mod openapi;
pub mod participants;
pub mod retention;
pub mod sagas;
pub mod store;
pub mod views;

pub use app::{Application, Config};
