//! Flags of mesh TLS: key exchange groups and cipher suites.

use clap::Args;

use crate::tls::{KxGroup, Suite, TlsSettings};

/// Flags of `run` for mesh TLS.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// Key-exchange groups offered and accepted, in preference order (comma-separated).
    #[arg(
        long,
        env = "PALISADE_TLS_GROUPS",
        value_enum,
        value_delimiter = ',',
        default_value = "x25519mlkem768,x25519"
    )]
    pub tls_groups: Vec<KxGroup>,
    /// TLS 1.3 cipher suites, in preference order (comma-separated).
    #[arg(
        long,
        env = "PALISADE_TLS_CIPHER_SUITES",
        value_enum,
        value_delimiter = ',',
        default_value = "aes128gcm,aes256gcm,chacha20poly1305"
    )]
    pub tls_cipher_suites: Vec<Suite>,
}

// === impl TlsArgs ===

impl TlsArgs {
    /// The settings, each list without repeats (first occurrence kept).
    pub fn into_settings(self) -> TlsSettings {
        TlsSettings {
            groups: dedup(self.tls_groups),
            cipher_suites: dedup(self.tls_cipher_suites),
        }
    }
}

/// `list` without repeats, first occurrence kept.
fn dedup<T: PartialEq>(list: Vec<T>) -> Vec<T> {
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}
