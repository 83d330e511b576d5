//! The idempotency table in SQLite, behind the same trait (and limits) as DynamoDB's.

use std::sync::Arc;

use rusqlite::{OptionalExtension, params};

use crate::LocalDb;
use shardwise::idempotency::{
    ClaimOutcome, ClaimVerdict, Fetched, IdempotencyStore, RecordStatus, StoreError, StoreWrite,
    StoredRecord,
};

/// Idempotency records in the `idempotency` table of a [`LocalDb`]. Claims are one transaction:
/// all keys locked, or none and a verdict per key, as `TransactWriteItems` answers.
#[derive(Debug, Clone)]
pub struct SqliteIdempotencyStore {
    db: Arc<LocalDb>,
}

impl SqliteIdempotencyStore {
    pub fn new(db: Arc<LocalDb>) -> Self {
        Self { db }
    }
}

const IN_PROGRESS: &str = "INPROGRESS";
const COMPLETED: &str = "COMPLETED";

fn unavailable(error: crate::LocalError) -> StoreError {
    // A locked file past the busy timeout or an I/O error may pass: the gate retries.
    StoreError::Unavailable(error.to_string())
}

/// An `idempotency` row: key, status, expires_at, payload_hash, request_id.
type Row = (String, String, i64, Option<String>, Option<String>);

fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

fn to_record(
    (key, status, expires_at, payload_hash, request_id): Row,
) -> Result<StoredRecord, (String, String)> {
    let status = match status.as_str() {
        IN_PROGRESS => RecordStatus::InProgress {
            lock_expires_at: expires_at,
        },
        COMPLETED => RecordStatus::Completed { expires_at },
        other => return Err((key, format!("unknown status {other:?}"))),
    };
    Ok(StoredRecord {
        key,
        status,
        payload_hash,
        request_id,
    })
}

fn status_columns(status: &RecordStatus) -> (&'static str, i64) {
    match *status {
        RecordStatus::InProgress { lock_expires_at } => (IN_PROGRESS, lock_expires_at),
        RecordStatus::Completed { expires_at } => (COMPLETED, expires_at),
    }
}

fn put(tx: &rusqlite::Transaction<'_>, record: &StoredRecord) -> rusqlite::Result<usize> {
    let (status, expires_at) = status_columns(&record.status);
    tx.execute(
        "INSERT OR REPLACE INTO idempotency (key, status, expires_at, payload_hash, request_id)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            record.key,
            status,
            expires_at,
            record.payload_hash,
            record.request_id
        ],
    )
}

impl IdempotencyStore for SqliteIdempotencyStore {
    async fn get(&self, keys: &[&str]) -> Result<Fetched, StoreError> {
        let rows = self
            .db
            .with(|conn| {
                let mut statement = conn.prepare_cached(
                    "SELECT key, status, expires_at, payload_hash, request_id
                     FROM idempotency WHERE key = ?1",
                )?;
                let mut rows = Vec::with_capacity(keys.len());
                for key in keys {
                    if let Some(row) = statement.query_row([key], read_row).optional()? {
                        rows.push(row);
                    }
                }
                Ok(rows)
            })
            .map_err(unavailable)?;
        let mut fetched = Fetched::default();
        for row in rows {
            match to_record(row) {
                Ok(record) => fetched.records.push(record),
                Err(unreadable) => fetched.unreadable.push(unreadable),
            }
        }
        Ok(fetched)
    }

    async fn write(&self, writes: &[&StoreWrite]) -> Result<Vec<String>, StoreError> {
        self.db
            .with(|conn| {
                let tx = conn.transaction()?;
                for write in writes {
                    match write {
                        StoreWrite::Put(record) => {
                            put(&tx, record)?;
                        }
                        StoreWrite::Release { key, request_id } => {
                            tx.execute(
                                "DELETE FROM idempotency WHERE key = ?1 AND request_id = ?2",
                                [key, request_id],
                            )?;
                        }
                    }
                }
                tx.commit()
            })
            .map_err(unavailable)?;
        Ok(Vec::new())
    }

    async fn claim(
        &self,
        claims: &[&StoredRecord],
        now_s: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        self.db
            .with(|conn| {
                // IMMEDIATE: take the write lock before reading, so no other process can claim
                // a key between our check and our insert.
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let mut verdicts = Vec::with_capacity(claims.len());
                let mut taken = false;
                for claim in claims {
                    let live: Option<i64> = tx
                        .query_row(
                            // A live lock of the same invocation is its own, to take again.
                            "SELECT expires_at FROM idempotency WHERE key = ?1 AND expires_at > ?2
                             AND NOT (status = ?3 AND request_id IS NOT NULL AND request_id = ?4)",
                            params![claim.key, now_s, IN_PROGRESS, claim.request_id],
                            |row| row.get(0),
                        )
                        .optional()?;
                    if live.is_some() {
                        taken = true;
                        verdicts.push(ClaimVerdict::Taken);
                    } else {
                        verdicts.push(ClaimVerdict::NotAttempted);
                    }
                }
                if taken {
                    tx.rollback()?;
                    return Ok(ClaimOutcome::Cancelled(verdicts));
                }
                for claim in claims {
                    put(&tx, claim)?;
                }
                tx.commit()?;
                Ok(ClaimOutcome::Claimed)
            })
            .map_err(unavailable)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(key: &str, status: RecordStatus) -> StoredRecord {
        StoredRecord {
            key: key.into(),
            status,
            payload_hash: Some("h".into()),
            request_id: Some("r".into()),
        }
    }

    #[tokio::test]
    async fn claims_are_all_or_nothing_across_connections() {
        let dir = std::env::temp_dir().join(format!("sw-idem-{}", std::process::id()));
        let path = dir.join("db.sqlite");
        let _ = std::fs::remove_file(&path);
        let a = SqliteIdempotencyStore::new(Arc::new(LocalDb::open(&path).unwrap()));
        let b = SqliteIdempotencyStore::new(Arc::new(LocalDb::open(&path).unwrap()));

        let k1 = record(
            "f#1",
            RecordStatus::InProgress {
                lock_expires_at: 200,
            },
        );
        let k2 = record(
            "f#2",
            RecordStatus::InProgress {
                lock_expires_at: 200,
            },
        );
        assert_eq!(a.claim(&[&k1], 100).await.unwrap(), ClaimOutcome::Claimed);
        // Another invocation: k1 is live and not its own, so nothing of this call is written.
        let theirs = |r: &StoredRecord| StoredRecord {
            request_id: Some("r-b".into()),
            ..r.clone()
        };
        let outcome = b.claim(&[&theirs(&k2), &theirs(&k1)], 100).await.unwrap();
        assert_eq!(
            outcome,
            ClaimOutcome::Cancelled(vec![ClaimVerdict::NotAttempted, ClaimVerdict::Taken])
        );
        assert!(b.get(&["f#2"]).await.unwrap().records.is_empty());
        // Its own live lock an invocation takes again (a claim whose answer was lost).
        assert_eq!(a.claim(&[&k1], 150).await.unwrap(), ClaimOutcome::Claimed);
        // Once the lock expired, the key can be claimed again.
        assert_eq!(b.claim(&[&k1], 200).await.unwrap(), ClaimOutcome::Claimed);

        let done = record("f#1", RecordStatus::Completed { expires_at: 999 });
        a.write(&[
            &StoreWrite::Put(done.clone()),
            &StoreWrite::Release {
                key: "f#2".into(),
                request_id: "r".into(),
            },
        ])
        .await
        .unwrap();
        let fetched = b.get(&["f#1", "f#2"]).await.unwrap();
        assert_eq!(fetched.records, vec![done]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
