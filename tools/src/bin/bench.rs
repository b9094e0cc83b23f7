//! The benchmark: starts Skald's release binaries as child processes (one
//! coordinator, one participant of each kind) on databases, a RabbitMQ vhost
//! and a Redis prefix of its own; measures a bare PostgreSQL baseline;
//! optionally preloads finished sagas; then runs a warm-up, a saturating
//! closed-loop phase, a fixed-rate open-loop phase and optionally an
//! in-flight phase, checks the invariants and reports every figure.
//!
//! Human-readable output goes to stderr; the last line on stdout is one JSON
//! object with every figure (`bench | tail -1 | jq`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use serde_json::{Value, json};
use skald_participants::verify;
use skald_tools::bench::baseline::{self, Baseline};
use skald_tools::bench::curve::{Curve, CurvePoint, SweepRate};
use skald_tools::bench::deploy::{self, Deployment, MANAGED_ENV, Settings};
use skald_tools::bench::phase::{self, Env, FixedRateSummary, Measure, Pacing, PhaseKind, PhaseReport};
use skald_tools::bench::preload::{self, PreloadReport};
use skald_tools::bench::procfs::Machine;
use skald_tools::workload::{self, Mix};
use skald_tools::{Api, report_lines};
use tokio_util::sync::CancellationToken;

/// Issue target: saturating sagas/s at least 1/16 of the baseline's best tx/s.
const TARGET_RATIO: f64 = 1.0 / 16.0;
/// Issue target: coordinator RSS with 10,000 sagas in flight.
const TARGET_IN_FLIGHT_RSS_MIB: f64 = 150.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum FailAt {
    /// Out of stock at step 3: refunded, then cancelled (the compensation path).
    Stock,
    /// Not enough balance at step 2: cancelled.
    Balance,
    /// Half of each.
    Mix,
}

