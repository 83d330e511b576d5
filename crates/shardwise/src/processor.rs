//! The batch processor: from event bytes to the partial batch response.
//!
//! One invocation goes through these steps, each once per batch:
//!
//! 1. parse the event in place and decode every payload ([`crate::event`]);
//! 2. ask the gate (idempotency) which records need running ([`crate::gate`]);
//! 3. decode typed payloads — a record that does not decode is a permanent failure (per record
//!    just before its handler runs; all up front for a batch handler, which needs them together);
//! 4. run the handler: per record, in order per partition key, keys concurrently
//!    ([`PerRecord`]); or per batch, bisecting on permanent failure ([`Bisecting`]);
//! 5. dead-letter permanent failures, with their payload ([`crate::dead_letter`]);
//! 6. tell the gate how records settled;
//! 7. answer with the lowest sequence number Lambda must redeliver.
//!
//! Every record ends in exactly one [`Outcome`]; while it is being processed it is in an
//! internal state, which also has the states that never leave the processor (pending,
//! permanent but not yet dead-lettered, a duplicate of an earlier record). Only three outcomes
//! acknowledge a record —
//! processed, already done, dead-lettered — everything else is reported back to Lambda, so a
//! record is never lost to an error, a full dead-letter queue or a deadline.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::clock::{Clock, SystemClock};
use crate::dead_letter::{
    DeadLetter, DeadLetterError, DeadLetterPublisher, DeadLetterSink, PublishError,
};
use crate::event::{DecodedBatch, EventError, EventRecord, KinesisEvent, parse_event};
use crate::gate::{Admission, GateContext, NoGate, RecordGate, Settlement};
use crate::handler::{BatchHandler, HandlerError, RecordHandler, TypedRecord};
use crate::metrics::{EmfDocument, Unit};
use crate::metrics::{MetricsWriter, StdoutMetrics};
use crate::payload::{FromRecordData, PayloadError};
use crate::record::{Record, SequenceNumber};
use crate::response::BatchResponse;
use crate::retry::{ExponentialBackoff, retry};

/// Settings that do not change between invocations.
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    /// The function's name, written into dead letters and metrics.
    pub function_name: String,
    /// Partition keys handled at the same time (records of one key are always sequential).
    /// Handlers are usually I/O-bound, so this exceeds the 1–2 vCPUs a Lambda has.
    pub max_concurrency: usize,
    /// Time kept free before the deadline: no record starts after `deadline - margin`, running
    /// handlers are abandoned at `deadline - 4/5 margin`, dead letters stop at `deadline - 7/10
    /// margin`, and the rest is for the gate's settlement (until its own margin) and the
    /// response. Never more than half the time the invocation has.
    pub deadline_margin: Duration,
    /// CloudWatch namespace of the invocation's EMF metrics.
    pub metrics_namespace: String,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            function_name: "shardwise".to_owned(),
            max_concurrency: 8,
            deadline_margin: Duration::from_millis(1000),
            metrics_namespace: "Shardwise".to_owned(),
        }
    }
}

/// What the processor needs to know about one invocation.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub request_id: String,
    /// The deadline on tokio's clock (so tests can pause time), if there is one.
    pub deadline: Option<Instant>,
    /// The same deadline in epoch milliseconds (for lock expiries written to stores).
    pub deadline_ms: Option<i64>,
}

impl Invocation {
    /// An invocation whose deadline is `deadline_ms` (epoch ms, as Lambda's context gives it),
    /// placed on tokio's clock by comparing it with `clock`.
    pub fn with_deadline_ms(
        request_id: impl Into<String>,
        deadline_ms: i64,
        clock: &impl Clock,
    ) -> Self {
        let remaining = u64::try_from(deadline_ms.saturating_sub(clock.now_ms())).unwrap_or(0);
        Self {
            request_id: request_id.into(),
            deadline: Some(Instant::now() + Duration::from_millis(remaining)),
            deadline_ms: Some(deadline_ms),
        }
    }

    /// An invocation without a deadline (tools, tests).
    pub fn unbounded(request_id: impl Into<String>) -> Self {
        Self {
            request_id: request_id.into(),
            deadline: None,
            deadline_ms: None,
        }
    }
}

/// How one record ended: what the report tells a caller. Only the first three acknowledge it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler succeeded.
    Processed { attempts: u32 },
    /// An earlier delivery already took effect (idempotency).
    AlreadyDone,
    /// Dead-lettered with its payload.
    DeadLettered {
        error: DeadLetterError,
        attempts: u32,
    },
    /// Failed in a way that may pass later (or could not be dead-lettered, or its settlement
    /// not recorded); handed back to Lambda.
    Retryable { reason: String, attempts: u32 },
    /// Not started before the deadline cut-off; handed back to Lambda.
    NotStarted,
    /// Not run because an earlier record of its partition key failed (or, for a duplicate, its
    /// first occurrence was handed back); handed back to Lambda.
    Blocked,
}

impl Outcome {
    /// Whether Lambda may consider the record done.
    pub fn is_acknowledged(&self) -> bool {
        matches!(
            self,
            Self::Processed { .. } | Self::AlreadyDone | Self::DeadLettered { .. }
        )
    }
}

/// The states a record passes through inside the processor. Public only as the currency of
/// [`Mode`], whose implementations live here; users see the final [`Outcome`].
mod state {
    use crate::dead_letter::DeadLetterError;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum RecordState {
        /// Not decided yet.
        Pending,
        Processed {
            attempts: u32,
        },
        AlreadyDone,
        /// Will never succeed; to be dead-lettered.
        Permanent {
            error: DeadLetterError,
            attempts: u32,
        },
        DeadLettered {
            error: DeadLetterError,
            attempts: u32,
        },
        Retryable {
            reason: String,
            attempts: u32,
        },
        NotStarted,
        Blocked,
        /// Same idempotency key as the record at this position; settles as it does.
        DuplicateOf(usize),
    }

