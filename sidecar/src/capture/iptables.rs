//! Builds the capture rules, applies them with `iptables-restore --noflush`, and
//! removes them again; see the module above for the rule layout.

use std::{
    collections::BTreeSet,
    env, fmt,
    io::{Read, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde::Serialize;
use tracing::{debug, info, warn};

/// The chain `nat OUTPUT` jumps to: TCP the pod sends.
pub const OUTPUT_CHAIN: &str = "PALISADE_OUTPUT";
/// The chain `nat PREROUTING` jumps to: TCP arriving for the pod.
pub const INBOUND_CHAIN: &str = "PALISADE_INBOUND";

/// Each builtin chain we hook and the chain of ours it jumps to.
const HOOKS: [(&str, &str); 2] = [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN)];

/// How long one command may run; a stuck xtables lock is the usual way to hit it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `iptables-restore` waits for the xtables lock (legacy backend only;
/// `iptables-nft` accepts and ignores it).
const LOCK_WAIT: &str = "--wait=10";

/// `iptables` lives in `sbin`, which the `PATH` of a non-login shell often lacks.
const FALLBACK_PATH: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"];

/// What to capture and what to let through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CaptureConfig {
    /// Port the sidecar's outbound listener accepts redirected app traffic on.
    pub outbound_port: u16,
    /// Port the sidecar's inbound listener accepts redirected peer traffic on.
    pub inbound_port: u16,
    /// Uid the sidecar runs as; its own connections are never captured.
    pub proxy_uid: u32,
    /// Destination ports the app connects to without the sidecar.
    pub exclude_outbound_ports: Vec<u16>,
    /// Pod ports peers reach without the sidecar.
    pub exclude_inbound_ports: Vec<u16>,
    /// Also capture IPv6 with `ip6tables`.
    pub ipv6: bool,
}

/// An IP family, with the tools that manage its tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Family {
    /// IPv4, managed with `iptables`.
    V4,
    /// IPv6, managed with `ip6tables`.
    V6,
}

/// Where [`install_with`] and [`remove_with`] run their commands.
#[derive(Clone, Debug, Default)]
pub struct Runner {
    /// Run inside this network namespace through `ip netns exec`.
    netns: Option<String>,
    /// Directories searched for the tools instead of `PATH` (tests).
    search_path: Option<Vec<PathBuf>>,
}

/// Why capture rules could not be checked, installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A port in the config is 0.
    #[error("{field} is 0: ports must be in 1..=65535")]
    PortZero { field: &'static str },

    /// A capture port is also listed as excluded.
    #[error(
        "{field} {port} is also in {list}: the sidecar's capture ports cannot be excluded from capture"
    )]
    CapturePortExcluded {
        field: &'static str,
        port: u16,
        list: &'static str,
    },

    /// The two capture ports are the same.
    #[error(
        "outbound_port and inbound_port are both {port}: the sidecar tells directions apart by port, so they must differ"
    )]
    SameCapturePorts { port: u16 },

    /// A tool is not on `PATH` (nor in `/usr/sbin`, `/sbin`).
    #[error(
        "{tool} is not installed: install the {package} package in the init image{}",
        ipv6_way_out(tool)
    )]
    NotInstalled {
        tool: &'static str,
        package: &'static str,
    },

    /// A tool was found but could not be started or fed.
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },

    /// A tool ran past its 30 s deadline and was killed.
    #[error(
        "{command} did not finish in {seconds} s and was killed: is another process holding the xtables lock?"
    )]
    Timeout { command: String, seconds: u64 },

    /// The kernel has no nat table for the family.
    #[error("the kernel offers no {family} nat table ({command}: {stderr}): {}", nat_advice(*family))]
    NatUnavailable {
        family: Family,
        command: String,
        stderr: String,
    },

    /// A tool exited with an error.
    #[error("{command} failed ({status}): {stderr}; {hint}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
        hint: &'static str,
    },
}

/// The nat table as `iptables-save -t nat` shows it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct NatTable {
    pub(crate) chains: BTreeSet<String>,
    pub(crate) rules: Vec<Rule>,
}

/// One `-A CHAIN SPEC` line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Rule {
    pub(crate) chain: String,
    pub(crate) spec: String,
}

/// An `iptables-restore` batch and what it changes, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Batch {
    pub(crate) script: String,
    pub(crate) jumps_added: usize,
    pub(crate) jumps_removed: usize,
    pub(crate) chains_removed: usize,
}

/// The text of one finished command.
#[derive(Debug)]
struct Output {
    stdout: String,
    stderr: String,
}

