//! The `payment` participant: charges and refunds customer balances.

use std::future::Future;

use serde_json::json;
use sqlx::{PgConnection, Row};

use crate::payload::OrderPayload;
use crate::runtime::{CommandContext, Handled, Handler, HandlerError};

pub struct PaymentParticipant;

impl Handler for PaymentParticipant {
    fn participant(&self) -> &'static str {
        "payment"
    }

    fn all_or_nothing(&self, message_type: &str) -> bool {
        message_type == "ChargePayment"
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
        return Ok(Handled::Success(json!({"charged_cents": order.total_cents})));
    }
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE customer_id = $1)")
        .bind(&order.customer_id)
        .fetch_one(&mut *tx)
        .await?;
    Ok(Handled::BusinessFailure(
        if exists {
            "insufficient_balance"
        } else {
            "unknown_customer"
        }
        .to_owned(),
    ))
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
