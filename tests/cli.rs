//! The `keygate` binary, run as a user would, against a TOML key file and PostgreSQL, with the
//! keys it makes used over loopback HTTP by a quickstart-style app: create, use, rotate with a
//! grace window (both keys work, the old one says so), the window ends (the old key is refused).
#![cfg(all(feature = "cli", feature = "axum"))]

mod common;

use assert_cmd::Command;
use axum::routing::get;
use axum::Router;
use http::StatusCode;
use keygate::{ApiKeyLayer, KeyDigest, KeyFormat, LocalVerifier, VerifiedKey};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn keygate(store: &str, args: &[&str]) -> assert_cmd::assert::Assert {
    Command::cargo_bin("keygate").unwrap().env_remove("KEYGATE_STORE").args(["--store", store]).args(args).assert()
}

fn stdout(assert: &assert_cmd::assert::Assert) -> String {
    String::from_utf8(assert.get_output().stdout.clone()).unwrap()
}

/// The quickstart's shape: a verifier, the layer, a route that says whether the key presented is
/// in its grace window.
async fn serve(verifier: impl keygate::Verifier) -> SocketAddr {
    let gate = ApiKeyLayer::builder(verifier).key_format(KeyFormat::Any).build().unwrap();
    let handler = |key: VerifiedKey| async move {
        if key.grace_ends().is_some() {
            "grace"
        } else {
            "own"
        }
    };
    common::serve_axum(Router::new().route("/v1/items", get(handler)).layer(gate)).await
}

