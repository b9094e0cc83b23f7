//! The outbox relay on its own: rows handed off by their writer and rows it
//! must find in the table (written by another process, or left by a crash)
//! are each published once, then deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use skald_tests::{Setup, TestEnv, take_messages};
use skald_wire::amqp::OutgoingMessage;
use skald_wire::contract::COMMANDS_EXCHANGE;
use skald_wire::faults::Faults;
use skald_wire::outbox::{self, Handoff, Relay};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(20);
const QUEUE: &str = "relay.test";
const KEY: &str = "relay-test";

fn message(n: u32) -> OutgoingMessage {
    OutgoingMessage {
        message_id: Uuid::now_v7(),
        exchange: COMMANDS_EXCHANGE.to_owned(),
        routing_key: KEY.to_owned(),
        message_type: "RelayTest".to_owned(),
        correlation_id: Uuid::now_v7(),
        body: format!("{{\"n\":{n}}}").into_bytes(),
        headers: BTreeMap::new(),
    }
}

/// Writes `messages` to the outbox in one transaction; returns the rows.
async fn write(pool: &sqlx::PgPool, messages: Vec<OutgoingMessage>) -> Vec<outbox::Written> {
    let mut tx = pool.begin().await.expect("begin");
    let rows = outbox::insert(&mut tx, messages).await.expect("insert");
    tx.commit().await.expect("commit");
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_off_and_stray_rows_are_each_published_once_then_deleted() {
    let env = TestEnv::start(Setup {
        coordinator: false,
        participants: vec![],
        ..Setup::default()
    })
    .await;
    let pool = env.dbs.payments.clone();
    let (_conn, ch) = env.amqp().await;
    ch.queue_declare(QUEUE.into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("queue");
    ch.queue_bind(
        QUEUE.into(),
        COMMANDS_EXCHANGE.into(),
        KEY.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");

    // Two rows handed off by their writer; one written "by another
    // process" (never handed off) a while ago, as a crash would leave it.
    let handoff = Handoff::new();
    let handed = write(&pool, vec![message(1), message(2)]).await;
    let stray = write(&pool, vec![message(3)]).await;
    assert_eq!((handed.len(), stray.len()), (2, 1));
    sqlx::query("UPDATE outbox SET created_at = now() - interval '1 minute' WHERE id = $1")
        .bind(stray[0].0)
        .execute(&pool)
        .await
        .expect("backdate");
    handoff.committed(handed);

    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(
        Relay {
            pool: pool.clone(),
            amqp_url: env.names.amqp_url(),
            name: "relay-test".to_owned(),
            topology: env.topology.clone(),
            participants: vec![],
            handoff: handoff.clone(),
            batch_size: 16,
            poll_interval: Duration::from_millis(100),
            linger: Duration::ZERO,
            faults: Faults::default(),
        }
        .run(shutdown.child_token()),
    );

    let got = take_messages(&ch, QUEUE, 3, WITHIN).await;
    let ids: BTreeSet<String> = got.iter().map(|(body, _)| body["n"].to_string()).collect();
    assert_eq!(ids, BTreeSet::from(["1".to_owned(), "2".to_owned(), "3".to_owned()]));

    // Published rows are deleted (a little later, in one statement).
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let left = outbox::backlog(&pool).await.expect("backlog");
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} outbox rows never deleted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A later row comes next on the queue: nothing before it was sent twice.
    let later = write(&pool, vec![message(4)]).await;
    handoff.committed(later);
    let next = take_messages(&ch, QUEUE, 1, WITHIN).await;
    assert_eq!(next[0].0["n"], 4, "a row was published twice: {:?}", next[0].0);

    shutdown.cancel();
    relay.await.expect("relay task");
    assert_eq!(
        outbox::backlog(&pool).await.expect("backlog"),
        0,
        "deleted before the relay stopped"
    );
}
