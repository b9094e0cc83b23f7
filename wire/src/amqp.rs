//! AMQP plumbing: connection with backoff, topology, confirmed publishing.
//!
//! Channels and connections are disposable (as in vector's AMQP sink): a
//! caller that gets an error drops them and builds new ones through
//! [`connect_with_backoff`], which also redeclares the topology.

use std::collections::BTreeMap;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::options::{
    BasicAckOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind, PublisherConfirm};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::contract::{
    COMMANDS_EXCHANGE, CONTENT_TYPE_JSON, DEAD_LETTER_QUEUE, DLX_EXCHANGE, REPLIES_EXCHANGE, REPLIES_QUEUE,
    REPLIES_ROUTING_KEY, command_queue,
};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("AMQP: {0}")]
    Lapin(#[from] lapin::Error),
    #[error("broker refused message {0} (nack)")]
    Nacked(Uuid),
    #[error("message {0} was unroutable (no queue bound to {1:?} with key {2:?})")]
    Unroutable(Uuid, String, String),
    #[error("publisher confirms are not enabled on this channel")]
    NoConfirms,
    #[error("shut down while connecting to RabbitMQ")]
    Cancelled,
}

impl Error {
    /// All AMQP errors are transient: the broker may come back.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Error::Cancelled)
    }

    /// Whether the channel that gave this error must be replaced (a nack or
    /// an unroutable message leaves it usable).
    pub fn loses_channel(&self) -> bool {
        !matches!(self, Error::Unroutable(..) | Error::Nacked(_))
    }
}

/// Queue type for Skald's queues: `classic` on one node, `quorum` for a RabbitMQ cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
}

impl std::str::FromStr for QueueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(format!("AMQP_QUEUE_TYPE must be classic or quorum, not {other:?}")),
        }
    }
}

/// The storage version of classic queues (`x-queue-version`, RabbitMQ 3.10
/// and later). `Broker` (the default) sends no argument, so the broker's
/// default or an operator's policy decides: version 1 up to RabbitMQ 4.1,
/// version 2 from 4.2. Measured on RabbitMQ 3.10, version 2 shortened the
/// tail near saturation and doubled the broker's CPU per message at low
/// rates (see the README's Performance). RabbitMQ refuses to redeclare a
/// queue with another value, so every process must agree, and a change
/// needs the queues deleted first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClassicQueueVersion {
    V1,
    V2,
    #[default]
    Broker,
}

impl std::str::FromStr for ClassicQueueVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "1" => Ok(ClassicQueueVersion::V1),
            "2" => Ok(ClassicQueueVersion::V2),
            "broker" => Ok(ClassicQueueVersion::Broker),
            other => Err(format!(
                "AMQP_CLASSIC_QUEUE_VERSION must be 1, 2 or broker, not {other:?}"
            )),
        }
    }
}

/// How Skald's queues are declared. Every process must use the same
/// settings: RabbitMQ refuses a redeclaration with other arguments.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    pub queue_type: QueueType,
    /// Quorum queues only: deliveries after which the broker dead-letters a message.
    pub delivery_limit: Option<u32>,
    /// Classic queues only.
    pub classic_version: ClassicQueueVersion,
}

