//! Card states in the local runner's SQLite file (table `card-state`), for
//! `SHARDWISE_BACKEND=local`. Items have exactly the DynamoDB store's shape (its `item` and
//! `parse_state`), and puts carry the same version conditions.

use std::sync::Arc;

use aws_sdk_dynamodb::types::AttributeValue;
use shardwise_sqlite::{Condition, LocalDb, LocalError, PutResult, SqliteTable};

use super::{CardState, CardStateStore, DynamoDbCardStateStore, StateError, attr, parse_state};

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
