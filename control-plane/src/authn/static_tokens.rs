//! The `static` authenticator: a YAML file mapping tokens to SPIFFE IDs, for VMs,
//! local runs and tests. Reloaded when it changes; a bad edit keeps the old table.
//!
//! ```yaml
//! tokens:
//!   - token: "9f4c…"                                   # at least 16 characters
//!     identity: spiffe://cluster.local/ns/default/sa/web
//!     expires: 2027-01-01T00:00:00Z                     # optional, RFC 3339
//! ```
//!
//! Tokens are kept only as SHA-256 digests and looked up by digest, so the
//! table holds no usable secret and the lookup time does not depend on how
//! much of a guessed token matches.

use std::{
    collections::HashMap,
    fmt, fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use arc_swap::ArcSwap;
use palisade_proto::{SpiffeId, TrustDomain};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::AuthnError;

/// The shortest static token accepted in the file.
pub const MIN_TOKEN_LEN: usize = 16;

/// A hot-reloadable token table.
pub struct StaticTokens {
    path: PathBuf,
    trust_domain: TrustDomain,
    table: ArcSwap<Table>,
}

/// Why a token file was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum StaticTokensError {
    #[error("cannot read the token file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the token file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

struct Table {
    by_digest: HashMap<[u8; 32], Entry>,
    /// SHA-256 of the whole file, to skip reloads of an unchanged file.
    file_digest: [u8; 32],
}

#[derive(Clone)]
struct Entry {
    identity: SpiffeId,
    expires: Option<SystemTime>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tokens: Vec<FileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    token: String,
    identity: String,
    #[serde(default)]
    expires: Option<String>,
}

// === impl StaticTokens ===

impl StaticTokens {
    /// Loads the token file; every identity must belong to `trust_domain`.
    pub fn load(path: &Path, trust_domain: TrustDomain) -> Result<Self, StaticTokensError> {
        let table = Table::read(path, &trust_domain)?;
        Ok(Self {
            path: path.to_owned(),
            trust_domain,
            table: ArcSwap::from_pointee(table),
        })
    }

    /// Re-reads the file: the number of tokens when it changed, `None` when its
    /// contents are as before. On error the current table stays in use.
    pub fn reload(&self) -> Result<Option<usize>, StaticTokensError> {
        let table = Table::read(&self.path, &self.trust_domain)?;
        if table.file_digest == self.table.load().file_digest {
            return Ok(None);
        }
        let n = table.by_digest.len();
        self.table.store(Arc::new(table));
        Ok(Some(n))
    }

    /// The watched file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The identity `token` belongs to.
    pub fn authenticate(&self, token: &[u8]) -> Result<SpiffeId, AuthnError> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let table = self.table.load();
        let entry = table
            .by_digest
            .get(&digest)
            .ok_or_else(|| AuthnError::InvalidToken("it is not in the static token file".into()))?;
        if entry.expires.is_some_and(|t| t <= SystemTime::now()) {
            return Err(AuthnError::ExpiredToken);
        }
        Ok(entry.identity.clone())
    }
}

impl fmt::Debug for StaticTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticTokens")
            .field("path", &self.path)
            .field("tokens", &self.table.load().by_digest.len())
            .finish()
    }
}

// === impl Table ===

