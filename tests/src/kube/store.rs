//! The objects, their history and the write rules of the API server.
//!
//! One cluster-wide counter numbers every write (the resourceVersion, as
//! etcd's revision). History is a log of changes (before and after), kept
//! until [`Store::compact`]: it answers watches from any version since, and
//! lists of an exact version (`resourceVersionMatch=Exact`, `continue`) by
//! undoing the newer changes.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Map, Value, json};

use super::{
    State,
    resources::{ResourceDef, ResourceId},
    selector::{FieldSelector, LabelSelector},
};

/// Where an object lives: its kind, namespace (empty when cluster-scoped) and name.
pub(crate) type ObjectKey = (ResourceId, String, String);

/// History beyond this many changes is compacted, as etcd would.
const MAX_HISTORY: usize = 100_000;

/// The objects and their history.
#[derive(Debug, Default)]
pub(crate) struct Store {
    rv: u64,
    objects: BTreeMap<ObjectKey, Value>,
    /// Changes with a resourceVersion above `compacted`, oldest first.
    log: VecDeque<Change>,
    /// The oldest resourceVersion a watch may start from, or a list ask for.
    compacted: u64,
    next_uid: u64,
}

/// One write: the object before and after (`None`: absent).
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub key: ObjectKey,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

/// History that a request asked for is compacted.
#[derive(Debug)]
pub(crate) struct Compacted {
    pub asked: u64,
    pub oldest: u64,
}

/// A refusal, as the API server's `metav1.Status`.
#[derive(Clone, Debug)]
pub(crate) struct Status {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

/// How a write was asked for.
#[derive(Clone, Debug, Default)]
pub(crate) struct WriteOptions {
    /// `dryRun=All`: answer as if written, write nothing.
    pub dry_run: bool,
    /// `fieldManager`, recorded in `managedFields`.
    pub field_manager: Option<String>,
    /// Writes through the API obey namespace lifecycle; seeds do not.
    pub check_namespace: bool,
}

/// The patch types of `PATCH`, by Content-Type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatchKind {
    Json,
    Merge,
    Apply,
}

/// What a list asked for.
#[derive(Debug, Default)]
pub(crate) struct ListQuery {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub resource_version: Option<String>,
    pub version_match: Option<String>,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
}

// === impl Store ===

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, def: ResourceId, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(def, namespace.to_owned(), name.to_owned()))
    }

    /// Objects of `def` (in `namespace`, or all), by namespace and name.
    pub fn all(&self, def: ResourceId, namespace: Option<&str>) -> impl Iterator<Item = &Value> {
        self.objects
            .range((def, String::new(), String::new())..)
            .take_while(move |((d, _, _), _)| *d == def)
            .filter(move |((_, ns, _), _)| namespace.is_none_or(|want| want == ns))
            .map(|(_, v)| v)
    }

    /// Writes `after` (or deletes) under a new resourceVersion, which it
    /// stamps on the object; returns the object as stored (or as deleted,
    /// with the deletion's resourceVersion).
    pub fn commit(&mut self, key: ObjectKey, after: Option<Value>) -> Value {
        self.rv += 1;
        let rv = self.rv;
        let after = after.map(|mut object| {
            set_meta(&mut object, "resourceVersion", json!(rv.to_string()));
            object
        });
        let before = match &after {
            Some(object) => self.objects.insert(key.clone(), object.clone()),
            None => self.objects.remove(&key),
        };
        let answer = after.clone().unwrap_or_else(|| {
            let mut gone = before.clone().unwrap_or(Value::Null);
            set_meta(&mut gone, "resourceVersion", json!(rv.to_string()));
            gone
        });
        self.log.push_back(Change {
            rv,
            key,
            before,
            after,
        });
        if self.log.len() > MAX_HISTORY
            && let Some(oldest) = self.log.pop_front()
        {
            self.compacted = oldest.rv;
        }
        answer
    }

    /// Deletes at once; returns the object as it was.
    pub fn remove(&mut self, def: ResourceId, namespace: &str, name: &str) -> Option<Value> {
        let key = (def, namespace.to_owned(), name.to_owned());
        self.objects
            .contains_key(&key)
            .then(|| self.commit(key, None))
    }

    /// Moves the resourceVersion on (a write elsewhere in the cluster) and
    /// forgets every change up to it.
    pub fn compact(&mut self) {
        self.rv += 1;
        self.compacted = self.rv;
        self.log.clear();
    }

    /// Every change after `rv`, oldest first; `Err` when some are compacted.
    pub fn changes_after(&self, rv: u64) -> Result<impl Iterator<Item = &Change>, Compacted> {
        if rv < self.compacted {
            return Err(Compacted {
                asked: rv,
                oldest: self.compacted,
            });
        }
        Ok(self.log.iter().filter(move |c| c.rv > rv))
    }

    /// Objects of `def` as they were at `rv` (which must not be compacted).
    fn snapshot(&self, def: ResourceId, rv: u64) -> Result<BTreeMap<ObjectKey, Value>, Compacted> {
        if rv < self.compacted {
            return Err(Compacted {
                asked: rv,
                oldest: self.compacted,
            });
        }
        let mut objects: BTreeMap<ObjectKey, Value> = self
            .objects
            .range((def, String::new(), String::new())..)
            .take_while(|((d, _, _), _)| *d == def)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for change in self.log.iter().rev().take_while(|c| c.rv > rv) {
            if change.key.0 != def {
                continue;
            }
            match &change.before {
                Some(before) => objects.insert(change.key.clone(), before.clone()),
                None => objects.remove(&change.key),
            };
        }
        Ok(objects)
    }

    fn uid(&mut self) -> String {
        self.next_uid += 1;
        format!("5a4d1e00-0000-4000-8000-{:012x}", self.next_uid)
    }
}

