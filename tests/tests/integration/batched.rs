//! Commands handled together (`Handler::handle_many`: one statement for a
//! batch; compensations on the direct path too) give each command the
//! outcome it would get on its own.

use std::time::Duration;

use serde_json::{Value, json};
use skald_participants::app::Which;
use skald_participants::lock::Locks;
use skald_participants::runtime::{Handler, Incoming, Processed, Runtime, RuntimeConfig};
use skald_tests::{REDIS, Setup, TestEnv};
use skald_wire::Kind;
use skald_wire::contract::CommandEnvelope;
use uuid::Uuid;

/// A runtime on `pool` with small batches and no linger, for `process_batch`.
pub(crate) fn runtime<H: Handler>(env: &TestEnv, pool: sqlx::PgPool, handler: H) -> Runtime<H> {
    runtime_on(env, vec![pool], handler, None)
}

/// [`runtime`] over several databases, with locks if given.
fn runtime_on<H: Handler>(env: &TestEnv, pools: Vec<sqlx::PgPool>, handler: H, locks: Option<Locks>) -> Runtime<H> {
    Runtime::partitioned(
        pools,
        handler,
        locks,
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

/// The compensation of `action`'s step, as the coordinator sends it.
fn compensation(action: &(CommandEnvelope, Uuid), attempt: u32) -> (CommandEnvelope, Uuid) {
    let command = CommandEnvelope {
        kind: Kind::Compensation,
        attempt,
        ..action.0.clone()
    };
    (command, action.1)
}

/// Every command of the batch processed, in order.
async fn process<H: Handler>(
    runtime: &Runtime<H>,
    commands: &[(CommandEnvelope, Uuid)],
    message_type: &str,
) -> Vec<Processed> {
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
        .map(|o| o.expect("every command gets a reply"))
        .collect()
}

/// The replies of a batch whose commands all run for the first time.
async fn run_batch<H: Handler>(
    runtime: &Runtime<H>,
    commands: &[(CommandEnvelope, Uuid)],
    message_type: &str,
) -> Vec<Value> {
    process(runtime, commands, message_type)
        .await
        .into_iter()
        .map(|processed| {
            assert!(matches!(processed, Processed::Executed(_)), "{processed:?}");
            serde_json::to_value(processed.reply()).expect("reply")
        })
        .collect()
}

/// A reply's `data` field.
fn data(processed: &Processed) -> Value {
    serde_json::to_value(processed.reply()).expect("reply")["data"].clone()
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

/// Refunds on the direct path: each charged order is refunded once and its
/// customer credited, a compensation of a refused charge is a no-op, one
/// whose charge never ran leaves the tombstone that refuses the late
/// charge, a compensation delivered twice in one batch refunds once, and a
/// retried batch replays every stored reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_in_one_batch_credit_each_charge_once() {
    use skald_participants::payment::PaymentParticipant;
    let mut env = TestEnv::start(Setup::only(Which::Payment)).await;
    env.seed(&[("jo", 1_000), ("kai", 1_000), ("lou", 100)], &[]).await;
    let runtime = runtime(&env, env.dbs.payments.clone(), PaymentParticipant);
    let charges = [
        action("charge_payment", "jo", &[("sku-1", 1)], 300),
        action("charge_payment", "jo", &[("sku-1", 1)], 200),
        action("charge_payment", "kai", &[("sku-1", 1)], 400),
        action("charge_payment", "lou", &[("sku-1", 1)], 500),
    ];
    let replies = run_batch(&runtime, &charges, "ChargePayment").await;
    assert_eq!(
        outcomes(&replies),
        vec![
            ("success", ""),
            ("success", ""),
            ("success", ""),
            ("failure", "insufficient_balance")
        ]
    );
    assert_eq!((env.balance("jo").await, env.balance("kai").await), (500, 600));
    let never_charged = action("charge_payment", "jo", &[("sku-1", 1)], 50);
    let refunds = [
        compensation(&charges[0], 1),
        compensation(&charges[1], 1),
        compensation(&charges[2], 1),
        compensation(&charges[3], 1),
        compensation(&never_charged, 1),
    ];
    let processed = process(&runtime, &refunds, "RefundPayment").await;
    assert!(
        processed.iter().all(|p| matches!(p, Processed::Executed(_))),
        "{processed:?}"
    );
    let refunded: Vec<Value> = processed.iter().map(|p| data(p)["refunded_cents"].clone()).collect();
    assert_eq!(refunded[..3], [json!(300), json!(200), json!(400)], "{processed:?}");
    assert_eq!(runtime.batches_rerun(), 0, "every batch so far committed as one");
    assert_eq!(data(&processed[3]), json!({"noop": true}), "the charge was refused");
    assert_eq!(data(&processed[4]), json!({"noop": true}), "the charge never ran");
    assert!(
        processed
            .iter()
            .all(|p| p.reply().outcome == skald_wire::contract::ReplyOutcome::Success)
    );
    assert_eq!(
        (
            env.balance("jo").await,
            env.balance("kai").await,
            env.balance("lou").await
        ),
        (1_000, 1_000, 100),
        "each charge refunded once"
    );
    for (i, expected) in [(0, "REFUNDED"), (1, "REFUNDED"), (2, "REFUNDED")] {
        assert_eq!(
            env.payments(charges[i].1).await,
            vec![(expected.to_owned(), [300, 200, 400][i])]
        );
    }

    // The late charge finds the tombstone and is refused.
    let late = process(&runtime, std::slice::from_ref(&never_charged), "ChargePayment").await;
    assert_eq!(
        late[0].reply().outcome,
        skald_wire::contract::ReplyOutcome::Failure,
        "{late:?}"
    );
    assert!(env.payments(never_charged.1).await.is_empty());
    assert_eq!(
        runtime.batches_rerun(),
        1,
        "the tombstone made the batch run again one by one"
    );
    assert_eq!(env.balance("jo").await, 1_000);

    // A compensation delivered twice in one batch refunds once.
    let charge = action("charge_payment", "kai", &[("sku-1", 1)], 250);
    run_batch(&runtime, std::slice::from_ref(&charge), "ChargePayment").await;
    let twice = process(
        &runtime,
        &[compensation(&charge, 1), compensation(&charge, 1)],
        "RefundPayment",
    )
    .await;
    assert!(matches!(twice[0], Processed::Executed(_)), "{twice:?}");
    assert_eq!(
        runtime.batches_rerun(),
        2,
        "the duplicate made the batch run again one by one"
    );
    assert!(
        matches!(twice[1], Processed::Replayed(_)),
        "the duplicate replays: {twice:?}"
    );
    assert_eq!(
        (
            data(&twice[0])["refunded_cents"].clone(),
            data(&twice[1])["refunded_cents"].clone()
        ),
        (json!(250), json!(250))
    );
    assert_eq!(env.balance("kai").await, 1_000, "refunded once");

    // A retry of the whole batch replays every stored reply and changes nothing.
    let retried: Vec<(CommandEnvelope, Uuid)> = refunds.iter().map(|r| compensation(r, 2)).collect();
    let again = process(&runtime, &retried, "RefundPayment").await;
    for (first, second) in processed.iter().zip(&again) {
        assert!(matches!(second, Processed::Replayed(_)), "{second:?}");
        assert_eq!(data(first), data(second));
        assert_eq!(second.reply().attempt, 2);
    }
    assert_eq!(
        (env.balance("jo").await, env.balance("kai").await),
        (1_000, 1_000),
        "nothing refunded twice"
    );
    env.stop().await;
}

/// Cancellations on the direct path: one statement cancels the created
/// orders under their locks, with their fencing tokens; a cancellation
/// whose creation never ran leaves the tombstone instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellations_in_one_batch_cancel_each_created_order() {
    use skald_participants::order::{OrderParticipant, OrderStore};
    let mut env = TestEnv::start(Setup::only(Which::Order)).await;
    let store = OrderStore { shards: env.dbs.shards };
    let conn = skald_participants::lock::connect(REDIS).await.expect("redis");
    let locks = Locks::new(
        conn,
        &env.names.redis_prefix(),
        Duration::from_secs(5),
        Duration::from_secs(5),
    );
    let runtime = runtime_on(&env, env.dbs.orders.clone(), OrderParticipant { store }, Some(locks));
    let creations: Vec<(CommandEnvelope, Uuid)> = (0..5)
        .map(|_| action("create_order", "jo", &[("sku-1", 1)], 10))
        .collect();
    run_batch(&runtime, &creations, "CreateOrder").await;
    let mut fences = Vec::new();
    for (_, order_id) in &creations {
        let (status, fence) = store
            .status(&env.dbs.orders[0], *order_id)
            .await
            .expect("order")
            .expect("row");
        assert_eq!(status, "PENDING");
        fences.push(fence);
    }
    let never_created = action("create_order", "jo", &[("sku-1", 1)], 10);
    let mut cancels: Vec<(CommandEnvelope, Uuid)> = creations.iter().map(|c| compensation(c, 1)).collect();
    cancels.push(compensation(&never_created, 1));
    let processed = process(&runtime, &cancels, "CancelOrder").await;
    assert_eq!(
        runtime.batches_rerun(),
        0,
        "the creations and the cancellations each committed as one batch"
    );
    for (i, p) in processed.iter().enumerate().take(5) {
        assert!(matches!(p, Processed::Executed(_)), "{p:?}");
        assert_eq!(data(p)["status"], "CANCELLED", "order {i}: {p:?}");
        let (status, fence) = store
            .status(&env.dbs.orders[0], creations[i].1)
            .await
            .expect("order")
            .expect("row");
        assert_eq!(status, "CANCELLED", "order {i}");
        assert!(fence > fences[i], "order {i}: the cancellation wrote its newer fence");
    }
    assert_eq!(data(&processed[5]), json!({"noop": true}), "the creation never ran");
    let late = process(&runtime, std::slice::from_ref(&never_created), "CreateOrder").await;
    assert_eq!(
        late[0].reply().outcome,
        skald_wire::contract::ReplyOutcome::Failure,
        "{late:?}"
    );
    assert_eq!(
        store.status(&env.dbs.orders[0], never_created.1).await.expect("order"),
        None,
        "the late creation is refused"
    );
    env.stop().await;
}

/// Releases on the direct path: one statement gives each SKU back what the
/// batch's reservations took of it; a release of a refused reservation, or
/// of one that never ran, is a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_in_one_batch_give_back_each_reservation() {
    use skald_participants::inventory::InventoryParticipant;
    let mut env = TestEnv::start(Setup::only(Which::Inventory)).await;
    env.seed(&[], &[("sku-a", 10), ("sku-b", 10)]).await;
    let runtime = runtime(&env, env.dbs.inventory.clone(), InventoryParticipant);
    let reservations = [
        action("reserve_stock", "x", &[("sku-a", 2), ("sku-b", 1)], 1),
        action("reserve_stock", "x", &[("sku-a", 3)], 1),
        action("reserve_stock", "x", &[("sku-b", 4)], 1),
        action("reserve_stock", "x", &[("sku-a", 100)], 1),
    ];
    let replies = run_batch(&runtime, &reservations, "ReserveStock").await;
    assert_eq!(outcomes(&replies)[3], ("failure", "insufficient_stock: sku-a"));
    assert_eq!((env.available("sku-a").await, env.available("sku-b").await), (5, 5));
    let never_reserved = action("reserve_stock", "x", &[("sku-a", 1)], 1);
    let mut releases: Vec<(CommandEnvelope, Uuid)> = reservations.iter().map(|r| compensation(r, 1)).collect();
    releases.push(compensation(&never_reserved, 1));
    let processed = process(&runtime, &releases, "ReleaseStock").await;
    assert!(
        processed.iter().all(|p| matches!(p, Processed::Executed(_))),
        "{processed:?}"
    );
    assert_eq!(runtime.batches_rerun(), 0, "each batch committed as one");
    let lines: Vec<Value> = processed.iter().map(|p| data(p)["released_lines"].clone()).collect();
    assert_eq!(lines[..3], [json!(2), json!(1), json!(1)], "{processed:?}");
    assert_eq!(
        data(&processed[3]),
        json!({"noop": true}),
        "the reservation was refused"
    );
    assert_eq!(data(&processed[4]), json!({"noop": true}), "the reservation never ran");
    assert_eq!(
        (env.available("sku-a").await, env.available("sku-b").await),
        (10, 10),
        "every reserved unit given back once"
    );
    for (i, released) in [(0, 2), (1, 1), (2, 1)] {
        let rows = env.reservations(reservations[i].1).await;
        assert_eq!(rows.len(), released, "order {i}: {rows:?}");
        assert!(
            rows.iter().all(|(_, _, status)| status == "RELEASED"),
            "order {i}: {rows:?}"
        );
    }
    env.stop().await;
}
