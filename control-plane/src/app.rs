//! Builds the control plane from its configuration and runs it until shutdown.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context;
use prometheus::Registry;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{error, info, warn};

use palisade_proto::TrustDomain;
use palisade_runtime::{
    admin::{self, AdminLimits, AdminState},
    verifier::{SpiffeClientVerifier, Verification},
    watch::reload_on_change,
};

use crate::{
    authn::{Authenticator, KubernetesAuthenticator, StaticTokens},
    ca::{CaStore, Reload, serving::ServingCert},
    config::{AuthenticatorConfig, DiscoverySource, ServeConfig},
    discovery::{self, Discovery, DiscoveryService},
    grpc::{self, ServerLimits},
    inject::{
        InjectionConfig, Injector,
        server::{self as webhook, WebhookLimits},
    },
    metrics::{Metrics, Outcome, ReloadSource},
    publish::BundlePublisher,
    service::IdentityService,
    tls,
};

/// A control plane whose listeners are bound, ready to run.
#[derive(Debug)]
pub struct App {
    config: ServeConfig,
    ca: Arc<CaStore>,
    authenticator: Arc<Authenticator>,
    metrics: Metrics,
    registry: Registry,
    grpc: TcpListener,
    admin: TcpListener,
    webhook: Option<(TcpListener, InjectionConfig)>,
    publisher: Option<BundlePublisher>,
    discovery: Option<DiscoveryParts>,
}

/// Discovery's state, and the client its `kubernetes` source watches with.
struct DiscoveryParts {
    state: Arc<Discovery>,
    pods: Option<kube::Client>,
}

impl std::fmt::Debug for DiscoveryParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoveryParts")
            .field("state", &self.state)
            .field("pods", &self.pods.is_some())
            .finish()
    }
}

// === impl App ===

impl App {
    /// Loads the CA and the authenticator and binds both listeners.
    pub async fn build(config: ServeConfig) -> anyhow::Result<Self> {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).context("registering metrics")?;

        let ca = CaStore::load(&config.ca_dir).with_context(|| {
            format!(
                "loading the CA from {} (create one with `palisade-control-plane ca init --out {}`)",
                config.ca_dir.display(),
                config.ca_dir.display()
            )
        })?;
        let issuer = ca.issuer();
        metrics.issuer_loaded(issuer.not_after(), issuer.bundle().len());
        info!(
            dir = %config.ca_dir.display(),
            issuer = %issuer.fingerprint(),
            not_after = %humantime::format_rfc3339_seconds(issuer.not_after()),
            roots = issuer.bundle().len(),
            "loaded the CA"
        );

        let authenticator = match &config.authenticator {
            AuthenticatorConfig::Static { path } => Authenticator::Static(
                StaticTokens::load(path, config.trust_domain.clone())
                    .context("loading the static token file")?,
            ),
            AuthenticatorConfig::Kubernetes(k) => Authenticator::Kubernetes(
                KubernetesAuthenticator::from_environment(k.clone())
                    .await
                    .context("setting up the kubernetes authenticator")?,
            ),
        };