// === impl State: the verbs ===

impl State {
    /// Stores `object` as a seed or a test's direct write: create or replace,
    /// no checks but that the kind is served.
    pub fn upsert(&mut self, mut object: Value) -> Result<Value, Status> {
        let id = self.kind_of(&object)?;
        if self.registry.def(id).plural == "customresourcedefinitions" {
            self.registry.register_crd(&object);
        }
        // A seed says what the object is, not which version it was.
        let deletion = object["metadata"]["deletionTimestamp"].clone();
        if let Some(meta) = object["metadata"].as_object_mut() {
            meta.remove("resourceVersion");
        }
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = name_of(&object)?;
        let def = self.registry.def(id);
        if def.namespaced && namespace.is_empty() {
            return Err(Status::invalid(format!(
                "{} {name:?} needs metadata.namespace",
                def.kind
            )));
        }
        let namespace = if def.namespaced {
            namespace
        } else {
            String::new()
        };
        match self.store.get(id, &namespace, &name).cloned() {
            Some(current) => {
                keep_identity(&mut object, &current);
                Ok(self.finish_update(id, &namespace, &name, object))
            }
            None => {
                let ns = (!namespace.is_empty()).then_some(namespace.as_str());
                let created = self.create(id, ns, object, &WriteOptions::default())?;
                if deletion.is_string() {
                    // A terminating namespace, say: stored as the seed has it.
                    let mut marked = created;
                    set_meta(&mut marked, "deletionTimestamp", deletion);
                    return Ok(self.store.commit((id, namespace, name), Some(marked)));
                }
                Ok(created)
            }
        }
    }

    pub fn get(&self, id: ResourceId, namespace: &str, name: &str) -> Result<Value, Status> {
        self.store
            .get(id, namespace, name)
            .cloned()
            .ok_or_else(|| Status::not_found(self.registry.def(id), name))
    }