    impl RecordState {
        pub(super) fn is_acknowledged(&self) -> bool {
            matches!(
                self,
                Self::Processed { .. } | Self::AlreadyDone | Self::DeadLettered { .. }
            )
        }

        pub(super) fn blocks_key(&self) -> bool {
            matches!(
                self,
                Self::Retryable { .. } | Self::NotStarted | Self::Blocked
            )
        }
    }
}

use state::RecordState;

/// Record counts of one invocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub records: usize,
    pub processed: usize,
    pub already_done: usize,
    pub dead_lettered: usize,
    pub retryable: usize,
    pub not_started: usize,
    pub blocked: usize,
}

impl Counts {
    /// Records handed back to Lambda.
    pub fn failed(&self) -> usize {
        self.retryable + self.not_started + self.blocked
    }
}

/// Everything an invocation produced: the response for Lambda and what to measure.
#[derive(Debug, Clone)]
pub struct BatchReport {
    pub response: BatchResponse,
    pub counts: Counts,
    /// Handler calls made (records, or batches when bisecting).
    pub handler_calls: u32,
    /// Age of the oldest record at the start of the invocation.
    pub max_record_age_ms: Option<i64>,
    pub duration: Duration,
    /// Each record's outcome, in stream order (KPL user records in place of their aggregate).
    pub outcomes: Vec<Outcome>,
}

impl BatchReport {
    /// The invocation's metrics as one EMF line's document.
    pub fn metrics(&self, namespace: &str, function_name: &str) -> EmfDocument {
        let mut doc = EmfDocument::new(namespace)
            .dimension("FunctionName", function_name)
            .metric(
                "RecordsProcessed",
                Unit::Count,
                self.counts.processed as f64,
            )
            .metric("RecordsFailed", Unit::Count, self.counts.failed() as f64)
            .metric(
                "RecordsDeadLettered",
                Unit::Count,
                self.counts.dead_lettered as f64,
            )
            .metric(
                "RecordsAlreadyDone",
                Unit::Count,
                self.counts.already_done as f64,
            )
            .metric(
                "BatchDuration",
                Unit::Milliseconds,
                self.duration.as_secs_f64() * 1000.0,
            );
        if let Some(age) = self.max_record_age_ms {
            doc = doc.metric("MaxRecordAge", Unit::Milliseconds, age as f64);
        }
        doc
    }
}

/// What a layer above the processor knows about a batch that the gate and the handlers do not:
/// which records it already accounts for, and whether each record's effect was kept. The
/// tumbling-window layer is one: a record's effect is its contribution to the window state,
/// which Lambda commits only with the response, and only for records before the checkpoint.
pub(crate) trait Settling: Send {
    /// Records already accounted for elsewhere (folded into the incoming window state):
    /// acknowledged without running, and settled as done if the gate admitted them.
    fn accounted(&self, _record: &Record<'_>) -> bool {
        false
    }

    /// Called after the handlers ran and failures were dead-lettered, before the gate is told:
    /// how each record settles, given how it ended so far.
    fn settle_as<'r>(
        &'r mut self,
        records: &'r [Record<'_>],
        settled: &'r [Settled],
    ) -> impl Future<Output = Vec<Keep>> + Send + 'r;
}

/// How a record ended before settlement, as a [`Settling`] layer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    Processed,
    AlreadyDone,
    DeadLettered,
    /// To be redelivered (failed, not started, blocked).
    HandedBack,
}

impl Settled {
    fn of(state: &RecordState) -> Self {
        match state {
            RecordState::Processed { .. } => Self::Processed,
            RecordState::AlreadyDone => Self::AlreadyDone,
            RecordState::DeadLettered { .. } => Self::DeadLettered,
            _ => Self::HandedBack,
        }
    }
}

/// How a record that ran settles with the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// As the processor decided: done if acknowledged, released if handed back.
    AsDecided,
    /// Its effect is durable elsewhere (the window state Lambda commits with the response): it
    /// stays acknowledged even when its completion cannot be written.
    Durable { write_completion: bool },
    /// Its effect was dropped and will be redone when Lambda redelivers it: released, even
    /// though it is acknowledged so far.
    Dropped,
}

/// The plain processor: every effect happens in the handler and is kept.
pub(crate) struct KeepAll;

impl Settling for KeepAll {
    fn settle_as<'r>(
        &'r mut self,
        records: &'r [Record<'_>],
        _: &'r [Settled],
    ) -> impl Future<Output = Vec<Keep>> + Send + 'r {
        std::future::ready(vec![Keep::AsDecided; records.len()])
    }
}

/// Cut-off times derived from the deadline.
#[derive(Debug, Clone, Copy)]
pub struct Cutoffs {
    /// No handler starts after this.
    pub start: Option<Instant>,
    /// Running handlers are abandoned at this.
    pub abandon: Option<Instant>,
    /// Dead-letter retries stop before this.
    pub publish: Option<Instant>,
}

impl Cutoffs {
    fn new(deadline: Option<Instant>, margin: Duration) -> Self {
        let Some(deadline) = deadline else {
            return Self {
                start: None,
                abandon: None,
                publish: None,
            };
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let margin = margin.min(remaining / 2);
        // Handlers stop first, then dead letters, leaving the gate's settlement (which stops
        // at its own margin, half of this one by default) and the response the rest.
        Self {
            start: Some(deadline - margin),
            abandon: Some(deadline - margin * 4 / 5),
            publish: Some(deadline - margin * 7 / 10),
        }
    }

    fn past_start(&self) -> bool {
        self.start.is_some_and(|start| Instant::now() >= start)
    }
}

/// What a [`Mode`] is given to run handlers.
#[derive(Debug)]
pub struct RunContext<'a> {
    pub retry: &'a ExponentialBackoff,
    pub cutoffs: Cutoffs,
    pub max_concurrency: usize,
}

