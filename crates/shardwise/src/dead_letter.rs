//! Dead letters: records that can never be processed, sent to SQS *with their payload*.
//!
//! Lambda's own on-failure destination carries only metadata (shard, sequence range), and by the
//! time someone looks, the records may have aged out of the stream. Our dead letter carries the
//! record itself, so it can be inspected and redriven. A dead letter is the only way a failed
//! record may be acknowledged: if it cannot be sent, the record is reported back to Lambda.
//!
//! [`DeadLetterPublisher`] owns what is the same for every queue (the message shape, SQS's size
//! and count limits, retries of failed entries); a [`DeadLetterSink`] only sends one batch.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;

use serde::Serialize;
use tokio::time::Instant;

use crate::retry::ExponentialBackoff;

/// SQS's limits for `SendMessageBatch`, enforced here because emulators do not (moto accepts a
/// 1 MiB message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqsLimits {
    pub max_message_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_batch_entries: usize,
}

impl Default for SqsLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 256 * 1024,
            max_batch_bytes: 256 * 1024,
            max_batch_entries: 10,
        }
    }
}

/// The error part of a dead letter.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeadLetterError {
    #[serde(rename = "type")]
    pub error_type: String,
    pub message: String,
}

/// One dead letter, as serialized into the SQS message body (camelCase JSON).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter<'a> {
    pub stream_arn: &'a str,
    pub shard_id: &'a str,
    pub sequence_number: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_sequence_number: Option<u64>,
    pub partition_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explicit_hash_key: Option<&'a str>,
    /// Seconds since the epoch, as in the Lambda event.
    pub approximate_arrival_timestamp: f64,
    pub function_name: &'a str,
    pub request_id: &'a str,
    pub error: DeadLetterError,
    /// Handler attempts made in this invocation (0 when the record never reached the handler).
    pub attempts: u32,
    /// The payload, base64. For a whole Kinesis record this is `kinesis.data` exactly as Lambda
    /// delivered it (even when it was not valid base64); for a KPL user record, its own bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Cow<'a, str>>,
    /// True when `data` was left out to fit SQS's size limit: re-read the record from the stream
    /// with `GetShardIterator` `AT_SEQUENCE_NUMBER` `sequenceNumber` on `shardId`.
    pub data_truncated: bool,
    /// Seconds since the epoch.
    pub dead_lettered_at: f64,
}

impl DeadLetter<'_> {
    /// The message body, always within `max_bytes`: with the payload when it fits; else without
    /// it (`dataTruncated`); else, when the error message alone is too long (a handler's error
    /// may quote the payload), with the message cut to fit and marked so. What identifies the
    /// record (stream, shard, sequence numbers, partition key) is never cut: with it the record
    /// can be re-read from the stream. Fails only when even that does not fit, which no record
    /// Kinesis delivered can cause (its identity is a few hundred bytes).
    pub fn to_body(&self, max_bytes: usize) -> Result<String, BodyError> {
        let body = serde_json::to_string(self)?;
        if body.len() <= max_bytes {
            return Ok(body);
        }
        let mut stripped = self.clone();
        stripped.data = None;
        stripped.data_truncated = true;
        let body = serde_json::to_string(&stripped)?;
        if body.len() <= max_bytes {
            return Ok(body);
        }
        let message = std::mem::take(&mut stripped.error.message);
        let bare = serde_json::to_string(&stripped)?.len();
        stripped.error.message = fit_message(&message, max_bytes.saturating_sub(bare));
        let body = serde_json::to_string(&stripped)?;
        if body.len() <= max_bytes {
            Ok(body)
        } else {
            Err(BodyError::TooLarge {
                bytes: bare,
                limit: max_bytes,
            })
        }
    }
}

/// Why a dead letter has no body that SQS would take.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    #[error("dead letter could not be serialized: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error(
        "dead letter is {bytes} bytes without its payload and error message, over the \
         {limit}-byte message limit"
    )]
    TooLarge { bytes: usize, limit: usize },
}

/// `message` cut to fit `budget` bytes once serialized as a JSON string (quotes and escapes
/// included), with a note of its full length when cut. Empty when not even the note fits.
pub fn fit_message(message: &str, budget: usize) -> String {
    let encoded = |text: &str| serde_json::to_string(text).map_or(usize::MAX, |s| s.len());
    if encoded(message) <= budget {
        return message.to_owned();
    }
    let note = format!(" [truncated: {} bytes in all]", message.len());
    let Some(room) = budget.checked_sub(encoded(&note)) else {
        return String::new();
    };
    // The longest prefix whose escaped form fits: escaping only grows text, so count as we go.
    let mut used = 0;
    let mut end = 0;
    for (at, c) in message.char_indices() {
        let width = match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if used + width > room {
            break;
        }
        used += width;
        end = at + c.len_utf8();
    }
    let mut cut = message[..end].to_owned();
    cut.push_str(&note);
    cut
}

