//! The `payment` participant: charges and refunds customer balances.

use std::collections::HashSet;
use std::future::Future;

use serde_json::json;
use sqlx::{PgConnection, Row};

use crate::payload::{self, OrderPayload};
use crate::runtime::{CommandContext, Handled, Handler, HandlerError};

pub struct PaymentParticipant;

impl Handler for PaymentParticipant {
    fn participant(&self) -> &'static str {
        "payment"
    }

    fn all_or_nothing(&self, message_type: &str) -> bool {
        matches!(message_type, "ChargePayment" | "RefundPayment")
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
                "ChargePayment" => charge(tx, ctx, &order).await,
                "RefundPayment" => refund(tx, &order).await,
                other => Err(HandlerError::UnknownType(other.to_owned())),
            }
        }
    }

    /// A payment row of this saga's order: the charge ran.
    #[allow(clippy::manual_async_fn)]
    fn action_took_effect<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        ctx: &'a CommandContext<'a>,
    ) -> impl Future<Output = Result<bool, HandlerError>> + Send + 'a {
        payload::order_rows_exist(tx, ctx, payload::OrderTable::Payments)
    }

    #[allow(clippy::manual_async_fn)]
    fn handle_many<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        ctxs: &'a [CommandContext<'a>],
    ) -> impl Future<Output = Result<Option<Vec<Handled>>, HandlerError>> + Send + 'a {
        async move {
            match ctxs.first().map(|c| c.message_type) {
                Some("ChargePayment") => charge_many(tx, ctxs).await.map(Some),
                Some("RefundPayment") => refund_many(tx, ctxs).await.map(Some),
                _ => Ok(None),
            }
        }
    }
}

