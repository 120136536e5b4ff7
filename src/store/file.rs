//! The TOML key file.
//!
//! ```toml
//! [[keys]]
//! id = "key_ci"                 # required, unique
//! name = "CI pipeline"          # optional
//! digest = "sha256:…"           # the SHA-256 of the key: what production files hold
//! # key = "kg_…"                # or, for development only, the plain key
//! scopes = ["items:read,create", "admin:*"]
//! expires_at = 1798761600       # optional, Unix seconds
//! enabled = true                # optional, default true
//! customer_id = "cus_42"        # optional
//! metadata = { plan = "pro" }   # optional, string values
//! rate_limit = { limit = 100, window_secs = 60 }   # optional, the key's own rate limit
//! usage_limit = 10000           # optional, total usage allowed
//! usage_refill = "monthly:1"    # optional: `daily`, `monthly:<day>`, `every:<n>s`
//! # optional: limits all keys of the customer share
//! identity_quota = { rate_limit = { name = "customer", limit = 1000 }, usage_limit = 50000, usage_refill = "daily" }
//! deleted = false               # optional, default false
//! # optional: secrets rotated away that still work until `until` (Unix seconds)
//! previous = [{ digest = "sha256:…", until = 1798761600 }]
//! ```
//!
//! The `keygate` command-line tool (feature `cli`) writes such files with digests only.

use super::{Previous, StoredKey};
use crate::facts::{IdentityQuota, KeyFacts};
use crate::key::KeyDigest;
use crate::limit::{RateLimit, Refill};
use crate::scope::Scope;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

#[doc = include_str!("../../docs/key_file.md")]
#[derive(Debug, Clone)]
pub struct KeyFile {
    /// The keys, in file order.
    pub keys: Vec<(KeyDigest, StoredKey)>,
}

#[doc = include_str!("../../docs/load_error.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError(String);

impl LoadError {
    pub(crate) fn new(message: String) -> Self {
        Self(message)
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key file: {}", self.0)
    }
}

impl std::error::Error for LoadError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    #[serde(default)]
    keys: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: String,
    name: Option<String>,
    key: Option<String>,
    digest: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    expires_at: Option<u64>,
    #[serde(default = "yes")]
    enabled: bool,
    customer_id: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    rate_limit: Option<RateLimit>,
    usage_limit: Option<u64>,
    usage_refill: Option<Refill>,
    identity_quota: Option<IdentityQuota>,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    previous: Vec<PreviousEntry>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PreviousEntry {
    digest: String,
    /// Unix seconds (to the millisecond).
    until: f64,
}

/// How [`KeyFile::render`] writes an entry: digests only, defaults left out.
#[derive(Serialize)]
struct WrittenEntry<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    digest: String,
    scopes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enabled: Option<bool>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    customer_id: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limit: Option<&'a RateLimit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage_limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage_refill: Option<Refill>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity_quota: Option<&'a IdentityQuota>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    previous: Vec<PreviousEntry>,
}

fn yes() -> bool {
    true
}

