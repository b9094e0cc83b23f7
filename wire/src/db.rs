//! PostgreSQL start-up: create the database if missing, connect with
//! retries, apply the embedded migrations.

use std::str::FromStr;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgPool};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid database URL: {0}")]
    Url(String),
    #[error("PostgreSQL at {host}: {source}")]
    Connect { host: String, source: sqlx::Error },
    #[error("migrating database {db}: {source}")]
    Migrate {
        db: String,
        source: sqlx::migrate::MigrateError,
    },
}

impl Error {
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Connect { .. })
    }
}

fn options(url: &str) -> Result<PgConnectOptions> {
    let opts = PgConnectOptions::from_str(url).map_err(|e| Error::Url(redact(&e.to_string())))?;
    // TLS to a server on this host protects nothing and costs CPU on both
    // sides of every statement: unless the URL asks for an `sslmode`, talk
    // to a loopback server in the clear (elsewhere sqlx's default, `prefer`).
    let opts = if is_loopback(opts.get_host()) && !url.contains("sslmode=") {
        opts.ssl_mode(PgSslMode::Disable)
    } else {
        opts
    };
    Ok(opts.disable_statement_logging())
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host.starts_with('/')
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Hides a password in anything that looks like a URL with credentials.
pub fn redact(s: &str) -> String {
    match (s.find("://"), s.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &s[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!("{}{}:***{}", &s[..scheme + 3], &creds[..colon], &s[at..]),
                None => s.to_owned(),
            }
        }
        _ => s.to_owned(),
    }
}

/// Creates the database named in `url` if it does not exist (through the
/// server's `postgres` database). Safe when several processes race.
pub async fn ensure_database(url: &str) -> Result<()> {
    let opts = options(url)?;
    let host = opts.get_host().to_owned();
    let name = opts.get_database().unwrap_or("postgres").to_owned();
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(Error::Url(format!(
            "database name {name:?}: use letters, digits and '_'"
        )));
    }
    let mut admin = opts
        .clone()
        .database("postgres")
        .connect()
        .await
        .map_err(|source| Error::Connect {
            host: host.clone(),
            source,
        })?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await
        .map_err(|source| Error::Connect {
            host: host.clone(),
            source,
        })?;
    if !exists {
        let created = sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await;
        match created {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // 42P04 duplicate_database, 23505: a concurrent CREATE won the race.
            Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => {}
            Err(source) => return Err(Error::Connect { host, source }),
        }
    }
    let _ = admin.close().await;
    Ok(())
}

/// A pool of at most `max_connections` to `url`.
pub fn lazy_pool(url: &str, max_connections: u32) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        // No ping before every checkout: a round trip per statement batch. A
        // connection that died fails its statement instead, and every caller
        // retries transient database errors.
        .test_before_acquire(false)
        .connect_lazy_with(options(url)?))
}

/// Start-up: create the database if missing, connect, migrate; retries
/// transient failures `attempts` times with backoff, then gives up.
pub async fn connect_and_migrate(
    url: &str,
    max_connections: u32,
    migrator: &'static Migrator,
    attempts: usize,
) -> Result<PgPool> {
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(3))
        .with_jitter()
        .with_max_times(attempts);
    let connect = || async {
        ensure_database(url).await?;
        let pool = lazy_pool(url, max_connections)?;
        let opts = options(url)?;
        let host = opts.get_host().to_owned();
        pool.acquire().await.map_err(|source| Error::Connect { host, source })?;
        Ok::<_, Error>(pool)
    };
    let pool = connect
        .retry(policy)
        .when(Error::is_transient)
        .notify(|e: &Error, wait| tracing::warn!(error = %e, ?wait, "PostgreSQL unreachable, retrying"))
        .await?;
    let db = options(url)?.get_database().unwrap_or("postgres").to_owned();
    migrator
        .run(&pool)
        .await
        .map_err(|source| Error::Migrate { db, source })?;
    Ok(pool)
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(super::redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            super::redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn loopback_servers_are_reached_without_tls_unless_asked() {
        use sqlx::postgres::PgSslMode;
        let mode = |url: &str| format!("{:?}", super::options(url).map(|o| o.get_ssl_mode()).ok());
        assert_eq!(
            mode("postgres://u@127.0.0.1/db"),
            format!("{:?}", Some(PgSslMode::Disable))
        );
        assert_eq!(
            mode("postgres://u@localhost/db"),
            format!("{:?}", Some(PgSslMode::Disable))
        );
        assert_eq!(mode("postgres://u@[::1]/db"), format!("{:?}", Some(PgSslMode::Disable)));
        assert_eq!(
            mode("postgres://u@db.example/db"),
            format!("{:?}", Some(PgSslMode::Prefer))
        );
        assert_eq!(
            mode("postgres://u@127.0.0.1/db?sslmode=require"),
            format!("{:?}", Some(PgSslMode::Require))
        );
    }
}
