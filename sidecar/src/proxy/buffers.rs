//! Large buffers lent to a connection only while its bytes move.
//!
//! A proxied connection that sits idle holds no buffer: a read is attempted
//! with a buffer taken from this thread's pool, and when the read has nothing
//! yet (`Pending`) the buffer goes straight back. While data flows, 64 KiB
//! reads (four full TLS records) keep the syscall count down; when the flow
//! pauses, memory returns to the pool for the next busy connection.
//!
//! [`ReadAhead`] sits under the TLS layer: rustls asks its transport for 4 KiB
//! at a time, which would cost four `read` calls per record; it gets them from
//! a pooled 64 KiB read instead.

use std::{
    cell::RefCell,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of every pooled buffer.
pub const BUFFER: usize = 64 * 1024;

/// A read this large means the sender is streaming: read on before writing.
const FILL_MORE: usize = 16 * 1024;

/// Buffers a thread keeps for reuse; beyond this they are freed.
const POOL_MAX: usize = 8;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer from this thread's pool, or a new one.
pub fn take() -> Box<[u8]> {
    POOL.with(|pool| pool.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; BUFFER].into_boxed_slice())
}

/// Returns a buffer to this thread's pool.
pub fn give(buffer: Box<[u8]>) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_MAX {
            pool.push(buffer);
        }
    });
}

/// Reads `inner` through a pooled buffer held only while it has unread bytes.
#[derive(Debug)]
pub struct ReadAhead<T> {
    inner: T,
    buffer: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
}

// === impl ReadAhead ===

impl<T> ReadAhead<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buffer: None,
            pos: 0,
            end: 0,
        }
    }

    fn serve(&mut self, out: &mut ReadBuf<'_>) {
        if let Some(buffer) = &self.buffer {
            let n = out.remaining().min(self.end - self.pos);
            out.put_slice(&buffer[self.pos..self.pos + n]);
            self.pos += n;
        }
        if self.pos == self.end
            && let Some(buffer) = self.buffer.take()
        {
            give(buffer);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buffer.is_some() {
            this.serve(out);
            return Poll::Ready(Ok(()));
        }
        if out.remaining() >= BUFFER {
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        let mut buffer = take();
        let mut read = ReadBuf::new(&mut buffer);
        match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                this.buffer = Some(buffer);
                this.pos = 0;
                this.end = n;
                this.serve(out);
                Poll::Ready(Ok(()))
            }
            other => {
                give(buffer);
                other
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T> Drop for ReadAhead<T> {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            give(buffer);
        }
    }
}

/// One direction of a relay: reads into a pooled buffer, writes it out,
/// and holds the buffer only while bytes are in it.
#[derive(Debug, Default)]
pub struct Transfer {
    buffer: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
    read_done: bool,
    need_flush: bool,
    /// Bytes moved so far.
    pub moved: u64,
}

// === impl Transfer ===

impl Transfer {
    /// Moves bytes from `reader` to `writer` until the reader's EOF, then
    /// flushes; the caller shuts the writer down.
    pub fn poll_copy<R, W>(
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
            if self.pos == self.end && !self.read_done {
                let mut buffer = self.buffer.take().unwrap_or_else(take);
                let mut read = ReadBuf::new(&mut buffer);
                match reader.as_mut().poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        if n == 0 {
                            self.read_done = true;
                            give(buffer);
                        } else {
                            self.pos = 0;
                            self.end = n;
                            // A full record's worth suggests more is waiting:
                            // gather it, so one write carries up to 64 KiB.
                            let mut last = n;
                            while last >= FILL_MORE && self.end + FILL_MORE <= buffer.len() {
                                let mut more = ReadBuf::new(&mut buffer[self.end..]);
                                match reader.as_mut().poll_read(cx, &mut more) {
                                    Poll::Ready(Ok(())) if more.filled().is_empty() => {
                                        self.read_done = true;
                                        break;
                                    }
                                    Poll::Ready(Ok(())) => {
                                        last = more.filled().len();
                                        self.end += last;
                                    }
                                    Poll::Ready(Err(e)) => {
                                        give(buffer);
                                        return Poll::Ready(Err(e));
                                    }
                                    Poll::Pending => break,
                                }
                            }
                            self.buffer = Some(buffer);
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        give(buffer);
                        return Poll::Ready(Err(e));
                    }
                    Poll::Pending => {
                        // Idle: the buffer goes back; push out what was written.
                        give(buffer);
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.end {
                let buffer = self.buffer.as_ref().expect("bytes pending imply a buffer");
                let n = ready!(writer.as_mut().poll_write(cx, &buffer[self.pos..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.moved += n as u64;
                self.need_flush = true;
            }
            if let Some(buffer) = self.buffer.take() {
                give(buffer);
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                return Poll::Ready(Ok(self.moved));
            }
        }
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            give(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn read_ahead_serves_small_reads_from_one_large_one() {
        let (mut a, b) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&data).await.expect("write");
        drop(a);
        let mut reader = ReadAhead::new(b);
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        loop {
            let n = reader.read(&mut small).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, data);
        assert!(reader.buffer.is_none(), "a drained reader holds no buffer");
    }
}
