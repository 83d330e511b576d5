//! The event source mapping: one worker per (function, shard) that reads the shard, batches,
//! invokes, and decides — from the function's answer — what to checkpoint, retry, bisect or
//! discard, as Lambda's Kinesis poller does. `docs/local-runner.md` lists each behaviour with
//! the AWS documentation it follows and the conformance test that shows it.
//!
//! # Shape of a worker
//! ```text
//! read (≤ 10 000 records) ─▶ filter ─▶ buffer ─▶ ready? (batch size, 6 MB, batching window)
//!      ─▶ chunk ─▶ lanes by partition-key hash (ParallelizationFactor), concurrently;
//!                  each lane: batches in order, each batch until it settles:
//!                    success ........................ acknowledge
//!                    batchItemFailures (RBIF) ........ acknowledge the head, retry from the
//!                                                      lowest reported sequence number
//!                    error / timeout / crash / bad RBIF answer
//!                       bisect on and > 1 record ..... split in halves (not a retry)
//!                       else ......................... retry, until MaximumRetryAttempts
//!                    records older than MaximumRecordAge, or retries exhausted
//!                                                   .. discard + on-failure record
//!      ─▶ checkpoint (per batch with one lane, per chunk with several)
//! ```
//! With tumbling windows a shard is one lane: records are grouped by the window their arrival
//! time falls in, the state returned by one invoke is passed to the next, and a final invoke
//! (`isFinalInvokeForWindow`) closes the window once its time has passed — or early, when the
//! state grows past 1 MB (`isWindowTerminatedEarly`, and the window goes on with a fresh state).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::filter::{self, Pattern};
use crate::function::{InvokeOutcome, Invoker};
use crate::settings::MappingSettings;
use crate::stats::{MappingStats, ShardStats};
use crate::stream::{Position, ShardReader, Source, StreamRecord};
use crate::{now_ms, rfc3339_ms};

/// Where discarded batches are recorded (the mapping's `DestinationConfig.OnFailure`).
#[derive(Debug, Clone)]
pub enum OnFailure {
    None,
    /// A queue of the local database.
    Local(shardwise_sqlite::SqliteQueue),
    /// An SQS queue (with the SDK source).
    Sqs {
        client: aws_sdk_sqs::Client,
        queue_url: String,
    },
}

impl OnFailure {
    async fn send(&self, body: String) -> Result<(), String> {
        match self {
            Self::None => Ok(()),
            Self::Local(queue) => queue.send_all(&[body]).map_err(|e| e.to_string()),
            Self::Sqs { client, queue_url } => client
                .send_message()
                .queue_url(queue_url)
                .message_body(body)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string()),
        }
    }
}

/// Knobs of the runner itself (not of the mapping).
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Pause after a read that returned nothing.
    pub poll_interval: Duration,
    /// Records per read.
    pub read_limit: usize,
    /// First pause before a retry (doubles, up to `max_retry_backoff`).
    pub retry_backoff: Duration,
    pub max_retry_backoff: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(100),
            read_limit: 10_000,
            retry_backoff: Duration::from_millis(100),
            max_retry_backoff: Duration::from_secs(5),
        }
    }
}

/// Everything the workers of one function share.
#[derive(Debug)]
pub struct Mapping {
    pub function: String,
    pub settings: MappingSettings,
    pub invoker: Arc<Invoker>,
    pub stats: Arc<MappingStats>,
    pub checkpoints: Arc<CheckpointStore>,
    pub on_failure: OnFailure,
    pub source: Source,
    pub stream_arn: String,
    pub options: WorkerOptions,
}

/// A record ready to be put in an event: its JSON fragment is built once, reused by retries.
#[derive(Debug, Clone)]
struct Rec {
    sequence_number: String,
    partition_key: String,
    arrival_ms: i64,
    /// Data plus partition key: what counts against the shard's limits.
    bytes: u64,
    fragment: String,
}

/// The open tumbling window of a shard.
#[derive(Debug, Clone)]
struct OpenWindow {
    start_ms: i64,
    end_ms: i64,
    state: Value,
}

