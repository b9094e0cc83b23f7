//! Driving load through the HTTP API and measuring a phase.
//!
//! A phase posts orders, keeps track of which of its sagas are final by
//! polling the coordinator's database (one indexed query for all the sagas
//! in flight, not one HTTP request per saga), and then takes every figure
//! from the databases and `/proc`: throughput and latency from the `sagas`
//! rows, messages from the attempt records, PostgreSQL transactions from
//! `pg_stat_database`, CPU and peak RSS of each child.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::legs::Leg;
use super::procfs::{self, MachineCpu, Memory, Usage};
use crate::Api;
use crate::workload::{PlannedOrder, percentile, retry_until};

/// What every phase needs.
pub struct Env {
    pub api: Api,
    /// The coordinator's database.
    pub coordinator_url: String,
    /// `(participant, database URL)` of each participant, for the legs.
    pub participant_urls: Vec<(String, String)>,
    /// A connection to the `postgres` database, for `pg_stat_database` (so
    /// that reading the statistics does not count in our databases).
    pub admin: PgPool,
    pub db_names: Vec<String>,
    /// `(name, pid)` of each child.
    pub children: Vec<(&'static str, u32)>,
    /// RabbitMQ's Erlang VM on this machine, if found: shared with anything
    /// else using the broker, so reported apart.
    pub broker_pid: Option<u32>,
    pub log_dir: std::path::PathBuf,
    pub stop: CancellationToken,
    pub timeout: Duration,
    /// Pause after a phase's last saga is final, before the closing readings:
    /// PostgreSQL publishes a backend's counters about once a second.
    pub settle: Duration,
    pub run_id: String,
}

/// Readings at one instant.
struct Snapshot {
    at: Instant,
    xacts: BTreeMap<String, i64>,
    cpu: Vec<Usage>,
    /// CPU time of each PostgreSQL backend connected to our databases.
    backends: HashMap<u32, Usage>,
    broker: Option<Usage>,
    machine: MachineCpu,
    /// The server's WAL and checkpoints so far, if it tells.
    wal: Option<Wal>,
}

/// Server-wide counters of `pg_stat_wal`, `pg_stat_bgwriter` and
/// `pg_control_checkpoint()` (PostgreSQL 14 and later).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct Wal {
    bytes: i64,
    full_page_images: i64,
    syncs: i64,
    /// Checkpoints begun (timed and requested).
    checkpoints: i64,
    /// Where the last completed checkpoint's redo begins.
    last_checkpoint: String,
}

/// What the server's WAL did in a phase: its whole traffic, ours and any
/// other database's.
#[derive(Debug, Clone, Serialize)]
pub struct WalReport {
    pub kib_per_saga: f64,
    /// Full-page images: the first change to a page after a checkpoint
    /// logs the whole 8 KiB page.
    pub full_page_images_per_saga: f64,
    /// WAL flushes to disk (commits share them).
    pub syncs_per_saga: f64,
    /// Checkpoints begun in the phase.
    pub checkpoints_begun: i64,
    /// Whether a checkpoint ended in the phase (begun in it or before).
    pub checkpoint_ended: bool,
}

impl Wal {
    fn report(&self, later: &Wal, finished: f64) -> WalReport {
        WalReport {
            kib_per_saga: round3((later.bytes - self.bytes) as f64 / 1024.0 / finished),
            full_page_images_per_saga: round3((later.full_page_images - self.full_page_images) as f64 / finished),
            syncs_per_saga: round3((later.syncs - self.syncs) as f64 / finished),
            checkpoints_begun: later.checkpoints - self.checkpoints,
            checkpoint_ended: later.last_checkpoint != self.last_checkpoint,
        }
    }
}

impl Env {
    /// A pool of one connection to the coordinator's database. The bench closes
    /// it at the end of each use: a backend publishes its statistics when it
    /// exits, so the bench's own queries are all counted by the next reading.
    pub fn coordinator_pool(&self) -> anyhow::Result<PgPool> {
        skald_wire::db::lazy_pool(&self.coordinator_url, 1).context("coordinator database")
    }

