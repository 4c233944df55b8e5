//! The capture rules of `palisade-sidecar init` with the real iptables tools,
//! each test in network namespaces of its own, so the host's tables are never
//! touched. Needs root (CI runs as root): without it every test fails, never
//! skips. The rule text itself is unit-tested in the sidecar crate
//! (`sidecar/src/capture/rules/tests.rs`), without root.

use std::{net::Ipv4Addr, os::unix::fs::symlink};

use palisade_sidecar::capture::{
    CaptureConfig, Family, INBOUND_CHAIN, OUTPUT_CHAIN, Runner, install_with, remove_with, rules,
};
use palisade_tests::netns::{App, Lan, Netns, User, send, send_as, tool};

const LAN_BRIDGE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const POD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

fn with_exclusions() -> CaptureConfig {
    CaptureConfig {
        exclude_outbound_ports: vec![9090, 443, 9090],
        exclude_inbound_ports: vec![8080],
        ..CaptureConfig::default()
    }
}

/// A namespace for one test, with the iptables tools checked first.
fn netns() -> Netns {
    for name in ["ip", "iptables-save", "ip6tables-save", "iptables-restore"] {
        tool(name);
    }
    Netns::new("pod")
}

fn runner(ns: &Netns) -> Runner {
    Runner::netns(ns.name())
}

/// The family's nat table without comments and counters.
fn nat(ns: &Netns, family: Family) -> Vec<String> {
    ns.saved_table(family.save(), "nat")
}

/// Asserts that `nat` holds exactly the rules `config` asks for, once.
fn assert_installed(nat: &[String], config: &CaptureConfig, family: Family) {
    let expected = rules(config, family).expect("valid config");
    for chain in [INBOUND_CHAIN, OUTPUT_CHAIN] {
        let prefix = format!("-A {chain} ");
        let want: Vec<&str> = expected
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .collect();
        let have: Vec<&str> = nat
            .iter()
            .map(String::as_str)
            .filter(|l| l.starts_with(&prefix))
            .collect();
        assert_eq!(have, want, "{family} chain {chain}");
    }
    for jump in [
        "-A PREROUTING -p tcp -j PALISADE_INBOUND",
        "-A OUTPUT -p tcp -j PALISADE_OUTPUT",
    ] {
        let count = nat.iter().filter(|l| *l == jump).count();
        assert_eq!(
            count, 1,
            "{family}: `{jump}` appears {count} times in {nat:#?}"
        );
    }
}

// === the rules in the tables ===

#[test]
fn install_puts_the_rules_in_both_families() {
    let ns = netns();
    let config = with_exclusions();
    install_with(&config, &runner(&ns)).expect("install");
    assert_installed(&nat(&ns, Family::V4), &config, Family::V4);
    assert_installed(&nat(&ns, Family::V6), &config, Family::V6);
}

#[test]
fn installing_twice_leaves_one_copy() {
    let ns = netns();
    let config = with_exclusions();
    install_with(&config, &runner(&ns)).expect("first install");
    let once = (nat(&ns, Family::V4), nat(&ns, Family::V6));
    install_with(&config, &runner(&ns)).expect("second install");
    assert_eq!((nat(&ns, Family::V4), nat(&ns, Family::V6)), once);
}

#[test]
fn reinstalling_with_new_settings_replaces_the_old_rules() {
    let ns = netns();
    install_with(&with_exclusions(), &runner(&ns)).expect("first install");
    let changed = CaptureConfig {
        exclude_outbound_ports: vec![5432],
        proxy_uid: 2102,
        ..CaptureConfig::default()
    };
    install_with(&changed, &runner(&ns)).expect("second install");
    let nat = nat(&ns, Family::V4);
    assert_installed(&nat, &changed, Family::V4);
    assert!(!nat.iter().any(|l| l.contains("9090") || l.contains("1337")));
}

#[test]
fn foreign_rules_survive_install_and_remove() {
    let ns = netns();
    let iptables = |family: Family, args: &[&str]| {
        ns.exec(tool(family.iptables()), args);
    };
    iptables(
        Family::V4,
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "198.18.0.99",
            "-j",
            "RETURN",
        ],
    );
    iptables(Family::V4, &["-t", "nat", "-N", "OTHER_MESH"]);
    iptables(
        Family::V4,
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "udp",
            "-j",
            "OTHER_MESH",
        ],
    );
    iptables(
        Family::V6,
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "2001:2::99",
            "-j",
            "RETURN",
        ],
    );
    let before = (nat(&ns, Family::V4), nat(&ns, Family::V6));

    install_with(&CaptureConfig::default(), &runner(&ns)).expect("install");
    let v4 = nat(&ns, Family::V4);
    assert_installed(&v4, &CaptureConfig::default(), Family::V4);
    for foreign in &before.0 {
        assert!(v4.contains(foreign), "install dropped `{foreign}`");
    }
    assert!(nat(&ns, Family::V6).contains(&"-A OUTPUT -d 2001:2::99/128 -j RETURN".to_owned()));

    remove_with(&CaptureConfig::default(), &runner(&ns)).expect("remove");
    assert_eq!((nat(&ns, Family::V4), nat(&ns, Family::V6)), before);
}

