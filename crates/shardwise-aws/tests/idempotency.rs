//! Idempotency through the whole processor: every scenario runs against the in-memory store and,
//! when `SHARDWISE_MOTO_ENDPOINT` is set, against DynamoDB on moto (a table per test). Faults are
//! injected by wrapping either store in a `FaultyStore`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use shardwise::clock::{Clock, ManualClock, SystemClock};
use shardwise::gate::RecordGate;
use shardwise::idempotency::key::namespaced_key;
use shardwise::idempotency::{
    ClaimOutcome, FaultyStore, Fetched, Idempotency, IdempotencyStore, InMemoryIdempotencyStore,
    JsonFieldKey, PayloadCheck, RecordKey, RecordStatus, StoreError, StoreFault, StoreOp,
    StoreWrite, StoredRecord,
};
use shardwise::processor::{BatchReport, Outcome, PerRecord};
use shardwise::retry::{ExponentialBackoff, Jitter};
use shardwise::testing::{
    TEST_SHARD_ID, TEST_STREAM_ARN, TestRecord, event_json, plain, sequence_number,
};
use shardwise::{
    BatchHandler, HandlerError, InMemoryDeadLetterSink, Invocation, Json, Processor,
    ProcessorConfig, Record, RecordHandler, TypedRecord,
};
use shardwise_aws::DynamoDbIdempotencyStore;
use tokio::sync::Notify;

const FUNCTION: &str = "orders";

/// What a test record asks the handler to do.
#[derive(Debug, Deserialize)]
struct Order<'a> {
    #[allow(dead_code)] // the gate's payload key; the handler never reads it
    id: &'a str,
    n: u32,
    #[serde(default)]
    fail: Option<&'a str>,
}

/// A handler that counts calls and effects. Its "idempotent" effects are keyed by the gate's
/// own key, as the module docs advise, so a rerun after a crash applies nothing twice.
#[derive(Default)]
struct Ledger {
    calls: Mutex<Vec<u32>>,
    effects: Mutex<Vec<u32>>,
    keyed_effects: Mutex<HashSet<String>>,
    crashed: Notify,
}

impl Ledger {
    fn calls_of(&self, n: u32) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| **c == n)
            .count()
    }
    fn effects(&self) -> Vec<u32> {
        let mut effects = self.effects.lock().unwrap().clone();
        effects.sort_unstable();
        effects
    }
}

impl<'d> RecordHandler<'d> for Ledger {
    type Payload = Json<Order<'d>>;

