//! nginx's stream module as either side of a pair: a master and one worker,
//! TLS 1.3 with TLS_AES_128_GCM_SHA256 and X25519, no session cache, tickets
//! or reuse.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

use super::{Ctx, Side};

/// The configuration file of one side; `prefix` holds its pid file and error log.
pub(super) fn config(
    ctx: &Ctx,
    side: Side,
    listen: SocketAddr,
    upstream: SocketAddr,
    prefix: &Path,
) -> String {
    let c = &ctx.certs;
    let mut conf = String::new();
    // Writing to a String cannot fail.
    if let Some(module) = &ctx.nginx_module {
        let _ = writeln!(conf, "load_module {};", module.display());
    }
    let _ = write!(
        conf,
        "daemon off;\nmaster_process on;\nworker_processes 1;\nworker_rlimit_nofile {nofile};\n\
         pid {pid};\nerror_log {err} warn;\n\
         events {{ worker_connections {conns}; multi_accept on; }}\n\
         stream {{\n",
        nofile = ctx.nofile.min(200_000),
        conns = ctx.nginx_worker_connections(),
        pid = prefix.join("nginx.pid").display(),
        err = prefix.join("error.log").display(),
    );
    let _ = match side {
        Side::Client => write!(
            conf,
            "  server {{\n\
             \x20   listen {listen} backlog=4096;\n\
             \x20   proxy_pass {upstream};\n\
             \x20   proxy_connect_timeout 5s;\n\
             \x20   proxy_timeout 10m;\n\
             \x20   proxy_ssl on;\n\
             \x20   proxy_ssl_certificate {crt};\n\
             \x20   proxy_ssl_certificate_key {key};\n\
             \x20   proxy_ssl_trusted_certificate {ca};\n\
             \x20   proxy_ssl_verify on;\n\
             \x20   proxy_ssl_verify_depth 2;\n\
             \x20   proxy_ssl_name localhost;\n\
             \x20   proxy_ssl_protocols TLSv1.3;\n\
             \x20   proxy_ssl_session_reuse off;\n\
             \x20   proxy_ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;\n\
             \x20   proxy_ssl_conf_command Groups X25519;\n\
             \x20 }}\n}}\n",
            crt = c.client.cert.display(),
            key = c.client.key.display(),
            ca = c.ca.display(),
        ),
        Side::Server => write!(
            conf,
            "  server {{\n\
             \x20   listen {listen} ssl backlog=4096;\n\
             \x20   proxy_pass {upstream};\n\
             \x20   proxy_connect_timeout 5s;\n\
             \x20   proxy_timeout 10m;\n\
             \x20   ssl_certificate {crt};\n\
             \x20   ssl_certificate_key {key};\n\
             \x20   ssl_client_certificate {ca};\n\
             \x20   ssl_verify_client on;\n\
             \x20   ssl_verify_depth 2;\n\
             \x20   ssl_protocols TLSv1.3;\n\
             \x20   ssl_ecdh_curve X25519;\n\
             \x20   ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;\n\
             \x20   ssl_session_cache off;\n\
             \x20   ssl_session_tickets off;\n\
             \x20   ssl_conf_command NumTickets 0;\n\
             \x20   ssl_handshake_timeout 10s;\n\
             \x20 }}\n}}\n",
            crt = c.server.cert.display(),
            key = c.server.key.display(),
            ca = c.ca.display(),
        ),
    };
    conf
}

/// `load_module` path of the stream module when nginx has it as a dynamic module.
pub(super) fn stream_module() -> Result<Option<PathBuf>> {
    let out = Command::new("nginx")
        .arg("-V")
        .output()
        .context("running nginx -V")?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    if !text.contains("--with-stream=dynamic") {
        ensure!(
            text.contains("--with-stream"),
            "this nginx has no stream module"
        );
        return Ok(None);
    }
    let modules = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("--modules-path="))
        .unwrap_or("/usr/lib/nginx/modules");
    let path = Path::new(modules).join("ngx_stream_module.so");
    ensure!(
        path.is_file(),
        "{} is missing: install libnginx-mod-stream",
        path.display()
    );
    Ok(Some(path))
}
