//! What every binary does at start and at the end: install the one crypto
//! provider, wait for SIGTERM or SIGINT, and turn a fatal error into an exit
//! code.

use std::process::ExitCode;

/// Installs aws-lc-rs as rustls' process-wide crypto provider: one provider
/// for rustls, tonic, kube and rcgen alike.
pub fn install_crypto_provider() -> anyhow::Result<()> {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Turns `main`'s result into an exit code, printing a fatal error as one line
/// with its causes (`{:#}`) rather than a backtrace.
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
