//! A latency curve: fixed-rate phases at several rates, and the figures
//! that explain each one's latency (how busy the machine was, and how much
//! of it each saga cost).
//!
//! Its use: on a machine shared by every server, the cost of a saga is not
//! fixed. Each stage batches what arrived while it was busy, so at a low
//! rate a saga pays for more transactions, wake-ups and context switches
//! than at a high one, and the machine can be nearly as busy at a quarter
//! of the saturating rate as at half. The curve shows that, and the
//! highest rate measured whose p99 stays under a limit.

use std::str::FromStr;

use serde::Serialize;

use super::phase::PhaseReport;

/// A rate of the sweep: orders per second, or a share of the saturating rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SweepRate {
    PerSec(f64),
    /// `0.25` for `25%`.
    Share(f64),
}

impl FromStr for SweepRate {
    type Err = String;

    /// `300` (orders/s) or `25%` (of the saturating rate).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (number, share) = match s.strip_suffix('%') {
            Some(n) => (n.trim(), true),
            None => (s, false),
        };
        let x: f64 = number
            .parse()
            .map_err(|_| format!("{s:?}: expected orders/s (e.g. 300) or a share of the saturating rate (e.g. 25%)"))?;
        if !x.is_finite() || x <= 0.0 {
            return Err(format!("{s:?}: must be positive"));
        }
        if share {
            if x > 200.0 {
                return Err(format!(
                    "{s:?}: a share above 200% of the saturating rate cannot be sustained"
                ));
            }
            Ok(Self::Share(x / 100.0))
        } else {
            Ok(Self::PerSec(x))
        }
    }
}

impl std::fmt::Display for SweepRate {
    /// As given on the command line: `300` or `25%`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PerSec(r) => write!(f, "{r}"),
            Self::Share(s) => write!(f, "{}%", s * 100.0),
        }
    }
}

impl Serialize for SweepRate {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl SweepRate {
    /// Orders per second; none for a share when no saturating rate was measured.
    pub fn resolve(self, saturating: Option<f64>) -> Option<f64> {
        match self {
            Self::PerSec(r) => Some(r),
            Self::Share(f) => saturating.map(|s| (s * f).max(0.1)),
        }
    }
}

/// One fixed-rate phase of the curve.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CurvePoint {
    /// Orders per second asked for.
    pub rate: f64,
    /// `rate` over the saturating rate of the same run, if measured.
    pub share_of_saturating: Option<f64>,
    pub sagas_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub machine_cpu_busy: f64,
    /// Machine CPU time (every process) per saga completed: busy share x
    /// CPUs / sagas per second.
    pub machine_cpu_ms_per_saga: f64,
    pub pg_xacts_per_saga: f64,
    pub machine_switches_per_saga: f64,
}

impl CurvePoint {
    pub fn of(rate: f64, phase: &PhaseReport, saturating: Option<f64>, cpus: usize) -> Self {
        let cpu_ms = if phase.sagas_per_sec > 0.0 {
            phase.machine_cpu_busy * cpus as f64 * 1_000.0 / phase.sagas_per_sec
        } else {
            0.0
        };
        Self {
            rate: round(rate, 1),
            share_of_saturating: saturating.filter(|s| *s > 0.0).map(|s| round(rate / s, 3)),
            sagas_per_sec: phase.sagas_per_sec,
            p50_ms: phase.latency_ms.p50,
            p99_ms: phase.latency_ms.p99,
            machine_cpu_busy: phase.machine_cpu_busy,
            machine_cpu_ms_per_saga: round(cpu_ms, 2),
            pg_xacts_per_saga: phase.pg_xacts_per_saga,
            machine_switches_per_saga: phase.machine_switches_per_saga,
        }
    }
}

/// The curve, in rate order, and the highest rate whose p99 was under the limit.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Curve {
    pub points: Vec<CurvePoint>,
    pub p99_limit_ms: f64,
    /// None when no point's p99 was under the limit.
    pub highest_rate_under_limit: Option<f64>,
}

