//! `GET /metrics` on the coordinator and on a participant, with exact counts.
//!
//! The metrics recorder is global to a process, so this is a test binary of
//! its own with a single test: nothing else in this process records metrics.
//! (In-process, the coordinator and the participants share that recorder, so
//! the counts below add up both sides.)

use std::time::Duration;

use tokio::time::Instant;

use skald_participants::app::Which;
use skald_tests::{Setup, TestEnv, get_text, metric, order, publish_raw};
use skald_wire::contract::COMMANDS_EXCHANGE;

const WITHIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_sagas_steps_messages_and_locks_exactly() {
    let mut env = TestEnv::start(Setup::default()).await;
    env.seed(
        &[("rich", 1_000_000), ("poor", 10)],
        &[("sku-a", 1000), ("sku-rare", 1)],
    )
    .await;

    // 3 complete (4 actions each), 2 fail on balance (create, charge, cancel),
    // 1 fails on stock (create, charge, reserve, refund, cancel).
    let mut bodies = Vec::new();
    for _ in 0..3 {
        bodies.push(order("rich", &[("sku-a", 1, 100)]));
    }
    for _ in 0..2 {
        bodies.push(order("poor", &[("sku-a", 1, 100)]));
    }
    bodies.push(order("rich", &[("sku-rare", 5, 100)]));
    let mut sagas = Vec::new();
    for body in &bodies {
        sagas.push(env.place_order(body).await.1);
    }
    let (mut completed, mut compensated) = (0, 0);
    for saga in &sagas {
        let v = env.wait_for_saga_final(*saga, WITHIN).await;
        match v["status"].as_str() {
            Some("COMPLETED") => completed += 1,
            Some("COMPENSATED") => compensated += 1,
            other => panic!("saga {saga} ended {other:?}"),
        }
    }
    assert_eq!((completed, compensated), (3, 3));
    let commands = 3.0 * 4.0 + 2.0 * 3.0 + 5.0;
    let order_commands = 3.0 * 2.0 + 2.0 * 2.0 + 2.0; // create + approve, create + cancel

    // A poison command: dead-lettered with its reason class.
    let (conn, ch) = env.amqp().await;
    publish_raw(&ch, COMMANDS_EXCHANGE, "payment", "ChargePayment", b"not json").await;
    let _ = conn.close(200, "done".into()).await;

    // Counters on the two sides of a message are bumped a moment apart (after
    // a confirm, after an ack): poll until they settle, then check exactly.
    let coordinator = env.url("/metrics");
    let deadline = Instant::now() + WITHIN;
    let text = loop {
        let text = get_text(&env.http, &coordinator).await;
        if settled(&text, commands, order_commands) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let m = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);
    let order_type = [("saga_type", "order")];

    // Sagas.
    assert_eq!(m("skald_sagas_started_total", &order_type), 6.0);
    assert_eq!(m("skald_sagas_completed_total", &order_type), 3.0);
    assert_eq!(m("skald_sagas_compensated_total", &order_type), 3.0);
    assert_eq!(m("skald_sagas_stuck_total", &[]), 0.0);
    assert_eq!(
        m(
            "skald_saga_duration_seconds_count",
            &[("saga_type", "order"), ("status", "COMPLETED")]
        ),
        3.0
    );
    assert_eq!(
        m(
            "skald_saga_duration_seconds_bucket",
            &[("status", "COMPENSATED"), ("le", "+Inf")]
        ),
        3.0,
        "a real histogram, with buckets"
    );
    assert!(text.contains("# TYPE skald_step_duration_seconds histogram"), "{text}");

    // Steps: every command is an attempt, and every attempt got a reply.
    let attempts = m("skald_step_attempts_total", &[]);
    let retries = m("skald_step_retries_total", &[]);
    assert_eq!(attempts - retries, commands, "first attempts");
    assert_eq!(retries, 0.0, "a quiet run retries nothing");
    assert_eq!(
        m(
            "skald_step_attempts_total",
            &[("step", "charge_payment"), ("kind", "action")]
        ),
        6.0
    );
    assert_eq!(
        m(
            "skald_step_attempts_total",
            &[("step", "create_order"), ("kind", "compensation")]
        ),
        3.0
    );
    assert_eq!(m("skald_step_duration_seconds_count", &[]), attempts);
    assert_eq!(
        m(
            "skald_step_duration_seconds_count",
            &[("step", "charge_payment"), ("outcome", "failure")]
        ),
        2.0
    );
    assert_eq!(m("skald_step_timeouts_total", &[]), 0.0);

    // Messages: what was published was consumed, on both sides.
    let published_commands = m("skald_messages_published_total", &[("exchange", "skald.commands")]);
    assert_eq!(published_commands, attempts);
    assert_eq!(
        consumed_commands(&text),
        attempts + 1.0,
        "the commands and the poison one"
    );
    assert_eq!(
        m("skald_messages_consumed_total", &[("queue", "skald.order.commands")]),
        order_commands
    );
    let replies = m("skald_messages_published_total", &[("exchange", "skald.replies")]);
    assert_eq!(replies, attempts);
    assert_eq!(
        m(
            "skald_messages_consumed_total",
            &[("queue", "skald.coordinator.replies")]
        ),
        replies
    );
    assert_eq!(
        m(
            "skald_messages_dead_lettered_total",
            &[("queue", "skald.payment.commands"), ("reason", "undecodable")]
        ),
        1.0
    );
    assert_eq!(m("skald_messages_published_total", &[("exchange", "skald.dlx")]), 1.0);
    assert_eq!(m("skald_commands_processed_total", &[("result", "executed")]), attempts);

    // Locks: one acquisition per order command, no fencing rejection.
    assert_eq!(
        m("skald_lock_acquisitions_total", &[("resource", "order")]),
        order_commands
    );
    assert_eq!(m("skald_fencing_rejections_total", &[]), 0.0);

    // Outboxes: sampled, drained.
    for outbox in ["coordinator", "order", "payment", "inventory"] {
        let label = format!("outbox=\"{outbox}\"");
        assert!(
            text.lines()
                .any(|l| l.starts_with("skald_outbox_rows{") && l.contains(&label) && l.ends_with(" 0")),
            "outbox {outbox} sampled and empty:\n{text}"
        );
        assert_eq!(m("skald_outbox_oldest_age_seconds", &[("outbox", outbox)]), 0.0);
    }

    // No secret in any label or value.
    assert!(!text.contains("guest:guest") && !text.contains("postgres://"), "{text}");

    // A participant serves the same registry, and /healthz.
    let (which, addr) = env.participant_addrs[1];
    assert_eq!(which, Which::Payment);
    let health = get_text(&env.http, &format!("http://{addr}/healthz")).await;
    assert!(health.contains("ok"), "{health}");
    let resp = env
        .http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("participant /metrics");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let participant = resp.text().await.unwrap();
    assert_eq!(
        metric(
            &participant,
            "skald_messages_consumed_total",
            &[("queue", "skald.payment.commands")]
        ),
        m("skald_messages_consumed_total", &[("queue", "skald.payment.commands")])
    );
    assert!(
        participant.contains("# HELP skald_messages_consumed_total"),
        "{participant}"
    );

    env.stop().await;
}

