//! The canary table as the canary function uses it: its own "sent" rows, the consumers'
//! acknowledgements, and which consumers of a canary have been reported.
//!
//! The row shape is [`shardwise_cards::canary::canary_table`]. The canary's own row of a canary
//! has `consumer` = [`SENDER`] and, once reported, a string set `reported` of the consumers whose
//! latency or absence was already emitted: each is emitted once, by the first run that claims it
//! (one conditional `UpdateItem`), even when two runs overlap.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;
use shardwise_cards::canary::canary_table::{
    ACKED_AT, CANARY_ID, CONSUMER, EXPIRATION, SENDER, SENT_AT,
};

/// The set of consumers already reported, on the sender row.
pub const REPORTED: &str = "reported";

/// What the table holds about one canary.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CanaryRows {
    /// From the sender row; `None` when the canary was never (successfully) sent.
    pub sent_at: Option<i64>,
    pub reported: HashSet<String>,
    /// Consumer → acknowledged at (epoch ms).
    pub acks: HashMap<String, i64>,
}

/// Whether a sender row was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentRow {
    Written,
    /// Another run of the same slot wrote it first (EventBridge delivers at least once).
    AlreadyThere,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("canary table: {0}")]
pub struct StoreError(pub String);

/// The canary table.
pub trait CanaryStore: Send + Sync {
    /// Write the sender row of each canary unless it exists. One result per canary.
    fn record_sent(
        &self,
        canaries: &[(&str, i64)],
        expiration_s: i64,
    ) -> impl Future<Output = Vec<Result<SentRow, StoreError>>> + Send;

    /// Delete sender rows (of canaries that could not be put on the stream).
    fn forget(&self, canary_ids: &[&str]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The rows of each canary: the sender's and those of `consumers`. Same positions.
    fn fetch(
        &self,
        canary_ids: &[String],
        consumers: &[String],
    ) -> impl Future<Output = Result<Vec<CanaryRows>, StoreError>> + Send;

    /// Add `consumers` to the canary's reported set, unless any of them is there already.
    /// `Ok(false)`: another run reported (some of) them first.
    fn mark_reported(
        &self,
        canary_id: &str,
        consumers: &[String],
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

const MAX_GET_ROUNDS: u32 = 4;

/// The canary table in DynamoDB.
#[derive(Debug, Clone)]
pub struct DynamoDbCanaryStore {
    client: Client,
    table: String,
}

impl DynamoDbCanaryStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    fn key(canary_id: &str, consumer: &str) -> HashMap<String, AttributeValue> {
        HashMap::from([
            (
                CANARY_ID.to_owned(),
                AttributeValue::S(canary_id.to_owned()),
            ),
            (CONSUMER.to_owned(), AttributeValue::S(consumer.to_owned())),
        ])
    }
}

fn store_error<E, R>(error: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    StoreError(aws_sdk_dynamodb::error::DisplayErrorContext(&error).to_string())
}

fn number(value: Option<&AttributeValue>) -> Option<i64> {
    match value {
        Some(AttributeValue::N(n)) => n.parse().ok(),
        _ => None,
    }
}

fn string(value: Option<&AttributeValue>) -> Option<&str> {
    match value {
        Some(AttributeValue::S(s)) => Some(s),
        _ => None,
    }
}

impl CanaryStore for DynamoDbCanaryStore {
    async fn record_sent(
        &self,
        canaries: &[(&str, i64)],
        expiration_s: i64,
    ) -> Vec<Result<SentRow, StoreError>> {
        let puts = canaries.iter().map(|&(canary_id, sent_at)| async move {
            let result = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(Self::key(canary_id, SENDER)))
                .item(SENT_AT, AttributeValue::N(sent_at.to_string()))
                .item(EXPIRATION, AttributeValue::N(expiration_s.to_string()))
                .condition_expression("attribute_not_exists(#id)")
                .expression_attribute_names("#id", CANARY_ID)
                .send()
                .await;
            match result {
                Ok(_) => Ok(SentRow::Written),
                Err(error) if error.code() == Some("ConditionalCheckFailedException") => {
                    Ok(SentRow::AlreadyThere)
                }
                Err(error) => Err(store_error(error)),
            }
        });
        futures::future::join_all(puts).await
    }

    async fn forget(&self, canary_ids: &[&str]) -> Result<(), StoreError> {
        let deletes = canary_ids.iter().map(|id| {
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(Self::key(id, SENDER)))
                .send()
        });
        for result in futures::future::join_all(deletes).await {
            result.map_err(store_error)?;
        }
        Ok(())
    }

