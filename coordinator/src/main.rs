use clap::Parser;
use skald_coordinator::{Application, Config};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc malloc: the profile at 460 orders/s showed
/// malloc and its consolidation passes among the hottest user-space code.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let config = Config::parse();
    let telemetry = skald_wire::telemetry::init("skald-coordinator", "info,sqlx=warn,lapin=warn");
    let shutdown = CancellationToken::new();
    tokio::spawn(skald_wire::shutdown::cancel_on_signal(shutdown.clone()));
    let result = async {
        let app = Application::build(config).await?;
        app.run_until_stopped(shutdown).await
    }
    .await;
    // Flushing spans blocks: not on a runtime worker.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    if let Err(e) = result {
        eprintln!("coordinator: {}", skald_wire::telemetry::one_line(e.as_ref()));
        std::process::exit(1);
    }
}
