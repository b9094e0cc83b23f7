//! Timeouts, STUCK sagas and the operator's retry and abort.

use std::time::Duration;

use skald_participants::app::Which;
use skald_tests::{Setup, TestEnv, order};

const WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_keeps_failing_is_stuck_until_an_operator_retries_it() {
    let mut env = TestEnv::start(Setup::stuck_without_payment()).await;
    env.seed(&[("hank", 10_000)], &[("sku-1", 10)]).await;
    let (order_id, saga_id) = env.place_order(&order("hank", &[("sku-1", 1, 400)])).await;

    let stuck = env.wait_for_saga(saga_id, "STUCK", WITHIN).await;
    assert!(stuck["failure"].as_str().unwrap().contains("timed out"), "{stuck}");
    assert_eq!(stuck["steps"][1]["compensations"].as_array().unwrap().len(), 2);
    let (_, order) = env.get_json(&format!("/v1/orders/{order_id}")).await;
    assert_eq!(
        (order["status"].as_str(), order["saga_status"].as_str()),
        (Some("PENDING"), Some("STUCK"))
    );
    let (status, listed) = env.get_json("/v1/sagas?status=STUCK").await;
    assert_eq!(status, 200);
    assert_eq!(listed["sagas"][0]["saga_id"], saga_id.to_string());

    // Retrying before the payment service is back only gets it stuck again; the operator fixes it first.
    env.start_participant(Which::Payment).await;
    let (status, body) = env.operate(saga_id, "retry").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "COMPENSATING");
    env.wait_for_saga(saga_id, "COMPENSATED", WITHIN).await;
    // The queued ChargePayment attempts ran or were refused; either way no money moved for good.
    assert_eq!(env.balance("hank").await, 10_000);
    assert_eq!(env.wait_for_order(order_id, WITHIN).await["status"], "CANCELLED");
    let report = env.verify().await;
    assert!(report.ok(), "{:?}", report.violations);

    // Retry and abort do not apply to a finished saga.
    assert_eq!(env.operate(saga_id, "retry").await.0, 409);
    assert_eq!(env.operate(saga_id, "abort").await.0, 409);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_saga_compensates_what_may_have_run() {
    let mut env = TestEnv::start(Setup {
        participants: vec![Which::Order, Which::Inventory],
        ..Setup::default()
    })
    .await;
    env.seed(&[("ivy", 10_000)], &[("sku-1", 10)]).await;
    let (order_id, saga_id) = env.place_order(&order("ivy", &[("sku-1", 2, 300)])).await;
    // Wait until it sits on charge_payment (no payment participant yet).
    skald_tests::eventually("saga waiting on charge_payment", WITHIN, || async {
        let v = env.saga(saga_id).await;
        (v["steps"][1]["status"] == "running").then_some(())
    })
    .await;

    let (status, body) = env.operate(saga_id, "abort").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "COMPENSATING");
    assert!(body["failure"].as_str().unwrap().contains("aborted"));
    // The charge in flight may still happen: its refund was sent too. Let payment run now.
    env.start_participant(Which::Payment).await;
    let done = env.wait_for_saga(saga_id, "COMPENSATED", WITHIN).await;
    assert_eq!(done["steps"][1]["status"], "compensated");
    assert_eq!(
        env.balance("ivy").await,
        10_000,
        "charged then refunded, or refused by the barrier"
    );
    assert!(env.payments(order_id).await.iter().all(|(s, _)| s != "CHARGED"));
    assert_eq!(env.wait_for_order(order_id, WITHIN).await["status"], "CANCELLED");
    let report = env.verify().await;
    assert!(report.ok(), "{:?}", report.violations);
    env.stop().await;
}
