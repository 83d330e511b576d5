//! The `aggregation` function: card transactions per tumbling window and merchant category.
//!
//! Lambda hands the function the transactions of one shard window by window
//! (`TumblingWindowInSeconds`), with the state the previous invocation of the window returned.
//! [`Aggregation`] keeps in that state, per merchant category, the count, sum, minimum and
//! maximum of `amount` and the distinct cards ([`cards`]: exact while few, a HyperLogLog past
//! that). When the window ends it writes one item per category to DynamoDB
//! (`AGGREGATES_TABLE`). Canary records are acknowledged to `CANARY_TABLE` as they pass.
//!
//! Decoding, ordering, retries, dead letters and the window mechanics (state, the 1 MB limit,
//! which records the state may hold after a partial failure) come from `shardwise::window`; this
//! crate only says what a record contributes and what a window's end writes.
//!
//! # Exactly one write per window, even when the final invocation is retried
//! An item's id is `{shardId}#{windowStart}#{merchantCategory}` and it lists the window
//! *segments* it holds. A segment is the state between two ends (usually the whole window; more
//! when the state had to be flushed early), named by the first record folded into it, which is
//! the same on every retry. Writing a segment ([`write_segment`]) is one conditional put:
//!
//! - `attribute_not_exists(id)`: the first segment of the window creates the item;
//! - on `ConditionalCheckFailed` DynamoDB returns the item there
//!   (`ReturnValuesOnConditionCheckFailure=ALL_OLD`). If it already lists the segment, the write
//!   happened before (a retried final invocation, or a retry after the response was lost): done,
//!   nothing written. Otherwise the segment is merged into it and put again under
//!   `version = :seen`, so two writers can never both merge into the same version.
//!
//! A retried final invocation carries the same state (Lambda only advances state on success)
//! and so the same segment name: it finds its segment listed and writes nothing. The item is
//! written once per segment, and a window's numbers are never counted twice.
//!
//! Amounts are summed in thousandths of a unit (exact for up to three decimals) and written as
//! the exact decimal. They are summed as given, across currencies: the stream carries one.

pub mod cards;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use shardwise::clock::{Clock, SystemClock};
use shardwise::config::{ConfigError, Env, EnvSource};
use shardwise::window::{
    DEFAULT_STATE_LIMIT_BYTES, LAMBDA_STATE_LIMIT_BYTES, WindowEnd, WindowHandler,
    WindowRecordHandler,
};
use shardwise::{HandlerError, Record};
use shardwise_cards::transaction::StreamPayload;
use tracing::info;

use crate::cards::{CardSet, card_hash};
use shardwise_cards::canary::{CanaryAck, CanaryAckStore};

use crate::store::{AggregateStore, PutOutcome, StoreError, WindowAggregate};

/// The consumer name written into canary acknowledgements.
pub const CONSUMER: &str = "aggregation";

/// Settings of the function, from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregationSettings {
    /// `AGGREGATES_TABLE` (required): the table of window aggregates, partition key `id` (S).
    pub aggregates_table: String,
    /// `CANARY_TABLE` (required): canary acknowledgements, keys `canary_id` (S), `consumer` (S).
    pub canary_table: String,
    /// `CANARY_ACK_TTL_SECONDS`, default 3600: how long an acknowledgement is kept.
    pub canary_ack_ttl: Duration,
    /// `WINDOW_STATE_LIMIT_BYTES`, default 786432 (768 KiB), at most 1000000: the serialized
    /// state size at which a window is flushed early.
    pub state_limit_bytes: usize,
}

impl AggregationSettings {
    pub fn from_env(env: &Env<impl EnvSource>) -> Result<Self, ConfigError> {
        let state_limit_bytes = env.parse_or(
            "WINDOW_STATE_LIMIT_BYTES",
            DEFAULT_STATE_LIMIT_BYTES,
            "bytes, a whole number from 1024 to 1000000",
        )?;
        if !(1024..=LAMBDA_STATE_LIMIT_BYTES).contains(&state_limit_bytes) {
            return Err(ConfigError::Invalid {
                name: "WINDOW_STATE_LIMIT_BYTES".to_owned(),
                value: state_limit_bytes.to_string(),
                expected: "bytes, a whole number from 1024 to 1000000".to_owned(),
            });
        }
        Ok(Self {
            aggregates_table: env.required(
                "AGGREGATES_TABLE",
                "the DynamoDB table the window aggregates are written to",
            )?,
            canary_table: env.required(
                "CANARY_TABLE",
                "the DynamoDB table canary acknowledgements are written to",
            )?,
            canary_ack_ttl: Duration::from_secs(env.parse_or(
                "CANARY_ACK_TTL_SECONDS",
                3600u64,
                "seconds, a whole number",
            )?),
            state_limit_bytes,
        })
    }
}

