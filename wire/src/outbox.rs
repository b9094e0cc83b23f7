//! The transactional outbox. Rows are written in the caller's transaction
//! (together with the state change that causes them); the [`Relay`] claims
//! them with `FOR UPDATE SKIP LOCKED` (so any number of relays can share a
//! table), publishes them with confirms, and deletes them in the same
//! transaction. A crash between publish and delete re-sends the batch:
//! receivers deduplicate (at-least-once delivery, exactly-once effect).
//!
//! The table is the truth; the in-process [`tokio::sync::Notify`] only wakes
//! the relay early, and a poll interval covers rows written by other processes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::Connection;
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::Notify;
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
pub async fn insert(conn: &mut PgConnection, messages: &[OutgoingMessage]) -> Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    Columns::new(messages)?
        .bind(sqlx::query(outbox_unnest!(1, 2, 3, 4, 5, 6, 7)))
        .execute(conn)
        .await?;
    Ok(())
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
    /// Woken by writers after they commit outbox rows.
    pub wake: Arc<Notify>,
    pub batch_size: i64,
    /// Fallback poll for rows written by other processes or left by a crash.
    pub poll_interval: Duration,
    pub faults: Faults,
}

impl Relay {
    #[tracing::instrument(name = "outbox_relay", skip_all, fields(relay = %self.name))]
    pub async fn run(self, shutdown: CancellationToken) {
        let mut link: Option<(Connection, Publisher)> = None;
        let mut failures = 0u32;
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
            match self.relay_batch(publisher).await {
                Ok(n) => {
                    failures = 0;
                    if (n as i64) < self.batch_size {
                        tokio::select! {
                            () = self.wake.notified() => {}
                            () = tokio::time::sleep(self.poll_interval) => {}
                            () = shutdown.cancelled() => {}
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "outbox relay batch failed; it stays in the outbox");
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
        tracing::info!("outbox relay stopped");
    }

    /// Claims, publishes and deletes one batch. Returns how many rows it sent.
    async fn relay_batch(&self, publisher: &Publisher) -> Result<usize> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "DELETE FROM outbox WHERE id IN (
                 SELECT id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING id, message_id, exchange, routing_key, message_type, correlation_id, headers, body",
        )
        .bind(self.batch_size)
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