/// Checks `config`, then returns the `iptables-restore --noflush` input that
/// [`install`] applies for `family` in a namespace without our rules.
pub fn rules(config: &CaptureConfig, family: Family) -> Result<String, CaptureError> {
    Ok(install_batch(config, family, &NatTable::default())?.script)
}

/// Installs the capture rules in the current network namespace.
pub fn install(config: &CaptureConfig) -> Result<(), CaptureError> {
    install_with(config, &Runner::current())
}

/// Removes the capture rules from the current network namespace.
pub fn remove(config: &CaptureConfig) -> Result<(), CaptureError> {
    remove_with(config, &Runner::current())
}

/// Installs the capture rules, running the iptables tools through `runner`.
pub fn install_with(config: &CaptureConfig, runner: &Runner) -> Result<(), CaptureError> {
    config.validate()?;
    if !config.ipv6 {
        info!("ipv6 capture is off: leaving ip6tables alone");
    }
    // Read every family before writing any, so a missing tool or table fails
    // the install before it changes anything.
    let mut batches = Vec::new();
    for family in config.families() {
        let table = read_nat(runner, family)?;
        batches.push((family, install_batch(config, family, &table)?));
    }
    for (family, batch) in batches {
        apply(runner, family, &batch.script)?;
        info!(
            family = %family,
            outbound_port = config.outbound_port,
            inbound_port = config.inbound_port,
            proxy_uid = config.proxy_uid,
            exclude_outbound_ports = ?config.exclude_outbound_ports,
            exclude_inbound_ports = ?config.exclude_inbound_ports,
            jumps_added = batch.jumps_added,
            duplicate_jumps_removed = batch.jumps_removed,
            netns = runner.netns.as_deref().unwrap_or("current"),
            "installed traffic capture rules"
        );
    }
    Ok(())
}

/// Removes the capture rules, running the iptables tools through `runner`.
///
/// Looks at IPv6 even when `config.ipv6` is off, in case an earlier install had
/// it on; a host without `ip6tables` or IPv6 nat cannot hold our IPv6 rules, so
/// that is not an error here.
pub fn remove_with(config: &CaptureConfig, runner: &Runner) -> Result<(), CaptureError> {
    for family in Family::ALL {
        let table = match read_nat(runner, family) {
            Ok(table) => table,
            Err(error)
                if family == Family::V6
                    && (!config.ipv6
                        || matches!(
                            error,
                            CaptureError::NotInstalled { .. } | CaptureError::NatUnavailable { .. }
                        )) =>
            {
                info!(family = %family, error = %error, "no ipv6 nat table to clean up");
                continue;
            }
            Err(error) => return Err(error),
        };
        let netns = runner.netns.as_deref().unwrap_or("current");
        match remove_batch(&table) {
            None => info!(family = %family, netns, "no traffic capture rules to remove"),
            Some(batch) => {
                apply(runner, family, &batch.script)?;
                info!(
                    family = %family,
                    netns,
                    jumps_removed = batch.jumps_removed,
                    chains_removed = batch.chains_removed,
                    "removed traffic capture rules"
                );
            }
        }
    }
    Ok(())
}

// === impl CaptureConfig ===

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_uid: 1337,
            exclude_outbound_ports: Vec::new(),
            exclude_inbound_ports: Vec::new(),
            ipv6: true,
        }
    }
}

impl CaptureConfig {
    /// Checks the ports.
    pub fn validate(&self) -> Result<(), CaptureError> {
        let lists = [
            ("exclude_outbound_ports", &self.exclude_outbound_ports),
            ("exclude_inbound_ports", &self.exclude_inbound_ports),
        ];
        let capture = [
            ("outbound_port", self.outbound_port),
            ("inbound_port", self.inbound_port),
        ];
        for (field, port) in capture {
            if port == 0 {
                return Err(CaptureError::PortZero { field });
            }
        }
        for (list, ports) in lists {
            if ports.contains(&0) {
                return Err(CaptureError::PortZero { field: list });
            }
            for (field, port) in capture {
                if ports.contains(&port) {
                    return Err(CaptureError::CapturePortExcluded { field, port, list });
                }
            }
        }
        if self.outbound_port == self.inbound_port {
            return Err(CaptureError::SameCapturePorts {
                port: self.outbound_port,
            });
        }
        Ok(())
    }

    fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }
}

