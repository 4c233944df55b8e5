//! The synthetic cluster: pods, Services and EndpointSlices as the API
//! server reports them, which pods the streams come from, and the changes
//! made to it.
//!
//! Service `k` lives in namespace `ns-{k % 20}` with service account
//! `svc-{k}`; its pods are `--pods / --services` consecutive ones, all in
//! its one EndpointSlice (port 80 → 8080), so an address change of a pod
//! also changes the Service it is behind. Stream pod `j` is pod
//! `j × (pods / streams)`, meshed, at 127.1.0.0 + 1 + j (all of 127/8 is
//! local on Linux, so a client can bind it as its source address). Every
//! other pod is at 198.18.0.0 + 1 + its index; every tenth of them has no
//! sidecar. Cluster IPs are 198.19.0.0 + 1 + k. Added pods get addresses
//! from 198.18.128.0, moved ones from 198.18.192.0.

use std::{collections::BTreeSet, net::Ipv4Addr};

use serde_json::{Value, json};

/// The trust domain of the control plane and every identity here.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// Pods below the address range of added pods.
pub const MAX_PODS: usize = 32_000;
/// Cluster IPs in 198.19.0.0/16.
pub const MAX_SERVICES: usize = 65_000;
/// Stream pods in 127.1.0.0/16.
pub const MAX_STREAMS: usize = 65_000;

const NAMESPACES: usize = 20;
const ADDED_BASE: u32 = u32::from_be_bytes([198, 18, 128, 0]);
const MOVED_BASE: u32 = u32::from_be_bytes([198, 18, 192, 0]);

/// One pod of the cluster.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub account: String,
    pub address: Ipv4Addr,
    pub meshed: bool,
}

/// One stream's pod: where it connects from and who it is.
#[derive(Clone, Debug)]
pub struct StreamPod {
    pub address: Ipv4Addr,
    pub identity: String,
}

/// What a change is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    /// A new meshed pod at a new address.
    PodAdded,
    /// A pod's address changes (its Service's endpoint there goes with it).
    AddressMoved,
    /// An endpoint is removed from a Service's EndpointSlice.
    EndpointRemoved,
}

/// One change to make, and how a stream recognises it.
#[derive(Debug)]
pub struct Change {
    pub kind: ChangeKind,
    /// The object to upsert into the stand-in.
    pub object: Value,
    /// An address (4 bytes) that the message carrying the change names:
    /// the pod's new address, or the Service's cluster IP.
    pub marker: Vec<u8>,
}

/// The cluster and the state the changes move on from.
#[derive(Debug)]
pub struct Cluster {
    pub pods: Vec<PodSpec>,
    services: usize,
    per_service: usize,
    /// Pod index of each stream.
    stream_pods: Vec<usize>,
    /// Each Service's endpoints: the pods in its slice, with the address the
    /// slice names.
    slices: Vec<Vec<(usize, Ipv4Addr)>>,
    moved: BTreeSet<usize>,
    added: u32,
    moves: u32,
    removals: usize,
    next_move: usize,
    made: usize,
}

// === impl ChangeKind ===

impl ChangeKind {
    pub const ALL: [Self; 3] = [Self::PodAdded, Self::AddressMoved, Self::EndpointRemoved];

    pub fn label(self) -> &'static str {
        match self {
            Self::PodAdded => "pod added",
            Self::AddressMoved => "address moved",
            Self::EndpointRemoved => "endpoint removed",
        }
    }
}

// === impl Cluster ===

impl Cluster {
    /// `pods` pods behind `services` Services, `streams` of them on loopback.
    pub fn new(pods: usize, services: usize, streams: usize) -> Self {
        let per_service = pods / services;
        let step = pods / streams;
        let stream_pods: Vec<usize> = (0..streams).map(|j| j * step).collect();
        let mut specs = Vec::with_capacity(pods);
        let mut next_stream = 0;
        for i in 0..pods {
            let k = (i / per_service).min(services - 1);
            let is_stream = stream_pods.get(next_stream) == Some(&i);
            let address = if is_stream {
                next_stream += 1;
                offset(u32::from_be_bytes([127, 1, 0, 1]), next_stream - 1)
            } else {
                offset(u32::from_be_bytes([198, 18, 0, 1]), i)
            };
            specs.push(PodSpec {
                namespace: namespace(k),
                name: format!("svc-{k}-{i}"),
                account: format!("svc-{k}"),
                address,
                meshed: is_stream || i % 10 != 9,
            });
        }
        let mut slices = vec![Vec::new(); services];
        for (i, pod) in specs.iter().enumerate() {
            slices[(i / per_service).min(services - 1)].push((i, pod.address));
        }
        Self {
            pods: specs,
            services,
            per_service,
            stream_pods,
            slices,
            moved: BTreeSet::new(),
            added: 0,
            moves: 0,
            removals: 0,
            next_move: 0,
            made: 0,
        }
    }

    /// Every object to seed the stand-in with: pods, Services, slices.
    pub fn objects(&self) -> Vec<Value> {
        let mut objects: Vec<Value> = self.pods.iter().enumerate().map(pod_json).collect();
        objects.extend((0..self.services).map(service_json));
        objects.extend((0..self.services).map(|k| self.slice_json(k)));
        objects
    }

    /// Each stream's pod, in stream order.
    pub fn stream_pods(&self) -> Vec<StreamPod> {
        self.stream_pods
            .iter()
            .map(|&i| {
                let pod = &self.pods[i];
                StreamPod {
                    address: pod.address,
                    identity: identity(&pod.namespace, &pod.account),
                }
            })
            .collect()
    }

    /// How many endpoints each Service starts with.
    pub fn per_service(&self) -> usize {
        self.per_service
    }

