//! The dead-letter queue, for operators: browse it without consuming, and
//! replay one message to where it was first published.
//!
//! Browsing takes messages with `basic.get` without acknowledging them and
//! then closes the channel, which hands every one back to the queue.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use lapin::options::{BasicAckOptions, BasicGetOptions, ConfirmSelectOptions};
use skald_wire::amqp::{OutgoingMessage, Publisher, header_str, string_headers};
use skald_wire::contract::{
    DEAD_LETTER_QUEUE, HEADER_ORIGINAL_EXCHANGE, HEADER_ORIGINAL_QUEUE, HEADER_ORIGINAL_ROUTING_KEY, HEADER_REASON,
};
use uuid::Uuid;

/// One dead letter, as shown to an operator.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub message_id: String,
    pub message_type: String,
    pub reason: String,
    pub original_queue: String,
    pub body: String,
}

fn describe(d: &lapin::message::Delivery) -> DeadLetter {
    let props = &d.properties;
    DeadLetter {
        message_id: props
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        message_type: props.kind().as_ref().map(|s| s.as_str().to_owned()).unwrap_or_default(),
        reason: header_str(props, HEADER_REASON)
            .or_else(|| {
                props
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get("x-first-death-reason").map(|v| format!("{v:?}")))
            })
            .unwrap_or_else(|| "(no reason recorded)".to_owned()),
        original_queue: header_str(props, HEADER_ORIGINAL_QUEUE).unwrap_or_default(),
        body: String::from_utf8_lossy(&d.data).chars().take(500).collect(),
    }
}

/// Up to `limit` dead letters, oldest first; the queue is left as it was.
pub async fn list(amqp_url: &str, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let conn = skald_wire::amqp::connect(amqp_url, "sagactl-dlq")
        .await
        .context("RabbitMQ")?;
    let channel = conn.create_channel().await?;
    let mut out = Vec::new();
    while out.len() < limit {
        match channel
            .basic_get(DEAD_LETTER_QUEUE.into(), BasicGetOptions { no_ack: false })
            .await
            .context("reading skald.dead-letters")?
        {
            Some(m) => out.push(describe(&m.delivery)),
            None => break,
        }
    }
    let _ = channel.close(200, "browsed".into()).await; // unacked: all go back
    let _ = conn.close(200, "done".into()).await;
    Ok(out)
}

/// Re-sends the dead letter whose `message_id` is `id` to its original
/// exchange and routing key (under a new message id), then removes it.
pub async fn replay(amqp_url: &str, id: &str) -> anyhow::Result<DeadLetter> {
    let conn = skald_wire::amqp::connect(amqp_url, "sagactl-dlq")
        .await
        .context("RabbitMQ")?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let publisher = Publisher::open(&conn).await?;
    let mut found = None;
    while let Some(m) = channel
        .basic_get(DEAD_LETTER_QUEUE.into(), BasicGetOptions { no_ack: false })
        .await
        .context("reading skald.dead-letters")?
    {
        let matches = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .is_some_and(|m| m.as_str() == id);
        if matches {
            found = Some(m.delivery);
            break;
        }
    }
    let Some(delivery) = found else {
        let _ = channel.close(200, "not found".into()).await;
        bail!("no dead letter with message id {id}");
    };
    let props = &delivery.properties;
    let exchange = header_str(props, HEADER_ORIGINAL_EXCHANGE).context("the dead letter has no original exchange")?;
    let routing_key =
        header_str(props, HEADER_ORIGINAL_ROUTING_KEY).context("the dead letter has no original routing key")?;
    let mut headers: BTreeMap<String, String> = string_headers(props)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("x-skald-"))
        .collect();
    headers.insert("x-skald-replay-of".to_owned(), id.to_owned());
    let message = OutgoingMessage {
        message_id: Uuid::now_v7(),
        exchange,
        routing_key,
        message_type: props.kind().as_ref().map(|s| s.as_str().to_owned()).unwrap_or_default(),
        correlation_id: props
            .correlation_id()
            .as_ref()
            .and_then(|c| Uuid::parse_str(c.as_str()).ok())
            .unwrap_or(Uuid::nil()),
        body: delivery.data.clone(),
        headers,
    };
    publisher
        .publish_all(std::slice::from_ref(&message))
        .await
        .context("re-publishing")?;
    delivery.acker.ack(BasicAckOptions::default()).await?;
    let shown = describe(&delivery);
    publisher.close().await;
    let _ = channel.close(200, "replayed".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(shown)
}
