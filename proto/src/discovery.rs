//! What an address must answer with, on both sides of the discovery stream.
//!
//! The control plane turns its model into [`Resolution`]s and encodes them;
//! the sidecar decodes what it receives, which it treats as input from the
//! network: an address that is not 4 or 16 bytes, an identity that is not a
//! SPIFFE ID, or an answer it does not know is an error, never a guess.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{
    SpiffeId, SpiffeIdError,
    discovery::v1::{
        Address, FailClosed, Unmeshed, address::Answer, endpoint::Answer as EndpointAnswer,
        fail_closed::Reason,
    },
};

/// Version 1 of the discovery API, package `palisade.discovery.v1`.
#[allow(missing_debug_implementations, clippy::all)]
pub mod v1 {
    tonic::include_proto!("palisade.discovery.v1");
}

/// What a sidecar dialling an address must be answered by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// A meshed workload: mesh TLS, and the server must present exactly this
    /// identity.
    Meshed(SpiffeId),
    /// A pod without a sidecar, or a node address: plain TCP.
    Unmeshed,
    /// More than one live pod claims the address: refused until one is gone.
    Conflict,
    /// A pod with a sidecar whose identity cannot be derived: refused (plain
    /// TCP to it would be a downgrade).
    Unidentifiable,
}

/// A Service's cluster address: what its ports lead to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// `namespace/name`, for logs.
    pub name: String,
    /// Its TCP ports, in port order.
    pub ports: Vec<ServicePort>,
}

/// One port of a Service and its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    /// Where a connection may go; empty: refused.
    pub endpoints: Vec<Endpoint>,
}

/// One ready endpoint of a Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    /// The pod address and target port.
    pub address: SocketAddr,
    /// Who must answer there (mesh TLS); `None`: no sidecar, plain TCP.
    pub identity: Option<SpiffeId>,
}

/// Why a received [`Address`] or [`v1::Service`] was not understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("an address is {0} bytes; 4 or 16 are expected")]
    AddressLength(usize),
    #[error("the identity at {address} is not a SPIFFE ID: {error}")]
    Identity {
        address: IpAddr,
        error: SpiffeIdError,
    },
    #[error("the answer for {0} is missing or of an unknown kind")]
    NoAnswer(IpAddr),
    #[error("the service at {address} names port {port}; 1 to 65535 are expected")]
    Port { address: IpAddr, port: u32 },
}

// === impl Service ===

