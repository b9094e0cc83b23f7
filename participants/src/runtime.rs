//! The participant runtime, shared by every participant.
//!
//! For each command: decode (undecodable -> dead-letter), take the lock the
//! handler asks for (Redis, with a fencing token), then in ONE local
//! transaction: the inbox row (barrier), the handler's business change, the
//! stored reply, and the reply's outbox row. Commit, release the lock, ack.
//! The outbox relay publishes the reply.
//!
//! Barrier (DTM's sub-transaction barrier, keyed by `(saga, step, kind)`):
//! - a duplicate or a retry of a command finds its inbox row and gets the
//!   stored reply again (with its own attempt number), with no second effect;
//! - a compensation inserts the *action's* inbox row as a tombstone when the
//!   action never ran: it succeeds as a no-op, and the late action then finds
//!   the tombstone and is refused. Both inserts go through the primary key,
//!   so an action and a compensation in flight at once serialize there.
//!   A handler may say that the action's effect is there all the same
//!   ([`Handler::action_took_effect`]: its barrier row was deleted by the
//!   retention): the compensation then runs.
//!
//! A transient failure (lock busy, database error, injected fault) rolls
//! the transaction back and replies `retryable: true`: the coordinator
//! retries the step with backoff as a new attempt.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use skald_wire::Kind;
use skald_wire::amqp::{self, OutgoingMessage, Publisher, Topology};
use skald_wire::contract::{
    CommandEnvelope, REPLIES_EXCHANGE, REPLIES_ROUTING_KEY, ReplyEnvelope, ReplyOutcome, command_queue,
};
use skald_wire::faults::Faults;
use skald_wire::linger::Linger;
use skald_wire::outbox::{Handoff, Written};
use sqlx::{Acquire, PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::lock::{self, LockGuard, Locks};

/// What a handler decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Handled {
    Success(Value),
    /// A deterministic refusal (insufficient balance, out of stock): its
    /// changes are rolled back, the reply is stored and never retried.
    BusinessFailure(String),
}

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Lock(#[from] lock::Error),
    #[error("write refused: fencing token {given} is not newer than the row's {stored}")]
    StaleFence { given: i64, stored: i64 },
    #[error("injected transient failure")]
    Injected,
    #[error("invalid payload: {0}")]
    BadPayload(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("outbox: {0}")]
    Outbox(#[from] skald_wire::outbox::Error),
    #[error("stored reply is unreadable: {0}")]
    Json(#[from] serde_json::Error),
    #[error("barrier row written by another transaction meanwhile; the batch is run again command by command")]
    BarrierRace,
    #[error("handle_many gave {outcomes} outcomes for {commands} {message_type} commands")]
    OutcomeCount {
        message_type: String,
        outcomes: usize,
        commands: usize,
    },
}

impl HandlerError {
    /// Transient errors are retried (a `retryable` reply); the others mean the
    /// message itself is bad and it is dead-lettered.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            HandlerError::BadPayload(_) | HandlerError::UnknownType(_) | HandlerError::Json(_)
        )
    }
}

/// One command as a handler sees it.
#[derive(Debug)]
pub struct CommandContext<'a> {
    pub command: &'a CommandEnvelope,
    /// AMQP `type`, e.g. `ChargePayment`.
    pub message_type: &'a str,
    /// The fencing token of the lock held for this command, if any.
    pub fence: Option<i64>,
}

/// A participant's business logic. Runs inside the runtime's transaction.
pub trait Handler: Send + Sync + 'static {
    /// The participant name: routing key and queue `skald.<name>.commands`.
    fn participant(&self) -> &'static str;

    /// The resource to lock in Redis while this command runs (e.g.
    /// `order:<uuid>`), if any.
    fn lock_resource(&self, _command: &CommandEnvelope) -> Result<Option<String>, HandlerError> {
        Ok(None)
    }

    /// Which of the runtime's databases this command's transaction runs in
    /// (its inbox, business rows and reply outbox). One database: always 0.
    fn partition(&self, _command: &CommandEnvelope) -> Result<usize, HandlerError> {
        Ok(0)
    }

    /// Whether `handle` for this message type is all-or-nothing: a
    /// `BusinessFailure` leaves no change behind, and an error leaves nothing
    /// that must be undone short of aborting the transaction (a single
    /// statement, or writes that only happen once every check passed). The
    /// runtime then runs the command (an action, or a compensation whose
    /// action's barrier row is there) without a savepoint and writes its
    /// barrier row together with the batch's others. `false` (the default)
    /// is always safe.
    fn all_or_nothing(&self, _message_type: &str) -> bool {
        false
    }

    /// For a compensation whose action has no barrier row: whether the
    /// action's effect is there all the same, because its barrier row was
    /// deleted (by the inbox retention, say, while the saga waited `STUCK`
    /// longer than it). The compensation then runs instead of being a
    /// no-op; the tombstone is written either way, so a late action is
    /// still refused. `false` (the default) trusts the barrier: the action
    /// never ran. Runs in the compensation's transaction, under its lock.
    fn action_took_effect<'a>(
        &'a self,
        _tx: &'a mut PgConnection,
        _ctx: &'a CommandContext<'a>,
    ) -> impl Future<Output = Result<bool, HandlerError>> + Send + 'a {
        async { Ok(false) }
    }

    /// Applies the command in `tx`. Errors roll everything back.
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        ctx: &'a CommandContext<'a>,
    ) -> impl Future<Output = Result<Handled, HandlerError>> + Send + 'a;

    /// Applies several [all-or-nothing](Self::all_or_nothing) commands of
    /// one message type (actions, or compensations of actions that
    /// succeeded) at once (a statement for all, where `handle` has one
    /// each), with the outcome `handle` would give each, in order. They are
    /// for distinct (saga, step) pairs and distinct lock resources. `None`
    /// (the default) hands them to `handle` one by one. An error rolls the
    /// batch back, and its commands run again one by one.
    fn handle_many<'a>(
        &'a self,
        _tx: &'a mut PgConnection,
        _ctxs: &'a [CommandContext<'a>],
    ) -> impl Future<Output = Result<Option<Vec<Handled>>, HandlerError>> + Send + 'a {
        async { Ok(None) }
    }
}

