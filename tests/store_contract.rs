//! The `KeyStore` contract, one suite run against every store: memory (always), the TOML key file
//! (its read-only parts), Redis (`REDIS_URL`) and PostgreSQL (`DATABASE_URL`). Where a URL was not
//! set at build time, that store's test is reported ignored, never passed.

mod common;

use keygate::limit::RateLimit;
use keygate::store::{KeyFile, KeyStore, MemoryStore, StoreError, StoredKey};
use keygate::{KeyDigest, KeyFacts, KeyStatus, LocalVerifier, Scope};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn facts(id: &str, customer: Option<&str>) -> KeyFacts {
    let mut f = KeyFacts::new(id)
        .with_name(format!("{id} name"))
        .with_scopes(["items:read,create".parse::<Scope>().unwrap()])
        .with_expiry(UNIX_EPOCH + Duration::from_secs(4_102_444_800))
        .with_metadata("plan", "pro")
        .with_rate_limit(RateLimit::per_minute("key", 100).unwrap())
        .with_usage_limit(1000);
    if let Some(c) = customer {
        f = f.with_customer(c);
    }
    f
}

async fn get(store: &dyn KeyStore, digest: &KeyDigest) -> Option<StoredKey> {
    store.get(digest).await.unwrap()
}

async fn status(store: &dyn KeyStore, digest: &KeyDigest) -> Option<KeyStatus> {
    get(store, digest).await.map(|k| k.status())
}