impl Curve {
    pub fn new(mut points: Vec<CurvePoint>, p99_limit_ms: f64) -> Self {
        points.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let highest_rate_under_limit = points
            .iter()
            .filter(|p| p.p99_ms < p99_limit_ms)
            .map(|p| p.rate)
            .max_by(f64::total_cmp);
        Self {
            points,
            p99_limit_ms,
            highest_rate_under_limit,
        }
    }

    /// The readable table (for stderr).
    pub fn table(&self) -> String {
        let mut out = String::from(
            "Latency curve\n  orders/s  of saturating  p50 ms  p99 ms  machine busy  machine CPU ms/saga  PG xacts/saga  switches/saga\n",
        );
        for p in &self.points {
            let share = p
                .share_of_saturating
                .map_or_else(|| "-".to_owned(), |s| format!("{:.0}%", s * 100.0));
            out.push_str(&format!(
                "  {:>8.1}  {:>13}  {:>6.0}  {:>6.0}  {:>11.0}%  {:>19.2}  {:>13.2}  {:>13.1}\n",
                p.rate,
                share,
                p.p50_ms,
                p.p99_ms,
                p.machine_cpu_busy * 100.0,
                p.machine_cpu_ms_per_saga,
                p.pg_xacts_per_saga,
                p.machine_switches_per_saga
            ));
        }
        match self.highest_rate_under_limit {
            Some(r) => out.push_str(&format!(
                "  highest rate measured with p99 under {:.0} ms: {r:.1} orders/s\n",
                self.p99_limit_ms
            )),
            None => out.push_str(&format!(
                "  no rate measured had p99 under {:.0} ms\n",
                self.p99_limit_ms
            )),
        }
        out
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_rates_parse_as_orders_per_second_or_shares() {
        assert_eq!("300".parse::<SweepRate>(), Ok(SweepRate::PerSec(300.0)));
        assert_eq!(" 25% ".parse::<SweepRate>(), Ok(SweepRate::Share(0.25)));
        assert_eq!("12.5%".parse::<SweepRate>(), Ok(SweepRate::Share(0.125)));
        assert_eq!(SweepRate::Share(0.125).to_string(), "12.5%");
        assert_eq!(SweepRate::PerSec(300.0).to_string(), "300");
        for bad in ["", "x", "-5", "0", "0%", "300%", "NaN", "inf"] {
            assert!(bad.parse::<SweepRate>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_share_needs_the_saturating_rate() {
        assert_eq!(SweepRate::Share(0.25).resolve(Some(1000.0)), Some(250.0));
        assert_eq!(SweepRate::Share(0.25).resolve(None), None);
        assert_eq!(SweepRate::PerSec(40.0).resolve(None), Some(40.0));
    }

    fn point(rate: f64, p99_ms: f64) -> CurvePoint {
        CurvePoint {
            rate,
            share_of_saturating: None,
            sagas_per_sec: rate,
            p50_ms: p99_ms / 2.0,
            p99_ms,
            machine_cpu_busy: 0.5,
            machine_cpu_ms_per_saga: 1.0,
            pg_xacts_per_saga: 1.0,
            machine_switches_per_saga: 10.0,
        }
    }

    #[test]
    fn the_highest_rate_under_the_limit_is_found_whatever_the_order() {
        // Not monotonic: a middle rate can be worse than a higher one.
        let curve = Curve::new(vec![point(300.0, 76.0), point(50.0, 31.0), point(150.0, 105.0)], 100.0);
        assert_eq!(
            curve.points.iter().map(|p| p.rate).collect::<Vec<_>>(),
            [50.0, 150.0, 300.0]
        );
        assert_eq!(curve.highest_rate_under_limit, Some(300.0));
        let table = curve.table();
        assert!(
            table.contains("highest rate measured with p99 under 100 ms: 300.0"),
            "{table}"
        );
        let none = Curve::new(vec![point(600.0, 150.0)], 100.0);
        assert_eq!(none.highest_rate_under_limit, None);
        assert!(none.table().contains("no rate measured"));
    }
}
