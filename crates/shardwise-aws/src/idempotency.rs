//! The idempotency table in DynamoDB: `shardwise::idempotency::IdempotencyStore` over the SDK.
//!
//! # Table
//! The function's binary reads the table name from `IDEMPOTENCY_TABLE`. One item per key:
//!
//! | attribute | type | meaning |
//! |---|---|---|
//! | `id` | S, partition key | `{function}#{key}` (see `shardwise::idempotency::key`) |
//! | `status` | S | `COMPLETED` or `IN_PROGRESS` |
//! | `expiration` | N, TTL | epoch seconds after which the item means nothing: the completion's time to live, or the lock's expiry (the invocation's deadline) |
//! | `payload_hash` | S, optional | SHA-256 of the payload, hex, when payloads are checked |
//! | `request_id` | S, optional | the invocation that wrote the item |
//!
//! TTL must be enabled on `expiration` so old items go away; the gate never relies on it (TTL
//! deletes within days, so an item past `expiration` is read as absent).
//!
//! # Calls
//! `get` is one `BatchGetItem` with `ConsistentRead` (a completion written a moment ago by the
//! previous invocation must be seen); `write` one `BatchWriteItem`; `claim` one
//! `TransactWriteItems` of conditional puts,
//! `attribute_not_exists(id) OR expiration <= :now`. The SDK fills the transaction's client
//! request token, so its own retry of a claim that did land is answered as a success, not as
//! a conflict with our own lock.

use std::collections::HashMap;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, KeysAndAttributes,
    Put, PutRequest, ScalarAttributeType, TimeToLiveSpecification, TransactWriteItem, WriteRequest,
};

use shardwise::idempotency::{
    ClaimOutcome, ClaimVerdict, Fetched, IdempotencyStore, RecordStatus, StoreError, StoreLimits,
    StoreWrite, StoredRecord,
};

use crate::retryable::{self, Fault};

/// The partition key attribute.
pub const ID: &str = "id";
/// The TTL attribute (epoch seconds).
pub const EXPIRATION: &str = "expiration";
pub const STATUS: &str = "status";
pub const PAYLOAD_HASH: &str = "payload_hash";
pub const REQUEST_ID: &str = "request_id";

const COMPLETED: &str = "COMPLETED";
const IN_PROGRESS: &str = "IN_PROGRESS";

/// Idempotency records in a DynamoDB table (`IDEMPOTENCY_TABLE`).
#[derive(Debug, Clone)]
pub struct DynamoDbIdempotencyStore {
    client: Client,
    table: String,
}

impl DynamoDbIdempotencyStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Create the table as the template declares it (on-demand, TTL on `expiration`): for tests,
    /// benchmarks and local runs. Deployed functions get theirs from the template.
    pub async fn create_table(client: &Client, table: &str) -> Result<(), StoreError> {
        let definition = AttributeDefinition::builder()
            .attribute_name(ID)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(rejected)?;
        let key = KeySchemaElement::builder()
            .attribute_name(ID)
            .key_type(KeyType::Hash)
            .build()
            .map_err(rejected)?;
        client
            .create_table()
            .table_name(table)
            .attribute_definitions(definition)
            .key_schema(key)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await
            .map_err(classify)?;
        let ttl = TimeToLiveSpecification::builder()
            .attribute_name(EXPIRATION)
            .enabled(true)
            .build()
            .map_err(rejected)?;
        client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(ttl)
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }
}

fn rejected(error: impl std::fmt::Display) -> StoreError {
    StoreError::Rejected(error.to_string())
}

/// Sort an SDK error into the store's error kinds, by the one list in [`crate::retryable`].
fn classify<E>(error: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let text = aws_sdk_dynamodb::error::DisplayErrorContext(&error).to_string();
    match retryable::classify(&error) {
        Fault::Throttled => StoreError::Throttled(text),
        Fault::Unavailable => StoreError::Unavailable(text),
        Fault::Rejected => StoreError::Rejected(text),
    }
}

