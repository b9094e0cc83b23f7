//! The baseline: the transaction Skald runs most, bare. Update one saga-like
//! row by primary key and insert one ~300-byte jsonb outbox-like row, with
//! prepared statements, at a few concurrencies, in a scratch table pair of
//! the bench database. What PostgreSQL alone does on this machine is the
//! yardstick for Skald's sagas per second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::ProgressBar;
use rand::Rng;
use serde::Serialize;
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

const ROWS: i64 = 100_000;

#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub concurrency: usize,
    pub transactions: u64,
    pub tx_per_sec: f64,
    /// Why the level was not run (too few free connections on the server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    pub transaction: &'static str,
    pub secs_per_level: f64,
    pub levels: Vec<Level>,
    pub best_tx_per_sec: f64,
    pub best_concurrency: usize,
}

/// A ~300-byte JSON body, like an outbox row's.
fn body() -> String {
    let payload = "x".repeat(160);
    serde_json::json!({
        "saga_id": "0190f1e2-7a4b-7c3d-8e5f-6a7b8c9d0e1f",
        "step": "charge_payment",
        "attempt": 1,
        "kind": "action",
        "payload": {"customer_id": "c-1", "note": payload},
    })
    .to_string()
}

/// Runs every level for `secs`; `url` is the bench's (coordinator) database.
pub async fn run(
    url: &str,
    admin: &PgPool,
    levels: &[usize],
    secs: Duration,
    stop: &CancellationToken,
) -> anyhow::Result<Baseline> {
    let max = levels.iter().copied().max().unwrap_or(1).max(1) as u32;
    let pool = skald_wire::db::lazy_pool(url, max).context("baseline database")?;
    let result = run_levels(&pool, admin, levels, secs, stop).await;
    let cleanup = sqlx::raw_sql("DROP TABLE IF EXISTS bench_baseline_outbox, bench_baseline_saga")
        .execute(&pool)
        .await;
    pool.close().await;
    let levels = result?;
    cleanup.context("dropping the baseline tables")?;
    let best = levels
        .iter()
        .filter(|l| l.skipped.is_none())
        .max_by(|a, b| a.tx_per_sec.total_cmp(&b.tx_per_sec));
    Ok(Baseline {
        transaction: "BEGIN; UPDATE saga row by primary key; INSERT ~300-byte jsonb outbox row; COMMIT (prepared)",
        secs_per_level: secs.as_secs_f64(),
        best_tx_per_sec: best.map_or(0.0, |l| l.tx_per_sec),
        best_concurrency: best.map_or(0, |l| l.concurrency),
        levels,
    })
}

async fn run_levels(
    pool: &PgPool,
    admin: &PgPool,
    levels: &[usize],
    secs: Duration,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<Level>> {
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS bench_baseline_outbox, bench_baseline_saga;
         CREATE TABLE bench_baseline_saga (
             id bigint PRIMARY KEY, status text NOT NULL, updated_at timestamptz NOT NULL);
         CREATE TABLE bench_baseline_outbox (
             id bigserial PRIMARY KEY, saga_id bigint NOT NULL, body jsonb NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now());",
    )
    .execute(pool)
    .await
    .context("creating the baseline tables")?;
    sqlx::query("INSERT INTO bench_baseline_saga SELECT g, 'RUNNING', now() FROM generate_series(1, $1::bigint) g")
        .bind(ROWS)
        .execute(pool)
        .await
        .context("filling the baseline table")?;
    sqlx::raw_sql("VACUUM ANALYZE bench_baseline_saga")
        .execute(pool)
        .await
        .context("VACUUM")?;
    let body = Arc::new(body());
    let mut out = Vec::new();
    for &c in levels {
        if stop.is_cancelled() {
            anyhow::bail!("interrupted");
        }
        let free = free_connections(admin).await?;
        // Leave room for everyone else on the shared server.
        if c as i64 > free - 20 {
            out.push(Level {
                concurrency: c,
                transactions: 0,
                tx_per_sec: 0.0,
                skipped: Some(format!("only {free} free connections on the server")),
            });
            continue;
        }
        let pb = ProgressBar::new_spinner();
        pb.set_message(format!("baseline: {c} clients for {} s", secs.as_secs_f64()));
        pb.enable_steady_tick(Duration::from_millis(200));
        let level = one_level(pool, c, secs, body.clone(), stop).await;
        pb.finish_and_clear();
        out.push(level?);
    }
    Ok(out)
}

async fn free_connections(admin: &PgPool) -> anyhow::Result<i64> {
    sqlx::query_scalar(
        "SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int
                - (SELECT count(*) FROM pg_stat_activity)::int",
    )
    .fetch_one(admin)
    .await
    .context("counting free connections")
    .map(|n: i32| i64::from(n))
}

async fn one_level(
    pool: &PgPool,
    clients: usize,
    secs: Duration,
    body: Arc<String>,
    stop: &CancellationToken,
) -> anyhow::Result<Level> {
    // Connect every client first, so that connecting is not timed.
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(pool.acquire().await.context("baseline connection")?);
    }
    let count = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let deadline = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in conns {
        let (count, barrier, deadline, body, stop) = (
            count.clone(),
            barrier.clone(),
            deadline.clone(),
            body.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            barrier.wait().await;
            let end = deadline.get().copied().unwrap_or_else(Instant::now);
            while Instant::now() < end && !stop.is_cancelled() {
                let id = rand::rng().random_range(1..=ROWS);
                let mut tx = conn.begin().await?;
                sqlx::query("UPDATE bench_baseline_saga SET status = $2, updated_at = now() WHERE id = $1")
                    .bind(id)
                    .bind("COMPENSATING")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO bench_baseline_outbox (saga_id, body) VALUES ($1, $2::jsonb)")
                    .bind(id)
                    .bind(body.as_str())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), sqlx::Error>(())
        });
    }
    let start = Instant::now();
    let _ = deadline.set(start + secs);
    barrier.wait().await;
    while let Some(r) = tasks.join_next().await {
        r.context("baseline client")?.context("baseline transaction")?;
    }
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    let n = count.load(Ordering::Relaxed);
    Ok(Level {
        concurrency: clients,
        transactions: n,
        tx_per_sec: (n as f64 / elapsed * 10.0).round() / 10.0,
        skipped: None,
    })
}
