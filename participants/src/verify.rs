//! Cross-service invariant check (DESIGN.md, "Participant data"), run once
//! the system is quiet: it reads the coordinator's and the three
//! participants' databases and describes every violation in one line that
//! names the saga, order, customer or SKU concerned.
//!
//! Checked:
//! - every saga is `COMPLETED`, `COMPENSATED` or `STUCK`;
//! - an `APPROVED` order has exactly one `CHARGED` payment of its total and
//!   a `RESERVED` reservation of the right quantity for every line (and no
//!   other reservation);
//! - a `CANCELLED` order has no `CHARGED` payment and no `RESERVED` stock;
//! - a `PENDING` order's saga is not `COMPLETED` or `COMPENSATED`;
//! - a `COMPLETED` saga's order is `APPROVED`; a `COMPENSATED` saga's order
//!   is `CANCELLED` or absent (its creation may never have run);
//! - a `CHARGED` payment or `RESERVED` line belongs to an `APPROVED` order,
//!   unless the order's saga is `STUCK` (an operator has to look);
//! - every order row is in the shard table its id routes to;
//! - money per customer: initial = balance + CHARGED payments;
//! - stock per SKU: initial = available + RESERVED quantities.
//!
//! Rows are loaded into memory: fine for the demo's and the tests' volumes
//! (thousands of orders), not meant for a production-sized database.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

use crate::order::ShardMap;

impl Databases {
    /// The orders database holding `order_id`.
    pub fn orders_of(&self, order_id: Uuid) -> &PgPool {
        &self.orders[self.shards.database_of(order_id)]
    }
}

/// The four databases of one deployment.
#[derive(Debug, Clone)]
pub struct Databases {
    pub coordinator: PgPool,
    /// The orders databases, in shard-map order (one unless spread).
    pub orders: Vec<PgPool>,
    pub payments: PgPool,
    pub inventory: PgPool,
    pub shards: ShardMap,
}

/// What was found: counts, and one line per violated invariant.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    pub sagas_by_status: BTreeMap<String, i64>,
    pub orders_by_status: BTreeMap<String, i64>,
    pub charged_payments: i64,
    pub refunded_payments: i64,
    pub reserved_lines: i64,
    pub released_lines: i64,
    pub violations: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

const APPROVED: &str = "APPROVED";
const CANCELLED: &str = "CANCELLED";
const PENDING: &str = "PENDING";
const CHARGED: &str = "CHARGED";
const REFUNDED: &str = "REFUNDED";
const RESERVED: &str = "RESERVED";
const RELEASED: &str = "RELEASED";
const STUCK: &str = "STUCK";
const COMPLETED: &str = "COMPLETED";
const COMPENSATED: &str = "COMPENSATED";

struct OrderRow {
    table: String,
    saga_id: Uuid,
    customer_id: String,
    status: String,
    total_cents: i64,
    items: serde_json::Value,
}

struct Payment {
    saga_id: Uuid,
    customer_id: String,
    amount_cents: i64,
    status: String,
}

struct Reservation {
    saga_id: Uuid,
    sku: String,
    quantity: i64,
    status: String,
}

#[derive(serde::Deserialize)]
struct Line {
    sku: String,
    quantity: i64,
}

/// Everything loaded, and the lookups the checks need.
struct World {
    /// saga id -> status.
    sagas: BTreeMap<Uuid, String>,
    /// The coordinator's orders: order id -> saga id.
    coordinator_orders: BTreeMap<Uuid, Uuid>,
    /// The orders database (all shards): order id -> row.
    orders: BTreeMap<Uuid, OrderRow>,
    payments: BTreeMap<Uuid, Vec<Payment>>,
    reservations: BTreeMap<Uuid, Vec<Reservation>>,
    /// Order ids found in two shard tables: (id, table kept, other table).
    duplicates: Vec<(Uuid, String, String)>,
}

impl World {
    /// The saga of an order: the coordinator's record, else the id stored
    /// alongside the participant's row.
    fn saga_of(&self, order_id: Uuid, hint: Uuid) -> Uuid {
        self.coordinator_orders.get(&order_id).copied().unwrap_or(hint)
    }

    fn saga_status(&self, saga_id: Uuid) -> &str {
        self.sagas
            .get(&saga_id)
            .map(String::as_str)
            .unwrap_or("unknown to the coordinator")
    }

    fn order_status(&self, order_id: Uuid) -> Option<&str> {
        self.orders.get(&order_id).map(|o| o.status.as_str())
    }
}

