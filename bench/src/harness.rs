//! What every benchmark binary does around its run: a tokio runtime with the
//! worker threads asked for, an end on SIGINT, SIGTERM or SIGHUP (dropping the
//! run's future stops every process it started and removes its temporary
//! directory), and the exit code.

use std::{future::Future, process::ExitCode};

use anyhow::{Context, Result, anyhow};

/// Runs `run` on a new multi-threaded runtime with `worker_threads` workers
/// until it ends or a signal arrives.
pub fn block_on<T>(worker_threads: usize, run: impl Future<Output = Result<T>>) -> Result<T> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        tokio::select! {
            result = run => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted (SIGINT)")),
            _ = term.recv() => Err(anyhow!("terminated (SIGTERM)")),
            _ = hup.recv() => Err(anyhow!("hung up (SIGHUP)")),
        }
    })
}

/// The exit code of a run; an error is printed as `name: error`.
pub fn exit_code(name: &str, result: Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("{name}: {error:#}");
            ExitCode::FAILURE
        }
    }
}
