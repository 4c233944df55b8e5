//! Load generation shared by the benchmarks: the backend behind the systems
//! (echo, or a sink that counts), the one-byte echo that proves a connection
//! works end to end, and closed-loop clients that open connection after
//! connection (each one a full mutual handshake through a proxy pair).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinSet,
};

/// Bulk write size, and the backend's read buffer.
pub const BULK_BUF: usize = 64 * 1024;
/// A single connection attempt (connect + 1-byte echo) gives up after this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An echo server; a connection whose first byte is `S` is a sink instead:
/// everything after it is discarded and counted.
#[derive(Debug)]
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    sunk: Arc<AtomicU64>,
}

/// Closed-loop clients: each connects through an address, sends one byte,
/// reads its echo, closes, and starts over, until stopped.
#[derive(Debug)]
pub struct ClosedLoop {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    first_error: Arc<Mutex<Option<String>>>,
    workers: JoinSet<()>,
}

/// What closed-loop clients saw besides the connections that worked.
#[derive(Debug)]
pub struct LoopErrors {
    /// Connections that failed or timed out, over the whole run of the loop.
    pub count: u64,
    /// The first of them.
    pub first: Option<String>,
}

// === impl Backend ===

impl Backend {
    /// Starts the backend on a thread (and a single-threaded runtime) of its
    /// own, so that it does not compete with the load generator's runtime.
    pub fn start() -> Result<Self> {
        let sunk = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        let counter = sunk.clone();
        std::thread::Builder::new()
            .name("backend".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(anyhow!(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match listen() {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(listener.local_addr().map_err(Into::into));
                    accept_loop(listener, counter).await;
                });
            })
            .context("spawning the backend thread")?;
        let addr = rx.recv().context("the backend thread died")??;
        Ok(Self { addr, sunk })
    }

    /// Starts the backend as a task of the current tokio runtime, sharing its
    /// workers with the load generator.
    pub fn spawn() -> Result<Self> {
        let sunk = Arc::new(AtomicU64::new(0));
        let listener = listen()?;
        let addr = listener.local_addr()?;
        tokio::spawn(accept_loop(listener, sunk.clone()));
        Ok(Self { addr, sunk })
    }

    /// Bytes the sink connections received so far.
    pub fn sunk(&self) -> u64 {
        self.sunk.load(Ordering::Relaxed)
    }
}

fn listen() -> Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    Ok(socket.listen(4096)?)
}

async fn accept_loop(listener: TcpListener, sunk: Arc<AtomicU64>) {
    while let Ok((tcp, _)) = listener.accept().await {
        let sunk = sunk.clone();
        tokio::spawn(async move {
            let _ = serve(tcp, &sunk).await;
        });
    }
}

async fn serve(mut tcp: TcpStream, sunk: &AtomicU64) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut buf = vec![0u8; BULK_BUF];
    let n = tcp.read(&mut buf).await?;
    if n == 0 {
        return Ok(());
    }
    if buf[0] == b'S' {
        sunk.fetch_add(n as u64 - 1, Ordering::Relaxed);
        loop {
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            sunk.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    tcp.write_all(&buf[..n]).await?;
    loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            tcp.shutdown().await?;
            return Ok(());
        }
        tcp.write_all(&buf[..n]).await?;
    }
}

/// Connects, sends one byte and reads its echo; the connection stays open.
pub async fn echo_conn(entry: SocketAddr) -> std::io::Result<TcpStream> {
    let mut tcp = TcpStream::connect(entry).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(b"E").await?;
    let mut b = [0u8; 1];
    tcp.read_exact(&mut b).await?;
    Ok(tcp)
}

/// Waits up to `timeout` until a 1-byte echo through `entry` works.
pub async fn wait_echo(entry: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout(Duration::from_secs(3), echo_conn(entry)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if Instant::now() > deadline => {
                bail!("no echo through {entry}: {e}")
            }
            Err(_) if Instant::now() > deadline => bail!("no echo through {entry}: timed out"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

// === impl ClosedLoop ===

impl ClosedLoop {
    /// Starts `clients` workers on the current runtime against `entry`. A
    /// failed attempt is counted and followed by a 10 ms pause.
    pub fn start(entry: SocketAddr, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let first_error: Arc<Mutex<Option<String>>> = Arc::default();
        let mut workers = JoinSet::new();
        for _ in 0..clients {
            let (stop, done, errors, first_error) = (
                stop.clone(),
                done.clone(),
                errors.clone(),
                first_error.clone(),
            );
            workers.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(CONNECT_TIMEOUT, echo_conn(entry)).await {
                        Ok(Ok(tcp)) => {
                            drop(tcp);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        outcome => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            let text = match outcome {
                                Ok(Err(e)) => e.to_string(),
                                _ => "timed out".to_owned(),
                            };
                            if let Ok(mut slot) = first_error.lock() {
                                slot.get_or_insert(text);
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            });
        }
        Self {
            stop,
            done,
            errors,
            first_error,
            workers,
        }
    }

    /// Connections completed so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Stops the workers (waiting for the attempts in flight, up to their
    /// timeout) and returns the errors.
    pub async fn stop(mut self) -> LoopErrors {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(2), async {
            while self.workers.join_next().await.is_some() {}
        })
        .await;
        self.workers.abort_all();
        LoopErrors {
            count: self.errors.load(Ordering::Relaxed),
            first: self.first_error.lock().ok().and_then(|e| e.clone()),
        }
    }
}
