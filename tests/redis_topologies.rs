//! Redis as users run it, each started by the test on free loopback ports: a 3-master Cluster
//! (feature `redis-cluster`) and a Sentinel-managed primary with a forced failover (feature
//! `redis-sentinel`), and a TLS-only node (feature `redis-tls`). The same gate, through one
//! `RedisConnection` type. Built with all three features (as `cargo test --all-features` does).
#![cfg(all(feature = "redis-cluster", feature = "redis-sentinel", feature = "redis-tls"))]

mod common;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use keygate::limit::{RateLimit, RedisLimiter};
use keygate::{ApiKeyLayer, KeyFacts, LocalVerifier, RedisConnection, RoutePolicy, RouteTable};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tower::ServiceExt;

async fn call(app: &Router, path: &str, key: &str) -> StatusCode {
    let request = Request::get(path).header("x-api-key", key).body(Body::empty()).unwrap();
    app.clone().oneshot(request).await.unwrap().status()
}

/// An instance whose limits and usage live in Redis behind `conn`.
fn instance(conn: RedisConnection, verifier: &LocalVerifier, limit: Option<RateLimit>) -> Router {
    // Thousands of concurrent requests on a debug build queue up: these tests are about exact
    // counts, so they allow slow answers.
    let limiter = RedisLimiter::new(conn, "kgtopo").timeout(Duration::from_secs(5));
    let routes = RouteTable::new().route("/x", "x").route_with("/spend", "x", RoutePolicy::new().usage(1, None));
    let mut layer = ApiKeyLayer::builder(verifier.clone()).limiter(limiter).routes(routes);
    if let Some(limit) = limit {
        layer = layer.rate_limit(limit);
    }
    let app = Router::new().route("/x", get(|| async { "ok" })).route("/spend", get(|| async { "ok" }));
    app.layer(layer.build().unwrap())
}

/// `per_instance` concurrent requests at each instance, from one task per instance; the
/// statuses counted.
async fn storm(instances: &[Router], path: &'static str, key: &str, per_instance: usize) -> BTreeMap<u16, usize> {
    let mut tasks = tokio::task::JoinSet::new();
    for app in instances {
        let (app, key) = (app.clone(), key.to_owned());
        tasks.spawn(async move {
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..per_instance {
                let (app, key) = (app.clone(), key.clone());
                calls.spawn(async move { call(&app, path, &key).await });
            }
            calls.join_all().await
        });
    }
    let mut statuses = BTreeMap::new();
    for status in tasks.join_all().await.into_iter().flatten() {
        *statuses.entry(status.as_u16()).or_insert(0) += 1;
    }
    statuses
}

mod cluster {
    use super::*;
    use common::topology::OwnCluster;
    use keygate::cache::{CacheConfig, CachedVerifier};
    use keygate::store::RedisKeyStore;

    fn connect(cluster: &OwnCluster) -> RedisConnection {
        RedisConnection::cluster(redis::cluster::ClusterClient::new(cluster.urls()).unwrap())
    }

    /// 8 instances × 1 000 concurrent requests on a limit of 5 000 admit exactly 5 000, and the
    /// rest are 429s; then keys whose limits live on each of the 3 masters each admit exactly
    /// their limit. A balance of 1 000 credits is spent exactly once.
    #[cfg_attr(not(keygate_redis_server), ignore = "needs redis-server on PATH")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn limits_and_balances_are_exact_on_a_3_master_cluster() {
        let cluster = OwnCluster::start();
        let verifier = LocalVerifier::in_memory();
        let limit = RateLimit::per_minute("default", 5_000).unwrap();
        let instances: Vec<Router> =
            (0..8).map(|_| instance(connect(&cluster), &verifier, Some(limit.clone()))).collect();
        let key = verifier
            .create(KeyFacts::new("k").with_scopes(["x:*".parse().unwrap()]).with_usage_limit(1_000))
            .await
            .unwrap()
            .key;
        let key = key.expose_secret();
        // Running instances have their connections open (as after `RedisConnection::check`).
        let warm = verifier.create(KeyFacts::new("warm").with_scopes(["x:*".parse().unwrap()])).await.unwrap().key;
        for app in &instances {
            assert_eq!(call(app, "/x", warm.expose_secret()).await, StatusCode::OK);
        }

        let statuses = storm(&instances, "/x", key, 1_000).await;
        assert_eq!(statuses, BTreeMap::from([(200, 5_000), (429, 3_000)]));