impl Service {
    /// The endpoints of `port`; `None` when the Service has no such port.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

// === impl Resolution ===

impl Resolution {
    /// Whether connections to an address with this resolution are refused.
    pub fn fails_closed(&self) -> bool {
        matches!(self, Self::Conflict | Self::Unidentifiable)
    }
}

/// The wire form of `address` answering with `resolution`.
pub fn encode(address: IpAddr, resolution: &Resolution) -> Address {
    let answer = match resolution {
        Resolution::Meshed(id) => Answer::Meshed(id.as_str().to_owned()),
        Resolution::Unmeshed => Answer::Unmeshed(Unmeshed {}),
        Resolution::Conflict => Answer::FailClosed(FailClosed {
            reason: Reason::Conflict.into(),
        }),
        Resolution::Unidentifiable => Answer::FailClosed(FailClosed {
            reason: Reason::Unidentifiable.into(),
        }),
    };
    Address {
        ip: encode_ip(address),
        answer: Some(answer),
    }
}

/// The address's bytes: 4 for IPv4, 16 for IPv6.
pub fn encode_ip(address: IpAddr) -> Vec<u8> {
    match address {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// An address from its 4 or 16 bytes.
pub fn decode_ip(bytes: &[u8]) -> Result<IpAddr, WireError> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        Ok(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        Ok(IpAddr::V6(Ipv6Addr::from(v6)).to_canonical())
    } else {
        Err(WireError::AddressLength(bytes.len()))
    }
}

/// A received address and what it must answer with.
///
/// A fail-closed answer with a reason this version does not know still
/// fails closed: an older sidecar must not turn a newer refusal into plain
/// TCP.
pub fn decode(wire: &Address) -> Result<(IpAddr, Resolution), WireError> {
    let address = decode_ip(&wire.ip)?;
    let resolution = match &wire.answer {
        Some(Answer::Meshed(id)) => Resolution::Meshed(
            SpiffeId::parse(id).map_err(|error| WireError::Identity { address, error })?,
        ),
        Some(Answer::Unmeshed(_)) => Resolution::Unmeshed,
        Some(Answer::FailClosed(f)) => match Reason::try_from(f.reason) {
            Ok(Reason::Unidentifiable) => Resolution::Unidentifiable,
            _ => Resolution::Conflict,
        },
        None => return Err(WireError::NoAnswer(address)),
    };
    Ok((address, resolution))
}

/// The wire form of the Service at `address`.
pub fn encode_service(address: IpAddr, service: &Service) -> v1::Service {
    v1::Service {
        ip: encode_ip(address),
        name: service.name.clone(),
        ports: service
            .ports
            .iter()
            .map(|p| v1::ServicePort {
                port: u32::from(p.port),
                endpoints: p
                    .endpoints
                    .iter()
                    .map(|e| v1::Endpoint {
                        ip: encode_ip(e.address.ip()),
                        port: u32::from(e.address.port()),
                        answer: Some(match &e.identity {
                            Some(id) => EndpointAnswer::Meshed(id.as_str().to_owned()),
                            None => EndpointAnswer::Unmeshed(Unmeshed {}),
                        }),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// A received Service and its cluster address; anything not understood in
/// it (an address, a port, an identity, an answer) refuses it whole.
pub fn decode_service(wire: &v1::Service) -> Result<(IpAddr, Service), WireError> {
    let address = decode_ip(&wire.ip)?;
    let port = |port: u32| {
        u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(WireError::Port { address, port })
    };
    let ports = wire
        .ports
        .iter()
        .map(|p| {
            let endpoints = p
                .endpoints
                .iter()
                .map(|e| {
                    let ip = decode_ip(&e.ip)?;
                    let identity = match &e.answer {
                        Some(EndpointAnswer::Meshed(id)) => Some(
                            SpiffeId::parse(id)
                                .map_err(|error| WireError::Identity { address: ip, error })?,
                        ),
                        Some(EndpointAnswer::Unmeshed(_)) => None,
                        None => return Err(WireError::NoAnswer(ip)),
                    };
                    Ok(Endpoint {
                        address: SocketAddr::new(ip, port(e.port)?),
                        identity,
                    })
                })
                .collect::<Result<_, _>>()?;
            Ok(ServicePort {
                port: port(p.port)?,
                endpoints,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((
        address,
        Service {
            name: wire.name.clone(),
            ports,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn every_resolution_survives_the_wire() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/b").expect("valid");
        for address in [ip("198.18.0.2"), ip("2001:db8::2")] {
            for resolution in [
                Resolution::Meshed(id.clone()),
                Resolution::Unmeshed,
                Resolution::Conflict,
                Resolution::Unidentifiable,
            ] {
                let wire = encode(address, &resolution);
                assert_eq!(decode(&wire), Ok((address, resolution.clone())));
            }
        }
        assert_eq!(encode_ip(ip("198.18.0.2")), [198, 18, 0, 2]);
        assert_eq!(encode_ip(ip("2001:db8::2")).len(), 16);
    }

    #[test]
    fn what_is_not_understood_is_an_error_and_unknown_refusals_still_refuse() {
        for len in [0, 3, 5, 15, 17] {
            assert_eq!(decode_ip(&vec![1; len]), Err(WireError::AddressLength(len)));
        }
        // An IPv4-mapped IPv6 address is the IPv4 address it maps.
        let mapped: IpAddr = "::ffff:198.18.0.2".parse().expect("address");
        assert_eq!(decode_ip(&encode_ip(mapped)), Ok(ip("198.18.0.2")));

        let at = |answer| Address {
            ip: vec![198, 18, 0, 2],
            answer,
        };
        assert_eq!(
            decode(&at(None)),
            Err(WireError::NoAnswer(ip("198.18.0.2")))
        );
        assert!(matches!(
            decode(&at(Some(Answer::Meshed("spiffe://Bad/x".into())))),
            Err(WireError::Identity { .. })
        ));
        for reason in [0, 1, 99] {
            assert_eq!(
                decode(&at(Some(Answer::FailClosed(FailClosed { reason })))),
                Ok((ip("198.18.0.2"), Resolution::Conflict)),
                "reason {reason}"
            );
        }
        assert!(Resolution::Conflict.fails_closed());
        assert!(Resolution::Unidentifiable.fails_closed());
        assert!(!Resolution::Unmeshed.fails_closed());
    }

    #[test]
    fn a_service_survives_the_wire_and_a_bad_part_refuses_it_whole() {
        let service = Service {
            name: "shop/web".into(),
            ports: vec![ServicePort {
                port: 80,
                endpoints: vec![
                    Endpoint {
                        address: "198.18.0.2:8080".parse().expect("address"),
                        identity: Some(
                            SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web")
                                .expect("valid"),
                        ),
                    },
                    Endpoint {
                        address: "[2001:db8::3]:8080".parse().expect("address"),
                        identity: None,
                    },
                ],
            }],
        };
        let wire = encode_service(ip("198.19.0.10"), &service);
        assert_eq!(
            decode_service(&wire),
            Ok((ip("198.19.0.10"), service.clone()))
        );
        assert_eq!(service.port(80).map(|p| p.endpoints.len()), Some(2));
        assert_eq!(service.port(81), None);

        let broken = |change: &dyn Fn(&mut v1::Service)| {
            let mut wire = wire.clone();
            change(&mut wire);
            decode_service(&wire)
        };
        assert_eq!(
            broken(&|w| w.ports[0].port = 70_000),
            Err(WireError::Port {
                address: ip("198.19.0.10"),
                port: 70_000
            })
        );
        assert!(matches!(
            broken(&|w| w.ports[0].endpoints[0].port = 0),
            Err(WireError::Port { .. })
        ));
        assert!(matches!(
            broken(&|w| w.ports[0].endpoints[1].ip = vec![1, 2, 3]),
            Err(WireError::AddressLength(3))
        ));
        assert!(matches!(
            broken(&|w| w.ports[0].endpoints[0].answer = None),
            Err(WireError::NoAnswer(_))
        ));
        assert!(matches!(
            broken(&|w| w.ports[0].endpoints[0].answer =
                Some(EndpointAnswer::Meshed("not an id".into()))),
            Err(WireError::Identity { .. })
        ));
    }
}
