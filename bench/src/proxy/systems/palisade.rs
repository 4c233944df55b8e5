//! Palisade as either side of a pair: `palisade-sidecar run` in explicit mode
//! with file-mode certificates, one worker thread, X25519 (or the hybrid
//! group) and AES-128-GCM, ready when its admin `/ready` answers 200.

use std::{
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use super::{Ctx, Side, System};
use crate::{
    certs::{SERVER_ID, TRUST_DOMAIN},
    process::{Proc, find_binary, first_line, free_port},
};

/// The sidecar binary and the flags it knows (an older build may lack some).
#[derive(Debug)]
pub struct SidecarInfo {
    pub path: PathBuf,
    /// Its `--version`.
    pub version: String,
    pub worker_threads: bool,
    pub tls_groups: bool,
    pub tls_cipher_suites: bool,
}

// === impl SidecarInfo ===

impl SidecarInfo {
    /// `--sidecar PATH`, or `palisade-sidecar` next to this executable.
    pub fn find(path: Option<&Path>) -> Result<Self> {
        let path = find_binary(
            path,
            "palisade-sidecar",
            "palisade-sidecar",
            Some("--sidecar"),
        )?;
        let help = Command::new(&path)
            .args(["run", "--help"])
            .output()
            .with_context(|| format!("running {} run --help", path.display()))?;
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let version = first_line(&path, &["--version"]);
        Ok(Self {
            worker_threads: help.contains("--worker-threads"),
            tls_groups: help.contains("--tls-groups"),
            tls_cipher_suites: help.contains("--tls-cipher-suites"),
            version,
            path,
        })
    }

    /// The flags it does not know, of those the benchmark sets.
    pub fn missing_flags(&self) -> Vec<&'static str> {
        [
            ("--worker-threads", self.worker_threads),
            ("--tls-groups", self.tls_groups),
            ("--tls-cipher-suites", self.tls_cipher_suites),
        ]
        .iter()
        .filter(|(_, known)| !known)
        .map(|(flag, _)| *flag)
        .collect()
    }
}

/// Starts one sidecar of a pair; returns it and its admin address.
pub(super) fn start(
    ctx: &Ctx,
    sys: System,
    side: Side,
    name: &str,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Result<(Proc, Option<SocketAddr>)> {
    let info = ctx
        .sidecar
        .as_ref()
        .context("the sidecar binary was not found")?;
    let admin = free_port()?;
    let dir = match side {
        Side::Client => &ctx.certs.client.dir,
        Side::Server => &ctx.certs.server.dir,
    };
    let mut args: Vec<OsString> = vec![
        "--log-level".into(),
        "warn".into(),
        "run".into(),
        "--transparent=false".into(),
        "--cert-dir".into(),
        dir.clone().into_os_string(),
        "--admin-addr".into(),
        admin.to_string().into(),
        "--trust-domain".into(),
        TRUST_DOMAIN.into(),
        "--max-connections".into(),
        "50000".into(),
        "--drain-timeout".into(),
        "1s".into(),
    ];
    match side {
        Side::Client => {
            args.push("--explicit-outbound".into());
            args.push(format!("{listen}={upstream},{SERVER_ID}").into());
        }
        Side::Server => {
            args.push("--explicit-inbound".into());
            args.push(format!("{listen}={upstream}").into());
        }
    }
    if info.worker_threads {
        args.extend(["--worker-threads".into(), "1".into()]);
    }
    if info.tls_groups {
        let groups = match sys {
            System::PalisadePq => "x25519mlkem768,x25519",
            _ => "x25519",
        };
        args.extend(["--tls-groups".into(), groups.into()]);
    }
    if info.tls_cipher_suites {
        args.extend(["--tls-cipher-suites".into(), "aes128gcm".into()]);
    }
    Ok((ctx.spawn(name, &info.path, &args)?, Some(admin)))
}
