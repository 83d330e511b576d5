//! Tumbling windows: typed state carried from one invocation to the next, and a hook at the end
//! of each window.
//!
//! With `TumblingWindowInSeconds` on the event source mapping, Lambda adds to each Kinesis event
//! the `window` (`start`, `end`, RFC 3339), the `state` the previous invocation of this window
//! returned (absent or `{}` at first), `shardId`, `eventSourceARN`, `isFinalInvokeForWindow` and
//! `isWindowTerminatedEarly`. The response must carry `state` (without it the invocation counts
//! as failed) and, with `ReportBatchItemFailures`, may carry `batchItemFailures`.
//! `aws_lambda_events` 1.2 models neither: its response has no `batchItemFailures`, and its
//! `state: HashMap<String, String>` rejects AWS's own example `{"1": 282}`. Here the state is any
//! serde type that reads from a JSON object.
//!
//! # What Lambda does
//! From the Lambda Developer Guide, "Implementing stateful Kinesis Data Streams processing in
//! Lambda" (`services-kinesis-windows`) and "Configuring partial batch response with Kinesis"
//! (`services-kinesis-batchfailurereporting`):
//!
//! - state is at most 1 MB per shard; past that, Lambda terminates the window early, and the
//!   next invocation continues the same window with a fresh state;
//! - records are processed at least once, in order the first time, possibly out of order when
//!   retried; boundaries follow each record's arrival time; a shard's end closes its window;
//! - at the window's end Lambda invokes with `isFinalInvokeForWindow: true`; if that invocation
//!   fails, Lambda "suspends further processing until a successful invocation";
//! - `MaximumRetryAttempts` and `MaximumRecordAge` apply as usual;
//! - with `batchItemFailures`, Lambda checkpoints at the lowest reported sequence number and
//!   redelivers every record from there.
//!
//! The guide does not say which state comes with the redelivered records. The only reading in
//! which no record is lost is that the state returned *with* `batchItemFailures` is committed
//! together with the checkpoint: records before the checkpoint are never seen again, so they must
//! be in that state; records from the checkpoint on come back, so they must not be, or they
//! would be counted twice. A failed invocation (an error, a timeout) commits nothing: Lambda
//! retries it with the state it had. This module is built to that reading, and under the other
//! possible reading (Lambda ignoring the state of a partially failed invocation) it can only
//! lose, never double-count.
//!
//! # What this module does
//! - **Map, then fold.** [`WindowRecordHandler::contribute`] runs under the [`Processor`], so
//!   ordering per partition key, retries, dead letters and the checkpoint are the processor's.
//!   It returns what a record adds to the state, which is kept aside. Only afterwards, in stream
//!   order, does [`WindowHandler::fold`] add to the state the contributions of records *before*
//!   the checkpoint; those of records at or after it are dropped, since Lambda redelivers them
//!   (a record of another partition key may have succeeded past the checkpoint).
//! - **A final invocation must be complete.** If any record of a final invocation is handed back,
//!   the invocation fails and [`WindowHandler::on_window_end`] is not called: Lambda retries the
//!   whole final invocation with the window's state, and the result is only ever computed from a
//!   state holding every record of the window.
//! - **The 1 MB limit is ours to keep.** After folding, the state is serialized and measured.
//!   Over [`WindowConfig::state_limit_bytes`] (default 768 KiB, below Lambda's limit so that
//!   Lambda never has to terminate the window itself) the window is flushed early:
//!   `on_window_end` runs with [`WindowEndReason::StateLimit`] and the window goes on with a fresh
//!   state. A window can so end in several *segments*; [`WindowEnd::segment`] names each one by
//!   the first record folded into it, which stays the same when an invocation is retried, so a
//!   hook can merge segments and write each exactly once. `isWindowTerminatedEarly` from Lambda
//!   is handled the same way.
//! - **A state that does not read is dead-lettered, and the window restarts.** A state that does
//!   not decode will not decode on a retry either (usually a deploy changed the state type
//!   mid-window). Failing the invocation would replay it until `MaximumRetryAttempts`, then
//!   Lambda would discard the batch's records, and, since state only advances on success, every
//!   later batch of the window too: records lost and the shard stalled. Instead the raw state
//!   goes to the dead-letter queue (error type `WindowStateInvalid`, naming the field path),
//!   and the window continues from a fresh state marked [`WindowEnd::partial`]. If the dead
//!   letter cannot be delivered, the invocation fails: the old state is never dropped silently.
//!   (A state larger than an SQS message, 256 KiB, is dead-lettered without its body, with
//!   `stateTruncated: true`, and logged.)
//!
//! # The state on the wire
//! The handler's state, which must serialize as a JSON object, plus one reserved key,
//! `"shardwise"`, holding the segment's identity (omitted while there is none). A state without
//! it, such as AWS's example `{"1": 282, "2": 715}`, reads as it is.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Mutex;

