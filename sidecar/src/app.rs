//! Builds the sidecar from its configuration and runs it until shutdown.

use std::{future::Future, net::SocketAddr, sync::Arc, time::SystemTime};

use anyhow::Context;
use palisade_proto::SpiffeId;
use palisade_runtime::metrics::Outcome;
use palisade_runtime::{
    admin::{self, AdminLimits, AdminState},
    watch::reload_on_change,
};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{field::Empty, info, info_span, warn};

use crate::{
    config::{CredentialSource, RunConfig},
    discovery::DiscoveryClient,
    identity::{IdentityClient, refresh},
    metrics::Metrics,
    policy::{Policy, PolicyStore},
    probe::Prober,
    proxy::{self, Proxy, inbound, outbound},
    tls::{CertStore, files},
};

/// A sidecar whose listeners are bound, ready to run.
#[derive(Debug)]
pub struct App {
    config: RunConfig,
    proxy: Arc<Proxy>,
    registry: Registry,
    inbound: Vec<(TcpListener, Arc<inbound::InboundTarget>)>,
    outbound: Vec<(TcpListener, Arc<outbound::OutboundTarget>)>,
    admin: TcpListener,
}

// === impl App ===

impl App {
    /// Loads credentials and policy and binds every listener. Missing or bad
    /// credentials are not fatal: the listeners come up and fail closed until
    /// valid ones appear.
    pub async fn build(config: RunConfig) -> anyhow::Result<Self> {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).context("registering metrics")?;
        let pinned: Vec<SpiffeId> = config
            .outbound
            .iter()
            .filter_map(|(_, t)| match t {
                outbound::OutboundTarget::Explicit { identity, .. } => Some(identity.clone()),
                outbound::OutboundTarget::Transparent { .. } => None,
            })
            .collect();
        let store = Arc::new(CertStore::with_tls(
            config.trust_domain.clone(),
            pinned,
            &config.tls,
        ));
        if let CredentialSource::Files { dir } = &config.credentials {
            reload_credentials(dir, &store, &metrics);
        }

        let policy = match &config.policy {
            Some(path) => PolicyStore::load(path, config.trust_domain.clone())
                .context("loading the authorization policy")?,
            None => PolicyStore::fixed(Policy::mesh_default(config.default_action)),
        };
        metrics.policy_in_force(&policy.current());
        let mut proxy = Proxy::new(
            store,
            Arc::new(policy),
            metrics,
            config.limits.clone(),
            config.max_connections,
        );
        proxy.access_log = config.access_log;
        let proxy = Arc::new(proxy);

        let inbound = bind_all(&config.inbound, "inbound")?;
        let outbound = bind_all(&config.outbound, "outbound")?;
        let admin = bind(config.admin_addr, "admin")?;
        Ok(Self {
            config,
            proxy,
            registry,
            inbound,
            outbound,
            admin,
        })
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// The bound inbound listener addresses, in configuration order.
    pub fn inbound_addrs(&self) -> std::io::Result<Vec<SocketAddr>> {
        self.inbound.iter().map(|(l, _)| l.local_addr()).collect()
    }

    /// The bound outbound listener addresses, in configuration order.
    pub fn outbound_addrs(&self) -> std::io::Result<Vec<SocketAddr>> {
        self.outbound.iter().map(|(l, _)| l.local_addr()).collect()
    }

