//! What RabbitMQ knows about the participants' command queues: live
//! consumers, backlog (ready messages) and unacknowledged messages.
//!
//! The source is RabbitMQ's management HTTP API (`AMQP_MANAGEMENT_URL`,
//! default `http://<AMQP host>:15672`, with the AMQP URL's credentials).
//! When it cannot be reached, a passive queue declare over AMQP gives the
//! consumers and the ready count (unacknowledged stays unknown). The
//! management API refreshes its figures every few seconds; a passive
//! declare is exact, and `/readyz` uses that.
//!
//! Credentials never leave this module: they are kept in [`Secret`], whose
//! `Debug` and `Display` print `***`, and sent only in the `Authorization`
//! header; errors name the host, never the URL's user information.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::{Deserialize, Serialize};
use skald_wire::contract::command_queue;
use utoipa::ToSchema;

/// How long one look at the broker may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("AMQP_URL is not a valid AMQP URL")]
    AmqpUrl,
    #[error("AMQP_MANAGEMENT_URL is not a valid http:// URL")]
    ManagementUrl,
    #[error("RabbitMQ management API: {0}")]
    Management(String),
    #[error(transparent)]
    Amqp(#[from] skald_wire::amqp::Error),
    #[error("RabbitMQ did not answer within {0:?}")]
    Timeout(Duration),
}

impl From<lapin::Error> for Error {
    fn from(e: lapin::Error) -> Self {
        Error::Amqp(e.into())
    }
}

/// A password or token: never printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where the figures came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// RabbitMQ's management HTTP API (refreshed every few seconds).
    ManagementApi,
    /// A passive queue declare over AMQP: exact, but without unacknowledged messages.
    Amqp,
}

/// One participant's command queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct QueueStats {
    /// `order`, `payment`, `inventory`.
    pub participant: String,
    /// `skald.<participant>.commands`.
    pub queue: String,
    /// Consumers attached now (participant instances, times their channels).
    pub consumers: u32,
    /// Messages waiting for a consumer (the backlog).
    pub ready: u64,
    /// Messages delivered and not yet acknowledged; null when only AMQP could be asked.
    pub unacked: Option<u64>,
}

/// `GET /v1/participants`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ParticipantsReport {
    pub source: Source,
    pub queues: Vec<QueueStats>,
    /// Why the management API was not used (no URL or credentials in it).
    pub management_error: Option<String>,
}

/// The management API's address and the credentials to use.
#[derive(Debug, Clone)]
struct Management {
    /// `http://host:port`, without user information or trailing slash.
    base: String,
    user: String,
    password: Secret,
}

/// Looks at the participants' queues. Cheap to clone.
#[derive(Clone)]
pub struct BrokerInspector {
    amqp_url: Secret,
    vhost: String,
    management: Management,
    participants: Vec<String>,
    http: reqwest::Client,
}

impl fmt::Debug for BrokerInspector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerInspector")
            .field("vhost", &self.vhost)
            .field("management", &self.management)
            .field("participants", &self.participants)
            .finish_non_exhaustive()
    }
}

impl BrokerInspector {
    /// `management_url`: `None` for the default (`http://<AMQP host>:15672`).
    /// Credentials come from the AMQP URL, unless the management URL has its own.
    pub fn new(amqp_url: &str, management_url: Option<&str>, participants: Vec<String>) -> Result<Self> {
        let uri = lapin::uri::AMQPUri::from_str(amqp_url).map_err(|_| Error::AmqpUrl)?;
        let host = &uri.authority.host;
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let mut management = Management {
            base: format!("http://{host}:15672"),
            user: uri.authority.userinfo.username.clone(),
            password: Secret::new(uri.authority.userinfo.password.clone()),
        };
        if let Some(raw) = management_url.map(str::trim).filter(|u| !u.is_empty()) {
            let url = reqwest::Url::parse(raw).map_err(|_| Error::ManagementUrl)?;
            if url.scheme() != "http" || url.host_str().is_none() {
                return Err(Error::ManagementUrl);
            }
            if !url.username().is_empty() {
                management.user = percent_decode(url.username());
                management.password = Secret::new(percent_decode(url.password().unwrap_or_default()));
            }
            let mut base = url.clone();
            let _ = base.set_username("");
            let _ = base.set_password(None);
            base.set_query(None);
            base.set_fragment(None);
            management.base = base.as_str().trim_end_matches('/').to_owned();
        }
        let http = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .build()
            .map_err(|e| Error::Management(e.to_string()))?;
        Ok(Self {
            amqp_url: Secret::new(amqp_url),
            vhost: uri.vhost,
            management,
            participants,
            http,
        })
    }

    /// The management API's address, without credentials (for logs and docs).
    pub fn management_base(&self) -> &str {
        &self.management.base
    }

    pub fn queue_names(&self) -> Vec<String> {
        self.participants.iter().map(|p| command_queue(p)).collect()
    }

    /// From the management API if it answers, else over AMQP.
    pub async fn report(&self) -> Result<ParticipantsReport> {
        match self.via_management().await {
            Ok(queues) => Ok(ParticipantsReport {
                source: Source::ManagementApi,
                queues,
                management_error: None,
            }),
            Err(e) => {
                tracing::debug!(error = %e, "management API not used; asking over AMQP");
                let queues = tokio::time::timeout(PROBE_TIMEOUT, async {
                    let conn = skald_wire::amqp::connect(self.amqp_url.expose(), "skald-participants").await?;
                    let result = self.via_amqp(&conn).await;
                    let _ = conn.close(200, "participants".into()).await;
                    result
                })
                .await
                .map_err(|_| Error::Timeout(PROBE_TIMEOUT))??;
                Ok(ParticipantsReport {
                    source: Source::Amqp,
                    queues,
                    management_error: Some(e.to_string()),
                })
            }
        }
    }

