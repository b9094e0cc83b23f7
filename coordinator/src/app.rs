//! Start-up and shutdown of one coordinator: `Application::build` connects
//! and migrates (bounded retries), binds the listener; `run_until_stopped`
//! runs the HTTP server, the outbox relay, the reply consumer, the
//! sweeper and the retention job until the token is cancelled, then drains them all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use skald_engine::RetryPolicy;
use skald_wire::amqp::{ClassicQueueVersion, QueueType, Topology};
use skald_wire::faults::Faults;
use skald_wire::linger;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::{ApiState, router};
use crate::intake::OrderIntake;
use crate::manager::{QueueWatch, ReplyConsumer, Sweeper};
use crate::participants::BrokerInspector;
use crate::retention::Retention;
use crate::sagas::{Registry, order_saga};
use crate::store::Store;

pub const BODY_LIMIT_DEFAULT: usize = 64 * 1024;

/// The coordinator database's migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/coordinator");

/// Coordinator settings; every field is an environment variable (see `--help`).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Skald coordinator: HTTP API, saga engine, outbox relay, timeout sweeper"
)]
pub struct Config {
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/skald"
    )]
    pub database_url: String,
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// RabbitMQ's management API for the participants panel (default
    /// `http://<AMQP host>:15672`, with the AMQP URL's credentials).
    #[arg(long, env = "AMQP_MANAGEMENT_URL", hide_env_values = true)]
    pub amqp_management_url: Option<String>,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// PostgreSQL connections in the pool.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 10)]
    pub db_pool_size: u32,
    /// Unacknowledged replies the broker may push to this coordinator.
    #[arg(long, env = "REPLY_PREFETCH", default_value_t = 256)]
    pub reply_prefetch: u16,
    /// Replies applied in one transaction at most.
    #[arg(long, env = "REPLY_BATCH", default_value_t = 128)]
    pub reply_batch: usize,
    /// Sagas kept in memory as this coordinator last wrote them, so that
    /// their next reply skips reading them (the write still checks their
    /// version). About 4 KB each.
    #[arg(long, env = "STATE_CACHE_SIZE", default_value_t = crate::store::DEFAULT_STATE_CACHE)]
    pub state_cache_size: usize,
    /// How long a batch of outbox rows waits for more once it has one: a
    /// little latency per hop for fewer broker round trips under moderate
    /// load. 0 never waits.
    #[arg(long = "batch-linger-ms", env = "BATCH_LINGER_MS", default_value = "1", value_parser = linger::parse_millis)]
    pub batch_linger: Duration,
    /// How long a batch of replies waits for more once it has one. The
    /// reply consumer is the busiest stage: replies that arrive while it
    /// writes a batch make the next one, so by default it does not wait.
    #[arg(long = "reply-linger-ms", env = "REPLY_LINGER_MS", default_value = "0", value_parser = linger::parse_millis)]
    pub reply_linger: Duration,
    /// How long a batch of new orders (`POST /v1/orders`) waits for more
    /// once it has one, while orders keep coming (the previous batch left
    /// less than this long ago): group commit, fewer transactions for a
    /// few milliseconds of `POST` latency. 0 never waits.
    #[arg(long = "intake-linger-ms", env = "INTAKE_LINGER_MS", default_value = "5", value_parser = linger::parse_millis)]
    pub intake_linger: Duration,
    /// New orders written by one statement (one commit) at most: the
    /// `POST /v1/orders` requests waiting when the previous batch is done.
    #[arg(long, env = "ORDER_BATCH", default_value_t = 64)]
    pub order_batch: usize,
    /// Outbox rows published per batch.
    #[arg(long, env = "RELAY_BATCH", default_value_t = 256)]
    pub relay_batch: i64,
    /// How often the relay looks for rows written by other processes.
    #[arg(long, env = "RELAY_POLL_MS", default_value_t = 200)]
    pub relay_poll_ms: u64,
    /// How often the sweeper looks for expired deadlines and ended backoffs.
    #[arg(long, env = "SWEEP_INTERVAL_MS", default_value_t = 200)]
    pub sweep_interval_ms: u64,
    /// Deadline of one step attempt.
    #[arg(long, env = "STEP_TIMEOUT_MS", default_value_t = 10_000)]
    pub step_timeout_ms: u64,
    /// How long a step may go on waiting, from its first attempt, while its
    /// command or its reply may still be queued (the participant's command
    /// queue holds ready commands while a consumer is attached, or the
    /// coordinator's reply queue holds replies): until then a deadline that
    /// passes is moved by one more timeout instead of sending a retry that
    /// would only queue behind it. 0 turns this off.
    #[arg(long, env = "STEP_MAX_QUEUE_WAIT_MS", default_value_t = 120_000)]
    pub step_max_queue_wait_ms: u64,
    /// Attempts per step (the first included) before the saga compensates.
    #[arg(long, env = "STEP_MAX_ATTEMPTS", default_value_t = 8)]
    pub step_max_attempts: u32,
    /// First retry backoff; it doubles up to RETRY_MAX_BACKOFF_MS, with jitter.
    #[arg(long, env = "RETRY_BACKOFF_MS", default_value_t = 200)]
    pub retry_backoff_ms: u64,
    #[arg(long, env = "RETRY_MAX_BACKOFF_MS", default_value_t = 10_000)]
    pub retry_max_backoff_ms: u64,
    /// Compensation failures in a row (each after its backoff) before a saga is STUCK.
    #[arg(long, env = "COMPENSATION_MAX_FAILURES", default_value_t = 10)]
    pub compensation_max_failures: u32,
    /// `classic` or `quorum` (for a RabbitMQ cluster).
    #[arg(long, env = "AMQP_QUEUE_TYPE", default_value = "classic")]
    pub queue_type: QueueType,
    /// Classic queues only: `broker` (no `x-queue-version` argument: the
    /// broker's default or policy decides), `1` or `2`. All processes must agree.
    #[arg(long, env = "AMQP_CLASSIC_QUEUE_VERSION", default_value = "broker")]
    pub classic_queue_version: ClassicQueueVersion,
    /// Bearer token for operator actions; unset disables them.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "HTTP_BODY_LIMIT", default_value_t = BODY_LIMIT_DEFAULT)]
    pub body_limit: usize,
    /// Failure injection, e.g. `coordinator.crash_after_commit=0.01`. Off by default.
    #[arg(long, env = "SKALD_FAULTS", default_value = "")]
    pub faults: String,
    /// Start-up connection attempts before giving up.
    #[arg(long, env = "STARTUP_RETRIES", default_value_t = 8)]
    pub startup_retries: usize,
    /// Redeliveries of one reply after which it is dead-lettered as poison.
    #[arg(long, env = "MAX_REDELIVERIES", default_value_t = 10)]
    pub max_redeliveries: i32,
    /// Quorum queues only: deliveries after which the broker itself dead-letters a message.
    #[arg(long, env = "AMQP_DELIVERY_LIMIT")]
    pub delivery_limit: Option<u32>,
    /// How often the outbox gauges of /metrics are sampled.
    #[arg(long, env = "METRICS_SAMPLE_MS", default_value_t = 5_000)]
    pub metrics_sample_ms: u64,
    /// Age in seconds after which finished sagas (with their order, idempotency
    /// keys and outbox rows) and redelivery counts are deleted; 0 disables retention.
    #[arg(long, env = "RETENTION_SECS", default_value_t = 604_800)]
    pub retention_secs: u64,
    /// How often the retention job runs.
    #[arg(long, env = "RETENTION_INTERVAL_MS", default_value_t = 60_000)]
    pub retention_interval_ms: u64,
    /// Sagas deleted in one transaction at most by the retention job.
    #[arg(long, env = "RETENTION_BATCH", default_value_t = 1_000)]
    pub retention_batch: i64,
}