impl KeyFile {
    /// Reads and parses a key file.
    ///
    /// # Errors
    /// [`LoadError`] when the file cannot be read, or as [`parse`](Self::parse).
    pub fn read(path: impl AsRef<std::path::Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| LoadError(format!("{}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// Parses a key file's text.
    ///
    /// ```
    /// let file = keygate::store::KeyFile::parse(r#"
    ///     [[keys]]
    ///     id = "k1"
    ///     key = "dev-key-1"
    ///     scopes = ["items:read"]
    /// "#).unwrap();
    /// assert_eq!(file.keys[0].0, keygate::KeyDigest::of("dev-key-1"));
    /// ```
    ///
    /// # Errors
    /// [`LoadError`] for text that is not TOML of this shape, an empty or repeated id, an entry without
    /// exactly one of `key` and `digest`, or an unreadable digest, scope or limit.
    pub fn parse(text: &str) -> Result<Self, LoadError> {
        // toml's messages quote the offending line, which may hold a plain key: keep only the place.
        let shape: FileShape = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| format!(" at byte {}", s.start)).unwrap_or_default();
            LoadError(format!("not a valid key file{at}: {}", e.message()))
        })?;
        let mut ids = std::collections::HashSet::new();
        let keys = shape
            .keys
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                let at = |msg: String| LoadError(format!("entry {} (id {:?}): {msg}", i + 1, entry.id));
                if entry.id.is_empty() || !ids.insert(entry.id.clone()) {
                    return Err(at("ids must be non-empty and unique".into()));
                }
                let digest = match (&entry.key, &entry.digest) {
                    (Some(key), None) if !key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic()) => {
                        KeyDigest::of(key)
                    }
                    (Some(_), None) => return Err(at("`key` must be visible ASCII".into())),
                    (None, Some(d)) => d.parse().map_err(|e| at(format!("`digest`: {e}")))?,
                    _ => return Err(at("give exactly one of `key` (development) or `digest`".into())),
                };
                let scopes = entry
                    .scopes
                    .iter()
                    .map(|s| s.parse::<Scope>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| at(e.to_string()))?;
                let facts = KeyFacts {
                    id: entry.id.clone(),
                    name: entry.name.clone(),
                    scopes,
                    expires_at: entry.expires_at.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
                    metadata: entry.metadata.clone().into_iter().collect(),
                    customer_id: entry.customer_id.clone(),
                    rate_limit: entry.rate_limit.clone().map(Box::new),
                    usage_limit: entry.usage_limit,
                    usage_refill: entry.usage_refill,
                    identity_quota: entry.identity_quota.clone().map(Box::new),
                    ..KeyFacts::default()
                };
                let previous = entry
                    .previous
                    .iter()
                    .map(|p| {
                        let digest = p.digest.parse().map_err(|e| at(format!("`previous` digest: {e}")))?;
                        let ms = (p.until * 1000.0).round();
                        if !(0.0..=u64::MAX as f64).contains(&ms) {
                            return Err(at(format!("`previous` until {}", p.until)));
                        }
                        Ok(Previous { digest, until: super::unix_ms::from_ms(ms as u64) })
                    })
                    .collect::<Result<_, _>>()?;
                let stored =
                    StoredKey { enabled: entry.enabled, deleted: entry.deleted, previous, ..StoredKey::new(facts) };
                Ok((digest, stored))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { keys })
    }

    /// These keys as the text of a key file, with digests only (never a key), in the order
    /// given; [`parse`](Self::parse) reads back the same keys.
    ///
    /// ```
    /// use keygate::store::{KeyFile, StoredKey};
    /// use keygate::{KeyDigest, KeyFacts};
    /// let keys = vec![(KeyDigest::of("dev-key-1"), StoredKey::new(KeyFacts::new("k1").with_customer("cus_1")))];
    /// let text = KeyFile::render(&keys).unwrap();
    /// assert!(!text.contains("dev-key-1"));
    /// assert_eq!(KeyFile::parse(&text).unwrap().keys, keys);
    /// ```
    ///
    /// # Errors
    /// [`LoadError`] if TOML cannot hold a value (never for keys this crate made; an error rather
    /// than an empty text, which a caller writing it back would take for no keys).
    pub fn render(keys: &[(KeyDigest, StoredKey)]) -> Result<String, LoadError> {
        #[derive(Serialize)]
        struct Written<'a> {
            keys: Vec<WrittenEntry<'a>>,
        }
        let secs = |t: std::time::SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let keys = keys
            .iter()
            .map(|(digest, k)| WrittenEntry {
                id: &k.facts.id,
                name: k.facts.name.as_deref(),
                digest: digest.to_string(),
                scopes: k.facts.scopes.iter().map(ToString::to_string).collect(),
                expires_at: k.facts.expires_at.map(|t| secs(t).as_secs()),
                enabled: (!k.enabled).then_some(false),
                deleted: k.deleted,
                customer_id: k.facts.customer_id.as_deref(),
                metadata: k.facts.metadata.iter().collect(),
                rate_limit: k.facts.rate_limit.as_deref(),
                usage_limit: k.facts.usage_limit,
                usage_refill: k.facts.usage_refill,
                identity_quota: k.facts.identity_quota.as_deref(),
                previous: k
                    .previous
                    .iter()
                    .map(|p| PreviousEntry {
                        digest: p.digest.to_string(),
                        until: secs(p.until).as_millis() as f64 / 1000.0,
                    })
                    .collect(),
            })
            .collect();
        toml::to_string(&Written { keys }).map_err(|e| LoadError(format!("cannot be written: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_entry_and_never_the_key() {
        let err = KeyFile::parse("[[keys]]\nid = \"a\"\nkey = \"secret-1\"\nscopes = [\"items:fly\"]\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("entry 1") && msg.contains("items:fly"), "{msg}");
        assert!(!msg.contains("secret-1"));
        let err = KeyFile::parse("[[keys]]\nid = \"a\"\nkey = \"secret-1\"\nkye = 1\n").unwrap_err();
        assert!(!err.to_string().contains("secret-1"), "{err}");
        let err = KeyFile::parse("[[keys]]\nid = \"a\"\nkey = \"x\"\ndigest = \"sha256:00\"\n").unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
        let dup = "[[keys]]\nid = \"a\"\nkey = \"x\"\n[[keys]]\nid = \"a\"\nkey = \"y\"\n";
        assert!(KeyFile::parse(dup).unwrap_err().to_string().contains("unique"));
    }

    #[test]
    fn digests_and_flags() {
        let d = KeyDigest::of("k");
        let file = KeyFile::parse(&format!(
            "[[keys]]\nid = \"a\"\ndigest = \"{d}\"\nenabled = false\nexpires_at = 10\nmetadata = {{ plan = \"pro\" }}\n"
        ))
        .unwrap();
        let (digest, stored) = &file.keys[0];
        assert_eq!(*digest, d);
        assert!(!stored.enabled);
        assert_eq!(stored.facts.expires_at, Some(UNIX_EPOCH + Duration::from_secs(10)));
        assert_eq!(stored.facts.metadata.get("plan"), Some("pro"));
    }
}
