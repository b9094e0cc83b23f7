//! Configuration and start-up of one participant process.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use skald_wire::amqp::{ClassicQueueVersion, QueueType, Topology};
use skald_wire::faults::Faults;
use skald_wire::linger;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::inventory::InventoryParticipant;
use crate::lock::Locks;
use crate::order::{OrderParticipant, OrderStore, ShardMap};
use crate::payment::PaymentParticipant;
use crate::retention::Retention;
use crate::runtime::{Runtime, RuntimeConfig};

pub static ORDERS_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/orders");
pub static PAYMENTS_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/payments");
pub static INVENTORY_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/inventory");

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    Order,
    Payment,
    Inventory,
}

/// Participant settings; every field is an environment variable (see `--help`).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[arg(
        long,
        env = "ORDERS_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/skald_orders"
    )]
    pub orders_database_url: String,
    /// Spread the order shards over several databases: a comma-separated list
    /// (shard s lives in database s mod n). Overrides ORDERS_DATABASE_URL. The
    /// list is recorded at first start and may not change afterwards.
    #[arg(long, env = "ORDERS_DATABASE_URLS", value_delimiter = ',', hide_env_values = true)]
    pub orders_database_urls: Vec<String>,
    #[arg(
        long,
        env = "PAYMENTS_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/skald_payments"
    )]
    pub payments_database_url: String,
    #[arg(
        long,
        env = "INVENTORY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/skald_inventory"
    )]
    pub inventory_database_url: String,
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Prefix of every Redis key (lets several deployments or tests share a Redis).
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "skald:")]
    pub redis_key_prefix: String,
    /// Number of order shard tables; fixed once the orders database exists.
    #[arg(long, env = "ORDER_SHARDS", default_value_t = 16)]
    pub order_shards: u32,
    /// Commands handled in one PostgreSQL transaction at most (a batch is
    /// what the broker has already delivered; a lone command goes at once).
    #[arg(long, env = "BATCH_MAX", default_value_t = 64)]
    pub batch_max: usize,
    /// How long a batch waits for more commands once it has one (and the
    /// reply relay, for more replies): a little latency per hop for far fewer
    /// transactions under moderate load. 0 never waits.
    #[arg(long = "batch-linger-ms", env = "BATCH_LINGER_MS", default_value = "1", value_parser = linger::parse_millis)]
    pub batch_linger: Duration,
    /// Unacknowledged commands the broker may push to this process.
    #[arg(long, env = "PREFETCH", default_value_t = 256)]
    pub prefetch: u16,
    /// Time to live of an order lock.
    #[arg(long, env = "LOCK_TTL_MS", default_value_t = 5_000)]
    pub lock_ttl_ms: u64,
    /// How long to wait for a busy order lock before replying a retryable failure.
    #[arg(long, env = "LOCK_WAIT_MS", default_value_t = 2_000)]
    pub lock_wait_ms: u64,
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 10)]
    pub db_pool_size: u32,
    /// `classic` or `quorum` (for a RabbitMQ cluster).
    #[arg(long, env = "AMQP_QUEUE_TYPE", default_value = "classic")]
    pub queue_type: QueueType,
    /// Classic queues only: `broker` (no `x-queue-version` argument: the
    /// broker's default or policy decides), `1` or `2`. All processes must agree.
    #[arg(long, env = "AMQP_CLASSIC_QUEUE_VERSION", default_value = "broker")]
    pub classic_queue_version: ClassicQueueVersion,
    /// Failure injection, e.g. `participant.crash_after_commit=0.05,payment.delay_ms=200`. Off by default.
    #[arg(long, env = "SKALD_FAULTS", default_value = "")]
    pub faults: String,
    /// Start-up connection attempts before giving up.
    #[arg(long, env = "STARTUP_RETRIES", default_value_t = 8)]
    pub startup_retries: usize,
    /// Redeliveries of one message after which it is dead-lettered as poison.
    #[arg(long, env = "MAX_REDELIVERIES", default_value_t = 10)]
    pub max_redeliveries: i32,
    /// Quorum queues only: deliveries after which the broker itself dead-letters a message.
    #[arg(long, env = "AMQP_DELIVERY_LIMIT")]
    pub delivery_limit: Option<u32>,
    /// Listen address of /metrics and /healthz. Default: 127.0.0.1:9091 for
    /// order, :9092 for payment, :9093 for inventory (port 0: any free port).
    #[arg(long, env = "HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// How often the outbox gauges of /metrics are sampled.
    #[arg(long, env = "METRICS_SAMPLE_MS", default_value_t = 5_000)]
    pub metrics_sample_ms: u64,
    /// Age in seconds after which inbox rows (the barrier of handled commands)
    /// and redelivery counts are deleted; 0 disables retention. It must exceed
    /// any plausible redelivery delay of a command.
    #[arg(long, env = "RETENTION_SECS", default_value_t = 604_800)]
    pub retention_secs: u64,
    /// How often the retention job runs.
    #[arg(long, env = "RETENTION_INTERVAL_MS", default_value_t = 60_000)]
    pub retention_interval_ms: u64,
    /// Rows deleted in one transaction at most by the retention job.
    #[arg(long, env = "RETENTION_BATCH", default_value_t = 1_000)]
    pub retention_batch: i64,
}

