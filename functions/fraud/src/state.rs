//! Card history in DynamoDB (`CARD_STATE_TABLE`), read and written once per batch.
//!
//! # Table
//!
//! | attribute | type | meaning |
//! |---|---|---|
//! | `card_id` | S, partition key | the card |
//! | `version` | N | incremented by every write; writes are conditional on the version read |
//! | `last_shard`, `last_sequence`, `last_sub_sequence` | S, S, N | the last record applied to the card |
//! | `profile` | S | the rules' memory of the card ([`CardProfile`], JSON) |
//! | `pending_alerts` | L of S | alerts decided but not yet confirmed sent (the outbox) |
//! | `updated_at` | N | epoch ms of the write |
//! | `expiration` | N, TTL | epoch seconds; an idle card's history expires |
//!
//! # Why a sequence guard and an outbox
//!
//! Lambda redelivers records: after a failed invocation, a partial batch response, a bisection.
//! A card remembers the last record (shard, sequence number, sub-sequence number) applied to it,
//! and a record at or before that position is skipped: it is neither scored again nor folded into
//! the profile twice, so a redelivery can never move the card's state backwards or double-count.
//! Sequence numbers are compared as (length, text), since they are 56-digit decimals.
//!
//! An alert is decided in the same conditional write that applies its transaction
//! (`pending_alerts`), sent afterwards, and then removed. A crash between the write and the send
//! leaves the alert in the outbox, and the next delivery of the card's records sends it: no alert
//! is lost. The alert is sent again only if the process dies after SQS took it but before the
//! outbox was cleared; with a FIFO alerts queue, SQS drops even that duplicate (the deduplication
//! id is the transaction id).
//!
//! Reads are one `BatchGetItem` per 100 cards with `ConsistentRead` (the previous invocation's
//! write must be seen); writes one `TransactWriteItems` per 100 cards, each item conditional on
//! the version read.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem};
use shardwise::record::{Record, SequenceNumber};

use crate::rules::CardProfile;

#[cfg(feature = "local")]
pub(crate) mod sqlite;

/// The last record applied to a card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedPosition {
    pub shard_id: String,
    pub sequence_number: String,
    pub sub_sequence_number: Option<u64>,
}

impl AppliedPosition {
    pub fn of(record: &Record<'_>) -> Self {
        Self {
            shard_id: record.shard_id.to_owned(),
            sequence_number: record.sequence_number.as_str().to_owned(),
            sub_sequence_number: record.sub_sequence_number,
        }
    }

    /// Whether `record` was applied already: same shard, at or before this position. Records of
    /// another shard (after a reshard the card's key moves to a child shard, read only once the
    /// parent is done) are always new.
    pub fn covers(&self, record: &Record<'_>) -> bool {
        if record.shard_id != self.shard_id {
            return false;
        }
        let applied = (
            SequenceNumber::new(&self.sequence_number),
            self.sub_sequence_number.unwrap_or(0),
        );
        let candidate = (
            record.sequence_number,
            record.sub_sequence_number.unwrap_or(0),
        );
        candidate <= applied
    }
}

/// One card's stored state.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CardState {
    pub card_id: String,
    /// The version read; 0 when the card has no item yet.
    pub version: u64,
    pub last_applied: Option<AppliedPosition>,
    pub profile: CardProfile,
    /// Alert message bodies (JSON) not yet confirmed sent.
    pub pending_alerts: Vec<String>,
}

impl CardState {
    pub fn new(card_id: impl Into<String>) -> Self {
        Self {
            card_id: card_id.into(),
            ..Self::default()
        }
    }
}

/// A state call that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// Another writer changed the card since it was read: read again and redo.
    #[error("card state of {card_id} changed since it was read")]
    Conflict { card_id: String },
    /// Throttling, network, 5xx, unprocessed keys left after retries.
    #[error("card state table unavailable: {0}")]
    Unavailable(String),
    /// Missing table, access denied, malformed request: needs a fix, not a retry.
    #[error("card state table rejected the request: {0}")]
    Rejected(String),
    /// An item that is not a card state this function wrote.
    #[error("card state of {card_id} unreadable: {message}")]
    Unreadable { card_id: String, message: String },
}