    /// Every participant queue, from the management API.
    pub async fn via_management(&self) -> Result<Vec<QueueStats>> {
        let mut out = Vec::with_capacity(self.participants.len());
        for participant in &self.participants {
            let queue = command_queue(participant);
            let url = format!(
                "{}/api/queues/{}/{}",
                self.management.base,
                encode_segment(&self.vhost),
                encode_segment(&queue)
            );
            let resp = self
                .http
                .get(&url)
                .basic_auth(&self.management.user, Some(self.management.password.expose()))
                .send()
                .await
                .map_err(|e| Error::Management(describe_http_error(&e, &self.management.base)))?;
            let status = resp.status();
            if !status.is_success() {
                return Err(Error::Management(format!(
                    "{} answered HTTP {status} for queue {queue}",
                    self.management.base
                )));
            }
            let q: ManagementQueue = resp
                .json()
                .await
                .map_err(|_| Error::Management(format!("{} sent an unreadable answer", self.management.base)))?;
            out.push(QueueStats {
                participant: participant.clone(),
                queue,
                consumers: q.consumers.unwrap_or(0),
                ready: q.messages_ready.unwrap_or(0),
                unacked: Some(q.messages_unacknowledged.unwrap_or(0)),
            });
        }
        Ok(out)
    }

    /// Every participant queue, by passive declares on `conn` (one channel
    /// each: a missing queue closes its channel). A missing queue counts as
    /// empty with no consumer.
    pub async fn via_amqp(&self, conn: &Connection) -> Result<Vec<QueueStats>> {
        let mut out = Vec::with_capacity(self.participants.len());
        for participant in &self.participants {
            let queue = command_queue(participant);
            let (consumers, ready) = probe(conn, &queue).await?;
            out.push(QueueStats {
                participant: participant.clone(),
                queue,
                consumers,
                ready,
                unacked: None,
            });
        }
        Ok(out)
    }
}

/// Consumers and ready messages of `queue`, by a passive declare on a
/// channel of its own (a missing queue closes it): `(0, 0)` if it does not
/// exist.
pub async fn probe(conn: &Connection, queue: &str) -> Result<(u32, u64)> {
    let channel = conn.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(q) => {
            let _ = channel.close(200, "probed".into()).await;
            Ok((q.consumer_count(), u64::from(q.message_count())))
        }
        // 404: the queue does not exist (the channel is closed by the broker).
        Err(e) if is_not_found(&e) => Ok((0, 0)),
        Err(e) => Err(e.into()),
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    e.to_string().contains("NOT_FOUND")
}

/// The fields of `GET /api/queues/{vhost}/{name}` that we read. Figures
/// are missing until the broker first emits the queue's statistics.
#[derive(Debug, Deserialize)]
struct ManagementQueue {
    consumers: Option<u32>,
    messages_ready: Option<u64>,
    messages_unacknowledged: Option<u64>,
}

/// A reqwest error without its URL (which has no credentials, but keep it short).
fn describe_http_error(e: &reqwest::Error, base: &str) -> String {
    if e.is_timeout() {
        format!("{base} did not answer within {PROBE_TIMEOUT:?}")
    } else if e.is_connect() {
        format!("{base} is unreachable")
    } else {
        format!("request to {base} failed")
    }
}

/// Percent-encodes one URL path segment (the vhost `/` becomes `%2F`).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["order".to_owned()]
    }

    #[test]
    fn the_management_url_defaults_to_the_amqp_host_and_takes_its_credentials() {
        let b = BrokerInspector::new("amqp://skald:p%40ss@rabbit.local:5672/%2f", None, names()).unwrap();
        assert_eq!(b.management.base, "http://rabbit.local:15672");
        assert_eq!(b.management.user, "skald");
        assert_eq!(b.management.password.expose(), "p@ss");
        assert_eq!(b.vhost, "/");
        assert_eq!(encode_segment(&b.vhost), "%2F");
        let shown = format!("{b:?}");
        assert!(!shown.contains("p@ss") && !shown.contains("p%40ss"), "{shown}");
    }

    #[test]
    fn a_management_url_of_its_own_is_used_without_its_credentials_in_the_base() {
        let b = BrokerInspector::new(
            "amqp://guest:guest@127.0.0.1:5672/skt_1",
            Some("http://admin:s%3Acret@mgmt:8080/rabbit/"),
            names(),
        )
        .unwrap();
        assert_eq!(b.management_base(), "http://mgmt:8080/rabbit");
        assert_eq!(
            (b.management.user.as_str(), b.management.password.expose()),
            ("admin", "s:cret")
        );
        assert_eq!(b.vhost, "skt_1");
        assert!(BrokerInspector::new("amqp://h", Some("ftp://x"), names()).is_err());
        assert!(BrokerInspector::new("not a url", None, names()).is_err());
    }

    #[test]
    fn errors_and_secrets_do_not_print_passwords() {
        assert_eq!(format!("{} {:?}", Secret::new("pw"), Secret::new("pw")), "*** ***");
        let e = BrokerInspector::new("amqp://u:hunter2@", None, names());
        if let Err(e) = e {
            assert!(!e.to_string().contains("hunter2"));
        }
    }
}
