//! Test harness: every test gets its own four PostgreSQL databases, its own
//! RabbitMQ vhost (so topology names stay the contract's), its own Redis key
//! prefix, and runs the real coordinator and participants in-process against
//! the real servers. Everything is removed when the [`TestEnv`] is dropped,
//! even if the test panicked.

use std::process::Command;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{Value, json};
use skald_participants::app::{Config as ParticipantConfig, Participant, Which};
use skald_participants::order::ShardMap;
use skald_participants::verify::{Databases, Report};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const PG: &str = "postgres://postgres@127.0.0.1:5432";
pub const REDIS: &str = "redis://127.0.0.1:6379";
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// What to run for one test.
#[derive(Debug, Clone)]
pub struct Setup {
    pub coordinator: bool,
    pub participants: Vec<Which>,
    pub step_timeout_ms: u64,
    pub step_max_attempts: u32,
    pub compensation_max_failures: u32,
    pub order_shards: u32,
    /// Orders databases the shards are spread over.
    pub order_databases: u32,
    /// Quorum queues with a delivery limit (as for a RabbitMQ cluster).
    pub quorum_queues: bool,
    /// The storage version of classic queues (`AMQP_CLASSIC_QUEUE_VERSION`).
    pub classic_queue_version: skald_wire::amqp::ClassicQueueVersion,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            coordinator: true,
            participants: vec![Which::Order, Which::Payment, Which::Inventory],
            step_timeout_ms: 10_000,
            step_max_attempts: 8,
            compensation_max_failures: 10,
            order_shards: 4,
            order_databases: 1,
            quorum_queues: false,
            classic_queue_version: skald_wire::amqp::ClassicQueueVersion::default(),
        }
    }
}

impl Setup {
    /// No payment participant and short deadlines: `charge_payment` times
    /// out, so its own refund must run too (unknown outcome), and that
    /// refund times out until the saga is `STUCK` (within about 5 s). The
    /// deadline leaves room for a loaded machine once payment is back.
    pub fn stuck_without_payment() -> Self {
        Self {
            participants: vec![Which::Order, Which::Inventory],
            step_timeout_ms: 1_000,
            step_max_attempts: 2,
            compensation_max_failures: 2,
            ..Self::default()
        }
    }

    pub fn only(participant: Which) -> Self {
        Self {
            coordinator: false,
            participants: vec![participant],
            ..Self::default()
        }
    }
}

/// Names that belong to one test.
#[derive(Debug, Clone)]
pub struct Names {
    pub id: String,
}

impl Names {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self {
            id: format!("skt_{}", &Uuid::new_v4().simple().to_string()[..12]),
        }
    }
    pub fn db(&self, what: &str) -> String {
        format!("{}_{what}", self.id)
    }
    pub fn db_url(&self, what: &str) -> String {
        format!("{PG}/{}", self.db(what))
    }
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.id)
    }
    pub fn redis_prefix(&self) -> String {
        format!("{}:", self.id)
    }
}

pub fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!("rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => panic!("rabbitmqctl {args:?}: {e}"),
    }
}