/// A way of running the handler over a batch: [`PerRecord`] or [`Bisecting`].
pub trait Mode: Send + Sync {
    /// Decide the outcome of every `Pending` record (others are already decided and must be
    /// left alone, but a failed one blocks later records of its key). Returns handler calls.
    fn execute<'a, 'd>(
        &'a self,
        records: &'a [Record<'d>],
        outcomes: &'a mut [RecordState],
        context: &'a RunContext<'a>,
    ) -> impl Future<Output = u32> + Send + 'a;
}

/// Runs a [`RecordHandler`] on each record.
#[derive(Debug, Clone)]
pub struct PerRecord<H>(pub H);

/// Runs a [`BatchHandler`] on the whole batch, bisecting it on permanent failure until the
/// poison records are isolated.
#[derive(Debug, Clone)]
pub struct Bisecting<H>(pub H);

/// Decode payloads of pending records; a record that does not decode becomes permanent.
fn decode_payloads<'d, P: FromRecordData<'d>>(
    records: &[Record<'d>],
    outcomes: &mut [RecordState],
) -> Vec<Option<P>> {
    records
        .iter()
        .zip(outcomes.iter_mut())
        .map(|(record, outcome)| {
            if *outcome != RecordState::Pending {
                return None;
            }
            match P::from_record_data(record.data) {
                Ok(payload) => Some(payload),
                Err(error) => {
                    *outcome = undecodable(record, &error);
                    None
                }
            }
        })
        .collect()
}

/// The state of a record whose payload does not decode: permanent, never attempted.
fn undecodable(record: &Record<'_>, error: &PayloadError) -> RecordState {
    RecordState::Permanent {
        error: DeadLetterError {
            error_type: error.kind.as_str().to_owned(),
            message: format!("record {}: {error}", record.id()),
        },
        attempts: 0,
    }
}

/// The outcome of a handler error after retries.
fn failed(error: &HandlerError, attempts: u32) -> RecordState {
    if error.is_retryable() {
        RecordState::Retryable {
            reason: format!("{}: {error}", error.error_type()),
            attempts,
        }
    } else {
        RecordState::Permanent {
            error: DeadLetterError {
                error_type: error.error_type().to_owned(),
                message: error.to_string(),
            },
            attempts,
        }
    }
}

/// Await a handler future, turning a panic into a permanent error and the abandon cut-off into
/// a retryable one (its effect may or may not have happened; idempotency covers a rerun).
async fn guarded(
    future: impl Future<Output = Result<(), HandlerError>>,
    abandon: Option<Instant>,
) -> Result<(), HandlerError> {
    let caught = AssertUnwindSafe(future).catch_unwind();
    let result = match abandon {
        Some(at) => match tokio::time::timeout_at(at, caught).await {
            Ok(result) => result,
            Err(_) => {
                return Err(HandlerError::retryable(DeadlineExceeded).with_type("DeadlineExceeded"));
            }
        },
        None => caught.await,
    };
    match result {
        Ok(result) => result,
        Err(panic) => {
            let message =
                panic_message(panic.as_ref()).unwrap_or_else(|| "handler panicked".to_owned());
            Err(
                HandlerError::permanent(format!("handler panicked: {message}"))
                    .with_type("HandlerPanic"),
            )
        }
    }
}

/// A handler abandoned at the deadline margin: its effect may or may not have happened. A typed
/// marker (as tower's `Elapsed`), so that what a handler names its own errors never changes how
/// they are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("handler still running at the invocation's deadline margin")]
pub struct DeadlineExceeded;

/// The message a panic carries, when it is text (`panic!("…")` and `panic!("{x}")` both are).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> Option<String> {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
}

/// Whether another attempt is allowed: a handler abandoned at the deadline gets none.
fn worth_retrying(error: &HandlerError) -> bool {
    error.is_retryable() && !error.source_error().is::<DeadlineExceeded>()
}