        // Each master holds some key's limit: every key admits exactly its limit of 5 000? Too
        // slow three times over; a small limit per key shows the same.
        let mut per_node: [Option<String>; 3] = Default::default();
        for i in 0.. {
            let id = format!("spread{i}");
            let node = cluster.node_of(&format!("{{{id}}}"));
            per_node[node].get_or_insert(id);
            if per_node.iter().all(Option::is_some) {
                break;
            }
        }
        let small = RateLimit::per_minute("small", 7).unwrap();
        let spread: Vec<Router> = (0..8).map(|_| instance(connect(&cluster), &verifier, Some(small.clone()))).collect();
        for app in &spread {
            assert_ne!(call(app, "/x", warm.expose_secret()).await, StatusCode::SERVICE_UNAVAILABLE);
        }
        for id in per_node.into_iter().flatten() {
            let key =
                verifier.create(KeyFacts::new(id.as_str()).with_scopes(["x:*".parse().unwrap()])).await.unwrap().key;
            let statuses = storm(&spread, "/x", key.expose_secret(), 5).await;
            assert_eq!(statuses, BTreeMap::from([(200, 7), (429, 33)]), "key {id}");
        }

        let unlimited: Vec<Router> = (0..8).map(|_| instance(connect(&cluster), &verifier, None)).collect();
        for app in &unlimited {
            assert_eq!(call(app, "/x", warm.expose_secret()).await, StatusCode::OK);
        }
        let statuses = storm(&unlimited, "/spend", key, 200).await;
        assert_eq!(statuses.get(&200), Some(&1_000), "the balance of 1 000, spent once: {statuses:?}");
    }

    /// The key store on a cluster: create, disable and rotate (each one script, all its keys in
    /// one slot), and a revocation reaches another instance's cache within 100 ms.
    #[cfg_attr(not(keygate_redis_server), ignore = "needs redis-server on PATH")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_key_store_and_revocations_work_on_a_cluster() {
        let cluster = OwnCluster::start();
        let admin = LocalVerifier::new(RedisKeyStore::new(connect(&cluster), "kgstore"));
        let store = RedisKeyStore::new(connect(&cluster), "kgstore");
        let cached = CachedVerifier::new(LocalVerifier::new(store.clone()), CacheConfig::default());
        let cache = cached.clone();
        store.listen(move |revoked| cache.revoke(revoked));
        let app = Router::new().route("/x", get(|| async { "ok" })).layer(ApiKeyLayer::new(cached));
        tokio::time::sleep(Duration::from_millis(200)).await; // reading the stream

        let key = admin.create(KeyFacts::new("k")).await.unwrap().key;
        assert_eq!(call(&app, "/x", key.expose_secret()).await, StatusCode::OK); // cached now
        let disabled = Instant::now();
        admin.disable("k").await.unwrap();
        while call(&app, "/x", key.expose_secret()).await == StatusCode::OK {
            assert!(disabled.elapsed() < Duration::from_millis(100), "the revocation did not arrive");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        println!("revocation on a cluster: {:?}", disabled.elapsed());

        admin.enable("k").await.unwrap();
        let rotated = admin.rotate("k", std::time::Duration::ZERO).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(call(&app, "/x", key.expose_secret()).await, StatusCode::UNAUTHORIZED, "the old secret");
        assert_eq!(call(&app, "/x", rotated.expose_secret()).await, StatusCode::OK, "the new secret");
    }
}

mod sentinel {
    use super::*;
    use common::topology::{OwnSentinels, SERVICE};

    /// A forced failover under steady traffic: decisions resume on the new primary within 2 s of
    /// the sentinels naming it, and every request admitted is counted on the new primary —
    /// nothing admitted was written only to the demoted one.
    #[cfg_attr(not(keygate_redis_server), ignore = "needs redis-server on PATH")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn decisions_follow_a_sentinel_failover() {
        let topology = OwnSentinels::start();
        let verifier = LocalVerifier::in_memory();
        let key = verifier.create(KeyFacts::new("k")).await.unwrap().key.expose_secret().to_owned();
        let conn = RedisConnection::sentinel(topology.sentinel_urls(), SERVICE)
            .unwrap()
            .wait_for_replicas(1, Duration::from_millis(50));
        conn.check().await.unwrap(); // connected before the first request, as at an application's start
        let limiter = RedisLimiter::new(conn, "kgsentinel").timeout(Duration::from_millis(250));
        let layer = ApiKeyLayer::builder(verifier)
            .limiter(limiter)
            .rate_limit(RateLimit::per_minute("default", 1_000_000).unwrap())
            .build()
            .unwrap();
        let app = Router::new().route("/x", get(|| async { "ok" })).layer(layer);
        for _ in 0..20 {
            assert_eq!(call(&app, "/x", &key).await, StatusCode::OK);
        }

