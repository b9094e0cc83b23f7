//! Skald's participants and the runtime they share.
//!
//! - [`runtime`]: consume commands, inbox barrier, handler, reply outbox,
//!   ack after commit; dead-letters what cannot be decoded.
//! - [`lock`]: Redis locks (SET NX PX, Lua release/extend) with fencing tokens.
//! - [`order`], [`payment`], [`inventory`]: the three participants' business
//!   logic ([`runtime::Handler`]s); [`payload`] is the order saga's payload.
//! - [`seed`] and [`verify`]: seeding accounts and stock, checking the
//!   invariants of DESIGN.md across the four databases (demo, tests, sagactl).
//! - [`retention`]: deletes old inbox and redelivery rows.
//! - [`app`]: configuration and start-up of a participant process.
//! - [`http`]: `/healthz` and `/metrics`.
//!
//! Flow: AMQP delivery -> [`runtime::Runtime::process`] (lock -> transaction:
//! inbox row, handler, reply in inbox and outbox -> commit -> unlock) -> ack;
//! the outbox relay then publishes the reply.

pub mod app;
pub mod http;
pub mod inventory;
pub mod lock;
pub mod order;
pub mod payload;
pub mod payment;
pub mod retention;
pub mod runtime;
pub mod seed;
pub mod verify;
