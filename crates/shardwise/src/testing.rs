//! Builders for Lambda Kinesis events, for tests and benchmarks of handlers built on Shardwise.
//!
//! Real sample events live in `events/`; these builders make the shapes that are easier to
//! generate than to keep as files (thousands of records, corrupt payloads, KPL aggregates).

use std::fmt::Write;

/// The stream ARN the builders put on every record.
pub const TEST_STREAM_ARN: &str = "arn:aws:kinesis:us-east-1:123456789012:stream/transactions";
/// The shard the builders put records on unless told otherwise.
pub const TEST_SHARD_ID: &str = "shardId-000000000000";

/// One record of a test event.
#[derive(Debug, Clone)]
pub struct TestRecord {
    pub shard_id: String,
    pub partition_key: String,
    pub sequence_number: String,
    /// The `kinesis.data` field exactly as it will appear (base64 unless deliberately broken).
    pub data_field: String,
    /// Seconds since the epoch.
    pub arrival_seconds: f64,
}

/// A record whose payload is `data`, base64-encoded as Kinesis does.
pub fn plain(partition_key: &str, sequence_number: &str, data: &[u8]) -> TestRecord {
    raw_data(
        partition_key,
        sequence_number,
        &base64_simd::STANDARD.encode_to_string(data),
    )
}

/// A record whose `kinesis.data` field is `data_field` verbatim (e.g. invalid base64).
pub fn raw_data(partition_key: &str, sequence_number: &str, data_field: &str) -> TestRecord {
    TestRecord {
        shard_id: TEST_SHARD_ID.to_owned(),
        partition_key: partition_key.to_owned(),
        sequence_number: sequence_number.to_owned(),
        data_field: data_field.to_owned(),
        arrival_seconds: 1_700_000_000.123,
    }
}

/// The Lambda Kinesis event JSON for `records`.
pub fn event_json(records: &[TestRecord]) -> String {
    let mut out = String::with_capacity(records.len() * 600 + 16);
    out.push_str("{\"Records\":[");
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        record_json(&mut out, r);
    }
    out.push_str("]}");
    out
}

pub(crate) fn record_json(out: &mut String, r: &TestRecord) {
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        concat!(
            "{{\"kinesis\":{{\"kinesisSchemaVersion\":\"1.0\",\"partitionKey\":{pk},",
            "\"sequenceNumber\":\"{seq}\",\"data\":\"{data}\",",
            "\"approximateArrivalTimestamp\":{ts}}},",
            "\"eventSource\":\"aws:kinesis\",\"eventVersion\":\"1.0\",",
            "\"eventID\":\"{shard}:{seq}\",\"eventName\":\"aws:kinesis:record\",",
            "\"invokeIdentityArn\":\"arn:aws:iam::123456789012:role/shardwise\",",
            "\"awsRegion\":\"us-east-1\",\"eventSourceARN\":\"{arn}\"}}"
        ),
        pk = serde_json::Value::String(r.partition_key.clone()),
        seq = r.sequence_number,
        data = r.data_field,
        ts = r.arrival_seconds,
        shard = r.shard_id,
        arn = TEST_STREAM_ARN,
    );
}

/// A 56-digit sequence number for position `n`, as real Kinesis shards produce.
pub fn sequence_number(n: u64) -> String {
    format!("4959033827149025660855969253836157109592157598{n:010}")
}

/// A tumbling-window handler that counts records per partition key, whatever their payload
/// (AWS's example), and remembers how each window ended: the subject of window tests, property
/// tests and fuzzing that are about the window machinery rather than a handler.
#[derive(Debug, Default)]
pub struct CountPerKey {
    ends: std::sync::Mutex<Vec<crate::window::WindowEndReason>>,
}

impl CountPerKey {
    /// How the windows seen so far ended, in order.
    pub fn ends(&self) -> Vec<crate::window::WindowEndReason> {
        self.ends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl crate::window::WindowHandler for CountPerKey {
    type State = std::collections::BTreeMap<String, u64>;
    type Contribution = String;

    fn fold(&self, state: &mut Self::State, key: String) {
        *state.entry(key).or_default() += 1;
    }

    async fn on_window_end(
        &self,
        _: &Self::State,
        end: &crate::window::WindowEnd<'_>,
    ) -> Result<(), crate::HandlerError> {
        // The window's bounds as a handler would write them (exercised by the fuzzer).
        let _ = (end.window.start.to_rfc3339(), end.window.end.to_rfc3339());
        self.ends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(end.reason);
        Ok(())
    }
}

impl<'d> crate::window::WindowRecordHandler<'d> for CountPerKey {
    type Payload = &'d [u8];

    async fn contribute(
        &self,
        record: &crate::Record<'d>,
        _: &&'d [u8],
    ) -> Result<Option<String>, crate::HandlerError> {
        Ok(Some(record.partition_key.to_owned()))
    }
}