pub struct TestEnv {
    pub names: Names,
    pub topology: skald_wire::amqp::Topology,
    pub base_url: String,
    pub http: reqwest::Client,
    pub participant_config: ParticipantConfig,
    pub coordinator_config: skald_coordinator::Config,
    pub dbs: Databases,
    /// Where each participant started by this env serves /metrics and /healthz.
    pub participant_addrs: Vec<(Which, std::net::SocketAddr)>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl TestEnv {
    pub async fn start(setup: Setup) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let names = Names::new();
        let vhost = names.id.clone();
        tokio::task::spawn_blocking(move || {
            rabbitmqctl(&["add_vhost", &vhost]);
            rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        })
        .await
        .expect("vhost set-up");
        let topology = if setup.quorum_queues {
            skald_wire::amqp::Topology {
                queue_type: skald_wire::amqp::QueueType::Quorum,
                delivery_limit: Some(5),
                ..Default::default()
            }
        } else {
            skald_wire::amqp::Topology {
                classic_version: setup.classic_queue_version,
                ..Default::default()
            }
        };
        let mut env = Self {
            topology: topology.clone(),
            base_url: String::new(),
            http: reqwest::Client::new(),
            participant_config: participant_config(&names, setup.order_shards, setup.order_databases),
            coordinator_config: coordinator_config(&names, &setup),
            dbs: databases_spread(&names, setup.order_shards, setup.order_databases),
            names,
            participant_addrs: Vec::new(),
            shutdown: CancellationToken::new(),
            tasks: Vec::new(),
        };
        env.coordinator_config.queue_type = topology.queue_type;
        env.coordinator_config.delivery_limit = topology.delivery_limit;
        env.participant_config.queue_type = topology.queue_type;
        env.participant_config.delivery_limit = topology.delivery_limit;
        env.coordinator_config.classic_queue_version = topology.classic_version;
        env.participant_config.classic_queue_version = topology.classic_version;
        // Every database is created and migrated, whatever runs.
        let c = &env.participant_config;
        let mut dbs: Vec<(String, &'static sqlx::migrate::Migrator)> = vec![
            (
                c.payments_database_url.clone(),
                &skald_participants::app::PAYMENTS_MIGRATOR,
            ),
            (
                c.inventory_database_url.clone(),
                &skald_participants::app::INVENTORY_MIGRATOR,
            ),
        ];
        dbs.extend(
            c.order_database_urls()
                .into_iter()
                .map(|u| (u, &skald_participants::app::ORDERS_MIGRATOR)),
        );
        for (url, m) in dbs {
            let pool = skald_wire::db::connect_and_migrate(&url, 1, m, 2)
                .await
                .expect("participant db");
            pool.close().await;
        }
        for (i, pool) in env.dbs.orders.iter().enumerate() {
            env.dbs.shards.prepare(pool, i).await.expect("order shards");
        }
        if setup.coordinator {
            env.base_url = env.start_coordinator(env.coordinator_config.clone()).await;
        } else {
            skald_wire::db::ensure_database(&env.coordinator_config.database_url)
                .await
                .expect("coordinator db");
        }
        for which in setup.participants {
            env.start_participant(which).await;
        }
        env
    }

    /// Starts one more coordinator on this test's databases and vhost, with
    /// `config` (start from `self.coordinator_config`); returns its base URL.
    pub async fn start_coordinator(&mut self, config: skald_coordinator::Config) -> String {
        let app = skald_coordinator::Application::build(config)
            .await
            .expect("coordinator starts");
        let base_url = format!("http://{}", app.local_addr().expect("address"));
        let token = self.shutdown.child_token();
        self.tasks.push(tokio::spawn(async move {
            app.run_until_stopped(token).await.expect("coordinator runs");
        }));
        base_url
    }

    pub async fn start_participant(&mut self, which: Which) {
        let p = Participant::build(which, &self.participant_config)
            .await
            .expect("participant starts");
        self.participant_addrs
            .push((which, p.local_addr().expect("participant address")));
        let token = self.shutdown.child_token();
        self.tasks.push(tokio::spawn(p.run(token)));
    }

    /// Stops every component gracefully and waits for them.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub async fn post_order(&self, body: &Value, key: Option<&str>) -> reqwest::Response {
        let mut req = self.http.post(self.url("/v1/orders")).json(body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        req.send().await.expect("POST /v1/orders")
    }

