//! Many concurrent orders through the API.

use std::time::{Duration, Instant};

use futures::StreamExt;
use skald_tests::{Setup, TestEnv, order};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_orders_all_finish_and_the_invariants_hold() {
    let mut env = TestEnv::start(Setup::default()).await;
    env.seed(
        &[("rich-1", 1_000_000), ("rich-2", 1_000_000), ("poor", 50)],
        &[("sku-a", 10_000), ("sku-b", 10_000), ("scarce", 3)],
    )
    .await;
    let bodies: Vec<_> = (0..200)
        .map(|i| match i % 10 {
            0 | 1 => order("poor", &[("sku-a", 1, 100)]),
            2 | 3 => order("rich-2", &[("scarce", 2, 300), ("sku-b", 1, 50)]),
            n if n % 2 == 0 => order("rich-1", &[("sku-a", 2, 150), ("sku-b", 1, 99)]),
            _ => order("rich-2", &[("sku-b", 3, 10)]),
        })
        .collect();
    let started = Instant::now();
    let placed: Vec<_> = futures::stream::iter(bodies.iter().map(|b| env.place_order(b)))
        .buffer_unordered(50)
        .collect()
        .await;
    let accepted = started.elapsed();
    let mut approved = 0;
    let mut cancelled = 0;
    for (order_id, _) in &placed {
        match env.wait_for_order(*order_id, Duration::from_secs(90)).await["status"].as_str() {
            Some("APPROVED") => approved += 1,
            Some("CANCELLED") => cancelled += 1,
            other => panic!("unexpected status {other:?}"),
        }
    }
    let finished = started.elapsed();
    println!(
        "200 orders: accepted in {accepted:?}, all final in {finished:?} ({approved} approved, {cancelled} cancelled)"
    );
    assert_eq!(approved + cancelled, 200);
    // 40 poor orders fail at payment; at most one scarce order (2 of 3 units) succeeds.
    assert!(cancelled >= 40 + 39, "cancelled {cancelled}");
    assert!(approved >= 120, "approved {approved}");
    let report = env.verify().await;
    assert!(report.ok(), "{:#?}", report.violations);
    assert_eq!(report.sagas_by_status.get("COMPLETED").copied().unwrap_or(0), approved);
    assert_eq!(
        report.sagas_by_status.get("COMPENSATED").copied().unwrap_or(0),
        cancelled
    );
    env.stop().await;
}
