//! The SPIFFE verifiers and the certificate store on certificates made here.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use palisade_proto::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    client::danger::ServerCertVerifier,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::danger::ClientCertVerifier,
};

use super::{
    CertStore, Material, StoreError, Verification,
    verifier::{IdentityError, spiffe_id},
};
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
    let usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf_for(ca, sans, from, to, usages)
}

/// A leaf with only the given extended key usages.
fn leaf_for(
    ca: &Ca,
    sans: Vec<SanType>,
    from: SystemTime,
    to: SystemTime,
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.extended_key_usages = usages;
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
fn the_server_verifier_pins_the_expected_identity() {
    let ca = ca();
    let verification = Verification::new(std::slice::from_ref(&ca.der), td()).expect("anchors");
    let t = now();
    let good = leaf(&ca, vec![uri(ID)], t - hour(), t + hour()).0;
    let name = ServerName::try_from("palisade.invalid").expect("name");
    let verify = |expected: Option<&str>| {
        verification
            .server_verifier(expected.map(|e| SpiffeId::parse(e).expect("valid")))
            .verify_server_cert(&good, &[], &name, &[], unix(t))
    };
    verify(Some(ID)).expect("the expected identity answers");
    verify(None).expect("without an expectation, any identity of the trust domain");
    for other in [
        "spiffe://cluster.local/ns/a/sa/app2",
        "spiffe://cluster.local/ns/b/sa/app",
    ] {
        let err = verify(Some(other)).expect_err(other);
        assert_eq!(
            classify_tls(&err).as_str(),
            "unexpected_identity",
            "{other}: {err}"
        );
        let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(why)) = &err else {
            panic!("{other}: {err:?}");
        };
        assert_eq!(
            why.0.downcast_ref::<IdentityError>(),
            Some(&IdentityError::Unexpected {
                peer: ID.into(),
                expected: other.into(),
            })
        );
    }
    // A good identity does not excuse a bad chain.
    let stranger = leaf(&self::ca(), vec![uri(ID)], t - hour(), t + hour()).0;
    let err = verification
        .server_verifier(Some(SpiffeId::parse(ID).expect("valid")))
        .verify_server_cert(&stranger, &[], &name, &[], unix(t))
        .expect_err("other CA");
    assert_eq!(classify_tls(&err).as_str(), "unknown_ca");
}

#[test]
fn the_client_verifier_requires_a_client_certificate_for_client_use() {
    let ca = ca();
    let verification = Verification::new(std::slice::from_ref(&ca.der), td()).expect("anchors");
    let client = verification.client_verifier();
    assert!(
        client.client_auth_mandatory(),
        "a client certificate is required"
    );
    assert!(client.offer_client_auth());
    assert!(
        client.root_hint_subjects().is_empty(),
        "no CA names are sent to clients"
    );

    let t = now();
    let name = ServerName::try_from("palisade.invalid").expect("name");
    let server_only = leaf_for(
        &ca,
        vec![uri(ID)],
        t - hour(),
        t + hour(),
        vec![ExtendedKeyUsagePurpose::ServerAuth],
    )
    .0;
    let client_only = leaf_for(
        &ca,
        vec![uri(ID)],
        t - hour(),
        t + hour(),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    )
    .0;
    client
        .verify_client_cert(&client_only, &[], unix(t))
        .expect("a client certificate verifies as a client");
    let err = client
        .verify_client_cert(&server_only, &[], unix(t))
        .expect_err("a server-only certificate is no client certificate");
    assert_eq!(classify_tls(&err).as_str(), "bad_certificate", "{err}");
    let server = verification.server_verifier(None);
    server
        .verify_server_cert(&server_only, &[], &name, &[], unix(t))
        .expect("a server certificate verifies as a server");
    server
        .verify_server_cert(&client_only, &[], &name, &[], unix(t))
        .expect_err("a client-only certificate is no server certificate");
    // Both sides name the handshake signatures the provider can check.
    assert!(!client.supported_verify_schemes().is_empty());
    assert_eq!(
        client.supported_verify_schemes(),
        server.supported_verify_schemes()
    );
}