async fn call(addr: SocketAddr, key: &str) -> (StatusCode, String) {
    let reply = common::fetch(addr, "/v1/items", &[("x-api-key", key.as_bytes())]).await;
    (reply.status, reply.body)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_create_use_rotate_with_grace_and_the_old_key_stops() {
    let dir = std::env::temp_dir().join(format!("keygate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys.toml");
    let store = file.to_str().unwrap();

    let created =
        keygate(store, &["--json", "keys", "create", "--id", "ci", "--scope", "items:read", "--customer", "cus_1"])
            .success();
    let old = json(&stdout(&created))["key"].as_str().unwrap().to_owned();
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains(&old) && text.contains(&KeyDigest::of(&old).to_string()), "the file holds the digest only");

    let app = serve(LocalVerifier::from_key_file(&file).unwrap()).await;
    assert_eq!(call(app, &old).await, (StatusCode::OK, "own".into()));

    let rotated = keygate(store, &["--json", "keys", "rotate", "ci", "--grace", "2s"]).success();
    let new = json(&stdout(&rotated))["key"].as_str().unwrap().to_owned();
    let rotated_at = Instant::now();
    // The app reads the file again (a restart).
    let app = serve(LocalVerifier::from_key_file(&file).unwrap()).await;
    assert_eq!(call(app, &old).await, (StatusCode::OK, "grace".into()));
    assert_eq!(call(app, &new).await, (StatusCode::OK, "own".into()));

    // Listing shows the key and its window, never a secret or a digest.
    let listed = stdout(&keygate(store, &["--json", "keys", "list"]).success());
    assert!(!listed.contains(&old) && !listed.contains(&new) && !listed.contains("sha256:"), "{listed}");
    let listed = json(&listed);
    assert_eq!((listed[0]["id"].as_str(), listed[0]["status"].as_str()), (Some("ci"), Some("VALID")));
    assert_eq!(listed[0]["grace"].as_array().unwrap().len(), 1);

    tokio::time::sleep(Duration::from_secs(2).saturating_sub(rotated_at.elapsed()) + Duration::from_millis(100)).await;
    assert_eq!(call(app, &old).await.0, StatusCode::UNAUTHORIZED, "the grace window ended; no restart needed");
    assert_eq!(call(app, &new).await, (StatusCode::OK, "own".into()));

    keygate(store, &["keys", "disable", "ci"]).success();
    let app = serve(LocalVerifier::from_key_file(&file).unwrap()).await;
    assert_eq!(call(app, &new).await.0, StatusCode::UNAUTHORIZED);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_have_their_exit_codes_and_keys_come_only_from_stdin() {
    let dir = std::env::temp_dir().join(format!("keygate-cli-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys.toml");
    let store = file.to_str().unwrap();
    Command::cargo_bin("keygate").unwrap().env_remove("KEYGATE_STORE").args(["keys", "list"]).assert().code(2);
    keygate(store, &["keys", "show", "nobody"]).code(3);
    keygate(store, &["keys", "create", "--id", "k"]).success();
    keygate(store, &["keys", "create", "--id", "k"]).code(4);
    keygate(store, &["keys", "create", "--id", "x", "--scope", "items:fly"]).code(2);
    keygate(store, &["keys", "rotate", "k", "--grace", "soon"]).code(2);
    // Numbers past what a duration holds are usage errors, not panics.
    keygate(store, &["keys", "rotate", "k", "--grace", "99999999999999999d"]).code(2);
    keygate(store, &["keys", "rotate", "k", "--grace", "367d"]).code(2);
    keygate(store, &["keys", "create", "--id", "y", "--expires-in", "99999999999999999d"]).code(2);
    keygate(store, &["migrate"]).code(2);
    keygate("mongodb://x", &["keys", "list"]).code(2);
    // `digest` reads the key on stdin (never an argument, which shell history would keep).
    let out = Command::cargo_bin("keygate").unwrap().arg("digest").write_stdin("kg_example\n").assert().success();
    assert_eq!(stdout(&out).trim(), KeyDigest::of("kg_example").to_string());
    Command::cargo_bin("keygate").unwrap().arg("digest").write_stdin("").assert().code(2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(feature = "postgres")]
#[cfg_attr(not(keygate_database_url), ignore = "needs DATABASE_URL")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_create_use_rotate_with_grace_and_revoke_across_the_running_app() {
    use keygate::cache::{CacheConfig, CachedVerifier};
    let schema = common::pg::Schema::new("cli");
    // The CLI gets the same connection settings the tests use (a URL without a user means the OS one).
    let options = common::pg::options();
    let url = format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("test")
    );
    let cli = |args: &[&str]| keygate(&url, &[&["--schema", &schema.name], args].concat());

    // Before `migrate`, a clear failure; after, the app runs.
    cli(&["keys", "list"]).code(1);
    cli(&["migrate"]).success();
    cli(&["migrate"]).success(); // again: nothing to do
    let created = cli(&["--json", "keys", "create", "--id", "ci", "--customer", "cus_1"]).success();
    let old = json(&stdout(&created))["key"].as_str().unwrap().to_owned();

    let store = schema.store("kg-cli-app").await;
    let cached = CachedVerifier::new(LocalVerifier::new(store.clone()), CacheConfig::default());
    let cache = cached.clone();
    store.listen(move |revoked| cache.revoke(revoked));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let app = serve(cached).await;
    assert_eq!(call(app, &old).await, (StatusCode::OK, "own".into()));

    // Rotated by the CLI while the app runs: no restart, both keys work, the old one says so.
    let rotated = cli(&["--json", "keys", "rotate", "ci", "--grace", "2s"]).success();
    let new = json(&stdout(&rotated))["key"].as_str().unwrap().to_owned();
    let rotated_at = Instant::now();
    let started = Instant::now();
    while call(app, &old).await != (StatusCode::OK, "grace".into()) {
        assert!(started.elapsed() < Duration::from_millis(500), "the app never heard of the rotation");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(call(app, &new).await, (StatusCode::OK, "own".into()));
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(rotated_at.elapsed()) + Duration::from_millis(100)).await;
    assert_eq!(call(app, &old).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(app, &new).await, (StatusCode::OK, "own".into()));

    // Disabled by the CLI: the running app refuses within 100 ms.
    cli(&["keys", "disable", "ci"]).success();
    let started = Instant::now();
    while call(app, &new).await.0 != StatusCode::UNAUTHORIZED {
        assert!(started.elapsed() < Duration::from_millis(100), "still accepted");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let listed = stdout(&cli(&["--json", "keys", "list", "--customer", "cus_1"]).success());
    assert!(!listed.contains(&old) && !listed.contains(&new) && !listed.contains("sha256:"));
    assert_eq!(json(&listed)[0]["status"].as_str(), Some("DISABLED"));

    // Import: the keys of a file, by digest.
    let file = std::env::temp_dir().join(format!("keygate-cli-import-{}.toml", std::process::id()));
    std::fs::write(&file, "[[keys]]\nid = \"imported\"\nkey = \"dev-key-imported\"\n").unwrap();
    cli(&["keys", "import", file.to_str().unwrap()]).success();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(call(app, "dev-key-imported").await, (StatusCode::OK, "own".into()));
}
