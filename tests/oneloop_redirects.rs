//! No key leaves for another host: the `oneloop` example's verifier, pointed at a Oneloop that
//! answers verify with a redirect to a second listener, sends that listener nothing.
#![cfg(feature = "oneloop")]

mod common;

use common::oneloop::{start, TOKEN};
use keygate::oneloop::OneloopVerifier;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The example binary `cargo test` built beside this test.
fn example(name: &str) -> std::path::PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    deps.parent().unwrap().join("examples").join(name)
}

/// A listener that counts the connections it gets and reads nothing.
async fn second_listener() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, hits) = (listener.local_addr().unwrap(), Arc::new(AtomicUsize::new(0)));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((_conn, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, hits)
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oneloop_example_follows_no_redirect() {
    let (oneloop, fake) = start().await;
    let (elsewhere, hits) = second_listener().await;
    *fake.redirect_to.lock().unwrap() = Some(format!("http://{elsewhere}/api/v1/api-key/verify"));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let binary = example("oneloop");
    assert!(binary.exists(), "{} is built by `cargo test --all-features`", binary.display());
    let _child = Child(
        Command::new(binary)
            .env("ONELOOP_API_KEY", TOKEN)
            .env("ONELOOP_BASE_URL", format!("http://{oneloop}"))
            .env("PORT", port.to_string())
            .env("RUST_LOG", "off")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the example did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let addr = ([127, 0, 0, 1], port).into();
    for _ in 0..3 {
        let r = common::fetch(addr, "/v1/items", &[("authorization", b"Bearer kg_users_secret_key")]).await;
        assert_eq!(r.status, 503, "a redirect is a failed call: {}", r.body);
    }
    assert_eq!(fake.calls(), 3, "one call per request, no redirect loop");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect target received nothing");
}

#[test]
fn plain_http_only_to_loopback_or_when_asked() {
    let build = |url: &str| OneloopVerifier::builder(TOKEN).base_url(url).build().map(drop);
    for url in ["https://prod.oneloop.ai", "http://127.0.0.1:9000", "http://localhost:9000", "http://[::1]:9000"] {
        assert!(build(url).is_ok(), "{url}");
    }
    let err = build("http://oneloop.internal").unwrap_err().to_string();
    assert!(err.contains("https"), "{err}");
    let opted = OneloopVerifier::builder(TOKEN).base_url("http://oneloop.internal").allow_http(true).build();
    assert!(opted.is_ok());
}