/// One message of a `SendMessageBatch` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkEntry {
    /// Unique within the call.
    pub id: String,
    pub body: String,
}

/// An entry the sink did not accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFailure {
    pub id: String,
    /// The request was wrong (e.g. an invalid body); sending it again will not help.
    pub sender_fault: bool,
    pub message: String,
}

/// The whole call failed (network, throttling, missing queue). The backend's own error is the
/// source, so it is never flattened into text before someone needs to read it.
#[derive(Debug, thiserror::Error)]
#[error("dead-letter queue call failed: {source}")]
pub struct SinkError {
    #[source]
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl SinkError {
    pub fn new(source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self {
            source: source.into(),
        }
    }

    /// The backend's error.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }
}

/// Sends one batch of messages (at most [`SqsLimits::max_batch_entries`], already within the size
/// limits). Returns the entries that were not accepted.
pub trait DeadLetterSink: Send + Sync {
    fn send_batch(
        &self,
        entries: &[SinkEntry],
    ) -> impl Future<Output = Result<Vec<EntryFailure>, SinkError>> + Send;
}

/// Why a dead letter was not delivered.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishError {
    #[error("{0}")]
    Body(String),
    #[error("dead-letter queue rejected the message: {0}")]
    Rejected(String),
    #[error(
        "dead-letter queue did not accept the message after {attempts} attempt{}: {last_error}",
        if *attempts == 1 { "" } else { "s" }
    )]
    Exhausted { attempts: u32, last_error: String },
}

/// Sends dead letters in SQS-sized batches, concurrently, retrying what failed.
#[derive(Debug)]
pub struct DeadLetterPublisher<S> {
    sink: S,
    retry: ExponentialBackoff,
    limits: SqsLimits,
}

impl<S: DeadLetterSink> DeadLetterPublisher<S> {
    pub fn new(sink: S, retry: ExponentialBackoff) -> Self {
        Self {
            sink,
            retry,
            limits: SqsLimits::default(),
        }
    }

    pub fn with_limits(mut self, limits: SqsLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }

    pub fn into_sink(self) -> S {
        self.sink
    }

