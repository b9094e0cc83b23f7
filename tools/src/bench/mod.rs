//! The benchmark (`bench` binary): starts the release binaries as child
//! processes on databases, a vhost and a Redis prefix of its own, measures a
//! PostgreSQL baseline, optionally preloads a history of finished sagas, runs
//! closed-loop, open-loop and in-flight phases and reports every figure,
//! with each step's latency split into its two legs (`legs`), and
//! optionally a latency curve over several rates (`curve`).

pub mod baseline;
pub mod curve;
pub mod deploy;
pub mod legs;
pub mod phase;
pub mod preload;
pub mod procfs;
