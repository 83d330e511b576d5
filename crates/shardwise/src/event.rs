//! The Lambda Kinesis event, parsed in place, and its records decoded into one arena.
//!
//! Lambda hands a function up to 6 MB of JSON in which every payload is base64. The naive path
//! (`aws_lambda_events` + `serde_json`) allocates dozens of times per record. Here the event's
//! strings borrow from the input buffer (falling back to an owned copy only where a producer
//! escaped a character), every payload is decoded into a single arena sized up front, and
//! [`Record`]s are views into both. A record that cannot be decoded does not fail the batch: it
//! keeps its identity and carries a [`DecodeError`] so the processor can dead-letter it.

use std::borrow::Cow;

use serde::Deserialize;

use crate::kpl::{self, KplError, UserRecord};
use crate::record::{Record, SequenceNumber};

/// The part of the event every Kinesis invocation has. Tumbling-window invocations carry more
/// top-level fields; [`crate::window`] parses those with its own struct around the same records.
#[derive(Debug, Deserialize)]
pub struct KinesisEvent<'a> {
    #[serde(rename = "Records", borrow)]
    pub records: Vec<EventRecord<'a>>,
}

/// One element of `Records`.
#[derive(Debug, Deserialize)]
pub struct EventRecord<'a> {
    #[serde(rename = "eventID", borrow)]
    pub event_id: Cow<'a, str>,
    #[serde(rename = "eventSourceARN", borrow, default)]
    pub event_source_arn: Cow<'a, str>,
    #[serde(borrow)]
    pub kinesis: KinesisData<'a>,
}

/// The `kinesis` object of a record.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KinesisData<'a> {
    #[serde(borrow)]
    pub data: Cow<'a, str>,
    #[serde(borrow)]
    pub partition_key: Cow<'a, str>,
    #[serde(borrow)]
    pub sequence_number: Cow<'a, str>,
    /// Seconds since the Unix epoch, with a fractional part.
    #[serde(default)]
    pub approximate_arrival_timestamp: f64,
}

impl EventRecord<'_> {
    /// The shard, from `eventID` (`shardId-000000000006:4959…`).
    pub fn shard_id(&self) -> &str {
        match self.event_id.split_once(':') {
            Some((shard, _)) => shard,
            None => &self.event_id,
        }
    }
}

/// The whole event could not be read: nothing in it can be attributed to a record.
#[derive(Debug, thiserror::Error)]
#[error("malformed Kinesis event at `{path}`: {message}")]
pub struct EventError {
    pub path: String,
    pub message: String,
}

/// Parse the event JSON. The fast parser runs first; only when it fails is the event parsed again
/// by a path-tracking parser, so the error names the field without slowing the good path.
pub fn parse_event<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, EventError> {
    match sonic_rs::from_slice::<T>(bytes) {
        Ok(event) => Ok(event),
        Err(fast_error) => Err(describe_json_error::<T>(bytes, fast_error.to_string())),
    }
}

/// Re-parse `bytes` with path tracking to say where `T` did not fit.
pub(crate) fn describe_json_error<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    fallback: String,
) -> EventError {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Err(error) => EventError {
            path: error.path().to_string(),
            message: error.inner().to_string(),
        },
        // The two parsers disagree (sonic-rs is stricter on some inputs): report its message.
        Ok(_) => EventError {
            path: ".".to_owned(),
            message: fallback,
        },
    }
}

/// Why one record's bytes could not be made into a record.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("record {shard_id}/{sequence_number}: `kinesis.data` is not valid base64: {detail}")]
    InvalidBase64 {
        shard_id: String,
        sequence_number: String,
        detail: String,
    },
    #[error("record {shard_id}/{sequence_number}: corrupt KPL aggregate: {source}")]
    CorruptAggregate {
        shard_id: String,
        sequence_number: String,
        #[source]
        source: std::sync::Arc<KplError>,
    },
}

impl DecodeError {
    /// The stable name used as `error.type` in dead letters and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::InvalidBase64 { .. } => "InvalidBase64",
            Self::CorruptAggregate { .. } => "CorruptKplAggregate",
        }
    }
}

/// Where one event record's decoded bytes went.
#[derive(Debug)]
enum Decoded {
    Plain { start: usize, end: usize },
    Aggregate { index: usize },
    Failed(DecodeError),
}

/// The decoded payloads of one event: one arena for plain records, the user records of KPL
/// aggregates, and the decode failures.
#[derive(Debug, Default)]
pub struct DecodedBatch {
    arena: Vec<u8>,
    decoded: Vec<Decoded>,
    aggregates: Vec<Vec<UserRecord>>,
}

