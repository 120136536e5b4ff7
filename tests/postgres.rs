//! Keys in PostgreSQL shared by instances: revocations by `LISTEN/NOTIFY` across instances, through
//! a killed and a frozen listener connection, and rotation with a grace window, over loopback HTTP.
//! Needs `DATABASE_URL` (CI sets it); without it these tests are reported as ignored.
#![cfg(all(feature = "postgres", feature = "axum"))]

mod common;

use axum::routing::get;
use axum::Router;
use common::pg::{listener_pids, Schema};
use common::proxy::SilentProxy;
use http::StatusCode;
use keygate::cache::{CacheConfig, CachedVerifier};
use keygate::store::PostgresKeyStore;
use keygate::{ApiKeyLayer, KeyFacts, LocalVerifier, VerifiedKey};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// One instance: its own pool (its connections named `app`), cache and listener, served on
/// loopback. `GET /x` answers `grace` when the key presented is in its grace window, else `own`.
struct Instance {
    addr: SocketAddr,
    admin: LocalVerifier,
    store: PostgresKeyStore,
    app: String,
}

async fn instance(schema: &Schema, app: &str) -> Instance {
    let store = schema.store(app).await;
    let admin = LocalVerifier::new(store.clone());
    let cached = CachedVerifier::new(admin.clone(), CacheConfig::default());
    let cache = cached.clone();
    store.listen(move |revoked| cache.revoke(revoked));
    let handler = |key: VerifiedKey| async move {
        if key.grace_ends().is_some() {
            "grace"
        } else {
            "own"
        }
    };
    let router = Router::new().route("/x", get(handler)).layer(ApiKeyLayer::new(cached));
    let addr = common::serve_axum(router).await;
    let instance = Instance { addr, admin, store, app: app.to_owned() };
    instance.listening().await;
    instance
}

impl Instance {
    async fn call(&self, key: &str) -> (StatusCode, String) {
        let reply = common::fetch(self.addr, "/x", &[("x-api-key", key.as_bytes())]).await;
        (reply.status, reply.body)
    }

