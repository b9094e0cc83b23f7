//! The transactional outbox. Rows are written in the caller's transaction
//! (together with the state change that causes them); the [`Relay`] claims
//! them with `FOR UPDATE SKIP LOCKED` (so any number of relays can share a
//! table), publishes them with confirms, and deletes them in the same
//! transaction. A crash between publish and delete re-sends the batch:
//! receivers deduplicate (at-least-once delivery, exactly-once effect).
//!
//! The table is the truth. Writers hand the ids of the rows they committed
//! to their process's relay ([`Handoff`]), which claims them by primary key
//! at once; a periodic scan covers rows written by other processes or left
//! by a crash.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use lapin::Connection;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::amqp::{self, OutgoingMessage, Publisher, Topology};
use crate::faults::Faults;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("outbox database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Amqp(#[from] amqp::Error),
    #[error("outbox headers: {0}")]
    Headers(#[from] serde_json::Error),
}

/// The outbox columns of some messages, as arrays for `UNNEST`.
pub struct Columns {
    ids: Vec<Uuid>,
    exchanges: Vec<String>,
    keys: Vec<String>,
    types: Vec<String>,
    correlations: Vec<Uuid>,
    headers: Vec<serde_json::Value>,
    bodies: Vec<Vec<u8>>,
}

/// `SELECT` of the outbox columns from the seven arrays bound at `$first..`,
/// typed for [`Columns::bind`]; a statement appends it to `INSERT INTO outbox`.
#[macro_export]
macro_rules! outbox_unnest {
    ($a:literal, $b:literal, $c:literal, $d:literal, $e:literal, $f:literal, $g:literal) => {
        concat!(
            "INSERT INTO outbox (message_id, exchange, routing_key, message_type, correlation_id, headers, body) ",
            "SELECT * FROM UNNEST($",
            $a,
            "::uuid[], $",
            $b,
            "::text[], $",
            $c,
            "::text[], $",
            $d,
            "::text[], $",
            $e,
            "::uuid[], $",
            $f,
            "::jsonb[], $",
            $g,
            "::bytea[])"
        )
    };
}

impl Columns {
    pub fn new(messages: &[OutgoingMessage]) -> Result<Self> {
        let mut c = Columns {
            ids: Vec::with_capacity(messages.len()),
            exchanges: Vec::with_capacity(messages.len()),
            keys: Vec::with_capacity(messages.len()),
            types: Vec::with_capacity(messages.len()),
            correlations: Vec::with_capacity(messages.len()),
            headers: Vec::with_capacity(messages.len()),
            bodies: Vec::with_capacity(messages.len()),
        };
        for m in messages {
            c.ids.push(m.message_id);
            c.exchanges.push(m.exchange.clone());
            c.keys.push(m.routing_key.clone());
            c.types.push(m.message_type.clone());
            c.correlations.push(m.correlation_id);
            c.headers.push(serde_json::to_value(&m.headers)?);
            c.bodies.push(m.body.clone());
        }
        Ok(c)
    }

    /// Binds the seven arrays, in the order [`outbox_unnest!`] expects.
    pub fn bind<'q>(
        self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.ids)
            .bind(self.exchanges)
            .bind(self.keys)
            .bind(self.types)
            .bind(self.correlations)
            .bind(self.headers)
            .bind(self.bodies)
    }
}

/// Writes `messages` to the outbox inside the caller's transaction.
/// Returns the rows' ids, for [`Handoff::committed`] after the commit.
pub async fn insert(conn: &mut PgConnection, messages: &[OutgoingMessage]) -> Result<Vec<i64>> {
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    let rows = Columns::new(messages)?
        .bind(sqlx::query(concat!(
            outbox_unnest!(1, 2, 3, 4, 5, 6, 7),
            " RETURNING id"
        )))
        .fetch_all(conn)
        .await?;
    let ids = rows.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>()?;
    Ok(ids)
}

/// The ids of outbox rows this process committed, handed to its relay.
///
/// The relay claims handed-off rows by primary key. Only rows written by
/// other processes, or left by a crash, need the periodic scan of the table
/// in id order; that scan is slow on a queue table, whose head is full of
/// dead tuples between two vacuums.
#[derive(Debug, Default)]
pub struct Handoff {
    ids: Mutex<VecDeque<i64>>,
    wake: Notify,
}