/// Whether every count the test checks has reached its final value (the
/// assertions then say which one did not, if the deadline passed first).
fn settled(text: &str, commands: f64, order_commands: f64) -> bool {
    let m = |name: &str, labels: &[(&str, &str)]| metric(text, name, labels);
    let sampled = ["coordinator", "order", "payment", "inventory"]
        .iter()
        .all(|o| text.contains(&format!("outbox=\"{o}\"")));
    m("skald_sagas_completed_total", &[]) == 3.0
        && m("skald_sagas_compensated_total", &[]) == 3.0
        && m("skald_messages_dead_lettered_total", &[]) == 1.0
        && m("skald_step_attempts_total", &[]) == commands
        && m("skald_messages_published_total", &[("exchange", "skald.commands")]) == commands
        && m("skald_messages_published_total", &[("exchange", "skald.replies")]) == commands
        && m(
            "skald_messages_consumed_total",
            &[("queue", "skald.coordinator.replies")],
        ) == commands
        && consumed_commands(text) == commands + 1.0
        && m("skald_commands_processed_total", &[]) == commands
        && m("skald_lock_acquisitions_total", &[]) == order_commands
        && sampled
        && m("skald_outbox_rows", &[]) == 0.0
}

/// Deliveries acked on the three command queues.
fn consumed_commands(text: &str) -> f64 {
    ["order", "payment", "inventory"]
        .iter()
        .map(|p| {
            metric(
                text,
                "skald_messages_consumed_total",
                &[("queue", &format!("skald.{p}.commands"))],
            )
        })
        .sum()
}
