//! `palisade-kube-stand-in`: the stand-in Kubernetes API server of
//! `palisade_tests::kube` as a process, for tests that are not Rust (the
//! Python chart tests).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use palisade_tests::kube::{ApiServer, GoneForm, Seed};
use serde_json::json;

/// A stand-in Kubernetes API server on loopback, for tests.
///
/// It serves HTTPS with a CA it makes at start, and prints one JSON line on
/// stdout when ready: {"url", "addr", "token", "kubeconfig", "caFile"}.
/// It stops when its standard input closes (run it with a pipe, and close
/// it or exit to stop it) or on SIGTERM/SIGINT.
///
/// What it serves, the seed file and the control endpoints under
/// /stand-in/ (request record, objects, TokenReview answers, faults,
/// compaction, watch closing, bookmarks, pod proxies) are described in
/// docs/testing.md, "The stand-in Kubernetes API server".
#[derive(Debug, Parser)]
#[command(name = "palisade-kube-stand-in", version)]
struct Config {
    /// A YAML or JSON file with `objects` (any served kind, CRDs first),
    /// `tokenReviews` (token -> answer) and `faults` to start with.
    #[arg(long, value_name = "FILE")]
    seed: Option<PathBuf>,

    /// Write a kubeconfig for the stand-in (its URL, CA inline, token) here.
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,

    /// The namespace of the kubeconfig's context.
    #[arg(long, value_name = "NAME")]
    namespace: Option<String>,

    /// Write the stand-in's CA certificate (PEM) here.
    #[arg(long, value_name = "PATH")]
    ca_file: Option<PathBuf>,

    /// A bearer token clients may use (repeatable); the first goes into the
    /// kubeconfig. Default: stand-in-client-token.
    #[arg(long, value_name = "TOKEN")]
    token: Vec<String>,

    /// Where to listen.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// Send a BOOKMARK this often on watches that allow them (e.g. 1s);
    /// without it, only on POST /stand-in/bookmark.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    bookmark_interval: Option<Duration>,

    /// How a watch of compacted history is refused: `event` (200 and an
    /// ERROR event with 410 Expired, as the real watch cache) or `http` (a
    /// 410 response).
    #[arg(long, value_name = "FORM", default_value = "event", value_parser = parse_gone)]
    gone: GoneForm,
}

fn parse_gone(text: &str) -> Result<GoneForm, String> {
    match text {
        "event" => Ok(GoneForm::Event),
        "http" => Ok(GoneForm::Http),
        other => Err(format!("{other:?} is neither `event` nor `http`")),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    let seed: Seed = match &config.seed {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --seed {}", path.display()))?;
            serde_saphyr::from_str(&text)
                .with_context(|| format!("--seed {}: not a seed file", path.display()))?
        }
        None => Seed::default(),
    };
    let mut builder = ApiServer::builder()
        .listen(config.listen)
        .gone_form(config.gone)
        .seed(seed);
    for token in &config.token {
        builder = builder.client_token(token.clone());
    }
    if let Some(every) = config.bookmark_interval {
        builder = builder.bookmark_interval(every);
    }
    let api = builder.start().await.context("starting the stand-in")?;
    if let Some(path) = &config.kubeconfig {
        api.write_kubeconfig(path, config.namespace.as_deref())?;
    }
    if let Some(path) = &config.ca_file {
        std::fs::write(path, api.ca_pem())
            .with_context(|| format!("writing --ca-file {}", path.display()))?;
    }
    println!(
        "{}",
        json!({
            "url": api.url(),
            "addr": api.addr().to_string(),
            "token": api.token(),
            "kubeconfig": config.kubeconfig,
            "caFile": config.ca_file,
        })
    );

    let (closed, stdin_closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        // Blocks until EOF or an error: either way the parent is gone.
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = closed.send(());
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = stdin_closed => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    api.shutdown().await;
    Ok(())
}
