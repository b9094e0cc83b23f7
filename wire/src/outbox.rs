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

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use lapin::Connection;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::amqp::{self, OutgoingMessage, Publisher, Topology};
use crate::faults::Faults;
use crate::linger::Linger;

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

/// An outbox row written: its id and the message it holds.
pub type Written = (i64, OutgoingMessage);

/// Writes `messages` to the outbox inside the caller's transaction.
/// Returns the rows, for [`Handoff::committed`] after the commit.
pub async fn insert(conn: &mut PgConnection, messages: Vec<OutgoingMessage>) -> Result<Vec<Written>> {
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    let rows = Columns::new(&messages)?
        .bind(sqlx::query(concat!(
            outbox_unnest!(1, 2, 3, 4, 5, 6, 7),
            " RETURNING id, message_id"
        )))
        .fetch_all(conn)
        .await?;
    let mut ids = Vec::with_capacity(rows.len());
    let mut message_ids = Vec::with_capacity(rows.len());
    for row in rows {
        ids.push(row.try_get("id")?);
        message_ids.push(row.try_get("message_id")?);
    }
    Ok(pair(ids, message_ids, messages))
}

/// Pairs the ids of inserted outbox rows with their messages, by message
/// id (`ids[i]` holds `message_ids[i]`; a statement's `RETURNING` order is
/// not a promise). Messages with no row were not inserted and are dropped.
pub fn pair(ids: Vec<i64>, message_ids: Vec<Uuid>, messages: Vec<OutgoingMessage>) -> Vec<Written> {
    let by_message: HashMap<Uuid, i64> = message_ids.into_iter().zip(ids).collect();
    messages
        .into_iter()
        .filter_map(|m| by_message.get(&m.message_id).map(|id| (*id, m)))
        .collect()
}

/// Rows held in memory by one process's handoff at most; more are left to
/// the relay's scan of the table.
const HANDOFF_CAPACITY: usize = 20_000;

/// The outbox rows this process committed, handed to its relay with their
/// messages, so that it publishes them without reading them back.
///
/// Rows that never reach a handoff (written by other processes, left by a
/// crash, or beyond its capacity, `HANDOFF_CAPACITY`) are found by the relay's periodic
/// scan of the table in id order.
#[derive(Debug, Default)]
pub struct Handoff {
    rows: Mutex<VecDeque<Written>>,
    wake: Notify,
}

