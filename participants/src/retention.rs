//! The retention job of a participant: deletes `inbox` rows (the barrier of
//! commands already handled) and `redeliveries` rows older than the
//! retention age, in batches, one transaction each, claiming rows with
//! `FOR UPDATE SKIP LOCKED` so that it never waits for live traffic. One job
//! runs per database of the participant. Business rows (orders, payments,
//! reservations, accounts, stock) are never deleted.
//!
//! A command redelivered after its inbox row is gone would run again: the
//! retention must exceed any plausible redelivery delay, and how long a saga
//! may stay `STUCK` before an operator retries its compensations.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Rows deleted by one pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    pub inbox: u64,
    pub redeliveries: u64,
}

impl Deleted {
    pub fn total(&self) -> u64 {
        self.inbox + self.redeliveries
    }
}

const INBOX: &str = "DELETE FROM inbox WHERE (saga_id, step, kind) IN (
     SELECT saga_id, step, kind FROM inbox
     WHERE created_at < now() - make_interval(secs => $1)
     LIMIT $2 FOR UPDATE SKIP LOCKED)";

const REDELIVERIES: &str = "DELETE FROM redeliveries WHERE message_id IN (
     SELECT message_id FROM redeliveries
     WHERE last_at < now() - make_interval(secs => $1)
     LIMIT $2 FOR UPDATE SKIP LOCKED)";

/// Deletes old inbox and redelivery rows of one database every `interval`.
pub struct Retention {
    pub pool: PgPool,
    /// Participant name, for the logs.
    pub participant: String,
    /// Position of the database in the participant's list, for the logs.
    pub database: usize,
    pub interval: Duration,
    /// Rows older than this are deleted.
    pub age: Duration,
    /// Rows deleted in one transaction at most.
    pub batch: i64,
}

impl Retention {
    #[tracing::instrument(name = "retention", skip_all, fields(participant = %self.participant, database = self.database))]
    pub async fn run(self, shutdown: CancellationToken) {
        skald_wire::shutdown::every("retention pass", self.interval, &shutdown, || async {
            let d = self.purge(Some(&shutdown)).await?;
            if d.total() > 0 {
                tracing::info!(
                    inbox = d.inbox,
                    redeliveries = d.redeliveries,
                    "retention deleted old rows"
                );
            } else {
                tracing::debug!("retention found nothing to delete");
            }
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
        Ok(Deleted {
            inbox: self.delete_all(INBOX, shutdown).await?,
            redeliveries: self.delete_all(REDELIVERIES, shutdown).await?,
        })
    }

    /// Runs `sql` (one batch per statement) while batches come back full.
    async fn delete_all(&self, sql: &'static str, shutdown: Option<&CancellationToken>) -> Result<u64> {
        let batch = self.batch.max(1);
        let mut total = 0;
        loop {
            let n = sqlx::query(sql)
                .bind(self.age.as_secs_f64())
                .bind(batch)
                .execute(&self.pool)
                .await?
                .rows_affected();
            total += n;
            if n < batch as u64 || shutdown.is_some_and(CancellationToken::is_cancelled) {
                return Ok(total);
            }
        }
    }
}
