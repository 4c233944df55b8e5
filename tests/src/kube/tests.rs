//! The stand-in against the clients the project uses: kube-rs's `Api`, its
//! runtime watcher and reflector, and raw requests where the real API
//! server's exact answer matters.

use std::{future::Future, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::{ConfigMap, Namespace},
};
use kube::{
    Api, Client,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
        PostParams, VersionMatch, WatchEvent, WatchParams,
    },
    runtime::{WatchStreamExt, reflector, watcher},
};
use serde_json::{Value, json};
use tokio::{io::AsyncWriteExt, net::TcpListener};

use super::*;

fn install_crypto_provider() {
    // Another test may have installed it already: either way aws-lc-rs is in place.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn configmap(ns: &str, name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": ns, "labels": labels}, "data": {"k": "v"}})
}

async fn started() -> (ApiServer, Client) {
    install_crypto_provider();
    let api = ApiServer::builder()
        .object(namespace("demo", json!({"palisade.io/inject": "enabled"})))
        .object(namespace("other", json!({})))
        .start()
        .await
        .expect("the stand-in starts");
    let client = api.client().expect("a client");
    (api, client)
}

/// Waits until `condition` holds, failing the test after `timeout`.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that shows a 429, 503 or 504 at once: kube 5 clients retry
/// those up to 15 times by default (exponential from 5 ms).
fn no_retry(api: &ApiServer) -> Client {
    let mut config = api.kube_config();
    config.default_retry = false;
    Client::try_from(config).expect("client")
}

fn names(reader: &reflector::Store<ConfigMap>) -> Vec<String> {
    let mut names: Vec<String> = reader
        .state()
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    names.sort();
    names
}

fn data_of(reader: &reflector::Store<ConfigMap>, name: &str) -> Option<String> {
    reader
        .state()
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(name))
        .and_then(|c| c.data.as_ref()?.get("k").cloned())
}

fn api_status(error: kube::Error) -> (u16, String) {
    match error {
        kube::Error::Api(status) => (status.code, status.reason),
        other => panic!("not an API status: {other:?}"),
    }
}

#[tokio::test]
async fn create_get_update_and_delete_answer_like_the_api_server() {
    let (api, client) = started().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "demo");
    let object: ConfigMap = serde_json::from_value(configmap("demo", "a", json!({}))).expect("cm");

    let created = maps
        .create(&PostParams::default(), &object)
        .await
        .expect("created");
    let rv = created
        .metadata
        .resource_version
        .clone()
        .expect("a resourceVersion");
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    let again = maps.create(&PostParams::default(), &object).await;
    assert_eq!(
        api_status(again.expect_err("exists")),
        (409, "AlreadyExists".into())
    );

    // A stale resourceVersion is a conflict; the current one wins.
    let mut stale = created.clone();
    stale.metadata.resource_version = Some("1".into());
    let conflict = maps.replace("a", &PostParams::default(), &stale).await;
    assert_eq!(
        api_status(conflict.expect_err("stale")),
        (409, "Conflict".into())
    );
    let mut current = created.clone();
    current.data = Some([("k".to_owned(), "w".to_owned())].into());
    let replaced = maps
        .replace("a", &PostParams::default(), &current)
        .await
        .expect("replaced");
    assert!(
        replaced
            .metadata
            .resource_version
            .expect("rv")
            .parse::<u64>()
            .expect("number")
            > rv.parse::<u64>().expect("number")
    );
    assert_eq!(replaced.metadata.uid, created.metadata.uid);

    // Namespace lifecycle: nothing new in a namespace that is not there.
    let elsewhere: Api<ConfigMap> = Api::namespaced(client.clone(), "missing");
    let mut stray = object.clone();
    stray.metadata.namespace = None;
    let refused = elsewhere.create(&PostParams::default(), &stray).await;
    assert_eq!(api_status(refused.expect_err("no namespace")).0, 404);

    maps.delete("a", &DeleteParams::default())
        .await
        .expect("deleted");
    assert_eq!(
        api_status(maps.get("a").await.expect_err("gone")),
        (404, "NotFound".into())
    );
    assert!(api.get("configmaps", Some("demo"), "a").is_none());

    // A finalizer keeps a deleted object, marked, until it is removed.
    let mut kept = object.clone();
    kept.metadata.finalizers = Some(vec!["palisade.io/test".into()]);
    maps.create(&PostParams::default(), &kept)
        .await
        .expect("created");
    maps.delete("a", &DeleteParams::default())
        .await
        .expect("marked");
    let marked = maps.get("a").await.expect("still there");
    assert!(marked.metadata.deletion_timestamp.is_some());
    let patch = json!({"metadata": {"finalizers": null}});
    maps.patch("a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("finalizer removed");
    assert_eq!(api_status(maps.get("a").await.expect_err("gone")).0, 404);
}

