//! Canary acknowledgements: the one schema and the one store every consumer writes through.
//!
//! Consumers write one row per canary they see to the canary table (`CANARY_TABLE`), which the
//! `canary` function reads back to measure latency and spot missing records. The row's shape is
//! defined once, here ([`canary_table`]), and written through a [`CanaryAckStore`]:
//! [`DynamoDbCanaryAckStore`] in Lambda (feature `aws`), [`SqliteCanaryAckStore`] in the local
//! runner (feature `local`), [`InMemoryCanaryAckStore`] in tests. The first acknowledgement of a
//! (canary, consumer) stands, so a redelivered canary never makes the latency look longer.

use std::future::Future;
use std::sync::Mutex;

/// The canary table (`CANARY_TABLE`): attribute names shared by the consumers that acknowledge
/// canaries and the `canary` function that reads them back.
///
/// | attribute | type | meaning |
/// |---|---|---|
/// | `canary_id` | S, partition key | the canary record's `canary_id` |
/// | `consumer` | S, sort key | who wrote the row: a consumer (`fraud`, `aggregation`) acknowledging, or [`SENDER`](canary_table::SENDER) for the canary's own row written when it sent the record |
/// | `sent_at` | N | epoch ms, from the record |
/// | `acked_at` | N | epoch ms, when the consumer saw the record (acknowledgement rows) |
/// | `expiration` | N, TTL | epoch seconds |
pub mod canary_table {
    pub const CANARY_ID: &str = "canary_id";
    pub const CONSUMER: &str = "consumer";
    pub const SENT_AT: &str = "sent_at";
    pub const ACKED_AT: &str = "acked_at";
    pub const EXPIRATION: &str = "expiration";
    /// The `consumer` value of the row the canary function writes for each record it sends.
    pub const SENDER: &str = "canary";
}

/// One consumer's acknowledgement of one canary record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryAck {
    pub canary_id: String,
    /// The consumer's name as the canary reports it (`fraud`, `aggregation`).
    pub consumer: String,
    pub sent_at: i64,
    /// Epoch ms.
    pub acked_at: i64,
}

/// Acknowledgements could not be written; retrying may help when `retryable`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("canary acknowledgement not written: {message}")]
pub struct CanaryAckError {
    pub retryable: bool,
    pub message: String,
}

/// Where acknowledgements go. The first acknowledgement of a (canary, consumer) is kept, so a
/// redelivered canary does not change the latency already measured.
pub trait CanaryAckStore: Send + Sync {
    fn acknowledge(
        &self,
        acks: &[CanaryAck],
    ) -> impl Future<Output = Result<(), CanaryAckError>> + Send;
}

/// Keeps acknowledgements in memory (first one per canary and consumer).
#[derive(Debug, Default)]
pub struct InMemoryCanaryAckStore {
    acks: Mutex<Vec<CanaryAck>>,
    fail_next: Mutex<Option<CanaryAckError>>,
}

impl InMemoryCanaryAckStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn acks(&self) -> Vec<CanaryAck> {
        self.acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Make the next call fail with `error`.
    pub fn fail_next(&self, error: CanaryAckError) {
        *self
            .fail_next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
    }
}

impl CanaryAckStore for InMemoryCanaryAckStore {
    async fn acknowledge(&self, acks: &[CanaryAck]) -> Result<(), CanaryAckError> {
        if let Some(error) = self
            .fail_next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            return Err(error);
        }
        let mut stored = self
            .acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ack in acks {
            if !stored
                .iter()
                .any(|a| a.canary_id == ack.canary_id && a.consumer == ack.consumer)
            {
                stored.push(ack.clone());
            }
        }
        Ok(())
    }
}

#[cfg(feature = "aws")]
pub use aws::DynamoDbCanaryAckStore;
#[cfg(feature = "local")]
pub use local::SqliteCanaryAckStore;

#[cfg(feature = "aws")]
mod aws {
    use super::*;

    /// Acknowledgements in the DynamoDB canary table, one conditional `PutItem` each (canaries are a
    /// few records a minute, and `BatchWriteItem` cannot keep the first acknowledgement).
    #[derive(Debug, Clone)]
    pub struct DynamoDbCanaryAckStore {
        client: aws_sdk_dynamodb::Client,
        table: String,
        ttl_seconds: i64,
    }

