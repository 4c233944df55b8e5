//! `palisade-sidecar`: parse the command line, set up logging, run.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use palisade_runtime::{
    process::{self, shutdown_signal},
    telemetry,
};
use palisade_sidecar::{
    app::App,
    capture,
    config::{Cli, Command},
    credentials,
    identity::IdentityClient,
};

fn main() -> ExitCode {
    process::exit_code(run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    process::install_crypto_provider()?;
    telemetry::init(&cli.log_config(), &[]).map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Run(args) => {
            let config = args.into_config()?;
            runtime(true, config.worker_threads)?.block_on(async {
                let app = App::build(config).await?;
                app.run(shutdown_signal()).await
            })
        }
        Command::Init(args) => {
            let config = args.capture_config();
            if args.dry_run {
                print!("{}", capture::rules(&config, capture::Family::V4)?);
                if config.ipv6 {
                    print!("{}", capture::rules(&config, capture::Family::V6)?);
                }
                return Ok(());
            }
            if args.remove {
                capture::remove(&config)?;
                println!("removed the palisade capture rules");
            } else {
                capture::install(&config)?;
                println!(
                    "installed the palisade capture rules: outbound -> {}, inbound -> {}",
                    config.outbound_port, config.inbound_port
                );
            }
            Ok(())
        }
        Command::Certify(args) => runtime(false, 0)?.block_on(async {
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

/// A tokio runtime; `worker_threads` 0 is one per CPU.
fn runtime(multi_thread: bool, worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    if multi_thread && worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    builder
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}
