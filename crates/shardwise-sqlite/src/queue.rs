//! Queues in SQLite: dead letters, alerts and the runner's on-failure records, each a named
//! queue of JSON message bodies in one table.

use std::sync::Arc;

use rusqlite::params;

use crate::{LocalDb, LocalError, now_ms};
use shardwise::dead_letter::{DeadLetterSink, EntryFailure, SinkEntry, SinkError};

/// One message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMessage {
    pub id: i64,
    pub body: String,
    pub sent_at_ms: i64,
}

/// A named queue in a [`LocalDb`]. As a [`DeadLetterSink`] it takes the same SQS-sized batches
/// the publisher makes for SQS, so size and count limits are exercised locally too.
#[derive(Debug, Clone)]
pub struct SqliteQueue {
    db: Arc<LocalDb>,
    queue: String,
}

impl SqliteQueue {
    pub fn new(db: Arc<LocalDb>, queue: impl Into<String>) -> Self {
        Self {
            db,
            queue: queue.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.queue
    }

    /// Append `bodies` in one transaction.
    pub fn send_all<S: AsRef<str>>(&self, bodies: &[S]) -> Result<(), LocalError> {
        let at = now_ms();
        self.db.with(|conn| {
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO queue_messages (queue, body, sent_at_ms) VALUES (?1, ?2, ?3)",
                )?;
                for body in bodies {
                    insert.execute(params![self.queue, body.as_ref(), at])?;
                }
            }
            tx.commit()
        })
    }

    pub fn count(&self) -> Result<u64, LocalError> {
        self.db.with(|conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM queue_messages WHERE queue = ?1",
                [&self.queue],
                |row| row.get::<_, i64>(0),
            )
            .map(|n| u64::try_from(n).unwrap_or(0))
        })
    }

    /// Messages in the order sent, after message id `after` (0 for all), at most `limit`.
    pub fn messages(&self, after: i64, limit: usize) -> Result<Vec<QueueMessage>, LocalError> {
        self.db.with(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT id, body, sent_at_ms FROM queue_messages
                 WHERE queue = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows = statement.query_map(
                params![self.queue, after, i64::try_from(limit).unwrap_or(i64::MAX)],
                |row| {
                    Ok(QueueMessage {
                        id: row.get(0)?,
                        body: row.get(1)?,
                        sent_at_ms: row.get(2)?,
                    })
                },
            )?;
            rows.collect()
        })
    }
}

impl DeadLetterSink for SqliteQueue {
    async fn send_batch(&self, entries: &[SinkEntry]) -> Result<Vec<EntryFailure>, SinkError> {
        let bodies: Vec<&str> = entries.iter().map(|e| e.body.as_str()).collect();
        self.send_all(&bodies).map_err(SinkError::new)?;
        Ok(Vec::new())
    }
}