#[derive(Debug, clap::Parser)]
#[command(
    name = "participant",
    version,
    about = "A Skald participant: consumes commands, applies them with an inbox barrier, replies"
)]
pub struct Cli {
    /// Which participant to run.
    #[arg(value_enum)]
    pub which: Which,
    #[command(flatten)]
    pub config: Config,
}

impl Config {
    /// The defaults, as if no variable were set (tests start from this).
    pub fn local() -> Self {
        <Cli as clap::Parser>::parse_from(["participant", "order"]).config
    }

    fn runtime(&self, which: Which) -> anyhow::Result<RuntimeConfig> {
        let name = runtime_name(which);
        Ok(RuntimeConfig {
            amqp_url: self.amqp_url.clone(),
            topology: Topology {
                queue_type: self.queue_type,
                delivery_limit: self.delivery_limit,
                classic_version: self.classic_queue_version,
            },
            batch_max: self.batch_max.max(1),
            linger: self.batch_linger,
            prefetch: self.prefetch,
            relay_batch: 256,
            relay_poll: Duration::from_millis(200),
            faults: Faults::parse(&self.faults, &["participant", name])?,
            max_redeliveries: self.max_redeliveries,
        })
    }

    /// Where this participant serves /metrics and /healthz.
    pub fn http_addr(&self, which: Which) -> SocketAddr {
        let port = match which {
            Which::Order => 9091,
            Which::Payment => 9092,
            Which::Inventory => 9093,
        };
        self.http_addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// The orders databases, in shard-map order.
    pub fn order_database_urls(&self) -> Vec<String> {
        order_database_urls(&self.orders_database_url, &self.orders_database_urls)
    }

    pub fn order_store(&self) -> anyhow::Result<OrderStore> {
        let databases = self.order_database_urls().len() as u32;
        Ok(OrderStore {
            shards: ShardMap::spread(self.order_shards, databases).map_err(anyhow::Error::msg)?,
        })
    }

    pub async fn locks(&self) -> anyhow::Result<Locks> {
        let policy = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(3))
            .with_jitter()
            .with_max_times(self.startup_retries);
        let conn = (|| crate::lock::connect(&self.redis_url))
            .retry(policy)
            .notify(|e, wait| tracing::warn!(error = %e, ?wait, "Redis unreachable, retrying"))
            .await
            .context("Redis")?;
        Ok(Locks::new(
            conn,
            &self.redis_key_prefix,
            Duration::from_millis(self.lock_ttl_ms),
            Duration::from_millis(self.lock_wait_ms),
        ))
    }
}

/// A participant ready to run: its runtime and its HTTP listener.
pub struct Participant {
    which: Which,
    runtime: Runtimes,
    /// Bound at build time, so that the address (port 0 in tests) is known before running.
    listener: tokio::net::TcpListener,
    sample_interval: Duration,
    /// Retention age (None: disabled), interval and batch.
    retention: Option<(Duration, Duration, i64)>,
}

enum Runtimes {
    Order(Runtime<OrderParticipant>),
    Payment(Runtime<PaymentParticipant>),
    Inventory(Runtime<InventoryParticipant>),
}

impl Runtimes {
    fn pools(&self) -> Vec<sqlx::PgPool> {
        match self {
            Runtimes::Order(r) => r.pools().to_vec(),
            Runtimes::Payment(r) => r.pools().to_vec(),
            Runtimes::Inventory(r) => r.pools().to_vec(),
        }
    }

    async fn run(self, shutdown: CancellationToken) {
        match self {
            Runtimes::Order(r) => r.run(shutdown).await,
            Runtimes::Payment(r) => r.run(shutdown).await,
            Runtimes::Inventory(r) => r.run(shutdown).await,
        }
    }
}

