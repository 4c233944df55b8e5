//! The policy resources, group `policy.palisade.io`: their Rust types are
//! the source of their CRDs (`palisade-control-plane crds` prints them; the
//! chart ships exactly that output, which a test checks).
//!
//! - [`InboundPolicy`] (namespaced): who may connect to the pods it selects,
//!   on which ports, in which mode; `enforce` or `audit`.
//! - [`IdentityDenyList`] (cluster-scoped): identities every sidecar refuses.
//!
//! The API server checks the schema (with CEL rules for what a schema alone
//! cannot say); the control plane checks again, since a CRD's validation can
//! be changed by whoever installs it ([`super::effective`]).

use std::collections::BTreeMap;

use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of the policy resources.
pub const GROUP: &str = "policy.palisade.io";

/// Who may connect to the pods it selects.
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema,
)]
#[kube(
    group = "policy.palisade.io",
    version = "v1alpha1",
    kind = "InboundPolicy",
    plural = "inboundpolicies",
    shortname = "ipol",
    namespaced,
    doc = "Who may connect to the meshed pods it selects, on which ports, in which inbound mode.",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode","description":"strict or permissive; empty: the mesh default"}"#,
    printcolumn = r#"{"name":"Default","type":"string","jsonPath":".spec.defaultAction","description":"allow or deny on ports without a rule; empty: the mesh default"}"#,
    printcolumn = r#"{"name":"Enforcement","type":"string","jsonPath":".spec.enforcement"}"#,
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".spec.podSelector.matchLabels","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct InboundPolicySpec {
    /// The pods of this namespace it applies to; empty selects every meshed pod of the namespace.
    #[serde(default)]
    pub pod_selector: PodSelector,
    /// The inbound mode of the selected pods: `strict` refuses whatever is not mesh TLS, `permissive` passes it to the app. Unset: the mesh default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// What happens on ports no rule covers. Unset: the mesh default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<Action>,
    /// Ports and the callers allowed on them. A port in a rule admits exactly the callers of the rules that name it.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub rules: Vec<Rule>,
    /// Ports the selected pods may take out of capture (annotation `palisade.io/exclude-inbound-ports`): an excluded port has no mTLS and no policy.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub excludable_ports: Vec<PortRef>,
    /// `enforce` refuses what the policy does not allow; `audit` only counts it (decision `audit_deny`).
    #[serde(default)]
    pub enforcement: Enforcement,
}

/// Identities refused by every sidecar of the mesh.
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema,
)]
#[kube(
    group = "policy.palisade.io",
    version = "v1alpha1",
    kind = "IdentityDenyList",
    plural = "identitydenylists",
    shortname = "denylist",
    doc = "Identities every sidecar refuses as callers, and whose open connections it closes, while their certificates are still valid.",
    printcolumn = r#"{"name":"Identities","type":"string","jsonPath":".spec.identities"}"#,
    printcolumn = r#"{"name":"Namespaces","type":"string","jsonPath":".spec.namespaces"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IdentityDenyListSpec {
    /// Exact SPIFFE IDs, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    #[serde(default)]
    #[schemars(
        length(max = 1024),
        inner(length(max = 2048), regex(pattern = r"^spiffe://"))
    )]
    pub identities: Vec<String>,
    /// Namespaces all of whose identities are refused.
    #[serde(default)]
    #[schemars(length(max = 1024), inner(length(min = 1, max = 63)))]
    pub namespaces: Vec<String>,
    /// Why, for the people reading it later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Labels a pod must have, as a Kubernetes label selector.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSelector {
    /// Each label must have exactly this value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Each expression must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelExpression>,
}

/// One condition on a label.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelExpression {
    pub key: String,
    pub operator: LabelOperator,
    /// For `In` and `NotIn`: the values; empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// How the expression tests its label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum LabelOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// Inbound mode.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Strict,
    Permissive,
}

/// What a port without a rule does.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// Whether a policy refuses or only counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    #[default]
    Enforce,
    Audit,
}

/// Ports and the callers allowed on them.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Port numbers or the names of the pod's container ports.
    #[schemars(length(min = 1, max = 64))]
    pub ports: Vec<PortRef>,
    /// The callers allowed; empty: nobody.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub allow: Vec<Caller>,
}

/// A port: a number, or the name of a container port of the pod.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u32),
    Name(String),
}

/// One allowed caller: exactly one of its fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.identity), has(self.namespace), has(self.serviceAccount)].filter(x, x).size() == 1",
    "message": "give exactly one of identity, namespace and serviceAccount",
}]))]
pub struct Caller {
    /// Exactly this SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^spiffe://"))]
    pub identity: Option<String>,
    /// Every identity of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// One service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ServiceAccountRef>,
}

/// A service account by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

// === impl PortRef ===

impl JsonSchema for PortRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortRef".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // A structural schema cannot say "integer or string" with anyOf;
        // Kubernetes has one marker for exactly this.
        schemars::json_schema!({
            "description": "A port number (1 to 65535) or the name of a container port.",
            "x-kubernetes-int-or-string": true,
            "x-kubernetes-validations": [{
                "rule": "type(self) == int ? (self >= 1 && self <= 65535) : self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self) <= 15",
                "message": "a port is a number from 1 to 65535 or a container port name (IANA_SVC_NAME)",
            }],
        })
    }
}

/// The chart's CRD file: both CRDs as YAML documents, kept on upgrade and
/// uninstall (deleting a CRD deletes every policy of the cluster).
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# Generated by `palisade-control-plane crds`; do not edit.\n\
         # A test checks that this file equals what the code generates.\n",
    );
    for mut crd in [InboundPolicy::crd(), IdentityDenyList::crd()] {
        crd.metadata.annotations = Some(BTreeMap::from([(
            "helm.sh/resource-policy".to_owned(),
            "keep".to_owned(),
        )]));
        crd.metadata.labels = Some(BTreeMap::from([(
            "app.kubernetes.io/part-of".to_owned(),
            "palisade".to_owned(),
        )]));
        out.push_str("---\n");
        // Serializing a type made of maps, strings and numbers cannot fail.
        let yaml = serde_saphyr::to_string(&crd).expect("a CRD serializes to YAML");
        out.push_str(&yaml);
        if !yaml.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}
