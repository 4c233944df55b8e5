//! A stand-in Kubernetes API server for tests: the one every test of a
//! Kubernetes API path runs against, in process (Rust) or as the
//! `palisade-kube-stand-in` process (the Python chart tests).
//!
//! It speaks the API server's HTTP and JSON, over HTTPS with a CA of its own,
//! well enough for kube-rs clients, watchers and reflectors, Helm and
//! `urllib`:
//!
//! - get, list and **watch** of every kind it knows (core and grouped,
//!   namespaced and cluster-scoped, CRDs once created): `ADDED`, `MODIFIED`,
//!   `DELETED` and `BOOKMARK` events, one cluster-wide increasing
//!   `resourceVersion`, `resourceVersion`/`resourceVersionMatch` semantics,
//!   pages (`limit`/`continue`), label and field selectors, and `410 Gone`
//!   once history is compacted ([`ApiServer::compact`]);
//! - create (`409 AlreadyExists`), update (`409 Conflict` on a stale
//!   `resourceVersion`), delete (finalizers, preconditions), JSON patch
//!   (a failed `test` is `422 Invalid`, as the real server answers), merge
//!   patch and server-side apply (create-or-merge, field manager recorded);
//! - `authentication.k8s.io/v1` TokenReview with scripted answers
//!   ([`TokenAnswer`]), the reviews seen and the most in flight at once;
//! - the pod proxy, `/api/v1/namespaces/N/pods/P:PORT/proxy/...`, forwarded
//!   to the address a test registers ([`ApiServer::proxy_pod`]);
//! - faults ([`Fault`]: a status, a closed connection, a hang, a delay) and a
//!   record of every request ([`Recorded`]);
//! - control endpoints under `/stand-in/` for a test in another process.
//!
//! What it does not model: RBAC (inject a `403` instead), admission,
//! strategic merge patch (`415`), field ownership conflicts of apply, and
//! the status subresource's protection of `.status` on main-resource writes.
//!
//! Modules: `resources` (the kinds it serves, discovery), `store` (objects,
//! history, the write rules), `selector` (label and field selectors),
//! `serve` (TLS, routing, the verbs), `watch` (event streams), `review`
//! (TokenReview), `fault`, `record`, `proxy` (the pod proxy), `control`
//! (the `/stand-in/` endpoints), `tls` (the CA and kubeconfig).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde::Deserialize;
use serde_json::Value;
use tokio::{
    net::TcpListener,
    sync::{broadcast, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

mod control;
mod fault;
mod proxy;
mod record;
mod resources;
mod review;
mod selector;
mod serve;
mod store;
mod tls;
mod watch_stream;

pub use fault::{Action, Fault, Match};
pub use record::Recorded;
pub use review::{ReviewSeen, TokenAnswer, Verdict};

use resources::Registry;
use store::Store;

/// The bearer token the stand-in accepts unless told otherwise.
pub const DEFAULT_CLIENT_TOKEN: &str = "stand-in-client-token";

/// A running stand-in API server. Dropping it stops it (listener and every
/// connection); [`ApiServer::shutdown`] also waits until they are gone.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca_pem: String,
    ca_der: Vec<u8>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// How to start an [`ApiServer`].
#[derive(Debug, Default)]
pub struct Builder {
    tokens: Vec<String>,
    bookmark_interval: Option<Duration>,
    gone: GoneForm,
    seed: Seed,
    addr: Option<SocketAddr>,
}

/// How a watch that asks for compacted history is told so.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GoneForm {
    /// `200 OK` and one `ERROR` event carrying the `410 Expired` Status, as
    /// the real API server's watch cache answers. kube-rs watchers relist on
    /// it.
    #[default]
    Event,
    /// The watch request itself fails with `410 Gone` (an `Expired` Status),
    /// as a server without watch cache answers. Note: kube-rs 5 watchers
    /// retry the same resourceVersion on this form instead of relisting.
    Http,
}

/// What a stand-in starts with (also the `--seed` file of the binary).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Seed {
    /// Objects of any kind the stand-in serves (CRDs first, then their objects).
    #[serde(default)]
    pub objects: Vec<Value>,
    /// Scripted TokenReview answers, by token.
    #[serde(default)]
    pub token_reviews: HashMap<String, TokenAnswer>,
    /// Faults in force from the start.
    #[serde(default)]
    pub faults: Vec<Fault>,
}

