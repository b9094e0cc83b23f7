//! The retention jobs: finished sagas older than the retention age go, with
//! their order, idempotency keys, outbox rows and the participants' inbox
//! rows; recent, STUCK and running sagas and every business row stay.

use std::time::Duration;

use skald_coordinator::retention::{Deleted, Retention};
use skald_participants::retention::{Deleted as InboxDeleted, Retention as InboxRetention};
use skald_tests::{Setup, TestEnv, order, parse_uuid};
use sqlx::PgPool;
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(30);
/// The test's retention age; "old" rows are backdated to twice that.
const AGE: Duration = Duration::from_secs(3_600);

async fn count(pool: &PgPool, sql: &'static str, ids: &[Uuid]) -> i64 {
    sqlx::query_scalar(sql).bind(ids).fetch_one(pool).await.unwrap()
}

async fn exec(pool: &PgPool, sql: &'static str, ids: &[Uuid]) {
    sqlx::query(sql).bind(ids).execute(pool).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_old_finished_sagas_and_old_inbox_rows() {
    let mut env = TestEnv::start(Setup::default()).await;
    env.seed(&[("alice", 100_000), ("poor", 10)], &[("sku-1", 100)]).await;
    let keyed = env
        .post_order(&order("alice", &[("sku-1", 1, 100)]), Some("retention-old-key"))
        .await;
    assert_eq!(keyed.status(), 202);
    let v: serde_json::Value = keyed.json().await.unwrap();
    let (old_done_order, old_done) = (parse_uuid(&v["order_id"]), parse_uuid(&v["saga_id"]));
    let (_, old_compensated) = env.place_order(&order("poor", &[("sku-1", 1, 1_000)])).await;
    let keyed = env
        .post_order(&order("alice", &[("sku-1", 2, 100)]), Some("retention-recent-key"))
        .await;
    assert_eq!(keyed.status(), 202);
    let recent = parse_uuid(&keyed.json::<serde_json::Value>().await.unwrap()["saga_id"]);
    let (_, old_stuck) = env.place_order(&order("alice", &[("sku-1", 3, 100)])).await;
    let (_, old_running) = env.place_order(&order("alice", &[("sku-1", 4, 100)])).await;
    for (saga, status) in [
        (old_done, "COMPLETED"),
        (old_compensated, "COMPENSATED"),
        (recent, "COMPLETED"),
        (old_stuck, "COMPLETED"),
        (old_running, "COMPLETED"),
    ] {
        assert_eq!(env.wait_for_saga_final(saga, WITHIN).await["status"], status);
    }
    env.stop().await;

    let c = env.dbs.coordinator.clone();
    let old = [old_done, old_compensated];
    let kept = [recent, old_stuck, old_running];
    let all = [old_done, old_compensated, recent, old_stuck, old_running];
    // Old finished sagas; an old STUCK one; an old one still running (it was
    // finished, but its status says otherwise: only the status counts).
    exec(
        &c,
        "UPDATE sagas SET finished_at = now() - interval '2 hours' WHERE id = ANY($1)",
        &old,
    )
    .await;
    exec(
        &c,
        "UPDATE sagas SET status = 'STUCK', finished_at = now() - interval '2 hours' WHERE id = ANY($1)",
        &[old_stuck],
    )
    .await;
    exec(
        &c,
        "UPDATE sagas SET status = 'RUNNING', wake_at = NULL, finished_at = now() - interval '2 hours'
         WHERE id = ANY($1)",
        &[old_running],
    )
    .await;
    // Leftover outbox rows, and redelivery counts old and recent.
    exec(
        &c,
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, correlation_id, body)
         SELECT gen_random_uuid(), 'x', 'y', 'Z', id, '\\x00' FROM unnest($1::uuid[]) AS id",
        &[old_done, recent],
    )
    .await;
    exec(
        &c,
        "INSERT INTO redeliveries (message_id, count, last_at) VALUES
         ('old-' || ($1::uuid[])[1], 2, now() - interval '2 hours'), ('recent', 2, now())",
        &[old_done],
    )
    .await;
    let keys_before = count(
        &c,
        "SELECT count(*) FROM idempotency_keys WHERE saga_id = ANY($1)",
        &all,
    )
    .await;
    assert_eq!(keys_before, 2);

    // Participants: backdate the inbox rows of the two old finished sagas.
    let participant_dbs: Vec<PgPool> = [env.dbs.payments.clone(), env.dbs.inventory.clone()]
        .into_iter()
        .chain(env.dbs.orders.iter().cloned())
        .collect();
    let mut old_inbox = 0;
    let mut kept_inbox = Vec::new();
    for db in &participant_dbs {
        exec(
            db,
            "UPDATE inbox SET created_at = now() - interval '2 hours' WHERE saga_id = ANY($1)",
            &old,
        )
        .await;
        exec(
            db,
            "INSERT INTO redeliveries (message_id, count, last_at) VALUES
             ('old-' || ($1::uuid[])[1], 2, now() - interval '2 hours'), ('recent', 2, now())",
            &[old_done],
        )
        .await;
        old_inbox += count(db, "SELECT count(*) FROM inbox WHERE saga_id = ANY($1)", &old).await;
        kept_inbox.push(count(db, "SELECT count(*) FROM inbox WHERE saga_id = ANY($1)", &kept).await);
    }
    assert!(old_inbox >= 5, "the old sagas left inbox rows: {old_inbox}");
    let business = |db: &PgPool| {
        let db = db.clone();
        async move {
            let mut n = 0i64;
            for table in ["payments", "accounts", "reservations", "stock"] {
                let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                    .bind(table)
                    .fetch_one(&db)
                    .await
                    .unwrap();
                if exists {
                    n += sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                        .fetch_one(&db)
                        .await
                        .unwrap();
                }
            }
            n
        }
    };
    let business_before = (business(&env.dbs.payments).await, business(&env.dbs.inventory).await);

    let job = Retention {
        pool: c.clone(),
        interval: Duration::from_secs(60),
        age: AGE,
        batch: 1, // one saga per transaction: the loop must go on while batches are full
    };
    let first = job.run_once().await.unwrap();
    assert_eq!(
        first,
        Deleted {
            sagas: 2,
            orders: 2,
            idempotency_keys: 1,
            outbox: 1,
            redeliveries: 1,
        }
    );
    assert_eq!(job.run_once().await.unwrap(), Deleted::default(), "idempotent");
    let remaining: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM sagas WHERE id = ANY($1) ORDER BY id")
        .bind(&all[..])
        .fetch_all(&c)
        .await
        .unwrap();
    let mut expected = kept.to_vec();
    expected.sort();
    assert_eq!(remaining, expected);
    assert_eq!(
        count(&c, "SELECT count(*) FROM orders WHERE saga_id = ANY($1)", &old).await,
        0
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM orders WHERE saga_id = ANY($1)", &kept).await,
        3
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM idempotency_keys WHERE saga_id = ANY($1)",
            &old
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM idempotency_keys WHERE saga_id = ANY($1)",
            &[recent]
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM outbox WHERE correlation_id = ANY($1)",
            &[recent]
        )
        .await,
        1
    );
    let redeliveries: Vec<String> = sqlx::query_scalar("SELECT message_id FROM redeliveries")
        .fetch_all(&c)
        .await
        .unwrap();
    assert_eq!(redeliveries, ["recent"]);

    let mut inbox_deleted = 0;
    for (db, kept_before) in participant_dbs.iter().zip(&kept_inbox) {
        let job = InboxRetention {
            pool: db.clone(),
            participant: "test".to_owned(),
            database: 0,
            interval: Duration::from_secs(60),
            age: AGE,
            batch: 2,
        };
        let d = job.run_once().await.unwrap();
        assert_eq!(d.redeliveries, 1);
        inbox_deleted += d.inbox as i64;
        assert_eq!(job.run_once().await.unwrap(), InboxDeleted::default(), "idempotent");
        assert_eq!(
            count(db, "SELECT count(*) FROM inbox WHERE saga_id = ANY($1)", &old).await,
            0
        );
        assert_eq!(
            count(db, "SELECT count(*) FROM inbox WHERE saga_id = ANY($1)", &kept).await,
            *kept_before
        );
        let redeliveries: Vec<String> = sqlx::query_scalar("SELECT message_id FROM redeliveries")
            .fetch_all(db)
            .await
            .unwrap();
        assert_eq!(redeliveries, ["recent"]);
    }
    assert_eq!(inbox_deleted, old_inbox);
    // Business rows are never touched: the order participant's row of the old saga is still there.
    assert_eq!(
        (business(&env.dbs.payments).await, business(&env.dbs.inventory).await),
        business_before
    );
    let order_row = skald_participants::order::OrderStore { shards: env.dbs.shards }
        .status(env.dbs.orders_of(old_done_order), old_done_order)
        .await
        .unwrap();
    assert!(order_row.is_some(), "the participant's order row stays");
}