impl Participant {
    /// Connects to everything it needs (bounded retries), migrates its
    /// database, binds its HTTP listener.
    pub async fn build(which: Which, config: &Config) -> anyhow::Result<Self> {
        skald_wire::metrics::install();
        let runtime = config.runtime(which)?;
        let (urls, migrator) = match which {
            Which::Order => (config.order_database_urls(), &ORDERS_MIGRATOR),
            Which::Payment => (vec![config.payments_database_url.clone()], &PAYMENTS_MIGRATOR),
            Which::Inventory => (vec![config.inventory_database_url.clone()], &INVENTORY_MIGRATOR),
        };
        let mut pools = Vec::with_capacity(urls.len());
        for (i, url) in urls.iter().enumerate() {
            let pool = skald_wire::db::connect_and_migrate(url, config.db_pool_size, migrator, config.startup_retries)
                .await
                .with_context(|| format!("{which:?} database #{i}"))?;
            pools.push(pool);
        }
        let never = CancellationToken::new();
        let name = runtime_name(which);
        let conn = skald_wire::amqp::connect_with_backoff(
            &config.amqp_url,
            &format!("skald-{name}-start"),
            &runtime.topology,
            &[name],
            Some(config.startup_retries),
            &never,
        )
        .await
        .with_context(|| format!("RabbitMQ at {}", skald_wire::db::redact(&config.amqp_url)))?;
        let _ = conn.close(200, "start-up checks done".into()).await;
        let runtime = match which {
            Which::Order => {
                let store = config.order_store()?;
                for (i, pool) in pools.iter().enumerate() {
                    store.shards.prepare(pool, i).await.map_err(anyhow::Error::msg)?;
                }
                let locks = config.locks().await?;
                Runtimes::Order(Runtime::partitioned(
                    pools,
                    OrderParticipant { store },
                    Some(locks),
                    runtime,
                ))
            }
            Which::Payment => Runtimes::Payment(Runtime::partitioned(pools, PaymentParticipant, None, runtime)),
            Which::Inventory => Runtimes::Inventory(Runtime::partitioned(pools, InventoryParticipant, None, runtime)),
        };
        let addr = config.http_addr(which);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (HTTP_ADDR)"))?;
        Ok(Self {
            which,
            runtime,
            listener,
            sample_interval: Duration::from_millis(config.metrics_sample_ms.max(1)),
            retention: (config.retention_secs > 0).then(|| {
                (
                    Duration::from_secs(config.retention_secs),
                    Duration::from_millis(config.retention_interval_ms.max(1)),
                    config.retention_batch.max(1),
                )
            }),
        })
    }

    /// The address /metrics and /healthz are served on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Runs until `shutdown`: the runtime (consumer and reply relays), the
    /// HTTP server, the outbox samplers and the retention jobs; then drains them and closes the pools.
    pub async fn run(self, shutdown: CancellationToken) {
        let name = runtime_name(self.which);
        let pools = self.runtime.pools();
        let tasks = TaskTracker::new();
        for (i, pool) in pools.iter().enumerate() {
            tasks.spawn(
                skald_wire::metrics::OutboxSampler {
                    pool: pool.clone(),
                    outbox: name.to_owned(),
                    database: i,
                    interval: self.sample_interval,
                }
                .run(shutdown.child_token()),
            );
            if let Some((age, interval, batch)) = self.retention {
                tasks.spawn(
                    Retention {
                        pool: pool.clone(),
                        participant: name.to_owned(),
                        database: i,
                        interval,
                        age,
                        batch,
                    }
                    .run(shutdown.child_token()),
                );
            }
        }
        if let Ok(addr) = self.listener.local_addr() {
            tracing::info!(participant = name, %addr, "serving /metrics and /healthz");
        }
        tasks.spawn(crate::http::serve(self.listener, shutdown.child_token()));
        tasks.close();
        close_after(pools, async {
            self.runtime.run(shutdown.clone()).await;
            shutdown.cancel();
            tasks.wait().await;
        })
        .await;
    }
}

/// `ORDERS_DATABASE_URLS` if it names any database, else `ORDERS_DATABASE_URL`.
pub fn order_database_urls(single: &str, list: &[String]) -> Vec<String> {
    let listed: Vec<String> = list
        .iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    if listed.is_empty() {
        vec![single.to_owned()]
    } else {
        listed
    }
}

async fn close_after(pools: Vec<sqlx::PgPool>, run: impl std::future::Future<Output = ()>) {
    run.await;
    for pool in pools {
        pool.close().await;
    }
}

/// The participant's name: its routing key, queue and metrics label.
pub fn runtime_name(which: Which) -> &'static str {
    match which {
        Which::Order => "order",
        Which::Payment => "payment",
        Which::Inventory => "inventory",
    }
}