/// The window state: per merchant category. A `BTreeMap` so that the same records always give
/// the same JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowState {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub categories: BTreeMap<String, CategoryAggregate>,
}

/// One merchant category's numbers so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoryAggregate {
    pub count: u64,
    /// Thousandths of a unit.
    pub sum_milli: i64,
    pub min: f64,
    pub max: f64,
    pub cards: CardSet,
}

impl CategoryAggregate {
    fn first(sale: &Sale) -> Self {
        let mut cards = CardSet::default();
        cards.insert(sale.card);
        Self {
            count: 1,
            sum_milli: sale.amount_milli,
            min: sale.amount,
            max: sale.amount,
            cards,
        }
    }

    fn add(&mut self, sale: &Sale) {
        self.count += 1;
        self.sum_milli = self.sum_milli.saturating_add(sale.amount_milli);
        self.min = self.min.min(sale.amount);
        self.max = self.max.max(sale.amount);
        self.cards.insert(sale.card);
    }

    fn merge(&mut self, other: &CategoryAggregate) {
        self.count += other.count;
        self.sum_milli = self.sum_milli.saturating_add(other.sum_milli);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.cards.merge(&other.cards);
    }
}

/// What one transaction adds to the window.
#[derive(Debug, Clone, PartialEq)]
pub struct Sale {
    pub merchant_category: String,
    pub amount: f64,
    pub amount_milli: i64,
    pub card: u64,
}

/// Largest amount accepted, so that a window's sum of thousandths stays far inside `i64`.
const MAX_AMOUNT: f64 = 1e12;

impl WindowState {
    pub fn add(&mut self, sale: Sale) {
        match self.categories.get_mut(&sale.merchant_category) {
            Some(aggregate) => aggregate.add(&sale),
            None => {
                let aggregate = CategoryAggregate::first(&sale);
                self.categories.insert(sale.merchant_category, aggregate);
            }
        }
    }
}

/// The window handler: contributions from transactions, acknowledgements for canaries, one
/// item per category at the window's end.
#[derive(Debug)]
pub struct Aggregation<A, K, C = SystemClock> {
    aggregates: A,
    acks: K,
    clock: C,
    /// Categories written at once at a window's end.
    write_concurrency: usize,
}

impl<A: AggregateStore, K: CanaryAckStore> Aggregation<A, K> {
    pub fn new(aggregates: A, acks: K) -> Self {
        Self {
            aggregates,
            acks,
            clock: SystemClock,
            write_concurrency: 16,
        }
    }
}

impl<A, K, C> Aggregation<A, K, C> {
    pub fn clock<C2: Clock>(self, clock: C2) -> Aggregation<A, K, C2> {
        Aggregation {
            aggregates: self.aggregates,
            acks: self.acks,
            clock,
            write_concurrency: self.write_concurrency,
        }
    }

    pub fn aggregates(&self) -> &A {
        &self.aggregates
    }

    pub fn acks(&self) -> &K {
        &self.acks
    }

    /// The clock acknowledgements are timed with.
    pub fn current_clock(&self) -> &C {
        &self.clock
    }
}

impl<A: AggregateStore, K: CanaryAckStore, C: Clock> WindowHandler for Aggregation<A, K, C> {
    type State = WindowState;
    type Contribution = Sale;

    fn fold(&self, state: &mut WindowState, sale: Sale) {
        state.add(sale);
    }