    /// Deliver `letters`; the result for each is in the same position. Nothing runs past
    /// `cutoff`: no retry waits beyond it, and a call still in flight at it is abandoned (its
    /// letters count as not delivered, and may yet arrive: a duplicate, never a loss).
    pub async fn publish(
        &self,
        letters: &[DeadLetter<'_>],
        cutoff: Option<Instant>,
    ) -> Vec<Result<(), PublishError>> {
        let mut results: Vec<Result<(), PublishError>> = Vec::with_capacity(letters.len());
        let mut pending: Vec<SinkEntry> = Vec::new();
        for (i, letter) in letters.iter().enumerate() {
            match letter.to_body(self.limits.max_message_bytes) {
                Ok(body) => {
                    results.push(Ok(()));
                    pending.push(SinkEntry {
                        id: i.to_string(),
                        body,
                    });
                }
                Err(e) => results.push(Err(PublishError::Body(e.to_string()))),
            }
        }
        let mut attempt = 0u32;
        while !pending.is_empty() {
            attempt += 1;
            let chunks = self.chunk(std::mem::take(&mut pending));
            let sent = futures::future::join_all(
                chunks
                    .iter()
                    .map(|chunk| bounded(self.sink.send_batch(chunk), cutoff)),
            )
            .await;
            let mut last_error = String::new();
            for (chunk, outcome) in chunks.into_iter().zip(sent) {
                match outcome {
                    Err(error) => {
                        last_error = error.to_string();
                        pending.extend(chunk);
                    }
                    Ok(failures) => {
                        for failure in failures {
                            let Some(entry) = chunk.iter().find(|e| e.id == failure.id) else {
                                continue;
                            };
                            if failure.sender_fault {
                                if let Some(slot) =
                                    index_of(&entry.id).and_then(|i| results.get_mut(i))
                                {
                                    *slot = Err(PublishError::Rejected(failure.message));
                                }
                            } else {
                                last_error = failure.message;
                                pending.push(entry.clone());
                            }
                        }
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
            let resume = self
                .retry
                .backoff(attempt)
                .map(|wait| Instant::now() + wait);
            match resume {
                Some(resume) if cutoff.is_none_or(|cutoff| resume < cutoff) => {
                    tokio::time::sleep_until(resume).await;
                }
                _ => {
                    for entry in pending.drain(..) {
                        if let Some(slot) = index_of(&entry.id).and_then(|i| results.get_mut(i)) {
                            *slot = Err(PublishError::Exhausted {
                                attempts: attempt,
                                last_error: last_error.clone(),
                            });
                        }
                    }
                }
            }
        }
        results
    }

    /// Split entries into calls that respect the count and size limits.
    fn chunk(&self, entries: Vec<SinkEntry>) -> Vec<Vec<SinkEntry>> {
        let mut chunks: Vec<Vec<SinkEntry>> = Vec::new();
        let mut current: Vec<SinkEntry> = Vec::new();
        let mut current_bytes = 0;
        for entry in entries {
            let size = entry.body.len();
            if !current.is_empty()
                && (current.len() == self.limits.max_batch_entries
                    || current_bytes + size > self.limits.max_batch_bytes)
            {
                chunks.push(std::mem::take(&mut current));
                current_bytes = 0;
            }
            current_bytes += size;
            current.push(entry);
        }
        if !current.is_empty() {
            chunks.push(current);
        }
        chunks
    }
}

/// A sink call that gives up at `cutoff`.
pub(crate) async fn bounded(
    call: impl Future<Output = Result<Vec<EntryFailure>, SinkError>>,
    cutoff: Option<Instant>,
) -> Result<Vec<EntryFailure>, SinkError> {
    match cutoff {
        None => call.await,
        Some(at) => tokio::time::timeout_at(at, call)
            .await
            .unwrap_or_else(|_| Err(SinkError::new(CallAbandoned))),
    }
}

/// A sink call still running at the invocation's cut-off.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("dead-letter queue call still running at the invocation's cut-off: abandoned")]
pub struct CallAbandoned;

fn index_of(id: &str) -> Option<usize> {
    id.parse().ok()
}

/// A fault the in-memory sink plays on its next call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkFault {
    /// The whole call fails.
    FailCall,
    /// The first `n` entries of the call fail (retryable).
    FailEntries(usize),
    /// The first `n` entries are rejected as the sender's fault.
    RejectEntries(usize),
}

/// Keeps dead letters in memory; faults can be queued to test retries.
#[derive(Debug, Default)]
pub struct InMemoryDeadLetterSink {
    messages: Mutex<Vec<String>>,
    faults: Mutex<VecDeque<SinkFault>>,
    calls: Mutex<Vec<usize>>,
}

impl InMemoryDeadLetterSink {
    pub fn new() -> Self {
        Self::default()
    }

    /// Play `fault` on the next call that has not been given one.
    pub fn inject(&self, fault: SinkFault) {
        lock(&self.faults).push_back(fault);
    }

    /// The message bodies received, in order.
    pub fn bodies(&self) -> Vec<String> {
        lock(&self.messages).clone()
    }

    /// The bodies parsed as JSON (bodies that are not JSON are skipped).
    pub fn letters(&self) -> Vec<serde_json::Value> {
        lock(&self.messages)
            .iter()
            .filter_map(|b| serde_json::from_str(b).ok())
            .collect()
    }

    /// The number of entries of every call made, in order.
    pub fn calls(&self) -> Vec<usize> {
        lock(&self.calls).clone()
    }
}

impl DeadLetterSink for InMemoryDeadLetterSink {
    async fn send_batch(&self, entries: &[SinkEntry]) -> Result<Vec<EntryFailure>, SinkError> {
        lock(&self.calls).push(entries.len());
        let fault = lock(&self.faults).pop_front();
        let (failing, sender_fault) = match fault {
            Some(SinkFault::FailCall) => return Err(SinkError::new("injected failure")),
            Some(SinkFault::FailEntries(n)) => (n, false),
            Some(SinkFault::RejectEntries(n)) => (n, true),
            None => (0, false),
        };
        let mut failures = Vec::new();
        let mut messages = lock(&self.messages);
        for (i, entry) in entries.iter().enumerate() {
            if i < failing {
                failures.push(EntryFailure {
                    id: entry.id.clone(),
                    sender_fault,
                    message: "injected entry failure".to_owned(),
                });
            } else {
                messages.push(entry.body.clone());
            }
        }
        Ok(failures)
    }
}

/// Lock a mutex, recovering the data if a panicking thread poisoned it: the sinks' data stays
/// consistent after any single push.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::retry::{ExponentialBackoff, Jitter};
    use std::time::Duration;

    fn letter(i: usize, data: &str) -> DeadLetter<'_> {
        DeadLetter {
            stream_arn: "arn:aws:kinesis:us-east-1:1:stream/s",
            shard_id: "shardId-000000000000",
            sequence_number: if i.is_multiple_of(2) { "100" } else { "101" },
            sub_sequence_number: None,
            partition_key: "k",
            explicit_hash_key: None,
            approximate_arrival_timestamp: 1.5,
            function_name: "fraud",
            request_id: "req",
            error: DeadLetterError {
                error_type: "PayloadNotJson".into(),
                message: "expected value".into(),
            },
            attempts: 1,
            data: Some(Cow::Borrowed(data)),
            data_truncated: false,
            dead_lettered_at: 2.0,
        }
    }

    fn policy(retries: u32) -> ExponentialBackoff {
        ExponentialBackoff {
            initial: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
            max_retries: retries,
            jitter: Jitter::None,
        }
    }

    #[test]
    fn body_has_every_field() {
        let body = letter(0, "aGk=").to_body(1000).unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        for field in [
            "streamArn",
            "shardId",
            "sequenceNumber",
            "partitionKey",
            "approximateArrivalTimestamp",
            "functionName",
            "error",
            "attempts",
            "data",
            "dataTruncated",
        ] {
            assert!(v.get(field).is_some(), "missing {field} in {body}");
        }
        assert_eq!(v["error"]["type"], "PayloadNotJson");
        assert_eq!(v["data"], "aGk=");
        assert!(v.get("subSequenceNumber").is_none());
    }

    #[test]
    fn oversize_payload_is_left_out_with_a_flag() {
        let big = "A".repeat(300 * 1024);
        let body = letter(0, &big).to_body(256 * 1024).unwrap();
        assert!(body.len() < 1024);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["dataTruncated"], true);
        assert!(v.get("data").is_none());
        assert_eq!(v["sequenceNumber"], "100");
    }

