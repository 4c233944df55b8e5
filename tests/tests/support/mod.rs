//! What the in-process sidecar tests share: certificates made on the spot, a
//! sidecar running inside the test process, and an echo app.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use clap::Parser;
use palisade_sidecar::{
    app::App,
    config::{Cli, Command as SidecarCommand},
};
use palisade_tests::{http_get, metric};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tokio::{io::AsyncWriteExt, net::TcpListener, sync::oneshot};

pub struct Ca {
    pub key: KeyPair,
    pub params: CertificateParams,
    pub pem: String,
}

pub fn ca(name: &str) -> Ca {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let pem = params.self_signed(&key).expect("self-sign").pem();
    Ca { key, params, pem }
}

pub struct Leaf {
    pub cert_pem: String,
    pub key: KeyPair,
}

pub fn leaf(ca: &Ca, identity: &str, not_before: SystemTime, not_after: SystemTime) -> Leaf {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.try_into().expect("ia5"))];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert_pem = params.signed_by(&key, &issuer).expect("sign").pem();
    Leaf { cert_pem, key }
}

pub fn fresh(ca: &Ca, identity: &str) -> Leaf {
    let now = SystemTime::now();
    leaf(
        ca,
        identity,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    )
}

pub fn write_dir(dir: &Path, leaf: &Leaf, bundle: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("tls.crt"), &leaf.cert_pem).expect("write");
    std::fs::write(dir.join("tls.key"), leaf.key.serialize_pem()).expect("write");
    std::fs::write(dir.join("ca.crt"), bundle).expect("write");
}

/// A sidecar running in this process.
pub struct Sidecar {
    pub admin: SocketAddr,
    pub inbound: Vec<SocketAddr>,
    pub outbound: Vec<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
}

impl Sidecar {
    /// Starts a sidecar in file mode on `cert_dir`.
    pub async fn start(cert_dir: &Path, args: &[&str]) -> Self {
        let dir = cert_dir.display().to_string();
        Self::start_with(&["--cert-dir", &dir], args).await
    }

    /// Starts a sidecar with `source` flags (file or control-plane mode) and `args`.
    pub async fn start_with(source: &[&str], args: &[&str]) -> Self {
        let mut argv = vec![
            "palisade-sidecar".to_owned(),
            "run".into(),
            "--transparent=false".into(),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--detect-timeout".into(),
            "1s".into(),
            "--handshake-timeout".into(),
            "2s".into(),
        ];
        argv.extend(source.iter().map(|a| (*a).to_owned()));
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        let SidecarCommand::Run(args) = Cli::try_parse_from(argv).expect("flags parse").command
        else {
            panic!("not the run command");
        };
        let app = App::build(args.into_config().expect("valid config"))
            .await
            .expect("sidecar builds");
        let (tx, rx) = oneshot::channel();
        let sidecar = Self {
            admin: app.admin_addr().expect("admin"),
            inbound: app.inbound_addrs().expect("inbound"),
            outbound: app.outbound_addrs().expect("outbound"),
            stop: Some(tx),
        };
        tokio::spawn(app.run(async {
            let _ = rx.await;
        }));
        sidecar
    }

    pub fn metrics(&self) -> String {
        let (status, body) = http_get(self.admin, "/metrics").expect("metrics");
        assert_eq!(status, 200);
        body
    }

    pub fn failures(&self, reason: &str) -> f64 {
        metric(
            &self.metrics(),
            "palisade_tls_handshakes_total",
            &[
                ("direction", "inbound"),
                ("result", "failure"),
                ("reason", reason),
            ],
        )
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An app that echoes every byte and half-closes when its client does.
pub async fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}