/// How an invocation settled.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Success {
        state: Option<Value>,
    },
    /// Redeliver from this position of the batch.
    Partial {
        from: usize,
        state: Option<Value>,
    },
    Failure {
        error_type: String,
    },
}

/// Why a worker stopped before it had settled what it was given.
#[derive(Debug)]
struct Interrupted;

impl Mapping {
    fn lanes(&self) -> usize {
        if self.settings.tumbling_window.is_some() {
            1
        } else {
            self.settings.parallelization_factor.clamp(1, 10) as usize
        }
    }

    /// Run the worker of `shard` until `stop` turns true.
    pub async fn run_shard(self: Arc<Self>, shard: String, mut stop: watch::Receiver<bool>) {
        let mut backoff = self.options.poll_interval;
        // Bounded by `stop`: the loop ends when the runner stops.
        while !*stop.borrow() {
            match self.clone().run_shard_once(&shard, &mut stop).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(function = %self.function, %shard, %error, "shard worker restarts");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    let _ = tokio::time::timeout(backoff, stop.changed()).await;
                }
            }
        }
    }

    async fn run_shard_once(
        self: Arc<Self>,
        shard: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let saved = self
            .checkpoints
            .load(&self.function, shard)
            .map_err(|e| e.to_string())?;
        let position = match &saved.sequence_number {
            Some(sequence) => Position::After(sequence.clone()),
            None => Position::Start(self.settings.starting_position),
        };
        let mut reader = self
            .source
            .open(shard, position)
            .await
            .map_err(|e| e.to_string())?;
        let mut window = saved.window.as_ref().and_then(|(start, state)| {
            let size = self.window_size()?;
            Some(OpenWindow {
                start_ms: *start,
                end_ms: start + size,
                state: serde_json::from_str(state).unwrap_or_else(|_| json!({})),
            })
        });
        if window.is_some() {
            self.stats
                .open_windows
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let shard_stats = self.stats.shard(shard);
        let mut worker = ShardWorker {
            mapping: self.clone(),
            shard_stats: shard_stats.clone(),
            shard: shard.to_owned(),
            checkpoint: saved.sequence_number,
            stop: stop.clone(),
        };
        let mut buffer: VecDeque<Rec> = VecDeque::new();
        let mut buffered_bytes = 0usize;
        let mut first_buffered: Option<Instant> = None;
        let mut seen_past_buffer: Option<String> = None;
        while !*stop.borrow() {
            let mut got = false;
            if buffer.len() < self.options.read_limit {
                let batch = read(&mut reader, self.options.read_limit - buffer.len()).await?;
                got = !batch.records.is_empty();
                let records = batch.records.len() as u64;
                let bytes: u64 = batch.records.iter().map(record_bytes).sum();
                MappingStats::add(&self.stats.records_in, records);
                MappingStats::add(&self.stats.bytes_in, bytes);
                MappingStats::add(&shard_stats.records_in, records);
                MappingStats::add(&shard_stats.bytes_in, bytes);
                for record in batch.records {
                    seen_past_buffer = Some(record.sequence_number.clone());
                    if !self.settings.filters.is_empty() && !self.passes(&record) {
                        MappingStats::add(&self.stats.filtered, 1);
                        continue;
                    }
                    let rec = self.rec(shard, record);
                    buffered_bytes += rec.fragment.len() + 1;
                    buffer.push_back(rec);
                    first_buffered.get_or_insert_with(Instant::now);
                }
                if buffer.is_empty() {
                    self.stats
                        .iterator_age_ms
                        .store(0, std::sync::atomic::Ordering::Relaxed);
                    shard_stats
                        .iterator_age_ms
                        .store(0, std::sync::atomic::Ordering::Relaxed);
                }
            }
            // A window whose time has passed closes once none of its records wait.
            if let Some(open) = &window
                && now_ms() >= open.end_ms
                && buffer
                    .front()
                    .is_none_or(|r| self.window_start(r.arrival_ms) > open.start_ms)
            {
                let open = window.take();
                if let Some(open) = open {
                    worker
                        .close_window(open, false)
                        .await
                        .map_err(|_| "stopped")?;
                    worker.save(None)?;
                }
            }
            let ready = !buffer.is_empty()
                && (buffer.len() >= self.settings.batch_size
                    || buffered_bytes >= self.settings.max_payload_bytes
                    || first_buffered
                        .is_some_and(|t| t.elapsed() >= self.settings.batching_window)
                    || buffer.len() >= self.options.read_limit);
            if ready {
                let chunk: Vec<Rec> = buffer.drain(..).collect();
                buffered_bytes = 0;
                first_buffered = None;
                let last = chunk.last().map(|r| r.sequence_number.clone());
                let result = if self.settings.tumbling_window.is_some() {
                    worker.process_windows(chunk, &mut window).await
                } else {
                    worker.process_chunk(chunk).await
                };
                if result.is_err() {
                    return Ok(());
                }
                if let Some(last) = last {
                    worker.checkpoint = Some(last);
                }
                // Filtered records after the last buffered one are done too.
                if let Some(seen) = seen_past_buffer.take() {
                    worker.checkpoint = Some(seen);
                }
                worker.save(window.as_ref())?;
            } else if buffer.is_empty()
                && let Some(seen) = seen_past_buffer.take()
            {
                // Only filtered records were read: move past them.
                worker.checkpoint = Some(seen);
                worker.save(window.as_ref())?;
            }
            if !got {
                let pause = if buffer.is_empty() {
                    self.options.poll_interval
                } else {
                    self.options.poll_interval.min(Duration::from_millis(20))
                };
                let _ = tokio::time::timeout(pause, stop.changed()).await;
            }
        }
        Ok(())
    }

    fn window_size(&self) -> Option<i64> {
        self.settings
            .tumbling_window
            .map(|w| i64::try_from(w.as_millis()).unwrap_or(i64::MAX).max(1))
    }

    fn window_start(&self, arrival_ms: i64) -> i64 {
        self.window_size()
            .map_or(0, |size| arrival_ms - arrival_ms.rem_euclid(size))
    }

    fn passes(&self, record: &StreamRecord) -> bool {
        let view = filter::record_view(
            &record.partition_key,
            &record.sequence_number,
            record.arrival_ms,
            &record.data,
        );
        filter::passes(&self.settings.filters, &view)
    }

    fn rec(&self, shard: &str, record: StreamRecord) -> Rec {
        #[allow(clippy::cast_precision_loss)]
        let arrival = record.arrival_ms as f64 / 1000.0;
        let fragment = json!({
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "partitionKey": record.partition_key,
                "sequenceNumber": record.sequence_number,
                "data": base64_simd::STANDARD.encode_to_string(&record.data),
                "approximateArrivalTimestamp": arrival,
            },
            "eventSource": "aws:kinesis",
            "eventVersion": "1.0",
            "eventID": format!("{shard}:{}", record.sequence_number),
            "eventName": "aws:kinesis:record",
            "invokeIdentityArn": "arn:aws:iam::000000000000:role/shardwise-local",
            "awsRegion": "us-east-1",
            "eventSourceARN": self.stream_arn,
        })
        .to_string();
        Rec {
            bytes: record_bytes(&record),
            sequence_number: record.sequence_number,
            partition_key: record.partition_key,
            arrival_ms: record.arrival_ms,
            fragment,
        }
    }
}

