//! A `palisade-control-plane` started for a run: a fresh root from `ca init`,
//! the static authenticator with a token file written here, `serve` on
//! loopback ports chosen by the kernel, found from its `serving` log line.

use std::{
    ffi::OsStr,
    fs,
    net::SocketAddr,
    path::Path,
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, ensure};

use crate::process::{Group, Output, Proc};

/// How long the control plane gets to print its `serving` line.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the control plane gets to stop after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running control plane; stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct ControlPlane {
    proc: Proc,
    /// Where gRPC (`Certify`) is served.
    pub grpc: SocketAddr,
}

/// Runs `binary ca init --out out`: a fresh root CA (`ca.crt`, `tls.crt`, `tls.key`).
pub fn ca_init(binary: &Path, out: &Path) -> Result<()> {
    let status = Command::new(binary)
        .args(["ca", "init", "--out"])
        .arg(out)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {} ca init", binary.display()))?;
    ensure!(
        status.success(),
        "{} ca init failed: {status}",
        binary.display()
    );
    Ok(())
}

/// The static authenticator's token file: one entry per (token, identity).
pub fn token_file<T: AsRef<str>, I: AsRef<str>>(
    entries: impl IntoIterator<Item = (T, I)>,
) -> String {
    let mut text = String::from("tokens:\n");
    for (token, identity) in entries {
        text.push_str(&format!(
            "  - token: \"{}\"\n    identity: {}\n",
            token.as_ref(),
            identity.as_ref()
        ));
    }
    text
}

// === impl ControlPlane ===

impl ControlPlane {
    /// Starts `binary serve` on `ca_dir` with the static `tokens` file, its
    /// log (at `log_level`, which must keep the `serving` line: info) in
    /// `log`, and `extra` flags; waits for its `serving` line. No `PALISADE_*`
    /// variable of the caller's shell reaches it: the flags are the whole
    /// configuration.
    pub fn start(
        binary: &Path,
        ca_dir: &Path,
        tokens: &Path,
        log: &Path,
        log_level: &str,
        extra: &[String],
    ) -> Result<Self> {
        Self::start_with_env(binary, ca_dir, tokens, log, log_level, extra, &[])
    }

    /// [`Self::start`] with `env` set in its environment (`KUBECONFIG` for
    /// the `kubernetes` discovery source).
    pub fn start_with_env(
        binary: &Path,
        ca_dir: &Path,
        tokens: &Path,
        log: &Path,
        log_level: &str,
        extra: &[String],
        env: &[(&str, &OsStr)],
    ) -> Result<Self> {
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .arg("--ca-dir")
            .arg(ca_dir)
            .args(["--authenticator", "static", "--static-tokens"])
            .arg(tokens)
            .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(["--log-format", "text", "--log-level", log_level])
            .args(extra);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PALISADE_") {
                command.env_remove(name);
            }
        }
        command.envs(env.iter().copied());
        let proc = Proc::spawn(
            "the control plane",
            command,
            Output::Log(log.to_owned()),
            // As before the move: a Ctrl-C reaches it, and so does whatever
            // stops the group of the benchmark that started it.
            Group::Ours,
            STOP_TIMEOUT,
        )?;
        let grpc = proc.wait_ready(
            START_TIMEOUT,
            "(no `serving grpc=` line; is --log-level at least info?)",
            || {
                let text = fs::read_to_string(log)
                    .with_context(|| format!("reading the control-plane log {}", log.display()))?;
                text.lines().find_map(parse_serving_line).transpose()
            },
        )?;
        Ok(Self { proc, grpc })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Sends SIGTERM and waits; SIGKILL if it does not stop in time.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.proc.stop()
    }
}

/// `Some(addr)` for the control plane's `serving grpc=ADDR admin=...` line.
fn parse_serving_line(line: &str) -> Option<Result<SocketAddr>> {
    let rest = &line[line.find(" serving ")?..];
    let value = rest
        .split_whitespace()
        .find_map(|f| f.strip_prefix("grpc="))?;
    Some(
        value
            .parse()
            .with_context(|| format!("the serving line's grpc={value} is not an address")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serving_line_gives_the_grpc_address() {
        let line = "2026-11-26T10:00:00Z  INFO palisade_control_plane::app: serving \
                    grpc=127.0.0.1:40123 admin=127.0.0.1:40124 webhook=- trust_domain=cluster.local";
        let addr = parse_serving_line(line)
            .expect("a serving line")
            .expect("an address");
        assert_eq!(addr, "127.0.0.1:40123".parse().expect("an address"));
        assert!(parse_serving_line("INFO starting").is_none());
        assert!(parse_serving_line(" serving grpc=nope").is_some_and(|r| r.is_err()));
    }

    #[test]
    fn the_token_file_has_one_entry_per_token() {
        let text = token_file([("t-0", "spiffe://cluster.local/ns/a/sa/b")]);
        assert_eq!(
            text,
            "tokens:\n  - token: \"t-0\"\n    identity: spiffe://cluster.local/ns/a/sa/b\n"
        );
    }
}
