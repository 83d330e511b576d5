//! The local runner's backends for `fraud` (`SHARDWISE_BACKEND=local`, feature `local`): card
//! state, the anomaly models' snapshots and alerts in the SQLite file the runner gives (`SHARDWISE_LOCAL_DB`).

use shardwise_sqlite::SqliteQueue;

use crate::alert::{AlertError, AlertSink, OutgoingAlert};

pub use crate::state::sqlite::{SqliteCardStateStore, SqliteModelStore};

/// Alerts to the local queue `alerts`, one transaction per call.
#[derive(Debug, Clone)]
pub struct SqliteAlertSink {
    queue: SqliteQueue,
}

impl SqliteAlertSink {
    pub fn new(db: std::sync::Arc<shardwise_sqlite::LocalDb>) -> Self {
        Self {
            queue: SqliteQueue::new(db, shardwise_sqlite::queues::ALERTS),
        }
    }
}

impl AlertSink for SqliteAlertSink {
    async fn send(&self, alerts: &[OutgoingAlert<'_>]) -> Vec<Result<(), AlertError>> {
        let bodies: Vec<&str> = alerts.iter().map(|a| a.body).collect();
        let result = self.queue.send_all(&bodies).map_err(|e| AlertError {
            retryable: true,
            message: e.to_string(),
        });
        alerts.iter().map(|_| result.clone()).collect()
    }
}
