//! The saga store: every transition is computed by the pure engine and
//! written, with the commands it causes (outbox rows), in one PostgreSQL
//! statement. Every write bumps the saga's `version`, and writes only if
//! the version is still the one read, so any number of coordinators can
//! share the database without processing a saga twice. Replies are applied
//! optimistically (read, compute, one conditional write; a saga that moved
//! meanwhile is read again): two round trips, no row locks. Operator
//! actions lock the row `FOR UPDATE`, the sweeper claims rows
//! `FOR UPDATE SKIP LOCKED`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde_json::{Value, json};
use skald_engine::{Applied, CommandSpec, Ctx, EngineError, Event, SagaDefinition, SagaState, SagaStatus, Transition};
use skald_wire::amqp::OutgoingMessage;
use skald_wire::contract::{COMMANDS_EXCHANGE, CommandEnvelope};
use skald_wire::faults::Faults;
use skald_wire::outbox::{Handoff, Written};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::domain::{IdempotencyKey, NewOrder};
use crate::observe::Observed;
use crate::sagas::Registry;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("outbox: {0}")]
    Outbox(#[from] skald_wire::outbox::Error),
    #[error("Idempotency-Key {0:?} was already used with another request body")]
    IdempotencyConflict(String),
    #[error("saga {0} not found")]
    SagaNotFound(Uuid),
    #[error("no definition for saga type {0:?}")]
    UnknownSagaType(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("stored saga state is unreadable: {0}")]
    CorruptState(#[from] serde_json::Error),
    #[error("the coordinator is shutting down and takes no new orders")]
    IntakeClosed,
    #[error("saga {0} kept changing under its replies (another coordinator or an operator action)")]
    Contended(Uuid),
}

impl Error {
    /// Worth retrying (the database may come back); the rest are permanent.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Db(_) | Error::Outbox(skald_wire::outbox::Error::Db(_)) | Error::IntakeClosed | Error::Contended(_)
        )
    }
}

/// A new order as the API accepted it, to be written.
#[derive(Debug, Clone)]
pub struct OrderToCreate {
    pub order: NewOrder,
    pub key: Option<IdempotencyKey>,
    /// Hash of the parsed order: a key reused with another body is a conflict.
    pub request_hash: String,
}

/// The ids of an order and of the saga that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OrderRef {
    pub order_id: Uuid,
    pub saga_id: Uuid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New(OrderRef),
    /// The same `Idempotency-Key` and body were seen before: the same ids.
    Replayed(OrderRef),
}

/// A participant's reply, decoded, to feed to the engine.
#[derive(Debug, Clone)]
pub struct ReplyEvent {
    pub saga_id: Uuid,
    pub event: Event,
}

/// What became of one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Applied,
    Ignored(&'static str),
    /// Cannot ever be processed (unknown saga or step): dead-letter it.
    Poison(String),
}

/// A saga as stored.
#[derive(Debug, Clone)]
pub struct SagaRecord {
    pub id: Uuid,
    pub saga_type: String,
    pub status: SagaStatus,
    pub state: SagaState,
    pub payload: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// An order as the API shows it; its status follows its saga.
#[derive(Debug, Clone)]
pub struct OrderRecord {
    pub order_id: Uuid,
    pub saga_id: Uuid,
    pub saga_status: SagaStatus,
    pub customer_id: String,
    pub currency: String,
    pub total_cents: i64,
    pub items: Value,
    pub created_at: DateTime<Utc>,
}

/// What a sweep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swept {
    /// This many sagas got their event.
    Done(usize),
    /// Nothing changed: a deadline passed, and which queues are behind must
    /// be known first.
    NeedsQueues,
}

/// What the sweeper last saw queued, and how long an attempt may wait
/// behind it.
#[derive(Debug, Clone, Default)]
pub struct Backlog {
    /// Participants whose command queue holds commands not yet delivered.
    pub participants: HashSet<String>,
    /// The coordinator's reply queue holds replies not yet applied: any
    /// attempt's answer may be among them.
    pub replies: bool,
    pub max_wait: Duration,
}

impl Backlog {
    /// Whether an attempt waiting on `participant` may be waiting in a queue.
    pub fn holds(&self, participant: &str) -> bool {
        self.replies || self.participants.contains(participant)
    }
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    registry: Registry,
    /// Wakes the outbox relay after a commit that wrote commands.
    /// The outbox rows this process commits go to its relay.
    handoff: Arc<Handoff>,
    faults: Faults,
    /// Sagas as this process last wrote them ([`Self::create_orders`], [`Self::apply_replies`]).
    cache: Arc<StateCache>,
}

