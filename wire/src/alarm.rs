//! Waits shorter and more exact than tokio's timer allows.
//!
//! tokio's timer wheel ticks every millisecond and rounds a deadline up to
//! the next tick, so a 1 ms linger waits 1 to 2 ms, and anything below a
//! millisecond cannot be asked for. A linger sits on every hop of a saga
//! (each consumer's batch and each relay's send wait for it while busy), so
//! its rounding is paid several times per saga. An [`Alarm`] is a Linux
//! `timerfd` registered with tokio's reactor: it fires within tens of
//! microseconds of the deadline. Elsewhere, or if the kernel refuses a
//! timerfd, it falls back to tokio's timer.

use std::io;
use std::time::Duration;

/// A reusable one-shot timer for one task. Not shared: each waiter owns one.
#[derive(Debug)]
pub struct Alarm {
    #[cfg(target_os = "linux")]
    fd: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
}

impl Alarm {
    /// A new alarm. Must be called inside a tokio runtime (it registers a
    /// file descriptor with the reactor); if that fails, the alarm uses
    /// tokio's timer instead.
    pub fn new() -> Self {
        #[cfg(target_os = "linux")]
        {
            let fd = linux::timerfd().and_then(|fd| {
                // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the
                // same descriptor until the AsyncFd is dropped.
                unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                    .map_err(io::Error::from)
            });
            match fd {
                Ok(fd) => Self { fd: Some(fd) },
                Err(e) => {
                    tracing::debug!(error = %e, "no timerfd: lingers use tokio's millisecond timer");
                    Self { fd: None }
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        Self {}
    }

    /// Waits until `deadline` (tokio's clock), measured from the first poll.
    pub async fn sleep_until(&self, deadline: tokio::time::Instant) {
        self.sleep(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await;
    }

    /// Waits `wait` (returns at once for zero).
    pub async fn sleep(&self, wait: Duration) {
        if wait.is_zero() {
            return;
        }
        #[cfg(target_os = "linux")]
        // A failed timerfd call falls through to tokio's timer.
        if let Some(fd) = &self.fd
            && linux::wait(fd, wait).await.is_ok()
        {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

impl Default for Alarm {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Duration;

    use tokio::io::unix::AsyncFd;

    pub fn timerfd() -> io::Result<OwnedFd> {
        // SAFETY: plain syscall; the returned descriptor is owned below.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Arms the timer (which also clears an expiry left from a wait that was
    /// abandoned) and waits for it to fire.
    pub async fn wait(fd: &AsyncFd<OwnedFd>, wait: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(wait.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(wait.subsec_nanos().max(1)),
            },
        };
        // SAFETY: valid descriptor, valid pointer to a local struct, null old value.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut ready = fd.readable().await?;
            let mut expirations = 0u64;
            // SAFETY: reads 8 bytes into a local u64, as timerfd requires.
            let n = unsafe {
                libc::read(
                    fd.as_raw_fd(),
                    std::ptr::addr_of_mut!(expirations).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
            if n == 8 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
            // Readiness left from an earlier arming: wait for this one.
            ready.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn waits_about_as_long_as_asked() {
        let alarm = Alarm::new();
        for micros in [300u64, 1_000, 2_500] {
            let wait = Duration::from_micros(micros);
            let start = Instant::now();
            alarm.sleep(wait).await;
            let took = start.elapsed();
            assert!(took >= wait, "{micros} µs: returned after {took:?}");
        }
    }

    #[tokio::test]
    async fn an_abandoned_wait_does_not_cut_the_next_one_short() {
        let alarm = Alarm::new();
        // Arm a short wait and drop it before it fires, then let it expire
        // and the reactor see it.
        {
            use futures::FutureExt;
            assert!(alarm.sleep(Duration::from_micros(200)).now_or_never().is_none());
        }
        std::thread::sleep(Duration::from_millis(1));
        tokio::task::yield_now().await;
        let wait = Duration::from_millis(3);
        let start = Instant::now();
        alarm.sleep(wait).await;
        assert!(start.elapsed() >= wait, "the stale expiry ended the new wait early");
    }
}