    async fn on_window_end(
        &self,
        state: &WindowState,
        end: &WindowEnd<'_>,
    ) -> Result<(), HandlerError> {
        let segment = end.segment.unwrap_or("unnamed");
        let window_start = end.window.start.to_rfc3339();
        let window_end = end.window.end.to_rfc3339();
        let items: Vec<WindowAggregate> = state
            .categories
            .iter()
            .map(|(category, numbers)| WindowAggregate {
                id: format!("{}#{window_start}#{category}", end.shard_id),
                shard_id: end.shard_id.to_owned(),
                event_source_arn: end.event_source_arn.to_owned(),
                window_start: window_start.clone(),
                window_end: window_end.clone(),
                merchant_category: category.clone(),
                count: numbers.count,
                sum_milli: numbers.sum_milli,
                min: numbers.min,
                max: numbers.max,
                cards: numbers.cards.clone(),
                segments: BTreeSet::from([segment.to_owned()]),
                version: 1,
                partial: end.partial,
            })
            .collect();
        let store = &self.aggregates;
        let results: Vec<Result<SegmentWrite, StoreError>> = futures::stream::iter(items)
            .map(|item| write_segment(store, item))
            .buffer_unordered(self.write_concurrency.max(1))
            .collect()
            .await;
        let mut written = 0;
        let mut already = 0;
        for result in results {
            match result
                .map_err(|e| HandlerError::retryable(e).with_type("AggregateWriteFailed"))?
            {
                SegmentWrite::Written => written += 1,
                SegmentWrite::AlreadyWritten => already += 1,
            }
        }
        info!(
            shard = end.shard_id,
            window_start,
            segment,
            reason = end.reason.as_str(),
            categories = state.categories.len(),
            written,
            already_written = already,
            "window aggregates stored"
        );
        Ok(())
    }
}

impl<'d, A: AggregateStore, K: CanaryAckStore, C: Clock> WindowRecordHandler<'d>
    for Aggregation<A, K, C>
{
    type Payload = StreamPayload<'d>;

    async fn contribute(
        &self,
        _record: &Record<'d>,
        payload: &StreamPayload<'d>,
    ) -> Result<Option<Sale>, HandlerError> {
        match payload {
            StreamPayload::Canary(canary) => {
                let ack = CanaryAck {
                    canary_id: canary.canary_id.clone().into_owned(),
                    consumer: CONSUMER.to_owned(),
                    sent_at: canary.sent_at,
                    acked_at: self.clock.now_ms(),
                };
                self.acks
                    .acknowledge(std::slice::from_ref(&ack))
                    .await
                    .map_err(|e| HandlerError::retryable(e).with_type("CanaryAckFailed"))?;
                Ok(None)
            }
            StreamPayload::Transaction(tx) => {
                if !tx.amount.is_finite() || tx.amount.abs() > MAX_AMOUNT {
                    return Err(HandlerError::permanent(format!(
                        "amount {} is outside ±{MAX_AMOUNT}",
                        tx.amount
                    ))
                    .with_type("AmountOutOfRange"));
                }
                Ok(Some(Sale {
                    merchant_category: tx.merchant_category.clone().into_owned(),
                    amount: tx.amount,
                    // In range by the check above, so the cast neither saturates nor wraps.
                    amount_milli: (tx.amount * 1000.0).round() as i64,
                    card: card_hash(&tx.card_id),
                }))
            }
        }
    }
}

/// How often a merge is retried when another writer moved the item in between.
const MERGE_ATTEMPTS: u32 = 5;

/// What [`write_segment`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentWrite {
    /// This call wrote the segment (creating the item or merging into it).
    Written,
    /// The item already held the segment: an earlier attempt wrote it; nothing was written.
    AlreadyWritten,
}

/// Write one segment of a window's aggregate for one category, exactly once (see the crate
/// docs).
pub async fn write_segment(
    store: &impl AggregateStore,
    segment: WindowAggregate,
) -> Result<SegmentWrite, StoreError> {
    let mut item = segment.clone();
    let mut expected = None;
    for _ in 0..MERGE_ATTEMPTS {
        let current = match store.put(&item, expected).await? {
            PutOutcome::Written => return Ok(SegmentWrite::Written),
            PutOutcome::Conflict(current) => current,
        };
        match current {
            Some(current)
                if segment
                    .segments
                    .iter()
                    .all(|name| current.segments.contains(name)) =>
            {
                return Ok(SegmentWrite::AlreadyWritten);
            }
            Some(current) => {
                expected = Some(current.version);
                item = merged(*current, &segment);
            }
            // Deleted in between, or a store that does not return the old item: start over.
            None => {
                expected = None;
                item = segment.clone();
            }
        }
    }
    Err(StoreError::Contention {
        id: segment.id,
        attempts: MERGE_ATTEMPTS,
    })
}

