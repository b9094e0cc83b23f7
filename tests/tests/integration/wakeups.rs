//! The sweeper finds due sagas through `saga_wakeups` (migration 0007):
//! every saga with a deadline has a row there no later than it. Writers
//! leave the row alone when a deadline moves later, lower it when one moves
//! earlier (a backoff), drop it when the saga ends; the sweeper moves a row
//! it finds early to the saga's deadline.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use skald_coordinator::store::{Backlog, ReplyEvent, Store, Swept, Verdict};
use skald_engine::Outcome;
use uuid::Uuid;

use crate::optimistic::{commands_sent, new_order, reply, store, stored_version, success, without_processes};

const WITHIN: Duration = Duration::from_secs(30);

async fn wakeup(pool: &sqlx::PgPool, saga_id: Uuid) -> Option<DateTime<Utc>> {
    sqlx::query_scalar("SELECT wake_at FROM saga_wakeups WHERE saga_id = $1")
        .bind(saga_id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// The saga's deadline as PostgreSQL stores it (to the microsecond).
async fn deadline(store: &Store, saga_id: Uuid) -> Option<DateTime<Utc>> {
    let wake = store.saga(saga_id).await.unwrap().unwrap().state.wake_at;
    wake.and_then(|w| DateTime::from_timestamp_micros(w.timestamp_micros()))
}

async fn sweep(store: &Store) -> usize {
    match store.sweep(100, Some(&Backlog::default())).await.unwrap() {
        Swept::Done(n) => n,
        Swept::NeedsQueues => panic!("a view of the queues was given"),
    }
}

fn transient_failure(saga_id: Uuid, step: &str) -> ReplyEvent {
    let outcome = Outcome::Failure {
        retryable: true,
        reason: "test: broker hiccup".to_owned(),
    };
    reply(saga_id, step, 1, outcome)
}

/// Runs `sql` with the saga id as `$1`.
async fn on_saga(pool: &sqlx::PgPool, sql: &'static str, saga_id: Uuid) {
    sqlx::query(sql).bind(saga_id).execute(pool).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_up_rows_follow_deadlines_that_move_earlier_and_sagas_that_end() {
    let (mut env, pool) = without_processes().await;
    let store = store(&env, pool.clone());
    let ids = new_order(&store, "ada", 400).await;
    let saga = ids.saga_id;
    let first = deadline(&store, saga).await.expect("create_order's deadline");
    assert_eq!(wakeup(&pool, saga).await, Some(first), "written with the saga");

    // The next step's deadline is later: the row stays where it was.
    let applied = store.apply_replies(&[success(saga, "create_order")]).await.unwrap();
    assert_eq!(applied, vec![Verdict::Applied]);
    let charge_deadline = deadline(&store, saga).await.expect("charge_payment's deadline");
    assert!(charge_deadline > first);
    assert_eq!(wakeup(&pool, saga).await, Some(first), "no write for a later deadline");

    // A transient failure: the retry is due at the end of a short backoff,
    // well before the row: the same statement lowers it.
    let applied = store
        .apply_replies(&[transient_failure(saga, "charge_payment")])
        .await
        .unwrap();
    assert_eq!(applied, vec![Verdict::Applied]);
    let backoff_end = deadline(&store, saga).await.expect("the end of the backoff");
    assert!(backoff_end < first, "{backoff_end} is before {first}");
    assert_eq!(wakeup(&pool, saga).await, Some(backoff_end), "lowered with the saga");

    // The sweeper wakes it then (not at the step's 10 s deadline), sends the
    // retry, and moves the row to the retry's deadline.
    skald_tests::eventually("the retry sent at the end of the backoff", WITHIN, || async {
        sweep(&store).await;
        (commands_sent(&pool, saga, "ChargePayment").await == 2).then_some(())
    })
    .await;
    let retry_deadline = deadline(&store, saga).await.expect("the retry's deadline");
    assert!(retry_deadline > backoff_end);
    assert_eq!(wakeup(&pool, saga).await, Some(retry_deadline));

    // A row found early (as after a later deadline) moves to the deadline;
    // the saga itself is not written.
    on_saga(
        &pool,
        "UPDATE saga_wakeups SET wake_at = now() - interval '1 second' WHERE saga_id = $1",
        saga,
    )
    .await;
    let version = stored_version(&pool, saga).await;
    assert_eq!(sweep(&store).await, 1, "one row handled");
    assert_eq!(stored_version(&pool, saga).await, version, "nothing fed to the saga");
    assert_eq!(wakeup(&pool, saga).await, Some(retry_deadline));

    // Verify reports an active saga the sweeper cannot find.
    on_saga(&pool, "DELETE FROM saga_wakeups WHERE saga_id = $1", saga).await;
    let report = env.verify().await;
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.contains(&saga.to_string()) && v.contains("no wake-up row")),
        "{:?}",
        report.violations
    );
    // Written back, then the saga ends: its row goes with its last write.
    on_saga(
        &pool,
        "INSERT INTO saga_wakeups (saga_id, wake_at) SELECT id, wake_at FROM sagas WHERE id = $1",
        saga,
    )
    .await;
    let retry = reply(saga, "charge_payment", 2, Outcome::Success { data: json!({}) });
    for reply in [retry, success(saga, "reserve_stock")] {
        assert_eq!(store.apply_replies(&[reply]).await.unwrap(), vec![Verdict::Applied]);
    }
    assert!(wakeup(&pool, saga).await.is_some());
    let applied = store.apply_replies(&[success(saga, "approve_order")]).await.unwrap();
    assert_eq!(applied, vec![Verdict::Applied]);
    let record = store.saga(saga).await.unwrap().unwrap();
    assert_eq!(record.status.as_str(), "COMPLETED", "{:?}", record.state);
    assert!(wakeup(&pool, saga).await.is_none(), "dropped when the saga ended");
    // (No participant ran: verify finds no order rows, but no wake-up fault.)
    let report = env.verify().await;
    assert!(
        !report.violations.iter().any(|v| v.contains("wake-up")),
        "{:?}",
        report.violations
    );

    pool.close().await;
    env.stop().await;
}

/// Rows of sagas that ended or are gone are dropped by the sweeper, and a
/// row whose saga another transaction is writing stays due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_drops_rows_of_sagas_gone_and_skips_sagas_being_written() {
    let (mut env, pool) = without_processes().await;
    let store = store(&env, pool.clone());
    let held = new_order(&store, "bo", 300).await.saga_id;
    let gone = Uuid::now_v7();
    on_saga(
        &pool,
        "UPDATE saga_wakeups SET wake_at = now() - interval '1 second' WHERE saga_id = $1",
        held,
    )
    .await;
    on_saga(
        &pool,
        "INSERT INTO saga_wakeups (saga_id, wake_at) VALUES ($1, now() - interval '1 second')",
        gone,
    )
    .await;
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM sagas WHERE id = $1 FOR UPDATE")
        .bind(held)
        .execute(&mut *holder)
        .await
        .unwrap();
    assert_eq!(sweep(&store).await, 1, "the row of the saga gone, not the held one");
    assert!(wakeup(&pool, gone).await.is_none());
    let still = wakeup(&pool, held).await.expect("the held saga keeps its row");
    assert!(still < Utc::now(), "and it is still due");
    holder.rollback().await.unwrap();
    assert_eq!(sweep(&store).await, 1, "handled once free");
    assert_eq!(wakeup(&pool, held).await, deadline(&store, held).await);

    pool.close().await;
    env.stop().await;
}
