//! Opening the store a `--store` names, and writing a key file back.

use super::Failure;
use keygate::store::{KeyFile, KeyStore, MemoryStore};
use keygate::LocalVerifier;
use std::path::PathBuf;

/// An open store.
pub(crate) enum Opened {
    /// A TOML key file, read into memory, locked until the command ends, written back after a change.
    File { path: PathBuf, admin: LocalVerifier, _lock: std::fs::File },
    /// Redis or PostgreSQL: every change lands there at once.
    #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
    Shared {
        admin: LocalVerifier,
        #[cfg(feature = "postgres")]
        postgres: Option<keygate::store::PostgresKeyStore>,
    },
}

pub(crate) async fn open(location: &str, schema: &str, prefix: &str) -> Result<Opened, Failure> {
    let scheme = location.split_once("://").map(|(s, _)| s);
    match scheme {
        Some("postgres" | "postgresql") => postgres(location, schema),
        Some("redis" | "rediss") => redis(location, prefix),
        Some(other) => {
            Err(super::usage(format!("unknown store scheme {other:?}: a file path, redis://, or postgres://")))
        }
        None => file(PathBuf::from(location)).await,
    }
    .map_err(|mut f| {
        // A URL may hold a password: name the store by its scheme only.
        f.1 = f.1.replace(location, scheme.unwrap_or("the store"));
        f
    })
}

#[cfg(feature = "postgres")]
fn postgres(url: &str, schema: &str) -> Result<Opened, Failure> {
    let store = keygate::store::PostgresKeyStore::connect_lazy(url)?
        .in_schema(schema)?
        .timeout(std::time::Duration::from_secs(10));
    Ok(Opened::Shared { admin: LocalVerifier::new(store.clone()), postgres: Some(store) })
}

#[cfg(not(feature = "postgres"))]
fn postgres(_: &str, _: &str) -> Result<Opened, Failure> {
    Err(Failure(1, "this keygate was built without the `postgres` feature".into()))
}

#[cfg(feature = "redis")]
fn redis(url: &str, prefix: &str) -> Result<Opened, Failure> {
    let conn = keygate::RedisConnection::open(url).map_err(|e| Failure(1, format!("redis URL: {e}")))?;
    let store = keygate::store::RedisKeyStore::new(conn, prefix).timeout(std::time::Duration::from_secs(10));
    Ok(Opened::Shared {
        admin: LocalVerifier::new(store),
        #[cfg(feature = "postgres")]
        postgres: None,
    })
}

#[cfg(not(feature = "redis"))]
fn redis(_: &str, _: &str) -> Result<Opened, Failure> {
    Err(Failure(1, "this keygate was built without the `redis` feature".into()))
}

/// Reads a key file (none yet is an empty one), holding `<file>.lock` so that two admins
/// changing one file take turns instead of one undoing the other.
async fn file(path: PathBuf) -> Result<Opened, Failure> {
    let io = |what: &str, e: std::io::Error| Failure(1, format!("{what} {}: {e}", path.display()));
    let lock_path = path.with_extension("toml.lock");
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path);
    let lock = lock.map_err(|e| io("lock file for", e))?;
    lock.lock().map_err(|e| io("lock", e))?;
    let store = MemoryStore::new();
    if path.exists() {
        let file = KeyFile::read(&path).map_err(|e| Failure(1, e.to_string()))?;
        for (digest, key) in file.keys {
            store.insert(digest, key).await?;
        }
    }
    Ok(Opened::File { path, admin: LocalVerifier::new(store), _lock: lock })
}

impl Opened {
    pub(crate) fn admin(&self) -> &LocalVerifier {
        match self {
            Self::File { admin, .. } | Self::Shared { admin, .. } => admin,
        }
    }

    pub(crate) async fn migrate(&self) -> Result<(), Failure> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Shared { postgres: Some(store), .. } => Ok(store.migrate().await?),
            _ => Err(super::usage("only a PostgreSQL store has migrations")),
        }
    }

    /// Writes a key file back (digests only), through a temporary file renamed over it, so that
    /// a reader never sees half a file.
    pub(crate) async fn save(&self) -> Result<(), Failure> {
        let Self::File { path, admin, .. } = self else { return Ok(()) };
        let keys = admin.store().list(None).await?;
        let keys = KeyFile::render(&keys).map_err(|e| Failure(1, e.to_string()))?;
        let text = format!("# keygate key file: digests only, written by `keygate`.\n{keys}");
        let tmp = path.with_extension("toml.tmp");
        let io = |e: std::io::Error| Failure(1, format!("writing {}: {e}", path.display()));
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}
