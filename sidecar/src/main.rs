//! `palisade-sidecar`: parse the command line, set up logging, run.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use palisade_sidecar::{
    config::{Cli, Command},
    credentials,
    identity::IdentityClient,
};

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the chain of causes on one line, without a backtrace.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PALISADE_LOG_LEVEL")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match cli.command {
        Command::Certify(args) => runtime.block_on(async {
            let client = IdentityClient::new(args.client_config());
            let creds = client.certify().await?;
            credentials::write(&args.out, &creds)
                .with_context(|| format!("writing credentials to {}", args.out.display()))?;
            println!(
                "certified {} serial={} not_after={} -> {}",
                args.identity,
                creds.serial,
                humantime::format_rfc3339_seconds(creds.not_after),
                args.out.display()
            );
            Ok(())
        }),
    }
}
