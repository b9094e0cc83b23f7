//! Actions handled together (`Handler::handle_many`: one statement for a
//! batch) give each command the outcome it would get on its own.

use std::time::Duration;

use serde_json::{Value, json};
use skald_participants::app::Which;
use skald_participants::runtime::{Handler, Incoming, Processed, Runtime, RuntimeConfig};
use skald_tests::{Setup, TestEnv};
use skald_wire::contract::CommandEnvelope;
use uuid::Uuid;

/// A runtime on `pool` with small batches and no linger, for `process_batch`.
pub(crate) fn runtime<H: Handler>(env: &TestEnv, pool: sqlx::PgPool, handler: H) -> Runtime<H> {
    Runtime::new(
        pool,
        handler,
        None,
        RuntimeConfig {
            amqp_url: env.names.amqp_url(),
            topology: env.topology.clone(),
            batch_max: 16,
            linger: Duration::ZERO,
            prefetch: 16,
            relay_batch: 16,
            relay_poll: Duration::from_millis(200),
            faults: skald_wire::faults::Faults::none(),
            max_redeliveries: 10,
        },
    )
}

/// A first attempt of `step` for a new saga and order.
fn action(step: &str, customer: &str, lines: &[(&str, i64)], total: i64) -> (CommandEnvelope, Uuid) {
    let order_id = Uuid::now_v7();
    let items: Vec<Value> = lines
        .iter()
        .map(|(sku, quantity)| json!({"sku": sku, "quantity": quantity, "unit_price_cents": 1}))
        .collect();
    let command = json!({
        "saga_id": Uuid::now_v7(),
        "step": step,
        "attempt": 1,
        "kind": "action",
        "payload": {"order_id": order_id, "customer_id": customer, "currency": "EUR", "items": items, "total_cents": total},
    });
    (serde_json::from_value(command).expect("command"), order_id)
}

async fn run_batch<H: Handler>(
    runtime: &Runtime<H>,
    commands: &[(CommandEnvelope, Uuid)],
    message_type: &str,
) -> Vec<Value> {
    let batch: Vec<Incoming<'_>> = commands
        .iter()
        .map(|(command, _)| Incoming {
            command,
            message_type,
            span: tracing::Span::none(),
        })
        .collect();
    runtime
        .process_batch(&batch)
        .await
        .into_iter()
        .map(|o| {
            let processed = o.expect("every command gets a reply");
            assert!(matches!(processed, Processed::Executed(_)), "{processed:?}");
            serde_json::to_value(processed.reply()).expect("reply")
        })
        .collect()
}

/// Each reply's outcome and reason.
fn outcomes(replies: &[Value]) -> Vec<(&str, &str)> {
    replies
        .iter()
        .map(|r| (r["outcome"].as_str().unwrap_or("?"), r["reason"].as_str().unwrap_or("")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_in_one_batch_see_each_others_debits() {
    use skald_participants::payment::PaymentParticipant;
    let mut env = TestEnv::start(Setup::only(Which::Payment)).await;
    env.seed(&[("jo", 1_000), ("kai", 1_000), ("lou", 100)], &[]).await;
    let runtime = runtime(&env, env.dbs.payments.clone(), PaymentParticipant);
    let commands = [
        action("charge_payment", "jo", &[("sku-1", 1)], 600),
        action("charge_payment", "kai", &[("sku-1", 1)], 300),
        // jo again: the balance left after the first charge is too low.
        action("charge_payment", "jo", &[("sku-1", 1)], 600),
        action("charge_payment", "lou", &[("sku-1", 1)], 500),
        action("charge_payment", "nobody", &[("sku-1", 1)], 10),
        // jo a third time, within what is left.
        action("charge_payment", "jo", &[("sku-1", 1)], 400),
    ];
    let replies = run_batch(&runtime, &commands, "ChargePayment").await;
    assert_eq!(
        outcomes(&replies),
        vec![
            ("success", ""),
            ("success", ""),
            ("failure", "insufficient_balance"),
            ("failure", "insufficient_balance"),
            ("failure", "unknown_customer"),
            ("success", ""),
        ]
    );
    assert_eq!(replies[0]["data"]["charged_cents"], 600);
    assert_eq!(
        env.balance("jo").await,
        0,
        "600 and 400 charged, the second 600 refused"
    );
    assert_eq!(env.balance("kai").await, 700);
    assert_eq!(env.balance("lou").await, 100);
    for (i, charged) in [(0, true), (1, true), (2, false), (3, false), (4, false), (5, true)] {
        let payments = env.payments(commands[i].1).await;
        assert_eq!(payments.len(), usize::from(charged), "order {i}: {payments:?}");
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_in_one_batch_are_each_all_or_nothing() {
    use skald_participants::inventory::InventoryParticipant;
    let mut env = TestEnv::start(Setup::only(Which::Inventory)).await;
    env.seed(&[], &[("sku-a", 5), ("sku-b", 10), ("sku-c", 1), ("sku-d", 4)])
        .await;
    let runtime = runtime(&env, env.dbs.inventory.clone(), InventoryParticipant);
    let commands = [
        action("reserve_stock", "x", &[("sku-a", 3), ("sku-b", 2)], 1),
        // Shares sku-a with the first: only 2 are left for it.
        action("reserve_stock", "x", &[("sku-a", 3)], 1),
        // Short on sku-c: its sku-d line is not reserved either.
        action("reserve_stock", "x", &[("sku-c", 2), ("sku-d", 1)], 1),
        action("reserve_stock", "x", &[("sku-d", 4)], 1),
        action("reserve_stock", "x", &[("sku-zzz", 1)], 1),
    ];
    let replies = run_batch(&runtime, &commands, "ReserveStock").await;
    assert_eq!(
        outcomes(&replies),
        vec![
            ("success", ""),
            ("failure", "insufficient_stock: sku-a"),
            ("failure", "insufficient_stock: sku-c"),
            ("success", ""),
            ("failure", "unknown_sku: sku-zzz"),
        ]
    );
    assert_eq!(replies[0]["data"]["reserved_lines"], 2);
    assert_eq!(
        (
            env.available("sku-a").await,
            env.available("sku-b").await,
            env.available("sku-c").await,
            env.available("sku-d").await
        ),
        (2, 8, 1, 0)
    );
    for (i, lines) in [(0, 2), (1, 0), (2, 0), (3, 1), (4, 0)] {
        let reserved = env.reservations(commands[i].1).await;
        assert_eq!(reserved.len(), lines, "order {i}: {reserved:?}");
    }
    env.stop().await;
}
