//! Where aggregates go: DynamoDB in Lambda, SQLite in the local runner, memory in tests. Canary
//! acknowledgements go through the shared store (`shardwise_cards::canary`).
//!
//! The stores only put items under a condition; deciding what to write, and merging with what is
//! there, is [`crate::write_segment`]'s job, so the in-memory store behaves as DynamoDB does by
//! construction.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};

use crate::cards::CardSet;

/// The aggregates of one merchant category over one window of one shard, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowAggregate {
    /// `{shard_id}#{window_start}#{merchant_category}`.
    pub id: String,
    pub shard_id: String,
    pub event_source_arn: String,
    /// RFC 3339, UTC, milliseconds.
    pub window_start: String,
    pub window_end: String,
    pub merchant_category: String,
    pub count: u64,
    /// Sum of amounts in thousandths of a unit (exact for amounts with up to three decimals).
    pub sum_milli: i64,
    pub min: f64,
    pub max: f64,
    pub cards: CardSet,
    /// The window segments already in these numbers (see `shardwise::window::WindowEnd::segment`).
    pub segments: BTreeSet<String>,
    /// Incremented by every write: the guard of the next merge.
    pub version: u64,
    /// Some segment began by discarding an unreadable state: the numbers miss what came before.
    pub partial: bool,
}

/// What a conditional put did.
#[derive(Debug, Clone, PartialEq)]
pub enum PutOutcome {
    Written,
    /// The condition failed; the item there now, when the store returned it.
    Conflict(Option<Box<WindowAggregate>>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{table}: {message}")]
    Call { table: String, message: String },
    #[error("item {id} in {table} is not an aggregate: {detail}")]
    CorruptItem {
        table: String,
        id: String,
        detail: String,
    },
    #[error("item {id}: still conflicting after {attempts} attempts")]
    Contention { id: String, attempts: u32 },
}

/// Conditional puts of window aggregates.
pub trait AggregateStore: Send + Sync {
    /// Put `item` if no item has its id (`expected_version: None`), or if the stored item has
    /// `expected_version`.
    fn put(
        &self,
        item: &WindowAggregate,
        expected_version: Option<u64>,
    ) -> impl Future<Output = Result<PutOutcome, StoreError>> + Send;
}

/// Aggregates in a DynamoDB table whose partition key is `id` (S).
#[derive(Debug, Clone)]
pub struct DynamoDbAggregateStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl DynamoDbAggregateStore {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }
}

impl AggregateStore for DynamoDbAggregateStore {
    async fn put(
        &self,
        item: &WindowAggregate,
        expected_version: Option<u64>,
    ) -> Result<PutOutcome, StoreError> {
        let request = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(to_item(item)))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        let request = match expected_version {
            None => request.condition_expression("attribute_not_exists(id)"),
            Some(version) => request
                .condition_expression("version = :expected")
                .expression_attribute_values(":expected", AttributeValue::N(version.to_string())),
        };
        match request.send().await {
            Ok(_) => Ok(PutOutcome::Written),
            Err(SdkError::ServiceError(service)) => match service.into_err() {
                PutItemError::ConditionalCheckFailedException(conflict) => {
                    let current = conflict
                        .item()
                        .map(from_item)
                        .transpose()
                        .map_err(|detail| StoreError::CorruptItem {
                            table: self.table.clone(),
                            id: item.id.clone(),
                            detail,
                        })?;
                    Ok(PutOutcome::Conflict(current.map(Box::new)))
                }
                other => Err(StoreError::Call {
                    table: self.table.clone(),
                    message: describe(&other),
                }),
            },
            Err(other) => Err(StoreError::Call {
                table: self.table.clone(),
                message: describe(&other),
            }),
        }
    }
}

fn describe(error: &(impl ProvideErrorMetadata + std::fmt::Display)) -> String {
    match (error.code(), error.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => error.to_string(),
    }
}

/// The DynamoDB item of an aggregate. `sum` is the exact decimal of `sum_milli`; `distinct_cards`
/// the estimate; `cards` the set itself, so a later segment can merge into it.
pub fn to_item(item: &WindowAggregate) -> HashMap<String, AttributeValue> {
    let s = |v: &str| AttributeValue::S(v.to_owned());
    let n = |v: String| AttributeValue::N(v);
    HashMap::from([
        ("id".to_owned(), s(&item.id)),
        ("shard_id".to_owned(), s(&item.shard_id)),
        ("event_source_arn".to_owned(), s(&item.event_source_arn)),
        ("window_start".to_owned(), s(&item.window_start)),
        ("window_end".to_owned(), s(&item.window_end)),
        ("merchant_category".to_owned(), s(&item.merchant_category)),
        ("count".to_owned(), n(item.count.to_string())),
        ("sum".to_owned(), n(milli_to_decimal(item.sum_milli))),
        ("min".to_owned(), n(item.min.to_string())),
        ("max".to_owned(), n(item.max.to_string())),
        (
            "distinct_cards".to_owned(),
            n(item.cards.estimate().to_string()),
        ),
        (
            "distinct_cards_exact".to_owned(),
            AttributeValue::Bool(item.cards.is_exact()),
        ),
        (
            "cards".to_owned(),
            AttributeValue::B(Blob::new(item.cards.to_bytes())),
        ),
        (
            "segments".to_owned(),
            AttributeValue::Ss(item.segments.iter().cloned().collect()),
        ),
        ("version".to_owned(), n(item.version.to_string())),
        ("partial".to_owned(), AttributeValue::Bool(item.partial)),
    ])
}

