//! The deployment under test: the release binaries started as child
//! processes (one coordinator, one participant of each kind) on databases,
//! a RabbitMQ vhost and a Redis key prefix of the bench's own, all set up
//! fresh at start and removed at the end.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};
use tokio::process::{Child as Process, Command};

use super::procfs;
use crate::{Api, DbConfig};

/// Variables the bench sets for every child itself; `--child-env` may not override them.
pub const MANAGED_ENV: [&str; 9] = [
    "DATABASE_URL",
    "ORDERS_DATABASE_URL",
    "ORDERS_DATABASE_URLS",
    "PAYMENTS_DATABASE_URL",
    "INVENTORY_DATABASE_URL",
    "AMQP_URL",
    "REDIS_URL",
    "REDIS_KEY_PREFIX",
    "HTTP_ADDR",
];

/// Where things live, as given on the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Names of the databases (`{name}`, `{name}_orders`, ...), the vhost and the Redis prefix.
    pub name: String,
    /// `postgres://user@host:port`, without a database.
    pub pg_base: String,
    /// `amqp://user:pass@host:port`, without a vhost.
    pub amqp_base: String,
    pub rabbitmq_user: String,
    pub redis_url: String,
    /// Where the `coordinator` and `participant` binaries are.
    pub bin_dir: PathBuf,
    pub log_dir: PathBuf,
    /// Extra environment for every child (`--child-env`).
    pub child_env: Vec<(String, String)>,
    pub startup_timeout: Duration,
}

impl Settings {
    pub fn db_name(&self, what: &str) -> String {
        match what {
            "" => self.name.clone(),
            w => format!("{}_{w}", self.name),
        }
    }

    pub fn db_url(&self, what: &str) -> String {
        with_database(&self.pg_base, &self.db_name(what))
    }

    /// The database the bench uses to create and drop the others and to read statistics.
    pub fn admin_url(&self) -> String {
        with_database(&self.pg_base, "postgres")
    }

    pub fn amqp_url(&self) -> String {
        format!("{}/{}", self.amqp_base.trim_end_matches('/'), self.name)
    }

    pub fn redis_prefix(&self) -> String {
        format!("{}:", self.name)
    }

    /// The four databases, as `DbConfig` (what verify and the demo use).
    pub fn db_config(&self, order_shards: u32) -> DbConfig {
        DbConfig {
            database_url: self.db_url(""),
            orders_database_url: self.db_url("orders"),
            payments_database_url: self.db_url("payments"),
            inventory_database_url: self.db_url("inventory"),
            orders_database_urls: Vec::new(),
            order_shards,
        }
    }

    /// Names of our four databases (for `pg_stat_database`).
    pub fn db_names(&self) -> Vec<String> {
        ["", "orders", "payments", "inventory"]
            .iter()
            .map(|w| self.db_name(w))
            .collect()
    }
}

/// Drops and recreates our four databases, vhost and Redis keys.
pub async fn reset(s: &Settings) -> anyhow::Result<()> {
    anyhow::ensure!(
        s.name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && s.name.starts_with(|c: char| c.is_ascii_lowercase()),
        "--name {:?}: use lower-case letters, digits and '_', starting with a letter",
        s.name
    );
    drop_databases(s).await?;
    each_database(s, "creating", |db| format!("CREATE DATABASE \"{db}\"")).await?;
    // A vhost left by an interrupted run holds its old queues: start clean.
    let _ = rabbitmqctl(&["delete_vhost", &s.name]).await;
    rabbitmqctl(&["add_vhost", &s.name]).await?;
    rabbitmqctl(&["set_permissions", "-p", &s.name, &s.rabbitmq_user, ".*", ".*", ".*"]).await?;
    delete_redis_keys(s).await?;
    Ok(())
}

/// Removes what [`reset`] created (each part even if another fails).
pub async fn remove(s: &Settings) -> anyhow::Result<()> {
    let dbs = drop_databases(s).await;
    let vhost = rabbitmqctl(&["delete_vhost", &s.name]).await;
    let redis = delete_redis_keys(s).await;
    dbs.and(vhost).and(redis)
}

