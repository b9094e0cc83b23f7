//! The `order` participant: orders in `ORDER_SHARDS` shard tables
//! (`orders_00` ..), every mutation under a Redis lock with a fencing token.
//!
//! Shard map (stable, documented in the README): shard = FNV-1a 64 of the
//! order id's 16 bytes, modulo the shard count; with several orders
//! databases (`ORDERS_DATABASE_URLS`), shard `s` lives in database
//! `s mod n`, together with the inbox and outbox rows of the commands on its
//! orders, so each command is still one local transaction. Counts are
//! recorded in `order_shards` at first start; a restart with others is refused.

use std::collections::HashSet;
use std::future::Future;

use serde_json::json;
use skald_wire::contract::CommandEnvelope;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::payload::OrderPayload;
use crate::runtime::{CommandContext, Handled, Handler, HandlerError};

/// Routes order ids to shard tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardMap {
    shards: u32,
    databases: u32,
}

impl ShardMap {
    /// All shards in one database.
    pub fn new(shards: u32) -> Result<Self, String> {
        Self::spread(shards, 1)
    }

    /// `shards` shards over `databases` databases (shard s in database s mod n).
    pub fn spread(shards: u32, databases: u32) -> Result<Self, String> {
        if !(1..=100).contains(&shards) {
            return Err(format!("ORDER_SHARDS must be between 1 and 100, not {shards}"));
        }
        if !(1..=shards).contains(&databases) {
            return Err(format!(
                "{databases} orders databases for {shards} shards: need 1 to {shards}"
            ));
        }
        Ok(Self { shards, databases })
    }

    pub fn databases(&self) -> u32 {
        self.databases
    }

    /// The index (in the orders database list) of the database holding `order_id`.
    pub fn database_of(&self, order_id: Uuid) -> usize {
        (self.shard_of(order_id) % self.databases) as usize
    }

    /// The shard tables that live in database `index`.
    pub fn tables_in(&self, index: usize) -> Vec<String> {
        (0..self.shards)
            .filter(|s| (s % self.databases) as usize == index)
            .map(table_name)
            .collect()
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn shard_of(&self, order_id: Uuid) -> u32 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in order_id.as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        (h % u64::from(self.shards)) as u32
    }

    pub fn table(&self, order_id: Uuid) -> String {
        table_name(self.shard_of(order_id))
    }

    pub fn tables(&self) -> Vec<String> {
        (0..self.shards).map(table_name).collect()
    }

    /// Creates the shard tables of database `index` if missing and checks
    /// the recorded layout. Instances starting together serialize on an
    /// advisory lock (concurrent `CREATE TABLE IF NOT EXISTS` can fail).
    pub async fn prepare(&self, pool: &PgPool, index: usize) -> Result<(), String> {
        let db = |e: sqlx::Error| format!("preparing order shards: {e}");
        let mut tx = pool.begin().await.map_err(db)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('skald.order_shards'))")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let recorded: (i32, i32, i32) = sqlx::query_as(
            "INSERT INTO order_shards (shards, databases, database_index) VALUES ($1, $2, $3)
             ON CONFLICT (singleton) DO UPDATE SET shards = order_shards.shards
             RETURNING shards, databases, database_index",
        )
        .bind(self.shards as i32)
        .bind(self.databases as i32)
        .bind(index as i32)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let wanted = (self.shards as i32, self.databases as i32, index as i32);
        if recorded != wanted {
            return Err(format!(
                "this orders database holds shards for ORDER_SHARDS={}, {} database(s), position {}; \
                 refusing to start as ORDER_SHARDS={}, {} database(s), position {}",
                recorded.0, recorded.1, recorded.2, wanted.0, wanted.1, wanted.2
            ));
        }
        for t in self.tables_in(index) {
            sqlx::query(AssertSqlSafe(format!(
                "CREATE TABLE IF NOT EXISTS {t} (LIKE orders_template INCLUDING ALL)"
            )))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(())
    }
}

/// An order's lines as its row stores them.
fn items_json(order: &OrderPayload) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::to_value(
        order
            .items
            .iter()
            .map(|l| json!({"sku": l.sku, "quantity": l.quantity, "unit_price_cents": l.unit_price_cents}))
            .collect::<Vec<_>>(),
    )
}

fn table_name(shard: u32) -> String {
    format!("orders_{shard:02}")
}

