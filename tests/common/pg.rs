//! A PostgreSQL schema of a test's own, dropped when the test ends (passed or not).

use keygate::store::PostgresKeyStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The shared PostgreSQL. Tests that use it are ignored (not passed) when `DATABASE_URL` was not
/// set at build time; see build.rs.
pub(crate) fn database_url() -> String {
    std::env::var("DATABASE_URL").expect("DATABASE_URL is set (this test is ignored otherwise)")
}

/// `DATABASE_URL`'s options, read as the store reads a URL (a URL without a user, as CI's, means
/// the OS user).
pub(crate) fn options() -> PgConnectOptions {
    PostgresKeyStore::options(&database_url()).unwrap()
}

/// A schema no other test (or earlier run) uses; dropped on drop.
pub(crate) struct Schema {
    pub(crate) name: String,
}

impl Schema {
    pub(crate) fn new(test: &str) -> Self {
        let mut n = [0u8; 6];
        getrandom::fill(&mut n).unwrap();
        let tag: String = n.iter().map(|b| format!("{b:02x}")).collect();
        Self { name: format!("kgt_{test}_{tag}") }
    }

    /// A store in this schema on a pool of its own, its connections named `app` (to find them in
    /// `pg_stat_activity`), migrated.
    pub(crate) async fn store(&self, app: &str) -> PostgresKeyStore {
        self.store_with(app, 8).await
    }

    /// As [`store`](Self::store), on a pool of `size` connections.
    pub(crate) async fn store_with(&self, app: &str, size: u32) -> PostgresKeyStore {
        let options = options().application_name(app);
        let pool = PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(std::time::Duration::from_secs(1))
            .connect_lazy_with(options);
        let store = PostgresKeyStore::new(pool).in_schema(&self.name).unwrap();
        store.migrate().await.unwrap();
        store
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.name.clone();
        // A runtime of its own: the test's may be shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let pool = PgPoolOptions::new().max_connections(1).connect_with(options()).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {name} CASCADE"))).execute(&pool).await
            })
        })
        .join();
    }
}

/// The backend process ids of `app`'s connections that last ran a `LISTEN`.
pub(crate) async fn listener_pids(store: &PostgresKeyStore, app: &str) -> Vec<i32> {
    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'")
        .bind(app)
        .fetch_all(store.pool())
        .await
        .unwrap()
}
