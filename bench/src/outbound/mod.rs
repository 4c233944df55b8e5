//! `palisade-bench-outbound`: new connections per second through a sidecar
//! pair with the client-side sidecar's discovery on and off, in one run. The
//! goal: discovery costs no connection rate beyond the run's own noise.
//!
//! Discovery decides each transparently captured outbound connection
//! (`Destinations::lookup` and `decide`, from `proxy/outbound.rs` `route`);
//! explicit listeners never ask it. So the benchmark builds pods as network
//! namespaces with real capture rules ([`mesh`]: a control plane following
//! a discovery file, two client pods and a server pod), as
//! `tests/discovery_netns.rs` does, and measures, alternating within each
//! round (one further along in each round):
//!
//! 1. **off**: pod a-off's sidecar with `--discovery=false`: b's address is
//!    in `--mesh-networks`, so it gets mesh TLS accepting any identity of the
//!    trust domain;
//! 2. **on**: pod a-on's sidecar with `--discovery=true`, holding a discovery
//!    file of `--workloads` workloads and `--services` Services
//!    ([`discovery_file`]): b's address resolves to b's identity, which alone
//!    may answer;
//! 3. **service** (unless `--skip-service`): the same sidecar, the app
//!    dialling the cluster address of a Service whose one endpoint is b: the
//!    sidecar picks the endpoint and requires its identity.
//!
//! The load is this binary again (`load`, [`inside`]), started in the client
//! pod with `setpriv` as `--app-uid` (capture skips only uid 1337):
//! `--concurrency` closed-loop connections, each connect → 1 byte → its echo
//! → close, so every connection is a new capture, a discovery decision (on),
//! a full mutual TLS handshake to b's sidecar and a connection to the app
//! (`serve`, also this binary, in pod b). After `--warmup` the window of
//! `--duration` opens; the rate is the connections completed in it over its
//! length. At the window's ends the CPU time (`/proc/PID/stat`, utime +
//! stime) of both sidecars, the app, the control plane and the machine is
//! read: CPU-µs per connection for each, and "the rest of the machine", its
//! busy time not accounted to the run's processes (other processes, and
//! interrupt work such as the veth pairs' packet processing when it runs
//! outside a process's time). Each window is checked
//! against the client sidecar's counters: every connection was mesh TLS
//! with b's identity, and (on, service) the decision kind was counted once
//! per connection.
//!
//! Everything shares this machine's cores: the load generator, both
//! sidecars, the app, and whatever else runs. Each sidecar has
//! `--sidecar-threads` workers; the load generator and the app one each.
//!
//! ```text
//! cargo build --release -p palisade-sidecar -p palisade-control-plane
//! cargo build --release -p palisade-bench --bin palisade-bench-outbound
//! sudo ./target/release/palisade-bench-outbound --rounds 5 --duration 10
//! sudo ./target/release/palisade-bench-outbound --quick    # a smoke test
//! ```

use std::{
    fmt::Write as _,
    io::BufRead as _,
    net::SocketAddr,
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use palisade_tests::metric;
use tokio::sync::mpsc;

use crate::{
    harness,
    process::{find_binary, first_line, procfs},
    stats::{self, Better},
};

pub mod config;
pub mod discovery_file;
pub mod inside;
pub mod mesh;

pub use config::{Args, Inside, Settings};
use inside::Event;
use mesh::{Mesh, Setup};

/// Beyond the window, how long the load generator gets to report.
const REPORT_SLACK: Duration = Duration::from_secs(30);
/// Worker threads of this process's runtime (it only waits and reads).
const WORKER_THREADS: usize = 1;

/// What the client-side sidecar does for the app's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Config {
    /// `--discovery=false`: the mesh networks decide.
    Off,
    /// `--discovery=true`, to b's pod address.
    On,
    /// `--discovery=true`, to a Service's cluster address backed by b.
    Service,
}