    pub fn list(
        &self,
        id: ResourceId,
        namespace: Option<&str>,
        query: &ListQuery,
    ) -> Result<Value, Status> {
        let def = self.registry.def(id);
        let current = self.store.resource_version();
        // The version to list at (None: now) and where a continued page resumes.
        let (at, after): (Option<u64>, Option<(String, String)>) = if let Some(token) =
            &query.continue_token
        {
            let (rv, ns, name) = decode_continue(token)
                .ok_or_else(|| Status::bad_request(format!("invalid continue token {token:?}")))?;
            (Some(rv), Some((ns, name)))
        } else {
            let asked = match query.resource_version.as_deref() {
                None | Some("") => None,
                Some(text) => Some(parse_rv(text)?),
            };
            match (query.version_match.as_deref(), asked) {
                (Some(_), None) => {
                    return Err(Status::invalid(
                        "resourceVersionMatch is forbidden unless resourceVersion is provided"
                            .to_owned(),
                    ));
                }
                (Some("Exact"), Some(rv)) if rv > current => return Err(too_large(rv)),
                (Some("Exact"), Some(rv)) => (Some(rv), None),
                (Some("NotOlderThan") | None, Some(rv)) if rv > current => {
                    return Err(too_large(rv));
                }
                (Some("NotOlderThan") | None, _) => (None, None),
                (Some(other), _) => {
                    return Err(Status::invalid(format!(
                        "resourceVersionMatch: Unsupported value: {other:?}: supported values: \"Exact\", \"NotOlderThan\""
                    )));
                }
            }
        };
        let objects = match at {
            Some(rv) => self.store.snapshot(id, rv).map_err(|c| {
                if query.continue_token.is_some() {
                    Status::gone(
                        "The provided continue parameter is too old to display a consistent list \
                         result. You can start a new list without the continue parameter."
                            .to_owned(),
                    )
                } else {
                    Status::gone(format!(
                        "too old resource version: {} ({})",
                        c.asked, c.oldest
                    ))
                }
            })?,
            None => self
                .store
                .snapshot(id, current)
                .map_err(|_| Status::internal("the newest version is compacted"))?,
        };
        let list_rv = at.unwrap_or(current);
        let mut items = objects
            .into_iter()
            .filter(|((_, ns, _), _)| namespace.is_none_or(|want| want == ns))
            .filter(|((_, ns, name), _)| {
                after
                    .as_ref()
                    .is_none_or(|(a_ns, a_name)| (ns, name) > (a_ns, a_name))
            })
            .filter(|(_, v)| query.labels.matches(v) && query.fields.matches(v));
        let limit = query.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let page: Vec<(ObjectKey, Value)> = items.by_ref().take(limit).collect();
        let rest = items.count();
        let mut metadata = json!({"resourceVersion": list_rv.to_string()});
        if rest > 0
            && let Some(((_, ns, name), _)) = page.last()
        {
            metadata["continue"] = json!(encode_continue(list_rv, ns, name));
            if query.labels.is_empty() && query.fields.is_empty() {
                metadata["remainingItemCount"] = json!(rest);
            }
        }
        Ok(json!({
            "apiVersion": def.api_version(),
            "kind": format!("{}List", def.kind),
            "metadata": metadata,
            "items": page.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        }))
    }

    pub fn create(
        &mut self,
        id: ResourceId,
        namespace: Option<&str>,
        mut object: Value,
        options: &WriteOptions,
    ) -> Result<Value, Status> {
        let def = self.registry.def(id).clone();
        if !object.is_object() {
            return Err(Status::bad_request(
                "the body is not a JSON object".to_owned(),
            ));
        }
        check_type(&def, &mut object)?;
        let namespace = scope(&def, namespace, &mut object)?;
        if object["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|rv| !rv.is_empty())
        {
            return Err(Status::bad_request(
                "resourceVersion should not be set on objects to be created".to_owned(),
            ));
        }
        let name = match object["metadata"]["name"].as_str() {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => match object["metadata"]["generateName"].as_str() {
                Some(prefix) if !prefix.is_empty() => {
                    format!("{prefix}{}", suffix(self.store.next_uid + 1))
                }
                _ => {
                    return Err(Status::invalid(
                        "metadata.name: Required value: name or generateName is required"
                            .to_owned(),
                    ));
                }
            },
        };
        if options.check_namespace && def.namespaced {
            self.check_namespace(&namespace)?;
        }
        if self.store.get(id, &namespace, &name).is_some() {
            return Err(Status::already_exists(&def, &name));
        }
        let uid = self.store.uid();
        let meta = meta_mut(&mut object);
        meta.insert("name".into(), json!(name));
        meta.insert("uid".into(), json!(uid));
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.insert("generation".into(), json!(1));
        meta.remove("deletionTimestamp");
        if let Some(manager) = &options.field_manager {
            record_manager(&mut object, manager, "Update", &def.api_version());
        }
        if def.plural == "customresourcedefinitions" {
            self.registry.register_crd(&object).ok_or_else(|| {
                Status::invalid(
                    "the CustomResourceDefinition lacks group, names or versions".into(),
                )
            })?;
            let names = object["spec"]["names"].clone();
            object["status"] = json!({
                "acceptedNames": names,
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted"},
                ],
            });
        }
        if options.dry_run {
            return Ok(object);
        }
        Ok(self.store.commit((id, namespace, name), Some(object)))
    }

