//! The processor under faults, driven through repeated deliveries the way Lambda drives it:
//! nothing lost, no effect repeated, per-key order kept, nothing acknowledged that was neither
//! effected nor dead-lettered. docs/proof.md explains the model and records the long runs.
//!
//! Each generated case is a stream of one shard: plain records, KPL aggregates, records that do
//! not decode, across several partition keys, and a fault schedule for the first K deliveries:
//!
//! - handler faults on chosen records: retryable errors (for their first few calls), permanent
//!   errors and panics (poison: on every call), slow calls that meet the deadline;
//! - idempotency store faults (throttled, unavailable, unprocessed entries) on chosen calls;
//! - dead-letter sink faults (a whole call, single entries failing or rejected);
//! - short deadlines, invocations that crash (at a time, or right after an effect, before the
//!   batch's completions are written), and responses lost after the processor answered.
//!
//! "Lambda" then delivers from the checkpoint the response implies (every record whose sequence
//! number is at or after the reported one, KPL aggregates whole), retries a failed invocation
//! whole or, with `BisectBatchOnFunctionError`, in halves, up to a bound; after K deliveries the
//! faults stop, and every further delivery must acknowledge all it is given.
//!
//! What is asserted is exactly what the processor and the idempotency gate promise:
//! - every record is effected or in the dead-letter sink with its payload (or still due when the
//!   schedule ends; with the clean deliveries at the end, none is);
//! - a record's effect (and its dead letter) happens at most once, plus once more for each
//!   delivery in which it took effect but whose completion write did not happen: the completion
//!   write failed (the record is then handed back), or the invocation crashed before it. That
//!   window is documented in `shardwise::idempotency` ("A crash between the effect and the
//!   completion write"); no other repeat is allowed;
//! - per partition key, records first take effect in stream order;
//! - a record acknowledged by a response (before the checkpoint) was effected or dead-lettered.
//!
//! `PROPTEST_CASES` sets the cases per mode (default 256); `SHARDWISE_PROP_MAX_RECORDS` the
//! largest batch (default 300). `make proptest-long` runs 2 × 10,000 cases with batches of up to
//! 10,000 records.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use shardwise::clock::Clock;
use shardwise::dead_letter::{DeadLetterSink, EntryFailure, SinkEntry, SinkError, SinkFault};
use shardwise::gate::{Admission, GateContext, GateError, RecordGate, Settlement};
use shardwise::idempotency::{
    FaultyStore, Idempotency, InMemoryIdempotencyStore, JsonFieldKey, KeyStrategy, RecordKey,
    StoreFault, StoreOp,
};
use shardwise::kpl::{self, AggregateEntry};
use shardwise::processor::{Mode, Outcome};
use shardwise::retry::{ExponentialBackoff, Jitter};
use shardwise::testing::{TestRecord, event_json, plain, raw_data, sequence_number};
use shardwise::{
    BatchHandler, HandlerError, InMemoryDeadLetterSink, Invocation, Json, Processor,
    ProcessorConfig, Record, RecordHandler, TypedRecord,
};
use tokio::sync::Notify;
use tokio::time::Instant;

const FUNCTION: &str = "prop";
/// Lambda's usual deadline when no short one is scheduled.
const NORMAL_DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The generated case

/// The knobs proptest generates and shrinks; the details (which record is an aggregate, which
/// one fails, which store call is throttled) are drawn from `seed`.
#[derive(Debug, Clone)]
struct Scenario {
    /// Records per delivery at most (the mapping's `BatchSize`).
    batch_size: usize,
    /// The stream holds about this many batches.
    batches: usize,
    keys: usize,
    json_field_key: bool,
    kpl_percent: u32,
    undecodable_percent: u32,
    fault_percent: u32,
    /// Deliveries that get faults; every later one gets none.
    faulty_deliveries: usize,
    bisect_on_function_error: bool,
    max_concurrency: usize,
    /// moto-style sequence numbers ("95", "96", … "105": lengths change along the stream)
    /// instead of 56-digit ones.
    short_sequence_numbers: bool,
    /// With a payload key: records that repeat an earlier record's business event (its payload,
    /// so its idempotency key), as a producer that sends an event twice does.
    duplicate_percent: u32,
    seed: u64,
}

fn scenario(max_records: usize) -> impl Strategy<Value = Scenario> {
    // Batch sizes spread evenly over orders of magnitude (1 to max), shrinking towards 1.
    let batch_size =
        (0.0f64..1.0).prop_map(move |u| ((max_records as f64).powf(u).round() as usize).max(1));
    (
        batch_size,
        1usize..=3,
        1usize..=6,
        any::<bool>(),
        prop_oneof![Just(0u32), 0u32..=40],
        prop_oneof![Just(0u32), 0u32..=10],
        prop_oneof![Just(0u32), 0u32..=40],
        0usize..=6,
        any::<bool>(),
        1usize..=8,
        any::<bool>(),
        (any::<u64>(), prop_oneof![Just(0u32), 0u32..=20]),
    )
        .prop_map(
            |(
                batch_size,
                batches,
                keys,
                json_field_key,
                kpl_percent,
                undecodable_percent,
                fault_percent,
                faulty_deliveries,
                bisect_on_function_error,
                max_concurrency,
                short_sequence_numbers,
                (seed, duplicate_percent),
            )| Scenario {
                batch_size,
                batches,
                keys,
                json_field_key,
                kpl_percent,
                undecodable_percent,
                fault_percent,
                faulty_deliveries,
                bisect_on_function_error,
                max_concurrency,
                short_sequence_numbers,
                duplicate_percent,
                seed,
            },
        )
}

/// What a record (a plain record, or one user record of an aggregate) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// JSON `{"n": id}`, which the handler takes.
    Good(Fault),
    /// Not JSON.
    NotJson,
    /// JSON without `n`.
    WrongShape,
    /// `kinesis.data` is not base64 (a whole Kinesis record).
    BadBase64,
    /// A KPL aggregate whose digest is wrong (a whole Kinesis record).
    CorruptAggregate,
    /// The same payload, hence key, as good record `of`: the handler acts on `of`.
    Duplicate { of: usize },
}

/// What the handler does with a good record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Fails retryably on its first `calls` calls made while faults are on.
    Retryable {
        calls: u32,
    },
    /// Fails permanently on every call.
    Poison,
    /// Panics on every call.
    Panic,
    /// Takes `ms` before its effect while faults are on.
    Slow {
        ms: u64,
    },
}

/// One unit the processor reports an outcome for.
#[derive(Debug, Clone)]
struct Unit {
    kinesis: usize,
    sub: Option<u64>,
    partition_key: String,
    payload: Vec<u8>,
    kind: Kind,
}

