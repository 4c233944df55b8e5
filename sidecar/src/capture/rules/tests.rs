//! The rule text, validation, and the batches planned from `iptables-save`
//! output: pure functions, no tool runs.

use super::*;

const DEFAULT_V4: &str = "\
# palisade traffic capture (ipv4): iptables-restore --noflush
*nat
:PALISADE_INBOUND - [0:0]
:PALISADE_OUTPUT - [0:0]
-A PALISADE_INBOUND -p tcp -m addrtype --dst-type LOCAL -j REDIRECT --to-ports 15006
-A PALISADE_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A PALISADE_OUTPUT -o lo -j RETURN
-A PALISADE_OUTPUT -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j PALISADE_INBOUND
-A OUTPUT -p tcp -j PALISADE_OUTPUT
COMMIT
";

fn with_exclusions() -> CaptureConfig {
    CaptureConfig {
        exclude_outbound_ports: vec![9090, 443, 9090],
        exclude_inbound_ports: vec![8080],
        ..CaptureConfig::default()
    }
}

// === rule text ===

#[test]
fn default_rules_redirect_tcp_to_the_capture_ports() {
    let text = rules(&CaptureConfig::default(), Family::V4).expect("defaults are valid");
    assert_eq!(text, DEFAULT_V4);
}

#[test]
fn excluded_ports_return_before_the_redirect_sorted_and_once() {
    let text = rules(&with_exclusions(), Family::V4).expect("valid config");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("-A PALISADE_"))
        .collect();
    assert_eq!(
        lines,
        [
            "-A PALISADE_INBOUND -p tcp -m tcp --dport 8080 -j RETURN",
            "-A PALISADE_INBOUND -p tcp -m addrtype --dst-type LOCAL -j REDIRECT --to-ports 15006",
            "-A PALISADE_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A PALISADE_OUTPUT -o lo -j RETURN",
            "-A PALISADE_OUTPUT -p tcp -m tcp --dport 443 -j RETURN",
            "-A PALISADE_OUTPUT -p tcp -m tcp --dport 9090 -j RETURN",
            "-A PALISADE_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        ]
    );
}

#[test]
fn rules_follow_the_configured_uid_and_ports() {
    let config = CaptureConfig {
        outbound_port: 16001,
        inbound_port: 16006,
        proxy_uid: 2102,
        ..CaptureConfig::default()
    };
    let text = rules(&config, Family::V4).expect("valid config");
    assert!(text.contains("-A PALISADE_OUTPUT -m owner --uid-owner 2102 -j RETURN\n"));
    assert!(text.contains("-A PALISADE_OUTPUT -p tcp -j REDIRECT --to-ports 16001\n"));
    assert!(text.contains(
        "-A PALISADE_INBOUND -p tcp -m addrtype --dst-type LOCAL -j REDIRECT --to-ports 16006\n"
    ));
    assert!(!text.contains("1337"));
    assert!(!text.contains("1500"));
}

#[test]
fn ipv6_rules_are_the_ipv4_rules_for_ip6tables() {
    let v4 = rules(&with_exclusions(), Family::V4).expect("valid config");
    let v6 = rules(&with_exclusions(), Family::V6).expect("valid config");
    assert!(v6.starts_with("# palisade traffic capture (ipv6): ip6tables-restore --noflush\n"));
    let body = |t: &str| t.lines().skip(1).map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(body(&v4), body(&v6));
    assert_eq!(Family::V6.iptables(), "ip6tables");
    assert_eq!(Family::V6.save(), "ip6tables-save");
    assert_eq!(Family::V4.restore(), "iptables-restore");
}

// === validation ===

#[test]
fn port_zero_is_rejected_naming_the_field() {
    let cases = [
        (
            CaptureConfig {
                outbound_port: 0,
                ..CaptureConfig::default()
            },
            "outbound_port",
        ),
        (
            CaptureConfig {
                inbound_port: 0,
                ..CaptureConfig::default()
            },
            "inbound_port",
        ),
        (
            CaptureConfig {
                exclude_outbound_ports: vec![80, 0],
                ..CaptureConfig::default()
            },
            "exclude_outbound_ports",
        ),
        (
            CaptureConfig {
                exclude_inbound_ports: vec![0],
                ..CaptureConfig::default()
            },
            "exclude_inbound_ports",
        ),
    ];
    for (config, field) in cases {
        let error = rules(&config, Family::V4).expect_err("port 0 must be refused");
        assert_eq!(
            error.to_string(),
            format!("{field} is 0: ports must be in 1..=65535")
        );
    }
}

