//! Step deadlines and a participant that is behind: commands still waiting
//! in its queue (a consumer attached) are not retried, their deadlines move;
//! with that turned off, the same load times out and retries.

use std::time::Duration;

use serde_json::Value;
use skald_participants::app::Which;
use skald_tests::{Setup, TestEnv, order};
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(60);
const STEP_TIMEOUT_MS: u64 = 2_000;
const ORDERS: usize = 12;

/// Payment handles one command at a time, each 300 ms late, so that the
/// last of `ORDERS` charges waits in its queue well past the 2 s deadline.
/// Returns every saga once final.
async fn run_behind_a_slow_payment(max_queue_wait_ms: u64) -> Vec<Value> {
    let mut env = TestEnv::start(Setup {
        coordinator: false,
        participants: vec![Which::Order, Which::Inventory],
        step_timeout_ms: STEP_TIMEOUT_MS,
        ..Setup::default()
    })
    .await;
    let mut config = env.coordinator_config.clone();
    config.step_max_queue_wait_ms = max_queue_wait_ms;
    env.base_url = env.start_coordinator(config).await;
    env.participant_config.faults = "payment.delay_ms=300".to_owned();
    env.participant_config.prefetch = 1;
    env.participant_config.batch_max = 1;
    env.start_participant(Which::Payment).await;
    let customers: Vec<String> = (0..ORDERS).map(|i| format!("cust-{i}")).collect();
    let accounts: Vec<(&str, i64)> = customers.iter().map(|c| (c.as_str(), 10_000)).collect();
    env.seed(&accounts, &[("sku-1", 100)]).await;

    let mut sagas: Vec<Uuid> = Vec::new();
    for c in &customers {
        let (_, saga_id) = env.place_order(&order(c, &[("sku-1", 1, 500)])).await;
        sagas.push(saga_id);
    }
    let mut out = Vec::new();
    for saga_id in sagas {
        out.push(env.wait_for_saga_final(saga_id, WITHIN).await);
    }
    let report = env.verify().await;
    assert!(report.ok(), "{:?}", report.violations);
    env.stop().await;
    out
}

fn attempts<'a>(saga: &'a Value, step: &str) -> &'a [Value] {
    saga["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["name"] == step))
        .and_then(|s| s["attempts"].as_array())
        .map_or(&[], Vec::as_slice)
}

fn time(v: &Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.to_utc())
        .unwrap_or_else(|| panic!("not a time: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_queued_behind_a_slow_participant_are_not_retried() {
    let sagas = run_behind_a_slow_payment(60_000).await;
    let mut moved = 0;
    for saga in &sagas {
        assert_eq!(saga["status"], "COMPLETED", "{saga}");
        let charges = attempts(saga, "charge_payment");
        assert_eq!(charges.len(), 1, "one charge, never retried: {saga}");
        let (sent, deadline) = (time(&charges[0]["sent_at"]), time(&charges[0]["deadline"]));
        if deadline - sent > chrono::Duration::milliseconds(STEP_TIMEOUT_MS as i64) {
            moved += 1;
        }
    }
    // The deadline of the charges that waited longest was moved, not fired.
    assert!(moved > 0, "no deadline was moved: the queue never looked backlogged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_queue_wait_the_same_backlog_times_out_and_retries() {
    let sagas = run_behind_a_slow_payment(0).await;
    let retried = sagas
        .iter()
        .filter(|saga| attempts(saga, "charge_payment").len() > 1)
        .count();
    for saga in &sagas {
        assert_eq!(saga["status"], "COMPLETED", "retries end the same way: {saga}");
    }
    assert!(retried > 0, "the load must be enough to pass the deadline");
}
