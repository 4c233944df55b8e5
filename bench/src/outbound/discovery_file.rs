//! The discovery file of a run (docs/configuration.md, "The discovery
//! file"): the run's own pods with their real identities, the Service backed
//! by pod b, and generated workloads and Services up to a realistic size, so
//! that the client-side sidecar looks destinations up in tables of that size.
//!
//! Generated workloads take 198.18.1.1 upwards (250 per /24, outside the
//! LAN's 198.18.0.0/24, so no host answers there), 100 per namespace
//! `gen-NNN`, each ten sharing a service account, as a Deployment's pods do;
//! every twentieth is unmeshed. Generated Services take 198.19.0.1 upwards,
//! 10 per namespace, port 80 with three endpoints on generated workloads
//! (port 8080), every fourth also port 9090.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
};

/// The run's own pods: the two clients and the server.
pub const POD_COUNT: usize = 3;
/// Generated workload addresses fit in 198.18.1.0 to 198.18.250.255.
pub const MAX_WORKLOADS: usize = 250 * 250;
/// Generated Service addresses fit in 198.19.0.0 to 198.19.199.255, below
/// the run's own Service.
pub const MAX_SERVICES: usize = 200 * 250;

/// A meshed pod of the run.
#[derive(Clone, Copy, Debug)]
pub struct Pod<'a> {
    /// `namespace/name`.
    pub name: &'a str,
    pub address: Ipv4Addr,
    /// Its SPIFFE ID.
    pub identity: &'a str,
}

/// A Service of the run: one port, its endpoints.
#[derive(Clone, Debug)]
pub struct Service<'a> {
    /// `namespace/name`.
    pub name: &'a str,
    /// Its cluster address, in 198.19.200.0 to 198.19.255.255.
    pub address: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<SocketAddrV4>,
}

/// The file's text: `pods` and generated workloads, `workloads` in all;
/// `service` and generated Services, `services` in all.
pub fn render(
    pods: &[Pod<'_>],
    service: &Service<'_>,
    workloads: usize,
    services: usize,
) -> String {
    let generated = workloads.saturating_sub(pods.len()).min(MAX_WORKLOADS);
    let mut text = String::with_capacity(workloads * 100 + services * 150);
    text.push_str("workloads:\n");
    for pod in pods {
        let _ = write!(
            text,
            "  - name: {}\n    addresses: [{}]\n    identity: {}\n",
            pod.name, pod.address, pod.identity
        );
    }
    for i in 0..generated {
        let (ns, sa) = (i / 100, (i % 100) / 10);
        let _ = write!(
            text,
            "  - name: gen-{ns:03}/w-{i}\n    addresses: [{}]\n",
            workload_address(i)
        );
        if i % 20 == 19 {
            text.push_str("    unmeshed: true\n");
        } else {
            let _ = writeln!(
                text,
                "    identity: spiffe://cluster.local/ns/gen-{ns:03}/sa/sa-{sa}"
            );
        }
    }
    text.push_str("services:\n");
    let endpoints: Vec<String> = service
        .endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let _ = write!(
        text,
        "  - name: {}\n    addresses: [{}]\n    ports:\n      - port: {}\n        endpoints: [{}]\n",
        service.name,
        service.address,
        service.port,
        endpoints.join(", ")
    );
    for j in 0..services.saturating_sub(1).min(MAX_SERVICES) {
        let endpoints: Vec<String> = (0..3)
            .filter(|_| generated > 0)
            .map(|k| {
                format!(
                    "\"{}:8080\"",
                    workload_address((j * 3 + k) % generated.max(1))
                )
            })
            .collect();
        let endpoints = endpoints.join(", ");
        let _ = write!(
            text,
            "  - name: gen-{:03}/svc-{j}\n    addresses: [{}]\n    ports:\n      - port: 80\n        endpoints: [{endpoints}]\n",
            j / 10,
            service_address(j)
        );
        if j % 4 == 3 {
            let _ = writeln!(text, "      - port: 9090\n        endpoints: [{endpoints}]");
        }
    }
    text
}

/// The address of generated workload `i`.
fn workload_address(i: usize) -> Ipv4Addr {
    let (hi, lo) = (1 + i / 250, 1 + i % 250);
    Ipv4Addr::new(
        198,
        18,
        u8::try_from(hi).expect("below MAX_WORKLOADS"),
        u8::try_from(lo).expect("at most 250"),
    )
}

/// The cluster address of generated Service `j`.
fn service_address(j: usize) -> Ipv4Addr {
    let (hi, lo) = (j / 250, 1 + j % 250);
    Ipv4Addr::new(
        198,
        19,
        u8::try_from(hi).expect("below MAX_SERVICES"),
        u8::try_from(lo).expect("at most 250"),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn file(workloads: usize, services: usize) -> String {
        let pods = [
            Pod {
                name: "bench/a",
                address: Ipv4Addr::new(198, 18, 0, 1),
                identity: "spiffe://cluster.local/ns/bench/sa/a",
            },
            Pod {
                name: "bench/b",
                address: Ipv4Addr::new(198, 18, 0, 2),
                identity: "spiffe://cluster.local/ns/bench/sa/b",
            },
        ];
        let service = Service {
            name: "bench/web",
            address: Ipv4Addr::new(198, 19, 200, 10),
            port: 80,
            endpoints: vec![SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8080)],
        };
        render(&pods, &service, workloads, services)
    }

    /// Every `addresses: [X]` value of the file.
    fn addresses(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("addresses: ["))
            .map(|l| l.trim_end_matches(']').to_owned())
            .collect()
    }

    #[test]
    fn the_file_has_the_asked_size_and_no_address_twice() {
        let text = file(10_000, 1_000);
        assert_eq!(text.matches("\n  - name: ").count(), 11_000);
        let all = addresses(&text);
        assert_eq!(all.len(), 11_000);
        assert_eq!(all.iter().collect::<HashSet<_>>().len(), all.len());
        assert!(text.contains("    identity: spiffe://cluster.local/ns/bench/sa/b\n"));
        assert_eq!(text.matches("unmeshed: true").count(), 9_998 / 20);
        assert!(text.contains("endpoints: [\"198.18.0.2:8080\"]"));
    }

    #[test]
    fn services_point_at_generated_workloads() {
        let text = file(100, 10);
        let workloads: HashSet<String> = addresses(&text).into_iter().take(100).collect();
        for line in text
            .lines()
            .filter(|l| l.contains("endpoints: [\"198.18.1."))
        {
            for endpoint in line.split('"').filter(|p| p.ends_with(":8080")) {
                let address = endpoint.trim_end_matches(":8080");
                assert!(workloads.contains(address), "{address} is nobody's");
            }
        }
        // Without generated workloads, generated Services have no endpoints.
        assert!(file(2, 3).contains("endpoints: []"));
    }
}
