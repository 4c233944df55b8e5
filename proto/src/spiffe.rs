//! SPIFFE IDs (`spiffe://<trust-domain>/<path>`), parsed once per the SPIFFE ID
//! specification and then carried as a type.
//!
//! The rules enforced here are the ones of the SPIFFE ID standard: scheme
//! `spiffe` in lowercase, a trust domain of lowercase letters, digits, `.`, `-`
//! and `_`, no userinfo, port, query or fragment, and a path of non-empty
//! segments other than `.` and `..`, each of letters, digits, `.`, `-` and `_`.
//! The whole ID is at most 2048 bytes and the trust domain at most 255.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";
/// Longest SPIFFE ID accepted, in bytes (the spec's URI limit).
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain accepted, in bytes (a DNS name's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A SPIFFE ID such as `spiffe://cluster.local/ns/default/sa/web`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// Byte offset where the path starts (the index of its first `/`), or `id.len()`.
    path_start: usize,
}

/// A SPIFFE trust domain such as `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// Why a string is not a SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("a SPIFFE ID is empty")]
    Empty,
    #[error("a SPIFFE ID is at most {MAX_ID_LEN} bytes long")]
    TooLong,
    #[error("a SPIFFE ID starts with the lowercase scheme `spiffe://`")]
    WrongScheme,
    #[error("the trust domain is missing")]
    MissingTrustDomain,
    #[error("the trust domain is at most {MAX_TRUST_DOMAIN_LEN} bytes long")]
    TrustDomainTooLong,
    #[error(
        "the trust domain may hold only lowercase letters, digits, `.`, `-` and `_` \
         (no port, user info or upper case)"
    )]
    BadTrustDomainChar,
    #[error("a path segment is empty (a double or trailing `/`)")]
    EmptySegment,
    #[error("a path segment is `.` or `..`")]
    DotSegment,
    #[error("a path segment may hold only letters, digits, `.`, `-` and `_`")]
    BadPathChar,
    #[error("a SPIFFE ID carries no query or fragment")]
    QueryOrFragment,
}

// === impl SpiffeId ===