/// One measured window.
#[derive(Clone, Debug)]
struct Window {
    config: Config,
    rate: f64,
    connections: u64,
    errors: u64,
    first_error: Option<String>,
    /// CPU-µs per connection of the client-side sidecar.
    a_us: f64,
    /// ... of the server-side sidecar.
    b_us: f64,
    /// ... of the load generator.
    load_us: f64,
    /// ... of the app.
    app_us: f64,
    /// Cores the rest of the machine used during the window.
    others: f64,
}

/// CPU ticks of the run's processes and of the machine at one moment.
#[derive(Clone, Copy, Debug)]
struct Ticks {
    a: u64,
    idle_a: u64,
    b: u64,
    app: u64,
    control_plane: u64,
    this: u64,
    machine: u64,
}

/// Runs the benchmark (or, with a subcommand, its part inside a pod).
pub fn run(args: Args) -> Result<ExitCode> {
    match args.inside {
        Some(Inside::Load(load)) => inside::load(load),
        Some(Inside::Serve(serve)) => inside::serve(serve),
        None => {
            let settings = Settings::new(args)?;
            harness::block_on(WORKER_THREADS, bench(settings))
        }
    }
}

async fn bench(settings: Settings) -> Result<ExitCode> {
    let started_at = SystemTime::now();
    let args = &settings.args;
    let sidecar = find_binary(
        args.sidecar.as_deref(),
        "palisade-sidecar",
        "palisade-sidecar",
        Some("--sidecar"),
    )?;
    let control_plane = find_binary(
        args.control_plane.as_deref(),
        "palisade-control-plane",
        "palisade-control-plane",
        Some("--control-plane"),
    )?;
    let configs: Vec<Config> = Config::ALL
        .into_iter()
        .filter(|c| !(args.skip_service && *c == Config::Service))
        .collect();
    println!(
        "building the mesh: {} workloads and {} Services in the discovery file",
        args.workloads, args.services
    );
    let mesh = Mesh::start(&Setup {
        sidecar: &sidecar,
        control_plane: &control_plane,
        workloads: args.workloads,
        services: args.services,
        sidecar_threads: args.sidecar_threads,
        app_uid: args.app_uid,
    })?;
    println!(
        "{} rounds of {} s windows after {} s of warm-up, {} connections in flight, configurations alternating",
        settings.rounds,
        settings.duration.as_secs_f64(),
        settings.warmup.as_secs_f64(),
        args.concurrency
    );
    let mut windows = Vec::new();
    for round in 0..settings.rounds {
        let mut line = format!("  round {}:", round + 1);
        for i in 0..configs.len() {
            let config = configs[(round + i) % configs.len()];
            let w = window(&mesh, config, &settings).await?;
            let _ = write!(
                line,
                " {} {:.0}/s ({:.0} µs/conn in a, rest {:.2} cores)",
                config.name(),
                w.rate,
                w.a_us,
                w.others
            );
            windows.push(w);
        }
        println!("{line}");
    }
    let report = Report {
        settings: &settings,
        started_at,
        sidecar: &sidecar,
        windows: &windows,
        configs: &configs,
    }
    .markdown();
    println!("\n{report}");
    if let Some(path) = &settings.args.markdown {
        std::fs::write(path, &report).with_context(|| format!("writing {}", path.display()))?;
    }
    drop(mesh);
    let errors: u64 = windows.iter().map(|w| w.errors).sum();
    if errors > 0 {
        bail!("{errors} connections failed");
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the load generator in the client pod of `config` for one window and
/// reads the CPU time around it.
async fn window(mesh: &Mesh, config: Config, settings: &Settings) -> Result<Window> {
    let (client, idle) = match config {
        Config::Off => (&mesh.a_off, &mesh.a_on),
        Config::On | Config::Service => (&mesh.a_on, &mesh.a_off),
    };
    let counters = |text: &str| -> (f64, f64) {
        let opened = metric(
            text,
            "palisade_connections_opened_total",
            &[
                ("direction", "outbound"),
                ("security", "mtls"),
                ("peer_identity", mesh::B_ID),
            ],
        );
        let decided = config.decision().map_or(0.0, |kind| {
            metric(text, "palisade_outbound_decisions_total", &[("kind", kind)])
        });
        (opened, decided)
    };
    let before = counters(&mesh.metrics(client.pod));

    let mut command = mesh
        .host(client.pod)
        .command_as(&mesh.app_user, &mesh.bench);
    command
        .arg("load")
        .arg("--target")
        .arg(config.target().to_string())
        .arg("--concurrency")
        .arg(settings.args.concurrency.to_string())
        .arg("--warmup")
        .arg(settings.warmup.as_secs_f64().to_string())
        .arg("--duration")
        .arg(settings.duration.as_secs_f64().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut load = LoadProc::spawn(command)?;
    let ticks = || Ticks::read(mesh, client.pid(), idle.pid());

    load.next(settings.warmup + REPORT_SLACK, |e| {
        matches!(e, Event::Start)
    })
    .await?;
    let t0 = ticks()?;
    let Event::End {
        connections,
        seconds,
        cpu_ticks,
    } = load
        .next(settings.duration + REPORT_SLACK, |e| {
            matches!(e, Event::End { .. })
        })
        .await?
    else {
        unreachable!("next returns what it was asked for");
    };
    let t1 = ticks()?;
    let Event::Errors { count, first } = load
        .next(REPORT_SLACK, |e| matches!(e, Event::Errors { .. }))
        .await?
    else {
        unreachable!("next returns what it was asked for");
    };
    load.exit(REPORT_SLACK).await?;

    let after = counters(&mesh.metrics(client.pod));
    let window_connections = connections as f64;
    ensure!(
        after.0 - before.0 >= window_connections,
        "{}: {} connections in the window but {} mesh TLS connections to {} counted by sidecar {}",
        config.name(),
        connections,
        after.0 - before.0,
        mesh::B_ID,
        client.pod
    );
    if let Some(kind) = config.decision() {
        ensure!(
            after.1 - before.1 >= window_connections,
            "{}: {} connections in the window but {} `{kind}` decisions counted",
            config.name(),
            connections,
            after.1 - before.1
        );
    }

    let clk_tck = procfs::clock_ticks_per_second();
    let per_conn = |ticks: u64| -> f64 {
        if connections == 0 {
            f64::NAN
        } else {
            ticks as f64 / clk_tck / connections as f64 * 1e6
        }
    };
    let ours = (t1.a - t0.a)
        + (t1.idle_a - t0.idle_a)
        + (t1.b - t0.b)
        + (t1.app - t0.app)
        + (t1.control_plane - t0.control_plane)
        + (t1.this - t0.this)
        + cpu_ticks;
    let others = (t1.machine - t0.machine).saturating_sub(ours) as f64 / clk_tck / seconds;
    Ok(Window {
        config,
        rate: connections as f64 / seconds,
        connections,
        errors: count,
        first_error: first,
        a_us: per_conn(t1.a - t0.a),
        b_us: per_conn(t1.b - t0.b),
        load_us: per_conn(cpu_ticks),
        app_us: per_conn(t1.app - t0.app),
        others,
    })
}

/// The load generator, started in a pod; killed when dropped.
struct LoadProc {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl LoadProc {
    /// Starts `command` (its stdout piped) and reads its lines on a thread.
    fn spawn(mut command: Command) -> Result<Self> {
        let mut child = command.spawn().context("starting the load generator")?;
        let stdout = child.stdout.take().context("the load generator's stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, lines })
    }

    /// The next event, which must be the one `wanted` accepts, within
    /// `timeout`.
    async fn next(&mut self, timeout: Duration, wanted: impl Fn(&Event) -> bool) -> Result<Event> {
        let line = tokio::time::timeout(timeout, self.lines.recv())
            .await
            .with_context(|| format!("the load generator reported nothing for {timeout:?}"))?
            .context("the load generator ended without reporting")?;
        match Event::parse(&line) {
            Some(event) if wanted(&event) => Ok(event),
            _ => bail!("the load generator reported {line:?} out of turn"),
        }
    }

    /// Waits up to `timeout` for it to exit, successfully.
    async fn exit(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "the load generator exited with {status}");
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the load generator did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for LoadProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === impl Window ===

impl Window {
    /// CPU-µs per connection of the run's processes together.
    fn run_us(&self) -> f64 {
        self.a_us + self.b_us + self.load_us + self.app_us
    }
}

// === impl Config ===

impl Config {
    /// Every configuration, in the order of the first round.
    pub const ALL: [Self; 3] = [Self::Off, Self::On, Self::Service];

    /// Its short name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::On => "on",
            Self::Service => "service",
        }
    }

    /// What the report calls it.
    fn describe(self) -> &'static str {
        match self {
            Self::Off => "discovery off: b's pod address, any mesh identity (`--mesh-networks`)",
            Self::On => "discovery on: b's pod address, exactly b's identity",
            Self::Service => "discovery on: a Service's cluster address, endpoint b, b's identity",
        }
    }

    /// Where the app dials.
    fn target(self) -> SocketAddr {
        match self {
            Self::Off | Self::On => SocketAddr::from((mesh::B_IP, mesh::APP_PORT)),
            Self::Service => SocketAddr::from((mesh::WEB_IP, mesh::SERVICE_PORT)),
        }
    }

    /// The `palisade_outbound_decisions_total` kind each connection counts.
    fn decision(self) -> Option<&'static str> {
        match self {
            Self::Off => None,
            Self::On => Some("meshed"),
            Self::Service => Some("service"),
        }
    }
}

// === impl Ticks ===

impl Ticks {
    fn read(mesh: &Mesh, a: u32, idle_a: u32) -> Result<Self> {
        let ticks = |pid: u32| procfs::process_ticks(&pid.to_string());
        Ok(Self {
            a: ticks(a)?,
            idle_a: ticks(idle_a)?,
            b: ticks(mesh.b.pid())?,
            app: ticks(mesh.app.pid())?,
            control_plane: ticks(mesh.control_plane.pid())?,
            this: procfs::process_ticks("self")?,
            machine: procfs::MachineTicks::read()?.busy(),
        })
    }
}

// === the report ===

/// The figures of a run, as Markdown.
struct Report<'a> {
    settings: &'a Settings,
    started_at: SystemTime,
    sidecar: &'a std::path::Path,
    windows: &'a [Window],
    configs: &'a [Config],
}

impl Report<'_> {
    fn markdown(&self) -> String {
        let s = self.settings;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "- date: {}",
            humantime::format_rfc3339_seconds(self.started_at)
        );
        let _ = writeln!(out, "- command: `{}`", s.command.join(" "));
        let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let _ = writeln!(out, "- nproc: {nproc}; kernel {}", kernel.trim());
        let _ = writeln!(
            out,
            "- palisade-sidecar: {} ({})",
            first_line(self.sidecar, &["--version"]),
            self.sidecar.display()
        );
        let _ = writeln!(
            out,
            "- method: {} round(s), configurations alternating (one further along each round); windows of {} s after {} s of warm-up; {} closed-loop connections in flight from pod a as uid {}, each connect → 1 byte → echo → close; sidecars with `--worker-threads {}`; discovery file of {} workloads and {} Services; medians of the rounds, worst round beside them",
            s.rounds,
            s.duration.as_secs_f64(),
            s.warmup.as_secs_f64(),
            s.args.concurrency,
            s.args.app_uid,
            s.args.sidecar_threads,
            s.args.workloads,
            s.args.services
        );
        out.push('\n');
        out.push_str(
            "| configuration | conn/s (median) | worst round | ratio to off | per-round ratio to off | sidecar a CPU-µs/conn (median, worst) | sidecar b CPU-µs/conn | load generator CPU-µs/conn | app CPU-µs/conn | rest of the machine, cores | failed |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let of =
            |c: Config| -> Vec<&Window> { self.windows.iter().filter(|w| w.config == c).collect() };
        let off = of(Config::Off);
        let off_rate = stats::median(off.iter().map(|w| w.rate)).unwrap_or(f64::NAN);
        let off_cpu = stats::median(off.iter().map(|w| w.a_us)).unwrap_or(f64::NAN);
        let off_run = stats::median(off.iter().map(|w| w.run_us())).unwrap_or(f64::NAN);
        let mut verdicts = Vec::new();
        for &config in self.configs {
            let ws = of(config);
            let med =
                |f: fn(&Window) -> f64| stats::median(ws.iter().map(|w| f(w))).unwrap_or(f64::NAN);
            let rate = med(|w| w.rate);
            let worst_rate = stats::spread(ws.iter().map(|w| w.rate))
                .map_or(f64::NAN, |sp| sp.worst(Better::Higher));
            let worst_cpu = stats::spread(ws.iter().map(|w| w.a_us))
                .map_or(f64::NAN, |sp| sp.worst(Better::Lower));
            // The window of each round against the off window of the same round.
            let paired: Vec<f64> = ws
                .iter()
                .zip(&off)
                .filter_map(|(w, o)| stats::ratio(w.rate, o.rate))
                .collect();
            let paired = match stats::spread(paired.iter().copied()) {
                Some(sp) if config != Config::Off => format!("{:.3}–{:.3}", sp.min, sp.max),
                _ => "—".into(),
            };
            let ratio = stats::ratio(rate, off_rate).unwrap_or(f64::NAN);
            let failed: u64 = ws.iter().map(|w| w.errors).sum();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {paired} | {:.0} ({:.0}) | {:.0} | {:.0} | {:.0} | {:.2} | {failed} |",
                config.describe(),
                thousands(rate),
                thousands(worst_rate),
                if config == Config::Off {
                    "1".to_owned()
                } else {
                    format!("{ratio:.3}")
                },
                med(|w| w.a_us),
                worst_cpu,
                med(|w| w.b_us),
                med(|w| w.load_us),
                med(|w| w.app_us),
                med(|w| w.others),
            );
            if config != Config::Off {
                verdicts.push((
                    config,
                    ratio,
                    stats::ratio(med(|w| w.a_us), off_cpu),
                    stats::ratio(med(Window::run_us), off_run),
                ));
            }
        }
        // The noise: how far the off configuration's own rounds fall below
        // their median in the same run.
        let noise = stats::spread(off.iter().map(|w| w.rate))
            .and_then(|sp| stats::ratio(sp.min, off_rate))
            .map_or(f64::NAN, |r| 1.0 - r);
        out.push('\n');
        let _ = writeln!(
            out,
            "Noise: the off configuration's worst round is {:.1} % below its median.",
            noise * 100.0
        );
        for (config, ratio, cpu, run) in verdicts {
            let loss = 1.0 - ratio;
            let _ = writeln!(
                out,
                "- {}: {:+.1} % conn/s against off ({}); CPU per connection {:.3}× off's in sidecar a, {:.3}× for the run's processes together (both sidecars, load generator, app).",
                config.name(),
                -loss * 100.0,
                if loss <= noise {
                    "within the noise: goal met"
                } else {
                    "a loss beyond the noise: goal **not met**"
                },
                cpu.unwrap_or(f64::NAN),
                run.unwrap_or(f64::NAN)
            );
        }
        if let Some(w) = self.windows.iter().find(|w| w.first_error.is_some()) {
            let _ = writeln!(
                out,
                "- first failure ({}): {}",
                w.config.name(),
                w.first_error.as_deref().unwrap_or_default()
            );
        }
        let _ = writeln!(
            out,
            "- every window: connections completed {}–{}",
            self.windows
                .iter()
                .map(|w| w.connections)
                .min()
                .unwrap_or(0),
            self.windows
                .iter()
                .map(|w| w.connections)
                .max()
                .unwrap_or(0)
        );
        out
    }
}

/// `12345.6` as `12,346`.
fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "—".into();
    }
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0.0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(1584.4), "1,584");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(f64::NAN), "—");
    }
}
