//! Running the iptables tools: finding them, feeding them a batch, reading
//! what they print, and killing one that outlives its deadline.

use std::{
    env,
    io::{self, Read, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use tracing::{debug, warn};
use wait_timeout::ChildExt;

use super::{
    CaptureError, Family,
    error::failure,
    rules::{NatTable, parse_save},
};

/// How long one command may run; a stuck xtables lock is the usual way to hit it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `iptables-restore` waits for the xtables lock (legacy backend only;
/// `iptables-nft` accepts and ignores it).
const LOCK_WAIT: &str = "--wait=10";

/// `iptables` lives in `sbin`, which the `PATH` of a non-login shell often lacks.
const FALLBACK_PATH: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"];

/// Where [`install_with`](super::install_with) and
/// [`remove_with`](super::remove_with) run their commands.
#[derive(Clone, Debug, Default)]
pub struct Runner {
    /// Run inside this network namespace through `ip netns exec`.
    netns: Option<String>,
    /// Directories searched for the tools instead of `PATH`.
    search_path: Option<Vec<PathBuf>>,
}

/// The text of one finished command.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

// === impl Runner ===

impl Runner {
    /// Runs the tools in this process's network namespace (the init container's).
    pub fn current() -> Self {
        Self::default()
    }

    /// Runs the tools inside the named network namespace with `ip netns exec`
    /// (tests, and pods simulated as namespaces).
    pub fn netns(name: impl Into<String>) -> Self {
        Self {
            netns: Some(name.into()),
            search_path: None,
        }
    }

    /// Looks for the tools (and `ip`) only in `dirs`, instead of `PATH` and
    /// the `sbin` directories: to pick a backend (`iptables-legacy`) by
    /// directory, or to run stand-in tools in tests.
    pub fn with_search_path(mut self, dirs: Vec<PathBuf>) -> Self {
        self.search_path = Some(dirs);
        self
    }

    /// The namespace the tools run in, for the log.
    pub(crate) fn netns_name(&self) -> &str {
        self.netns.as_deref().unwrap_or("current")
    }

    /// Reads the family's nat table.
    pub(crate) fn read_nat(&self, family: Family) -> Result<NatTable, CaptureError> {
        let output = self.run(family, family.save(), &["-t", "nat"], None)?;
        if output.stderr.contains("legacy tables present")
            || output.stdout.contains("legacy tables present")
        {
            warn!(
                family = %family,
                "this namespace also has iptables-legacy tables; their rules apply alongside ours"
            );
        }
        Ok(parse_save(&output.stdout))
    }

    /// Applies one batch atomically.
    pub(crate) fn apply(&self, family: Family, script: &str) -> Result<(), CaptureError> {
        debug!(family = %family, script, "applying with iptables-restore");
        self.run(
            family,
            family.restore(),
            &["--noflush", LOCK_WAIT],
            Some(script),
        )?;
        Ok(())
    }

    /// Runs `tool args`, feeding it `stdin`, and returns its output if it succeeded.
    fn run(
        &self,
        family: Family,
        tool: &'static str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Output, CaptureError> {
        let program = self.find(tool, "iptables")?;
        let mut command = match &self.netns {
            Some(name) => {
                let mut c = Command::new(self.find("ip", "iproute2")?);
                c.args(["netns", "exec", name]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        command.args(args);
        let shown = match &self.netns {
            Some(name) => format!("ip netns exec {name} {tool} {}", args.join(" ")),
            None => format!("{tool} {}", args.join(" ")),
        };
        debug!(command = %shown, "running");
        let (status, output) = execute(command, &shown, stdin, COMMAND_TIMEOUT)?;
        if !status.success() {
            return Err(failure(family, shown, &describe(status), &output.stderr));
        }
        if !output.stderr.trim().is_empty() {
            debug!(command = %shown, stderr = %output.stderr.trim(), "tool wrote to stderr");
        }
        Ok(output)
    }

    /// Finds `tool` on the search path.
    fn find(&self, tool: &'static str, package: &'static str) -> Result<PathBuf, CaptureError> {
        let dirs: Vec<PathBuf> = match &self.search_path {
            Some(dirs) => dirs.clone(),
            None => {
                let path = env::var_os("PATH").unwrap_or_default();
                env::split_paths(&path)
                    .chain(FALLBACK_PATH.iter().map(PathBuf::from))
                    .collect()
            }
        };
        dirs.iter()
            .map(|dir| dir.join(tool))
            .find(|candidate| is_executable(candidate))
            .ok_or(CaptureError::NotInstalled { tool, package })
    }
}

/// Waits for `child` until `deadline`: `None` if it is still running then.
/// `wait_timeout` may wake a little early, so the deadline is checked again.
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match child.wait_timeout(left)? {
            Some(status) => return Ok(Some(status)),
            None if Instant::now() >= deadline => return Ok(None),
            None => {}
        }
    }
}

/// Runs `command` (shown as `shown`), feeding it `stdin`, and waits for it at
/// most `timeout`; a command still running then is killed.
///
/// Returns the exit status with what it printed; whether that status is a
/// failure is for the caller to say. A write error on stdin is reported only
/// when the command claims success: a tool that exits early closes its stdin,
/// and its status tells why.
pub(crate) fn execute(
    mut command: Command,
    shown: &str,
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<(ExitStatus, Output), CaptureError> {
    let spawn_error = |source| CaptureError::Spawn {
        command: shown.to_owned(),
        source,
    };
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(spawn_error)?;
    let started = Instant::now();
    // Pipes are drained, and stdin fed, on their own threads, so a chatty tool
    // cannot block on a full pipe while we wait for it, nor we on its stdin.
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let writer = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => {
            let input = input.to_owned();
            Some(thread::spawn(move || pipe.write_all(input.as_bytes())))
        }
        _ => None,
    };

    let Some(status) = wait_until(&mut child, started + timeout).map_err(spawn_error)? else {
        // Best effort: the child may have exited since the deadline. The pipe
        // threads are left to finish on their own: a grandchild holding a
        // pipe open must not hang us as well.
        let _ = child.kill();
        let _ = child.wait();
        return Err(CaptureError::Timeout {
            command: shown.to_owned(),
            seconds: timeout.as_secs(),
        });
    };
    let output = Output {
        stdout: collect(stdout),
        stderr: collect(stderr),
    };
    if status.success()
        && let Some(Ok(Err(source))) = writer.map(JoinHandle::join)
    {
        return Err(spawn_error(source));
    }
    Ok((status, output))
}

fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit {code}"),
        None => "killed by a signal".to_owned(),
    }
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error only shortens what we show; the exit status decides.
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

fn collect(handle: Option<JoinHandle<Vec<u8>>>) -> String {
    let bytes = handle.and_then(|h| h.join().ok()).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn a_command_past_its_deadline_is_killed_at_the_deadline() {
        let started = Instant::now();
        let error = execute(sh("sleep 30"), "sleep 30", None, Duration::from_millis(300))
            .expect_err("sleep outlives its deadline");
        let waited = started.elapsed();
        assert!(
            matches!(&error, CaptureError::Timeout { command, seconds: 0 } if command == "sleep 30"),
            "{error:?}"
        );
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
            "killed after {waited:?}"
        );
    }

    #[test]
    fn a_quick_command_is_not_held_to_its_deadline() {
        let started = Instant::now();
        let (status, _) =
            execute(sh("exit 0"), "true", None, Duration::from_secs(30)).expect("runs");
        assert!(status.success());
        // The old loop polled every 5 ms; a real wait returns as the child exits.
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn stdin_is_fed_and_both_pipes_are_read_in_full() {
        // More than a pipe holds on each stream, so a sequential reader would
        // deadlock against the tool.
        let (status, output) = execute(
            sh("cat; head -c 300000 /dev/zero | tr '\\0' e >&2; exit 3"),
            "cat",
            Some("*nat\nCOMMIT\n"),
            Duration::from_secs(30),
        )
        .expect("runs");
        assert_eq!(status.code(), Some(3));
        assert_eq!(output.stdout, "*nat\nCOMMIT\n");
        assert_eq!(output.stderr.len(), 300_000);
    }

    #[test]
    fn a_tool_that_cannot_start_is_named() {
        let error = execute(
            Command::new("/nonexistent/iptables-save"),
            "iptables-save -t nat",
            None,
            Duration::from_secs(1),
        )
        .expect_err("no such program");
        assert!(
            error
                .to_string()
                .starts_with("cannot run iptables-save -t nat: "),
            "{error}"
        );
    }

    #[test]
    fn the_timeout_message_asks_about_the_xtables_lock() {
        let error = CaptureError::Timeout {
            command: "iptables-restore --noflush --wait=10".to_owned(),
            seconds: COMMAND_TIMEOUT.as_secs(),
        };
        assert_eq!(
            error.to_string(),
            "iptables-restore --noflush --wait=10 did not finish in 30 s and was killed: \
             is another process holding the xtables lock?"
        );
    }
}