impl SpiffeId {
    /// Parses `s` as a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        if rest.contains(['?', '#']) {
            return Err(SpiffeIdError::QueryOrFragment);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                validate_segment(segment)?;
            }
        }
        Ok(Self {
            id: s.to_owned(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// The Kubernetes workload identity `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn from_kubernetes(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        // Each must be one segment: a `/` inside would forge a different path.
        validate_segment(namespace)?;
        validate_segment(service_account)?;
        Self::parse(&format!(
            "{SCHEME}{}/ns/{namespace}/sa/{service_account}",
            trust_domain.0
        ))
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    /// The path, e.g. `/ns/default/sa/web`; empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// Whether this ID belongs to `trust_domain`.
    pub fn is_member_of(&self, trust_domain: &TrustDomain) -> bool {
        self.trust_domain() == trust_domain.as_str()
    }

    /// The namespace of a Kubernetes ID (`/ns/<namespace>/sa/<sa>`).
    pub fn namespace(&self) -> Option<&str> {
        self.kubernetes_parts().map(|(ns, _)| ns)
    }

    /// The service account of a Kubernetes ID (`/ns/<namespace>/sa/<sa>`).
    pub fn service_account(&self) -> Option<&str> {
        self.kubernetes_parts().map(|(_, sa)| sa)
    }

    fn kubernetes_parts(&self) -> Option<(&str, &str)> {
        let mut segments = self.path().strip_prefix('/')?.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(SpiffeIdError::BadTrustDomainChar);
    }
    Ok(())
}

fn validate_segment(segment: &str) -> Result<(), SpiffeIdError> {
    match segment {
        "" => Err(SpiffeIdError::EmptySegment),
        "." | ".." => Err(SpiffeIdError::DotSegment),
        s if s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) =>
        {
            Ok(())
        }
        _ => Err(SpiffeIdError::BadPathChar),
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

// === impl TrustDomain ===

impl TrustDomain {
    /// Parses a bare trust domain name such as `cluster.local`.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(s)?;
        Ok(Self(s.to_owned()))
    }

    /// The trust domain's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_parse_and_expose_their_parts() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.service_account(), Some("web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");

        for ok in [
            "spiffe://example.org",
            "spiffe://trust-domain_1.example/path",
            "spiffe://example.org/a/b.c/d-e/f_g/H1",
            "spiffe://example.org/...x",
            "spiffe://192.168.1.1/workload",
        ] {
            SpiffeId::parse(ok).unwrap_or_else(|e| panic!("{ok} should parse: {e}"));
        }
    }

    #[test]
    fn non_kubernetes_paths_have_no_namespace() {
        for id in [
            "spiffe://example.org",
            "spiffe://example.org/ns/default",
            "spiffe://example.org/ns/default/sa/web/extra",
            "spiffe://example.org/x/default/sa/web",
        ] {
            let id = SpiffeId::parse(id).expect("valid");
            assert_eq!(id.namespace(), None, "{id}");
            assert_eq!(id.service_account(), None, "{id}");
        }
    }

    #[test]
    fn invalid_ids_are_refused_with_the_rule_they_break() {
        use SpiffeIdError::*;
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        let long_id = format!("spiffe://example.org/{}", "a".repeat(MAX_ID_LEN));
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            ("http://example.org/x", WrongScheme),
            ("SPIFFE://example.org/x", WrongScheme),
            ("spiffe:/example.org/x", WrongScheme),
            ("example.org/x", WrongScheme),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///path", MissingTrustDomain),
            ("spiffe://Example.org/x", BadTrustDomainChar),
            ("spiffe://example.org:8080/x", BadTrustDomainChar),
            ("spiffe://user@example.org/x", BadTrustDomainChar),
            ("spiffe://exa mple.org/x", BadTrustDomainChar),
            ("spiffe://example.org/", EmptySegment),
            ("spiffe://example.org//x", EmptySegment),
            ("spiffe://example.org/x/", EmptySegment),
            ("spiffe://example.org/./x", DotSegment),
            ("spiffe://example.org/x/..", DotSegment),
            ("spiffe://example.org/x%20y", BadPathChar),
            ("spiffe://example.org/x y", BadPathChar),
            ("spiffe://example.org/ü", BadPathChar),
            ("spiffe://example.org/x?y=1", QueryOrFragment),
            ("spiffe://example.org/x#frag", QueryOrFragment),
            (long_td.as_str(), TrustDomainTooLong),
            (long_id.as_str(), TooLong),
        ];
        for (input, want) in cases {
            assert_eq!(
                SpiffeId::parse(input).as_ref().err(),
                Some(want),
                "{input:?}"
            );
        }
    }

    #[test]
    fn the_length_bounds_are_inclusive() {
        let id_of_len = |n: usize| {
            let prefix = "spiffe://example.org/";
            format!("{prefix}{}", "a".repeat(n - prefix.len()))
        };
        assert_eq!(id_of_len(MAX_ID_LEN).len(), MAX_ID_LEN);
        assert!(SpiffeId::parse(&id_of_len(MAX_ID_LEN)).is_ok());
        assert_eq!(
            SpiffeId::parse(&id_of_len(MAX_ID_LEN + 1)).err(),
            Some(SpiffeIdError::TooLong)
        );

        let td = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        assert!(TrustDomain::parse(&td).is_ok());
        assert!(SpiffeId::parse(&format!("spiffe://{td}/x")).is_ok());
        let td = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert_eq!(
            TrustDomain::parse(&td).err(),
            Some(SpiffeIdError::TrustDomainTooLong)
        );
        assert_eq!(MAX_ID_LEN, 2048);
        assert_eq!(MAX_TRUST_DOMAIN_LEN, 255);
    }

    #[test]
    fn ids_and_trust_domains_print_as_themselves() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").expect("valid");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(
            format!("{id:?}"),
            "SpiffeId(spiffe://cluster.local/ns/a/sa/b)"
        );
        let td: TrustDomain = "cluster.local".parse().expect("valid");
        assert_eq!(td.to_string(), "cluster.local");
        assert_eq!(format!("{td:?}"), "TrustDomain(cluster.local)");
        assert_eq!(
            serde_json::to_string(&td).expect("serializes"),
            "\"cluster.local\""
        );
        assert_eq!(
            serde_json::to_string(&id).expect("serializes"),
            "\"spiffe://cluster.local/ns/a/sa/b\""
        );
        let parsed: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().expect("valid");
        assert_eq!(parsed, id);
        assert!("spiffe://cluster.local/ns/a/".parse::<SpiffeId>().is_err());
        assert!("Cluster.local".parse::<TrustDomain>().is_err());
    }

    #[test]
    fn a_namespace_or_account_of_more_than_one_segment_is_refused() {
        let td = TrustDomain::parse("cluster.local").expect("valid");
        for (ns, sa, why) in [
            ("a/b", "api", SpiffeIdError::BadPathChar),
            ("prod", "a/b", SpiffeIdError::BadPathChar),
            ("", "api", SpiffeIdError::EmptySegment),
            ("prod", "", SpiffeIdError::EmptySegment),
            ("..", "api", SpiffeIdError::DotSegment),
            ("prod", ".", SpiffeIdError::DotSegment),
        ] {
            assert_eq!(
                SpiffeId::from_kubernetes(&td, ns, sa).err(),
                Some(why),
                "{ns:?} {sa:?}"
            );
        }
    }

    #[test]
    fn kubernetes_ids_are_built_from_namespace_and_service_account() {
        let td = TrustDomain::parse("cluster.local").expect("valid");
        let id = SpiffeId::from_kubernetes(&td, "prod", "api").expect("valid");
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/prod/sa/api");
        assert!(id.is_member_of(&td));
        assert!(!id.is_member_of(&TrustDomain::parse("other.local").expect("valid")));
        assert_eq!(
            SpiffeId::from_kubernetes(&td, "a/b", "api").err(),
            Some(SpiffeIdError::BadPathChar)
        );
    }

    #[test]
    fn trust_domains_follow_the_same_rules() {
        assert!(TrustDomain::parse("cluster.local").is_ok());
        assert!(TrustDomain::parse("").is_err());
        assert!(TrustDomain::parse("Cluster.local").is_err());
        assert!(TrustDomain::parse("cluster.local:80").is_err());
    }

    #[test]
    fn serde_round_trip_rejects_bad_ids() {
        let id: SpiffeId =
            serde_json::from_str("\"spiffe://td/ns/a/sa/b\"").expect("valid id deserializes");
        assert_eq!(id.as_str(), "spiffe://td/ns/a/sa/b");
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://TD/x\"").is_err());
    }
}