impl<H> Mode for PerRecord<H>
where
    H: for<'d> RecordHandler<'d>,
{
    async fn execute<'a, 'd>(
        &'a self,
        records: &'a [Record<'d>],
        outcomes: &'a mut [RecordState],
        context: &'a RunContext<'a>,
    ) -> u32 {
        let lanes = Lanes::new(records, outcomes);
        let before: &[RecordState] = outcomes;
        let handler = &self.0;
        // A fixed pool of workers, each taking the next lane and running it to its end: at most
        // `max_concurrency` keys in flight, lanes started in order of first appearance, and no
        // allocation per lane. Workers run interleaved on this task (not spawned), so records
        // stay borrowed. Each record's outcome is decided by its own lane only.
        let next_lane = std::sync::Mutex::new(lanes.heads());
        let worker = || async {
            let mut decided: Vec<(usize, RecordState)> = Vec::new();
            let mut calls = 0u32;
            loop {
                let Some(head) = lock(&next_lane).next() else {
                    break;
                };
                // The keys of this lane held back so far: one, unless a duplicate joined keys.
                let mut blocked: Vec<&str> = Vec::new();
                for index in lanes.lane(head) {
                    let record = &records[index];
                    let current = &before[index];
                    if *current != RecordState::Pending {
                        let holds = match *current {
                            // Settles as its first occurrence, decided earlier in this lane.
                            RecordState::DuplicateOf(first) => decided
                                .iter()
                                .rev()
                                .find(|(i, _)| *i == first)
                                .map_or(&before[first], |(_, state)| state)
                                .blocks_key(),
                            ref other => other.blocks_key(),
                        };
                        if holds {
                            blocked.push(record.partition_key);
                        }
                        continue;
                    }
                    // Decoded here, not all up front: one payload per worker is live, hot in
                    // cache, instead of a vector of them (~2 MB for 3,000 records of a 25-field
                    // struct) that can push an invocation's heap past glibc's trim threshold,
                    // so that every invocation hands its memory back and faults it in again.
                    // Decoded before the checks below: a payload that does not decode is
                    // dead-lettered even behind a blocked record or past the start cut-off.
                    let payload =
                        match <H as RecordHandler<'d>>::Payload::from_record_data(record.data) {
                            Ok(payload) => payload,
                            Err(error) => {
                                decided.push((index, undecodable(record, &error)));
                                continue;
                            }
                        };
                    let outcome = if blocked.contains(&record.partition_key) {
                        RecordState::Blocked
                    } else if context.cutoffs.past_start() {
                        RecordState::NotStarted
                    } else {
                        let payload = &payload;
                        let attempted =
                            retry(context.retry, context.cutoffs.start, worth_retrying, || {
                                calls += 1;
                                guarded(handler.handle(record, payload), context.cutoffs.abandon)
                            })
                            .await;
                        match attempted.result {
                            Ok(()) => RecordState::Processed {
                                attempts: attempted.attempts,
                            },
                            Err(error) => {
                                warn!(shard = record.shard_id, sequence_number = %record.sequence_number,
                                    sub_sequence_number = record.sub_sequence_number,
                                    error_type = error.error_type(), attempts = attempted.attempts,
                                    "record failed: {error}");
                                failed(&error, attempted.attempts)
                            }
                        }
                    };
                    if outcome.blocks_key() {
                        blocked.push(record.partition_key);
                    }
                    decided.push((index, outcome));
                }
            }
            (decided, calls)
        };
        let workers = context.max_concurrency.clamp(1, lanes.count().max(1));
        let results = futures::future::join_all((0..workers).map(|_| worker())).await;
        let mut calls = 0;
        for (decided, worker_calls) in results {
            calls += worker_calls;
            for (index, outcome) in decided {
                outcomes[index] = outcome;
            }
        }
        calls
    }
}

/// The root of `key` in a union-find forest, halving paths on the way.
fn find(parent: &mut [u32], mut key: u32) -> u32 {
    while let Some(&up) = parent.get(key as usize) {
        if up == key {
            break;
        }
        let grand = parent.get(up as usize).copied().unwrap_or(up);
        parent[key as usize] = grand;
        key = grand;
    }
    key
}

fn lock<'m, T>(mutex: &'m std::sync::Mutex<T>) -> std::sync::MutexGuard<'m, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<H> Mode for Bisecting<H>
where
    H: for<'d> BatchHandler<'d>,
{
    async fn execute<'a, 'd>(
        &'a self,
        records: &'a [Record<'d>],
        outcomes: &'a mut [RecordState],
        context: &'a RunContext<'a>,
    ) -> u32 {
        let payloads = decode_payloads::<<H as BatchHandler<'d>>::Payload>(records, outcomes);
        let mut blocked_keys: Vec<&str> = Vec::new();
        let mut eligible = Vec::new();
        // A duplicate of a record of another key settles as that record does, so its own key's
        // later records wait until it is known whether it holds them back: they run in a later
        // round. `gates` are such duplicates and their first occurrences.
        let mut gates: Vec<(usize, usize)> = Vec::new();
        let mut held = Vec::new();
        for (index, outcome) in outcomes.iter().enumerate() {
            let key = records[index].partition_key;
            if let RecordState::DuplicateOf(first) = *outcome
                && records.get(first).is_some_and(|f| f.partition_key != key)
            {
                gates.push((index, first));
            }
            if outcome.blocks_key() {
                blocked_keys.push(key);
            } else if *outcome == RecordState::Pending {
                if gates
                    .iter()
                    .any(|&(dup, _)| records[dup].partition_key == key)
                {
                    held.push(index);
                } else {
                    eligible.push(index);
                }
            }
        }
        let mut calls = 0;
        let mut round = Some(eligible);
        while let Some(eligible) = round.take() {
            // Depth first, left half first: the stack keeps stream order across halves, so a key
            // blocked in the left half is known before the right half runs.
            let mut stack = vec![eligible];
            while let Some(group) = stack.pop() {
                let mut group_records = Vec::with_capacity(group.len());
                for index in group {
                    if blocked_keys.contains(&records[index].partition_key) {
                        outcomes[index] = RecordState::Blocked;
                    } else if context.cutoffs.past_start() {
                        outcomes[index] = RecordState::NotStarted;
                        blocked_keys.push(records[index].partition_key);
                    } else {
                        group_records.push(index);
                    }
                }
                if group_records.is_empty() {
                    continue;
                }
                let batch: Vec<TypedRecord<'_, 'd, _>> = group_records
                    .iter()
                    .filter_map(|&i| {
                        payloads[i].as_ref().map(|payload| TypedRecord {
                            record: &records[i],
                            payload,
                        })
                    })
                    .collect();
                let attempted = retry(context.retry, context.cutoffs.start, worth_retrying, || {
                    calls += 1;
                    guarded(self.0.handle_batch(&batch), context.cutoffs.abandon)
                })
                .await;
                match attempted.result {
                    Ok(()) => {
                        for &i in &group_records {
                            outcomes[i] = RecordState::Processed {
                                attempts: attempted.attempts,
                            };
                        }
                    }
                    Err(error) if !error.is_retryable() && group_records.len() > 1 => {
                        debug!(
                            size = group_records.len(),
                            "batch failed permanently: bisecting"
                        );
                        let right = group_records.split_off(group_records.len() / 2);
                        stack.push(right);
                        stack.push(group_records);
                    }
                    Err(error) => {
                        let outcome = failed(&error, attempted.attempts);
                        for &i in &group_records {
                            let record = &records[i];
                            warn!(shard = record.shard_id, sequence_number = %record.sequence_number,
                            error_type = error.error_type(), "record failed: {error}");
                            if outcome.blocks_key() {
                                blocked_keys.push(record.partition_key);
                            }
                            outcomes[i] = outcome.clone();
                        }
                    }
                }
            }
            round = next_round(records, outcomes, &gates, &mut held, &mut blocked_keys);
        }
        for index in held {
            outcomes[index] = RecordState::Blocked;
        }
        calls
    }
}

