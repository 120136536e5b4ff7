//! Stored key records are versioned: what this code writes, older code reads, and what older (or
//! newer) code wrote, this code reads. The old reader below is a copy of the record as it was
//! before versioning (every field required, as serde's derive requires without defaults).

use keygate::limit::RateLimit;
use keygate::store::StoredKey;
use keygate::verify::Metadata;
use keygate::{KeyFacts, Scope};
use serde::Deserialize;
use std::time::{Duration, SystemTime};

/// The record as written and read before versioning.
#[derive(Debug, Deserialize)]
struct OldStoredKey {
    facts: OldFacts,
    enabled: bool,
    deleted: bool,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)] // read to prove it parses, not every field compared
struct OldFacts {
    id: String,
    name: Option<String>,
    scopes: Vec<Scope>,
    expires_at: Option<SystemTime>,
    metadata: Metadata,
    customer_id: Option<String>,
    external_meter_id: Option<String>,
    rate_limit: Option<RateLimit>,
    usage_limit: Option<u64>,
}

fn full_key() -> StoredKey {
    let facts = KeyFacts::new("key_1")
        .with_name("ci")
        .with_scopes(["orders:read".parse::<Scope>().unwrap()])
        .with_expiry(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000))
        .with_metadata("plan", "pro")
        .with_customer("cus_1")
        .with_rate_limit(RateLimit::per_minute("key", 10).unwrap())
        .with_usage_limit(1_000);
    let mut key = StoredKey::new(facts);
    key.enabled = false;
    key
}

/// Exactly what the code before versioning wrote for `full_key()`.
const WRITTEN_BEFORE_VERSIONING: &str = r#"{"facts":{"id":"key_1","name":"ci","scopes":[{"representation":"orders","create":false,"read":true,"update":false,"del":false}],"expires_at":{"secs_since_epoch":2000000000,"nanos_since_epoch":0},"metadata":{"plan":"pro"},"customer_id":"cus_1","billing":null,"external_meter_id":null,"rate_limit":{"name":"key","limit":10,"window_secs":60.0},"usage_limit":1000},"enabled":false,"deleted":false}"#;

#[test]
fn what_this_code_writes_is_versioned_and_the_old_reader_reads_it() {
    let json = serde_json::to_string(&full_key()).unwrap();
    assert!(json.starts_with(r#"{"v":1,"#), "{json}");
    let old: OldStoredKey = serde_json::from_str(&json).unwrap();
    assert_eq!((old.enabled, old.deleted), (false, false));
    assert_eq!(old.facts.id, "key_1");
    assert_eq!(old.facts.scopes, full_key().facts.scopes);
    assert_eq!(old.facts.usage_limit, Some(1_000));
}

#[test]
fn records_written_before_versioning_still_read() {
    let read: StoredKey = serde_json::from_str(WRITTEN_BEFORE_VERSIONING).unwrap();
    assert_eq!(read, full_key());
    let again: StoredKey = serde_json::from_str(&serde_json::to_string(&read).unwrap()).unwrap();
    assert_eq!(again, full_key(), "round trip");
}

#[test]
fn a_record_from_newer_code_reads_its_known_fields() {
    let newer = WRITTEN_BEFORE_VERSIONING.replacen(
        r#"{"facts":{"#,
        r#"{"v":2,"tier":"gold","facts":{"owner":{"team":"core"},"#,
        1,
    );
    let read: StoredKey = serde_json::from_str(&newer).unwrap();
    assert_eq!(read, full_key());
}

#[test]
fn a_record_missing_fields_reads_with_their_defaults() {
    // A field that later code stops writing (or that older code never wrote) is absent.
    let sparse: StoredKey = serde_json::from_str(r#"{"v":1,"facts":{"id":"key_2"}}"#).unwrap();
    assert_eq!(sparse, StoredKey::new(KeyFacts::new("key_2")));
    assert!(sparse.enabled && !sparse.deleted);
}
