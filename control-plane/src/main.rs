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
use palisade_runtime::{
    process::{self, shutdown_signal},
    telemetry,
};

fn main() -> ExitCode {
    process::exit_code(run(Cli::parse()))
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
        Command::Crds => {
            print!("{}", palisade_control_plane::policy::crds_yaml());
            Ok(())
        }
        Command::Serve(args) => {
            let config = args.into_config(cli.log.config())?;
            // kube's client logs whole response bodies on some errors, and a
            // TokenReview response echoes the token under review.
            telemetry::init(&config.log, &["kube_client::client=error"])
                .map_err(anyhow::Error::msg)?;
            process::install_crypto_provider()?;
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
