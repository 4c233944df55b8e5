//! The processes a benchmark starts (proxies, sidecars, a control plane, the
//! issuance benchmark): each in a process group of its own, so that its CPU
//! time and memory can be read apart and the whole group stopped (SIGTERM,
//! then SIGKILL); waiting until one is ready; finding the binaries next to
//! this one.

use std::{
    fs,
    net::{SocketAddr, TcpListener as StdListener},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};

pub mod procfs;
mod watchdog;

pub use watchdog::{Groups, Watchdog};

/// How often readiness and exit are polled.
const POLL: Duration = Duration::from_millis(20);
/// Lines of a process's log that an error quotes.
const LOG_TAIL: usize = 8;

/// Where a started process's stdout and stderr go.
#[derive(Debug)]
pub enum Output {
    /// Both into this file; errors about the process quote its tail.
    Log(PathBuf),
    /// stdout discarded, stderr to this process's own.
    Inherit,
}

/// A started process, in a process group of its own; the group is stopped
/// (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    name: String,
    log: Option<PathBuf>,
    /// After SIGTERM, how long the process gets before SIGKILL.
    stop_timeout: Duration,
    /// The exit status, once stopped.
    stopped: Option<ExitStatus>,
    /// The watchdog's list this group is on.
    groups: Option<Arc<Groups>>,
}

// === impl Proc ===

impl Proc {
    /// Starts `command` as `name` in a new process group, stdin closed.
    pub fn spawn(
        name: &str,
        mut command: Command,
        output: Output,
        stop_timeout: Duration,
    ) -> Result<Self> {
        let program = PathBuf::from(command.get_program());
        let log = match output {
            Output::Log(path) => {
                let out = fs::File::create(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                command.stdout(out.try_clone()?).stderr(out);
                Some(path)
            }
            Output::Inherit => {
                command.stdout(Stdio::null());
                None
            }
        };
        let child = command
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self {
            child,
            name: name.to_owned(),
            log,
            stop_timeout,
            stopped: None,
            groups: None,
        })
    }

    /// Lists the process group for the watchdog until the process is stopped.
    pub fn watched_by(mut self, groups: &Arc<Groups>) -> Self {
        groups.add(self.pid());
        self.groups = Some(groups.clone());
        self
    }

    /// The name it was started as.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its pid, also its process group id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process and its descendants (nginx: master and worker).
    pub fn pids(&self) -> Vec<u32> {
        procfs::process_tree(self.pid())
    }

    /// Whether it still runs (not a zombie).
    pub fn alive(&self) -> bool {
        procfs::process_state(self.pid()).is_some_and(|s| s != 'Z' && s != 'X')
    }

    /// CPU clock ticks of the process and its descendants.
    pub fn cpu_ticks(&self) -> Result<u64> {
        let mut sum = 0;
        for pid in self.pids() {
            sum += procfs::process_ticks(&pid.to_string())?;
        }
        Ok(sum)
    }

    /// RSS of the process and its descendants, KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let mut sum = 0;
        for pid in self.pids() {
            sum += procfs::status_value(pid, "VmRSS")?;
        }
        Ok(sum)
    }

    /// PSS of the process and its descendants, KiB.
    pub fn pss_kib(&self) -> u64 {
        self.pids().into_iter().filter_map(procfs::pss_kib).sum()
    }

    /// Threads of the process and its descendants.
    pub fn threads(&self) -> u64 {
        self.pids()
            .into_iter()
            .filter_map(|p| procfs::status_value(p, "Threads").ok())
            .sum()
    }

    /// The log file, when its output goes to one.
    pub fn log(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// The last lines of its log, indented for an error message.
    pub fn log_tail(&self) -> String {
        let Some(log) = &self.log else {
            return "(its output went to this terminal)".to_owned();
        };
        let text = fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n    ")
    }

    /// The error for a process that is no longer running.
    pub fn exited_error(&self) -> anyhow::Error {
        match &self.log {
            Some(log) => anyhow!(
                "{} (pid {}) is not running; its log {}:\n    {}",
                self.name,
                self.pid(),
                log.display(),
                self.log_tail()
            ),
            None => anyhow!("{} (pid {}) is not running", self.name, self.pid()),
        }
    }

    /// Polls `ready` until it gives a value, the process exits, or `timeout`
    /// passes; `what` finishes the sentence "NAME did not become ready ...".
    pub fn wait_ready<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.alive() {
                return Err(self.exited_error());
            }
            if let Some(value) = ready()? {
                return Ok(value);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not become ready {what} within {timeout:?}; log:\n    {}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the process to exit, polling, so a signal can still stop the run.
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the process group and returns the process's exit status; says
    /// so on stderr when SIGTERM was not enough.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let (status, killed) = self.shut_down()?;
        if killed {
            eprintln!(
                "{} did not stop within {}s of SIGTERM; killed it",
                self.name,
                self.stop_timeout.as_secs()
            );
        }
        Ok(status)
    }

    /// SIGTERM to the group unless the process has exited, up to
    /// `stop_timeout` for it to exit, then SIGKILL to whatever is left of the
    /// group; the exit status and whether it took SIGKILL.
    fn shut_down(&mut self) -> Result<(ExitStatus, bool)> {
        use rustix::process::{Pid, Signal, kill_process_group};
        if let Some(status) = self.stopped {
            return Ok((status, false));
        }
        let pgid = i32::try_from(self.pid())
            .ok()
            .and_then(Pid::from_raw)
            .context("the pid is not a process group id")?;
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = kill_process_group(pgid, Signal::TERM);
        }
        let deadline = Instant::now() + self.stop_timeout;
        let mut status = None;
        while status.is_none() && Instant::now() < deadline {
            status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
            if status.is_none() {
                std::thread::sleep(POLL);
            }
        }
        let killed = status.is_none();
        let _ = kill_process_group(pgid, Signal::KILL);
        let status = match status {
            Some(s) => s,
            None => self
                .child
                .wait()
                .with_context(|| format!("waiting for the killed {}", self.name))?,
        };
        self.stopped = Some(status);
        if let Some(groups) = self.groups.take() {
            groups.remove(self.pid());
        }
        Ok((status, killed))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(error) = self.shut_down() {
            eprintln!("stopping {} (pid {}): {error:#}", self.name, self.pid());
        }
    }
}

/// A binary the benchmark starts: `given` (a flag's value), or `name` next to
/// this executable; the error says how to build it.
pub fn find_binary(
    given: Option<&Path>,
    name: &str,
    package: &str,
    flag: Option<&str>,
) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_owned(),
        None => sibling(name)?,
    };
    ensure!(
        path.is_file(),
        "{} does not exist: build it with `cargo build --release -p {package}`{}",
        path.display(),
        flag.map(|f| format!(" or pass {f} PATH"))
            .unwrap_or_default()
    );
    Ok(path)
}

/// `name` next to this executable.
pub fn sibling(name: &str) -> Result<PathBuf> {
    Ok(std::env::current_exe()
        .context("finding this executable")?
        .parent()
        .context("this executable has no directory")?
        .join(name))
}

/// A loopback address with a port that was free a moment ago.
pub fn free_port() -> Result<SocketAddr> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The first line `program args` prints (stdout, else stderr), or "not found".
pub fn first_line(program: &Path, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) => {
            let out = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&out)
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("")
                .to_owned()
        }
        Err(_) => "not found".to_owned(),
    }
}