    /// Posts an order that must be accepted; returns (order_id, saga_id).
    pub async fn place_order(&self, body: &Value) -> (Uuid, Uuid) {
        let resp = self.post_order(body, None).await;
        assert_eq!(resp.status(), 202, "order refused");
        let v: Value = resp.json().await.expect("json");
        (parse_uuid(&v["order_id"]), parse_uuid(&v["saga_id"]))
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self.http.get(self.url(path)).send().await.expect("GET");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Waits until the saga has `status`; panics after `within`.
    pub async fn wait_for_saga(&self, saga_id: Uuid, status: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.saga(saga_id).await;
            if v["status"] == status {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "saga {saga_id} not {status} after {within:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the saga is `COMPLETED`, `COMPENSATED` or `STUCK`; panics after `within`.
    pub async fn wait_for_saga_final(&self, saga_id: Uuid, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.saga(saga_id).await;
            if matches!(v["status"].as_str(), Some("COMPLETED" | "COMPENSATED" | "STUCK")) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "saga {saga_id} not final after {within:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// POSTs an operator action with the admin token.
    pub async fn operate(&self, saga_id: Uuid, action: &str) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(&format!("/v1/sagas/{saga_id}/{action}")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("POST operator action");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Waits until the order is APPROVED or CANCELLED; panics after `within`.
    pub async fn wait_for_order(&self, order_id: Uuid, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (status, v) = self.get_json(&format!("/v1/orders/{order_id}")).await;
            assert_eq!(status, 200, "GET order {order_id}: {v}");
            if v["status"] != "PENDING" {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "order {order_id} still PENDING after {within:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn saga(&self, saga_id: Uuid) -> Value {
        let (status, v) = self.get_json(&format!("/v1/sagas/{saga_id}")).await;
        assert_eq!(status, 200);
        v
    }

    pub async fn verify(&self) -> Report {
        skald_participants::verify::verify(&self.dbs)
            .await
            .expect("verify runs")
    }

    pub async fn seed(&self, accounts: &[(&str, i64)], stock: &[(&str, i64)]) {
        let a: Vec<(String, i64)> = accounts.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect();
        let s: Vec<(String, i64)> = stock.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect();
        skald_participants::seed::seed_accounts(&self.dbs.payments, &a)
            .await
            .expect("seed accounts");
        skald_participants::seed::seed_stock(&self.dbs.inventory, &s)
            .await
            .expect("seed stock");
    }

    pub async fn balance(&self, customer: &str) -> i64 {
        sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE customer_id = $1")
            .bind(customer)
            .fetch_one(&self.dbs.payments)
            .await
            .expect("balance")
    }

    pub async fn available(&self, sku: &str) -> i64 {
        sqlx::query_scalar("SELECT available FROM stock WHERE sku = $1")
            .bind(sku)
            .fetch_one(&self.dbs.inventory)
            .await
            .expect("stock")
    }

    /// Statuses of the payments of an order.
    pub async fn payments(&self, order_id: Uuid) -> Vec<(String, i64)> {
        sqlx::query_as("SELECT status, amount_cents FROM payments WHERE order_id = $1")
            .bind(order_id)
            .fetch_all(&self.dbs.payments)
            .await
            .expect("payments")
    }

    pub async fn reservations(&self, order_id: Uuid) -> Vec<(String, i64, String)> {
        sqlx::query_as("SELECT sku, quantity, status FROM reservations WHERE order_id = $1 ORDER BY sku")
            .bind(order_id)
            .fetch_all(&self.dbs.inventory)
            .await
            .expect("reservations")
    }

    /// An AMQP connection to this test's vhost.
    pub async fn amqp(&self) -> (Connection, Channel) {
        let conn = skald_wire::amqp::connect(&self.names.amqp_url(), "skald-test")
            .await
            .expect("amqp");
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        self.topology
            .declare(&ch, &["order", "payment", "inventory"])
            .await
            .expect("topology");
        (conn, ch)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for t in &self.tasks {
            t.abort();
        }
        let names = self.names.clone();
        // A thread of its own: this may run inside the test's runtime, even while unwinding.
        let _ = std::thread::spawn(move || cleanup(&names)).join();
    }
}

/// Drops the test's databases, Redis keys and vhost.
pub fn cleanup(names: &Names) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return;
    };
    rt.block_on(async {
        if let Ok(admin) = skald_wire::db::lazy_pool(&format!("{PG}/postgres"), 1) {
            for what in ["c", "o", "p", "i", "o1", "o2", "o3"] {
                let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", names.db(what));
                let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&admin).await;
            }
            admin.close().await;
        }
        if let Ok(client) = redis::Client::open(REDIS)
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", names.redis_prefix()))
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
            }
        }
    });
    let _ = Command::new("rabbitmqctl").args(["delete_vhost", &names.id]).output();
}

fn coordinator_config(names: &Names, setup: &Setup) -> skald_coordinator::Config {
    let mut c = skald_coordinator::Config::local();
    c.database_url = names.db_url("c");
    c.amqp_url = names.amqp_url();
    c.redis_url = REDIS.to_owned();
    c.http_addr = "127.0.0.1:0".parse().expect("addr");
    c.db_pool_size = 4;
    c.sweep_interval_ms = 50;
    c.relay_poll_ms = 100;
    c.step_timeout_ms = setup.step_timeout_ms;
    c.step_max_attempts = setup.step_max_attempts;
    c.compensation_max_failures = setup.compensation_max_failures;
    c.retry_backoff_ms = 20;
    c.retry_max_backoff_ms = 500;
    c.admin_token = Some(ADMIN_TOKEN.to_owned());
    c.startup_retries = 2;
    c.metrics_sample_ms = 100;
    // Tests backdate rows by hand and run retention passes themselves.
    c.retention_secs = 0;
    c
}

fn participant_config(names: &Names, shards: u32, order_databases: u32) -> ParticipantConfig {
    let mut c = ParticipantConfig::local();
    c.orders_database_url = names.db_url("o");
    if order_databases > 1 {
        c.orders_database_urls = (0..order_databases).map(|i| names.db_url(&order_db(i))).collect();
    }
    c.payments_database_url = names.db_url("p");
    c.inventory_database_url = names.db_url("i");
    c.amqp_url = names.amqp_url();
    c.redis_url = REDIS.to_owned();
    c.redis_key_prefix = names.redis_prefix();
    c.order_shards = shards;
    c.db_pool_size = 3;
    c.batch_max = 16;
    c.startup_retries = 2;
    c.http_addr = Some("127.0.0.1:0".parse().expect("addr"));
    c.metrics_sample_ms = 100;
    // Tests backdate rows by hand and run retention passes themselves.
    c.retention_secs = 0;
    c
}

/// The names of the orders databases: `o`, then `o1`, `o2`, ...
fn order_db(i: u32) -> String {
    if i == 0 { "o".to_owned() } else { format!("o{i}") }
}

pub fn databases(names: &Names, shards: u32) -> Databases {
    databases_spread(names, shards, 1)
}

pub fn databases_spread(names: &Names, shards: u32, order_databases: u32) -> Databases {
    let pool = |what: &str| -> PgPool { skald_wire::db::lazy_pool(&names.db_url(what), 2).expect("pool") };
    Databases {
        coordinator: pool("c"),
        orders: (0..order_databases).map(|i| pool(&order_db(i))).collect(),
        payments: pool("p"),
        inventory: pool("i"),
        shards: ShardMap::spread(shards, order_databases).expect("shards"),
    }
}

pub fn parse_uuid(v: &Value) -> Uuid {
    Uuid::parse_str(v.as_str().unwrap_or_default()).unwrap_or_else(|_| panic!("not a uuid: {v}"))
}

/// An order body.
pub fn order(customer: &str, lines: &[(&str, i64, i64)]) -> Value {
    json!({
        "customer_id": customer,
        "currency": "EUR",
        "items": lines.iter().map(|(sku, q, p)| json!({"sku": sku, "quantity": q, "unit_price_cents": p})).collect::<Vec<_>>(),
    })
}

/// Publishes a raw message (persistent, confirmed) to an exchange.
pub async fn publish_raw(ch: &Channel, exchange: &str, key: &str, message_type: &str, body: &[u8]) {
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(Uuid::new_v4().to_string().into())
        .with_type(message_type.into());
    let confirm = ch
        .basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), body, props)
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
}