// === impl Family ===

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The rule tool: `iptables` or `ip6tables`.
    pub fn iptables(&self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    /// The tool that prints a table: `iptables-save` or `ip6tables-save`.
    pub fn save(&self) -> &'static str {
        match self {
            Self::V4 => "iptables-save",
            Self::V6 => "ip6tables-save",
        }
    }

    /// The tool that applies a batch: `iptables-restore` or `ip6tables-restore`.
    pub fn restore(&self) -> &'static str {
        match self {
            Self::V4 => "iptables-restore",
            Self::V6 => "ip6tables-restore",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        })
    }
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

    /// Looks for the tools only in `dirs`.
    #[cfg(test)]
    pub(crate) fn with_search_path(mut self, dirs: Vec<PathBuf>) -> Self {
        self.search_path = Some(dirs);
        self
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

        command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|source| CaptureError::Spawn {
            command: shown.clone(),
            source,
        })?;
        // Pipes are drained on their own threads so a chatty tool cannot block
        // on a full pipe while we wait for it.
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        let writer = match (stdin, child.stdin.take()) {
            (Some(input), Some(mut pipe)) => {
                let input = input.to_owned();
                Some(thread::spawn(move || pipe.write_all(input.as_bytes())))
            }
            _ => None,
        };

        let status = wait(&mut child, &shown)?;
        let stdout = collect(stdout);
        let stderr = collect(stderr);
        if !status.success() {
            return Err(failure(family, shown, &describe(status), &stderr));
        }
        // A tool that exits early closes its stdin and its status tells why;
        // a write error matters only if it claims success.
        if let Some(Ok(Err(source))) = writer.map(JoinHandle::join) {
            return Err(CaptureError::Spawn {
                command: shown,
                source,
            });
        }
        if !stderr.trim().is_empty() {
            debug!(command = %shown, stderr = %stderr.trim(), "tool wrote to stderr");
        }
        Ok(Output { stdout, stderr })
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

// === running the tools, planning batches ===

/// Reads the family's nat table.
fn read_nat(runner: &Runner, family: Family) -> Result<NatTable, CaptureError> {
    let output = runner.run(family, family.save(), &["-t", "nat"], None)?;
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
fn apply(runner: &Runner, family: Family, script: &str) -> Result<(), CaptureError> {
    debug!(family = %family, script, "applying with iptables-restore");
    runner.run(
        family,
        family.restore(),
        &["--noflush", LOCK_WAIT],
        Some(script),
    )?;
    Ok(())
}

/// The batch that brings `table` to exactly one copy of our rules.
pub(crate) fn install_batch(
    config: &CaptureConfig,
    family: Family,
    table: &NatTable,
) -> Result<Batch, CaptureError> {
    config.validate()?;
    let mut batch = Batch::default();
    let mut lines = vec![
        format!(
            "# palisade traffic capture ({family}): {} --noflush",
            family.restore()
        ),
        "*nat".to_owned(),
    ];
    // Declaring a chain in a --noflush batch creates it, or empties it if it
    // exists, so the rules below replace whatever an earlier install left.
    for (_, chain) in HOOKS {
        lines.push(format!(":{chain} - [0:0]"));
    }

    let outbound_excluded: BTreeSet<u16> = config.exclude_outbound_ports.iter().copied().collect();
    let inbound_excluded: BTreeSet<u16> = config.exclude_inbound_ports.iter().copied().collect();
    for port in inbound_excluded {
        lines.push(format!(
            "-A {INBOUND_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
        ));
    }
    lines.push(format!(
        "-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        config.inbound_port
    ));
    lines.push(format!(
        "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN",
        config.proxy_uid
    ));
    lines.push(format!("-A {OUTPUT_CHAIN} -o lo -j RETURN"));
    for port in outbound_excluded {
        lines.push(format!(
            "-A {OUTPUT_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
        ));
    }
    lines.push(format!(
        "-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        config.outbound_port
    ));

    // Rules are written the way iptables-save prints them, so an existing jump
    // is recognised by plain string comparison.
    for (builtin, chain) in HOOKS {
        let wanted = jump_spec(chain);
        let existing: Vec<&Rule> = table
            .rules
            .iter()
            .filter(|r| r.chain == builtin && target(&r.spec) == Some(chain))
            .collect();
        let keep = existing.iter().position(|r| r.spec == wanted);
        for (i, rule) in existing.iter().enumerate() {
            if Some(i) != keep {
                // -D removes the first match; with duplicates of `wanted` the
                // last copy is the one that stays.
                lines.push(format!("-D {builtin} {}", rule.spec));
                batch.jumps_removed += 1;
            }
        }
        if keep.is_none() {
            lines.push(format!("-A {builtin} {wanted}"));
            batch.jumps_added += 1;
        }
    }
    lines.push("COMMIT".to_owned());
    batch.script = lines.join("\n") + "\n";
    Ok(batch)
}

/// The batch that deletes our jumps and chains from `table`, or `None` when it
/// holds neither.
pub(crate) fn remove_batch(table: &NatTable) -> Option<Batch> {
    let mut batch = Batch::default();
    let mut lines = vec!["*nat".to_owned()];
    for rule in &table.rules {
        let hooked = HOOKS.iter().any(|(builtin, _)| rule.chain == *builtin);
        let ours = target(&rule.spec).is_some_and(|t| HOOKS.iter().any(|(_, chain)| t == *chain));
        if hooked && ours {
            lines.push(format!("-D {} {}", rule.chain, rule.spec));
            batch.jumps_removed += 1;
        }
    }
    for (_, chain) in HOOKS {
        if table.chains.contains(chain) {
            lines.push(format!("-F {chain}"));
            lines.push(format!("-X {chain}"));
            batch.chains_removed += 1;
        }
    }
    if batch.jumps_removed == 0 && batch.chains_removed == 0 {
        return None;
    }
    lines.push("COMMIT".to_owned());
    batch.script = lines.join("\n") + "\n";
    Some(batch)
}

/// The jump from a builtin chain into `chain`, as iptables-save prints it.
fn jump_spec(chain: &str) -> String {
    format!("-p tcp -j {chain}")
}

/// The chain a rule jumps or goes to, if any.
fn target(spec: &str) -> Option<&str> {
    let tokens: Vec<&str> = spec.split_whitespace().collect();
    tokens
        .windows(2)
        .rev()
        .find(|w| w[0] == "-j" || w[0] == "-g")
        .map(|w| w[1])
}

/// Parses the nat table out of `iptables-save` output.
pub(crate) fn parse_save(text: &str) -> NatTable {
    let mut table = NatTable::default();
    let mut in_nat = false;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            in_nat = name == "nat";
        } else if line == "COMMIT" {
            in_nat = false;
        } else if !in_nat {
            continue;
        } else if let Some(decl) = line.strip_prefix(':') {
            if let Some(chain) = decl.split_whitespace().next() {
                table.chains.insert(chain.to_owned());
            }
        } else if let Some((chain, spec)) = line.strip_prefix("-A ").and_then(|r| r.split_once(' '))
        {
            table.rules.push(Rule {
                chain: chain.to_owned(),
                spec: spec.trim().to_owned(),
            });
        }
    }
    table
}