/// Card states; every method is one round of backend calls.
pub trait CardStateStore: Send + Sync {
    /// The states of `card_ids` (distinct), `None` for cards never seen; same positions.
    fn load(
        &self,
        card_ids: &[&str],
    ) -> impl Future<Output = Result<Vec<Option<CardState>>, StateError>> + Send;

    /// Write `states`, each conditional on its `version` being the stored one (0: no item), and
    /// store them with `version + 1`. One result per state.
    fn save(
        &self,
        states: &[CardState],
        now_ms: i64,
    ) -> impl Future<Output = Vec<Result<(), StateError>>> + Send;

    /// Replace the outbox of a card whose stored version is `version`.
    fn set_pending_alerts(
        &self,
        card_id: &str,
        version: u64,
        pending: &[String],
    ) -> impl Future<Output = Result<(), StateError>> + Send;
}

pub mod attr {
    pub const CARD_ID: &str = "card_id";
    pub const VERSION: &str = "version";
    pub const LAST_SHARD: &str = "last_shard";
    pub const LAST_SEQUENCE: &str = "last_sequence";
    pub const LAST_SUB_SEQUENCE: &str = "last_sub_sequence";
    pub const PROFILE: &str = "profile";
    pub const PENDING_ALERTS: &str = "pending_alerts";
    pub const UPDATED_AT: &str = "updated_at";
    pub const EXPIRATION: &str = "expiration";
}

/// DynamoDB's per-call limit of `TransactWriteItems`.
const MAX_TRANSACT: usize = 100;
/// Rounds of `UnprocessedKeys` retries before a load gives up (the handler is retried anyway).
const MAX_GET_ROUNDS: u32 = 4;

/// Card states in DynamoDB.
#[derive(Debug, Clone)]
pub struct DynamoDbCardStateStore {
    client: Client,
    table: String,
    /// Idle time after which a card's history expires (TTL); `None` keeps it forever.
    ttl_seconds: Option<i64>,
}

impl DynamoDbCardStateStore {
    pub fn new(client: Client, table: impl Into<String>, ttl_seconds: Option<i64>) -> Self {
        Self {
            client,
            table: table.into(),
            ttl_seconds,
        }
    }

    fn item(
        &self,
        state: &CardState,
        now_ms: i64,
    ) -> Result<HashMap<String, AttributeValue>, StateError> {
        let profile = serde_json::to_string(&state.profile)
            .map_err(|e| StateError::Rejected(format!("profile of {}: {e}", state.card_id)))?;
        let mut item = HashMap::from([
            (
                attr::CARD_ID.to_owned(),
                AttributeValue::S(state.card_id.clone()),
            ),
            (
                attr::VERSION.to_owned(),
                AttributeValue::N((state.version + 1).to_string()),
            ),
            (attr::PROFILE.to_owned(), AttributeValue::S(profile)),
            (
                attr::UPDATED_AT.to_owned(),
                AttributeValue::N(now_ms.to_string()),
            ),
        ]);
        if let Some(position) = &state.last_applied {
            item.insert(
                attr::LAST_SHARD.to_owned(),
                AttributeValue::S(position.shard_id.clone()),
            );
            item.insert(
                attr::LAST_SEQUENCE.to_owned(),
                AttributeValue::S(position.sequence_number.clone()),
            );
            if let Some(sub) = position.sub_sequence_number {
                item.insert(
                    attr::LAST_SUB_SEQUENCE.to_owned(),
                    AttributeValue::N(sub.to_string()),
                );
            }
        }
        if !state.pending_alerts.is_empty() {
            item.insert(
                attr::PENDING_ALERTS.to_owned(),
                alerts_value(&state.pending_alerts),
            );
        }
        if let Some(ttl) = self.ttl_seconds {
            item.insert(
                attr::EXPIRATION.to_owned(),
                AttributeValue::N((now_ms / 1000 + ttl).to_string()),
            );
        }
        Ok(item)
    }
}

fn alerts_value(alerts: &[String]) -> AttributeValue {
    AttributeValue::L(alerts.iter().cloned().map(AttributeValue::S).collect())
}

/// Retryable or not by the one list every Shardwise client shares.
fn classify<E>(error: SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>) -> StateError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let text = aws_sdk_dynamodb::error::DisplayErrorContext(&error).to_string();
    if shardwise_aws::retryable::classify(&error).is_retryable() {
        StateError::Unavailable(text)
    } else {
        StateError::Rejected(text)
    }
}

