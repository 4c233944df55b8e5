use std::fs;

use super::*;

fn td() -> TrustDomain {
    TrustDomain::parse("cluster.local").expect("valid trust domain")
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("valid SPIFFE ID")
}

fn parse(yaml: &str) -> Policy {
    Policy::parse(yaml, &td()).unwrap_or_else(|e| panic!("{yaml:?} should parse: {e}"))
}

/// Parses `yaml`, which must fail, and returns the error's message.
fn parse_err(yaml: &str) -> (PolicyError, String) {
    let err = Policy::parse(yaml, &td()).expect_err(yaml);
    let msg = err.to_string();
    (err, msg)
}

const GOOD: &str = r"
# default applies to ports without a rule
default: deny
rules:
  - port: 8080
    allow:
      - spiffe://cluster.local/ns/web/sa/frontend
      - spiffe://cluster.local/ns/monitoring/*
  - ports: [9090, 9443]
    allow:
      - spiffe://cluster.local/ns/ops/sa/admin
  - port: 7000
    allow: []
";

const FRONTEND: &str = "spiffe://cluster.local/ns/web/sa/frontend";

// --- parsing ---

#[test]
fn a_good_file_parses() {
    let policy = parse(GOOD);
    assert_eq!(policy.default_action(), DefaultAction::Deny);
    assert_eq!(policy.rule_count(), 3);
    let allow_only = parse("default: allow\n");
    assert_eq!(allow_only.default_action(), DefaultAction::Allow);
    assert_eq!(allow_only.rule_count(), 0);
    // Quoted entries and an empty rule list are fine too.
    let quoted = parse(
        "default: deny\nrules:\n  - port: 1\n    allow: [\"spiffe://cluster.local/ns/a/*\"]\n",
    );
    assert_eq!(quoted.rule_count(), 1);
    assert_eq!(parse("default: deny\nrules: []\n").rule_count(), 0);
}

#[test]
fn not_yaml_of_the_expected_shape_is_refused() {
    for (yaml, why) in [
        ("default: [deny\n", "line 1"),
        ("", "the file is empty"),
        ("# nothing yet\n\n", "the file is empty"),
        ("rules: []\n", "missing field `default`"),
        (
            "default: maybe\n",
            "unknown variant `maybe`, expected one of allow, deny",
        ),
        ("default: Allow\n", "unknown variant `Allow`"),
        (
            "default: deny\nrules:\n  - port: 80\n",
            "missing field `allow` at line 3",
        ),
        (
            "default: deny\nrules:\n  - port: eighty\n    allow: []\n",
            "line 3",
        ),
    ] {
        let (err, msg) = parse_err(yaml);
        assert!(matches!(err, PolicyError::Syntax(_)), "{yaml:?}: {err:?}");
        assert!(msg.contains(why), "{msg:?} should mention {why:?}");
        assert!(!msg.contains('\n'), "{msg:?} should be one line");
    }
}

#[test]
fn unknown_fields_are_refused_wherever_they_are() {
    for (yaml, field) in [
        ("default: deny\nmode: strict\n", "mode"),
        (
            "default: deny\nrules:\n  - port: 80\n    allow: []\n    deny: []\n",
            "deny",
        ),
    ] {
        let (err, msg) = parse_err(yaml);
        assert!(matches!(err, PolicyError::Syntax(_)), "{err:?}");
        assert!(
            msg.contains(&format!("unknown field `{field}`")),
            "{msg:?} should name {field:?}"
        );
    }
}

#[test]
fn ports_outside_the_valid_range_are_refused() {
    for (port, shown) in [("0", 0), ("65536", 65536), ("-1", -1)] {
        let yaml = format!(
            "default: deny\nrules:\n  - port: 80\n    allow: []\n  - ports: [81, {port}]\n    allow: []\n"
        );
        let (err, msg) = parse_err(&yaml);
        assert!(
            matches!(err, PolicyError::PortOutOfRange { rule: 2, port } if port == shown),
            "{err:?}"
        );
        assert_eq!(msg, format!("rule 2: port {shown} is not in 1..=65535"));
    }
    assert!(
        Policy::parse(
            "default: deny\nrules:\n  - port: 65535\n    allow: []\n",
            &td()
        )
        .is_ok()
    );
}

