//! Putting records on a Kinesis stream: `PutRecords` batching, per-record retries, a report of
//! what could not be put.
//!
//! `PutRecords` is not all-or-nothing: a call that succeeds may still have refused some of its
//! records (`FailedRecordCount`, with an `ErrorCode` per entry, typically
//! `ProvisionedThroughputExceededException` when a shard is hot). A producer that only checks the
//! call's status silently loses those records. [`Producer`] owns what is the same for every
//! backend — Kinesis's limits (500 records and 5 MiB per call, 1 MiB per record including its
//! partition key), retrying exactly the refused entries with backoff from [`crate::retry`], and
//! the final per-record report — while a [`StreamWriter`] only makes one call. The AWS
//! implementation is `shardwise_aws::KinesisStreamWriter`; [`InMemoryStreamWriter`] backs tests
//! and can play faults.
//!
//! # Ordering
//! Records of one partition key reach their shard in the order given only if nothing is retried:
//! a refused record is put again after the records that were accepted in the same round, as with
//! the KPL. Callers that need strict order per key put one record per key at a time.
//!
//! # KPL aggregation
//! [`aggregate_by_partition_key`] packs small records into KPL aggregates ([`crate::kpl`]), one
//! partition key per aggregate so every user record still lands on its own key's shard.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;

use futures::StreamExt;
use tokio::time::Instant;

use crate::handler::ErrorClass;
use crate::kpl::{self, AggregateEntry};
use crate::retry::ExponentialBackoff;

/// Kinesis's limits on `PutRecords`, enforced here because emulators do not all enforce them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutRecordsLimits {
    pub max_records_per_call: usize,
    /// Data plus partition keys of all records of one call.
    pub max_bytes_per_call: usize,
    /// Data plus partition key of one record.
    pub max_record_bytes: usize,
}

impl Default for PutRecordsLimits {
    fn default() -> Self {
        Self {
            max_records_per_call: 500,
            max_bytes_per_call: 5 * 1024 * 1024,
            max_record_bytes: 1024 * 1024,
        }
    }
}

/// Longest partition key, in Unicode characters.
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// One record to put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerRecord {
    pub partition_key: String,
    /// Decimal 128-bit hash key that overrides the partition key's hash (picks the shard).
    pub explicit_hash_key: Option<String>,
    pub data: Vec<u8>,
}

impl ProducerRecord {
    pub fn new(partition_key: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        Self {
            partition_key: partition_key.into(),
            explicit_hash_key: None,
            data: data.into(),
        }
    }

    pub fn with_explicit_hash_key(mut self, explicit_hash_key: impl Into<String>) -> Self {
        self.explicit_hash_key = Some(explicit_hash_key.into());
        self
    }

    /// What the record counts against Kinesis's size limits.
    pub fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }

    fn entry(&self) -> PutEntry<'_> {
        PutEntry {
            partition_key: &self.partition_key,
            explicit_hash_key: self.explicit_hash_key.as_deref(),
            data: &self.data,
        }
    }
}

/// One entry of a `PutRecords` call, borrowed from a [`ProducerRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutEntry<'a> {
    pub partition_key: &'a str,
    pub explicit_hash_key: Option<&'a str>,
    pub data: &'a [u8],
}

/// What Kinesis answered for one entry of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryResult {
    Put {
        shard_id: String,
        sequence_number: String,
    },
    /// Refused. The writer says whether another attempt may pass: which codes are worth it is
    /// the backend's knowledge (`shardwise_aws::retryable` for Kinesis), not the producer's.
    Failed {
        error_code: String,
        message: String,
        class: ErrorClass,
    },
}

/// A `PutRecords` call that failed as a whole (network, throttling, missing stream).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("PutRecords failed: {message}")]
pub struct CallError {
    pub class: ErrorClass,
    /// The service's error code, when there is one.
    pub code: Option<String>,
    pub message: String,
}

/// What one call answered.
type CallAnswer = Result<Vec<EntryResult>, CallError>;

/// Makes one `PutRecords` call: at most [`PutRecordsLimits`] worth of entries, already checked.
/// Returns one result per entry, same positions.
pub trait StreamWriter: Send + Sync {
    fn put_records(
        &self,
        entries: &[PutEntry<'_>],
    ) -> impl Future<Output = Result<Vec<EntryResult>, CallError>> + Send;
}

/// How one record ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    Put {
        shard_id: String,
        sequence_number: String,
        attempts: u32,
    },
    /// Not put. `error_code` is Kinesis's (`ProvisionedThroughputExceededException`, …), the
    /// call's, or one of ours for records refused before sending: `RecordTooLarge`,
    /// `InvalidPartitionKey`, `InvalidExplicitHashKey`.
    Failed {
        error_code: String,
        message: String,
        attempts: u32,
    },
}