/// Order rows: every write carries a fencing token and is refused if the
/// row already holds a token at least as new.
#[derive(Debug, Clone, Copy)]
pub struct OrderStore {
    pub shards: ShardMap,
}

impl OrderStore {
    pub async fn insert(
        &self,
        tx: &mut PgConnection,
        saga_id: Uuid,
        order: &OrderPayload,
        fence: i64,
    ) -> Result<(), HandlerError> {
        let sql = format!(
            "INSERT INTO {} (id, saga_id, customer_id, currency, status, total_cents, items, fence)
             VALUES ($1, $2, $3, $4, 'PENDING', $5, $6, $7) ON CONFLICT (id) DO NOTHING",
            self.shards.table(order.order_id)
        );
        let items = items_json(order)?;
        sqlx::query(AssertSqlSafe(sql))
            .bind(order.order_id)
            .bind(saga_id)
            .bind(&order.customer_id)
            .bind(&order.currency)
            .bind(order.total_cents)
            .bind(items)
            .bind(fence)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// [`Self::insert`] for many orders (of one database), in one
    /// statement whatever their shard tables.
    pub async fn insert_many(
        &self,
        tx: &mut PgConnection,
        orders: &[(Uuid, &OrderPayload, i64)],
    ) -> Result<(), HandlerError> {
        let tables = self.tables_of(orders.iter().map(|(_, o, _)| o.order_id));
        let mut sql = String::from(
            "WITH i AS (
                 SELECT * FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::int8[],
                                      $7::jsonb[], $8::int8[])
                     AS i(tbl, id, saga_id, customer_id, currency, total_cents, items, fence))",
        );
        for (n, table) in self
            .tables_with(orders.first().map(|(_, o, _)| o.order_id))
            .iter()
            .enumerate()
        {
            sql.push_str(&format!(
                ", t{n} AS (
                 INSERT INTO {table} (id, saga_id, customer_id, currency, status, total_cents, items, fence)
                 SELECT id, saga_id, customer_id, currency, 'PENDING', total_cents, items, fence
                 FROM i WHERE tbl = '{table}'
                 ON CONFLICT (id) DO NOTHING)"
            ));
        }
        sql.push_str(" SELECT 1");
        sqlx::query(AssertSqlSafe(sql))
            .bind(&tables)
            .bind(orders.iter().map(|(_, o, _)| o.order_id).collect::<Vec<_>>())
            .bind(orders.iter().map(|(saga, _, _)| *saga).collect::<Vec<_>>())
            .bind(
                orders
                    .iter()
                    .map(|(_, o, _)| o.customer_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(orders.iter().map(|(_, o, _)| o.currency.as_str()).collect::<Vec<_>>())
            .bind(orders.iter().map(|(_, o, _)| o.total_cents).collect::<Vec<_>>())
            .bind(
                orders
                    .iter()
                    .map(|(_, o, _)| items_json(o))
                    .collect::<Result<Vec<_>, _>>()?,
            )
            .bind(orders.iter().map(|(_, _, fence)| *fence).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// [`Self::approve`] for many orders (of one database), in one
    /// statement whatever their shard tables; an order it did not approve goes through
    /// [`Self::approve`] for its reason.
    pub async fn approve_many(
        &self,
        tx: &mut PgConnection,
        orders: &[(Uuid, i64)],
    ) -> Result<Vec<Approval>, HandlerError> {
        let approved = self.set_status_many(tx, orders, "APPROVED", Some("PENDING")).await?;
        let mut outcomes = Vec::with_capacity(orders.len());
        for &(id, fence) in orders {
            outcomes.push(if approved.contains(&id) {
                Approval::Approved
            } else {
                self.approve(tx, id, fence).await?
            });
        }
        Ok(outcomes)
    }

    /// [`Self::set_status`] for many orders (of one database), in one
    /// statement whatever their shard tables; an order it did not update
    /// goes through [`Self::set_status`] for its reason.
    pub async fn cancel_many(&self, tx: &mut PgConnection, orders: &[(Uuid, i64)]) -> Result<(), HandlerError> {
        let cancelled = self.set_status_many(tx, orders, "CANCELLED", None).await?;
        for &(id, fence) in orders {
            if !cancelled.contains(&id) {
                self.set_status(tx, id, "CANCELLED", fence).await?;
            }
        }
        Ok(())
    }

    /// Sets `status` on each order (from `from` only, if given) whose
    /// fence is older than the one given; returns the ids it updated.
    async fn set_status_many(
        &self,
        tx: &mut PgConnection,
        orders: &[(Uuid, i64)],
        status: &'static str,
        from: Option<&'static str>,
    ) -> Result<HashSet<Uuid>, HandlerError> {
        let tables = self.tables_of(orders.iter().map(|(id, _)| *id));
        let only_from = from.map(|f| format!(" AND o.status = '{f}'")).unwrap_or_default();
        let mut sql =
            String::from("WITH u AS (SELECT * FROM unnest($1::text[], $2::uuid[], $3::int8[]) AS u(tbl, id, fence))");
        let mut updated_ids = Vec::new();
        for (n, table) in self.tables_with(orders.first().map(|(id, _)| *id)).iter().enumerate() {
            sql.push_str(&format!(
                ", t{n} AS (
                 UPDATE {table} AS o SET status = '{status}', fence = u.fence, updated_at = now()
                 FROM u WHERE u.tbl = '{table}' AND o.id = u.id{only_from} AND o.fence < u.fence
                 RETURNING o.id)"
            ));
            updated_ids.push(format!("SELECT id FROM t{n}"));
        }
        sql.push(' ');
        sql.push_str(&updated_ids.join(" UNION ALL "));
        Ok(sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(&tables)
            .bind(orders.iter().map(|(id, _)| *id).collect::<Vec<_>>())
            .bind(orders.iter().map(|(_, fence)| *fence).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect())
    }

    /// Every shard table in the database of `order_id`. A statement over
    /// all of them has the same text for every batch, so its prepared form
    /// (and plan) is reused; one over the tables a batch touches would be
    /// new text nearly every time (measured with 16 shards: 5-10 ms each).
    fn tables_with(&self, order_id: Option<Uuid>) -> Vec<String> {
        order_id.map_or_else(Vec::new, |id| self.shards.tables_in(self.shards.database_of(id)))
    }

    /// The shard table of each order.
    fn tables_of(&self, ids: impl Iterator<Item = Uuid>) -> Vec<String> {
        ids.map(|id| self.shards.table(id)).collect()
    }

    /// Status and fence of an order, locking the row.
    pub async fn get_for_update(&self, tx: &mut PgConnection, id: Uuid) -> Result<Option<(String, i64)>, HandlerError> {
        let sql = format!(
            "SELECT status, fence FROM {} WHERE id = $1 FOR UPDATE",
            self.shards.table(id)
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        Ok(match row {
            Some(r) => Some((r.try_get("status")?, r.try_get("fence")?)),
            None => None,
        })
    }

    /// Sets the status if `fence` is newer than the row's; refuses otherwise.
    /// Returns false if there is no such order.
    pub async fn set_status(
        &self,
        tx: &mut PgConnection,
        id: Uuid,
        status: &str,
        fence: i64,
    ) -> Result<bool, HandlerError> {
        let sql = format!(
            "UPDATE {} SET status = $2, fence = $3, updated_at = now() WHERE id = $1 AND fence < $3",
            self.shards.table(id)
        );
        let n = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .bind(status)
            .bind(fence)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 1 {
            return Ok(true);
        }
        match self.get_for_update(tx, id).await? {
            Some((_, stored)) => {
                skald_wire::metrics::fencing_rejected("order");
                Err(HandlerError::StaleFence { given: fence, stored })
            }
            None => Ok(false),
        }
    }

    /// PENDING -> APPROVED in one statement when the fence is newer; else
    /// says why not (and writes nothing).
    pub async fn approve(&self, tx: &mut PgConnection, id: Uuid, fence: i64) -> Result<Approval, HandlerError> {
        let sql = format!(
            "UPDATE {} SET status = 'APPROVED', fence = $2, updated_at = now()
             WHERE id = $1 AND status = 'PENDING' AND fence < $2",
            self.shards.table(id)
        );
        let n = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .bind(fence)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 1 {
            return Ok(Approval::Approved);
        }
        match self.get_for_update(tx, id).await? {
            Some((status, _)) if status != "PENDING" => Ok(Approval::Refused(format!("order is {status}"))),
            Some((_, stored)) => {
                skald_wire::metrics::fencing_rejected("order");
                Err(HandlerError::StaleFence { given: fence, stored })
            }
            None => Ok(Approval::Refused("order not found".to_owned())),
        }
    }

    /// Status of an order (no lock), for tests and tools.
    pub async fn status(&self, pool: &PgPool, id: Uuid) -> Result<Option<(String, i64)>, sqlx::Error> {
        let sql = format!("SELECT status, fence FROM {} WHERE id = $1", self.shards.table(id));
        let row = sqlx::query(AssertSqlSafe(sql)).bind(id).fetch_optional(pool).await?;
        row.map(|r| Ok((r.try_get("status")?, r.try_get("fence")?))).transpose()
    }
}

/// What [`OrderStore::approve`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    Approved,
    Refused(String),
}

pub struct OrderParticipant {
    pub store: OrderStore,
}

impl Handler for OrderParticipant {
    fn participant(&self) -> &'static str {
        "order"
    }

    fn all_or_nothing(&self, message_type: &str) -> bool {
        matches!(message_type, "CreateOrder" | "ApproveOrder" | "CancelOrder")
    }

    fn lock_resource(&self, command: &CommandEnvelope) -> Result<Option<String>, HandlerError> {
        Ok(Some(format!("order:{}", order_id(command)?)))
    }

    fn partition(&self, command: &CommandEnvelope) -> Result<usize, HandlerError> {
        Ok(self.store.shards.database_of(order_id(command)?))
    }

    /// The order's row: the creation ran.
    #[allow(clippy::manual_async_fn)]
    fn action_took_effect<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        ctx: &'a CommandContext<'a>,
    ) -> impl Future<Output = Result<bool, HandlerError>> + Send + 'a {
        async move {
            let order = OrderPayload::parse(&ctx.command.payload)?;
            Ok(self.store.get_for_update(tx, order.order_id).await?.is_some())
        }
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
            let fence = ctx
                .fence
                .ok_or_else(|| HandlerError::BadPayload("order mutation without a lock".to_owned()))?;
            let id = order.order_id;
            match ctx.message_type {
                "CreateOrder" => {
                    self.store.insert(tx, ctx.command.saga_id, &order, fence).await?;
                    Ok(Handled::Success(json!({"order_id": id, "status": "PENDING"})))
                }
                "CancelOrder" => {
                    self.store.set_status(tx, id, "CANCELLED", fence).await?;
                    Ok(Handled::Success(json!({"order_id": id, "status": "CANCELLED"})))
                }
                "ApproveOrder" => match self.store.approve(tx, id, fence).await? {
                    Approval::Approved => Ok(Handled::Success(json!({"order_id": id, "status": "APPROVED"}))),
                    Approval::Refused(reason) => Ok(Handled::BusinessFailure(reason)),
                },
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
            let message_type = ctxs.first().map(|c| c.message_type);
            if !matches!(message_type, Some("CreateOrder" | "ApproveOrder" | "CancelOrder")) {
                return Ok(None);
            }
            let mut orders = Vec::with_capacity(ctxs.len());
            for c in ctxs {
                let fence = c
                    .fence
                    .ok_or_else(|| HandlerError::BadPayload("order mutation without a lock".to_owned()))?;
                orders.push((c.command.saga_id, OrderPayload::parse(&c.command.payload)?, fence));
            }
            let ids: Vec<(Uuid, i64)> = orders.iter().map(|(_, o, f)| (o.order_id, *f)).collect();
            let handled = if message_type == Some("CreateOrder") {
                let rows: Vec<(Uuid, &OrderPayload, i64)> = orders.iter().map(|(s, o, f)| (*s, o, *f)).collect();
                self.store.insert_many(tx, &rows).await?;
                ids.iter()
                    .map(|(id, _)| Handled::Success(json!({"order_id": id, "status": "PENDING"})))
                    .collect()
            } else if message_type == Some("CancelOrder") {
                self.store.cancel_many(tx, &ids).await?;
                ids.iter()
                    .map(|(id, _)| Handled::Success(json!({"order_id": id, "status": "CANCELLED"})))
                    .collect()
            } else {
                self.store
                    .approve_many(tx, &ids)
                    .await?
                    .into_iter()
                    .zip(&ids)
                    .map(|(a, (id, _))| match a {
                        Approval::Approved => Handled::Success(json!({"order_id": id, "status": "APPROVED"})),
                        Approval::Refused(reason) => Handled::BusinessFailure(reason),
                    })
                    .collect()
            };
            Ok(Some(handled))
        }
    }
}

fn order_id(command: &CommandEnvelope) -> Result<Uuid, HandlerError> {
    command
        .payload
        .get("order_id")
        .and_then(|v| v.as_str())
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| HandlerError::BadPayload("order_id missing or not a UUID".to_owned()))
}