#[tokio::test]
async fn patches_json_merge_and_apply() {
    let (api, client) = started().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "demo");
    api.upsert(configmap("demo", "a", json!({})))
        .expect("seeded");

    let ok = json_patch::Patch(
        serde_json::from_value(json!([
            {"op": "test", "path": "/data/k", "value": "v"},
            {"op": "add", "path": "/data/n", "value": "1"},
        ]))
        .expect("ops"),
    );
    let patched = maps
        .patch("a", &PatchParams::default(), &Patch::Json::<()>(ok))
        .await
        .expect("patched");
    assert_eq!(patched.data.expect("data")["n"], "1");

    // A failed `test` is 422 Invalid, as the real server answers; nothing changes.
    let before = api.resource_version();
    let failing = json_patch::Patch(
        serde_json::from_value(json!([
            {"op": "test", "path": "/data/k", "value": "other"},
            {"op": "add", "path": "/data/n", "value": "2"},
        ]))
        .expect("ops"),
    );
    let refused = maps
        .patch("a", &PatchParams::default(), &Patch::Json::<()>(failing))
        .await;
    assert_eq!(
        api_status(refused.expect_err("test fails")),
        (422, "Invalid".into())
    );
    assert_eq!(api.resource_version(), before, "nothing was written");

    let merge = json!({"data": {"k": null, "m": "2"}});
    let merged = maps
        .patch("a", &PatchParams::default(), &Patch::Merge(&merge))
        .await
        .expect("merged");
    let data = merged.data.expect("data");
    assert!(!data.contains_key("k") && data["m"] == "2", "{data:?}");

    // Apply creates, then merges; the field manager is recorded.
    let applied = json!({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "b"}, "data": {"ca.crt": "pem"}});
    let params = PatchParams::apply("palisade-control-plane").force();
    maps.patch("b", &params, &Patch::Apply(&applied))
        .await
        .expect("created by apply");
    let applied = json!({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "b", "labels": {"x": "y"}}, "data": {"ca.crt": "pem2"}});
    let b = maps
        .patch("b", &params, &Patch::Apply(&applied))
        .await
        .expect("applied again");
    assert_eq!(b.data.expect("data")["ca.crt"], "pem2");
    let managers = b.metadata.managed_fields.expect("managed fields");
    assert_eq!(managers.len(), 1);
    assert_eq!(
        managers[0].manager.as_deref(),
        Some("palisade-control-plane")
    );
    assert_eq!(managers[0].operation.as_deref(), Some("Apply"));
    let apply = api
        .requests()
        .into_iter()
        .rfind(|r| r.method == "PATCH")
        .expect("recorded");
    assert_eq!(
        apply.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(
        apply.param("fieldManager").as_deref(),
        Some("palisade-control-plane")
    );
    assert_eq!(apply.param("force").as_deref(), Some("true"));
    assert_eq!(apply.json().expect("a body")["data"]["ca.crt"], "pem2");
}

