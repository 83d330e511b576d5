//! Idempotency: each record's effect happens once, although Lambda delivers records at least once.
//!
//! Kinesis and Lambda redeliver records that were already handled: a failed batch is retried
//! whole, a bisected one in halves, a partial response checkpoints at the lowest failed sequence
//! number (everything after it comes again), a replay starts from an old position.
//! [`Idempotency`] is a [`RecordGate`]: before any handler runs it looks the whole batch up in a
//! table and skips what is completed; after the handlers ran it records what completed. Both
//! directions are batched — one `BatchGetItem` per 100 records, one `BatchWriteItem` per 25,
//! issued concurrently — so a first delivery costs 0.05 store calls per record and a redelivery
//! 0.01, where a per-record protocol (Powertools: conditional put, then update) makes 2 and 1.03.
//!
//! ```no_run
//! # fn wire(handler: impl for<'d> shardwise::RecordHandler<'d>) {
//! use shardwise::idempotency::{Idempotency, InMemoryIdempotencyStore, JsonFieldKey, PayloadCheck};
//! use shardwise::{InMemoryDeadLetterSink, Processor};
//!
//! // In a function's main.rs these are `shardwise_aws::DynamoDbIdempotencyStore` on the table
//! // named by IDEMPOTENCY_TABLE and `shardwise_aws::SqsDeadLetterSink`: the same traits.
//! let store = InMemoryIdempotencyStore::new();
//! let dead_letters = InMemoryDeadLetterSink::new();
//! let processor = Processor::per_record(handler, dead_letters).gate(
//!     Idempotency::new(store) // keyed by stream + shard + sequence number (+ sub-sequence)
//!         .key(JsonFieldKey::new("transaction_id")) // or by a payload field
//!         .payload_check(PayloadCheck::Sha256),
//! );
//! # let _ = processor;
//! # }
//! ```
//!
//! # Keys
//! A key is `{function name}#{strategy's key}` ([`key`]), so two functions on one stream never
//! share records. [`RecordKey`] (the default) names the record's place in the stream: stream
//! ARN, shard, sequence number and, for a KPL user record, sub-sequence number.
//! [`JsonFieldKey`] takes a payload field (`transaction_id`), so a producer that sends one
//! business event twice, as two records, also has it handled once. With
//! [`PayloadCheck::Sha256`] the payload's hash is stored too, and a record that reuses a key with
//! a different payload is rejected — dead-lettered with `IdempotencyKeyReused` — instead of
//! silently skipped.
//!
//! # Record states
//! An item is [`RecordStatus::InProgress`] (a lock, expiring at the claiming invocation's
//! deadline) or [`RecordStatus::Completed`] (expiring after [`IdempotencySettings::completed_ttl`],
//! 24 h by default; `expiration` is the table's TTL attribute). [`RecordState::Expired`] is never
//! written: it is what either becomes once its expiry passes ([`StoredRecord::state_at`]), so a
//! timed-out invocation never leaves a key stuck, and DynamoDB's lazy TTL deletion does not
//! matter.
//!
//! # Protocol
//! Per batch, in [`RecordGate::admit`]:
//! 1. Derive every record's key. Records with the same key as an earlier record of the batch
//!    are [`Admission::DuplicateOf`] it, found without a store round trip (with a different
//!    payload, they are rejected).
//! 2. Read the distinct keys, `BatchGetItem` of ≤ 100 with `ConsistentRead`, concurrently,
//!    retrying `UnprocessedKeys` with backoff. `Completed` → [`Admission::AlreadyDone`]; a live
//!    `InProgress` → [`Admission::Defer`]; expired or absent → to run.
//! 3. Only for keys that can be in flight elsewhere ([`KeyScope::AnyShard`]): claim them —
//!    `TransactWriteItems` of ≤ 100 puts of `IN_PROGRESS` items, each conditional on no live
//!    item. A cancelled transaction says per item why (`CancellationReasons`): keys taken by
//!    another invocation are deferred, the rest claimed again at once.
//!
//! Then handlers run, failures are dead-lettered, and in [`RecordGate::settle`]:
//! 4. Put a `Completed` item for every record that is done (handled, or dead-lettered — it must
//!    not run again either), and delete the lock of every claimed record handed back to Lambda,
//!    so its redelivery can run it: `BatchWriteItem` of ≤ 25, concurrently, retrying
//!    `UnprocessedItems` with backoff.
//!
//! ```text
//!  time ───────────────────────────────────────────────────────────────────────────────▶
//!  invocation 1   get(k) = ∅ ─▶ handler(r): effect ─▶ put(k, COMPLETED) ─▶ response: done
//!  invocation 2   (redelivery, e.g. the batch checkpointed before r)
//!                 get(k) = COMPLETED ─▶ AlreadyDone: handler not called, r acknowledged
//!
//!  with a payload key, the same key on two shards at once:
//!  shard 1        get(k) = ∅ ─▶ claim(k) ✓ lock until deadline ─▶ effect ─▶ put(k, COMPLETED)
//!  shard 2        get(k) = ∅ ─▶ claim(k) ✗ taken ─▶ Defer: handed back, its key's later
//!                 records held back ─▶ (redelivered) get(k) = COMPLETED ─▶ AlreadyDone
//!
//!  a lock left by a timed-out invocation:
//!  invocation 1   claim(k) ✓ lock until D1 ─▶ handler hangs ─▶ Lambda ends it at D1
//!  invocation 2   before D1: get(k) = IN_PROGRESS ─▶ Defer; after D1: expired ─▶ claim ✓ ─▶ run
//! ```
//!
//! ## A crash between the effect and the completion write
//! ```text
//!  invocation 1   get(k) = ∅ ─▶ handler(r): effect ─✗ crash / timeout / completion write fails
//!  Lambda         batch not acknowledged ─▶ redelivers from r
//!  invocation 2   get(k) = ∅ (or an expired lock) ─▶ handler(r): effect AGAIN ─▶ put(k, COMPLETED)
//! ```
//! The effect and the completion are writes to two systems, and no protocol on our side makes
//! two writes atomic: whichever comes first, a crash between them loses the second. Writing the
//! completion first would lose effects (a record marked done that never ran), so it comes
//! second, and this window is at-least-once: the handler runs again. The gate shrinks the window
//! to the time between one handler's effect and the batch's completion write; a handler closes
//! it by making its effect idempotent with the same key ([`Idempotency::key_for`]): a
//! conditional put (`attribute_not_exists`) or an upsert keyed by it, an API's idempotency token,
//! or — when the effect is itself a DynamoDB write — the effect and a completion in one
//! transaction.
//!
//! # Why the default key takes no lock
//! A lock only keeps a second invocation away while the first is running. For [`RecordKey`] no
//! second invocation can hold the key: Lambda gives a shard's records (with a parallelization
//! factor: a partition key's records) to one invocation at a time and sends a batch again only
//! after the previous invocation returned or timed out. A lock would expire at the deadline,
//! which is exactly when the next invocation may start, so it would exclude nobody — and cost one
//! more write per record (0.06 calls per record instead of 0.05). It is taken for
//! [`KeyScope::AnyShard`] keys, which two shards can carry at once. (Two event source mappings
//! of one function on one stream would deliver every record twice concurrently; that setup needs
//! a strategy whose scope is `AnyShard`.)
//!
//! # When the store fails
//! Store calls are retried with backoff ([`IdempotencySettings::retry`]) and abandoned before the
//! invocation's deadline. A record whose key could not be read or claimed is deferred (handed
//! back to Lambda), never run unrecorded; a record whose completion could not be written is
//! handed back too (it will run again: the at-least-once window above); a record is never marked
//! completed unless it was handled or dead-lettered. A lock that could not be released expires
//! at its invocation's deadline.