/// The error for a command that exited unsuccessfully.
pub(crate) fn failure(family: Family, command: String, status: &str, stderr: &str) -> CaptureError {
    let stderr = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ");
    let lower = stderr.to_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    if has(&[
        "table does not exist",
        "can't initialize",
        "do you need to insmod",
        "address family not supported",
        "protocol not supported",
    ]) {
        return CaptureError::NatUnavailable {
            family,
            command,
            stderr,
        };
    }
    let hint = if has(&[
        "permission denied",
        "operation not permitted",
        "you must be root",
    ]) {
        "does the container have NET_ADMIN?"
    } else if has(&["resource busy"]) {
        "a rule outside OUTPUT and PREROUTING still jumps to a palisade chain: delete it first"
    } else if has(&[
        "couldn't load",
        "no chain/target/match",
        "extension",
        "not supported",
    ]) {
        "the kernel lacks a match or target these rules use (owner, tcp, REDIRECT): load xt_owner, xt_tcpudp and xt_REDIRECT on the node"
    } else {
        "does the container have NET_ADMIN?"
    };
    CaptureError::CommandFailed {
        command,
        status: status.to_owned(),
        stderr,
        hint,
    }
}

fn ipv6_way_out(tool: &str) -> &'static str {
    if tool.starts_with("ip6") {
        ", or set --ipv6=false (PALISADE_IPV6=false)"
    } else {
        ""
    }
}

fn nat_advice(family: Family) -> &'static str {
    match family {
        Family::V4 => "load iptable_nat (legacy) or nft_chain_nat (nf_tables) on the node",
        Family::V6 => {
            "load ip6table_nat (legacy) or nft_chain_nat (nf_tables) on the node, or set --ipv6=false (PALISADE_IPV6=false)"
        }
    }
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

/// Waits for `child`, killing it after [`COMMAND_TIMEOUT`].
fn wait(child: &mut Child, shown: &str) -> Result<ExitStatus, CaptureError> {
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        let polled = child.try_wait().map_err(|source| CaptureError::Spawn {
            command: shown.to_owned(),
            source,
        })?;
        if let Some(status) = polled {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            // Best effort: the child may have exited between the poll and now.
            let _ = child.kill();
            let _ = child.wait();
            return Err(CaptureError::Timeout {
                command: shown.to_owned(),
                seconds: COMMAND_TIMEOUT.as_secs(),
            });
        }
        thread::sleep(Duration::from_millis(5));
    }
}
