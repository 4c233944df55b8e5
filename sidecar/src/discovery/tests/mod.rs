use std::net::IpAddr;

use ipnet::IpNet;
use palisade_proto::{
    SpiffeId,
    discovery::{Resolution, encode, encode_ip, v1::WatchResponse},
};

use super::*;

mod services;

fn resolve(destinations: &Destinations, address: &str) -> Result<Option<Resolution>, NotSynced> {
    destinations.resolve(ip(address))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("valid")
}

fn networks() -> Vec<IpNet> {
    vec!["198.18.0.0/16".parse().expect("net")]
}

const B: &str = "spiffe://cluster.local/ns/shop/sa/b";

#[test]
fn every_row_of_the_outbound_decision() {
    use OutboundMode::{Permissive, Strict};
    let inside = ip("198.18.0.2");
    let outside = ip("198.19.0.2");
    let meshed = Resolution::Meshed(id(B));
    let rows: [(Option<&Resolution>, IpAddr, OutboundMode, Decision); 12] = [
        (Some(&meshed), inside, Permissive, Decision::Mesh(id(B))),
        (Some(&meshed), inside, Strict, Decision::Mesh(id(B))),
        // Discovery, not the networks, decides: a meshed workload outside
        // them is still mesh TLS.
        (Some(&meshed), outside, Permissive, Decision::Mesh(id(B))),
        (
            Some(&Resolution::Unmeshed),
            inside,
            Permissive,
            Decision::Plain(Kind::Unmeshed),
        ),
        (
            Some(&Resolution::Unmeshed),
            outside,
            Strict,
            Decision::Refuse(Refusal::StrictUnmeshed),
        ),
        (
            Some(&Resolution::Conflict),
            inside,
            Permissive,
            Decision::Refuse(Refusal::Conflict),
        ),
        (
            Some(&Resolution::Conflict),
            outside,
            Strict,
            Decision::Refuse(Refusal::Conflict),
        ),
        (
            Some(&Resolution::Unidentifiable),
            inside,
            Permissive,
            Decision::Refuse(Refusal::Unidentifiable),
        ),
        (None, inside, Permissive, Decision::Plain(Kind::Unknown)),
        (
            None,
            inside,
            Strict,
            Decision::Refuse(Refusal::StrictUnknown),
        ),
        (None, outside, Permissive, Decision::Plain(Kind::Unknown)),
        (None, outside, Strict, Decision::Plain(Kind::Unknown)),
    ];
    for (resolution, address, mode, want) in rows {
        let lookup = resolution.map_or(Lookup::Unknown, |r| Lookup::Address(r.clone()));
        assert_eq!(
            decide(lookup, SocketAddr::new(address, 80), mode, &networks()),
            want,
            "{resolution:?} at {address} in {mode:?}"
        );
    }
}

fn message(snapshot: bool, set: &[(&str, Resolution)], removed: &[&str]) -> WatchResponse {
    WatchResponse {
        snapshot,
        addresses: set.iter().map(|(a, r)| encode(ip(a), r)).collect(),
        removed: removed.iter().map(|a| encode_ip(ip(a))).collect(),
        ..WatchResponse::default()
    }
}

#[test]
fn the_expected_identity_follows_the_address() {
    let destinations = Destinations::default();
    assert_eq!(resolve(&destinations, "198.18.0.2"), Err(NotSynced));
    assert!(destinations.is_empty());
    assert_eq!(destinations.len(), 0);
    assert_eq!(
        destinations.apply(&message(false, &[], &["198.18.0.2"])),
        Err(ApplyError::BeforeSnapshot)
    );

    destinations
        .apply(&message(
            true,
            &[
                ("198.18.0.2", Resolution::Meshed(id(B))),
                ("198.18.0.8", Resolution::Unmeshed),
            ],
            &[],
        ))
        .expect("snapshot");
    assert_eq!(
        resolve(&destinations, "198.18.0.2"),
        Ok(Some(Resolution::Meshed(id(B))))
    );
    assert_eq!(resolve(&destinations, "198.18.0.9"), Ok(None));
    assert_eq!(destinations.len(), 2);
    assert!(!destinations.is_empty());

    // b's address is claimed twice, then b is gone and m has it.
    destinations
        .apply(&message(
            false,
            &[("198.18.0.2", Resolution::Conflict)],
            &[],
        ))
        .expect("change");
    assert_eq!(
        resolve(&destinations, "198.18.0.2"),
        Ok(Some(Resolution::Conflict))
    );
    let m = id("spiffe://cluster.local/ns/evil/sa/m");
    destinations
        .apply(&message(
            false,
            &[("198.18.0.2", Resolution::Meshed(m.clone()))],
            &["198.18.0.8"],
        ))
        .expect("change");
    assert_eq!(
        resolve(&destinations, "198.18.0.2"),
        Ok(Some(Resolution::Meshed(m)))
    );
    assert_eq!(resolve(&destinations, "198.18.0.8"), Ok(None));

    // A new snapshot replaces everything.
    let applied = destinations
        .apply(&message(true, &[("198.18.0.3", Resolution::Unmeshed)], &[]))
        .expect("snapshot");
    assert_eq!(
        applied,
        Applied {
            snapshot: true,
            set: 1,
            removed: 0,
            partial: false,
        }
    );
    assert_eq!(resolve(&destinations, "198.18.0.2"), Ok(None));
    assert_eq!(destinations.len(), 1);
}

#[test]
fn a_message_that_does_not_decode_changes_nothing() {
    let destinations = Destinations::default();
    destinations
        .apply(&message(
            true,
            &[("198.18.0.2", Resolution::Meshed(id(B)))],
            &[],
        ))
        .expect("snapshot");
    let mut bad = message(
        false,
        &[("198.18.0.2", Resolution::Unmeshed)],
        &["198.18.0.2"],
    );
    bad.addresses[0].ip = vec![1, 2, 3];
    assert!(matches!(destinations.apply(&bad), Err(ApplyError::Wire(_))));
    let mut bad_removal = message(false, &[("198.18.0.2", Resolution::Unmeshed)], &[]);
    bad_removal.removed.push(vec![9; 5]);
    assert!(matches!(
        destinations.apply(&bad_removal),
        Err(ApplyError::Wire(_))
    ));
    let mut bad_snapshot = message(true, &[("198.18.0.4", Resolution::Unmeshed)], &[]);
    bad_snapshot.addresses[0].answer = None;
    assert!(destinations.apply(&bad_snapshot).is_err());
    assert_eq!(
        resolve(&destinations, "198.18.0.2"),
        Ok(Some(Resolution::Meshed(id(B)))),
        "the state before the bad messages stays"
    );
    assert_eq!(destinations.len(), 1);
}