#[tokio::test]
async fn lists_select_page_and_keep_resource_version_semantics() {
    let (api, client) = started().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let names = |list: kube::core::ObjectList<Namespace>| -> Vec<String> {
        list.items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect()
    };
    let by_label = |selector: &str| ListParams::default().labels(selector);
    let all = names(namespaces.list(&ListParams::default()).await.expect("list"));
    assert_eq!(all, ["demo", "other"]);
    for (selector, want) in [
        ("palisade.io/inject=enabled", &["demo"][..]),
        ("palisade.io/inject==enabled", &["demo"]),
        ("palisade.io/inject!=enabled", &["other"]),
        ("palisade.io/inject in (enabled,x)", &["demo"]),
        ("palisade.io/inject notin (enabled)", &["other"]),
        ("palisade.io/inject", &["demo"]),
        ("!palisade.io/inject", &["other"]),
    ] {
        let got = names(namespaces.list(&by_label(selector)).await.expect("list"));
        assert_eq!(got, want, "{selector}");
    }
    let by_name = ListParams::default().fields("metadata.name=other");
    assert_eq!(
        names(namespaces.list(&by_name).await.expect("list")),
        ["other"]
    );

    // Pages come from one version, even when the objects change meanwhile.
    for name in ["c1", "c2", "c3"] {
        api.upsert(configmap("demo", name, json!({})))
            .expect("seeded");
    }
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "demo");
    let first = maps
        .list(&ListParams::default().limit(2))
        .await
        .expect("page 1");
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("a continue token");
    assert_eq!(first.metadata.remaining_item_count, Some(1));
    api.remove("configmaps", Some("demo"), "c3")
        .expect("removed");
    let second = maps
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect("page 2");
    let second_names: Vec<_> = second
        .items
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    assert_eq!(second_names, ["c3"], "the page shows the list's version");
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );

    // Exact: the state at that version; compacted: 410 Expired.
    let at = first.metadata.resource_version.clone().expect("rv");
    let exact = ListParams::default().at(&at).matching(VersionMatch::Exact);
    assert_eq!(maps.list(&exact).await.expect("exact").items.len(), 3);
    api.compact();
    assert_eq!(
        api_status(maps.list(&exact).await.expect_err("compacted")),
        (410, "Expired".into())
    );
    let continued = maps
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await;
    assert_eq!(api_status(continued.expect_err("compacted")).0, 410);
    // A version from the future is too large (504), as the real server says.
    let maps: Api<ConfigMap> = Api::namespaced(no_retry(&api), "demo");
    let future = ListParams::default()
        .at("999999")
        .matching(VersionMatch::NotOlderThan);
    assert_eq!(
        api_status(maps.list(&future).await.expect_err("future")).0,
        504
    );
}

