//! The pod's own addresses: the only original destinations an inbound
//! connection may have. The capture rules redirect only connections
//! addressed to the pod (`-m addrtype --dst-type LOCAL`); this is the
//! sidecar's own check, for rules installed otherwise.
//!
//! The addresses are read from the interfaces (`getifaddrs`) and kept. A
//! destination not among them makes the list be read again, at most once
//! per [`REREAD`], so an address added after start (a second IP family, say)
//! is seen, and a flood of foreign destinations costs one read a second.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::RwLock,
    time::{Duration, Instant},
};

use tracing::warn;

/// How often, at most, a miss reads the interfaces again.
pub const REREAD: Duration = Duration::from_secs(1);

/// The addresses of this network namespace's interfaces.
#[derive(Debug)]
pub struct LocalAddrs {
    known: RwLock<Known>,
}

#[derive(Debug)]
struct Known {
    addrs: HashSet<IpAddr>,
    read_at: Instant,
}

// === impl LocalAddrs ===

impl LocalAddrs {
    /// Reads the interfaces now.
    pub fn read() -> Self {
        Self {
            known: RwLock::new(Known {
                addrs: interfaces(),
                read_at: Instant::now(),
            }),
        }
    }

    /// Whether `ip` is one of the pod's own addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        {
            let known = self.known.read().unwrap_or_else(|e| e.into_inner());
            if known.addrs.contains(&ip) {
                return true;
            }
            if known.read_at.elapsed() < REREAD {
                return false;
            }
        }
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        // Another miss may have read them meanwhile.
        if known.read_at.elapsed() >= REREAD {
            known.addrs = interfaces();
            known.read_at = Instant::now();
        }
        known.addrs.contains(&ip)
    }
}

/// Every address of every interface; none when they cannot be read (then
/// every inbound connection is refused: failing closed).
fn interfaces() -> HashSet<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces.iter().map(|i| i.ip().to_canonical()).collect(),
        Err(error) => {
            warn!(%error, "cannot read the pod's addresses; inbound connections are refused until they can be read");
            HashSet::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_s_loopback_is_local_and_a_benchmark_address_is_not() {
        let local = LocalAddrs::read();
        assert!(local.contains("127.0.0.1".parse().expect("ip")));
        assert!(
            local.contains("::ffff:127.0.0.1".parse().expect("ip")),
            "mapped"
        );
        assert!(!local.contains("198.19.255.254".parse().expect("ip")));
        assert!(!local.contains("169.254.169.254".parse().expect("ip")));
    }
}