/// The sagas this coordinator last wrote (new orders, replies), with their version,
/// so that the next reply of a saga skips the read (one round trip and a
/// 2 KB state decoded per saga). It is only a guess: the write is the same
/// conditional one (`version` still the one held), so an entry that another
/// writer made stale (an operator action, the sweeper, another coordinator)
/// only costs that write coming up short and a read. Final sagas leave it;
/// the least recently used entry goes when it is full.
struct StateCache {
    entries: std::sync::Mutex<lru::LruCache<Uuid, Loaded>>,
}

impl StateCache {
    fn new(capacity: usize) -> Self {
        let capacity = std::num::NonZeroUsize::new(capacity).unwrap_or(std::num::NonZeroUsize::MIN);
        Self {
            entries: std::sync::Mutex::new(lru::LruCache::new(capacity)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, lru::LruCache<Uuid, Loaded>> {
        // A panic while holding the lock leaves nothing half-done: entries are whole.
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the entries of `ids` out of the cache.
    fn take(&self, ids: &[Uuid]) -> HashMap<Uuid, Loaded> {
        let mut entries = self.lock();
        ids.iter().filter_map(|id| entries.pop(id).map(|l| (*id, l))).collect()
    }

    /// Keeps sagas as they now are in the database (not final ones).
    fn keep(&self, sagas: impl Iterator<Item = Loaded>) {
        let mut entries = self.lock();
        for saga in sagas {
            if !saga.state.status.is_final() {
                entries.put(saga.id, saga);
            }
        }
    }
}

/// Sagas cached by default (see [`Store::with_state_cache`]).
pub const DEFAULT_STATE_CACHE: usize = 4096;

struct Loaded {
    id: Uuid,
    /// As read: the write happens only if it is still this.
    version: i64,
    def: Arc<SagaDefinition>,
    state: SagaState,
    payload: Value,
    changed: bool,
    commands: Vec<CommandSpec>,
    /// The deadline of the state as stored, if that state is one the
    /// sweeper must wake ([`deadline`]): its `saga_wakeups` row is no later
    /// than this (migration 0007), so a write whose deadline is not earlier
    /// leaves that row alone.
    stored_wake: Option<DateTime<Utc>>,
}

/// When the sweeper must wake a saga in this state: its `wake_at`, while
/// it is active.
fn deadline(state: &SagaState) -> Option<DateTime<Utc>> {
    state.wake_at.filter(|_| state.status.is_active())
}

fn ctx() -> Ctx {
    Ctx {
        now: Utc::now(),
        jitter: rand::rng().random::<f64>(),
    }
}

impl Store {
    pub fn new(pool: PgPool, registry: Registry, handoff: Arc<Handoff>, faults: Faults) -> Self {
        Self {
            pool,
            registry,
            handoff,
            faults,
            cache: Arc::new(StateCache::new(DEFAULT_STATE_CACHE)),
        }
    }

    /// How many sagas [`Self::apply_replies`] keeps as it wrote them, to
    /// skip reading them at their next reply (0 keeps one).
    pub fn with_state_cache(mut self, capacity: usize) -> Self {
        self.cache = Arc::new(StateCache::new(capacity));
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Records an order and starts its saga, with its first command in the outbox.
    pub async fn create_order(&self, request: &OrderToCreate) -> Result<Created> {
        self.create_orders(&[request])
            .await?
            .pop()
            .unwrap_or(Err(Error::Db(sqlx::Error::RowNotFound)))
    }

    /// Records orders and starts their sagas, with their first commands in
    /// the outbox, in one statement (so one implicit transaction and one
    /// round trip, however many orders: group commit). An idempotency key,
    /// when given, gates its order's saga, order and first command; a
    /// concurrent request with the same key waits on the key's primary key
    /// and then inserts nothing. One result per order, in order. `Err` means
    /// nothing was written, and the caller may write the orders one by one.
    #[tracing::instrument(skip_all, fields(orders = orders.len()))]
    pub async fn create_orders(&self, orders: &[&OrderToCreate]) -> Result<Vec<Result<Created>>> {
        let def = self.definition("order")?;
        let n = orders.len();
        let mut refs = Vec::with_capacity(n);
        let mut states = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut wake_ats = Vec::with_capacity(n);
        let mut created_ats = Vec::with_capacity(n);
        let mut items = Vec::with_capacity(n);
        let mut messages = Vec::with_capacity(n);
        let mut commands = Vec::with_capacity(n);
        // The first state of each saga, for the state cache once written.
        let mut starts = Vec::with_capacity(n);
        for p in orders {
            let ids = OrderRef {
                order_id: Uuid::now_v7(),
                saga_id: Uuid::now_v7(),
            };
            let payload = order_payload(ids, &p.order);
            let ctx = ctx();
            let t = skald_engine::start(&def, ctx);
            messages.extend(t.commands.iter().map(|c| command_message(ids.saga_id, &payload, c)));
            wake_ats.push(t.state.wake_at);
            starts.push((t.state.clone(), payload.clone()));
            states.push(Json(t.state));
            payloads.push(payload);
            created_ats.push(ctx.now);
            items.push(serde_json::to_value(&p.order.items)?);
            commands.push(t.commands);
            refs.push(ids);
        }
        let statement = "WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::jsonb[], $4::jsonb[], $5::timestamptz[],
                                      $6::timestamptz[], $7::text[], $8::text[], $9::int8[], $10::jsonb[],
                                      $11::text[], $12::text[])
                     AS i(saga_id, order_id, state, payload, wake_at, created_at, customer_id, currency,
                          total_cents, items, key, request_hash)),
             key AS (
                 INSERT INTO idempotency_keys (key, request_hash, order_id, saga_id)
                 SELECT key, request_hash, order_id, saga_id FROM input WHERE key IS NOT NULL
                 ON CONFLICT (key) DO NOTHING RETURNING saga_id),
             go AS (SELECT * FROM input WHERE key IS NULL OR saga_id IN (SELECT saga_id FROM key)),
             saga AS (
                 INSERT INTO sagas (id, saga_type, status, state, payload, wake_at, created_at, updated_at)
                 SELECT saga_id, $13, $14, state, payload, wake_at, created_at, created_at FROM go),
             wakeup AS (
                 INSERT INTO saga_wakeups (saga_id, wake_at)
                 SELECT saga_id, wake_at FROM go WHERE wake_at IS NOT NULL),
             ord AS (
                 INSERT INTO orders (order_id, saga_id, customer_id, currency, total_cents, items, created_at)
                 SELECT order_id, saga_id, customer_id, currency, total_cents, items, created_at FROM go),
             first_command AS (
                 INSERT INTO outbox (message_id, exchange, routing_key, message_type, correlation_id, headers, body)
                 SELECT * FROM unnest($15::uuid[], $16::text[], $17::text[], $18::text[], $19::uuid[],
                                      $20::jsonb[], $21::bytea[])
                     AS o(message_id, exchange, routing_key, message_type, correlation_id, headers, body)
                 WHERE o.correlation_id IN (SELECT saga_id FROM go)
                 RETURNING id, message_id, correlation_id)
             SELECT i.saga_id, EXISTS (SELECT 1 FROM go WHERE go.saga_id = i.saga_id) AS created,
                    ARRAY (SELECT f.id FROM first_command f WHERE f.correlation_id = i.saga_id) AS outbox,
                    ARRAY (SELECT f.message_id FROM first_command f WHERE f.correlation_id = i.saga_id)
                        AS outbox_messages
             FROM input i";
        let query = sqlx::query(statement)
            .bind(refs.iter().map(|r| r.saga_id).collect::<Vec<_>>())
            .bind(refs.iter().map(|r| r.order_id).collect::<Vec<_>>())
            .bind(states)
            .bind(payloads)
            .bind(wake_ats)
            .bind(created_ats)
            .bind(orders.iter().map(|p| p.order.customer_id.as_str()).collect::<Vec<_>>())
            .bind(orders.iter().map(|p| p.order.currency.as_str()).collect::<Vec<_>>())
            .bind(orders.iter().map(|p| p.order.total_cents.get()).collect::<Vec<_>>())
            .bind(items)
            .bind(
                orders
                    .iter()
                    .map(|p| p.key.as_ref().map(IdempotencyKey::as_str))
                    .collect::<Vec<_>>(),
            )
            .bind(orders.iter().map(|p| p.request_hash.as_str()).collect::<Vec<_>>())
            .bind(def.name())
            .bind(SagaStatus::Running.as_str());
        let rows = skald_wire::outbox::Columns::new(&messages)?
            .bind(query)
            .fetch_all(&self.pool)
            .await?;
        let mut written: HashMap<Uuid, (bool, Vec<i64>, Vec<Uuid>)> = HashMap::with_capacity(rows.len());
        for row in rows {
            written.insert(
                row.try_get("saga_id")?,
                (
                    row.try_get("created")?,
                    row.try_get("outbox")?,
                    row.try_get("outbox_messages")?,
                ),
            );
        }
        let mut outbox = Vec::with_capacity(messages.len());
        let mut outbox_messages = Vec::with_capacity(messages.len());
        let mut results = Vec::with_capacity(n);
        let mut started = Vec::with_capacity(n);
        for (((p, ids), commands), (state, payload)) in orders.iter().zip(refs).zip(commands).zip(starts) {
            match written.remove(&ids.saga_id) {
                Some((true, rows, message_ids)) => {
                    started.push(Loaded {
                        id: ids.saga_id,
                        version: 0,
                        def: def.clone(),
                        stored_wake: deadline(&state),
                        state,
                        payload,
                        changed: false,
                        commands: Vec::new(),
                    });
                    outbox.extend(rows);
                    outbox_messages.extend(message_ids);
                    crate::observe::saga_started(def.name(), &commands);
                    tracing::info!(saga_id = %ids.saga_id, order_id = %ids.order_id, "saga started");
                    results.push(Ok(Created::New(ids)));
                }
                // Its key was taken (by an earlier request, or one in this batch).
                Some((false, _, _)) => results.push(match &p.key {
                    Some(key) => self.replayed(key, &p.request_hash).await,
                    None => Err(Error::Db(sqlx::Error::RowNotFound)),
                }),
                None => results.push(Err(Error::Db(sqlx::Error::RowNotFound))),
            }
        }
        // Cached before the first command goes out, so that its reply finds it.
        self.cache.keep(started.into_iter());
        self.after_commit(skald_wire::outbox::pair(outbox, outbox_messages, messages));
        Ok(results)
    }

    /// The order an earlier request with this key created, if the request is the same.
    async fn replayed(&self, key: &IdempotencyKey, request_hash: &str) -> Result<Created> {
        let row = sqlx::query("SELECT request_hash, order_id, saga_id FROM idempotency_keys WHERE key = $1")
            .bind(key.as_str())
            .fetch_one(&self.pool)
            .await?;
        let stored: String = row.try_get("request_hash")?;
        if stored != request_hash {
            return Err(Error::IdempotencyConflict(key.as_str().to_owned()));
        }
        Ok(Created::Replayed(OrderRef {
            order_id: row.try_get("order_id")?,
            saga_id: row.try_get("saga_id")?,
        }))
    }

    /// Applies a batch of replies: one read (of the sagas not in the
    /// state cache), the engine, one conditional write (an implicit
    /// transaction). The replies of a saga another writer changed between
    /// the read and the write are applied again on its new state, read from
    /// the database, up to [`APPLY_ROUNDS`] times. Returns a verdict per
    /// reply, in order.
    #[tracing::instrument(skip_all, fields(replies = replies.len()))]
    pub async fn apply_replies(&self, replies: &[ReplyEvent]) -> Result<Vec<Verdict>> {
        let mut verdicts: Vec<Option<Verdict>> = vec![None; replies.len()];
        let mut pending: Vec<usize> = (0..replies.len()).collect();
        let mut conn = self.pool.acquire().await?;
        for _ in 0..APPLY_ROUNDS {
            let mut ids: Vec<Uuid> = pending.iter().map(|&i| replies[i].saga_id).collect();
            ids.sort();
            ids.dedup();
            // Moved sagas left the cache when taken: later rounds read them.
            let mut loaded = self.cache.take(&ids);
            let cached: Vec<Uuid> = loaded.keys().copied().collect();
            ids.retain(|id| !loaded.contains_key(id));
            if !ids.is_empty() {
                let rows = sqlx::query("SELECT id, version, saga_type, state, payload FROM sagas WHERE id = ANY($1)")
                    .bind(&ids)
                    .fetch_all(&mut *conn)
                    .await?;
                for row in rows {
                    let l = self.load(&row)?;
                    loaded.insert(l.id, l);
                }
            }
            let ctx = ctx();
            let mut computed = Vec::with_capacity(pending.len());
            for &i in &pending {
                let r = &replies[i];
                let Some(saga) = loaded.get_mut(&r.saga_id) else {
                    computed.push((i, Verdict::Poison(format!("unknown saga {}", r.saga_id))));
                    continue;
                };
                let verdict = match skald_engine::apply(&saga.def, saga.state.clone(), r.event.clone(), ctx) {
                    Ok(t) => absorb(saga, t),
                    Err(e @ EngineError::UnknownStep { .. }) => Verdict::Poison(e.to_string()),
                    Err(e) => return Err(e.into()),
                };
                computed.push((i, verdict));
            }
            let sagas: Vec<Loaded> = loaded.into_values().collect();
            let written = self.persist(&mut conn, &sagas, ctx.now).await?;
            self.after_commit(written.outbox);
            written.observed.record();
            // A cached saga that nothing changed was never checked against
            // the database: its replies were ignored on what may be an old
            // state (one another writer has moved on), so they go again on
            // the state read from the database.
            let mut unsure = written.moved.clone();
            unsure.extend(
                sagas
                    .iter()
                    .filter(|s| !s.changed && cached.contains(&s.id))
                    .map(|s| s.id),
            );
            self.cache.keep(sagas.into_iter().filter_map(|mut s| {
                if unsure.contains(&s.id) {
                    return None;
                }
                if s.changed {
                    s.version += 1;
                    s.changed = false;
                    s.commands.clear();
                    s.stored_wake = deadline(&s.state);
                }
                Some(s)
            }));
            pending.clear();
            for (i, verdict) in computed {
                if unsure.contains(&replies[i].saga_id) {
                    pending.push(i);
                } else {
                    verdicts[i] = Some(verdict);
                }
            }
            if pending.is_empty() {
                return Ok(verdicts
                    .into_iter()
                    .map(|v| v.unwrap_or(Verdict::Ignored("not applied")))
                    .collect());
            }
        }
        Err(Error::Contended(replies[pending[0]].saga_id))
    }

    /// Feeds a tick to the sagas of up to `limit` due wake-up rows
    /// (timeouts, ends of backoff); a saga whose attempt in flight may be
    /// waiting in a queue of `backlog` gets [`Event::QueueBacklog`] instead.
    /// A wake-up row found early (the saga's deadline moved later since)
    /// moves to the saga's deadline; one whose saga ended or is gone is
    /// dropped. Without a view of the queues (`None`), a due attempt in
    /// flight makes it stop without a change and ask for one
    /// ([`Swept::NeedsQueues`]), so that the queues are looked at only when
    /// a deadline passes, and never while rows are locked. `Done` counts
    /// the wake-up rows handled.
    #[tracing::instrument(skip_all)]
    pub async fn sweep(&self, limit: i64, backlog: Option<&Backlog>) -> Result<Swept> {
        let ctx = ctx();
        let mut tx = self.pool.begin().await?;
        // Due by the clock the engine's deadlines are set with.
        let due: Vec<Uuid> = sqlx::query_scalar(
            "SELECT saga_id FROM saga_wakeups WHERE wake_at <= $2
             ORDER BY wake_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(limit)
        .bind(ctx.now)
        .fetch_all(&mut *tx)
        .await?;
        if due.is_empty() {
            tx.rollback().await?;
            return Ok(Swept::Done(0));
        }
        // A saga being written right now is skipped: its row stays due.
        let rows = sqlx::query(
            "SELECT id, version, saga_type, state, payload FROM sagas WHERE id = ANY($1) FOR UPDATE SKIP LOCKED",
        )
        .bind(&due)
        .fetch_all(&mut *tx)
        .await?;
        let loaded = rows.iter().map(|row| self.load(row)).collect::<Result<Vec<_>>>()?;
        let (mut sagas, early): (Vec<Loaded>, Vec<Loaded>) = loaded
            .into_iter()
            .partition(|s| s.stored_wake.is_some_and(|wake| wake <= ctx.now));
        let no_view = Backlog::default();
        let backlog = match backlog {
            Some(backlog) => backlog,
            None if sagas.iter().any(|s| s.state.waiting_on(&s.def).is_some()) => {
                tx.rollback().await?;
                return Ok(Swept::NeedsQueues);
            }
            None => &no_view,
        };
        let mut postponed: HashMap<String, u64> = HashMap::new();
        for saga in &mut sagas {
            let waiting_on = saga.state.waiting_on(&saga.def).map(|p| p.as_str().to_owned());
            let event = match waiting_on {
                Some(ref p) if backlog.holds(p) => Event::QueueBacklog {
                    max_wait: backlog.max_wait,
                },
                _ => Event::Tick,
            };
            let backlogged = matches!(event, Event::QueueBacklog { .. });
            let t = skald_engine::apply(&saga.def, saga.state.clone(), event, ctx)?;
            // Still waiting on the same participant, nothing sent: the deadline moved.
            if backlogged && t.commands.is_empty() && t.state.waiting_on(&saga.def).is_some() {
                *postponed.entry(waiting_on.unwrap_or_default()).or_default() += 1;
            }
            absorb(saga, t);
        }
        let written = self.persist(&mut tx, &sagas, ctx.now).await?.under_lock()?;
        // Every row taken now says when its saga is next due, or goes.
        let (mut moved, mut next) = (Vec::new(), Vec::new());
        for s in sagas.iter().chain(&early) {
            if let Some(wake) = deadline(&s.state) {
                moved.push(s.id);
                next.push(wake);
            }
        }
        let loaded: Vec<Uuid> = sagas.iter().chain(&early).map(|s| s.id).collect();
        let dropped: Vec<Uuid> = sqlx::query_scalar(
            "WITH next AS (
                 UPDATE saga_wakeups AS w SET wake_at = n.wake_at
                 FROM UNNEST($1::uuid[], $2::timestamptz[]) AS n(id, wake_at)
                 WHERE w.saga_id = n.id)
             DELETE FROM saga_wakeups AS w
             WHERE w.saga_id = ANY($3) AND w.saga_id <> ALL($1)
               AND (w.saga_id = ANY($4) OR NOT EXISTS (SELECT 1 FROM sagas AS s WHERE s.id = w.saga_id))
             RETURNING w.saga_id",
        )
        .bind(&moved)
        .bind(&next)
        .bind(&due)
        .bind(&loaded)
        .fetch_all(&mut *tx)
        .await?;
        // Handled: the sagas loaded and the rows of sagas gone, not the rows
        // skipped as locked (a full count means more may be due).
        let handled = loaded.len() + dropped.iter().filter(|id| !loaded.contains(id)).count();
        tx.commit().await?;
        self.after_commit(written.outbox);
        written.observed.record();
        for (participant, count) in postponed {
            tracing::debug!(
                participant,
                count,
                "step deadlines postponed: the command or its reply may still be queued"
            );
            skald_wire::metrics::step_timeouts_postponed(&participant, count);
        }
        Ok(Swept::Done(handled))
    }

    /// An operator action (`Event::Retry`, `Event::Abort`) on one saga.
    pub async fn operate(&self, saga_id: Uuid, event: Event) -> Result<SagaRecord> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT id, version, saga_type, state, payload FROM sagas WHERE id = $1 FOR UPDATE")
            .bind(saga_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::SagaNotFound(saga_id))?;
        let mut saga = self.load(&row)?;
        let ctx = ctx();
        let t = skald_engine::apply(&saga.def, saga.state.clone(), event, ctx)?;
        absorb(&mut saga, t);
        let written = self
            .persist(&mut tx, std::slice::from_ref(&saga), ctx.now)
            .await?
            .under_lock()?;
        tx.commit().await?;
        self.after_commit(written.outbox);
        written.observed.record();
        self.saga(saga_id).await?.ok_or(Error::SagaNotFound(saga_id))
    }

    pub async fn saga(&self, id: Uuid) -> Result<Option<SagaRecord>> {
        let row = sqlx::query(
            "SELECT id, saga_type, status, state, payload, created_at, updated_at, finished_at FROM sagas WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(saga_record).transpose()
    }

    /// Sagas by id (time order), optionally of one status, after `after`.
    pub async fn list_sagas(
        &self,
        status: Option<SagaStatus>,
        limit: i64,
        after: Option<Uuid>,
    ) -> Result<Vec<SagaRecord>> {
        let rows = sqlx::query(
            "SELECT id, saga_type, status, state, payload, created_at, updated_at, finished_at FROM sagas
             WHERE ($1::text IS NULL OR status = $1) AND ($2::uuid IS NULL OR id > $2)
             ORDER BY id LIMIT $3",
        )
        .bind(status.map(SagaStatus::as_str))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(saga_record).collect()
    }

    pub async fn order(&self, order_id: Uuid) -> Result<Option<OrderRecord>> {
        let row = sqlx::query(
            "SELECT o.order_id, o.saga_id, s.status, o.customer_id, o.currency, o.total_cents, o.items, o.created_at
             FROM orders o JOIN sagas s ON s.id = o.saga_id WHERE o.order_id = $1",
        )
        .bind(order_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let status: String = row.try_get("status")?;
        Ok(Some(OrderRecord {
            order_id: row.try_get("order_id")?,
            saga_id: row.try_get("saga_id")?,
            saga_status: parse_status(&status)?,
            customer_id: row.try_get("customer_id")?,
            currency: row.try_get("currency")?,
            total_cents: row.try_get("total_cents")?,
            items: row.try_get("items")?,
            created_at: row.try_get("created_at")?,
        }))
    }

    /// Sagas per status (for the dashboard, metrics and the demo).
    pub async fn count_by_status(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT status, count(*) AS n FROM sagas GROUP BY status ORDER BY status")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("status")?, r.try_get("n")?)))
            .collect()
    }

    fn definition(&self, saga_type: &str) -> Result<Arc<SagaDefinition>> {
        self.registry
            .get(saga_type)
            .cloned()
            .ok_or_else(|| Error::UnknownSagaType(saga_type.to_owned()))
    }

    fn load(&self, row: &sqlx::postgres::PgRow) -> Result<Loaded> {
        let saga_type: String = row.try_get("saga_type")?;
        let state = row.try_get::<Json<SagaState>, _>("state")?.0;
        Ok(Loaded {
            id: row.try_get("id")?,
            version: row.try_get("version")?,
            def: self.definition(&saga_type)?,
            stored_wake: deadline(&state),
            state,
            payload: row.try_get("payload")?,
            changed: false,
            commands: Vec::new(),
        })
    }

    /// Writes the changed sagas whose version is still the one read, with
    /// their commands, in one statement (in the caller's transaction, or
    /// its own). Returns what was written, to hand off and record after the
    /// commit, and the sagas that had moved (nothing of theirs written).
    async fn persist(&self, conn: &mut PgConnection, sagas: &[Loaded], now: DateTime<Utc>) -> Result<Persisted> {
        let changed: Vec<&Loaded> = sagas.iter().filter(|s| s.changed).collect();
        if changed.is_empty() {
            return Ok(Persisted::default());
        }
        let mut ids = Vec::with_capacity(changed.len());
        let mut versions = Vec::with_capacity(changed.len());
        let mut statuses = Vec::with_capacity(changed.len());
        let mut states = Vec::with_capacity(changed.len());
        let mut wakes = Vec::with_capacity(changed.len());
        let mut finished = Vec::with_capacity(changed.len());
        let mut messages = Vec::new();
        // The wake-up rows to lower (a deadline earlier than the stored
        // one, or a saga active again) and to drop (a saga that ended).
        let mut lowered = (Vec::new(), Vec::new());
        let mut ended = Vec::new();
        for s in &changed {
            match (deadline(&s.state), s.stored_wake) {
                (Some(new), Some(stored)) if new >= stored => {}
                (Some(new), _) => {
                    lowered.0.push(s.id);
                    lowered.1.push(new);
                }
                (None, Some(_)) => ended.push(s.id),
                (None, None) => {}
            }
            ids.push(s.id);
            versions.push(s.version);
            statuses.push(s.state.status.as_str().to_owned());
            states.push(Json(&s.state));
            wakes.push(s.state.wake_at);
            finished.push(s.state.finished_at);
            messages.extend(s.commands.iter().map(|c| command_message(s.id, &s.payload, c)));
        }
        // One statement, one round trip: the sagas' new states and their
        // commands (correlation id = saga id), for the sagas not moved.
        let statement = concat!(
            "WITH changed AS (
                 UPDATE sagas AS s SET status = u.status, state = u.state, wake_at = u.wake_at,
                        finished_at = u.finished_at, updated_at = $6, version = s.version + 1
                 FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::timestamptz[], $5::timestamptz[],
                             $14::int8[])
                      AS u(id, status, state, wake_at, finished_at, version)
                 WHERE s.id = u.id AND s.version = u.version
                 RETURNING s.id),
             lowered AS (
                 INSERT INTO saga_wakeups (saga_id, wake_at)
                 SELECT id, wake_at FROM UNNEST($15::uuid[], $16::timestamptz[]) AS w(id, wake_at)
                 WHERE w.id IN (SELECT id FROM changed)
                 ON CONFLICT (saga_id) DO UPDATE SET wake_at = LEAST(saga_wakeups.wake_at, EXCLUDED.wake_at)),
             ended AS (
                 DELETE FROM saga_wakeups
                 WHERE saga_id = ANY($17::uuid[]) AND saga_id IN (SELECT id FROM changed)),
             sent AS (",
            skald_wire::outbox_unnest!(7, 8, 9, 10, 11, 12, 13),
            " AS m(message_id, exchange, routing_key, message_type, correlation_id, headers, body)
                 WHERE m.correlation_id IN (SELECT id FROM changed)
                 RETURNING id, message_id)
             SELECT ARRAY (SELECT id FROM changed) AS written,
                    ARRAY (SELECT id FROM sent) AS outbox, ARRAY (SELECT message_id FROM sent) AS outbox_messages"
        );
        let query = sqlx::query(statement)
            .bind(ids)
            .bind(statuses)
            .bind(states)
            .bind(wakes)
            .bind(finished)
            .bind(now);
        let row = skald_wire::outbox::Columns::new(&messages)?
            .bind(query)
            .bind(versions)
            .bind(lowered.0)
            .bind(lowered.1)
            .bind(ended)
            .fetch_one(&mut *conn)
            .await?;
        let written: std::collections::HashSet<Uuid> = row.try_get::<Vec<Uuid>, _>("written")?.into_iter().collect();
        let outbox = skald_wire::outbox::pair(row.try_get("outbox")?, row.try_get("outbox_messages")?, messages);
        let mut persisted = Persisted {
            outbox,
            ..Persisted::default()
        };
        for s in &changed {
            if written.contains(&s.id) {
                persisted
                    .observed
                    .changed(s.id, s.def.name(), &s.state, &s.commands, now);
            } else {
                persisted.moved.push(s.id);
            }
        }
        Ok(persisted)
    }

    fn after_commit(&self, outbox: Vec<Written>) {
        self.faults.crash("crash_after_commit");
        self.handoff.committed(outbox);
    }
}

/// Rounds of [`Store::apply_replies`] before a saga counts as contended
/// (the consumer then retries the batch with backoff).
const APPLY_ROUNDS: usize = 5;

/// What [`Store::persist`] wrote.
#[derive(Default)]
struct Persisted {
    observed: Observed,
    outbox: Vec<Written>,
    /// Changed sagas whose version had moved since they were read: nothing
    /// of theirs was written.
    moved: Vec<Uuid>,
}

impl Persisted {
    /// For writers that hold the rows locked: a moved saga cannot happen.
    fn under_lock(self) -> Result<Self> {
        match self.moved.first() {
            Some(id) => Err(Error::Contended(*id)),
            None => Ok(self),
        }
    }
}

fn absorb(saga: &mut Loaded, t: Transition) -> Verdict {
    match t.applied {
        Applied::Changed => {
            saga.state = t.state;
            saga.commands.extend(t.commands);
            saga.changed = true;
            Verdict::Applied
        }
        Applied::Ignored(why) => Verdict::Ignored(why),
    }
}

fn parse_status(s: &str) -> Result<SagaStatus> {
    s.parse::<SagaStatus>()
        .map_err(|e| Error::Db(sqlx::Error::Decode(e.into())))
}

fn saga_record(row: &sqlx::postgres::PgRow) -> Result<SagaRecord> {
    let status: String = row.try_get("status")?;
    Ok(SagaRecord {
        id: row.try_get("id")?,
        saga_type: row.try_get("saga_type")?,
        status: parse_status(&status)?,
        state: row.try_get::<Json<SagaState>, _>("state")?.0,
        payload: row.try_get("payload")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

/// The AMQP message of one command.
/// The payload every command of an order saga carries.
fn order_payload(ids: OrderRef, order: &NewOrder) -> Value {
    json!({
        "order_id": ids.order_id,
        "customer_id": order.customer_id,
        "currency": order.currency,
        "items": order.items,
        "total_cents": order.total_cents,
    })
}

fn command_message(saga_id: Uuid, payload: &Value, c: &CommandSpec) -> OutgoingMessage {
    let envelope = CommandEnvelope {
        saga_id,
        step: c.step.clone(),
        attempt: c.attempt,
        kind: c.kind,
        payload: payload.clone(),
    };
    OutgoingMessage {
        message_id: Uuid::now_v7(),
        exchange: COMMANDS_EXCHANGE.to_owned(),
        routing_key: c.participant.as_str().to_owned(),
        message_type: c.message_type.clone(),
        correlation_id: saga_id,
        // Serializing a struct of plain fields and a Value cannot fail.
        body: serde_json::to_vec(&envelope).unwrap_or_default(),
        headers: skald_wire::trace::command_headers(saga_id, &c.step, c.attempt, c.kind),
    }
}

/// Which sagas `GET /v1/sagas` lists, and in which order.
#[derive(Debug, Clone, Default)]
pub struct SagaFilter {
    pub status: Option<SagaStatus>,
    pub saga_type: Option<String>,
    /// Created at or after.
    pub created_after: Option<DateTime<Utc>>,
    /// Created strictly before.
    pub created_before: Option<DateTime<Utc>>,
    /// Keyset cursor: the last id of the previous page.
    pub after: Option<Uuid>,
    /// Newest first (ids descending) instead of oldest first.
    pub newest_first: bool,
    pub limit: i64,
}

// Queries for the operators' views (HTTP API and dashboard).
impl Store {
    /// One page of sagas matching `f`, by id (ids are UUIDv7: time order).
    pub async fn list_sagas_page(&self, f: &SagaFilter) -> Result<Vec<SagaRecord>> {
        const OLDEST_FIRST: &str = "SELECT id, saga_type, status, state, payload, created_at, updated_at, finished_at
             FROM sagas
             WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR saga_type = $2)
               AND ($3::timestamptz IS NULL OR created_at >= $3) AND ($4::timestamptz IS NULL OR created_at < $4)
               AND ($5::uuid IS NULL OR id > $5)
             ORDER BY id LIMIT $6";
        const NEWEST_FIRST: &str = "SELECT id, saga_type, status, state, payload, created_at, updated_at, finished_at
             FROM sagas
             WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR saga_type = $2)
               AND ($3::timestamptz IS NULL OR created_at >= $3) AND ($4::timestamptz IS NULL OR created_at < $4)
               AND ($5::uuid IS NULL OR id < $5)
             ORDER BY id DESC LIMIT $6";
        let rows = sqlx::query(if f.newest_first { NEWEST_FIRST } else { OLDEST_FIRST })
            .bind(f.status.map(SagaStatus::as_str))
            .bind(f.saga_type.as_deref())
            .bind(f.created_after)
            .bind(f.created_before)
            .bind(f.after)
            .bind(f.limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(saga_record).collect()
    }
}