    async fn fetch(
        &self,
        canary_ids: &[String],
        consumers: &[String],
    ) -> Result<Vec<CanaryRows>, StoreError> {
        let mut keys = Vec::new();
        for id in canary_ids {
            keys.push(Self::key(id, SENDER));
            for consumer in consumers {
                keys.push(Self::key(id, consumer));
            }
        }
        use shardwise_aws::dynamodb::{BatchGetError, batch_get_consistent};
        let items = batch_get_consistent(&self.client, &self.table, keys, MAX_GET_ROUNDS)
            .await
            .map_err(|error| match error {
                BatchGetError::Call(error) => store_error(*error),
                other => StoreError(other.to_string()),
            })?;
        let mut rows: HashMap<&str, CanaryRows> = HashMap::new();
        for item in &items {
            let (Some(id), Some(consumer)) =
                (string(item.get(CANARY_ID)), string(item.get(CONSUMER)))
            else {
                continue;
            };
            let Some(canary) = canary_ids.iter().find(|c| c.as_str() == id) else {
                continue;
            };
            let entry = rows.entry(canary.as_str()).or_default();
            if consumer == SENDER {
                entry.sent_at = number(item.get(SENT_AT));
                if let Some(AttributeValue::Ss(reported)) = item.get(REPORTED) {
                    entry.reported = reported.iter().cloned().collect();
                }
            } else if let Some(acked_at) = number(item.get(ACKED_AT)) {
                entry.acks.insert(consumer.to_owned(), acked_at);
            }
        }
        Ok(canary_ids
            .iter()
            .map(|id| rows.remove(id.as_str()).unwrap_or_default())
            .collect())
    }

    async fn mark_reported(
        &self,
        canary_id: &str,
        consumers: &[String],
    ) -> Result<bool, StoreError> {
        if consumers.is_empty() {
            return Ok(true);
        }
        let mut condition = "attribute_exists(#id)".to_owned();
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(canary_id, SENDER)))
            .update_expression("ADD #r :all")
            .expression_attribute_names("#id", CANARY_ID)
            .expression_attribute_names("#r", REPORTED)
            .expression_attribute_values(":all", AttributeValue::Ss(consumers.to_vec()));
        for (i, consumer) in consumers.iter().enumerate() {
            condition.push_str(&format!(" AND NOT contains(#r, :c{i})"));
            request = request
                .expression_attribute_values(format!(":c{i}"), AttributeValue::S(consumer.clone()));
        }
        match request.condition_expression(condition).send().await {
            Ok(_) => Ok(true),
            Err(error) if error.code() == Some("ConditionalCheckFailedException") => Ok(false),
            Err(error) => Err(store_error(error)),
        }
    }
}

/// The canary table in memory; [`InMemoryCanaryStore::acknowledge`] plays a consumer.
#[derive(Debug, Default)]
pub struct InMemoryCanaryStore {
    rows: Mutex<HashMap<String, CanaryRows>>,
    fail_fetch: Mutex<bool>,
}

impl InMemoryCanaryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CanaryRows>> {
        self.rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Write a consumer's acknowledgement, as `fraud` or `aggregation` would.
    pub fn acknowledge(&self, canary_id: &str, consumer: &str, acked_at: i64) {
        self.lock()
            .entry(canary_id.to_owned())
            .or_default()
            .acks
            .entry(consumer.to_owned())
            .or_insert(acked_at);
    }

    pub fn rows(&self, canary_id: &str) -> Option<CanaryRows> {
        self.lock().get(canary_id).cloned()
    }

    pub fn canary_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, rows)| rows.sent_at.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// The next fetch fails.
    pub fn fail_next_fetch(&self) {
        *self
            .fail_fetch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
    }
}

impl CanaryStore for InMemoryCanaryStore {
    async fn record_sent(
        &self,
        canaries: &[(&str, i64)],
        _: i64,
    ) -> Vec<Result<SentRow, StoreError>> {
        let mut rows = self.lock();
        canaries
            .iter()
            .map(|&(id, sent_at)| {
                let entry = rows.entry(id.to_owned()).or_default();
                if entry.sent_at.is_some() {
                    Ok(SentRow::AlreadyThere)
                } else {
                    entry.sent_at = Some(sent_at);
                    Ok(SentRow::Written)
                }
            })
            .collect()
    }

    async fn forget(&self, canary_ids: &[&str]) -> Result<(), StoreError> {
        let mut rows = self.lock();
        for id in canary_ids {
            if let Some(entry) = rows.get_mut(*id) {
                entry.sent_at = None;
                entry.reported.clear();
            }
        }
        Ok(())
    }

    async fn fetch(
        &self,
        canary_ids: &[String],
        consumers: &[String],
    ) -> Result<Vec<CanaryRows>, StoreError> {
        if std::mem::take(
            &mut *self
                .fail_fetch
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ) {
            return Err(StoreError("injected".into()));
        }
        let rows = self.lock();
        Ok(canary_ids
            .iter()
            .map(|id| {
                let mut found = rows.get(id).cloned().unwrap_or_default();
                found
                    .acks
                    .retain(|consumer, _| consumers.contains(consumer));
                found
            })
            .collect())
    }

    async fn mark_reported(
        &self,
        canary_id: &str,
        consumers: &[String],
    ) -> Result<bool, StoreError> {
        let mut rows = self.lock();
        let Some(entry) = rows.get_mut(canary_id).filter(|e| e.sent_at.is_some()) else {
            return Ok(false);
        };
        if consumers.iter().any(|c| entry.reported.contains(c)) {
            return Ok(false);
        }
        entry.reported.extend(consumers.iter().cloned());
        Ok(true)
    }
}