fn merged(mut current: WindowAggregate, segment: &WindowAggregate) -> WindowAggregate {
    let mut numbers = CategoryAggregate {
        count: current.count,
        sum_milli: current.sum_milli,
        min: current.min,
        max: current.max,
        cards: current.cards,
    };
    numbers.merge(&CategoryAggregate {
        count: segment.count,
        sum_milli: segment.sum_milli,
        min: segment.min,
        max: segment.max,
        cards: segment.cards.clone(),
    });
    current.segments.extend(segment.segments.iter().cloned());
    WindowAggregate {
        count: numbers.count,
        sum_milli: numbers.sum_milli,
        min: numbers.min,
        max: numbers.max,
        cards: numbers.cards,
        version: current.version + 1,
        partial: current.partial || segment.partial,
        ..current
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::store::InMemoryAggregateStore;

    fn segment(name: &str, count: u64, card: &str) -> WindowAggregate {
        let mut cards = CardSet::default();
        cards.insert(card_hash(card));
        WindowAggregate {
            id: "s#w#5411".into(),
            shard_id: "s".into(),
            event_source_arn: "arn".into(),
            window_start: "w".into(),
            window_end: "e".into(),
            merchant_category: "5411".into(),
            count,
            sum_milli: 1000 * count as i64,
            min: 1.0,
            max: count as f64,
            cards,
            segments: BTreeSet::from([name.to_owned()]),
            version: 1,
            partial: false,
        }
    }

    #[tokio::test]
    async fn a_segment_is_written_once_and_segments_merge() {
        let store = InMemoryAggregateStore::new();
        let first = segment("100", 2, "c-1");
        assert_eq!(
            write_segment(&store, first.clone()).await.unwrap(),
            SegmentWrite::Written
        );
        // Retried: nothing written.
        assert_eq!(
            write_segment(&store, first.clone()).await.unwrap(),
            SegmentWrite::AlreadyWritten
        );
        assert_eq!(store.writes(), 1);
        // A later segment of the same window merges in, once.
        let second = WindowAggregate {
            partial: true,
            ..segment("200", 3, "c-2")
        };
        assert_eq!(
            write_segment(&store, second.clone()).await.unwrap(),
            SegmentWrite::Written
        );
        write_segment(&store, second).await.unwrap();
        write_segment(&store, first).await.unwrap();
        assert_eq!(store.writes(), 2);
        let item = store.get("s#w#5411").unwrap();
        assert_eq!(item.count, 5);
        assert_eq!(item.sum_milli, 5000);
        assert_eq!(item.max, 3.0);
        assert_eq!(item.cards.estimate(), 2);
        assert_eq!(item.version, 2);
        assert!(item.partial);
        assert_eq!(
            item.segments,
            BTreeSet::from(["100".to_owned(), "200".to_owned()])
        );
    }

    #[tokio::test]
    async fn store_failures_surface() {
        let store = InMemoryAggregateStore::new();
        store.fail_next(1);
        assert!(write_segment(&store, segment("1", 1, "c")).await.is_err());
        assert!(write_segment(&store, segment("1", 1, "c")).await.is_ok());
    }

    #[test]
    fn settings_name_what_is_missing() {
        let env = Env(HashMap::from([("CANARY_TABLE", "acks")]));
        let err = AggregationSettings::from_env(&env).unwrap_err();
        assert!(err.to_string().contains("AGGREGATES_TABLE"), "{err}");
        let env = Env(HashMap::from([("AGGREGATES_TABLE", "aggs")]));
        let err = AggregationSettings::from_env(&env).unwrap_err();
        assert!(err.to_string().contains("CANARY_TABLE"), "{err}");
        let env = Env(HashMap::from([
            ("AGGREGATES_TABLE", "aggs"),
            ("CANARY_TABLE", "acks"),
            ("WINDOW_STATE_LIMIT_BYTES", "2000000"),
        ]));
        let err = AggregationSettings::from_env(&env).unwrap_err();
        assert!(
            err.to_string().contains("WINDOW_STATE_LIMIT_BYTES"),
            "{err}"
        );
        let env = Env(HashMap::from([
            ("AGGREGATES_TABLE", "aggs"),
            ("CANARY_TABLE", "acks"),
        ]));
        let settings = AggregationSettings::from_env(&env).unwrap();
        assert_eq!(settings.state_limit_bytes, DEFAULT_STATE_LIMIT_BYTES);
        assert_eq!(settings.canary_ack_ttl, Duration::from_secs(3600));
    }
}
