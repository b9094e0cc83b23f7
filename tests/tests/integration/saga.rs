//! The order saga end to end: happy path and both compensation paths.

use std::time::Duration;

use skald_tests::{Setup, TestEnv, order};

const WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_approves_charges_once_and_reserves_stock() {
    let mut env = TestEnv::start(Setup::default()).await;
    env.seed(&[("alice", 10_000)], &[("sku-1", 10), ("sku-2", 5)]).await;
    let (order_id, saga_id) = env
        .place_order(&order("alice", &[("sku-1", 2, 1250), ("sku-2", 1, 500)]))
        .await;

    let o = env.wait_for_order(order_id, WITHIN).await;
    assert_eq!(o["status"], "APPROVED");
    assert_eq!(o["total_cents"], 3000);
    assert_eq!(env.payments(order_id).await, vec![("CHARGED".to_owned(), 3000)]);
    assert_eq!(env.balance("alice").await, 7_000);
    assert_eq!(
        env.reservations(order_id).await,
        vec![
            ("sku-1".to_owned(), 2, "RESERVED".to_owned()),
            ("sku-2".to_owned(), 1, "RESERVED".to_owned())
        ]
    );
    assert_eq!(env.available("sku-1").await, 8);
    let saga = env.saga(saga_id).await;
    assert_eq!(saga["status"], "COMPLETED");
    assert!(saga["finished_at"].is_string());
    let steps: Vec<&str> = saga["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["create_order", "charge_payment", "reserve_stock", "approve_order"]
    );
    let row = skald_participants::order::OrderStore { shards: env.dbs.shards }
        .status(&env.dbs.orders, order_id)
        .await
        .unwrap()
        .expect("order row in its shard");
    assert_eq!(row.0, "APPROVED");
    assert!(row.1 > 0, "fencing token stored on the row");
    let report = env.verify().await;
    assert!(report.ok(), "{:?}", report.violations);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_balance_cancels_without_payment_or_reservation() {
    let mut env = TestEnv::start(Setup::default()).await;
    env.seed(&[("bob", 100)], &[("sku-1", 10)]).await;
    let (order_id, saga_id) = env.place_order(&order("bob", &[("sku-1", 1, 1000)])).await;

    let o = env.wait_for_order(order_id, WITHIN).await;
    assert_eq!(o["status"], "CANCELLED");
    assert!(env.payments(order_id).await.is_empty());
    assert!(env.reservations(order_id).await.is_empty());
    assert_eq!(env.balance("bob").await, 100);
    assert_eq!(env.available("sku-1").await, 10);
    let saga = env.saga(saga_id).await;
    assert_eq!(saga["status"], "COMPENSATED");
    assert!(
        saga["failure"].as_str().unwrap().contains("insufficient_balance"),
        "{saga}"
    );
    // Step 1 compensated (CancelOrder), step 2 not (its participant rolled back).
    assert_eq!(saga["steps"][0]["status"], "compensated");
    assert_eq!(saga["steps"][1]["status"], "failed");
    assert_eq!(saga["steps"][1]["compensations"].as_array().unwrap().len(), 0);
    let report = env.verify().await;
    assert!(report.ok(), "{:?}", report.violations);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_stock_after_payment_refunds_and_cancels() {
    let mut env = TestEnv::start(Setup::default()).await;
    env.seed(&[("carol", 5_000)], &[("rare", 1)]).await;
    let (order_id, saga_id) = env.place_order(&order("carol", &[("rare", 3, 700)])).await;

    let o = env.wait_for_order(order_id, WITHIN).await;
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(env.payments(order_id).await, vec![("REFUNDED".to_owned(), 2100)]);
    assert_eq!(env.balance("carol").await, 5_000, "balance back after the refund");
    assert!(env.reservations(order_id).await.is_empty());
    assert_eq!(env.available("rare").await, 1);
    let saga = env.saga(saga_id).await;
    assert_eq!(saga["status"], "COMPENSATED");
    assert!(
        saga["failure"].as_str().unwrap().contains("insufficient_stock"),
        "{saga}"
    );
    // Newest first: the refund (step 2) finished before the cancel (step 1) was sent.
    let refund_done = saga["steps"][1]["compensations"][0]["finished_at"]
        .as_str()
        .unwrap()
        .to_owned();
    let cancel_sent = saga["steps"][0]["compensations"][0]["sent_at"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        refund_done <= cancel_sent,
        "refund {refund_done} then cancel {cancel_sent}"
    );
    let report = env.verify().await;
    assert!(report.ok(), "{:?}", report.violations);
    env.stop().await;
}
