//! The dead-letter queue, for operators (`sagactl dlq`, `GET
//! /v1/dead-letters`, the dashboard): browse it without consuming, and
//! replay one message to where it was first published.
//!
//! Browsing takes messages with `basic.get` without acknowledging them and
//! then closes the channel, which hands every one back to the queue (in
//! their order). While a browse runs, the letters it holds are invisible to
//! another browse; nothing else consumes this queue.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::{Channel, Connection};
use skald_wire::amqp::{OutgoingMessage, Publisher, header_str, string_headers};
use skald_wire::contract::{
    DEAD_LETTER_QUEUE, HEADER_ORIGINAL_EXCHANGE, HEADER_ORIGINAL_QUEUE, HEADER_ORIGINAL_ROUTING_KEY, HEADER_REASON,
};
use uuid::Uuid;

/// Characters of a body shown at most.
pub const BODY_SHOWN: usize = 4000;
/// Header that a replayed copy carries: the message id of the dead letter.
pub const HEADER_REPLAY_OF: &str = "x-skald-replay-of";

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Amqp(#[from] skald_wire::amqp::Error),
    #[error("no dead letter with message id {0:?}")]
    NotFound(String),
    #[error("dead letter {id:?} cannot be replayed: it records no {what}")]
    NotReplayable { id: String, what: &'static str },
}

impl From<lapin::Error> for Error {
    fn from(e: lapin::Error) -> Self {
        Error::Amqp(e.into())
    }
}

impl Error {
    /// The broker may come back; the others are final.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Amqp(e) if e.is_transient())
    }
}

/// One dead letter, as shown to an operator.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// AMQP `message_id` (empty if the publisher set none).
    pub message_id: String,
    /// AMQP `type`, e.g. `ChargePayment` (empty if none).
    pub message_type: String,
    /// Why it was dead-lettered (`x-skald-reason`, or the broker's own reason).
    pub reason: String,
    /// The queue it was consumed from (empty if unknown).
    pub original_queue: String,
    /// Where it was first published; a letter without both cannot be replayed.
    pub original_exchange: Option<String>,
    pub original_routing_key: Option<String>,
    /// AMQP `correlation_id`: the saga id, for Skald's messages.
    pub correlation_id: Option<String>,
    /// When it was published to the dead-letter exchange (AMQP `timestamp`).
    pub timestamp: Option<DateTime<Utc>>,
    /// The first characters of the body, as text.
    pub body: String,
    /// The body is longer than what `body` shows.
    pub body_truncated: bool,
}

impl DeadLetter {
    fn of(d: &lapin::message::Delivery) -> Self {
        let props = &d.properties;
        let short = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
        let text = String::from_utf8_lossy(&d.data);
        let body: String = text.chars().take(BODY_SHOWN).collect();
        DeadLetter {
            message_id: short(props.message_id()).unwrap_or_default(),
            message_type: short(props.kind()).unwrap_or_default(),
            reason: header_str(props, HEADER_REASON)
                .or_else(|| {
                    header_str(props, "x-first-death-reason").map(|r| format!("dead-lettered by the broker: {r}"))
                })
                .unwrap_or_else(|| "(no reason recorded)".to_owned()),
            original_queue: header_str(props, HEADER_ORIGINAL_QUEUE)
                .or_else(|| header_str(props, "x-first-death-queue"))
                .unwrap_or_default(),
            original_exchange: header_str(props, HEADER_ORIGINAL_EXCHANGE),
            original_routing_key: header_str(props, HEADER_ORIGINAL_ROUTING_KEY),
            correlation_id: short(props.correlation_id()),
            timestamp: props
                .timestamp()
                .and_then(|t| i64::try_from(t).ok())
                .and_then(|t| DateTime::from_timestamp(t, 0)),
            body_truncated: body.len() < text.len(),
            body,
        }
    }
}

/// Up to `limit` dead letters, oldest first, and whether more are queued;
/// the queue is left as it was.
pub async fn list(amqp_url: &str, limit: usize) -> Result<(Vec<DeadLetter>, bool)> {
    let conn = skald_wire::amqp::connect(amqp_url, "skald-dlq-browse").await?;
    let result = browse(&conn, limit).await;
    let _ = conn.close(200, "browsed".into()).await;
    result
}

async fn browse(conn: &Connection, limit: usize) -> Result<(Vec<DeadLetter>, bool)> {
    let channel = conn.create_channel().await?;
    let mut out = Vec::new();
    let mut more = false;
    while let Some(m) = next(&channel).await? {
        if out.len() == limit {
            more = true;
            break;
        }
        out.push(DeadLetter::of(&m));
    }
    // Unacked: closing the channel hands every letter back.
    let _ = channel.close(200, "browsed".into()).await;
    Ok((out, more))
}

async fn next(channel: &Channel) -> Result<Option<lapin::message::Delivery>> {
    let got = channel
        .basic_get(DEAD_LETTER_QUEUE.into(), BasicGetOptions { no_ack: false })
        .await?;
    Ok(got.map(|m| m.delivery))
}

/// Re-sends the dead letter whose `message_id` is `id` to its original
/// exchange and routing key (under a new message id, with header
/// `x-skald-replay-of`), waits for the broker's confirm, then removes it.
/// Returns the letter and the new message id.
pub async fn replay(amqp_url: &str, id: &str) -> Result<(DeadLetter, Uuid)> {
    let conn = skald_wire::amqp::connect(amqp_url, "skald-dlq-replay").await?;
    let result = replay_on(&conn, id).await;
    let _ = conn.close(200, "done".into()).await;
    result
}

async fn replay_on(conn: &Connection, id: &str) -> Result<(DeadLetter, Uuid)> {
    let channel = conn.create_channel().await?;
    let publisher = Publisher::open(conn).await?;
    let result = async {
        // Letters taken on the way stay unacked, and go back when the channel closes.
        let delivery = loop {
            match next(&channel).await? {
                Some(d) if d.properties.message_id().as_ref().is_some_and(|m| m.as_str() == id) => break d,
                Some(_) => continue,
                None => return Err(Error::NotFound(id.to_owned())),
            }
        };
        let message = replay_message(&delivery, id)?;
        publisher.publish_all(std::slice::from_ref(&message)).await?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        tracing::info!(message_id = id, new_message_id = %message.message_id, exchange = %message.exchange,
            routing_key = %message.routing_key, "dead letter replayed");
        Ok((DeadLetter::of(&delivery), message.message_id))
    }
    .await;
    publisher.close().await;
    let _ = channel.close(200, "replay done".into()).await;
    result
}

/// The copy to publish: same body, type, correlation id and headers (but
/// Skald's dead-letter headers), to the original exchange and routing key.
fn replay_message(delivery: &lapin::message::Delivery, id: &str) -> Result<OutgoingMessage> {
    let props = &delivery.properties;
    let not_replayable = |what| Error::NotReplayable {
        id: id.to_owned(),
        what,
    };
    let exchange = header_str(props, HEADER_ORIGINAL_EXCHANGE).ok_or_else(|| not_replayable("original exchange"))?;
    let routing_key =
        header_str(props, HEADER_ORIGINAL_ROUTING_KEY).ok_or_else(|| not_replayable("original routing key"))?;
    let mut headers: BTreeMap<String, String> = string_headers(props)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("x-skald-"))
        .collect();
    headers.insert(HEADER_REPLAY_OF.to_owned(), id.to_owned());
    Ok(OutgoingMessage {
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
    })
}
