//! The injection webhook as the API server calls it: an AdmissionReview
//! POSTed over HTTPS trusting only the mesh's bundle, the answer's JSONPatch
//! applied to the pod, and the patched pods validated against the Kubernetes
//! 1.33 schemas with `kubernetes-validate --strict`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use serde_json::Value;

/// POSTs the review in the file `body` to `path` (`/inject`, `/enforce`)
/// of the webhook at `addr` like the API server: HTTPS verified against
/// `bundle`, for the name `localhost`. Returns the HTTP status and the
/// answer.
pub fn post(addr: SocketAddr, bundle: &Path, path: &str, body: &Path) -> Result<(u16, Value)> {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .arg("--cacert")
        .arg(bundle)
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", addr.port())])
        .args(["-H", "Content-Type: application/json", "--data-binary"])
        .arg(format!("@{}", body.display()))
        .args(["--write-out", "\n%{http_code}"])
        .arg(format!("https://localhost:{}{path}", addr.port()))
        .output()?;
    if !out.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    let (json, code) = text.rsplit_once('\n').context("status line")?;
    Ok((code.trim().parse()?, serde_json::from_str(json)?))
}

/// The pod of `request` (an AdmissionReview) with the patch of `answer`
/// applied, named as the API server names a `generateName` pod after
/// admission (the schema check wants a name).
pub fn patched(request: &Value, answer: &Value) -> Result<Value> {
    let patch = base64::engine::general_purpose::STANDARD.decode(
        answer["response"]["patch"]
            .as_str()
            .context("the patch is base64 text")?,
    )?;
    let patch: json_patch::Patch = serde_json::from_slice(&patch)?;
    let mut pod = request["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).context("the patch does not apply")?;
    if pod["metadata"]["name"].is_null() {
        let prefix = pod["metadata"]["generateName"].as_str().unwrap_or("pod-");
        pod["metadata"]["name"] = Value::String(format!("{prefix}x7k2p"));
    }
    Ok(pod)
}

/// `kubernetes-validate` from the test venv tests/run.sh makes.
fn kubernetes_validate() -> PathBuf {
    let venv = std::env::var_os("PALISADE_PYENV").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv"),
        PathBuf::from,
    );
    let tool = venv.join("bin/kubernetes-validate");
    assert!(
        tool.exists(),
        "this test needs {} (Python package kubernetes-validate); tests/run.sh installs it \
         into target/pyenv",
        tool.display()
    );
    tool
}

/// Writes each pod to `dir` and asserts that every one is a valid
/// Kubernetes 1.33 Pod, unknown fields refused.
pub fn assert_schema_valid(dir: &Path, pods: &[(&str, Value)]) -> Result<()> {
    let mut files = Vec::new();
    for (name, pod) in pods {
        let file = dir.join(format!("{name}.patched.json"));
        std::fs::write(&file, serde_json::to_vec_pretty(pod)?)?;
        files.push(file);
    }
    let out = Command::new(kubernetes_validate())
        .args(["--strict", "-k", "1.33.0"])
        .args(&files)
        .output()?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubernetes-validate refused a patched pod:\n{report}"
    );
    assert_eq!(report.matches("passed").count(), files.len(), "{report}");
    Ok(())
}

/// The container `name` of `pod`, among init containers and containers.
pub fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|field| pod["spec"][field].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {pod}"))
}

/// The environment of `container` as (name, value); a `valueFrom` as
/// `fieldRef:<path>`.
pub fn env_of(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("name").to_owned();
            let value = e["value"].as_str().map_or_else(
                || {
                    let path = e["valueFrom"]["fieldRef"]["fieldPath"]
                        .as_str()
                        .expect("a value or a fieldRef");
                    format!("fieldRef:{path}")
                },
                str::to_owned,
            );
            (name, value)
        })
        .collect()
}

/// The value of `name` in `env`.
pub fn env<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}