#[tokio::test]
async fn a_reflector_follows_every_change_and_relists_after_410() {
    let (api, client) = started().await;
    api.upsert(configmap("demo", "a", json!({})))
        .expect("seeded");
    api.upsert(configmap("demo", "b", json!({})))
        .expect("seeded");
    api.upsert(configmap("other", "elsewhere", json!({})))
        .expect("seeded");
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "demo");
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream =
        reflector(writer, watcher(maps.clone(), watcher::Config::default())).default_backoff();
    let task = tokio::spawn(stream.for_each(|_| std::future::ready(())));
    let sees = |want: &'static [&'static str], data: Option<&'static str>| {
        let reader = reader.clone();
        move || {
            let data_ok = data.is_none_or(|d| data_of(&reader, "a").as_deref() == Some(d));
            std::future::ready(names(&reader) == want && data_ok)
        }
    };
    let wait = Duration::from_secs(10);
    eventually("the initial list", wait, sees(&["a", "b"], None)).await;

    maps.create(
        &PostParams::default(),
        &serde_json::from_value(configmap("demo", "c", json!({}))).expect("cm"),
    )
    .await
    .expect("created");
    eventually("ADDED", wait, sees(&["a", "b", "c"], None)).await;
    let patch = json!({"data": {"k": "modified"}});
    maps.patch("a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patched");
    eventually("MODIFIED", wait, sees(&["a", "b", "c"], Some("modified"))).await;
    maps.delete("c", &DeleteParams::default())
        .await
        .expect("deleted");
    eventually("DELETED", wait, sees(&["a", "b"], None)).await;

    // While the watch is down, b goes, d comes, and history is compacted:
    // the watcher's version is gone, so it must relist to see the truth.
    api.inject(Fault::status(503, "watch refused for the test").on_watch(true));
    api.close_watches();
    eventually("the watch to be down", wait, || {
        std::future::ready(api.open_watches() == 0)
    })
    .await;
    api.remove("configmaps", Some("demo"), "b")
        .expect("removed");
    api.upsert(configmap("demo", "d", json!({})))
        .expect("seeded");
    api.compact();
    let lists_before = api
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && !r.is_watch())
        .count();
    api.clear_faults();
    eventually(
        "the relist after 410",
        Duration::from_secs(20),
        sees(&["a", "d"], None),
    )
    .await;
    let lists_after = api
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && !r.is_watch())
        .count();
    assert_eq!(lists_after, lists_before + 1, "exactly one relist");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.is_watch() && r.status == Some(503)),
        "the watch was refused meanwhile"
    );

    // And after expiry of an open watch, the in-stream 410, it relists too.
    api.upsert(configmap("demo", "e", json!({})))
        .expect("seeded");
    eventually("e", wait, sees(&["a", "d", "e"], None)).await;
    api.expire_watches();
    eventually("the relist after expiry", wait, || {
        let lists = api
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && !r.is_watch())
            .count();
        std::future::ready(lists == lists_after + 1)
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn streaming_lists_and_bookmarks() {
    let (api, client) = started().await;
    api.upsert(configmap("demo", "a", json!({})))
        .expect("seeded");
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "demo");

    // sendInitialEvents: ADDED for each object, then the initial-events-end bookmark.
    let (reader, writer) = reflector::store::<ConfigMap>();
    let config = watcher::Config::default().streaming_lists();
    let task = tokio::spawn(
        reflector(writer, watcher(maps.clone(), config))
            .default_backoff()
            .for_each(|_| std::future::ready(())),
    );
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
        .await
        .expect("the streaming list ends")
        .expect("the writer lives");
    assert_eq!(reader.state().len(), 1);
    task.abort();

    // A bookmark carries the newest version, after every change before it.
    let rv = api.resource_version().to_string();
    let mut events = maps
        .watch(
            &WatchParams {
                bookmarks: true,
                ..WatchParams::default()
            },
            &rv,
        )
        .await
        .expect("watching")
        .boxed();
    api.upsert(configmap("demo", "b", json!({})))
        .expect("seeded");
    api.upsert(configmap("other", "c", json!({})))
        .expect("seeded");
    api.bookmark();
    let next = tokio::time::timeout(Duration::from_secs(5), events.next());
    match next
        .await
        .expect("an event")
        .expect("open")
        .expect("decoded")
    {
        WatchEvent::Added(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("b")),
        other => panic!("{other:?}"),
    }
    let next = tokio::time::timeout(Duration::from_secs(5), events.next());
    match next
        .await
        .expect("an event")
        .expect("open")
        .expect("decoded")
    {
        WatchEvent::Bookmark(bookmark) => assert_eq!(
            bookmark.metadata.resource_version,
            api.resource_version().to_string(),
            "the other namespace's write moved the version too"
        ),
        other => panic!("{other:?}"),
    }

    // A watch from a compacted version: the ERROR event form by default...
    api.compact();
    let mut old = maps
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("the watch opens")
        .boxed();
    match old.next().await.expect("an event").expect("decoded") {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("{other:?}"),
    }
    // ...and the HTTP form when asked for.
    let strict = ApiServer::builder()
        .gone_form(GoneForm::Http)
        .start()
        .await
        .expect("starts");
    strict.compact();
    strict.compact();
    let maps: Api<ConfigMap> = Api::namespaced(strict.client().expect("client"), "demo");
    let refused = maps.watch(&WatchParams::default(), "0").await;
    assert!(refused.is_ok(), "version 0 is never too old");
    let refused = maps.watch(&WatchParams::default(), "1").await;
    assert_eq!(
        api_status(refused.err().expect("410")),
        (410, "Expired".into())
    );
}

