//! Checkpoints per function and shard, in a SQLite file, so a runner that is killed resumes
//! where it left off. With tumbling windows the open window and its state are saved in the same
//! row (one transaction), so a resumed runner continues the window instead of losing it.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

/// What is saved for one (function, shard).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Everything up to and including this sequence number is done.
    pub sequence_number: Option<String>,
    /// The open tumbling window (epoch ms of its start) and its state (JSON).
    pub window: Option<(i64, String)>,
}

#[derive(Debug)]
pub struct CheckpointStore {
    conn: Mutex<Connection>,
}

#[derive(Debug, thiserror::Error)]
#[error("checkpoint store: {0}")]
pub struct CheckpointError(String);

fn wrap(e: rusqlite::Error) -> CheckpointError {
    CheckpointError(e.to_string())
}

impl CheckpointStore {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        if let Some(parent) = path.as_ref().parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| CheckpointError(e.to_string()))?;
        }
        let conn = shardwise_sqlite::open_shared(
            path.as_ref(),
            "CREATE TABLE IF NOT EXISTS checkpoints (
                function TEXT NOT NULL, shard TEXT NOT NULL, sequence_number TEXT,
                window_start INTEGER, window_state TEXT, updated_ms INTEGER NOT NULL,
                PRIMARY KEY (function, shard))",
        )
        .map_err(wrap)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn load(&self, function: &str, shard: &str) -> Result<Checkpoint, CheckpointError> {
        let row = self
            .conn()
            .query_row(
                "SELECT sequence_number, window_start, window_state FROM checkpoints
                 WHERE function = ?1 AND shard = ?2",
                params![function, shard],
                |row| {
                    Ok((
                        row.get::<_, Option<String>>(0)?,
                        row.get::<_, Option<i64>>(1)?,
                        row.get::<_, Option<String>>(2)?,
                    ))
                },
            )
            .optional()
            .map_err(wrap)?;
        Ok(match row {
            None => Checkpoint::default(),
            Some((sequence_number, start, state)) => Checkpoint {
                sequence_number,
                window: start.zip(state),
            },
        })
    }

    pub fn save(
        &self,
        function: &str,
        shard: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), CheckpointError> {
        let (start, state) = match &checkpoint.window {
            Some((start, state)) => (Some(*start), Some(state.as_str())),
            None => (None, None),
        };
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO checkpoints
                   (function, shard, sequence_number, window_start, window_state, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    function,
                    shard,
                    checkpoint.sequence_number,
                    start,
                    state,
                    crate::now_ms()
                ],
            )
            .map_err(wrap)?;
        Ok(())
    }
}