mod batch;
pub mod key;
pub mod memory;
pub mod store;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use crate::clock::{Clock, SystemClock};
use crate::gate::{Admission, GateContext, GateError, RecordGate, Settlement};
use crate::record::Record;
use crate::retry::{ExponentialBackoff, Jitter};

use batch::{Budget, Verdict, in_rounds};
pub use key::{JsonFieldKey, KeyError, KeyScope, KeyStrategy, RecordKey};
pub use memory::{FaultyStore, InMemoryIdempotencyStore, StoreFault, StoreOp};
pub use store::{
    ClaimOutcome, ClaimVerdict, Fetched, IdempotencyStore, RecordState, RecordStatus, StoreError,
    StoreLimits, StoreWrite, StoredRecord,
};

/// Whether payloads are fingerprinted, so a key reused with another payload is caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadCheck {
    /// Trust the key. Right for [`RecordKey`], which fixes the payload by itself.
    Off,
    /// Store the payload's SHA-256 and reject a record whose key was used with another payload.
    Sha256,
}

/// How the gate behaves; every field has a default.
#[derive(Debug, Clone)]
pub struct IdempotencySettings {
    /// How long a completion keeps a record from running again: longer than the stream's
    /// retention if replays must be deduplicated too. Default 24 h.
    pub completed_ttl: Duration,
    pub payload_check: PayloadCheck,
    /// Backoff for failed store calls and unprocessed entries.
    pub retry: ExponentialBackoff,
    /// Store calls in flight at once.
    pub max_concurrent_calls: usize,
    /// Lock lifetime when the invocation has no deadline (tools, tests). Default 15 min,
    /// Lambda's longest timeout.
    pub lock_without_deadline: Duration,
    /// Time left before the deadline when store calls give up. Default 500 ms, but never more
    /// than half the time remaining.
    pub deadline_margin: Duration,
}