fn key_attribute(key: &str) -> HashMap<String, AttributeValue> {
    HashMap::from([(ID.to_owned(), AttributeValue::S(key.to_owned()))])
}

fn to_item(record: &StoredRecord) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::with_capacity(5);
    item.insert(ID.to_owned(), AttributeValue::S(record.key.clone()));
    let (status, expiration) = match record.status {
        RecordStatus::InProgress { lock_expires_at } => (IN_PROGRESS, lock_expires_at),
        RecordStatus::Completed { expires_at } => (COMPLETED, expires_at),
    };
    item.insert(STATUS.to_owned(), AttributeValue::S(status.to_owned()));
    item.insert(
        EXPIRATION.to_owned(),
        AttributeValue::N(expiration.to_string()),
    );
    if let Some(hash) = &record.payload_hash {
        item.insert(PAYLOAD_HASH.to_owned(), AttributeValue::S(hash.clone()));
    }
    if let Some(request_id) = &record.request_id {
        item.insert(REQUEST_ID.to_owned(), AttributeValue::S(request_id.clone()));
    }
    item
}

fn string(item: &HashMap<String, AttributeValue>, name: &str) -> Option<String> {
    item.get(name).and_then(|v| v.as_s().ok()).cloned()
}

fn from_item(item: &HashMap<String, AttributeValue>) -> Result<StoredRecord, (String, String)> {
    let key = string(item, ID).ok_or_else(|| (String::new(), "no string `id`".to_owned()))?;
    let expiration = item
        .get(EXPIRATION)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse::<i64>().ok());
    let Some(expiration) = expiration else {
        return Err((key, "no whole-number `expiration`".to_owned()));
    };
    let status = match item
        .get(STATUS)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
    {
        Some(COMPLETED) => RecordStatus::Completed {
            expires_at: expiration,
        },
        Some(IN_PROGRESS) => RecordStatus::InProgress {
            lock_expires_at: expiration,
        },
        other => return Err((key, format!("unknown `status` {other:?}"))),
    };
    Ok(StoredRecord {
        key,
        status,
        payload_hash: string(item, PAYLOAD_HASH),
        request_id: string(item, REQUEST_ID),
    })
}

fn written_key(request: &WriteRequest) -> Option<String> {
    let attributes = match (request.put_request(), request.delete_request()) {
        (Some(put), _) => put.item(),
        (None, Some(delete)) => delete.key(),
        (None, None) => return None,
    };
    string(attributes, ID)
}

impl IdempotencyStore for DynamoDbIdempotencyStore {
    fn limits(&self) -> StoreLimits {
        StoreLimits::DYNAMODB
    }

    async fn get(&self, keys: &[&str]) -> Result<Fetched, StoreError> {
        if keys.len() > StoreLimits::DYNAMODB.max_get {
            return Err(StoreError::Rejected(format!(
                "BatchGetItem of {} keys exceeds DynamoDB's 100",
                keys.len()
            )));
        }
        let request = KeysAndAttributes::builder()
            .set_keys(Some(keys.iter().map(|k| key_attribute(k)).collect()))
            .consistent_read(true)
            .build()
            .map_err(rejected)?;
        let output = self
            .client
            .batch_get_item()
            .request_items(&self.table, request)
            .send()
            .await
            .map_err(classify)?;
        let mut fetched = Fetched::default();
        if let Some(items) = output.responses().and_then(|r| r.get(&self.table)) {
            fetched.records.reserve(items.len());
            for item in items {
                match from_item(item) {
                    Ok(record) => fetched.records.push(record),
                    Err(unreadable) => fetched.unreadable.push(unreadable),
                }
            }
        }
        if let Some(left) = output.unprocessed_keys().and_then(|u| u.get(&self.table)) {
            fetched
                .unprocessed
                .extend(left.keys().iter().filter_map(|k| string(k, ID)));
        }
        Ok(fetched)
    }

