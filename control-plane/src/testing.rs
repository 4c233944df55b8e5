//! Certificates and CSRs made on the spot for unit tests (never checked in).

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};

use crate::ca::{CaFiles, Issuer};

/// A CA certificate with its key.
pub struct TestCa {
    pub key: KeyPair,
    pub params: CertificateParams,
    pub pem: String,
}

impl TestCa {
    /// A self-signed root valid from `not_before` to `not_after`.
    pub fn root(name: &str, not_before: SystemTime, not_after: SystemTime) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let params = ca_params(name, not_before, not_after);
        let pem = params.self_signed(&key).expect("self-sign").pem();
        Self { key, params, pem }
    }

    /// A root valid from an hour ago for ten years.
    pub fn fresh_root(name: &str) -> Self {
        let now = SystemTime::now();
        Self::root(
            name,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(10 * 365 * 86400),
        )
    }

    /// An intermediate CA signed by `self`.
    pub fn intermediate(&self, name: &str, not_after: SystemTime) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let mut params = ca_params(
            name,
            SystemTime::now() - Duration::from_secs(3600),
            not_after,
        );
        params.use_authority_key_identifier_extension = true;
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let pem = params.signed_by(&key, &issuer).expect("sign").pem();
        Self { key, params, pem }
    }

    /// The CA directory contents for issuing with `self`, trusted through `bundle`.
    pub fn files(&self, chain_above: &[&TestCa], bundle: &[&TestCa]) -> CaFiles {
        let mut cert = self.pem.clone();
        for c in chain_above {
            cert.push_str(&c.pem);
        }
        let bundle: String = bundle.iter().map(|c| c.pem.as_str()).collect();
        CaFiles::from_pem(
            cert.into_bytes(),
            self.key.serialize_pem().into_bytes(),
            bundle.into_bytes(),
        )
    }

    /// An issuer for a self-signed root.
    pub fn issuer(&self) -> Issuer {
        Issuer::from_files(&self.files(&[], &[self]), SystemTime::now()).expect("valid issuer")
    }

    /// Writes the CA directory files into `dir`.
    pub fn write(&self, dir: &std::path::Path, chain_above: &[&TestCa], bundle: &[&TestCa]) {
        let mut cert = self.pem.clone();
        for c in chain_above {
            cert.push_str(&c.pem);
        }
        let bundle: String = bundle.iter().map(|c| c.pem.as_str()).collect();
        std::fs::write(dir.join("tls.crt"), cert).expect("write tls.crt");
        std::fs::write(dir.join("tls.key"), self.key.serialize_pem()).expect("write tls.key");
        std::fs::write(dir.join("ca.crt"), bundle).expect("write ca.crt");
    }
}

fn ca_params(name: &str, not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params
}

/// A CSR for a fresh P-256 key with the given SANs and basic constraints.
pub fn csr(sans: Vec<SanType>, is_ca: IsCa) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    csr_for(&key, sans, is_ca)
}

/// A CSR for `key`.
pub fn csr_for(key: &KeyPair, sans: Vec<SanType>, is_ca: IsCa) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.is_ca = is_ca;
    params
        .serialize_request(key)
        .expect("serialize CSR")
        .der()
        .to_vec()
}

/// A URI SAN.
pub fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("ASCII URI"))
}
