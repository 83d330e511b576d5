//! Embedded backends: the tables and queues of a Shardwise function in one SQLite file, for the
//! local runner (`shardwise run`, `make demo`) where there is no AWS account and no emulator.
//! A crate of its own so that the Lambda builds carry no SQLite: functions depend on it through
//! their `local` feature only.
//!
//! Each backend implements the *same* trait as its AWS counterpart, so a function's `main.rs`
//! swaps `DynamoDbIdempotencyStore` for [`SqliteIdempotencyStore`], `SqsDeadLetterSink` for
//! [`SqliteQueue`], and so on, and nothing else changes:
//!
//! | AWS                          | here                                  | trait |
//! |------------------------------|---------------------------------------|-------|
//! | DynamoDB idempotency table   | [`SqliteIdempotencyStore`]            | `shardwise::idempotency::IdempotencyStore` |
//! | SQS queue (dead letters, alerts, on-failure) | [`SqliteQueue`]       | `shardwise::dead_letter::DeadLetterSink` |
//! | any other DynamoDB table     | [`SqliteTable`]: items as attribute maps, conditional puts | (functions adapt their own store traits to it) |
//!
//! # Several processes, one file
//! The local runner starts one process per function instance, as Lambda does, and they all open
//! the same file. SQLite in WAL mode lets readers run beside one writer; a writer that finds the
//! file locked waits ([`BUSY_TIMEOUT`]) instead of failing. Every multi-row change is one
//! transaction, which gives the all-or-nothing `TransactWriteItems` semantics the idempotency
//! claim relies on. Calls are synchronous and short (microseconds to a few milliseconds), so
//! they run on the caller's task rather than a blocking pool.
//!
//! # Chosen explicitly, never as a fallback
//! A function uses these only when told to (`SHARDWISE_BACKEND=local`, read by the example
//! functions' start-up, `shardwise_cards::start`), never because AWS is unreachable: in Lambda
//! that would acknowledge records into a file that disappears with the sandbox.

mod idempotency;
mod queue;
mod table;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::Connection;

pub use idempotency::SqliteIdempotencyStore;
pub use queue::{QueueMessage, SqliteQueue};
pub use table::{Condition, PutResult, SqliteTable, item_from_json, item_to_json};

/// How long a writer waits for another process's transaction before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Queue names the runner and the functions agree on.
pub mod queues {
    /// Our dead letters, with payloads (`DEAD_LETTER_QUEUE_URL` in AWS).
    pub const DEAD_LETTERS: &str = "dead-letters";
    /// Lambda's on-failure destination records (metadata only), written by the runner.
    pub const ON_FAILURE: &str = "on-failure";
    /// Fraud alerts (`ALERTS_QUEUE_URL` in AWS).
    pub const ALERTS: &str = "alerts";
}

/// A failed local store call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    #[error("local database {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("local database {path}: {message}")]
    Corrupt { path: String, message: String },
}

/// One SQLite file holding every local table and queue.
#[derive(Debug)]
pub struct LocalDb {
    path: PathBuf,
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    payload_hash TEXT,
    request_id TEXT
);
CREATE TABLE IF NOT EXISTS queue_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body TEXT NOT NULL,
    sent_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_messages_by_queue ON queue_messages (queue, id);
CREATE TABLE IF NOT EXISTS items (
    tbl TEXT NOT NULL,
    id TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (tbl, id)
);
";

/// Open (creating if needed) an SQLite file shared by several processes — WAL mode, `NORMAL`
/// sync, a busy timeout — and run `schema` on it.
///
/// Several processes open a fresh state directory at once (a runner per function, a function's
/// instances), and SQLite answers `SQLITE_BUSY` at once, without waiting out the busy timeout,
/// when two connections race to switch a new file to WAL or to create its tables (waiting
/// could deadlock them). So the whole sequence is retried, after a short pause, until
/// [`BUSY_TIMEOUT`] has passed.
pub fn open_shared(path: &Path, schema: &str) -> rusqlite::Result<Connection> {
    let give_up = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(5);
    loop {
        let attempt = Connection::open(path).and_then(|conn| {
            conn.busy_timeout(BUSY_TIMEOUT)?;
            // WAL: readers never block the writer; NORMAL sync is durable across process
            // crashes (what the runner's kill tests need), just not across power loss.
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.execute_batch(schema)?;
            Ok(conn)
        });
        match attempt {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < give_up =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

impl LocalDb {
    /// Open (creating if needed) the database at `path`, in WAL mode with a busy timeout.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LocalError> {
        let path = path.as_ref().to_path_buf();
        let wrap = |source| LocalError::Sqlite {
            path: path.display().to_string(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| LocalError::Corrupt {
                path: path.display().to_string(),
                message: format!("cannot create {}: {e}", parent.display()),
            })?;
        }
        let conn = open_shared(&path, SCHEMA).map_err(wrap)?;
        Ok(Self {
            path,
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` on the connection (one process-wide lock: SQLite serializes writers anyway).
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, LocalError> {
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut conn).map_err(|source| LocalError::Sqlite {
            path: self.path.display().to_string(),
            source,
        })
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A runner per function and every function instance open a fresh state directory at
    /// once: none of them may fail with "database is locked".
    #[test]
    fn many_connections_opening_a_fresh_file_at_once_all_succeed() {
        for round in 0..20 {
            let path = std::env::temp_dir()
                .join(format!("shardwise-open-{}-{round}.db", std::process::id()));
            let opened: Vec<_> = (0..8)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || LocalDb::open(&path).map(|_| ()))
                })
                .collect();
            for handle in opened {
                let result = handle.join().unwrap();
                assert!(result.is_ok(), "{result:?}");
            }
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
    }
}