/// Checks every invariant; `Err` only when a database cannot be read.
pub async fn verify(dbs: &Databases) -> Result<Report, sqlx::Error> {
    let world = load(dbs).await?;
    let mut report = Report::default();
    for status in world.sagas.values() {
        *report.sagas_by_status.entry(status.clone()).or_default() += 1;
    }
    for order in world.orders.values() {
        *report.orders_by_status.entry(order.status.clone()).or_default() += 1;
    }
    for p in world.payments.values().flatten() {
        match p.status.as_str() {
            CHARGED => report.charged_payments += 1,
            REFUNDED => report.refunded_payments += 1,
            _ => {}
        }
    }
    for r in world.reservations.values().flatten() {
        match r.status.as_str() {
            RESERVED => report.reserved_lines += 1,
            RELEASED => report.released_lines += 1,
            _ => {}
        }
    }

    let v = &mut report.violations;
    check_sagas(&world, v);
    check_orders(&world, dbs.shards, v);
    check_coordinator_orders(&world, v);
    check_held(&world, v);
    check_money(&dbs.payments, v).await?;
    check_stock(&dbs.inventory, v).await?;
    check_wakeups(&dbs.coordinator, v).await?;
    Ok(report)
}

async fn load(dbs: &Databases) -> Result<World, sqlx::Error> {
    let sagas: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, status FROM sagas")
        .fetch_all(&dbs.coordinator)
        .await?;
    let coordinator_orders: Vec<(Uuid, Uuid)> = sqlx::query_as("SELECT order_id, saga_id FROM orders")
        .fetch_all(&dbs.coordinator)
        .await?;

    let mut orders = BTreeMap::new();
    let mut duplicates = Vec::new();
    let shard_tables = dbs
        .orders
        .iter()
        .enumerate()
        .flat_map(|(i, pool)| dbs.shards.tables_in(i).into_iter().map(move |t| (pool, t)));
    for (pool, table) in shard_tables {
        let rows: Vec<(Uuid, Uuid, String, String, i64, serde_json::Value)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT id, saga_id, customer_id, status, total_cents, items FROM {table}"
        )))
        .fetch_all(pool)
        .await?;
        for (id, saga_id, customer_id, status, total_cents, items) in rows {
            let row = OrderRow {
                table: table.clone(),
                saga_id,
                customer_id,
                status,
                total_cents,
                items,
            };
            if let Some(previous) = orders.insert(id, row) {
                duplicates.push((id, table.clone(), previous.table));
            }
        }
    }

    let payment_rows: Vec<(Uuid, Uuid, String, i64, String)> =
        sqlx::query_as("SELECT order_id, saga_id, customer_id, amount_cents, status FROM payments")
            .fetch_all(&dbs.payments)
            .await?;
    let mut payments: BTreeMap<Uuid, Vec<Payment>> = BTreeMap::new();
    for (order_id, saga_id, customer_id, amount_cents, status) in payment_rows {
        payments.entry(order_id).or_default().push(Payment {
            saga_id,
            customer_id,
            amount_cents,
            status,
        });
    }

    let reservation_rows: Vec<(Uuid, Uuid, String, i64, String)> =
        sqlx::query_as("SELECT order_id, saga_id, sku, quantity, status FROM reservations ORDER BY order_id, sku")
            .fetch_all(&dbs.inventory)
            .await?;
    let mut reservations: BTreeMap<Uuid, Vec<Reservation>> = BTreeMap::new();
    for (order_id, saga_id, sku, quantity, status) in reservation_rows {
        reservations.entry(order_id).or_default().push(Reservation {
            saga_id,
            sku,
            quantity,
            status,
        });
    }

    Ok(World {
        sagas: sagas.into_iter().collect(),
        coordinator_orders: coordinator_orders.into_iter().collect(),
        orders,
        payments,
        reservations,
        duplicates,
    })
}

fn check_sagas(world: &World, v: &mut Vec<String>) {
    let order_of: HashMap<Uuid, Uuid> = world.coordinator_orders.iter().map(|(o, s)| (*s, *o)).collect();
    for (saga_id, status) in &world.sagas {
        if !matches!(status.as_str(), COMPLETED | COMPENSATED | STUCK) {
            let order = order_of
                .get(saga_id)
                .map(|o| format!(" (order {o})"))
                .unwrap_or_default();
            v.push(format!(
                "saga {saga_id}{order} is {status}, not final (COMPLETED, COMPENSATED or STUCK)"
            ));
        }
    }
}

