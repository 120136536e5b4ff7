//! Keys of record in PostgreSQL (feature `postgres`), with revocations by `LISTEN/NOTIFY`.
//!
//! Layout, in one schema (`keygate` unless chosen): `keys` (a key's facts as JSON, whether it is
//! enabled or deleted, its revision), `digests` (the SHA-256 of its current secret, and of secrets
//! rotated away with the end of their grace window), `migrations`. Triggers announce every change
//! on the channel `keygate:<schema>`, whoever makes it, at commit.
//!
//! Why sqlx: it is maintained, pure Rust, pools connections, and its `PgListener` speaks
//! `LISTEN/NOTIFY`. Its migration runner is not used: it keeps one table per search path, so two
//! stores in two schemas of one database would share it; [`migrate`](PostgresKeyStore::migrate)
//! keeps its own, per schema.

mod held;
mod listen;
mod migrate;

use held::Held;

use super::{unix_ms, KeyStore, Previous, StoreError, StoredKey};
use crate::boxed::BoxFuture;
use crate::facts::KeyFacts;
use crate::key::KeyDigest;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};
use std::sync::Arc;
use std::time::Duration;

/// A [`KeyStore`] in PostgreSQL, shared by every instance.
///
/// Nothing is created behind your back: call [`migrate`](Self::migrate) once at start-up (it is
/// safe from many instances at once), then [`listen`](Self::listen) to drop revoked keys from the
/// cache within milliseconds.
///
/// The example runs against the PostgreSQL at `DATABASE_URL` (and is reported ignored where that
/// is unset).
///
#[cfg_attr(keygate_database_url, doc = "```rust")]
#[cfg_attr(not(keygate_database_url), doc = "```rust,ignore")]
#[doc = include_str!("../../../docs/postgres_key_store.md")]
#[derive(Clone)]
pub struct PostgresKeyStore {
    pool: PgPool,
    schema: Arc<str>,
    sql: Arc<Statements>,
    timeout: Duration,
}

/// The statements, with the schema written in once.
#[derive(Debug)]
struct Statements {
    get: Arc<str>,
    find: Arc<str>,
    list: Arc<str>,
    insert: Arc<str>,
    update: Arc<str>,
    forget_digests: Arc<str>,
    add_digests: Arc<str>,
}

/// The columns every read returns, after the digest the row was found by.
const RECORD: &str = "k.facts::text, k.enabled, k.deleted, k.revision, \
     ARRAY(SELECT p.digest FROM S.digests p WHERE p.id = k.id AND p.grace_ends IS NOT NULL ORDER BY p.digest), \
     ARRAY(SELECT (extract(epoch FROM p.grace_ends) * 1000)::int8 FROM S.digests p \
           WHERE p.id = k.id AND p.grace_ends IS NOT NULL ORDER BY p.digest)";

impl Statements {
    fn new(schema: &str) -> Self {
        let s = |sql: &str| -> Arc<str> { sql.replace("S.", &format!("{schema}.")).into() };
        let record = RECORD;
        Self {
            get: s(&format!(
                "SELECT d.digest, {record}, (extract(epoch FROM d.grace_ends) * 1000)::int8 \
                 FROM S.digests d JOIN S.keys k ON k.id = d.id WHERE d.digest = $1"
            )),
            find: s(&format!(
                "SELECT d.digest, {record}, NULL::int8 FROM S.keys k \
                 JOIN S.digests d ON d.id = k.id AND d.grace_ends IS NULL WHERE k.id = $1"
            )),
            list: s(&format!(
                "SELECT d.digest, {record}, NULL::int8 FROM S.keys k \
                 JOIN S.digests d ON d.id = k.id AND d.grace_ends IS NULL \
                 WHERE $1::text IS NULL OR k.customer_id = $1 ORDER BY k.id"
            )),
            insert: s("WITH k AS (INSERT INTO S.keys (id, facts, enabled, deleted) VALUES ($1, $2::jsonb, $3, $4) \
                       RETURNING id) INSERT INTO S.digests (digest, id) SELECT $5, id FROM k"),
            // The revision trigger sets it to the one read + 1.
            update: s("UPDATE S.keys k SET facts = $3::jsonb, enabled = $4, deleted = $5 \
                       WHERE k.id = $1 AND k.revision = $2 AND EXISTS (SELECT 1 FROM S.digests d \
                       WHERE d.id = $1 AND d.digest = $6 AND d.grace_ends IS NULL)"),
            forget_digests: s("DELETE FROM S.digests WHERE id = $1"),
            add_digests: s("INSERT INTO S.digests (digest, id, grace_ends) \
                            SELECT t.d, $1, CASE WHEN t.ms IS NULL THEN NULL \
                            ELSE 'epoch'::timestamptz + t.ms * interval '1 millisecond' END \
                            FROM unnest($2::bytea[], $3::int8[]) AS t(d, ms)"),
        }
    }
}