    async fn write(&self, writes: &[&StoreWrite]) -> Result<Vec<String>, StoreError> {
        if writes.len() > StoreLimits::DYNAMODB.max_write {
            return Err(StoreError::Rejected(format!(
                "BatchWriteItem of {} requests exceeds DynamoDB's 25",
                writes.len()
            )));
        }
        let mut requests = Vec::with_capacity(writes.len());
        let mut releases = Vec::new();
        for write in writes {
            match *write {
                StoreWrite::Put(record) => requests.push(
                    WriteRequest::builder()
                        .put_request(
                            PutRequest::builder()
                                .set_item(Some(to_item(record)))
                                .build()
                                .map_err(rejected)?,
                        )
                        .build(),
                ),
                StoreWrite::Release { key, request_id } => releases.push((key, request_id)),
            }
        }
        // BatchWriteItem takes no condition, so releases (rare: records handed back) are one
        // conditional DeleteItem each: a lock that is no longer ours is left alone.
        let released = futures::future::join_all(releases.iter().map(|(key, request_id)| {
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key_attribute(key)))
                .condition_expression("#request = :request")
                .expression_attribute_names("#request", REQUEST_ID)
                .expression_attribute_values(":request", AttributeValue::S((*request_id).clone()))
                .send()
        }))
        .await;
        let mut unreleased = Vec::new();
        for ((key, _), result) in releases.iter().zip(released) {
            match result {
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.as_service_error(),
                        Some(DeleteItemError::ConditionalCheckFailedException(_))
                    ) => {}
                Err(error) => match classify(error) {
                    StoreError::Throttled(_) => unreleased.push((*key).clone()),
                    other => return Err(other),
                },
            }
        }
        if requests.is_empty() {
            return Ok(unreleased);
        }
        let output = self
            .client
            .batch_write_item()
            .request_items(&self.table, requests)
            .send()
            .await
            .map_err(classify)?;
        Ok(output
            .unprocessed_items()
            .and_then(|u| u.get(&self.table))
            .map(|left| left.iter().filter_map(written_key).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .chain(unreleased)
            .collect())
    }

    async fn claim(
        &self,
        claims: &[&StoredRecord],
        now_s: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        if claims.len() > StoreLimits::DYNAMODB.max_claim {
            return Err(StoreError::Rejected(format!(
                "TransactWriteItems of {} actions exceeds DynamoDB's 100",
                claims.len()
            )));
        }
        let now = AttributeValue::N(now_s.to_string());
        let mut actions = Vec::with_capacity(claims.len());
        for claim in claims {
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(to_item(claim)))
                // Our own lock is ours to take again: a claim whose answer was lost (a timeout
                // after DynamoDB applied it) must not defer its own record.
                .condition_expression(
                    "attribute_not_exists(#id) OR #expiration <= :now \
                     OR (#status = :in_progress AND #request = :request)",
                )
                .expression_attribute_names("#id", ID)
                .expression_attribute_names("#expiration", EXPIRATION)
                .expression_attribute_names("#status", STATUS)
                .expression_attribute_names("#request", REQUEST_ID)
                .expression_attribute_values(":now", now.clone())
                .expression_attribute_values(
                    ":in_progress",
                    AttributeValue::S(IN_PROGRESS.to_owned()),
                )
                .expression_attribute_values(
                    ":request",
                    AttributeValue::S(claim.request_id.clone().unwrap_or_default()),
                )
                .build()
                .map_err(rejected)?;
            actions.push(TransactWriteItem::builder().put(put).build());
        }
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(actions))
            .send()
            .await;
        let error = match result {
            Ok(_) => return Ok(ClaimOutcome::Claimed),
            Err(error) => error,
        };
        let reasons = match error.as_service_error() {
            Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) => {
                cancelled.cancellation_reasons()
            }
            _ => return Err(classify(error)),
        };
        if reasons.len() != claims.len() {
            // Without one reason per claim we cannot tell which keys are taken.
            return Err(StoreError::Unavailable(format!(
                "transaction cancelled with {} reasons for {} claims",
                reasons.len(),
                claims.len()
            )));
        }
        Ok(ClaimOutcome::Cancelled(
            reasons
                .iter()
                .map(|reason| {
                    let message = || {
                        format!(
                            "{}: {}",
                            reason.code().unwrap_or_default(),
                            reason.message().unwrap_or_default()
                        )
                    };
                    match reason.code() {
                        None | Some("None") => ClaimVerdict::NotAttempted,
                        Some("ConditionalCheckFailed") => ClaimVerdict::Taken,
                        Some(code) if retryable::RETRYABLE_CANCELLATION_CODES.contains(&code) => {
                            ClaimVerdict::Retry(message())
                        }
                        Some(_) => ClaimVerdict::Failed(message()),
                    }
                })
                .collect(),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn items_round_trip() {
        let record = StoredRecord {
            key: "f#k".into(),
            status: RecordStatus::InProgress {
                lock_expires_at: 1_700_000_000,
            },
            payload_hash: Some("ab".into()),
            request_id: Some("req".into()),
        };
        let item = to_item(&record);
        assert_eq!(item[EXPIRATION], AttributeValue::N("1700000000".into()));
        assert_eq!(item[STATUS], AttributeValue::S("IN_PROGRESS".into()));
        assert_eq!(from_item(&item).unwrap(), record);
        let completed = StoredRecord {
            status: RecordStatus::Completed { expires_at: 5 },
            payload_hash: None,
            request_id: None,
            ..record
        };
        assert_eq!(from_item(&to_item(&completed)).unwrap(), completed);
    }

    /// moto accepts a 26-request `BatchWriteItem`; DynamoDB does not, so neither do we. The
    /// check comes before any request (this client has nowhere to send one).
    #[tokio::test]
    async fn calls_over_aws_limits_are_refused_before_sending() {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .endpoint_url("http://127.0.0.1:9")
            .build();
        let store = DynamoDbIdempotencyStore::new(Client::from_conf(config), "t");
        let owned: Vec<StoreWrite> = (0..26)
            .map(|i| StoreWrite::Release {
                key: format!("k{i}"),
                request_id: "r".to_owned(),
            })
            .collect();
        let writes: Vec<&StoreWrite> = owned.iter().collect();
        let error = store.write(&writes).await.unwrap_err();
        assert!(
            matches!(&error, StoreError::Rejected(m) if m.contains("25")),
            "{error}"
        );
        let names: Vec<String> = (0..101).map(|i| format!("k{i}")).collect();
        let keys: Vec<&str> = names.iter().map(String::as_str).collect();
        assert!(matches!(
            store.get(&keys).await,
            Err(StoreError::Rejected(_))
        ));
        let record = StoredRecord {
            key: "k".into(),
            status: RecordStatus::InProgress { lock_expires_at: 1 },
            payload_hash: None,
            request_id: None,
        };
        let claims: Vec<&StoredRecord> = std::iter::repeat_n(&record, 101).collect();
        assert!(matches!(
            store.claim(&claims, 0).await,
            Err(StoreError::Rejected(_))
        ));
    }

    #[test]
    fn foreign_items_are_unreadable_not_trusted() {
        let mut item = key_attribute("f#k");
        item.insert(STATUS.into(), AttributeValue::S("DONE".into()));
        item.insert(EXPIRATION.into(), AttributeValue::N("5".into()));
        let (key, why) = from_item(&item).unwrap_err();
        assert_eq!(key, "f#k");
        assert!(why.contains("DONE"));
        item.remove(EXPIRATION);
        assert!(from_item(&item).is_err());
    }
}