fn check_orders(world: &World, shards: ShardMap, v: &mut Vec<String>) {
    for (id, kept, other) in &world.duplicates {
        v.push(format!("order {id} is stored twice, in {other} and in {kept}"));
    }
    for (id, order) in &world.orders {
        let expected_table = shards.table(*id);
        if order.table != expected_table {
            v.push(format!(
                "order {id} is stored in {} but routes to {expected_table}",
                order.table
            ));
        }
        let charged: Vec<&Payment> = world
            .payments
            .get(id)
            .into_iter()
            .flatten()
            .filter(|p| p.status == CHARGED)
            .collect();
        let mut reserved: BTreeMap<&str, i64> = BTreeMap::new();
        for r in world
            .reservations
            .get(id)
            .into_iter()
            .flatten()
            .filter(|r| r.status == RESERVED)
        {
            *reserved.entry(r.sku.as_str()).or_default() += r.quantity;
        }
        let customer = &order.customer_id;
        match order.status.as_str() {
            APPROVED => {
                match charged.as_slice() {
                    [] => v.push(format!(
                        "order {id} (customer {customer}) is APPROVED but has no CHARGED payment (total {} cents)",
                        order.total_cents
                    )),
                    [p] => {
                        if p.amount_cents != order.total_cents {
                            v.push(format!(
                                "order {id} (customer {customer}) is APPROVED but its CHARGED payment is {} cents, not its total {} cents",
                                p.amount_cents, order.total_cents
                            ));
                        }
                        if p.customer_id != *customer {
                            v.push(format!(
                                "order {id} belongs to customer {customer} but its payment was charged to customer {}",
                                p.customer_id
                            ));
                        }
                    }
                    many => v.push(format!(
                        "order {id} (customer {customer}) is APPROVED but has {} CHARGED payments",
                        many.len()
                    )),
                }
                let lines: Vec<Line> = match serde_json::from_value(order.items.clone()) {
                    Ok(lines) => lines,
                    Err(e) => {
                        v.push(format!("order {id} is APPROVED but its items are unreadable: {e}"));
                        continue;
                    }
                };
                let mut ordered: BTreeMap<&str, i64> = BTreeMap::new();
                for l in &lines {
                    *ordered.entry(l.sku.as_str()).or_default() += l.quantity;
                }
                for (sku, quantity) in &ordered {
                    match reserved.get(sku) {
                        None => v.push(format!(
                            "order {id} is APPROVED but has no RESERVED stock for sku {sku} (ordered {quantity})"
                        )),
                        Some(r) if r != quantity => v.push(format!(
                            "order {id} is APPROVED but has {r} of sku {sku} RESERVED, ordered {quantity}"
                        )),
                        Some(_) => {}
                    }
                }
                for (sku, r) in &reserved {
                    if !ordered.contains_key(sku) {
                        v.push(format!(
                            "order {id} is APPROVED and has {r} of sku {sku} RESERVED, which it did not order"
                        ));
                    }
                }
            }
            CANCELLED => {
                for p in &charged {
                    v.push(format!(
                        "order {id} is CANCELLED but customer {} still has a CHARGED payment of {} cents for it",
                        p.customer_id, p.amount_cents
                    ));
                }
                for (sku, r) in &reserved {
                    v.push(format!(
                        "order {id} is CANCELLED but {r} of sku {sku} is still RESERVED for it"
                    ));
                }
            }
            PENDING => {
                let saga = world.saga_of(*id, order.saga_id);
                let status = world.saga_status(saga);
                if matches!(status, COMPLETED | COMPENSATED) {
                    v.push(format!("order {id} is PENDING but its saga {saga} is {status}"));
                }
            }
            other => v.push(format!("order {id} has unknown status {other:?}")),
        }
    }
}

fn check_coordinator_orders(world: &World, v: &mut Vec<String>) {
    for (order_id, saga_id) in &world.coordinator_orders {
        let saga_status = world.saga_status(*saga_id);
        let order_status = world.order_status(*order_id);
        match (saga_status, order_status) {
            (COMPLETED, Some(APPROVED)) => {}
            (COMPLETED, None) => v.push(format!(
                "saga {saga_id} is COMPLETED but its order {order_id} is missing from the orders database"
            )),
            (COMPLETED, Some(s)) => v.push(format!("saga {saga_id} is COMPLETED but its order {order_id} is {s}")),
            (COMPENSATED, None | Some(CANCELLED)) => {}
            (COMPENSATED, Some(s)) => v.push(format!("saga {saga_id} is COMPENSATED but its order {order_id} is {s}")),
            _ => {}
        }
    }
}