/// Why a schema name is refused, if it is: it is written into SQL and into the channel's name
/// (at most 63 bytes with `keygate:`), so it is a plain lower-case identifier of at most 50 bytes.
fn check_schema(schema: &str) -> Result<(), StoreError> {
    let first_ok = schema.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    let rest_ok = schema.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if first_ok && rest_ok && schema.len() <= 50 {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("schema name {schema:?}: 1 to 50 of [a-z0-9_], not starting with a digit")))
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Whether the database refused a row because its key (an id or a digest) is taken.
fn is_taken(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

impl PostgresKeyStore {
    /// A store on `pool`, in the schema `keygate`.
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self::build(pool, "keygate")
    }

    /// A store on a pool of up to 8 connections to `url` (`postgres://…`), made when first
    /// needed: this does no I/O.
    ///
    /// # Errors
    /// As [`options`](Self::options).
    pub fn connect_lazy(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy_with(Self::options(url)?);
        Ok(Self::new(pool))
    }

    /// The connection options of `url`, for a pool of your own. As with `psql`, a URL without a
    /// user means `PGUSER`, or else the user this process runs as.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a URL sqlx cannot read (the message never repeats the URL,
    /// which may hold a password).
    pub fn options(url: &str) -> Result<PgConnectOptions, StoreError> {
        let options = url.parse::<PgConnectOptions>().map_err(|e| StoreError::Invalid(format!("database URL: {e}")))?;
        let has_user =
            url.split_once("://").is_some_and(|(_, rest)| rest.split('/').next().unwrap_or("").contains('@'));
        if has_user || std::env::var_os("PGUSER").is_some() {
            return Ok(options);
        }
        Ok(match os_user() {
            Some(user) => options.username(&user),
            None => options,
        })
    }

    /// This store in another schema (one database can hold several stores).
    ///
    /// # Errors
    /// [`StoreError::Invalid`] unless `schema` is 1 to 50 of `[a-z0-9_]`, not starting with a digit.
    pub fn in_schema(self, schema: &str) -> Result<Self, StoreError> {
        check_schema(schema)?;
        Ok(Self::build(self.pool, schema).timeout(self.timeout))
    }

    fn build(pool: PgPool, schema: &str) -> Self {
        Self { pool, schema: schema.into(), sql: Arc::new(Statements::new(schema)), timeout: Duration::from_secs(1) }
    }

    /// How long one operation may take (default 1 s); past it, the operation fails and the gate
    /// answers `503` (or a stale cached answer).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The schema.
    #[must_use]
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The pool.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The channel revocations are announced on: `keygate:<schema>`.
    #[must_use]
    pub fn channel(&self) -> String {
        format!("keygate:{}", self.schema)
    }

    async fn timed<T>(&self, op: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Backend(format!("PostgreSQL did not answer in {:?}", self.timeout))),
        }
    }

    async fn read_one<T>(&self, sql: &Arc<str>, arg: T) -> Result<Option<(KeyDigest, StoredKey)>, StoreError>
    where
        T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
    {
        let started = std::time::Instant::now();
        let row = self
            .timed(async {
                let mut conn = Held::acquire(&self.pool).await.map_err(backend)?;
                let row = sqlx::query(AssertSqlSafe(sql.clone())).bind(arg).fetch_optional(conn.as_mut()).await;
                conn.done();
                row.map_err(backend)
            })
            .await;
        crate::observe::postgres_store(if row.is_ok() { "ok" } else { "error" }, started.elapsed());
        row?.map(|r| record(&r)).transpose()
    }

    async fn write(&self, digest: KeyDigest, key: StoredKey) -> Result<(), StoreError> {
        let facts = serde_json::to_string(&stored_facts(&key.facts)).map_err(backend)?;
        let insert = sqlx::query(AssertSqlSafe(self.sql.insert.clone()))
            .bind(&key.facts.id)
            .bind(facts)
            .bind(key.enabled)
            .bind(key.deleted)
            .bind(digest.as_bytes().as_slice());
        let inserted = self.timed(async {
            let mut conn = Held::acquire(&self.pool).await.map_err(backend)?;
            let inserted = insert.execute(conn.as_mut()).await;
            conn.done();
            inserted.map_err(backend_or_taken(&key.facts.id))
        });
        inserted.await.map(|_| ())
    }
}

