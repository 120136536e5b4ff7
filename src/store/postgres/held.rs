//! A pooled connection that is closed, not returned to the pool, unless its work finished.
//!
//! Why: every operation runs under the store's timeout, and a timeout drops the operation half-way.
//! Returned to the pool then, a connection whose peer went silent waits forever for the rest of an
//! answer that never comes, and holds its slot in the pool for good: one silent network path would
//! turn every slot, one by one, into a `503` until the application restarts. Closed instead, it
//! frees its slot, and the next operation opens a fresh connection.
//!
//! What this cannot cover: sqlx checks a connection with one round trip as it takes it back, with
//! no timeout of its own. A peer that goes silent in that instant (and keeps the TCP connection
//! open, as a stalled server does) holds that one slot until it answers or TCP gives up on it
//! (about 15 minutes on Linux); the pool's other slots go on working.

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::Postgres;

pub(super) struct Held {
    conn: PoolConnection<Postgres>,
    done: bool,
}

impl Held {
    pub(super) async fn acquire(pool: &PgPool) -> Result<Self, sqlx::Error> {
        Ok(Self { conn: pool.acquire().await?, done: false })
    }

    pub(super) fn as_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// The work finished (well or not, but with an answer): the pool may have it back.
    pub(super) fn done(&mut self) {
        self.done = true;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.done {
            self.conn.close_on_drop();
        }
    }
}
