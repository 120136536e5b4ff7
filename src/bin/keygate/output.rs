//! What the tool prints: text for people, one JSON document for scripts. Never a secret, but for
//! the key that `create` and `rotate` show once.

use keygate::store::StoredKey;
use keygate::KeyDigest;
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy)]
pub(crate) struct Output {
    pub(crate) json: bool,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn status(key: &StoredKey) -> String {
    serde_json::to_value(key.status()).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// A key as listed: everything but secrets (the digest is shown by `show` only).
fn summary(key: &StoredKey) -> Value {
    let f = &key.facts;
    json!({
        "id": f.id,
        "name": f.name,
        "scopes": f.scopes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "status": status(key),
        "expires_at": f.expires_at.map(secs),
        "customer_id": f.customer_id,
        "grace": key.previous.iter().map(|p| json!({ "until": secs(p.until) })).collect::<Vec<_>>(),
    })
}

impl Output {
    pub(crate) fn key_shown_once(self, id: &str, key: &str, grace_until: Option<SystemTime>) {
        if self.json {
            println!("{}", json!({ "id": id, "key": key, "old_key_works_until": grace_until.map(secs) }));
        } else {
            println!("{key}");
            eprintln!("key {id}: shown once, keep it now; the store holds only its digest");
            if let Some(until) = grace_until {
                eprintln!("the previous key works until {} (Unix seconds)", secs(until));
            }
        }
    }

    pub(crate) fn list(self, keys: &[(KeyDigest, StoredKey)]) {
        if self.json {
            println!("{}", Value::Array(keys.iter().map(|(_, k)| summary(k)).collect()));
            return;
        }
        println!("{:<24} {:<10} {:<14} {:<12} {:<24} NAME", "ID", "STATUS", "CUSTOMER", "EXPIRES", "SCOPES");
        for (_, k) in keys {
            let f = &k.facts;
            let scopes: Vec<String> = f.scopes.iter().map(ToString::to_string).collect();
            println!(
                "{:<24} {:<10} {:<14} {:<12} {:<24} {}",
                f.id,
                status(k),
                f.customer_id.as_deref().unwrap_or("-"),
                f.expires_at.map_or("-".into(), |t| secs(t).to_string()),
                scopes.join(" "),
                f.name.as_deref().unwrap_or("")
            );
        }
    }

    pub(crate) fn show(self, digest: &KeyDigest, key: &StoredKey) {
        let mut value = summary(key);
        value["digest"] = json!(digest.to_string());
        value["metadata"] = key.facts.metadata.iter().map(|(k, v)| (k.to_owned(), json!(v))).collect();
        value["rate_limit"] = json!(key.facts.rate_limit.as_deref().map(ToString::to_string));
        value["usage_limit"] = json!(key.facts.usage_limit);
        value["revision"] = json!(key.revision);
        if self.json {
            println!("{value}");
        } else if let Value::Object(fields) = value {
            for (name, v) in fields {
                println!("{name:<12} {v}");
            }
        }
    }

    pub(crate) fn done(self, what: &str, id: Option<&str>) {
        if self.json {
            println!("{}", json!({ "done": what, "id": id }));
        } else {
            match id {
                Some(id) => println!("{what} {id}"),
                None => println!("{what}"),
            }
        }
    }
}