/// Runtime settings.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub amqp_url: String,
    pub topology: Topology,
    /// Commands handled in one PostgreSQL transaction at most. Commands are
    /// taken in batches of what the broker has already delivered (never
    /// waiting for more), so a lone command is handled at once.
    pub batch_max: usize,
    /// How long a batch waits for more commands once it has one (and the
    /// reply relay, for more replies). Zero never waits.
    pub linger: Duration,
    pub prefetch: u16,
    pub relay_batch: i64,
    pub relay_poll: Duration,
    pub faults: Faults,
    /// Redeliveries after which a command is dead-lettered as poison.
    pub max_redeliveries: i32,
}

/// How a command ended, for logs and tests.
#[derive(Debug, Clone, PartialEq)]
pub enum Processed {
    /// First time: the handler ran (or the barrier made it a no-op).
    Executed(ReplyEnvelope),
    /// Seen before: the stored reply was sent again.
    Replayed(ReplyEnvelope),
    /// Transient failure: nothing changed, a retryable failure was sent.
    Retryable(ReplyEnvelope),
}

impl Processed {
    pub fn reply(&self) -> &ReplyEnvelope {
        match self {
            Processed::Executed(r) | Processed::Replayed(r) | Processed::Retryable(r) => r,
        }
    }

    /// The `result` label of `skald_commands_processed_total`.
    pub fn result(&self) -> &'static str {
        match self {
            Processed::Executed(_) => "executed",
            Processed::Replayed(_) => "replayed",
            Processed::Retryable(_) => "retryable",
        }
    }
}

/// A decoded command waiting to be processed, with the span it runs in.
pub struct Incoming<'a> {
    pub command: &'a CommandEnvelope,
    pub message_type: &'a str,
    pub span: tracing::Span,
}

impl Incoming<'_> {
    async fn process_by<H: Handler>(&self, runtime: &Runtime<H>) -> Result<Processed, HandlerError> {
        runtime
            .process(self.command, self.message_type)
            .instrument(self.span.clone())
            .await
    }
}

pub struct Runtime<H: Handler> {
    /// The participant's databases; one unless its data is partitioned.
    pools: Vec<PgPool>,
    handler: Arc<H>,
    locks: Option<Locks>,
    config: RuntimeConfig,
    /// Replies this participant commits go to its relays.
    handoff: Vec<Arc<Handoff>>,
    /// Batch transactions rolled back and run again one by one.
    reruns: Arc<AtomicU64>,
}

impl<H: Handler> Clone for Runtime<H> {
    fn clone(&self) -> Self {
        Self {
            pools: self.pools.clone(),
            handler: self.handler.clone(),
            locks: self.locks.clone(),
            config: self.config.clone(),
            handoff: self.handoff.clone(),
            reruns: self.reruns.clone(),
        }
    }
}

const TOMBSTONE_REASON: &str = "refused by the barrier: compensated before the action ran";

impl<H: Handler> Runtime<H> {
    pub fn new(pool: PgPool, handler: H, locks: Option<Locks>, config: RuntimeConfig) -> Self {
        Self::partitioned(vec![pool], handler, locks, config)
    }

    /// A runtime over several databases, chosen per command by [`Handler::partition`].
    /// `pools` must not be empty.
    pub fn partitioned(pools: Vec<PgPool>, handler: H, locks: Option<Locks>, config: RuntimeConfig) -> Self {
        let pool_count = pools.len();
        Self {
            pools,
            handler: Arc::new(handler),
            locks,
            config,
            handoff: (0..pool_count).map(|_| Handoff::new()).collect(),
            reruns: Arc::new(AtomicU64::new(0)),
        }
    }

    /// How many batch transactions (this runtime and its clones) were
    /// rolled back and run again command by command.
    pub fn batches_rerun(&self) -> u64 {
        self.reruns.load(Ordering::Relaxed)
    }

    /// The first database (the only one unless partitioned).
    pub fn pool(&self) -> &PgPool {
        &self.pools[0]
    }

    pub fn pools(&self) -> &[PgPool] {
        &self.pools
    }

