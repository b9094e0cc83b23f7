//! `--preload N`: N finished sagas stored before the measured phases, so
//! that throughput can be measured with a large history in the databases.
//!
//! A few real orders (one per outcome that the mix needs) are first run
//! through Skald; their rows, in every table of all four databases, are the
//! templates. Each chunk of copies is then written with set-based SQL
//! (`INSERT ... SELECT FROM unnest(...) CROSS JOIN <template row>`), so the
//! copies have the real shape of the engine's state, the participants' inbox
//! rows and replies, payments and reservations. Only the ids, the customer
//! and the times differ. Balances and initial stock are raised by what the
//! copies hold, so the invariants still hold. Order ids are routed to their
//! shard table by the participants' own shard map.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use serde_json::Value;
use skald_participants::order::ShardMap;
use skald_participants::verify::Databases;
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

use super::phase::Env;
use crate::workload::{self, Mix, Plan, retry_until};

#[derive(Debug, Clone, Serialize)]
pub struct PreloadReport {
    pub sagas: usize,
    pub by_outcome: BTreeMap<String, usize>,
    pub secs: f64,
    pub sagas_per_sec: f64,
    pub analyze_secs: f64,
    /// Size of the four databases after the preload.
    pub database_mib: BTreeMap<String, f64>,
}

/// One template: a real saga of one outcome.
struct Template {
    plan: Plan,
    saga_id: Uuid,
    order_id: Uuid,
    /// Its order's shard table.
    table: String,
}

/// Customers of the copies (the templates' items are kept).
const CUSTOMERS: i64 = 1000;
const CUSTOMER_SQL: &str = "'preload-c' || (t.i % 1000)";

/// Writes `n` finished sagas in chunks of `chunk`, following `mix`.
pub async fn run(
    env: &Env,
    dbs: &Databases,
    n: usize,
    chunk: usize,
    mix: Mix,
    admin: &PgPool,
) -> anyhow::Result<PreloadReport> {
    let started = Instant::now();
    let plans: Vec<Plan> = Plan::ALL
        .into_iter()
        .filter(|p| (0..n.min(10_000)).any(|i| mix.plan_of(i) == *p))
        .collect();
    let templates = templates(env, dbs, &plans).await?;
    prepare_accounts(&dbs.payments).await?;

    let pb = ProgressBar::new(n as u64);
    if let Ok(style) =
        ProgressStyle::with_template("   preload {elapsed:>4} [{bar:36}] {pos}/{len} sagas  {per_sec}  eta {eta}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.enable_steady_tick(Duration::from_millis(200));
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    // The copies are in the past: 2 ms apart, ending now.
    let end = Utc::now() - chrono::Duration::seconds(1);
    let mut rng = StdRng::from_os_rng();
    let mut first = 0usize;
    while first < n {
        if env.stop.is_cancelled() {
            pb.finish_and_clear();
            anyhow::bail!("interrupted");
        }
        let len = chunk.min(n - first);
        for t in &templates {
            let idx: Vec<i64> = (first..first + len)
                .filter(|&i| mix.plan_of(i) == t.plan)
                .map(|i| i as i64)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let rows = Rows::new(&idx, n, end, &mut rng);
            copy_chunk(dbs, t, &rows)
                .await
                .with_context(|| format!("preloading sagas {first}..{} ({})", first + len, t.plan.label()))?;
            *by_outcome.entry(t.plan.label().to_owned()).or_default() += idx.len();
        }
        first += len;
        pb.set_position(first as u64);
    }
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let analyzed = Instant::now();
    let analyze = [&dbs.coordinator, &dbs.payments, &dbs.inventory]
        .into_iter()
        .chain(&dbs.orders)
        // VACUUM too: a database that gathered its finished sagas over weeks
        // was vacuumed along the way; after a bulk load, autovacuum would
        // otherwise scan every table during the measured phases (measured:
        // PostgreSQL's CPU per saga tripled, throughput halved).
        .map(|pool| async move {
            sqlx::raw_sql("VACUUM (ANALYZE)")
                .execute(pool)
                .await
                .context("VACUUM (ANALYZE)")
        });
    futures::future::try_join_all(analyze).await?;
    // And a checkpoint: the bulk load wrote gigabytes that PostgreSQL would
    // otherwise still be flushing (with a full-page image in the WAL for
    // each page first touched after each checkpoint) during the measured
    // phases; a database that grew over weeks is not in that state.
    sqlx::raw_sql("CHECKPOINT")
        .execute(admin)
        .await
        .context("CHECKPOINT (needs a superuser or pg_checkpoint)")?;
    let analyze_secs = analyzed.elapsed().as_secs_f64();
    let sizes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT datname::text, pg_database_size(datname) FROM pg_database WHERE datname = ANY($1) ORDER BY 1",
    )
    .bind(&env.db_names)
    .fetch_all(admin)
    .await
    .context("database sizes")?;
    Ok(PreloadReport {
        sagas: n,
        by_outcome,
        secs: (secs * 1000.0).round() / 1000.0,
        sagas_per_sec: (n as f64 / secs.max(1e-9)).round(),
        analyze_secs: (analyze_secs * 1000.0).round() / 1000.0,
        database_mib: sizes
            .into_iter()
            .map(|(d, b)| (d, (b as f64 / 1048576.0 * 10.0).round() / 10.0))
            .collect(),
    })
}