fn record_bytes(record: &StreamRecord) -> u64 {
    (record.data.len() + record.partition_key.len()) as u64
}

async fn read(reader: &mut ShardReader, limit: usize) -> Result<crate::stream::ReadBatch, String> {
    reader.read(limit).await.map_err(|e| e.to_string())
}

/// Patterns are only used through `Mapping::passes`; re-exported for docs.
pub type FilterPattern = Pattern;

struct ShardWorker {
    mapping: Arc<Mapping>,
    shard_stats: Arc<ShardStats>,
    shard: String,
    checkpoint: Option<String>,
    stop: watch::Receiver<bool>,
}

impl ShardWorker {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn save(&self, window: Option<&OpenWindow>) -> Result<(), String> {
        self.mapping
            .checkpoints
            .save(
                &self.mapping.function,
                &self.shard,
                &Checkpoint {
                    sequence_number: self.checkpoint.clone(),
                    window: window.map(|w| (w.start_ms, w.state.to_string())),
                },
            )
            .map_err(|e| e.to_string())
    }

    /// Split a lane's records into batches: batch size and the payload cap.
    fn batches(&self, records: Vec<Rec>, extra_bytes: usize) -> VecDeque<(Vec<Rec>, u32)> {
        let settings = &self.mapping.settings;
        let mut out = VecDeque::new();
        let mut current: Vec<Rec> = Vec::new();
        let mut bytes = 64 + extra_bytes;
        for rec in records {
            let size = rec.fragment.len() + 1;
            if !current.is_empty()
                && (current.len() >= settings.batch_size
                    || bytes + size > settings.max_payload_bytes)
            {
                out.push_back((std::mem::take(&mut current), 0));
                bytes = 64 + extra_bytes;
            }
            bytes += size;
            current.push(rec);
        }
        if !current.is_empty() {
            out.push_back((current, 0));
        }
        out
    }