    /// Serves until `shutdown`, then drains open connections for at most the
    /// configured drain timeout.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            config,
            proxy,
            registry,
            inbound,
            outbound,
            admin,
        } = self;
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();

        let mut addrs = Vec::new();
        for (listener, target) in inbound {
            addrs.push(format!("inbound={}", listener.local_addr()?));
            tasks.spawn(accept(
                proxy.clone(),
                listener,
                stop.clone(),
                |peer| info_span!("inbound", %peer, dst = Empty, identity = Empty),
                move |proxy, tcp| inbound::handle(proxy, target.clone(), tcp),
            ));
        }
        for (listener, target) in outbound {
            addrs.push(format!("outbound={}", listener.local_addr()?));
            tasks.spawn(accept(
                proxy.clone(),
                listener,
                stop.clone(),
                |peer| info_span!("outbound", %peer, dst = Empty, endpoint = Empty, identity = Empty),
                move |proxy, tcp| outbound::handle(proxy, target.clone(), tcp),
            ));
        }

        let store = proxy.store.clone();
        let ready_store = store.clone();
        let admin_addr = admin.local_addr()?;
        let admin_state = AdminState {
            registry,
            ready: Arc::new(move || ready_store.is_ready(SystemTime::now())),
            config: Arc::new(
                serde_json::to_value(&config).context("serializing the configuration")?,
            ),
            routes: crate::admin::routes(
                store,
                Arc::new(
                    Prober::new(config.app_probes.clone(), config.pod_ip)
                        .context("preparing the app's probes")?,
                ),
            ),
            limits: AdminLimits::default(),
        };
        tasks.spawn(admin::serve(
            admin,
            admin_state,
            stop.clone().cancelled_owned(),
        ));

        match config.credentials.clone() {
            CredentialSource::Files { dir } => {
                let (proxy, stop) = (proxy.clone(), stop.clone());
                tasks.spawn(async move {
                    reload_on_change(&dir, stop.cancelled(), || {
                        reload_credentials(&dir, &proxy.store, &proxy.metrics);
                    })
                    .await;
                });
            }
            CredentialSource::ControlPlane { client, schedule } => {
                tasks.spawn(refresh::run(
                    IdentityClient::new(client),
                    proxy.store.clone(),
                    proxy.metrics.clone(),
                    schedule,
                    stop.clone(),
                ));
            }
        }
        if let Some(stream) = config.discovery.clone() {
            info!(control_plane = %stream.control_plane, "discovery: following the control plane");
            let client = DiscoveryClient::new(
                stream,
                proxy.store.clone(),
                proxy.destinations.clone(),
                proxy.metrics.clone(),
            )
            .with_policy(proxy.policy.clone());
            tasks.spawn(client.run(stop.clone()));
        }
        if let Some(path) = config.policy.clone() {
            let (proxy, stop) = (proxy.clone(), stop.clone());
            tasks.spawn(async move {
                reload_on_change(&path, stop.cancelled(), || match proxy.policy.reload() {
                    Ok(false) => {}
                    Ok(true) => {
                        proxy.metrics.policy_in_force(&proxy.policy.current());
                        info!(file = %path.display(), "loaded a new authorization policy");
                    }
                    Err(error) => warn!(%error, "refused the changed policy; the previous policy stays in use"),
                })
                .await;
            });
        }

        info!(listeners = %addrs.join(" "), admin = %admin_addr, trust_domain = %config.trust_domain, "serving");
        shutdown.await;
        info!(drain = ?config.drain_timeout, "shutting down: no new connections; draining open ones");
        stop.cancel();
        let left = proxy.drain(config.drain_timeout).await;
        if left > 0 {
            warn!(
                left,
                "the drain timeout ran out; closing the remaining connections"
            );
        } else {
            info!("stopped");
        }
        tasks.shutdown().await;
        Ok(())
    }
}

/// Runs one listener's accept loop with `handle` for each connection.
async fn accept<H, F>(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    stop: CancellationToken,
    span: fn(SocketAddr) -> tracing::Span,
    handle: H,
) where
    H: Fn(Arc<Proxy>, tokio::net::TcpStream) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let handler_proxy = proxy.clone();
    proxy::serve(proxy, listener, stop, span, move |tcp, _peer| {
        handle(handler_proxy.clone(), tcp)
    })
    .await;
}

/// Binds a listener. IPv6 sockets are IPv6-only, so `0.0.0.0:P` and `[::]:P`
/// can both be bound.
fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind = || -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    };
    bind().with_context(|| format!("binding the {what} address {addr}"))
}

/// Binds each listener of a direction; an IPv6 address the host cannot bind
/// (IPv6 disabled) is skipped with a warning when another listener is bound.
fn bind_all<T: Clone>(
    listeners: &[(SocketAddr, T)],
    what: &str,
) -> anyhow::Result<Vec<(TcpListener, Arc<T>)>> {
    let mut bound = Vec::new();
    for (addr, target) in listeners {
        match bind(*addr, what) {
            Ok(listener) => bound.push((listener, Arc::new(target.clone()))),
            Err(error) if addr.is_ipv6() && listeners.len() > 1 => {
                warn!(error = format!("{error:#}"), "skipping an IPv6 listener");
            }
            Err(error) => return Err(error),
        }
    }
    Ok(bound)
}

/// Loads the credentials directory into the store and reports the outcome.
fn reload_credentials(dir: &std::path::Path, store: &CertStore, metrics: &Metrics) {
    match files::load(dir, store, SystemTime::now()) {
        Ok(None) => {}
        Ok(Some(configs)) => {
            metrics.renewal(Outcome::Success);
            metrics.certificate_installed(
                configs.identity().as_str(),
                (configs.not_before(), configs.not_after()),
                configs.roots(),
            );
            info!(
                identity = %configs.identity(),
                not_after = %humantime::format_rfc3339_seconds(configs.not_after()),
                roots = configs.roots(),
                "installed a certificate"
            );
        }
        Err(error) => {
            metrics.renewal(Outcome::Failure);
            let keeping = store.current().map(|c| c.identity().to_string());
            warn!(%error, dir = %dir.display(), ?keeping, "refused the credentials; keeping what is in use");
        }
    }
}