        metrics.authenticator_ready(authenticator.kind());
        metrics.watching(ReloadSource::Issuer);
        if let Authenticator::Static(_) = authenticator {
            metrics.watching(ReloadSource::StaticTokens);
        }

        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC address {}", config.grpc_addr))?;
        let admin = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("binding the admin address {}", config.admin_addr))?;
        let webhook = match &config.webhook {
            None => None,
            Some(w) => {
                let injection = InjectionConfig::load(&w.injection_config)
                    .context("loading the injection configuration")?;
                let listener = TcpListener::bind(w.addr)
                    .await
                    .with_context(|| format!("binding the webhook address {}", w.addr))?;
                Some((listener, injection))
            }
        };
        let ca = Arc::new(ca);
        let publishing = config.publish.webhook_configuration.is_some()
            || config.publish.bundle_configmap.is_some();
        let watching_pods = config.discovery == Some(DiscoverySource::Kubernetes);
        let kube_client = if publishing || watching_pods {
            let kube_config = kube::Config::infer()
                .await
                .context("loading the Kubernetes client configuration (needed by --webhook-configuration, --bundle-configmap and --discovery-source kubernetes)")?;
            Some(kube::Client::try_from(kube_config).context("building the Kubernetes client")?)
        } else {
            None
        };
        let publisher = match &kube_client {
            Some(client) if publishing => Some(BundlePublisher::new(
                config.publish.clone(),
                client.clone(),
                ca.clone(),
                metrics.clone(),
            )),
            _ => None,
        };
        let discovery = match &config.discovery {
            None => None,
            Some(DiscoverySource::Kubernetes) => Some(DiscoveryParts {
                state: Discovery::with_default(config.trust_domain.clone(), config.policy_default),
                pods: kube_client.clone(),
            }),
            Some(DiscoverySource::File { path }) => {
                let discovery =
                    Discovery::with_default(config.trust_domain.clone(), config.policy_default);
                let (workloads, services) = load_discovery_file(path, &discovery)
                    .with_context(|| format!("loading the discovery file {}", path.display()))?;
                info!(file = %path.display(), workloads, services, "discovery: loaded the discovery file");
                metrics.watching(ReloadSource::DiscoveryFile);
                Some(DiscoveryParts {
                    state: discovery,
                    pods: None,
                })
            }
        };
        if let Some(DiscoveryParts { state: d, .. }) = &discovery {
            metrics.discovery_known(d);
        }
        Ok(Self {
            config,
            ca,
            authenticator: Arc::new(authenticator),
            metrics,
            registry,
            grpc,
            admin,
            webhook,
            publisher,
            discovery,
        })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// The bound webhook address, when the webhook is enabled.
    pub fn webhook_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.webhook.as_ref().map(|(l, _)| l.local_addr())
    }

    /// Serves until `shutdown`, then drains for at most the configured grace.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            config,
            ca,
            authenticator,
            metrics,
            registry,
            grpc,
            admin,
            webhook,
            publisher,
            discovery,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };

        let serving = Arc::new(
            ServingCert::new(&ca, config.server_names.clone())
                .context("issuing the serving certificate")?,
        );
        // Discovery callers prove who they are with a mesh certificate; the
        // roots follow the CA's bundle (watch_ca).
        let mesh_clients = match &discovery {
            Some(_) => Some(
                Verification::new(ca.issuer().bundle(), config.trust_domain.clone())
                    .context("the CA's trust bundle cannot verify mesh certificates")?
                    .optional_client_verifier(),
            ),
            None => None,
        };
        let tls = tls::server_config(serving.clone(), grpc::ALPN, mesh_clients.clone())
            .context("building the gRPC TLS configuration")?;
        let ready = Arc::new(AtomicBool::new(false));
        let grpc_addr = grpc.local_addr()?;
        let admin_addr = admin.local_addr()?;

        let mut tasks = JoinSet::new();
        tasks.spawn(serving.clone().maintain(ca.clone(), stopped()));
        tasks.spawn(watch_ca(
            ca.clone(),
            mesh_clients,
            config.trust_domain.clone(),
            metrics.clone(),
            stopped(),
        ));
        // The webhook judges pods by the namespaces and policies the
        // kubernetes source follows.
        let mut posture = None;
        let discovery_service = match discovery {
            None => None,
            Some(DiscoveryParts {
                state: discovery,
                pods,
            }) => {
                match (&config.discovery, pods) {
                    (Some(DiscoverySource::File { path }), _) => {
                        tasks.spawn(watch_discovery_file(
                            discovery.clone(),
                            path.clone(),
                            metrics.clone(),
                            stopped(),
                        ));
                    }
                    (_, Some(client)) => {
                        posture = Some(discovery.clone());
                        let (discovery, metrics, stop) =
                            (discovery.clone(), metrics.clone(), stopped());
                        tasks.spawn(async move {
                            tokio::select! {
                                () = discovery::kubernetes::run(client, discovery, metrics) => {}
                                () = stop => {}
                            }
                        });
                    }
                    _ => {}
                }
                Some(DiscoveryService::new(discovery, metrics.clone()))
            }
        };
        if let Authenticator::Static(_) = &*authenticator {
            tasks.spawn(watch_tokens(
                authenticator.clone(),
                metrics.clone(),
                stopped(),
            ));
        }

        let namespaces = match publisher {
            Some(publisher) => {
                let (tx, rx) = tokio::sync::mpsc::channel(256);
                tasks.spawn(publisher.run(rx, stopped()));
                Some(tx)
            }
            None => None,
        };
        let mut webhook_server = None;
        let webhook_addr = match &webhook {
            Some((listener, _)) => listener.local_addr()?.to_string(),
            None => "off".to_owned(),
        };
        if let (Some((listener, injection)), Some(w)) = (webhook, &config.webhook) {
            metrics.webhook_ready();
            metrics.watching(ReloadSource::InjectionConfig);
            let mut injector = Injector::new(
                injection,
                config.trust_domain.clone(),
                metrics.clone(),
                namespaces,
            );
            match posture {
                Some(discovery) => injector = injector.with_posture(discovery),
                None => warn!(
                    "the webhook runs without the kubernetes discovery source: it cannot see \
                     namespace labels, so no namespace enforces the mesh (palisade.io/enforce)"
                ),
            }
            let injector = Arc::new(injector);
            let tls = tls::server_config(serving.clone(), webhook::ALPN, None)
                .context("building the webhook TLS configuration")?;
            let limits = WebhookLimits {
                handshake_timeout: config.handshake_timeout,
                max_connections: 256,
                drain: config.shutdown_grace,
            };
            info!(config = %w.injection_config.display(), "injection webhook enabled");
            tasks.spawn(watch_injection_config(
                injector.clone(),
                w.injection_config.clone(),
                metrics.clone(),
                stopped(),
            ));
            webhook_server = Some(tokio::spawn(webhook::serve(
                listener,
                tls,
                injector,
                limits,
                stopped(),
            )));
        }

        let admin_state = AdminState {
            registry,
            ready: admin::flag(&ready),
            config: Arc::new(
                serde_json::to_value(&config).context("serializing the configuration")?,
            ),
            routes: axum::Router::new(),
            limits: AdminLimits::default(),
        };
        let admin_server = tokio::spawn(admin::serve(admin, admin_state, stopped()));

        let service = IdentityService::new(
            ca,
            authenticator,
            config.trust_domain.clone(),
            config.lifetimes.clone(),
            config.max_concurrent_signings,
            config.signing_queue_timeout,
            metrics,
        );
        let limits = ServerLimits {
            request_timeout: config.request_timeout,
            handshake_timeout: config.handshake_timeout,
            max_pending_handshakes: config.max_pending_handshakes,
            max_concurrent_streams: 256,
        };
        let discovery_source = match &config.discovery {
            None => "off",
            Some(DiscoverySource::Kubernetes) => "kubernetes",
            Some(DiscoverySource::File { .. }) => "file",
        };
        let grpc_server = tokio::spawn(grpc::serve(
            grpc,
            tls,
            service,
            discovery_service,
            limits,
            stopped(),
        ));
        ready.store(true, Ordering::Release);
        info!(grpc = %grpc_addr, admin = %admin_addr, webhook = %webhook_addr, discovery = discovery_source, trust_domain = %config.trust_domain, "serving");

        shutdown.await;
        info!(grace = ?config.shutdown_grace, "shutting down: draining in-flight requests");
        ready.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(config.shutdown_grace, async {
            let grpc = grpc_server.await;
            let admin = admin_server.await;
            if let Some(webhook) = webhook_server {
                let _ = webhook.await;
            }
            (grpc, admin)
        })
        .await;
        match drained {
            Ok((Ok(Ok(())), Ok(()))) => info!("stopped"),
            Ok((grpc, admin)) => error!(?grpc, ?admin, "a server ended with an error"),
            Err(_) => warn!("the shutdown grace ran out; abandoning in-flight requests"),
        }
        tasks.shutdown().await;
        Ok(())
    }
}