/// The whole contract against one store. `store` must be empty.
async fn contract(store: Arc<dyn KeyStore>) {
    let s = &*store;
    let admin = LocalVerifier::new(store.clone());
    let other_admin = LocalVerifier::new(store.clone());

    // Create, then read by digest and by id: the facts come back as they went in.
    let created = admin.create(facts("k1", Some("cus_a"))).await.unwrap();
    let d1 = created.key.digest();
    let found = get(s, &d1).await.expect("get by digest");
    assert_eq!(*found.facts, facts("k1", Some("cus_a")));
    assert_eq!((found.enabled, found.deleted, found.revision, found.previous.len()), (true, false, 0, 0));
    let (digest, by_id) = s.find("k1").await.unwrap().expect("find by id");
    assert_eq!((digest, &by_id), (d1, &found));

    // Unknown ids and digests are absent; ids and digests are unique.
    assert_eq!(get(s, &KeyDigest::of("unknown")).await, None);
    assert_eq!(s.find("nobody").await.unwrap(), None);
    let same_id = s.insert(KeyDigest::of("another secret"), StoredKey::new(KeyFacts::new("k1"))).await;
    assert!(matches!(same_id, Err(StoreError::Exists(_))), "{same_id:?}");
    let same_secret = s.insert(d1, StoredKey::new(KeyFacts::new("k_other"))).await;
    assert!(matches!(same_secret, Err(StoreError::Exists(_))), "{same_secret:?}");
    assert_eq!(s.find("k_other").await.unwrap(), None);

    // Disable, enable, each a new revision; a replace from a stale read changes nothing.
    admin.disable("k1").await.unwrap();
    assert_eq!(status(s, &d1).await, Some(KeyStatus::Disabled));
    admin.enable("k1").await.unwrap();
    let (_, now) = s.find("k1").await.unwrap().unwrap();
    assert_eq!((now.status(), now.revision), (KeyStatus::Valid, 2));
    let stale = StoredKey { enabled: false, ..found.clone() };
    assert!(!s.replace(d1, &found, d1, stale).await.unwrap(), "a stale revision must not win");
    assert_eq!(status(s, &d1).await, Some(KeyStatus::Valid));

    // A replace cannot take another key's secret.
    let k2 = admin.create(facts("k2", Some("cus_a"))).await.unwrap();
    let (_, k1_now) = s.find("k1").await.unwrap().unwrap();
    assert!(!s.replace(d1, &k1_now, k2.key.digest(), k1_now.clone()).await.unwrap());
    assert_eq!(s.find("k2").await.unwrap().unwrap().0, k2.key.digest());

    // Rotation at once: the old secret is gone, the new one is the same key.
    let new1 = admin.rotate("k1", Duration::ZERO).await.unwrap();
    assert_eq!(get(s, &d1).await, None);
    let (digest, rotated) = s.find("k1").await.unwrap().unwrap();
    assert_eq!((digest, rotated.facts.id.as_str(), rotated.previous.len()), (new1.digest(), "k1", 0));

    // Rotation with a grace window: both secrets work; the old one says until when.
    let before = SystemTime::now();
    let new2 = admin.rotate("k1", Duration::from_secs(3600)).await.unwrap();
    let old = get(s, &new1.digest()).await.expect("the old secret works in its window");
    let ends = old.facts.grace_ends.expect("and says when it stops");
    assert!(ends >= before + Duration::from_secs(3599) && ends <= SystemTime::now() + Duration::from_secs(3600));
    assert_eq!((old.status(), old.facts.id.as_str()), (KeyStatus::Valid, "k1"));
    let current = get(s, &new2.digest()).await.unwrap();
    assert_eq!((current.facts.grace_ends, current.previous.len()), (None, 1));
    assert_eq!(current.previous[0].digest, new1.digest());
    assert_eq!(current.previous[0].until, ends);

    // A change to the key reaches its old secret too; rotating again keeps both old ones.
    admin.disable("k1").await.unwrap();
    assert_eq!(status(s, &new1.digest()).await, Some(KeyStatus::Disabled));
    admin.enable("k1").await.unwrap();
    let new3 = admin.rotate("k1", Duration::from_millis(300)).await.unwrap();
    for d in [new1.digest(), new2.digest(), new3.digest()] {
        assert_eq!(status(s, &d).await, Some(KeyStatus::Valid));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(status(s, &new2.digest()).await, Some(KeyStatus::Expired), "its window has ended");
    assert_eq!(status(s, &new1.digest()).await, Some(KeyStatus::Valid), "an earlier, longer window has not");
    // The next change drops the ended window.
    admin.disable("k1").await.unwrap();
    assert_eq!(s.find("k1").await.unwrap().unwrap().1.previous.len(), 1);
    admin.enable("k1").await.unwrap();

    // The longest grace window is MAX_GRACE; a longer one is refused (never a panic), changing nothing.
    let (before_digest, before) = s.find("k1").await.unwrap().unwrap();
    for too_long in [LocalVerifier::MAX_GRACE + Duration::from_millis(1), Duration::MAX] {
        assert!(matches!(admin.rotate("k1", too_long).await, Err(StoreError::Invalid(_))));
    }
    assert_eq!(s.find("k1").await.unwrap().unwrap(), (before_digest, before));
    let longest = admin.rotate("k1", LocalVerifier::MAX_GRACE).await.unwrap();
    let (_, k1_now) = s.find("k1").await.unwrap().unwrap();
    let ends = k1_now.previous.iter().map(|p| p.until).max().unwrap();
    assert!(ends > SystemTime::now() + LocalVerifier::MAX_GRACE - Duration::from_secs(60));
    assert_eq!(status(s, &before_digest).await, Some(KeyStatus::Valid), "kept for the longest window");
    let new3 = longest;

    // List: ordered by id, by customer, current secrets only.
    admin.create(facts("k0", Some("cus_b"))).await.unwrap();
    admin.create(facts("k3", None)).await.unwrap();
    let all = s.list(None).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|(_, k)| k.facts.id.as_str()).collect();
    assert_eq!(ids, ["k0", "k1", "k2", "k3"]);
    assert_eq!(all[1].0, new3.digest());
    let of_a: Vec<String> = s.list(Some("cus_a")).await.unwrap().into_iter().map(|(_, k)| k.facts.id.clone()).collect();
    assert_eq!(of_a, ["k1", "k2"]);
    assert!(s.list(Some("cus_nobody")).await.unwrap().is_empty());

    // Delete: every secret of the key is refused as deleted, and it is still listed, as deleted.
    admin.delete("k1").await.unwrap();
    assert_eq!(status(s, &new3.digest()).await, Some(KeyStatus::Deleted));
    assert_eq!(status(s, &new1.digest()).await, Some(KeyStatus::Deleted));
    assert!(s.list(None).await.unwrap().iter().any(|(_, k)| k.facts.id == "k1" && k.deleted));

    // Two admins at once, 20 changes each to one key: none lost (the revision counts them all),
    // and the key ends with exactly one current secret, every rotated-away one refused.
    let (a, b) = (admin.clone(), other_admin.clone());
    let one = async {
        let mut old = Vec::new();
        for i in 0..20 {
            if i % 2 == 0 {
                old.push(a.rotate("k2", Duration::ZERO).await.unwrap().digest());
            } else {
                a.disable("k2").await.unwrap();
            }
        }
        old
    };
    let two = async {
        for i in 0..20 {
            if i % 2 == 0 {
                b.enable("k2").await.unwrap();
            } else {
                b.disable("k2").await.unwrap();
            }
        }
    };
    let (rotated_to, ()) = tokio::join!(one, two);
    let (digest, k2_now) = s.find("k2").await.unwrap().unwrap();
    assert_eq!(k2_now.revision, 40, "every change landed once");
    assert_eq!(digest, *rotated_to.last().unwrap());
    assert_eq!(get(s, &k2.key.digest()).await, None);
    for d in &rotated_to[..rotated_to.len() - 1] {
        assert_eq!(get(s, d).await, None, "a secret rotated away at once is gone");
    }
}

#[tokio::test]
async fn the_memory_store_keeps_the_contract() {
    contract(Arc::new(MemoryStore::new())).await;
}

/// An admin's step, or a request with one of the secrets issued so far.
#[derive(Debug, Clone)]
enum Step {
    Create(usize),
    Disable(usize),
    Enable(usize),
    Delete(usize),
    /// Rotate, the old secret kept for an hour or dropped at once.
    Rotate(usize, bool),
    Present(usize),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let id = 0..3usize;
    prop_oneof![
        id.clone().prop_map(Step::Create),
        id.clone().prop_map(Step::Disable),
        id.clone().prop_map(Step::Enable),
        id.clone().prop_map(Step::Delete),
        (id, any::<bool>()).prop_map(|(i, keep)| Step::Rotate(i, keep)),
        (0..12usize).prop_map(Step::Present),
    ]
}

