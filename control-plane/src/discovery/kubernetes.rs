//! The `kubernetes` source: a kube-rs watcher on Pods, cluster-wide and
//! read-only (RBAC: `list` and `watch` on `pods`, nothing more).
//!
//! The watcher lists, then watches from the list's resourceVersion; on
//! `410 Gone` it lists again. A list arrives as `Init`, one `InitApply` per
//! pod and `InitDone`, and only then replaces the state, so a relist never
//! shows sidecars a half-empty directory. A watch error is retried with
//! kube's default backoff while the last state stays in use.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{debug, info, warn};

use super::state::Discovery;
use crate::metrics::Metrics;

/// Follows every Pod of the cluster into `discovery` until the stream ends
/// (it does not: errors are retried); `metrics` follow what it knows.
pub async fn run(client: Client, discovery: Arc<Discovery>, metrics: Metrics) {
    let pods: Api<Pod> = Api::all(client);
    let mut events = watcher(pods, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing: Vec<Pod> = Vec::new();
    loop {
        let event = events.try_next().await;
        let changed = matches!(
            event,
            Ok(Some(
                watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)
            ))
        );
        match event {
            Ok(Some(watcher::Event::Init)) => listing.clear(),
            Ok(Some(watcher::Event::InitApply(pod))) => listing.push(pod),
            Ok(Some(watcher::Event::InitDone)) => {
                discovery.replace_pods(&listing);
                let first = !discovery.is_synced();
                discovery.mark_synced();
                info!(
                    pods = listing.len(),
                    workloads = discovery.workloads(),
                    first,
                    "discovery: pods listed"
                );
                listing = Vec::new();
            }
            Ok(Some(watcher::Event::Apply(pod))) => {
                debug!(pod = ?pod.metadata.name, "discovery: pod changed");
                discovery.apply_pod(&pod);
            }
            Ok(Some(watcher::Event::Delete(pod))) => {
                debug!(pod = ?pod.metadata.name, "discovery: pod deleted");
                discovery.delete_pod(&pod);
            }
            Ok(None) => return,
            Err(error) => warn!(%error, "discovery: watching pods failed; retrying"),
        }
        if changed {
            metrics.discovery_known(
                discovery.is_synced(),
                discovery.workloads(),
                discovery.addresses(),
            );
        }
    }
}