/// A failed write's error: [`StoreError::Exists`] when the id or digest is taken.
fn backend_or_taken(id: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
    move |e| if is_taken(&e) { StoreError::Exists(id.to_owned()) } else { backend(e) }
}

/// The user this process runs as, as libpq finds it: `$USER`, `$LOGNAME`, or (where neither is
/// set, as in some containers) the password file's name for this process's uid. sqlx would
/// otherwise fall back to a name no server has.
fn os_user() -> Option<String> {
    let from_env = ["USER", "LOGNAME"].iter().find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()));
    from_env.or_else(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let uid = status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.to_owned();
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == uid)
            .map(|f| f[0].to_owned())
    })
}

/// The facts as stored: without what a store sets on the way out.
fn stored_facts(facts: &KeyFacts) -> KeyFacts {
    KeyFacts { grace_ends: None, ..facts.clone() }
}

/// A row of [`RECORD`] (after the digest): the key's record, or its copy for an earlier secret
/// when the row was found by one.
fn record(row: &PgRow) -> Result<(KeyDigest, StoredKey), StoreError> {
    let digest = digest_of(&row.try_get::<Vec<u8>, _>(0).map_err(backend)?)?;
    let facts: String = row.try_get(1).map_err(backend)?;
    let facts: KeyFacts = serde_json::from_str(&facts).map_err(backend)?;
    let previous_digests: Vec<Vec<u8>> = row.try_get(5).map_err(backend)?;
    let previous_ends: Vec<i64> = row.try_get(6).map_err(backend)?;
    let previous = previous_digests
        .iter()
        .zip(previous_ends)
        .map(|(d, ms)| Ok(Previous { digest: digest_of(d)?, until: from_db_ms(ms) }))
        .collect::<Result<_, StoreError>>()?;
    let key = StoredKey {
        facts: Arc::new(facts),
        enabled: row.try_get(2).map_err(backend)?,
        deleted: row.try_get(3).map_err(backend)?,
        revision: u64::try_from(row.try_get::<i64, _>(4).map_err(backend)?).unwrap_or(0),
        previous,
    };
    Ok(match row.try_get::<Option<i64>, _>(7).map_err(backend)? {
        Some(ms) => (digest, key.grace_copy(from_db_ms(ms))),
        None => (digest, key),
    })
}

/// A time the database gave as milliseconds since the epoch (`bigint`; never negative here).
fn from_db_ms(ms: i64) -> std::time::SystemTime {
    unix_ms::from_ms(u64::try_from(ms).unwrap_or(0))
}

fn digest_of(bytes: &[u8]) -> Result<KeyDigest, StoreError> {
    <[u8; 32]>::try_from(bytes).map(KeyDigest::from_bytes).map_err(|_| backend("a stored digest is not 32 bytes"))
}

