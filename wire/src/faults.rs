//! Failure injection, off by default.
//!
//! `SKALD_FAULTS` is a comma-separated list of `scope.point=value`, e.g.
//! `participant.crash_after_commit=0.05,coordinator.crash_after_publish=0.02,payment.delay_ms=200`.
//! A process has one or more scopes (`coordinator`; `participant` and its own
//! name such as `payment`). Points:
//! - `crash_<where>=p`: abort the process there with probability `p`
//!   (coordinator: `crash_after_commit`, `crash_after_publish`; participant:
//!   `crash_before_commit`, `crash_after_commit`, `crash_after_publish`);
//! - `delay_ms=n`: sleep `n` ms before handling each message;
//! - `transient=p`: fail a handler with a transient error with probability `p`.

use std::collections::HashMap;
use std::sync::Arc;

use rand::Rng;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("SKALD_FAULTS: {0}")]
pub struct ParseError(String);

/// The faults that apply to one process.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    points: Arc<HashMap<String, f64>>,
}

impl Faults {
    /// Parses `spec` keeping only the entries whose scope is in `scopes`.
    pub fn parse(spec: &str, scopes: &[&str]) -> Result<Self, ParseError> {
        let mut points = HashMap::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (key, value) = entry
                .split_once('=')
                .ok_or_else(|| ParseError(format!("{entry:?} is not scope.point=value")))?;
            let (scope, point) = key
                .trim()
                .split_once('.')
                .ok_or_else(|| ParseError(format!("{key:?} is not scope.point")))?;
            let value: f64 = value
                .trim()
                .parse()
                .map_err(|_| ParseError(format!("{entry:?}: {value:?} is not a number")))?;
            if !(value >= 0.0 && value.is_finite()) {
                return Err(ParseError(format!("{entry:?}: the value must be >= 0")));
            }
            if scopes.contains(&scope) {
                points.insert(point.to_owned(), value);
            }
        }
        Ok(Self {
            points: Arc::new(points),
        })
    }

    /// No faults at all.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    fn chance(&self, point: &str) -> bool {
        match self.points.get(point) {
            Some(&p) if p > 0.0 => rand::rng().random::<f64>() < p,
            _ => false,
        }
    }

    /// Aborts the process at `point` (e.g. `crash_after_commit`) with the configured probability.
    pub fn crash(&self, point: &str) {
        if self.chance(point) {
            tracing::error!(point, "injected crash (SKALD_FAULTS)");
            std::process::abort();
        }
    }

    /// Whether to fail this message with an injected transient error.
    pub fn transient(&self) -> bool {
        self.chance("transient")
    }

    /// Sleeps for the configured `delay_ms`, if any.
    pub async fn delay(&self) {
        if let Some(&ms) = self.points.get("delay_ms") {
            tokio::time::sleep(std::time::Duration::from_millis(ms as u64)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_its_scopes() {
        let f = Faults::parse(
            "participant.crash_after_commit=0.05, coordinator.crash_after_publish=1,payment.delay_ms=200",
            &["participant", "payment"],
        )
        .unwrap();
        assert_eq!(f.points.get("crash_after_commit"), Some(&0.05));
        assert_eq!(f.points.get("delay_ms"), Some(&200.0));
        assert!(!f.points.contains_key("crash_after_publish"));
        assert!(Faults::parse("", &["x"]).unwrap().is_empty());
        assert!(Faults::parse("nonsense", &["x"]).is_err());
        assert!(Faults::parse("a.b=x", &["a"]).is_err());
        assert!(Faults::parse("a.b=-1", &["a"]).is_err());
    }

    #[test]
    fn certain_transient_fires_and_absent_never_does() {
        let f = Faults::parse("payment.transient=1", &["payment"]).unwrap();
        assert!(f.transient());
        assert!(!Faults::none().transient());
    }
}