#[derive(Debug, Parser, Serialize)]
#[command(
    name = "bench",
    version,
    about = "Skald benchmark: starts the release binaries next to itself as child processes on databases, \
             a RabbitMQ vhost and a Redis prefix of its own, measures a PostgreSQL baseline, runs warm-up, \
             saturating (closed-loop), fixed-rate (open-loop) and optional in-flight phases, checks the invariants",
    after_help = "OUTPUT: tables and progress go to stderr; the last line on stdout is one JSON object with \
                  every figure and setting (`bench | tail -1 | jq .`). --json PATH also writes it to a file. \
                  Exit status: 0 when every phase finished and every invariant holds, 1 otherwise, 130 when interrupted.\n\n\
                  Build first: cargo build --release -p skald-tools -p skald-coordinator -p skald-participants"
)]
struct Args {
    /// Orders of the saturating closed-loop phase (0 skips it).
    #[arg(long, default_value_t = 10000)]
    orders: usize,
    /// Orders in flight at once in the closed-loop phases (a new one is posted
    /// when one is final). Throughput rises with it up to about 1,000 here
    /// (batches grow with the backlog): 256 gives about 400 sagas/s.
    #[arg(long, default_value_t = 1024)]
    concurrency: usize,
    /// Orders of the warm-up (closed loop at --concurrency; 0 skips it).
    #[arg(long, default_value_t = 1000)]
    warmup: usize,
    /// Orders per second of the fixed-rate phase [default: half the saturating rate just measured].
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of the fixed-rate phase (0 skips it).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Fixed-rate phases to run back to back at the same rate; the report
    /// gives each one and the median of their p50 and p99 (the figure to
    /// track on a machine whose speed moves from run to run).
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// A latency curve: after the fixed-rate phase, one fixed-rate phase of
    /// --duration at each of these rates, as orders/s (300) or as a share
    /// of the saturating rate (25%), e.g. --sweep 12.5%,25%,37.5%. The
    /// report gives each one's p50, p99, machine CPU per saga and context
    /// switches per saga, and the highest rate whose p99 was under
    /// --p99-limit-ms.
    #[arg(long, value_delimiter = ',', value_name = "RATES")]
    sweep: Vec<SweepRate>,
    /// The p99 limit of the latency curve, in ms.
    #[arg(long, default_value_t = 100.0)]
    p99_limit_ms: f64,
    /// Share of orders that fail deterministically (0..1), spread evenly.
    #[arg(long, default_value_t = 0.0)]
    fail_share: f64,
    /// Where the failing orders fail.
    #[arg(long, value_enum, default_value_t = FailAt::Stock)]
    fail_at: FailAt,
    /// Seconds per concurrency level of the PostgreSQL baseline.
    #[arg(long, default_value_t = 3.0)]
    baseline_secs: f64,
    /// Client counts of the baseline. The default stops at 40, the bench's connection budget on the shared server.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,40")]
    baseline_levels: Vec<usize>,
    /// Skip the baseline.
    #[arg(long)]
    no_baseline: bool,
    /// Finished sagas to store before the warm-up (set-based SQL copies of real sagas).
    #[arg(long, default_value_t = 0)]
    preload: usize,
    /// Sagas per preload transaction.
    #[arg(long, default_value_t = 100_000)]
    preload_chunk: usize,
    /// Sagas of the in-flight phase (participants stopped while they are posted; 0 skips it).
    #[arg(long, default_value_t = 0)]
    in_flight: usize,
    /// POSTs at once in the in-flight phase.
    #[arg(long, default_value_t = 256)]
    in_flight_concurrency: usize,
    /// Deadline of each phase (every saga final), and of the start-up of the children.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Pause after each phase before the closing readings (PostgreSQL publishes a backend's counters about once a second).
    #[arg(long, default_value_t = 1500)]
    settle_ms: u64,
    /// Extra environment for every child, e.g. --child-env DB_POOL_SIZE=20 (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    child_env: Vec<String>,
    /// Keep the databases, vhost, Redis keys and logs at the end.
    #[arg(long)]
    keep: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Name of the databases (NAME, NAME_orders, NAME_payments, NAME_inventory), the vhost and the Redis prefix.
    #[arg(long, default_value = "skald_bench")]
    name: String,
    /// PostgreSQL server, without a database.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pg_base: String,
    /// RabbitMQ server, without a vhost.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672")]
    amqp_base: String,
    /// RabbitMQ user given permissions on the bench's vhost.
    #[arg(long, default_value = "guest")]
    rabbitmq_user: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Customers and SKUs the orders are spread over.
    #[arg(long, default_value_t = 256)]
    customers: usize,
    #[arg(long, default_value_t = 128)]
    skus: usize,
    /// Seed of the order items (random if not given).
    #[arg(long)]
    seed: Option<u64>,
}

impl Args {
    fn validate(&self) -> anyhow::Result<Vec<(String, String)>> {
        anyhow::ensure!(self.concurrency > 0, "--concurrency must be at least 1");
        anyhow::ensure!(
            self.in_flight_concurrency > 0,
            "--in-flight-concurrency must be at least 1"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.fail_share),
            "--fail-share must be between 0 and 1"
        );
        anyhow::ensure!(self.duration >= 0.0, "--duration must not be negative");
        anyhow::ensure!(self.repeats > 0, "--repeats must be at least 1");
        anyhow::ensure!(
            self.sweep.is_empty() || self.duration > 0.0,
            "--sweep needs a fixed-rate --duration above 0"
        );
        anyhow::ensure!(
            self.p99_limit_ms.is_finite() && self.p99_limit_ms > 0.0,
            "--p99-limit-ms must be positive"
        );
        anyhow::ensure!(self.rate.is_none_or(|r| r > 0.0), "--rate must be positive");
        anyhow::ensure!(self.preload_chunk > 0, "--preload-chunk must be at least 1");
        anyhow::ensure!(
            self.customers > 0 && self.skus > 0,
            "--customers and --skus must be at least 1"
        );
        anyhow::ensure!(self.timeout_secs > 0, "--timeout-secs must be at least 1");
        anyhow::ensure!(
            self.baseline_levels.iter().all(|&c| c > 0),
            "--baseline-levels must be positive"
        );
        self.child_env
            .iter()
            .map(|kv| {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("--child-env {kv:?}: expected KEY=VALUE"))?;
                anyhow::ensure!(
                    !MANAGED_ENV.contains(&k),
                    "--child-env {k}: the bench sets it itself (its own databases, vhost, Redis prefix and port)"
                );
                Ok((k.to_owned(), v.to_owned()))
            })
            .collect()
    }

    fn mix(&self) -> Mix {
        let (balance, stock) = match self.fail_at {
            FailAt::Stock => (0.0, self.fail_share),
            FailAt::Balance => (self.fail_share, 0.0),
            FailAt::Mix => (self.fail_share / 2.0, self.fail_share / 2.0),
        };
        Mix {
            customers: self.customers,
            skus: self.skus,
            fail_balance: balance,
            fail_stock: stock,
        }
    }
}

