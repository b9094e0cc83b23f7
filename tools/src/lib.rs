//! Shared by the `demo`, `bench` and `sagactl` binaries: a small client of
//! the coordinator's HTTP API, the database settings (the same environment
//! variables as the servers), printing of a verify report, the order mix
//! ([`workload`]) and the benchmark's pieces ([`bench`]).

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use skald_participants::order::ShardMap;
use skald_participants::verify::{Databases, Report};

/// A free loopback port for a child process to listen on, chosen below the
/// kernel's ephemeral range (`ip_local_port_range`). The port is free when
/// chosen and released before the child binds it; one the kernel picked
/// (`127.0.0.1:0`) could meanwhile become the local end of one of the many
/// outgoing connections to PostgreSQL or RabbitMQ, which take their ports
/// from that range, and the child would fail with "address in use".
pub fn free_port() -> std::io::Result<u16> {
    let low = ephemeral_ports_start();
    if low > 11_000 {
        for _ in 0..64 {
            let port = rand::random_range(10_000..low);
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                return l.local_addr().map(|a| a.port());
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
}

/// The first port of the kernel's ephemeral range (Linux's default if it
/// cannot be read).
fn ephemeral_ports_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768)
}

/// `println!` that ends the process quietly when stdout is a closed pipe
/// (`sagactl list | head`) instead of panicking.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::write_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::write_line(format_args!($($arg)*))
    };
}

pub mod bench;
/// The dead-letter queue (shared with the coordinator's HTTP API).
pub use skald_coordinator::dlq;
pub mod workload;

pub fn write_line(args: fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("cannot write to stdout: {e}");
        }
        std::process::exit(if e.kind() == std::io::ErrorKind::BrokenPipe {
            0
        } else {
            1
        });
    }
}

/// A failed API call: transport error (no status) or an error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: Option<reqwest::StatusCode>,
    pub code: String,
    pub message: String,
}

impl ApiError {
    /// Worth retrying: the coordinator was unreachable, overloaded or failed internally.
    pub fn is_transient(&self) -> bool {
        match self.status {
            None => true,
            Some(s) => s.is_server_error() || s == reqwest::StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status == Some(reqwest::StatusCode::NOT_FOUND)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "HTTP {} {}: {}", s.as_u16(), self.code, self.message),
            None => write!(f, "{}: {}", self.code, self.message),
        }
    }
}

impl std::error::Error for ApiError {}

/// The coordinator's HTTP API.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    admin_token: Option<String>,
}

impl Api {
    pub fn new(base: &str, admin_token: Option<String>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .build()
            .context("HTTP client")?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            admin_token: admin_token.filter(|t| !t.is_empty()),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn get(&self, path: &str) -> Result<Value, ApiError> {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    /// `POST /v1/orders` with an `Idempotency-Key`.
    pub async fn create_order(&self, order: &Value, idempotency_key: &str) -> Result<Value, ApiError> {
        let req = self
            .http
            .post(format!("{}/v1/orders", self.base))
            .header("Idempotency-Key", idempotency_key)
            .json(order);
        self.send(req).await
    }

    /// An operator action (`retry`, `abort`) on a saga, with the bearer token.
    pub async fn operate(&self, saga_id: &str, action: &str) -> Result<Value, ApiError> {
        let Some(token) = &self.admin_token else {
            return Err(ApiError {
                status: None,
                code: "no_token".to_owned(),
                message: "operator actions need ADMIN_TOKEN (or --admin-token)".to_owned(),
            });
        };
        let req = self
            .http
            .post(format!("{}/v1/sagas/{saga_id}/{action}", self.base))
            .bearer_auth(token);
        self.send(req).await
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, ApiError> {
        let resp = req.send().await.map_err(|e| ApiError {
            status: None,
            code: "unreachable".to_owned(),
            message: format!("coordinator at {}: {}", self.base, one_line(&error_chain(&e))),
        })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| ApiError {
            status: Some(status),
            code: "truncated".to_owned(),
            message: one_line(&error_chain(&e)),
        })?;
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        if status.is_success() {
            return json.ok_or_else(|| ApiError {
                status: Some(status),
                code: "bad_response".to_owned(),
                message: "response body is not JSON".to_owned(),
            });
        }
        let field = |k: &str| {
            json.as_ref()
                .and_then(|j| j.pointer(&format!("/error/{k}")))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        Err(ApiError {
            status: Some(status),
            code: field("code").unwrap_or_else(|| "error".to_owned()),
            message: field("message").unwrap_or_else(|| one_line(&String::from_utf8_lossy(&body))),
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Collapses whitespace runs (newlines included) so an error fits on one line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The four databases, from the same environment variables as the servers.
#[derive(Debug, Clone, clap::Args)]
pub struct DbConfig {
    /// The coordinator's database.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/skald"
    )]
    pub database_url: String,
    #[arg(
        long,
        env = "ORDERS_DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/skald_orders"
    )]
    pub orders_database_url: String,
    #[arg(
        long,
        env = "PAYMENTS_DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/skald_payments"
    )]
    pub payments_database_url: String,
    #[arg(
        long,
        env = "INVENTORY_DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/skald_inventory"
    )]
    pub inventory_database_url: String,
    /// Orders databases when the shards are spread (comma-separated); overrides ORDERS_DATABASE_URL.
    #[arg(long, env = "ORDERS_DATABASE_URLS", value_delimiter = ',', hide_env_values = true)]
    pub orders_database_urls: Vec<String>,
    /// Order shard tables, if the orders database does not record it yet.
    #[arg(long, env = "ORDER_SHARDS", default_value_t = 16)]
    pub order_shards: u32,
}