use serde::de::value::{CowStrDeserializer, MapAccessDeserializer};
use serde::de::{DeserializeOwned, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use tracing::{error, info, warn};

use crate::dead_letter::{
    DeadLetterError, DeadLetterSink, SinkEntry, SqsLimits, bounded, fit_message,
};
use crate::event::{EventError, EventRecord, describe_json_error, parse_event};
use crate::gate::{NoGate, RecordGate};
use crate::handler::{HandlerError, RecordHandler};
use crate::metrics::{EmfDocument, Unit};
use crate::payload::FromRecordData;
use crate::processor::{
    BatchReport, DeadlineExceeded, Invocation, Keep, PerRecord, Processor, ProcessorConfig,
    Settled, Settling,
};
use crate::record::{Record, SequenceNumber};
use crate::response::BatchItemFailure;
use crate::retry::{ExponentialBackoff, retry};
use crate::time::Timestamp;

/// Lambda's limit on a window's state, per shard.
pub const LAMBDA_STATE_LIMIT_BYTES: usize = 1_000_000;

/// The serialized size past which a window is flushed early, by default.
pub const DEFAULT_STATE_LIMIT_BYTES: usize = 768 * 1024;

/// The key of the state object that holds the segment's identity.
pub const META_KEY: &str = "shardwise";

/// Settings of the window layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// Serialized state size past which the window is flushed early (at most
    /// [`LAMBDA_STATE_LIMIT_BYTES`]).
    pub state_limit_bytes: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            state_limit_bytes: DEFAULT_STATE_LIMIT_BYTES,
        }
    }
}

/// The window an invocation belongs to: `[start, end)`, by record arrival time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WindowBounds {
    pub start: Timestamp,
    pub end: Timestamp,
}

/// A tumbling-window invocation, parsed in place. The `state` is read on its own
/// ([`raw_state`]), so that a state that does not decode fails the state, not the event.
#[derive(Debug, Deserialize)]
pub struct WindowEvent<'a> {
    #[serde(rename = "Records", borrow, default)]
    pub records: Vec<EventRecord<'a>>,
    pub window: WindowBounds,
    #[serde(rename = "shardId", borrow, default)]
    pub shard_id: Cow<'a, str>,
    #[serde(rename = "eventSourceARN", borrow, default)]
    pub event_source_arn: Cow<'a, str>,
    #[serde(rename = "isFinalInvokeForWindow", default)]
    pub is_final_invoke_for_window: bool,
    #[serde(rename = "isWindowTerminatedEarly", default)]
    pub is_window_terminated_early: bool,
}

/// The raw JSON of the event's `state`: `None` when absent or `null`.
pub fn raw_state(event: &[u8]) -> Result<Option<String>, EventError> {
    match sonic_rs::get_from_slice(event, ["state"]) {
        Ok(value) => {
            let raw = value.as_raw_str();
            Ok((raw != "null").then(|| raw.to_owned()))
        }
        Err(error) if error.is_not_found() => Ok(None),
        Err(error) => Err(EventError {
            path: "state".to_owned(),
            message: error.to_string(),
        }),
    }
}

/// What the window layer keeps in the state besides the handler's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentMeta {
    /// The first record folded into this state (`sequence` or `sequence/sub` for a KPL user
    /// record): the segment's identity, the same however often its invocations are retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened_by: Option<String>,
    /// The state began by discarding one that could not be read (it was dead-lettered).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    /// The last record (`sequence` or `sequence/sub`) this window has accounted for, in this
    /// state or a segment already ended. A record at or before it is never folded again, and a
    /// record after it is never taken as done because a store says so: the state, which Lambda
    /// commits with the checkpoint, is the record of what was folded. Kept across a segment's
    /// end within the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub through: Option<String>,
}

impl SegmentMeta {
    fn is_empty(&self) -> bool {
        self.opened_by.is_none() && !self.partial && self.through.is_none()
    }
}

/// A state that could not be read into the handler's type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("window state does not read at `{path}`: {message}")]
pub struct StateDecodeError {
    /// The field path inside the state (`categories.5411.count`), `.` for the whole.
    pub path: String,
    pub message: String,
}

/// Read a state: absent, `null` and `{}` give the default (the first invocation of a window).
pub fn decode_state<S: DeserializeOwned + Default>(
    raw: Option<&str>,
) -> Result<(S, SegmentMeta), StateDecodeError> {
    let Some(raw) = raw else {
        return Ok((S::default(), SegmentMeta::default()));
    };
    if is_empty_object(raw) {
        return Ok((S::default(), SegmentMeta::default()));
    }
    match sonic_rs::from_str::<WireState<S>>(raw) {
        Ok(wire) => Ok((wire.data, wire.meta)),
        Err(fast) => {
            let error = describe_json_error::<WireState<S>>(raw.as_bytes(), fast.to_string());
            Err(StateDecodeError {
                path: error.path,
                message: error.message,
            })
        }
    }
}