impl PutOutcome {
    pub fn is_put(&self) -> bool {
        matches!(self, Self::Put { .. })
    }
}

/// The outcome of every record given to [`Producer::put`], same positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutReport {
    pub outcomes: Vec<PutOutcome>,
    /// `PutRecords` calls made.
    pub calls: u32,
}

impl PutReport {
    pub fn put_count(&self) -> usize {
        self.outcomes.iter().filter(|o| o.is_put()).count()
    }

    /// Positions and outcomes of the records that were not put.
    pub fn failed(&self) -> impl Iterator<Item = (usize, &PutOutcome)> {
        self.outcomes
            .iter()
            .enumerate()
            .filter(|(_, outcome)| !outcome.is_put())
    }

    pub fn all_put(&self) -> bool {
        self.outcomes.iter().all(PutOutcome::is_put)
    }
}

/// Puts records on a stream in `PutRecords` batches, retrying refused records.
#[derive(Debug)]
pub struct Producer<W> {
    writer: W,
    retry: ExponentialBackoff,
    limits: PutRecordsLimits,
    max_in_flight: usize,
}

impl<W> Producer<W> {
    /// A producer with AWS's limits, the default backoff and 4 calls in flight.
    pub fn new(writer: W) -> Self {
        Self {
            writer,
            retry: ExponentialBackoff::default(),
            limits: PutRecordsLimits::default(),
            max_in_flight: 4,
        }
    }
}

impl<W: StreamWriter> Producer<W> {
    /// The backoff between rounds of retries of refused records.
    pub fn retry(mut self, retry: ExponentialBackoff) -> Self {
        self.retry = retry;
        self
    }

    pub fn limits(mut self, limits: PutRecordsLimits) -> Self {
        self.limits = limits;
        self
    }

    /// `PutRecords` calls made at the same time (at least 1).
    pub fn max_in_flight(mut self, calls: usize) -> Self {
        self.max_in_flight = calls.max(1);
        self
    }

    pub fn writer(&self) -> &W {
        &self.writer
    }

    /// Put `records`, retrying refused ones until they are put, the retry policy gives up, or the
    /// next wait would end after `cutoff`. Never fails as a whole: the report says, per record,
    /// whether it was put.
    pub async fn put(&self, records: &[ProducerRecord], cutoff: Option<Instant>) -> PutReport {
        let mut outcomes: Vec<Option<PutOutcome>> = vec![None; records.len()];
        let mut pending = Vec::with_capacity(records.len());
        for (index, record) in records.iter().enumerate() {
            match self.check(record) {
                Ok(()) => pending.push(index),
                Err((error_code, message)) => {
                    outcomes[index] = Some(PutOutcome::Failed {
                        error_code: error_code.to_owned(),
                        message,
                        attempts: 0,
                    });
                }
            }
        }

        let mut calls = 0;
        let mut attempt = 0;
        // The last refusal of each record still pending, reported if it is never put.
        let mut last_error: Vec<Option<(String, String)>> = vec![None; records.len()];
        while !pending.is_empty() {
            attempt += 1;
            let chunks = self.chunks(records, &pending);
            calls += chunks.len() as u32;
            let answers: Vec<(Vec<usize>, CallAnswer)> = futures::stream::iter(chunks)
                .map(|chunk| async move {
                    let entries: Vec<PutEntry<'_>> =
                        chunk.iter().map(|&i| records[i].entry()).collect();
                    let answer = self.writer.put_records(&entries).await;
                    (chunk, answer)
                })
                .buffered(self.max_in_flight)
                .collect()
                .await;

            let mut again = Vec::new();
            for (chunk, answer) in answers {
                match answer {
                    Ok(results) => {
                        let mut results = results.into_iter();
                        for index in chunk {
                            match results.next() {
                                Some(EntryResult::Put {
                                    shard_id,
                                    sequence_number,
                                }) => {
                                    outcomes[index] = Some(PutOutcome::Put {
                                        shard_id,
                                        sequence_number,
                                        attempts: attempt,
                                    });
                                }
                                Some(EntryResult::Failed {
                                    error_code,
                                    message,
                                    class: ErrorClass::Permanent,
                                }) => {
                                    outcomes[index] = Some(PutOutcome::Failed {
                                        error_code,
                                        message,
                                        attempts: attempt,
                                    });
                                }
                                Some(EntryResult::Failed {
                                    error_code,
                                    message,
                                    class: ErrorClass::Retryable,
                                }) => {
                                    last_error[index] = Some((error_code, message));
                                    again.push(index);
                                }
                                // A backend that answers fewer entries than it was given: the
                                // missing ones are unknown, so they are tried again.
                                None => {
                                    last_error[index] = Some((
                                        "MissingResult".to_owned(),
                                        "the call returned no result for this record".to_owned(),
                                    ));
                                    again.push(index);
                                }
                            }
                        }
                    }
                    Err(error) => {
                        let code = error
                            .code
                            .clone()
                            .unwrap_or_else(|| "CallFailed".to_owned());
                        for index in chunk {
                            if error.class == ErrorClass::Retryable {
                                last_error[index] = Some((code.clone(), error.message.clone()));
                                again.push(index);
                            } else {
                                outcomes[index] = Some(PutOutcome::Failed {
                                    error_code: code.clone(),
                                    message: error.message.clone(),
                                    attempts: attempt,
                                });
                            }
                        }
                    }
                }
            }
            if again.is_empty() {
                break;
            }
            again.sort_unstable();
            let wait = self.retry.backoff(attempt);
            let resume = wait.map(|wait| Instant::now() + wait);
            match resume {
                Some(resume) if cutoff.is_none_or(|cutoff| resume < cutoff) => {
                    tracing::debug!(
                        refused = again.len(),
                        attempt,
                        "PutRecords refused records: retrying"
                    );
                    tokio::time::sleep_until(resume).await;
                    pending = again;
                }
                _ => {
                    for index in again {
                        let (error_code, message) = last_error[index].take().unwrap_or_default();
                        outcomes[index] = Some(PutOutcome::Failed {
                            error_code,
                            message,
                            attempts: attempt,
                        });
                    }
                    break;
                }
            }
        }

        PutReport {
            outcomes: outcomes
                .into_iter()
                .map(|outcome| {
                    outcome.unwrap_or_else(|| PutOutcome::Failed {
                        error_code: "NotAttempted".to_owned(),
                        message: "the record was never sent".to_owned(),
                        attempts: 0,
                    })
                })
                .collect(),
            calls,
        }
    }

