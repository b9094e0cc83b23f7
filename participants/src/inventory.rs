//! The `inventory` participant: reserves and releases stock.

use std::collections::HashSet;
use std::future::Future;

use serde_json::json;
use sqlx::{PgConnection, Row};

use crate::payload::{self, OrderPayload};
use crate::runtime::{CommandContext, Handled, Handler, HandlerError};

pub struct InventoryParticipant;

impl Handler for InventoryParticipant {
    fn participant(&self) -> &'static str {
        "inventory"
    }

    fn all_or_nothing(&self, message_type: &str) -> bool {
        matches!(message_type, "ReserveStock" | "ReleaseStock")
    }

    /// Reservations of this saga's order: the reservation ran.
    #[allow(clippy::manual_async_fn)]
    fn action_took_effect<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        ctx: &'a CommandContext<'a>,
    ) -> impl Future<Output = Result<bool, HandlerError>> + Send + 'a {
        payload::order_rows_exist(tx, ctx, payload::OrderTable::Reservations)
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

    #[allow(clippy::manual_async_fn)]
    fn handle_many<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        ctxs: &'a [CommandContext<'a>],
    ) -> impl Future<Output = Result<Option<Vec<Handled>>, HandlerError>> + Send + 'a {
        async move {
            match ctxs.first().map(|c| c.message_type) {
                Some("ReserveStock") => reserve_many(tx, ctxs).await.map(Some),
                Some("ReleaseStock") => release_many(tx, ctxs).await.map(Some),
                _ => Ok(None),
            }
        }
    }
}

/// [`reserve`] for many orders: one statement for orders that share no
/// SKU (each is then all or nothing on its own); an order that shares a
/// SKU with one before it follows on its own, seeing the stock left.
async fn reserve_many(tx: &mut PgConnection, ctxs: &[CommandContext<'_>]) -> Result<Vec<Handled>, HandlerError> {
    let orders = payload::payloads(ctxs)?;
    let wants: Vec<Vec<(String, i64)>> = orders.iter().map(OrderPayload::quantities).collect();
    let mut skus_taken: HashSet<&str> = HashSet::new();
    let (disjoint, later): (Vec<usize>, Vec<usize>) = (0..orders.len()).partition(|&i| {
        let free = wants[i].iter().all(|(sku, _)| !skus_taken.contains(sku.as_str()));
        if free {
            skus_taken.extend(wants[i].iter().map(|(sku, _)| sku.as_str()));
        }
        free
    });
    let (mut line_pos, mut line_skus, mut line_quantities) = (Vec::new(), Vec::new(), Vec::new());
    for &i in &disjoint {
        for (sku, quantity) in &wants[i] {
            line_pos.push(i as i32);
            line_skus.push(sku.as_str());
            line_quantities.push(*quantity);
        }
    }
    let short = sqlx::query(
        "WITH want AS (
             SELECT * FROM unnest($1::int4[], $2::text[], $3::bigint[]) AS w(pos, sku, quantity)
         ), ords AS (
             SELECT * FROM unnest($4::int4[], $5::uuid[], $6::uuid[]) AS o(pos, order_id, saga_id)
         ), short AS (
             SELECT w.pos, w.sku, s.sku IS NULL AS unknown
             FROM want w LEFT JOIN stock s ON s.sku = w.sku
             WHERE s.sku IS NULL OR s.available < w.quantity
         ), taken AS (
             UPDATE stock s SET available = s.available - w.quantity
             FROM want w
             WHERE s.sku = w.sku AND w.pos NOT IN (SELECT pos FROM short)
             RETURNING w.pos, s.sku, w.quantity
         ), booked AS (
             INSERT INTO reservations (order_id, saga_id, sku, quantity, status)
             SELECT o.order_id, o.saga_id, t.sku, t.quantity, 'RESERVED' FROM taken t JOIN ords o ON o.pos = t.pos
         )
         SELECT DISTINCT ON (pos) pos, sku, unknown FROM short ORDER BY pos, sku",
    )
    .bind(line_pos)
    .bind(line_skus)
    .bind(line_quantities)
    .bind(disjoint.iter().map(|&i| i as i32).collect::<Vec<_>>())
    .bind(disjoint.iter().map(|&i| orders[i].order_id).collect::<Vec<_>>())
    .bind(disjoint.iter().map(|&i| ctxs[i].command.saga_id).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    let mut outcomes: Vec<Option<Handled>> = (0..orders.len()).map(|_| None).collect();
    for &i in &disjoint {
        outcomes[i] = Some(reserved(wants[i].len()));
    }
    for row in short {
        let pos = usize::try_from(row.try_get::<i32, _>("pos")?).unwrap_or(usize::MAX);
        if let Some(slot) = outcomes.get_mut(pos) {
            *slot = Some(refused(row.try_get("sku")?, row.try_get("unknown")?));
        }
    }
    for i in later {
        outcomes[i] = Some(reserve(tx, &ctxs[i], &orders[i]).await?);
    }
    payload::every_outcome(outcomes, "a reservation")
}

fn reserved(lines: usize) -> Handled {
    Handled::Success(json!({"reserved_lines": lines}))
}

fn refused(sku: String, unknown: bool) -> Handled {
    Handled::BusinessFailure(if unknown {
        format!("unknown_sku: {sku}")
    } else {
        format!("insufficient_stock: {sku}")
    })
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
        None => reserved(skus.len()),
        Some(row) => refused(row.try_get("sku")?, row.try_get("unknown")?),
    })
}

/// [`release`] for many orders in one statement: each SKU gets back the
/// sum of what the batch's orders had reserved of it.
async fn release_many(tx: &mut PgConnection, ctxs: &[CommandContext<'_>]) -> Result<Vec<Handled>, HandlerError> {
    payload::undo_many(
        tx,
        ctxs,
        "WITH released AS (
             UPDATE reservations SET status = 'RELEASED', updated_at = now()
             WHERE order_id = ANY($1) AND status = 'RESERVED'
             RETURNING order_id, sku, quantity
         ), restocked AS (
             UPDATE stock s SET available = s.available + r.quantity
             FROM (SELECT sku, sum(quantity)::int8 AS quantity FROM released GROUP BY sku) r
             WHERE s.sku = r.sku
         )
         SELECT order_id, count(*) AS n FROM released GROUP BY order_id",
        "released_lines",
    )
    .await
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
