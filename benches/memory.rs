//! Resident memory per key of keygate's cache, key store and limiter, next to the hand-written
//! `HashMap` middleware holding the same facts, at 10 000 and 1 000 000 keys.
//!
//! `cargo bench --all-features --bench memory`
//!
//! Each figure is measured in a fresh child process: resident set after filling the structure,
//! minus before, divided by the number of keys.

// criterion's macros generate an undocumented `main`.
#![allow(missing_docs)]

mod support;

use keygate::cache::{CacheConfig, CachedVerifier};
use keygate::limit::{LimitRequest, Limiter, MemoryLimiter, RateLimit};
use keygate::verify::{BoxFuture, KeyStatus, Verification, Verifier, VerifyError, VerifyRequest};
use keygate::ApiKey;
use std::sync::Arc;

/// Answers any bench key with its facts, without I/O, so only the cache is measured; or, with
/// `shared`, every key with one `Arc` of key 0's facts, so only the cache's own bookkeeping is.
struct Facts {
    shared: Option<Arc<keygate::KeyFacts>>,
}

impl Verifier for Facts {
    fn verify(&self, req: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>> {
        let i: usize = req.key.expose_secret()[8..14].parse().unwrap();
        let facts = self.shared.clone().unwrap_or_else(|| Arc::new(support::facts(i)));
        Box::pin(async move { Ok(Verification::new(KeyStatus::Valid, facts)) })
    }
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn key(i: usize) -> String {
    format!("kb_bench{i:06}xxxxxxxxxxxxxxxxxxxxx")
}

/// Fills one structure with `n` keys and prints the bytes per key.
fn measure(what: &str, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let keys: Vec<String> = (0..n).map(key).collect();
    let before = resident_bytes();
    let keep: Box<dyn std::any::Any> = match what {
        "hand_hashmap" => Box::new(
            keys.iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), Arc::new(support::hand_context(i))))
                .collect::<std::collections::HashMap<_, _>>(),
        ),
        "keygate_cache" | "keygate_cache_alone" => {
            let shared = (what == "keygate_cache_alone").then(|| Arc::new(support::facts(0)));
            let cache = CachedVerifier::new(Facts { shared }, CacheConfig::default().max_entries(n as u64 * 2));
            rt.block_on(async {
                for k in &keys {
                    cache.verify(VerifyRequest::new(ApiKey::new(k.as_str()))).await.unwrap();
                }
            });
            cache.run_pending_tasks();
            assert_eq!(cache.entry_count(), n as u64);
            Box::new(cache)
        }
        "keygate_store" | "keygate_store_used" => {
            let verifier = keygate::LocalVerifier::in_memory();
            rt.block_on(async {
                for (i, k) in keys.iter().enumerate() {
                    verifier.add(&ApiKey::new(k.as_str()), support::facts(i)).await.unwrap();
                }
            });
            // Once each key has been presented, the store also holds its fingerprint index.
            if what == "keygate_store_used" {
                for k in &keys {
                    assert!(verifier.verify_now(&keygate::PresentedKey::new(k)).is_some());
                }
            }
            Box::new(verifier)
        }
        "keygate_limiter" => {
            let limiter = MemoryLimiter::new();
            let limit = RateLimit::per_minute("default", 500).unwrap();
            rt.block_on(async {
                for i in 0..n {
                    let id = format!("key_{i:06}");
                    let limits = [(limit.clone(), 1)];
                    limiter
                        .check_now(&id, &LimitRequest { limits: &limits, usage: None, identity: None })
                        .unwrap()
                        .unwrap();
                }
            });
            Box::new(limiter)
        }
        other => panic!("unknown structure {other}"),
    };
    let after = resident_bytes();
    println!("{}", (after.saturating_sub(before)) as f64 / n as f64);
    drop(keep);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "measure") {
        measure(&args[pos + 1], args[pos + 2].parse().unwrap());
        return;
    }
    println!("{:<20} {:>14} {:>14}", "bytes per key", "10 000 keys", "1 000 000 keys");
    let structures = [
        "hand_hashmap",
        "keygate_cache",
        "keygate_cache_alone",
        "keygate_store",
        "keygate_store_used",
        "keygate_limiter",
    ];
    for what in structures {
        let per_key: Vec<String> = [10_000, 1_000_000]
            .iter()
            .map(|n| {
                let out = std::process::Command::new(std::env::current_exe().unwrap())
                    .args(["measure", what, &n.to_string()])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                let bytes: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
                format!("{bytes:.0}")
            })
            .collect();
        println!("{:<20} {:>14} {:>14}", what, per_key[0], per_key[1]);
    }
}