/// A record with the outcome of decoding it.
#[derive(Debug, Clone)]
pub struct DecodedRecord<'a> {
    pub record: Record<'a>,
    /// `Some` when the record could not be decoded; `record.data` then holds the bytes received.
    pub error: Option<DecodeError>,
}

impl DecodedBatch {
    /// Decode every record of the event. Never fails as a whole: bad records are marked.
    pub fn decode(records: &[EventRecord<'_>]) -> Self {
        let mut batch = Self::default();
        batch.refill(records);
        batch
    }

    /// Decode `records` into this batch's buffers in place of what they held, keeping their
    /// capacity. The processor keeps one batch between invocations: an event-sized arena
    /// allocated and freed every invocation is returned to the kernel by the allocator and
    /// faulted back in on the next (thousands of page faults per large event).
    pub fn refill(&mut self, records: &[EventRecord<'_>]) {
        let capacity: usize = records
            .iter()
            .map(|r| base64_simd::STANDARD.estimated_decoded_length(r.kinesis.data.len()))
            .sum();
        self.arena.clear();
        self.decoded.clear();
        self.aggregates.clear();
        self.arena.reserve(capacity);
        self.decoded.reserve(records.len());
        // One budget for the whole event: many aggregates must not add up to what one may not.
        let mut budget = kpl::ExpansionBudget::event();
        for record in records {
            let decoded = self.decode_one(record, &mut budget);
            self.decoded.push(decoded);
        }
    }

    fn decode_one(
        &mut self,
        record: &EventRecord<'_>,
        budget: &mut kpl::ExpansionBudget,
    ) -> Decoded {
        let start = self.arena.len();
        if let Err(error) =
            base64_simd::STANDARD.decode_append(record.kinesis.data.as_bytes(), &mut self.arena)
        {
            self.arena.truncate(start);
            return Decoded::Failed(DecodeError::InvalidBase64 {
                shard_id: record.shard_id().to_owned(),
                sequence_number: record.kinesis.sequence_number.to_string(),
                detail: base64_fault(record.kinesis.data.as_bytes())
                    .unwrap_or_else(|| error.to_string()),
            });
        }
        let end = self.arena.len();
        let result = kpl::deaggregate_within(&self.arena[start..end], budget);
        if !matches!(result, Ok(None)) {
            // The aggregate's user records are owned; its bytes are no longer needed.
            self.arena.truncate(start);
        }
        match result {
            Ok(None) => Decoded::Plain { start, end },
            Ok(Some(users)) => {
                self.aggregates.push(users);
                Decoded::Aggregate {
                    index: self.aggregates.len() - 1,
                }
            }
            Err(error) => Decoded::Failed(DecodeError::CorruptAggregate {
                shard_id: record.shard_id().to_owned(),
                sequence_number: record.kinesis.sequence_number.to_string(),
                source: std::sync::Arc::new(error),
            }),
        }
    }

    /// Views over the decoded records, in stream order (KPL user records in place of their
    /// aggregate).
    pub fn records<'a>(&'a self, event: &'a [EventRecord<'a>]) -> Vec<DecodedRecord<'a>> {
        let mut out = Vec::with_capacity(event.len());
        for (event_index, (source, decoded)) in event.iter().zip(&self.decoded).enumerate() {
            let base = Record {
                event_index,
                stream_arn: &source.event_source_arn,
                shard_id: source.shard_id(),
                sequence_number: SequenceNumber::new(&source.kinesis.sequence_number),
                sub_sequence_number: None,
                partition_key: &source.kinesis.partition_key,
                explicit_hash_key: None,
                approximate_arrival_ms: seconds_to_millis(
                    source.kinesis.approximate_arrival_timestamp,
                ),
                data: &[],
            };
            match decoded {
                Decoded::Plain { start, end } => out.push(DecodedRecord {
                    record: Record {
                        data: &self.arena[*start..*end],
                        ..base
                    },
                    error: None,
                }),
                Decoded::Aggregate { index } => {
                    for user in &self.aggregates[*index] {
                        out.push(DecodedRecord {
                            record: Record {
                                sub_sequence_number: Some(user.sub_sequence_number),
                                partition_key: &user.partition_key,
                                explicit_hash_key: user.explicit_hash_key.as_deref(),
                                data: &user.data,
                                ..base
                            },
                            error: None,
                        });
                    }
                }
                Decoded::Failed(error) => out.push(DecodedRecord {
                    record: Record {
                        data: source.kinesis.data.as_bytes(),
                        ..base
                    },
                    error: Some(error.clone()),
                }),
            }
        }
        out
    }
}

