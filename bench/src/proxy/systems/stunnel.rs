//! stunnel 5 as either side of a pair (`client = yes` on the client side):
//! TLS 1.3 with TLS_AES_128_GCM_SHA256 and X25519, no tickets, no resumption.
//! It runs a thread per connection and cannot be limited to one.

use std::{net::SocketAddr, path::Path};

use super::Side;
use crate::certs::CertFiles;

/// The configuration file of one side; stunnel's own log goes to `output`.
pub(super) fn config(
    c: &CertFiles,
    side: Side,
    listen: SocketAddr,
    upstream: SocketAddr,
    output: &Path,
) -> String {
    let (client, leaf) = match side {
        Side::Client => ("yes", &c.client),
        Side::Server => ("no", &c.server),
    };
    let mut conf = format!(
        "foreground = yes\npid =\noutput = {out}\ndebug = 4\n\n[bench]\nclient = {client}\n\
         accept = {listen}\nconnect = {upstream}\ncert = {crt}\nkey = {key}\nCAfile = {ca}\n\
         verifyChain = yes\nsslVersion = TLSv1.3\nciphersuites = TLS_AES_128_GCM_SHA256\n\
         curves = X25519\noptions = NO_TICKET\nsessionResume = no\nsessionCacheSize = 1\n\
         TIMEOUTidle = 600\nTIMEOUTclose = 0\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
        out = output.display(),
        crt = leaf.cert.display(),
        key = leaf.key.display(),
        ca = c.ca.display(),
    );
    if side == Side::Server {
        conf.push_str("requireCert = yes\n");
    }
    conf
}