#[tokio::test]
async fn token_reviews_answer_as_scripted_and_count_concurrency() {
    let (api, client) = started().await;
    api.script_token(
        "sa",
        TokenAnswer::service_account("prod", "api", &["palisade"]),
    );
    api.script_token(
        "slow",
        TokenAnswer::service_account("prod", "api", &["palisade"])
            .delayed(Duration::from_millis(300)),
    );
    api.script_token("refused", TokenAnswer::fail(403));
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = |token: &str, audiences: &[&str]| TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
        },
        ..TokenReview::default()
    };
    let ok = reviews
        .create(&PostParams::default(), &review("sa", &["palisade"]))
        .await
        .expect("answered")
        .status
        .expect("a status");
    assert_eq!(ok.authenticated, Some(true));
    assert_eq!(
        ok.user.and_then(|u| u.username).as_deref(),
        Some("system:serviceaccount:prod:api")
    );
    assert_eq!(ok.audiences, Some(vec!["palisade".to_owned()]));

    // The token's audiences decide, as in the real server.
    let other = reviews
        .create(&PostParams::default(), &review("sa", &["vault"]))
        .await
        .expect("answered")
        .status
        .expect("a status");
    assert_eq!(other.authenticated, Some(false));
    assert!(other.error.unwrap_or_default().contains("audiences"));
    let unknown = reviews
        .create(&PostParams::default(), &review("nobody", &["palisade"]))
        .await
        .expect("answered")
        .status
        .expect("a status");
    assert_eq!(unknown.authenticated, Some(false));
    let refused = reviews
        .create(&PostParams::default(), &review("refused", &[]))
        .await;
    assert_eq!(api_status(refused.expect_err("403")).0, 403);

    let calls = (0..4).map(|_| {
        let reviews = reviews.clone();
        let review = review("slow", &["palisade"]);
        async move { reviews.create(&PostParams::default(), &review).await }
    });
    for answer in futures::future::join_all(calls).await {
        assert_eq!(
            answer
                .expect("answered")
                .status
                .expect("status")
                .authenticated,
            Some(true)
        );
    }
    assert_eq!(api.token_reviews_max_in_flight(), 4);
    let seen = api.token_reviews();
    assert_eq!(seen.len(), 8);
    assert_eq!(
        seen[1],
        ReviewSeen {
            token: "sa".into(),
            audiences: vec!["vault".into()]
        }
    );

    // A client without the stand-in's token is 401.
    let mut config = api.kube_config();
    config.auth_info.token = Some("wrong".to_owned().into());
    let stranger: Api<TokenReview> = Api::all(Client::try_from(config).expect("client"));
    let refused = stranger
        .create(&PostParams::default(), &review("sa", &["palisade"]))
        .await;
    assert_eq!(api_status(refused.expect_err("401")).0, 401);
}

#[tokio::test]
async fn faults_refuse_close_and_hang() {
    let (api, client) = started().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    api.inject(Fault::status(403, "no").on_writes().times(1));
    let created: Namespace = serde_json::from_value(namespace("x", json!({}))).expect("ns");
    let refused = namespaces.create(&PostParams::default(), &created).await;
    assert_eq!(
        api_status(refused.expect_err("403")),
        (403, "Forbidden".into())
    );
    namespaces
        .list(&ListParams::default())
        .await
        .expect("reads are not refused");
    namespaces
        .create(&PostParams::default(), &created)
        .await
        .expect("the fault is spent");

    api.inject(Fault::raw(200, "text/html", "<html>hello</html>").times(1));
    let page = namespaces.get("x").await;
    assert!(matches!(page, Err(kube::Error::SerdeError(_))), "{page:?}");

    api.inject(Fault::close().times(1));
    assert!(namespaces.get("x").await.is_err());

    api.inject(Fault::hang().times(1));
    let hung = tokio::time::timeout(Duration::from_millis(300), namespaces.get("x")).await;
    assert!(hung.is_err(), "a hung request never answers");
    let statuses: Vec<Option<u16>> = api.requests().iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [Some(403), Some(200), Some(201), Some(200), None, None],
        "the record shows what each got"
    );
}

