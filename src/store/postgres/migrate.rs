//! The store's migrations, embedded, applied when the application asks
//! ([`PostgresKeyStore::migrate`]), each once, in order, under a lock.

use super::{backend, PostgresKeyStore};
use crate::store::StoreError;
use sha2::{Digest, Sha256};
use sqlx::AssertSqlSafe;

/// `(version, name, SQL)`, in order. The SQL names the schema `keygate`; it is replaced by the
/// store's. A migration, once released, never changes (its checksum is checked): add another.
const MIGRATIONS: &[(i32, &str, &str)] = &[(1, "keys", include_str!("0001_keys.sql"))];

/// The SQL of a migration for `schema`.
fn for_schema(sql: &str, schema: &str) -> String {
    sql.replace("EXISTS keygate;", &format!("EXISTS {schema};")).replace("keygate.", &format!("{schema}."))
}

impl PostgresKeyStore {
    /// Creates the store's schema and tables, or brings them up to this version: each migration
    /// not yet applied, in order, in one transaction. Safe to call from every instance at start-up
    /// (they take turns under an advisory lock, and all but the first find nothing to do).
    ///
    /// # Errors
    /// [`StoreError::Invalid`] when the database holds a migration this code does not know (it
    /// was migrated by a newer keygate) or one that differs from this code's;
    /// [`StoreError::Backend`] when PostgreSQL fails.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let schema = &*self.schema;
        let mut tx = self.pool.begin().await.map_err(backend)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("keygate-migrate:{schema}"))
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        let ledger = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; CREATE TABLE IF NOT EXISTS {schema}.migrations \
             (version int PRIMARY KEY, name text NOT NULL, checksum bytea NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())"
        );
        sqlx::raw_sql(AssertSqlSafe(ledger)).execute(&mut *tx).await.map_err(backend)?;
        let applied: Vec<(i32, Vec<u8>)> =
            sqlx::query_as(AssertSqlSafe(format!("SELECT version, checksum FROM {schema}.migrations")))
                .fetch_all(&mut *tx)
                .await
                .map_err(backend)?;
        for (version, checksum) in &applied {
            match MIGRATIONS.iter().find(|(v, ..)| v == version) {
                None => {
                    return Err(StoreError::Invalid(format!(
                        "schema {schema} is at migration {version}, which this keygate does not know: upgrade keygate"
                    )))
                }
                Some((_, name, sql)) if Sha256::digest(sql.as_bytes()).as_slice() != checksum.as_slice() => {
                    return Err(StoreError::Invalid(format!(
                        "migration {version} ({name}) differs from the one applied"
                    )))
                }
                Some(_) => {}
            }
        }
        for (version, name, sql) in MIGRATIONS {
            if applied.iter().any(|(v, _)| v == version) {
                continue;
            }
            sqlx::raw_sql(AssertSqlSafe(for_schema(sql, schema))).execute(&mut *tx).await.map_err(backend)?;
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {schema}.migrations (version, name, checksum) VALUES ($1, $2, $3)"
            )))
            .bind(version)
            .bind(name)
            .bind(Sha256::digest(sql.as_bytes()).to_vec())
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
            tracing::info!(schema, version, name, "keygate: applied a key store migration");
        }
        tx.commit().await.map_err(backend)
    }
}