impl Table {
    fn read(path: &Path, trust_domain: &TrustDomain) -> Result<Self, StaticTokensError> {
        let text = fs::read_to_string(path).map_err(|error| StaticTokensError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(&text, trust_domain).map_err(|reason| StaticTokensError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses the file. Error messages name the entry by position, never by token.
    fn parse(text: &str, trust_domain: &TrustDomain) -> Result<Self, String> {
        let file: File = serde_saphyr::from_str(text).map_err(|e| {
            // The parser's message may quote the offending line, which may be a token.
            let location = e
                .location()
                .map(|l| format!(" at line {}", l.line()))
                .unwrap_or_default();
            format!("it is not YAML of the form `tokens: [{{token, identity, expires}}]`{location}")
        })?;
        let mut by_digest = HashMap::with_capacity(file.tokens.len());
        for (i, entry) in file.tokens.into_iter().enumerate() {
            let n = i + 1;
            if entry.token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "entry {n}: the token is shorter than {MIN_TOKEN_LEN} characters"
                ));
            }
            let identity = SpiffeId::parse(&entry.identity)
                .map_err(|e| format!("entry {n}: identity {:?}: {e}", entry.identity))?;
            if !identity.is_member_of(trust_domain) {
                return Err(format!(
                    "entry {n}: identity {identity} is outside the trust domain {trust_domain}"
                ));
            }
            let expires = entry
                .expires
                .map(|t| {
                    humantime::parse_rfc3339_weak(&t)
                        .map_err(|e| format!("entry {n}: expires {t:?}: {e}"))
                })
                .transpose()?;
            let digest: [u8; 32] = Sha256::digest(entry.token.as_bytes()).into();
            if by_digest
                .insert(digest, Entry { identity, expires })
                .is_some()
            {
                return Err(format!("entry {n}: the same token appears twice"));
            }
        }
        Ok(Self {
            by_digest,
            file_digest: Sha256::digest(text.as_bytes()).into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use palisade_runtime::metrics::LabelValue;

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::parse("cluster.local").expect("valid")
    }

    const GOOD: &str = r#"
tokens:
  - token: "web-token-0123456789"
    identity: spiffe://cluster.local/ns/default/sa/web
  - token: "old-token-0123456789"
    identity: spiffe://cluster.local/ns/default/sa/old
    expires: 2001-01-01T00:00:00Z
"#;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("tokens.yaml");
        fs::write(&path, text).expect("write token file");
        path
    }

    #[test]
    fn known_token_yields_its_identity_and_expired_or_unknown_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = StaticTokens::load(&write(dir.path(), GOOD), td()).expect("loads");
        assert_eq!(
            tokens
                .authenticate(b"web-token-0123456789")
                .expect("known")
                .as_str(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert_eq!(
            tokens.authenticate(b"old-token-0123456789"),
            Err(AuthnError::ExpiredToken)
        );
        let err = tokens
            .authenticate(b"web-token-012345678")
            .expect_err("unknown");
        assert_eq!(err.reason().as_str(), "invalid_token");
    }

    #[test]
    fn a_bad_edit_keeps_the_old_table_and_says_why_without_the_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), GOOD);
        let tokens = StaticTokens::load(&path, td()).expect("loads");

        for (bad, why) in [
            ("tokens: [", "not YAML"),
            (
                "tokens:\n  - token: secret-secret-secret\n    identity: spiffe://other.td/ns/a/sa/b\n",
                "outside the trust domain",
            ),
            (
                "tokens:\n  - token: secret-secret-secret\n    identity: http://x\n",
                "identity",
            ),
            (
                "tokens:\n  - token: short\n    identity: spiffe://cluster.local/ns/a/sa/b\n",
                "shorter than",
            ),
            (
                "tokens:\n  - token: secret-secret-secret\n    identity: spiffe://cluster.local/ns/a/sa/b\n  - token: secret-secret-secret\n    identity: spiffe://cluster.local/ns/a/sa/c\n",
                "twice",
            ),
            (
                "tokens:\n  - token: secret-secret-secret\n    identity: spiffe://cluster.local/ns/a/sa/b\n    expires: tomorrow\n",
                "expires",
            ),
            (
                "tokens:\n  - token: secret-secret-secret\n    identity: spiffe://cluster.local/ns/a/sa/b\n    role: admin\n",
                "not YAML",
            ),
        ] {
            fs::write(&path, bad).expect("write");
            let err = tokens.reload().expect_err(bad).to_string();
            assert!(err.contains(why), "{err:?} should mention {why:?}");
            assert!(
                !err.contains("secret-secret-secret"),
                "{err:?} leaks the token"
            );
            assert!(
                tokens.authenticate(b"web-token-0123456789").is_ok(),
                "old table lost after {bad:?}"
            );
        }

        fs::write(
            &path,
            "tokens:\n  - token: new-token-0123456789\n    identity: spiffe://cluster.local/ns/a/sa/new\n",
        )
        .expect("write");
        assert_eq!(tokens.reload().expect("valid"), Some(1));
        assert_eq!(tokens.reload().expect("unchanged"), None);
        assert!(tokens.authenticate(b"web-token-0123456789").is_err());
        assert!(tokens.authenticate(b"new-token-0123456789").is_ok());
    }

    #[test]
    fn expiry_in_the_future_is_honoured_until_it_passes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let soon = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600));
        let text = format!(
            "tokens:\n  - token: soon-token-0123456789\n    identity: spiffe://cluster.local/ns/a/sa/b\n    expires: {soon}\n"
        );
        let tokens = StaticTokens::load(&write(dir.path(), &text), td()).expect("loads");
        assert!(tokens.authenticate(b"soon-token-0123456789").is_ok());
    }
}
