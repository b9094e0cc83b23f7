//! A throwaway measurement, not part of Skald: how much a message hop
//! through RabbitMQ costs with lapin (whose connections each run an I/O
//! thread of their own) against amqprs (tokio tasks only), in the pattern
//! Skald uses.
//!
//! `driver` plays the coordinator (a multi-threaded runtime): it publishes
//! persistent commands at a fixed rate on a confirm-mode channel and
//! consumes the replies. `echo` plays a participant (a current-thread
//! runtime, started by the driver as a child process): it takes what the
//! broker delivered as one batch, publishes one persistent reply per
//! command (confirmed, pipelined), and acks the batch with one `multiple`
//! ack. The driver prints the round trip's p50/p99 and the CPU and context
//! switches per round trip of itself, the echo and the broker.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Client {
    Lapin,
    Amqprs,
}

#[derive(Parser, Debug)]
struct Args {
    #[command(subcommand)]
    role: Role,
}

#[derive(clap::Subcommand, Debug)]
enum Role {
    Driver {
        #[arg(long, value_enum)]
        client: Client,
        /// Round trips per second.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Seconds measured, after 3 s of warm-up.
        #[arg(long, default_value_t = 15)]
        secs: u64,
        /// Body size in bytes (Skald's commands are 300–600).
        #[arg(long, default_value_t = 400)]
        size: usize,
    },
    /// Checks what a port of Skald to amqprs relies on (returns, nacks,
    /// passive declares, a connection closed by the broker).
    Probe,
    Echo {
        #[arg(long, value_enum)]
        client: Client,
        #[arg(long)]
        commands: String,
        #[arg(long)]
        replies: String,
    },
}

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const PREFETCH: u16 = 256;
const WARMUP: Duration = Duration::from_secs(3);

fn main() -> Result<()> {
    match Args::parse().role {
        Role::Driver {
            client,
            rate,
            secs,
            size,
        } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(driver(client, rate, secs, size)),
        Role::Probe => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(amqprs_side::probe()),
        Role::Echo {
            client,
            commands,
            replies,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async move {
                match client {
                    Client::Lapin => lapin_side::echo(&commands, &replies).await,
                    Client::Amqprs => amqprs_side::echo(&commands, &replies).await,
                }
            }),
    }
}

/// What a process used: CPU ticks (1/100 s) and context switches of all its threads.
#[derive(Clone, Copy, Default, Debug)]
struct Usage {
    ticks: u64,
    switches: u64,
}

fn usage(pid: u32) -> Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok(Usage { ticks, switches })
}

/// Busy and total jiffies of the whole machine.
fn machine() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("/proc/stat")?;
    let v: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Ok((total - idle, total))
}

fn broker_pid() -> Result<u32> {
    let out = std::process::Command::new("pgrep").args(["-o", "beam.smp"]).output()?;
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

/// Nanoseconds since the driver started, written in each command's body.
fn stamp(start: Instant, size: usize) -> Vec<u8> {
    let mut body = vec![b' '; size.max(8)];
    body[..8].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_le_bytes());
    body
}

fn latency_us(start: Instant, body: &[u8]) -> Option<u64> {
    let sent = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    Some((start.elapsed().as_nanos() as u64).saturating_sub(sent) / 1000)
}

/// What the driver's client half runs, the same for both clients: the
/// queues, the pace of the commands and the tally of the replies.
struct Plan {
    commands: String,
    replies: String,
    start: Instant,
    rate: u64,
    /// Commands to send, warm-up included.
    total: u64,
    /// Commands of the warm-up, whose replies are not counted.
    warm: u64,
    size: usize,
}

impl Plan {
    /// Sends every command on time: `publish` gets, each millisecond, the
    /// bodies then due (none once all are sent).
    async fn pace<F, Fut>(&self, mut publish: F) -> Result<()>
    where
        F: FnMut(Vec<Vec<u8>>) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let mut sent = 0u64;
        while sent < self.total {
            tick.tick().await;
            let due = ((self.start.elapsed().as_secs_f64() * self.rate as f64) as u64).min(self.total);
            let bodies: Vec<Vec<u8>> = (sent..due).map(|_| stamp(self.start, self.size)).collect();
            sent = due;
            if !bodies.is_empty() {
                publish(bodies).await?;
            }
        }
        Ok(())
    }

    /// When the driver stops waiting for replies.
    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(self.total / self.rate + 15)
    }
}