#[test]
fn a_port_covered_by_two_rules_is_refused() {
    let (err, msg) = parse_err(
        "default: deny\nrules:\n  - port: 80\n    allow: []\n  - port: 81\n    allow: []\n  - ports: [82, 80]\n    allow: []\n",
    );
    assert!(
        matches!(
            err,
            PolicyError::DuplicatePort {
                rule: 3,
                port: 80,
                first_rule: 1
            }
        ),
        "{err:?}"
    );
    assert_eq!(msg, "rule 3: port 80 is already covered by rule 1");
    let (err, msg) = parse_err(
        "default: deny\nrules:\n  - port: 79\n    allow: []\n  - ports: [80, 80]\n    allow: []\n",
    );
    assert!(
        matches!(err, PolicyError::PortListedTwice { rule: 2, port: 80 }),
        "{err:?}"
    );
    assert_eq!(msg, "rule 2: port 80 is listed twice");
}

#[test]
fn a_rule_needs_exactly_one_of_port_and_ports() {
    let (err, msg) =
        parse_err("default: deny\nrules:\n  - port: 80\n    ports: [81]\n    allow: []\n");
    assert!(
        matches!(err, PolicyError::PortAndPorts { rule: 1 }),
        "{err:?}"
    );
    assert!(
        msg.contains("rule 1") && msg.contains("not both"),
        "{msg:?}"
    );
    for yaml in [
        "default: deny\nrules:\n  - port: 80\n    allow: []\n  - allow: []\n",
        "default: deny\nrules:\n  - port: 80\n    allow: []\n  - ports: []\n    allow: []\n",
    ] {
        let (err, msg) = parse_err(yaml);
        assert!(matches!(err, PolicyError::NoPort { rule: 2 }), "{err:?}");
        assert!(msg.contains("rule 2: no port"), "{msg:?}");
    }
}

/// A policy whose second rule has `entry` as its third entry.
fn with_third_entry(entry: &str) -> String {
    format!(
        "default: deny\nrules:\n  - port: 80\n    allow: []\n  - port: 81\n    allow:\n      - {FRONTEND}\n      - spiffe://cluster.local/ns/a/*\n      - \"{entry}\"\n"
    )
}

#[test]
fn bad_spiffe_ids_are_refused_with_the_reason() {
    for (entry, why) in [
        ("http://cluster.local/ns/a/sa/b", "scheme"),
        ("spiffe://cluster.local/ns//sa/b", "empty"),
        ("spiffe://cluster.local/ns/a b/sa/c", "letters, digits"),
        ("spiffe://cluster.local/ns/../*", "`.` or `..`"),
        ("spiffe://Cluster.local/ns/a/*", "lowercase"),
        ("", "empty"),
    ] {
        let (err, msg) = parse_err(&with_third_entry(entry));
        assert!(
            matches!(
                err,
                PolicyError::BadIdentity {
                    rule: 2,
                    entry: 3,
                    ..
                }
            ),
            "{entry:?}: {err:?}"
        );
        assert!(msg.starts_with("rule 2, entry 3: "), "{msg:?}");
        assert!(
            msg.contains("not a SPIFFE ID") && msg.contains(why),
            "{msg:?} should mention {why:?}"
        );
    }
}

#[test]
fn long_entries_are_cut_short_in_errors() {
    let long = format!("spiffe://cluster.local/{}", "x y".repeat(1000));
    let (_, msg) = parse_err(&with_third_entry(&long));
    assert!(msg.len() < 400, "{} bytes: {msg:?}", msg.len());
    assert!(msg.contains('…'), "{msg:?}");
}

