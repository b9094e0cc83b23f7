//! What the bench reads from `/proc`: CPU time and memory of its children,
//! the machine's CPU use, and a description of the machine; and what it does
//! to the machine's processes and page cache (signals, `sync(2)`).

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

/// Clock ticks per second of `/proc/PID/stat` times (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// User + system CPU time used so far by process `pid` (all its threads).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: fields count from the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("/proc/{pid}/stat: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("/proc/{pid}/stat: field {}", i + 3))
    };
    let ticks = field(11)? + field(12)?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// What a process's threads did with the scheduler so far: their run-queue
/// waits and their time slices, summed over the threads alive now (from
/// `/proc/PID/task/*/schedstat`: time on a CPU, time runnable but waiting
/// for one, slices run).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sched {
    /// Time runnable but waiting for a CPU.
    pub waited: Duration,
    /// Time slices run (each one a switch onto a CPU).
    pub slices: u64,
}

impl Sched {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Sched) -> Sched {
        Sched {
            waited: self.waited.saturating_sub(earlier.waited),
            slices: self.slices.saturating_sub(earlier.slices),
        }
    }
}

impl std::ops::Add for Sched {
    type Output = Sched;
    fn add(self, other: Sched) -> Sched {
        Sched {
            waited: self.waited + other.waited,
            slices: self.slices + other.slices,
        }
    }
}

/// A process's CPU time and, where the kernel keeps them, its threads'
/// scheduler figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu: Duration,
    pub sched: Option<Sched>,
}

impl Usage {
    /// What happened between `earlier` and `self`; an `earlier` without
    /// scheduler figures counts as zero (a process born in between).
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            cpu: self.cpu.saturating_sub(earlier.cpu),
            sched: self.sched.map(|s| earlier.sched.map_or(s, |e| s.since(&e))),
        }
    }
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, other: Usage) -> Usage {
        let sched = match (self.sched, other.sched) {
            (Some(a), Some(b)) => Some(a + b),
            (one, None) | (None, one) => one,
        };
        Usage {
            cpu: self.cpu + other.cpu,
            sched,
        }
    }
}

/// The CPU time and scheduler figures of process `pid`.
pub fn usage(pid: u32) -> anyhow::Result<Usage> {
    Ok(Usage {
        cpu: cpu_time(pid)?,
        sched: sched(pid),
    })
}

/// The scheduler's figures of `pid`'s threads (see [`Sched`]); `None` where
/// the kernel keeps none.
pub fn sched(pid: u32) -> Option<Sched> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = Sched::default();
    let mut any = false;
    for task in tasks.flatten() {
        // A thread may exit meanwhile: it is left out.
        let Ok(line) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        if let Some(one) = parse_schedstat(&line) {
            total = total + one;
            any = true;
        }
    }
    any.then_some(total)
}

/// `<ns on a CPU> <ns waiting on a run queue> <slices>`.
fn parse_schedstat(line: &str) -> Option<Sched> {
    let mut fields = line.split_whitespace().skip(1).map(str::parse::<u64>);
    let waited = fields.next()?.ok()?;
    let slices = fields.next()?.ok()?;
    Some(Sched {
        waited: Duration::from_nanos(waited),
        slices,
    })
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: libc::c_int) -> anyhow::Result<()> {
    let target = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) only sends a signal. The bench signals only its own
    // children, which it reaps only when it stops them.
    if unsafe { libc::kill(target, sig) } != 0 {
        bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes the page cache's dirty data out to disk (sync(2)) and returns how
/// long that took. The kernel writes dirty pages back once they are 30 s old,
/// all at once: measured here, the 330 MB of binaries a build had just written
/// went out in one burst 30 s later, in the middle of a phase (fsync
/// latency 61 ms, every process stalled for 100 ms).
pub async fn flush_dirty_pages() -> anyhow::Result<Duration> {
    tokio::task::spawn_blocking(|| {
        let start = std::time::Instant::now();
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        start.elapsed()
    })
    .await
    .context("sync(2)")
}

/// Whether `pid` is running (not exited, not a zombie waiting to be reaped).
pub fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Resident set size now and its peak since start or the last [`reset_peak`], in KiB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("/proc/{pid}/status: no {key}"))
    };
    Ok(Memory {
        rss_kib: kib("VmRSS:")?,
        hwm_kib: kib("VmHWM:")?,
    })
}

/// Resets the peak RSS (VmHWM) of `pid` to its current RSS.
pub fn reset_peak(pid: u32) -> anyhow::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").with_context(|| format!("/proc/{pid}/clear_refs"))
}

/// Busy and total jiffies of the whole machine (first line of `/proc/stat`),
/// its context switches (`ctxt`), and the time some task waited for a CPU
/// (`/proc/pressure/cpu`, "some" total in µs; `None` without PSI).
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    busy: u64,
    total: u64,
    switches: u64,
    pressure_us: Option<u64>,
}