/// Runs one real order per outcome through Skald and waits for each to be final.
async fn templates(env: &Env, dbs: &Databases, plans: &[Plan]) -> anyhow::Result<Vec<Template>> {
    // Indexes 0, 1, 2 of this mix are approved, out of stock, no balance (see Mix::plan_of).
    let mix = Mix {
        customers: 3,
        skus: 3,
        fail_balance: 1.0 / 3.0,
        fail_stock: 1.0 / 3.0,
    };
    let run_id = format!("{}-tpl", env.run_id);
    let planned = workload::plan(&run_id, 0, 3, mix, &mut StdRng::seed_from_u64(1));
    planned.seed(&dbs.payments, &dbs.inventory).await?;
    let deadline = tokio::time::Instant::now() + env.timeout;
    let mut posted = Vec::new();
    for order in planned.orders.iter().filter(|o| plans.contains(&o.plan)) {
        let key = format!("bench-{run_id}-{}", order.index);
        let created = retry_until(deadline, &env.stop, || env.api.create_order(&order.body, &key))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "preload template order: {}",
                    e.map_or("interrupted".into(), |e| e.to_string())
                )
            })?;
        let id = |k: &str| {
            created
                .get(k)
                .and_then(Value::as_str)
                .and_then(|s| Uuid::parse_str(s).ok())
                .with_context(|| format!("POST /v1/orders: no {k} in {created}"))
        };
        posted.push((order.plan, id("saga_id")?, id("order_id")?));
    }
    let ids: Vec<Uuid> = posted.iter().map(|p| p.1).collect();
    loop {
        let statuses: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, status FROM sagas WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&dbs.coordinator)
            .await
            .context("coordinator database")?;
        let done = statuses
            .iter()
            .filter(|(_, s)| super::phase::FINAL.contains(&s.as_str()))
            .count();
        if done == ids.len() {
            for (plan, saga_id, _) in &posted {
                let status = statuses.iter().find(|s| s.0 == *saga_id).map(|s| s.1.as_str());
                let expected = if *plan == Plan::Approve {
                    "COMPLETED"
                } else {
                    "COMPENSATED"
                };
                anyhow::ensure!(
                    status == Some(expected),
                    "preload template saga {saga_id} ({}) ended {status:?}, not {expected}",
                    plan.label()
                );
            }
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "preload: the template orders did not finish within --timeout-secs {}",
            env.timeout.as_secs()
        );
        anyhow::ensure!(!env.stop.is_cancelled(), "interrupted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(posted
        .into_iter()
        .map(|(plan, saga_id, order_id)| Template {
            plan,
            saga_id,
            order_id,
            table: dbs.shards.table(order_id),
        })
        .collect())
}

async fn prepare_accounts(payments: &PgPool) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO accounts (customer_id, balance_cents, initial_balance_cents)
         SELECT 'preload-c' || g, 100000, 100000 FROM generate_series(0, $1 - 1) g
         ON CONFLICT (customer_id) DO NOTHING",
    )
    .bind(CUSTOMERS)
    .execute(payments)
    .await
    .context("preload accounts")?;
    Ok(())
}

/// The copies of one chunk for one template.
struct Rows {
    saga_ids: Vec<Uuid>,
    order_ids: Vec<Uuid>,
    idx: Vec<i64>,
    created: Vec<DateTime<Utc>>,
}