    async fn handle(
        &self,
        record: &Record<'d>,
        order: &Json<Order<'d>>,
    ) -> Result<(), HandlerError> {
        let first_call = self.calls_of(order.n) == 0;
        self.calls.lock().unwrap().push(order.n);
        match order.fail {
            Some("retry_once") if first_call => return Err(HandlerError::retryable("throttled")),
            Some("hang_once") if first_call => {
                // A handler stuck until Lambda ends the invocation, before any effect.
                self.crashed.notify_one();
                std::future::pending::<()>().await;
            }
            _ => {}
        }
        self.effects.lock().unwrap().push(order.n);
        let key = namespaced_key(&RecordKey, FUNCTION, record).unwrap();
        self.keyed_effects.lock().unwrap().insert(key);
        if order.fail == Some("crash_after_effect_once") && first_call {
            // The process dies after the effect, before the batch's completion write.
            self.crashed.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

type Store<S> = Arc<FaultyStore<S>>;
type TestProcessor<G> = Processor<PerRecord<Ledger>, InMemoryDeadLetterSink, G>;

/// Store retries that are quick and predictable: 3 retries, 10/20/40 ms.
fn quick_retry() -> ExponentialBackoff {
    ExponentialBackoff {
        initial: Duration::from_millis(10),
        max_delay: Duration::from_millis(40),
        max_retries: 3,
        jitter: Jitter::None,
    }
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(SystemClock.now_ms()))
}

fn gate<S: IdempotencyStore>(
    store: &Store<S>,
    clock: &Arc<ManualClock>,
) -> Idempotency<Store<S>, RecordKey, Arc<ManualClock>> {
    Idempotency::new(store.clone())
        .clock(clock.clone())
        .retry(quick_retry())
}

fn processor<G: RecordGate>(gate: G, clock: &Arc<ManualClock>) -> TestProcessor<G> {
    Processor::per_record(Ledger::default(), InMemoryDeadLetterSink::new())
        .config(ProcessorConfig {
            function_name: FUNCTION.into(),
            max_concurrency: 4,
            deadline_margin: Duration::from_millis(100),
            ..ProcessorConfig::default()
        })
        .clock(clock.clone())
        .retry(ExponentialBackoff::none())
        .gate(gate)
}

async fn deliver<G: RecordGate>(
    p: &TestProcessor<G>,
    clock: &Arc<ManualClock>,
    records: &[TestRecord],
    request_id: &str,
) -> BatchReport {
    let invocation = Invocation::with_deadline_ms(request_id, clock.now_ms() + 60_000, clock);
    p.process(event_json(records).as_bytes(), &invocation)
        .await
        .unwrap()
}

/// A record of order `n` on partition key `pk`, with extra JSON fields.
fn order(pk: &str, n: u32, id: &str, extra: &str) -> TestRecord {
    let body = format!(r#"{{"id":"{id}","n":{n}{extra}}}"#);
    plain(pk, &sequence_number(u64::from(n)), body.as_bytes())
}

fn record_key(n: u32) -> String {
    format!(
        "{FUNCTION}#{TEST_STREAM_ARN}#{TEST_SHARD_ID}#{}",
        sequence_number(u64::from(n))
    )
}

async fn stored<S: IdempotencyStore>(store: &Store<S>, key: &str) -> Option<StoredRecord> {
    store.inner().get(&[key]).await.unwrap().records.pop()
}

fn ceil_seconds(ms: i64) -> i64 {
    (ms + 999) / 1000
}

fn sorted(mut calls: Vec<usize>) -> Vec<usize> {
    calls.sort_unstable();
    calls
}

fn redeliver_from(report: &BatchReport) -> Option<String> {
    report
        .response
        .batch_item_failures
        .first()
        .map(|f| f.item_identifier.clone())
}

// ---------------------------------------------------------------------------------------------
// Scenarios, each run against both stores.

async fn first_delivery<S: IdempotencyStore>(store: Store<S>) {
    let clock = clock();
    let p = processor(gate(&store, &clock), &clock);
    let records: Vec<_> = (0..30)
        .map(|n| order(&format!("k{}", n % 3), n, "-", ""))
        .collect();
    let report = deliver(&p, &clock, &records, "req-1").await;

    assert_eq!(report.counts.processed, 30);
    assert!(report.response.batch_item_failures.is_empty());
    assert_eq!(p.handler().0.effects(), (0..30).collect::<Vec<_>>());
    // One look-up of 30 keys, completions in calls of at most 25.
    assert_eq!(store.calls(StoreOp::Get), vec![30]);
    assert_eq!(sorted(store.calls(StoreOp::Write)), vec![5, 25]);
    assert!(store.calls(StoreOp::Claim).is_empty());
    let item = stored(&store, &record_key(7)).await.unwrap();
    let expected_expiry = ceil_seconds(clock.now_ms() + 24 * 3600 * 1000);
    assert_eq!(
        item.status,
        RecordStatus::Completed {
            expires_at: expected_expiry
        }
    );
    assert_eq!(item.request_id.as_deref(), Some("req-1"));
}

async fn full_redelivery<S: IdempotencyStore>(store: Store<S>) {
    let clock = clock();
    let p = processor(gate(&store, &clock), &clock);
    let records: Vec<_> = (0..30)
        .map(|n| order(&format!("k{}", n % 3), n, "-", ""))
        .collect();
    deliver(&p, &clock, &records, "req-1").await;
    let report = deliver(&p, &clock, &records, "req-2").await;

    assert_eq!(report.counts.already_done, 30);
    assert_eq!(report.handler_calls, 0);
    assert!(report.response.batch_item_failures.is_empty());
    assert_eq!(p.handler().0.effects(), (0..30).collect::<Vec<_>>());
    // The redelivery costs one look-up and no writes.
    assert_eq!(store.calls(StoreOp::Get), vec![30, 30]);
    assert_eq!(store.calls(StoreOp::Write).len(), 2);
}

async fn partial_redelivery_after_a_checkpoint<S: IdempotencyStore>(store: Store<S>) {
    let clock = clock();
    let p = processor(gate(&store, &clock), &clock);
    // Odd orders on key "a", even on "b"; order 4 fails once.
    let records: Vec<_> = (1..=10)
        .map(|n| {
            let pk = if n % 2 == 1 { "a" } else { "b" };
            let extra = if n == 4 {
                r#","fail":"retry_once""#
            } else {
                ""
            };
            order(pk, n, "-", extra)
        })
        .collect();
    let report = deliver(&p, &clock, &records, "req-1").await;
    assert_eq!(redeliver_from(&report), Some(sequence_number(4)));
    assert_eq!(report.outcomes[5], Outcome::Blocked);
    assert_eq!(p.handler().0.effects(), vec![1, 2, 3, 5, 7, 9]);
    // Handed-back records leave nothing behind.
    assert!(stored(&store, &record_key(4)).await.is_none());
    assert!(stored(&store, &record_key(6)).await.is_none());

    // Lambda redelivers from the checkpoint: 4..=10.
    let report = deliver(&p, &clock, &records[3..], "req-2").await;
    assert!(report.response.batch_item_failures.is_empty());
    assert_eq!(report.counts.processed, 4); // 4, 6, 8, 10
    assert_eq!(report.counts.already_done, 3); // 5, 7, 9
    assert_eq!(p.handler().0.effects(), (1..=10).collect::<Vec<_>>());
}

async fn duplicates_inside_a_batch<S: IdempotencyStore>(store: Store<S>) {
    let clock = clock();
    let p = processor(gate(&store, &clock).key(JsonFieldKey::new("id")), &clock);
    let ids = ["tx-1", "tx-2", "tx-1", "tx-3", "tx-2"];
    let records: Vec<_> = ids
        .iter()
        .zip(1..)
        .map(|(id, n)| order(&format!("p{n}"), n, id, ""))
        .collect();
    let report = deliver(&p, &clock, &records, "req-1").await;

    assert_eq!(
        report.outcomes,
        vec![
            Outcome::Processed { attempts: 1 },
            Outcome::Processed { attempts: 1 },
            Outcome::AlreadyDone,
            Outcome::Processed { attempts: 1 },
            Outcome::AlreadyDone,
        ]
    );
    assert_eq!(p.handler().0.effects(), vec![1, 2, 4]);
    // Three distinct keys: looked up, claimed and completed once each, in one call each.
    assert_eq!(store.calls(StoreOp::Get), vec![3]);
    assert_eq!(store.calls(StoreOp::Claim), vec![3]);
    assert_eq!(store.calls(StoreOp::Write), vec![3]);
    let item = stored(&store, &format!("{FUNCTION}#id=tx-1"))
        .await
        .unwrap();
    assert!(matches!(item.status, RecordStatus::Completed { .. }));
}

async fn payload_hash_mismatch<S: IdempotencyStore>(store: Store<S>) {
    let clock = clock();
    let p = processor(
        gate(&store, &clock)
            .key(JsonFieldKey::new("id"))
            .payload_check(PayloadCheck::Sha256),
        &clock,
    );
    let first = order("p", 1, "tx-1", r#","amount":5"#);
    deliver(&p, &clock, std::slice::from_ref(&first), "req-1").await;

    // The same payload again, as another record: a duplicate, skipped.
    let mut again = first.clone();
    again.sequence_number = sequence_number(20);
    let report = deliver(&p, &clock, &[again], "req-2").await;
    assert_eq!(report.outcomes, vec![Outcome::AlreadyDone]);

    // The key with another payload: rejected, not skipped.
    let mut other = order("p", 1, "tx-1", r#","amount":7"#);
    other.sequence_number = sequence_number(21);
    // And inside one batch: tx-2 twice with different payloads.
    let report = deliver(
        &p,
        &clock,
        &[
            other,
            order("q", 2, "tx-2", r#","amount":1"#),
            order("r", 3, "tx-2", r#","amount":9"#),
        ],
        "req-3",
    )
    .await;
    assert!(report.response.batch_item_failures.is_empty());
    assert_eq!(report.counts.dead_lettered, 2);
    assert_eq!(report.counts.processed, 1);
    assert_eq!(p.handler().0.effects(), vec![1, 2]);
    let letters = p.dead_letter_sink().letters();
    assert_eq!(letters.len(), 2);
    for letter in &letters {
        assert_eq!(letter["error"]["type"], "IdempotencyKeyReused");
    }
    let message = letters[0]["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("id=tx-1") && message.contains("req-1"),
        "{message}"
    );
    // The stored completion is untouched.
    let item = stored(&store, &format!("{FUNCTION}#id=tx-1"))
        .await
        .unwrap();
    assert_eq!(item.request_id.as_deref(), Some("req-1"));
}

async fn expired_records_run_again<S: IdempotencyStore>(store: Store<S>) {
    let clock = clock();
    let p = processor(
        gate(&store, &clock).completed_ttl(Duration::from_secs(3600)),
        &clock,
    );
    let records: Vec<_> = (1..=3).map(|n| order("a", n, "-", "")).collect();
    deliver(&p, &clock, &records, "req-1").await;

    clock.advance(30 * 60 * 1000);
    let report = deliver(&p, &clock, &records, "req-2").await;
    assert_eq!(report.counts.already_done, 3);

    // Past the time to live the completion means nothing (TTL deletion is lazy).
    clock.advance(31 * 60 * 1000);
    let report = deliver(&p, &clock, &records, "req-3").await;
    assert_eq!(report.counts.processed, 3);
    assert_eq!(p.handler().0.effects(), vec![1, 1, 2, 2, 3, 3]);
    let item = stored(&store, &record_key(1)).await.unwrap();
    assert_eq!(item.request_id.as_deref(), Some("req-3"));
}

async fn lock_left_by_a_timed_out_invocation<S: IdempotencyStore>(store: Store<S>) {
    let clock = clock();
    let p = processor(gate(&store, &clock).key(JsonFieldKey::new("id")), &clock);
    let records = [order("p", 1, "tx-1", r#","fail":"hang_once""#)];

    // Invocation A claims tx-1, then its handler hangs until Lambda ends it (we drop it).
    let deadline_a = clock.now_ms() + 60_000;
    tokio::select! {
        _ = deliver(&p, &clock, &records, "req-A") => panic!("the hung invocation finished"),
        () = p.handler().0.crashed.notified() => {}
    }
    let lock = stored(&store, &format!("{FUNCTION}#id=tx-1"))
        .await
        .unwrap();
    assert_eq!(
        lock.status,
        RecordStatus::InProgress {
            lock_expires_at: ceil_seconds(deadline_a)
        }
    );
    assert_eq!(lock.request_id.as_deref(), Some("req-A"));

    // Before A's deadline the key is held: B hands the record back without running it.
    clock.advance(10_000);
    let report = deliver(&p, &clock, &records, "req-B").await;
    assert!(
        matches!(&report.outcomes[0], Outcome::Retryable { reason, .. } if reason.contains("IdempotencyKeyInProgress")),
        "{:?}",
        report.outcomes
    );
    assert_eq!(p.handler().0.calls_of(1), 1);

    // After it, the lock has expired and C runs the record.
    clock.advance(51_000);
    let report = deliver(&p, &clock, &records, "req-C").await;
    assert_eq!(report.outcomes, vec![Outcome::Processed { attempts: 1 }]);
    assert_eq!(p.handler().0.effects(), vec![1]);
    let item = stored(&store, &format!("{FUNCTION}#id=tx-1"))
        .await
        .unwrap();
    assert!(matches!(item.status, RecordStatus::Completed { .. }));
    assert_eq!(item.request_id.as_deref(), Some("req-C"));
}

async fn store_throttling<S: IdempotencyStore>(store: Store<S>) {
    let clock = clock();
    let p = processor(gate(&store, &clock), &clock);
    let batch = |from: u32| -> Vec<TestRecord> {
        (from..from + 5)
            .map(|n| order(&format!("k{n}"), n, "-", ""))
            .collect()
    };

    // Throttled look-ups are retried within the invocation.
    store.inject(StoreOp::Get, StoreFault::Throttled);
    store.inject(StoreOp::Get, StoreFault::Unprocessed(3));
    let report = deliver(&p, &clock, &batch(0), "req-1").await;
    assert_eq!(report.counts.processed, 5);
    assert_eq!(store.calls(StoreOp::Get), vec![5, 5, 3]);

    // A store that stays down defers the whole batch: nothing runs unrecorded.
    for _ in 0..4 {
        store.inject(StoreOp::Get, StoreFault::Unavailable);
    }
    let report = deliver(&p, &clock, &batch(10), "req-2").await;
    assert_eq!(report.counts.retryable, 5);
    assert!(
        matches!(&report.outcomes[0], Outcome::Retryable { reason, .. }
        if reason.contains("IdempotencyStoreUnavailable"))
    );
    assert_eq!(redeliver_from(&report), Some(sequence_number(10)));
    assert_eq!(report.handler_calls, 0);

    // Unprocessed and throttled completions are retried.
    store.inject(StoreOp::Write, StoreFault::Unprocessed(2));
    store.inject(StoreOp::Write, StoreFault::Throttled);
    let report = deliver(&p, &clock, &batch(10), "req-3").await;
    assert_eq!(report.counts.processed, 5);
    for n in 10..15 {
        assert!(stored(&store, &record_key(n)).await.is_some(), "order {n}");
    }

    // Completions that cannot be written: the records ran, but go back to Lambda, and the
    // redelivery runs them again (the at-least-once window) and completes them.
    for _ in 0..4 {
        store.inject(StoreOp::Write, StoreFault::Unavailable);
    }
    let report = deliver(&p, &clock, &batch(20), "req-4").await;
    assert_eq!(report.counts.retryable, 5);
    assert!(
        matches!(&report.outcomes[2], Outcome::Retryable { reason, .. }
        if reason.contains("completion not recorded"))
    );
    assert!(stored(&store, &record_key(20)).await.is_none());
    let report = deliver(&p, &clock, &batch(20), "req-5").await;
    assert_eq!(report.counts.processed, 5);
    let report = deliver(&p, &clock, &batch(20), "req-6").await;
    assert_eq!(report.counts.already_done, 5);
    assert_eq!(p.handler().0.calls_of(20), 2);

    // Claims that fail defer their records too.
    let claiming = processor(gate(&store, &clock).key(JsonFieldKey::new("id")), &clock);
    store.inject(StoreOp::Claim, StoreFault::Unprocessed(1));
    let report = deliver(&claiming, &clock, &[order("x", 40, "tx-40", "")], "req-7").await;
    assert_eq!(report.counts.processed, 1);
    for _ in 0..4 {
        store.inject(StoreOp::Claim, StoreFault::Throttled);
    }
    let report = deliver(&claiming, &clock, &[order("x", 41, "tx-41", "")], "req-8").await;
    assert_eq!(report.counts.retryable, 1);
    assert_eq!(claiming.handler().0.calls_of(41), 0);
}

async fn crash_between_effect_and_completion<S: IdempotencyStore>(store: Store<S>) {
    let clock = clock();
    let p = processor(gate(&store, &clock), &clock);
    let records = [
        order("a", 1, "-", ""),
        order("b", 2, "-", r#","fail":"crash_after_effect_once""#),
        order("a", 3, "-", ""),
    ];
    tokio::select! {
        _ = deliver(&p, &clock, &records, "req-1") => panic!("the crashed invocation finished"),
        () = p.handler().0.crashed.notified() => {}
    }
    // Nothing was recorded: the batch's completions are written after all handlers.
    for n in 1..=3 {
        assert!(stored(&store, &record_key(n)).await.is_none());
    }

    let report = deliver(&p, &clock, &records, "req-2").await;
    assert_eq!(report.counts.processed, 3);
    let ledger = &p.handler().0;
    // At-least-once in that window: order 2's handler ran twice and its raw effect twice …
    assert_eq!(ledger.calls_of(2), 2);
    assert_eq!(ledger.effects().iter().filter(|n| **n == 2).count(), 2);
    // … while an effect keyed by the idempotency key happened once per record.
    assert_eq!(ledger.keyed_effects.lock().unwrap().len(), 3);

    let report = deliver(&p, &clock, &records, "req-3").await;
    assert_eq!(report.counts.already_done, 3);
}

/// Lets another invocation win the race for `keys`: it locks them between our look-up and our
/// claim.
struct Racing<S> {
    inner: S,
    keys: Mutex<Vec<String>>,
    until: i64,
}

impl<S: IdempotencyStore> IdempotencyStore for Racing<S> {
    async fn get(&self, keys: &[&str]) -> Result<Fetched, StoreError> {
        self.inner.get(keys).await
    }

    async fn write(&self, writes: &[&StoreWrite]) -> Result<Vec<String>, StoreError> {
        self.inner.write(writes).await
    }

    async fn claim(
        &self,
        claims: &[&StoredRecord],
        now_s: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        let keys = std::mem::take(&mut *self.keys.lock().unwrap());
        let rivals: Vec<StoreWrite> = keys
            .into_iter()
            .map(|key| {
                StoreWrite::Put(StoredRecord {
                    key,
                    status: RecordStatus::InProgress {
                        lock_expires_at: self.until,
                    },
                    payload_hash: None,
                    request_id: Some("req-rival".into()),
                })
            })
            .collect();
        if !rivals.is_empty() {
            let rivals: Vec<&StoreWrite> = rivals.iter().collect();
            assert!(self.inner.write(&rivals).await?.is_empty());
        }
        self.inner.claim(claims, now_s).await
    }
}

async fn a_concurrent_claim_defers_only_its_key<S: IdempotencyStore>(store: Store<S>) {
    let clock = clock();
    let racing = Racing {
        inner: store.clone(),
        keys: Mutex::new(vec![format!("{FUNCTION}#id=tx-2")]),
        until: clock.now_ms() / 1000 + 60,
    };
    let p = processor(
        Idempotency::new(racing)
            .key(JsonFieldKey::new("id"))
            .clock(clock.clone())
            .retry(quick_retry()),
        &clock,
    );
    let records: Vec<_> = (1..=3)
        .map(|n| order(&format!("p{n}"), n, &format!("tx-{n}"), ""))
        .collect();
    let report = deliver(&p, &clock, &records, "req-1").await;
    assert_eq!(report.outcomes[0], Outcome::Processed { attempts: 1 });
    assert!(
        matches!(&report.outcomes[1], Outcome::Retryable { reason, .. } if reason.contains("claimed by a concurrent invocation")),
        "{:?}",
        report.outcomes
    );
    assert_eq!(report.outcomes[2], Outcome::Processed { attempts: 1 });
    // The cancelled transaction was retried at once without the taken key.
    assert_eq!(store.calls(StoreOp::Claim), vec![3, 2]);
    let rival = stored(&store, &format!("{FUNCTION}#id=tx-2"))
        .await
        .unwrap();
    assert_eq!(rival.request_id.as_deref(), Some("req-rival"));
}

async fn calls_respect_dynamodb_limits<S: IdempotencyStore>(store: Store<S>) {
    let clock = clock();
    let p = processor(gate(&store, &clock), &clock);
    let records: Vec<_> = (0..260)
        .map(|n| order(&format!("k{}", n % 13), n, "-", ""))
        .collect();
    let report = deliver(&p, &clock, &records, "req-1").await;
    assert_eq!(report.counts.processed, 260);
    assert_eq!(sorted(store.calls(StoreOp::Get)), vec![60, 100, 100]);
    let writes = sorted(store.calls(StoreOp::Write));
    assert_eq!(writes.len(), 11);
    assert!(writes.iter().all(|n| *n <= 25));
    assert_eq!(writes.iter().sum::<usize>(), 260);
    let report = deliver(&p, &clock, &records, "req-2").await;
    assert_eq!(report.counts.already_done, 260);
}

// ---------------------------------------------------------------------------------------------

fn memory() -> Store<InMemoryIdempotencyStore> {
    Arc::new(FaultyStore::new(InMemoryIdempotencyStore::new()))
}

/// A DynamoDB store on a fresh moto table, or `None` to skip.
async fn moto() -> Option<Store<DynamoDbIdempotencyStore>> {
    let config = shardwise_testkit::moto_config().await?;
    let client = aws_sdk_dynamodb::Client::new(&config);
    let table = shardwise_testkit::unique_name("idempotency");
    DynamoDbIdempotencyStore::create_table(&client, &table)
        .await
        .expect("create the idempotency table on moto");
    Some(Arc::new(FaultyStore::new(DynamoDbIdempotencyStore::new(
        client, table,
    ))))
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod in_memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::memory()).await;
                }
            )*
        }
        mod on_moto {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(store) = super::moto().await else { return };
                    super::$name(store).await;
                }
            )*
        }
    };
}

scenarios!(
    first_delivery,
    full_redelivery,
    partial_redelivery_after_a_checkpoint,
    duplicates_inside_a_batch,
    payload_hash_mismatch,
    expired_records_run_again,
    lock_left_by_a_timed_out_invocation,
    a_concurrent_claim_defers_only_its_key,
    store_throttling,
    crash_between_effect_and_completion,
    calls_respect_dynamodb_limits,
);

// ---------------------------------------------------------------------------------------------
// In-memory only.

#[tokio::test]
async fn kpl_user_records_are_keyed_by_sub_sequence() {
    let store = memory();
    let clock = clock();
    let p = processor(gate(&store, &clock), &clock);
    let bodies: Vec<String> = (10..13)
        .map(|n| format!(r#"{{"id":"-","n":{n}}}"#))
        .collect();
    let entries: Vec<shardwise::kpl::AggregateEntry<'_>> = bodies
        .iter()
        .map(|b| shardwise::kpl::AggregateEntry {
            partition_key: "u",
            explicit_hash_key: None,
            data: b.as_bytes(),
        })
        .collect();
    let aggregate = shardwise::kpl::aggregate(&entries);
    let records = [plain("agg", &sequence_number(5), &aggregate)];
    let report = deliver(&p, &clock, &records, "req-1").await;
    assert_eq!(report.counts.processed, 3);
    for sub in 0..3 {
        let key = format!("{}#{sub}", record_key(5));
        assert!(stored(&store, &key).await.is_some(), "{key}");
    }
    let report = deliver(&p, &clock, &records, "req-2").await;
    assert_eq!(report.counts.already_done, 3);
}

/// A batch handler that records which orders it wrote.
#[derive(Default)]
struct BulkWriter {
    written: Mutex<Vec<u32>>,
}

impl<'d> BatchHandler<'d> for BulkWriter {
    type Payload = Json<Order<'d>>;

    async fn handle_batch(
        &self,
        batch: &[TypedRecord<'_, 'd, Json<Order<'d>>>],
    ) -> Result<(), HandlerError> {
        self.written
            .lock()
            .unwrap()
            .extend(batch.iter().map(|r| r.payload.n));
        Ok(())
    }
}

#[tokio::test]
async fn batch_handlers_are_gated_too() {
    let store = memory();
    let clock = clock();
    let p = Processor::bisecting(BulkWriter::default(), InMemoryDeadLetterSink::new())
        .clock(clock.clone())
        .gate(gate(&store, &clock));
    let first: Vec<_> = (1..=4).map(|n| order("a", n, "-", "")).collect();
    let invocation = Invocation::with_deadline_ms("r1", clock.now_ms() + 60_000, &clock);
    p.process(event_json(&first).as_bytes(), &invocation)
        .await
        .unwrap();
    // Redelivered with two new records behind: only those reach the handler.
    let mut again = first.clone();
    again.extend((5..=6).map(|n| order("a", n, "-", "")));
    let invocation = Invocation::with_deadline_ms("r2", clock.now_ms() + 60_000, &clock);
    let report = p
        .process(event_json(&again).as_bytes(), &invocation)
        .await
        .unwrap();
    assert_eq!(report.counts.already_done, 4);
    assert_eq!(report.counts.processed, 2);
    assert_eq!(
        *p.handler().0.written.lock().unwrap(),
        vec![1, 2, 3, 4, 5, 6]
    );
}

#[tokio::test]
async fn records_without_a_key_are_dead_lettered() {
    let store = memory();
    let clock = clock();
    let p = processor(
        gate(&store, &clock).key(JsonFieldKey::new("transaction_id")),
        &clock,
    );
    let report = deliver(&p, &clock, &[order("a", 1, "-", "")], "req-1").await;
    assert_eq!(report.counts.dead_lettered, 1);
    let letters = p.dead_letter_sink().letters();
    assert_eq!(letters[0]["error"]["type"], "IdempotencyKeyMissing");
    assert!(store.calls(StoreOp::Get).is_empty());
}
