//! The participant runtime over AMQP: duplicates, the barrier, dead letters.

use std::time::Duration;

use serde_json::{Value, json};
use skald_participants::app::Which;
use skald_tests::{Setup, TestEnv, header, publish_raw, take_messages};
use skald_wire::contract::{COMMANDS_EXCHANGE, DEAD_LETTER_QUEUE, HEADER_REASON, REPLIES_QUEUE};
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(20);

pub(crate) fn command(saga_id: Uuid, order_id: Uuid, attempt: u32, kind: &str, customer: &str, total: i64) -> Vec<u8> {
    json!({
        "saga_id": saga_id,
        "step": "charge_payment",
        "attempt": attempt,
        "kind": kind,
        "payload": {
            "order_id": order_id,
            "customer_id": customer,
            "currency": "EUR",
            "items": [{"sku": "sku-1", "quantity": 1, "unit_price_cents": total}],
            "total_cents": total,
        },
    })
    .to_string()
    .into_bytes()
}

/// Publishes one command to the payment participant and takes one reply.
async fn ask_payment(ch: &lapin::Channel, message_type: &str, body: &[u8]) -> Vec<(Value, lapin::types::FieldTable)> {
    publish_raw(ch, COMMANDS_EXCHANGE, "payment", message_type, body).await;
    take_messages(ch, REPLIES_QUEUE, 1, WITHIN).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_command_has_one_effect_and_gets_the_same_reply() {
    let mut env = TestEnv::start(Setup::only(Which::Payment)).await;
    env.seed(&[("erin", 1_000)], &[]).await;
    let (_conn, ch) = env.amqp().await;
    let (saga, order_id) = (Uuid::now_v7(), Uuid::now_v7());
    let cmd = command(saga, order_id, 1, "action", "erin", 300);
    publish_raw(&ch, COMMANDS_EXCHANGE, "payment", "ChargePayment", &cmd).await;
    publish_raw(&ch, COMMANDS_EXCHANGE, "payment", "ChargePayment", &cmd).await;
    let replies = take_messages(&ch, REPLIES_QUEUE, 2, WITHIN).await;
    assert_eq!(replies[0].0, replies[1].0, "the duplicate gets the stored reply");
    assert_eq!(replies[0].0["outcome"], "success");
    assert_eq!(env.balance("erin").await, 700, "charged once");
    assert_eq!(env.payments(order_id).await, vec![("CHARGED".to_owned(), 300)]);

    // A retry (new attempt) of the same step: the stored reply, with its own attempt number.
    let retry = ask_payment(&ch, "ChargePayment", &command(saga, order_id, 2, "action", "erin", 300)).await;
    assert_eq!(retry[0].0["attempt"], 2);
    assert_eq!(retry[0].0["outcome"], "success");
    assert_eq!(env.balance("erin").await, 700, "still charged once");
    env.stop().await;
}

/// The inbox retention deletes barrier rows by age, also those of a saga
/// left `STUCK` longer than that: a compensation retried afterwards finds no
/// action row, and must still see the charge and refund it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_whose_action_lost_its_barrier_row_still_undoes_it() {
    let mut env = TestEnv::start(Setup::only(Which::Payment)).await;
    env.seed(&[("gina", 1_000)], &[]).await;
    let (_conn, ch) = env.amqp().await;
    let (saga, order_id) = (Uuid::now_v7(), Uuid::now_v7());
    let charged = ask_payment(&ch, "ChargePayment", &command(saga, order_id, 1, "action", "gina", 300)).await;
    assert_eq!(charged[0].0["outcome"], "success");
    assert_eq!(env.balance("gina").await, 700);

    let deleted = sqlx::query("DELETE FROM inbox WHERE saga_id = $1")
        .bind(saga)
        .execute(&env.dbs.payments)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(deleted, 1, "the charge's barrier row, as the retention would");

    let refunded = ask_payment(
        &ch,
        "RefundPayment",
        &command(saga, order_id, 1, "compensation", "gina", 300),
    )
    .await;
    assert_eq!(refunded[0].0["outcome"], "success");
    assert_eq!(refunded[0].0["data"]["refunded_cents"], 300, "{:?}", refunded[0].0);
    assert_eq!(env.balance("gina").await, 1_000, "the money is back");
    assert_eq!(env.payments(order_id).await, vec![("REFUNDED".to_owned(), 300)]);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_before_its_action_is_a_no_op_and_the_late_action_is_refused() {
    let mut env = TestEnv::start(Setup::only(Which::Payment)).await;
    env.seed(&[("frank", 1_000)], &[]).await;
    let (_conn, ch) = env.amqp().await;
    let (saga, order_id) = (Uuid::now_v7(), Uuid::now_v7());
    let comp = ask_payment(
        &ch,
        "RefundPayment",
        &command(saga, order_id, 1, "compensation", "frank", 400),
    )
    .await;
    assert_eq!(comp[0].0["kind"], "compensation");
    assert_eq!(comp[0].0["outcome"], "success");
    assert_eq!(comp[0].0["data"]["noop"], true);

    let late = ask_payment(
        &ch,
        "ChargePayment",
        &command(saga, order_id, 1, "action", "frank", 400),
    )
    .await;
    assert_eq!(late[0].0["kind"], "action");
    assert_eq!(late[0].0["outcome"], "failure");
    assert_eq!(late[0].0["retryable"], false);
    assert!(
        late[0].0["reason"].as_str().unwrap().contains("barrier"),
        "{}",
        late[0].0
    );
    assert_eq!(env.balance("frank").await, 1_000, "the late action had no effect");
    assert!(env.payments(order_id).await.is_empty());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_command_is_dead_lettered_and_the_participant_keeps_serving() {
    let mut env = TestEnv::start(Setup::only(Which::Payment)).await;
    env.seed(&[("gina", 1_000)], &[]).await;
    let (_conn, ch) = env.amqp().await;
    publish_raw(
        &ch,
        COMMANDS_EXCHANGE,
        "payment",
        "ChargePayment",
        b"\x00 this is not json",
    )
    .await;
    publish_raw(
        &ch,
        COMMANDS_EXCHANGE,
        "payment",
        "ChargePayment",
        br#"{"saga_id": "x"}"#,
    )
    .await;
    let dead = take_messages(&ch, DEAD_LETTER_QUEUE, 2, WITHIN).await;
    for (body, headers) in &dead {
        let reason = header(headers, HEADER_REASON).unwrap_or_default();
        assert!(reason.contains("undecodable command"), "reason {reason:?} for {body}");
        assert_eq!(
            header(headers, "x-skald-original-queue").as_deref(),
            Some("skald.payment.commands")
        );
    }
    // A command of an unknown type is dead-lettered too, not retried forever.
    let order_id = Uuid::now_v7();
    publish_raw(
        &ch,
        COMMANDS_EXCHANGE,
        "payment",
        "StealMoney",
        &command(Uuid::now_v7(), order_id, 1, "action", "gina", 1),
    )
    .await;
    let dead = take_messages(&ch, DEAD_LETTER_QUEUE, 1, WITHIN).await;
    assert!(header(&dead[0].1, HEADER_REASON).unwrap().contains("StealMoney"));

    let replies = ask_payment(
        &ch,
        "ChargePayment",
        &command(Uuid::now_v7(), order_id, 1, "action", "gina", 250),
    )
    .await;
    let reply: &Value = &replies[0].0;
    assert_eq!(reply["outcome"], "success", "{reply}");
    assert_eq!(env.balance("gina").await, 750);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lists_dead_letters_without_consuming_them_and_replays_one() {
    let mut env = TestEnv::start(Setup::only(Which::Payment)).await;
    env.seed(&[("jack", 1_000)], &[]).await;
    let (conn, ch) = env.amqp().await;
    // A good command that was dead-lettered earlier (say, while a bug was being fixed).
    let order_id = Uuid::now_v7();
    let body = command(Uuid::now_v7(), order_id, 1, "action", "jack", 125);
    let message_id = Uuid::now_v7();
    skald_tests::publish_dead_letter(
        &conn,
        message_id,
        "payment",
        "ChargePayment",
        "redelivered 11 times",
        body,
    )
    .await;

    let url = env.names.amqp_url();
    let (listed, more) = skald_tools::dlq::list(&url, 10).await.unwrap();
    assert!(!more);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].message_id, message_id.to_string());
    assert_eq!(listed[0].reason, "redelivered 11 times");
    assert_eq!(
        skald_tools::dlq::list(&url, 10).await.unwrap().0.len(),
        1,
        "listing consumes nothing"
    );
    assert!(env.payments(order_id).await.is_empty());

    let (replayed, _) = skald_tools::dlq::replay(&url, &message_id.to_string()).await.unwrap();
    assert_eq!(replayed.message_type, "ChargePayment");
    let reply = take_messages(&ch, REPLIES_QUEUE, 1, WITHIN).await;
    assert_eq!(reply[0].0["outcome"], "success");
    assert_eq!(env.payments(order_id).await, vec![("CHARGED".to_owned(), 125)]);
    assert!(
        skald_tools::dlq::list(&url, 10).await.unwrap().0.is_empty(),
        "replayed letters leave the queue"
    );
    assert!(skald_tools::dlq::replay(&url, &message_id.to_string()).await.is_err());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_for_an_unknown_saga_or_step_are_dead_lettered_by_the_coordinator() {
    let mut env = TestEnv::start(Setup {
        participants: vec![],
        ..Setup::default()
    })
    .await;
    let (_conn, ch) = env.amqp().await;
    let reply = |saga_id: Uuid, step: &str| {
        json!({"saga_id": saga_id, "step": step, "attempt": 1, "kind": "action",
               "outcome": "success", "retryable": false, "reason": null, "data": {}})
        .to_string()
        .into_bytes()
    };
    let replies = skald_wire::contract::REPLIES_EXCHANGE;
    publish_raw(
        &ch,
        replies,
        "coordinator",
        "ActionSucceeded",
        &reply(Uuid::now_v7(), "create_order"),
    )
    .await;
    publish_raw(&ch, replies, "coordinator", "ActionSucceeded", b"{not json").await;
    // A real saga, but a step its definition does not have.
    env.seed(&[("kate", 100)], &[]).await;
    let (_, saga_id) = env.place_order(&skald_tests::order("kate", &[("s", 1, 1)])).await;
    publish_raw(
        &ch,
        replies,
        "coordinator",
        "ActionSucceeded",
        &reply(saga_id, "teleport"),
    )
    .await;

    let dead = take_messages(&ch, DEAD_LETTER_QUEUE, 3, WITHIN).await;
    let mut reasons: Vec<String> = dead
        .iter()
        .map(|(_, h)| header(h, HEADER_REASON).unwrap_or_default())
        .collect();
    reasons.sort();
    assert!(reasons[0].contains("has no step \"teleport\""), "{reasons:?}");
    assert!(reasons[1].contains("undecodable reply"), "{reasons:?}");
    assert!(reasons[2].contains("unknown saga"), "{reasons:?}");
    // The saga itself is untouched: still waiting on its first step.
    assert_eq!(env.saga(saga_id).await["status"], "RUNNING");
    env.stop().await;
}

/// Commands handled together in one batch transaction keep every guarantee
/// of one-by-one handling: a duplicate has one effect and replays the stored
/// reply, a compensation before its action leaves a tombstone that refuses
/// the late action, and a business failure rolls back only its own changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_handled_in_one_batch_keep_the_barrier_and_roll_back_only_their_own_changes() {
    use skald_participants::payment::PaymentParticipant;
    use skald_participants::runtime::{Incoming, Processed};

    let mut env = TestEnv::start(Setup::only(Which::Payment)).await;
    env.seed(&[("gina", 1_000), ("hugo", 1_000), ("ivan", 100)], &[]).await;
    let runtime = crate::batched::runtime(&env, env.dbs.payments.clone(), PaymentParticipant);
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let (order_a, order_b, order_c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let parse =
        |bytes: Vec<u8>| serde_json::from_slice::<skald_wire::contract::CommandEnvelope>(&bytes).expect("command");
    let commands = [
        (parse(command(a, order_a, 1, "action", "gina", 300)), "ChargePayment"),
        (parse(command(a, order_a, 2, "action", "gina", 300)), "ChargePayment"),
        (
            parse(command(b, order_b, 1, "compensation", "hugo", 400)),
            "RefundPayment",
        ),
        (parse(command(b, order_b, 1, "action", "hugo", 400)), "ChargePayment"),
        (parse(command(c, order_c, 1, "action", "ivan", 500)), "ChargePayment"),
    ];
    let batch: Vec<Incoming<'_>> = commands
        .iter()
        .map(|(command, message_type)| Incoming {
            command,
            message_type,
            span: tracing::Span::none(),
        })
        .collect();
    let outcomes: Vec<Processed> = runtime
        .process_batch(&batch)
        .await
        .into_iter()
        .map(|o| o.expect("every command gets a reply"))
        .collect();
    let outcome = |i: usize| serde_json::to_value(outcomes[i].reply()).expect("reply");

    assert!(matches!(outcomes[0], Processed::Executed(_)), "{:?}", outcomes[0]);
    assert_eq!(outcome(0)["outcome"], "success");
    assert!(
        matches!(outcomes[1], Processed::Replayed(_)),
        "the duplicate replays: {:?}",
        outcomes[1]
    );
    assert_eq!(outcome(1)["outcome"], "success");
    assert_eq!(outcome(1)["attempt"], 2, "with its own attempt number");
    assert_eq!(env.balance("gina").await, 700, "charged once");
    assert_eq!(env.payments(order_a).await, vec![("CHARGED".to_owned(), 300)]);

    assert_eq!(
        outcome(2)["data"]["noop"],
        true,
        "compensation before its action is a no-op"
    );
    assert_eq!(outcome(3)["outcome"], "failure", "the late action is refused");
    assert_eq!(outcome(3)["retryable"], false);
    assert_eq!(
        env.balance("hugo").await,
        1_000,
        "the refused action's charge was rolled back"
    );
    assert!(env.payments(order_b).await.is_empty());

    assert_eq!(outcome(4)["outcome"], "failure");
    assert_eq!(outcome(4)["reason"], "insufficient_balance");
    assert_eq!(env.balance("ivan").await, 100);
    env.stop().await;
}

/// Consumers hand each batch's `multiple` ack to [`AckQueue`] and go on
/// without waiting for it. Many batches handed over back to back must
/// still be acked in order: an ack below one already sent names a tag the
/// broker has forgotten, and it closes the channel (every unacked delivery
/// goes back to the queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_acks_handed_over_back_to_back_settle_every_delivery() {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;

    let env = TestEnv::start(Setup::only(Which::Payment)).await;
    let (conn, ch) = env.amqp().await;
    let queue = format!("{}.acks", env.names.id);
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    const N: usize = 60;
    for i in 0..N {
        publish_raw(&ch, "", &queue, "Probe", format!("{{\"n\":{i}}}").as_bytes()).await;
    }
    let consuming = skald_wire::amqp::consumer_channel(&conn, N as u16)
        .await
        .expect("channel");
    let mut consumer = consuming
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut deliveries = Vec::with_capacity(N);
    while deliveries.len() < N {
        let next = tokio::time::timeout(WITHIN, consumer.next())
            .await
            .expect("deliveries in time");
        deliveries.push(next.expect("stream open").expect("delivery"));
    }
    let acks = skald_wire::amqp::AckQueue::spawn(&queue);
    for batch in deliveries.chunks(7) {
        acks.ack_up_to(batch.last().expect("non-empty chunk"), batch.len() as u64);
    }
    acks.drain().await;
    assert!(consuming.status().connected(), "an ack out of order closed the channel");
    consuming.close(200, "done".into()).await.expect("close");
    let left = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    assert_eq!(
        left.message_count(),
        0,
        "every delivery is acked once the queue drained"
    );
}