impl DbConfig {
    /// The orders databases, in shard-map order.
    pub fn order_urls(&self) -> Vec<String> {
        skald_participants::app::order_database_urls(&self.orders_database_url, &self.orders_database_urls)
    }

    /// Pools to the existing databases (nothing is created or migrated).
    pub async fn connect(&self) -> anyhow::Result<Databases> {
        let pool =
            |url: &str, what: &str| skald_wire::db::lazy_pool(url, 4).with_context(|| format!("{what} database"));
        let orders = self
            .order_urls()
            .iter()
            .map(|u| pool(u, "orders"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let shards = recorded_shards(&orders, self.order_shards).await?;
        Ok(Databases {
            coordinator: pool(&self.database_url, "coordinator")?,
            orders,
            payments: pool(&self.payments_database_url, "payments")?,
            inventory: pool(&self.inventory_database_url, "inventory")?,
            shards,
        })
    }
}

/// The shard map recorded in the (first) orders database, else `fallback` shards over `orders`.
pub async fn recorded_shards(orders: &[sqlx::PgPool], fallback: u32) -> anyhow::Result<ShardMap> {
    let first = orders.first().context("no orders database")?;
    let recorded: Option<i32> = sqlx::query_scalar("SELECT shards FROM order_shards")
        .fetch_optional(first)
        .await
        .context("orders database")?;
    let n = recorded.map_or(fallback, |n| n as u32);
    ShardMap::spread(n, orders.len() as u32).map_err(anyhow::Error::msg)
}

/// Prints a verify report as a small table; at most `max_violations` lines of them.
pub fn print_report(report: &Report, max_violations: usize) {
    for line in report_lines(report, max_violations) {
        outln!("{line}");
    }
}

/// A verify report as a small table; at most `max_violations` lines of them.
pub fn report_lines(report: &Report, max_violations: usize) -> Vec<String> {
    let mut lines = Vec::new();
    macro_rules! outln {
        ($($arg:tt)*) => {
            lines.push(format!($($arg)*))
        };
    }
    let counts = |m: &std::collections::BTreeMap<String, i64>| {
        if m.is_empty() {
            "none".to_owned()
        } else {
            m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        }
    };
    outln!("  {:<14}{}", "sagas", counts(&report.sagas_by_status));
    outln!("  {:<14}{}", "orders", counts(&report.orders_by_status));
    outln!(
        "  {:<14}CHARGED {}, REFUNDED {}",
        "payments",
        report.charged_payments,
        report.refunded_payments
    );
    outln!(
        "  {:<14}RESERVED {}, RELEASED {}",
        "reservations",
        report.reserved_lines,
        report.released_lines
    );
    if report.ok() {
        outln!("  {:<14}none: every invariant holds", "violations");
        return lines;
    }
    outln!("  {:<14}{}", "violations", report.violations.len());
    for v in report.violations.iter().take(max_violations) {
        outln!("    - {v}");
    }
    if report.violations.len() > max_violations {
        outln!("    ... and {} more", report.violations.len() - max_violations);
    }
    lines
}

#[cfg(test)]
mod port_tests {
    #[test]
    fn a_free_port_is_below_the_ephemeral_range_and_can_be_bound() {
        let low = super::ephemeral_ports_start();
        for _ in 0..20 {
            let port = super::free_port().unwrap();
            if low > 11_000 {
                assert!((10_000..low).contains(&port), "port {port} is not below {low}");
            }
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