impl Topology {
    fn queue_args(&self) -> FieldTable {
        let mut args = self.storage_args();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(DLX_EXCHANGE.into()),
        );
        if let (QueueType::Quorum, Some(limit)) = (self.queue_type, self.delivery_limit) {
            args.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit as i32));
        }
        args
    }

    /// The queue type, and for classic queues their storage version.
    fn storage_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        match (self.queue_type, self.classic_version) {
            (QueueType::Quorum, _) => {
                args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            }
            (QueueType::Classic, ClassicQueueVersion::V1) => {
                args.insert("x-queue-version".into(), AMQPValue::LongInt(1));
            }
            (QueueType::Classic, ClassicQueueVersion::V2) => {
                args.insert("x-queue-version".into(), AMQPValue::LongInt(2));
            }
            (QueueType::Classic, ClassicQueueVersion::Broker) => {}
        }
        args
    }

    /// Declares the exchanges, the replies queue, the dead-letter queue and
    /// the command queues of `participants`. Idempotent.
    pub async fn declare(&self, channel: &Channel, participants: &[&str]) -> Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for (name, kind) in [
            (COMMANDS_EXCHANGE, ExchangeKind::Direct),
            (REPLIES_EXCHANGE, ExchangeKind::Direct),
            (DLX_EXCHANGE, ExchangeKind::Fanout),
        ] {
            channel
                .exchange_declare(name.into(), kind, durable, FieldTable::default())
                .await?;
        }
        let queue_opts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(DEAD_LETTER_QUEUE.into(), queue_opts, self.storage_args())
            .await?;
        channel
            .queue_bind(
                DEAD_LETTER_QUEUE.into(),
                DLX_EXCHANGE.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut queues = vec![(
            REPLIES_QUEUE.to_owned(),
            REPLIES_EXCHANGE,
            REPLIES_ROUTING_KEY.to_owned(),
        )];
        queues.extend(
            participants
                .iter()
                .map(|p| (command_queue(p), COMMANDS_EXCHANGE, (*p).to_owned())),
        );
        for (queue, exchange, key) in queues {
            channel
                .queue_declare(queue.as_str().into(), queue_opts, self.queue_args())
                .await?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}

/// One connection attempt.
pub async fn connect(url: &str, name: &str) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Ok(Connection::connect(url, props).await?)
}

/// Connects, retrying with exponential backoff and jitter until it works,
/// `max_attempts` is reached (`None`: forever), or `shutdown` fires; then
/// declares the topology.
pub async fn connect_with_backoff(
    url: &str,
    name: &str,
    topology: &Topology,
    participants: &[&str],
    max_attempts: Option<usize>,
    shutdown: &CancellationToken,
) -> Result<Connection> {
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter();
    let policy = match max_attempts {
        Some(n) => policy.with_max_times(n),
        None => policy.without_max_times(),
    };
    let attempt = || async {
        let conn = connect(url, name).await?;
        let channel = conn.create_channel().await?;
        topology.declare(&channel, participants).await?;
        let _ = channel.close(200, "topology declared".into()).await;
        Ok::<_, Error>(conn)
    };
    tokio::select! {
        res = attempt
            .retry(policy)
            .notify(|e: &Error, wait: Duration| tracing::warn!(error = %e, ?wait, "RabbitMQ unreachable, retrying")) => res,
        () = shutdown.cancelled() => Err(Error::Cancelled),
    }
}

/// Adds to `batch` what the broker has already delivered and, for up to
/// `linger` after the call, what it delivers next, until `batch` holds `max`
/// deliveries. A linger of zero never waits; `alarm` times it (to the
/// microsecond, where tokio's timer would round it up to its next 1 ms
/// tick). Returns the consumer's error, if one came, after the deliveries
/// before it.
pub async fn gather(
    consumer: &mut lapin::Consumer,
    batch: &mut Vec<lapin::message::Delivery>,
    max: usize,
    linger: Duration,
    alarm: &crate::alarm::Alarm,
) -> Option<lapin::Error> {
    use futures::{FutureExt, StreamExt};
    // One wait for the whole linger: armed at its first poll, not again
    // for every delivery that comes meanwhile.
    let over = alarm.sleep_until(tokio::time::Instant::now() + linger);
    tokio::pin!(over);
    while batch.len() < max {
        let next = match consumer.next().now_or_never() {
            Some(next) => next,
            None if linger.is_zero() => return None,
            None => tokio::select! {
                biased;
                next = consumer.next() => next,
                () = &mut over => return None,
            },
        };
        match next {
            Some(Ok(d)) => batch.push(d),
            Some(Err(e)) => return Some(e),
            None => return None,
        }
    }
    None
}

/// Acknowledges batches in the order they are handed over, off the
/// consumer's path. lapin resolves an ack only once its I/O thread has
/// written the frame; a consumer that awaited it waited for two thread
/// switches before it could start its next batch. Each hand-over is one
/// `multiple` ack up to a delivery, so order matters: an ack below one
/// already sent would name a tag the broker no longer knows. A task takes
/// them one after the other. An ack that fails (the channel is gone) is
/// logged: the broker redelivers, and redeliveries are replayed.
pub struct AckQueue {
    tx: tokio::sync::mpsc::UnboundedSender<(lapin::Acker, u64)>,
    task: tokio::task::JoinHandle<()>,
}

