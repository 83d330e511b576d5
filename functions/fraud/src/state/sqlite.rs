//! Card states in the local runner's SQLite file (table `card-state`), for
//! `SHARDWISE_BACKEND=local`. Items have exactly the DynamoDB store's shape (its `item` and
//! `parse_state`), and puts carry the same version conditions.

use std::sync::Arc;

use aws_sdk_dynamodb::types::AttributeValue;
use shardwise_sqlite::{Condition, LocalDb, LocalError, PutResult, SqliteTable};

use super::{CardState, CardStateStore, DynamoDbCardStateStore, StateError, attr, parse_state};
use crate::model::snapshot::{MODEL_KEY_PREFIX, parse_snapshot_item, snapshot_item};
use crate::model::{ModelStore, SnapshotError, StoredSnapshot};

/// Card states in SQLite, behind [`CardStateStore`].
#[derive(Debug, Clone)]
pub struct SqliteCardStateStore {
    table: SqliteTable,
    /// Builds the items (no client call is ever made through it).
    shape: DynamoDbCardStateStore,
}

impl SqliteCardStateStore {
    pub fn new(db: Arc<LocalDb>, ttl_seconds: Option<i64>) -> Self {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .build();
        Self {
            table: SqliteTable::new(db, "card-state"),
            shape: DynamoDbCardStateStore::new(
                aws_sdk_dynamodb::Client::from_conf(config),
                "card-state",
                ttl_seconds,
            ),
        }
    }
}

fn unavailable(error: LocalError) -> StateError {
    StateError::Unavailable(error.to_string())
}

fn version_condition(version: u64) -> Condition {
    if version == 0 {
        Condition::NotExists
    } else {
        Condition::NumberEquals {
            attribute: attr::VERSION.to_owned(),
            value: version.to_string(),
        }
    }
}

impl CardStateStore for SqliteCardStateStore {
    async fn load(&self, card_ids: &[&str]) -> Result<Vec<Option<CardState>>, StateError> {
        self.table
            .get_many(card_ids)
            .map_err(unavailable)?
            .iter()
            .map(|item| item.as_ref().map(parse_state).transpose())
            .collect()
    }

    async fn save(&self, states: &[CardState], now_ms: i64) -> Vec<Result<(), StateError>> {
        states
            .iter()
            .map(|state| {
                let item = self.shape.item(state, now_ms)?;
                match self
                    .table
                    .put(&state.card_id, &item, &version_condition(state.version))
                    .map_err(unavailable)?
                {
                    PutResult::Written => Ok(()),
                    PutResult::ConditionFailed(_) => Err(StateError::Conflict {
                        card_id: state.card_id.clone(),
                    }),
                }
            })
            .collect()
    }

    async fn set_pending_alerts(
        &self,
        card_id: &str,
        version: u64,
        pending: &[String],
    ) -> Result<(), StateError> {
        let conflict = || StateError::Conflict {
            card_id: card_id.to_owned(),
        };
        let mut item = self
            .table
            .get(card_id)
            .map_err(unavailable)?
            .ok_or_else(conflict)?;
        if pending.is_empty() {
            item.remove(attr::PENDING_ALERTS);
        } else {
            item.insert(
                attr::PENDING_ALERTS.to_owned(),
                AttributeValue::L(pending.iter().cloned().map(AttributeValue::S).collect()),
            );
        }
        match self
            .table
            .put(
                card_id,
                &item,
                &Condition::NumberEquals {
                    attribute: attr::VERSION.to_owned(),
                    value: version.to_string(),
                },
            )
            .map_err(unavailable)?
        {
            PutResult::Written => Ok(()),
            PutResult::ConditionFailed(_) => Err(conflict()),
        }
    }
}

/// Shard models' snapshots in the same SQLite table as the card states, under the same
/// `#model#<shard id>` keys and item shape as [`crate::model::DynamoDbModelStore`].
#[derive(Debug, Clone)]
pub struct SqliteModelStore {
    table: SqliteTable,
    ttl_seconds: Option<i64>,
}

impl SqliteModelStore {
    pub fn new(db: Arc<LocalDb>, ttl_seconds: Option<i64>) -> Self {
        Self {
            table: SqliteTable::new(db, "card-state"),
            ttl_seconds,
        }
    }
}

fn snapshot_unavailable(error: LocalError) -> SnapshotError {
    SnapshotError::Unavailable(error.to_string())
}

impl ModelStore for SqliteModelStore {
    async fn load(&self, shard_id: &str) -> Result<Option<StoredSnapshot>, SnapshotError> {
        self.table
            .get(&format!("{MODEL_KEY_PREFIX}{shard_id}"))
            .map_err(snapshot_unavailable)?
            .as_ref()
            .map(parse_snapshot_item)
            .transpose()
    }

    async fn save(
        &self,
        shard_id: &str,
        bytes: &[u8],
        version: u64,
        now_ms: i64,
    ) -> Result<(), SnapshotError> {
        let item = snapshot_item(shard_id, bytes, version, now_ms, self.ttl_seconds);
        match self
            .table
            .put(
                &format!("{MODEL_KEY_PREFIX}{shard_id}"),
                &item,
                &version_condition(version),
            )
            .map_err(snapshot_unavailable)?
        {
            PutResult::Written => Ok(()),
            PutResult::ConditionFailed(_) => Err(SnapshotError::Conflict {
                shard_id: shard_id.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn snapshots_are_versioned_in_the_local_table() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(LocalDb::open(dir.path().join("local.db")).unwrap());
        let store = SqliteModelStore::new(db, Some(60));
        assert_eq!(store.load("shard-1").await.unwrap(), None);
        store.save("shard-1", b"one", 0, 1_000).await.unwrap();
        assert!(matches!(
            store.save("shard-1", b"two", 0, 2_000).await,
            Err(SnapshotError::Conflict { .. })
        ));
        store.save("shard-1", b"two", 1, 2_000).await.unwrap();
        let stored = store.load("shard-1").await.unwrap().unwrap();
        assert_eq!(
            (stored.version, stored.bytes.as_slice()),
            (2, b"two".as_slice())
        );
    }
}
