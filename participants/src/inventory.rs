//! The `inventory` participant: reserves and releases stock.

use std::future::Future;

use serde_json::json;
use sqlx::{PgConnection, Row};

use crate::payload::OrderPayload;
use crate::runtime::{CommandContext, Handled, Handler, HandlerError};

pub struct InventoryParticipant;

impl Handler for InventoryParticipant {
    fn participant(&self) -> &'static str {
        "inventory"
    }

    fn all_or_nothing(&self, message_type: &str) -> bool {
        message_type == "ReserveStock"
    }

    // Written out (not `async fn`) to promise `Send`: the runtime spawns handlers.
    #[allow(clippy::manual_async_fn)]
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        ctx: &'a CommandContext<'a>,
    ) -> impl Future<Output = Result<Handled, HandlerError>> + Send + 'a {
        async move {
            let order = OrderPayload::parse(&ctx.command.payload)?;
            match ctx.message_type {
                "ReserveStock" => reserve(tx, ctx, &order).await,
                "ReleaseStock" => release(tx, &order).await,
                other => Err(HandlerError::UnknownType(other.to_owned())),
            }
        }
    }
}

/// Reserves every line or none, in one statement: the lines short of stock
/// (or unknown) are found first, and stock is taken and reservations are
/// written only when there is none. A concurrent reservation that takes the
/// stock in between makes the update break the `available >= 0` check: an
/// error, so nothing is kept and the step is retried.
async fn reserve(
    tx: &mut PgConnection,
    ctx: &CommandContext<'_>,
    order: &OrderPayload,
) -> Result<Handled, HandlerError> {
    let (skus, quantities): (Vec<String>, Vec<i64>) = order.quantities().into_iter().unzip();
    let short = sqlx::query(
        "WITH want AS (
             SELECT sku, quantity FROM unnest($1::text[], $2::bigint[]) AS w(sku, quantity)
         ), short AS (
             SELECT w.sku, s.sku IS NULL AS unknown
             FROM want w LEFT JOIN stock s ON s.sku = w.sku
             WHERE s.sku IS NULL OR s.available < w.quantity
         ), taken AS (
             UPDATE stock s SET available = s.available - w.quantity
             FROM want w
             WHERE s.sku = w.sku AND NOT EXISTS (SELECT 1 FROM short)
             RETURNING s.sku, w.quantity
         ), booked AS (
             INSERT INTO reservations (order_id, saga_id, sku, quantity, status)
             SELECT $3, $4, sku, quantity, 'RESERVED' FROM taken
         )
         SELECT sku, unknown FROM short ORDER BY sku LIMIT 1",
    )
    .bind(&skus)
    .bind(&quantities)
    .bind(order.order_id)
    .bind(ctx.command.saga_id)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(match short {
        None => Handled::Success(json!({"reserved_lines": skus.len()})),
        Some(row) => {
            let sku: String = row.try_get("sku")?;
            let unknown: bool = row.try_get("unknown")?;
            Handled::BusinessFailure(if unknown {
                format!("unknown_sku: {sku}")
            } else {
                format!("insufficient_stock: {sku}")
            })
        }
    })
}

async fn release(tx: &mut PgConnection, order: &OrderPayload) -> Result<Handled, HandlerError> {
    let released = sqlx::query(
        "UPDATE reservations SET status = 'RELEASED', updated_at = now()
         WHERE order_id = $1 AND status = 'RESERVED' RETURNING sku, quantity",
    )
    .bind(order.order_id)
    .fetch_all(&mut *tx)
    .await?;
    let mut rows: Vec<(String, i64)> = released
        .iter()
        .map(|r| Ok((r.try_get("sku")?, r.try_get("quantity")?)))
        .collect::<Result<_, sqlx::Error>>()?;
    rows.sort();
    for (sku, quantity) in &rows {
        sqlx::query("UPDATE stock SET available = available + $2 WHERE sku = $1")
            .bind(sku)
            .bind(quantity)
            .execute(&mut *tx)
            .await?;
    }
    Ok(Handled::Success(json!({"released_lines": rows.len()})))
}