/// The held records that can run now: those whose key's duplicates (`gates`) all have a decided
/// first occurrence that does not hold the key back. A record behind a duplicate whose first
/// occurrence was handed back is blocked, and its key with it. `None` when nothing can move.
fn next_round<'r>(
    records: &[Record<'r>],
    outcomes: &mut [RecordState],
    gates: &[(usize, usize)],
    held: &mut Vec<usize>,
    blocked_keys: &mut Vec<&'r str>,
) -> Option<Vec<usize>> {
    let mut ready = Vec::new();
    let mut moved = false;
    held.retain(|&index| {
        let key = records[index].partition_key;
        let mut waiting = false;
        let mut holds = blocked_keys.contains(&key);
        for &(dup, first) in gates {
            if dup < index && records[dup].partition_key == key {
                match &outcomes[first] {
                    RecordState::Pending => waiting = true,
                    state => holds |= state.blocks_key(),
                }
            }
        }
        if waiting && !holds {
            return true;
        }
        moved = true;
        if holds {
            outcomes[index] = RecordState::Blocked;
            blocked_keys.push(key);
        } else {
            ready.push(index);
        }
        false
    });
    (moved && !ready.is_empty()).then_some(ready)
}

/// Record positions grouped by partition key, as linked lists through the batch: a few
/// allocations per batch however many keys there are. A record that duplicates an earlier one
/// of another key (the same idempotency key) joins their keys into one lane, so that whether the
/// duplicate holds its key back is known, in stream order, before its key's later records run.
struct Lanes {
    /// First record of each lane, lanes in order of first appearance.
    heads: Vec<u32>,
    /// The next record of the same lane, or `u32::MAX`.
    next: Vec<u32>,
}

impl Lanes {
    fn new(records: &[Record<'_>], states: &[RecordState]) -> Self {
        const END: u32 = u32::MAX;
        let mut ids: HashMap<&str, u32, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(records.len().min(1024), Default::default());
        // A batch holds at most 10,000 Kinesis records; KPL can multiply that, but not past
        // u32 (a 6 MB event cannot hold 4 billion user records).
        let key_of: Vec<u32> = records
            .iter()
            .map(|record| {
                let next = u32::try_from(ids.len()).unwrap_or(END - 1);
                *ids.entry(record.partition_key).or_insert(next)
            })
            .collect();
        // Keys joined by a duplicate share a lane: a union-find over key ids, empty (and so
        // free) in the usual batch without cross-key duplicates.
        let mut parent: Vec<u32> = Vec::new();
        for (index, state) in states.iter().enumerate() {
            if let RecordState::DuplicateOf(first) = *state
                && let (Some(&a), Some(&b)) = (key_of.get(index), key_of.get(first))
                && a != b
            {
                if parent.is_empty() {
                    parent = (0..u32::try_from(ids.len()).unwrap_or(END - 1)).collect();
                }
                let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
                let (low, high) = (ra.min(rb), ra.max(rb));
                parent[high as usize] = low;
            }
        }
        let mut tails = vec![END; ids.len()];
        let mut heads = Vec::new();
        let mut next = vec![END; records.len()];
        for (index, &key) in key_of.iter().enumerate() {
            let lane = if parent.is_empty() {
                key
            } else {
                find(&mut parent, key)
            };
            let index = u32::try_from(index).unwrap_or(END - 1);
            match tails.get(lane as usize).copied() {
                Some(END) | None => heads.push(index),
                Some(tail) => next[tail as usize] = index,
            }
            if let Some(slot) = tails.get_mut(lane as usize) {
                *slot = index;
            }
        }
        Self { heads, next }
    }

    fn heads(&self) -> impl Iterator<Item = u32> + '_ {
        self.heads.iter().copied()
    }

    fn count(&self) -> usize {
        self.heads.len()
    }

    fn lane(&self, head: u32) -> impl Iterator<Item = usize> + '_ {
        std::iter::successors(Some(head), |&i| {
            self.next
                .get(i as usize)
                .copied()
                .filter(|&n| n != u32::MAX)
        })
        .map(|i| i as usize)
    }
}

/// Processes Kinesis batches: decoding, ordering, retries, bisecting, dead letters, response.
///
/// `M` is how the handler runs ([`PerRecord`] or [`Bisecting`]), `S` where dead letters go, `G`
/// the admission gate (idempotency). Those are the parts that vary and sit on the hot path;
/// everything else (the clock, the metrics writer, the retry policy) is a value.
pub struct Processor<M, S, G = NoGate> {
    mode: M,
    dead_letters: DeadLetterPublisher<S>,
    gate: G,
    clock: Arc<dyn Clock>,
    metrics: Arc<dyn MetricsWriter>,
    retry: ExponentialBackoff,
    config: ProcessorConfig,
    /// The decode buffers of the last invocation, kept for the next (see
    /// [`DecodedBatch::refill`]); empty while an invocation holds them.
    spare: std::sync::Mutex<Option<DecodedBatch>>,
}