impl AckQueue {
    /// `queue` names the queue in metrics and logs.
    pub fn spawn(queue: &str) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(lapin::Acker, u64)>();
        let queue = queue.to_owned();
        let task = tokio::spawn(async move {
            while let Some((acker, count)) = rx.recv().await {
                match acker.ack(BasicAckOptions { multiple: true }).await {
                    Ok(_) => crate::metrics::consumed(&queue, count),
                    Err(e) => tracing::warn!(error = %e, queue, "ack failed; the broker will redeliver"),
                }
            }
        });
        Self { tx, task }
    }

    /// Acks every unsettled delivery up to `last` (one `multiple` ack),
    /// counting `count` consumed once it is written.
    pub fn ack_up_to(&self, last: &lapin::message::Delivery, count: u64) {
        if self.tx.send((last.acker.clone(), count)).is_err() {
            tracing::warn!("ack queue closed; the broker will redeliver");
        }
    }

    /// Waits until every ack handed over is written (before closing the channel).
    pub async fn drain(self) {
        drop(self.tx);
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "ack task failed");
        }
    }
}

/// Opens a consuming channel with an explicit prefetch.
pub async fn consumer_channel(conn: &Connection, prefetch: u16) -> Result<Channel> {
    let channel = conn.create_channel().await?;
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    Ok(channel)
}

/// A message ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    /// AMQP `type`, e.g. `ChargePayment`.
    pub message_type: String,
    /// The saga id.
    pub correlation_id: Uuid,
    pub body: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl OutgoingMessage {
    fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        for (k, v) in &self.headers {
            headers.insert(
                ShortString::from(k.as_str()),
                AMQPValue::LongString(LongString::from(v.as_str())),
            );
        }
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(CONTENT_TYPE_JSON.into())
            .with_message_id(self.message_id.to_string().into())
            .with_correlation_id(self.correlation_id.to_string().into())
            .with_type(self.message_type.as_str().into())
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
            .with_headers(headers)
    }
}

/// A channel in confirm mode. A message counts as published only when the
/// broker acknowledged it and it was routed to a queue.
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(conn: &Connection) -> Result<Self> {
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Self { channel })
    }

    /// Closes the channel (before its connection, so that nothing races).
    pub async fn close(&self) {
        if self.channel.status().connected() {
            let _ = self.channel.close(200, "done".into()).await;
        }
    }

    /// Whether the channel can still be used; if not, open another.
    pub fn is_usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Sends one message; its confirmation comes later (see [`confirmed`]).
    pub async fn send(&self, m: &OutgoingMessage) -> Result<PublisherConfirm> {
        Ok(self
            .channel
            .basic_publish(
                m.exchange.as_str().into(),
                m.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &m.body,
                m.properties(),
            )
            .await?)
    }

    /// Sends messages in order, all at once: lapin's I/O thread writes
    /// what is queued in one go, where [`Self::send`] one after the other
    /// waits for a write (two thread switches) per message. A result per
    /// message, in order.
    pub async fn send_all<'m>(
        &self,
        messages: impl IntoIterator<Item = &'m OutgoingMessage>,
    ) -> Vec<Result<PublisherConfirm>> {
        // join_all polls the sends in order, so their frames queue in order.
        futures::future::join_all(messages.into_iter().map(|m| self.send(m))).await
    }

    /// Publishes every message, pipelined, then waits for all the confirms.
    /// Fails if any message is nacked or unroutable.
    pub async fn publish_all(&self, messages: &[OutgoingMessage]) -> Result<()> {
        let mut first_error = None;
        for (m, sent) in messages.iter().zip(self.send_all(messages).await) {
            let outcome = match sent {
                Ok(confirm) => confirmed(m, confirm).await,
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Waits for the broker's confirmation of a message [`Publisher::send`]
/// sent: `Ok` once it is stored and routed to a queue.
pub async fn confirmed(m: &OutgoingMessage, confirm: PublisherConfirm) -> Result<()> {
    match confirm.await? {
        Confirmation::Ack(None) => {
            crate::metrics::published(&m.exchange, 1);
            Ok(())
        }
        Confirmation::Ack(Some(_)) => Err(Error::Unroutable(
            m.message_id,
            m.exchange.clone(),
            m.routing_key.clone(),
        )),
        Confirmation::Nack(_) => Err(Error::Nacked(m.message_id)),
        Confirmation::NotRequested => Err(Error::NoConfirms),
    }
}

/// Reads a string header of a delivery.
pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    props.headers().as_ref()?.inner().get(name).and_then(|v| match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    })
}

/// All string headers of a delivery (others are skipped).
pub fn string_headers(props: &BasicProperties) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(h) = props.headers() {
        for (k, v) in h {
            match v {
                AMQPValue::LongString(s) => {
                    out.insert(
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    );
                }
                AMQPValue::ShortString(s) => {
                    out.insert(k.as_str().to_owned(), s.as_str().to_owned());
                }
                _ => {}
            }
        }
    }
    out
}