    /// Records without windows: lanes by partition key, concurrently.
    async fn process_chunk(&mut self, chunk: Vec<Rec>) -> Result<(), Interrupted> {
        let lanes = self.mapping.lanes();
        if lanes == 1 {
            return self.process_lane(chunk, None, true).await;
        }
        let mut by_lane: Vec<Vec<Rec>> = vec![Vec::new(); lanes];
        for rec in chunk {
            let lane = lane_of(&rec.partition_key, lanes);
            by_lane[lane].push(rec);
        }
        let mapping = self.mapping.clone();
        let futures = by_lane
            .into_iter()
            .filter(|l| !l.is_empty())
            .map(|records| {
                let mut lane = ShardWorker {
                    mapping: mapping.clone(),
                    shard_stats: self.shard_stats.clone(),
                    shard: self.shard.clone(),
                    checkpoint: None,
                    stop: self.stop.clone(),
                };
                async move { lane.process_lane(records, None, false).await }
            });
        let results = futures::future::join_all(futures).await;
        if results.iter().any(Result::is_err) {
            return Err(Interrupted);
        }
        Ok(())
    }

    /// Records with tumbling windows: grouped by window, in order.
    async fn process_windows(
        &mut self,
        chunk: Vec<Rec>,
        window: &mut Option<OpenWindow>,
    ) -> Result<(), Interrupted> {
        let mut groups: Vec<(i64, Vec<Rec>)> = Vec::new();
        for rec in chunk {
            let start = self.mapping.window_start(rec.arrival_ms);
            // A record that arrives late for a window already open joins the open one.
            let start = window.as_ref().map_or(start, |w| start.max(w.start_ms));
            match groups.last_mut() {
                Some((s, records)) if *s >= start => records.push(rec),
                _ => groups.push((start, vec![rec])),
            }
        }
        let size = self.mapping.window_size().unwrap_or(1);
        for (start, records) in groups {
            if let Some(open) = window.as_ref()
                && open.start_ms != start
                && let Some(open) = window.take()
            {
                self.close_window(open, false).await?;
                self.save(None).map_err(|_| Interrupted)?;
            }
            if window.is_none() {
                self.mapping
                    .stats
                    .open_windows
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let open = window.get_or_insert_with(|| OpenWindow {
                start_ms: start,
                end_ms: start + size,
                state: json!({}),
            });
            self.process_lane(records, Some(open), true).await?;
        }
        Ok(())
    }

    /// The final invoke of a window, retried until it succeeds (Lambda suspends the shard until
    /// it does) or the runner stops.
    async fn close_window(&mut self, open: OpenWindow, early: bool) -> Result<(), Interrupted> {
        let mut attempt = 0u32;
        loop {
            if self.stopped() {
                return Err(Interrupted);
            }
            // An early end is a segment's, not the window's: the same window goes on with a
            // fresh state, so the invoke is not the window's final one (the two flags are never
            // set together, as in AWS's events).
            let payload = self.event(&[], Some(&open), !early, early);
            MappingStats::add(&self.mapping.stats.invokes, 1);
            let outcome = self.mapping.invoker.invoke(payload).await;
            match outcome {
                InvokeOutcome::Response(_) => {
                    MappingStats::add(&self.mapping.stats.windows_closed, 1);
                    if early {
                        MappingStats::add(&self.mapping.stats.windows_terminated_early, 1);
                    } else {
                        self.mapping
                            .stats
                            .open_windows
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    return Ok(());
                }
                _ => {
                    MappingStats::add(&self.mapping.stats.function_errors, 1);
                    MappingStats::add(&self.mapping.stats.retries, 1);
                    attempt += 1;
                    self.pause(attempt).await;
                }
            }
        }
    }

    async fn pause(&self, attempt: u32) {
        let options = &self.mapping.options;
        let wait = options
            .retry_backoff
            .saturating_mul(1u32 << attempt.min(16).saturating_sub(1))
            .min(options.max_retry_backoff);
        let mut stop = self.stop.clone();
        let _ = tokio::time::timeout(wait, stop.changed()).await;
    }

    fn exhausted(&self, attempts: u32) -> bool {
        self.mapping
            .settings
            .max_retry_attempts
            .is_some_and(|max| attempts > max)
    }

    /// One lane: batches in order, each until it settles.
    async fn process_lane(
        &mut self,
        records: Vec<Rec>,
        mut window: Option<&mut OpenWindow>,
        checkpoint_each: bool,
    ) -> Result<(), Interrupted> {
        let stats = self.mapping.stats.clone();
        let state_bytes = window.as_ref().map_or(0, |w| w.state.to_string().len());
        let mut queue = self.batches(records, state_bytes);
        while let Some((mut batch, mut attempts)) = queue.pop_front() {
            loop {
                if self.stopped() {
                    return Err(Interrupted);
                }
                if let Some(max_age) = self.mapping.settings.max_record_age {
                    let limit = now_ms() - i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
                    let expired = batch.iter().take_while(|r| r.arrival_ms < limit).count();
                    if expired > 0 {
                        let rest = batch.split_off(expired);
                        self.discard(&batch, "RecordAgeExceeded", None, attempts)
                            .await;
                        // Past the dropped records, as after any discard: a restart must not
                        // send their on-failure record again.
                        self.after_discard(&batch, checkpoint_each, window.as_deref())?;
                        batch = rest;
                        if batch.is_empty() {
                            break;
                        }
                    }
                }
                let payload = self.event(&batch, window.as_deref(), false, false);
                // Batches were cut with the state's size when the lane started; a state that grew
                // since can push an event past the 6 MB invoke limit, so such a batch is halved
                // first, as Lambda sizes each batch with the state it sends.
                if payload.len() > self.mapping.settings.max_payload_bytes && batch.len() > 1 {
                    let second = batch.split_off(batch.len() / 2);
                    queue.push_front((second, attempts));
                    continue;
                }
                if let Some(last) = batch.last() {
                    let age = now_ms() - last.arrival_ms;
                    stats
                        .iterator_age_ms
                        .store(age, std::sync::atomic::Ordering::Relaxed);
                    self.shard_stats
                        .iterator_age_ms
                        .store(age, std::sync::atomic::Ordering::Relaxed);
                }
                MappingStats::add(&stats.invokes, 1);
                stats.record_batch(batch.len());
                let outcome = self.mapping.invoker.invoke(payload).await;
                let verdict = interpret(
                    &outcome,
                    &batch,
                    self.mapping.settings.report_batch_item_failures,
                    window.is_some(),
                );
                match verdict {
                    Verdict::Success { state } => {
                        self.acknowledge(&batch, checkpoint_each, window.as_deref());
                        if let (Some(w), Some(state)) = (window.as_deref_mut(), state) {
                            w.state = state;
                            self.check_state_size(w).await?;
                        }
                        if checkpoint_each {
                            self.save(window.as_deref()).map_err(|_| Interrupted)?;
                        }
                        break;
                    }
                    Verdict::Partial { from, state } => {
                        MappingStats::add(&stats.partial_failures, 1);
                        let rest = batch.split_off(from);
                        self.acknowledge(&batch, checkpoint_each, window.as_deref());
                        if let (Some(w), Some(state)) = (window.as_deref_mut(), state) {
                            w.state = state;
                            // A state returned with failures is committed too, so it is held
                            // to the same limit as one returned on success.
                            self.check_state_size(w).await?;
                        }
                        if checkpoint_each {
                            self.save(window.as_deref()).map_err(|_| Interrupted)?;
                        }
                        batch = rest;
                        attempts += 1;
                        let error = "PartialBatchItemFailure";
                        if self
                            .retry_or_give_up(
                                &batch,
                                attempts,
                                error,
                                checkpoint_each,
                                window.as_deref(),
                            )
                            .await?
                        {
                            break;
                        }
                    }
                    Verdict::Failure { error_type } => {
                        MappingStats::add(&stats.function_errors, 1);
                        if self.mapping.settings.bisect_on_error && batch.len() > 1 {
                            MappingStats::add(&stats.bisects, 1);
                            let second = batch.split_off(batch.len() / 2);
                            queue.push_front((second, attempts));
                            queue.push_front((batch, attempts));
                            break;
                        }
                        attempts += 1;
                        if self
                            .retry_or_give_up(
                                &batch,
                                attempts,
                                &error_type,
                                checkpoint_each,
                                window.as_deref(),
                            )
                            .await?
                        {
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// After a failed attempt: give the batch up once its retries are exhausted (on-failure
    /// record, checkpoint past it) and say so, or count a retry and wait before it.
    async fn retry_or_give_up(
        &mut self,
        batch: &[Rec],
        attempts: u32,
        function_error: &str,
        checkpoint_each: bool,
        window: Option<&OpenWindow>,
    ) -> Result<bool, Interrupted> {
        if self.exhausted(attempts) {
            self.discard(
                batch,
                "RetryAttemptsExhausted",
                Some(function_error),
                attempts,
            )
            .await;
            self.after_discard(batch, checkpoint_each, window)?;
            return Ok(true);
        }
        MappingStats::add(&self.mapping.stats.retries, 1);
        self.pause(attempts).await;
        Ok(false)
    }

    fn after_discard(
        &mut self,
        batch: &[Rec],
        checkpoint_each: bool,
        window: Option<&OpenWindow>,
    ) -> Result<(), Interrupted> {
        if checkpoint_each {
            if let Some(last) = batch.last() {
                self.checkpoint = Some(last.sequence_number.clone());
            }
            self.save(window).map_err(|_| Interrupted)?;
        }
        Ok(())
    }

    async fn check_state_size(&mut self, window: &mut OpenWindow) -> Result<(), Interrupted> {
        if window.state.to_string().len() <= self.mapping.settings.max_window_state_bytes {
            return Ok(());
        }
        // Past 1 MB Lambda ends the window early: a final invoke flagged
        // isWindowTerminatedEarly, then the same window goes on with a fresh state.
        self.close_window(window.clone(), true).await?;
        window.state = json!({});
        Ok(())
    }

    fn acknowledge(&mut self, batch: &[Rec], checkpoint_each: bool, _window: Option<&OpenWindow>) {
        let stats = &self.mapping.stats;
        let bytes: u64 = batch.iter().map(|r| r.bytes).sum();
        MappingStats::add(&stats.records_out, batch.len() as u64);
        MappingStats::add(&stats.bytes_out, bytes);
        MappingStats::add(&self.shard_stats.records_out, batch.len() as u64);
        MappingStats::add(&self.shard_stats.bytes_out, bytes);
        let now = now_ms();
        stats.record_latencies(batch.iter().map(|r| now - r.arrival_ms));
        if checkpoint_each && let Some(last) = batch.last() {
            self.checkpoint = Some(last.sequence_number.clone());
        }
    }

    /// Give up on `batch`: count it and send Lambda's on-failure record (metadata only).
    async fn discard(
        &self,
        batch: &[Rec],
        condition: &str,
        function_error: Option<&str>,
        attempts: u32,
    ) {
        let stats = &self.mapping.stats;
        MappingStats::add(&stats.discarded, batch.len() as u64);
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return;
        };
        let body = json!({
            "requestContext": {
                "requestId": crate::function::request_id(),
                "functionArn": format!("arn:aws:lambda:us-east-1:000000000000:function:{}", self.mapping.function),
                "condition": condition,
                "approximateInvokeCount": attempts.max(1),
            },
            "responseContext": {
                "statusCode": 200,
                "executedVersion": "$LATEST",
                "functionError": function_error.unwrap_or("Unhandled"),
            },
            "version": "1.0",
            "timestamp": rfc3339_ms(now_ms()),
            "KinesisBatchInfo": {
                "shardId": self.shard,
                "startSequenceNumber": first.sequence_number,
                "endSequenceNumber": last.sequence_number,
                "approximateArrivalOfFirstRecord": rfc3339_ms(first.arrival_ms),
                "approximateArrivalOfLastRecord": rfc3339_ms(last.arrival_ms),
                "batchSize": batch.len(),
                "streamArn": self.mapping.stream_arn,
            },
        })
        .to_string();
        if !matches!(self.mapping.on_failure, OnFailure::None) {
            match self.mapping.on_failure.send(body).await {
                Ok(()) => MappingStats::add(&stats.on_failure_records, 1),
                Err(error) => tracing::error!(%error, "on-failure destination refused the record"),
            }
        }
    }

    fn event(
        &self,
        batch: &[Rec],
        window: Option<&OpenWindow>,
        is_final: bool,
        early: bool,
    ) -> Vec<u8> {
        let size: usize = batch.iter().map(|r| r.fragment.len() + 1).sum();
        let mut out = String::with_capacity(size + 256);
        out.push_str("{\"Records\":[");
        for (i, rec) in batch.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&rec.fragment);
        }
        out.push(']');
        if let Some(w) = window {
            let extra = json!({
                "window": {"start": rfc3339_s(w.start_ms), "end": rfc3339_s(w.end_ms)},
                "state": w.state,
                "shardId": self.shard,
                "eventSourceARN": self.mapping.stream_arn,
                "isFinalInvokeForWindow": is_final,
                "isWindowTerminatedEarly": early,
            })
            .to_string();
            out.push(',');
            // `extra` is an object: splice its members in after `"Records":[…]`.
            out.push_str(extra.get(1..).unwrap_or("}"));
        } else {
            out.push('}');
        }
        out.into_bytes()
    }
}

fn rfc3339_s(ms: i64) -> String {
    let text = rfc3339_ms(ms);
    // Lambda sends window bounds with second precision: 2020-12-09T07:04:00Z.
    match text.find('.') {
        Some(dot) => format!("{}Z", &text[..dot]),
        None => text,
    }
}

/// The lane of a partition key (its MD5 hash, as Kinesis hashes it, modulo the lanes).
fn lane_of(partition_key: &str, lanes: usize) -> usize {
    use md5::{Digest, Md5};
    let digest = Md5::digest(partition_key.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    usize::try_from(u64::from_be_bytes(bytes) % lanes as u64).unwrap_or(0)
}

/// Read the function's answer as the mapping does.
fn interpret(outcome: &InvokeOutcome, batch: &[Rec], rbif: bool, window: bool) -> Verdict {
    let body = match outcome {
        InvokeOutcome::Response(body) => body,
        other => {
            return Verdict::Failure {
                error_type: other.error_type().unwrap_or("Unhandled").to_owned(),
            };
        }
    };
    let parsed: Option<Value> = if body.iter().all(u8::is_ascii_whitespace) {
        Some(Value::Null)
    } else {
        serde_json::from_slice(body).ok()
    };
    let state = parsed
        .as_ref()
        .and_then(|p| p.get("state"))
        .filter(|s| !s.is_null())
        .cloned();
    if window && state.is_none() {
        // With tumbling windows the response must carry `state`.
        return Verdict::Failure {
            error_type: "Runtime.MissingWindowState".to_owned(),
        };
    }
    if !rbif {
        return Verdict::Success { state };
    }
    let Some(parsed) = parsed else {
        return Verdict::Failure {
            error_type: "Runtime.InvalidBatchItemFailures".to_owned(),
        };
    };
    let failures = match parsed.get("batchItemFailures") {
        None | Some(Value::Null) => return Verdict::Success { state },
        Some(Value::Array(items)) if items.is_empty() => return Verdict::Success { state },
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Verdict::Failure {
                error_type: "Runtime.InvalidBatchItemFailures".to_owned(),
            };
        }
    };
    let mut lowest: Option<usize> = None;
    for item in failures {
        let id = item.get("itemIdentifier").and_then(Value::as_str);
        let Some(position) = id
            .filter(|id| !id.is_empty())
            .and_then(|id| batch.iter().position(|r| r.sequence_number == id))
        else {
            // Empty, null, a wrong key name or a sequence number not in the batch: the whole
            // batch failed.
            return Verdict::Failure {
                error_type: "Runtime.InvalidBatchItemFailures".to_owned(),
            };
        };
        lowest = Some(lowest.map_or(position, |l: usize| l.min(position)));
    }
    match lowest {
        Some(from) => Verdict::Partial { from, state },
        None => Verdict::Success { state },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn recs(n: usize) -> Vec<Rec> {
        (0..n)
            .map(|i| Rec {
                sequence_number: format!("{i:056}"),
                partition_key: "k".into(),
                arrival_ms: 0,
                bytes: 1,
                fragment: "{}".into(),
            })
            .collect()
    }

    #[test]
    fn responses_are_read_as_lambda_reads_them() {
        let batch = recs(3);
        let ok = |body: &str| InvokeOutcome::Response(body.as_bytes().to_vec());
        for body in [
            "",
            "null",
            "{}",
            r#"{"batchItemFailures":[]}"#,
            r#"{"batchItemFailures":null}"#,
        ] {
            assert_eq!(
                interpret(&ok(body), &batch, true, false),
                Verdict::Success { state: None },
                "{body}"
            );
        }
        let two = format!(
            r#"{{"batchItemFailures":[{{"itemIdentifier":"{}"}},{{"itemIdentifier":"{}"}}]}}"#,
            batch[2].sequence_number, batch[1].sequence_number
        );
        assert_eq!(
            interpret(&ok(&two), &batch, true, false),
            Verdict::Partial {
                from: 1,
                state: None
            }
        );
        // Without RBIF the answer is not looked at.
        assert_eq!(
            interpret(&ok(&two), &batch, false, false),
            Verdict::Success { state: None }
        );
        for bad in [
            r#"{"batchItemFailures":[{"itemIdentifier":""}]}"#,
            r#"{"batchItemFailures":[{"itemIdentifier":null}]}"#,
            r#"{"batchItemFailures":[{"id":"1"}]}"#,
            r#"{"batchItemFailures":[{"itemIdentifier":"999"}]}"#,
            r#"{"batchItemFailures":"x"}"#,
        ] {
            assert!(
                matches!(
                    interpret(&ok(bad), &batch, true, false),
                    Verdict::Failure { .. }
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            interpret(&ok("{}"), &batch, true, true),
            Verdict::Failure { .. }
        ));
        assert_eq!(
            interpret(&ok(r#"{"state":{"n":1}}"#), &batch, true, true),
            Verdict::Success {
                state: Some(json!({"n": 1}))
            }
        );
        assert!(matches!(
            interpret(&InvokeOutcome::Timeout, &batch, true, false),
            Verdict::Failure { .. }
        ));
    }

    #[test]
    fn lanes_keep_a_key_together() {
        for key in ["a", "b", "card-17"] {
            assert_eq!(lane_of(key, 4), lane_of(key, 4));
            assert!(lane_of(key, 4) < 4);
        }
        assert_eq!(rfc3339_s(60_000), "1970-01-01T00:01:00Z");
    }
}