async fn admin(s: &Settings) -> anyhow::Result<sqlx::PgConnection> {
    let opts: sqlx::postgres::PgConnectOptions = s.admin_url().parse().context("PostgreSQL URL (--pg-base)")?;
    opts.disable_statement_logging()
        .connect()
        .await
        .with_context(|| format!("PostgreSQL at {}", skald_wire::db::redact(&s.pg_base)))
}

async fn drop_databases(s: &Settings) -> anyhow::Result<()> {
    each_database(s, "dropping", |db| {
        format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)")
    })
    .await
}

/// Runs `sql(name)` for each of our databases, from the `postgres` database.
async fn each_database(s: &Settings, doing: &str, sql: impl Fn(&str) -> String) -> anyhow::Result<()> {
    let mut admin = admin(s).await?;
    for db in s.db_names() {
        sqlx::query(AssertSqlSafe(sql(&db)))
            .execute(&mut admin)
            .await
            .with_context(|| format!("{doing} database {db}"))?;
    }
    let _ = admin.close().await;
    Ok(())
}

/// Runs `rabbitmqctl -q ARGS`; an error carries its stderr.
pub async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("running rabbitmqctl (is it on PATH?)")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl {}: {}",
            args.join(" "),
            crate::one_line(&String::from_utf8_lossy(&out.stderr))
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

async fn redis(s: &Settings) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(s.redis_url.as_str()).context("Redis URL")?;
    tokio::time::timeout(Duration::from_secs(5), client.get_multiplexed_async_connection())
        .await
        .context("Redis: connection timed out")?
        .with_context(|| format!("Redis at {}", s.redis_url))
}

async fn delete_redis_keys(s: &Settings) -> anyhow::Result<()> {
    let mut conn = redis(s).await?;
    let pattern = format!("{}*", s.redis_prefix());
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .context("Redis SCAN")?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .context("Redis DEL")?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Server versions, for the report (empty when they cannot be read cheaply).
pub async fn versions(s: &Settings) -> (String, String, String) {
    let pg = async {
        let mut admin = admin(s).await.ok()?;
        let v: Option<String> = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&mut admin)
            .await
            .ok();
        let _ = admin.close().await;
        v
    };
    let rabbit = async { rabbitmqctl(&["version"]).await.ok() };
    let redis_version = async {
        let mut conn = redis(s).await.ok()?;
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut conn).await.ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_owned())
    };
    let (pg, rabbit, redis_version) = tokio::join!(pg, rabbit, redis_version);
    (
        pg.unwrap_or_default(),
        rabbit.unwrap_or_default(),
        redis_version.unwrap_or_default(),
    )
}

/// The folders each child binary is built from: its crate, the crates it
/// depends on, and its migrations (with the workspace's `Cargo.toml` and
/// `Cargo.lock`). Cargo relinks a binary only when one of its own inputs
/// changed, so a binary is compared with its own sources only.
const BINARY_SOURCES: [(&str, &[&str]); 2] = [
    (
        "coordinator",
        &["engine", "wire", "coordinator", "migrations/coordinator"],
    ),
    (
        "participant",
        &[
            "wire",
            "participants",
            "migrations/orders",
            "migrations/payments",
            "migrations/inventory",
        ],
    ),
];

/// Warnings for child binaries older than the sources they are built from
/// (`cargo run --bin bench` rebuilds the bench only). Looks for the
/// workspace two levels above the binaries (`target/release`); silent if
/// it is not there.
pub fn stale_binaries(s: &Settings) -> Vec<String> {
    let Some(root) = s.bin_dir.parent().and_then(Path::parent) else {
        return Vec::new();
    };
    stale_in(root, &s.bin_dir)
}

fn stale_in(root: &Path, bin_dir: &Path) -> Vec<String> {
    if !root.join("Cargo.toml").is_file() {
        return Vec::new();
    }
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let manifests = ["Cargo.toml", "Cargo.lock"]
        .iter()
        .filter_map(|f| modified(&root.join(f)))
        .max();
    BINARY_SOURCES
        .iter()
        .filter_map(|(binary, dirs)| {
            let newest_source = dirs
                .iter()
                .filter_map(|d| newest_file(&root.join(d)))
                .chain(manifests)
                .max()?;
            let built = modified(&bin_dir.join(binary))?;
            (built < newest_source).then(|| {
                format!(
                    "{} is older than the sources in {}: run `cargo build --release -p skald-coordinator -p skald-participants` to measure the current code",
                    bin_dir.join(binary).display(),
                    root.display()
                )
            })
        })
        .collect()
}