/// Why the stand-in could not start or do what a test asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the stand-in's certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot build the stand-in's TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build a kube client for the stand-in: {0}")]
    Client(#[from] kube::Error),
    #[error("the stand-in refused the object ({code} {reason}): {message}")]
    Refused {
        code: u16,
        reason: String,
        message: String,
    },
    #[error(
        "unknown resource {0:?}: name it by plural, as `pods` or `mutatingwebhookconfigurations.admissionregistration.k8s.io`"
    )]
    UnknownResource(String),
}

/// What the server's tasks share with the handle.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The newest resourceVersion, for watches to wake on.
    changes: watch::Sender<u64>,
    /// Bookmarks, closes and expiries for every open watch.
    watch_control: broadcast::Sender<WatchControl>,
    tokens: Mutex<Vec<String>>,
    reviews: Mutex<review::Reviews>,
    faults: Mutex<Vec<Fault>>,
    requests: Mutex<Vec<Recorded>>,
    proxies: Mutex<HashMap<(String, String, u16), SocketAddr>>,
    in_flight: InFlight,
    reviews_in_flight: InFlight,
    gone: GoneForm,
    bookmark_interval: Option<Duration>,
}

/// The objects and the kinds they are of, under one lock (a CRD adds a kind).
#[derive(Debug)]
struct State {
    registry: Registry,
    store: Store,
}

/// A message to every open watch.
#[derive(Clone, Copy, Debug)]
enum WatchControl {
    /// Send a `BOOKMARK` now (to watches that allow them).
    Bookmark,
    /// End the stream cleanly; the client watches again from where it was.
    Close,
    /// End the stream with the `410 Expired` ERROR event: the client relists.
    Expire,
}

/// Counts requests in flight and remembers the most seen at once.
#[derive(Debug, Default)]
struct InFlight {
    now: AtomicUsize,
    max: AtomicUsize,
}

/// Holds one unit of an [`InFlight`] until dropped.
struct InFlightGuard<'a>(&'a InFlight);

// === impl Builder ===

impl Builder {
    /// Accepts `token` as a client's bearer token (instead of
    /// [`DEFAULT_CLIENT_TOKEN`]; call again to accept several).
    pub fn client_token(mut self, token: impl Into<String>) -> Self {
        self.tokens.push(token.into());
        self
    }

    /// Sends a `BOOKMARK` this often on every watch that allows them (the
    /// real server: about once a minute). Without it, bookmarks are sent on
    /// [`ApiServer::bookmark`] only.
    pub fn bookmark_interval(mut self, every: Duration) -> Self {
        self.bookmark_interval = Some(every);
        self
    }

    /// How a watch of compacted history is answered (default: the ERROR event).
    pub fn gone_form(mut self, form: GoneForm) -> Self {
        self.gone = form;
        self
    }

    /// Starts with `object` stored (any kind the stand-in serves).
    pub fn object(mut self, object: Value) -> Self {
        self.seed.objects.push(object);
        self
    }

    /// Starts with the CRDs the chart ships (`helm/palisade/files/crds.yaml`),
    /// so the kinds a Palisade control plane watches exist, as on a cluster
    /// where the chart was installed.
    pub fn palisade_crds(mut self) -> Self {
        self.seed.objects.extend(chart_crds());
        self
    }

    /// Answers TokenReviews of `token` with `answer`.
    pub fn token_review(mut self, token: impl Into<String>, answer: TokenAnswer) -> Self {
        self.seed.token_reviews.insert(token.into(), answer);
        self
    }

    /// Starts with everything in `seed` (objects, token answers, faults).
    pub fn seed(mut self, seed: Seed) -> Self {
        self.seed.objects.extend(seed.objects);
        self.seed.token_reviews.extend(seed.token_reviews);
        self.seed.faults.extend(seed.faults);
        self
    }

    /// Listens on `addr` instead of an ephemeral port of 127.0.0.1.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }

    /// Makes the CA and serving certificate, stores the seed and serves.
    pub async fn start(self) -> Result<ApiServer, Error> {
        let certs = tls::Certs::generate()?;
        let addr = self.addr.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let tokens = if self.tokens.is_empty() {
            vec![DEFAULT_CLIENT_TOKEN.to_owned()]
        } else {
            self.tokens
        };
        let (watch_control, _) = broadcast::channel(64);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                registry: Registry::built_in(),
                store: Store::default(),
            }),
            changes: watch::channel(0).0,
            watch_control,
            tokens: Mutex::new(tokens),
            reviews: Mutex::new(review::Reviews::default()),
            faults: Mutex::new(self.seed.faults),
            requests: Mutex::new(Vec::new()),
            proxies: Mutex::new(HashMap::new()),
            in_flight: InFlight::default(),
            reviews_in_flight: InFlight::default(),
            gone: self.gone,
            bookmark_interval: self.bookmark_interval,
        });
        for object in self.seed.objects {
            shared.upsert(object)?;
        }
        for (token, answer) in self.seed.token_reviews {
            lock(&shared.reviews).script(token, answer);
        }
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(serve::accept_loop(
            listener,
            certs.acceptor(),
            shared.clone(),
            cancel.clone(),
            tracker.clone(),
        ));
        tracing::debug!(%addr, "the stand-in API server is serving");
        Ok(ApiServer {
            shared,
            addr,
            ca_pem: certs.ca_pem,
            ca_der: certs.ca_der,
            cancel,
            tracker,
        })
    }
}

// === impl ApiServer ===

impl ApiServer {
    /// Starts a stand-in with the defaults on an ephemeral loopback port.
    pub async fn start() -> Result<Self, Error> {
        Builder::default().start().await
    }

    /// A [`Builder`] for a stand-in with seed objects, answers or settings.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA that signed its serving certificate (valid for 127.0.0.1,
    /// ::1 and localhost), PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The same CA, DER.
    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// The first bearer token it accepts (the one its kubeconfig carries).
    pub fn token(&self) -> String {
        lock(&self.shared.tokens)
            .first()
            .cloned()
            .unwrap_or_default()
    }

    /// A kube client configuration for it: its URL, its CA, the token, and
    /// `default` as the namespace. Change fields to test other setups.
    /// Installs aws-lc-rs as the process's rustls provider if there is none
    /// yet, as the binaries do at start.
    pub fn kube_config(&self) -> kube::Config {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let url = self
            .url()
            .parse()
            .expect("an https URL of a socket address parses");
        let mut config = kube::Config::new(url);
        config.root_cert = Some(vec![self.ca_der.clone()]);
        config.auth_info.token = Some(self.token().into());
        config
    }

    /// A kube client for it.
    pub fn client(&self) -> Result<kube::Client, Error> {
        Ok(kube::Client::try_from(self.kube_config())?)
    }

    /// Its kubeconfig (JSON, which kubeconfig readers take as YAML), with the
    /// CA inline and `namespace` as the context's namespace.
    pub fn kubeconfig(&self, namespace: Option<&str>) -> String {
        tls::kubeconfig(&self.url(), &self.ca_pem, &self.token(), namespace)
    }