/// Read an item written by [`to_item`].
pub fn from_item(item: &HashMap<String, AttributeValue>) -> Result<WindowAggregate, String> {
    let s = |name: &str| -> Result<String, String> {
        match item.get(name) {
            Some(AttributeValue::S(v)) => Ok(v.clone()),
            _ => Err(format!("`{name}` is not a string")),
        }
    };
    let n = |name: &str| -> Result<&str, String> {
        match item.get(name) {
            Some(AttributeValue::N(v)) => Ok(v.as_str()),
            _ => Err(format!("`{name}` is not a number")),
        }
    };
    let parse = |name: &str| -> Result<f64, String> {
        n(name)?
            .parse::<f64>()
            .map_err(|e| format!("`{name}`: {e}"))
    };
    let cards = match item.get("cards") {
        Some(AttributeValue::B(blob)) => {
            CardSet::from_bytes(blob.as_ref()).map_err(|e| format!("`cards`: {e}"))?
        }
        _ => return Err("`cards` is not binary".to_owned()),
    };
    let segments = match item.get("segments") {
        Some(AttributeValue::Ss(values)) => values.iter().cloned().collect(),
        _ => return Err("`segments` is not a string set".to_owned()),
    };
    Ok(WindowAggregate {
        id: s("id")?,
        shard_id: s("shard_id")?,
        event_source_arn: s("event_source_arn")?,
        window_start: s("window_start")?,
        window_end: s("window_end")?,
        merchant_category: s("merchant_category")?,
        count: n("count")?.parse().map_err(|e| format!("`count`: {e}"))?,
        sum_milli: decimal_to_milli(n("sum")?)
            .ok_or("`sum` is not a decimal of at most three places")?,
        min: parse("min")?,
        max: parse("max")?,
        cards,
        segments,
        version: n("version")?
            .parse()
            .map_err(|e| format!("`version`: {e}"))?,
        partial: matches!(item.get("partial"), Some(AttributeValue::Bool(true))),
    })
}