impl KeyStore for PostgresKeyStore {
    fn get(&self, digest: &KeyDigest) -> BoxFuture<'static, Result<Option<StoredKey>, StoreError>> {
        let (this, digest) = (self.clone(), *digest);
        Box::pin(async move {
            let found = this.read_one(&this.sql.get, digest.as_bytes().to_vec()).await?;
            Ok(found.map(|(_, key)| key))
        })
    }

    fn find(&self, id: &str) -> BoxFuture<'static, Result<Option<(KeyDigest, StoredKey)>, StoreError>> {
        let (this, id) = (self.clone(), id.to_owned());
        Box::pin(async move { this.read_one(&this.sql.find, id).await })
    }

    fn insert(&self, digest: KeyDigest, key: StoredKey) -> BoxFuture<'static, Result<(), StoreError>> {
        let this = self.clone();
        Box::pin(async move { this.write(digest, key).await })
    }

    fn replace(
        &self,
        current: KeyDigest,
        was: &StoredKey,
        digest: KeyDigest,
        next: StoredKey,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        let previous = super::kept_previous(current, was, digest, &next);
        let digests_change = digest != current || previous != was.previous;
        let (this, id, revision) = (self.clone(), was.facts.id.clone(), was.revision);
        Box::pin(async move {
            let facts = serde_json::to_string(&stored_facts(&next.facts)).map_err(backend)?;
            let revision = i64::try_from(revision).map_err(backend)?;
            let work = async {
                let mut conn = Held::acquire(&this.pool).await?;
                let mut tx = sqlx::Connection::begin(conn.as_mut()).await?;
                let updated = sqlx::query(AssertSqlSafe(this.sql.update.clone()))
                    .bind(&id)
                    .bind(revision)
                    .bind(facts)
                    .bind(next.enabled)
                    .bind(next.deleted)
                    .bind(current.as_bytes().as_slice())
                    .execute(&mut *tx)
                    .await?;
                if updated.rows_affected() == 0 {
                    tx.rollback().await?; // changed since it was read
                    conn.done();
                    return Ok(false);
                }
                if digests_change {
                    let mut digests = vec![digest.as_bytes().to_vec()];
                    let mut ends: Vec<Option<i64>> = vec![None];
                    for p in &previous {
                        digests.push(p.digest.as_bytes().to_vec());
                        ends.push(Some(i64::try_from(unix_ms::to_ms(p.until)).unwrap_or(i64::MAX)));
                    }
                    sqlx::query(AssertSqlSafe(this.sql.forget_digests.clone())).bind(&id).execute(&mut *tx).await?;
                    let added = sqlx::query(AssertSqlSafe(this.sql.add_digests.clone()))
                        .bind(&id)
                        .bind(digests)
                        .bind(ends)
                        .execute(&mut *tx)
                        .await;
                    match added {
                        Err(e) if is_taken(&e) => {
                            tx.rollback().await?; // the new digest is another key's
                            conn.done();
                            return Ok(false);
                        }
                        other => other?,
                    };
                }
                tx.commit().await?;
                conn.done();
                Ok::<_, sqlx::Error>(true)
            };
            this.timed(async { work.await.map_err(backend) }).await
        })
    }

    fn list(&self, customer: Option<&str>) -> BoxFuture<'static, Result<Vec<(KeyDigest, StoredKey)>, StoreError>> {
        let (this, customer) = (self.clone(), customer.map(str::to_owned));
        Box::pin(async move {
            let rows = this
                .timed(async {
                    let mut conn = Held::acquire(&this.pool).await.map_err(backend)?;
                    let rows =
                        sqlx::query(AssertSqlSafe(this.sql.list.clone())).bind(customer).fetch_all(conn.as_mut()).await;
                    conn.done();
                    rows.map_err(backend)
                })
                .await?;
            rows.iter().map(record).collect()
        })
    }
}

impl std::fmt::Debug for PostgresKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresKeyStore").field("schema", &self.schema).finish_non_exhaustive()
    }
}
