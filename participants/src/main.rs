use clap::Parser;
use skald_participants::app::{Cli, Participant};
use tokio_util::sync::CancellationToken;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    skald_wire::telemetry::init("info,sqlx=warn,lapin=warn");
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    tokio::spawn(skald_wire::shutdown::cancel_on_signal(shutdown.clone()));
    match Participant::build(cli.which, &cli.config).await {
        Ok(p) => p.run(shutdown).await,
        Err(e) => {
            eprintln!(
                "participant {:?}: {}",
                cli.which,
                skald_wire::telemetry::one_line(e.as_ref())
            );
            std::process::exit(1);
        }
    }
}