    /// The legs of `ids` (read after the phase's closing snapshot, so not
    /// counted among its transactions).
    async fn legs(&self, coordinator: &PgPool, ids: &[Uuid]) -> anyhow::Result<Vec<Leg>> {
        let mut pools = Vec::with_capacity(self.participant_urls.len());
        for (name, url) in &self.participant_urls {
            let pool = skald_wire::db::lazy_pool(url, 1).with_context(|| format!("{name} database"))?;
            pools.push((name.clone(), pool));
        }
        let legs = super::legs::measure(coordinator, &pools, ids).await;
        for (_, pool) in pools {
            pool.close().await;
        }
        legs
    }

    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT datname::text, (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = ANY($1)",
        )
        .bind(&self.db_names)
        .fetch_all(&self.admin)
        .await
        .context("reading pg_stat_database")?;
        let cpu = self
            .children
            .iter()
            .map(|&(name, pid)| procfs::usage(pid).with_context(|| format!("{name} CPU time")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = ANY($1)")
            .bind(&self.db_names)
            .fetch_all(&self.admin)
            .await
            .context("reading pg_stat_activity")?;
        // A backend may exit meanwhile: it is left out.
        let backends = pids
            .into_iter()
            .filter_map(|pid| {
                let pid = u32::try_from(pid).ok()?;
                Some((pid, procfs::usage(pid).ok()?))
            })
            .collect();
        Ok(Snapshot {
            at: Instant::now(),
            xacts: rows.into_iter().collect(),
            cpu,
            backends,
            broker: self.broker_pid.and_then(|pid| procfs::usage(pid).ok()),
            machine: MachineCpu::read()?,
            // A diagnostic: a server that does not tell leaves it out.
            wal: sqlx::query_as(
                "SELECT w.wal_bytes::bigint AS bytes, w.wal_fpi AS full_page_images, w.wal_sync AS syncs,
                        b.checkpoints_timed + b.checkpoints_req AS checkpoints,
                        c.redo_lsn::text AS last_checkpoint
                 FROM pg_stat_wal w, pg_stat_bgwriter b, pg_control_checkpoint() c",
            )
            .fetch_one(&self.admin)
            .await
            .ok(),
        })
    }

    fn reset_peaks(&self) -> anyhow::Result<()> {
        for &(name, pid) in &self.children {
            procfs::reset_peak(pid).with_context(|| format!("resetting the peak RSS of {name}"))?;
        }
        Ok(())
    }

    fn memories(&self) -> anyhow::Result<Vec<Memory>> {
        self.children
            .iter()
            .map(|&(name, pid)| procfs::memory(pid).with_context(|| format!("{name} memory")))
            .collect()
    }

    /// Sends `sig` to every participant (SIGSTOP, SIGCONT).
    fn signal_participants(&self, sig: libc::c_int) -> anyhow::Result<()> {
        for &(name, pid) in self.children.iter().filter(|c| c.0 != "coordinator") {
            procfs::signal(pid, sig).with_context(|| format!("{name} participant"))?;
        }
        Ok(())
    }

    /// An error naming a child that has died, with the end of its log.
    fn check_children(&self) -> anyhow::Result<()> {
        for &(name, pid) in &self.children {
            if !procfs::is_alive(pid) {
                let log = self.log_dir.join(format!("{name}.log"));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                bail!(
                    "{name} (pid {pid}) has exited; the end of {}:\n{}",
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        Ok(())
    }
}

/// Starts a phase: resets the peak RSS of each child and takes the first readings.
pub struct Measure {
    name: String,
    start: Snapshot,
    started_wall: Instant,
}

impl Measure {
    pub async fn start(env: &Env, name: &str) -> anyhow::Result<Self> {
        env.reset_peaks()?;
        Ok(Self {
            name: name.to_owned(),
            start: env.snapshot().await?,
            started_wall: Instant::now(),
        })
    }

    /// Closing readings, then every figure of the phase from the databases.
    pub async fn finish(self, env: &Env, load: &Load, kind: PhaseKind) -> anyhow::Result<PhaseReport> {
        tokio::time::sleep(env.settle).await;
        let end = env.snapshot().await?;
        let memories = env.memories()?;
        let pool = env.coordinator_pool()?;
        let figures = saga_figures(&pool, &load.saga_ids).await;
        let legs = match (&figures, kind) {
            (Ok(_), PhaseKind::ClosedLoop | PhaseKind::OpenLoop) => env.legs(&pool, &load.saga_ids).await,
            _ => Ok(Vec::new()),
        };
        pool.close().await;
        let figures = figures?;
        // A diagnostic: without it the phase's figures still stand.
        let legs = legs.unwrap_or_else(|e| {
            eprintln!("WARNING: step legs not measured: {e:#}");
            Vec::new()
        });

        let xacts_by_db: BTreeMap<String, i64> = end
            .xacts
            .iter()
            .map(|(db, n)| (db.clone(), n - self.start.xacts.get(db).copied().unwrap_or(0)))
            .collect();
        let bench_xacts = load.bench_queries as i64;
        let skald_xacts = xacts_by_db.values().sum::<i64>() - bench_xacts;
        let finished = figures.finished.max(1) as f64;
        let elapsed = end.at.duration_since(self.start.at).as_secs_f64().max(1e-9);
        let process = |name: &str, pid: u32, used: Usage, m: Option<&Memory>| {
            let (cpu, sched) = (used.cpu.as_secs_f64(), used.sched);
            ProcessReport {
                name: name.to_owned(),
                pid,
                cpu_secs: round3(cpu),
                cpu_ms_per_saga: round3(cpu * 1000.0 / finished),
                cores_busy: round3(cpu / elapsed),
                runq_wait_ms_per_saga: sched.map(|s| round3(s.waited.as_secs_f64() * 1000.0 / finished)),
                switches_per_saga: sched.map(|s| round1(s.slices as f64 / finished)),
                peak_rss_mib: m.map(|m| mib(m.hwm_kib)),
                rss_mib: m.map(|m| mib(m.rss_kib)),
            }
        };
        let mut processes: Vec<ProcessReport> = env
            .children
            .iter()
            .zip(self.start.cpu.iter().zip(&end.cpu))
            .zip(&memories)
            .map(|((&(name, pid), (a, b)), m)| process(name, pid, b.since(a), Some(m)))
            .collect();
        // Backends born in the phase count whole; one that exited in it is missed.
        let backends = end
            .backends
            .iter()
            .map(|(pid, u)| u.since(&self.start.backends.get(pid).copied().unwrap_or_default()))
            .fold(Usage::default(), |total, u| total + u);
        processes.push(process(POSTGRES_BACKENDS, 0, backends, None));
        if let (Some(pid), Some(a), Some(b)) = (env.broker_pid, self.start.broker, end.broker) {
            processes.push(process(RABBITMQ_BROKER, pid, b.since(&a), None));
        }
        let messages = figures.commands + figures.replies;
        let window = figures.window_secs.max(1e-9);
        Ok(PhaseReport {
            name: self.name,
            kind,
            orders: load.saga_ids.len(),
            finished: figures.finished,
            completed: figures.completed,
            compensated: figures.compensated,
            stuck: figures.stuck,
            compensated_share: round3(figures.compensated as f64 / finished),
            window_secs: round3(figures.window_secs),
            sagas_per_sec: round1(figures.finished as f64 / window),
            wall_secs: round3(self.started_wall.elapsed().as_secs_f64()),
            latency_ms: Latency::of(figures.latencies),
            post_latency_ms: Latency::of(load.post_latencies.clone()),
            post_rate: load.post_rate.map(round1),
            commands: figures.commands,
            replies: figures.replies,
            retries: figures.retries,
            messages_per_sec: round1(messages as f64 / window),
            messages_per_saga: round3(messages as f64 / finished),
            pg_xacts: skald_xacts,
            pg_xacts_per_saga: round3(skald_xacts as f64 / finished),
            pg_xacts_by_db: xacts_by_db,
            bench_xacts_excluded: load.bench_queries,
            machine_cpu_busy: round3(self.start.machine.busy_share(&end.machine)),
            machine_cpu_pressure: self
                .start
                .machine
                .pressure_share(&end.machine, end.at.duration_since(self.start.at))
                .map(round3),
            machine_switches_per_saga: round1(self.start.machine.switches(&end.machine) as f64 / finished),
            wal: match (&self.start.wal, &end.wal) {
                (Some(a), Some(b)) => Some(a.report(b, finished)),
                _ => None,
            },
            measured_secs: round3(elapsed),
            processes,
            legs,
            in_flight: None,
        })
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
fn mib(kib: u64) -> f64 {
    round1(kib as f64 / 1024.0)
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PhaseKind {
    ClosedLoop,
    OpenLoop,
    InFlight,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    pub fn of(mut v: Vec<Duration>) -> Self {
        v.sort();
        let ms = |d: Option<Duration>| round1(d.map_or(0.0, |d| d.as_secs_f64() * 1000.0));
        let mean = if v.is_empty() {
            0.0
        } else {
            v.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0 / v.len() as f64
        };
        Self {
            count: v.len(),
            p50: ms(percentile(&v, 50.0)),
            p95: ms(percentile(&v, 95.0)),
            p99: ms(percentile(&v, 99.0)),
            max: ms(v.last().copied()),
            mean: round1(mean),
        }
    }
}

/// The fixed-rate phases of one bench run: each one's p50 and p99, and
/// their medians.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FixedRateSummary {
    pub rate: f64,
    pub runs: usize,
    pub p50_ms: Vec<f64>,
    pub p99_ms: Vec<f64>,
    pub median_p50_ms: f64,
    pub median_p99_ms: f64,
}

impl FixedRateSummary {
    /// From each run's `(p50, p99)`, in run order.
    pub fn of(rate: f64, runs: &[(f64, f64)]) -> Self {
        let p50_ms: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let p99_ms: Vec<f64> = runs.iter().map(|r| r.1).collect();
        Self {
            rate: round1(rate),
            runs: runs.len(),
            median_p50_ms: median(&p50_ms),
            median_p99_ms: median(&p99_ms),
            p50_ms,
            p99_ms,
        }
    }
}

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => round1((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessReport {
    pub name: String,
    pub pid: u32,
    /// User + system CPU time in the phase.
    pub cpu_secs: f64,
    pub cpu_ms_per_saga: f64,
    /// CPU seconds per second of the phase (1.0 = one core busy).
    pub cores_busy: f64,
    /// Time its threads were runnable but waited for a CPU, summed over
    /// them, per saga (`/proc/PID/task/*/schedstat`; threads that exited in
    /// the phase are missed).
    pub runq_wait_ms_per_saga: Option<f64>,
    /// Time slices its threads ran, per saga: each is a wake-up or a
    /// preemption and a switch onto a CPU.
    pub switches_per_saga: Option<f64>,
    /// Peak RSS in the phase (VmHWM, reset at the phase start).
    pub peak_rss_mib: Option<f64>,
    /// RSS at the end of the phase.
    pub rss_mib: Option<f64>,
}

/// The PostgreSQL backends connected to our four databases, as one process
/// (the bench's own polling connection included; no RSS: shared buffers).
pub const POSTGRES_BACKENDS: &str = "postgres (backends of our databases)";

/// The whole RabbitMQ broker (every vhost; nothing else uses it during a run here).
pub const RABBITMQ_BROKER: &str = "rabbitmq (whole broker)";

#[derive(Debug, Clone, Serialize)]
pub struct InFlightReport {
    pub sagas: usize,
    /// From the first POST until every order was accepted.
    pub accept_secs: f64,
    pub accept_rate: f64,
    /// From the first POST until the coordinator's outbox was empty.
    pub relayed_secs: f64,
    pub coordinator_rss_mib: f64,
    pub coordinator_peak_rss_mib: f64,
    /// How long the participants were stopped (SIGSTOP).
    pub participants_paused_secs: f64,
    /// From SIGCONT until every saga was final.
    pub drain_secs: f64,
    pub drain_sagas_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub name: String,
    pub kind: PhaseKind,
    pub orders: usize,
    pub finished: usize,
    pub completed: usize,
    pub compensated: usize,
    pub stuck: usize,
    pub compensated_share: f64,
    /// First saga created to last saga finished (coordinator clock).
    pub window_secs: f64,
    /// `finished / window_secs`.
    pub sagas_per_sec: f64,
    pub wall_secs: f64,
    /// Saga `created_at` to `finished_at`.
    pub latency_ms: Latency,
    /// `POST /v1/orders` as the bench saw it.
    pub post_latency_ms: Latency,
    /// Orders posted per second (open loop: the rate achieved).
    pub post_rate: Option<f64>,
    /// Commands sent: one per attempt record (actions and compensations).
    pub commands: i64,
    /// Replies received: attempt records that ended with a reply (not timed out).
    pub replies: i64,
    /// Attempts beyond the first, over every step's action and compensation.
    pub retries: i64,
    pub messages_per_sec: f64,
    pub messages_per_saga: f64,
    /// Transactions in our four databases in the phase, the bench's own excluded.
    pub pg_xacts: i64,
    pub pg_xacts_per_saga: f64,
    /// Per database, the bench's own included.
    pub pg_xacts_by_db: BTreeMap<String, i64>,
    pub bench_xacts_excluded: u64,
    /// Share of the whole machine's CPU that was busy (every process, not only ours).
    pub machine_cpu_busy: f64,
    /// Share of the phase in which at least one runnable task waited for a
    /// CPU (`/proc/pressure/cpu`, "some"); none without PSI.
    pub machine_cpu_pressure: Option<f64>,
    /// Context switches of the whole machine per saga (`ctxt` of `/proc/stat`).
    pub machine_switches_per_saga: f64,
    /// The server's WAL in the phase; none if it does not tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal: Option<WalReport>,
    /// Between the readings of `pg_xacts`, CPU and machine CPU.
    pub measured_secs: f64,
    pub processes: Vec<ProcessReport>,
    /// Each step split into its two legs (see [`super::legs`]); none for
    /// the in-flight phase, whose sagas wait for the participants.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub legs: Vec<Leg>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<InFlightReport>,
}

/// Figures of a set of sagas, from the coordinator's database.
struct SagaFigures {
    finished: usize,
    completed: usize,
    compensated: usize,
    stuck: usize,
    window_secs: f64,
    latencies: Vec<Duration>,
    commands: i64,
    replies: i64,
    retries: i64,
}

/// Statuses that end a saga's automatic life.
pub const FINAL: [&str; 3] = ["COMPLETED", "COMPENSATED", "STUCK"];

async fn saga_figures(pool: &PgPool, ids: &[Uuid]) -> anyhow::Result<SagaFigures> {
    let rows: Vec<(String, DateTime<Utc>, Option<DateTime<Utc>>)> =
        sqlx::query_as("SELECT status, created_at, finished_at FROM sagas WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(pool)
            .await
            .context("reading the phase's sagas")?;
    let count = |s: &str| rows.iter().filter(|r| r.0 == s).count();
    let first = rows.iter().map(|r| r.1).min();
    let last = rows.iter().filter_map(|r| r.2).max();
    let window_secs = match (first, last) {
        (Some(a), Some(b)) => (b - a).to_std().map_or(0.0, |d| d.as_secs_f64()),
        _ => 0.0,
    };
    let latencies = rows
        .iter()
        .filter_map(|(_, c, f)| f.and_then(|f| (f - *c).to_std().ok()))
        .collect();
    // Every attempt record is one command sent; one that ended with a
    // success or a failure also had a reply (a timed-out one had none).
    let (commands, replies, retries): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(a.rec)::bigint,
                count(a.rec) FILTER (WHERE a.rec->'outcome'->>'result' IN ('succeeded', 'failed'))::bigint,
                COALESCE((SELECT sum(GREATEST(jsonb_array_length(st->'attempts') - 1, 0)
                                   + GREATEST(jsonb_array_length(st->'compensations') - 1, 0))
                          FROM sagas s2 CROSS JOIN LATERAL jsonb_array_elements(s2.state->'steps') st
                          WHERE s2.id = ANY($1)), 0)::bigint
         FROM sagas s
         CROSS JOIN LATERAL jsonb_array_elements(s.state->'steps') st
         CROSS JOIN LATERAL jsonb_array_elements((st->'attempts') || (st->'compensations')) AS a(rec)
         WHERE s.id = ANY($1)",
    )
    .bind(ids)
    .fetch_one(pool)
    .await
    .context("counting the phase's messages")?;
    Ok(SagaFigures {
        finished: count("COMPLETED") + count("COMPENSATED") + count("STUCK"),
        completed: count("COMPLETED"),
        compensated: count("COMPENSATED"),
        stuck: count("STUCK"),
        window_secs,
        latencies,
        commands,
        replies,
        retries,
    })
}

/// What a phase's load produced.
#[derive(Debug, Default)]
pub struct Load {
    pub saga_ids: Vec<Uuid>,
    pub post_latencies: Vec<Duration>,
    pub post_rate: Option<f64>,
    /// Queries the bench ran against our databases in the phase (excluded from the count).
    pub bench_queries: u64,
}

/// A posted order on its way to the tracker, with the permit it holds (closed loop).
struct Posted {
    saga_id: Uuid,
    permit: Option<OwnedSemaphorePermit>,
}

pub fn progress(len: u64, prefix: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{prefix:>10} {elapsed:>4} [{bar:36}] {pos}/{len} final  {msg}") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(prefix.to_owned());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// How the orders are sent.
#[derive(Debug, Clone, Copy)]
pub enum Pacing {
    /// Keep `n` orders in flight: post the next one when one is final.
    Closed(usize),
    /// Post `rate` orders per second, whatever is in flight (at most `max_posts` POSTs at once).
    Open { rate: f64, max_posts: usize },
    /// Post as fast as the API takes them, `n` POSTs at once, without waiting for the sagas.
    Flood(usize),
}

/// Posts the orders as `pacing` says and waits until every saga is final.
pub async fn drive(env: &Env, phase: &str, orders: Vec<PlannedOrder>, pacing: Pacing) -> anyhow::Result<Load> {
    let pb = progress(orders.len() as u64, phase);
    let deadline = tokio::time::Instant::now() + env.timeout;
    let (tx, rx) = mpsc::unbounded_channel::<Posted>();
    let pool = env.coordinator_pool()?;
    let mut tracker = Tracker::new(pool, rx, pb.clone());
    // Only a closed loop waits on the tracker to post its next order; an
    // open loop posts on its own clock and reads every figure from the
    // saga rows afterwards, so it polls seldom and loads the system less.
    if !matches!(pacing, Pacing::Closed(_)) {
        tracker.poll_floor = SELDOM_POLL;
    }
    // The first error ends both (the POST tasks are aborted with their JoinSet).
    let result = tokio::try_join!(
        send(env, phase, orders, pacing, tx, deadline),
        tracker.run(env, deadline)
    );
    pb.finish_and_clear();
    tracker.pool.close().await;
    let (sent, ()) = result?;
    Ok(Load {
        saga_ids: tracker.all,
        post_latencies: sent.latencies,
        post_rate: sent.rate,
        bench_queries: tracker.queries,
    })
}

struct Sent {
    latencies: Vec<Duration>,
    rate: Option<f64>,
}

async fn send(
    env: &Env,
    phase: &str,
    orders: Vec<PlannedOrder>,
    pacing: Pacing,
    tx: mpsc::UnboundedSender<Posted>,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Sent> {
    let (permits, hold) = match pacing {
        Pacing::Closed(n) => (n, true),
        Pacing::Open { max_posts, .. } => (max_posts, false),
        Pacing::Flood(n) => (n, false),
    };
    let sem = Arc::new(Semaphore::new(permits.max(1)));
    let mut tasks: JoinSet<anyhow::Result<Duration>> = JoinSet::new();
    let mut latencies = Vec::with_capacity(orders.len());
    let n = orders.len();
    let started = tokio::time::Instant::now();
    let mut first_post: Option<Instant> = None;
    let mut last_post = Instant::now();
    for (i, order) in orders.into_iter().enumerate() {
        if let Pacing::Open { rate, .. } = pacing {
            let at = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = env.stop.cancelled() => bail!("{phase}: interrupted"),
            }
        }
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => p.context("semaphore closed")?,
            () = env.stop.cancelled() => bail!("{phase}: interrupted"),
            () = tokio::time::sleep_until(deadline) => bail!(
                "{phase}: only {i} of {n} orders were sent within --timeout-secs {}: the system is slower than the bench expects (try fewer --orders or a larger --timeout-secs)",
                env.timeout.as_secs()
            ),
        };
        while let Some(done) = tasks.try_join_next() {
            latencies.push(done.context("POST task")??);
        }
        let now = Instant::now();
        first_post.get_or_insert(now);
        last_post = now;
        let api = env.api.clone();
        let tx = tx.clone();
        let stop = env.stop.clone();
        let key = format!("bench-{}-{phase}-{}", env.run_id, order.index);
        tasks.spawn(async move {
            let t0 = Instant::now();
            let created = retry_until(deadline, &stop, || api.create_order(&order.body, &key))
                .await
                .map_err(|e| match e {
                    Some(e) => anyhow::anyhow!("POST /v1/orders failed: {e}"),
                    None => anyhow::anyhow!("interrupted"),
                })?;
            let latency = t0.elapsed();
            let saga_id = created
                .get("saga_id")
                .and_then(Value::as_str)
                .and_then(|s| Uuid::parse_str(s).ok())
                .with_context(|| format!("POST /v1/orders: no saga_id in {created}"))?;
            let _ = tx.send(Posted {
                saga_id,
                permit: hold.then_some(permit),
            });
            Ok(latency)
        });
    }
    while let Some(done) = tasks.join_next().await {
        latencies.push(done.context("POST task")??);
    }
    let rate = match (pacing, first_post) {
        (Pacing::Closed(_), _) | (_, None) => None,
        (_, Some(first)) if n > 1 => Some((n - 1) as f64 / last_post.duration_since(first).as_secs_f64().max(1e-9)),
        _ => None,
    };
    Ok(Sent { latencies, rate })
}

/// How often a tracker polls when nothing waits on it but the phase's end.
const SELDOM_POLL: Duration = Duration::from_millis(250);

/// Follows the posted sagas until every one is final.
struct Tracker {
    pool: PgPool,
    rx: mpsc::UnboundedReceiver<Posted>,
    pb: ProgressBar,
    /// In flight, with the permit each holds (closed loop).
    open: HashMap<Uuid, Option<OwnedSemaphorePermit>>,
    all: Vec<Uuid>,
    queries: u64,
    /// The shortest interval between two polls.
    poll_floor: Duration,
}

impl Tracker {
    fn new(pool: PgPool, rx: mpsc::UnboundedReceiver<Posted>, pb: ProgressBar) -> Self {
        Self {
            pool,
            rx,
            pb,
            open: HashMap::new(),
            all: Vec::new(),
            queries: 0,
            poll_floor: Duration::from_millis(20),
        }
    }

    /// Adds sagas that are already in flight (posted by someone else).
    fn add(&mut self, ids: &[Uuid]) {
        for &id in ids {
            self.open.insert(id, None);
            self.all.push(id);
        }
    }

    async fn run(&mut self, env: &Env, deadline: tokio::time::Instant) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut senders_done = false;
        loop {
            loop {
                match self.rx.try_recv() {
                    Ok(p) => {
                        self.open.insert(p.saga_id, p.permit);
                        self.all.push(p.saga_id);
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        senders_done = true;
                        break;
                    }
                }
            }
            if senders_done && self.open.is_empty() {
                return Ok(());
            }
            if !self.open.is_empty() {
                let ids: Vec<Uuid> = self.open.keys().copied().collect();
                self.queries += 1;
                // By primary key only, statuses filtered here: a status
                // condition lets the planner AND in the status index, which
                // costs PostgreSQL (and so the measured system) far more.
                let rows: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, status FROM sagas WHERE id = ANY($1)")
                    .bind(&ids)
                    .fetch_all(&self.pool)
                    .await
                    .context("polling the coordinator database")?;
                let done: Vec<Uuid> = rows
                    .into_iter()
                    .filter(|(_, status)| matches!(status.as_str(), "COMPLETED" | "COMPENSATED" | "STUCK"))
                    .map(|(id, _)| id)
                    .collect();
                for id in &done {
                    self.open.remove(id);
                }
                self.pb.inc(done.len() as u64);
                let finished = self.all.len() - self.open.len();
                self.pb.set_message(format!(
                    "in flight {:>5}   {:.0} sagas/s",
                    self.open.len(),
                    finished as f64 / started.elapsed().as_secs_f64().max(1e-9)
                ));
            }
            env.check_children()?;
            if tokio::time::Instant::now() >= deadline {
                return Err(self.timeout_error(env).await);
            }
            if env.stop.is_cancelled() {
                bail!("interrupted");
            }
            // One indexed lookup per saga in flight: poll less often when many are.
            let interval = Duration::from_millis((self.open.len() as u64 / 4).clamp(20, 1000)).max(self.poll_floor);
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = env.stop.cancelled() => {}
            }
        }
    }

    async fn timeout_error(&mut self, env: &Env) -> anyhow::Error {
        let ids: Vec<Uuid> = self.open.keys().copied().collect();
        self.queries += 1;
        let statuses: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM sagas WHERE id = ANY($1) GROUP BY status ORDER BY status")
                .bind(&ids)
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default();
        let statuses: Vec<String> = statuses.iter().map(|(s, n)| format!("{s} {n}")).collect();
        anyhow::anyhow!(
            "{} sagas were not final within --timeout-secs {} ({}); the system is slower than expected or stuck: \
             see the logs in {} and `sagactl list --status RUNNING`",
            ids.len(),
            env.timeout.as_secs(),
            if statuses.is_empty() {
                "not in the database yet".to_owned()
            } else {
                statuses.join(", ")
            },
            env.log_dir.display()
        )
    }
}

/// The in-flight phase: with the participants stopped, posts every order as
/// fast as the API takes them, waits for the outbox to drain into RabbitMQ,
/// reads the coordinator's memory, then resumes the participants and waits
/// for every saga to be final.
pub async fn in_flight(
    env: &Env,
    orders: Vec<PlannedOrder>,
    concurrency: usize,
) -> anyhow::Result<(Load, InFlightReport)> {
    let n = orders.len();
    let coordinator_pid = env
        .children
        .iter()
        .find(|c| c.0 == "coordinator")
        .map(|c| c.1)
        .context("no coordinator")?;
    env.signal_participants(libc::SIGSTOP)?;
    let paused_at = Instant::now();
    let deadline = tokio::time::Instant::now() + env.timeout;
    let pb = progress(n as u64, "in-flight");
    pb.set_message("posting (participants stopped)");
    let (tx, mut rx) = mpsc::unbounded_channel::<Posted>();
    let sent = send(env, "in-flight", orders, Pacing::Flood(concurrency), tx, deadline).await;
    let mut ids = Vec::with_capacity(n);
    while let Ok(p) = rx.try_recv() {
        ids.push(p.saga_id);
    }
    let sent = match sent {
        Ok(s) => s,
        Err(e) => {
            pb.finish_and_clear();
            return Err(e);
        }
    };
    let accept_secs = paused_at.elapsed().as_secs_f64();
    pb.set_message("waiting for the outbox to drain");
    let pool = env.coordinator_pool()?;
    let mut queries = 0u64;
    loop {
        queries += 1;
        let empty: bool = sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM outbox)")
            .fetch_one(&pool)
            .await
            .context("reading the coordinator's outbox")?;
        if empty {
            break;
        }
        env.check_children()?;
        if tokio::time::Instant::now() >= deadline || env.stop.is_cancelled() {
            pb.finish_and_clear();
            bail!(
                "in-flight: the coordinator's outbox did not drain within --timeout-secs {}",
                env.timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let relayed_secs = paused_at.elapsed().as_secs_f64();
    let mem = procfs::memory(coordinator_pid).context("coordinator memory")?;
    env.signal_participants(libc::SIGCONT)?;
    let resumed_at = Instant::now();
    let participants_paused_secs = resumed_at.duration_since(paused_at).as_secs_f64();
    // No more posts: a receiver whose sender is gone.
    let rx = mpsc::unbounded_channel::<Posted>().1;
    let mut tracker = Tracker::new(pool, rx, pb.clone());
    tracker.add(&ids);
    let tracked = tracker.run(env, deadline).await;
    pb.finish_and_clear();
    tracker.pool.close().await;
    tracked?;
    let drain_secs = resumed_at.elapsed().as_secs_f64();
    let report = InFlightReport {
        sagas: n,
        accept_secs: round3(accept_secs),
        accept_rate: round1(n as f64 / accept_secs.max(1e-9)),
        relayed_secs: round3(relayed_secs),
        coordinator_rss_mib: mib(mem.rss_kib),
        coordinator_peak_rss_mib: mib(mem.hwm_kib),
        participants_paused_secs: round3(participants_paused_secs),
        drain_secs: round3(drain_secs),
        drain_sagas_per_sec: round1(n as f64 / drain_secs.max(1e-9)),
    };
    let load = Load {
        saga_ids: ids,
        post_latencies: sent.latencies,
        post_rate: sent.rate,
        bench_queries: queries + tracker.queries,
    };
    Ok((load, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_figures_are_per_saga_and_see_a_checkpoint_end() {
        let before = Wal {
            bytes: 10 * 1024 * 1024,
            full_page_images: 100,
            syncs: 5_000,
            checkpoints: 7,
            last_checkpoint: "0/1000000".to_owned(),
        };
        let after = Wal {
            bytes: 30 * 1024 * 1024,
            full_page_images: 150,
            syncs: 6_000,
            checkpoints: 8,
            last_checkpoint: "0/2000000".to_owned(),
        };
        let r = before.report(&after, 1_000.0);
        assert_eq!(r.kib_per_saga, 20.48);
        assert_eq!(r.full_page_images_per_saga, 0.05);
        assert_eq!(r.syncs_per_saga, 1.0);
        assert_eq!(r.checkpoints_begun, 1);
        assert!(r.checkpoint_ended);
        let quiet = before.report(&before.clone(), 1_000.0);
        assert_eq!((quiet.checkpoints_begun, quiet.checkpoint_ended), (0, false));
    }

    #[test]
    fn fixed_rate_summary_keeps_each_run_and_takes_medians() {
        let s = FixedRateSummary::of(369.96, &[(125.0, 208.0), (155.0, 275.0), (99.0, 168.0)]);
        assert_eq!(s.rate, 370.0);
        assert_eq!(s.runs, 3);
        assert_eq!(s.p99_ms, [208.0, 275.0, 168.0], "in run order");
        assert_eq!(s.median_p99_ms, 208.0);
        assert_eq!(s.median_p50_ms, 125.0);
        let even = FixedRateSummary::of(100.0, &[(10.0, 40.0), (20.0, 60.0)]);
        assert_eq!(even.median_p99_ms, 50.0, "the mean of the two middle runs");
        assert_eq!(FixedRateSummary::of(1.0, &[]).median_p99_ms, 0.0);
    }
}