/// What a verification says, to compare two of them.
fn said(v: &keygate::verify::Verification) -> (KeyStatus, Option<(String, Option<SystemTime>)>) {
    (v.status, v.facts.as_ref().map(|f| (f.id.clone(), f.grace_ends)))
}

proptest::proptest! {
    /// The memory store answers a presented key from its fingerprint index, which holds records
    /// shared with the digest table and retires them as they are replaced. Whatever admins do,
    /// that warm answer is the record's answer by digest, for every secret ever issued.
    #[test]
    fn the_memory_stores_warm_answer_is_its_record(steps in proptest::collection::vec(step(), 1..60)) {
        use keygate::verify::{Verifier, VerifyRequest};
        use keygate::{ApiKey, PresentedKey};
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let admin = LocalVerifier::in_memory();
            let mut secrets: Vec<ApiKey> = vec![ApiKey::new("kg_never_issued")];
            for step in steps {
                let id = |i: usize| format!("k{i}");
                // Steps on keys that do not exist fail as they should; only what they change matters.
                let _ = match step {
                    Step::Create(i) => admin.create(KeyFacts::new(id(i))).await.map(|c| secrets.push(c.key)),
                    Step::Disable(i) => admin.disable(&id(i)).await,
                    Step::Enable(i) => admin.enable(&id(i)).await,
                    Step::Delete(i) => admin.delete(&id(i)).await,
                    Step::Rotate(i, keep) => {
                        let grace = if keep { Duration::from_secs(3600) } else { Duration::ZERO };
                        admin.rotate(&id(i), grace).await.map(|k| secrets.push(k))
                    }
                    Step::Present(i) => {
                        let secret = &secrets[i % secrets.len()];
                        admin.verify_now(&PresentedKey::new(secret.expose_secret()));
                        Ok(())
                    }
                };
                for secret in &secrets {
                    let warm = admin.verify_now(&PresentedKey::new(secret.expose_secret())).expect("in memory");
                    let by_digest = admin.verify(VerifyRequest::new(secret.clone())).await.unwrap();
                    assert_eq!(said(&warm), said(&by_digest));
                }
            }
        });
    }
}

#[test]
fn the_key_file_keeps_the_read_only_part_of_the_contract() {
    let text = r#"
        [[keys]]
        id = "k2"
        key = "dev-key-2"
        customer_id = "cus_a"
        [[keys]]
        id = "k1"
        digest = "sha256:0000000000000000000000000000000000000000000000000000000000000001"
        name = "k1 name"
        scopes = ["items:read,create"]
        customer_id = "cus_a"
        enabled = false
        [[keys]]
        id = "k0"
        key = "dev-key-0"
    "#;
    let dir = std::env::temp_dir().join(format!("keygate-contract-{}.toml", std::process::id()));
    std::fs::write(&dir, text).unwrap();
    let verifier = LocalVerifier::from_key_file(&dir).unwrap();
    std::fs::remove_file(&dir).unwrap();
    let store = verifier.store().clone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let d2 = KeyDigest::of("dev-key-2");
        assert_eq!(get(&*store, &d2).await.unwrap().facts.id, "k2");
        let (d1, k1) = store.find("k1").await.unwrap().unwrap();
        assert_eq!(
            (d1.to_string().ends_with("01"), k1.status(), k1.facts.name.as_deref()),
            (true, KeyStatus::Disabled, Some("k1 name"))
        );
        assert_eq!(get(&*store, &KeyDigest::of("unknown")).await, None);
        let ids: Vec<String> = store.list(None).await.unwrap().into_iter().map(|(_, k)| k.facts.id.clone()).collect();
        assert_eq!(ids, ["k0", "k1", "k2"]);
        assert_eq!(store.list(Some("cus_a")).await.unwrap().len(), 2);
    });
    assert_eq!(KeyFile::parse(text).unwrap().keys.len(), 3);
}

#[cfg(feature = "redis")]
#[tokio::test]
#[cfg_attr(not(keygate_redis_url), ignore = "needs REDIS_URL")]
async fn the_redis_store_keeps_the_contract() {
    let url = std::env::var("REDIS_URL").unwrap();
    let mut n = [0u8; 8];
    getrandom::fill(&mut n).unwrap();
    let prefix = format!("kgtest:contract:{}", u64::from_le_bytes(n));
    let conn = keygate::RedisConnection::open(&url).unwrap();
    contract(Arc::new(keygate::store::RedisKeyStore::new(conn.clone(), &prefix))).await;
    let mut c = conn;
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{{{prefix}}}:*")).query_async(&mut c).await.unwrap();
    let _: () = redis::cmd("DEL").arg(keys).query_async(&mut c).await.unwrap();
}

#[cfg(feature = "postgres")]
#[tokio::test]
#[cfg_attr(not(keygate_database_url), ignore = "needs DATABASE_URL")]
async fn the_postgres_store_keeps_the_contract() {
    let schema = common::pg::Schema::new("contract");
    contract(Arc::new(schema.store("kg-contract").await)).await;
}