/// Reloads the CA directory when it changes; a broken replacement is refused,
/// logged and counted, and the old issuer keeps signing. A new bundle also
/// becomes the roots discovery callers are verified against.
async fn watch_ca(
    ca: Arc<CaStore>,
    mesh_clients: Option<Arc<SpiffeClientVerifier>>,
    trust_domain: TrustDomain,
    metrics: Metrics,
    stop: impl Future<Output = ()>,
) {
    reload_on_change(ca.dir(), stop, || match ca.reload() {
        Ok(Reload::Unchanged) => {}
        Ok(Reload::Replaced) => {
            let issuer = ca.issuer();
            if let Some(verifier) = &mesh_clients {
                match Verification::new(issuer.bundle(), trust_domain.clone()) {
                    Ok(verification) => verifier.replace(&verification),
                    Err(error) => warn!(%error, "the new trust bundle cannot verify mesh certificates; discovery callers are verified against the previous one"),
                }
            }
            metrics.reloaded(ReloadSource::Issuer, Outcome::Success);
            metrics.issuer_loaded(issuer.not_after(), issuer.bundle().len());
            info!(
                issuer = %issuer.fingerprint(),
                not_after = %humantime::format_rfc3339_seconds(issuer.not_after()),
                roots = issuer.bundle().len(),
                "loaded a new issuer or trust bundle"
            );
        }
        Err(error) => {
            metrics.reloaded(ReloadSource::Issuer, Outcome::Failure);
            let current = ca.issuer();
            warn!(
                %error,
                keeping = %current.fingerprint(),
                keeping_not_after = %humantime::format_rfc3339_seconds(current.not_after()),
                "refused the changed CA directory; the current issuer keeps signing"
            );
        }
    })
    .await;
}

