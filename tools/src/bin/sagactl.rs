//! `sagactl`: Skald's operator CLI. Lists, shows, retries and aborts sagas
//! through the coordinator's HTTP API; counts sagas and verifies the
//! cross-service invariants directly in the databases.

use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use serde_json::Value;
use skald_engine::SagaStatus;
use skald_tools::{Api, DbConfig, one_line, outln, print_report};

#[derive(Debug, Parser)]
#[command(
    name = "sagactl",
    version,
    about = "Skald operator CLI: list, show, retry and abort sagas; stats; verify invariants"
)]
struct Cli {
    /// Base URL of a coordinator.
    #[arg(long, global = true, env = "SKALD_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Bearer token for `retry` and `abort` (the coordinator's ADMIN_TOKEN).
    #[arg(long, global = true, env = "ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List sagas, newest last (by id), optionally of one status.
    List {
        /// RUNNING, COMPENSATING, COMPLETED, COMPENSATED or STUCK.
        #[arg(long)]
        status: Option<String>,
        /// At most this many (1-500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue after this saga id (the `next` printed by a previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Show a saga (or the saga of an order): its steps and a timeline of every attempt.
    Show { id: String },
    /// Retry a STUCK saga's compensation (or a failed step), as an operator.
    Retry { id: String },
    /// Abort a running saga: it compensates what may have run.
    Abort { id: String },
    /// Count sagas by status (reads the coordinator's database, DATABASE_URL).
    Stats {
        #[command(flatten)]
        db: DbConfig,
    },
    /// The dead-letter queue: `dlq list`, `dlq replay MESSAGE_ID`.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
        /// RabbitMQ.
        #[arg(
            long,
            env = "AMQP_URL",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
            hide_env_values = true
        )]
        amqp_url: String,
    },
    /// Check the invariants across the four databases; exit 1 on any violation.
    Verify {
        #[command(flatten)]
        db: DbConfig,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// Show dead letters (oldest first) with the reason; they stay in the queue.
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Re-send one dead letter to where it was first published, and remove it.
    Replay { message_id: String },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sagactl: {}", one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let api = Api::new(&cli.url, cli.admin_token.clone())?;
    match cli.command {
        Command::List { status, limit, after } => list(&api, status, limit, after).await?,
        Command::Show { id } => show(&api, &id).await?,
        Command::Retry { id } => operate(&api, &id, "retry").await?,
        Command::Abort { id } => operate(&api, &id, "abort").await?,
        Command::Stats { db } => stats(&db).await?,
        Command::Dlq { action, amqp_url } => dlq(&amqp_url, action).await?,
        Command::Verify { db, json } => return verify(&db, json).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(api: &Api, status: Option<String>, limit: u32, after: Option<String>) -> anyhow::Result<()> {
    let mut query = format!("/v1/sagas?limit={limit}");
    if let Some(s) = status {
        let s = s.to_ascii_uppercase();
        s.parse::<SagaStatus>().map_err(anyhow::Error::msg)?;
        query.push_str(&format!("&status={s}"));
    }
    if let Some(a) = after {
        query.push_str(&format!("&after={a}"));
    }
    let page = api.get(&query).await?;
    let sagas = page.get("sagas").and_then(Value::as_array).cloned().unwrap_or_default();
    if sagas.is_empty() {
        outln!("no sagas");
        return Ok(());
    }
    outln!(
        "{:<36}  {:<12}  {:<23}  {:>10}  FAILURE",
        "SAGA",
        "STATUS",
        "CREATED",
        "DURATION"
    );
    for s in &sagas {
        let created = time(s, "created_at");
        let duration = match (created, time(s, "finished_at")) {
            (Some(a), Some(b)) => ms(b - a),
            _ => "-".to_owned(),
        };
        outln!(
            "{:<36}  {:<12}  {:<23}  {:>10}  {}",
            text(s, "saga_id"),
            text(s, "status"),
            created.map_or_else(|| "-".to_owned(), fmt_time),
            duration,
            s.get("failure").and_then(Value::as_str).unwrap_or("")
        );
    }
    if let Some(next) = page.get("next").and_then(Value::as_str) {
        outln!("more: --after {next}");
    }
    Ok(())
}

/// The saga, by saga id or else by order id.
async fn fetch_saga(api: &Api, id: &str) -> anyhow::Result<Value> {
    match api.get(&format!("/v1/sagas/{id}")).await {
        Ok(s) => Ok(s),
        Err(e) if e.is_not_found() => match api.get(&format!("/v1/orders/{id}")).await {
            Ok(order) => {
                let saga_id = text(&order, "saga_id");
                Ok(api.get(&format!("/v1/sagas/{saga_id}")).await?)
            }
            Err(_) => Err(anyhow::anyhow!("no saga or order {id}")),
        },
        Err(e) => Err(e.into()),
    }
}

async fn show(api: &Api, id: &str) -> anyhow::Result<()> {
    let saga = fetch_saga(api, id).await?;
    let created = time(&saga, "created_at");
    let finished = time(&saga, "finished_at");
    outln!("saga      {}  ({})", text(&saga, "saga_id"), text(&saga, "saga_type"));
    outln!("status    {}", text(&saga, "status"));
    if let Some(p) = saga.get("payload") {
        let total = p.get("total_cents").and_then(Value::as_i64).unwrap_or(0);
        outln!(
            "order     {}  customer {}  total {}.{:02} {}",
            text(p, "order_id"),
            text(p, "customer_id"),
            total / 100,
            total % 100,
            text(p, "currency")
        );
        if let Some(items) = p.get("items").and_then(Value::as_array) {
            let lines: Vec<String> = items
                .iter()
                .map(|l| format!("{} x {}", l.get("quantity").unwrap_or(&Value::Null), text(l, "sku")))
                .collect();
            outln!("items     {}", lines.join(", "));
        }
    }
    outln!("created   {}", created.map_or_else(|| "-".to_owned(), fmt_time));
    match (created, finished) {
        (Some(a), Some(b)) => outln!("finished  {}  ({} after creation)", fmt_time(b), ms(b - a)),
        _ => {
            let wake = time(&saga, "wake_at").map_or_else(|| "-".to_owned(), fmt_time);
            outln!("finished  not yet (next wake-up {wake})");
        }
    }
    if let Some(f) = saga.get("failure").and_then(Value::as_str) {
        outln!("failure   {f}");
    }

    let steps = saga.get("steps").and_then(Value::as_array).cloned().unwrap_or_default();
    outln!();
    outln!("steps");
    for (i, step) in steps.iter().enumerate() {
        let tries = |k: &str| step.get(k).and_then(Value::as_array).map_or(0, Vec::len);
        let mut extra = Vec::new();
        if tries("attempts") > 0 {
            extra.push(format!("{} attempt(s)", tries("attempts")));
        }
        if tries("compensations") > 0 {
            extra.push(format!("{} compensation attempt(s)", tries("compensations")));
        }
        let line = format!(
            "  {}. {:<16} {:<18} {}",
            i + 1,
            text(step, "name"),
            text(step, "status"),
            extra.join(", ")
        );
        outln!("{}", line.trim_end());
    }

    // Every attempt of every step, in the order they were sent.
    let mut events: Vec<(DateTime<Utc>, String)> = Vec::new();
    for step in &steps {
        let name = text(step, "name");
        for (kind, key) in [("action", "attempts"), ("compensation", "compensations")] {
            for a in step.get(key).and_then(Value::as_array).into_iter().flatten() {
                let Some(sent) = time(a, "sent_at") else { continue };
                let took = time(a, "finished_at").map(|f| ms(f - sent)).unwrap_or_default();
                let what = format!("{kind} #{}", a.get("number").and_then(Value::as_u64).unwrap_or(0));
                events.push((sent, format!("{name:<16} {what:<16} {:<44} {took:>9}", outcome(a))));
            }
        }
    }
    events.sort_by_key(|(t, _)| *t);
    if !events.is_empty() {
        outln!();
        outln!("timeline (sent, relative to creation)");
        let origin = created.unwrap_or(events[0].0);
        for (t, line) in events {
            outln!("  {:>10}  {line}", format!("+{}", ms(t - origin)));
        }
    }
    Ok(())
}

fn outcome(attempt: &Value) -> String {
    let Some(o) = attempt.get("outcome").filter(|o| !o.is_null()) else {
        return "in flight".to_owned();
    };
    match o.get("result").and_then(Value::as_str) {
        Some("failed") => {
            let kind = if o.get("retryable").and_then(Value::as_bool).unwrap_or(false) {
                "failed (retryable)"
            } else {
                "failed"
            };
            format!("{kind}: {}", o.get("reason").and_then(Value::as_str).unwrap_or("?"))
        }
        Some("timed_out") => "timed out".to_owned(),
        Some(r) => r.to_owned(),
        None => o.to_string(),
    }
}

async fn operate(api: &Api, id: &str, action: &str) -> anyhow::Result<()> {
    let saga = api.operate(id, action).await?;
    let failure = saga
        .get("failure")
        .and_then(Value::as_str)
        .map(|f| format!(" (failure: {f})"))
        .unwrap_or_default();
    outln!(
        "{action}: saga {} is now {}{failure}",
        text(&saga, "saga_id"),
        text(&saga, "status")
    );
    Ok(())
}

async fn stats(db: &DbConfig) -> anyhow::Result<()> {
    let pool = skald_wire::db::lazy_pool(&db.database_url, 1).context("coordinator database")?;
    let rows: Vec<(String, i64, Option<f64>)> = sqlx::query_as(
        "SELECT status, count(*),
                extract(epoch FROM now() - min(created_at) FILTER (WHERE status IN ('RUNNING', 'COMPENSATING')))::float8
         FROM sagas GROUP BY status",
    )
    .fetch_all(&pool)
    .await
    .context("coordinator database")?;
    pool.close().await;
    let total: i64 = rows.iter().map(|r| r.1).sum();
    outln!("{:<14}{:>10}", "STATUS", "SAGAS");
    for status in SagaStatus::ALL {
        let row = rows.iter().find(|r| r.0 == status.as_str());
        let n = row.map_or(0, |r| r.1);
        let oldest = row
            .and_then(|r| r.2)
            .map(|s| format!("   oldest started {s:.1} s ago"))
            .unwrap_or_default();
        outln!("{:<14}{n:>10}{oldest}", status.as_str());
    }
    for (other, n, _) in rows.iter().filter(|r| r.0.parse::<SagaStatus>().is_err()) {
        outln!("{other:<14}{n:>10}");
    }
    outln!("{:<14}{total:>10}", "total");
    Ok(())
}

async fn verify(db: &DbConfig, json: bool) -> anyhow::Result<ExitCode> {
    let dbs = db.connect().await?;
    let report = skald_participants::verify::verify(&dbs).await.context("verify")?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, usize::MAX);
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

fn time(v: &Value, key: &str) -> Option<DateTime<Utc>> {
    v.get(key)
        .and_then(Value::as_str)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn fmt_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

fn ms(d: chrono::TimeDelta) -> String {
    let ms = d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0;
    if ms.abs() >= 10_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.1} ms")
    }
}

async fn dlq(amqp_url: &str, action: DlqAction) -> anyhow::Result<()> {
    match action {
        DlqAction::List { limit } => {
            let (letters, more) = skald_tools::dlq::list(amqp_url, limit).await?;
            if letters.is_empty() {
                outln!("no dead letters");
            }
            for l in letters {
                outln!(
                    "{}  {}  from {}\n    reason: {}\n    body:   {}",
                    l.message_id,
                    l.message_type,
                    l.original_queue,
                    l.reason,
                    l.body
                );
            }
            if more {
                outln!("(more in the queue: raise --limit)");
            }
        }
        DlqAction::Replay { message_id } => {
            let (l, new_id) = skald_tools::dlq::replay(amqp_url, &message_id).await?;
            outln!(
                "replayed {} ({}) to {} as {new_id}",
                l.message_id,
                l.message_type,
                l.original_queue
            );
        }
    }
    Ok(())
}