/// [`charge`] for many orders: one statement for the first charge of each
/// customer; a customer's later charges follow one by one, each seeing the
/// balance the one before left.
async fn charge_many(tx: &mut PgConnection, ctxs: &[CommandContext<'_>]) -> Result<Vec<Handled>, HandlerError> {
    let orders = payload::payloads(ctxs)?;
    let mut customers = HashSet::new();
    let (first, later): (Vec<usize>, Vec<usize>) =
        (0..orders.len()).partition(|&i| customers.insert(orders[i].customer_id.as_str()));
    let rows = sqlx::query(
        "WITH input AS (
             SELECT * FROM unnest($1::int4[], $2::text[], $3::int8[], $4::uuid[], $5::uuid[], $6::text[])
                 AS i(pos, customer_id, amount, order_id, saga_id, currency)
         ), debit AS (
             UPDATE accounts a SET balance_cents = a.balance_cents - i.amount
             FROM input i
             WHERE a.customer_id = i.customer_id AND a.balance_cents >= i.amount
             RETURNING i.pos
         ), paid AS (
             INSERT INTO payments (order_id, saga_id, customer_id, amount_cents, currency, status)
             SELECT i.order_id, i.saga_id, i.customer_id, i.amount, i.currency, 'CHARGED'
             FROM input i JOIN debit d ON d.pos = i.pos
         )
         SELECT i.pos, d.pos IS NOT NULL AS charged,
                EXISTS (SELECT 1 FROM accounts a WHERE a.customer_id = i.customer_id) AS known
         FROM input i LEFT JOIN debit d ON d.pos = i.pos",
    )
    .bind(first.iter().map(|&i| i as i32).collect::<Vec<_>>())
    .bind(
        first
            .iter()
            .map(|&i| orders[i].customer_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(first.iter().map(|&i| orders[i].total_cents).collect::<Vec<_>>())
    .bind(first.iter().map(|&i| orders[i].order_id).collect::<Vec<_>>())
    .bind(first.iter().map(|&i| ctxs[i].command.saga_id).collect::<Vec<_>>())
    .bind(first.iter().map(|&i| orders[i].currency.as_str()).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    let mut outcomes: Vec<Option<Handled>> = (0..orders.len()).map(|_| None).collect();
    for row in rows {
        let pos = usize::try_from(row.try_get::<i32, _>("pos")?).unwrap_or(usize::MAX);
        let (charged, known): (bool, bool) = (row.try_get("charged")?, row.try_get("known")?);
        if let (Some(slot), Some(order)) = (outcomes.get_mut(pos), orders.get(pos)) {
            *slot = Some(charge_outcome(charged, known, order));
        }
    }
    for i in later {
        outcomes[i] = Some(charge(tx, &ctxs[i], &orders[i]).await?);
    }
    payload::every_outcome(outcomes, "a charge")
}

fn charge_outcome(charged: bool, known: bool, order: &OrderPayload) -> Handled {
    match (charged, known) {
        (true, _) => Handled::Success(json!({"charged_cents": order.total_cents})),
        (false, true) => Handled::BusinessFailure("insufficient_balance".to_owned()),
        (false, false) => Handled::BusinessFailure("unknown_customer".to_owned()),
    }
}

/// Debits the balance and records the payment in one statement; on a
/// refusal nothing is written.
async fn charge(
    tx: &mut PgConnection,
    ctx: &CommandContext<'_>,
    order: &OrderPayload,
) -> Result<Handled, HandlerError> {
    let charged = sqlx::query(
        "WITH debit AS (
             UPDATE accounts SET balance_cents = balance_cents - $2
             WHERE customer_id = $1 AND balance_cents >= $2
             RETURNING customer_id
         )
         INSERT INTO payments (order_id, saga_id, customer_id, amount_cents, currency, status)
         SELECT $3, $4, customer_id, $2, $5, 'CHARGED' FROM debit",
    )
    .bind(&order.customer_id)
    .bind(order.total_cents)
    .bind(order.order_id)
    .bind(ctx.command.saga_id)
    .bind(&order.currency)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if charged == 1 {
        return Ok(charge_outcome(true, true, order));
    }
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE customer_id = $1)")
        .bind(&order.customer_id)
        .fetch_one(&mut *tx)
        .await?;
    Ok(charge_outcome(false, exists, order))
}

/// [`refund`] for many orders in one statement: each customer is credited
/// the sum of their refunds.
async fn refund_many(tx: &mut PgConnection, ctxs: &[CommandContext<'_>]) -> Result<Vec<Handled>, HandlerError> {
    payload::undo_many(
        tx,
        ctxs,
        "WITH refunded AS (
             UPDATE payments SET status = 'REFUNDED', updated_at = now()
             WHERE order_id = ANY($1) AND status = 'CHARGED'
             RETURNING order_id, customer_id, amount_cents
         ), credited AS (
             UPDATE accounts a SET balance_cents = a.balance_cents + r.total
             FROM (SELECT customer_id, sum(amount_cents)::int8 AS total FROM refunded GROUP BY customer_id) r
             WHERE a.customer_id = r.customer_id
         )
         SELECT order_id, sum(amount_cents)::int8 AS n FROM refunded GROUP BY order_id",
        "refunded_cents",
    )
    .await
}

async fn refund(tx: &mut PgConnection, order: &OrderPayload) -> Result<Handled, HandlerError> {
    let refunded = sqlx::query(
        "UPDATE payments SET status = 'REFUNDED', updated_at = now()
         WHERE order_id = $1 AND status = 'CHARGED' RETURNING customer_id, amount_cents",
    )
    .bind(order.order_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = refunded else {
        return Ok(Handled::Success(json!({"refunded_cents": 0})));
    };
    let customer: String = row.try_get("customer_id")?;
    let amount: i64 = row.try_get("amount_cents")?;
    sqlx::query("UPDATE accounts SET balance_cents = balance_cents + $2 WHERE customer_id = $1")
        .bind(&customer)
        .bind(amount)
        .execute(&mut *tx)
        .await?;
    Ok(Handled::Success(json!({"refunded_cents": amount})))
}