        let mut statuses = BTreeMap::new();
        topology.fail_over();
        let mut switched = None;
        let mut resumed = None;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            let status = call(&app, "/x", &key).await;
            *statuses.entry(status.as_u16()).or_insert(0) += 1;
            if switched.is_none() && topology.replica_is_primary() {
                switched = Some(Instant::now());
            }
            if let (Some(at), None, StatusCode::OK) = (switched, resumed, status) {
                resumed = Some(at.elapsed());
            }
            if resumed.is_some() && switched.is_some_and(|at| at.elapsed() > Duration::from_secs(1)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let resumed = resumed.expect("decisions resumed after the failover");
        println!("failover: decisions resumed {resumed:?} after the sentinels named the new primary; {statuses:?}");
        assert!(resumed < Duration::from_secs(2), "{resumed:?}");
        assert!(statuses.keys().all(|s| *s == 200 || *s == 503), "{statuses:?}");

        // The identity: admitted = counted on the new primary.
        let admitted = 20 + statuses.get(&200).copied().unwrap_or(0);
        let counter = "kgsentinel:{k}:rl:default:1000000:60000";
        let counted: usize = topology.replica.cli(&["GET", counter]).trim().parse().unwrap();
        assert_eq!(counted, admitted, "requests admitted but counted only on the demoted primary");
    }
}

mod tls {
    use super::*;
    use common::own_redis::{free_port, OwnRedis};
    use keygate::cache::{CacheConfig, CachedVerifier};
    use keygate::store::RedisKeyStore;
    use std::path::Path;
    use std::process::Command;

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl is installed");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A CA of the test's own and a certificate for 127.0.0.1 signed by it, in `dir`.
    fn certificates(dir: &Path) {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "1",
                "-subj",
                "/CN=keygate test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "1",
                "-extfile",
                "san.ext",
            ],
        );
    }

    /// A TLS-only Redis (`rediss://`, no plain port) with a private CA: limits and revocations
    /// work through it, and a client that does not trust the CA gets no connection, so `503`.
    #[cfg_attr(not(keygate_redis_server), ignore = "needs redis-server on PATH")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn limits_and_revocations_work_over_tls() {
        let dir = std::env::temp_dir().join(format!("keygate-tls-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        certificates(&dir);
        let port = free_port();
        let file = |name: &str| dir.join(name).to_str().unwrap().to_owned();
        let _own = OwnRedis::start_with(
            port,
            &[
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                &file("server.crt"),
                "--tls-key-file",
                &file("server.key"),
                "--tls-ca-cert-file",
                &file("ca.crt"),
                "--tls-auth-clients",
                "no",
            ],
        );
        let url = format!("rediss://127.0.0.1:{port}");
        let ca = std::fs::read(dir.join("ca.crt")).unwrap();
        let trusted = || {
            let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(ca.clone()) };
            RedisConnection::node(redis::Client::build_with_tls(url.as_str(), certs).unwrap())
        };
        trusted().check().await.unwrap();

        let verifier = LocalVerifier::in_memory();
        let key = verifier.create(KeyFacts::new("k").with_scopes(["x:*".parse().unwrap()])).await.unwrap().key;
        let app = instance(trusted(), &verifier, Some(RateLimit::per_minute("default", 2).unwrap()));
        let statuses: Vec<StatusCode> = [
            call(&app, "/x", key.expose_secret()).await,
            call(&app, "/x", key.expose_secret()).await,
            call(&app, "/x", key.expose_secret()).await,
        ]
        .into();
        assert_eq!(statuses, [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);

        let untrusted = instance(
            RedisConnection::open(&url).unwrap(),
            &verifier,
            Some(RateLimit::per_minute("default", 2).unwrap()),
        );
        assert_eq!(call(&untrusted, "/x", key.expose_secret()).await, StatusCode::SERVICE_UNAVAILABLE, "an unknown CA");

        let admin = LocalVerifier::new(RedisKeyStore::new(trusted(), "kgtls"));
        let store = RedisKeyStore::new(trusted(), "kgtls");
        let cached = CachedVerifier::new(LocalVerifier::new(store.clone()), CacheConfig::default());
        let cache = cached.clone();
        store.listen(move |revoked| cache.revoke(revoked));
        let gated = Router::new().route("/x", get(|| async { "ok" })).layer(ApiKeyLayer::new(cached));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let key = admin.create(KeyFacts::new("k")).await.unwrap().key;
        assert_eq!(call(&gated, "/x", key.expose_secret()).await, StatusCode::OK);
        admin.disable("k").await.unwrap();
        let disabled = Instant::now();
        while call(&gated, "/x", key.expose_secret()).await == StatusCode::OK {
            assert!(disabled.elapsed() < Duration::from_millis(100), "the revocation did not arrive over TLS");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
