//! The load: each client's identity, token and pre-generated CSRs, clients
//! calling `Certify` back to back over their own HTTP/2 connections, and the
//! CPU of the control plane, of this process and of the machine sampled at
//! the edges of the measured window.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};
use palisade_proto::identity::v1::{
    CertifyRequest, CertifyResponse, identity_client::IdentityClient,
};
use tokio::task::JoinSet;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::config::Args;
use crate::{
    certs::{Csr, check_issued},
    control_plane::ControlPlane,
    process::procfs::{MachineTicks, process_ticks},
};

/// A Certify call the client gives up on (the server's own limit is 10 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Failure messages kept for the report.
const FAILURE_EXAMPLES: usize = 5;

/// One client's identity, token and pre-generated CSRs.
#[derive(Debug)]
pub struct ClientPlan {
    identity: String,
    token: Vec<u8>,
    /// The CSRs, DER, sent in turn.
    pub csrs: Vec<Vec<u8>>,
    /// The SubjectPublicKeyInfo of `csrs[0]`, to check the response to it.
    first_spki: Vec<u8>,
}

/// What the clients saw in one round.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Latencies of the successful calls that completed in the measured window, ns.
    pub latencies_ns: Vec<u64>,
    /// Successful calls that completed during the warmup.
    pub warmup_ok: u64,
    /// Calls that were sent again with a CSR from earlier in the round.
    pub reused_csrs: u64,
    pub failures: Failures,
}

/// Failed calls by kind (the gRPC code, or what the check found), with examples.
#[derive(Clone, Debug, Default)]
pub struct Failures {
    pub by_kind: BTreeMap<String, u64>,
    pub examples: Vec<String>,
}

/// CPU clock ticks of the control plane, of this process and of the machine.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    pub at: Instant,
    pub server: u64,
    pub client: u64,
    pub machine: MachineTicks,
}

// === impl ClientPlan ===

impl ClientPlan {
    /// Client `index`'s identity and token, and `count` fresh keys and CSRs.
    fn generate(index: usize, count: usize) -> Result<Self> {
        ensure!(count >= 1, "a client needs at least one CSR");
        let identity = identity(index);
        let mut csrs = Vec::with_capacity(count);
        let mut first_spki = Vec::new();
        for i in 0..count {
            let csr = Csr::generate(&identity)?;
            csrs.push(csr.der);
            if i == 0 {
                first_spki = csr.spki;
            }
        }
        Ok(Self {
            identity,
            token: token(index).into_bytes(),
            csrs,
            first_spki,
        })
    }

    /// Checks the response to `csrs[0]`: the certificate's one URI SAN is
    /// the identity and its key is the CSR's, and a trust bundle came with it.
    fn check_first(&self, response: &CertifyResponse) -> Result<()> {
        check_issued(&response.certificate, &self.identity, &self.first_spki)?;
        ensure!(
            !response.trust_bundle.is_empty(),
            "the response carries no trust bundle"
        );
        Ok(())
    }
}

fn identity(index: usize) -> String {
    format!("spiffe://cluster.local/ns/bench/sa/client-{index}")
}

fn token(index: usize) -> String {
    format!("bench-token-{index:010}")
}

/// The (token, identity) of every client, for the static token file.
pub fn tokens(clients: usize) -> impl Iterator<Item = (String, String)> {
    (0..clients).map(|i| (token(i), identity(i)))
}

/// Generates every client's plan, spread over the machine's cores.
pub fn generate_plans(clients: usize, per_client: usize) -> Result<Vec<ClientPlan>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(clients);
    let indices: Vec<usize> = (0..clients).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = indices
            .chunks(clients.div_ceil(threads))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|&i| ClientPlan::generate(i, per_client))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut plans = Vec::with_capacity(clients);
        for worker in workers {
            let chunk = worker
                .join()
                .map_err(|_| anyhow!("a CSR generator thread panicked"))??;
            plans.extend(chunk);
        }
        Ok(plans)
    })
}

/// Opens the connections, runs warmup and measured window, samples CPU around
/// the window.
pub async fn run_load(
    plans: &Arc<[ClientPlan]>,
    control_plane: &ControlPlane,
    ca_pem: &[u8],
    channels: usize,
    args: &Args,
) -> Result<(ClientStats, (CpuSample, CpuSample))> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    let endpoint = Endpoint::from_shared(format!("https://{}", control_plane.grpc))
        .context("building the gRPC endpoint")?
        .tls_config(tls)
        .context("configuring TLS for the gRPC endpoint")?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10));
    let mut connections = Vec::with_capacity(channels);
    for _ in 0..channels {
        connections.push(endpoint.connect().await.with_context(|| {
            format!("connecting to the control plane at {}", control_plane.grpc)
        })?);
    }

    let measure_from = Instant::now() + args.warmup;
    let end = measure_from + args.duration;
    let pid = control_plane.pid();
    let sampler = std::thread::spawn(move || -> Result<(CpuSample, CpuSample)> {
        std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
        let first = CpuSample::take(pid)?;
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        Ok((first, CpuSample::take(pid)?))
    });

    let mut clients = JoinSet::new();
    for index in 0..plans.len() {
        let channel = connections[index % connections.len()].clone();
        clients.spawn(client(plans.clone(), index, channel, measure_from, end));
    }
    let mut stats = ClientStats::default();
    while let Some(joined) = clients.join_next().await {
        stats.merge(joined.context("a client task panicked")?);
    }
    let window = tokio::task::spawn_blocking(move || sampler.join())
        .await
        .context("joining the CPU sampler")?
        .map_err(|_| anyhow!("the CPU sampler panicked"))??;
    Ok((stats, window))
}