/// One Kinesis record of the stream.
#[derive(Debug, Clone)]
struct KinesisRecord {
    record: TestRecord,
    /// Its units, as positions in `Stream::units`.
    units: std::ops::Range<usize>,
}

#[derive(Debug)]
struct Stream {
    kinesis: Vec<KinesisRecord>,
    units: Vec<Unit>,
}

/// Faults of one delivery.
#[derive(Debug, Clone, Default)]
struct DeliveryFaults {
    store: Vec<(StoreOp, StoreFault)>,
    sink: Vec<SinkFault>,
    deadline: Option<Duration>,
    /// The invocation crashes at this time after its start...
    crash_at: Option<Duration>,
    /// ...or right after this many effects (before the batch's completions are written).
    crash_after_effects: Option<usize>,
    /// The processor answers, but Lambda sees a function error (the runtime died after).
    lose_response: bool,
}

fn key_name(i: usize) -> String {
    match i {
        // A key of Kinesis's maximum length and a non-ASCII one among the usual kind.
        4 => "k".repeat(256),
        5 => "clé-ü-☃".to_owned(),
        _ => format!("card-{i}"),
    }
}

fn build_stream(s: &Scenario, rng: &mut StdRng) -> Stream {
    let target = (s.batch_size * s.batches).max(1);
    let keys: Vec<String> = (0..s.keys).map(key_name).collect();
    let short_start: u64 = [1, 7, 95, 995][rng.random_range(0..4)];
    let mut kinesis = Vec::new();
    let mut units: Vec<Unit> = Vec::new();
    // Good records, which a duplicate may repeat.
    let mut goods: Vec<usize> = Vec::new();
    let mut next_sequence: u64 = rng.random_range(0..1000);
    while kinesis.len() < target {
        let index = kinesis.len();
        next_sequence += rng.random_range(1..4);
        let sequence = if s.short_sequence_numbers {
            (short_start + next_sequence).to_string()
        } else {
            sequence_number(next_sequence)
        };
        let key = keys[rng.random_range(0..keys.len())].clone();
        let first_unit = units.len();
        let roll = rng.random_range(0..100);
        let record = if roll < s.undecodable_percent / 2 {
            let data_field = format!("!!not base64 {index}!!");
            units.push(Unit {
                kinesis: index,
                sub: None,
                partition_key: key.clone(),
                payload: data_field.clone().into_bytes(),
                kind: Kind::BadBase64,
            });
            raw_data(&key, &sequence, &data_field)
        } else if roll < s.undecodable_percent {
            let mut aggregate = kpl::aggregate(&[AggregateEntry {
                partition_key: &key,
                explicit_hash_key: None,
                data: br#"{"n":0}"#,
            }]);
            let last = aggregate.len() - 1;
            aggregate[last] ^= 0x5a;
            let record = plain(&key, &sequence, &aggregate);
            units.push(Unit {
                kinesis: index,
                sub: None,
                partition_key: key.clone(),
                payload: record.data_field.clone().into_bytes(),
                kind: Kind::CorruptAggregate,
            });
            record
        } else if rng.random_range(0..100) < s.kpl_percent {
            let count = rng.random_range(1..=8);
            let mut payloads = Vec::new();
            for sub in 0..count {
                let user_key = keys[rng.random_range(0..keys.len())].clone();
                payloads.push(push_unit(
                    s,
                    rng,
                    &mut units,
                    &mut goods,
                    index,
                    Some(sub),
                    user_key,
                ));
            }
            let entries: Vec<AggregateEntry<'_>> = payloads
                .iter()
                .map(|(k, p)| AggregateEntry {
                    partition_key: k,
                    explicit_hash_key: None,
                    data: p,
                })
                .collect();
            // The aggregate's own key is its first user record's, as the KPL does.
            plain(&payloads[0].0, &sequence, &kpl::aggregate(&entries))
        } else {
            let (key, payload) = push_unit(s, rng, &mut units, &mut goods, index, None, key);
            plain(&key, &sequence, &payload)
        };
        kinesis.push(KinesisRecord {
            record,
            units: first_unit..units.len(),
        });
    }
    Stream { kinesis, units }
}

/// Draw the record at (`kinesis`, `sub`) and add it to `units`; its key and payload. A duplicate
/// travels under its original's partition key or, half the time, under another one (a producer
/// that resends an event under a different key): then whether it holds its own key back depends
/// on a record of another key.
fn push_unit(
    s: &Scenario,
    rng: &mut StdRng,
    units: &mut Vec<Unit>,
    goods: &mut Vec<usize>,
    kinesis: usize,
    sub: Option<u64>,
    key: String,
) -> (String, Vec<u8>) {
    let id = units.len();
    let (kind, key, payload) = if s.json_field_key
        && !goods.is_empty()
        && rng.random_range(0..100) < s.duplicate_percent
    {
        let of = goods[rng.random_range(0..goods.len())];
        let original = &units[of];
        let key = if rng.random_bool(0.5) {
            original.partition_key.clone()
        } else {
            key
        };
        (Kind::Duplicate { of }, key, original.payload.clone())
    } else {
        let kind = draw_kind(s, rng);
        if matches!(kind, Kind::Good(_)) {
            goods.push(id);
        }
        (kind, key, payload_of(id, kind))
    };
    units.push(Unit {
        kinesis,
        sub,
        partition_key: key.clone(),
        payload: payload.clone(),
        kind,
    });
    (key, payload)
}

fn draw_kind(s: &Scenario, rng: &mut StdRng) -> Kind {
    if rng.random_range(0..100) < s.undecodable_percent / 2 {
        return if rng.random_bool(0.5) {
            Kind::NotJson
        } else {
            Kind::WrongShape
        };
    }
    if rng.random_range(0..100) >= s.fault_percent {
        return Kind::Good(Fault::None);
    }
    Kind::Good(match rng.random_range(0..10) {
        0..=4 => Fault::Retryable {
            calls: rng.random_range(1..=6),
        },
        5 | 6 => Fault::Slow {
            ms: rng.random_range(10..=3000),
        },
        7 | 8 => Fault::Poison,
        _ => Fault::Panic,
    })
}

