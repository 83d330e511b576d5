//! `fraud`: scores card transactions from the stream against each card's history and sends an
//! alert to SQS for the suspicious ones, once per transaction.
//!
//! - [`rules`]: the rules (velocity, impossible travel, amount anomaly, blocklists), pure.
//! - [`model`]: the streaming anomaly model (a Random Cut Forest per shard), its features, and
//!   its snapshots, so a cold start resumes it.
//! - [`state`]: card history in DynamoDB, read and written once per batch, guarded by sequence
//!   number so a redelivered record never moves a card backwards, with an outbox of alerts.
//! - [`alert`]: the alert message and the SQS queue.
//! - [`FraudHandler`]: the [`BatchHandler`] tying them together; run with
//!   [`Processor::bisecting`], so one poison record is isolated without losing the batch I/O.
//! - [`FraudSettings`]: everything read from the environment (see the README for the variables).
//!
//! Canary records on the stream are acknowledged to the canary table, not scored.
//!
//! # Why a batch handler
//! A card's history must be read before its transactions are scored and written after. Per record
//! that is two DynamoDB calls a record; per batch it is one `BatchGetItem` and one
//! `TransactWriteItems` per 100 cards. Transactions of one card are applied in stream order within
//! the batch, each scored against the profile its predecessors left.

pub mod alert;
pub mod eval;
#[cfg(feature = "local")]
pub mod local;
pub mod model;
pub mod rules;
pub mod state;

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Deserialize;
use shardwise::clock::Clock;
use shardwise::config::{CommonSettings, ConfigError, Env, EnvSource};
use shardwise::dead_letter::DeadLetterSink;
use shardwise::payload::{FromRecordData, PayloadError, PayloadErrorKind};
use shardwise::processor::Bisecting;
use shardwise::retry::{ExponentialBackoff, retry};
use shardwise::time::Timestamp;
use shardwise::{BatchHandler, HandlerError, Processor, Record, TypedRecord};
use shardwise_cards::canary::{CanaryAck, CanaryAckStore};
use shardwise_cards::transaction::{StreamPayload, Transaction};
use tracing::{info, warn};

use crate::alert::{Alert, AlertSink, ModelView, OutgoingAlert};
use crate::model::snapshot::{MAX_SNAPSHOT_BYTES, MODEL_KEY_PREFIX, snapshot_size_bound};
use crate::model::{
    InMemoryModelStore, ModelStore, Point, ShardModel, SnapshotError, features, shard_seed,
};
use crate::rules::{
    AmountRule, AnomalyRule, Blocklist, CardRange, Reason, Rule, RuleSet, TravelRule,
    UnusualMerchantRule, VelocityRule,
};
use crate::state::{AppliedPosition, CardState, CardStateStore, StateError};

/// The consumer name this function acknowledges canaries under.
pub const CONSUMER: &str = "fraud";

/// The function's settings, from the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct FraudSettings {
    pub common: CommonSettings,
    /// `ALERTS_QUEUE_URL` (required).
    pub alerts_queue_url: String,
    /// `CARD_STATE_TABLE` (required).
    pub card_state_table: String,
    /// `CANARY_TABLE` (required).
    pub canary_table: String,
    /// `FRAUD_CARD_STATE_TTL_DAYS`, default 90; 0 keeps card history forever.
    pub card_state_ttl_seconds: Option<i64>,
    pub rules: RuleSet,
}

