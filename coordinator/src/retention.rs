//! The retention job: deletes finished sagas (`COMPLETED` or `COMPENSATED`,
//! never `STUCK` nor active ones) whose `finished_at` is older than the
//! retention age, with their `orders` row, their idempotency keys and any
//! leftover outbox rows, plus old `redeliveries` rows. It works in batches,
//! one transaction each, and claims sagas with `FOR UPDATE SKIP LOCKED`, so
//! it never waits for live traffic (nor for another coordinator's job).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Rows deleted by one pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    pub sagas: u64,
    pub orders: u64,
    pub idempotency_keys: u64,
    pub outbox: u64,
    pub redeliveries: u64,
}

impl Deleted {
    pub fn total(&self) -> u64 {
        self.sagas + self.orders + self.idempotency_keys + self.outbox + self.redeliveries
    }
}

/// Deletes finished sagas and old redelivery counts every `interval`.
pub struct Retention {
    pub pool: PgPool,
    pub interval: Duration,
    /// Rows older than this are deleted.
    pub age: Duration,
    /// Sagas (or redelivery rows) deleted in one transaction at most.
    pub batch: i64,
}

impl Retention {
    #[tracing::instrument(name = "retention", skip_all)]
    pub async fn run(self, shutdown: CancellationToken) {
        skald_wire::shutdown::every("retention pass", self.interval, &shutdown, || async {
            let d = self.purge(Some(&shutdown)).await?;
            log(&d);
            Ok::<(), Error>(())
        })
        .await;
        tracing::info!("retention stopped");
    }

    /// One full pass: batches until nothing old is left.
    pub async fn run_once(&self) -> Result<Deleted> {
        self.purge(None).await
    }

    async fn purge(&self, shutdown: Option<&CancellationToken>) -> Result<Deleted> {
        let batch = self.batch.max(1);
        let age = self.age.as_secs_f64();
        let mut deleted = Deleted::default();
        let stopping = || shutdown.is_some_and(CancellationToken::is_cancelled);
        loop {
            let n = self.sagas_batch(age, batch, &mut deleted).await?;
            if n < batch as u64 || stopping() {
                break;
            }
        }
        loop {
            let n = sqlx::query(
                "DELETE FROM redeliveries WHERE message_id IN (
                     SELECT message_id FROM redeliveries
                     WHERE last_at < now() - make_interval(secs => $1)
                     LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(age)
            .bind(batch)
            .execute(&self.pool)
            .await?
            .rows_affected();
            deleted.redeliveries += n;
            if n < batch as u64 || stopping() {
                break;
            }
        }
        Ok(deleted)
    }

    /// Deletes one batch of sagas with what belongs to them; returns how many sagas.
    async fn sagas_batch(&self, age: f64, batch: i64, deleted: &mut Deleted) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM sagas
             WHERE finished_at IS NOT NULL AND finished_at < now() - make_interval(secs => $1)
               AND status IN ('COMPLETED', 'COMPENSATED')
             ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(age)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let mut counts = [0u64; 4];
        for (sql, n) in [
            "DELETE FROM orders WHERE saga_id = ANY($1)",
            "DELETE FROM idempotency_keys WHERE saga_id = ANY($1)",
            "DELETE FROM outbox WHERE correlation_id = ANY($1)",
            "DELETE FROM sagas WHERE id = ANY($1)",
        ]
        .into_iter()
        .zip(&mut counts)
        {
            *n = sqlx::query(sql).bind(&ids).execute(&mut *tx).await?.rows_affected();
        }
        let [orders, keys, outbox, sagas] = counts;
        deleted.orders += orders;
        deleted.idempotency_keys += keys;
        deleted.outbox += outbox;
        deleted.sagas += sagas;
        tx.commit().await?;
        Ok(sagas)
    }
}

fn log(d: &Deleted) {
    if d.total() > 0 {
        tracing::info!(
            sagas = d.sagas,
            orders = d.orders,
            idempotency_keys = d.idempotency_keys,
            outbox = d.outbox,
            redeliveries = d.redeliveries,
            "retention deleted old rows"
        );
    } else {
        tracing::debug!("retention found nothing to delete");
    }
}