#[tokio::test]
async fn the_pod_proxy_forwards_to_the_registered_address() {
    let (api, client) = started().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(std::sync::Mutex::new(String::new()));
    let backend_seen = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let seen = backend_seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut buf)
                    .await
                    .unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                *seen.lock().expect("lock") = head;
                let _ = tcp
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nready",
                    )
                    .await;
            });
        }
    });
    api.upsert(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "demo"}}))
        .expect("pod");
    api.proxy_pod("demo", "web", 15020, addr);

    let get = |path: &str| {
        http::Request::get(path)
            .body(Vec::new())
            .expect("a request")
    };
    let answer = client
        .request_text(get(
            "/api/v1/namespaces/demo/pods/web:15020/proxy/ready?verbose=1",
        ))
        .await
        .expect("proxied");
    assert_eq!(answer, "ready");
    let head = seen.lock().expect("lock").clone();
    assert!(head.starts_with("GET /ready?verbose=1 HTTP/1.1"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("authorization"),
        "{head}"
    );

    let missing = client
        .request_text(get("/api/v1/namespaces/demo/pods/nope:15020/proxy/ready"))
        .await;
    assert_eq!(api_status(missing.expect_err("no pod")).0, 404);
    let unregistered = no_retry(&api)
        .request_text(get("/api/v1/namespaces/demo/pods/web:9999/proxy/ready"))
        .await;
    assert_eq!(api_status(unregistered.expect_err("no address")).0, 503);
}

#[tokio::test]
async fn crds_add_kinds_and_discovery_lists_them() {
    let (api, client) = started().await;
    api.upsert(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "policies.policy.palisade.io"},
        "spec": {"group": "policy.palisade.io", "scope": "Namespaced",
                 "names": {"kind": "Policy", "plural": "policies", "singular": "policy"},
                 "versions": [{"name": "v1alpha1", "served": true, "storage": true}]},
    }))
    .expect("a CRD");
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy.palisade.io", "v1alpha1", "Policy"),
        "policies",
    );
    let policies: Api<DynamicObject> = Api::namespaced_with(client.clone(), "demo", &resource);
    let mut policy = DynamicObject::new("allow-web", &resource);
    policy.data = json!({"spec": {"allow": ["spiffe://cluster.local/ns/demo/sa/web"]}});
    policies
        .create(&PostParams::default(), &policy)
        .await
        .expect("a custom object");
    let listed = policies.list(&ListParams::default()).await.expect("listed");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(
        listed.items[0].data["spec"]["allow"][0],
        "spiffe://cluster.local/ns/demo/sa/web"
    );

    let groups = client.list_api_groups().await.expect("discovery");
    assert!(groups.groups.iter().any(|g| g.name == "policy.palisade.io"));
    let resources = client
        .list_api_group_resources("policy.palisade.io/v1alpha1")
        .await
        .expect("discovery");
    assert_eq!(resources.resources[0].name, "policies");
}

#[tokio::test]
async fn the_kubeconfig_file_reaches_it() {
    let (api, _) = started().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path, Some("demo")).expect("written");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("a kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("a client config");
    assert_eq!(config.default_namespace, "demo");
    let client = Client::try_from(config).expect("client");
    let maps: Api<ConfigMap> = Api::default_namespaced(client);
    assert!(
        maps.list(&ListParams::default())
            .await
            .expect("listed")
            .items
            .is_empty()
    );
    assert_eq!(
        api.requests()[0].authorization.as_deref(),
        Some(format!("Bearer {DEFAULT_CLIENT_TOKEN}").as_str())
    );
    api.shutdown().await;
}