#[test]
fn entries_of_another_trust_domain_are_refused() {
    for entry in [
        "spiffe://other.local/ns/web/sa/frontend",
        "spiffe://other.local/ns/web/*",
    ] {
        let (err, msg) = parse_err(&with_third_entry(entry));
        assert!(
            matches!(
                err,
                PolicyError::ForeignTrustDomain {
                    rule: 2,
                    entry: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            msg,
            format!("rule 2, entry 3: `{entry}` is outside the trust domain cluster.local")
        );
    }
}

#[test]
fn wildcards_other_than_a_whole_namespace_are_refused() {
    for entry in [
        "*",
        "spiffe://*",
        "spiffe://*/ns/a/*",
        "spiffe://cluster.local/*",
        "spiffe://cluster.local/ns/*",
        "spiffe://cluster.local/ns//*",
        "spiffe://cluster.local/ns/*/sa/x",
        "spiffe://cluster.local/ns/a/sa/*",
        "spiffe://cluster.local/ns/a*/*",
        "spiffe://cluster.local/ns/a/**",
        "spiffe://cluster.local/ns/a/*/",
        "spiffe://cluster.local/nss/a/*",
        "spiffe://cluster.local/x/ns/a/*",
    ] {
        let (err, msg) = parse_err(&with_third_entry(entry));
        assert!(
            matches!(
                err,
                PolicyError::BadWildcard {
                    rule: 2,
                    entry: 3,
                    ..
                }
            ),
            "{entry:?}: {err:?}"
        );
        assert!(msg.starts_with("rule 2, entry 3: "), "{msg:?}");
        assert!(
            msg.contains("`spiffe://<trust-domain>/ns/<namespace>/*`"),
            "{msg:?} should say which form is allowed"
        );
    }
}

// --- matching ---

#[test]
fn exact_entries_match_only_that_identity() {
    let policy = parse(GOOD);
    assert!(policy.allows(8080, Some(&id(FRONTEND))));
    assert!(!policy.allows(8080, Some(&id("spiffe://cluster.local/ns/web/sa/backend"))));
    assert!(!policy.allows(
        8080,
        Some(&id("spiffe://cluster.local/ns/web/sa/frontend2"))
    ));
    assert!(!policy.allows(8080, Some(&id("spiffe://other.local/ns/web/sa/frontend"))));
    // The identity is allowed on 8080 only, not on other covered ports.
    assert!(!policy.allows(9090, Some(&id(FRONTEND))));
}

#[test]
fn namespace_wildcards_match_that_namespace_only() {
    let policy = parse(GOOD);
    for yes in [
        "spiffe://cluster.local/ns/monitoring/sa/prometheus",
        "spiffe://cluster.local/ns/monitoring/sa/default",
        "spiffe://cluster.local/ns/monitoring/vm/scraper",
    ] {
        assert!(
            policy.allows(8080, Some(&id(yes))),
            "{yes} should be allowed"
        );
    }
    for no in [
        "spiffe://cluster.local/ns/monitoring",
        "spiffe://cluster.local/ns/monitoring2/sa/prometheus",
        "spiffe://cluster.local/ns/monitorin/sa/prometheus",
        "spiffe://cluster.local/ns/Monitoring/sa/prometheus",
        "spiffe://cluster.local/x/ns/monitoring/sa/prometheus",
        "spiffe://cluster.local/monitoring/sa/prometheus",
        "spiffe://other.local/ns/monitoring/sa/prometheus",
        "spiffe://cluster.local",
    ] {
        assert!(!policy.allows(8080, Some(&id(no))), "{no} should be denied");
    }

    let web = parse(
        "default: allow\nrules:\n  - port: 80\n    allow: [spiffe://cluster.local/ns/web/*]\n",
    );
    assert!(web.allows(80, Some(&id("spiffe://cluster.local/ns/web/sa/a"))));
    assert!(!web.allows(80, Some(&id("spiffe://cluster.local/ns/web2/sa/a"))));
    assert!(!web.allows(80, Some(&id("spiffe://cluster.local/ns/we/sa/a"))));
}

#[test]
fn a_peer_without_identity_never_matches_a_rule() {
    for default in ["allow", "deny"] {
        let policy = parse(&format!(
            "default: {default}\nrules:\n  - port: 80\n    allow: [spiffe://cluster.local/ns/web/*]\n"
        ));
        assert!(!policy.allows(80, None), "default: {default}");
    }
}

#[test]
fn the_default_decides_for_uncovered_ports() {
    let deny = parse(GOOD);
    assert!(!deny.allows(1234, Some(&id(FRONTEND))));
    assert!(!deny.allows(1234, None));

    let allow = parse(
        "default: allow\nrules:\n  - port: 8080\n    allow: [spiffe://cluster.local/ns/web/sa/frontend]\n",
    );
    assert!(allow.allows(1234, Some(&id("spiffe://cluster.local/ns/x/sa/y"))));
    assert!(allow.allows(1234, None));
    // The covered port is still guarded.
    assert!(!allow.allows(8080, Some(&id("spiffe://cluster.local/ns/x/sa/y"))));
    assert!(!allow.allows(8080, None));

    let all = Policy::allow_all();
    assert_eq!(all.default_action(), DefaultAction::Allow);
    assert_eq!(all.rule_count(), 0);
    assert!(all.allows(8080, None));
    assert!(all.allows(1, Some(&id(FRONTEND))));
}

#[test]
fn an_empty_allow_list_admits_nobody() {
    let policy = parse(GOOD);
    assert!(!policy.allows(7000, Some(&id(FRONTEND))));
    assert!(!policy.allows(7000, Some(&id("spiffe://cluster.local/ns/monitoring/sa/p"))));
    assert!(!policy.allows(7000, None));
}

#[test]
fn every_port_of_a_ports_list_gets_the_rule() {
    let policy = parse(GOOD);
    let admin = id("spiffe://cluster.local/ns/ops/sa/admin");
    assert!(policy.allows(9090, Some(&admin)));
    assert!(policy.allows(9443, Some(&admin)));
    assert!(!policy.allows(9091, Some(&admin)));
    assert!(!policy.allows(8080, Some(&admin)));
}

// --- the store ---

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("policy.yaml");
    fs::write(&path, text).expect("write policy file");
    path
}

#[test]
fn a_store_loads_its_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), GOOD);
    let store = PolicyStore::load(&path, td()).expect("loads");
    assert_eq!(store.path(), Some(path.as_path()));
    assert_eq!(store.current().rule_count(), 3);
    assert!(store.current().allows(8080, Some(&id(FRONTEND))));
}