    /// Waits (bounded) until this instance's listener is connected; returns its backend's pid.
    async fn listening(&self) -> i32 {
        let started = Instant::now();
        loop {
            if let Some(pid) = listener_pids(&self.store, &self.app).await.first() {
                return *pid;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "{} never listened", self.app);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How long until this instance refuses `key` (bounded by `within`, then a failure).
    async fn refuses_within(&self, key: &str, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if self.call(key).await.0 == StatusCode::UNAUTHORIZED {
                return started.elapsed();
            }
            assert!(started.elapsed() < within, "{} still accepts the key after {within:?}", self.app);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// A backend process of ours stopped with SIGSTOP, continued when dropped (a failed test too).
struct Frozen(i32);

impl Frozen {
    fn stop(pid: i32) -> Self {
        assert!(std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

#[cfg_attr(not(keygate_database_url), ignore = "needs DATABASE_URL")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_the_other_instance_through_a_killed_and_a_frozen_listener() {
    let schema = Schema::new("revoke");
    let (one, two) = (instance(&schema, "kg-revoke-1").await, instance(&schema, "kg-revoke-2").await);
    let mut keys = Vec::new();
    for id in ["k1", "k2", "k3"] {
        let key = one.admin.create(KeyFacts::new(id)).await.unwrap().key;
        assert_eq!(two.call(key.expose_secret()).await.0, StatusCode::OK); // cached on instance 2
        keys.push(key);
    }
    let [k1, k2, k3] = [0, 1, 2].map(|i| keys[i].expose_secret());

    // Healthy: instance 2 hears of it within 100 ms.
    one.admin.disable("k1").await.unwrap();
    let took = two.refuses_within(k1, Duration::from_millis(100)).await;
    eprintln!("a revocation reached instance 2 in {took:?}");

    // The listener's connection killed, then a revocation at once: instance 2 still refuses
    // within 1 s (it listens again and forgets what it cached meanwhile).
    let killed = two.listening().await;
    let terminated: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(killed).fetch_one(one.store.pool()).await.unwrap();
    assert!(terminated);
    one.admin.disable("k2").await.unwrap();
    let took = two.refuses_within(k2, Duration::from_secs(1)).await;
    eprintln!("with the listener killed, a revocation reached instance 2 in {took:?}");

    // The listener's backend frozen (SIGSTOP: the connection stays open, nothing arrives): the
    // ping goes unanswered, the listener takes a new connection, and instance 2 refuses within
    // the ping's bound (2 s) plus a reconnect.
    let frozen = two.listening().await;
    assert_ne!(frozen, killed, "a new connection");
    // Listening again flushed the cache: cache k3 again, after the flush.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(two.call(k3).await.0, StatusCode::OK);
    let thaw = Frozen::stop(frozen);
    one.admin.disable("k3").await.unwrap();
    let took = two.refuses_within(k3, Duration::from_secs(3)).await;
    eprintln!("with the listener frozen, a revocation reached instance 2 in {took:?}");
    drop(thaw);

    // Recovered without a restart: the new connection carries revocations in 100 ms again.
    assert_eq!(two.call(k1).await.0, StatusCode::UNAUTHORIZED);
    one.admin.enable("k1").await.unwrap();
    let started = Instant::now();
    while two.call(k1).await.0 != StatusCode::OK {
        assert!(started.elapsed() < Duration::from_millis(100), "instance 2 never heard k1 was enabled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    one.admin.disable("k1").await.unwrap();
    let took = two.refuses_within(k1, Duration::from_millis(100)).await;
    eprintln!("after recovery, a revocation reached instance 2 in {took:?}");
}

#[cfg_attr(not(keygate_database_url), ignore = "needs DATABASE_URL")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_works_on_every_instance_until_its_grace_window_ends() {
    let schema = Schema::new("grace");
    let (one, two) = (instance(&schema, "kg-grace-1").await, instance(&schema, "kg-grace-2").await);
    let old = one.admin.create(KeyFacts::new("k")).await.unwrap().key;
    let old = old.expose_secret();
    for inst in [&one, &two] {
        assert_eq!(inst.call(old).await, (StatusCode::OK, "own".into())); // cached as the key itself
    }
    let new = one.admin.rotate("k", Duration::from_millis(1500)).await.unwrap();
    let rotated = Instant::now();
    let new = new.expose_secret();
    for inst in [&one, &two] {
        // Each instance learns of the rotation (the cached answer is revoked) and says "grace".
        let started = Instant::now();
        while inst.call(old).await != (StatusCode::OK, "grace".into()) {
            assert!(started.elapsed() < Duration::from_millis(500), "{} never saw the grace window", inst.app);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(inst.call(new).await, (StatusCode::OK, "own".into()));
    }
    // The window ends: the old key is refused everywhere, from the cache too, the new one works.
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(rotated.elapsed()) + Duration::from_millis(50)).await;
    for inst in [&one, &two] {
        assert_eq!(inst.call(old).await.0, StatusCode::UNAUTHORIZED, "{}", inst.app);
        assert_eq!(inst.call(new).await, (StatusCode::OK, "own".into()));
    }
}

#[cfg_attr(not(keygate_database_url), ignore = "needs DATABASE_URL")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_database_connection_gives_503_within_the_timeout_and_the_app_recovers_alone() {
    let schema = Schema::new("silent");
    let admin = LocalVerifier::new(schema.store("kg-silent-admin").await);
    // The app reaches PostgreSQL through a proxy whose open connections can go silent, on a pool of
    // one connection, so that no fresh connection steps in while the silent one holds the slot.
    let options = common::pg::options();
    let proxy = SilentProxy::start(options.get_port()).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy_with(options.port(proxy.port).application_name("kg-silent-app"));
    let store = PostgresKeyStore::new(pool).in_schema(&schema.name).unwrap().timeout(Duration::from_millis(300));
    let pool = store.pool().clone();
    let app = common::serve_axum(
        Router::new()
            .route("/x", get(|| async { "ok" }))
            .layer(ApiKeyLayer::new(CachedVerifier::new(LocalVerifier::new(store), CacheConfig::default()))),
    )
    .await;
    let call = |key: String| async move { common::fetch(app, "/x", &[("x-api-key", key.as_bytes())]).await.status };
    let mut keys = Vec::new();
    for i in 0..40 {
        keys.push(admin.create(KeyFacts::new(format!("k{i}"))).await.unwrap().key.expose_secret().to_owned());
    }
    assert_eq!(call(keys[0].clone()).await, StatusCode::OK); // the pool has a connection
    let cached = keys.remove(0);
    // Silence it while it waits in the pool (sqlx checks a connection with a round trip as it
    // takes it back, with no timeout: silenced then, it would hold the slot; see `held.rs`).
    let started = Instant::now();
    while pool.num_idle() == 0 {
        assert!(started.elapsed() < Duration::from_secs(2), "the connection never went back to the pool");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    eprintln!("connections opened before the silence: {}", proxy.opened());
    proxy.silence_open_connections();
    // A key not yet cached needs the database: no answer, so 503 (never a pass, never a 401)
    // within the store's timeout (plus a debug build's slack).
    let started = Instant::now();
    let status = call(keys[0].clone()).await;
    let took = started.elapsed();
    eprintln!("after the silence: {status} in {took:?}, connections opened: {}", proxy.opened());
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(took < Duration::from_millis(900), "the refusal took {took:?}");
    assert_eq!(call(cached.clone()).await, StatusCode::OK, "a cached key is not held up");

    // Recovery without a restart: new connections pass the proxy, and each key is answered again.
    let started = Instant::now();
    let mut answered = 0;
    for key in &keys[1..] {
        loop {
            match call(key.clone()).await {
                StatusCode::OK => break,
                StatusCode::SERVICE_UNAVAILABLE => {}
                other => panic!("a silent database gave {other}"),
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "not recovered after 10 s ({} connections opened)",
                proxy.opened()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        answered += 1;
    }
    eprintln!("recovered from a silent connection in {:?} ({answered} keys answered)", started.elapsed());
}

#[cfg_attr(not(keygate_database_url), ignore = "needs DATABASE_URL")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_connection_that_died_silently_never_takes_the_lookups_connections() {
    let schema = Schema::new("leak");
    let admin_store = schema.store("kg-leak-admin").await;
    let admin = LocalVerifier::new(admin_store.clone());
    // The instance's pool has two connections; its listener freezes twice. (`pg_stat_activity` is
    // read through the admin's pool.)
    let store = schema.store_with("kg-leak", 2).await;
    let cached = CachedVerifier::new(LocalVerifier::new(store.clone()), CacheConfig::default());
    let cache = cached.clone();
    store.listen(move |revoked| cache.revoke(revoked));
    let addr =
        common::serve_axum(Router::new().route("/x", get(|| async { "ok" })).layer(ApiKeyLayer::new(cached))).await;
    let inst = Instance { addr, admin: admin.clone(), store: admin_store, app: "kg-leak".into() };
    let mut frozen = Vec::new();
    for _ in 0..2 {
        let pid = inst.listening().await;
        frozen.push(Frozen::stop(pid));
        let started = Instant::now();
        while listener_pids(&inst.store, &inst.app).await.iter().all(|p| frozen.iter().any(|f| f.0 == *p)) {
            assert!(started.elapsed() < Duration::from_secs(4), "no new listener after a freeze");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Both frozen connections are still open; lookups still get connections of their own.
    for i in 0..5 {
        let key = admin.create(KeyFacts::new(format!("k{i}"))).await.unwrap().key;
        assert_eq!(inst.call(key.expose_secret()).await.0, StatusCode::OK, "lookup {i}");
    }
    drop(frozen);
}
