//! The order mix shared by the demo and the bench: orders planned so that a
//! chosen share fails deterministically (no balance at step 2, or no stock at
//! step 3 and refunded), the seeding that makes exactly the others succeed,
//! and small helpers to call the API until a deadline.

use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use skald_participants::app::{INVENTORY_MIGRATOR, ORDERS_MIGRATOR, PAYMENTS_MIGRATOR};
use skald_participants::verify::Databases;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{ApiError, DbConfig, recorded_shards};

pub const CURRENCY: &str = "EUR";

/// What an order is meant to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Plan {
    Approve,
    NoBalance,
    NoStock,
}

impl Plan {
    pub const ALL: [Plan; 3] = [Plan::Approve, Plan::NoBalance, Plan::NoStock];
    pub fn label(self) -> &'static str {
        match self {
            Plan::Approve => "approved",
            Plan::NoBalance => "cancelled: insufficient balance (step 2)",
            Plan::NoStock => "cancelled: out of stock, refunded (step 3)",
        }
    }
}

pub struct PlannedOrder {
    pub index: usize,
    pub plan: Plan,
    pub body: Value,
}

/// Who orders what: `customers` rich customers and `skus` stocked SKUs, plus
/// one customer with no money and one SKU with no stock for the failures.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub customers: usize,
    pub skus: usize,
    /// Share of orders from the customer with no money (fail at step 2).
    pub fail_balance: f64,
    /// Share of orders with a line of the SKU with no stock (fail at step 3, refunded).
    pub fail_stock: f64,
}

impl Mix {
    /// The plan of the `index`-th order: failures are spread evenly, so that
    /// any run of orders has the exact shares (to one order), whatever the seed.
    pub fn plan_of(&self, index: usize) -> Plan {
        let fail = (self.fail_balance + self.fail_stock).clamp(0.0, 1.0);
        let crosses = |share: f64, i: usize| ((i + 1) as f64 * share).floor() > (i as f64 * share).floor();
        if fail <= 0.0 || !crosses(fail, index) {
            return Plan::Approve;
        }
        // The k-th failing order: which kind, spread evenly too.
        let k = (index as f64 * fail).floor() as usize;
        if crosses(self.fail_balance / fail, k) {
            Plan::NoBalance
        } else {
            Plan::NoStock
        }
    }
}

/// `(name, amount)` to add to balances or stock.
pub type Seeds = Vec<(String, i64)>;

/// The orders, and what to seed so that exactly the planned ones succeed.
pub struct Planned {
    pub orders: Vec<PlannedOrder>,
    pub accounts: Seeds,
    pub stock: Seeds,
}

impl Planned {
    /// Adds the balances and stock (additive: a run may seed several batches).
    pub async fn seed(&self, payments: &PgPool, inventory: &PgPool) -> anyhow::Result<()> {
        skald_participants::seed::seed_accounts(payments, &self.accounts)
            .await
            .context("seeding accounts")?;
        skald_participants::seed::seed_stock(inventory, &self.stock)
            .await
            .context("seeding stock")?;
        Ok(())
    }
}

/// Names of the customers and SKUs of one run.
pub fn customer_name(run_id: &str, i: usize) -> String {
    format!("{run_id}-cust-{i:02}")
}
pub fn sku_name(run_id: &str, i: usize) -> String {
    format!("{run_id}-sku-{i:02}")
}
pub fn poor_customer(run_id: &str) -> String {
    format!("{run_id}-poor")
}
pub fn scarce_sku(run_id: &str) -> String {
    format!("{run_id}-scarce")
}

/// Plans `count` orders of the mix (indexes from `first_index`), and the
/// balances and stock that make exactly the planned ones succeed.
pub fn plan(run_id: &str, first_index: usize, count: usize, mix: Mix, rng: &mut StdRng) -> Planned {
    let poor = poor_customer(run_id);
    let scarce = scarce_sku(run_id);
    let mut balances = vec![0i64; mix.customers];
    let mut stock = vec![0i64; mix.skus];
    let mut orders = Vec::with_capacity(count);
    for index in first_index..first_index + count {
        let plan = mix.plan_of(index);
        let lines = rng.random_range(1..=3usize).min(mix.skus);
        let mut picked: Vec<usize> = Vec::with_capacity(lines);
        while picked.len() < lines {
            let s = rng.random_range(0..mix.skus);
            if !picked.contains(&s) {
                picked.push(s);
            }
        }
        let mut items: Vec<(String, i64, i64)> = picked
            .iter()
            .map(|&s| {
                (
                    sku_name(run_id, s),
                    rng.random_range(1..=4i64),
                    rng.random_range(1..=50i64) * 50,
                )
            })
            .collect();
        if plan == Plan::NoStock {
            items.push((scarce.clone(), 1, 999));
        }
        let total: i64 = items.iter().map(|(_, q, p)| q * p).sum();
        let who = match plan {
            Plan::NoBalance => poor.clone(),
            Plan::Approve | Plan::NoStock => {
                let c = rng.random_range(0..mix.customers);
                // A refunded order is charged first: it needs the money too.
                balances[c] += total;
                customer_name(run_id, c)
            }
        };
        if plan == Plan::Approve {
            for (&s, (_, q, _)) in picked.iter().zip(&items) {
                stock[s] += q;
            }
        }
        let body = json!({
            "customer_id": who,
            "currency": CURRENCY,
            "items": items.iter().map(|(s, q, p)| json!({"sku": s, "quantity": q, "unit_price_cents": p})).collect::<Vec<_>>(),
        });
        orders.push(PlannedOrder { index, plan, body });
    }
    let mut accounts: Seeds = balances
        .into_iter()
        .enumerate()
        .map(|(i, b)| (customer_name(run_id, i), b))
        .collect();
    accounts.push((poor, 0));
    let mut skus: Seeds = stock
        .into_iter()
        .enumerate()
        .map(|(i, q)| (sku_name(run_id, i), q))
        .collect();
    skus.push((scarce, 0));
    Planned {
        orders,
        accounts,
        stock: skus,
    }
}