impl Handoff {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Call after the commit that wrote the rows `ids` (possibly none: it
    /// still wakes the relay).
    pub fn committed(&self, ids: &[i64]) {
        if !ids.is_empty() {
            self.queue().extend(ids);
        }
        self.wake.notify_one();
    }

    /// Ids waiting to be claimed.
    fn len(&self) -> usize {
        self.queue().len()
    }

    /// Up to `max` ids, oldest first.
    fn take(&self, max: usize) -> Vec<i64> {
        let mut queue = self.queue();
        let n = queue.len().min(max);
        queue.drain(..n).collect()
    }

    /// Ids whose batch failed go back to the front, to be tried first.
    fn give_back(&self, ids: Vec<i64>) {
        let mut queue = self.queue();
        for id in ids.into_iter().rev() {
            queue.push_front(id);
        }
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<i64>> {
        // A plain queue of ids: a panic elsewhere cannot leave it inconsistent.
        self.ids.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Which rows a relay batch claims.
enum Claim {
    /// Rows this process handed off.
    Ids(Vec<i64>),
    /// The oldest rows, whoever wrote them.
    Oldest,
}

/// Rows waiting to be published (for `/readyz`, metrics and tests).
pub async fn backlog(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?)
}

/// Publishes outbox rows until shut down.
pub struct Relay {
    pub pool: PgPool,
    pub amqp_url: String,
    /// Connection name shown in RabbitMQ's management UI.
    pub name: String,
    pub topology: Topology,
    /// Command queues to declare before publishing, so nothing sent to a
    /// participant that has not started yet is dropped as unroutable.
    pub participants: Vec<String>,
    /// Rows committed by this process, handed over by their writers.
    pub handoff: Arc<Handoff>,
    pub batch_size: i64,
    /// Interval of the scan for rows written by other processes or left by a crash.
    pub poll_interval: Duration,
    /// How long a batch of handed-off rows waits for more before it is claimed.
    pub linger: Duration,
    pub faults: Faults,
}

impl Relay {
    #[tracing::instrument(name = "outbox_relay", skip_all, fields(relay = %self.name))]
    pub async fn run(mut self, shutdown: CancellationToken) {
        // The relay's own connection, on which the planner may not scan the
        // table: between two vacuums the outbox is a few live rows in many
        // pages of dead ones, and the statistics make a sequential scan look
        // cheap when it is not (measured: milliseconds instead of 0.1 ms).
        let options = (*self.pool.connect_options())
            .clone()
            .options([("enable_seqscan", "off")]);
        self.pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .connect_lazy_with(options);
        let mut link: Option<(Connection, Publisher)> = None;
        let mut failures = 0u32;
        let batch_size = usize::try_from(self.batch_size).unwrap_or(1).max(1);
        let mut next_scan = Instant::now();
        while !shutdown.is_cancelled() {
            let usable = link.as_ref().is_some_and(|(_, p)| p.is_usable());
            if !usable {
                link = None;
                let participants: Vec<&str> = self.participants.iter().map(String::as_str).collect();
                let conn = match amqp::connect_with_backoff(
                    &self.amqp_url,
                    &self.name,
                    &self.topology,
                    &participants,
                    None,
                    &shutdown,
                )
                .await
                {
                    Ok(conn) => conn,
                    Err(_) => break, // cancelled
                };
                match Publisher::open(&conn).await {
                    Ok(p) => link = Some((conn, p)),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot open a publishing channel");
                        continue;
                    }
                }
            }
            let Some((_, publisher)) = link.as_ref() else { continue };
            if !self.linger.is_zero() && (1..batch_size).contains(&self.handoff.len()) {
                tokio::time::sleep(self.linger).await;
            }
            let ids = self.handoff.take(batch_size);
            let claim = if !ids.is_empty() {
                Claim::Ids(ids)
            } else if Instant::now() >= next_scan {
                Claim::Oldest
            } else {
                tokio::select! {
                    () = self.handoff.wake.notified() => {}
                    () = tokio::time::sleep_until(next_scan) => {}
                    () = shutdown.cancelled() => {}
                }
                continue;
            };
            let scan = matches!(claim, Claim::Oldest);
            match self.relay_batch(publisher, &claim).await {
                Ok(n) => {
                    failures = 0;
                    // A full scan means a backlog: scan again at once.
                    if scan && n < batch_size {
                        next_scan = Instant::now() + self.poll_interval;
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "outbox relay batch failed; it stays in the outbox");
                    if let Claim::Ids(ids) = claim {
                        self.handoff.give_back(ids);
                    }
                    if matches!(e, Error::Amqp(_)) {
                        link = None;
                    }
                    let wait = Duration::from_millis((50u64 << failures.min(6)).min(3_000));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => {}
                    }
                }
            }
        }
        if let Some((conn, publisher)) = link {
            publisher.close().await;
            let _ = conn.close(200, "shutdown".into()).await;
        }
        self.pool.close().await;
        tracing::info!("outbox relay stopped");
    }

    /// Claims, publishes and deletes one batch. Returns how many rows it sent.
    /// Rows another relay has claimed are skipped, never waited for.
    async fn relay_batch(&self, publisher: &Publisher, claim: &Claim) -> Result<usize> {
        let mut tx = self.pool.begin().await?;
        let rows = match claim {
            Claim::Ids(ids) => sqlx::query(
                "DELETE FROM outbox WHERE id IN (
                     SELECT id FROM outbox WHERE id = ANY($1) FOR UPDATE SKIP LOCKED)
                 RETURNING id, message_id, exchange, routing_key, message_type, correlation_id, headers, body",
            )
            .bind(ids),
            Claim::Oldest => sqlx::query(
                "DELETE FROM outbox WHERE id IN (
                     SELECT id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING id, message_id, exchange, routing_key, message_type, correlation_id, headers, body",
            )
            .bind(self.batch_size),
        }
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let mut batch: Vec<(i64, OutgoingMessage)> = Vec::with_capacity(rows.len());
        for row in rows {
            let headers: serde_json::Value = row.try_get("headers")?;
            let headers: BTreeMap<String, String> = serde_json::from_value(headers)?;
            batch.push((
                row.try_get("id")?,
                OutgoingMessage {
                    message_id: row.try_get::<Uuid, _>("message_id")?,
                    exchange: row.try_get("exchange")?,
                    routing_key: row.try_get("routing_key")?,
                    message_type: row.try_get("message_type")?,
                    correlation_id: row.try_get("correlation_id")?,
                    body: row.try_get("body")?,
                    headers,
                },
            ));
        }
        batch.sort_by_key(|(id, _)| *id);
        let messages: Vec<OutgoingMessage> = batch.into_iter().map(|(_, m)| m).collect();
        publisher.publish_all(&messages).await?;
        self.faults.crash("crash_after_publish");
        tx.commit().await?;
        tracing::debug!(sent = messages.len(), "outbox batch published");
        Ok(messages.len())
    }
}