/// The replies received so far, and the round trips of those after the warm-up (µs).
struct Tally {
    got: u64,
    latencies: Vec<u64>,
}

impl Tally {
    fn new(plan: &Plan) -> Self {
        Self {
            got: 0,
            latencies: Vec::with_capacity(plan.total as usize),
        }
    }

    fn record(&mut self, plan: &Plan, body: Option<&[u8]>) {
        if let Some(us) = body.and_then(|b| latency_us(plan.start, b))
            && self.got >= plan.warm
        {
            self.latencies.push(us);
        }
        self.got += 1;
    }
}

async fn driver(client: Client, rate: u64, secs: u64, size: usize) -> Result<()> {
    let tag = format!("hop.{}", std::process::id());
    let (commands, replies) = (format!("{tag}.commands"), format!("{tag}.replies"));
    lapin_side::declare(&commands, &replies).await?;
    let exe = std::env::current_exe()?;
    let mut echo = tokio::process::Command::new(exe)
        .args(["echo", "--client", &format!("{client:?}").to_lowercase()])
        .args(["--commands", &commands, "--replies", &replies])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let echo_pid = echo.id().context("echo pid")?;
    {
        use tokio::io::AsyncBufReadExt;
        let out = echo.stdout.take().context("echo stdout")?;
        let mut line = String::new();
        tokio::io::BufReader::new(out).read_line(&mut line).await?;
        if line.trim() != "ready" {
            bail!("echo did not start: {line:?}");
        }
    }
    let broker = broker_pid()?;
    let me = std::process::id();
    let start = Instant::now();
    let total = rate * (WARMUP.as_secs() + secs);
    let warm = rate * WARMUP.as_secs();

    // Samples taken when the measured window opens and closes.
    let (mark_tx, mark_rx) = tokio::sync::oneshot::channel::<[Usage; 3]>();
    let marks = tokio::spawn(async move {
        tokio::time::sleep(WARMUP).await;
        let m0 = machine().ok();
        let u0 = [usage(me), usage(echo_pid), usage(broker)];
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let m1 = machine().ok();
        let u1 = [usage(me), usage(echo_pid), usage(broker)];
        let mut d = [Usage::default(); 3];
        for i in 0..3 {
            if let (Ok(a), Ok(b)) = (&u0[i], &u1[i]) {
                d[i] = Usage {
                    ticks: b.ticks - a.ticks,
                    switches: b.switches - a.switches,
                };
            }
        }
        let _ = mark_tx.send(d);
        m0.zip(m1)
            .map(|((b0, t0), (b1, t1))| (b1 - b0) as f64 / (t1 - t0) as f64)
    });

    let plan = std::sync::Arc::new(Plan {
        commands: commands.clone(),
        replies: replies.clone(),
        start,
        rate,
        total,
        warm,
        size,
    });
    let received = match client {
        Client::Lapin => lapin_side::drive(plan).await?,
        Client::Amqprs => amqprs_side::drive(plan).await?,
    };
    let busy = marks.await?.unwrap_or(0.0);
    let d = mark_rx.await?;
    let _ = echo.kill().await;
    lapin_side::delete(&commands, &replies).await?;

    let mut l = received.latencies;
    l.sort_unstable();
    let q = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let n = (rate * secs) as f64;
    let per = |u: Usage| (u.ticks as f64 * 10.0 * 1000.0 / n, u.switches as f64 / n);
    let (dc, ds) = per(d[0]);
    let (ec, es) = per(d[1]);
    let (bc, bs) = per(d[2]);
    println!(
        "{client:?} {rate}/s x {secs}s: {} round trips, p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} ms | CPU us/round trip: driver {dc:.0}, echo {ec:.0}, broker {bc:.0}, sum {:.0} | switches/round trip: driver {ds:.1}, echo {es:.1}, broker {bs:.1} | machine {:.0}% busy",
        l.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        q(1.0),
        dc + ec + bc,
        busy * 100.0
    );
    Ok(())
}

mod lapin_side {
    use super::*;
    use futures::StreamExt;
    use lapin::options::*;
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    async fn connect() -> Result<Connection> {
        Ok(Connection::connect(URL, ConnectionProperties::default()).await?)
    }

    pub async fn declare(commands: &str, replies: &str) -> Result<()> {
        let conn = connect().await?;
        let ch = conn.create_channel().await?;
        for q in [commands, replies] {
            let opts = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.queue_declare(q.into(), opts, FieldTable::default()).await?;
        }
        conn.close(200, "ok".into()).await?;
        Ok(())
    }