impl<M: std::fmt::Debug, S: std::fmt::Debug, G: std::fmt::Debug> std::fmt::Debug
    for Processor<M, S, G>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("mode", &self.mode)
            .field("dead_letters", &self.dead_letters)
            .field("gate", &self.gate)
            .field("retry", &self.retry)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<H, S: DeadLetterSink> Processor<PerRecord<H>, S> {
    /// A processor that calls `handler` once per record.
    pub fn per_record(handler: H, dead_letters: S) -> Self {
        Self::with_mode(PerRecord(handler), dead_letters)
    }
}

impl<H, S: DeadLetterSink> Processor<Bisecting<H>, S> {
    /// A processor that calls `handler` with whole batches, bisecting on permanent failure.
    pub fn bisecting(handler: H, dead_letters: S) -> Self {
        Self::with_mode(Bisecting(handler), dead_letters)
    }
}

impl<M, S: DeadLetterSink> Processor<M, S> {
    fn with_mode(mode: M, dead_letters: S) -> Self {
        Self {
            mode,
            dead_letters: DeadLetterPublisher::new(dead_letters, ExponentialBackoff::default()),
            gate: NoGate,
            clock: Arc::new(SystemClock),
            metrics: Arc::new(StdoutMetrics),
            retry: ExponentialBackoff::default(),
            config: ProcessorConfig::default(),
            spare: std::sync::Mutex::new(None),
        }
    }
}

impl<M, S: DeadLetterSink, G> Processor<M, S, G> {
    pub fn config(mut self, config: ProcessorConfig) -> Self {
        self.config = config;
        self
    }

    /// Admission control, typically [`crate::idempotency`].
    pub fn gate<G2: RecordGate>(self, gate: G2) -> Processor<M, S, G2> {
        Processor {
            mode: self.mode,
            dead_letters: self.dead_letters,
            gate,
            clock: self.clock,
            metrics: self.metrics,
            retry: self.retry,
            config: self.config,
            spare: self.spare,
        }
    }

    /// The wall clock for record ages, dead-letter times and metric timestamps.
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Where each invocation's EMF metrics line goes (stdout by default, where Lambda's log
    /// agent picks it up).
    pub fn metrics(mut self, writer: impl MetricsWriter + 'static) -> Self {
        self.metrics = Arc::new(writer);
        self
    }

    /// The retry policy for handlers and for dead-letter sends.
    pub fn retry(mut self, retry: ExponentialBackoff) -> Self {
        let sink = self.dead_letters.into_sink();
        self.dead_letters = DeadLetterPublisher::new(sink, retry.clone());
        self.retry = retry;
        self
    }

    pub fn settings(&self) -> &ProcessorConfig {
        &self.config
    }

    pub fn dead_letter_sink(&self) -> &S {
        self.dead_letters.sink()
    }

    pub fn handler(&self) -> &M {
        &self.mode
    }

    /// The processor's wall clock.
    pub fn current_clock(&self) -> &dyn Clock {
        &*self.clock
    }

    /// Whether the gate's `AlreadyDone` always names this very record ([`RecordGate::identifies_records`]).
    pub(crate) fn gate_identifies_records(&self) -> bool
    where
        G: RecordGate,
    {
        self.gate.identifies_records()
    }

    /// The cut-off times of `invocation`, from its deadline and the configured margin.
    pub(crate) fn cutoffs(&self, invocation: &Invocation) -> Cutoffs {
        Cutoffs::new(invocation.deadline, self.config.deadline_margin)
    }

    /// Write one metrics line through the configured writer.
    pub(crate) fn write_metrics(&self, line: &str) {
        self.metrics.write_line(line);
    }
}

