//! The control plane binary with `--authenticator kubernetes`, finding its API
//! server through KUBECONFIG like `kubectl` does, against an HTTPS server on
//! loopback (an independent one: Python's http.server) that answers
//! TokenReview like an API server.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
};

use palisade_proto::identity::v1::CertifyRequest;
use palisade_tests::{ControlPlane, bin, metric, require_tool};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, IsCa, Issuer, KeyPair, SanType,
};
use tonic::Code;

const IDENTITY: &str = "spiffe://cluster.local/ns/prod/sa/api";

const API_SERVER: &str = r#"
import http.server, json, ssl, sys
class TokenReview(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        review = json.loads(self.body())
        if self.path.split("?")[0] != "/apis/authentication.k8s.io/v1/tokenreviews":
            return self.reply(404, {})
        if self.headers.get("Authorization") != "Bearer control-plane-token":
            return self.reply(401, {})
        token, audiences = review["spec"]["token"], review["spec"].get("audiences", [])
        if token == "good-sa-token" and "palisade" in audiences:
            review["status"] = {"authenticated": True, "audiences": ["palisade"],
                                "user": {"username": "system:serviceaccount:prod:api"}}
        elif token == "other-audience-token":
            review["status"] = {"authenticated": False, "error": "token audiences [\"vault\"] is invalid for the target audiences [\"palisade\"]"}
        else:
            review["status"] = {"authenticated": False, "error": "invalid bearer token"}
        self.reply(201, review)
    def reply(self, code, document):
        body = json.dumps(document).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def body(self):
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TokenReview)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", server.server_address[1], flush=True)
server.serve_forever()
"#;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn request(token: &str, identity: &str) -> CertifyRequest {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.try_into().expect("ia5"))];
    CertifyRequest {
        identity: identity.into(),
        token: token.as_bytes().to_vec(),
        csr: params.serialize_request(&key).expect("csr").der().to_vec(),
        requested_lifetime: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_validates_service_account_tokens_through_kubeconfig() {
    require_tool("python3");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();

    // The fake API server's own CA and certificate.
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).expect("ca").pem();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let server = CertificateParams::new(vec!["127.0.0.1".into()]).expect("params");
    let server_pem = server
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .expect("sign")
        .pem();
    std::fs::write(d.join("api-ca.pem"), &ca_pem).expect("write");
    std::fs::write(d.join("api.pem"), server_pem).expect("write");
    std::fs::write(d.join("api.key"), key.serialize_pem()).expect("write");
    std::fs::write(d.join("api.py"), API_SERVER).expect("write");

    let mut api = Killed(
        Command::new("python3")
            .arg(d.join("api.py"))
            .arg(d.join("api.pem"))
            .arg(d.join("api.key"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs"),
    );
    let mut line = String::new();
    BufReader::new(api.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    let port: u16 = line
        .trim()
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the fake API server did not start: {line:?}"));

    let kubeconfig = d.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {}\n\
             users:\n- name: cp\n  user:\n    token: control-plane-token\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: cp\n",
            d.join("api-ca.pem").display()
        ),
    )
    .expect("kubeconfig");

    let status = Command::new(bin("palisade-control-plane"))
        .args(["ca", "init", "--out"])
        .arg(d.join("ca"))
        .stdout(Stdio::null())
        .status()
        .expect("ca init");
    assert!(status.success());
    let cp = ControlPlane::spawn(
        &d.join("ca"),
        &["--authenticator", "kubernetes", "--kube-timeout", "2s"],
        &[("KUBECONFIG", kubeconfig.as_path())],
        &[],
    )
    .expect("the control plane starts with the kubernetes authenticator");
    let mut client = cp.client().await.expect("client");

    let issued = client
        .certify(request("good-sa-token", IDENTITY))
        .await
        .expect("a valid service-account token is certified");
    assert!(!issued.into_inner().certificate.is_empty());

    for (token, identity, code, reason) in [
        (
            "stolen-or-garbage",
            IDENTITY,
            Code::Unauthenticated,
            "invalid_token",
        ),
        (
            "other-audience-token",
            IDENTITY,
            Code::Unauthenticated,
            "wrong_audience",
        ),
        (
            "good-sa-token",
            "spiffe://cluster.local/ns/prod/sa/admin",
            Code::PermissionDenied,
            "identity_mismatch",
        ),
    ] {
        let status = client
            .certify(request(token, identity))
            .await
            .expect_err(token);
        assert_eq!(status.code(), code, "{token}: {status:?}");
        assert!(
            status.message().starts_with(reason),
            "{token}: {:?}",
            status.message()
        );
        assert!(
            !status.message().contains(token),
            "the token leaks: {:?}",
            status.message()
        );
    }

    // The API server gone: UNAVAILABLE, so sidecars retry.
    drop(api);
    let status = client
        .certify(request("good-sa-token", IDENTITY))
        .await
        .expect_err("API server down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("authority_unavailable"),
        "{:?}",
        status.message()
    );
    assert_eq!(
        metric(
            &cp.metrics().expect("metrics"),
            "palisade_ca_authentication_failures_total",
            &[
                ("authenticator", "kubernetes"),
                ("reason", "authority_unavailable")
            ]
        ),
        1.0
    );
}