/// `12345` → `"12.345"`, `-5` → `"-0.005"`.
pub fn milli_to_decimal(milli: i64) -> String {
    let sign = if milli < 0 { "-" } else { "" };
    let abs = milli.unsigned_abs();
    let text = format!("{sign}{}.{:03}", abs / 1000, abs % 1000);
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The inverse of [`milli_to_decimal`] (DynamoDB may hand numbers back normalized: `12.5`, `1E+3`
/// are not written by us, but `12.5` is).
pub fn decimal_to_milli(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty()
        || fraction.len() > 3
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut fraction_milli: i64 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().ok()?
    };
    for _ in fraction.len()..3 {
        fraction_milli *= 10;
    }
    let value = whole.checked_mul(1000)?.checked_add(fraction_milli)?;
    Some(if negative { -value } else { value })
}

/// Aggregates in the local runner's SQLite file (table `aggregates`), with DynamoDB's conditions.
#[cfg(feature = "local")]
#[derive(Debug, Clone)]
pub struct SqliteAggregateStore {
    table: shardwise_sqlite::SqliteTable,
}

#[cfg(feature = "local")]
impl SqliteAggregateStore {
    pub fn new(db: std::sync::Arc<shardwise_sqlite::LocalDb>) -> Self {
        Self {
            table: shardwise_sqlite::SqliteTable::new(db, "aggregates"),
        }
    }
}

#[cfg(feature = "local")]
impl AggregateStore for SqliteAggregateStore {
    async fn put(
        &self,
        item: &WindowAggregate,
        expected_version: Option<u64>,
    ) -> Result<PutOutcome, StoreError> {
        use shardwise_sqlite::{Condition, PutResult};
        let condition = match expected_version {
            None => Condition::NotExists,
            Some(version) => Condition::NumberEquals {
                attribute: "version".to_owned(),
                value: version.to_string(),
            },
        };
        let call = |e: shardwise_sqlite::LocalError| StoreError::Call {
            table: "aggregates".to_owned(),
            message: e.to_string(),
        };
        match self
            .table
            .put(&item.id, &to_item(item), &condition)
            .map_err(call)?
        {
            PutResult::Written => Ok(PutOutcome::Written),
            PutResult::ConditionFailed(current) => Ok(PutOutcome::Conflict(
                current
                    .as_ref()
                    .map(from_item)
                    .transpose()
                    .map_err(|detail| StoreError::CorruptItem {
                        table: "aggregates".to_owned(),
                        id: item.id.clone(),
                        detail,
                    })?
                    .map(Box::new),
            )),
        }
    }
}

/// Aggregates in memory, with the same conditions as DynamoDB, counting writes.
#[derive(Debug, Default)]
pub struct InMemoryAggregateStore {
    items: Mutex<HashMap<String, WindowAggregate>>,
    writes: AtomicU32,
    failures: AtomicU32,
}

impl InMemoryAggregateStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Items written so far.
    pub fn items(&self) -> Vec<WindowAggregate> {
        let mut items: Vec<_> = self.lock().values().cloned().collect();
        items.sort_by(|a, b| a.id.cmp(&b.id));
        items
    }

    pub fn get(&self, id: &str) -> Option<WindowAggregate> {
        self.lock().get(id).cloned()
    }

    /// Successful puts so far.
    pub fn writes(&self) -> u32 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Make the next `n` puts fail as a throttled call would.
    pub fn fail_next(&self, n: u32) {
        self.failures.store(n, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, WindowAggregate>> {
        self.items
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn take_failure(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl AggregateStore for InMemoryAggregateStore {
    async fn put(
        &self,
        item: &WindowAggregate,
        expected_version: Option<u64>,
    ) -> Result<PutOutcome, StoreError> {
        if take_failure(&self.failures) {
            return Err(StoreError::Call {
                table: "memory".to_owned(),
                message: "ThrottlingException: injected".to_owned(),
            });
        }
        let mut items = self.lock();
        let current = items.get(&item.id);
        let allowed = match (expected_version, current) {
            (None, None) => true,
            (Some(version), Some(current)) => current.version == version,
            _ => false,
        };
        if !allowed {
            return Ok(PutOutcome::Conflict(current.cloned().map(Box::new)));
        }
        items.insert(item.id.clone(), item.clone());
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(PutOutcome::Written)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::cards::card_hash;

    fn sample() -> WindowAggregate {
        let mut cards = CardSet::default();
        cards.insert(card_hash("c-1"));
        WindowAggregate {
            id: "shardId-000000000000#2026-11-26T10:00:00.000Z#5411".into(),
            shard_id: "shardId-000000000000".into(),
            event_source_arn: "arn:aws:kinesis:us-east-1:123456789012:stream/transactions".into(),
            window_start: "2026-11-26T10:00:00.000Z".into(),
            window_end: "2026-11-26T10:01:00.000Z".into(),
            merchant_category: "5411".into(),
            count: 3,
            sum_milli: 100_250,
            min: 0.25,
            max: 99.0,
            cards,
            segments: BTreeSet::from([
                "49590338271490256608559692538361571095921575989136588898".into()
            ]),
            version: 1,
            partial: false,
        }
    }

    #[test]
    fn items_round_trip() {
        let item = sample();
        let stored = to_item(&item);
        assert_eq!(stored["sum"], AttributeValue::N("100.25".into()));
        assert_eq!(stored["distinct_cards"], AttributeValue::N("1".into()));
        assert_eq!(from_item(&stored).unwrap(), item);
        let mut broken = stored.clone();
        broken.insert("count".into(), AttributeValue::S("3".into()));
        assert!(from_item(&broken).unwrap_err().contains("count"));
    }

    #[test]
    fn decimals_are_exact() {
        for (milli, text) in [
            (0, "0"),
            (5, "0.005"),
            (-5, "-0.005"),
            (12_500, "12.5"),
            (1_000, "1"),
            (-123_456_789, "-123456.789"),
        ] {
            assert_eq!(milli_to_decimal(milli), text);
            assert_eq!(decimal_to_milli(text), Some(milli), "{text}");
        }
        assert_eq!(decimal_to_milli("12.3456"), None);
        assert_eq!(decimal_to_milli("1e3"), None);
        assert_eq!(decimal_to_milli(""), None);
        assert_eq!(decimal_to_milli(".5"), Some(500));
    }

    #[tokio::test]
    async fn the_memory_store_keeps_dynamodb_conditions() {
        let store = InMemoryAggregateStore::new();
        let item = sample();
        assert_eq!(store.put(&item, None).await.unwrap(), PutOutcome::Written);
        assert_eq!(
            store.put(&item, None).await.unwrap(),
            PutOutcome::Conflict(Some(Box::new(item.clone())))
        );
        let next = WindowAggregate {
            version: 2,
            ..item.clone()
        };
        assert!(matches!(
            store.put(&next, Some(7)).await.unwrap(),
            PutOutcome::Conflict(_)
        ));
        assert_eq!(
            store.put(&next, Some(1)).await.unwrap(),
            PutOutcome::Written
        );
        assert_eq!(store.writes(), 2);
    }
}