impl Handoff {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Call after the commit that wrote `rows` (possibly none: it still
    /// wakes the relay).
    pub fn committed(&self, rows: Vec<Written>) {
        if !rows.is_empty() {
            let mut queue = self.queue();
            let room = HANDOFF_CAPACITY.saturating_sub(queue.len());
            if rows.len() > room {
                tracing::debug!(
                    left = rows.len() - room,
                    "handoff full; the relay's scan will find the rest"
                );
            }
            queue.extend(rows.into_iter().take(room));
        }
        self.wake.notify_one();
    }

    /// Rows waiting to be published.
    fn len(&self) -> usize {
        self.queue().len()
    }

    /// Up to `max` rows, oldest first.
    fn take(&self, max: usize) -> Vec<Written> {
        let mut queue = self.queue();
        let n = queue.len().min(max);
        queue.drain(..n).collect()
    }

    /// Rows whose publication failed go back to the front, to be tried first.
    fn give_back(&self, rows: Vec<Written>) {
        let mut queue = self.queue();
        for row in rows.into_iter().rev() {
            queue.push_front(row);
        }
    }

    /// The smallest id waiting.
    fn min_id(&self) -> Option<i64> {
        self.queue().iter().map(|(id, _)| *id).min()
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Written>> {
        // A plain queue: a panic elsewhere cannot leave it inconsistent.
        self.rows.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Rows waiting to be published (for `/readyz`, metrics and tests).
pub async fn backlog(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?)
}

/// How long confirmed rows wait before they are deleted, so that one
/// statement deletes many.
const DELETE_DELAY: Duration = Duration::from_millis(50);

/// The scan leaves rows younger than this to their writer's handoff: a row
/// is committed a moment before its writer hands it off.
const SCAN_GRACE: Duration = Duration::from_secs(2);

/// How long a stopping relay waits for the confirms of what it sent.
const SHUTDOWN_CONFIRMS: Duration = Duration::from_secs(5);

/// Publishes outbox rows until shut down.
///
/// Handed-off rows are published from memory, pipelined: the relay sends a
/// batch without waiting for the confirms of the batches before it (at most
/// four batches unconfirmed, so publishing stays paced by the broker). Once
/// confirmed, rows are deleted in batches, on a connection with
/// `synchronous_commit = off`: a delete lost in a crash only sends its rows
/// again, and receivers deduplicate. Rows that were not handed off are
/// claimed by the scan with `FOR UPDATE SKIP LOCKED`, published, and
/// deleted in the same transaction.
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
    /// How long a batch of handed-off rows waits for more before it is sent
    /// (see [`Linger`]: only while rows keep coming).
    pub linger: Duration,
    pub faults: Faults,
}

/// What became of a batch sent from the handoff.
struct Settled {
    confirmed: Vec<i64>,
    failed: Vec<Written>,
    error: Option<amqp::Error>,
}

type Confirming = Pin<Box<dyn Future<Output = Settled> + Send + Sync>>;

/// The relay's state between two turns of its loop.
struct Pipeline {
    /// Batches sent and not yet confirmed.
    confirming: FuturesUnordered<Confirming>,
    /// Ids of the rows in `confirming`.
    unconfirmed: BTreeSet<i64>,
    /// Confirmed rows not yet deleted, and since when the oldest waits.
    to_delete: Vec<i64>,
    delete_due: Option<Instant>,
    /// No publishing before this instant (backoff after a failure).
    paused_until: Instant,
    failures: u32,
    next_scan: Instant,
}

impl Pipeline {
    /// The smallest id this relay holds (sent, or confirmed and not deleted).
    fn min_id(&self) -> Option<i64> {
        let sent = self.unconfirmed.first().copied();
        let confirmed = self.to_delete.iter().min().copied();
        sent.into_iter().chain(confirmed).min()
    }
}

impl Relay {
    #[tracing::instrument(name = "outbox_relay", skip_all, fields(relay = %self.name))]
    pub async fn run(mut self, shutdown: CancellationToken) {
        // The relay's own connection, on which the planner may not scan the
        // table: between two vacuums the outbox is a few live rows in many
        // pages of dead ones, and the statistics make a sequential scan look
        // cheap when it is not (measured: milliseconds instead of 0.1 ms).
        // Its commits are asynchronous: they only delete sent rows, and a
        // delete lost in a crash sends them again (receivers deduplicate).
        let options = (*self.pool.connect_options())
            .clone()
            .options([("enable_seqscan", "off"), ("synchronous_commit", "off")]);
        self.pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .connect_lazy_with(options);
        let batch_size = usize::try_from(self.batch_size).unwrap_or(1).max(1);
        let max_unconfirmed = batch_size * 4;
        let mut link: Option<(Connection, Publisher)> = None;
        let mut linger = Linger::new(self.linger);
        let alarm = crate::alarm::Alarm::new();
        let mut p = Pipeline {
            confirming: FuturesUnordered::new(),
            unconfirmed: BTreeSet::new(),
            to_delete: Vec::new(),
            delete_due: None,
            paused_until: Instant::now(),
            failures: 0,
            next_scan: Instant::now(),
        };
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
            let now = Instant::now();
            // Publish what was handed off, while the broker keeps up.
            let room = max_unconfirmed.saturating_sub(p.unconfirmed.len());
            if room > 0 && now >= p.paused_until {
                let wait = linger.begin();
                if !wait.is_zero() && p.confirming.is_empty() && (1..batch_size).contains(&self.handoff.len()) {
                    alarm.sleep(wait).await;
                }
                let rows = self.handoff.take(batch_size.min(room));
                if !rows.is_empty() {
                    p.unconfirmed.extend(rows.iter().map(|(id, _)| *id));
                    p.confirming.push(send(publisher, rows).await);
                    linger.end();
                    continue;
                }
            }
            if self.delete_if_due(&mut p, batch_size, now).await {
                continue;
            }
            if now >= p.next_scan && now >= p.paused_until {
                if !self.scan(publisher, &mut p, batch_size).await {
                    link = None;
                }
                continue;
            }
            let deadline = [
                Some(p.next_scan),
                p.delete_due,
                Some(p.paused_until).filter(|t| *t > now),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(p.next_scan);
            let can_send = room > 0 && now >= p.paused_until;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {}
                Some(settled) = p.confirming.next(), if !p.confirming.is_empty() => {
                    if self.settle(&mut p, settled) {
                        link = None;
                    }
                }
                () = self.handoff.wake.notified(), if can_send => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
        // Stopping: what was sent is confirmed (or goes back to the table's
        // care), and what was confirmed is deleted.
        let drained = tokio::time::timeout(SHUTDOWN_CONFIRMS, async {
            while let Some(settled) = p.confirming.next().await {
                self.settle(&mut p, settled);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("confirms still pending at shutdown; those rows stay in the outbox");
        }
        self.delete(&mut p).await;
        if let Some((conn, publisher)) = link {
            publisher.close().await;
            let _ = conn.close(200, "shutdown".into()).await;
        }
        self.pool.close().await;
        tracing::info!("outbox relay stopped");
    }

    /// Books a batch's confirms. Returns true if the channel must be replaced.
    fn settle(&self, p: &mut Pipeline, settled: Settled) -> bool {
        for id in settled.confirmed.iter().chain(settled.failed.iter().map(|(id, _)| id)) {
            p.unconfirmed.remove(id);
        }
        if !settled.confirmed.is_empty() {
            self.faults.crash("crash_after_publish");
            p.delete_due.get_or_insert_with(|| Instant::now() + DELETE_DELAY);
            p.to_delete.extend(settled.confirmed);
        }
        let Some(error) = settled.error else {
            p.failures = 0;
            return false;
        };
        // Failed rows are still in the table; they go back to the front of
        // the handoff, and publishing pauses for a while.
        self.handoff.give_back(settled.failed);
        self.failed(p, &error);
        error.loses_channel()
    }

    fn failed(&self, p: &mut Pipeline, error: &amqp::Error) {
        let now = Instant::now();
        if now >= p.paused_until {
            p.failures += 1;
            let wait = Duration::from_millis((50u64 << p.failures.min(6)).min(3_000));
            p.paused_until = now + wait;
        }
        tracing::warn!(error = %error, failures = p.failures, "outbox relay batch failed; it stays in the outbox");
    }

    /// Deletes the confirmed rows if enough of them wait, or the oldest has
    /// waited long enough. Returns whether it ran a statement.
    async fn delete_if_due(&self, p: &mut Pipeline, batch_size: usize, now: Instant) -> bool {
        let due = p.delete_due.is_some_and(|t| now >= t) || p.to_delete.len() >= batch_size;
        if !due || p.to_delete.is_empty() {
            return false;
        }
        self.delete(p).await;
        true
    }

    /// Deletes the confirmed rows (kept for the next try if that fails).
    async fn delete(&self, p: &mut Pipeline) {
        if p.to_delete.is_empty() {
            return;
        }
        let result = sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(&p.to_delete)
            .execute(&self.pool)
            .await;
        match result {
            Ok(_) => {
                p.to_delete.clear();
                p.delete_due = None;
            }
            // Kept for the next try; they are published already, so a
            // crash before it only sends them again.
            Err(e) => {
                tracing::warn!(error = %e, rows = p.to_delete.len(), "cannot delete sent outbox rows; will retry");
                p.delete_due = Some(Instant::now() + DELETE_DELAY * 4);
            }
        }
    }

    /// One batch of the scan: rows not handed off to this relay (older than
    /// [`SCAN_GRACE`], and below every id it holds), published and deleted
    /// in one transaction. Returns false if the channel must be replaced.
    async fn scan(&self, publisher: &Publisher, p: &mut Pipeline, batch_size: usize) -> bool {
        let floor = [self.handoff.min_id(), p.min_id()].into_iter().flatten().min();
        let result = self.scan_batch(publisher, floor.unwrap_or(i64::MAX)).await;
        // A full batch means a backlog: scan again at once.
        if !matches!(result, Ok(n) if n >= batch_size) {
            p.next_scan = Instant::now() + self.poll_interval;
        }
        match result {
            Ok(_) => true,
            Err(Error::Amqp(e)) => {
                self.failed(p, &e);
                !e.loses_channel()
            }
            Err(e) => {
                tracing::warn!(error = %e, "outbox scan failed; the rows stay in the outbox");
                true
            }
        }
    }

    /// Claims, publishes and deletes one batch of the scan. Returns how
    /// many rows it sent. Rows another relay has claimed are skipped,
    /// never waited for.
    async fn scan_batch(&self, publisher: &Publisher, floor: i64) -> Result<usize> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "DELETE FROM outbox WHERE id IN (
                 SELECT id FROM outbox
                 WHERE id < $2 AND created_at < now() - make_interval(secs => $3)
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING id, message_id, exchange, routing_key, message_type, correlation_id, headers, body",
        )
        .bind(self.batch_size)
        .bind(floor)
        .bind(SCAN_GRACE.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let mut batch: Vec<Written> = Vec::with_capacity(rows.len());
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
        tracing::debug!(sent = messages.len(), "outbox rows found by the scan published");
        Ok(messages.len())
    }
}

/// Sends a batch, and returns the future of its confirms. A row that could
/// not be sent fails at once, with every row after it.
async fn send(publisher: &Publisher, rows: Vec<Written>) -> Confirming {
    let results = publisher.send_all(rows.iter().map(|(_, m)| m)).await;
    let mut sent = Vec::with_capacity(rows.len());
    let mut unsent = Vec::new();
    let mut error = None;
    for (row, result) in rows.into_iter().zip(results) {
        // After a failure, rows count as unsent even if their send went
        // through: they are sent again, and receivers deduplicate.
        match result {
            Ok(confirm) if error.is_none() => sent.push((row, confirm)),
            Ok(_) => unsent.push(row),
            Err(e) => {
                error.get_or_insert(e);
                unsent.push(row);
            }
        }
    }
    Box::pin(async move {
        let mut settled = Settled {
            confirmed: Vec::with_capacity(sent.len()),
            failed: Vec::new(),
            error: None,
        };
        for (row, confirm) in sent {
            match amqp::confirmed(&row.1, confirm).await {
                Ok(()) => settled.confirmed.push(row.0),
                Err(e) => {
                    settled.error.get_or_insert(e);
                    settled.failed.push(row);
                }
            }
        }
        if let Some(e) = error {
            settled.error.get_or_insert(e);
            settled.failed.extend(unsent);
        }
        settled
    })
}