/// Publishes `body` to the dead-letter exchange as Skald's runtime does
/// for a poison command of `participant` (reason and origin in headers).
pub async fn publish_dead_letter(
    conn: &Connection,
    message_id: Uuid,
    participant: &str,
    message_type: &str,
    reason: &str,
    body: Vec<u8>,
) {
    use skald_wire::contract::{
        COMMANDS_EXCHANGE, DLX_EXCHANGE, HEADER_ORIGINAL_EXCHANGE, HEADER_ORIGINAL_QUEUE, HEADER_ORIGINAL_ROUTING_KEY,
        HEADER_REASON, command_queue,
    };
    let queue = command_queue(participant);
    let headers = [
        (HEADER_REASON, reason),
        (HEADER_ORIGINAL_EXCHANGE, COMMANDS_EXCHANGE),
        (HEADER_ORIGINAL_ROUTING_KEY, participant),
        (HEADER_ORIGINAL_QUEUE, queue.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let publisher = skald_wire::amqp::Publisher::open(conn).await.expect("publisher");
    publisher
        .publish_all(&[skald_wire::amqp::OutgoingMessage {
            message_id,
            exchange: DLX_EXCHANGE.to_owned(),
            routing_key: queue.clone(),
            message_type: message_type.to_owned(),
            correlation_id: Uuid::nil(),
            body,
            headers,
        }])
        .await
        .expect("dead letter published");
    publisher.close().await;
}

/// Waits for `n` messages on `queue` (taking them off it); panics after `within`.
pub async fn take_messages(ch: &Channel, queue: &str, n: usize, within: Duration) -> Vec<(Value, FieldTable)> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
        {
            Some(m) => {
                let body = serde_json::from_slice(&m.delivery.data)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&m.delivery.data).into_owned()));
                out.push((body, m.delivery.properties.headers().clone().unwrap_or_default()));
            }
            None => {
                assert!(
                    Instant::now() < deadline,
                    "only {} of {n} messages on {queue} after {within:?}",
                    out.len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    out
}

/// A string header of a message.
pub fn header(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Waits until `check` returns `Some`, polling; panics with `what` after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Sum of the samples of `name` in a Prometheus text exposition whose labels
/// include every pair of `labels` (0 when there is none).
pub fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let has = |(k, v): &(&str, &str)| rest.split(',').any(|pair| pair == format!("{k}=\"{v}\""));
            labels.iter().all(has).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// GETs a URL's body as text, asserting a 200.
pub async fn get_text(http: &reqwest::Client, url: &str) -> String {
    let resp = http.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(resp.status(), 200, "GET {url}");
    resp.text().await.expect("body")
}