    #[tokio::test(start_paused = true)]
    async fn batches_respect_count_and_size_limits() {
        let publisher = DeadLetterPublisher::new(InMemoryDeadLetterSink::new(), policy(0));
        let small: Vec<_> = (0..23).map(|i| letter(i, "aGk=")).collect();
        let results = publisher.publish(&small, None).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(publisher.sink().calls(), vec![10, 10, 3]);

        // Five ~100 KiB letters: at most two fit in one 256 KiB call.
        let payload = "B".repeat(100 * 1024);
        let publisher = DeadLetterPublisher::new(InMemoryDeadLetterSink::new(), policy(0));
        let large: Vec<_> = (0..5).map(|i| letter(i, &payload)).collect();
        let results = publisher.publish(&large, None).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(publisher.sink().calls(), vec![2, 2, 1]);
        for body in publisher.sink().bodies() {
            assert!(body.len() <= 256 * 1024);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_entries_and_calls_are_retried() {
        let publisher = DeadLetterPublisher::new(InMemoryDeadLetterSink::new(), policy(3));
        publisher.sink().inject(SinkFault::FailCall);
        publisher.sink().inject(SinkFault::FailEntries(2));
        let letters: Vec<_> = (0..4).map(|i| letter(i, "aGk=")).collect();
        let results = publisher.publish(&letters, None).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(publisher.sink().bodies().len(), 4);
        assert_eq!(publisher.sink().calls(), vec![4, 4, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn undeliverable_letters_are_reported() {
        let publisher = DeadLetterPublisher::new(InMemoryDeadLetterSink::new(), policy(1));
        publisher.sink().inject(SinkFault::RejectEntries(1));
        let results = publisher
            .publish(&[letter(0, "aGk="), letter(1, "aGk=")], None)
            .await;
        assert!(matches!(results[0], Err(PublishError::Rejected(_))));
        assert!(results[1].is_ok());

        let publisher = DeadLetterPublisher::new(InMemoryDeadLetterSink::new(), policy(1));
        publisher.sink().inject(SinkFault::FailCall);
        publisher.sink().inject(SinkFault::FailCall);
        let letters: Vec<_> = (0..3).map(|i| letter(i, "aGk=")).collect();
        let results = publisher.publish(&letters, None).await;
        for result in &results {
            assert!(matches!(
                result,
                Err(PublishError::Exhausted { attempts: 2, .. })
            ));
        }
        assert!(publisher.sink().bodies().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_past_the_cutoff() {
        let publisher = DeadLetterPublisher::new(InMemoryDeadLetterSink::new(), policy(5));
        publisher.sink().inject(SinkFault::FailCall);
        let letters = vec![letter(0, "aGk=")];
        let cutoff = Instant::now() + Duration::from_millis(5);
        let results = publisher.publish(&letters, Some(cutoff)).await;
        assert!(results[0].is_err());
        assert_eq!(publisher.sink().calls(), vec![1]);
    }
}