/// Everything measured; printed as JSON at the end (also when the run fails half-way).
#[derive(Debug, Default, Serialize)]
struct Report {
    ok: bool,
    error: Option<String>,
    run_id: String,
    started_at: String,
    settings: Value,
    machine: Value,
    baseline: Option<Baseline>,
    preload: Option<PreloadReport>,
    phases: Vec<PhaseReport>,
    /// Sagas/s of the saturating phase.
    saturating_sagas_per_sec: Option<f64>,
    /// Saturating sagas/s divided by the baseline's best tx/s.
    baseline_ratio: Option<f64>,
    /// The fixed-rate phases' latencies, and their medians.
    fixed_rate: Option<FixedRateSummary>,
    /// The `--sweep` phases, with the main fixed-rate phases' first run.
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_curve: Option<Curve>,
    target_ratio: f64,
    in_flight_target_rss_mib: f64,
    invariants: Option<Value>,
    shutdown: Vec<String>,
    total_secs: f64,
    notes: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let _telemetry = skald_wire::telemetry::init("skald-bench", "warn");
    let child_env = match args.validate() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let stop = CancellationToken::new();
    tokio::spawn(skald_wire::shutdown::cancel_on_signal(stop.clone()));
    let started = Instant::now();
    let mut report = Report {
        run_id: format!("{:06x}", rand::random::<u32>() & 0xff_ffff),
        started_at: chrono::Utc::now().to_rfc3339(),
        settings: serde_json::to_value(&args).unwrap_or(Value::Null),
        target_ratio: TARGET_RATIO,
        in_flight_target_rss_mib: TARGET_IN_FLIGHT_RSS_MIB,
        ..Report::default()
    };
    let settings = match settings(&args, child_env, &report.run_id) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mut deployment: Option<Deployment> = None;
    let result = run(&args, &settings, &stop, &mut deployment, &mut report).await;