#[test]
fn the_identity_is_the_one_uri_san() {
    let ca = ca();
    let t = now();
    let with = |sans| leaf(&ca, sans, t - hour(), t + hour()).0;
    assert_eq!(
        spiffe_id(&with(vec![uri(ID)])),
        Ok(SpiffeId::parse(ID).expect("valid"))
    );
    assert_eq!(
        spiffe_id(&with(vec![
            SanType::DnsName("a.example".try_into().expect("ia5")),
            uri(ID),
        ])),
        Ok(SpiffeId::parse(ID).expect("valid")),
        "other kinds of names beside it do not count"
    );
    assert_eq!(
        spiffe_id(&with(vec![uri(ID), uri(ID)])),
        Err(IdentityError::SeveralUriSans(2))
    );
    assert_eq!(
        spiffe_id(&with(vec![uri(ID), uri(ID), uri(ID)])),
        Err(IdentityError::SeveralUriSans(3))
    );
    assert_eq!(
        spiffe_id(&with(vec![SanType::DnsName(
            "a.example".try_into().expect("ia5")
        )])),
        Err(IdentityError::NoUriSan)
    );
    assert_eq!(spiffe_id(&with(vec![])), Err(IdentityError::NoUriSan));
    assert!(matches!(
        spiffe_id(&with(vec![uri("spiffe://cluster.local/a//b")])),
        Err(IdentityError::NotSpiffe(_))
    ));
    assert_eq!(
        spiffe_id(&CertificateDer::from(vec![0x30, 0x00])),
        Err(IdentityError::Unparsable)
    );
}

#[test]
fn a_bundle_root_webpki_cannot_use_is_an_error() {
    assert!(
        Verification::new(
            &[CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])],
            td()
        )
        .is_err()
    );
}

/// Runs a whole handshake between `client` and `server` in memory.
fn handshake(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
) -> Result<(), rustls::Error> {
    let name = ServerName::try_from("palisade.invalid").expect("name");
    let mut client = rustls::ClientConnection::new(client, name)?;
    let mut server = rustls::ServerConnection::new(server)?;
    for _ in 0..10 {
        let mut wire = Vec::new();
        client.write_tls(&mut wire).expect("client writes");
        server.read_tls(&mut wire.as_slice()).expect("server reads");
        server.process_new_packets()?;
        let mut wire = Vec::new();
        server.write_tls(&mut wire).expect("server writes");
        client.read_tls(&mut wire.as_slice()).expect("client reads");
        client.process_new_packets()?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("the handshake did not finish");
}

#[test]
fn a_pinned_configuration_is_built_once_per_identity_and_never_falls_back() {
    let ca = ca();
    let t = now();
    let registered = SpiffeId::parse("spiffe://cluster.local/ns/b/sa/upstream").expect("valid");
    let store = CertStore::new(td(), vec![registered.clone()]);
    let (cert, key) = leaf(&ca, vec![uri(ID)], t - hour(), t + hour());
    let configs = store
        .publish(
            Material {
                chain: vec![cert],
                key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                roots: vec![ca.der.clone()],
            },
            t,
        )
        .expect("good material");

    let us = SpiffeId::parse(ID).expect("valid");
    let other = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/other").expect("valid");
    // One configuration per identity, whatever the number of connections.
    assert!(Arc::ptr_eq(
        &configs.client(Some(&us)),
        &configs.client(Some(&us))
    ));
    assert!(Arc::ptr_eq(
        &configs.client(Some(&registered)),
        &configs.client(Some(&registered))
    ));
    assert!(!Arc::ptr_eq(
        &configs.client(Some(&us)),
        &configs.client(Some(&other))
    ));
    assert!(!Arc::ptr_eq(
        &configs.client(Some(&us)),
        &configs.client(None)
    ));

    // The server presents `ID`: a client pinned to it, or to nobody, gets
    // through; one pinned to anybody else is refused in the handshake.
    handshake(configs.client(Some(&us)), configs.server()).expect("the expected identity");
    handshake(configs.client(None), configs.server()).expect("any identity of the trust domain");
    for pinned in [&other, &registered] {
        let err = handshake(configs.client(Some(pinned)), configs.server())
            .expect_err("another identity answers");
        assert_eq!(
            classify_tls(&err).as_str(),
            "unexpected_identity",
            "{pinned}: {err}"
        );
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
