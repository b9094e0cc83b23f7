//! The order saga's command payload, as the coordinator sends it to every
//! step (`CommandEnvelope.payload`).

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::json;
use sqlx::Row;
use uuid::Uuid;

use crate::runtime::{CommandContext, Handled, HandlerError};

#[derive(Debug, Clone, Deserialize)]
pub struct OrderPayload {
    pub order_id: Uuid,
    pub customer_id: String,
    pub currency: String,
    pub items: Vec<OrderLine>,
    pub total_cents: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

impl OrderPayload {
    pub fn parse(value: &serde_json::Value) -> Result<Self, HandlerError> {
        let p: Self = serde::Deserialize::deserialize(value).map_err(|e| HandlerError::BadPayload(e.to_string()))?;
        if p.total_cents < 0 || p.items.iter().any(|l| l.quantity <= 0 || l.unit_price_cents < 0) {
            return Err(HandlerError::BadPayload("negative amounts or quantities".to_owned()));
        }
        Ok(p)
    }

    /// Quantities per SKU, sorted by SKU (lock order: no deadlocks between orders).
    pub fn quantities(&self) -> Vec<(String, i64)> {
        let mut by_sku: std::collections::BTreeMap<String, i64> = Default::default();
        for l in &self.items {
            *by_sku.entry(l.sku.clone()).or_default() += l.quantity;
        }
        by_sku.into_iter().collect()
    }
}

/// Whether `table` has a row of this command's order and saga: the
/// question of [`crate::runtime::Handler::action_took_effect`] for a
/// participant whose action writes such rows.
pub async fn order_rows_exist(
    tx: &mut sqlx::PgConnection,
    ctx: &CommandContext<'_>,
    table: OrderTable,
) -> Result<bool, HandlerError> {
    let order = OrderPayload::parse(&ctx.command.payload)?;
    let sql = match table {
        OrderTable::Payments => "SELECT EXISTS (SELECT 1 FROM payments WHERE order_id = $1 AND saga_id = $2)",
        OrderTable::Reservations => "SELECT EXISTS (SELECT 1 FROM reservations WHERE order_id = $1 AND saga_id = $2)",
    };
    Ok(sqlx::query_scalar(sql)
        .bind(order.order_id)
        .bind(ctx.command.saga_id)
        .fetch_one(&mut *tx)
        .await?)
}

/// Tables whose rows belong to one order and one saga.
#[derive(Debug, Clone, Copy)]
pub enum OrderTable {
    Payments,
    Reservations,
}

/// The payloads of the commands a `handle_many` got, in order.
pub fn payloads(ctxs: &[CommandContext<'_>]) -> Result<Vec<OrderPayload>, HandlerError> {
    ctxs.iter().map(|c| OrderPayload::parse(&c.command.payload)).collect()
}

/// A `handle_many` result from outcomes filled in by position: an error
/// if one is missing (the batch then runs again one by one).
pub fn every_outcome(outcomes: Vec<Option<Handled>>, what: &str) -> Result<Vec<Handled>, HandlerError> {
    outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| HandlerError::BadPayload(format!("{what} of the batch got no outcome"))))
        .collect()
}

/// Undoes a batch of compensations' orders with one statement, `sql`,
/// which takes the order ids as `$1` and returns `(order_id, n)` rows:
/// each order's reply data is `{field: n}`, 0 where nothing was left to
/// undo (an order seen earlier in the batch included, as one by one).
pub async fn undo_many(
    tx: &mut sqlx::PgConnection,
    ctxs: &[CommandContext<'_>],
    sql: &'static str,
    field: &str,
) -> Result<Vec<Handled>, HandlerError> {
    let orders = payloads(ctxs)?;
    let rows = sqlx::query(sql)
        .bind(orders.iter().map(|o| o.order_id).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
    let mut undone: HashMap<Uuid, i64> = HashMap::with_capacity(rows.len());
    for row in rows {
        undone.insert(row.try_get("order_id")?, row.try_get("n")?);
    }
    Ok(orders
        .iter()
        .map(|o| Handled::Success(json!({ field: undone.remove(&o.order_id).unwrap_or(0) })))
        .collect())
}