#[test]
fn remove_on_a_clean_namespace_changes_nothing() {
    let ns = netns();
    let before = (nat(&ns, Family::V4), nat(&ns, Family::V6));
    remove_with(&CaptureConfig::default(), &runner(&ns)).expect("remove without rules");
    install_with(&CaptureConfig::default(), &runner(&ns)).expect("install");
    remove_with(&CaptureConfig::default(), &runner(&ns)).expect("remove");
    remove_with(&CaptureConfig::default(), &runner(&ns)).expect("remove again");
    assert_eq!((nat(&ns, Family::V4), nat(&ns, Family::V6)), before);
}

#[test]
fn install_repairs_duplicated_jumps() {
    let ns = netns();
    let iptables = tool("iptables");
    ns.exec(&iptables, &["-t", "nat", "-N", OUTPUT_CHAIN]);
    for _ in 0..2 {
        ns.exec(
            &iptables,
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN],
        );
    }
    ns.exec(
        &iptables,
        &["-t", "nat", "-A", "OUTPUT", "-j", OUTPUT_CHAIN],
    );
    install_with(&CaptureConfig::default(), &runner(&ns)).expect("install");
    let nat = nat(&ns, Family::V4);
    assert_installed(&nat, &CaptureConfig::default(), Family::V4);
    assert!(!nat.contains(&"-A OUTPUT -j PALISADE_OUTPUT".to_owned()));
}

#[test]
fn ipv6_off_leaves_ip6tables_alone() {
    let ns = netns();
    let before = nat(&ns, Family::V6);
    let config = CaptureConfig {
        ipv6: false,
        ..CaptureConfig::default()
    };
    install_with(&config, &runner(&ns)).expect("install");
    assert_installed(&nat(&ns, Family::V4), &config, Family::V4);
    assert_eq!(nat(&ns, Family::V6), before);
}

/// Rules are compared with iptables-save output as plain strings, so both
/// backends must print them the same way; this runs the legacy one.
#[test]
fn legacy_backend_gets_the_same_rules() {
    let ns = netns();
    // xtables-legacy-multi picks its personality from the name it is run by.
    let legacy = tempfile::tempdir().expect("temp dir");
    for name in Family::ALL.iter().flat_map(|f| [f.save(), f.restore()]) {
        symlink(tool("xtables-legacy-multi"), legacy.path().join(name)).expect("symlink");
    }
    symlink(tool("ip"), legacy.path().join("ip")).expect("symlink");
    let runner = runner(&ns).with_search_path(vec![legacy.path().to_owned()]);
    let nat = |family: Family| ns.saved_table(&format!("{}-legacy-save", family.iptables()), "nat");
    let before = (nat(Family::V4), nat(Family::V6));

    let config = with_exclusions();
    install_with(&config, &runner).expect("install");
    install_with(&config, &runner).expect("install again");
    assert_installed(&nat(Family::V4), &config, Family::V4);
    assert_installed(&nat(Family::V6), &config, Family::V6);
    remove_with(&config, &runner).expect("remove");
    assert_eq!((nat(Family::V4), nat(Family::V6)), before);
}

// === the rules steer real connections ===

#[test]
fn capture_redirects_the_app_but_not_the_proxy_or_excluded_ports() {
    // pod (198.18.0.2) and peer (198.18.0.1) on one LAN; rules only in the pod.
    let mut lan = Lan::new(LAN_BRIDGE, 24);
    lan.add_host("peer", PEER_IP);
    lan.add_host("pod", POD_IP);
    let (pod, peer) = (lan.host("pod"), lan.host("peer"));
    let config = CaptureConfig {
        exclude_outbound_ports: vec![9090],
        exclude_inbound_ports: vec![8080],
        ..CaptureConfig::default()
    };
    install_with(&config, &runner(pod)).expect("install");
    let _in_pod = App::start(&lan, pod, &User::root(), "pod", &[15001, 15006, 8080, 80]);
    let _in_peer = App::start(&lan, peer, &User::root(), "peer", &[80, 9090]);

    // Which app answered, and on which port it accepted the connection.
    let answered = |reply: Result<String, String>| -> String {
        let reply = reply.unwrap_or_else(|e| panic!("no answer: {e}"));
        let (name, rest) = reply.split_once(" got ").expect("an app's answer");
        let port = rest.trim().rsplit(' ').next().unwrap_or_default();
        format!("{name}:{port}")
    };
    assert_eq!(
        answered(send(pod, PEER_IP, 80, "app")),
        "pod:15001",
        "app traffic is captured"
    );
    assert_eq!(
        answered(send_as(pod, &User::uid(1337), PEER_IP, 80, "proxy")),
        "peer:80",
        "the proxy uid goes straight out"
    );
    assert_eq!(
        answered(send(pod, PEER_IP, 9090, "excluded")),
        "peer:9090",
        "excluded outbound port"
    );
    assert_eq!(
        answered(send(pod, Ipv4Addr::LOCALHOST, 80, "loopback")),
        "pod:80",
        "loopback is not captured"
    );
    assert_eq!(
        answered(send(peer, POD_IP, 80, "inbound")),
        "pod:15006",
        "inbound traffic is captured"
    );
    assert_eq!(
        answered(send(peer, POD_IP, 8080, "excluded-inbound")),
        "pod:8080",
        "excluded inbound port"
    );
}
