//! The kinds the stand-in serves: the built-in ones tests need, plus every
//! CRD created in it; and the discovery documents (`/api`, `/apis`,
//! `/api/v1`, `/apis/G/V`) that Helm and kube's discovery read.

use serde_json::{Value, json};

/// Built-in resources: (group, version, kind, plural, namespaced, has status).
const BUILT_IN: &[(&str, &str, &str, &str, bool, bool)] = &[
    ("", "v1", "Pod", "pods", true, true),
    ("", "v1", "Namespace", "namespaces", false, true),
    ("", "v1", "ConfigMap", "configmaps", true, false),
    ("", "v1", "Secret", "secrets", true, false),
    ("", "v1", "Service", "services", true, true),
    ("", "v1", "ServiceAccount", "serviceaccounts", true, false),
    ("", "v1", "Endpoints", "endpoints", true, false),
    ("", "v1", "Node", "nodes", false, true),
    ("", "v1", "Event", "events", true, false),
    ("apps", "v1", "Deployment", "deployments", true, true),
    ("apps", "v1", "DaemonSet", "daemonsets", true, true),
    ("apps", "v1", "StatefulSet", "statefulsets", true, true),
    ("apps", "v1", "ReplicaSet", "replicasets", true, true),
    (
        "admissionregistration.k8s.io",
        "v1",
        "MutatingWebhookConfiguration",
        "mutatingwebhookconfigurations",
        false,
        false,
    ),
    (
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingWebhookConfiguration",
        "validatingwebhookconfigurations",
        false,
        false,
    ),
    (
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
        true,
    ),
    (
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        true,
        false,
    ),
    ("coordination.k8s.io", "v1", "Lease", "leases", true, false),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "Role",
        "roles",
        true,
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        true,
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        false,
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
        false,
    ),
    (
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
        false,
    ),
    (
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        true,
        true,
    ),
];

/// TokenReviews are created and answered, never stored.
pub(crate) const TOKEN_REVIEWS: (&str, &str) = ("authentication.k8s.io", "tokenreviews");

/// One kind of object the stand-in serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResourceDef {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
    pub has_status: bool,
    /// Answered, not stored (TokenReview).
    pub virtual_only: bool,
}

/// Index of a [`ResourceDef`] in the [`Registry`]; kinds are never removed.
pub(crate) type ResourceId = usize;

/// Every kind the stand-in serves.
#[derive(Debug)]
pub(crate) struct Registry {
    defs: Vec<ResourceDef>,
}

// === impl ResourceDef ===

impl ResourceDef {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `mutatingwebhookconfigurations.admissionregistration.k8s.io`,
    /// as the real server names resources in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn singular(&self) -> String {
        self.kind.to_ascii_lowercase()
    }
}

// === impl Registry ===

impl Registry {
    pub fn built_in() -> Self {
        let mut defs: Vec<ResourceDef> = BUILT_IN
            .iter()
            .map(
                |&(group, version, kind, plural, namespaced, has_status)| ResourceDef {
                    group: group.to_owned(),
                    version: version.to_owned(),
                    kind: kind.to_owned(),
                    plural: plural.to_owned(),
                    namespaced,
                    has_status,
                    virtual_only: false,
                },
            )
            .collect();
        defs.push(ResourceDef {
            group: TOKEN_REVIEWS.0.to_owned(),
            version: "v1".to_owned(),
            kind: "TokenReview".to_owned(),
            plural: TOKEN_REVIEWS.1.to_owned(),
            namespaced: false,
            has_status: false,
            virtual_only: true,
        });
        Self { defs }
    }

    pub fn def(&self, id: ResourceId) -> &ResourceDef {
        &self.defs[id]
    }

    /// By group, version and plural, as in a request path.
    pub fn by_path(&self, group: &str, version: &str, plural: &str) -> Option<ResourceId> {
        self.defs
            .iter()
            .position(|d| d.group == group && d.version == version && d.plural == plural)
    }

    /// By apiVersion and kind, as in an object.
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<ResourceId> {
        self.defs
            .iter()
            .position(|d| d.api_version() == api_version && d.kind == kind)
    }

    /// By `plural` or `plural.group`.
    pub fn find(&self, name: &str) -> Option<ResourceId> {
        self.defs
            .iter()
            .position(|d| d.qualified() == name)
            .or_else(|| self.defs.iter().position(|d| d.plural == name))
    }

    /// Registers (or updates) the kind a CustomResourceDefinition defines;
    /// `None` when the definition lacks what a kind needs.
    pub fn register_crd(&mut self, crd: &Value) -> Option<ResourceId> {
        let spec = &crd["spec"];
        let group = spec["group"].as_str()?;
        let kind = spec["names"]["kind"].as_str()?;
        let plural = spec["names"]["plural"].as_str()?;
        let versions = spec["versions"].as_array()?;
        let version = versions
            .iter()
            .find(|v| v["storage"] == true)
            .or_else(|| versions.first())?["name"]
            .as_str()?;
        let def = ResourceDef {
            group: group.to_owned(),
            version: version.to_owned(),
            kind: kind.to_owned(),
            plural: plural.to_owned(),
            namespaced: spec["scope"] != "Cluster",
            has_status: versions
                .iter()
                .any(|v| v["subresources"]["status"].is_object()),
            virtual_only: false,
        };
        if let Some(id) = self
            .defs
            .iter()
            .position(|d| d.group == def.group && d.plural == def.plural)
        {
            self.defs[id] = def;
            return Some(id);
        }
        self.defs.push(def);
        Some(self.defs.len() - 1)
    }

    /// `/api`.
    pub fn core_versions(&self, server: &str) -> Value {
        json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}],
        })
    }

    /// `/apis`.
    pub fn group_list(&self) -> Value {
        let mut groups: Vec<(&str, &str)> = Vec::new();
        for d in self.defs.iter().filter(|d| !d.group.is_empty()) {
            if !groups.iter().any(|(g, _)| *g == d.group) {
                groups.push((&d.group, &d.version));
            }
        }
        let groups: Vec<Value> = groups
            .into_iter()
            .map(|(group, version)| {
                let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
                json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv})
            })
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `/api/v1` or `/apis/G/V`; `None` for a group version it does not serve.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let mut resources = Vec::new();
        for d in self
            .defs
            .iter()
            .filter(|d| d.group == group && d.version == version)
        {
            let verbs: &[&str] = if d.virtual_only {
                &["create"]
            } else {
                &[
                    "create",
                    "delete",
                    "deletecollection",
                    "get",
                    "list",
                    "patch",
                    "update",
                    "watch",
                ]
            };
            resources.push(json!({
                "name": d.plural, "singularName": d.singular(), "namespaced": d.namespaced,
                "kind": d.kind, "verbs": verbs,
            }));
            if d.has_status {
                resources.push(json!({
                    "name": format!("{}/status", d.plural), "singularName": "", "namespaced": d.namespaced,
                    "kind": d.kind, "verbs": ["get", "patch", "update"],
                }));
            }
            if d.plural == "pods" && d.group.is_empty() {
                resources.push(json!({
                    "name": "pods/proxy", "singularName": "", "namespaced": true, "kind": "PodProxyOptions",
                    "verbs": ["create", "delete", "get", "patch", "update"],
                }));
            }
        }
        if resources.is_empty() {
            return None;
        }
        let group_version = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        Some(json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": resources,
        }))
    }
}