fn payload_of(id: usize, kind: Kind) -> Vec<u8> {
    match kind {
        Kind::Good(_) => format!(r#"{{"n":{id}}}"#).into_bytes(),
        Kind::NotJson => format!("record {id} is not json").into_bytes(),
        Kind::WrongShape => format!(r#"{{"id":{id}}}"#).into_bytes(),
        Kind::BadBase64 | Kind::CorruptAggregate | Kind::Duplicate { .. } => Vec::new(),
    }
}

fn draw_delivery_faults(rng: &mut StdRng) -> DeliveryFaults {
    let mut faults = DeliveryFaults::default();
    for _ in 0..rng.random_range(0..=4) {
        let op = [StoreOp::Get, StoreOp::Write, StoreOp::Claim][rng.random_range(0..3)];
        let fault = match rng.random_range(0..3) {
            0 => StoreFault::Throttled,
            1 => StoreFault::Unavailable,
            _ => StoreFault::Unprocessed(rng.random_range(1..=30)),
        };
        faults.store.push((op, fault));
    }
    for _ in 0..rng.random_range(0..=3) {
        faults.sink.push(match rng.random_range(0..3) {
            0 => SinkFault::FailCall,
            1 => SinkFault::FailEntries(rng.random_range(1..=5)),
            _ => SinkFault::RejectEntries(rng.random_range(1..=3)),
        });
    }
    if rng.random_bool(0.3) {
        faults.deadline = Some(Duration::from_millis(rng.random_range(300..=5000)));
    }
    match rng.random_range(0..10) {
        0 => {
            // Mid-work: what takes time here is backoff (tens of ms) and slow handlers.
            let limit = faults
                .deadline
                .unwrap_or(NORMAL_DEADLINE)
                .as_millis()
                .min(3000) as u64;
            faults.crash_at = Some(Duration::from_millis(rng.random_range(1..=limit)));
        }
        1 => faults.crash_after_effects = Some(rng.random_range(1..=20)),
        2 => faults.lose_response = true,
        _ => {}
    }
    faults
}

// ---------------------------------------------------------------------------------------------
// The world the handlers act on

/// Handler calls, effects and the per-delivery switches, shared by the handler and the driver.
struct World {
    units: Vec<Unit>,
    sabotage: Sabotage,
    /// Faults are on (the first K deliveries).
    faulty: AtomicBool,
    delivery: AtomicUsize,
    /// Calls made while faults were on, per unit (for `Fault::Retryable`).
    faulty_calls: Vec<AtomicU32>,
    /// Every effect, in the order it happened: (unit, delivery).
    effects: Mutex<Vec<(usize, usize)>>,
    effects_this_delivery: AtomicUsize,
    crash_after_effects: AtomicUsize,
    crash: Mutex<Arc<Notify>>,
}

impl World {
    fn new(units: Vec<Unit>, sabotage: Sabotage) -> Self {
        let faulty_calls = units.iter().map(|_| AtomicU32::new(0)).collect();
        Self {
            units,
            sabotage,
            faulty: AtomicBool::new(false),
            delivery: AtomicUsize::new(0),
            faulty_calls,
            effects: Mutex::new(Vec::new()),
            effects_this_delivery: AtomicUsize::new(0),
            crash_after_effects: AtomicUsize::new(usize::MAX),
            crash: Mutex::new(Arc::new(Notify::new())),
        }
    }

    /// The handler was given the record that carries `id`'s payload (its own, or a duplicate's,
    /// which has the same key and payload).
    fn check_identity(&self, record: &Record<'_>, id: usize) {
        let unit = &self.units[id];
        assert_eq!(record.partition_key, unit.partition_key, "record {id}");
        assert_eq!(record.data, unit.payload.as_slice(), "record {id}");
    }

    /// What a call on `id` does before any effect: `Err` to fail, or a wait.
    fn fault(&self, id: usize) -> Result<Option<Duration>, HandlerError> {
        let Kind::Good(fault) = self.units[id].kind else {
            panic!("the handler was given record {id}, which does not decode");
        };
        let faulty = self.faulty.load(Ordering::SeqCst);
        match fault {
            Fault::Poison => Err(HandlerError::permanent(format!("record {id} is poison"))
                .with_type("InjectedPoison")),
            Fault::Panic => panic!("injected panic on record {id}"),
            Fault::Retryable { calls } if faulty => {
                if self.faulty_calls[id].fetch_add(1, Ordering::SeqCst) < calls {
                    Err(HandlerError::retryable(format!("record {id}: throttled")))
                } else {
                    Ok(None)
                }
            }
            Fault::Slow { ms } if faulty => Ok(Some(Duration::from_millis(ms))),
            _ => Ok(None),
        }
    }

    /// Record an effect; at the scheduled count, crash the invocation (the in-memory fakes never
    /// wait, so the handler yields for the crash to be seen before the processor goes on).
    async fn effect(&self, id: usize) {
        let delivery = self.delivery.load(Ordering::SeqCst);
        self.effects.lock().unwrap().push((id, delivery));
        let done = self.effects_this_delivery.fetch_add(1, Ordering::SeqCst) + 1;
        if done == self.crash_after_effects.load(Ordering::SeqCst) {
            let crash = Arc::clone(&self.crash.lock().unwrap());
            crash.notify_one();
            tokio::task::yield_now().await;
        }
    }
}

#[derive(Debug, Deserialize)]
struct Command {
    n: usize,
}

/// A record handler: one effect per successful call.
struct PerRecordHandler(Arc<World>);

impl<'d> RecordHandler<'d> for PerRecordHandler {
    type Payload = Json<Command>;

    async fn handle(
        &self,
        record: &Record<'d>,
        command: &Json<Command>,
    ) -> Result<(), HandlerError> {
        let world = &self.0;
        world.check_identity(record, command.n);
        if let Some(wait) = world.fault(command.n)? {
            tokio::time::sleep(wait).await;
        }
        world.effect(command.n).await;
        Ok(())
    }
}

/// A batch handler whose batch takes effect whole or not at all (one transaction): the first
/// faulty record decides the error.
struct AtomicBatchHandler(Arc<World>);

impl<'d> BatchHandler<'d> for AtomicBatchHandler {
    type Payload = Json<Command>;

    async fn handle_batch(
        &self,
        batch: &[TypedRecord<'_, 'd, Json<Command>>],
    ) -> Result<(), HandlerError> {
        let world = &self.0;
        let mut wait = Duration::ZERO;
        for item in batch {
            world.check_identity(item.record, item.payload.n);
            if let Some(more) = world.fault(item.payload.n)? {
                wait += more;
            }
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if world.sabotage == Sabotage::ReversedBatches {
            for item in batch.iter().rev() {
                world.effect(item.payload.n).await;
            }
            return Ok(());
        }
        for item in batch {
            world.effect(item.payload.n).await;
        }
        Ok(())
    }
}

/// Wall time that moves with tokio's paused clock, so lock expiries and deadlines agree.
#[derive(Debug, Clone, Copy)]
struct TokioClock {
    base_ms: i64,
    base: Instant,
}

impl Clock for TokioClock {
    fn now_ms(&self) -> i64 {
        self.base_ms + self.base.elapsed().as_millis() as i64
    }
}

// ---------------------------------------------------------------------------------------------
// Lambda

/// What one case did, summed into the figures printed at the end.
#[derive(Debug, Default, Clone)]
struct Figures {
    cases: u64,
    kinesis_records: u64,
    records: u64,
    deliveries: u64,
    faulty_deliveries: u64,
    handler_faults: u64,
    poison: u64,
    panics: u64,
    slow: u64,
    retryable: u64,
    undecodable: u64,
    store_faults: u64,
    sink_faults: u64,
    short_deadlines: u64,
    crashes: u64,
    lost_responses: u64,
    bisected_by_lambda: u64,
    effected: u64,
    dead_lettered: u64,
    /// Effects made by invocations that then crashed (their completions may be unwritten).
    effects_in_crashes: u64,
    /// Records handed back because their completion write failed.
    completions_not_recorded: u64,
    /// Repeats inside the documented window (effect done, completion not written).
    repeats_in_window: u64,
    dead_letter_repeats_in_window: u64,
    /// Dead letters sent again for records the gate could not key (payload key missing).
    keyless_dead_letter_repeats: u64,
    lost: u64,
    duplicated: u64,
    /// Records a response acknowledged before they were effected or dead-lettered.
    acknowledged_unsettled: u64,
    /// Records that first took effect after a later record of their partition key.
    out_of_order: u64,
    /// Records repeating an earlier record's business event (payload key).
    duplicates_sent: u64,
}

impl Figures {
    fn add(&mut self, o: &Figures) {
        self.cases += o.cases;
        self.kinesis_records += o.kinesis_records;
        self.records += o.records;
        self.deliveries += o.deliveries;
        self.faulty_deliveries += o.faulty_deliveries;
        self.handler_faults += o.handler_faults;
        self.poison += o.poison;
        self.panics += o.panics;
        self.slow += o.slow;
        self.retryable += o.retryable;
        self.undecodable += o.undecodable;
        self.store_faults += o.store_faults;
        self.sink_faults += o.sink_faults;
        self.short_deadlines += o.short_deadlines;
        self.crashes += o.crashes;
        self.lost_responses += o.lost_responses;
        self.bisected_by_lambda += o.bisected_by_lambda;
        self.effected += o.effected;
        self.dead_lettered += o.dead_lettered;
        self.repeats_in_window += o.repeats_in_window;
        self.effects_in_crashes += o.effects_in_crashes;
        self.completions_not_recorded += o.completions_not_recorded;
        self.dead_letter_repeats_in_window += o.dead_letter_repeats_in_window;
        self.keyless_dead_letter_repeats += o.keyless_dead_letter_repeats;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.acknowledged_unsettled += o.acknowledged_unsettled;
        self.out_of_order += o.out_of_order;
        self.duplicates_sent += o.duplicates_sent;
    }
}

/// How a delivery ended, as Lambda sees it.
enum Delivered {
    /// The function answered: redeliver from this Kinesis position (the batch's end: all done).
    Answered { checkpoint: usize },
    /// The function failed (crashed, or its answer was lost).
    Failed,
}

/// The dead letters received so far, by unit, with what they said.
#[derive(Default)]
struct Letters {
    /// unit -> (error type, data, delivery) of each letter.
    by_unit: HashMap<usize, Vec<(String, Option<String>, usize)>>,
}

type Store = FaultyStore<Arc<InMemoryIdempotencyStore>>;
type Gate<K> = Sabotaged<Idempotency<Store, K, TokioClock>>;

/// A deliberate defect, to show that the checks catch it (the oracle's own test). `None` in
/// the real suites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sabotage {
    None,
    /// The gate forgets completions: `AlreadyDone` admitted as `Run` (effects repeat).
    ForgetfulGate,
    /// The gate settles nothing but says it did (completions lost, effects repeat).
    SilentSettle,
    /// The dead-letter sink reports success and keeps nothing (records lost).
    LyingSink,
    /// The batch handler applies its batch backwards (order broken).
    ReversedBatches,
}

/// The idempotency gate, passed through unless sabotaged.
struct Sabotaged<G> {
    inner: G,
    sabotage: Sabotage,
}

impl<G: RecordGate> RecordGate for Sabotaged<G> {
    async fn admit(&self, records: &[Record<'_>], context: &GateContext<'_>) -> Vec<Admission> {
        let mut admissions = self.inner.admit(records, context).await;
        if self.sabotage == Sabotage::ForgetfulGate {
            for admission in &mut admissions {
                if *admission == Admission::AlreadyDone {
                    *admission = Admission::Run;
                }
            }
        }
        admissions
    }

    async fn settle(
        &self,
        records: &[Record<'_>],
        settled: &[Option<Settlement>],
        context: &GateContext<'_>,
    ) -> Vec<Result<(), GateError>> {
        if self.sabotage == Sabotage::SilentSettle {
            return vec![Ok(()); records.len()];
        }
        self.inner.settle(records, settled, context).await
    }
}

/// The in-memory dead-letter sink, passed through unless sabotaged.
struct Sink {
    inner: InMemoryDeadLetterSink,
    lie: bool,
}

impl DeadLetterSink for Sink {
    async fn send_batch(&self, entries: &[SinkEntry]) -> Result<Vec<EntryFailure>, SinkError> {
        if self.lie {
            return Ok(Vec::new());
        }
        self.inner.send_batch(entries).await
    }
}

struct Driver<'s> {
    scenario: &'s Scenario,
    stream: &'s Stream,
    world: Arc<World>,
    store: Arc<InMemoryIdempotencyStore>,
    clock: TokioClock,
    /// unit index by (Kinesis position, sub-sequence number).
    unit_at: HashMap<(usize, Option<u64>), usize>,
    /// Kinesis position by sequence number.
    position_of: HashMap<String, usize>,
    letters: Letters,
    /// Extra effects (and dead letters) a unit may have: one per delivery in which it took
    /// effect (or was dead-lettered) without its completion being written.
    allowance: Vec<u32>,
    /// Deliveries that carried each Kinesis record.
    carried: Vec<u32>,
    figures: Figures,
    latest_deadline: Instant,
    sabotage: Sabotage,
    /// Broken promises, in the order found.
    violations: Vec<String>,
    /// Effects of `world.effects` already looked at, and which units took effect so far.
    effects_seen: usize,
    effected: Vec<bool>,
}

fn quick_retry() -> ExponentialBackoff {
    ExponentialBackoff {
        initial: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
        max_retries: 2,
        jitter: Jitter::None,
    }
}

fn store_retry() -> ExponentialBackoff {
    ExponentialBackoff {
        initial: Duration::from_millis(10),
        max_delay: Duration::from_millis(40),
        max_retries: 3,
        jitter: Jitter::None,
    }
}

impl Driver<'_> {
    fn gate<K: KeyStrategy>(&self, key: K, faults: &DeliveryFaults) -> Gate<K> {
        let store = FaultyStore::new(Arc::clone(&self.store));
        for (op, fault) in &faults.store {
            store.inject(*op, fault.clone());
        }
        Sabotaged {
            inner: Idempotency::new(store)
                .key(key)
                .clock(self.clock)
                .retry(store_retry()),
            sabotage: self.sabotage,
        }
    }

    fn sink(&self, faults: &DeliveryFaults) -> Sink {
        let sink = InMemoryDeadLetterSink::new();
        for fault in &faults.sink {
            sink.inject(fault.clone());
        }
        Sink {
            inner: sink,
            lie: self.sabotage == Sabotage::LyingSink,
        }
    }

    /// One invocation with `faults` over Kinesis records `range`, through a processor built for
    /// it (so faults left unplayed end with it).
    async fn deliver(
        &mut self,
        range: std::ops::Range<usize>,
        faults: &DeliveryFaults,
    ) -> Result<Delivered, TestCaseError> {
        let world = Arc::clone(&self.world);
        let sink = self.sink(faults);
        let config = ProcessorConfig {
            function_name: FUNCTION.to_owned(),
            max_concurrency: self.scenario.max_concurrency,
            deadline_margin: Duration::from_millis(200),
            ..ProcessorConfig::default()
        };
        macro_rules! run {
            ($processor:expr, $key:expr) => {{
                let processor = $processor
                    .config(config)
                    .retry(quick_retry())
                    .clock(self.clock)
                    .gate(self.gate($key, faults));
                self.invoke(&processor, range, faults).await
            }};
        }
        match (self.scenario.bisect_handler(), self.scenario.json_field_key) {
            (false, false) => run!(
                Processor::per_record(PerRecordHandler(world), sink),
                RecordKey
            ),
            (false, true) => run!(
                Processor::per_record(PerRecordHandler(world), sink),
                JsonFieldKey::new("n")
            ),
            (true, false) => run!(
                Processor::bisecting(AtomicBatchHandler(world), sink),
                RecordKey
            ),
            (true, true) => run!(
                Processor::bisecting(AtomicBatchHandler(world), sink),
                JsonFieldKey::new("n")
            ),
        }
    }

    async fn invoke<M: Mode, K: KeyStrategy>(
        &mut self,
        processor: &Processor<M, Sink, Gate<K>>,
        range: std::ops::Range<usize>,
        faults: &DeliveryFaults,
    ) -> Result<Delivered, TestCaseError> {
        let delivery = self.world.delivery.load(Ordering::SeqCst);
        for position in range.clone() {
            self.carried[position] += 1;
        }
        let records: Vec<TestRecord> = self.stream.kinesis[range.clone()]
            .iter()
            .map(|k| k.record.clone())
            .collect();
        let event = event_json(&records);
        let deadline_in = faults.deadline.unwrap_or(NORMAL_DEADLINE);
        let started = Instant::now();
        let invocation = Invocation {
            request_id: format!("delivery-{delivery}"),
            deadline: Some(started + deadline_in),
            deadline_ms: Some(self.clock.now_ms() + deadline_in.as_millis() as i64),
        };
        self.latest_deadline = self.latest_deadline.max(started + deadline_in);
        let crash = Arc::new(Notify::new());
        *self.world.crash.lock().unwrap() = Arc::clone(&crash);
        self.world.effects_this_delivery.store(0, Ordering::SeqCst);
        self.world.crash_after_effects.store(
            faults.crash_after_effects.unwrap_or(usize::MAX),
            Ordering::SeqCst,
        );
        let crash_at = started + faults.crash_at.unwrap_or(Duration::from_secs(24 * 3600));
        let answer = tokio::select! {
            biased;
            report = processor.process(event.as_bytes(), &invocation) => Some(report),
            () = crash.notified() => None,
            () = tokio::time::sleep_until(crash_at) => None,
        };
        self.collect_letters(&processor.dead_letter_sink().inner, delivery)?;
        // The effects of this delivery (every effect before it was seen by earlier deliveries).
        let effected_now: Vec<usize> = self.world.effects.lock().unwrap()[self.effects_seen..]
            .iter()
            .map(|(u, _)| *u)
            .collect();
        self.effects_seen += effected_now.len();
        for &unit in &effected_now {
            self.effected[unit] = true;
        }
        let effected_now: HashSet<usize> = effected_now.into_iter().collect();
        let Some(report) = answer else {
            // Crashed: whatever took effect (or was dead-lettered) in it may not have had its
            // completion written, and may happen once more.
            self.figures.crashes += 1;
            self.figures.effects_in_crashes += effected_now.len() as u64;
            for unit in effected_now {
                self.allowance[unit] += 1;
            }
            let letters: Vec<usize> = self
                .letters
                .by_unit
                .iter()
                .filter(|(_, l)| l.iter().any(|(_, _, d)| *d == delivery))
                .map(|(u, _)| *u)
                .collect();
            for unit in letters {
                self.allowance[unit] += 1;
            }
            return Ok(Delivered::Failed);
        };
        let report = report.map_err(|e| TestCaseError::fail(format!("event rejected: {e}")))?;

        // Outcomes line up with the units of the batch, in stream order.
        let units: Vec<usize> = self.stream.kinesis[range.clone()]
            .iter()
            .flat_map(|k| k.units.clone())
            .collect();
        prop_assert_eq!(report.outcomes.len(), units.len());
        let mut first_unacknowledged = None;
        for (&unit, outcome) in units.iter().zip(&report.outcomes) {
            match outcome {
                Outcome::Processed { .. } if !effected_now.contains(&self.effect_of(unit)) => self
                    .violation(format!(
                        "delivery {delivery}: record {unit} reported processed without an effect"
                    )),
                Outcome::DeadLettered { .. }
                    if !self
                        .letters
                        .by_unit
                        .get(&unit)
                        .is_some_and(|l| l.iter().any(|(_, _, d)| *d == delivery)) =>
                {
                    self.violation(format!(
                        "delivery {delivery}: record {unit} reported dead-lettered without a letter"
                    ));
                }
                Outcome::AlreadyDone if !self.is_settled(self.effect_of(unit)) => {
                    self.violation(format!(
                        "delivery {delivery}: record {unit} reported already done, but it was \
                     neither effected nor dead-lettered"
                    ))
                }
                // The documented window: it took effect (or was dead-lettered), its completion
                // was not written, and it is handed back, so it runs again.
                Outcome::Retryable { reason, .. } if reason.contains("completion not recorded") => {
                    self.figures.completions_not_recorded += 1;
                    self.allowance[unit] += 1;
                }
                _ => {}
            }
            if !outcome.is_acknowledged() && first_unacknowledged.is_none() {
                first_unacknowledged = Some(self.stream.units[unit].kinesis);
            }
        }

        // The response names the lowest sequence number not acknowledged, which is in the batch.
        let checkpoint = match report.response.batch_item_failures.as_slice() {
            [] => range.end,
            [failure] => {
                let Some(&position) = self.position_of.get(&failure.item_identifier) else {
                    return Err(TestCaseError::fail(format!(
                        "reported item {} is not a sequence number of the stream",
                        failure.item_identifier
                    )));
                };
                prop_assert!(range.contains(&position), "reported item outside the batch");
                position
            }
            more => {
                return Err(TestCaseError::fail(format!(
                    "{} item failures: Lambda uses the lowest, we report one",
                    more.len()
                )));
            }
        };
        if checkpoint != first_unacknowledged.unwrap_or(range.end) {
            self.violation(format!(
                "delivery {delivery}: the response checkpoints at position {checkpoint}, but the \
                 first record handed back is at {first_unacknowledged:?}"
            ));
        }
        if faults.lose_response {
            self.figures.lost_responses += 1;
            return Ok(Delivered::Failed);
        }
        // Everything before the checkpoint is acknowledged: it must have taken effect or be in
        // the dead-letter queue.
        for position in range.start..checkpoint {
            for unit in self.stream.kinesis[position].units.clone() {
                if !self.is_settled(self.effect_of(unit)) {
                    self.figures.acknowledged_unsettled += 1;
                    self.violation(format!(
                        "delivery {delivery}: record {unit} ({:?}) acknowledged but neither \
                         effected nor dead-lettered",
                        self.stream.units[unit].kind
                    ));
                }
            }
        }
        Ok(Delivered::Answered { checkpoint })
    }

    /// The record whose effect settles `unit`: its original, for a duplicate.
    fn effect_of(&self, unit: usize) -> usize {
        match self.stream.units[unit].kind {
            Kind::Duplicate { of } => of,
            _ => unit,
        }
    }

    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    fn is_settled(&self, unit: usize) -> bool {
        self.effected[unit] || self.letters.by_unit.contains_key(&unit)
    }

    fn collect_letters(
        &mut self,
        sink: &InMemoryDeadLetterSink,
        delivery: usize,
    ) -> Result<(), TestCaseError> {
        for letter in sink.letters() {
            let sequence = letter["sequenceNumber"].as_str().unwrap_or_default();
            let Some(&position) = self.position_of.get(sequence) else {
                return Err(TestCaseError::fail(format!(
                    "dead letter of unknown {sequence}"
                )));
            };
            let sub = letter["subSequenceNumber"].as_u64();
            let Some(&unit) = self.unit_at.get(&(position, sub)) else {
                return Err(TestCaseError::fail(format!(
                    "dead letter of unknown record {sequence}/{sub:?}"
                )));
            };
            let error_type = letter["error"]["type"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let data = letter["data"].as_str().map(str::to_owned);
            prop_assert_eq!(
                letter["partitionKey"].as_str(),
                Some(self.stream.units[unit].partition_key.as_str())
            );
            self.letters
                .by_unit
                .entry(unit)
                .or_default()
                .push((error_type, data, delivery));
        }
        Ok(())
    }

    /// A record the gate cannot key (a payload key, and no such field to read): it can only be
    /// dead-lettered each time it is delivered.
    fn keyless(&self, kind: Kind) -> bool {
        self.scenario.json_field_key && !matches!(kind, Kind::Good(_) | Kind::Duplicate { .. })
    }

    /// The error type a unit's dead letter must carry.
    fn expected_error_type(&self, kind: Kind) -> Option<&'static str> {
        let json_key = self.scenario.json_field_key;
        match kind {
            Kind::Good(Fault::Poison) => Some("InjectedPoison"),
            Kind::Good(Fault::Panic) => Some("HandlerPanic"),
            Kind::Good(_) | Kind::Duplicate { .. } => None,
            // The payload key is read before the payload is decoded: no key, no record.
            Kind::NotJson | Kind::WrongShape if json_key => Some("IdempotencyKeyMissing"),
            Kind::NotJson => Some("PayloadNotJson"),
            Kind::WrongShape => Some("PayloadWrongShape"),
            Kind::BadBase64 => Some("InvalidBase64"),
            Kind::CorruptAggregate => Some("CorruptKplAggregate"),
        }
    }

    /// The end state: every record settled once (within the window), with its payload, in
    /// order. Counts every broken promise rather than stopping at the first, so the figures say
    /// how many records were lost or repeated.
    fn check_end(&mut self) {
        let effects = self.world.effects.lock().unwrap().clone();
        let mut counts = vec![0u32; self.stream.units.len()];
        for (unit, _) in &effects {
            counts[*unit] += 1;
        }
        let mut found = Vec::new();
        for (unit, record) in self.stream.units.iter().enumerate() {
            let letters = self
                .letters
                .by_unit
                .get(&unit)
                .map_or(&[][..], Vec::as_slice);
            let allowed = 1 + self.allowance[unit];
            if let Kind::Duplicate { of } = record.kind {
                // Settled by its original's effect (or dead letter), never on its own.
                if !letters.is_empty() {
                    found.push(format!(
                        "duplicate {unit} of {of} dead-lettered: {letters:?}"
                    ));
                }
                if counts[unit] > 0 {
                    found.push(format!("duplicate {unit} of {of} took effect as itself"));
                }
                continue;
            }
            match self.expected_error_type(record.kind) {
                None => {
                    // Takes effect; never dead-lettered.
                    if counts[unit] == 0 {
                        self.figures.lost += 1;
                        found.push(format!("record {unit} lost: no effect, no dead letter"));
                        continue;
                    }
                    if !letters.is_empty() {
                        found.push(format!("good record {unit} dead-lettered: {letters:?}"));
                    }
                    if counts[unit] > allowed {
                        self.figures.duplicated += 1;
                        found.push(format!(
                            "record {unit} took effect {} times (allowed {allowed})",
                            counts[unit]
                        ));
                    }
                    self.figures.effected += 1;
                    self.figures.repeats_in_window += u64::from(counts[unit].min(allowed) - 1);
                }
                Some(error_type) => {
                    if counts[unit] > 0 {
                        found.push(format!("record {unit} ({:?}) took effect", record.kind));
                    }
                    if letters.is_empty() {
                        self.figures.lost += 1;
                        found.push(format!(
                            "record {unit} ({:?}) lost: no dead letter",
                            record.kind
                        ));
                        continue;
                    }
                    let keyless = self.keyless(record.kind);
                    let allowed = if keyless {
                        self.carried[record.kinesis]
                    } else {
                        allowed
                    };
                    if letters.len() as u32 > allowed {
                        self.figures.duplicated += 1;
                        found.push(format!(
                            "record {unit} ({:?}) dead-lettered {} times (allowed {allowed})",
                            record.kind,
                            letters.len()
                        ));
                    }
                    let payload = match record.sub {
                        // A whole record: `kinesis.data` as delivered.
                        None => self.stream.kinesis[record.kinesis]
                            .record
                            .data_field
                            .clone(),
                        Some(_) => base64_simd::STANDARD.encode_to_string(&record.payload),
                    };
                    for (got_type, data, _) in letters {
                        if got_type != error_type || data.as_deref() != Some(payload.as_str()) {
                            found.push(format!(
                                "record {unit}: dead letter {got_type} with data {data:?}, \
                                 expected {error_type} with {payload:?}"
                            ));
                        }
                    }
                    self.figures.dead_lettered += 1;
                    let repeats = letters.len().min(allowed as usize) as u64 - 1;
                    if keyless {
                        self.figures.keyless_dead_letter_repeats += repeats;
                    } else {
                        self.figures.dead_letter_repeats_in_window += repeats;
                    }
                }
            }
        }
        // Per partition key, first effects in stream order. A duplicate under another key than
        // its original's settles as its original does, so its own key's later records may take
        // effect only once the original has (an original that can only be dead-lettered holds
        // nothing back).
        let mut held_by: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
        for (unit, u) in self.stream.units.iter().enumerate() {
            if let Kind::Duplicate { of } = u.kind
                && self.stream.units[of].partition_key != u.partition_key
                && !matches!(
                    self.stream.units[of].kind,
                    Kind::Good(Fault::Poison | Fault::Panic)
                )
            {
                held_by
                    .entry(u.partition_key.as_str())
                    .or_default()
                    .push((unit, of));
            }
        }
        let mut seen = vec![false; self.stream.units.len()];
        let mut last_by_key: BTreeMap<&str, usize> = BTreeMap::new();
        for (unit, _) in &effects {
            if seen[*unit] {
                continue;
            }
            let key = self.stream.units[*unit].partition_key.as_str();
            for &(duplicate, of) in held_by.get(key).map(Vec::as_slice).unwrap_or_default() {
                if duplicate < *unit && !seen[of] {
                    self.figures.out_of_order += 1;
                    found.push(format!(
                        "key {key}: record {unit} took effect before record {of}, which its \
                         earlier record {duplicate} duplicates"
                    ));
                }
            }
            seen[*unit] = true;
            if let Some(previous) = last_by_key.insert(key, *unit)
                && previous > *unit
            {
                self.figures.out_of_order += 1;
                found.push(format!(
                    "key {key}: record {unit} took effect after record {previous}"
                ));
            }
        }
        self.violations.extend(found);
    }
}

impl Scenario {
    fn bisect_handler(&self) -> bool {
        // Set per test (per-record or bisecting), through the seed's top bit.
        self.seed >> 63 == 1
    }
}

/// Drive one case to its end; its figures, and the promises it saw broken.
fn run_case(
    scenario: &Scenario,
    sabotage: Sabotage,
) -> Result<(Figures, Vec<String>), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut rng = StdRng::seed_from_u64(scenario.seed);
        let stream = build_stream(scenario, &mut rng);
        let world = Arc::new(World::new(stream.units.clone(), sabotage));
        let mut unit_at = HashMap::new();
        for (i, unit) in stream.units.iter().enumerate() {
            unit_at.insert((unit.kinesis, unit.sub), i);
        }
        let position_of = stream
            .kinesis
            .iter()
            .enumerate()
            .map(|(i, k)| (k.record.sequence_number.clone(), i))
            .collect();
        let mut driver = Driver {
            scenario,
            stream: &stream,
            world: Arc::clone(&world),
            store: Arc::new(InMemoryIdempotencyStore::new()),
            clock: TokioClock {
                base_ms: 1_800_000_000_000,
                base: Instant::now(),
            },
            unit_at,
            position_of,
            letters: Letters::default(),
            allowance: vec![0; stream.units.len()],
            carried: vec![0; stream.kinesis.len()],
            figures: Figures::default(),
            latest_deadline: Instant::now(),
            sabotage,
            violations: Vec::new(),
            effects_seen: 0,
            effected: vec![false; stream.units.len()],
        };
        let figures = &mut driver.figures;
        figures.cases = 1;
        figures.kinesis_records = stream.kinesis.len() as u64;
        figures.records = stream.units.len() as u64;
        for unit in &stream.units {
            match unit.kind {
                Kind::Good(Fault::None) => {}
                Kind::Good(fault) => {
                    figures.handler_faults += 1;
                    match fault {
                        Fault::Poison => figures.poison += 1,
                        Fault::Panic => figures.panics += 1,
                        Fault::Slow { .. } => figures.slow += 1,
                        Fault::Retryable { .. } => figures.retryable += 1,
                        Fault::None => {}
                    }
                }
                Kind::Duplicate { .. } => figures.duplicates_sent += 1,
                _ => figures.undecodable += 1,
            }
        }

        let total = stream.kinesis.len();
        let mut checkpoint = 0;
        // Ends of the halves Lambda is working through after bisecting a failed batch.
        let mut halves: Vec<usize> = Vec::new();
        let mut delivery = 0;
        while checkpoint < total {
            let faulty = delivery < scenario.faulty_deliveries;
            if delivery == scenario.faulty_deliveries {
                // Faults are over. Locks of crashed invocations expire at their deadlines;
                // Lambda's next try after a timeout comes after it anyway.
                tokio::time::sleep_until(driver.latest_deadline + Duration::from_secs(2)).await;
            }
            let faults = if faulty {
                draw_delivery_faults(&mut rng)
            } else {
                DeliveryFaults::default()
            };
            if faulty {
                let f = &mut driver.figures;
                f.faulty_deliveries += 1;
                f.store_faults += faults.store.len() as u64;
                f.sink_faults += faults.sink.len() as u64;
                f.short_deadlines += u64::from(faults.deadline.is_some());
            }
            world.faulty.store(faulty, Ordering::SeqCst);
            world.delivery.store(delivery, Ordering::SeqCst);
            let end = halves
                .last()
                .copied()
                .unwrap_or(total)
                .min(checkpoint + scenario.batch_size);
            let range = checkpoint..end;
            driver.figures.deliveries += 1;
            match driver.deliver(range.clone(), &faults).await? {
                Delivered::Answered { checkpoint: next } => {
                    prop_assert!(
                        faulty || next == range.end,
                        "a delivery without faults handed records back (from position {} of {:?})",
                        next,
                        range
                    );
                    checkpoint = next;
                    while halves.last().is_some_and(|&h| h <= checkpoint) {
                        halves.pop();
                    }
                }
                Delivered::Failed => {
                    prop_assert!(faulty, "a delivery without faults failed");
                    if scenario.bisect_on_function_error && range.len() > 1 {
                        halves.push(range.start + range.len().div_ceil(2));
                        driver.figures.bisected_by_lambda += 1;
                    }
                    // After a timeout Lambda retries once the invocation is over.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            delivery += 1;
        }
        driver.check_end();
        Ok((driver.figures, driver.violations))
    })
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Panics are injected on purpose; print only the ones that are not.
fn quiet_injected_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let injected = info
                .payload()
                .downcast_ref::<String>()
                .is_some_and(|m| m.starts_with("injected panic"));
            if !injected {
                default(info);
            }
        }));
    });
}