impl<M, S, G> Processor<M, S, G>
where
    S: DeadLetterSink,
    G: RecordGate,
{
    /// Process one Lambda Kinesis event. Fails as a whole only when the event itself is
    /// unreadable; everything about single records is in the report.
    pub async fn process(
        &self,
        event: &[u8],
        invocation: &Invocation,
    ) -> Result<BatchReport, EventError>
    where
        M: Mode,
    {
        let event: KinesisEvent<'_> = parse_event(event)?;
        Ok(self.process_records(&event.records, invocation).await)
    }

    /// Process the records of an event parsed elsewhere.
    pub async fn process_records(
        &self,
        event_records: &[EventRecord<'_>],
        invocation: &Invocation,
    ) -> BatchReport
    where
        M: Mode,
    {
        self.process_records_with(&self.mode, event_records, invocation, &mut KeepAll)
            .await
    }

    /// Process records with `mode` in place of the processor's own handler: a tumbling window
    /// ([`crate::window`]) runs a handler per invocation that collects what each record adds to
    /// that invocation's state, and decides through `settling` which of those were kept.
    pub(crate) async fn process_records_with<M2: Mode>(
        &self,
        mode: &M2,
        event_records: &[EventRecord<'_>],
        invocation: &Invocation,
        settling: &mut impl Settling,
    ) -> BatchReport {
        let started = Instant::now();
        let cutoffs = self.cutoffs(invocation);
        let mut batch = lock(&self.spare).take().unwrap_or_default();
        batch.refill(event_records);
        let decoded = batch.records(event_records);
        let records: Vec<Record<'_>> = decoded.iter().map(|d| d.record).collect();
        let now_ms = self.clock.now_ms();
        let max_record_age_ms = records
            .iter()
            .map(|r| now_ms.saturating_sub(r.approximate_arrival_ms).max(0))
            .max();

        let mut outcomes: Vec<RecordState> = decoded
            .iter()
            .map(|d| match &d.error {
                None => RecordState::Pending,
                Some(error) => RecordState::Permanent {
                    error: DeadLetterError {
                        error_type: error.error_type().to_owned(),
                        message: error.to_string(),
                    },
                    attempts: 0,
                },
            })
            .collect();

        let gate_context = GateContext {
            function_name: &self.config.function_name,
            request_id: &invocation.request_id,
            deadline_ms: invocation.deadline_ms,
        };
        let admissions = self.gate.admit(&records, &gate_context).await;
        // Records that did not decode are dead-lettered without running, but through the gate
        // all the same: settled as done once dead-lettered, so a redelivery (the checkpoint fell
        // before them) does not dead-letter them again.
        let mut undecoded_ran = vec![false; outcomes.len()];
        let mut accounted_ran = vec![false; outcomes.len()];
        for (index, admission) in admissions.into_iter().enumerate() {
            let Some(outcome) = outcomes.get_mut(index) else {
                break;
            };
            if records.get(index).is_some_and(|r| settling.accounted(r)) {
                // Its effect is already where it belongs; a gate that admitted it is told so.
                accounted_ran[index] = admission == Admission::Run;
                *outcome = RecordState::AlreadyDone;
                continue;
            }
            if *outcome != RecordState::Pending {
                match admission {
                    Admission::Run => undecoded_ran[index] = true,
                    Admission::AlreadyDone => *outcome = RecordState::AlreadyDone,
                    Admission::Defer { reason } => {
                        *outcome = RecordState::Retryable {
                            reason,
                            attempts: 0,
                        };
                    }
                    // Without a key of its own it can only be dead-lettered, each time it comes.
                    Admission::DuplicateOf(_) | Admission::Reject { .. } => {}
                }
                continue;
            }
            *outcome = match admission {
                Admission::Run => RecordState::Pending,
                Admission::AlreadyDone => RecordState::AlreadyDone,
                Admission::DuplicateOf(first) if first < index => RecordState::DuplicateOf(first),
                Admission::DuplicateOf(_) => RecordState::Pending,
                Admission::Defer { reason } => RecordState::Retryable {
                    reason,
                    attempts: 0,
                },
                Admission::Reject {
                    error_type,
                    message,
                } => RecordState::Permanent {
                    error: DeadLetterError {
                        error_type,
                        message: format!("record {}: {message}", records[index].id()),
                    },
                    attempts: 0,
                },
            };
        }
        let ran: Vec<bool> = outcomes
            .iter()
            .zip(undecoded_ran)
            .zip(accounted_ran)
            .map(|((o, undecoded), accounted)| undecoded || accounted || *o == RecordState::Pending)
            .collect();

        let context = RunContext {
            retry: &self.retry,
            cutoffs,
            max_concurrency: self.config.max_concurrency,
        };
        let handler_calls = mode.execute(&records, &mut outcomes, &context).await;

        self.dead_letter(event_records, &records, &mut outcomes, invocation, cutoffs)
            .await;
        resolve_duplicates(&mut outcomes);
        let settled: Vec<Settled> = outcomes.iter().map(Settled::of).collect();
        let keep = settling.settle_as(&records, &settled).await;
        self.settle(&records, &ran, &keep, &mut outcomes, &gate_context)
            .await;

        let report = build_report(
            &records,
            outcomes,
            handler_calls,
            max_record_age_ms,
            started,
        );
        info!(
            request_id = %invocation.request_id,
            records = report.counts.records,
            processed = report.counts.processed,
            already_done = report.counts.already_done,
            dead_lettered = report.counts.dead_lettered,
            failed = report.counts.failed(),
            handler_calls,
            redeliver_from = report.response.batch_item_failures.first().map(|f| f.item_identifier.as_str()),
            "batch done"
        );
        drop(records);
        drop(decoded);
        *lock(&self.spare) = Some(batch);
        report
    }

    async fn dead_letter(
        &self,
        event_records: &[EventRecord<'_>],
        records: &[Record<'_>],
        outcomes: &mut [RecordState],
        invocation: &Invocation,
        cutoffs: Cutoffs,
    ) {
        let now_seconds = self.clock.now_ms() as f64 / 1000.0;
        let mut positions = Vec::new();
        let mut letters = Vec::new();
        for (index, outcome) in outcomes.iter().enumerate() {
            let RecordState::Permanent { error, attempts } = outcome else {
                continue;
            };
            let record = &records[index];
            let data = match record.sub_sequence_number {
                // A KPL user record: its own bytes.
                Some(_) => {
                    std::borrow::Cow::Owned(base64_simd::STANDARD.encode_to_string(record.data))
                }
                // A whole record: the field exactly as Lambda delivered it.
                None => std::borrow::Cow::Borrowed(
                    event_records
                        .get(record.event_index)
                        .map(|e| e.kinesis.data.as_ref())
                        .unwrap_or_default(),
                ),
            };
            positions.push(index);
            letters.push(DeadLetter {
                stream_arn: record.stream_arn,
                shard_id: record.shard_id,
                sequence_number: record.sequence_number.as_str(),
                sub_sequence_number: record.sub_sequence_number,
                partition_key: record.partition_key,
                explicit_hash_key: record.explicit_hash_key,
                approximate_arrival_timestamp: record.approximate_arrival_ms as f64 / 1000.0,
                function_name: &self.config.function_name,
                request_id: &invocation.request_id,
                error: error.clone(),
                attempts: *attempts,
                data: Some(data),
                data_truncated: false,
                dead_lettered_at: now_seconds,
            });
        }
        if letters.is_empty() {
            return;
        }
        let results = self.dead_letters.publish(&letters, cutoffs.publish).await;
        for ((index, result), letter) in positions.into_iter().zip(results).zip(letters) {
            let record = &records[index];
            outcomes[index] = match result {
                Ok(()) => {
                    warn!(shard = record.shard_id, sequence_number = %record.sequence_number,
                        sub_sequence_number = record.sub_sequence_number,
                        error_type = %letter.error.error_type, "record dead-lettered: {}", letter.error.message);
                    RecordState::DeadLettered {
                        error: letter.error,
                        attempts: letter.attempts,
                    }
                }
                Err(error) => {
                    error!(shard = record.shard_id, sequence_number = %record.sequence_number,
                        "dead letter not delivered, handing the record back to Lambda: {error}");
                    RecordState::Retryable {
                        reason: dead_letter_failure(&error),
                        attempts: letter.attempts,
                    }
                }
            };
        }
    }

    async fn settle(
        &self,
        records: &[Record<'_>],
        ran: &[bool],
        keep: &[Keep],
        outcomes: &mut [RecordState],
        context: &GateContext<'_>,
    ) {
        let keep_at = |index: usize| keep.get(index).copied().unwrap_or(Keep::AsDecided);
        let settled: Vec<Option<Settlement>> = ran
            .iter()
            .zip(outcomes.iter())
            .enumerate()
            .map(|(index, (&ran, outcome))| {
                ran.then(|| match keep_at(index) {
                    Keep::AsDecided if outcome.is_acknowledged() => Settlement::Done,
                    Keep::Durable {
                        write_completion: true,
                    } => Settlement::Done,
                    Keep::AsDecided | Keep::Durable { .. } | Keep::Dropped => Settlement::Released,
                })
            })
            .collect();
        let results = self.gate.settle(records, &settled, context).await;
        for ((index, result), settlement) in results.into_iter().enumerate().zip(&settled) {
            if matches!(keep_at(index), Keep::Durable { .. }) {
                if let Err(error) = result {
                    let record = &records[index];
                    warn!(shard = record.shard_id, sequence_number = %record.sequence_number,
                        "completion not recorded; the record stays acknowledged, its effect is \
                         in the state returned to Lambda: {error}");
                }
                continue;
            }
            if let (Err(error), Some(Settlement::Done)) = (result, settlement) {
                let record = &records[index];
                error!(shard = record.shard_id, sequence_number = %record.sequence_number,
                    "completion not recorded, handing the record back to Lambda: {error}");
                outcomes[index] = RecordState::Retryable {
                    reason: error.to_string(),
                    attempts: 0,
                };
            }
        }
    }
}

fn dead_letter_failure(error: &PublishError) -> String {
    format!("DeadLetterFailed: {error}")
}

/// A duplicate settles as its first occurrence: acknowledged with it, handed back with it.
fn resolve_duplicates(outcomes: &mut [RecordState]) {
    for index in 0..outcomes.len() {
        if let RecordState::DuplicateOf(first) = outcomes[index] {
            outcomes[index] = match outcomes.get(first) {
                Some(o) if o.is_acknowledged() => RecordState::AlreadyDone,
                _ => RecordState::Blocked,
            };
        }
    }
}

fn build_report(
    records: &[Record<'_>],
    states: Vec<RecordState>,
    handler_calls: u32,
    max_record_age_ms: Option<i64>,
    started: Instant,
) -> BatchReport {
    let mut counts = Counts {
        records: records.len(),
        ..Counts::default()
    };
    let mut lowest: Option<SequenceNumber<'_>> = None;
    let mut outcomes = Vec::with_capacity(states.len());
    for (record, state) in records.iter().zip(states) {
        let outcome = match state {
            RecordState::Processed { attempts } => Outcome::Processed { attempts },
            RecordState::AlreadyDone => Outcome::AlreadyDone,
            RecordState::DeadLettered { error, attempts } => {
                Outcome::DeadLettered { error, attempts }
            }
            RecordState::Retryable { reason, attempts } => Outcome::Retryable { reason, attempts },
            RecordState::NotStarted => Outcome::NotStarted,
            RecordState::Blocked => Outcome::Blocked,
            // None of these can remain after dead-lettering and settling; should one, it is
            // handed back rather than let a record slip through acknowledged.
            RecordState::Pending | RecordState::Permanent { .. } | RecordState::DuplicateOf(_) => {
                Outcome::Retryable {
                    reason: "record left undecided by the processor".to_owned(),
                    attempts: 0,
                }
            }
        };
        match &outcome {
            Outcome::Processed { .. } => counts.processed += 1,
            Outcome::AlreadyDone => counts.already_done += 1,
            Outcome::DeadLettered { .. } => counts.dead_lettered += 1,
            Outcome::NotStarted => counts.not_started += 1,
            Outcome::Blocked => counts.blocked += 1,
            Outcome::Retryable { .. } => counts.retryable += 1,
        }
        if !outcome.is_acknowledged() {
            lowest = Some(match lowest {
                Some(low) if low <= record.sequence_number => low,
                _ => record.sequence_number,
            });
        }
        outcomes.push(outcome);
    }
    let response = match lowest {
        Some(sequence_number) => BatchResponse::redeliver_from(sequence_number.as_str()),
        None => BatchResponse::all_done(),
    };
    BatchReport {
        response,
        counts,
        handler_calls,
        max_record_age_ms,
        duration: started.elapsed(),
        outcomes,
    }
}