/// Sends a copy of `delivery` to the dead-letter exchange with `reason` and
/// where it came from in headers, waiting for the broker's confirm. The
/// caller acks the original afterwards; if this fails, it must not.
pub async fn dead_letter(
    publisher: &Publisher,
    delivery: &lapin::message::Delivery,
    queue: &str,
    reason: &str,
) -> Result<()> {
    use crate::contract::{
        HEADER_ORIGINAL_EXCHANGE, HEADER_ORIGINAL_QUEUE, HEADER_ORIGINAL_ROUTING_KEY, HEADER_REASON,
    };
    let props = &delivery.properties;
    let mut headers = string_headers(props);
    headers.insert(HEADER_REASON.to_owned(), reason.chars().take(1000).collect());
    headers.insert(
        HEADER_ORIGINAL_EXCHANGE.to_owned(),
        delivery.exchange.as_str().to_owned(),
    );
    headers.insert(
        HEADER_ORIGINAL_ROUTING_KEY.to_owned(),
        delivery.routing_key.as_str().to_owned(),
    );
    headers.insert(HEADER_ORIGINAL_QUEUE.to_owned(), queue.to_owned());
    let parse_id = |v: &Option<ShortString>| v.as_ref().and_then(|s| Uuid::parse_str(s.as_str()).ok());
    let message = OutgoingMessage {
        message_id: parse_id(props.message_id()).unwrap_or_else(Uuid::now_v7),
        exchange: crate::contract::DLX_EXCHANGE.to_owned(),
        routing_key: queue.to_owned(),
        message_type: props
            .kind()
            .as_ref()
            .map_or_else(String::new, |k| k.as_str().to_owned()),
        correlation_id: parse_id(props.correlation_id()).unwrap_or(Uuid::nil()),
        body: delivery.data.clone(),
        headers,
    };
    tracing::warn!(queue, reason, message_id = %message.message_id, "dead-lettering message");
    publisher.publish_all(std::slice::from_ref(&message)).await?;
    crate::metrics::dead_lettered(queue, reason);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_queue_version_parses_and_sets_the_argument() {
        let version = |v: &str| v.parse::<ClassicQueueVersion>();
        assert_eq!(version("2"), Ok(ClassicQueueVersion::V2));
        assert_eq!(version("1"), Ok(ClassicQueueVersion::V1));
        assert_eq!(version("broker"), Ok(ClassicQueueVersion::Broker));
        assert!(version("3").unwrap_err().contains("AMQP_CLASSIC_QUEUE_VERSION"));

        let arg = |t: Topology| t.queue_args().inner().get("x-queue-version").cloned();
        assert_eq!(arg(Topology::default()), None, "the broker decides by default");
        let v1 = Topology {
            classic_version: ClassicQueueVersion::V1,
            ..Topology::default()
        };
        assert_eq!(arg(v1), Some(AMQPValue::LongInt(1)));
        let v2 = Topology {
            classic_version: ClassicQueueVersion::V2,
            ..Topology::default()
        };
        assert_eq!(arg(v2), Some(AMQPValue::LongInt(2)));
        let quorum = Topology {
            queue_type: QueueType::Quorum,
            classic_version: ClassicQueueVersion::V2,
            ..Topology::default()
        };
        assert_eq!(arg(quorum.clone()), None);
        assert_eq!(
            quorum.queue_args().inner().get("x-queue-type").cloned(),
            Some(AMQPValue::LongString("quorum".into()))
        );
    }
}
