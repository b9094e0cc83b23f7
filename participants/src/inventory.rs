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

async fn reserve(
    tx: &mut PgConnection,
    ctx: &CommandContext<'_>,
    order: &OrderPayload,
) -> Result<Handled, HandlerError> {
    // SKUs in sorted order: concurrent reservations lock rows in the same order.
    for (sku, quantity) in order.quantities() {
        let taken = sqlx::query("UPDATE stock SET available = available - $2 WHERE sku = $1 AND available >= $2")
            .bind(&sku)
            .bind(quantity)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if taken == 0 {
            let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM stock WHERE sku = $1)")
                .bind(&sku)
                .fetch_one(&mut *tx)
                .await?;
            // The runtime rolls back the lines already taken.
            return Ok(Handled::BusinessFailure(if exists {
                format!("insufficient_stock: {sku}")
            } else {
                format!("unknown_sku: {sku}")
            }));
        }
        sqlx::query(
            "INSERT INTO reservations (order_id, saga_id, sku, quantity, status) VALUES ($1, $2, $3, $4, 'RESERVED')",
        )
        .bind(order.order_id)
        .bind(ctx.command.saga_id)
        .bind(&sku)
        .bind(quantity)
        .execute(&mut *tx)
        .await?;
    }
    Ok(Handled::Success(json!({"reserved_lines": order.quantities().len()})))
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