    /// Writes [`ApiServer::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path, namespace: Option<&str>) -> Result<(), Error> {
        std::fs::write(path, self.kubeconfig(namespace)).map_err(|source| Error::Write {
            path: path.display().to_string(),
            source,
        })
    }

    /// Stores `object` (creating or replacing it, bypassing every check but
    /// the kind's): watches see `ADDED` or `MODIFIED`. Returns it as stored.
    pub fn upsert(&self, object: Value) -> Result<Value, Error> {
        self.shared.upsert(object)
    }

    /// The stored object, if any. `resource` is a plural (`pods`) or
    /// plural.group (`mutatingwebhookconfigurations.admissionregistration.k8s.io`).
    pub fn get(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let state = lock(&self.shared.state);
        let def = state.registry.find(resource)?;
        state
            .store
            .get(def, namespace.unwrap_or_default(), name)
            .cloned()
    }

    /// Every stored object of `resource`, in `namespace` or all, by namespace and name.
    pub fn list(&self, resource: &str, namespace: Option<&str>) -> Result<Vec<Value>, Error> {
        let state = lock(&self.shared.state);
        let def = state
            .registry
            .find(resource)
            .ok_or_else(|| Error::UnknownResource(resource.to_owned()))?;
        Ok(state.store.all(def, namespace).cloned().collect())
    }

    /// Deletes the object at once (no finalizers): watches see `DELETED`.
    /// Returns whether it was there.
    pub fn remove(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<bool, Error> {
        self.shared.with_state(|state| {
            let def = state
                .registry
                .find(resource)
                .ok_or_else(|| Error::UnknownResource(resource.to_owned()))?;
            Ok(state
                .store
                .remove(def, namespace.unwrap_or_default(), name)
                .is_some())
        })
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.state).store.resource_version()
    }

    /// Compacts history, as etcd does: the resourceVersion moves on (a write
    /// elsewhere in the cluster) and every older one is gone, so a list or
    /// watch asking for one gets `410 Expired`. Open watches go on.
    pub fn compact(&self) {
        self.shared.with_state(|state| state.store.compact());
    }

    /// Ends every open watch cleanly; clients watch again from their
    /// resourceVersion (and get 410 if it was compacted meanwhile).
    pub fn close_watches(&self) {
        let _ = self.shared.watch_control.send(WatchControl::Close);
    }

    /// Compacts history and ends every open watch with the `410 Expired`
    /// ERROR event, so every watcher relists.
    pub fn expire_watches(&self) {
        self.compact();
        let _ = self.shared.watch_control.send(WatchControl::Expire);
    }

    /// Sends a `BOOKMARK` with the newest resourceVersion on every open watch
    /// that allows them.
    pub fn bookmark(&self) {
        let _ = self.shared.watch_control.send(WatchControl::Bookmark);
    }

    /// How many watches are open now.
    pub fn open_watches(&self) -> usize {
        self.shared.watch_control.receiver_count()
    }

    /// Answers TokenReviews of `token` with `answer` from now on. A token
    /// without an answer is not authenticated ("invalid bearer token").
    pub fn script_token(&self, token: impl Into<String>, answer: TokenAnswer) {
        lock(&self.shared.reviews).script(token.into(), answer);
    }

    /// Every TokenReview received, in order.
    pub fn token_reviews(&self) -> Vec<ReviewSeen> {
        lock(&self.shared.reviews).seen.clone()
    }

    /// The most TokenReviews that were in flight at once.
    pub fn token_reviews_max_in_flight(&self) -> usize {
        self.shared.reviews_in_flight.max()
    }

    /// The most API requests (watches excepted) that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.in_flight.max()
    }

    /// Adds a fault; the first matching fault in force answers a request.
    pub fn inject(&self, fault: Fault) {
        lock(&self.shared.faults).push(fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// Every request received (control endpoints excepted), in order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// Forgets the requests received so far.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Forwards the pod proxy path of `namespace/pod:port` to `to`. The pod
    /// must exist for the proxy to answer (as in a cluster).
    pub fn proxy_pod(&self, namespace: &str, pod: &str, port: u16, to: SocketAddr) {
        lock(&self.shared.proxies).insert((namespace.to_owned(), pod.to_owned(), port), to);
    }

    /// Stops serving and waits until the listener and every connection are
    /// closed: a client sees the API server gone.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

// === impl Shared ===

impl Shared {
    /// Runs `f` on the state, then wakes the watches if it wrote anything.
    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (result, rv) = {
            let mut state = lock(&self.state);
            let result = f(&mut state);
            (result, state.store.resource_version())
        };
        self.changes.send_if_modified(|seen| {
            let newer = *seen != rv;
            *seen = rv;
            newer
        });
        result
    }

    fn upsert(&self, object: Value) -> Result<Value, Error> {
        self.with_state(|state| state.upsert(object))
            .map_err(|status| Error::Refused {
                code: status.code,
                reason: status.reason.to_owned(),
                message: status.message,
            })
    }
}

// === impl InFlight ===

impl InFlight {
    fn enter(&self) -> InFlightGuard<'_> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        InFlightGuard(self)
    }

    fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Locks `mutex`; a test that panicked while holding it left consistent
/// data behind (every critical section is a few assignments).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;

/// The CustomResourceDefinitions the chart ships, as JSON objects.
pub fn chart_crds() -> Vec<Value> {
    const CHART_CRDS: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../helm/palisade/files/crds.yaml"
    ));
    serde_saphyr::from_multiple(CHART_CRDS).expect("the chart's crds.yaml is YAML")
}