/// Run `cases` generated cases of one mode; print the figures; the first failure, if any.
fn run_suite(
    bisecting: bool,
    sabotage: Sabotage,
    cases: u32,
    max_records: usize,
) -> (Figures, Result<(), String>) {
    quiet_injected_panics();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        // A sabotaged run only has to fail; shrinking it would only take time.
        max_shrink_iters: if sabotage == Sabotage::None { 256 } else { 0 },
        ..Config::default()
    });
    let totals = Mutex::new(Figures::default());
    let started = std::time::Instant::now();
    let strategy = scenario(max_records).prop_map(move |mut s| {
        // The top bit of the seed tells the mode.
        s.seed = (s.seed >> 1) | (u64::from(bisecting) << 63);
        s
    });
    let result = runner.run(&strategy, |s| {
        let (figures, violations) = run_case(&s, sabotage)?;
        totals.lock().unwrap().add(&figures);
        if violations.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = violations.iter().take(5).map(String::as_str).collect();
        Err(TestCaseError::fail(format!(
            "{} broken promises, the first: {}",
            violations.len(),
            shown.join("; ")
        )))
    });
    let f = totals.into_inner().unwrap();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} mode{}: {} cases ({} streams run, shrinking included) in {:.1} s, batches of up to {} records",
        if bisecting { "bisecting" } else { "per-record" },
        match sabotage {
            Sabotage::None => String::new(),
            other => format!(", sabotaged ({other:?})"),
        },
        cases,
        f.cases,
        started.elapsed().as_secs_f64(),
        max_records
    );
    let _ = writeln!(
        out,
        "  stream: {} Kinesis records, {} records (KPL user records counted), {} undecodable, {} repeating an earlier record's payload key",
        f.kinesis_records, f.records, f.undecodable, f.duplicates_sent
    );
    let _ = writeln!(
        out,
        "  deliveries: {} ({} with faults; {} crashed, {} answers lost, {} bisected by Lambda, {} short deadlines)",
        f.deliveries,
        f.faulty_deliveries,
        f.crashes,
        f.lost_responses,
        f.bisected_by_lambda,
        f.short_deadlines
    );
    let _ = writeln!(
        out,
        "  faults: {} handler ({} retryable, {} slow, {} poison, {} panics), {} store, {} dead-letter sink",
        f.handler_faults, f.retryable, f.slow, f.poison, f.panics, f.store_faults, f.sink_faults
    );
    let _ = writeln!(
        out,
        "  the documented window opened: {} effects in invocations that crashed, {} completion writes failed (records handed back)",
        f.effects_in_crashes, f.completions_not_recorded
    );
    let _ = writeln!(
        out,
        "  end: {} effected, {} dead-lettered; repeats inside the documented window: {} effects, {} dead letters; {} dead letters repeated for records without a payload key",
        f.effected,
        f.dead_lettered,
        f.repeats_in_window,
        f.dead_letter_repeats_in_window,
        f.keyless_dead_letter_repeats
    );
    let _ = writeln!(
        out,
        "  records lost: {}, effects duplicated: {}, acknowledged unsettled: {}, out of order: {}",
        f.lost, f.duplicated, f.acknowledged_unsettled, f.out_of_order
    );
    println!("{out}");
    (f, result.map_err(|e| e.to_string()))
}

