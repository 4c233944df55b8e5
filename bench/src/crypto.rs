//! The crypto reference: what the asymmetric operations cost on one thread of
//! this process (aws-lc-rs, the provider Palisade's binaries use), measured in
//! the same run as what is set against them, because a shared machine's speed
//! changes from run to run.
//!
//! - [`HandshakeCost`]: µs of thread CPU per operation of one mutual TLS 1.3
//!   handshake (the proxy benchmark's "CPU per connection" reference).
//! - [`IssuanceCeiling`]: ECDSA P-256 signs and verifies per second, the most
//!   certificates one core could issue (the issuance benchmark's ceiling).
//!
//! Both count the thread's own CPU time (`CLOCK_THREAD_CPUTIME_ID`, the
//! scheduler's run time of this thread), so other work on a shared machine
//! does not make an operation look dearer.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use aws_lc_rs::{
    agreement::{
        EphemeralPrivateKey, UnparsedPublicKey as AgreePublicKey, X25519, agree_ephemeral,
    },
    kem::{DecapsulationKey, ML_KEM_768},
    rand::SystemRandom,
    signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _,
        Signature, UnparsedPublicKey,
    },
};
use serde_json::{Value, json};

/// What a TLS 1.3 CertificateVerify signs: 64 spaces, the context string, a
/// zero byte and the transcript hash.
const CERTIFICATE_VERIFY_LEN: usize = 130;
/// Bytes signed and verified by the issuance ceiling: about a leaf's TBSCertificate.
const TBS_CERTIFICATE_LEN: usize = 400;

/// Thread-CPU µs per operation of one mutual TLS 1.3 handshake.
#[derive(Clone, Copy, Debug)]
pub struct HandshakeCost {
    /// One ECDSA P-256 signature (a CertificateVerify).
    pub sign_us: f64,
    /// One ECDSA P-256 verification.
    pub verify_us: f64,
    /// One side's X25519: key generation, public key, agreement.
    pub x25519_us: f64,
    /// ML-KEM-768 key generation + encapsulation + decapsulation.
    pub mlkem_us: f64,
}

/// ECDSA P-256 operations per second on one core: per second of the measuring
/// thread's CPU time (what a core can do), and per second of wall time (what
/// the thread got on a shared machine).
#[derive(Clone, Copy, Debug)]
pub struct IssuanceCeiling {
    /// Signs per CPU second.
    pub sign: f64,
    /// Verifies per CPU second.
    pub verify: f64,
    /// Signs per wall second.
    pub sign_wall: f64,
    /// Verifies per wall second.
    pub verify_wall: f64,
}

/// When [`time_ops`] stops: after this much wall time, or this much of the
/// thread's CPU time.
#[derive(Clone, Copy, Debug)]
enum Budget {
    Wall(Duration),
    ThreadCpu(Duration),
}

/// Operations done, and the thread CPU and wall time they took.
#[derive(Clone, Copy, Debug)]
struct OpsTiming {
    ops: u64,
    cpu_ns: u64,
    wall: Duration,
}

/// An ECDSA P-256 key with a message and the key's signature of it.
struct EcdsaP256 {
    rng: SystemRandom,
    key: EcdsaKeyPair,
    public: UnparsedPublicKey<Vec<u8>>,
    message: Vec<u8>,
    signature: Signature,
}

// === impl HandshakeCost ===

impl HandshakeCost {
    /// Measures each operation for a quarter of `budget` of thread CPU.
    pub fn measure(budget: Duration) -> Result<Self> {
        const BATCH: u64 = 16;
        let each = Budget::ThreadCpu(budget / 4);
        let us = |t: OpsTiming| t.cpu_ns as f64 / 1e3 / t.ops as f64;
        let ecdsa = EcdsaP256::new(vec![0x20; CERTIFICATE_VERIFY_LEN])?;
        let sign_us = us(time_ops(each, BATCH, || ecdsa.sign())?);
        let verify_us = us(time_ops(each, BATCH, || ecdsa.verify())?);
        let rng = SystemRandom::new();
        let peer = EphemeralPrivateKey::generate(&X25519, &rng)
            .context("x25519")?
            .compute_public_key()
            .context("x25519")?;
        let peer = peer.as_ref().to_vec();
        let x25519_us = us(time_ops(each, BATCH, || {
            let mine = EphemeralPrivateKey::generate(&X25519, &rng).context("x25519")?;
            let public = mine.compute_public_key().context("x25519")?;
            black_box(public.as_ref());
            agree_ephemeral(
                mine,
                AgreePublicKey::new(&X25519, &peer),
                anyhow!("x25519 agreement"),
                |secret| {
                    black_box(secret);
                    Ok(())
                },
            )
        })?);
        let mlkem_us = us(time_ops(each, BATCH, || {
            let dk = DecapsulationKey::generate(&ML_KEM_768).context("ml-kem")?;
            let ek = dk.encapsulation_key().context("ml-kem")?;
            let (ct, ss) = ek.encapsulate().context("ml-kem")?;
            let ss2 = dk.decapsulate(ct).context("ml-kem")?;
            black_box((ss, ss2));
            Ok(())
        })?);
        Ok(Self {
            sign_us,
            verify_us,
            x25519_us,
            mlkem_us,
        })
    }

    /// The asymmetric crypto of one mutual handshake, both sides together, µs:
    /// 2 signs (both CertificateVerify), 4 verifies (each side checks the peer
    /// leaf's CA signature and the peer's CertificateVerify), 2 X25519, and for
    /// the hybrid one ML-KEM-768 key generation, encapsulation and decapsulation.
    pub fn handshake_us(&self, hybrid: bool) -> f64 {
        let classic = 2.0 * self.sign_us + 4.0 * self.verify_us + 2.0 * self.x25519_us;
        if hybrid {
            classic + self.mlkem_us
        } else {
            classic
        }
    }