impl FraudSettings {
    pub fn from_env(env: &Env<impl EnvSource>) -> Result<Self, ConfigError> {
        let common = CommonSettings::from_env(env)?;
        let defaults = RuleSet::default();
        let invalid = |name: &str, value: String, expected: &str| ConfigError::Invalid {
            name: name.to_owned(),
            value,
            expected: expected.to_owned(),
        };
        let positive = |name: &str, default: f64| -> Result<f64, ConfigError> {
            let value = env.parse_or(name, default, "a positive number")?;
            if value.is_finite() && value > 0.0 {
                Ok(value)
            } else {
                Err(invalid(name, value.to_string(), "a positive number"))
            }
        };
        let score = |name: &str, default: u32| env.parse_or(name, default, "a whole number from 0");
        let window_seconds: u32 = env.parse_or(
            "FRAUD_VELOCITY_WINDOW_SECONDS",
            300,
            "seconds, a whole number from 1",
        )?;
        if window_seconds == 0 {
            return Err(invalid(
                "FRAUD_VELOCITY_WINDOW_SECONDS",
                "0".into(),
                "seconds, a whole number from 1",
            ));
        }
        let merchants: HashSet<String> = env
            .string_or("FRAUD_BLOCKED_MERCHANTS", "")
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect();
        let card_ranges = env
            .string_or("FRAUD_BLOCKED_CARD_PREFIXES", "")
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(|r| {
                CardRange::parse(r).ok_or_else(|| {
                    invalid(
                        "FRAUD_BLOCKED_CARD_PREFIXES",
                        r.to_owned(),
                        "comma-separated digit prefixes (412345) or ranges of equal length (400000-400099)",
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ttl_days: u32 =
            env.parse_or("FRAUD_CARD_STATE_TTL_DAYS", 90, "days, a whole number")?;
        let anomaly = &defaults.anomaly;
        let whole_from_1 = |name: &str, default: usize| -> Result<usize, ConfigError> {
            let value: usize = env.parse_or(name, default, "a whole number from 1")?;
            if value == 0 {
                return Err(invalid(name, "0".into(), "a whole number from 1"));
            }
            Ok(value)
        };
        let trees = whole_from_1("FRAUD_MODEL_TREES", anomaly.trees)?;
        let sample_size = whole_from_1("FRAUD_MODEL_SAMPLE_SIZE", anomaly.sample_size)?;
        if snapshot_size_bound(trees, sample_size) > MAX_SNAPSHOT_BYTES {
            return Err(invalid(
                "FRAUD_MODEL_TREES",
                format!("{trees} (with FRAUD_MODEL_SAMPLE_SIZE={sample_size})"),
                "trees × sample size small enough for the snapshot to fit in one DynamoDB item \
                 (trees × sample size ≤ about 9,600)",
            ));
        }
        let snapshot_seconds: u32 = env.parse_or(
            "FRAUD_MODEL_SNAPSHOT_SECONDS",
            (anomaly.snapshot_interval_ms / 1000) as u32,
            "seconds, a whole number",
        )?;

        Ok(Self {
            alerts_queue_url: env.required(
                "ALERTS_QUEUE_URL",
                "the SQS queue URL fraud alerts are sent to",
            )?,
            card_state_table: env.required(
                "CARD_STATE_TABLE",
                "the DynamoDB table of card histories (partition key card_id)",
            )?,
            canary_table: env.required(
                "CANARY_TABLE",
                "the DynamoDB table canary records are acknowledged in",
            )?,
            card_state_ttl_seconds: (ttl_days > 0).then(|| i64::from(ttl_days) * 86_400),
            rules: RuleSet {
                threshold: score("FRAUD_SCORE_THRESHOLD", defaults.threshold)?,
                velocity: VelocityRule {
                    max_transactions: env.parse_or(
                        "FRAUD_VELOCITY_MAX_TX",
                        defaults.velocity.max_transactions,
                        "a whole number",
                    )?,
                    window_ms: i64::from(window_seconds) * 1000,
                    score: score("FRAUD_VELOCITY_SCORE", defaults.velocity.score)?,
                },
                travel: TravelRule {
                    max_kmh: positive("FRAUD_TRAVEL_MAX_KMH", defaults.travel.max_kmh)?,
                    min_km: positive("FRAUD_TRAVEL_MIN_KM", defaults.travel.min_km)?,
                    score: score("FRAUD_TRAVEL_SCORE", defaults.travel.score)?,
                },
                amount: AmountRule {
                    min_history: env.parse_or(
                        "FRAUD_AMOUNT_MIN_HISTORY",
                        defaults.amount.min_history,
                        "a whole number",
                    )?,
                    z_threshold: positive("FRAUD_AMOUNT_Z_THRESHOLD", defaults.amount.z_threshold)?,
                    log_std_floor: positive(
                        "FRAUD_AMOUNT_LOG_STD_FLOOR",
                        defaults.amount.log_std_floor,
                    )?,
                    min_amount: positive("FRAUD_AMOUNT_MIN", defaults.amount.min_amount)?,
                    score: score("FRAUD_AMOUNT_SCORE", defaults.amount.score)?,
                },
                blocklist: Blocklist {
                    merchants,
                    card_ranges,
                    merchant_score: score(
                        "FRAUD_BLOCKED_MERCHANT_SCORE",
                        defaults.blocklist.merchant_score,
                    )?,
                    card_score: score("FRAUD_BLOCKED_CARD_SCORE", defaults.blocklist.card_score)?,
                },
                unusual_merchant: UnusualMerchantRule {
                    min_history: env.parse_or(
                        "FRAUD_UNUSUAL_MERCHANT_MIN_HISTORY",
                        defaults.unusual_merchant.min_history,
                        "a whole number",
                    )?,
                    max_category_share: positive(
                        "FRAUD_UNUSUAL_MERCHANT_MAX_SHARE",
                        defaults.unusual_merchant.max_category_share,
                    )?,
                    score: score(
                        "FRAUD_UNUSUAL_MERCHANT_SCORE",
                        defaults.unusual_merchant.score,
                    )?,
                },
                anomaly: AnomalyRule {
                    threshold: positive("FRAUD_ANOMALY_THRESHOLD", anomaly.threshold)?,
                    score: score("FRAUD_ANOMALY_SCORE", anomaly.score)?,
                    trees,
                    sample_size,
                    warmup: env.parse_or(
                        "FRAUD_MODEL_WARMUP",
                        anomaly.warmup,
                        "a whole number of transactions",
                    )?,
                    snapshot_interval_ms: i64::from(snapshot_seconds) * 1000,
                },
            },
            common,
        })
    }
}

/// The payload the fraud function accepts: a stream payload whose transaction is also plausible
/// (coordinates on Earth, ids not empty). An implausible one is a wrong-shape payload, dead-lettered
/// before the handler runs, so it can never fail (and bisect) a whole batch.
#[derive(Debug, Clone, PartialEq)]
pub struct FraudPayload<'d>(pub StreamPayload<'d>);

impl<'d> FromRecordData<'d> for FraudPayload<'d> {
    fn from_record_data(data: &'d [u8]) -> Result<Self, PayloadError> {
        let payload = StreamPayload::from_record_data(data)?;
        if let StreamPayload::Transaction(tx) = &payload {
            let wrong = |path: &str, message: String| PayloadError {
                kind: PayloadErrorKind::WrongShape,
                path: path.to_owned(),
                message,
            };
            if !(-90.0..=90.0).contains(&tx.lat) {
                return Err(wrong(
                    "lat",
                    format!("latitude {} is not within -90..90", tx.lat),
                ));
            }
            if !(-180.0..=180.0).contains(&tx.lon) {
                return Err(wrong(
                    "lon",
                    format!("longitude {} is not within -180..180", tx.lon),
                ));
            }
            if tx.card_id.is_empty() {
                return Err(wrong("card_id", "card_id is empty".into()));
            }
            if tx.card_id.starts_with(MODEL_KEY_PREFIX) {
                // The card state table keeps the shards' models under these keys.
                return Err(wrong(
                    "card_id",
                    format!("card_id may not start with {MODEL_KEY_PREFIX}"),
                ));
            }
            if tx.transaction_id.is_empty() {
                return Err(wrong("transaction_id", "transaction_id is empty".into()));
            }
        }
        Ok(Self(payload))
    }
}

/// Scores a batch: reads the cards' histories, applies the batch's transactions in order, writes
/// the histories back, sends the alerts, acknowledges canaries.
#[derive(Debug)]
pub struct FraudHandler<S, A, K, C, M = InMemoryModelStore> {
    store: S,
    alerts: A,
    canaries: K,
    clock: C,
    rules: RuleSet,
    /// Retries of the outbox update after alerts went out (a failure there means a duplicate).
    outbox_retry: ExponentialBackoff,
    model_store: M,
    /// The shards' models this instance holds, kept across invocations.
    models: Mutex<HashMap<String, LoadedModel>>,
    /// Every scored transaction's scores, when asked for (the evaluation's plot).
    score_log: Option<Mutex<Vec<Scored>>>,
}

/// A shard's model in memory, and where its snapshot stands.
#[derive(Debug)]
struct LoadedModel {
    model: ShardModel,
    /// The stored snapshot's version (0: none).
    version: u64,
    snapshot_at: i64,
    /// Updates since the last snapshot.
    unsaved: u64,
}

/// One scored transaction, as [`FraudHandler::recording_scores`] keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub transaction_id: String,
    /// The rules' total, the anomaly rule included.
    pub total: u32,
    /// The model's score (`None` while it warms up).
    pub anomaly: Option<f64>,
}

impl<S, A, K, C> FraudHandler<S, A, K, C> {
    /// A handler whose models live in memory only; give it a store with
    /// [`FraudHandler::with_model_store`] to resume them after a cold start.
    pub fn new(store: S, alerts: A, canaries: K, clock: C, rules: RuleSet) -> Self {
        Self {
            store,
            alerts,
            canaries,
            clock,
            rules,
            outbox_retry: ExponentialBackoff {
                max_retries: 3,
                ..ExponentialBackoff::default()
            },
            model_store: InMemoryModelStore::new(),
            models: Mutex::new(HashMap::new()),
            score_log: None,
        }
    }
}

impl<S, A, K, C, M> FraudHandler<S, A, K, C, M> {
    /// The same handler with its shards' models snapshotted to `model_store`.
    pub fn with_model_store<M2>(self, model_store: M2) -> FraudHandler<S, A, K, C, M2> {
        FraudHandler {
            store: self.store,
            alerts: self.alerts,
            canaries: self.canaries,
            clock: self.clock,
            rules: self.rules,
            outbox_retry: self.outbox_retry,
            model_store,
            models: self.models,
            score_log: self.score_log,
        }
    }

    /// Keep every scored transaction's scores ([`FraudHandler::take_scores`]).
    pub fn recording_scores(mut self) -> Self {
        self.score_log = Some(Mutex::new(Vec::new()));
        self
    }

    /// The scores kept since the last call.
    pub fn take_scores(&self) -> Vec<Scored> {
        self.score_log
            .as_ref()
            .map(|log| std::mem::take(&mut *lock(log)))
            .unwrap_or_default()
    }

    pub fn model_store(&self) -> &M {
        &self.model_store
    }

    /// Transactions the shard's model in memory has learnt, if it holds one.
    pub fn model_updates(&self, shard_id: &str) -> Option<u64> {
        lock(&self.models)
            .get(shard_id)
            .map(|m| m.model.forest.updates())
    }

    /// Forget the models in memory, as a cold start would.
    pub fn drop_models(&self) {
        lock(&self.models).clear();
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn alerts(&self) -> &A {
        &self.alerts
    }

    pub fn canaries(&self) -> &K {
        &self.canaries
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }
}

/// One card's transactions in a batch, in stream order, with their positions.
type CardGroup<'b, 'd> = Vec<(&'b Record<'d>, &'b Transaction<'d>, usize)>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The fraud function's processor type: batches bisected on permanent failure.
pub type FraudProcessor<S, A, K, C, M, D> = Processor<Bisecting<FraudHandler<S, A, K, C, M>>, D>;

/// The processor the fraud function runs: batches bisected on permanent failure.
pub fn processor<S, A, K, C, M, D>(
    handler: FraudHandler<S, A, K, C, M>,
    dead_letters: D,
    common: &CommonSettings,
) -> FraudProcessor<S, A, K, C, M, D>
where
    D: DeadLetterSink,
{
    Processor::bisecting(handler, dead_letters).config(common.processor_config())
}

fn state_failure(error: &StateError) -> HandlerError {
    match error {
        StateError::Conflict { .. } => {
            HandlerError::retryable(error.to_string()).with_type("CardStateConflict")
        }
        StateError::Unavailable(_) => {
            HandlerError::retryable(error.to_string()).with_type("CardStateUnavailable")
        }
        // Retrying in this invocation will not help, but the records must not be acknowledged or
        // dead-lettered for a table problem either: Lambda retries them, and the alarms fire.
        _ => HandlerError::retryable(error.to_string()).with_type("CardStateRejected"),
    }
}

/// Ids read back from an alert body, for the queue's group and deduplication ids.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AlertIds<'a> {
    #[serde(borrow)]
    transaction_id: std::borrow::Cow<'a, str>,
}

/// What one batch did, for the log line.
#[derive(Debug, Default)]
struct BatchSummary {
    transactions: usize,
    already_applied: usize,
    duplicates: usize,
    alerts_decided: usize,
    alerts_sent: usize,
    canaries: usize,
    learnt: usize,
}

/// A transaction the model learns once its card's state is written.
struct Lesson<'b> {
    position: usize,
    shard_id: &'b str,
    point: Point,
    category: &'b str,
}

impl<'d, S, A, K, C, M> BatchHandler<'d> for FraudHandler<S, A, K, C, M>
where
    S: CardStateStore,
    A: AlertSink,
    K: CanaryAckStore,
    C: Clock,
    M: ModelStore,
{
    type Payload = FraudPayload<'d>;

    async fn handle_batch(
        &self,
        batch: &[TypedRecord<'_, 'd, FraudPayload<'d>>],
    ) -> Result<(), HandlerError> {
        let now_ms = self.clock.now_ms();
        let mut summary = BatchSummary::default();

        // Transactions grouped by card, each group in stream order.
        let mut acks = Vec::new();
        let mut cards: Vec<(&str, CardGroup<'_, 'd>)> = Vec::new();
        let mut slots: HashMap<&str, usize> = HashMap::new();
        let mut shards: Vec<&str> = Vec::new();
        for (position, item) in batch.iter().enumerate() {
            match &item.payload.0 {
                StreamPayload::Canary(canary) => acks.push(CanaryAck {
                    canary_id: canary.canary_id.to_string(),
                    consumer: CONSUMER.to_owned(),
                    sent_at: canary.sent_at,
                    acked_at: now_ms,
                }),
                StreamPayload::Transaction(tx) => {
                    let card: &str = &tx.card_id;
                    let slot = *slots.entry(card).or_insert_with(|| {
                        cards.push((card, Vec::new()));
                        cards.len() - 1
                    });
                    cards[slot].1.push((item.record, tx, position));
                    if !shards.contains(&item.record.shard_id) {
                        shards.push(item.record.shard_id);
                    }
                    summary.transactions += 1;
                }
            }
        }
        summary.canaries = acks.len();

        let mut failure: Option<HandlerError> = None;
        if !cards.is_empty() {
            let ids: Vec<&str> = cards.iter().map(|(id, _)| *id).collect();
            self.load_models(&shards, now_ms).await;
            let loaded = self.store.load(&ids).await.map_err(|e| state_failure(&e))?;

            let mut changed = Vec::new();
            let mut lessons: Vec<Vec<Lesson<'_>>> = Vec::new();
            let mut outbox = Vec::new();
            let scores = {
                let models = lock(&self.models);
                let mut scores = self.score_log.as_ref().map(|_| Vec::new());
                for ((card_id, txs), stored) in cards.iter().zip(loaded) {
                    let mut state = stored.unwrap_or_else(|| CardState::new(*card_id));
                    let before = state.last_applied.clone();
                    let mut card_lessons = Vec::new();
                    for &(record, tx, position) in txs {
                        if state
                            .last_applied
                            .as_ref()
                            .is_some_and(|p| p.covers(record))
                        {
                            summary.already_applied += 1;
                            continue;
                        }
                        if state.profile.has_seen(&tx.transaction_id) {
                            // The same transaction in another record (a producer retry).
                            state.last_applied = Some(AppliedPosition::of(record));
                            summary.duplicates += 1;
                            continue;
                        }
                        let mut reasons = rules::score(&self.rules, &state.profile, tx);
                        let model = models.get(record.shard_id).map(|m| &m.model);
                        let share = model.map(|m| m.category_share(&tx.merchant_category));
                        let verdict = model.zip(share).map(|(model, share)| {
                            let point = features::features(&self.rules, &state.profile, tx, share);
                            model.judge(&self.rules.anomaly, point)
                        });
                        let warm = verdict.and_then(|v| v.score).is_some();
                        reasons.extend(rules::unusual_merchant(
                            &self.rules.unusual_merchant,
                            &state.profile,
                            tx,
                            share.filter(|_| warm),
                        ));
                        let anomaly = &self.rules.anomaly;
                        let fired = verdict
                            .and_then(|v| v.score)
                            .filter(|&score| score >= anomaly.threshold);
                        let explained = match (model, verdict) {
                            (Some(model), Some(v)) if fired.is_some() => model.explain(&v.point),
                            _ => Vec::new(),
                        };
                        if let Some(score) = fired {
                            let drivers: Vec<String> = explained
                                .iter()
                                .map(|c| format!("{} ({:.2})", c.feature.name(), c.score))
                                .collect();
                            reasons.push(Reason {
                                rule: Rule::Anomaly,
                                score: anomaly.score,
                                detail: format!(
                                    "anomaly score {score:.2} (threshold {:.2}), driven by {}",
                                    anomaly.threshold,
                                    drivers.join(", ")
                                ),
                            });
                        }
                        rules::apply(&self.rules, &mut state.profile, tx);
                        state.last_applied = Some(AppliedPosition::of(record));
                        if let Some(v) = verdict {
                            card_lessons.push(Lesson {
                                position,
                                shard_id: record.shard_id,
                                point: v.point,
                                category: &tx.merchant_category,
                            });
                        }
                        let score = rules::total(&reasons);
                        if let Some(scores) = scores.as_mut() {
                            scores.push(Scored {
                                transaction_id: tx.transaction_id.to_string(),
                                total: score,
                                anomaly: verdict.and_then(|v| v.score),
                            });
                        }
                        if score >= self.rules.threshold && score > 0 {
                            let model_view = match (model, verdict) {
                                (Some(m), Some(v)) => v.score.map(|score| ModelView {
                                    score,
                                    threshold: anomaly.threshold,
                                    features: if explained.is_empty() {
                                        m.explain(&v.point)
                                    } else {
                                        explained.clone()
                                    },
                                }),
                                _ => None,
                            };
                            let alert = Alert {
                                transaction_id: tx.transaction_id.to_string(),
                                card_id: tx.card_id.to_string(),
                                score,
                                reasons,
                                detected_at: Timestamp::from_epoch_millis(now_ms).to_rfc3339(),
                                merchant_id: tx.merchant_id.to_string(),
                                amount: tx.amount,
                                currency: tx.currency.to_string(),
                                transaction_timestamp: tx.timestamp.to_rfc3339(),
                                model: model_view,
                            };
                            let body = serde_json::to_string(&alert).map_err(|e| {
                                HandlerError::permanent(format!("alert not serializable: {e}"))
                            })?;
                            state.pending_alerts.push(body);
                            summary.alerts_decided += 1;
                        }
                    }
                    if state.last_applied != before {
                        changed.push(state);
                        lessons.push(card_lessons);
                    } else if !state.pending_alerts.is_empty() {
                        // Nothing new, but alerts of an earlier delivery were never confirmed sent.
                        outbox.push(state);
                    }
                }

                scores
            };
            if let (Some(log), Some(scores)) = (self.score_log.as_ref(), scores) {
                lock(log).extend(scores);
            }

            let results = if changed.is_empty() {
                Vec::new()
            } else {
                self.store.save(&changed, now_ms).await
            };
            let mut learn: Vec<Lesson<'_>> = Vec::new();
            for ((mut state, result), card_lessons) in changed.into_iter().zip(results).zip(lessons)
            {
                match result {
                    Ok(()) => {
                        // Only what the card's guard now records as applied is learnt: a
                        // redelivery of it is skipped above and never learnt twice.
                        learn.extend(card_lessons);
                        state.version += 1;
                        if !state.pending_alerts.is_empty() {
                            outbox.push(state);
                        }
                    }
                    Err(error) => {
                        warn!(card_id = %state.card_id, "card state not written: {error}");
                        failure.get_or_insert_with(|| state_failure(&error));
                    }
                }
            }

            summary.learnt = learn.len();
            self.learn(learn, now_ms).await;

            if !outbox.is_empty() {
                let (sent, error) = self.flush(&outbox).await;
                summary.alerts_sent = sent;
                if let Some(error) = error {
                    failure.get_or_insert(error);
                }
            }
        }

        if !acks.is_empty()
            && let Err(error) = self.canaries.acknowledge(&acks).await
        {
            warn!("canary acknowledgements not written: {error}");
            failure.get_or_insert_with(|| {
                HandlerError::retryable(error.to_string()).with_type("CanaryAckFailed")
            });
        }

        info!(
            records = batch.len(),
            transactions = summary.transactions,
            already_applied = summary.already_applied,
            duplicate_transactions = summary.duplicates,
            alerts_decided = summary.alerts_decided,
            alerts_sent = summary.alerts_sent,
            canaries = summary.canaries,
            learnt = summary.learnt,
            "fraud batch scored"
        );
        failure.map_or(Ok(()), Err)
    }
}

impl<S, A, K, C, M> FraudHandler<S, A, K, C, M>
where
    M: ModelStore,
{
    /// Make sure the shards' models are in memory: resumed from their snapshots, or new.
    async fn load_models(&self, shards: &[&str], now_ms: i64) {
        let missing: Vec<&str> = {
            let models = lock(&self.models);
            shards
                .iter()
                .copied()
                .filter(|s| !models.contains_key(*s))
                .collect()
        };
        for shard_id in missing {
            let rule = &self.rules.anomaly;
            let (model, version) = match self.model_store.load(shard_id).await {
                Ok(Some(stored)) => match ShardModel::from_snapshot(&stored.bytes, rule) {
                    Ok(model) => {
                        info!(
                            shard_id,
                            learnt = model.forest.updates(),
                            "anomaly model resumed from its snapshot"
                        );
                        (model, stored.version)
                    }
                    Err(error) => {
                        // Overwritten by the next snapshot (written against this version).
                        warn!(
                            shard_id,
                            "anomaly model snapshot not used, starting anew: {error}"
                        );
                        (ShardModel::new(rule, shard_seed(shard_id)), stored.version)
                    }
                },
                Ok(None) => (ShardModel::new(rule, shard_seed(shard_id)), 0),
                Err(error) => {
                    // Scoring goes on with a new model; its first snapshot (version 0) cannot
                    // overwrite the stored one, and the next batch loads that instead.
                    warn!(
                        shard_id,
                        "anomaly model snapshot not loaded, starting anew: {error}"
                    );
                    (ShardModel::new(rule, shard_seed(shard_id)), 0)
                }
            };
            lock(&self.models).insert(
                shard_id.to_owned(),
                LoadedModel {
                    model,
                    version,
                    snapshot_at: now_ms,
                    unsaved: 0,
                },
            );
        }
    }

    /// Learn the transactions whose card states were written, in stream order; snapshot the
    /// shards' models that are due.
    async fn learn(&self, mut lessons: Vec<Lesson<'_>>, now_ms: i64) {
        if lessons.is_empty() {
            return;
        }
        lessons.sort_by_key(|l| l.position);
        let due: Vec<(String, Vec<u8>, u64)> = {
            let mut models = lock(&self.models);
            for lesson in &lessons {
                if let Some(loaded) = models.get_mut(lesson.shard_id) {
                    loaded.model.learn(&lesson.point, lesson.category);
                    loaded.unsaved += 1;
                }
            }
            let interval = self.rules.anomaly.snapshot_interval_ms;
            models
                .iter()
                .filter(|(_, m)| m.unsaved > 0 && now_ms - m.snapshot_at >= interval)
                .map(|(shard, m)| (shard.clone(), m.model.to_snapshot(), m.version))
                .collect()
        };
        for (shard_id, bytes, version) in due {
            let saved = self
                .model_store
                .save(&shard_id, &bytes, version, now_ms)
                .await;
            let mut models = lock(&self.models);
            match saved {
                Ok(()) => {
                    if let Some(loaded) = models.get_mut(&shard_id) {
                        loaded.version = version + 1;
                        loaded.snapshot_at = now_ms;
                        loaded.unsaved = 0;
                    }
                }
                Err(SnapshotError::Conflict { .. }) => {
                    // Another instance has the shard's model now: load its snapshot next time.
                    warn!(
                        shard_id,
                        "anomaly model snapshot written elsewhere; reloading it"
                    );
                    models.remove(&shard_id);
                }
                Err(error) => {
                    // The model is still in memory; the next batch tries again.
                    warn!(shard_id, "anomaly model snapshot not written: {error}");
                }
            }
        }
    }
}

impl<S, A, K, C, M> FraudHandler<S, A, K, C, M>
where
    S: CardStateStore,
    A: AlertSink,
{
    /// Send the outboxes of `states` (at their stored versions), then keep in each outbox only
    /// what was not sent. Returns the number sent and the error to report, if any.
    async fn flush(&self, states: &[CardState]) -> (usize, Option<HandlerError>) {
        let mut outgoing = Vec::new();
        for state in states {
            for body in &state.pending_alerts {
                let transaction_id = serde_json::from_str::<AlertIds<'_>>(body)
                    .map(|ids| ids.transaction_id)
                    .unwrap_or_default();
                outgoing.push((transaction_id, state.card_id.as_str(), body.as_str()));
            }
        }
        let alerts: Vec<OutgoingAlert<'_>> = outgoing
            .iter()
            .map(|(transaction_id, card_id, body)| OutgoingAlert {
                transaction_id,
                card_id,
                body,
            })
            .collect();
        let results = self.alerts.send(&alerts).await;

        let mut error = None;
        let mut sent = 0;
        let mut results = results.into_iter();
        for state in states {
            let mut unsent = Vec::new();
            for body in &state.pending_alerts {
                match results.next() {
                    Some(Ok(())) => sent += 1,
                    Some(Err(failure)) => {
                        warn!(card_id = %state.card_id, "alert not sent: {failure}");
                        error.get_or_insert_with(|| {
                            HandlerError::retryable(failure.to_string()).with_type("AlertNotSent")
                        });
                        unsent.push(body.clone());
                    }
                    None => unsent.push(body.clone()),
                }
            }
            if unsent.len() == state.pending_alerts.len() {
                continue;
            }
            let cleared = retry(
                &self.outbox_retry,
                None,
                |e: &StateError| matches!(e, StateError::Unavailable(_)),
                || {
                    self.store
                        .set_pending_alerts(&state.card_id, state.version, &unsent)
                },
            )
            .await;
            if let Err(failure) = cleared.result {
                // The alerts went out but stay in the outbox: the next delivery of this card's
                // records sends them again. Said loudly, since that is a duplicate alert.
                warn!(card_id = %state.card_id, "sent alerts not cleared from the outbox: {failure}");
                if !matches!(failure, StateError::Conflict { .. }) {
                    error.get_or_insert_with(|| state_failure(&failure));
                }
            }
        }
        (sent, error)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn settings_need_the_tables_and_queue_and_name_what_is_missing() {
        let mut vars = HashMap::from([
            ("DEAD_LETTER_QUEUE_URL", "http://dlq"),
            ("ALERTS_QUEUE_URL", "http://alerts"),
            ("CARD_STATE_TABLE", "cards"),
        ]);
        let err = FraudSettings::from_env(&Env(vars.clone())).unwrap_err();
        assert!(err.to_string().contains("CANARY_TABLE"), "{err}");
        vars.insert("CANARY_TABLE", "canaries");
        let settings = FraudSettings::from_env(&Env(vars.clone())).unwrap();
        assert_eq!(settings.rules, RuleSet::default());
        assert_eq!(settings.card_state_ttl_seconds, Some(90 * 86_400));

        vars.insert("FRAUD_BLOCKED_MERCHANTS", " m-1, ,m-2 ");
        vars.insert("FRAUD_BLOCKED_CARD_PREFIXES", "412345,400000-400099");
        vars.insert("FRAUD_VELOCITY_WINDOW_SECONDS", "60");
        vars.insert("FRAUD_CARD_STATE_TTL_DAYS", "0");
        let settings = FraudSettings::from_env(&Env(vars.clone())).unwrap();
        assert_eq!(settings.rules.blocklist.merchants.len(), 2);
        assert_eq!(settings.rules.blocklist.card_ranges.len(), 2);
        assert_eq!(settings.rules.velocity.window_ms, 60_000);
        assert_eq!(settings.card_state_ttl_seconds, None);

        for (name, value) in [
            ("FRAUD_BLOCKED_CARD_PREFIXES", "41x"),
            ("FRAUD_TRAVEL_MAX_KMH", "-1"),
            ("FRAUD_VELOCITY_WINDOW_SECONDS", "0"),
            ("FRAUD_SCORE_THRESHOLD", "high"),
        ] {
            let mut bad = vars.clone();
            bad.insert(name, value);
            let err = FraudSettings::from_env(&Env(bad)).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn implausible_transactions_are_refused_at_decode() {
        let tx = |lat: &str| {
            format!(
                r#"{{"transaction_id":"t","card_id":"c","merchant_id":"m","merchant_category":"5411",
                "amount":1,"currency":"EUR","country":"DE","lat":{lat},"lon":0,
                "timestamp":"2026-01-01T00:00:00Z","channel":"pos"}}"#
            )
        };
        assert!(FraudPayload::from_record_data(tx("45").as_bytes()).is_ok());
        let err = FraudPayload::from_record_data(tx("95").as_bytes()).unwrap_err();
        assert_eq!(err.path, "lat");
        assert_eq!(err.kind, PayloadErrorKind::WrongShape);
        assert!(FraudPayload::from_record_data(br#"{"canary_id":"c","sent_at":1}"#).is_ok());
    }
}