#[test]
fn a_good_edit_takes_effect_and_an_unchanged_file_is_not_reloaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), GOOD);
    let store = PolicyStore::load(&path, td()).expect("loads");
    assert!(!store.reload().expect("unchanged"), "nothing changed yet");

    // A guard taken before the reload keeps seeing the policy it loaded.
    let before = store.current();
    fs::write(
        &path,
        "default: allow\nrules:\n  - port: 8080\n    allow: [spiffe://cluster.local/ns/other/*]\n",
    )
    .expect("write");
    assert!(store.reload().expect("valid edit"));
    assert!(before.allows(8080, Some(&id(FRONTEND))));
    drop(before);

    let now = store.current();
    assert_eq!(now.default_action(), DefaultAction::Allow);
    assert_eq!(now.rule_count(), 1);
    assert!(!now.allows(8080, Some(&id(FRONTEND))));
    assert!(now.allows(8080, Some(&id("spiffe://cluster.local/ns/other/sa/x"))));
    assert!(now.allows(1234, None));
    drop(now);
    assert!(!store.reload().expect("unchanged"), "same contents again");
}

#[test]
fn a_bad_edit_keeps_the_old_policy_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), GOOD);
    let store = PolicyStore::load(&path, td()).expect("loads");

    for (bad, why) in [
        ("default: [", "line 1"),
        (
            "default: deny\nrules:\n  - port: 0\n    allow: []\n",
            "rule 1: port 0",
        ),
        (
            "default: deny\nrules:\n  - port: 80\n    allow: [spiffe://cluster.local/ns/a/sa/*]\n",
            "rule 1, entry 1",
        ),
        (
            "default: allow\nrules:\n  - port: 80\n    allow: [spiffe://evil.example/ns/a/*]\n",
            "outside the trust domain",
        ),
    ] {
        fs::write(&path, bad).expect("write");
        let err = store.reload().expect_err(bad);
        assert!(matches!(err, PolicyError::File { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()),
            "{msg:?} should name the file"
        );
        assert!(msg.contains(why), "{msg:?} should mention {why:?}");
        let current = store.current();
        assert_eq!(current.rule_count(), 3, "old policy lost after {bad:?}");
        assert!(current.allows(8080, Some(&id(FRONTEND))));
        assert!(!current.allows(1234, None));
    }

    // Putting the old contents back is "unchanged": that policy is in use.
    fs::write(&path, GOOD).expect("write");
    assert!(!store.reload().expect("restored"));

    fs::remove_file(&path).expect("remove");
    let err = store.reload().expect_err("file is gone");
    assert!(matches!(err, PolicyError::Read { .. }), "{err:?}");
    assert_eq!(store.current().rule_count(), 3);
}