impl MachineCpu {
    pub fn read() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("/proc/stat")?;
        let pressure = std::fs::read_to_string("/proc/pressure/cpu").ok();
        Self::parse(&stat, pressure.as_deref())
    }

    fn parse(stat: &str, pressure: Option<&str>) -> anyhow::Result<Self> {
        let line = stat.lines().next().context("/proc/stat is empty")?;
        let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
        anyhow::ensure!(v.len() >= 5, "/proc/stat: unexpected cpu line {line:?}");
        // user nice system idle iowait irq softirq steal (guest times are already in user).
        let total: u64 = v.iter().take(8).sum();
        let idle = v[3] + v[4];
        let switches = stat
            .lines()
            .find_map(|l| l.strip_prefix("ctxt "))
            .and_then(|n| n.trim().parse().ok())
            .context("/proc/stat: no ctxt line")?;
        let pressure_us = pressure.and_then(|p| {
            p.lines()
                .find_map(|l| l.strip_prefix("some "))?
                .split_whitespace()
                .find_map(|f| f.strip_prefix("total="))?
                .parse()
                .ok()
        });
        Ok(Self {
            busy: total - idle,
            total,
            switches,
            pressure_us,
        })
    }

    /// Context switches on the whole machine between `self` and `later`.
    pub fn switches(&self, later: &MachineCpu) -> u64 {
        later.switches.saturating_sub(self.switches)
    }

    /// Share of the time between `self` and `later` (`elapsed`) in which
    /// at least one runnable task waited for a CPU (0..1), where the
    /// kernel reports it.
    pub fn pressure_share(&self, later: &MachineCpu, elapsed: Duration) -> Option<f64> {
        let waited = later.pressure_us?.checked_sub(self.pressure_us?)?;
        let elapsed = elapsed.as_micros();
        (elapsed > 0).then(|| (waited as f64 / elapsed as f64).min(1.0))
    }

    /// Share of the machine's CPU that was busy between `self` and `later` (0..1).
    pub fn busy_share(&self, later: &MachineCpu) -> f64 {
        let total = later.total.saturating_sub(self.total);
        if total == 0 {
            return 0.0;
        }
        later.busy.saturating_sub(self.busy) as f64 / total as f64
    }
}

/// The machine, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub memory_total_mib: u64,
    pub kernel: String,
    pub cpu_model: String,
    pub clock_ticks_per_sec: u64,
}

impl Machine {
    pub fn describe() -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_total_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_default();
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_total_mib,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpu_model,
            clock_ticks_per_sec: clock_ticks(),
        }
    }
}

/// The pid of the local RabbitMQ broker (its Erlang VM), if one runs here.
pub fn rabbitmq_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        if comm.trim() != "beam.smp" {
            return None;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline).contains("rabbit").then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_time(me).is_ok());
        let m = memory(me).unwrap_or_default();
        assert!(m.rss_kib > 0 && m.hwm_kib >= m.rss_kib);
        reset_peak(me).ok();
        let a = MachineCpu::read().unwrap_or_default();
        let b = MachineCpu::read().unwrap_or_default();
        assert!((0.0..=1.0).contains(&a.busy_share(&b)));
        assert!(a.switches(&b) < 1_000_000);
        // This process has run, so its threads have had slices.
        assert!(sched(me).is_some_and(|s| s.slices > 0));
    }

    #[test]
    fn parses_the_machine_figures() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\nintr 1 2\nctxt 123456\nbtime 1\n";
        let pressure =
            "some avg10=18.53 avg60=48.43 avg300=30.43 total=2000000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        let a = MachineCpu::parse(stat, Some(pressure)).unwrap_or_default();
        assert_eq!(
            (a.busy, a.total, a.switches, a.pressure_us),
            (150, 1000, 123_456, Some(2_000_000))
        );
        let later = MachineCpu {
            switches: 133_456,
            pressure_us: Some(2_500_000),
            ..a
        };
        assert_eq!(a.switches(&later), 10_000);
        assert_eq!(a.pressure_share(&later, Duration::from_secs(2)), Some(0.25));
        // No PSI on this kernel: no figure, not a zero.
        let without = MachineCpu::parse(stat, None).unwrap_or_default();
        assert_eq!(without.pressure_share(&later, Duration::from_secs(2)), None);
        assert!(MachineCpu::parse("cpu  1 2 3 4 5\n", None).is_err());
    }

    #[test]
    fn usage_of_a_process_born_in_between_counts_whole_and_sums_keep_what_is_known() {
        let sched = |ms, slices| {
            Some(Sched {
                waited: Duration::from_millis(ms),
                slices,
            })
        };
        let later = Usage {
            cpu: Duration::from_millis(30),
            sched: sched(8, 25),
        };
        let born = later.since(&Usage::default());
        assert_eq!((born.cpu, born.sched), (later.cpu, later.sched));
        let earlier = Usage {
            cpu: Duration::from_millis(10),
            sched: sched(5, 10),
        };
        let d = later.since(&earlier);
        assert_eq!((d.cpu, d.sched), (Duration::from_millis(20), sched(3, 15)));
        let blind = Usage {
            cpu: Duration::from_millis(1),
            sched: None,
        };
        let total = Usage::default() + d + blind;
        assert_eq!((total.cpu, total.sched), (Duration::from_millis(21), sched(3, 15)));
    }

    #[test]
    fn parses_a_thread_schedstat() {
        assert_eq!(
            parse_schedstat("4785300193 1209765432 15000\n"),
            Some(Sched {
                waited: Duration::from_nanos(1_209_765_432),
                slices: 15_000
            })
        );
        assert_eq!(parse_schedstat("12 x 3"), None);
        let a = Sched {
            waited: Duration::from_millis(5),
            slices: 10,
        };
        let b = Sched {
            waited: Duration::from_millis(8),
            slices: 25,
        };
        assert_eq!(
            b.since(&a),
            Sched {
                waited: Duration::from_millis(3),
                slices: 15
            }
        );
    }
}