fn suite(bisecting: bool) {
    let cases = env_number("PROPTEST_CASES", 256) as u32;
    let max_records = env_number("SHARDWISE_PROP_MAX_RECORDS", 300);
    let (figures, result) = run_suite(bisecting, Sabotage::None, cases, max_records);
    if let Err(error) = result {
        panic!("{error}");
    }
    assert_eq!(figures.lost, 0);
    assert_eq!(figures.duplicated, 0);
}

#[test]
fn per_record_processor_under_faults_loses_and_repeats_nothing() {
    suite(false);
}

#[test]
fn bisecting_processor_under_faults_loses_and_repeats_nothing() {
    suite(true);
}

/// The checks themselves: each deliberate defect must be caught, and counted.
#[test]
fn the_checks_catch_deliberate_defects() {
    let cases = 48;
    let (f, result) = run_suite(false, Sabotage::ForgetfulGate, cases, 60);
    assert!(result.is_err() && f.duplicated > 0, "forgetful gate: {f:?}");
    let (f, result) = run_suite(true, Sabotage::SilentSettle, cases, 60);
    // A gate that writes no settlements shows one of two ways, depending on the case drawn:
    // with record keys the redelivered records take effect again; with payload keys their
    // claims are never released, so a later fault-free delivery still hands them back.
    let stalled = result
        .as_ref()
        .is_err_and(|e| e.contains("a delivery without faults handed records back"));
    assert!(
        result.is_err() && (f.duplicated > 0 || stalled),
        "silent settle: {f:?} {result:?}"
    );
    let (f, result) = run_suite(false, Sabotage::LyingSink, cases, 60);
    assert!(result.is_err() && f.lost > 0, "lying sink: {f:?}");
    let (f, result) = run_suite(true, Sabotage::ReversedBatches, cases, 60);
    assert!(
        result.is_err() && f.out_of_order > 0,
        "reversed batches: {f:?}"
    );
}
