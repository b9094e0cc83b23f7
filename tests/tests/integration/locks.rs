//! Redis locks on order rows and fencing tokens.

use std::sync::Arc;
use std::time::Duration;

use skald_participants::lock::{Error as LockError, Locks};
use skald_participants::order::OrderStore;
use skald_participants::payload::OrderPayload;
use skald_participants::runtime::HandlerError;
use skald_tests::{REDIS, Setup, TestEnv};
use sqlx::AssertSqlSafe;
use uuid::Uuid;

async fn locks(env: &TestEnv, ttl: Duration) -> Locks {
    let conn = skald_participants::lock::connect(REDIS).await.unwrap();
    Locks::new(conn, &env.names.redis_prefix(), ttl, Duration::from_secs(5))
}

fn payload(order_id: Uuid) -> OrderPayload {
    OrderPayload::parse(&serde_json::json!({
        "order_id": order_id, "customer_id": "c", "currency": "EUR",
        "items": [{"sku": "s", "quantity": 1, "unit_price_cents": 0}], "total_cents": 0
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mutations_of_one_order_serialize_through_the_lock() {
    let mut env = TestEnv::start(Setup {
        coordinator: false,
        participants: vec![],
        ..Setup::default()
    })
    .await;
    let locks = locks(&env, Duration::from_secs(5)).await;
    let store = OrderStore { shards: env.dbs.shards };
    let order_id = Uuid::now_v7();
    let resource = format!("order:{order_id}");
    let first = locks.acquire(&resource).await.unwrap();
    let mut tx = env.dbs.orders[0].begin().await.unwrap();
    store
        .insert(&mut tx, Uuid::now_v7(), &payload(order_id), first.fence)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // While it is held, nobody else gets it: a transient failure, never a lost write.
    let busy = locks.acquire_within(&resource, Duration::from_millis(150)).await;
    assert!(matches!(busy, Err(LockError::Timeout(..))), "{busy:?}");
    assert!(busy.unwrap_err().is_transient());
    assert!(locks.release(&first).await.unwrap());
    assert!(!locks.release(&first).await.unwrap(), "only the holder releases, once");

    // Two workers do read-modify-write on one row under the lock: no update is lost.
    let table = env.dbs.shards.table(order_id);
    let worker = |locks: Locks, pool: sqlx::PgPool, table: String| async move {
        for _ in 0..15 {
            let guard = locks.acquire(&format!("order:{order_id}")).await.unwrap();
            let total: i64 =
                sqlx::query_scalar(AssertSqlSafe(format!("SELECT total_cents FROM {table} WHERE id = $1")))
                    .bind(order_id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            tokio::task::yield_now().await;
            let n = sqlx::query(AssertSqlSafe(format!(
                "UPDATE {table} SET total_cents = $2, fence = $3 WHERE id = $1 AND fence < $3"
            )))
            .bind(order_id)
            .bind(total + 1)
            .bind(guard.fence)
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected();
            assert_eq!(n, 1, "a holder's write with a fresh token is accepted");
            locks.release(&guard).await.unwrap();
        }
    };
    let a = tokio::spawn(worker(locks.clone(), env.dbs.orders[0].clone(), table.clone()));
    let b = tokio::spawn(worker(locks.clone(), env.dbs.orders[0].clone(), table.clone()));
    a.await.unwrap();
    b.await.unwrap();
    let total: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT total_cents FROM {table} WHERE id = $1")))
        .bind(order_id)
        .fetch_one(&env.dbs.orders[0])
        .await
        .unwrap();
    assert_eq!(total, 30);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_with_a_stale_fencing_token_is_refused() {
    let mut env = TestEnv::start(Setup {
        coordinator: false,
        participants: vec![],
        ..Setup::default()
    })
    .await;
    let short = locks(&env, Duration::from_millis(100)).await;
    let store = OrderStore { shards: env.dbs.shards };
    let order_id = Uuid::now_v7();
    let resource = format!("order:{order_id}");

    let old = short.acquire(&resource).await.unwrap();
    let mut tx = env.dbs.orders[0].begin().await.unwrap();
    store
        .insert(&mut tx, Uuid::now_v7(), &payload(order_id), old.fence)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // The old holder stalls past its TTL; someone else takes the lock and writes.
    let new = Arc::new(
        skald_tests::eventually("lock expiry", Duration::from_secs(5), || {
            let short = short.clone();
            let resource = resource.clone();
            async move { short.acquire_within(&resource, Duration::from_millis(10)).await.ok() }
        })
        .await,
    );
    assert!(new.fence > old.fence, "tokens grow: {} then {}", old.fence, new.fence);
    assert!(
        !short.extend(&old, Duration::from_secs(1)).await.unwrap(),
        "an expired holder cannot extend"
    );
    assert!(short.extend(&new, Duration::from_secs(5)).await.unwrap());
    let mut tx = env.dbs.orders[0].begin().await.unwrap();
    assert!(
        store
            .set_status(&mut tx, order_id, "CANCELLED", new.fence)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();

    // The old holder wakes up and writes with its old token: refused.
    let mut tx = env.dbs.orders[0].begin().await.unwrap();
    let stale = store.set_status(&mut tx, order_id, "APPROVED", old.fence).await;
    assert!(
        matches!(stale, Err(HandlerError::StaleFence { given, stored }) if given == old.fence && stored == new.fence),
        "{stale:?}"
    );
    drop(tx);
    let (status, fence) = store.status(&env.dbs.orders[0], order_id).await.unwrap().unwrap();
    assert_eq!((status.as_str(), fence), ("CANCELLED", new.fence));
    env.stop().await;
}