/// Money or stock held for an order that is not `APPROVED`. `CANCELLED`
/// orders are reported by [`check_orders`]; here: `PENDING` or absent.
fn check_held(world: &World, v: &mut Vec<String>) {
    let unapproved = |order_id: Uuid, hint: Uuid| -> Option<String> {
        let state = match world.order_status(order_id) {
            Some(APPROVED) | Some(CANCELLED) => return None,
            Some(s) => format!("is {s}"),
            None => "is absent from the orders database".to_owned(),
        };
        let saga = world.saga_of(order_id, hint);
        let saga_status = world.saga_status(saga);
        (saga_status != STUCK).then(|| format!("{state} (saga {saga} {saga_status})"))
    };
    for (order_id, payments) in &world.payments {
        for p in payments.iter().filter(|p| p.status == CHARGED) {
            if let Some(why) = unapproved(*order_id, p.saga_id) {
                v.push(format!(
                    "customer {} has a CHARGED payment of {} cents for order {order_id}, which {why}",
                    p.customer_id, p.amount_cents
                ));
            }
        }
    }
    for (order_id, reservations) in &world.reservations {
        for r in reservations.iter().filter(|r| r.status == RESERVED) {
            if let Some(why) = unapproved(*order_id, r.saga_id) {
                v.push(format!(
                    "{} of sku {} is RESERVED for order {order_id}, which {why}",
                    r.quantity, r.sku
                ));
            }
        }
    }
}

/// A saga with a deadline, its status, and its wake-up row's time if any.
type Wakeup = (Uuid, String, DateTime<Utc>, Option<DateTime<Utc>>);

/// Every saga with a deadline has a wake-up row no later than it, or the
/// sweeper would never wake it (migration 0007). One statement, so one
/// snapshot: a saga and its row are written together.
async fn check_wakeups(pool: &PgPool, v: &mut Vec<String>) -> Result<(), sqlx::Error> {
    let rows: Vec<Wakeup> = sqlx::query_as(
        "SELECT s.id, s.status, s.wake_at, w.wake_at FROM sagas s
         LEFT JOIN saga_wakeups w ON w.saga_id = s.id
         WHERE s.status IN ('RUNNING', 'COMPENSATING') AND s.wake_at IS NOT NULL
           AND (w.wake_at IS NULL OR w.wake_at > s.wake_at)
         ORDER BY s.id",
    )
    .fetch_all(pool)
    .await?;
    for (saga, status, deadline, wakeup) in rows {
        v.push(match wakeup {
            None => format!("saga {saga} ({status}, due {deadline}): no wake-up row, the sweeper would never wake it"),
            Some(w) => {
                format!("saga {saga} ({status}, due {deadline}): its wake-up row says {w}, later than its deadline")
            }
        });
    }
    Ok(())
}

async fn check_money(pool: &PgPool, v: &mut Vec<String>) -> Result<(), sqlx::Error> {
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT a.customer_id, a.initial_balance_cents, a.balance_cents, COALESCE(p.charged, 0)::bigint
         FROM accounts a
         LEFT JOIN (SELECT customer_id, sum(amount_cents) AS charged FROM payments
                    WHERE status = 'CHARGED' GROUP BY customer_id) p USING (customer_id)
         WHERE a.initial_balance_cents <> a.balance_cents + COALESCE(p.charged, 0)
         ORDER BY a.customer_id",
    )
    .fetch_all(pool)
    .await?;
    for (customer, initial, balance, charged) in rows {
        v.push(format!(
            "customer {customer}: money not conserved: initial {initial} != balance {balance} + charged {charged} (off by {})",
            balance + charged - initial
        ));
    }
    // A payment for a customer without an account cannot exist (foreign key);
    // nothing else to check on that side.
    Ok(())
}

async fn check_stock(pool: &PgPool, v: &mut Vec<String>) -> Result<(), sqlx::Error> {
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT s.sku, s.initial_available, s.available, COALESCE(r.reserved, 0)::bigint
         FROM stock s
         LEFT JOIN (SELECT sku, sum(quantity) AS reserved FROM reservations
                    WHERE status = 'RESERVED' GROUP BY sku) r USING (sku)
         WHERE s.initial_available <> s.available + COALESCE(r.reserved, 0)
         ORDER BY s.sku",
    )
    .fetch_all(pool)
    .await?;
    for (sku, initial, available, reserved) in rows {
        v.push(format!(
            "sku {sku}: stock not conserved: initial {initial} != available {available} + reserved {reserved} (off by {})",
            available + reserved - initial
        ));
    }
    Ok(())
}
