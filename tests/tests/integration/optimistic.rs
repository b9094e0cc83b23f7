//! Replies are applied without row locks (read, compute, write if the
//! saga's version is still the one read): two writers of one saga at once
//! write it once.

use std::time::Duration;

use serde_json::json;
use skald_coordinator::domain::{NewOrder, OrderRequest};
use skald_coordinator::store::{Created, OrderRef, OrderToCreate, ReplyEvent, Store, Verdict};
use skald_engine::{Event, Kind, Outcome};
use skald_tests::{Setup, TestEnv, order};

const WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reply_applied_by_two_coordinators_at_once_is_written_once() {
    let (mut env, pool) = without_processes().await;
    let store = store(&env, pool.clone());
    let ids = new_order(&store, "kim", 500).await;
    let reply = ReplyEvent {
        saga_id: ids.saga_id,
        event: Event::Reply {
            step: "create_order".to_owned(),
            attempt: 1,
            kind: Kind::Action,
            outcome: Outcome::Success { data: json!({}) },
        },
    };

    // A third transaction holds the saga's row: both applications read
    // version 0 and compute the same transition, then wait to write it.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM sagas WHERE id = $1 FOR UPDATE")
        .bind(ids.saga_id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let apply = |store: Store, reply: ReplyEvent| tokio::spawn(async move { store.apply_replies(&[reply]).await });
    let first = apply(store.clone(), reply.clone());
    let second = apply(store.clone(), reply.clone());
    skald_tests::eventually("both writes waiting on the row lock", WITHIN, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        (waiting == 2).then_some(())
    })
    .await;
    holder.commit().await.unwrap();

    let mut verdicts = first.await.unwrap().unwrap();
    verdicts.extend(second.await.unwrap().unwrap());
    let applied = verdicts.iter().filter(|v| **v == Verdict::Applied).count();
    assert_eq!(
        applied, 1,
        "one application wins, the other finds a duplicate: {verdicts:?}"
    );
    assert!(
        verdicts.iter().any(|v| matches!(v, Verdict::Ignored(_))),
        "{verdicts:?}"
    );
    let version = stored_version(&pool, ids.saga_id).await;
    assert_eq!(version, 1, "the saga was written once");
    let charges = commands_sent(&pool, ids.saga_id, "ChargePayment").await;
    assert_eq!(charges, 1, "one ChargePayment command, not one per application");
    let saga = store.saga(ids.saga_id).await.unwrap().unwrap();
    assert_eq!(saga.state.steps[1].attempts.len(), 1, "{:?}", saga.state);

    pool.close().await;
    env.stop().await;
}

/// A test environment with no coordinator process and no participant (only
/// the test writes the sagas), and a pool on its migrated coordinator database.
pub(crate) async fn without_processes() -> (TestEnv, sqlx::PgPool) {
    let env = TestEnv::start(Setup {
        coordinator: false,
        participants: vec![],
        ..Setup::default()
    })
    .await;
    let pool = skald_wire::db::connect_and_migrate(
        &env.coordinator_config.database_url,
        5,
        &skald_coordinator::app::MIGRATOR,
        2,
    )
    .await
    .unwrap();
    (env, pool)
}

/// One coordinator's store (each has its own state cache).
pub(crate) fn store(env: &TestEnv, pool: sqlx::PgPool) -> Store {
    Store::new(
        pool,
        env.coordinator_config.registry().unwrap(),
        Default::default(),
        skald_wire::faults::Faults::none(),
    )
}

pub(crate) async fn new_order(store: &Store, customer: &str, price: i64) -> OrderRef {
    let request: OrderRequest = serde_json::from_value(order(customer, &[("sku-1", 1, price)])).unwrap();
    let created = store
        .create_order(&OrderToCreate {
            order: NewOrder::parse(request).unwrap(),
            key: None,
            request_hash: "test".to_owned(),
        })
        .await
        .unwrap();
    let Created::New(ids) = created else {
        panic!("a new order: {created:?}")
    };
    ids
}

pub(crate) async fn stored_version(pool: &sqlx::PgPool, saga_id: uuid::Uuid) -> i64 {
    sqlx::query_scalar("SELECT version FROM sagas WHERE id = $1")
        .bind(saga_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Commands of one type the saga's outbox holds (no relay runs here).
pub(crate) async fn commands_sent(pool: &sqlx::PgPool, saga_id: uuid::Uuid, message_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE correlation_id = $1 AND message_type = $2")
        .bind(saga_id)
        .bind(message_type)
        .fetch_one(pool)
        .await
        .unwrap()
}

pub(crate) fn success(saga_id: uuid::Uuid, step: &str) -> ReplyEvent {
    reply(saga_id, step, 1, Outcome::Success { data: json!({}) })
}

/// A participant's reply to attempt `attempt` of `step`'s action.
pub(crate) fn reply(saga_id: uuid::Uuid, step: &str, attempt: u32, outcome: Outcome) -> ReplyEvent {
    ReplyEvent {
        saga_id,
        event: Event::Reply {
            step: step.to_owned(),
            attempt,
            kind: Kind::Action,
            outcome,
        },
    }
}

/// A coordinator keeps the sagas it wrote in memory and skips reading them
/// at their next reply. Another coordinator may have moved the saga on in
/// between: the stale copy must not decide the reply (here it would ignore
/// it as a reply for a step that has not started), the stored state must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_for_a_saga_another_coordinator_moved_is_applied_to_the_stored_state() {
    let (mut env, pool) = without_processes().await;
    let (a, b) = (store(&env, pool.clone()), store(&env, pool.clone()));
    let ids = new_order(&a, "lee", 700).await;
    // A writes step 1's reply and keeps the saga (payment pending).
    let applied = a.apply_replies(&[success(ids.saga_id, "create_order")]).await.unwrap();
    assert_eq!(applied, vec![Verdict::Applied]);
    // B applies step 2's reply: the saga moves on to reserving stock.
    let applied = b
        .apply_replies(&[success(ids.saga_id, "charge_payment")])
        .await
        .unwrap();
    assert_eq!(applied, vec![Verdict::Applied]);
    // Step 3's reply reaches A, whose copy still waits for the payment.
    let applied = a.apply_replies(&[success(ids.saga_id, "reserve_stock")]).await.unwrap();
    assert_eq!(
        applied,
        vec![Verdict::Applied],
        "decided on the stored state, not A's copy"
    );

    let version = stored_version(&pool, ids.saga_id).await;
    assert_eq!(version, 3, "three replies, three writes");
    let approvals = commands_sent(&pool, ids.saga_id, "ApproveOrder").await;
    assert_eq!(approvals, 1, "the next step's command is sent once");
    // And A's next reply, from its own fresh copy, finishes the saga.
    let applied = a.apply_replies(&[success(ids.saga_id, "approve_order")]).await.unwrap();
    assert_eq!(applied, vec![Verdict::Applied]);
    let saga = a.saga(ids.saga_id).await.unwrap().unwrap();
    assert_eq!(saga.status.as_str(), "COMPLETED", "{:?}", saga.state);

    pool.close().await;
    env.stop().await;
}
