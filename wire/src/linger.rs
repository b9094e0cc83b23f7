//! How long a batch waits for more work once it has some.
//!
//! Waiting builds bigger batches (fewer transactions and broker round trips)
//! but adds its wait to every hop. It pays only while work keeps coming, so
//! a batch lingers only if it began soon after the previous one ended
//! (within [`BUSY_GAP`] by default, or within the gap given to
//! [`Linger::with_busy_gap`]); a lone message at low load goes at once.

use std::time::Duration;

use tokio::time::Instant;

/// A batch that begins within this many lingers of the previous one's end
/// lingers. Measured: 2 lingered too rarely to help at 313 orders/s.
pub const BUSY_GAP: u32 = 5;

/// Parses a linger setting: milliseconds, a decimal fraction allowed
/// (`1`, `0.3`), between 0 and 1,000. For clap's `value_parser`.
pub fn parse_millis(s: &str) -> Result<Duration, String> {
    let ms: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of milliseconds (e.g. 1 or 0.3)"))?;
    if !(0.0..=1_000.0).contains(&ms) {
        return Err(format!("{s} ms is out of range: 0 to 1000"));
    }
    Ok(Duration::from_secs_f64(ms / 1_000.0))
}

#[derive(Debug, Clone)]
pub struct Linger {
    wait: Duration,
    /// A batch that begins less than this after the previous one's end lingers.
    busy_gap: Duration,
    last_end: Option<Instant>,
}

impl Linger {
    /// `wait` of zero never waits. Busy means within [`BUSY_GAP`] lingers
    /// of the previous batch's end.
    pub fn new(wait: Duration) -> Self {
        Self::with_busy_gap(wait, wait * BUSY_GAP)
    }

    /// Lingers only if the batch begins less than `busy_gap` after the
    /// previous one's end.
    pub fn with_busy_gap(wait: Duration, busy_gap: Duration) -> Self {
        Self {
            wait,
            busy_gap,
            last_end: None,
        }
    }

    /// Call when a batch has its first item: how long it may wait for more.
    pub fn begin(&self) -> Duration {
        let now = Instant::now();
        match self.last_end {
            Some(end) if now.saturating_duration_since(end) < self.busy_gap => self.wait,
            _ => Duration::ZERO,
        }
    }

    /// Call when a batch is done.
    pub fn end(&mut self) {
        self.last_end = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ends a batch, lets `pause` pass, and begins the next one.
    async fn begin_after(linger: &mut Linger, pause: Duration) -> Duration {
        linger.end();
        tokio::time::advance(pause).await;
        linger.begin()
    }

    #[test]
    fn settings_take_fractions_of_a_millisecond() {
        assert_eq!(parse_millis("1"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_millis("0.3"), Ok(Duration::from_micros(300)));
        assert_eq!(parse_millis("0"), Ok(Duration::ZERO));
        assert!(parse_millis("-1").is_err());
        assert!(parse_millis("NaN").is_err());
        assert!(parse_millis("5000").is_err());
        assert!(parse_millis("1ms").unwrap_err().contains("not a number"));
    }

    #[tokio::test(start_paused = true)]
    async fn lingers_only_right_after_a_batch() {
        let ms = Duration::from_millis;
        let mut linger = Linger::new(ms(1));
        assert_eq!(linger.begin(), Duration::ZERO, "the first batch goes at once");
        let half = Duration::from_micros(500);
        assert_eq!(begin_after(&mut linger, half).await, ms(1), "work keeps coming");
        assert_eq!(begin_after(&mut linger, ms(4)).await, ms(1), "still busy");
        assert_eq!(
            begin_after(&mut linger, ms(5)).await,
            Duration::ZERO,
            "a lone message after a pause"
        );
        let mut narrow = Linger::with_busy_gap(ms(5), ms(5));
        assert_eq!(begin_after(&mut narrow, ms(4)).await, ms(5), "within the gap");
        assert_eq!(begin_after(&mut narrow, ms(6)).await, Duration::ZERO, "beyond the gap");
        let mut never = Linger::new(Duration::ZERO);
        never.end();
        assert_eq!(never.begin(), Duration::ZERO);
    }
}
