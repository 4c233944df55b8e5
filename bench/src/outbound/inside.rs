//! What the benchmark runs inside the pods' namespaces, as this same binary
//! started there by the benchmark with the app's uid: the load generator in
//! pod a (`load`) and the app in pod b (`serve`).
//!
//! `load` speaks to the benchmark in JSON lines on stdout: [`Event::Start`]
//! when the measured window opens (after the warm-up), [`Event::End`] when it
//! closes, with the connections completed inside it and the generator's own
//! CPU time, then [`Event::Errors`] once its connections in flight are done.
//! The benchmark reads the sidecars' CPU time from `/proc` when each of the
//! first two arrives.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

use super::config::{LoadArgs, ServeArgs};
use crate::{harness, load::ClosedLoop, process::procfs};

/// One line of `load`'s output.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The measured window opened.
    Start,
    /// It closed: connections completed in it, its length, and the CPU
    /// ticks the generator used in it.
    End {
        connections: u64,
        seconds: f64,
        cpu_ticks: u64,
    },
    /// Connections that failed over the whole run of the generator (warm-up
    /// and window), and the first failure.
    Errors { count: u64, first: Option<String> },
}

/// Runs `load`: `--concurrency` closed-loop connections to `--target`, each
/// connect → 1 byte → its echo → close (the connection's one request and
/// response), for `--warmup` and then the measured `--duration`.
pub fn load(args: LoadArgs) -> Result<ExitCode> {
    harness::block_on(1, async move {
        let clients = ClosedLoop::start(args.target, args.concurrency);
        tokio::time::sleep(args.warmup).await;
        let (n0, cpu0, t0) = (
            clients.done(),
            procfs::process_ticks("self")?,
            Instant::now(),
        );
        println!("{}", Event::Start.to_json());
        tokio::time::sleep(args.duration).await;
        let (n1, cpu1, seconds) = (
            clients.done(),
            procfs::process_ticks("self")?,
            t0.elapsed().as_secs_f64(),
        );
        let end = Event::End {
            connections: n1 - n0,
            seconds,
            cpu_ticks: cpu1.saturating_sub(cpu0),
        };
        println!("{}", end.to_json());
        let errors = clients.stop().await;
        let errors = Event::Errors {
            count: errors.count,
            first: errors.first,
        };
        println!("{}", errors.to_json());
        Ok(ExitCode::SUCCESS)
    })
}

/// Runs `serve`: the app in pod b. Each connection gets back what it sends
/// until it closes; `ready` on stdout once it listens.
pub fn serve(args: ServeArgs) -> Result<ExitCode> {
    harness::block_on(1, async move {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket
            .bind(args.listen)
            .with_context(|| format!("binding {}", args.listen))?;
        let listener = socket.listen(4096)?;
        println!("ready");
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    tokio::spawn(echo(tcp));
                }
                // Out of descriptors, say: the client counts the failures.
                Err(error) => {
                    eprintln!("accept on {}: {error}", args.listen);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
}

async fn echo(mut tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let mut buf = [0u8; 512];
    while let Ok(n) = tcp.read(&mut buf).await {
        if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

// === impl Event ===

impl Event {
    /// The event as one JSON line.
    pub fn to_json(&self) -> String {
        let value = match self {
            Self::Start => json!({"event": "start"}),
            Self::End {
                connections,
                seconds,
                cpu_ticks,
            } => json!({
                "event": "end",
                "connections": connections,
                "seconds": seconds,
                "cpu_ticks": cpu_ticks,
            }),
            Self::Errors { count, first } => {
                json!({"event": "errors", "count": count, "first": first})
            }
        };
        value.to_string()
    }

    /// Reads a line of `load`'s output; `None` when it is not one.
    pub fn parse(line: &str) -> Option<Self> {
        let value: Value = serde_json::from_str(line).ok()?;
        let u = |k: &str| value.get(k).and_then(Value::as_u64);
        match value.get("event")?.as_str()? {
            "start" => Some(Self::Start),
            "end" => Some(Self::End {
                connections: u("connections")?,
                seconds: value.get("seconds")?.as_f64()?,
                cpu_ticks: u("cpu_ticks")?,
            }),
            "errors" => Some(Self::Errors {
                count: u("count")?,
                first: value.get("first")?.as_str().map(str::to_owned),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_back_as_written() {
        for event in [
            Event::Start,
            Event::End {
                connections: 12_345,
                seconds: 10.0004,
                cpu_ticks: 321,
            },
            Event::Errors {
                count: 2,
                first: Some("connection reset by peer".into()),
            },
            Event::Errors {
                count: 0,
                first: None,
            },
        ] {
            assert_eq!(Event::parse(&event.to_json()), Some(event));
        }
        assert_eq!(Event::parse("ready"), None);
        assert_eq!(Event::parse(r#"{"event":"end"}"#), None);
    }
}
