//! Protocol detection on the inbound side: is this a mesh TLS ClientHello
//! (offering ALPN `palisade/1`), some other TLS, or not TLS at all?
//!
//! The first bytes are read (not peeked: peeking cannot wait for more data
//! without spinning) and parsed with rustls' own ClientHello parser; the bytes
//! are handed back so the next stage sees the connection from its first byte.

use std::{io, time::Duration};

use palisade_proto::MESH_ALPN;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt};

/// TLS record type of a handshake message.
const HANDSHAKE: u8 = 0x16;
/// A ClientHello larger than this is not worth waiting for.
const MAX_DETECT_BYTES: usize = 64 * 1024;

/// What the client sent first.
#[derive(Debug, PartialEq, Eq)]
pub enum Protocol {
    /// A TLS ClientHello offering `palisade/1`.
    MeshTls,
    /// A TLS ClientHello without `palisade/1`: the app's own TLS.
    OtherTls,
    /// Anything else: bytes that are not a TLS handshake.
    NotTls,
    /// A TLS record that does not hold a parsable ClientHello.
    BadTls,
}

/// Why detection ended without a verdict.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("the client sent nothing within {0:?}")]
    Timeout(Duration),
    #[error("the client closed the connection after {0} bytes, before a verdict")]
    Closed(usize),
    #[error("reading the client failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads from `io` until the first bytes tell what they are, within `timeout`.