impl Rows {
    fn new(idx: &[i64], n: usize, end: DateTime<Utc>, rng: &mut StdRng) -> Self {
        let created: Vec<DateTime<Utc>> = idx
            .iter()
            .map(|&i| end - chrono::Duration::milliseconds(2 * (n as i64 - i)))
            .collect();
        // Time-ordered ids (UUIDv7), as the coordinator makes them.
        let v7 = |t: &DateTime<Utc>, rng: &mut StdRng| {
            let ms = t.timestamp_millis().max(0) as u64;
            let random: [u8; 10] = rand::Rng::random(rng);
            uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid()
        };
        let saga_ids = created.iter().map(|t| v7(t, rng)).collect();
        let order_ids = created.iter().map(|t| v7(t, rng)).collect();
        Self {
            saga_ids,
            order_ids,
            idx: idx.to_vec(),
            created,
        }
    }
}

impl Rows {
    /// The rows at positions `ks`.
    fn pick(&self, ks: &[usize]) -> Rows {
        Rows {
            saga_ids: ks.iter().map(|&k| self.saga_ids[k]).collect(),
            order_ids: ks.iter().map(|&k| self.order_ids[k]).collect(),
            idx: ks.iter().map(|&k| self.idx[k]).collect(),
            created: ks.iter().map(|&k| self.created[k]).collect(),
        }
    }
}

/// The copies, as a table `t(saga_id, order_id, i, created_at)` of parameters
/// $1..$4; $5 is the template's id (saga or order, as the statement says).
const COPIES: &str =
    "unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::timestamptz[]) AS t(saga_id, order_id, i, created_at)";

/// One `INSERT ... SELECT ... FROM {COPIES} ...` (or an UPDATE over it), with
/// the template's id for $5 and, for some, only part of the rows.
struct Copy {
    sql: String,
    template: Uuid,
    only: Option<Rows>,
}

impl Copy {
    fn new(sql: String, template: Uuid) -> Self {
        Self {
            sql,
            template,
            only: None,
        }
    }
}

