//! Skald's coordinator.
//!
//! - [`domain`]: newtypes of the orders API, built by parsing.
//! - [`sagas`]: saga definitions (the order saga) and their registry.
//! - [`store`]: PostgreSQL store; applies the pure engine and writes state
//!   and outbox rows in one transaction.
//! - [`manager`]: the reply consumer and the timeout sweeper.
//! - [`observe`]: metrics and trace spans of committed transitions.
//! - [`http`]: the HTTP API.
//! - [`app`]: configuration, start-up and graceful shutdown.
//!
//! Flow: `POST /v1/orders` -> [`store::Store::create_order`] (saga row +
//! first command in the outbox) -> outbox relay -> RabbitMQ -> participant
//! -> reply -> [`manager::ReplyConsumer`] -> engine -> store (next command
//! in the outbox) ... until the saga is final. Deadlines and backoffs are
//! driven by [`manager::Sweeper`].

pub mod app;
pub mod domain;
pub mod http;
pub mod manager;
pub mod observe;
pub mod sagas;
pub mod store;

pub use app::{Application, Config};
