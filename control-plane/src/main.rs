//! `palisade-control-plane`: parse the command line, set up logging, run.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use palisade_control_plane::{
    app::App,
    ca::init,
    config::{CaCommand, Cli, Command},
};
use palisade_runtime::telemetry;

fn main() -> ExitCode {
    palisade_runtime::exit_code(run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ca(CaCommand::Init(args)) => {
            init::write_root(&args.out, &args.trust_domain, args.validity, args.force)?;
            println!(
                "wrote a new root CA for trust domain {} to {} (tls.crt, tls.key [0600], ca.crt)",
                args.trust_domain,
                args.out.display()
            );
            Ok(())
        }
        Command::Serve(args) => {
            let config = args.into_config()?;
            // kube's client logs whole response bodies on some errors, and a
            // TokenReview response echoes the token under review.
            telemetry::init(&config.log, &["kube_client::client=error"])
                .map_err(anyhow::Error::msg)?;
            rustls::crypto::aws_lc_rs::default_provider()
                .install_default()
                .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?
                .block_on(async {
                    let app = App::build(config).await?;
                    app.run(shutdown_signal()).await
                })
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