    /// Why a record can never be put, checked before any call.
    fn check(&self, record: &ProducerRecord) -> Result<(), (&'static str, String)> {
        let key_chars = record.partition_key.chars().count();
        if key_chars == 0 || key_chars > MAX_PARTITION_KEY_CHARS {
            return Err((
                "InvalidPartitionKey",
                format!("partition key has {key_chars} characters; Kinesis takes 1 to 256"),
            ));
        }
        if record.size() > self.limits.max_record_bytes {
            return Err((
                "RecordTooLarge",
                format!(
                    "data and partition key are {} bytes; Kinesis takes at most {}",
                    record.size(),
                    self.limits.max_record_bytes
                ),
            ));
        }
        if let Some(key) = &record.explicit_hash_key
            && (key.is_empty()
                || !key.bytes().all(|b| b.is_ascii_digit())
                || key.parse::<u128>().is_err())
        {
            return Err((
                "InvalidExplicitHashKey",
                format!("explicit hash key {key:?} is not a decimal number from 0 to 2^128-1"),
            ));
        }
        Ok(())
    }

    /// Split `pending` (in order) into calls within the limits.
    fn chunks(&self, records: &[ProducerRecord], pending: &[usize]) -> Vec<Vec<usize>> {
        let mut chunks = Vec::new();
        let mut current = Vec::new();
        let mut bytes = 0;
        for &index in pending {
            let size = records[index].size();
            if !current.is_empty()
                && (current.len() == self.limits.max_records_per_call
                    || bytes + size > self.limits.max_bytes_per_call)
            {
                chunks.push(std::mem::take(&mut current));
                bytes = 0;
            }
            current.push(index);
            bytes += size;
        }
        if !current.is_empty() {
            chunks.push(current);
        }
        chunks
    }
}

