//! The demo: starts Skald in-process (or uses a running coordinator with
//! `--url`), seeds customers and SKUs unique to this run, sends orders
//! through the HTTP API with bounded concurrency, shows progress, prints a
//! summary, and checks the invariants across the four databases.
//!
//! The mix: most orders succeed; `--fail-balance` of them come from a
//! customer with no money (they fail at step 2, charge_payment);
//! `--fail-stock` of them are for a SKU with no stock but from a rich
//! customer (they fail at step 3, reserve_stock, and are refunded).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Parser;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::Value;
use skald_participants::app::{Participant, Which};
use skald_participants::verify;
use skald_tools::workload::{self, Mix, Plan, PlannedOrder, ms, percentile, retry_until, sleep_until_or_stop};
use skald_tools::{Api, DbConfig, outln, print_report};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "demo",
    version,
    about = "Skald demo: starts Skald in-process (or uses --url), drives orders through the API, prints a summary and checks the invariants"
)]
struct Args {
    /// Orders to send.
    #[arg(long, default_value_t = 300)]
    orders: usize,
    /// Orders in flight at once (sent and not yet finished).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Share of orders from a customer with too little balance (fail at step 2).
    #[arg(long, default_value_t = 0.1)]
    fail_balance: f64,
    /// Share of orders for a SKU with no stock, from a rich customer (fail at step 3, refunded).
    #[arg(long, default_value_t = 0.1)]
    fail_stock: f64,
    /// Seed of the order mix (random if not given).
    #[arg(long)]
    seed: Option<u64>,
    /// Base URL of a running coordinator; if given, nothing is started here.
    #[arg(long)]
    url: Option<String>,
    /// Seconds for every order to finish, from the first one sent.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    #[command(flatten)]
    db: DbConfig,
}

/// How one order ended.
struct Finished {
    plan: Plan,
    order_id: Uuid,
    /// `None` if it did not finish before the deadline.
    result: Option<Outcome>,
}

struct Outcome {
    /// The plan it actually followed, judged from its status and failure.
    actual: Option<Plan>,
    failure: Option<String>,
    latency: Option<Duration>,
    /// Attempts beyond the first, over every step's action and compensation.
    retries: usize,
}

const CUSTOMERS: usize = 16;
const SKUS: usize = 24;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let telemetry = skald_wire::telemetry::init("skald-demo", "warn");
    let code = match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("demo: {}", skald_tools::one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    };
    // Flushing spans blocks: not on a runtime worker.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    code
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.orders > 0, "--orders must be at least 1");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let shares_ok = (0.0..=1.0).contains(&args.fail_balance)
        && (0.0..=1.0).contains(&args.fail_stock)
        && args.fail_balance + args.fail_stock <= 1.0;
    anyhow::ensure!(
        shares_ok,
        "--fail-balance and --fail-stock must be between 0 and 1, and add up to at most 1"
    );

    let stop = CancellationToken::new();
    tokio::spawn(skald_wire::shutdown::cancel_on_signal(stop.clone()));

    // Start (or find) Skald.
    let started = Instant::now();
    let local = match &args.url {
        Some(_) => None,
        None => Some(Local::start(&args.db).await?),
    };
    let base = match (&args.url, &local) {
        (Some(url), _) => url.clone(),
        (None, Some(l)) => l.url.clone(),
        (None, None) => unreachable!("started above"),
    };
    let result = drive(&args, &base, &stop, local.is_some().then(|| started.elapsed())).await;
    if let Some(local) = local {
        local.stop().await;
    }
    result
}