/// The four databases: the participants' created and migrated if missing;
/// the coordinator's must have been migrated by a coordinator already.
pub async fn connect_migrated(db: &DbConfig, pool_size: u32) -> anyhow::Result<Databases> {
    let migrated = |url: String, migrator, what: &'static str| async move {
        skald_wire::db::connect_and_migrate(&url, pool_size, migrator, 8)
            .await
            .with_context(|| format!("{what} database"))
    };
    let (payments, inventory) = tokio::try_join!(
        migrated(db.payments_database_url.clone(), &PAYMENTS_MIGRATOR, "payments"),
        migrated(db.inventory_database_url.clone(), &INVENTORY_MIGRATOR, "inventory"),
    )?;
    let mut orders = Vec::new();
    for url in db.order_urls() {
        orders.push(migrated(url, &ORDERS_MIGRATOR, "orders").await?);
    }
    let coordinator = skald_wire::db::lazy_pool(&db.database_url, pool_size).context("coordinator database")?;
    sqlx::query("SELECT 1 FROM sagas LIMIT 1")
        .execute(&coordinator)
        .await
        .context("coordinator database")?;
    let shards = recorded_shards(&orders, db.order_shards).await?;
    Ok(Databases {
        coordinator,
        orders,
        payments,
        inventory,
        shards,
    })
}

/// Closes every pool of `dbs`.
pub async fn close(dbs: &Databases) {
    for pool in [&dbs.coordinator, &dbs.payments, &dbs.inventory]
        .into_iter()
        .chain(&dbs.orders)
    {
        pool.close().await;
    }
}

/// Calls `f` until it succeeds, fails for good, or time runs out. The last
/// error is returned when it gives up (`None` if stopped).
pub async fn retry_until<F, Fut>(
    deadline: tokio::time::Instant,
    stop: &CancellationToken,
    mut f: F,
) -> Result<Value, Option<ApiError>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Value, ApiError>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        if stop.is_cancelled() {
            return Err(None);
        }
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "API call failed, retrying");
                if !sleep_until_or_stop(backoff, deadline, stop).await {
                    return Err(Some(e));
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(error = %e, "API call failed");
                return Err(Some(e));
            }
        }
    }
}

/// Sleeps `d`; false if the deadline passes first or `stop` is cancelled.
pub async fn sleep_until_or_stop(d: Duration, deadline: tokio::time::Instant, stop: &CancellationToken) -> bool {
    let wake = tokio::time::Instant::now() + d;
    if wake >= deadline {
        return false;
    }
    tokio::select! {
        () = tokio::time::sleep_until(wake) => true,
        () = stop.cancelled() => false,
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn seeds_cover_exactly_the_approved_orders() {
        let mix = Mix {
            customers: 4,
            skus: 5,
            fail_balance: 0.2,
            fail_stock: 0.3,
        };
        let planned = plan("t", 0, 500, mix, &mut StdRng::seed_from_u64(7));
        let needed_stock: i64 = planned
            .orders
            .iter()
            .filter(|o| o.plan == Plan::Approve)
            .flat_map(|o| o.body["items"].as_array().cloned().unwrap_or_default())
            .map(|l| l["quantity"].as_i64().unwrap_or(0))
            .sum();
        let seeded_stock: i64 = planned.stock.iter().map(|(_, q)| q).sum();
        assert_eq!(needed_stock, seeded_stock);
        let count = |p: Plan| planned.orders.iter().filter(|o| o.plan == p).count();
        assert_eq!((count(Plan::NoBalance), count(Plan::NoStock)), (100, 150));
    }

    #[test]
    fn shares_are_exact_and_spread() {
        for (fb, fs) in [(0.0, 0.3), (0.3, 0.0), (0.15, 0.15), (0.0, 0.0), (0.0, 1.0), (0.1, 0.1)] {
            let mix = Mix {
                customers: 1,
                skus: 1,
                fail_balance: fb,
                fail_stock: fs,
            };
            let plans: Vec<Plan> = (0..1000).map(|i| mix.plan_of(i)).collect();
            let n = |p: Plan| plans.iter().filter(|&&q| q == p).count() as f64;
            assert!((n(Plan::NoBalance) - 1000.0 * fb).abs() <= 1.0, "{fb} {fs}");
            assert!((n(Plan::NoStock) - 1000.0 * fs).abs() <= 1.0, "{fb} {fs}");
            // Any 100 in a row hold the share too, to about one order.
            let first: Vec<&Plan> = plans[..100].iter().filter(|&&p| p != Plan::Approve).collect();
            assert!((first.len() as f64 - 100.0 * (fb + fs)).abs() <= 1.0);
        }
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile::<u32>(&[], 50.0), None);
    }
}