impl Default for IdempotencySettings {
    fn default() -> Self {
        Self {
            completed_ttl: Duration::from_secs(24 * 3600),
            payload_check: PayloadCheck::Off,
            retry: ExponentialBackoff {
                initial: Duration::from_millis(50),
                max_delay: Duration::from_secs(1),
                max_retries: 4,
                jitter: Jitter::Full,
            },
            max_concurrent_calls: 16,
            lock_without_deadline: Duration::from_secs(900),
            deadline_margin: Duration::from_millis(500),
        }
    }
}

/// The idempotency gate: give it to [`crate::Processor::gate`].
#[derive(Debug)]
pub struct Idempotency<S, K = RecordKey, C = SystemClock> {
    store: S,
    key: K,
    clock: C,
    settings: IdempotencySettings,
}

impl<S: IdempotencyStore> Idempotency<S> {
    /// Records keyed by their place in the stream, checked against `store`.
    pub fn new(store: S) -> Self {
        Self {
            store,
            key: RecordKey,
            clock: SystemClock,
            settings: IdempotencySettings::default(),
        }
    }
}

impl<S, K, C> Idempotency<S, K, C>
where
    S: IdempotencyStore,
    K: KeyStrategy,
    C: Clock,
{
    /// Derive keys with `key` instead (e.g. [`JsonFieldKey`]).
    pub fn key<K2: KeyStrategy>(self, key: K2) -> Idempotency<S, K2, C> {
        Idempotency {
            store: self.store,
            key,
            clock: self.clock,
            settings: self.settings,
        }
    }

    /// The wall clock for expiries (tests pass a [`crate::clock::ManualClock`]).
    pub fn clock<C2: Clock>(self, clock: C2) -> Idempotency<S, K, C2> {
        Idempotency {
            store: self.store,
            key: self.key,
            clock,
            settings: self.settings,
        }
    }

    pub fn settings(mut self, settings: IdempotencySettings) -> Self {
        self.settings = settings;
        self
    }

    pub fn payload_check(mut self, check: PayloadCheck) -> Self {
        self.settings.payload_check = check;
        self
    }

    pub fn completed_ttl(mut self, ttl: Duration) -> Self {
        self.settings.completed_ttl = ttl;
        self
    }

    pub fn retry(mut self, retry: ExponentialBackoff) -> Self {
        self.settings.retry = retry;
        self
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn current_settings(&self) -> &IdempotencySettings {
        &self.settings
    }

    /// The key the gate stores for `record`, for a handler that makes its own effect idempotent
    /// with it (see the module docs on crashes).
    pub fn key_for(&self, function_name: &str, record: &Record<'_>) -> Result<String, KeyError> {
        key::namespaced_key(&self.key, function_name, record)
    }

    fn hash(&self, record: &Record<'_>) -> Option<String> {
        match self.settings.payload_check {
            PayloadCheck::Off => None,
            PayloadCheck::Sha256 => Some(key::payload_hash(record.data)),
        }
    }

    /// When store calls must give up: `deadline_margin` before the deadline, or half the time
    /// left when less than twice the margin is.
    fn cutoff(&self, context: &GateContext<'_>, now_ms: i64) -> Option<Instant> {
        let deadline_ms = context.deadline_ms?;
        let remaining = Duration::from_millis(u64::try_from(deadline_ms - now_ms).unwrap_or(0));
        let keep = self.settings.deadline_margin.min(remaining / 2);
        Some(Instant::now() + (remaining - keep))
    }

    fn budget(&self, cutoff: Option<Instant>, max_entries: usize) -> Budget<'_> {
        Budget {
            retry: &self.settings.retry,
            cutoff,
            max_entries,
            max_concurrent: self.settings.max_concurrent_calls,
        }
    }

    /// Read the items of `keys`, in calls of ≤ `max_get`.
    async fn look_up(
        &self,
        keys: &[&str],
        cutoff: Option<Instant>,
    ) -> Vec<Result<Option<StoredRecord>, StoreError>> {
        let budget = self.budget(cutoff, self.store.limits().max_get);
        in_rounds(keys, budget, |entries: Vec<&&str>| async move {
            let call: Vec<&str> = entries.iter().map(|k| **k).collect();
            let fetched = self.store.get(&call).await?;
            let position: HashMap<&str, usize> =
                call.iter().enumerate().map(|(i, k)| (*k, i)).collect();
            let mut verdicts: Vec<Verdict<Option<StoredRecord>>> =
                call.iter().map(|_| Verdict::Done(None)).collect();
            for record in fetched.records {
                if let Some(&i) = position.get(record.key.as_str()) {
                    verdicts[i] = Verdict::Done(Some(record));
                }
            }
            for key in &fetched.unprocessed {
                if let Some(&i) = position.get(key.as_str()) {
                    verdicts[i] = Verdict::Retry(StoreError::Throttled(
                        "key left unprocessed by the store".into(),
                    ));
                }
            }
            for (key, why) in fetched.unreadable {
                if let Some(&i) = position.get(key.as_str()) {
                    verdicts[i] = Verdict::Failed(StoreError::Unreadable(format!("{key}: {why}")));
                }
            }
            Ok(verdicts)
        })
        .await
    }

    /// Lock `claims`, in transactions of ≤ `max_claim`. `Ok(true)`: claimed; `Ok(false)`: taken.
    async fn claim(
        &self,
        claims: &[StoredRecord],
        now_s: i64,
        cutoff: Option<Instant>,
    ) -> Vec<Result<bool, StoreError>> {
        let budget = self.budget(cutoff, self.store.limits().max_claim);
        in_rounds(claims, budget, |entries: Vec<&StoredRecord>| async move {
            Ok(match self.store.claim(&entries, now_s).await? {
                ClaimOutcome::Claimed => entries.iter().map(|_| Verdict::Done(true)).collect(),
                ClaimOutcome::Cancelled(verdicts) => verdicts
                    .into_iter()
                    .map(|verdict| match verdict {
                        ClaimVerdict::Taken => Verdict::Done(false),
                        ClaimVerdict::NotAttempted => Verdict::Again,
                        ClaimVerdict::Retry(why) => Verdict::Retry(StoreError::Throttled(why)),
                        ClaimVerdict::Failed(why) => Verdict::Failed(StoreError::Rejected(why)),
                    })
                    .collect(),
            })
        })
        .await
    }

    /// Apply `writes`, in calls of ≤ `max_write`.
    async fn write(
        &self,
        writes: &[StoreWrite],
        cutoff: Option<Instant>,
    ) -> Vec<Result<(), StoreError>> {
        let budget = self.budget(cutoff, self.store.limits().max_write);
        in_rounds(writes, budget, |entries: Vec<&StoreWrite>| async move {
            let unprocessed = self.store.write(&entries).await?;
            if unprocessed.is_empty() {
                return Ok(entries.iter().map(|_| Verdict::Done(())).collect());
            }
            Ok(entries
                .iter()
                .map(|write| {
                    if unprocessed.iter().any(|k| k == write.key()) {
                        Verdict::Retry(StoreError::Throttled(
                            "write left unprocessed by the store".into(),
                        ))
                    } else {
                        Verdict::Done(())
                    }
                })
                .collect())
        })
        .await
    }
}

