//! Poison detection by redelivery count, kept in PostgreSQL so that it
//! survives a message that crashes its consumer every time.

use sqlx::PgPool;

/// Records one more redelivery of `message_id` and returns how many there were.
pub async fn count(pool: &PgPool, message_id: &str) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO redeliveries (message_id, count) VALUES ($1, 1)
         ON CONFLICT (message_id) DO UPDATE SET count = redeliveries.count + 1, last_at = now()
         RETURNING count",
    )
    .bind(message_id)
    .fetch_one(pool)
    .await
}

/// Whether a delivery has been redelivered more than `limit` times. Errors
/// count as "no": the message is then processed (and fails) as usual.
pub async fn exceeded(pool: &PgPool, delivery: &lapin::message::Delivery, limit: i32) -> Option<i32> {
    if !delivery.redelivered {
        return None;
    }
    let id = delivery.properties.message_id().as_ref()?.as_str().to_owned();
    match count(pool, &id).await {
        Ok(n) if n > limit => Some(n),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot count redeliveries");
            None
        }
    }
}
