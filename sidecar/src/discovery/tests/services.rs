//! Services on the sidecar: the decision, the endpoint choice, and updates
//! while connections are open.

use std::{collections::HashMap, net::SocketAddr};

use palisade_proto::discovery::{Endpoint, Service, ServicePort, encode_service};
use rand::{SeedableRng, rngs::StdRng};
use tokio::time::Instant;

use super::*;
use crate::discovery::balance::{DOWN_FOR, pick};

const C: &str = "spiffe://cluster.local/ns/shop/sa/c";
const WEB: &str = "198.19.0.10";

fn at(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// The Service shop/web on port 80 with `endpoints` (address, identity).
fn web(endpoints: &[(&str, Option<&str>)]) -> Service {
    Service {
        name: "shop/web".into(),
        ports: vec![ServicePort {
            port: 80,
            endpoints: endpoints
                .iter()
                .map(|(a, i)| Endpoint {
                    address: at(a),
                    identity: i.map(id),
                })
                .collect(),
        }],
    }
}

fn services_message(snapshot: bool, services: &[Service]) -> WatchResponse {
    WatchResponse {
        snapshot,
        services: services
            .iter()
            .map(|s| encode_service(ip(WEB), s))
            .collect(),
        ..WatchResponse::default()
    }
}

/// The destinations after a snapshot holding only `service` at `WEB`.
fn with_web(service: &Service) -> Destinations {
    let destinations = Destinations::default();
    destinations
        .apply(&services_message(true, std::slice::from_ref(service)))
        .expect("snapshot");
    destinations
}

fn route(destinations: &Destinations, port: u16, mode: OutboundMode) -> Decision {
    let dst = SocketAddr::new(ip(WEB), port);
    decide(
        destinations.lookup(dst).expect("synced"),
        dst,
        mode,
        &networks(),
    )
}

fn service_route(destinations: &Destinations, mode: OutboundMode) -> ServiceRoute {
    match route(destinations, 80, mode) {
        Decision::Service(route) => route,
        other => panic!("not a Service route: {other:?}"),
    }
}

#[test]
fn a_service_port_is_decided_by_its_endpoints() {
    use OutboundMode::{Permissive, Strict};
    let mixed = with_web(&web(&[
        ("198.18.0.2:8080", Some(B)),
        ("198.18.0.8:8080", None),
    ]));
    let route = service_route(&mixed, Permissive);
    assert!(!route.meshed_only);
    assert_eq!(route.backends().1, [false, false], "both may be chosen");
    // Strict: only the meshed endpoint is a candidate.
    let route = service_route(&mixed, Strict);
    assert_eq!(route.backends().1, [false, true]);
    // A port the Service does not have, and a port with nobody behind it.
    assert_eq!(
        route_of(&mixed, 81, Permissive),
        Decision::Refuse(Refusal::NoServicePort)
    );
    let empty = with_web(&web(&[]));
    assert_eq!(
        route_of(&empty, 80, Permissive),
        Decision::Refuse(Refusal::NoEndpoints)
    );
    let unmeshed = with_web(&web(&[("198.18.0.8:8080", None)]));
    assert!(matches!(
        route_of(&unmeshed, 80, Permissive),
        Decision::Service(_)
    ));
    assert_eq!(
        route_of(&unmeshed, 80, Strict),
        Decision::Refuse(Refusal::StrictUnmeshed)
    );
    assert_eq!(mixed.services(), 1);
    assert_eq!(mixed.len(), 0, "a Service is not a pod address");
}

fn route_of(destinations: &Destinations, port: u16, mode: OutboundMode) -> Decision {
    route(destinations, port, mode)
}

/// Picks `n` endpoints for new connections held open, as the proxy does.
fn open_connections(route: &ServiceRoute, n: usize, rng: &mut StdRng) -> Vec<(usize, InFlight)> {
    let (backends, tried) = route.backends();
    (0..n)
        .map(|_| {
            let i = pick(backends, &tried, Instant::now(), rng).expect("an endpoint");
            (i, backends[i].load.start())
        })
        .collect()
}

#[tokio::test]
async fn new_connections_spread_over_the_endpoints() {
    let destinations = with_web(&web(&[
        ("198.18.0.2:8080", Some(B)),
        ("198.18.0.3:8080", Some(C)),
        ("198.18.0.4:8080", Some(C)),
        ("198.18.0.8:8080", None),
    ]));
    let route = service_route(&destinations, OutboundMode::Permissive);
    let mut rng = StdRng::seed_from_u64(7);
    let open = open_connections(&route, 400, &mut rng);
    let mut per: HashMap<usize, usize> = HashMap::new();
    for (i, _) in &open {
        *per.entry(*i).or_default() += 1;
    }
    // Power of two choices on connections in flight keeps every endpoint
    // within a few connections of the mean (random choice alone is off by
    // tens at this size).
    for i in 0..4 {
        let n = per.get(&i).copied().unwrap_or(0);
        assert!(
            (95..=105).contains(&n),
            "endpoint {i} got {n} of 400: {per:?}"
        );
    }
    let (backends, _) = route.backends();
    assert_eq!(backends[0].load.in_flight(), per[&0]);
    drop(open);
    assert!(backends.iter().all(|b| b.load.in_flight() == 0));
}

#[tokio::test(start_paused = true)]
async fn a_down_endpoint_is_skipped_until_its_mark_ages() {
    let destinations = with_web(&web(&[
        ("198.18.0.2:8080", Some(B)),
        ("198.18.0.3:8080", Some(C)),
    ]));
    let route = service_route(&destinations, OutboundMode::Permissive);
    let (backends, tried) = route.backends();
    let mut rng = StdRng::seed_from_u64(1);
    backends[0].load.mark_down(Instant::now());
    for _ in 0..50 {
        assert_eq!(pick(backends, &tried, Instant::now(), &mut rng), Some(1));
    }
    // The one left was tried and failed too: the down one is tried anyway.
    assert_eq!(
        pick(backends, &[false, true], Instant::now(), &mut rng),
        Some(0)
    );
    // Everything tried: nothing left.
    assert_eq!(
        pick(backends, &[true, true], Instant::now(), &mut rng),
        None
    );
    tokio::time::advance(DOWN_FOR + std::time::Duration::from_millis(1)).await;
    assert!(!backends[0].load.is_down(Instant::now()));
    let picks: Vec<_> = (0..50)
        .map(|_| pick(backends, &tried, Instant::now(), &mut rng))
        .collect();
    assert!(picks.contains(&Some(0)), "up again after {DOWN_FOR:?}");
}

#[tokio::test]
async fn endpoints_that_change_leave_open_connections_alone() {
    let destinations = with_web(&web(&[
        ("198.18.0.2:8080", Some(B)),
        ("198.18.0.3:8080", Some(C)),
    ]));
    let before = service_route(&destinations, OutboundMode::Permissive);
    let (old, _) = before.backends();
    let held_on_2 = old[0].load.start();
    let held_on_3 = old[1].load.start();
    old[1].load.mark_down(Instant::now());

    // .3 goes, .4 comes; .2 stays.
    destinations
        .apply(&services_message(
            false,
            &[web(&[
                ("198.18.0.2:8080", Some(B)),
                ("198.18.0.4:8080", Some(C)),
            ])],
        ))
        .expect("change");
    let after = service_route(&destinations, OutboundMode::Permissive);
    let (new, _) = after.backends();
    assert_eq!(
        new.iter().map(|b| b.address).collect::<Vec<_>>(),
        [at("198.18.0.2:8080"), at("198.18.0.4:8080")]
    );
    // The kept endpoint keeps its count: the balance is not reset.
    assert_eq!(new[0].load.in_flight(), 1);
    assert!(Arc::ptr_eq(&new[0].load, &old[0].load));
    assert_eq!(new[1].load.in_flight(), 0);
    // The connection to the removed endpoint is untouched, and its count
    // still works when it closes.
    assert_eq!(old[1].load.in_flight(), 1);
    drop(held_on_3);
    assert_eq!(old[1].load.in_flight(), 0);
    drop(held_on_2);
    assert_eq!(new[0].load.in_flight(), 0);

    // The Service goes: its address is unknown; an open route still works.
    let mut gone = WatchResponse::default();
    gone.removed_services.push(encode_ip(ip(WEB)));
    destinations.apply(&gone).expect("change");
    assert_eq!(
        destinations.lookup(SocketAddr::new(ip(WEB), 80)),
        Ok(Lookup::Unknown)
    );
    assert_eq!(after.backends().0.len(), 2);
}

#[test]
fn a_snapshot_in_parts_takes_effect_with_its_last_part() {
    let destinations = with_web(&web(&[("198.18.0.2:8080", Some(B))]));
    let mut first = message(true, &[("198.18.0.5", Resolution::Meshed(id(C)))], &[]);
    first.partial = true;
    let applied = destinations.apply(&first).expect("a part");
    assert!(applied.partial);
    // Nothing of it is in use yet; the old state is.
    assert_eq!(resolve(&destinations, "198.18.0.5"), Ok(None));
    assert_eq!(destinations.services(), 1);
    let mut last = services_message(true, &[web(&[("198.18.0.5:8080", Some(C))])]);
    last.partial = false;
    destinations.apply(&last).expect("the last part");
    assert_eq!(
        resolve(&destinations, "198.18.0.5"),
        Ok(Some(Resolution::Meshed(id(C))))
    );
    assert_eq!(
        service_route(&destinations, OutboundMode::Permissive)
            .backends()
            .0[0]
            .address,
        at("198.18.0.5:8080")
    );

    // A change in the middle of a snapshot is a broken stream: refused, and
    // the parts are dropped.
    destinations.apply(&first).expect("a part");
    assert_eq!(
        destinations.apply(&message(false, &[], &["198.18.0.5"])),
        Err(ApplyError::UnfinishedSnapshot)
    );
    let mut partial_change = message(false, &[], &[]);
    partial_change.partial = true;
    assert_eq!(
        destinations.apply(&partial_change),
        Err(ApplyError::PartialChange)
    );
    // Parts cut short by a lost stream are forgotten, not merged into the
    // next snapshot.
    let mut stray = message(true, &[("198.18.0.7", Resolution::Unmeshed)], &[]);
    stray.partial = true;
    destinations.apply(&stray).expect("a part");
    destinations.abandon_partial();
    destinations
        .apply(&message(true, &[("198.18.0.6", Resolution::Unmeshed)], &[]))
        .expect("a new snapshot");
    assert_eq!(resolve(&destinations, "198.18.0.7"), Ok(None));
    assert_eq!(destinations.len(), 1);
    assert_eq!(destinations.services(), 0);
}

#[test]
fn a_service_that_does_not_decode_changes_nothing() {
    let destinations = with_web(&web(&[("198.18.0.2:8080", Some(B))]));
    let mut bad = services_message(false, &[web(&[("198.18.0.3:8080", Some(C))])]);
    bad.services[0].ports[0].endpoints[0].port = 70_000;
    assert!(matches!(destinations.apply(&bad), Err(ApplyError::Wire(_))));
    assert_eq!(
        service_route(&destinations, OutboundMode::Permissive)
            .backends()
            .0[0]
            .address,
        at("198.18.0.2:8080")
    );
}
