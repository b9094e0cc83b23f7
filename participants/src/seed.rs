//! Seeding accounts and stock (demo, tests). Additive: seeding an existing
//! customer or SKU again adds to both its current and its initial amount,
//! so the conservation invariants (initial = current + held) keep holding
//! however many times and however concurrently it runs.

use sqlx::PgPool;

/// Adds `amount` cents to each customer's balance and initial balance,
/// creating missing accounts. Duplicate customers in `accounts` are summed.
pub async fn seed_accounts(pool: &PgPool, accounts: &[(String, i64)]) -> Result<(), sqlx::Error> {
    if accounts.is_empty() {
        return Ok(());
    }
    let (ids, amounts): (Vec<String>, Vec<i64>) = accounts.iter().cloned().unzip();
    // Grouped (one row per key: ON CONFLICT may touch a row only once) and
    // sorted (concurrent seeds lock rows in the same order: no deadlock).
    sqlx::query(
        "INSERT INTO accounts (customer_id, balance_cents, initial_balance_cents)
         SELECT id, sum(amount)::bigint, sum(amount)::bigint
         FROM UNNEST($1::text[], $2::bigint[]) AS t(id, amount)
         GROUP BY id ORDER BY id
         ON CONFLICT (customer_id) DO UPDATE SET
             balance_cents = accounts.balance_cents + EXCLUDED.balance_cents,
             initial_balance_cents = accounts.initial_balance_cents + EXCLUDED.initial_balance_cents",
    )
    .bind(ids)
    .bind(amounts)
    .execute(pool)
    .await?;
    Ok(())
}

/// Adds `quantity` to each SKU's available and initial stock, creating
/// missing SKUs. Duplicate SKUs in `stock` are summed.
pub async fn seed_stock(pool: &PgPool, stock: &[(String, i64)]) -> Result<(), sqlx::Error> {
    if stock.is_empty() {
        return Ok(());
    }
    let (skus, quantities): (Vec<String>, Vec<i64>) = stock.iter().cloned().unzip();
    sqlx::query(
        "INSERT INTO stock (sku, available, initial_available)
         SELECT sku, sum(quantity)::bigint, sum(quantity)::bigint
         FROM UNNEST($1::text[], $2::bigint[]) AS t(sku, quantity)
         GROUP BY sku ORDER BY sku
         ON CONFLICT (sku) DO UPDATE SET
             available = stock.available + EXCLUDED.available,
             initial_available = stock.initial_available + EXCLUDED.initial_available",
    )
    .bind(skus)
    .bind(quantities)
    .execute(pool)
    .await?;
    Ok(())
}
