//! Graceful shutdown: SIGINT or SIGTERM cancels a token that every
//! long-running loop watches.

use tokio_util::sync::CancellationToken;

/// Waits for SIGINT or SIGTERM, then cancels `token`.
pub async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT: shutting down"),
        () = term => tracing::info!("SIGTERM: shutting down"),
        () = token.cancelled() => return,
    }
    token.cancel();
}

/// Runs `pass` every `interval` until `shutdown`; after a failed pass it
/// waits less (100 ms doubling to 3 s) and logs the error as `what` failed.
pub async fn every<F, Fut, E>(what: &str, interval: std::time::Duration, shutdown: &CancellationToken, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let wait = match pass().await {
            Ok(()) => {
                failures = 0;
                interval
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "{what} failed");
                std::time::Duration::from_millis((100u64 << failures.min(5)).min(3_000))
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => {}
        }
    }
}
