//! The embedded stream: Kinesis's data model in one SQLite file, so producers and the runner can
//! be separate processes (or one) and a killed runner finds every record where it was.
//!
//! Shards split the 128-bit hash-key space evenly, as a new Kinesis stream's do; a record goes
//! to the shard whose range holds the MD5 of its partition key (or its explicit hash key).
//! Sequence numbers are 56-digit decimal strings like Kinesis's, increasing within a shard:
//! `4960` + the shard index (4 digits) + a per-shard counter (48 digits). Consumers must compare
//! them as (length, string), which is what they have to do with the real thing.

use std::path::Path;
use std::sync::Mutex;

use md5::{Digest, Md5};
use rusqlite::{Connection, OptionalExtension, params};
use shardwise::producer::{CallError, EntryResult, PutEntry, StreamWriter};

use super::{Position, ReadBatch, StartingPosition, StreamError, StreamRecord};

/// A stream in a SQLite file.
#[derive(Debug)]
pub struct EmbeddedStream {
    name: String,
    shard_count: u32,
    conn: Mutex<Connection>,
    path: String,
}

fn sqlite(path: &str) -> impl Fn(rusqlite::Error) -> StreamError + '_ {
    move |e| StreamError::Backend(format!("{path}: {e}"))
}

impl EmbeddedStream {
    /// Open the stream `name` in `path`, creating it with `shard_count` shards if it does not
    /// exist. An existing stream keeps its shard count (`shard_count` 0 means "whatever it has").
    pub fn open(path: impl AsRef<Path>, name: &str, shard_count: u32) -> Result<Self, StreamError> {
        let path_ref = path.as_ref();
        if let Some(parent) = path_ref.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| StreamError::Backend(format!("{}: {e}", parent.display())))?;
        }
        let path = path_ref.display().to_string();
        let err = sqlite(&path);
        let conn = shardwise_sqlite::open_shared(
            path_ref,
            "CREATE TABLE IF NOT EXISTS streams (name TEXT PRIMARY KEY, shard_count INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS records (
                 stream TEXT NOT NULL, shard INTEGER NOT NULL, seq INTEGER NOT NULL,
                 partition_key TEXT NOT NULL, data BLOB NOT NULL, arrival_ms INTEGER NOT NULL,
                 PRIMARY KEY (stream, shard, seq)) WITHOUT ROWID;",
        )
        .map_err(&err)?;
        let existing: Option<u32> = conn
            .query_row(
                "SELECT shard_count FROM streams WHERE name = ?1",
                [name],
                |row| row.get(0),
            )
            .optional()
            .map_err(&err)?;
        let shard_count = match existing {
            Some(count) => count,
            None => {
                let count = if shard_count == 0 {
                    1
                } else {
                    shard_count.min(9999)
                };
                conn.execute(
                    "INSERT INTO streams (name, shard_count) VALUES (?1, ?2)",
                    params![name, count],
                )
                .map_err(&err)?;
                count
            }
        };
        drop(err);
        Ok(Self {
            name: name.to_owned(),
            shard_count,
            conn: Mutex::new(conn),
            path,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn arn(&self) -> String {
        format!(
            "arn:aws:kinesis:us-east-1:000000000000:stream/{}",
            self.name
        )
    }

    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    pub fn shard_ids(&self) -> Vec<String> {
        (0..self.shard_count).map(shard_id).collect()
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The shard of a record, as Kinesis picks it.
    pub fn shard_for(&self, partition_key: &str, explicit_hash_key: Option<&str>) -> u32 {
        let hash = explicit_hash_key
            .and_then(|k| k.parse::<u128>().ok())
            .unwrap_or_else(|| {
                let digest = Md5::digest(partition_key.as_bytes());
                let mut bytes = [0u8; 16];
                bytes.copy_from_slice(&digest);
                u128::from_be_bytes(bytes)
            });
        let width = u128::MAX / u128::from(self.shard_count);
        u32::try_from(hash / width)
            .unwrap_or(u32::MAX)
            .min(self.shard_count - 1)
    }

    /// Append records, one transaction; returns (shard index, sequence number) per record.
    pub fn append(
        &self,
        entries: &[PutEntry<'_>],
        arrival_ms: i64,
    ) -> Result<Vec<(u32, String)>, StreamError> {
        let err = sqlite(&self.path);
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&err)?;
        let mut next: Vec<Option<i64>> = vec![None; self.shard_count as usize];
        let mut out = Vec::with_capacity(entries.len());
        {
            let mut max = tx
                .prepare_cached("SELECT MAX(seq) FROM records WHERE stream = ?1 AND shard = ?2")
                .map_err(&err)?;
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO records (stream, shard, seq, partition_key, data, arrival_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(&err)?;
            for entry in entries {
                let shard = self.shard_for(entry.partition_key, entry.explicit_hash_key);
                let slot = &mut next[shard as usize];
                let seq = match *slot {
                    Some(seq) => seq,
                    None => {
                        let current: Option<i64> = max
                            .query_row(params![self.name, shard], |row| row.get(0))
                            .map_err(&err)?;
                        current.unwrap_or(0) + 1
                    }
                };
                *slot = Some(seq + 1);
                insert
                    .execute(params![
                        self.name,
                        shard,
                        seq,
                        entry.partition_key,
                        entry.data,
                        arrival_ms
                    ])
                    .map_err(&err)?;
                out.push((shard, sequence_number(shard, seq)));
            }
        }
        tx.commit().map_err(&err)?;
        Ok(out)
    }

    /// Where a reader of `shard` starts.
    pub fn resolve(&self, shard: u32, position: &Position) -> Result<i64, StreamError> {
        let err = sqlite(&self.path);
        let conn = self.conn();
        Ok(match position {
            Position::After(sequence) => parse_sequence(sequence)
                .map(|(_, seq)| seq)
                .ok_or_else(|| StreamError::Backend(format!("bad sequence number {sequence}")))?,
            Position::Start(StartingPosition::TrimHorizon) => 0,
            Position::Start(StartingPosition::Latest) => conn
                .query_row(
                    "SELECT COALESCE(MAX(seq), 0) FROM records WHERE stream = ?1 AND shard = ?2",
                    params![self.name, shard],
                    |row| row.get(0),
                )
                .map_err(&err)?,
            Position::Start(StartingPosition::AtTimestamp(ms)) => conn
                .query_row(
                    "SELECT COALESCE(MIN(seq), (SELECT COALESCE(MAX(seq), 0) + 1 FROM records
                       WHERE stream = ?1 AND shard = ?2)) - 1
                     FROM records WHERE stream = ?1 AND shard = ?2 AND arrival_ms >= ?3",
                    params![self.name, shard, ms],
                    |row| row.get(0),
                )
                .map_err(&err)?,
        })
    }

    /// Records of `shard` after counter `after`, at most `limit`.
    pub fn read(&self, shard: u32, after: i64, limit: usize) -> Result<ReadBatch, StreamError> {
        let err = sqlite(&self.path);
        let conn = self.conn();
        let mut statement = conn
            .prepare_cached(
                "SELECT seq, partition_key, data, arrival_ms FROM records
                 WHERE stream = ?1 AND shard = ?2 AND seq > ?3 ORDER BY seq LIMIT ?4",
            )
            .map_err(&err)?;
        let rows = statement
            .query_map(
                params![
                    self.name,
                    shard,
                    after,
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                |row| {
                    let seq: i64 = row.get(0)?;
                    Ok(StreamRecord {
                        sequence_number: sequence_number(shard, seq),
                        partition_key: row.get(1)?,
                        data: row.get(2)?,
                        arrival_ms: row.get(3)?,
                    })
                },
            )
            .map_err(&err)?;
        let records = rows.collect::<Result<Vec<_>, _>>().map_err(&err)?;
        let newest: Option<i64> = conn
            .query_row(
                "SELECT arrival_ms FROM records WHERE stream = ?1 AND shard = ?2
                 ORDER BY seq DESC LIMIT 1",
                params![self.name, shard],
                |row| row.get(0),
            )
            .optional()
            .map_err(&err)?;
        let millis_behind = match (records.last(), newest) {
            (Some(last), Some(newest)) => (newest - last.arrival_ms).max(0),
            _ => 0,
        };
        Ok(ReadBatch {
            records,
            millis_behind,
        })
    }

    /// Records in the stream, all shards.
    pub fn len(&self) -> Result<u64, StreamError> {
        let conn = self.conn();
        conn.query_row(
            "SELECT COUNT(*) FROM records WHERE stream = ?1",
            [&self.name],
            |row| row.get::<_, i64>(0),
        )
        .map(|n| u64::try_from(n).unwrap_or(0))
        .map_err(sqlite(&self.path))
    }

    pub fn is_empty(&self) -> Result<bool, StreamError> {
        Ok(self.len()? == 0)
    }
}

pub fn shard_id(index: u32) -> String {
    format!("shardId-{index:012}")
}

pub fn shard_index(shard_id: &str) -> Option<u32> {
    shard_id.strip_prefix("shardId-")?.parse().ok()
}

fn sequence_number(shard: u32, seq: i64) -> String {
    format!("4960{shard:04}{seq:048}")
}

fn parse_sequence(sequence: &str) -> Option<(u32, i64)> {
    if sequence.len() != 56 || !sequence.starts_with("4960") {
        return None;
    }
    Some((sequence[4..8].parse().ok()?, sequence[8..].parse().ok()?))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl StreamWriter for EmbeddedStream {
    async fn put_records(&self, entries: &[PutEntry<'_>]) -> Result<Vec<EntryResult>, CallError> {
        match self.append(entries, now_ms()) {
            Ok(placed) => Ok(placed
                .into_iter()
                .map(|(shard, sequence_number)| EntryResult::Put {
                    shard_id: shard_id(shard),
                    sequence_number,
                })
                .collect()),
            Err(e) => Err(CallError {
                class: shardwise::ErrorClass::Retryable,
                code: Some("InternalFailure".to_owned()),
                message: e.to_string(),
            }),
        }
    }
}

/// A shared handle to an embedded stream, for a [`shardwise::producer::Producer`].
#[derive(Debug, Clone)]
pub struct EmbeddedWriter(pub std::sync::Arc<EmbeddedStream>);

impl StreamWriter for EmbeddedWriter {
    async fn put_records(&self, entries: &[PutEntry<'_>]) -> Result<Vec<EntryResult>, CallError> {
        self.0.put_records(entries).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn records_land_by_hash_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let stream = EmbeddedStream::open(dir.path().join("s.db"), "s", 4).unwrap();
        let entries: Vec<PutEntry<'_>> = ["a", "b", "c", "a"]
            .iter()
            .map(|k| PutEntry {
                partition_key: k,
                explicit_hash_key: None,
                data: b"x",
            })
            .collect();
        let placed = stream.append(&entries, 1000).unwrap();
        assert_eq!(placed[0].0, placed[3].0, "same key, same shard");
        assert!(placed.iter().all(|(_, s)| s.len() == 56));
        let shard = placed[0].0;
        let read = stream.read(shard, 0, 10).unwrap();
        assert!(read.records.len() >= 2);
        assert!(
            read.records
                .windows(2)
                .all(|w| w[0].sequence_number < w[1].sequence_number)
        );
        // The same stream reopened by another handle keeps its shard count.
        let again = EmbeddedStream::open(dir.path().join("s.db"), "s", 0).unwrap();
        assert_eq!(again.shard_count(), 4);
        assert_eq!(again.len().unwrap(), 4);
        assert_eq!(
            again
                .resolve(shard, &Position::After(placed[0].1.clone()))
                .unwrap(),
            parse_sequence(&placed[0].1).unwrap().1
        );
    }
}