    /// The figures as the proxy benchmark's JSON has them.
    pub fn json(&self) -> Value {
        json!({
            "ecdsa_p256_sign_us": self.sign_us,
            "ecdsa_p256_verify_us": self.verify_us,
            "x25519_keygen_agree_us": self.x25519_us,
            "mlkem768_keygen_encaps_decaps_us": self.mlkem_us,
            "handshake_x25519_us": self.handshake_us(false),
            "handshake_hybrid_us": self.handshake_us(true),
        })
    }
}

// === impl IssuanceCeiling ===

impl IssuanceCeiling {
    /// Measures signs/s, then verifies/s, each for `each` of wall time on one
    /// blocking thread.
    pub async fn measure(each: Duration) -> Result<Self> {
        tokio::task::spawn_blocking(move || Self::measure_blocking(each))
            .await
            .context("the crypto ceiling thread panicked")?
    }

    fn measure_blocking(each: Duration) -> Result<Self> {
        const BATCH: u64 = 32;
        let ecdsa = EcdsaP256::new(vec![0x5a; TBS_CERTIFICATE_LEN])?;
        let rates = |op: &dyn Fn() -> Result<()>| -> Result<(f64, f64)> {
            // One unmeasured batch first, off the cold caches.
            for _ in 0..BATCH {
                op()?;
            }
            let t = time_ops(Budget::Wall(each), BATCH, op)?;
            Ok((
                t.ops as f64 / (t.cpu_ns as f64 / 1e9),
                t.ops as f64 / t.wall.as_secs_f64(),
            ))
        };
        let (sign, sign_wall) = rates(&|| ecdsa.sign())?;
        let (verify, verify_wall) = rates(&|| ecdsa.verify())?;
        Ok(Self {
            sign,
            verify,
            sign_wall,
            verify_wall,
        })
    }

    /// The mean of two measurements (their median).
    pub fn median_of(a: Self, b: Self) -> Self {
        Self {
            sign: (a.sign + b.sign) / 2.0,
            verify: (a.verify + b.verify) / 2.0,
            sign_wall: (a.sign_wall + b.sign_wall) / 2.0,
            verify_wall: (a.verify_wall + b.verify_wall) / 2.0,
        }
    }

    /// Issuances per second one core could do: one sign plus one verify each.
    pub fn one_core(&self) -> f64 {
        1.0 / (1.0 / self.sign + 1.0 / self.verify)
    }

    /// CPU µs of the minimum crypto in one issuance.
    pub fn crypto_us(&self) -> f64 {
        1e6 / self.one_core()
    }
}

// === impl EcdsaP256 ===

impl EcdsaP256 {
    /// A fresh key, and its signature of `message`.
    fn new(message: Vec<u8>) -> Result<Self> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
            .context("generating a P-256 key for the crypto reference")?;
        let signature = key.sign(&rng, &message).context("ECDSA P-256 sign")?;
        let public =
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref().to_vec());
        Ok(Self {
            rng,
            key,
            public,
            message,
            signature,
        })
    }

    /// Signs the message once more.
    fn sign(&self) -> Result<()> {
        let signature = self
            .key
            .sign(&self.rng, black_box(&self.message))
            .context("ECDSA P-256 sign")?;
        black_box(signature);
        Ok(())
    }

    /// Verifies the signature of the message.
    fn verify(&self) -> Result<()> {
        self.public
            .verify(black_box(&self.message), black_box(self.signature.as_ref()))
            .context("ECDSA P-256 verify of a good signature")
    }
}

/// Calls `op` in batches of `batch` until `budget` is spent.
fn time_ops(budget: Budget, batch: u64, mut op: impl FnMut() -> Result<()>) -> Result<OpsTiming> {
    let wall_start = Instant::now();
    let cpu_start = thread_cpu_ns();
    let mut ops = 0_u64;
    loop {
        for _ in 0..batch {
            op()?;
        }
        ops += batch;
        let wall = wall_start.elapsed();
        let cpu_ns = thread_cpu_ns().saturating_sub(cpu_start);
        let spent = match budget {
            Budget::Wall(limit) => wall >= limit,
            Budget::ThreadCpu(limit) => u128::from(cpu_ns) >= limit.as_nanos(),
        };
        if spent {
            return Ok(OpsTiming {
                ops,
                cpu_ns: cpu_ns.max(1),
                wall,
            });
        }
    }
}

/// The CPU time this thread has run, ns.
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    // Both fields are non-negative for a CPU-time clock.
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mutual_handshake_is_two_signs_four_verifies_two_x25519() {
        let c = HandshakeCost {
            sign_us: 10.0,
            verify_us: 100.0,
            x25519_us: 1000.0,
            mlkem_us: 10_000.0,
        };
        assert_eq!(c.handshake_us(false), 2420.0);
        assert_eq!(c.handshake_us(true), 12_420.0);
    }

    #[test]
    fn one_core_issues_one_sign_plus_one_verify_per_certificate() {
        let c = IssuanceCeiling {
            sign: 30_000.0,
            verify: 10_000.0,
            sign_wall: 0.0,
            verify_wall: 0.0,
        };
        assert_eq!(c.one_core(), 7_500.0);
        assert!((c.crypto_us() - 133.333).abs() < 0.001);
    }

    #[test]
    fn time_ops_stops_at_the_thread_cpu_budget() {
        let t = time_ops(Budget::ThreadCpu(Duration::from_millis(20)), 4, || {
            black_box((0..1000).sum::<u64>());
            Ok(())
        })
        .expect("the op does not fail");
        assert!(t.cpu_ns >= 20_000_000);
        assert_eq!(t.ops % 4, 0);
    }
}