/// Loads the discovery file into `discovery`; returns how many workloads
/// and Services it holds.
fn load_discovery_file(
    path: &std::path::Path,
    discovery: &Discovery,
) -> anyhow::Result<(usize, usize)> {
    let text = std::fs::read_to_string(path).context("reading it")?;
    let parsed = discovery::file::parse(&text, discovery.trust_domain())?;
    let n = (parsed.workloads.len(), parsed.services.len());
    discovery.replace_file(parsed);
    discovery.mark_synced();
    Ok(n)
}

/// Reloads the discovery file when it changes; a bad edit keeps the previous
/// state and says why.
async fn watch_discovery_file(
    discovery: Arc<Discovery>,
    path: std::path::PathBuf,
    metrics: Metrics,
    stop: impl Future<Output = ()>,
) {
    reload_on_change(&path, stop, || match load_discovery_file(&path, &discovery) {
        Ok((workloads, services)) => {
            metrics.reloaded(ReloadSource::DiscoveryFile, Outcome::Success);
            metrics.discovery_known(&discovery);
            info!(file = %path.display(), workloads, services, "discovery: reloaded the discovery file");
        }
        Err(error) => {
            metrics.reloaded(ReloadSource::DiscoveryFile, Outcome::Failure);
            warn!(error = format!("{error:#}"), file = %path.display(), "discovery: refused the changed discovery file; the previous state stays in use");
        }
    })
    .await;
}

/// Reloads the injection configuration when it changes; a bad edit keeps the
/// previous one.
async fn watch_injection_config(
    injector: Arc<Injector>,
    path: std::path::PathBuf,
    metrics: Metrics,
    stop: impl Future<Output = ()>,
) {
    reload_on_change(&path, stop, || match InjectionConfig::load(&path) {
        Ok(config) if config == *injector.config() => {}
        Ok(config) => {
            injector.set_config(config);
            metrics.reloaded(ReloadSource::InjectionConfig, Outcome::Success);
            info!(file = %path.display(), "reloaded the injection configuration");
        }
        Err(error) => {
            metrics.reloaded(ReloadSource::InjectionConfig, Outcome::Failure);
            warn!(%error, "refused the changed injection configuration; the previous one stays in use");
        }
    })
    .await;
}

/// Reloads the static token file when it changes; a bad edit keeps the old table.
async fn watch_tokens(
    authenticator: Arc<Authenticator>,
    metrics: Metrics,
    stop: impl Future<Output = ()>,
) {
    let Authenticator::Static(tokens) = &*authenticator else {
        return;
    };
    reload_on_change(tokens.path(), stop, || match tokens.reload() {
        Ok(None) => {}
        Ok(Some(n)) => {
            metrics.reloaded(ReloadSource::StaticTokens, Outcome::Success);
            info!(tokens = n, file = %tokens.path().display(), "reloaded the static token file");
        }
        Err(error) => {
            metrics.reloaded(ReloadSource::StaticTokens, Outcome::Failure);
            warn!(%error, "refused the changed token file; the previous tokens stay in use");
        }
    })
    .await;
}