/// Where `data` stops being standard, padded base64 — base64-simd only says that it does. Runs on
/// the error path alone. `None` if no fault is found here (the decoder's own message is used).
fn base64_fault(data: &[u8]) -> Option<String> {
    let is_alphabet = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
    let body = data.len()
        - data
            .iter()
            .rev()
            .take(2)
            .take_while(|&&b| b == b'=')
            .count();
    if let Some(offset) = data[..body].iter().position(|&b| !is_alphabet(b)) {
        let byte = data[offset];
        let shown = if byte.is_ascii_graphic() || byte == b' ' {
            format!("{:?}", char::from(byte))
        } else {
            format!("byte 0x{byte:02x}")
        };
        return Some(format!(
            "{shown} at offset {offset} of {} is not in the base64 alphabet",
            data.len()
        ));
    }
    if !data.len().is_multiple_of(4) {
        return Some(format!(
            "its length, {}, is not a multiple of 4 (padding missing or data cut short)",
            data.len()
        ));
    }
    // With padding, the last character carries bits past the data's end; they must be zero.
    let unused_bits = match data.len() - body {
        1 => 0b11,
        2 => 0b1111,
        _ => 0,
    };
    let value = |b: u8| match b {
        b'A'..=b'Z' => b - b'A',
        b'a'..=b'z' => b - b'a' + 26,
        b'0'..=b'9' => b - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    if body > 0 && value(data[body - 1]) & unused_bits != 0 {
        return Some(format!(
            "{:?} at offset {} leaves bits set past the data's end (not canonical base64)",
            char::from(data[body - 1]),
            body - 1
        ));
    }
    None
}

fn seconds_to_millis(seconds: f64) -> i64 {
    // `as` saturates on out-of-range floats and maps NaN to 0: acceptable for a timestamp that
    // only feeds metrics and dead-letter metadata.
    (seconds * 1000.0).round() as i64
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::testing::{event_json, plain};

    #[test]
    fn decodes_plain_records_with_identity() {
        let seq = "49590338271490256608559692538361571095921575989136588898";
        let json = event_json(&[plain("card-1", seq, br#"{"a":1}"#)]);
        let event: KinesisEvent<'_> = parse_event(json.as_bytes()).unwrap();
        let batch = DecodedBatch::decode(&event.records);
        let records = batch.records(&event.records);
        assert_eq!(records.len(), 1);
        let r = &records[0].record;
        assert!(records[0].error.is_none());
        assert_eq!(r.data, br#"{"a":1}"#);
        assert_eq!(r.partition_key, "card-1");
        assert_eq!(r.sequence_number.as_str(), seq);
        assert_eq!(r.shard_id, "shardId-000000000000");
        assert_eq!(r.approximate_arrival_ms, 1_700_000_000_123);
    }

    #[test]
    fn bad_base64_marks_the_record_not_the_batch() {
        let json = event_json(&[
            plain("k", "1", b"ok"),
            crate::testing::raw_data("k", "2", "!!not base64!!"),
            plain("k", "3", b""),
        ]);
        let event: KinesisEvent<'_> = parse_event(json.as_bytes()).unwrap();
        let batch = DecodedBatch::decode(&event.records);
        let records = batch.records(&event.records);
        assert_eq!(records.len(), 3);
        assert!(records[0].error.is_none());
        let error = records[1].error.as_ref().unwrap();
        assert_eq!(error.error_type(), "InvalidBase64");
        assert!(error.to_string().contains("record shardId-000000000000/2:"));
        assert_eq!(records[1].record.data, b"!!not base64!!");
        assert_eq!(records[2].record.data, b"");
        assert!(records[2].error.is_none());
    }

    #[test]
    fn base64_faults_say_where() {
        assert_eq!(
            base64_fault(b"!!not base64!!").as_deref(),
            Some("'!' at offset 0 of 14 is not in the base64 alphabet")
        );
        assert_eq!(
            base64_fault(b"b2s=b2s=").as_deref(),
            Some("'=' at offset 3 of 8 is not in the base64 alphabet")
        );
        assert_eq!(
            // MIME-style line breaks: a common producer mistake.
            base64_fault(b"b2sx\nb2s=").as_deref(),
            Some("byte 0x0a at offset 4 of 9 is not in the base64 alphabet")
        );
        assert_eq!(
            base64_fault(&[b'Y', 0xff]).as_deref(),
            Some("byte 0xff at offset 1 of 2 is not in the base64 alphabet")
        );
        assert_eq!(
            base64_fault(b"b2sx5").as_deref(),
            Some("its length, 5, is not a multiple of 4 (padding missing or data cut short)")
        );
        assert!(base64_simd::STANDARD.decode_to_vec(b"b2t=").is_err());
        assert_eq!(
            base64_fault(b"b2t=").as_deref(),
            Some("'t' at offset 2 leaves bits set past the data's end (not canonical base64)")
        );
        // What the decoder accepts, this does not fault either.
        for good in [&b"b2s="[..], b"", b"YQ==", b"YWJj"] {
            assert!(base64_simd::STANDARD.decode_to_vec(good).is_ok());
            assert_eq!(base64_fault(good), None);
        }
    }

    proptest::proptest! {
        /// The description and the decoder agree: a fault is named exactly when decoding fails.
        #[test]
        fn base64_fault_agrees_with_the_decoder(data in "[A-Za-z0-9+/=!\n]{0,12}") {
            let decoded = base64_simd::STANDARD.decode_to_vec(data.as_bytes());
            proptest::prop_assert_eq!(decoded.is_err(), base64_fault(data.as_bytes()).is_some(), "{:?}", data);
        }
    }

    #[test]
    fn kpl_aggregates_expand_in_place() {
        let aggregate = kpl::aggregate(&[
            kpl::AggregateEntry {
                partition_key: "a",
                explicit_hash_key: None,
                data: b"one",
            },
            kpl::AggregateEntry {
                partition_key: "b",
                explicit_hash_key: Some("123"),
                data: b"two",
            },
        ]);
        let json = event_json(&[
            plain("x", "1", b"before"),
            plain("agg", "2", &aggregate),
            plain("x", "3", b"after"),
        ]);
        let event: KinesisEvent<'_> = parse_event(json.as_bytes()).unwrap();
        let batch = DecodedBatch::decode(&event.records);
        let records: Vec<_> = batch.records(&event.records);
        let seen: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r.record.sequence_number.as_str(),
                    r.record.sub_sequence_number,
                    r.record.partition_key,
                    r.record.data,
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("1", None, "x", &b"before"[..]),
                ("2", Some(0), "a", &b"one"[..]),
                ("2", Some(1), "b", &b"two"[..]),
                ("3", None, "x", &b"after"[..]),
            ]
        );
        assert_eq!(records[2].record.explicit_hash_key, Some("123"));
    }

    #[test]
    fn corrupt_aggregate_is_a_record_error() {
        let mut aggregate = kpl::aggregate(&[kpl::AggregateEntry {
            partition_key: "a",
            explicit_hash_key: None,
            data: b"one",
        }]);
        let last = aggregate.len() - 1;
        aggregate[last] ^= 0xff; // break the MD5 trailer
        let json = event_json(&[plain("agg", "7", &aggregate)]);
        let event: KinesisEvent<'_> = parse_event(json.as_bytes()).unwrap();
        let batch = DecodedBatch::decode(&event.records);
        let records = batch.records(&event.records);
        assert_eq!(records.len(), 1);
        let error = records[0].error.as_ref().unwrap();
        assert_eq!(error.error_type(), "CorruptKplAggregate");
        assert!(error.to_string().contains("record shardId-000000000000/7:"));
    }

    #[test]
    fn malformed_event_names_the_path() {
        let error = parse_event::<KinesisEvent<'_>>(br#"{"Records":[{"eventID":"s:1","kinesis":{"data":"", "partitionKey": 5, "sequenceNumber":"1"}}]}"#).unwrap_err();
        assert_eq!(error.path, "Records[0].kinesis.partitionKey");
        let error = parse_event::<KinesisEvent<'_>>(br#"{"records":[]}"#).unwrap_err();
        assert!(error.message.contains("missing field `Records`"), "{error}");
        let error = parse_event::<KinesisEvent<'_>>(b"not json").unwrap_err();
        assert!(!error.message.is_empty());
    }

    #[test]
    fn escaped_strings_fall_back_to_owned() {
        let json = br#"{"Records":[{"eventID":"shardId-1:1","eventSourceARN":"arn","kinesis":{"data":"b2s=","partitionKey":"caf\u00e9","sequenceNumber":"1","approximateArrivalTimestamp":1.5}}]}"#;
        let event: KinesisEvent<'_> = parse_event(json).unwrap();
        let batch = DecodedBatch::decode(&event.records);
        let records = batch.records(&event.records);
        assert_eq!(records[0].record.partition_key, "café");
        assert_eq!(records[0].record.data, b"ok");
    }
}