#[test]
fn a_missing_or_bad_file_does_not_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("absent.yaml");
    let err = PolicyStore::load(&missing, td()).expect_err("missing file");
    assert!(matches!(err, PolicyError::Read { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with("cannot read the policy file"), "{msg:?}");
    assert!(msg.contains("absent.yaml"), "{msg:?}");

    let bad = write(
        dir.path(),
        "default: deny\nrules:\n  - port: 80\n    allow: [\"*\"]\n",
    );
    let err = PolicyStore::load(&bad, td()).expect_err("bad file");
    assert!(err.to_string().contains("rule 1, entry 1"), "{err}");
}

#[test]
fn a_fixed_store_has_no_file_and_never_reloads() {
    let store = PolicyStore::fixed(Policy::allow_all());
    assert_eq!(store.path(), None);
    assert!(!store.reload().expect("nothing to reload"));
    assert!(store.current().allows(443, None));
}

// === the delivered policy: the combination rule ===

mod delivered {
    use palisade_proto::discovery::v1 as wire;

    use super::{id, td};
    use crate::{
        policy::{DenyList, Policy, PolicySource, Verdict},
        proxy::inbound::Mode,
    };

    const A: &str = "spiffe://cluster.local/ns/shop/sa/a";
    const C: &str = "spiffe://cluster.local/ns/shop/sa/c";
    const MON: &str = "spiffe://cluster.local/ns/monitoring/sa/prom";

    fn policy(name: &str) -> wire::Policy {
        wire::Policy {
            name: name.into(),
            ..wire::Policy::default()
        }
    }

    fn rule(ports: &[u32], identities: &[&str], namespaces: &[&str]) -> wire::Rule {
        wire::Rule {
            ports: ports.to_vec(),
            identities: identities.iter().map(|s| (*s).to_owned()).collect(),
            namespaces: namespaces.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn pod(policies: Vec<wire::Policy>) -> wire::PodPolicy {
        wire::PodPolicy {
            version: "v1".into(),
            default_mode: wire::InboundMode::Permissive as i32,
            default_action: wire::Action::Allow as i32,
            pod_strict: false,
            policies,
            declared_ports: vec![8080],
        }
    }

    fn compile(message: &wire::PodPolicy) -> Policy {
        Policy::from_wire(message, &td()).expect("a valid policy")
    }

    fn verdict(p: &Policy, port: u16, peer: Option<&str>) -> (Verdict, String) {
        let d = p.decide(port, peer.map(id).as_ref());
        (d.verdict, d.policy.to_string())
    }

    #[test]
    fn no_policy_is_the_mesh_default() {
        let p = compile(&pod(vec![]));
        assert_eq!(p.source(), PolicySource::Kubernetes);
        assert_eq!(p.mode(), Some(Mode::Permissive));
        assert_eq!(
            verdict(&p, 8080, Some(C)),
            (Verdict::Allow, "mesh-default".into())
        );
        let mut deny = pod(vec![]);
        deny.default_action = wire::Action::Deny as i32;
        deny.default_mode = wire::InboundMode::Strict as i32;
        let p = compile(&deny);
        assert_eq!(p.mode(), Some(Mode::Strict));
        assert_eq!(
            verdict(&p, 8080, Some(A)),
            (Verdict::Deny, "mesh-default".into())
        );
    }

    #[test]
    fn allows_are_united_across_policies_and_a_ruled_port_admits_only_them() {
        let mut one = policy("shop/one");
        one.rules.push(rule(&[8080], &[A], &[]));
        let mut two = policy("shop/two");
        two.rules.push(rule(&[8080, 9090], &[], &["monitoring"]));
        let p = compile(&pod(vec![one, two]));
        assert_eq!(
            verdict(&p, 8080, Some(A)),
            (Verdict::Allow, "shop/one".into())
        );
        assert_eq!(
            verdict(&p, 8080, Some(MON)),
            (Verdict::Allow, "shop/two".into())
        );
        assert_eq!(
            verdict(&p, 9090, Some(MON)),
            (Verdict::Allow, "shop/two".into())
        );
        // Named by a rule: only the rules' callers, whatever the default.
        assert_eq!(
            verdict(&p, 8080, Some(C)),
            (Verdict::Deny, "shop/one".into())
        );
        assert_eq!(
            verdict(&p, 9090, Some(A)),
            (Verdict::Deny, "shop/two".into())
        );
        assert_eq!(verdict(&p, 8080, None), (Verdict::Deny, "shop/one".into()));
        // No rule: the default (none set: the mesh's allow).
        assert_eq!(
            verdict(&p, 7000, Some(C)),
            (Verdict::Allow, "mesh-default".into())
        );
        // `ns/monitoring` never matches another trust domain or a prefix.
        assert_eq!(
            verdict(&p, 9090, Some("spiffe://cluster.local/ns/monitoring2/sa/x")).0,
            Verdict::Deny
        );
    }

    #[test]
    fn a_deny_default_wins_and_the_stricter_mode_wins() {
        let mut allow = policy("shop/a-allow");
        allow.default_action = wire::Action::Allow as i32;
        allow.mode = wire::InboundMode::Permissive as i32;
        let mut deny = policy("shop/b-deny");
        deny.default_action = wire::Action::Deny as i32;
        deny.mode = wire::InboundMode::Strict as i32;
        let p = compile(&pod(vec![allow.clone(), deny]));
        assert_eq!(
            verdict(&p, 7000, Some(A)),
            (Verdict::Deny, "shop/b-deny".into())
        );
        assert_eq!(p.mode(), Some(Mode::Strict));

        // A policy loosens the mesh default for its pods; the pod's own
        // annotation only tightens.
        let mut strict_mesh = pod(vec![allow.clone()]);
        strict_mesh.default_mode = wire::InboundMode::Strict as i32;
        strict_mesh.default_action = wire::Action::Deny as i32;
        let p = compile(&strict_mesh);
        assert_eq!(p.mode(), Some(Mode::Permissive));
        assert_eq!(
            verdict(&p, 7000, None),
            (Verdict::Allow, "shop/a-allow".into())
        );
        let mut annotated = pod(vec![allow]);
        annotated.pod_strict = true;
        assert_eq!(compile(&annotated).mode(), Some(Mode::Strict));
    }

    #[test]
    fn audit_counts_what_it_would_refuse_and_refuses_nothing() {
        let mut enforce = policy("shop/open");
        enforce.rules.push(rule(&[8080], &[A, C], &[]));
        let mut audit = policy("shop/tight");
        audit.audit = true;
        audit.default_action = wire::Action::Deny as i32;
        audit.mode = wire::InboundMode::Strict as i32;
        audit.rules.push(rule(&[8080], &[A], &[]));
        let p = compile(&pod(vec![enforce.clone(), audit.clone()]));
        // Its rules are united with the enforced ones: c stays allowed on
        // 8080 (open allows it), and what only the audit policy refuses is
        // counted.
        assert_eq!(
            verdict(&p, 8080, Some(C)),
            (Verdict::Allow, "shop/open".into())
        );
        assert_eq!(
            verdict(&p, 7000, Some(C)),
            (Verdict::AuditDeny, "shop/tight".into())
        );
        // Its strict mode is not enforced, but a plaintext peer is counted.
        assert_eq!(p.mode(), Some(Mode::Permissive));
        assert_eq!(
            verdict(&p, 7000, None),
            (Verdict::AuditDeny, "shop/tight".into())
        );
        // What the enforced policies refuse stays refused.
        assert_eq!(
            verdict(&p, 8080, Some(MON)),
            (Verdict::Deny, "shop/open".into())
        );

        // Alone, an audit policy changes nothing that passes.
        let alone = compile(&pod(vec![audit.clone()]));
        assert_eq!(
            verdict(&alone, 8080, Some(C)),
            (Verdict::AuditDeny, "shop/tight".into())
        );
        assert_eq!(
            verdict(&alone, 8080, Some(A)),
            (Verdict::Allow, "mesh-default".into())
        );
        // The same policy enforced refuses.
        audit.audit = false;
        let enforced = compile(&pod(vec![audit]));
        assert_eq!(
            verdict(&enforced, 8080, Some(C)),
            (Verdict::Deny, "shop/tight".into())
        );
        assert_eq!(enforced.mode(), Some(Mode::Strict));
    }

    #[test]
    fn ports_in_labels_are_declared_or_ruled_and_others_are_other() {
        let mut p = policy("shop/p");
        p.rules.push(rule(&[9090], &[A], &[]));
        let p = compile(&pod(vec![p]));
        assert_eq!(p.labelled_port(8080), Some(8080));
        assert_eq!(p.labelled_port(9090), Some(9090));
        assert_eq!(p.labelled_port(31337), None);
    }

    #[test]
    fn a_bad_delivered_policy_is_refused_whole() {
        let cases = [
            rule(&[0], &[A], &[]),
            rule(&[70000], &[A], &[]),
            rule(&[80], &["not an id"], &[]),
            rule(&[80], &["spiffe://other.td/ns/shop/sa/a"], &[]),
            rule(&[80], &[], &["a/b"]),
            rule(&[80], &[], &[""]),
        ];
        for bad in cases {
            let mut p = policy("shop/bad");
            p.rules.push(bad.clone());
            assert!(Policy::from_wire(&pod(vec![p]), &td()).is_err(), "{bad:?}");
        }
        let mut no_default = pod(vec![]);
        no_default.default_action = wire::Action::Unspecified as i32;
        assert!(Policy::from_wire(&no_default, &td()).is_err());
    }

    #[test]
    fn the_deny_list_matches_exact_ids_and_whole_namespaces_only() {
        let list = DenyList::from_wire(
            &wire::DenyList {
                version: "d1".into(),
                identities: vec![C.into()],
                namespaces: vec!["sandbox".into()],
            },
            &td(),
        )
        .expect("valid");
        assert!(list.denies(&id(C)));
        assert!(list.denies(&id("spiffe://cluster.local/ns/sandbox/sa/anything")));
        assert!(!list.denies(&id(A)));
        assert!(!list.denies(&id("spiffe://cluster.local/ns/sandbox2/sa/x")));
        assert!(!list.denies(&id("spiffe://other.td/ns/sandbox/sa/x")));
        assert!(!list.denies(&id("spiffe://cluster.local/sandbox/sa/x")));
        assert!(!DenyList::empty().denies(&id(C)));
        for (identities, namespaces) in [
            (vec!["nope".to_owned()], vec![]),
            (vec!["spiffe://other.td/ns/a/sa/b".to_owned()], vec![]),
            (vec![], vec!["a/b".to_owned()]),
        ] {
            let bad = wire::DenyList {
                version: String::new(),
                identities,
                namespaces,
            };
            assert!(DenyList::from_wire(&bad, &td()).is_err(), "{bad:?}");
        }
    }
}