fn mismatch(ours: Option<&str>, stored: Option<&str>) -> bool {
    matches!((ours, stored), (Some(a), Some(b)) if a != b)
}

fn reused(key: &str, what: &str) -> Admission {
    Admission::Reject {
        error_type: "IdempotencyKeyReused".to_owned(),
        message: format!(
            "idempotency key {key} was already used by {what} with a different payload \
             (SHA-256 differs); refusing to treat this record as a duplicate"
        ),
    }
}

fn store_deferral(error: &StoreError) -> Admission {
    Admission::Defer {
        reason: format!("IdempotencyStoreUnavailable: {error}"),
    }
}

/// Epoch seconds at or after `ms`.
fn ceil_seconds(ms: i64) -> i64 {
    ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) > 0)
}

impl<S, K, C> RecordGate for Idempotency<S, K, C>
where
    S: IdempotencyStore,
    K: KeyStrategy,
    C: Clock,
{
    fn identifies_records(&self) -> bool {
        self.key.scope() == KeyScope::OneShard
    }

    async fn admit(&self, records: &[Record<'_>], context: &GateContext<'_>) -> Vec<Admission> {
        let now_ms = self.clock.now_ms();
        let cutoff = self.cutoff(context, now_ms);
        let keys: Vec<Result<String, KeyError>> = records
            .iter()
            .map(|record| key::namespaced_key(&self.key, context.function_name, record))
            .collect();
        let hashes: Vec<Option<String>> = records.iter().map(|r| self.hash(r)).collect();

        // Duplicates inside the batch follow their first occurrence, without a round trip.
        let mut admissions: Vec<Option<Admission>> = vec![None; records.len()];
        let mut first: HashMap<&str, usize> = HashMap::with_capacity(records.len());
        let mut distinct: Vec<usize> = Vec::with_capacity(records.len());
        let mut duplicates: Vec<(usize, usize)> = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            match key {
                Err(error) => {
                    admissions[index] = Some(Admission::Reject {
                        error_type: error.error_type().to_owned(),
                        message: error.to_string(),
                    });
                }
                Ok(key) => match first.entry(key.as_str()) {
                    Entry::Vacant(slot) => {
                        slot.insert(index);
                        distinct.push(index);
                    }
                    Entry::Occupied(slot) => {
                        let original = *slot.get();
                        if mismatch(hashes[index].as_deref(), hashes[original].as_deref()) {
                            let what = format!("record {} of this batch", records[original].id());
                            admissions[index] = Some(reused(key, &what));
                        } else {
                            duplicates.push((index, original));
                        }
                    }
                },
            }
        }

        let lookup: Vec<&str> = distinct
            .iter()
            .filter_map(|&i| keys[i].as_ref().ok().map(String::as_str))
            .collect();
        let found = self.look_up(&lookup, cutoff).await;

        let scope = self.key.scope();
        let lock_expires_at = ceil_seconds(
            context
                .deadline_ms
                .filter(|&deadline| deadline > now_ms)
                .unwrap_or_else(|| {
                    now_ms.saturating_add(
                        i64::try_from(self.settings.lock_without_deadline.as_millis())
                            .unwrap_or(i64::MAX),
                    )
                }),
        );
        let mut to_claim: Vec<usize> = Vec::new();
        for (&index, result) in distinct.iter().zip(found) {
            let key = lookup_key(&keys, index);
            let admission = match result {
                Err(error) => store_deferral(&error),
                Ok(None) => {
                    to_claim.push(index);
                    continue;
                }
                Ok(Some(stored)) => match stored.state_at(now_ms) {
                    RecordState::Expired => {
                        to_claim.push(index);
                        continue;
                    }
                    _ if mismatch(hashes[index].as_deref(), stored.payload_hash.as_deref()) => {
                        let what = match &stored.request_id {
                            Some(request) => format!("invocation {request}"),
                            None => "an earlier invocation".to_owned(),
                        };
                        reused(key, &what)
                    }
                    RecordState::Completed { .. } => Admission::AlreadyDone,
                    RecordState::InProgress { lock_expires_at } => Admission::Defer {
                        reason: format!(
                            "IdempotencyKeyInProgress: {key} is held by {} until {lock_expires_at} \
                             (epoch s)",
                            stored.request_id.as_deref().unwrap_or("another invocation")
                        ),
                    },
                },
            };
            admissions[index] = Some(admission);
        }

        match scope {
            KeyScope::OneShard => {
                for index in to_claim {
                    admissions[index] = Some(Admission::Run);
                }
            }
            KeyScope::AnyShard => {
                let claims: Vec<StoredRecord> = to_claim
                    .iter()
                    .map(|&index| StoredRecord {
                        key: lookup_key(&keys, index).to_owned(),
                        status: RecordStatus::InProgress { lock_expires_at },
                        payload_hash: hashes[index].clone(),
                        request_id: Some(context.request_id.to_owned()),
                    })
                    .collect();
                let claimed = self.claim(&claims, now_ms.div_euclid(1000), cutoff).await;
                for (&index, result) in to_claim.iter().zip(claimed) {
                    admissions[index] = Some(match result {
                        Ok(true) => Admission::Run,
                        Ok(false) => Admission::Defer {
                            reason: format!(
                                "IdempotencyKeyInProgress: {} was claimed by a concurrent \
                                 invocation",
                                lookup_key(&keys, index)
                            ),
                        },
                        Err(error) => store_deferral(&error),
                    });
                }
            }
        }

        for (index, original) in duplicates {
            admissions[index] = Some(match &admissions[original] {
                Some(Admission::Run) => Admission::DuplicateOf(original),
                // Done, deferred or rejected as its first occurrence is, under its own name.
                Some(other) => other.clone(),
                None => Admission::Defer {
                    reason: "IdempotencyGate: duplicate of an undecided record".to_owned(),
                },
            });
        }

        let admissions: Vec<Admission> = admissions
            .into_iter()
            .map(|a| {
                // Every record was decided above; an undecided one must not run unrecorded.
                a.unwrap_or_else(|| Admission::Defer {
                    reason: "IdempotencyGate: record left undecided".to_owned(),
                })
            })
            .collect();
        if tracing::enabled!(tracing::Level::DEBUG) {
            let count = |f: fn(&Admission) -> bool| admissions.iter().filter(|a| f(a)).count();
            debug!(
                records = records.len(),
                run = count(|a| matches!(a, Admission::Run)),
                already_done = count(|a| matches!(a, Admission::AlreadyDone)),
                duplicates = count(|a| matches!(a, Admission::DuplicateOf(_))),
                deferred = count(|a| matches!(a, Admission::Defer { .. })),
                rejected = count(|a| matches!(a, Admission::Reject { .. })),
                "idempotency: batch admitted"
            );
        }
        let store_failure = admissions.iter().find_map(|a| match a {
            Admission::Defer { reason } if reason.starts_with("IdempotencyStore") => Some(reason),
            _ => None,
        });
        if let Some(reason) = store_failure {
            warn!("idempotency store failed; records handed back to Lambda: {reason}");
        }
        admissions
    }

    async fn settle(
        &self,
        records: &[Record<'_>],
        settled: &[Option<Settlement>],
        context: &GateContext<'_>,
    ) -> Vec<Result<(), GateError>> {
        let now_ms = self.clock.now_ms();
        let cutoff = self.cutoff(context, now_ms);
        let ttl_ms = i64::try_from(self.settings.completed_ttl.as_millis()).unwrap_or(i64::MAX);
        let expires_at = ceil_seconds(now_ms.saturating_add(ttl_ms));
        let claimed = self.key.scope() == KeyScope::AnyShard;

        let mut results: Vec<Result<(), GateError>> = vec![Ok(()); records.len()];
        let mut writes: Vec<StoreWrite> = Vec::new();
        let mut owners: Vec<Vec<usize>> = Vec::new();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        for (index, (record, settlement)) in records.iter().zip(settled).enumerate() {
            let Some(settlement) = settlement else {
                continue;
            };
            if *settlement == Settlement::Released && !claimed {
                // Nothing was written for it: a redelivery finds no item and runs it.
                continue;
            }
            let key = match key::namespaced_key(&self.key, context.function_name, record) {
                Ok(key) => key,
                Err(error) => {
                    results[index] = Err(GateError::Unaddressable(std::sync::Arc::new(error)));
                    continue;
                }
            };
            let write = match settlement {
                Settlement::Done => StoreWrite::Put(StoredRecord {
                    key,
                    status: RecordStatus::Completed { expires_at },
                    payload_hash: self.hash(record),
                    request_id: Some(context.request_id.to_owned()),
                }),
                Settlement::Released => StoreWrite::Release {
                    key,
                    request_id: context.request_id.to_owned(),
                },
            };
            // One write per key (a call may not name a key twice); a completion wins.
            match by_key.entry(write.key().to_owned()) {
                Entry::Occupied(slot) => {
                    let at = *slot.get();
                    owners[at].push(index);
                    if matches!(write, StoreWrite::Put(_)) {
                        writes[at] = write;
                    }
                }
                Entry::Vacant(slot) => {
                    slot.insert(writes.len());
                    writes.push(write);
                    owners.push(vec![index]);
                }
            }
        }
        if writes.is_empty() {
            return results;
        }
        let written = self.write(&writes, cutoff).await;
        let mut failed = 0usize;
        for ((write, result), owners) in writes.iter().zip(written).zip(owners) {
            let Err(error) = result else {
                continue;
            };
            failed += 1;
            let source: crate::gate::SharedError = std::sync::Arc::new(error);
            let error = match write {
                StoreWrite::Put(_) => GateError::CompletionNotRecorded(source),
                StoreWrite::Release { .. } => GateError::LockNotReleased(source),
            };
            for index in owners {
                results[index] = Err(error.clone());
            }
        }
        if failed > 0 {
            warn!(
                failed,
                writes = writes.len(),
                "idempotency: some settlements were not recorded"
            );
        }
        results
    }
}

fn lookup_key(keys: &[Result<String, KeyError>], index: usize) -> &str {
    keys[index].as_ref().map(String::as_str).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::ManualClock;
    use crate::record::SequenceNumber;

    const NOW_MS: i64 = 1_700_000_000_000;

    fn record(sequence_number: &'static str, data: &'static [u8]) -> Record<'static> {
        Record {
            event_index: 0,
            stream_arn: "arn:aws:kinesis:us-east-1:1:stream/s",
            shard_id: "shardId-000000000000",
            sequence_number: SequenceNumber::new(sequence_number),
            sub_sequence_number: None,
            partition_key: "pk",
            explicit_hash_key: None,
            approximate_arrival_ms: 0,
            data,
        }
    }

    fn context() -> GateContext<'static> {
        GateContext {
            function_name: "f",
            request_id: "req",
            deadline_ms: Some(NOW_MS + 60_000),
        }
    }

    fn gate(
        store: &Arc<InMemoryIdempotencyStore>,
    ) -> Idempotency<Arc<InMemoryIdempotencyStore>, RecordKey, ManualClock> {
        Idempotency::new(store.clone()).clock(ManualClock::new(NOW_MS))
    }

    #[tokio::test]
    async fn duplicates_follow_a_decided_first_occurrence() {
        let store = Arc::new(InMemoryIdempotencyStore::new());
        let gate = gate(&store);
        let done = record("10", b"{}");
        store.insert(StoredRecord {
            key: gate.key_for("f", &done).unwrap(),
            status: RecordStatus::Completed {
                expires_at: NOW_MS / 1000 + 10,
            },
            payload_hash: None,
            request_id: None,
        });
        let fresh = record("11", b"{}");
        let batch = [done, fresh, done, fresh];
        let admissions = gate.admit(&batch, &context()).await;
        assert_eq!(
            admissions,
            vec![
                Admission::AlreadyDone,
                Admission::Run,
                Admission::AlreadyDone,
                Admission::DuplicateOf(1)
            ]
        );
        // Two distinct keys, one look-up.
        assert_eq!(store.calls(StoreOp::Get), vec![2]);
    }

    #[tokio::test]
    async fn released_records_leave_no_lock_and_failed_completions_are_errors() {
        let store = Arc::new(InMemoryIdempotencyStore::new());
        let claiming = gate(&store).key(JsonFieldKey::new("id"));
        let batch = [record("1", br#"{"id":"a"}"#), record("2", br#"{"id":"b"}"#)];
        let admissions = claiming.admit(&batch, &context()).await;
        assert_eq!(admissions, vec![Admission::Run, Admission::Run]);
        assert_eq!(store.records().len(), 2);
        let settled = [Some(Settlement::Done), Some(Settlement::Released)];
        let results = claiming.settle(&batch, &settled, &context()).await;
        assert!(results.iter().all(Result::is_ok));
        assert!(matches!(
            store.record("f#id=a").unwrap().status,
            RecordStatus::Completed { .. }
        ));
        assert!(store.record("f#id=b").is_none());

        // Record keys are never locked, so releasing them writes nothing; a completion that
        // cannot be written is an error for its record only.
        let plain = gate(&store).retry(ExponentialBackoff::none());
        store.inject(StoreOp::Write, StoreFault::Unavailable);
        let batch = [record("3", b"{}"), record("4", b"{}")];
        let results = plain
            .settle(
                &batch,
                &[Some(Settlement::Released), Some(Settlement::Done)],
                &context(),
            )
            .await;
        assert!(results[0].is_ok());
        assert!(matches!(
            results[1],
            Err(GateError::CompletionNotRecorded(ref source))
                if source.downcast_ref::<StoreError>().is_some()
        ));
        assert_eq!(store.calls(StoreOp::Write), vec![2, 1]);
    }

    #[test]
    fn expiries_round_up_to_whole_seconds() {
        assert_eq!(ceil_seconds(1_000), 1);
        assert_eq!(ceil_seconds(1_001), 2);
        assert_eq!(ceil_seconds(0), 0);
    }
}