fn newest_file(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs" || e == "sql" || e == "toml")
                && let Ok(m) = meta.modified()
            {
                newest = newest.max(Some(m));
            }
        }
    }
    newest
}

/// One child process.
pub struct Child {
    /// `coordinator`, `order`, `payment` or `inventory`.
    pub name: &'static str,
    pub pid: u32,
    process: Process,
    log: PathBuf,
}

impl Child {
    /// The last lines of its log (for error messages).
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

/// `base` (a server URL such as `--pg-base`) with `database` as its path; a
/// query part (such as `?host=/var/run/postgresql`, a Unix socket) stays
/// after it.
fn with_database(base: &str, database: &str) -> String {
    let (base, query) = match base.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (base, String::new()),
    };
    format!("{}/{database}{query}", base.trim_end_matches('/'))
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The running children.
pub struct Deployment {
    /// The coordinator's API.
    pub url: String,
    /// Each participant's HTTP server (`/healthz`, `/metrics`), in start order.
    pub participant_urls: Vec<String>,
    pub children: Vec<Child>,
    pub log_dir: PathBuf,
}

impl Deployment {
    /// Starts the coordinator and the three participants, and waits for the
    /// coordinator's `/readyz` (PostgreSQL, RabbitMQ and Redis reachable) and
    /// each participant's `/healthz` (served once its database is migrated:
    /// the bench seeds balances and stock right after).
    pub async fn start(s: &Settings) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&s.log_dir).with_context(|| format!("creating {}", s.log_dir.display()))?;
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let mut dep = Self {
            url,
            participant_urls: Vec::new(),
            children: Vec::new(),
            log_dir: s.log_dir.clone(),
        };
        let started = async {
            dep.spawn(s, "coordinator", "coordinator", &[], port)?;
            for which in ["order", "payment", "inventory"] {
                // A port of its own: the default ones (9091-9093) may be taken.
                let port = free_port()?;
                dep.participant_urls.push(format!("http://127.0.0.1:{port}"));
                dep.spawn(s, which, "participant", &[which], port)?;
            }
            dep.wait_ready(s.startup_timeout).await
        }
        .await;
        match started {
            Ok(()) => Ok(dep),
            Err(e) => {
                dep.stop(Duration::from_secs(10)).await;
                Err(e)
            }
        }
    }

    fn spawn(
        &mut self,
        s: &Settings,
        name: &'static str,
        binary: &str,
        args: &[&str],
        port: u16,
    ) -> anyhow::Result<()> {
        let path = s.bin_dir.join(binary);
        anyhow::ensure!(
            path.is_file(),
            "{} not found: build it with `cargo build --release -p skald-coordinator -p skald-participants` \
             (the bench runs the binaries next to itself)",
            path.display()
        );
        let log = self.log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("log file")?;
        let mut cmd = Command::new(&path);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("RUST_LOG", "warn")
            .env("DATABASE_URL", s.db_url(""))
            .env("ORDERS_DATABASE_URL", s.db_url("orders"))
            .env_remove("ORDERS_DATABASE_URLS")
            .env("PAYMENTS_DATABASE_URL", s.db_url("payments"))
            .env("INVENTORY_DATABASE_URL", s.db_url("inventory"))
            .env("AMQP_URL", s.amqp_url())
            .env("REDIS_URL", &s.redis_url)
            .env("REDIS_KEY_PREFIX", s.redis_prefix())
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"));
        for (k, v) in &s.child_env {
            cmd.env(k, v);
        }
        // If the bench dies without cleaning up, the kernel sends its children SIGTERM.
        // SAFETY: the closure runs in the forked child before exec and only calls
        // prctl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let process = cmd.spawn().with_context(|| format!("starting {}", path.display()))?;
        let pid = process.id().context("child has no pid")?;
        self.children.push(Child {
            name,
            pid,
            process,
            log,
        });
        Ok(())
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        // (API, path, index of the child): the coordinator was started first.
        let mut waiting: Vec<(Api, &'static str, usize)> = vec![(Api::new(&self.url, None)?, "/readyz", 0)];
        for (i, url) in self.participant_urls.iter().enumerate() {
            waiting.push((Api::new(url, None)?, "/healthz", i + 1));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let mut still = Vec::with_capacity(waiting.len());
            for (api, path, child) in waiting {
                if api.get(path).await.is_err() {
                    still.push((api, path, child));
                }
            }
            waiting = still;
            let Some((api, path, child)) = waiting.first() else {
                return Ok(());
            };
            if tokio::time::Instant::now() >= deadline {
                let child = self.children.get(*child);
                bail!(
                    "{}{path} ({}) did not answer within {} s; the end of its log ({}):\n{}",
                    api.base(),
                    child.map(|c| c.name).unwrap_or("?"),
                    timeout.as_secs(),
                    child.map(|c| c.log.display().to_string()).unwrap_or_default(),
                    child.map(|c| c.log_tail(15)).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An error naming the first child that has exited, with the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for c in &mut self.children {
            if let Some(status) = c.process.try_wait().context("waiting on a child")? {
                bail!(
                    "{} (pid {}) exited early with {status}; the end of {}:\n{}",
                    c.name,
                    c.pid,
                    c.log.display(),
                    c.log_tail(15)
                );
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Child> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn participants(&self) -> impl Iterator<Item = &Child> {
        self.children.iter().filter(|c| c.name != "coordinator")
    }

    /// SIGCONT (in case the in-flight phase left them stopped), SIGTERM, then waits up to `grace` for each
    /// (SIGKILL after that). Returns a line per child that did not exit cleanly.
    pub async fn stop(&mut self, grace: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        for c in &mut self.children {
            if let Ok(None) = c.process.try_wait() {
                let _ = procfs::signal(c.pid, libc::SIGCONT);
                let _ = procfs::signal(c.pid, libc::SIGTERM);
            }
        }
        for c in &mut self.children {
            match tokio::time::timeout(grace, c.process.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => problems.push(format!("{} (pid {}) exited with {status}", c.name, c.pid)),
                Ok(Err(e)) => problems.push(format!("{} (pid {}): {e}", c.name, c.pid)),
                Err(_) => {
                    let _ = c.process.kill().await;
                    problems.push(format!(
                        "{} (pid {}) did not stop within {} s of SIGTERM: killed",
                        c.name,
                        c.pid,
                        grace.as_secs()
                    ));
                }
            }
        }
        self.children.clear();
        problems
    }
}

/// A free loopback port for a child (see [`crate::free_port`]).
fn free_port() -> anyhow::Result<u16> {
    crate::free_port().context("finding a free port")
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use super::{stale_in, with_database};

    /// Writes `path` under `root` with the given modification time.
    fn file_at(root: &Path, path: &str, at: SystemTime) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let f = std::fs::File::create(&path).unwrap();
        f.set_modified(at).unwrap();
    }

    #[test]
    fn a_binary_is_stale_only_against_its_own_sources() {
        let root = std::env::temp_dir().join(format!("skald-stale-{}", uuid::Uuid::new_v4()));
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s);
        file_at(&root, "Cargo.toml", t(0));
        file_at(&root, "wire/src/lib.rs", t(0));
        file_at(&root, "coordinator/src/main.rs", t(0));
        file_at(&root, "participants/src/main.rs", t(0));
        file_at(&root, "target/release/coordinator", t(10));
        file_at(&root, "target/release/participant", t(10));
        let bin = root.join("target/release");
        assert!(stale_in(&root, &bin).is_empty(), "both built after their sources");

        // A participant's source changed: its binary is stale, not the coordinator.
        file_at(&root, "participants/src/runtime.rs", t(20));
        let stale = stale_in(&root, &bin);
        assert_eq!(stale.len(), 1, "{stale:?}");
        assert!(stale[0].contains("release/participant is older"), "{stale:?}");

        // A shared crate changed: both are stale.
        file_at(&root, "wire/src/amqp.rs", t(30));
        assert_eq!(stale_in(&root, &bin).len(), 2);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_database_goes_before_the_query() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432", "skald_bench"),
            "postgres://postgres@127.0.0.1:5432/skald_bench"
        );
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/", "postgres"),
            "postgres://postgres@127.0.0.1:5432/postgres"
        );
        assert_eq!(
            with_database(
                "postgres://postgres@localhost?host=/var/run/postgresql",
                "skald_bench_orders"
            ),
            "postgres://postgres@localhost/skald_bench_orders?host=/var/run/postgresql"
        );
    }
}