    pub async fn delete(commands: &str, replies: &str) -> Result<()> {
        let conn = connect().await?;
        let ch = conn.create_channel().await?;
        for q in [commands, replies] {
            ch.queue_delete(q.into(), QueueDeleteOptions::default()).await?;
        }
        conn.close(200, "ok".into()).await?;
        Ok(())
    }

    fn props() -> BasicProperties {
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
    }

    /// Publishes in order, all at once (as Skald's `Publisher::send_all`),
    /// and hands the confirms to a task.
    async fn publish_all(ch: &lapin::Channel, queue: &str, bodies: Vec<Vec<u8>>) -> Result<()> {
        let sends = bodies.iter().map(|b| {
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b,
                props(),
            )
        });
        let confirms = futures::future::join_all(sends).await;
        let mut pending = Vec::with_capacity(confirms.len());
        for c in confirms {
            pending.push(c?);
        }
        tokio::spawn(async move {
            for c in pending {
                match c.await {
                    Ok(lapin::Confirmation::Ack(None)) => {}
                    other => eprintln!("confirm: {other:?}"),
                }
            }
        });
        Ok(())
    }

    pub async fn echo(commands: &str, replies: &str) -> Result<()> {
        let conn = connect().await?;
        let cin = conn.create_channel().await?;
        cin.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let cout = conn.create_channel().await?;
        cout.confirm_select(ConfirmSelectOptions::default()).await?;
        let mut consumer = cin
            .basic_consume(
                commands.into(),
                "echo".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        println!("ready");
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<lapin::Acker>();
        tokio::spawn(async move {
            while let Some(acker) = ack_rx.recv().await {
                let _ = acker.ack(BasicAckOptions { multiple: true }).await;
            }
        });
        use futures::FutureExt;
        while let Some(first) = consumer.next().await {
            let mut batch = vec![first?];
            while batch.len() < PREFETCH as usize {
                match consumer.next().now_or_never() {
                    Some(Some(d)) => batch.push(d?),
                    _ => break,
                }
            }
            let bodies = batch.iter().map(|d| d.data.clone()).collect();
            publish_all(&cout, replies, bodies).await?;
            if let Some(last) = batch.last() {
                let _ = ack_tx.send(last.acker.clone());
            }
        }
        Ok(())
    }

    pub async fn drive(plan: std::sync::Arc<Plan>) -> Result<Tally> {
        let conn = connect().await?;
        let cin = conn.create_channel().await?;
        cin.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let cout = conn.create_channel().await?;
        cout.confirm_select(ConfirmSelectOptions::default()).await?;
        let mut consumer = cin
            .basic_consume(
                plan.replies.as_str().into(),
                "driver".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let pacing = plan.clone();
        let publisher = tokio::spawn(async move {
            let cout = &cout;
            let queue = pacing.commands.as_str();
            pacing.pace(|bodies| publish_all(cout, queue, bodies)).await
        });
        let mut tally = Tally::new(&plan);
        let deadline = plan.deadline();
        use futures::FutureExt;
        while tally.got < plan.total {
            let first = tokio::time::timeout_at(deadline, consumer.next())
                .await
                .context("replies stopped coming")?
                .context("consumer ended")??;
            let mut batch = vec![first];
            while let Some(Some(d)) = consumer.next().now_or_never() {
                batch.push(d?);
            }
            for d in &batch {
                tally.record(&plan, Some(&d.data));
            }
            if let Some(last) = batch.last() {
                last.acker.ack(BasicAckOptions { multiple: true }).await?;
            }
        }
        publisher.await??;
        Ok(tally)
    }
}

mod amqprs_side {
    use super::*;
    use amqprs::callbacks::{ChannelCallback, DefaultConnectionCallback};
    use amqprs::channel::{
        BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
        ConfirmSelectArguments,
    };
    use amqprs::connection::{Connection, OpenConnectionArguments};
    use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};

    /// Counts confirms (Skald would resolve each message's wait here).
    struct Confirms;

    #[async_trait::async_trait]
    impl ChannelCallback for Confirms {
        async fn close(&mut self, _: &Channel, close: CloseChannel) -> std::result::Result<(), amqprs::error::Error> {
            eprintln!("channel closed: {close}");
            Ok(())
        }
        async fn cancel(&mut self, _: &Channel, _: Cancel) -> std::result::Result<(), amqprs::error::Error> {
            Ok(())
        }
        async fn flow(&mut self, _: &Channel, active: bool) -> std::result::Result<bool, amqprs::error::Error> {
            Ok(active)
        }
        async fn publish_ack(&mut self, _: &Channel, _: Ack) {}
        async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
            eprintln!("nack {}", nack.delivery_tag());
        }
        async fn publish_return(&mut self, _: &Channel, ret: Return, _: BasicProperties, _: Vec<u8>) {
            eprintln!("returned: {ret}");
        }
    }

    async fn connect(name: &str) -> Result<Connection> {
        let args = OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest")
            .connection_name(name)
            .finish();
        let conn = Connection::open(&args).await?;
        conn.register_callback(DefaultConnectionCallback).await?;
        Ok(conn)
    }

    async fn channels(conn: &Connection) -> Result<(Channel, Channel)> {
        let cin = conn.open_channel(None).await?;
        cin.basic_qos(BasicQosArguments::new(0, PREFETCH, false)).await?;
        let cout = conn.open_channel(None).await?;
        cout.register_callback(Confirms).await?;
        cout.confirm_select(ConfirmSelectArguments::new(false)).await?;
        Ok((cin, cout))
    }

    fn props() -> BasicProperties {
        BasicProperties::default()
            .with_delivery_mode(amqprs::DELIVERY_MODE_PERSISTENT)
            .with_content_type("application/json")
            .finish()
    }

    async fn publish_all(ch: &Channel, queue: &str, bodies: Vec<Vec<u8>>) -> Result<()> {
        for b in bodies {
            let args = BasicPublishArguments::new("", queue).mandatory(true).finish();
            ch.basic_publish(props(), b, args).await?;
        }
        Ok(())
    }

    pub async fn echo(commands: &str, replies: &str) -> Result<()> {
        let conn = connect("echo").await?;
        let (cin, cout) = channels(&conn).await?;
        let (_, mut rx) = cin
            .basic_consume_rx(BasicConsumeArguments::new(commands, "echo").manual_ack(true).finish())
            .await?;
        println!("ready");
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < PREFETCH as usize {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let mut last = 0;
            let mut bodies = Vec::with_capacity(batch.len());
            for m in batch {
                last = m.deliver.as_ref().map_or(last, |d| d.delivery_tag());
                bodies.push(m.content.unwrap_or_default());
            }
            publish_all(&cout, replies, bodies).await?;
            cin.basic_ack(BasicAckArguments::new(last, true)).await?;
        }
        Ok(())
    }

    pub async fn drive(plan: std::sync::Arc<Plan>) -> Result<Tally> {
        let conn = connect("driver").await?;
        let (cin, cout) = channels(&conn).await?;
        let (_, mut rx) = cin
            .basic_consume_rx(
                BasicConsumeArguments::new(&plan.replies, "driver")
                    .manual_ack(true)
                    .finish(),
            )
            .await?;
        let pacing = plan.clone();
        let publisher = tokio::spawn(async move {
            let cout = &cout;
            let queue = pacing.commands.as_str();
            pacing.pace(|bodies| publish_all(cout, queue, bodies)).await
        });
        let mut tally = Tally::new(&plan);
        let deadline = plan.deadline();
        while tally.got < plan.total {
            let first = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .context("replies stopped coming")?
                .context("consumer ended")?;
            let mut batch = vec![first];
            while let Ok(m) = rx.try_recv() {
                batch.push(m);
            }
            let mut last = 0;
            for m in &batch {
                tally.record(&plan, m.content.as_deref());
                last = m.deliver.as_ref().map_or(last, |d| d.delivery_tag());
            }
            cin.basic_ack(BasicAckArguments::new(last, true)).await?;
        }
        publisher.await??;
        Ok(tally)
    }

    /// Logs every confirm, return and close it is told of.
    struct Logging(&'static str);

    #[async_trait::async_trait]
    impl ChannelCallback for Logging {
        async fn close(&mut self, _: &Channel, close: CloseChannel) -> std::result::Result<(), amqprs::error::Error> {
            println!("[{}] channel close from the broker: {close}", self.0);
            Ok(())
        }
        async fn cancel(&mut self, _: &Channel, c: Cancel) -> std::result::Result<(), amqprs::error::Error> {
            println!("[{}] consumer cancelled: {}", self.0, c.consumer_tag());
            Ok(())
        }
        async fn flow(&mut self, _: &Channel, active: bool) -> std::result::Result<bool, amqprs::error::Error> {
            Ok(active)
        }
        async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
            println!("[{}] ack tag {} multiple {}", self.0, ack.delivery_tag(), ack.mutiple());
        }
        async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
            println!(
                "[{}] nack tag {} multiple {}",
                self.0,
                nack.delivery_tag(),
                nack.multiple()
            );
        }
        async fn publish_return(&mut self, _: &Channel, ret: Return, props: BasicProperties, _: Vec<u8>) {
            println!("[{}] returned: {ret}, message_id {:?}", self.0, props.message_id());
        }
    }

    pub async fn probe() -> Result<()> {
        use amqprs::channel::{QueueDeclareArguments, QueueDeleteArguments};
        let conn = connect("probe").await?;
        let ch = conn.open_channel(None).await?;
        ch.register_callback(Logging("publisher")).await?;
        ch.confirm_select(ConfirmSelectArguments::new(false)).await?;
        let q = format!("probe.{}", std::process::id());
        ch.queue_declare(QueueDeclareArguments::durable_client_named(&q))
            .await?;

        println!("-- 1. three routed messages, then one to a queue that does not exist (mandatory)");
        for (i, key) in [&q, &q, &q, &"nowhere".to_owned()].iter().enumerate() {
            let props = BasicProperties::default()
                .with_message_id(&format!("m{}", i + 1))
                .with_delivery_mode(amqprs::DELIVERY_MODE_PERSISTENT)
                .finish();
            let args = BasicPublishArguments::new("", key).mandatory(true).finish();
            ch.basic_publish(props, b"x".to_vec(), args).await?;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        println!("-- 2. a passive declare of a missing queue, on its own channel");
        let side = conn.open_channel(None).await?;
        side.register_callback(Logging("side")).await?;
        let res = side
            .queue_declare(QueueDeclareArguments::new("no.such.queue").passive(true).finish())
            .await;
        println!(
            "passive declare: {res:?}; side channel open afterwards: {}",
            side.is_open()
        );
        let res = ch
            .queue_declare(QueueDeclareArguments::new(&q).passive(true).finish())
            .await;
        println!("passive declare of {q}: {res:?}");

        println!("-- 3. a consumer, then the broker closes the connection");
        let cin = conn.open_channel(None).await?;
        let (_, mut rx) = cin
            .basic_consume_rx(BasicConsumeArguments::new(&q, "probe").manual_ack(true).finish())
            .await?;
        for _ in 0..3 {
            let m = rx.recv().await.context("no delivery")?;
            println!("delivery tag {:?}", m.deliver.as_ref().map(|d| d.delivery_tag()));
        }
        let io_failure = conn.listen_network_io_failure();
        let killed = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", "--help"])
            .output()
            .await;
        let _ = killed;
        // Close it through the management CLI, by the connection's pid.
        let list = tokio::process::Command::new("rabbitmqctl")
            .args([
                "list_connections",
                "pid",
                "client_properties",
                "--quiet",
                "--no-table-headers",
            ])
            .output()
            .await?;
        let text = String::from_utf8_lossy(&list.stdout);
        let pid = text
            .lines()
            .find(|l| l.contains("probe"))
            .and_then(|l| l.split_whitespace().next())
            .context("connection not listed")?
            .to_owned();
        let out = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", &pid, "probe closes it"])
            .output()
            .await?;
        println!("close_connection: {}", String::from_utf8_lossy(&out.stdout).trim());
        let t = Instant::now();
        let next = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        println!(
            "consumer after the close: {:?} after {:?}",
            next.map(|m| m.is_some()),
            t.elapsed()
        );
        let failed = tokio::time::timeout(Duration::from_secs(5), io_failure).await;
        println!(
            "listen_network_io_failure: {failed:?}; connection open {}, channels open {} {}",
            conn.is_open(),
            ch.is_open(),
            cin.is_open()
        );
        let props = BasicProperties::default().finish();
        let res = ch
            .basic_publish(props, b"x".to_vec(), BasicPublishArguments::new("", &q).finish())
            .await;
        println!("publish after the close: {res:?}");
        let res = cin.basic_ack(BasicAckArguments::new(1, true)).await;
        println!("ack after the close: {res:?}");

        let conn = connect("probe-cleanup").await?;
        let ch = conn.open_channel(None).await?;
        ch.queue_delete(QueueDeleteArguments::new(&q)).await?;
        conn.close().await?;
        Ok(())
    }
}