/// Serialize a state as it goes back to Lambda.
pub fn encode_state<S: Serialize>(
    state: &S,
    meta: &SegmentMeta,
) -> Result<String, serde_json::Error> {
    serde_json::to_string(&WireStateRef { meta, data: state })
}

fn is_empty_object(raw: &str) -> bool {
    raw.trim()
        .strip_prefix('{')
        .and_then(|rest| rest.trim_end().strip_suffix('}'))
        .is_some_and(|inner| inner.trim().is_empty())
}

#[derive(Serialize)]
struct WireStateRef<'s, S> {
    #[serde(rename = "shardwise", skip_serializing_if = "SegmentMeta::is_empty")]
    meta: &'s SegmentMeta,
    #[serde(flatten)]
    data: &'s S,
}

/// The handler's state with the reserved key taken out of its object. Written by hand rather
/// than with `#[serde(flatten)]`, which would lose the field path of a decode error.
struct WireState<S> {
    meta: SegmentMeta,
    data: S,
}

impl<'de, S: Deserialize<'de>> Deserialize<'de> for WireState<S> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(WireStateVisitor(PhantomData))
    }
}

struct WireStateVisitor<S>(PhantomData<S>);

impl<'de, S: Deserialize<'de>> Visitor<'de> for WireStateVisitor<S> {
    type Value = WireState<S>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a window state object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let mut meta = None;
        let data = S::deserialize(MapAccessDeserializer::new(WithoutMeta {
            map,
            meta: &mut meta,
        }))?;
        Ok(WireState {
            meta: meta.unwrap_or_default(),
            data,
        })
    }
}

/// The state's entries minus [`META_KEY`], which it reads into `meta` on the way.
struct WithoutMeta<'m, A> {
    map: A,
    meta: &'m mut Option<SegmentMeta>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for WithoutMeta<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        loop {
            let Some(key) = self.map.next_key::<Cow<'de, str>>()? else {
                return Ok(None);
            };
            if key == META_KEY {
                *self.meta = Some(self.map.next_value()?);
                continue;
            }
            return seed
                .deserialize(CowStrDeserializer::<A::Error>::new(key))
                .map(Some);
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

/// Why a window (or a segment of it) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowEndReason {
    /// `isFinalInvokeForWindow`: the window is over.
    Final,
    /// The state outgrew [`WindowConfig::state_limit_bytes`]; the window goes on with a fresh
    /// state.
    StateLimit,
    /// `isWindowTerminatedEarly`: Lambda ended the window's state; the window goes on with a
    /// fresh one.
    TerminatedEarly,
}

impl WindowEndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Final => "Final",
            Self::StateLimit => "StateLimit",
            Self::TerminatedEarly => "TerminatedEarly",
        }
    }
}

/// What [`WindowHandler::on_window_end`] is told about the state it is given.
#[derive(Debug, Clone, Copy)]
pub struct WindowEnd<'a> {
    pub window: WindowBounds,
    pub shard_id: &'a str,
    pub event_source_arn: &'a str,
    pub reason: WindowEndReason,
    /// The segment's identity ([`SegmentMeta::opened_by`]): `None` when no record was folded
    /// into this state by Shardwise (an empty window, or a state written by other code).
    pub segment: Option<&'a str>,
    /// The state began by discarding an unreadable one: the result misses what came before.
    pub partial: bool,
}

/// Folds a window's records into typed state and acts on the window's end.
///
/// The per-record half is [`WindowRecordHandler`]; folding is separate from it so that only the
/// records Lambda will not redeliver reach the state (see the module docs).
pub trait WindowHandler: Send + Sync {
    /// The state carried between invocations. It must serialize as a JSON object without a key
    /// named [`META_KEY`]; `Default` is the state of a new window.
    type State: Serialize + DeserializeOwned + Default + Send + Sync;
    /// What one record adds to the state. Owned: it outlives the batch's decoded data.
    type Contribution: Send;

    /// Add one record's contribution. Called in stream order, once per record the state keeps.
    fn fold(&self, state: &mut Self::State, contribution: Self::Contribution);

