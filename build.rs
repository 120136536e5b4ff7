//! Tells the tests what this machine offers, so a test that needs Redis is reported as *ignored*
//! (with the reason) where it cannot run, never as a silent pass:
//! - `keygate_redis_url`: `REDIS_URL` is set (a shared Redis to run against);
//! - `keygate_redis_server`: a `redis-server` binary is on `PATH` (tests start their own);
//! - `keygate_database_url`: `DATABASE_URL` is set (a PostgreSQL to run against).

use std::path::Path;

fn main() {
    println!("cargo::rerun-if-env-changed=REDIS_URL");
    println!("cargo::rerun-if-env-changed=DATABASE_URL");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rustc-check-cfg=cfg(keygate_database_url)");
    println!("cargo::rustc-check-cfg=cfg(keygate_redis_url)");
    println!("cargo::rustc-check-cfg=cfg(keygate_redis_server)");
    if std::env::var_os("REDIS_URL").is_some_and(|u| !u.is_empty()) {
        println!("cargo::rustc-cfg=keygate_redis_url");
    }
    if std::env::var_os("DATABASE_URL").is_some_and(|u| !u.is_empty()) {
        println!("cargo::rustc-cfg=keygate_database_url");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| Path::new(&dir).join("redis-server").is_file()) {
        println!("cargo::rustc-cfg=keygate_redis_server");
    }
}
