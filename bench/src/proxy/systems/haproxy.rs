//! haproxy 2.6 as either side of a pair: `mode tcp`, one thread, TLS 1.3 with
//! TLS_AES_128_GCM_SHA256 and X25519, no resumption.

use std::{fmt::Write as _, net::SocketAddr};

use super::Side;
use crate::certs::CertFiles;

/// The configuration file of one side.
pub(super) fn config(
    c: &CertFiles,
    side: Side,
    listen: SocketAddr,
    upstream: SocketAddr,
    maxconn: u64,
) -> String {
    let mut conf = format!(
        "global\n\
         \x20   nbthread 1\n\
         \x20   maxconn {maxconn}\n\
         \x20   # no server-side session cache: with it, OpenSSL sends stateful\n\
         \x20   # TLS 1.3 tickets even with no-tls-tickets\n\
         \x20   tune.ssl.cachesize 0\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   maxconn {maxconn}\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 10m\n\
         \x20   timeout server 10m\n",
    );
    let tls = "ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3 ciphersuites TLS_AES_128_GCM_SHA256";
    // Writing to a String cannot fail.
    let _ = match side {
        // haproxy 2.6 has no `curves` on server lines: the client side offers
        // OpenSSL's default groups (X25519 first); the server side allows X25519 only.
        Side::Client => write!(
            conf,
            "frontend fe\n    bind {listen}\n    default_backend be\n\
             backend be\n    server s {upstream} ssl verify required ca-file {ca} crt {crt} \
             alpn palisade/1 no-ssl-reuse no-tls-tickets {tls}\n",
            ca = c.ca.display(),
            crt = c.client.combined.display(),
        ),
        Side::Server => write!(
            conf,
            "frontend fe\n    bind {listen} ssl crt {crt} ca-file {ca} verify required \
             alpn palisade/1 curves X25519 no-tls-tickets {tls}\n    default_backend be\n\
             backend be\n    server app {upstream}\n",
            ca = c.ca.display(),
            crt = c.server.combined.display(),
        ),
    };
    conf
}