/// Pack records into KPL aggregates of at most `max_aggregate_bytes` (data plus partition key;
/// use 1 MiB or less), one partition key per aggregate so records keep their shard. Returns the
/// aggregates and, for each, the positions in `records` it carries. A record of a key that occurs
/// once is passed through unaggregated (an aggregate of one only adds bytes), as is a record too
/// large to share an aggregate.
pub fn aggregate_by_partition_key(
    records: &[ProducerRecord],
    max_aggregate_bytes: usize,
) -> Vec<(ProducerRecord, Vec<usize>)> {
    // Per user record: tag, length and the record's own fields (two key indexes, data) cost at
    // most this much more than its data on the wire.
    const PER_RECORD_OVERHEAD: usize = 32;
    let envelope = kpl::MIN_AGGREGATE_LEN + 8;

    let mut by_key: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut positions: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (index, record) in records.iter().enumerate() {
        let slot = *positions
            .entry(record.partition_key.as_str())
            .or_insert_with(|| {
                by_key.push((record.partition_key.as_str(), Vec::new()));
                by_key.len() - 1
            });
        by_key[slot].1.push(index);
    }

    let mut out = Vec::new();
    let flush = |group: &mut Vec<usize>, out: &mut Vec<(ProducerRecord, Vec<usize>)>| {
        match group.as_slice() {
            [] => {}
            [single] => out.push((records[*single].clone(), vec![*single])),
            many => {
                let entries: Vec<AggregateEntry<'_>> = many
                    .iter()
                    .map(|&i| AggregateEntry {
                        partition_key: &records[i].partition_key,
                        explicit_hash_key: records[i].explicit_hash_key.as_deref(),
                        data: &records[i].data,
                    })
                    .collect();
                let first = &records[many[0]];
                let aggregate = ProducerRecord {
                    partition_key: first.partition_key.clone(),
                    explicit_hash_key: first.explicit_hash_key.clone(),
                    data: kpl::aggregate(&entries),
                };
                out.push((aggregate, many.to_vec()));
            }
        }
        group.clear();
    };
    for (key, indexes) in by_key {
        let key_cost = key.len() * 2 + envelope;
        let mut group = Vec::new();
        let mut bytes = key_cost;
        for index in indexes {
            let cost = records[index].data.len()
                + records[index]
                    .explicit_hash_key
                    .as_ref()
                    .map_or(0, String::len)
                + PER_RECORD_OVERHEAD;
            if !group.is_empty() && bytes + cost > max_aggregate_bytes {
                flush(&mut group, &mut out);
                bytes = key_cost;
            }
            group.push(index);
            bytes += cost;
        }
        flush(&mut group, &mut out);
    }
    out
}

/// A fault the in-memory writer plays on one of its next calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriterFault {
    /// The whole call fails.
    FailCall { class: ErrorClass, code: String },
    /// The entries at these positions of the call are refused with `error_code`, retryable or
    /// not as `class` says.
    RefuseEntries {
        positions: Vec<usize>,
        error_code: String,
        class: ErrorClass,
    },
}

/// A record the in-memory writer accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub shard_id: String,
    pub sequence_number: String,
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Vec<u8>,
}

/// Keeps put records in memory (one shard), plays queued faults, remembers each call's size.
#[derive(Debug, Default)]
pub struct InMemoryStreamWriter {
    state: Mutex<InMemoryState>,
}

#[derive(Debug, Default)]
struct InMemoryState {
    records: Vec<StoredRecord>,
    faults: VecDeque<WriterFault>,
    calls: Vec<(usize, usize)>,
}

impl InMemoryStreamWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queue a fault for the next call that has none yet.
    pub fn inject(&self, fault: WriterFault) {
        self.lock().faults.push_back(fault);
    }

    /// Records accepted so far, in the order they were accepted.
    pub fn records(&self) -> Vec<StoredRecord> {
        self.lock().records.clone()
    }

    /// (entries, bytes of data and partition keys) of every call, in order.
    pub fn calls(&self) -> Vec<(usize, usize)> {
        self.lock().calls.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InMemoryState> {
        // A panicking test thread poisons nothing we rely on.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl StreamWriter for InMemoryStreamWriter {
    async fn put_records(&self, entries: &[PutEntry<'_>]) -> Result<Vec<EntryResult>, CallError> {
        let mut state = self.lock();
        let bytes = entries
            .iter()
            .map(|e| e.data.len() + e.partition_key.len())
            .sum();
        state.calls.push((entries.len(), bytes));
        let refused = match state.faults.pop_front() {
            Some(WriterFault::FailCall { class, code }) => {
                return Err(CallError {
                    class,
                    message: format!("{code}: injected"),
                    code: Some(code),
                });
            }
            Some(WriterFault::RefuseEntries {
                positions,
                error_code,
                class,
            }) => Some((positions, error_code, class)),
            None => None,
        };
        let mut results = Vec::with_capacity(entries.len());
        for (position, entry) in entries.iter().enumerate() {
            if let Some((positions, code, class)) = &refused
                && positions.contains(&position)
            {
                results.push(EntryResult::Failed {
                    error_code: code.clone(),
                    message: "injected".to_owned(),
                    class: *class,
                });
                continue;
            }
            let sequence_number = format!("{:056}", state.records.len() + 1);
            state.records.push(StoredRecord {
                shard_id: "shardId-000000000000".to_owned(),
                sequence_number: sequence_number.clone(),
                partition_key: entry.partition_key.to_owned(),
                explicit_hash_key: entry.explicit_hash_key.map(str::to_owned),
                data: entry.data.to_vec(),
            });
            results.push(EntryResult::Put {
                shard_id: "shardId-000000000000".to_owned(),
                sequence_number,
            });
        }
        Ok(results)
    }
}