    /// The window (or, after an early flush, a segment of it) ended with `state`. An error fails
    /// the invocation, and Lambda retries it with the same state: make the effect idempotent
    /// (keyed by shard, window and [`WindowEnd::segment`]).
    fn on_window_end(
        &self,
        state: &Self::State,
        end: &WindowEnd<'_>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// The per-record half of a [`WindowHandler`], run by the processor with its ordering, retries
/// and dead letters.
pub trait WindowRecordHandler<'d>: WindowHandler {
    type Payload: FromRecordData<'d> + Send + Sync;

    /// What the record adds to the window (`None`: nothing). May have side effects of its own; a
    /// record whose contribution is dropped (it is redelivered) runs again.
    fn contribute(
        &self,
        record: &Record<'d>,
        payload: &Self::Payload,
    ) -> impl Future<Output = Result<Option<Self::Contribution>, HandlerError>> + Send;
}

/// A contribution and where its record sits in the event.
struct Collected<C> {
    event_index: usize,
    sub_sequence_number: Option<u64>,
    contribution: C,
}

/// The record handler the processor runs for one invocation: it asks the window handler for
/// each record's contribution and keeps it for the fold.
struct Contributions<'h, H: WindowHandler> {
    handler: &'h H,
    collected: Mutex<Vec<Collected<H::Contribution>>>,
}

impl<'d, H: WindowRecordHandler<'d>> RecordHandler<'d> for Contributions<'_, H> {
    type Payload = H::Payload;

    async fn handle(&self, record: &Record<'d>, payload: &H::Payload) -> Result<(), HandlerError> {
        if let Some(contribution) = self.handler.contribute(record, payload).await? {
            let mut collected = self
                .collected
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            collected.push(Collected {
                event_index: record.event_index,
                sub_sequence_number: record.sub_sequence_number,
                contribution,
            });
        }
        Ok(())
    }
}

/// The response to a tumbling-window invocation.
#[derive(Debug, Clone, Serialize)]
pub struct WindowResponse {
    pub state: Box<RawValue>,
    #[serde(rename = "batchItemFailures")]
    pub batch_item_failures: Vec<BatchItemFailure>,
}

/// Everything a window invocation produced.
#[derive(Debug)]
pub struct WindowReport {
    pub response: WindowResponse,
    /// The records' outcomes and counts, from the processor.
    pub batch: BatchReport,
    /// Contributions folded into the state.
    pub folded: usize,
    /// Size of the state returned to Lambda.
    pub state_bytes: usize,
    /// Set when `on_window_end` ran in this invocation.
    pub ended: Option<WindowEndReason>,
    /// Set when the incoming state did not read and was dead-lettered.
    pub state_reset: Option<StateDecodeError>,
}

impl WindowReport {
    /// The invocation's metrics: the batch's, plus the state's size and how the window ended.
    pub fn metrics(&self, namespace: &str, function_name: &str) -> EmfDocument {
        let mut doc = self.batch.metrics(namespace, function_name).metric(
            "WindowStateBytes",
            Unit::Bytes,
            self.state_bytes as f64,
        );
        if let Some(reason) = self.ended {
            doc = doc
                .metric("WindowsEnded", Unit::Count, 1.0)
                .property("windowEnd", reason.as_str());
        }
        if self.state_reset.is_some() {
            doc = doc.metric("WindowStateReset", Unit::Count, 1.0);
        }
        doc
    }
}

/// Why a window invocation failed as a whole (Lambda retries it with the same state).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WindowError {
    #[error(transparent)]
    MalformedEvent(#[from] EventError),
    #[error("{decode}; it could not be dead-lettered either, so the invocation fails: {error}")]
    StateNotDeadLettered {
        decode: StateDecodeError,
        error: String,
    },
    #[error(
        "final invocation of the window starting {window_start}: records from sequence number \
         {redeliver_from} failed, so the window is not ended; Lambda retries the invocation"
    )]
    FinalInvokeIncomplete {
        window_start: String,
        redeliver_from: String,
    },
    #[error("ending the window ({}) failed: {source}", reason.as_str())]
    WindowEnd {
        reason: WindowEndReason,
        #[source]
        source: HandlerError,
    },
    #[error("window state could not be serialized: {0}")]
    StateNotSerializable(String),
}

impl WindowError {
    /// The stable `errorType` Lambda reports.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::MalformedEvent(_) => "MalformedEvent",
            Self::StateNotDeadLettered { .. } => "WindowStateNotDeadLettered",
            Self::FinalInvokeIncomplete { .. } => "WindowFinalInvokeIncomplete",
            Self::WindowEnd { .. } => "WindowEndFailed",
            Self::StateNotSerializable(_) => "WindowStateNotSerializable",
        }
    }
}

/// Processes tumbling-window invocations: the records through a [`Processor`], the state through
/// a [`WindowHandler`].
#[derive(Debug)]
pub struct WindowProcessor<H, S, G = NoGate> {
    handler: H,
    records: Processor<PerRecord<()>, S, G>,
    config: WindowConfig,
    state_retry: ExponentialBackoff,
}

impl<H, S: DeadLetterSink> WindowProcessor<H, S> {
    pub fn new(handler: H, dead_letters: S) -> Self {
        Self {
            handler,
            // The processor's own handler is never run: each invocation brings its own.
            records: Processor::per_record((), dead_letters),
            config: WindowConfig::default(),
            state_retry: ExponentialBackoff::default(),
        }
    }
}