    // Stop the children and remove what the bench created, whatever happened.
    if let Some(mut d) = deployment.take() {
        eprintln!("stopping the children (SIGTERM) ...");
        report.shutdown = d.stop(Duration::from_secs(20)).await;
        for line in &report.shutdown {
            eprintln!("bench: {line}");
        }
    }
    let failed = result.is_err() || !report.shutdown.is_empty() || !report.ok;
    if args.keep {
        eprintln!(
            "kept: databases {}, vhost {}, Redis prefix {}, logs in {}",
            settings.db_names().join(", "),
            settings.name,
            settings.redis_prefix(),
            settings.log_dir.display()
        );
    } else {
        if let Err(e) = deploy::remove(&settings).await {
            eprintln!("bench: cleaning up: {e:#}");
        }
        if failed {
            eprintln!("logs of the children: {}", settings.log_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&settings.log_dir);
        }
    }
    report.total_secs = round3(started.elapsed().as_secs_f64());
    let code = match &result {
        Err(e) => {
            report.error = Some(skald_tools::one_line(&format!("{e:#}")));
            report.ok = false;
            eprintln!("bench: {e:#}");
            if stop.is_cancelled() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
        Ok(()) if report.ok && report.shutdown.is_empty() => ExitCode::SUCCESS,
        Ok(()) => {
            report.ok = false;
            ExitCode::FAILURE
        }
    };
    let json = serde_json::to_string(&report)
        .unwrap_or_else(|e| json!({"ok": false, "error": format!("serializing the report: {e}")}).to_string());
    if let Some(path) = &args.json
        && let Err(e) = std::fs::write(path, format!("{json}\n"))
    {
        eprintln!("bench: writing {}: {e}", path.display());
    }
    skald_tools::outln!("{json}");
    code
}

fn settings(args: &Args, child_env: Vec<(String, String)>, run_id: &str) -> anyhow::Result<Settings> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let bin_dir = exe.parent().context("the bench binary has no directory")?.to_path_buf();
    Ok(Settings {
        name: args.name.clone(),
        pg_base: args.pg_base.clone(),
        amqp_base: args.amqp_base.clone(),
        rabbitmq_user: args.rabbitmq_user.clone(),
        redis_url: args.redis_url.clone(),
        log_dir: bin_dir.join("bench-logs").join(run_id),
        bin_dir,
        child_env,
        startup_timeout: Duration::from_secs(args.timeout_secs.min(120)),
    })
}