async fn drive(
    args: &Args,
    base: &str,
    stop: &CancellationToken,
    startup: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let api = Api::new(base, None)?;
    let mut up = api.get("/healthz").await;
    for _ in 0..5 {
        match &up {
            Err(e) if e.is_transient() => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                up = api.get("/healthz").await;
            }
            _ => break,
        }
    }
    up.context("coordinator not healthy")?;
    let dbs = workload::connect_migrated(&args.db, 4).await?;

    // Plan the orders and seed exactly what they need.
    let run_id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let mix = Mix {
        customers: CUSTOMERS,
        skus: SKUS,
        fail_balance: args.fail_balance,
        fail_stock: args.fail_stock,
    };
    let planned = workload::plan(&run_id, 0, args.orders, mix, &mut rng);
    planned.seed(&dbs.payments, &dbs.inventory).await?;
    let orders = planned.orders;

    outln!();
    outln!(
        "Skald demo   run {run_id}   seed {seed}   {} orders   concurrency {}",
        args.orders,
        args.concurrency
    );
    match startup {
        Some(t) => outln!(
            "coordinator and participants started in-process at {base} in {} ms",
            t.as_millis()
        ),
        None => outln!("using the coordinator at {base}"),
    }
    outln!(
        "seeded {} customers and {} SKUs (plus customer {run_id}-poor with no money and SKU {run_id}-scarce with no stock)",
        CUSTOMERS,
        SKUS
    );
    outln!();

    // Send them, bounded, and wait for each to finish.
    let pb = ProgressBar::new(orders.len() as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} [{bar:40}] {pos}/{len} finished  {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.enable_steady_tick(Duration::from_millis(100));
    let counters = Arc::new(Counters::default());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let sent_at = Instant::now();
    let finished: Vec<Finished> = futures::stream::iter(orders)
        .map(|o| {
            let (api, pb, counters, run_id) = (&api, pb.clone(), counters.clone(), &run_id);
            async move {
                let f = one_order(api, run_id, o, deadline, stop).await;
                counters.record(&f);
                pb.set_message(counters.message());
                pb.inc(1);
                f
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let elapsed = sent_at.elapsed();
    pb.finish_and_clear();

    // Summary.
    let order_ids: Vec<Uuid> = finished.iter().map(|f| f.order_id).filter(|id| !id.is_nil()).collect();
    let refunds: i64 =
        sqlx::query_scalar("SELECT count(*) FROM payments WHERE status = 'REFUNDED' AND order_id = ANY($1)")
            .bind(&order_ids)
            .fetch_one(&dbs.payments)
            .await
            .context("payments database")?;
    let unfinished = summarize(&finished, refunds, elapsed);
    outln!();
    let code = if stop.is_cancelled() {
        outln!("INTERRUPTED: {unfinished} orders unfinished; not checking the invariants (the system is not quiet)");
        ExitCode::from(130)
    } else {
        // Invariants, over the whole databases.
        outln!("Invariants (verify, across the four databases)");
        let report = verify::verify(&dbs).await.context("verify")?;
        print_report(&report, 25);
        outln!();
        if unfinished > 0 {
            outln!(
                "FAILED: {unfinished} orders did not finish within {} s",
                args.timeout_secs
            );
        }
        if !report.ok() {
            outln!("FAILED: {} invariant violations", report.violations.len());
        }
        if unfinished == 0 && report.ok() {
            outln!("OK: every order finished and every invariant holds");
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    };
    workload::close(&dbs).await;
    Ok(code)
}

/// Sends one order (retrying transient failures: the idempotency key makes
/// that safe) and polls it until it is APPROVED or CANCELLED, or the deadline.
async fn one_order(
    api: &Api,
    run_id: &str,
    order: PlannedOrder,
    deadline: tokio::time::Instant,
    stop: &CancellationToken,
) -> Finished {
    let mut finished = Finished {
        plan: order.plan,
        order_id: Uuid::nil(),
        result: None,
    };
    if stop.is_cancelled() {
        return finished;
    }
    let key = format!("demo-{run_id}-{}", order.index);
    let created = retry_until(deadline, stop, || api.create_order(&order.body, &key))
        .await
        .ok();
    let Some(created) = created else { return finished };
    let id = |k: &str| {
        created
            .get(k)
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
    };
    let (Some(order_id), Some(saga_id)) = (id("order_id"), id("saga_id")) else {
        return finished;
    };
    finished.order_id = order_id;

    let mut interval = Duration::from_millis(25);
    let order_path = format!("/v1/orders/{order_id}");
    let status = loop {
        let current = retry_until(deadline, stop, || api.get(&order_path)).await.ok();
        let Some(current) = current else { return finished };
        if let Some(s @ ("APPROVED" | "CANCELLED")) = current.get("status").and_then(Value::as_str) {
            break s.to_owned();
        }
        if !sleep_until_or_stop(interval, deadline, stop).await {
            return finished;
        }
        interval = (interval * 3 / 2).min(Duration::from_millis(250));
    };

    let saga_path = format!("/v1/sagas/{saga_id}");
    let saga = retry_until(deadline, stop, || api.get(&saga_path)).await.ok();
    let failure = saga
        .as_ref()
        .and_then(|s| s.get("failure"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let time = |k: &str| {
        saga.as_ref()
            .and_then(|s| s.get(k))
            .and_then(Value::as_str)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    let latency = match (time("created_at"), time("finished_at")) {
        (Some(a), Some(b)) => (b - a).to_std().ok(),
        _ => None,
    };
    let actual = match (status.as_str(), failure.as_deref()) {
        ("APPROVED", _) => Some(Plan::Approve),
        (_, Some(f)) if f.starts_with("charge_payment:") && f.contains("insufficient_balance") => Some(Plan::NoBalance),
        (_, Some(f)) if f.starts_with("reserve_stock:") && f.contains("insufficient_stock") => Some(Plan::NoStock),
        _ => None,
    };
    let retries = saga
        .as_ref()
        .and_then(|s| s.get("steps"))
        .and_then(Value::as_array)
        .map(|steps| {
            let extra = |s: &Value, k: &str| {
                s.get(k)
                    .and_then(Value::as_array)
                    .map_or(0, |a| a.len().saturating_sub(1))
            };
            steps
                .iter()
                .map(|s| extra(s, "attempts") + extra(s, "compensations"))
                .sum()
        })
        .unwrap_or(0);
    finished.result = Some(Outcome {
        actual,
        failure,
        latency,
        retries,
    });
    finished
}

#[derive(Default)]
struct Counters {
    approved: AtomicU64,
    cancelled: AtomicU64,
    unfinished: AtomicU64,
}

impl Counters {
    fn record(&self, f: &Finished) {
        let c = match &f.result {
            Some(Outcome {
                actual: Some(Plan::Approve),
                ..
            }) => &self.approved,
            Some(_) => &self.cancelled,
            None => &self.unfinished,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn message(&self) -> String {
        let mut m = format!(
            "approved {}  cancelled {}",
            self.approved.load(Ordering::Relaxed),
            self.cancelled.load(Ordering::Relaxed)
        );
        let u = self.unfinished.load(Ordering::Relaxed);
        if u > 0 {
            m.push_str(&format!("  unfinished {u}"));
        }
        m
    }
}

/// Prints the summary table; returns the number of unfinished orders.
fn summarize(finished: &[Finished], refunds: i64, elapsed: Duration) -> usize {
    let mut planned: BTreeMap<Plan, usize> = BTreeMap::new();
    let mut actual: BTreeMap<Plan, usize> = BTreeMap::new();
    let mut other = 0usize;
    let mut unfinished = 0usize;
    let mut off_plan = 0usize;
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut latencies: Vec<Duration> = Vec::new();
    let mut retries = 0usize;
    for f in finished {
        *planned.entry(f.plan).or_default() += 1;
        let Some(o) = &f.result else {
            unfinished += 1;
            continue;
        };
        match o.actual {
            Some(p) => *actual.entry(p).or_default() += 1,
            None => other += 1,
        }
        if o.actual != Some(f.plan) {
            off_plan += 1;
        }
        if o.actual != Some(Plan::Approve) {
            *reasons
                .entry(o.failure.clone().unwrap_or_else(|| "(no failure recorded)".to_owned()))
                .or_default() += 1;
        }
        latencies.extend(o.latency);
        retries += o.retries;
    }
    latencies.sort();
    let done = finished.len() - unfinished;

    let w = 46;
    outln!("  {:<w$}{:>9}{:>9}", "outcome", "planned", "actual");
    for p in Plan::ALL {
        let a = actual.get(&p).copied().unwrap_or(0);
        outln!(
            "  {:<w$}{:>9}{:>9}",
            p.label(),
            planned.get(&p).copied().unwrap_or(0),
            a
        );
    }
    outln!("  {:<w$}{:>9}{:>9}", "cancelled: other reason", 0, other);
    outln!("  {:<w$}{:>9}{:>9}", "unfinished", 0, unfinished);
    if off_plan > 0 {
        outln!("  ({off_plan} finished orders ended otherwise than planned)");
    }
    if !reasons.is_empty() {
        outln!();
        outln!("  cancellation reasons (saga failure)");
        for (r, n) in &reasons {
            outln!("    {:<w$}{:>7}", r, n, w = w + 4);
        }
    }
    outln!();
    outln!("  {:<w$}{}", "refunds (payments REFUNDED)", refunds);
    outln!("  {:<w$}{}", "retries (attempts after the first)", retries);
    match (percentile(&latencies, 50.0), percentile(&latencies, 99.0)) {
        (Some(p50), Some(p99)) => outln!(
            "  {:<w$}{} / {} / {}",
            "latency p50 / p99 / max (created -> done)",
            ms(p50),
            ms(p99),
            ms(*latencies.last().expect("not empty"))
        ),
        _ => outln!("  {:<w$}n/a", "latency p50 / p99"),
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    outln!(
        "  {:<w$}{:.1} orders/s ({done} finished in {:.2} s)",
        "throughput",
        done as f64 / secs,
        secs
    );
    unfinished
}

/// The coordinator and the three participants, running in this process.
struct Local {
    url: String,
    token: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Local {
    /// The servers' own settings (environment), with the databases the demo checks.
    async fn start(db: &DbConfig) -> anyhow::Result<Self> {
        let mut config = skald_coordinator::Config::parse_from(["coordinator"]);
        if std::env::var_os("HTTP_ADDR").is_none() {
            config.http_addr = "127.0.0.1:0".parse().expect("valid address");
        }
        config.database_url = db.database_url.clone();
        let mut pconfig = skald_participants::app::Config::local();
        pconfig.orders_database_url = db.orders_database_url.clone();
        pconfig.orders_database_urls = db.orders_database_urls.clone();
        pconfig.payments_database_url = db.payments_database_url.clone();
        pconfig.inventory_database_url = db.inventory_database_url.clone();
        pconfig.order_shards = db.order_shards;
        // Three participants in one process: any free port each (HTTP_ADDR is the coordinator's here).
        pconfig.http_addr = Some("127.0.0.1:0".parse().expect("valid address"));
        let (app, order, payment, inventory) = tokio::try_join!(
            async {
                skald_coordinator::Application::build(config)
                    .await
                    .context("coordinator")
            },
            async {
                Participant::build(Which::Order, &pconfig)
                    .await
                    .context("order participant")
            },
            async {
                Participant::build(Which::Payment, &pconfig)
                    .await
                    .context("payment participant")
            },
            async {
                Participant::build(Which::Inventory, &pconfig)
                    .await
                    .context("inventory participant")
            },
        )?;
        let addr = app.local_addr().context("coordinator address")?;
        let token = CancellationToken::new();
        let mut tasks = Vec::new();
        let t = token.clone();
        tasks.push((
            "coordinator",
            tokio::spawn(async move {
                if let Err(e) = app.run_until_stopped(t).await {
                    eprintln!("demo: coordinator: {e:#}");
                }
            }),
        ));
        for (name, p) in [("order", order), ("payment", payment), ("inventory", inventory)] {
            tasks.push((name, tokio::spawn(p.run(token.clone()))));
        }
        Ok(Self {
            url: format!("http://{addr}"),
            token,
            tasks,
        })
    }

    /// Cancels everything and waits for it to drain (bounded).
    async fn stop(self) {
        self.token.cancel();
        for (name, task) in self.tasks {
            match tokio::time::timeout(Duration::from_secs(20), task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("demo: {name} task failed: {e}"),
                Err(_) => eprintln!("demo: {name} did not stop within 20 s"),
            }
        }
    }
}
