//! Copies bytes both ways between the two sides of a proxied connection.
//!
//! Half-close is carried across: when one side finishes sending, the other
//! side's write half is shut down (for TLS: close_notify, then FIN) and the
//! opposite direction goes on until it finishes too. Each direction borrows a
//! 64 KiB buffer from the thread's pool only while bytes are in flight (see
//! [`super::buffers`]), so an idle connection holds none. Bytes are counted as
//! they pass, so long-lived connections show up in `palisade_bytes_total`
//! while they run.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use prometheus::IntCounter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

use super::buffers::Transfer;
use crate::metrics::ByteCounters;

/// Relays between `client` (the side that connected to us) and `server` until
/// both directions are done, or nothing moved for `idle`. Returns the bytes
/// sent each way (client→server, server→client).
pub async fn relay<C, S>(
    client: C,
    server: S,
    counters: &ByteCounters,
    idle: Option<Duration>,
) -> io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    relay_tallied(client, server, counters, idle, &Arc::new(Activity::new())).await
}

/// [`relay`], counting into `tally` as bytes pass, so what moved is known
/// also when the relay ends in an error or is dropped (a revoked peer).
pub async fn relay_tallied<C, S>(
    client: C,
    server: S,
    counters: &ByteCounters,
    idle: Option<Duration>,
    tally: &Arc<Activity>,
) -> io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let activity = tally.clone();
    let mut client = Counted::new(
        client,
        counters.request.clone(),
        Side::Client,
        activity.clone(),
    );
    let mut server = Counted::new(
        server,
        counters.response.clone(),
        Side::Server,
        activity.clone(),
    );
    let copy = bidirectional(&mut client, &mut server);
    let Some(idle) = idle else {
        return copy.await;
    };
    tokio::pin!(copy);
    loop {
        let deadline = activity.last() + idle;
        tokio::select! {
            result = &mut copy => return result,
            () = tokio::time::sleep_until(deadline) => {
                if activity.last() + idle <= Instant::now() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                }
            }
        }
    }
}

/// One direction's progress.
#[derive(Debug)]
enum Direction {
    Copying(Transfer),
    ShuttingDown(u64),
    Done(u64),
}

impl Direction {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            match self {
                Self::Copying(transfer) => {
                    let n = ready!(transfer.poll_copy(cx, reader.as_mut(), writer.as_mut()))?;
                    *self = Self::ShuttingDown(n);
                }
                Self::ShuttingDown(n) => {
                    ready!(writer.as_mut().poll_shutdown(cx))?;
                    *self = Self::Done(*n);
                }
                Self::Done(n) => return Poll::Ready(Ok(*n)),
            }
        }
    }
}

/// Copies both ways until both are done; the first error ends both.
async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a_to_b = Direction::Copying(Transfer::default());
    let mut b_to_a = Direction::Copying(Transfer::default());
    std::future::poll_fn(|cx| {
        let forth = a_to_b.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let back = b_to_a.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (forth, back) {
            (Poll::Ready(forth), Poll::Ready(back)) => Poll::Ready(Ok((forth, back))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// When bytes last moved on one connection, and how many each way.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    from_client: AtomicU64,
    from_server: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Which side a stream is.
#[derive(Clone, Copy, Debug)]
enum Side {
    Client,
    Server,
}

impl Activity {
    /// Nothing moved yet; the clock starts now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            from_client: AtomicU64::new(0),
            from_server: AtomicU64::new(0),
        }
    }

    /// Bytes read so far from the client and from the server.
    pub fn moved(&self) -> (u64, u64) {
        (
            self.from_client.load(Ordering::Relaxed),
            self.from_server.load(Ordering::Relaxed),
        )
    }

    /// Time since [`Activity::new`].
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    fn touch(&self, side: Side, n: u64) {
        match side {
            Side::Client => self.from_client.fetch_add(n, Ordering::Relaxed),
            Side::Server => self.from_server.fetch_add(n, Ordering::Relaxed),
        };
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Counts the bytes read from a stream.
#[derive(Debug)]
struct Counted<T> {
    inner: T,
    read: IntCounter,
    side: Side,
    activity: Arc<Activity>,
}

impl<T> Counted<T> {
    fn new(inner: T, read: IntCounter, side: Side, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            read,
            side,
            activity,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.inc_by(n as u64);
            self.activity.touch(self.side, n as u64);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn counters() -> ByteCounters {
        ByteCounters {
            request: IntCounter::new("req", "req").expect("counter"),
            response: IntCounter::new("resp", "resp").expect("counter"),
        }
    }

    #[tokio::test]
    async fn half_close_is_carried_across_and_the_other_way_goes_on() {
        // app <-> [client side | relay | server side] <-> upstream
        let (mut app, client_side) = tokio::io::duplex(1024);
        let (server_side, mut upstream) = tokio::io::duplex(1024);
        let counters = counters();
        let relay = tokio::spawn({
            let counters = counters.clone();
            async move { relay(client_side, server_side, &counters, None).await }
        });

        app.write_all(b"request").await.expect("write");
        app.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        upstream
            .read_to_end(&mut got)
            .await
            .expect("upstream sees EOF");
        assert_eq!(got, b"request");

        // The upstream can still answer after the client's half-close.
        upstream.write_all(b"response").await.expect("write");
        upstream.shutdown().await.expect("close");
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"response");

        let (up, down) = relay.await.expect("task").expect("relay");
        assert_eq!((up, down), (7, 8));
        assert_eq!(counters.request.get(), 7);
        assert_eq!(counters.response.get(), 8);
    }

    #[tokio::test]
    async fn the_tally_knows_what_moved_when_the_relay_is_dropped() {
        let (mut app, client_side) = tokio::io::duplex(1024);
        let (server_side, mut upstream) = tokio::io::duplex(1024);
        let counters = counters();
        let tally = Arc::new(Activity::new());
        let relay = tokio::spawn({
            let (counters, tally) = (counters.clone(), tally.clone());
            async move { relay_tallied(client_side, server_side, &counters, None, &tally).await }
        });
        app.write_all(b"hello").await.expect("write");
        let mut got = [0; 5];
        upstream.read_exact(&mut got).await.expect("read");
        upstream.write_all(b"hi").await.expect("write");
        let mut back = [0; 2];
        app.read_exact(&mut back).await.expect("read");
        // Neither side closed: the relay is cut, as a revoked peer's is.
        relay.abort();
        assert!(relay.await.expect_err("aborted").is_cancelled());
        assert_eq!(tally.moved(), (5, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_after_the_idle_timeout() {
        let (_app, client_side) = tokio::io::duplex(1024);
        let (server_side, _upstream) = tokio::io::duplex(1024);
        let err = relay(
            client_side,
            server_side,
            &counters(),
            Some(Duration::from_secs(30)),
        )
        .await
        .expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