async fn run(
    args: &Args,
    s: &Settings,
    stop: &CancellationToken,
    deployment: &mut Option<Deployment>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let machine = Machine::describe();
    let (pg, rabbit, redis) = deploy::versions(s).await;
    report.machine = json!({
        "nproc": machine.nproc,
        "memory_total_mib": machine.memory_total_mib,
        "kernel": machine.kernel,
        "cpu_model": machine.cpu_model,
        "clock_ticks_per_sec": machine.clock_ticks_per_sec,
        "postgresql": pg,
        "rabbitmq": rabbit,
        "redis": redis,
    });
    eprintln!(
        "Skald bench  run {}  {} CPUs, {} MiB, Linux {}, PostgreSQL {pg}, RabbitMQ {rabbit}, Redis {redis}",
        report.run_id, machine.nproc, machine.memory_total_mib, machine.kernel
    );
    report.notes = vec![
        "sagas/s = finished sagas / (last finished_at - first created_at), from the coordinator's sagas table".into(),
        "latency = saga created_at -> finished_at (coordinator clock); post_latency = POST /v1/orders as the bench saw it".into(),
        "messages are derived from the attempt records in the coordinator's saga state: one command per attempt, one reply per attempt that ended with a reply".into(),
        "pg_xacts = xact_commit + xact_rollback deltas of pg_stat_database over the bench's four databases, minus the bench's own queries; PostgreSQL publishes each backend's counters at most once a second (an idle one up to 10 s later), so each end of a phase is uncertain by about a second of activity".into(),
        "each phase starts after sync(2), so that data written before it (a build's binaries, an earlier phase) is not written back in the middle of it".into(),
        format!(
            "CPU = utime + stime deltas from /proc/PID/stat at {} ticks/s (sysconf); peak RSS = VmHWM after clear_refs at the phase start",
            machine.clock_ticks_per_sec
        ),
    ];

    eprintln!(
        "resetting databases {}, vhost {} and Redis prefix {} ...",
        s.db_names().join(", "),
        s.name,
        s.redis_prefix()
    );
    deploy::reset(s).await?;
    let admin = skald_wire::db::lazy_pool(&s.admin_url(), 1).context("PostgreSQL")?;

    if !args.no_baseline {
        let b = baseline::run(
            &s.db_url(""),
            &admin,
            &args.baseline_levels,
            Duration::from_secs_f64(args.baseline_secs),
            stop,
        )
        .await
        .context("baseline")?;
        print_baseline(&b);
        report.baseline = Some(b);
    }

    for warning in deploy::stale_binaries(s) {
        eprintln!("WARNING: {warning}");
        report.notes.push(format!("WARNING: {warning}"));
    }
    eprintln!("starting coordinator and participants from {} ...", s.bin_dir.display());
    let t = Instant::now();
    *deployment = Some(Deployment::start(s).await?);
    let dep = deployment.as_mut().context("deployment")?;
    eprintln!(
        "  up in {} ms: coordinator {} (pid {}), logs in {}",
        t.elapsed().as_millis(),
        dep.url,
        dep.children.first().map_or(0, |c| c.pid),
        dep.log_dir.display()
    );
    let env = Env {
        api: Api::new(&dep.url, None)?,
        coordinator_url: s.db_url(""),
        participant_urls: [("order", "orders"), ("payment", "payments"), ("inventory", "inventory")]
            .into_iter()
            .map(|(name, db)| (name.to_owned(), s.db_url(db)))
            .collect(),
        admin: admin.clone(),
        db_names: s.db_names(),
        children: dep.children.iter().map(|c| (c.name, c.pid)).collect(),
        broker_pid: skald_tools::bench::procfs::rabbitmq_pid(),
        log_dir: dep.log_dir.clone(),
        stop: stop.clone(),
        timeout: Duration::from_secs(args.timeout_secs),
        settle: Duration::from_millis(args.settle_ms),
        run_id: report.run_id.clone(),
    };
    let orders_pool = skald_wire::db::lazy_pool(&s.db_url("orders"), 1).context("orders database")?;
    let shards = preload::wait_for_shards(&orders_pool, Duration::from_secs(60)).await;
    orders_pool.close().await;
    let shards = shards?;
    let db = s.db_config(shards.shards());

    let mix = args.mix();
    if args.preload > 0 {
        eprintln!("preloading {} finished sagas ...", args.preload);
        let dbs = workload::connect_migrated(&db, 2).await?;
        let p = preload::run(&env, &dbs, args.preload, args.preload_chunk, mix, &admin).await;
        workload::close(&dbs).await;
        let p = p.context("preload")?;
        eprintln!(
            "  {} sagas in {:.1} s ({:.0}/s), VACUUM (ANALYZE) and CHECKPOINT {:.1} s; database sizes (MiB): {}",
            p.sagas,
            p.secs,
            p.sagas_per_sec,
            p.analyze_secs,
            pairs(&p.database_mib)
        );
        report.preload = Some(p);
    }

    let mut rng = StdRng::seed_from_u64(args.seed.unwrap_or_else(rand::random));
    let mut next_index = 0usize;
    let closed = |name: &'static str, n: usize| (name, n, Pacing::Closed(args.concurrency));
    let mut phases = vec![closed("warm-up", args.warmup), closed("saturate", args.orders)];
    phases.retain(|p| p.1 > 0);
    for (name, n, pacing) in phases {
        let r = run_phase(&env, s, name, n, pacing, mix, &mut rng, &mut next_index).await?;
        print_phase(&r);
        if name == "saturate" {
            report.saturating_sagas_per_sec = Some(r.sagas_per_sec);
        }
        report.phases.push(r);
    }

    let rate = args
        .rate
        .or_else(|| report.saturating_sagas_per_sec.map(|r| (r / 2.0).max(0.1)));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut curve: Vec<CurvePoint> = Vec::new();
    match rate {
        Some(rate) if args.duration > 0.0 => {
            let n = ((rate * args.duration).round() as usize).max(1);
            let pacing = Pacing::Open { rate, max_posts: 256 };
            let repeats = args.repeats;
            let mut runs = Vec::with_capacity(repeats);
            for i in 1..=repeats {
                let name = if repeats == 1 {
                    "fixed-rate".to_owned()
                } else {
                    format!("fixed-rate-{i}")
                };
                let r = run_phase(&env, s, &name, n, pacing, mix, &mut rng, &mut next_index).await?;
                print_phase(&r);
                runs.push((r.latency_ms.p50, r.latency_ms.p99));
                if i == 1 && !args.sweep.is_empty() {
                    curve.push(CurvePoint::of(rate, &r, report.saturating_sagas_per_sec, cpus));
                }
                report.phases.push(r);
            }
            let summary = FixedRateSummary::of(rate, &runs);
            if repeats > 1 {
                eprintln!();
                eprintln!(
                    "fixed rate {rate:.1} orders/s, {repeats} runs: p99 {} ms (median {:.0}), p50 median {:.0} ms",
                    summary
                        .p99_ms
                        .iter()
                        .map(|p| format!("{p:.0}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    summary.median_p99_ms,
                    summary.median_p50_ms
                );
            }
            report.fixed_rate = Some(summary);
        }
        None if args.duration > 0.0 => {
            eprintln!("fixed-rate phase skipped: no --rate and no saturating phase to take half of");
        }
        _ => {}
    }

    for point in &args.sweep {
        let Some(rate) = point.resolve(report.saturating_sagas_per_sec) else {
            eprintln!("latency curve: {point} skipped, no saturating rate to take a share of");
            continue;
        };
        let n = ((rate * args.duration).round() as usize).max(1);
        let pacing = Pacing::Open { rate, max_posts: 256 };
        let name = format!("sweep-{rate:.0}");
        let r = run_phase(&env, s, &name, n, pacing, mix, &mut rng, &mut next_index).await?;
        print_phase(&r);
        curve.push(CurvePoint::of(rate, &r, report.saturating_sagas_per_sec, cpus));
        report.phases.push(r);
    }
    if !curve.is_empty() {
        let c = Curve::new(curve, args.p99_limit_ms);
        eprintln!();
        eprint!("{}", c.table());
        report.latency_curve = Some(c);
    }

    if args.in_flight > 0 {
        let planned = workload::plan(&env.run_id, next_index, args.in_flight, mix, &mut rng);
        seed(s, &planned).await?;
        eprintln!(
            "in-flight: stopping the participants (SIGSTOP), posting {} orders ...",
            args.in_flight
        );
        let m = Measure::start(&env, "in-flight").await?;
        let (load, inf) = phase::in_flight(&env, planned.orders, args.in_flight_concurrency).await?;
        let mut r = m.finish(&env, &load, PhaseKind::InFlight).await?;
        r.in_flight = Some(inf);
        print_phase(&r);
        report.phases.push(r);
    }

    if let (Some(sat), Some(b)) = (report.saturating_sagas_per_sec, &report.baseline)
        && b.best_tx_per_sec > 0.0
    {
        let ratio = sat / b.best_tx_per_sec;
        report.baseline_ratio = Some((ratio * 10_000.0).round() / 10_000.0);
        eprintln!();
        eprintln!(
            "saturating {sat:.1} sagas/s / baseline {:.0} tx/s (at {} clients) = {ratio:.4}  (target >= {TARGET_RATIO:.4}: {})",
            b.best_tx_per_sec,
            b.best_concurrency,
            if ratio >= TARGET_RATIO { "met" } else { "NOT met" }
        );
    }

    // Invariants, over the whole of the four databases.
    eprintln!();
    eprintln!("Invariants (verify, across the four databases)");
    let dbs = workload::connect_migrated(&db, 4).await?;
    let verified = verify::verify(&dbs).await.context("verify");
    workload::close(&dbs).await;
    let verified = verified?;
    for line in report_lines(&verified, 25) {
        eprintln!("{line}");
    }
    report.invariants = Some(json!({
        "ok": verified.ok(),
        "sagas_by_status": verified.sagas_by_status,
        "orders_by_status": verified.orders_by_status,
        "charged_payments": verified.charged_payments,
        "refunded_payments": verified.refunded_payments,
        "violations": verified.violations.len(),
        "first_violations": verified.violations.iter().take(25).collect::<Vec<_>>(),
    }));
    report.ok = verified.ok();
    if !verified.ok() {
        eprintln!("FAILED: {} invariant violations", verified.violations.len());
    }
    Ok(())
}

/// Seeds with connections of its own, closed at once: a backend publishes
/// its statistics when it exits, so seeding is not counted in the next phase.
async fn seed(s: &Settings, planned: &workload::Planned) -> anyhow::Result<()> {
    let payments = skald_wire::db::lazy_pool(&s.db_url("payments"), 1).context("payments database")?;
    let inventory = skald_wire::db::lazy_pool(&s.db_url("inventory"), 1).context("inventory database")?;
    let r = planned.seed(&payments, &inventory).await;
    payments.close().await;
    inventory.close().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    r
}

#[allow(clippy::too_many_arguments)]
async fn run_phase(
    env: &Env,
    s: &Settings,
    name: &str,
    n: usize,
    pacing: Pacing,
    mix: Mix,
    rng: &mut StdRng,
    next_index: &mut usize,
) -> anyhow::Result<PhaseReport> {
    let planned = workload::plan(&env.run_id, *next_index, n, mix, rng);
    *next_index += n;
    seed(s, &planned).await?;
    let flushed = skald_tools::bench::procfs::flush_dirty_pages().await?;
    if flushed > Duration::from_millis(100) {
        eprintln!(
            "  wrote the page cache's dirty data out first (sync) in {} ms",
            flushed.as_millis()
        );
    }
    let kind = match pacing {
        Pacing::Closed(_) => PhaseKind::ClosedLoop,
        Pacing::Open { .. } => PhaseKind::OpenLoop,
        Pacing::Flood(_) => PhaseKind::InFlight,
    };
    let m = Measure::start(env, name).await?;
    let load = phase::drive(env, name, planned.orders, pacing)
        .await
        .with_context(|| format!("phase {name}"))?;
    if env.stop.is_cancelled() {
        bail!("interrupted");
    }
    m.finish(env, &load, kind).await
}

/// `k1 v1, k2 v2, ...`
fn pairs<V: std::fmt::Display>(map: &std::collections::BTreeMap<String, V>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn print_baseline(b: &Baseline) {
    eprintln!();
    eprintln!("Baseline: {} — {} s per level", b.transaction, b.secs_per_level);
    for l in &b.levels {
        match &l.skipped {
            Some(why) => eprintln!("  {:>4} clients  skipped: {why}", l.concurrency),
            None => eprintln!(
                "  {:>4} clients  {:>8.0} tx/s  ({} transactions)",
                l.concurrency, l.tx_per_sec, l.transactions
            ),
        }
    }
    eprintln!("  best {:.0} tx/s at {} clients", b.best_tx_per_sec, b.best_concurrency);
}

fn print_phase(r: &PhaseReport) {
    let kind = match r.kind {
        PhaseKind::ClosedLoop => "closed loop".to_owned(),
        PhaseKind::OpenLoop => format!("open loop, {:.1} orders/s posted", r.post_rate.unwrap_or(0.0)),
        PhaseKind::InFlight => "posted with the participants stopped, then drained".to_owned(),
    };
    eprintln!();
    eprintln!(
        "Phase {} ({kind}): {} orders, {} final ({} completed, {} compensated, {} stuck) in {:.2} s",
        r.name, r.orders, r.finished, r.completed, r.compensated, r.stuck, r.window_secs
    );
    let w = 34;
    eprintln!("  {:<w$}{:.1}", "sagas/s", r.sagas_per_sec);
    eprintln!(
        "  {:<w$}{:.0} / {:.0} / {:.0} / {:.0} ms",
        "latency p50 / p95 / p99 / max", r.latency_ms.p50, r.latency_ms.p95, r.latency_ms.p99, r.latency_ms.max
    );
    eprintln!(
        "  {:<w$}{:.1} / {:.1} ms",
        "POST latency p50 / p99", r.post_latency_ms.p50, r.post_latency_ms.p99
    );
    eprintln!("  {:<w$}{:.1} %", "compensated", r.compensated_share * 100.0);
    eprintln!(
        "  {:<w$}{:.0}/s ({} commands + {} replies, {:.2} per saga, {} retries)",
        "messages", r.messages_per_sec, r.commands, r.replies, r.messages_per_saga, r.retries
    );
    eprintln!(
        "  {:<w$}{:.2} per saga ({} in {:.1} s; {})",
        "PostgreSQL transactions",
        r.pg_xacts_per_saga,
        r.pg_xacts,
        r.measured_secs,
        pairs(&r.pg_xacts_by_db)
    );
    if let Some(wal) = &r.wal {
        let checkpoint = match (wal.checkpoints_begun, wal.checkpoint_ended) {
            (0, false) => "no checkpoint".to_owned(),
            (0, true) => "a checkpoint ended in it".to_owned(),
            (n, ended) => format!(
                "{n} checkpoint(s) begun in it{}",
                if ended { ", one ended" } else { "" }
            ),
        };
        eprintln!(
            "  {:<w$}{:.1} KiB, {:.2} full-page images, {:.2} flushes per saga; {checkpoint}",
            "WAL (whole server)", wal.kib_per_saga, wal.full_page_images_per_saga, wal.syncs_per_saga
        );
    }
    eprintln!(
        "  {:<w$}{:.0} %",
        "machine CPU busy (all processes)",
        r.machine_cpu_busy * 100.0
    );
    let pressure = r
        .machine_cpu_pressure
        .map_or("-".to_owned(), |p| format!("{:.0} %", p * 100.0));
    eprintln!(
        "  {:<w$}{} of the time (context switches: {:.0} per saga)",
        "some task waiting for a CPU", pressure, r.machine_switches_per_saga
    );
    eprintln!(
        "  {:<20}{:>9}{:>13}{:>8}{:>14}{:>10}{:>19}{:>15}",
        "process", "CPU s", "CPU ms/saga", "cores", "peak RSS MiB", "RSS MiB", "run-queue ms/saga", "switches/saga"
    );
    let mib = |m: Option<f64>| m.map_or("-".to_owned(), |m| format!("{m:.1}"));
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    for p in &r.processes {
        let name = if p.name == phase::POSTGRES_BACKENDS {
            "postgres backends"
        } else {
            &p.name
        };
        eprintln!(
            "  {:<20}{:>9.2}{:>13.2}{:>8.2}{:>14}{:>10}{:>19}{:>15}",
            name,
            p.cpu_secs,
            p.cpu_ms_per_saga,
            p.cores_busy,
            mib(p.peak_rss_mib),
            mib(p.rss_mib),
            opt(p.runq_wait_ms_per_saga, 2),
            opt(p.switches_per_saga, 1)
        );
    }
    if !r.legs.is_empty() {
        eprintln!(
            "  {:<28}{:>6}{:>24}{:>20}",
            "step legs (ms)", "steps", "to participant p50/p99", "back p50/p99"
        );
        for l in &r.legs {
            eprintln!(
                "  {:<28}{:>6}{:>24}{:>20}",
                format!("{} ({})", l.step, l.participant),
                l.count,
                format!("{:.1} / {:.1}", l.to_participant_ms.p50, l.to_participant_ms.p99),
                format!("{:.1} / {:.1}", l.back_ms.p50, l.back_ms.p99)
            );
        }
    }
    if let Some(f) = &r.in_flight {
        eprintln!(
            "  {} orders accepted in {:.1} s ({:.0}/s); outbox relayed after {:.1} s",
            f.sagas, f.accept_secs, f.accept_rate, f.relayed_secs
        );
        eprintln!(
            "  coordinator with {} sagas in flight: RSS {:.1} MiB, peak {:.1} MiB (target < {TARGET_IN_FLIGHT_RSS_MIB} MB at 10,000: {})",
            f.sagas,
            f.coordinator_rss_mib,
            f.coordinator_peak_rss_mib,
            if f.coordinator_peak_rss_mib * 1.048_576 < TARGET_IN_FLIGHT_RSS_MIB {
                "met"
            } else {
                "NOT met"
            }
        );
        eprintln!(
            "  participants stopped for {:.1} s; drained in {:.1} s after SIGCONT ({:.0} sagas/s)",
            f.participants_paused_secs, f.drain_secs, f.drain_sagas_per_sec
        );
    }
}