    /// The next change, in turn: pod added, address moved, endpoint removed.
    pub fn next_change(&mut self) -> Change {
        let kind = ChangeKind::ALL[self.made % ChangeKind::ALL.len()];
        self.made += 1;
        match kind {
            ChangeKind::PodAdded => {
                let n = self.added;
                self.added += 1;
                let address = Ipv4Addr::from(ADDED_BASE + n);
                let pod = PodSpec {
                    namespace: "bench-new".into(),
                    name: format!("new-{n}"),
                    account: format!("new-{n}"),
                    address,
                    meshed: true,
                };
                Change {
                    kind,
                    object: pod_json((usize::MAX - n as usize, &pod)),
                    marker: address.octets().to_vec(),
                }
            }
            ChangeKind::AddressMoved => {
                let i = self.movable();
                self.moved.insert(i);
                let address = Ipv4Addr::from(MOVED_BASE + self.moves);
                self.moves += 1;
                self.pods[i].address = address;
                Change {
                    kind,
                    object: pod_json((i, &self.pods[i])),
                    marker: address.octets().to_vec(),
                }
            }
            ChangeKind::EndpointRemoved => {
                // Services in turn; the endpoint removed is one whose pod
                // still answers at the address the slice names, so the
                // Service really changes.
                let mut k = self.removals % self.services;
                loop {
                    let moved = &self.moved;
                    let slice = &mut self.slices[k];
                    if slice.len() > 1
                        && let Some(at) = slice.iter().rposition(|(i, _)| !moved.contains(i))
                    {
                        slice.remove(at);
                        break;
                    }
                    k = (k + 1) % self.services;
                }
                self.removals += 1;
                Change {
                    kind,
                    object: self.slice_json(k),
                    marker: cluster_ip(k).octets().to_vec(),
                }
            }
        }
    }

    /// The next pod to move: not a stream's (its stream would be unbound),
    /// not moved before. The flags' check leaves enough of them.
    fn movable(&mut self) -> usize {
        let free = |c: &Self, i: usize| {
            i < c.pods.len() && c.stream_pods.binary_search(&i).is_err() && !c.moved.contains(&i)
        };
        // Spread over the Services: the second pod of each in turn, then the third...
        for _ in 0..self.pods.len() {
            let n = self.next_move;
            self.next_move += 1;
            let i = (n % self.services) * self.per_service + 1 + n / self.services;
            if free(self, i) {
                return i;
            }
        }
        (0..self.pods.len())
            .find(|&i| free(self, i))
            .expect("the flags' check leaves a pod to move")
    }

    fn slice_json(&self, k: usize) -> Value {
        let endpoints: Vec<Value> = self.slices[k]
            .iter()
            .map(|(i, address)| {
                json!({
                    "addresses": [address.to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "targetRef": {"kind": "Pod", "namespace": namespace(k), "name": self.pods[*i].name},
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": namespace(k),
                "name": format!("svc-{k}-slice"),
                "labels": {"kubernetes.io/service-name": format!("svc-{k}")},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        })
    }
}

/// The SPIFFE ID of a service account.
pub fn identity(namespace: &str, account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{account}")
}

fn namespace(k: usize) -> String {
    format!("ns-{}", k % NAMESPACES)
}

fn cluster_ip(k: usize) -> Ipv4Addr {
    offset(u32::from_be_bytes([198, 19, 0, 1]), k)
}

fn offset(base: u32, by: usize) -> Ipv4Addr {
    let by = u32::try_from(by).expect("the flags bound every index far below 2^32");
    Ipv4Addr::from(base + by)
}

/// A running pod; a meshed one has the injected sidecar (a native sidecar:
/// an init container), as the control plane's model requires.
fn pod_json((uid, pod): (usize, &PodSpec)) -> Value {
    let init: Vec<Value> = if pod.meshed {
        vec![json!({"name": "palisade-sidecar", "image": "palisade", "restartPolicy": "Always"})]
    } else {
        Vec::new()
    };
    let address = pod.address.to_string();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": pod.namespace,
            "name": pod.name,
            "uid": format!("uid-{uid}"),
            "labels": {"app": pod.account},
        },
        "spec": {
            "serviceAccountName": pod.account,
            "initContainers": init,
            "containers": [{"name": "app", "image": "app"}],
        },
        "status": {"phase": "Running", "podIP": address, "podIPs": [{"ip": address}]},
    })
}

fn service_json(k: usize) -> Value {
    let ip = cluster_ip(k).to_string();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace(k), "name": format!("svc-{k}")},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_come_from_meshed_loopback_pods_and_every_pod_is_behind_a_service() {
        let cluster = Cluster::new(500, 50, 20);
        let streams = cluster.stream_pods();
        assert_eq!(streams.len(), 20);
        assert_eq!(streams[0].address, Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(
            streams[0].identity,
            "spiffe://cluster.local/ns/ns-0/sa/svc-0"
        );
        assert!(cluster.stream_pods.iter().all(|&i| cluster.pods[i].meshed));
        assert_eq!(cluster.slices.iter().map(Vec::len).sum::<usize>(), 500);
        assert_eq!(cluster.objects().len(), 600);
    }

    #[test]
    fn changes_take_turns_and_never_touch_a_stream_pod() {
        let mut cluster = Cluster::new(500, 50, 20);
        let kinds: Vec<ChangeKind> = (0..6).map(|_| cluster.next_change().kind).collect();
        assert_eq!(&kinds[..3], &ChangeKind::ALL);
        assert_eq!(&kinds[3..], &ChangeKind::ALL);
        for _ in 0..90 {
            cluster.next_change();
        }
        assert!(
            cluster
                .stream_pods
                .iter()
                .all(|i| !cluster.moved.contains(i))
        );
        assert!(cluster.slices.iter().all(|s| !s.is_empty()));
    }
}