    /// PUT: replaces the object (or only its status, for `status`).
    pub fn update(
        &mut self,
        id: ResourceId,
        namespace: &str,
        name: &str,
        mut object: Value,
        status_only: bool,
        options: &WriteOptions,
    ) -> Result<Value, Status> {
        let def = self.registry.def(id).clone();
        let current = self.get(id, namespace, name)?;
        if !object.is_object() {
            return Err(Status::bad_request(
                "the body is not a JSON object".to_owned(),
            ));
        }
        check_type(&def, &mut object)?;
        if object["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n != name)
        {
            return Err(Status::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                object["metadata"]["name"].as_str().unwrap_or_default()
            )));
        }
        if let Some(rv) = object["metadata"]["resourceVersion"].as_str()
            && !rv.is_empty()
            && Some(rv) != current["metadata"]["resourceVersion"].as_str()
        {
            return Err(Status::conflict(&def, name));
        }
        if status_only {
            let mut replaced = current.clone();
            replaced["status"] = object["status"].take();
            object = replaced;
        }
        self.write_over(id, namespace, name, object, &current, options)
    }

    /// PATCH of any [`PatchKind`]; apply creates a missing object.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        id: ResourceId,
        namespace: &str,
        name: &str,
        kind: PatchKind,
        body: &[u8],
        status_only: bool,
        options: &WriteOptions,
    ) -> Result<Value, Status> {
        let def = self.registry.def(id).clone();
        let current = self.store.get(id, namespace, name).cloned();
        let patched = match kind {
            PatchKind::Json => {
                let current = current
                    .clone()
                    .ok_or_else(|| Status::not_found(&def, name))?;
                let patch: json_patch::Patch = serde_json::from_slice(body)
                    .map_err(|e| Status::bad_request(format!("invalid JSON patch: {e}")))?;
                let mut doc = current;
                json_patch::patch(&mut doc, &patch).map_err(|e| {
                    // What the real server answers when an operation, a `test`
                    // above all, fails (apiserver's patch handler).
                    Status {
                        code: 422,
                        reason: "Invalid",
                        message: "the server rejected our request due to an error in our request"
                            .to_owned(),
                        details: Some(json!({"causes": [{"reason": "UnexpectedServerResponse", "message": e.to_string()}]})),
                    }
                })?;
                doc
            }
            PatchKind::Merge => {
                let current = current
                    .clone()
                    .ok_or_else(|| Status::not_found(&def, name))?;
                let patch: Value = serde_json::from_slice(body)
                    .map_err(|e| Status::bad_request(format!("invalid merge patch: {e}")))?;
                let mut doc = current;
                json_patch::merge(&mut doc, &patch);
                doc
            }
            PatchKind::Apply => {
                let manager = options.field_manager.clone().ok_or_else(|| {
                    Status::invalid(
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: \
                         is required for apply patch"
                            .to_owned(),
                    )
                })?;
                let text = std::str::from_utf8(body)
                    .map_err(|_| Status::bad_request("the apply body is not UTF-8".to_owned()))?;
                let mut applied: Value = serde_saphyr::from_str(text)
                    .map_err(|e| Status::bad_request(format!("invalid apply body: {e}")))?;
                if !applied.is_object() {
                    return Err(Status::bad_request(
                        "the apply body is not an object".to_owned(),
                    ));
                }
                if applied["apiVersion"] != def.api_version().as_str()
                    || applied["kind"] != def.kind.as_str()
                {
                    return Err(Status::bad_request(format!(
                        "apply needs apiVersion {:?} and kind {:?}",
                        def.api_version(),
                        def.kind
                    )));
                }
                if applied["metadata"]["name"] != name {
                    return Err(Status::bad_request(format!(
                        "the name of the applied object does not match the name on the URL ({name})"
                    )));
                }
                if let Some(meta) = applied["metadata"].as_object_mut() {
                    meta.remove("managedFields");
                }
                let Some(current) = current.clone() else {
                    record_manager(&mut applied, &manager, "Apply", &def.api_version());
                    let ns = (!namespace.is_empty()).then_some(namespace);
                    let create = WriteOptions {
                        field_manager: None,
                        ..options.clone()
                    };
                    return self.create(id, ns, applied, &create);
                };
                let mut doc = current;
                json_patch::merge(&mut doc, &applied);
                record_manager(&mut doc, &manager, "Apply", &def.api_version());
                doc
            }
        };
        let Some(current) = current else {
            return Err(Status::not_found(&def, name));
        };
        if patched["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"]
            && kind != PatchKind::Apply
        {
            // A patch that sets resourceVersion asks for that version.
            return Err(Status::conflict(&def, name));
        }
        let object = if status_only {
            let mut replaced = current.clone();
            replaced["status"] = patched["status"].clone();
            replaced
        } else {
            patched
        };
        let options = WriteOptions {
            field_manager: options
                .field_manager
                .clone()
                .filter(|_| kind != PatchKind::Apply),
            ..options.clone()
        };
        self.write_over(id, namespace, name, object, &current, &options)
    }

    /// DELETE: at once, or marked for deletion while finalizers remain.
    pub fn delete(
        &mut self,
        id: ResourceId,
        namespace: &str,
        name: &str,
        preconditions: &Value,
        dry_run: bool,
    ) -> Result<Value, Status> {
        let def = self.registry.def(id).clone();
        let current = self.get(id, namespace, name)?;
        for field in ["uid", "resourceVersion"] {
            if let Some(want) = preconditions[field].as_str()
                && Some(want) != current["metadata"][field].as_str()
            {
                return Err(Status {
                    code: 409,
                    reason: "Conflict",
                    message: format!(
                        "Operation cannot be fulfilled on {} {name:?}: Precondition failed: {field}: {want}",
                        def.qualified()
                    ),
                    details: Some(json!({"name": name, "kind": def.plural})),
                });
            }
        }
        if dry_run {
            return Ok(current);
        }
        let finalizers = current["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if finalizers {
            if current["metadata"]["deletionTimestamp"].is_string() {
                return Ok(current);
            }
            let mut marked = current;
            set_meta(&mut marked, "deletionTimestamp", json!(now()));
            set_meta(&mut marked, "deletionGracePeriodSeconds", json!(0));
            return Ok(self
                .store
                .commit((id, namespace.to_owned(), name.to_owned()), Some(marked)));
        }
        if def.plural == "namespaces" && def.group.is_empty() {
            let contained: Vec<ObjectKey> = self
                .store
                .objects
                .keys()
                .filter(|(_, ns, _)| ns == name)
                .cloned()
                .collect();
            for key in contained {
                self.store.commit(key, None);
            }
        }
        Ok(self
            .store
            .commit((id, namespace.to_owned(), name.to_owned()), None))
    }

    /// DELETE of a collection: every object matching the selectors.
    pub fn delete_collection(
        &mut self,
        id: ResourceId,
        namespace: Option<&str>,
        query: &ListQuery,
    ) -> Result<Value, Status> {
        let def = self.registry.def(id).clone();
        let names: Vec<(String, String)> = self
            .store
            .all(id, namespace)
            .filter(|v| query.labels.matches(v) && query.fields.matches(v))
            .map(|v| {
                (
                    v["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    v["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect();
        let mut items = Vec::new();
        for (ns, name) in names {
            let ns = if def.namespaced { ns } else { String::new() };
            items.push(self.delete(id, &ns, &name, &Value::Null, false)?);
        }
        Ok(json!({
            "apiVersion": def.api_version(), "kind": format!("{}List", def.kind),
            "metadata": {"resourceVersion": self.store.resource_version().to_string()},
            "items": items,
        }))
    }

    /// Which stored kind an object is of, by its apiVersion and kind.
    fn kind_of(&self, object: &Value) -> Result<ResourceId, Status> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        self.registry
            .by_kind(api_version, kind)
            .filter(|id| !self.registry.def(*id).virtual_only)
            .ok_or_else(|| {
                Status::bad_request(format!(
                    "the stand-in serves no kind {kind:?} of {api_version:?}"
                ))
            })
    }

    /// Namespace lifecycle: no new objects in a missing or terminating namespace.
    fn check_namespace(&self, namespace: &str) -> Result<(), Status> {
        let id = self
            .registry
            .by_path("", "v1", "namespaces")
            .expect("namespaces are built in");
        let Some(ns) = self.store.get(id, "", namespace) else {
            return Err(Status::not_found(self.registry.def(id), namespace));
        };
        if ns["metadata"]["deletionTimestamp"].is_string() || ns["status"]["phase"] == "Terminating"
        {
            return Err(Status {
                code: 403,
                reason: "Forbidden",
                message: format!(
                    "unable to create new content in namespace {namespace} because it is being terminated"
                ),
                details: None,
            });
        }
        Ok(())
    }

    /// Writes `object` over `current`, keeping what clients cannot change.
    fn write_over(
        &mut self,
        id: ResourceId,
        namespace: &str,
        name: &str,
        mut object: Value,
        current: &Value,
        options: &WriteOptions,
    ) -> Result<Value, Status> {
        let def = self.registry.def(id).clone();
        keep_identity(&mut object, current);
        if let Some(manager) = &options.field_manager {
            record_manager(&mut object, manager, "Update", &def.api_version());
        }
        if def.plural == "customresourcedefinitions" {
            self.registry.register_crd(&object);
        }
        if options.dry_run {
            return Ok(object);
        }
        Ok(self.finish_update(id, namespace, name, object))
    }

    /// Commits an update; an object marked for deletion goes once its
    /// finalizers are gone.
    fn finish_update(
        &mut self,
        id: ResourceId,
        namespace: &str,
        name: &str,
        object: Value,
    ) -> Value {
        let key = (id, namespace.to_owned(), name.to_owned());
        let finalized = object["metadata"]["deletionTimestamp"].is_string()
            && object["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty());
        if finalized {
            return self.store.commit(key, None);
        }
        self.store.commit(key, Some(object))
    }
}

// === impl Status ===

impl Status {
    pub fn to_json(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }

    /// A status with the reason the real server gives `code`.
    pub fn of_code(code: u16, message: String) -> Self {
        Self {
            code,
            reason: reason_of(code),
            message,
            details: None,
        }
    }

    pub fn bad_request(message: String) -> Self {
        Self::of_code(400, message)
    }

    pub fn invalid(message: String) -> Self {
        Self::of_code(422, message)
    }

    pub fn internal(message: &str) -> Self {
        Self::of_code(500, message.to_owned())
    }

    pub fn gone(message: String) -> Self {
        Self::of_code(410, message)
    }

    pub fn not_found(def: &ResourceDef, name: &str) -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: format!("{} {name:?} not found", def.qualified()),
            details: Some(json!({"name": name, "group": def.group, "kind": def.plural})),
        }
    }

    pub fn already_exists(def: &ResourceDef, name: &str) -> Self {
        Self {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{} {name:?} already exists", def.qualified()),
            details: Some(json!({"name": name, "group": def.group, "kind": def.plural})),
        }
    }

    pub fn conflict(def: &ResourceDef, name: &str) -> Self {
        Self {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {} {name:?}: the object has been modified; \
                 please apply your changes to the latest version and try again",
                def.qualified()
            ),
            details: Some(json!({"name": name, "group": def.group, "kind": def.plural})),
        }
    }
}