/// Runs `copies` over `rows` in one transaction of `pool`.
async fn copy_all(pool: &PgPool, rows: &Rows, copies: Vec<Copy>) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    for c in copies {
        let rows = c.only.as_ref().unwrap_or(rows);
        sqlx::query(AssertSqlSafe(c.sql))
            .bind(&rows.saga_ids)
            .bind(&rows.order_ids)
            .bind(&rows.idx)
            .bind(&rows.created)
            .bind(c.template)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The template's rows, copied for every row of `rows`, in all four databases
/// (one transaction per database, the four at once).
async fn copy_chunk(dbs: &Databases, t: &Template, rows: &Rows) -> anyhow::Result<()> {
    let coordinator = vec![
        Copy::new(
            format!(
                "INSERT INTO sagas (id, saga_type, status, state, payload, wake_at, created_at, updated_at, finished_at)
                 SELECT t.saga_id, s.saga_type, s.status, s.state,
                        s.payload || jsonb_build_object('order_id', t.order_id, 'customer_id', {CUSTOMER_SQL}),
                        NULL, t.created_at, t.created_at + (s.updated_at - s.created_at),
                        t.created_at + (s.finished_at - s.created_at)
                 FROM {COPIES} CROSS JOIN sagas s WHERE s.id = $5"
            ),
            t.saga_id,
        ),
        Copy::new(
            format!(
                "INSERT INTO orders (order_id, saga_id, customer_id, currency, total_cents, items, created_at)
                 SELECT t.order_id, t.saga_id, {CUSTOMER_SQL}, o.currency, o.total_cents, o.items, t.created_at
                 FROM {COPIES} CROSS JOIN orders o WHERE o.saga_id = $5"
            ),
            t.saga_id,
        ),
        Copy::new(
            format!(
                "INSERT INTO idempotency_keys (key, request_hash, order_id, saga_id, created_at)
                 SELECT 'preload-' || t.i, k.request_hash, t.order_id, t.saga_id, t.created_at
                 FROM {COPIES} CROSS JOIN idempotency_keys k WHERE k.saga_id = $5"
            ),
            t.saga_id,
        ),
    ];

    // Each order goes to its shard table.
    let mut by_table: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (k, id) in rows.order_ids.iter().enumerate() {
        by_table.entry(dbs.shards.table(*id)).or_default().push(k);
    }
    let mut orders: Vec<Copy> = by_table
        .into_iter()
        .map(|(table, ks)| Copy {
            sql: format!(
                "INSERT INTO {table} (id, saga_id, customer_id, currency, status, total_cents, items, fence, created_at, updated_at)
                 SELECT t.order_id, t.saga_id, {CUSTOMER_SQL}, o.currency, o.status, o.total_cents, o.items, o.fence,
                        t.created_at, t.created_at + (o.updated_at - o.created_at)
                 FROM {COPIES} CROSS JOIN {} o WHERE o.id = $5",
                t.table
            ),
            template: t.order_id,
            only: Some(rows.pick(&ks)),
        })
        .collect();
    orders.push(Copy::new(inbox_sql(), t.saga_id));
    let orders_pool = dbs
        .orders
        .get(dbs.shards.database_of(t.order_id))
        .context("orders database")?;

    let payments = vec![
        Copy::new(
            format!(
                "INSERT INTO payments (order_id, saga_id, customer_id, amount_cents, currency, status, created_at, updated_at)
                 SELECT t.order_id, t.saga_id, {CUSTOMER_SQL}, p.amount_cents, p.currency, p.status,
                        t.created_at, t.created_at + (p.updated_at - p.created_at)
                 FROM {COPIES} CROSS JOIN payments p WHERE p.order_id = $5"
            ),
            t.order_id,
        ),
        // Money is conserved: what the copies hold charged was there initially.
        Copy::new(
            format!(
                "UPDATE accounts a SET initial_balance_cents = a.initial_balance_cents + x.amount
                 FROM (SELECT {CUSTOMER_SQL} AS customer_id, sum(p.amount_cents)::bigint AS amount
                       FROM {COPIES} CROSS JOIN payments p WHERE p.order_id = $5 AND p.status = 'CHARGED'
                       GROUP BY 1) x
                 WHERE a.customer_id = x.customer_id"
            ),
            t.order_id,
        ),
        Copy::new(inbox_sql(), t.saga_id),
    ];

    let inventory = vec![
        Copy::new(
            format!(
                "INSERT INTO reservations (order_id, saga_id, sku, quantity, status, created_at, updated_at)
                 SELECT t.order_id, t.saga_id, r.sku, r.quantity, r.status,
                        t.created_at, t.created_at + (r.updated_at - r.created_at)
                 FROM {COPIES} CROSS JOIN reservations r WHERE r.order_id = $5"
            ),
            t.order_id,
        ),
        // Stock is conserved: what the copies hold reserved was there initially.
        Copy::new(
            format!(
                "UPDATE stock s SET initial_available = s.initial_available + x.quantity
                 FROM (SELECT r.sku, sum(r.quantity)::bigint AS quantity
                       FROM {COPIES} CROSS JOIN reservations r WHERE r.order_id = $5 AND r.status = 'RESERVED'
                       GROUP BY 1) x
                 WHERE s.sku = x.sku"
            ),
            t.order_id,
        ),
        Copy::new(inbox_sql(), t.saga_id),
    ];

    tokio::try_join!(
        copy_all(&dbs.coordinator, rows, coordinator),
        copy_all(orders_pool, rows, orders),
        copy_all(&dbs.payments, rows, payments),
        copy_all(&dbs.inventory, rows, inventory),
    )?;
    Ok(())
}

/// A participant's inbox rows of the template saga ($5), for every copy.
fn inbox_sql() -> String {
    format!(
        "INSERT INTO inbox (saga_id, step, kind, attempt, message_type, tombstone, reply, created_at)
         SELECT t.saga_id, b.step, b.kind, b.attempt, b.message_type, b.tombstone, b.reply,
                t.created_at + (b.created_at - f.created_at)
         FROM {COPIES}
         CROSS JOIN inbox b
         CROSS JOIN (SELECT min(created_at) AS created_at FROM inbox WHERE saga_id = $5) f
         WHERE b.saga_id = $5"
    )
}

/// The shard map is the participants' own, read where the order participant recorded it.
pub async fn wait_for_shards(orders: &PgPool, timeout: Duration) -> anyhow::Result<ShardMap> {
    let deadline = Instant::now() + timeout;
    loop {
        let recorded: Result<Option<i32>, _> = sqlx::query_scalar("SELECT shards FROM order_shards")
            .fetch_optional(orders)
            .await;
        if let Ok(Some(n)) = recorded {
            return ShardMap::new(n as u32).map_err(anyhow::Error::msg);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the order participant did not create its shard tables within {} s",
            timeout.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