fn parse_state(item: &HashMap<String, AttributeValue>) -> Result<CardState, StateError> {
    let card_id = match item.get(attr::CARD_ID) {
        Some(AttributeValue::S(id)) => id.clone(),
        _ => {
            return Err(StateError::Unreadable {
                card_id: String::new(),
                message: "no card_id".into(),
            });
        }
    };
    let unreadable = |message: String| StateError::Unreadable {
        card_id: card_id.clone(),
        message,
    };
    let string = |name: &str| match item.get(name) {
        Some(AttributeValue::S(s)) => Some(s.clone()),
        _ => None,
    };
    let number = |name: &str| -> Result<Option<u64>, StateError> {
        match item.get(name) {
            None => Ok(None),
            Some(AttributeValue::N(n)) => n
                .parse()
                .map(Some)
                .map_err(|_| unreadable(format!("{name} is {n:?}"))),
            Some(_) => Err(unreadable(format!("{name} is not a number"))),
        }
    };
    let version = number(attr::VERSION)?.ok_or_else(|| unreadable("no version".into()))?;
    let last_applied = match (string(attr::LAST_SHARD), string(attr::LAST_SEQUENCE)) {
        (Some(shard_id), Some(sequence_number)) => Some(AppliedPosition {
            shard_id,
            sequence_number,
            sub_sequence_number: number(attr::LAST_SUB_SEQUENCE)?,
        }),
        _ => None,
    };
    let profile = match string(attr::PROFILE) {
        Some(json) => {
            serde_json::from_str(&json).map_err(|e| unreadable(format!("profile: {e}")))?
        }
        None => CardProfile::default(),
    };
    let pending_alerts = match item.get(attr::PENDING_ALERTS) {
        None => Vec::new(),
        Some(AttributeValue::L(list)) => list
            .iter()
            .map(|v| match v {
                AttributeValue::S(s) => Ok(s.clone()),
                _ => Err(unreadable("pending_alerts holds a non-string".into())),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(unreadable("pending_alerts is not a list".into())),
    };
    Ok(CardState {
        card_id,
        version,
        last_applied,
        profile,
        pending_alerts,
    })
}

impl CardStateStore for DynamoDbCardStateStore {
    async fn load(&self, card_ids: &[&str]) -> Result<Vec<Option<CardState>>, StateError> {
        let mut found: HashMap<String, CardState> = HashMap::with_capacity(card_ids.len());
        use shardwise_aws::dynamodb::{BatchGetError, batch_get_consistent};
        let keys = card_ids
            .iter()
            .map(|id| {
                HashMap::from([(
                    attr::CARD_ID.to_owned(),
                    AttributeValue::S((*id).to_owned()),
                )])
            })
            .collect();
        let items = batch_get_consistent(&self.client, &self.table, keys, MAX_GET_ROUNDS)
            .await
            .map_err(|error| match error {
                BatchGetError::Call(error) => classify(*error),
                BatchGetError::Build(error) => StateError::Rejected(error.to_string()),
                other => StateError::Unavailable(format!("card states: {other}")),
            })?;
        for item in &items {
            let state = parse_state(item)?;
            found.insert(state.card_id.clone(), state);
        }
        Ok(card_ids.iter().map(|id| found.remove(*id)).collect())
    }

    async fn save(&self, states: &[CardState], now_ms: i64) -> Vec<Result<(), StateError>> {
        let calls = states.chunks(MAX_TRANSACT).map(|chunk| async move {
            let result = self.transact(chunk, now_ms).await;
            (chunk.len(), result)
        });
        let mut results = Vec::with_capacity(states.len());
        for (len, result) in futures::future::join_all(calls).await {
            match result {
                Ok(()) => results.extend((0..len).map(|_| Ok(()))),
                Err(per_item) => results.extend(per_item),
            }
        }
        results
    }

    async fn set_pending_alerts(
        &self,
        card_id: &str,
        version: u64,
        pending: &[String],
    ) -> Result<(), StateError> {
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(attr::CARD_ID, AttributeValue::S(card_id.to_owned()))
            .condition_expression("#v = :v")
            .expression_attribute_names("#v", attr::VERSION)
            .expression_attribute_names("#p", attr::PENDING_ALERTS)
            .expression_attribute_values(":v", AttributeValue::N(version.to_string()));
        let request = if pending.is_empty() {
            request.update_expression("REMOVE #p")
        } else {
            request
                .update_expression("SET #p = :p")
                .expression_attribute_values(":p", alerts_value(pending))
        };
        match request.send().await {
            Ok(_) => Ok(()),
            Err(error) if error.code() == Some("ConditionalCheckFailedException") => {
                Err(StateError::Conflict {
                    card_id: card_id.to_owned(),
                })
            }
            Err(error) => Err(classify(error)),
        }
    }
}

impl DynamoDbCardStateStore {
    /// One `TransactWriteItems`; on failure, one error per state.
    async fn transact(
        &self,
        states: &[CardState],
        now_ms: i64,
    ) -> Result<(), Vec<Result<(), StateError>>> {
        let all = |error: StateError| {
            states
                .iter()
                .map(|_| Err(error.clone()))
                .collect::<Vec<_>>()
        };
        let mut request = self.client.transact_write_items();
        for state in states {
            let item = self.item(state, now_ms).map_err(all)?;
            let put = Put::builder().table_name(&self.table).set_item(Some(item));
            let put = if state.version == 0 {
                put.condition_expression("attribute_not_exists(#id)")
                    .expression_attribute_names("#id", attr::CARD_ID)
            } else {
                put.condition_expression("#v = :v")
                    .expression_attribute_names("#v", attr::VERSION)
                    .expression_attribute_values(":v", AttributeValue::N(state.version.to_string()))
            };
            let put = put
                .build()
                .map_err(|e| all(StateError::Rejected(e.to_string())))?;
            request = request.transact_items(TransactWriteItem::builder().put(put).build());
        }
        match request.send().await {
            Ok(_) => Ok(()),
            Err(error) => {
                use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
                if let SdkError::ServiceError(context) = &error
                    && let TransactWriteItemsError::TransactionCanceledException(cancelled) =
                        context.err()
                {
                    let reasons = cancelled.cancellation_reasons();
                    let results = states
                        .iter()
                        .enumerate()
                        .map(|(i, state)| {
                            match reasons.get(i).and_then(|r| r.code()) {
                                Some("ConditionalCheckFailed") => Err(StateError::Conflict {
                                    card_id: state.card_id.clone(),
                                }),
                                // Cancelled because of another item: nothing was written.
                                _ => Err(StateError::Unavailable(format!(
                                    "transaction cancelled: {}",
                                    aws_sdk_dynamodb::error::DisplayErrorContext(&error)
                                ))),
                            }
                        })
                        .collect();
                    return Err(results);
                }
                Err(all(classify(error)))
            }
        }
    }
}

/// Card states in memory, with the same conditional semantics; counts calls.
#[derive(Debug, Default)]
pub struct InMemoryCardStateStore {
    inner: Mutex<InMemoryInner>,
}

#[derive(Debug, Default)]
struct InMemoryInner {
    states: HashMap<String, CardState>,
    loads: u32,
    saves: u32,
    fail_next_save: Option<StateError>,
    fail_next_outbox: Option<StateError>,
}

impl InMemoryCardStateStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InMemoryInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stored state (with its stored version).
    pub fn get(&self, card_id: &str) -> Option<CardState> {
        self.lock().states.get(card_id).cloned()
    }

    /// (load calls, save calls).
    pub fn calls(&self) -> (u32, u32) {
        let inner = self.lock();
        (inner.loads, inner.saves)
    }

    /// The next save fails as a whole with `error`.
    pub fn fail_next_save(&self, error: StateError) {
        self.lock().fail_next_save = Some(error);
    }

    /// The next outbox update fails with `error`.
    pub fn fail_next_outbox(&self, error: StateError) {
        self.lock().fail_next_outbox = Some(error);
    }
}

impl CardStateStore for InMemoryCardStateStore {
    async fn load(&self, card_ids: &[&str]) -> Result<Vec<Option<CardState>>, StateError> {
        let mut inner = self.lock();
        inner.loads += 1;
        Ok(card_ids
            .iter()
            .map(|id| inner.states.get(*id).cloned())
            .collect())
    }

    async fn save(&self, states: &[CardState], _now_ms: i64) -> Vec<Result<(), StateError>> {
        let mut inner = self.lock();
        inner.saves += 1;
        if let Some(error) = inner.fail_next_save.take() {
            return states.iter().map(|_| Err(error.clone())).collect();
        }
        // All or nothing, as a transaction.
        let conflict = states.iter().position(|s| {
            inner
                .states
                .get(&s.card_id)
                .map_or(0, |stored| stored.version)
                != s.version
        });
        if let Some(conflict) = conflict {
            return states
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    Err(if i == conflict {
                        StateError::Conflict {
                            card_id: s.card_id.clone(),
                        }
                    } else {
                        StateError::Unavailable("transaction cancelled".into())
                    })
                })
                .collect();
        }
        for state in states {
            let mut stored = state.clone();
            stored.version += 1;
            inner.states.insert(stored.card_id.clone(), stored);
        }
        states.iter().map(|_| Ok(())).collect()
    }

    async fn set_pending_alerts(
        &self,
        card_id: &str,
        version: u64,
        pending: &[String],
    ) -> Result<(), StateError> {
        let mut inner = self.lock();
        if let Some(error) = inner.fail_next_outbox.take() {
            return Err(error);
        }
        match inner.states.get_mut(card_id) {
            Some(stored) if stored.version == version => {
                stored.pending_alerts = pending.to_vec();
                Ok(())
            }
            _ => Err(StateError::Conflict {
                card_id: card_id.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn record<'a>(shard: &'a str, seq: &'a str, sub: Option<u64>) -> Record<'a> {
        Record {
            event_index: 0,
            stream_arn: "arn",
            shard_id: shard,
            sequence_number: SequenceNumber::new(seq),
            sub_sequence_number: sub,
            partition_key: "k",
            explicit_hash_key: None,
            approximate_arrival_ms: 0,
            data: b"",
        }
    }

    #[test]
    fn the_guard_compares_56_digit_sequence_numbers_within_a_shard() {
        let applied = AppliedPosition {
            shard_id: "shardId-000000000001".into(),
            sequence_number: "49590338271490256608559692538361571095921575989136588898".into(),
            sub_sequence_number: None,
        };
        let shard = "shardId-000000000001";
        assert!(applied.covers(&record(
            shard,
            "49590338271490256608559692538361571095921575989136588898",
            None
        )));
        assert!(applied.covers(&record(
            shard,
            "49590338271490256608559692538361571095921575989136588897",
            None
        )));
        assert!(applied.covers(&record(shard, "9", None)));
        assert!(!applied.covers(&record(
            shard,
            "49590338271490256608559692538361571095921575989136588899",
            None
        )));
        assert!(!applied.covers(&record(
            shard,
            "149590338271490256608559692538361571095921575989136588898",
            None
        )));
        // Another shard is never covered.
        assert!(!applied.covers(&record("shardId-000000000002", "1", None)));
    }

    #[test]
    fn the_guard_orders_kpl_user_records_by_sub_sequence() {
        let applied = AppliedPosition {
            shard_id: "s".into(),
            sequence_number: "100".into(),
            sub_sequence_number: Some(2),
        };
        assert!(applied.covers(&record("s", "100", Some(0))));
        assert!(applied.covers(&record("s", "100", Some(2))));
        assert!(!applied.covers(&record("s", "100", Some(3))));
        assert!(!applied.covers(&record("s", "101", Some(0))));
    }

    #[test]
    fn items_round_trip() {
        let store = DynamoDbCardStateStore::new(
            Client::from_conf(
                aws_sdk_dynamodb::Config::builder()
                    .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
                    .build(),
            ),
            "cards",
            Some(86_400),
        );
        let mut state = CardState::new("4000");
        state.version = 6;
        state.last_applied = Some(AppliedPosition {
            shard_id: "s".into(),
            sequence_number: "123".into(),
            sub_sequence_number: Some(4),
        });
        state.profile.recent = vec![1, 2, 3];
        state.pending_alerts = vec!["{\"a\":1}".into()];
        let item = store.item(&state, 1_700_000_000_000).unwrap();
        assert_eq!(
            item[attr::EXPIRATION],
            AttributeValue::N("1700086400".into())
        );
        let back = parse_state(&item).unwrap();
        // Stored as the next version.
        assert_eq!(back.version, 7);
        assert_eq!(CardState { version: 6, ..back }, state);
    }
}