/// One client: Certify back to back until `end`, each call with the next CSR.
async fn client(
    plans: Arc<[ClientPlan]>,
    index: usize,
    channel: Channel,
    measure_from: Instant,
    end: Instant,
) -> ClientStats {
    let plan = &plans[index];
    let mut identity_client = IdentityClient::new(channel);
    let mut stats = ClientStats::default();
    let mut next = 0_usize;
    while Instant::now() < end {
        let slot = next % plan.csrs.len();
        if next >= plan.csrs.len() {
            stats.reused_csrs += 1;
        }
        next += 1;
        let request = CertifyRequest {
            identity: plan.identity.clone(),
            token: plan.token.clone(),
            csr: plan.csrs[slot].clone(),
            requested_lifetime: None,
        };
        let started = Instant::now();
        let result = tokio::time::timeout(CALL_TIMEOUT, identity_client.certify(request)).await;
        let done = Instant::now();
        let outcome = match result {
            Err(_) => Err((
                "client_timeout".to_owned(),
                format!("no answer within {}s", CALL_TIMEOUT.as_secs()),
            )),
            Ok(Err(status)) => Err((format!("{:?}", status.code()), status.message().to_owned())),
            Ok(Ok(response)) if slot == 0 => plan
                .check_first(response.get_ref())
                .map_err(|e| ("bad_certificate".to_owned(), format!("{e:#}"))),
            Ok(Ok(_)) => Ok(()),
        };
        match outcome {
            Ok(()) if done < measure_from => stats.warmup_ok += 1,
            Ok(()) if done < end => {
                let ns = u64::try_from(done.duration_since(started).as_nanos()).unwrap_or(u64::MAX);
                stats.latencies_ns.push(ns);
            }
            // Completed after the window: neither counted nor timed.
            Ok(()) => {}
            Err((kind, message)) => stats.failures.record(kind, &plan.identity, &message),
        }
    }
    stats
}

// === impl ClientStats ===

impl ClientStats {
    fn merge(&mut self, other: Self) {
        self.latencies_ns.extend(other.latencies_ns);
        self.warmup_ok += other.warmup_ok;
        self.reused_csrs += other.reused_csrs;
        self.failures.merge(other.failures);
    }
}

// === impl Failures ===

impl Failures {
    fn record(&mut self, kind: String, identity: &str, message: &str) {
        if self.examples.len() < FAILURE_EXAMPLES {
            self.examples.push(format!("{identity}: {kind}: {message}"));
        }
        *self.by_kind.entry(kind).or_default() += 1;
    }

    /// Adds `other`'s counts, and its examples while there is room.
    pub fn merge(&mut self, other: Self) {
        for (kind, n) in other.by_kind {
            *self.by_kind.entry(kind).or_default() += n;
        }
        let room = FAILURE_EXAMPLES.saturating_sub(self.examples.len());
        self.examples.extend(other.examples.into_iter().take(room));
    }

    /// Failed calls of every kind.
    pub fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }
}

// === impl CpuSample ===

impl CpuSample {
    fn take(server_pid: u32) -> Result<Self> {
        Ok(Self {
            at: Instant::now(),
            server: process_ticks(&server_pid.to_string())?,
            client: process_ticks("self")?,
            machine: MachineTicks::read()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_keep_counts_and_a_few_examples() {
        let mut a = Failures::default();
        for i in 0..4 {
            a.record("Unavailable".into(), &identity(i), "overloaded");
        }
        let mut b = Failures::default();
        for i in 0..3 {
            b.record("client_timeout".into(), &identity(i), "no answer");
        }
        a.merge(b);
        assert_eq!(a.total(), 7);
        assert_eq!(a.by_kind["Unavailable"], 4);
        assert_eq!(a.examples.len(), FAILURE_EXAMPLES);
    }

    #[test]
    fn each_client_has_its_own_token_and_identity() {
        let all: Vec<_> = tokens(2).collect();
        assert_eq!(
            all,
            vec![
                (
                    "bench-token-0000000000".to_owned(),
                    "spiffe://cluster.local/ns/bench/sa/client-0".to_owned()
                ),
                (
                    "bench-token-0000000001".to_owned(),
                    "spiffe://cluster.local/ns/bench/sa/client-1".to_owned()
                ),
            ]
        );
    }
}
