//! Redis locks on order rows, with fencing tokens.
//!
//! - acquire: `SET {prefix}lock:order:{id} <token> NX PX <ttl>`, in a Lua
//!   script that, on success, also takes a fencing token from a counter
//!   (`INCR {prefix}fence:order`, raised to Redis's clock in microseconds if
//!   lower, so that it keeps growing even if a Redis without persistence
//!   restarts). One round trip.
//! - release: Lua compare-and-delete (only the holder's token deletes).
//! - extend: Lua compare-and-pexpire.
//!
//! The token is stored on the row; a write carrying a token not above the
//! row's is refused, so a holder whose lock expired cannot overwrite a newer
//! holder's write. One counter serves every order: tokens only need to grow
//! for each row, and one key keeps Redis's memory flat however many orders exist.

use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;
use tokio::time::Instant;
use uuid::Uuid;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("lock {0} is held by someone else (waited {1:?})")]
    Timeout(String, Duration),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl Error {
    /// Every lock failure is transient: the command is retried later.
    pub fn is_transient(&self) -> bool {
        true
    }
}

const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local fence = redis.call('INCR', KEYS[2])
  if fence < floor then
    redis.call('SET', KEYS[2], floor)
    fence = floor
  end
  return fence
end
return false
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// A held lock. Release it with [`Locks::release`] after the commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockGuard {
    pub key: String,
    pub token: String,
    /// The fencing token to store on the row.
    pub fence: i64,
}

/// Lock settings and the Redis connection (multiplexed, cheap to clone).
#[derive(Clone)]
pub struct Locks {
    conn: ConnectionManager,
    prefix: String,
    ttl: Duration,
    wait: Duration,
    acquire: Script,
    release: Script,
    extend: Script,
}

impl Locks {
    /// `prefix` is prepended to every key (tests use one per test).
    pub fn new(conn: ConnectionManager, prefix: &str, ttl: Duration, wait: Duration) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            ttl,
            wait,
            acquire: Script::new(ACQUIRE),
            release: Script::new(RELEASE),
            extend: Script::new(EXTEND),
        }
    }

    pub fn key(&self, resource: &str) -> String {
        format!("{}lock:{resource}", self.prefix)
    }

    fn fence_key(&self, resource: &str) -> String {
        format!("{}fence:{}", self.prefix, resource_kind(resource))
    }

    /// Takes the lock on `resource` (e.g. `order:<uuid>`), waiting up to the
    /// configured time with short backoffs; [`Error::Timeout`] after that.
    pub async fn acquire(&self, resource: &str) -> Result<LockGuard> {
        self.acquire_within(resource, self.wait).await
    }

    pub async fn acquire_within(&self, resource: &str, wait: Duration) -> Result<LockGuard> {
        let key = self.key(resource);
        let fence_key = self.fence_key(resource);
        let token = Uuid::new_v4().to_string();
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(2);
        let mut conn = self.conn.clone();
        let kind = resource_kind(resource);
        loop {
            let fence: Option<i64> = self
                .acquire
                .key(&key)
                .key(&fence_key)
                .arg(&token)
                .arg(self.ttl.as_millis() as u64)
                .invoke_async(&mut conn)
                .await?;
            if let Some(fence) = fence {
                skald_wire::metrics::lock_acquired(kind);
                return Ok(LockGuard { key, token, fence });
            }
            skald_wire::metrics::lock_busy(kind);
            let now = Instant::now();
            if now >= deadline {
                skald_wire::metrics::lock_timed_out(kind);
                return Err(Error::Timeout(key, wait));
            }
            let jitter = Duration::from_micros(rand::random::<u64>() % 1000);
            tokio::time::sleep((pause + jitter).min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Releases the lock if still ours. Returns whether it was.
    pub async fn release(&self, guard: &LockGuard) -> Result<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = self
            .release
            .key(&guard.key)
            .arg(&guard.token)
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Extends the lock's time to live if still ours. Returns whether it was.
    pub async fn extend(&self, guard: &LockGuard, ttl: Duration) -> Result<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = self
            .extend
            .key(&guard.key)
            .arg(&guard.token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }
}

/// `order` for `order:<uuid>`: the fencing counter's name and the metrics label.
pub fn resource_kind(resource: &str) -> &str {
    resource.split(':').next().unwrap_or(resource)
}

/// Connects to Redis (the connection manager reconnects by itself afterwards).
pub async fn connect(url: &str) -> Result<ConnectionManager> {
    let client = redis::Client::open(url)?;
    Ok(ConnectionManager::new(client).await?)
}