/// Returns the verdict and every byte read.
pub async fn detect<T: AsyncRead + Unpin>(
    io: &mut T,
    timeout: Duration,
) -> Result<(Protocol, Vec<u8>), DetectError> {
    let mut buf = Vec::with_capacity(2048);
    let read = async {
        loop {
            if let Some(protocol) = classify(&buf) {
                return Ok(protocol);
            }
            if buf.len() >= MAX_DETECT_BYTES {
                return Ok(Protocol::BadTls);
            }
            buf.reserve(4096);
            let n = io.read_buf(&mut buf).await?;
            if n == 0 {
                return Err(DetectError::Closed(buf.len()));
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(protocol)) => Ok((protocol, buf)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(DetectError::Timeout(timeout)),
    }
}

/// A verdict from `buf`, or `None` when more bytes are needed.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    let first = *buf.first()?;
    if first != HANDSHAKE {
        return Some(Protocol::NotTls);
    }
    if buf.len() < 3 {
        return None;
    }
    // A record header: type, legacy version 3.x, length.
    if buf[1] != 0x03 {
        return Some(Protocol::NotTls);
    }
    let mut acceptor = Acceptor::default();
    let mut rest = buf;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Some(Protocol::BadTls),
        }
    }
    match acceptor.accept() {
        Ok(None) => None,
        Ok(Some(accepted)) => {
            let mesh = accepted
                .client_hello()
                .alpn()
                .is_some_and(|mut protocols| protocols.any(|p| p == MESH_ALPN));
            Some(if mesh {
                Protocol::MeshTls
            } else {
                Protocol::OtherTls
            })
        }
        Err(_) => Some(Protocol::BadTls),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let mut conn = rustls::ClientConnection::new(
            Arc::new(config),
            "example.org".try_into().expect("name"),
        )
        .expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("ClientHello");
        out
    }

    #[test]
    fn a_client_hello_offering_the_mesh_alpn_is_mesh_tls() {
        let hello = client_hello(&[b"h2", MESH_ALPN]);
        assert_eq!(classify(&hello), Some(Protocol::MeshTls));
        // Every prefix is "not yet".
        for n in [1, 2, 5, hello.len() / 2, hello.len() - 1] {
            assert_eq!(classify(&hello[..n]), None, "prefix of {n} bytes");
        }
    }

    #[test]
    fn other_tls_plaintext_and_garbage_are_told_apart() {
        assert_eq!(classify(&client_hello(&[b"h2"])), Some(Protocol::OtherTls));
        assert_eq!(classify(&client_hello(&[])), Some(Protocol::OtherTls));
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::NotTls));
        assert_eq!(classify(b"\x16\x01\x00"), Some(Protocol::NotTls));
        // A handshake record whose body is not a ClientHello.
        let mut bad = vec![0x16, 0x03, 0x01, 0x00, 0x08];
        bad.extend_from_slice(&[0xff; 8]);
        assert_eq!(classify(&bad), Some(Protocol::BadTls));
    }

    #[tokio::test]
    async fn a_silent_client_times_out_and_a_closing_one_is_reported() {
        let (_keep, mut silent) = tokio::io::duplex(64);
        let err = detect(&mut silent, Duration::from_millis(50))
            .await
            .expect_err("silent");
        assert!(matches!(err, DetectError::Timeout(_)));

        let hello = client_hello(&[MESH_ALPN]);
        let (mut tx, mut rx) = tokio::io::duplex(64 * 1024);
        tokio::io::AsyncWriteExt::write_all(&mut tx, &hello[..hello.len() / 2])
            .await
            .expect("write");
        drop(tx);
        let err = detect(&mut rx, Duration::from_secs(1))
            .await
            .expect_err("truncated");
        assert!(matches!(err, DetectError::Closed(n) if n == hello.len() / 2));
    }

    /// Writes `bytes` into a pipe that holds 512 bytes at a time, so the
    /// reader sees them in many small reads; the writer stays open.
    fn trickle(bytes: Vec<u8>) -> (tokio::task::JoinHandle<()>, tokio::io::DuplexStream) {
        let (mut tx, rx) = tokio::io::duplex(512);
        let writer = tokio::spawn(async move {
            tokio::io::AsyncWriteExt::write_all(&mut tx, &bytes)
                .await
                .expect("write");
            // Hold the connection open: the verdict must not depend on EOF.
            std::future::pending::<()>().await;
        });
        (writer, rx)
    }

    #[tokio::test]
    async fn a_large_client_hello_arriving_in_pieces_is_still_recognised() {
        // 40 protocols of 250 bytes: a ClientHello of about 11 KiB.
        let long: Vec<Vec<u8>> = (0..40u8).map(|i| vec![b'a' + i % 26; 250]).collect();
        let mut alpn: Vec<&[u8]> = long.iter().map(Vec::as_slice).collect();
        alpn.push(MESH_ALPN);
        let hello = client_hello(&alpn);
        assert!(hello.len() > 10 * 1024, "{} bytes", hello.len());
        let (writer, mut rx) = trickle(hello.clone());
        let (protocol, bytes) = detect(&mut rx, Duration::from_secs(5))
            .await
            .expect("detect");
        writer.abort();
        assert_eq!(protocol, Protocol::MeshTls);
        assert_eq!(bytes, hello);
    }

    #[tokio::test]
    async fn a_client_hello_that_never_ends_is_bad_tls_within_the_byte_bound() {
        // Handshake records that promise one ClientHello of 0xffff bytes and
        // never finish it: a client feeding bytes slowly forever. rustls'
        // record buffer (about 18 KiB) gives up first; `MAX_DETECT_BYTES` is
        // the bound behind it.
        let mut stream = Vec::new();
        let mut body = vec![0x01, 0x00, 0xff, 0xff];
        body.resize(0xffff + 4, 0);
        for chunk in body.chunks(16 * 1024) {
            stream.extend_from_slice(&[HANDSHAKE, 0x03, 0x01]);
            stream.extend_from_slice(&u16::try_from(chunk.len()).expect("record").to_be_bytes());
            stream.extend_from_slice(chunk);
        }
        stream.truncate(MAX_DETECT_BYTES);
        let (writer, mut rx) = trickle(stream);
        let started = std::time::Instant::now();
        let (protocol, bytes) = detect(&mut rx, Duration::from_secs(30))
            .await
            .expect("a verdict");
        writer.abort();
        assert_eq!(protocol, Protocol::BadTls);
        assert!(
            bytes.len() <= MAX_DETECT_BYTES,
            "{} bytes read",
            bytes.len()
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(MAX_DETECT_BYTES, 64 * 1024);
    }

    #[tokio::test]
    async fn the_bytes_read_are_handed_back() {
        let hello = client_hello(&[MESH_ALPN]);
        let (mut tx, mut rx) = tokio::io::duplex(64 * 1024);
        tokio::io::AsyncWriteExt::write_all(&mut tx, &hello)
            .await
            .expect("write");
        let (protocol, bytes) = detect(&mut rx, Duration::from_secs(1))
            .await
            .expect("detect");
        assert_eq!(protocol, Protocol::MeshTls);
        assert_eq!(bytes, hello);
    }
}
