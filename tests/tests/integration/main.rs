//! Integration tests against the real PostgreSQL, RabbitMQ and Redis. Each
//! test has its own databases, vhost and Redis prefix (see `skald_tests`).

mod api;
mod backlog;
mod batched;
mod load;
mod locks;
mod messaging;
mod operator;
mod ops;
mod optimistic;
mod relay;
mod retention;
mod saga;
mod wakeups;
