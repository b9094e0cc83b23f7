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
        .status(env.dbs.orders_of(order_id), order_id)
        .await
        .unwrap()
        .expect("order row in its shard");
    assert_eq!(row.0, "APPROVED");
    assert!(row.1 > 0, "fencing token stored on the row");
    // Classic queues, their storage version left to the broker by default.
    let listing = queue_listing(&env);
    for q in ALL_QUEUES {
        let line = queue_line(&listing, q);
        assert!(line.contains("classic"), "{line}");
        assert!(!line.contains("x-queue-version"), "{line}");
    }
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
    env.seed(&[("carol", 5_000)], &[("plenty", 10), ("rare", 1)]).await;
    // One line could be reserved, the other cannot: the reservation is all
    // lines or none.
    let (order_id, saga_id) = env
        .place_order(&order("carol", &[("plenty", 2, 100), ("rare", 3, 700)]))
        .await;

    let o = env.wait_for_order(order_id, WITHIN).await;
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(env.payments(order_id).await, vec![("REFUNDED".to_owned(), 2300)]);
    assert_eq!(env.balance("carol").await, 5_000, "balance back after the refund");
    assert!(env.reservations(order_id).await.is_empty());
    assert_eq!(env.available("plenty").await, 10, "no line reserved");
    assert_eq!(env.available("rare").await, 1);
    let saga = env.saga(saga_id).await;
    assert_eq!(saga["status"], "COMPENSATED");
    assert!(
        saga["failure"].as_str().unwrap().contains("insufficient_stock: rare"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_shards_spread_over_two_databases_keep_every_guarantee() {
    let mut env = TestEnv::start(Setup {
        order_shards: 6,
        order_databases: 2,
        ..Setup::default()
    })
    .await;
    env.seed(&[("kim", 100_000), ("lou", 10)], &[("sku-1", 100), ("rare", 0)])
        .await;
    let mut placed = Vec::new();
    for i in 0..24 {
        let body = match i % 4 {
            0 => order("lou", &[("sku-1", 1, 100)]),
            1 => order("kim", &[("rare", 1, 100)]),
            _ => order("kim", &[("sku-1", 1, 100)]),
        };
        placed.push(env.place_order(&body).await.0);
    }
    let store = skald_participants::order::OrderStore { shards: env.dbs.shards };
    let mut per_database = [0; 2];
    for order_id in placed {
        let status = env.wait_for_order(order_id, WITHIN).await["status"]
            .as_str()
            .unwrap()
            .to_owned();
        let index = env.dbs.shards.database_of(order_id);
        per_database[index] += 1;
        let row = store
            .status(&env.dbs.orders[index], order_id)
            .await
            .unwrap()
            .expect("row in its database");
        assert_eq!(row.0, status);
        // Its shard table does not exist in the other database at all.
        let table = env.dbs.shards.table(order_id);
        let elsewhere: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(&table)
            .fetch_one(&env.dbs.orders[1 - index])
            .await
            .unwrap();
        assert_eq!(elsewhere, None, "{table} exists in both databases");
    }
    assert!(
        per_database.iter().all(|&n| n > 0),
        "both databases used: {per_database:?}"
    );
    let report = env.verify().await;
    assert!(report.ok(), "{:?}", report.violations);
    assert_eq!(report.orders_by_status.get("APPROVED").copied(), Some(12));
    assert_eq!(report.orders_by_status.get("CANCELLED").copied(), Some(12));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_run_over_classic_queues_of_storage_version_2() {
    let mut env = TestEnv::start(Setup {
        classic_queue_version: skald_wire::amqp::ClassicQueueVersion::V2,
        ..Setup::default()
    })
    .await;
    approve_then_refund(&env, "noor").await;
    let listing = queue_listing(&env);
    for q in ALL_QUEUES {
        let line = queue_line(&listing, q);
        assert!(line.contains("classic"), "{line}");
        assert!(line.contains(r#"{"x-queue-version",2}"#), "{line}");
    }
    let report = env.verify().await;
    assert!(report.ok(), "{:?}", report.violations);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_run_over_quorum_queues_with_a_delivery_limit() {
    let mut env = TestEnv::start(Setup {
        quorum_queues: true,
        ..Setup::default()
    })
    .await;
    approve_then_refund(&env, "mia").await;
    let listing = queue_listing(&env);
    for q in [
        "skald.order.commands",
        "skald.payment.commands",
        "skald.coordinator.replies",
    ] {
        let line = queue_line(&listing, q);
        assert!(line.contains("quorum"), "{line}");
        assert!(line.contains("x-delivery-limit"), "{line}");
        assert!(!line.contains("x-queue-version"), "a classic-only argument: {line}");
    }
    let report = env.verify().await;
    assert!(report.ok(), "{:?}", report.violations);
    env.stop().await;
}

/// One unit of stock: the first order takes it and is approved, the second
/// is refunded and cancelled.
async fn approve_then_refund(env: &TestEnv, customer: &str) {
    env.seed(&[(customer, 1_000)], &[("sku-1", 1)]).await;
    let (ok, _) = env.place_order(&order(customer, &[("sku-1", 1, 100)])).await;
    assert_eq!(env.wait_for_order(ok, WITHIN).await["status"], "APPROVED");
    let (refunded, _) = env.place_order(&order(customer, &[("sku-1", 1, 100)])).await;
    assert_eq!(env.wait_for_order(refunded, WITHIN).await["status"], "CANCELLED");
}

/// Every queue Skald declares.
const ALL_QUEUES: [&str; 5] = [
    "skald.order.commands",
    "skald.payment.commands",
    "skald.inventory.commands",
    "skald.coordinator.replies",
    "skald.dead-letters",
];

/// `rabbitmqctl list_queues` of the test's vhost: name, type, arguments.
fn queue_listing(env: &TestEnv) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "-p", &env.names.id, "name", "type", "arguments"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn queue_line<'a>(listing: &'a str, queue: &str) -> &'a str {
    listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(queue))
        .unwrap_or_else(|| panic!("{queue} in {listing}"))
}