/// The `reason` the real server gives a status code.
pub(crate) fn reason_of(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

fn too_large(rv: u64) -> Status {
    Status {
        code: 504,
        reason: "Timeout",
        message: format!("Too large resource version: {rv}"),
        details: Some(
            json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}),
        ),
    }
}

pub(crate) fn parse_rv(text: &str) -> Result<u64, Status> {
    text.parse().map_err(|_| {
        Status::invalid(format!(
            "resourceVersion: Invalid value: {text:?}: not a resource version"
        ))
    })
}

/// apiVersion and kind of a body must be the resource's (filled in when absent).
fn check_type(def: &ResourceDef, object: &mut Value) -> Result<(), Status> {
    for (field, want) in [
        ("apiVersion", def.api_version()),
        ("kind", def.kind.clone()),
    ] {
        match object[field].as_str() {
            None => object[field] = json!(want),
            Some(have) if have == want => {}
            Some(have) => {
                return Err(Status::bad_request(format!(
                    "the {field} in the data ({have}) does not match the expected {field} ({want})"
                )));
            }
        }
    }
    Ok(())
}

/// The namespace of a new object: the URL's, which the body must agree with.
fn scope(def: &ResourceDef, namespace: Option<&str>, object: &mut Value) -> Result<String, Status> {
    let meta = meta_mut(object);
    if !def.namespaced {
        meta.remove("namespace");
        return Ok(String::new());
    }
    let Some(namespace) = namespace else {
        return Err(Status::bad_request(format!(
            "{} are namespaced: create them under /namespaces/NAME/",
            def.plural
        )));
    };
    if let Some(body_ns) = meta.get("namespace").and_then(Value::as_str)
        && !body_ns.is_empty()
        && body_ns != namespace
    {
        return Err(Status::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request"
                .to_owned(),
        ));
    }
    meta.insert("namespace".into(), json!(namespace));
    Ok(namespace.to_owned())
}

