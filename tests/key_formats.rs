//! What the key formats do: the CRC format catches typos but anyone can compute it; the keyed
//! format cannot be forged offline, survives secret rotation, and refuses forged keys before any
//! lookup.

mod common;

use axum::routing::get;
use axum::Router;
use common::*;
use keygate::{ApiKeyLayer, KeyFacts, KeyFormat, KeySecret, LocalVerifier};

/// Anyone can compute a CRC-32: a key forged offline passes the checksummed format's check (it
/// catches typos, and lets secret scanners find keys; it is not a secret).
#[test]
fn a_crc_format_can_be_forged_offline() {
    let format = KeyFormat::checksummed("kg_").unwrap();
    let forged = format.generate().unwrap(); // what an attacker's own copy of the algorithm makes
    assert!(format.accepts(forged.expose_secret()));
}

/// Keys forged without the secret fail the keyed format; keys made with it pass.
#[test]
fn a_keyed_format_cannot_be_forged_without_the_secret() {
    let secret = KeySecret::generate().unwrap();
    let format = KeyFormat::keyed("kg_", [secret]).unwrap();
    let attacker = KeyFormat::keyed("kg_", [KeySecret::generate().unwrap()]).unwrap();
    for _ in 0..1000 {
        assert!(!format.accepts(attacker.generate().unwrap().expose_secret()), "forged with another secret");
        assert!(!format.accepts(KeyFormat::checksummed("kg_").unwrap().generate().unwrap().expose_secret()));
    }
    let key = format.generate().unwrap();
    assert!(format.accepts(key.expose_secret()));
    // Every single-character typo is caught too.
    let k = key.expose_secret();
    for i in 3..k.len() {
        let mut typo = k.as_bytes().to_vec();
        typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
        assert!(!format.accepts(std::str::from_utf8(&typo).unwrap()), "typo at {i}");
    }
}

/// Rotation: keys made under the old secret keep passing while it is listed after the new one; new
/// keys use the new one; once the old secret is dropped, its keys fail.
#[test]
fn secrets_rotate() {
    let (old, new) = (KeySecret::generate().unwrap(), KeySecret::generate().unwrap());
    let before = KeyFormat::keyed("kg_", [old.clone()]).unwrap();
    let during = KeyFormat::keyed("kg_", [new.clone(), old]).unwrap();
    let after = KeyFormat::keyed("kg_", [new]).unwrap();
    let (old_key, new_key) = (before.generate().unwrap(), during.generate().unwrap());
    assert!(during.accepts(old_key.expose_secret()) && during.accepts(new_key.expose_secret()));
    assert!(after.accepts(new_key.expose_secret()));
    assert!(!after.accepts(old_key.expose_secret()));
    assert!(KeyFormat::keyed("kg_", []).is_err(), "at least one secret");
    assert!(KeySecret::new(b"too short").is_err(), "at least 16 bytes");
    assert!(!format!("{:?}", KeySecret::new(&[7u8; 32]).unwrap()).contains('7'), "Debug hides it");
}

/// Over HTTP: with the keyed format on the layer and the verifier, a valid key passes and a forged
/// one is refused without reaching the verifier.
#[tokio::test]
async fn forged_keys_never_reach_the_verifier() {
    let format = KeyFormat::keyed("kg_", [KeySecret::generate().unwrap()]).unwrap();
    let verifier = LocalVerifier::in_memory().with_key_format(format.clone());
    let key = verifier.create(KeyFacts::new("k")).await.unwrap().key;
    let counting = Counting::async_only(verifier);
    let layer = ApiKeyLayer::builder(counting.clone()).key_format(format).build().unwrap();
    let addr = serve_axum(Router::new().route("/x", get(|| async { "ok" })).layer(layer)).await;
    let attacker = KeyFormat::keyed("kg_", [KeySecret::generate().unwrap()]).unwrap();
    for _ in 0..50 {
        let forged = attacker.generate().unwrap();
        let r = fetch(addr, "/x", &[("x-api-key", forged.expose_secret().as_bytes())]).await;
        assert_eq!(r.status, 401);
    }
    assert_eq!(counting.calls(), 0, "no forged key reached the verifier");
    assert_eq!(fetch(addr, "/x", &[("x-api-key", key.expose_secret().as_bytes())]).await.body, "ok");
}
