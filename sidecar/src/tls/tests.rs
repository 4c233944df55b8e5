//! The SPIFFE verifiers and the certificate store on certificates made here.

use std::time::{Duration, SystemTime};

use palisade_proto::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use super::{CertStore, Material, StoreError, Verification};
use crate::{metrics::LabelValue, proxy::handshake::classify_tls};

const ID: &str = "spiffe://cluster.local/ns/a/sa/app";

struct Ca {
    key: KeyPair,
    params: CertificateParams,
    der: CertificateDer<'static>,
}

fn ca() -> Ca {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let der = params.self_signed(&key).expect("self-sign").der().clone();
    Ca { key, params, der }
}

fn leaf(
    ca: &Ca,
    sans: Vec<SanType>,
    from: SystemTime,
    to: SystemTime,
) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = from.into();
    params.not_after = to.into();
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    (
        params.signed_by(&key, &issuer).expect("sign").der().clone(),
        key,
    )
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("ia5"))
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn unix(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(
        t.duration_since(SystemTime::UNIX_EPOCH)
            .expect("after epoch"),
    )
}

fn td() -> TrustDomain {
    TrustDomain::parse("cluster.local").expect("valid")
}

fn hour() -> Duration {
    Duration::from_secs(3600)
}

#[test]
fn verifiers_accept_a_good_chain_and_name_each_failure() {
    let ca = ca();
    let other = self::ca();
    let verification = Verification::new(std::slice::from_ref(&ca.der), td()).expect("anchors");
    let t = now();
    let good = leaf(&ca, vec![uri(ID)], t - hour(), t + hour()).0;
    for client in [true, false] {
        let id = verification
            .verify(&good, &[], unix(t), client)
            .expect("a good chain verifies");
        assert_eq!(id, SpiffeId::parse(ID).expect("valid"));
    }

    let cases: Vec<(&str, CertificateDer<'static>, &str)> = vec![
        (
            "other CA",
            leaf(&other, vec![uri(ID)], t - hour(), t + hour()).0,
            "unknown_ca",
        ),
        (
            "expired",
            leaf(&ca, vec![uri(ID)], t - 2 * hour(), t - hour()).0,
            "expired",
        ),
        (
            "not yet valid",
            leaf(&ca, vec![uri(ID)], t + hour(), t + 2 * hour()).0,
            "not_yet_valid",
        ),
        (
            "no URI SAN",
            leaf(
                &ca,
                vec![SanType::DnsName("a.example".try_into().expect("ia5"))],
                t - hour(),
                t + hour(),
            )
            .0,
            "bad_identity",
        ),
        (
            "two URI SANs",
            leaf(
                &ca,
                vec![uri(ID), uri("spiffe://cluster.local/ns/b/sa/x")],
                t - hour(),
                t + hour(),
            )
            .0,
            "bad_identity",
        ),
        (
            "URI SAN that is no SPIFFE ID",
            leaf(
                &ca,
                vec![uri("https://cluster.local/a")],
                t - hour(),
                t + hour(),
            )
            .0,
            "bad_identity",
        ),
        (
            "other trust domain",
            leaf(
                &ca,
                vec![uri("spiffe://evil.example/ns/a/sa/app")],
                t - hour(),
                t + hour(),
            )
            .0,
            "wrong_trust_domain",
        ),
    ];
    for (name, cert, reason) in cases {
        for client in [true, false] {
            let err = verification
                .verify(&cert, &[], unix(t), client)
                .expect_err(name);
            assert_eq!(classify_tls(&err).as_str(), reason, "{name}: {err}");
        }
    }
}

#[test]
fn the_store_refuses_bad_material_and_keeps_what_it_has() {
    let ca = ca();
    let t = now();
    let store = CertStore::new(td(), Vec::new());
    assert!(store.current().is_none());
    assert!(!store.is_ready(t), "not ready before the first certificate");

    let material = |cert: CertificateDer<'static>,
                    key: &KeyPair,
                    roots: Vec<CertificateDer<'static>>| Material {
        chain: vec![cert],
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        roots,
    };
    let (good, good_key) = leaf(&ca, vec![uri(ID)], t - hour(), t + hour());
    let published = store
        .publish(material(good.clone(), &good_key, vec![ca.der.clone()]), t)
        .expect("good material");
    assert_eq!(published.identity().as_str(), ID);
    assert!(store.is_ready(t));

    let (_, stranger_key) = leaf(&ca, vec![uri(ID)], t - hour(), t + hour());
    let other_ca = self::ca();
    let (foreign, foreign_key) = leaf(
        &ca,
        vec![uri("spiffe://evil.example/x")],
        t - hour(),
        t + hour(),
    );
    let (expired, expired_key) = leaf(&ca, vec![uri(ID)], t - 2 * hour(), t - hour());
    type Expected = fn(&StoreError) -> bool;
    let bad: Vec<(&str, Material, Expected)> = vec![
        (
            "key of another certificate",
            material(good.clone(), &stranger_key, vec![ca.der.clone()]),
            |e| matches!(e, StoreError::KeyMismatch),
        ),
        (
            "bundle of another CA",
            material(good.clone(), &good_key, vec![other_ca.der.clone()]),
            |e| matches!(e, StoreError::Untrusted(_)),
        ),
        (
            "empty bundle",
            material(good.clone(), &good_key, vec![]),
            |e| matches!(e, StoreError::NoRoots),
        ),
        (
            "other trust domain",
            material(foreign, &foreign_key, vec![ca.der.clone()]),
            |e| matches!(e, StoreError::Untrusted(_)),
        ),
        (
            "expired",
            material(expired, &expired_key, vec![ca.der.clone()]),
            |e| matches!(e, StoreError::Untrusted(_)),
        ),
    ];
    for (name, m, expected) in bad {
        let err = store.publish(m, t).expect_err(name);
        assert!(expected(&err), "{name}: {err:?}");
        assert_eq!(
            store.current().expect("kept").identity().as_str(),
            ID,
            "{name}: the good certificate stays in use"
        );
    }
    assert!(
        !store.is_ready(t + 2 * hour()),
        "not ready once the certificate expired"
    );
}