impl<H, S: DeadLetterSink, G> WindowProcessor<H, S, G> {
    pub fn window_config(mut self, config: WindowConfig) -> Self {
        self.config = WindowConfig {
            state_limit_bytes: config.state_limit_bytes.min(LAMBDA_STATE_LIMIT_BYTES),
        };
        self
    }

    /// Configure the record processor (`|p| p.config(…).retry(…).gate(…).clock(…)`).
    pub fn records<G2>(
        self,
        configure: impl FnOnce(Processor<PerRecord<()>, S, G>) -> Processor<PerRecord<()>, S, G2>,
    ) -> WindowProcessor<H, S, G2> {
        WindowProcessor {
            handler: self.handler,
            records: configure(self.records),
            config: self.config,
            state_retry: self.state_retry,
        }
    }

    /// The retry policy for dead-lettering an unreadable state.
    pub fn state_retry(mut self, policy: ExponentialBackoff) -> Self {
        self.state_retry = policy;
        self
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    pub fn settings(&self) -> &ProcessorConfig {
        self.records.settings()
    }

    pub fn window_settings(&self) -> &WindowConfig {
        &self.config
    }

    pub fn dead_letter_sink(&self) -> &S {
        self.records.dead_letter_sink()
    }

    /// The processor the records run through (its clock, metrics writer and settings are the
    /// window processor's).
    pub(crate) fn records_processor(&self) -> &Processor<PerRecord<()>, S, G> {
        &self.records
    }
}

impl<H, S, G> WindowProcessor<H, S, G>
where
    H: for<'d> WindowRecordHandler<'d>,
    S: DeadLetterSink,
    G: RecordGate,
{
    /// Process one tumbling-window invocation. Fails as a whole only when the event is
    /// unreadable, when a final invocation is incomplete, when ending the window fails, or when
    /// an unreadable state cannot be dead-lettered: in each case Lambda retries the invocation
    /// with the state it had.
    pub async fn process(
        &self,
        event: &[u8],
        invocation: &Invocation,
    ) -> Result<WindowReport, WindowError> {
        let window: WindowEvent<'_> = parse_event(event)?;
        let raw = raw_state(event)?;
        let (state, meta, state_reset) = match decode_state::<H::State>(raw.as_deref()) {
            Ok((state, meta)) => (state, meta, None),
            Err(decode) => {
                self.dead_letter_state(
                    &window,
                    raw.as_deref().unwrap_or("null"),
                    &decode,
                    invocation,
                )
                .await?;
                let meta = SegmentMeta {
                    partial: true,
                    ..SegmentMeta::default()
                };
                (H::State::default(), meta, Some(decode))
            }
        };

        let mode = PerRecord(Contributions {
            handler: &self.handler,
            collected: Mutex::new(Vec::new()),
        });
        let through_text = meta.through.clone();
        let through = through_text.as_deref().and_then(Position::parse);
        let mut settling = WindowSettling {
            processor: self,
            window: &window,
            collected: &mode.0.collected,
            through,
            state: Some((state, meta)),
            deadline: self.records.cutoffs(invocation).abandon,
            result: None,
        };
        let batch = self
            .records
            .process_records_with(&mode, &window.records, invocation, &mut settling)
            .await;
        let Some(result) = settling.result else {
            // `settle_as` always runs once per invocation; should it not, nothing was kept.
            return Err(WindowError::StateNotSerializable(
                "window invocation ended without a state".to_owned(),
            ));
        };
        let Folded {
            state_json,
            state_bytes,
            folded,
            ended,
        } = result?;
        Ok(WindowReport {
            response: WindowResponse {
                state: state_json,
                batch_item_failures: batch.response.batch_item_failures.clone(),
            },
            batch,
            folded,
            state_bytes,
            ended,
            state_reset,
        })
    }

    /// Fold what was kept into the state, end the window if it ends, and serialize the state:
    /// everything that decides which records' contributions Lambda will commit.
    async fn fold_and_end(
        &self,
        window: &WindowEvent<'_>,
        collected: Vec<Collected<H::Contribution>>,
        checkpoint: Option<SequenceNumber<'_>>,
        (mut state, mut meta): (H::State, SegmentMeta),
        through: Option<String>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Folded, WindowError> {
        if window.is_final_invoke_for_window
            && let Some(redeliver_from) = checkpoint
        {
            return Err(WindowError::FinalInvokeIncomplete {
                window_start: window.window.start.to_rfc3339(),
                redeliver_from: redeliver_from.to_string(),
            });
        }
        let mut collected = collected;
        collected.sort_by_key(|c| (c.event_index, c.sub_sequence_number.unwrap_or(0)));
        let mut folded = 0;
        for item in collected {
            let Some(source) = window.records.get(item.event_index) else {
                continue;
            };
            let sequence_number = SequenceNumber::new(&source.kinesis.sequence_number);
            // Lambda redelivers from the checkpoint on: those records are folded when they return.
            if checkpoint.is_some_and(|cp| sequence_number >= cp) {
                continue;
            }
            if meta.opened_by.is_none() {
                meta.opened_by = Some(match item.sub_sequence_number {
                    Some(sub) => format!("{sequence_number}/{sub}"),
                    None => sequence_number.to_string(),
                });
            }
            self.handler.fold(&mut state, item.contribution);
            folded += 1;
        }
        if through.is_some() {
            meta.through = through;
        }

        // `isWindowTerminatedEarly` means the window goes on with a fresh state, whatever the
        // other flag says: it is a segment's end, never the window's.
        let mut ended = if window.is_window_terminated_early {
            Some(WindowEndReason::TerminatedEarly)
        } else if window.is_final_invoke_for_window {
            Some(WindowEndReason::Final)
        } else {
            None
        };
        let mut encoded = None;
        if ended.is_none() {
            let json = encode_state(&state, &meta)
                .map_err(|e| WindowError::StateNotSerializable(e.to_string()))?;
            if json.len() > self.config.state_limit_bytes {
                warn!(shard = %window.shard_id, window_start = %window.window.start.to_rfc3339(),
                    state_bytes = json.len(), limit = self.config.state_limit_bytes,
                    "window state over its limit: ending this segment early");
                ended = Some(WindowEndReason::StateLimit);
            } else {
                encoded = Some(json);
            }
        }
        if let Some(reason) = ended {
            let end = WindowEnd {
                window: window.window,
                shard_id: &window.shard_id,
                event_source_arn: &window.event_source_arn,
                reason,
                segment: meta.opened_by.as_deref(),
                partial: meta.partial,
            };
            let hook = self.handler.on_window_end(&state, &end);
            let ran = match deadline {
                Some(at) => tokio::time::timeout_at(at, hook).await.unwrap_or_else(|_| {
                    Err(HandlerError::retryable(DeadlineExceeded).with_type("DeadlineExceeded"))
                }),
                None => hook.await,
            };
            ran.map_err(|source| WindowError::WindowEnd { reason, source })?;
            info!(shard = %window.shard_id, window_start = %window.window.start.to_rfc3339(),
                reason = reason.as_str(), segment = end.segment, partial = end.partial, "window ended");
        }
        // After an end the window goes on (or, after a final invocation, Lambda drops the state)
        // with a fresh one, which still knows which records the window has accounted for.
        let json = match encoded {
            Some(json) => json,
            None => {
                let fresh = SegmentMeta {
                    through: meta.through.filter(|_| reason_goes_on(ended)),
                    ..SegmentMeta::default()
                };
                encode_state(&H::State::default(), &fresh)
                    .map_err(|e| WindowError::StateNotSerializable(e.to_string()))?
            }
        };
        let state_bytes = json.len();
        let state_json = RawValue::from_string(json)
            .map_err(|e| WindowError::StateNotSerializable(e.to_string()))?;
        Ok(Folded {
            state_json,
            state_bytes,
            folded,
            ended,
        })
    }

    async fn dead_letter_state(
        &self,
        window: &WindowEvent<'_>,
        raw: &str,
        decode: &StateDecodeError,
        invocation: &Invocation,
    ) -> Result<(), WindowError> {
        error!(shard = %window.shard_id, window_start = %window.window.start.to_rfc3339(),
            "{decode}: dead-lettering it and starting the window afresh");
        let letter = StateDeadLetter {
            kind: "WindowState",
            event_source_arn: &window.event_source_arn,
            shard_id: &window.shard_id,
            window: window.window,
            function_name: &self.records.settings().function_name,
            request_id: &invocation.request_id,
            error: DeadLetterError {
                error_type: "WindowStateInvalid".to_owned(),
                message: decode.to_string(),
            },
            state: Some(raw),
            state_truncated: false,
        };
        let limit = SqsLimits::default().max_message_bytes;
        let not_sent = |error: String| WindowError::StateNotDeadLettered {
            decode: decode.clone(),
            error,
        };
        let mut body = serde_json::to_string(&letter).map_err(|e| not_sent(e.to_string()))?;
        if body.len() > limit {
            error!(shard = %window.shard_id, state_bytes = raw.len(),
                "the unreadable window state is larger than an SQS message: dead-lettered without it");
            let mut without = StateDeadLetter {
                state: None,
                state_truncated: true,
                ..letter
            };
            body = serde_json::to_string(&without).map_err(|e| not_sent(e.to_string()))?;
            if body.len() > limit {
                // The decode error can quote the state: cut it, keep what names the window.
                let message = std::mem::take(&mut without.error.message);
                let bare = serde_json::to_string(&without)
                    .map_err(|e| not_sent(e.to_string()))?
                    .len();
                without.error.message = fit_message(&message, limit.saturating_sub(bare));
                body = serde_json::to_string(&without).map_err(|e| not_sent(e.to_string()))?;
            }
        }
        let entries = [SinkEntry {
            id: "window-state".to_owned(),
            body,
        }];
        let sink = self.records.dead_letter_sink();
        let cutoff = self.records.cutoffs(invocation).publish;
        let attempted = retry(
            &self.state_retry,
            cutoff,
            |_: &String| true,
            || async {
                match bounded(sink.send_batch(&entries), cutoff).await {
                    Ok(failures) if failures.is_empty() => Ok(()),
                    Ok(failures) => Err(failures
                        .iter()
                        .map(|f| f.message.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")),
                    Err(error) => Err(error.to_string()),
                }
            },
        )
        .await;
        attempted.result.map_err(not_sent)
    }
}

/// Whether the window goes on after it ended for `reason` (a segment's end), so the fresh state
/// must still know what the window accounted for.
fn reason_goes_on(reason: Option<WindowEndReason>) -> bool {
    matches!(
        reason,
        Some(WindowEndReason::StateLimit | WindowEndReason::TerminatedEarly)
    )
}

/// What folding an invocation produced.
struct Folded {
    state_json: Box<RawValue>,
    state_bytes: usize,
    folded: usize,
    ended: Option<WindowEndReason>,
}

/// A record's place in its shard: sequence number, then sub-sequence number (0 for a whole
/// record), the order Lambda delivers them in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Position<'a> {
    sequence_number: SequenceNumber<'a>,
    sub: u64,
}

impl<'a> Position<'a> {
    fn of(record: &Record<'a>) -> Self {
        Self {
            sequence_number: record.sequence_number,
            sub: record.sub_sequence_number.unwrap_or(0),
        }
    }

    /// Reads `sequence` or `sequence/sub`, as [`SegmentMeta::through`] holds it.
    fn parse(text: &'a str) -> Option<Self> {
        let (sequence, sub) = match text.split_once('/') {
            Some((sequence, sub)) => (sequence, sub.parse().ok()?),
            None => (text, 0),
        };
        (!sequence.is_empty() && sequence.bytes().all(|b| b.is_ascii_digit())).then(|| Self {
            sequence_number: SequenceNumber::new(sequence),
            sub,
        })
    }

    fn render(&self) -> String {
        if self.sub == 0 {
            self.sequence_number.to_string()
        } else {
            format!("{}/{}", self.sequence_number, self.sub)
        }
    }
}

/// The window layer's part in settling an invocation's records (see [`Settling`]): a record's
/// effect is its contribution, kept only when it is folded into a state Lambda will commit.
struct WindowSettling<'w, 'e, H: WindowHandler, S, G> {
    processor: &'w WindowProcessor<H, S, G>,
    window: &'w WindowEvent<'e>,
    collected: &'w Mutex<Vec<Collected<H::Contribution>>>,
    /// The last record the incoming state accounts for.
    through: Option<Position<'w>>,
    state: Option<(H::State, SegmentMeta)>,
    deadline: Option<tokio::time::Instant>,
    result: Option<Result<Folded, WindowError>>,
}

impl<H, S, G> Settling for WindowSettling<'_, '_, H, S, G>
where
    H: for<'d> WindowRecordHandler<'d>,
    S: DeadLetterSink,
    G: RecordGate,
{
    fn accounted(&self, record: &Record<'_>) -> bool {
        self.through.as_ref().is_some_and(|through| {
            record.shard_id == self.window.shard_id.as_ref() && Position::of(record) <= *through
        })
    }

    async fn settle_as<'r>(
        &'r mut self,
        records: &'r [Record<'_>],
        settled: &'r [Settled],
    ) -> Vec<Keep> {
        let checkpoint = records
            .iter()
            .zip(settled)
            .filter(|(_, s)| **s == Settled::HandedBack)
            .map(|(r, _)| r.sequence_number)
            .min();
        // The last record before the checkpoint: everything up to it is in the state now.
        let through = records
            .iter()
            .filter(|r| checkpoint.is_none_or(|cp| r.sequence_number < cp))
            .map(Position::of)
            .max()
            .map(|p| p.render());
        let collected = std::mem::take(
            &mut *self
                .collected
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let Some(state) = self.state.take() else {
            return vec![Keep::AsDecided; records.len()];
        };
        let result = self
            .processor
            .fold_and_end(
                self.window,
                collected,
                checkpoint,
                state,
                through,
                self.deadline,
            )
            .await;
        let kept = result.is_ok();
        self.result = Some(result);
        // A record that settles with the state it was folded into needs no completion of
        // its own when the gate's keys name records: the state is that record.
        let write_completion = !self.processor.records.gate_identifies_records();
        records
            .iter()
            .zip(settled)
            .map(|(record, settled)| match settled {
                Settled::Processed
                    if kept && checkpoint.is_none_or(|cp| record.sequence_number < cp) =>
                {
                    Keep::Durable { write_completion }
                }
                // Its contribution was dropped: Lambda redelivers it and it runs again.
                Settled::Processed => Keep::Dropped,
                // A dead letter is sent whatever becomes of the state: it stays done.
                Settled::DeadLettered | Settled::AlreadyDone | Settled::HandedBack => {
                    Keep::AsDecided
                }
            })
            .collect()
    }
}

/// The dead letter of an unreadable window state.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct StateDeadLetter<'a> {
    kind: &'static str,
    event_source_arn: &'a str,
    shard_id: &'a str,
    window: WindowBounds,
    function_name: &'a str,
    request_id: &'a str,
    error: DeadLetterError,
    /// The state's JSON text, as Lambda delivered it.
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'a str>,
    state_truncated: bool,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    struct Totals {
        count: u64,
        #[serde(default)]
        by_key: BTreeMap<String, u64>,
    }

    #[test]
    fn absent_null_and_empty_states_are_fresh() {
        for raw in [None, Some("{}"), Some(" { \n } ")] {
            let (state, meta) = decode_state::<Totals>(raw).unwrap();
            assert_eq!(state, Totals::default());
            assert_eq!(meta, SegmentMeta::default());
        }
        let event = br#"{"Records":[],"window":{"start":"2020-12-09T07:04:00Z","end":"2020-12-09T07:06:00Z"},"state":null}"#;
        assert_eq!(raw_state(event).unwrap(), None);
        let event = br#"{"Records":[],"window":{"start":"2020-12-09T07:04:00Z","end":"2020-12-09T07:06:00Z"}}"#;
        assert_eq!(raw_state(event).unwrap(), None);
    }

    #[test]
    fn aws_example_state_reads_with_numbers() {
        let (state, meta) =
            decode_state::<BTreeMap<String, u64>>(Some(r#"{"1": 282, "2": 715}"#)).unwrap();
        assert_eq!(
            state,
            BTreeMap::from([("1".into(), 282), ("2".into(), 715)])
        );
        assert_eq!(meta, SegmentMeta::default());
        assert_eq!(encode_state(&state, &meta).unwrap(), r#"{"1":282,"2":715}"#);
    }

    #[test]
    fn the_segment_rides_along_under_its_key() {
        let meta = SegmentMeta {
            opened_by: Some("49590338271490256608559692538361571095921575989136588898".into()),
            partial: true,
            through: Some("49590338271490256608559692538361571095921575989136588899/2".into()),
        };
        let state = Totals {
            count: 3,
            by_key: BTreeMap::from([("a".into(), 3)]),
        };
        let json = encode_state(&state, &meta).unwrap();
        assert!(
            json.starts_with(r#"{"shardwise":{"opened_by":"4959"#),
            "{json}"
        );
        let (back, back_meta) = decode_state::<Totals>(Some(&json)).unwrap();
        assert_eq!(back, state);
        assert_eq!(back_meta, meta);
        // A map state does not see the reserved key.
        let (map, _) = decode_state::<BTreeMap<String, u64>>(Some(
            r#"{"x":1,"shardwise":{"opened_by":"7"},"y":2}"#,
        ))
        .unwrap();
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn a_bad_state_names_the_field() {
        let err =
            decode_state::<Totals>(Some(r#"{"count":1,"by_key":{"a":"three"}}"#)).unwrap_err();
        assert_eq!(err.path, "by_key.a");
        assert!(err.to_string().contains("`by_key.a`"), "{err}");
        let err = decode_state::<Totals>(Some(r#"{"by_key":{}}"#)).unwrap_err();
        assert!(err.message.contains("count"), "{err}");
        let err = decode_state::<Totals>(Some(r#"[1,2]"#)).unwrap_err();
        assert!(!err.message.is_empty());
        let err = decode_state::<Totals>(Some(r#"{"count":1,"shardwise":{"partial":"yes"}}"#))
            .unwrap_err();
        assert_eq!(err.path, "shardwise.partial");
    }

    #[test]
    fn a_malformed_window_names_the_field() {
        let err = parse_event::<WindowEvent<'_>>(
            br#"{"Records":[],"window":{"start":"yesterday","end":"2020-12-09T07:06:00Z"}}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "window.start");
        let err = parse_event::<WindowEvent<'_>>(br#"{"Records":[]}"#).unwrap_err();
        assert!(err.message.contains("window"), "{err}");
    }
}