    /// Consumes commands and relays replies until `shutdown`; then stops
    /// consuming, finishes the commands in flight, and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let participant = self.handler.participant();
        let tasks = TaskTracker::new();
        for (i, pool) in self.pools.iter().enumerate() {
            tasks.spawn(
                skald_wire::outbox::Relay {
                    pool: pool.clone(),
                    amqp_url: self.config.amqp_url.clone(),
                    name: format!("skald-{participant}-relay-{i}"),
                    topology: self.config.topology.clone(),
                    participants: vec![participant.to_owned()],
                    handoff: self.handoff[i].clone(),
                    batch_size: self.config.relay_batch,
                    poll_interval: self.config.relay_poll,
                    linger: self.config.linger,
                    faults: self.config.faults.clone(),
                }
                .run(shutdown.child_token()),
            );
        }
        tasks.close();
        let consumer_stop = shutdown.child_token();
        while !consumer_stop.is_cancelled() {
            let Ok(conn) = amqp::connect_with_backoff(
                &self.config.amqp_url,
                &format!("skald-{participant}-consumer"),
                &self.config.topology,
                &[participant],
                None,
                &consumer_stop,
            )
            .await
            else {
                break;
            };
            if let Err(e) = self.consume(&conn, &consumer_stop).await {
                tracing::warn!(error = %e, "command consumer lost its channel; reconnecting");
            }
            let _ = conn.close(200, "consumer stopping".into()).await;
        }
        tasks.wait().await;
        tracing::info!(participant, "participant stopped");
    }

    async fn consume(&self, conn: &lapin::Connection, shutdown: &CancellationToken) -> Result<(), amqp::Error> {
        let queue = command_queue(self.handler.participant());
        let channel = amqp::consumer_channel(conn, self.config.prefetch).await?;
        let dead_letters = Publisher::open(conn).await?;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut linger = Linger::new(self.config.linger);
        let alarm = skald_wire::alarm::Alarm::new();
        let acks = amqp::AckQueue::spawn(&queue);
        let result = loop {
            let next = tokio::select! {
                d = consumer.next() => d,
                () = shutdown.cancelled() => {
                    let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
                    break Ok(());
                }
            };
            let mut batch = match next {
                Some(Ok(d)) => vec![d],
                Some(Err(e)) => break Err(e.into()),
                None => break Ok(()),
            };
            // Whatever else the broker delivers within the linger joins the batch.
            let lost = amqp::gather(
                &mut consumer,
                &mut batch,
                self.config.batch_max.max(1),
                linger.begin(),
                &alarm,
            )
            .await;
            self.on_batch(batch, &dead_letters, &queue, &acks).await;
            linger.end();
            if let Some(e) = lost {
                break Err(e.into());
            }
        };
        acks.drain().await;
        dead_letters.close().await;
        if channel.status().connected() {
            let _ = channel.close(200, "consumer stopping".into()).await;
        }
        result
    }

    /// Handles a batch of deliveries: poison ones are dead-lettered, the
    /// others go through [`Self::process_batch`]; then one `multiple` ack
    /// settles every delivery that was not requeued or dead-lettered.
    async fn on_batch(&self, batch: Vec<Delivery>, dead_letters: &Publisher, queue: &str, acks: &amqp::AckQueue) {
        let participant = self.handler.participant();
        let mut items: Vec<(usize, CommandEnvelope, String, tracing::Span)> = Vec::with_capacity(batch.len());
        // Deliveries settled one by one (dead-lettered or requeued).
        let mut settled = vec![false; batch.len()];
        for (i, delivery) in batch.iter().enumerate() {
            if let Some(n) = skald_wire::redelivery::exceeded(self.pool(), delivery, self.config.max_redeliveries).await
            {
                self.reject(delivery, dead_letters, queue, &format!("redelivered {n} times"))
                    .await;
                settled[i] = true;
                continue;
            }
            match serde_json::from_slice::<CommandEnvelope>(&delivery.data) {
                Ok(command) => {
                    let message_type = delivery
                        .properties
                        .kind()
                        .as_ref()
                        .map(|k| k.as_str().to_owned())
                        .unwrap_or_default();
                    let span = skald_wire::trace::command_span(participant, &delivery.properties);
                    span.record("saga_id", tracing::field::display(command.saga_id));
                    span.record("step", command.step.as_str());
                    span.record("attempt", command.attempt);
                    span.record("kind", command.kind.as_str());
                    items.push((i, command, message_type, span));
                }
                Err(e) => {
                    self.reject(delivery, dead_letters, queue, &format!("undecodable command: {e}"))
                        .await;
                    settled[i] = true;
                }
            }
        }
        self.config.faults.delay().await;
        let commands: Vec<Incoming<'_>> = items
            .iter()
            .map(|(_, command, message_type, span)| Incoming {
                command,
                message_type,
                span: span.clone(),
            })
            .collect();
        let outcomes = self.process_batch(&commands).await;
        let mut requeue_pause = false;
        let mut consumed = 0u64;
        for ((i, command, _, span), outcome) in items.iter().zip(outcomes) {
            let _entered = span.enter();
            let delivery = &batch[*i];
            match outcome {
                Ok(outcome) => {
                    tracing::debug!(?outcome, "command processed");
                    skald_wire::metrics::command_processed(participant, command.kind.as_str(), outcome.result());
                    consumed += 1;
                }
                Err(e) if e.is_transient() => {
                    // Not even the retryable reply could be stored: let the broker redeliver.
                    tracing::warn!(error = %e, "command failed and no reply could be stored; requeueing");
                    if !requeue_pause {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        requeue_pause = true;
                    }
                    requeue(delivery).await;
                    settled[*i] = true;
                }
                Err(e) => {
                    self.reject(delivery, dead_letters, queue, &e.to_string()).await;
                    settled[*i] = true;
                }
            }
        }
        self.config.faults.crash("crash_before_ack");
        // Acks every unsettled delivery up to the last one at once, without
        // waiting for the frame to be written.
        if let Some(last) = batch.iter().zip(&settled).rev().find(|(_, s)| !**s).map(|(d, _)| d) {
            acks.ack_up_to(last, consumed);
        }
    }

    async fn reject(&self, delivery: &Delivery, dead_letters: &Publisher, queue: &str, reason: &str) {
        match amqp::dead_letter(dead_letters, delivery, queue, reason).await {
            Ok(()) => {
                if delivery.acker.ack(BasicAckOptions::default()).await.is_ok() {
                    skald_wire::metrics::consumed(queue, 1);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot dead-letter; requeueing");
                requeue(delivery).await;
            }
        }
    }

    /// Runs one command through the barrier and the handler and stores its
    /// reply in the outbox. Returns an error only when nothing could be
    /// stored (then the command must be redelivered) or the message is bad.
    pub async fn process(&self, command: &CommandEnvelope, message_type: &str) -> Result<Processed, HandlerError> {
        let part = self.partition_of(command)?;
        let guard = match self.lock_for(command).await {
            Ok(g) => g,
            Err(e) if e.is_transient() => return self.retryable(part, command, &e).await,
            Err(e) => return Err(e),
        };
        let result = self
            .execute(part, command, message_type, guard.as_ref().map(|g| g.fence))
            .await;
        self.release(guard.iter()).await;
        match result {
            Ok(p) => Ok(p),
            Err(e) if e.is_transient() => self.retryable(part, command, &e).await,
            Err(e) => Err(e),
        }
    }

    /// Runs many commands, a transaction per database for all of them
    /// (each command in a savepoint, so one command's failure undoes only
    /// its own changes). Same outcomes, one per command and in order, as
    /// [`Self::process`] on each; if a batch transaction itself fails, its
    /// commands are run again one by one.
    pub async fn process_batch(&self, commands: &[Incoming<'_>]) -> Vec<Result<Processed, HandlerError>> {
        let mut outcomes: Vec<Option<Result<Processed, HandlerError>>> = (0..commands.len()).map(|_| None).collect();
        // Which database each command runs in; the same lock resource twice
        // in one transaction would wait for itself, so a repeat waits for the
        // next round.
        let mut rounds: Vec<Vec<(usize, Option<String>)>> = Vec::new();
        let mut parts: Vec<usize> = Vec::with_capacity(commands.len());
        for (i, Incoming { command, .. }) in commands.iter().enumerate() {
            let placed = self
                .partition_of(command)
                .and_then(|p| Ok((p, self.handler.lock_resource(command)?)));
            let (part, resource) = match placed {
                Ok(placed) => placed,
                Err(e) => {
                    parts.push(0);
                    outcomes[i] = Some(Err(e));
                    continue;
                }
            };
            parts.push(part);
            let round = rounds
                .iter()
                .position(|r| resource.is_none() || r.iter().all(|(_, other)| other.as_ref() != resource.as_ref()))
                .unwrap_or(rounds.len());
            if round == rounds.len() {
                rounds.push(Vec::new());
            }
            rounds[round].push((i, resource));
        }
        for round in rounds {
            let mut by_pool: Vec<Vec<usize>> = vec![Vec::new(); self.pools.len()];
            for (i, _) in &round {
                by_pool[parts[*i]].push(*i);
            }
            for (p, members) in by_pool.into_iter().enumerate() {
                if members.is_empty() {
                    continue;
                }
                let batch: Vec<&Incoming<'_>> = members.iter().map(|&i| &commands[i]).collect();
                let results = self.run_round(p, &batch).await;
                for (i, r) in members.into_iter().zip(results) {
                    outcomes[i] = Some(r);
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(HandlerError::BadPayload("command was not processed".to_owned()))))
            .collect()
    }

    /// One transaction in one database for commands with distinct lock resources.
    async fn run_round(&self, part: usize, batch: &[&Incoming<'_>]) -> Vec<Result<Processed, HandlerError>> {
        let guards = futures::future::join_all(batch.iter().map(|c| self.lock_for(c.command))).await;
        let held: Vec<&LockGuard> = guards
            .iter()
            .filter_map(|g| g.as_ref().ok().and_then(Option::as_ref))
            .collect();
        let result = self.execute_batch(part, batch, &guards).await;
        self.release(held.into_iter()).await;
        match result {
            Ok(outcomes) => outcomes,
            Err(e) => {
                self.reruns.fetch_add(1, Ordering::Relaxed);
                let reason = if matches!(e, HandlerError::BarrierRace) {
                    "barrier_race"
                } else {
                    "error"
                };
                skald_wire::metrics::batch_rerun(self.handler.participant(), reason);
                tracing::warn!(error = %e, commands = batch.len(), "batch transaction failed; processing its commands one by one");
                let mut outcomes = Vec::with_capacity(batch.len());
                for one in batch {
                    outcomes.push(one.process_by(self).await);
                }
                outcomes
            }
        }
    }

    /// The batch transaction. `Err` means the transaction failed as a whole
    /// (nothing was committed); per-command failures are in the `Ok` vector.
    ///
    /// Commands whose handler is [all-or-nothing](Handler::all_or_nothing)
    /// take the direct path. One query finds the barrier rows that already
    /// exist, if the batch holds a retry or a compensation: a command whose
    /// own row is there gets its stored reply. A compensation takes the
    /// direct path only if its action's row is there (committed, so its
    /// outcome is final): it runs its handler if the action succeeded, and
    /// is a no-op otherwise. The others run their handler with no
    /// savepoint, and one insert writes all their barrier rows with their
    /// replies. If that insert finds a row another transaction wrote
    /// meanwhile, or a handler fails, the whole batch is rolled back and run
    /// again command by command on the savepoint path. Everything else
    /// (a compensation whose action has no row, which must leave a
    /// tombstone; other handlers) takes the savepoint path
    /// ([`Self::execute_in`]) inside the same transaction.
    async fn execute_batch(
        &self,
        part: usize,
        batch: &[&Incoming<'_>],
        guards: &[Result<Option<LockGuard>, HandlerError>],
    ) -> Result<Vec<Result<Processed, HandlerError>>, HandlerError> {
        let mut tx = self.pools[part].begin().await?;
        let eligible: Vec<bool> = batch
            .iter()
            .zip(guards)
            .map(|(c, g)| g.is_ok() && self.handler.all_or_nothing(c.message_type))
            .collect();
        // Only a retry (attempt > 1) of an action is likely to find its
        // row stored; a first attempt that does (a duplicate delivery) makes
        // the barrier insert come up short, and the batch reruns on the
        // savepoint path, which replays. A compensation needs its action's row.
        let lookups: Vec<&CommandEnvelope> = batch
            .iter()
            .zip(&eligible)
            .filter(|(c, e)| **e && (c.command.kind == Kind::Compensation || c.command.attempt > 1))
            .map(|(c, _)| c.command)
            .collect();
        let stored = stored_barriers(&mut tx, &lookups).await?;
        // What each command does on the direct path; `None`: savepoint path.
        let plan: Vec<Option<Direct>> = batch
            .iter()
            .zip(&eligible)
            .map(|(c, &e)| e.then(|| Direct::plan(c.command, &stored)).flatten())
            .collect();
        let injected: Vec<bool> = plan
            .iter()
            .map(|d| d.is_some() && self.config.faults.transient())
            .collect();
        let handled_together: Vec<bool> = plan
            .iter()
            .zip(&injected)
            .map(|(d, i)| !i && matches!(d, Some(Direct::Run)))
            .collect();
        let mut together = self.handle_together(&mut tx, batch, guards, &handled_together).await?;
        let mut fresh: Vec<(&CommandEnvelope, &str, ReplyEnvelope)> = Vec::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for (index, ((incoming, guard), plan)) in batch.iter().zip(guards).zip(plan).enumerate() {
            let Incoming {
                command,
                message_type,
                span,
            } = incoming;
            let outcome = async {
                let fence = match guard {
                    Ok(g) => g.as_ref().map(|g| g.fence),
                    Err(e) if e.is_transient() => {
                        let reply = self.retryable_reply(command, e);
                        return Ok(Ok(Processed::Retryable(reply)));
                    }
                    Err(e) => return Ok(Err(HandlerError::BadPayload(e.to_string()))),
                };
                let Some(plan) = plan else {
                    return Ok(match self.execute_in(&mut tx, command, message_type, fence).await {
                        Ok(p) => Ok(p),
                        Err(e) if e.is_transient() => Ok(Processed::Retryable(self.retryable_reply(command, &e))),
                        Err(e) => Err(e),
                    });
                };
                if injected[index] {
                    let reply = self.retryable_reply(command, &HandlerError::Injected);
                    return Ok(Ok(Processed::Retryable(reply)));
                }
                let handled = match plan {
                    Direct::Replay(stored) => return Ok(Ok(replayed(stored, command))),
                    Direct::NoOp => Ok(Handled::Success(json!({"noop": true}))),
                    Direct::Run => match together.remove(&index) {
                        Some(handled) => Ok(handled),
                        None => {
                            let ctx = CommandContext {
                                command,
                                message_type,
                                fence,
                            };
                            self.handler.handle(&mut tx, &ctx).await
                        }
                    },
                };
                let reply = match handled {
                    Ok(Handled::Success(data)) => ReplyEnvelope::success(command, data),
                    Ok(Handled::BusinessFailure(reason)) => ReplyEnvelope::failure(command, false, reason),
                    // The transaction may be aborted: the batch goes the slow way.
                    Err(e) => return Err(e),
                };
                fresh.push((command, message_type, reply.clone()));
                Ok(Ok(Processed::Executed(reply)))
            }
            .instrument(span.clone())
            .await?;
            if let Ok(processed) = &outcome {
                // In the command's span: the reply's traceparent names it.
                replies.push(span.in_scope(|| reply_message(processed.reply())));
            }
            outcomes.push(outcome);
        }
        let outbox = if fresh.is_empty() {
            skald_wire::outbox::insert(&mut tx, replies).await?
        } else {
            let (recorded, outbox) = record_and_send(&mut tx, &fresh, replies).await?;
            if recorded != fresh.len() as i64 {
                return Err(HandlerError::BarrierRace);
            }
            outbox
        };
        self.config.faults.crash("crash_before_commit");
        tx.commit().await?;
        self.config.faults.crash("crash_after_commit");
        self.handoff[part].committed(outbox);
        Ok(outcomes)
    }

    /// Runs the direct-path commands of the batch that share a message
    /// type and run their handler (`wanted`) through
    /// [`Handler::handle_many`]: the first command of each (saga, step,
    /// kind), with its lock held. Returns the outcomes by position in the
    /// batch; the others (and all of them if the handler declines) go to
    /// `handle` one by one.
    async fn handle_together(
        &self,
        tx: &mut PgConnection,
        batch: &[&Incoming<'_>],
        guards: &[Result<Option<LockGuard>, HandlerError>],
        wanted: &[bool],
    ) -> Result<HashMap<usize, Handled>, HandlerError> {
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut seen: HashSet<(Uuid, &str, Kind)> = HashSet::new();
        for (i, incoming) in batch.iter().enumerate() {
            let command = incoming.command;
            if wanted[i] && seen.insert((command.saga_id, command.step.as_str(), command.kind)) {
                groups.entry(incoming.message_type).or_default().push(i);
            }
        }
        let mut handled = HashMap::new();
        for (message_type, members) in groups {
            if members.len() < 2 {
                continue;
            }
            let ctxs: Vec<CommandContext<'_>> = members
                .iter()
                .map(|&i| CommandContext {
                    command: batch[i].command,
                    message_type,
                    fence: guards[i].as_ref().ok().and_then(|g| g.as_ref().map(|g| g.fence)),
                })
                .collect();
            if let Some(outcomes) = self.handler.handle_many(&mut *tx, &ctxs).await? {
                if outcomes.len() != members.len() {
                    return Err(HandlerError::OutcomeCount {
                        message_type: message_type.to_owned(),
                        outcomes: outcomes.len(),
                        commands: members.len(),
                    });
                }
                handled.extend(members.into_iter().zip(outcomes));
            }
        }
        Ok(handled)
    }

    fn partition_of(&self, command: &CommandEnvelope) -> Result<usize, HandlerError> {
        let p = self.handler.partition(command)?;
        if p < self.pools.len() {
            Ok(p)
        } else {
            Err(HandlerError::BadPayload("partition out of range".to_owned()))
        }
    }

    async fn lock_for(&self, command: &CommandEnvelope) -> Result<Option<LockGuard>, HandlerError> {
        let Some(resource) = self.handler.lock_resource(command)? else {
            return Ok(None);
        };
        let Some(locks) = &self.locks else {
            return Ok(None);
        };
        Ok(Some(locks.acquire(&resource).await?))
    }

    /// Releases locks after the commit. If a release fails the lock expires by itself.
    async fn release<'g>(&self, guards: impl Iterator<Item = &'g LockGuard>) {
        let Some(locks) = &self.locks else { return };
        for result in futures::future::join_all(guards.map(|g| locks.release(g))).await {
            if let Err(e) = result {
                tracing::warn!(error = %e, "lock release failed; it will expire");
            }
        }
    }

    fn retryable_reply(&self, command: &CommandEnvelope, error: &HandlerError) -> ReplyEnvelope {
        tracing::info!(saga_id = %command.saga_id, step = command.step.as_str(), error = %error,
            "transient failure; the coordinator will retry");
        ReplyEnvelope::failure(command, true, error.to_string())
    }

    /// Stores a `retryable` failure reply (nothing else changed).
    async fn retryable(
        &self,
        part: usize,
        command: &CommandEnvelope,
        error: &HandlerError,
    ) -> Result<Processed, HandlerError> {
        let reply = self.retryable_reply(command, error);
        let mut tx = self.pools[part].begin().await?;
        let outbox = skald_wire::outbox::insert(&mut tx, vec![reply_message(&reply)]).await?;
        tx.commit().await?;
        self.handoff[part].committed(outbox);
        Ok(Processed::Retryable(reply))
    }

    async fn execute(
        &self,
        part: usize,
        command: &CommandEnvelope,
        message_type: &str,
        fence: Option<i64>,
    ) -> Result<Processed, HandlerError> {
        let mut tx = self.pools[part].begin().await?;
        let processed = self.execute_in(&mut tx, command, message_type, fence).await?;
        let outbox = skald_wire::outbox::insert(&mut tx, vec![reply_message(processed.reply())]).await?;
        self.config.faults.crash("crash_before_commit");
        tx.commit().await?;
        self.config.faults.crash("crash_after_commit");
        self.handoff[part].committed(outbox);
        Ok(processed)
    }

    /// The barrier, the handler and the stored reply, in the caller's
    /// transaction; the caller writes the reply to the outbox and commits.
    /// On an error, this command's changes are rolled back (to a savepoint)
    /// and the rest of the caller's transaction is left as it was.
    async fn execute_in(
        &self,
        tx: &mut PgConnection,
        command: &CommandEnvelope,
        message_type: &str,
        fence: Option<i64>,
    ) -> Result<Processed, HandlerError> {
        if self.config.faults.transient() {
            return Err(HandlerError::Injected);
        }
        if command.kind == Kind::Action
            && let Some(processed) = self.act_first(tx, command, message_type, fence).await?
        {
            return Ok(processed);
        }
        let mut savepoint = tx.begin().await?;
        let processed = self.claim_first(&mut savepoint, command, message_type, fence).await?;
        savepoint.commit().await?;
        Ok(processed)
    }

    /// The fast path of an action: run the handler, then record the reply
    /// with the inbox row in one insert. If the row already exists (a
    /// duplicate, or a tombstone left by an earlier compensation) the insert
    /// does nothing, the handler's changes are rolled back and the stored
    /// reply is replayed; a concurrent duplicate waits on the primary key
    /// until the first one commits. `None` when the handler failed: the
    /// caller then takes the barrier first ([`Self::claim_first`]), so a
    /// duplicate still gets its stored reply rather than an error.
    async fn act_first(
        &self,
        tx: &mut PgConnection,
        command: &CommandEnvelope,
        message_type: &str,
        fence: Option<i64>,
    ) -> Result<Option<Processed>, HandlerError> {
        let ctx = CommandContext {
            command,
            message_type,
            fence,
        };
        let mut savepoint = tx.begin().await?;
        match self.handler.handle(&mut savepoint, &ctx).await {
            Ok(Handled::Success(data)) => {
                let reply = ReplyEnvelope::success(command, data);
                if record(&mut savepoint, command, message_type, &reply).await? {
                    savepoint.commit().await?;
                    return Ok(Some(Processed::Executed(reply)));
                }
                savepoint.rollback().await?;
            }
            Ok(Handled::BusinessFailure(reason)) => {
                savepoint.rollback().await?;
                let reply = ReplyEnvelope::failure(command, false, reason);
                if record(tx, command, message_type, &reply).await? {
                    return Ok(Some(Processed::Executed(reply)));
                }
            }
            Err(e) => {
                savepoint.rollback().await?;
                tracing::debug!(error = %e, "handler failed on the fast path; taking the barrier first");
                return Ok(None);
            }
        }
        Ok(Some(replayed(stored_reply(tx, command, command.kind).await?, command)))
    }

    /// The barrier first: claim the inbox row, then run the handler (or,
    /// for a compensation whose action never ran, leave a tombstone).
    async fn claim_first(
        &self,
        tx: &mut PgConnection,
        command: &CommandEnvelope,
        message_type: &str,
        fence: Option<i64>,
    ) -> Result<Processed, HandlerError> {
        let fresh = claim(tx, command, message_type, command.kind, false, None).await?;
        if !fresh {
            return Ok(replayed(stored_reply(tx, command, command.kind).await?, command));
        }
        let ctx = CommandContext {
            command,
            message_type,
            fence,
        };
        let run_handler = match command.kind {
            Kind::Action => true,
            Kind::Compensation => {
                // Tombstone: succeeds only if the action never ran.
                let tombstone = ReplyEnvelope::failure(
                    &CommandEnvelope {
                        kind: Kind::Action,
                        ..command.clone()
                    },
                    false,
                    TOMBSTONE_REASON,
                );
                let action_never_ran = claim(tx, command, message_type, Kind::Action, true, Some(&tombstone)).await?;
                if action_never_ran {
                    let took_effect = self.handler.action_took_effect(tx, &ctx).await?;
                    if took_effect {
                        tracing::warn!(
                            saga_id = %command.saga_id,
                            step = %command.step,
                            "the action's barrier row is gone but its effect is there: compensating it"
                        );
                    }
                    took_effect
                } else {
                    stored_reply(tx, command, Kind::Action).await?.outcome == ReplyOutcome::Success
                }
            }
        };
        let reply = if run_handler {
            let mut savepoint = tx.begin().await?;
            match self.handler.handle(&mut savepoint, &ctx).await? {
                Handled::Success(data) => {
                    savepoint.commit().await?;
                    ReplyEnvelope::success(command, data)
                }
                Handled::BusinessFailure(reason) => {
                    savepoint.rollback().await?;
                    ReplyEnvelope::failure(command, false, reason)
                }
            }
        } else {
            ReplyEnvelope::success(command, json!({"noop": true}))
        };
        sqlx::query("UPDATE inbox SET reply = $4 WHERE saga_id = $1 AND step = $2 AND kind = $3")
            .bind(command.saga_id)
            .bind(&command.step)
            .bind(command.kind.as_str())
            .bind(serde_json::to_value(&reply)?)
            .execute(&mut *tx)
            .await?;
        Ok(Processed::Executed(reply))
    }
}

/// Inserts the inbox row of `command` with its reply; false if the row
/// already exists (nothing is written then).
async fn record(
    tx: &mut PgConnection,
    command: &CommandEnvelope,
    message_type: &str,
    reply: &ReplyEnvelope,
) -> Result<bool, HandlerError> {
    claim(tx, command, message_type, command.kind, false, Some(reply)).await
}

/// Replies stored in barrier rows, by (saga, step, kind).
type StoredReplies = HashMap<(Uuid, String, Kind), ReplyEnvelope>;

/// What a command on the direct path does.
#[derive(Debug)]
enum Direct {
    /// Run the handler.
    Run,
    /// Its barrier row is there: send the stored reply again.
    Replay(ReplyEnvelope),
    /// A compensation whose action failed or was refused: nothing to undo.
    NoOp,
}

impl Direct {
    /// `None` for a compensation whose action has no barrier row: it takes
    /// the savepoint path, which leaves the tombstone.
    fn plan(command: &CommandEnvelope, stored: &StoredReplies) -> Option<Self> {
        // The common case (first attempts of actions, no lookup): no key to build.
        if stored.is_empty() {
            return (command.kind == Kind::Action).then_some(Direct::Run);
        }
        let key = |kind| (command.saga_id, command.step.clone(), kind);
        if let Some(reply) = stored.get(&key(command.kind)) {
            return Some(Direct::Replay(reply.clone()));
        }
        match command.kind {
            Kind::Action => Some(Direct::Run),
            Kind::Compensation => stored.get(&key(Kind::Action)).map(|action| {
                if action.outcome == ReplyOutcome::Success {
                    Direct::Run
                } else {
                    Direct::NoOp
                }
            }),
        }
    }
}

/// The stored replies of the barrier rows, of either kind, that exist for
/// these commands' (saga, step).
async fn stored_barriers(tx: &mut PgConnection, commands: &[&CommandEnvelope]) -> Result<StoredReplies, HandlerError> {
    if commands.is_empty() {
        return Ok(HashMap::new());
    }
    let wanted: HashSet<(Uuid, &str)> = commands.iter().map(|c| (c.saga_id, c.step.as_str())).collect();
    let sagas: Vec<Uuid> = commands.iter().map(|c| c.saga_id).collect();
    // By the key's leading column only: a join on (saga, step) pairs made
    // the planner hash the whole inbox (measured: 1 ms a batch instead of 0.1).
    let rows = sqlx::query("SELECT saga_id, step, kind, reply FROM inbox WHERE saga_id = ANY($1)")
        .bind(&sagas)
        .fetch_all(&mut *tx)
        .await?;
    let mut stored = HashMap::with_capacity(rows.len());
    for row in rows {
        let saga_id: Uuid = row.try_get("saga_id")?;
        let step: String = row.try_get("step")?;
        if !wanted.contains(&(saga_id, step.as_str())) {
            continue;
        }
        let kind: String = row.try_get("kind")?;
        let kind: Kind = kind.parse().map_err(HandlerError::BadPayload)?;
        let reply: Option<Value> = row.try_get("reply")?;
        let reply = reply.ok_or_else(|| HandlerError::BadPayload("inbox row without a reply".to_owned()))?;
        stored.insert((saga_id, step, kind), serde_json::from_value(reply)?);
    }
    Ok(stored)
}

/// Inserts the barrier rows of commands handled on the direct path, with
/// their replies, and the batch's replies into the outbox, in one
/// statement. Returns how many barrier rows were inserted (fewer than given
/// means another transaction wrote one of them meanwhile: the caller rolls
/// back) and the outbox ids.
async fn record_and_send(
    tx: &mut PgConnection,
    rows: &[(&CommandEnvelope, &str, ReplyEnvelope)],
    messages: Vec<OutgoingMessage>,
) -> Result<(i64, Vec<Written>), HandlerError> {
    let mut sagas = Vec::with_capacity(rows.len());
    let mut steps = Vec::with_capacity(rows.len());
    let mut kinds = Vec::with_capacity(rows.len());
    let mut attempts = Vec::with_capacity(rows.len());
    let mut types = Vec::with_capacity(rows.len());
    let mut replies = Vec::with_capacity(rows.len());
    for (command, message_type, reply) in rows {
        sagas.push(command.saga_id);
        steps.push(command.step.as_str());
        kinds.push(command.kind.as_str());
        attempts.push(command.attempt as i32);
        types.push(*message_type);
        replies.push(serde_json::to_value(reply)?);
    }
    let statement = concat!(
        "WITH recorded AS (
             INSERT INTO inbox (saga_id, step, kind, attempt, message_type, tombstone, reply)
             SELECT saga_id, step, kind, attempt, message_type, false, reply
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::jsonb[])
                  AS r(saga_id, step, kind, attempt, message_type, reply)
             ON CONFLICT DO NOTHING
             RETURNING 1),
         sent AS (",
        skald_wire::outbox_unnest!(7, 8, 9, 10, 11, 12, 13),
        " RETURNING id, message_id)
         SELECT (SELECT count(*) FROM recorded) AS recorded,
                ARRAY (SELECT id FROM sent) AS outbox, ARRAY (SELECT message_id FROM sent) AS outbox_messages"
    );
    let query = sqlx::query(statement)
        .bind(&sagas)
        .bind(&steps)
        .bind(&kinds)
        .bind(&attempts)
        .bind(&types)
        .bind(&replies);
    let row = skald_wire::outbox::Columns::new(&messages)?
        .bind(query)
        .fetch_one(&mut *tx)
        .await?;
    let outbox = skald_wire::outbox::pair(row.try_get("outbox")?, row.try_get("outbox_messages")?, messages);
    Ok((row.try_get("recorded")?, outbox))
}

/// A stored reply sent again, with the attempt number of the command it answers.
fn replayed(stored: ReplyEnvelope, command: &CommandEnvelope) -> Processed {
    Processed::Replayed(ReplyEnvelope {
        attempt: command.attempt,
        ..stored
    })
}

/// Hands a delivery back to the broker for another try.
async fn requeue(delivery: &Delivery) {
    let requeue = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    if let Err(e) = delivery.acker.nack(requeue).await {
        tracing::warn!(error = %e, "nack failed; the broker redelivers when the channel closes");
    }
}

/// Inserts the inbox row `(saga, step, kind)`; false if it already exists.
/// A concurrent transaction inserting the same key makes this wait for it.
async fn claim(
    tx: &mut PgConnection,
    command: &CommandEnvelope,
    message_type: &str,
    kind: Kind,
    tombstone: bool,
    reply: Option<&ReplyEnvelope>,
) -> Result<bool, HandlerError> {
    let reply = reply.map(serde_json::to_value).transpose()?;
    let inserted = sqlx::query(
        "INSERT INTO inbox (saga_id, step, kind, attempt, message_type, tombstone, reply)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(command.saga_id)
    .bind(&command.step)
    .bind(kind.as_str())
    .bind(command.attempt as i32)
    .bind(message_type)
    .bind(tombstone)
    .bind(reply)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

async fn stored_reply(
    tx: &mut PgConnection,
    command: &CommandEnvelope,
    kind: Kind,
) -> Result<ReplyEnvelope, HandlerError> {
    let row = sqlx::query("SELECT reply FROM inbox WHERE saga_id = $1 AND step = $2 AND kind = $3")
        .bind(command.saga_id)
        .bind(&command.step)
        .bind(kind.as_str())
        .fetch_one(&mut *tx)
        .await?;
    let reply: Option<Value> = row.try_get("reply")?;
    let reply = reply.ok_or_else(|| HandlerError::BadPayload("inbox row without a reply".to_owned()))?;
    Ok(serde_json::from_value(reply)?)
}

fn reply_message(reply: &ReplyEnvelope) -> OutgoingMessage {
    let kind = match (reply.kind, reply.outcome) {
        (Kind::Action, ReplyOutcome::Success) => "ActionSucceeded",
        (Kind::Action, ReplyOutcome::Failure) => "ActionFailed",
        (Kind::Compensation, ReplyOutcome::Success) => "CompensationSucceeded",
        (Kind::Compensation, ReplyOutcome::Failure) => "CompensationFailed",
    };
    OutgoingMessage {
        message_id: Uuid::now_v7(),
        exchange: REPLIES_EXCHANGE.to_owned(),
        routing_key: REPLIES_ROUTING_KEY.to_owned(),
        message_type: kind.to_owned(),
        correlation_id: reply.saga_id,
        // A struct of plain fields and a Value always serializes.
        body: serde_json::to_vec(reply).unwrap_or_default(),
        headers: skald_wire::trace::reply_headers(reply.saga_id, &reply.step, reply.attempt, reply.kind),
    }
}