fn name_of(object: &Value) -> Result<String, Status> {
    match object["metadata"]["name"].as_str() {
        Some(name) if !name.is_empty() => Ok(name.to_owned()),
        _ => Err(Status::invalid("metadata.name: Required value".to_owned())),
    }
}

/// Keeps uid, creation time and deletion mark of `current`; bumps
/// `generation` when anything but metadata and status changed.
fn keep_identity(object: &mut Value, current: &Value) {
    let spec_changed = {
        let strip = |v: &Value| {
            let mut v = v.clone();
            if let Some(map) = v.as_object_mut() {
                map.remove("metadata");
                map.remove("status");
            }
            v
        };
        strip(object) != strip(current)
    };
    let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
    let meta = meta_mut(object);
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "namespace",
        "name",
    ] {
        match current["metadata"].get(field) {
            Some(v) => meta.insert(field.into(), v.clone()),
            None => meta.remove(field),
        };
    }
    meta.insert(
        "generation".into(),
        json!(generation + i64::from(spec_changed)),
    );
}

/// Records `manager` in `managedFields` (one entry per manager and operation).
fn record_manager(object: &mut Value, manager: &str, operation: &str, api_version: &str) {
    let meta = meta_mut(object);
    let mut fields: Vec<Value> = meta
        .get("managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    fields.retain(|f| !(f["manager"] == manager && f["operation"] == operation));
    fields.push(json!({
        "manager": manager, "operation": operation, "apiVersion": api_version,
        "time": now(), "fieldsType": "FieldsV1", "fieldsV1": {},
    }));
    meta.insert("managedFields".into(), Value::Array(fields));
}

/// `metadata` as a map, made one if it is missing or not an object.
fn meta_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    object["metadata"]
        .as_object_mut()
        .expect("metadata was just made an object")
}

fn set_meta(object: &mut Value, field: &str, value: Value) {
    if object.is_object() {
        meta_mut(object).insert(field.into(), value);
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Five characters for `generateName`, from a counter.
fn suffix(n: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

fn encode_continue(rv: u64, namespace: &str, name: &str) -> String {
    use base64::Engine;
    let token = json!({"rv": rv, "ns": namespace, "name": name}).to_string();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
}

fn decode_continue(token: &str) -> Option<(u64, String, String)> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    Some((
        value["rv"].as_u64()?,
        value["ns"].as_str()?.to_owned(),
        value["name"].as_str()?.to_owned(),
    ))
}