    impl DynamoDbCanaryAckStore {
        /// Rows live a day (TTL), far longer than the canary looks back.
        pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
            Self {
                client,
                table: table.into(),
                ttl_seconds: 86_400,
            }
        }

        pub fn ttl_seconds(mut self, seconds: i64) -> Self {
            self.ttl_seconds = seconds;
            self
        }

        async fn put(&self, ack: &CanaryAck) -> Result<(), CanaryAckError> {
            use aws_sdk_dynamodb::error::ProvideErrorMetadata;
            use aws_sdk_dynamodb::types::AttributeValue;
            let result = self
                .client
                .put_item()
                .table_name(&self.table)
                .item(
                    canary_table::CANARY_ID,
                    AttributeValue::S(ack.canary_id.clone()),
                )
                .item(
                    canary_table::CONSUMER,
                    AttributeValue::S(ack.consumer.clone()),
                )
                .item(
                    canary_table::SENT_AT,
                    AttributeValue::N(ack.sent_at.to_string()),
                )
                .item(
                    canary_table::ACKED_AT,
                    AttributeValue::N(ack.acked_at.to_string()),
                )
                .item(
                    canary_table::EXPIRATION,
                    AttributeValue::N((ack.acked_at / 1000 + self.ttl_seconds).to_string()),
                )
                .condition_expression("attribute_not_exists(#id)")
                .expression_attribute_names("#id", canary_table::CANARY_ID)
                .send()
                .await;
            match result {
                Ok(_) => Ok(()),
                Err(error) => {
                    let code = error.code().unwrap_or_default().to_owned();
                    if code == "ConditionalCheckFailedException" {
                        return Ok(());
                    }
                    let retryable = shardwise_aws::retryable::classify(&error).is_retryable();
                    Err(CanaryAckError {
                        retryable,
                        message: aws_sdk_dynamodb::error::DisplayErrorContext(&error).to_string(),
                    })
                }
            }
        }
    }

    impl CanaryAckStore for DynamoDbCanaryAckStore {
        async fn acknowledge(&self, acks: &[CanaryAck]) -> Result<(), CanaryAckError> {
            let results = futures::future::join_all(acks.iter().map(|ack| self.put(ack))).await;
            // Retryable first: a redelivery may then fix everything.
            let mut errors: Vec<CanaryAckError> =
                results.into_iter().filter_map(Result::err).collect();
            errors.sort_by_key(|e| !e.retryable);
            match errors.into_iter().next() {
                Some(error) => Err(error),
                None => Ok(()),
            }
        }
    }
}

#[cfg(feature = "local")]
mod local {
    use std::collections::HashMap;
    use std::sync::Arc;

    use aws_sdk_dynamodb::types::AttributeValue;
    use shardwise_sqlite::{Condition, LocalDb, SqliteTable};

    use super::*;

    /// Canary acknowledgements in the local table `canary`, keyed `{canary_id}#{consumer}`; the
    /// first acknowledgement stands, as with the conditional put in DynamoDB.
    #[derive(Debug, Clone)]
    pub struct SqliteCanaryAckStore {
        table: SqliteTable,
    }

    impl SqliteCanaryAckStore {
        pub fn new(db: Arc<LocalDb>) -> Self {
            Self {
                table: SqliteTable::new(db, "canary"),
            }
        }

        pub fn table(&self) -> &SqliteTable {
            &self.table
        }
    }

    impl CanaryAckStore for SqliteCanaryAckStore {
        async fn acknowledge(&self, acks: &[CanaryAck]) -> Result<(), CanaryAckError> {
            use canary_table as t;
            for ack in acks {
                let item = HashMap::from([
                    (
                        t::CANARY_ID.to_owned(),
                        AttributeValue::S(ack.canary_id.clone()),
                    ),
                    (
                        t::CONSUMER.to_owned(),
                        AttributeValue::S(ack.consumer.clone()),
                    ),
                    (
                        t::SENT_AT.to_owned(),
                        AttributeValue::N(ack.sent_at.to_string()),
                    ),
                    (
                        t::ACKED_AT.to_owned(),
                        AttributeValue::N(ack.acked_at.to_string()),
                    ),
                ]);
                self.table
                    .put(
                        &format!("{}#{}", ack.canary_id, ack.consumer),
                        &item,
                        &Condition::NotExists,
                    )
                    .map_err(|e| CanaryAckError {
                        retryable: true,
                        message: e.to_string(),
                    })?;
            }
            Ok(())
        }
    }
}
