//! The processes a benchmark starts (proxies, sidecars, a control plane, the
//! issuance benchmark): their output, their process group, stopping them
//! (SIGTERM, then SIGKILL), waiting until one is ready, reading their CPU time
//! and memory; finding the binaries next to this one.

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

/// Which process group a started process runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// A new one, the process its leader: stopping it stops whatever the
    /// process started too (an nginx worker outlives its master), and the
    /// watchdog can list it.
    Own,
    /// This process's: a signal from the terminal reaches it as well, and
    /// whatever stops this process's group stops it.
    Ours,
}

/// A started process; stopped (SIGTERM, then SIGKILL) on drop, with its
/// whole process group when it has its own.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    name: String,
    group: Group,
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
    /// Starts `command` as `name`, stdin closed.
    pub fn spawn(
        name: &str,
        mut command: Command,
        output: Output,
        group: Group,
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
        if group == Group::Own {
            command.process_group(0);
        }
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self {
            child,
            name: name.to_owned(),
            group,
            log,
            stop_timeout,
            stopped: None,
            groups: None,
        })
    }

    /// Lists its own process group for the watchdog until it is stopped.
    pub fn watched_by(mut self, groups: &Arc<Groups>) -> Self {
        debug_assert_eq!(self.group, Group::Own, "only a group of its own is listed");
        groups.add(self.pid());
        self.groups = Some(groups.clone());
        self
    }

    /// The name it was started as.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its pid (with [`Group::Own`], also its process group id).
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

    /// SIGTERM unless the process has exited, up to `stop_timeout` for it to
    /// exit, then SIGKILL (to whatever is left of its own group, or to the
    /// process if it still runs); the exit status and whether it took SIGKILL.
    fn shut_down(&mut self) -> Result<(ExitStatus, bool)> {
        use rustix::process::{Pid, Signal, kill_process, kill_process_group};
        if let Some(status) = self.stopped {
            return Ok((status, false));
        }
        let pid = i32::try_from(self.pid())
            .ok()
            .and_then(Pid::from_raw)
            .context("the pid does not fit a pid_t")?;
        let group = self.group;
        let signal = |signal| match group {
            Group::Own => kill_process_group(pid, signal),
            Group::Ours => kill_process(pid, signal),
        };
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = signal(Signal::TERM);
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
        // Not to a lone process that has exited and been reaped: its pid may
        // be another process's by now.
        if group == Group::Own || killed {
            let _ = signal(Signal::KILL);
        }
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

/// A binary the benchmark starts, as an absolute path (the proxies run in the
/// run's temporary directory): `given` (a flag's value), or `name` next to
/// this executable; the error says how to build it.
pub fn find_binary(
    given: Option<&Path>,
    name: &str,
    package: &str,
    flag: Option<&str>,
) -> Result<PathBuf> {
    let path = match given {
        Some(p) => std::path::absolute(p).with_context(|| format!("finding {}", p.display()))?,
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