impl Config {
    /// The defaults, as if no variable were set (tests start from this).
    pub fn local() -> Self {
        <Self as clap::Parser>::parse_from(["coordinator"])
    }

    pub fn registry(&self) -> anyhow::Result<Registry> {
        let retry = RetryPolicy {
            max_attempts: self.step_max_attempts.max(1),
            initial_backoff: Duration::from_millis(self.retry_backoff_ms),
            max_backoff: Duration::from_millis(self.retry_max_backoff_ms),
            multiplier: 2.0,
        };
        let compensation = RetryPolicy {
            max_attempts: self.compensation_max_failures.max(1),
            ..retry.clone()
        };
        let timeout = Duration::from_millis(self.step_timeout_ms);
        let def = order_saga(timeout, retry, compensation).context("order saga definition")?;
        Ok(Registry::default().with(def))
    }
}

pub struct Application {
    config: Config,
    listener: tokio::net::TcpListener,
    store: Store,
    registry: Registry,
    faults: Faults,
    handoff: Arc<skald_wire::outbox::Handoff>,
    broker: BrokerInspector,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        skald_wire::metrics::install();
        let faults = Faults::parse(&config.faults, &["coordinator"])?;
        let registry = config.registry()?;
        let pool = skald_wire::db::connect_and_migrate(
            &config.database_url,
            config.db_pool_size,
            &MIGRATOR,
            config.startup_retries,
        )
        .await
        .context("coordinator database")?;
        let topology = Topology {
            queue_type: config.queue_type,
            delivery_limit: config.delivery_limit,
            classic_version: config.classic_queue_version,
        };
        let participants = registry.participants();
        let names: Vec<&str> = participants.iter().map(String::as_str).collect();
        let never = CancellationToken::new();
        let conn = skald_wire::amqp::connect_with_backoff(
            &config.amqp_url,
            "skald-coordinator-start",
            &topology,
            &names,
            Some(config.startup_retries),
            &never,
        )
        .await
        .with_context(|| format!("RabbitMQ at {}", skald_wire::db::redact(&config.amqp_url)))?;
        let _ = conn.close(200, "start-up checks done".into()).await;
        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("cannot listen on {}", config.http_addr))?;
        let broker = BrokerInspector::new(
            &config.amqp_url,
            config.amqp_management_url.as_deref(),
            registry.participants(),
        )
        .context("participants panel")?;
        let handoff = skald_wire::outbox::Handoff::new();
        let store = Store::new(pool, registry.clone(), handoff.clone(), faults.clone())
            .with_state_cache(config.state_cache_size);
        Ok(Self {
            config,
            listener,
            store,
            registry,
            faults,
            handoff,
            broker,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Runs until `shutdown` is cancelled; then stops taking requests and
    /// messages, finishes what is in flight, and returns.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let c = &self.config;
        let topology = Topology {
            queue_type: c.queue_type,
            delivery_limit: c.delivery_limit,
            classic_version: c.classic_queue_version,
        };
        let tasks = TaskTracker::new();
        tasks.spawn(
            skald_wire::outbox::Relay {
                pool: self.store.pool().clone(),
                amqp_url: c.amqp_url.clone(),
                name: "skald-coordinator-relay".to_owned(),
                topology: topology.clone(),
                participants: self.registry.participants(),
                handoff: self.handoff.clone(),
                batch_size: c.relay_batch,
                poll_interval: Duration::from_millis(c.relay_poll_ms),
                linger: c.batch_linger,
                faults: self.faults.clone(),
            }
            .run(shutdown.child_token()),
        );
        tasks.spawn(
            ReplyConsumer {
                store: self.store.clone(),
                amqp_url: c.amqp_url.clone(),
                topology,
                participants: self.registry.participants(),
                prefetch: c.reply_prefetch,
                batch_max: c.reply_batch.max(1),
                linger: c.reply_linger,
                max_redeliveries: c.max_redeliveries,
            }
            .run(shutdown.child_token()),
        );
        tasks.spawn(
            skald_wire::metrics::OutboxSampler {
                pool: self.store.pool().clone(),
                outbox: "coordinator".to_owned(),
                database: 0,
                interval: Duration::from_millis(c.metrics_sample_ms),
            }
            .run(shutdown.child_token()),
        );
        tasks.spawn(
            Sweeper {
                store: self.store.clone(),
                interval: Duration::from_millis(c.sweep_interval_ms),
                batch: 200,
                queues: (c.step_max_queue_wait_ms > 0).then(|| {
                    QueueWatch::new(
                        self.broker.clone(),
                        c.amqp_url.clone(),
                        Duration::from_millis(c.step_max_queue_wait_ms),
                    )
                }),
            }
            .run(shutdown.child_token()),
        );
        if c.retention_secs > 0 {
            tasks.spawn(
                Retention {
                    pool: self.store.pool().clone(),
                    interval: Duration::from_millis(c.retention_interval_ms.max(1)),
                    age: Duration::from_secs(c.retention_secs),
                    batch: c.retention_batch.max(1),
                }
                .run(shutdown.child_token()),
            );
        }
        let (intake, intake_task) = OrderIntake::spawn(self.store.clone(), c.order_batch, c.intake_linger);
        tasks.close();
        let state = ApiState {
            store: self.store.clone(),
            intake,
            amqp_url: c.amqp_url.as_str().into(),
            redis_url: c.redis_url.as_str().into(),
            admin_token: c.admin_token.as_deref().filter(|t| !t.is_empty()).map(Into::into),
            body_limit: c.body_limit,
            broker: self.broker.clone(),
            saga_types: self.registry.types().into(),
        };
        tracing::info!(addr = %self.listener.local_addr()?, "coordinator listening");
        let http_shutdown = shutdown.clone();
        axum::serve(self.listener, router(state))
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
            .await
            .context("HTTP server")?;
        // The server dropped the intake's senders: it writes what it took, then ends.
        if let Err(e) = intake_task.await {
            tracing::warn!(error = %e, "order intake ended abnormally");
        }
        shutdown.cancel();
        tasks.wait().await;
        self.store.pool().close().await;
        tracing::info!("coordinator stopped");
        Ok(())
    }
}
