//! One migration at a time per keyspace: concurrent schema changes of the same table
//! are not safe on every Cassandra version, and two `switchboard migrate` (or a
//! `migrate` next to instances starting with `migrate_on_start`) must not apply the
//! same migration side by side.
//!
//! The lock is one row of `migration_lock`, taken with a lightweight transaction
//! (`INSERT ... IF NOT EXISTS`) and written with a TTL ([`LOCK_TTL`]) that its holder
//! renews after each migration, so a migrator that dies leaves the keyspace lockable
//! again once the TTL runs out. A migrator that finds the lock taken waits for it (up
//! to [`LOCK_WAIT`]) and then reads the schema version again: the work is usually done.
//! The keyspace and the lock table themselves are created before the lock, by
//! idempotent statements.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ::scylla::client::session::Session;
use ::scylla::response::query_result::QueryResult;
use ::scylla::value::CqlValue;

use super::{open_error, OpenError};

/// The lock table, created (if missing) before the lock is taken.
pub(super) const LOCK_TABLE: &str = "CREATE TABLE IF NOT EXISTS migration_lock (
    name           text PRIMARY KEY,
    holder         text,
    acquired_at_ms bigint
)";
/// How long a lock row lives unless its holder renews it.
pub(super) const LOCK_TTL: Duration = Duration::from_secs(120);
/// How long a migrator waits for another one before giving up.
pub(super) const LOCK_WAIT: Duration = Duration::from_secs(300);
/// The pause between two attempts to take a held lock.
const RETRY: Duration = Duration::from_millis(500);
/// The one lock row: the schema's.
const NAME: &str = "schema";

/// The migration lock of one keyspace, held by this process.
pub(super) struct MigrationLock {
    keyspace: String,
    holder: String,
}

impl MigrationLock {
    /// Take the lock of `keyspace`, waiting up to `wait` for another holder.
    pub(super) async fn acquire(
        session: &Session,
        keyspace: &str,
        wait: Duration,
    ) -> Result<MigrationLock, OpenError> {
        let holder = format!(
            "pid {} at {}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let deadline = Instant::now() + wait;
        let mut logged = false;
        loop {
            let result = session
                .query_unpaged(
                    format!(
                        "INSERT INTO {keyspace}.migration_lock (name, holder, acquired_at_ms) \
                         VALUES (?, ?, ?) IF NOT EXISTS USING TTL ?"
                    ),
                    (NAME, holder.as_str(), super::now_ms(), ttl_secs()),
                )
                .await
                .map_err(|e| open_error("the cluster", e))?;
            let (applied, current) = conditional(result)?;
            if applied {
                return Ok(MigrationLock {
                    keyspace: keyspace.to_owned(),
                    holder,
                });
            }
            let other = match current.get("holder") {
                Some(CqlValue::Text(h)) => h.clone(),
                _ => "another migrator".into(),
            };
            if Instant::now() >= deadline {
                return Err(OpenError::Other(format!(
                    "keyspace {keyspace}: another migration ({other}) holds the migration \
                     lock; waited {}s. If no migration runs, the lock expires by itself \
                     {}s after it was last renewed",
                    wait.as_secs(),
                    LOCK_TTL.as_secs()
                )));
            }
            if !logged {
                tracing::info!(keyspace, holder = %other, "waiting for another migration");
                logged = true;
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Extend the lock by [`LOCK_TTL`]; fails when it is no longer this process's (it
    /// expired and someone else took it).
    pub(super) async fn renew(&self, session: &Session) -> Result<(), OpenError> {
        let result = session
            .query_unpaged(
                format!(
                    "UPDATE {}.migration_lock USING TTL ? SET acquired_at_ms = ? \
                     WHERE name = ? IF holder = ?",
                    self.keyspace
                ),
                (ttl_secs(), super::now_ms(), NAME, self.holder.as_str()),
            )
            .await
            .map_err(|e| open_error("the cluster", e))?;
        if conditional(result)?.0 {
            Ok(())
        } else {
            Err(OpenError::Other(format!(
                "keyspace {}: the migration lock expired while migrating (a migration took \
                 longer than {}s); run `switchboard migrate` again",
                self.keyspace,
                LOCK_TTL.as_secs()
            )))
        }
    }

    /// Give the lock back (if it is still this process's).
    pub(super) async fn release(self, session: &Session) -> Result<(), OpenError> {
        session
            .query_unpaged(
                format!(
                    "DELETE FROM {}.migration_lock WHERE name = ? IF holder = ?",
                    self.keyspace
                ),
                (NAME, self.holder.as_str()),
            )
            .await
            .map_err(|e| open_error("the cluster", e))?;
        Ok(())
    }
}

fn ttl_secs() -> i32 {
    i32::try_from(LOCK_TTL.as_secs()).unwrap_or(i32::MAX)
}

/// [`super::lwt_outcome`], its errors as migration errors.
fn conditional(result: QueryResult) -> Result<(bool, HashMap<String, CqlValue>), OpenError> {
    super::lwt_outcome(result).map_err(|e| OpenError::Other(format!("migration lock: {e}")))
}