#[test]
fn capture_ports_cannot_be_excluded() {
    let config = CaptureConfig {
        exclude_outbound_ports: vec![80, 15001],
        ..CaptureConfig::default()
    };
    let error = rules(&config, Family::V4).expect_err("excluded capture port");
    assert_eq!(
        error.to_string(),
        "outbound_port 15001 is also in exclude_outbound_ports: \
         the sidecar's capture ports cannot be excluded from capture"
    );

    let config = CaptureConfig {
        exclude_inbound_ports: vec![15006],
        ..CaptureConfig::default()
    };
    assert!(matches!(
        config.validate(),
        Err(CaptureError::CapturePortExcluded {
            field: "inbound_port",
            port: 15006,
            list: "exclude_inbound_ports"
        })
    ));
}

#[test]
fn capture_ports_must_differ() {
    let config = CaptureConfig {
        inbound_port: 15001,
        ..CaptureConfig::default()
    };
    let error = config.validate().expect_err("same ports");
    assert!(
        error
            .to_string()
            .starts_with("outbound_port and inbound_port are both 15001")
    );
}

// === reading iptables-save, planning batches ===

const SAVED: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Thu Nov 26 18:45:27 2026
*nat
:PREROUTING ACCEPT [12:720]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [3:180]
:PALISADE_INBOUND - [0:0]
:PALISADE_OUTPUT - [0:0]
-A PREROUTING -p tcp -j PALISADE_INBOUND
-A OUTPUT -d 198.18.0.99/32 -j RETURN
-A OUTPUT -p tcp -j PALISADE_OUTPUT
-A OUTPUT -p tcp -j PALISADE_OUTPUT
-A OUTPUT -j PALISADE_OUTPUT
-A PALISADE_OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
# Completed on Thu Nov 26 18:45:27 2026
";

#[test]
fn saved_table_is_parsed_into_chains_and_rules() {
    let table = parse_save(SAVED);
    assert!(table.chains.contains(OUTPUT_CHAIN));
    assert!(table.chains.contains("POSTROUTING"));
    assert_eq!(table.rules.len(), 6);
    assert_eq!(table.rules[1].chain, "OUTPUT");
    assert_eq!(table.rules[1].spec, "-d 198.18.0.99/32 -j RETURN");
    assert_eq!(parse_save(""), NatTable::default());
}

#[test]
fn install_keeps_one_jump_and_drops_duplicates_and_stale_forms() {
    let batch = install_batch(&CaptureConfig::default(), Family::V4, &parse_save(SAVED))
        .expect("valid config");
    let changes: Vec<&str> = batch
        .script
        .lines()
        .filter(|l| {
            l.starts_with("-A OUTPUT") || l.starts_with("-A PREROUTING") || l.starts_with("-D")
        })
        .collect();
    assert_eq!(
        changes,
        [
            "-D OUTPUT -p tcp -j PALISADE_OUTPUT",
            "-D OUTPUT -j PALISADE_OUTPUT",
        ]
    );
    assert_eq!((batch.jumps_added, batch.jumps_removed), (0, 2));
    // The foreign rule is never named, so --noflush leaves it alone.
    assert!(!batch.script.contains("198.18.0.99"));
}

#[test]
fn remove_deletes_only_our_jumps_and_chains() {
    let batch = remove_batch(&parse_save(SAVED)).expect("there is something to remove");
    assert_eq!(
        batch,
        Batch {
            script: "*nat\n\
                     -D PREROUTING -p tcp -j PALISADE_INBOUND\n\
                     -D OUTPUT -p tcp -j PALISADE_OUTPUT\n\
                     -D OUTPUT -p tcp -j PALISADE_OUTPUT\n\
                     -D OUTPUT -j PALISADE_OUTPUT\n\
                     -F PALISADE_INBOUND\n-X PALISADE_INBOUND\n\
                     -F PALISADE_OUTPUT\n-X PALISADE_OUTPUT\n\
                     COMMIT\n"
                .to_owned(),
            jumps_added: 0,
            jumps_removed: 4,
            chains_removed: 2,
        }
    );
    let clean = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -d 198.18.0.99/32 -j RETURN\nCOMMIT\n";
    assert_eq!(remove_batch(&parse_save(clean)), None);
}
