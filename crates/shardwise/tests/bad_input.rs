//! The bad-input catalogue (docs/bad-input.md), one test per row: what the user sees (the error
//! text, or its stable prefix) and where the record goes (acknowledged into the dead-letter
//! queue with which `error.type`, handed back to Lambda, or a failed invocation).
//!
//! Rows are numbered as in the catalogue (`row_07_…`); keep the two in step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{Value, json};
use shardwise::clock::SystemClock;
use shardwise::config::{CommonSettings, Env, check_lambda_environment};
use shardwise::dead_letter::SinkFault;
use shardwise::handle_invocation;
use shardwise::idempotency::{Idempotency, InMemoryIdempotencyStore, JsonFieldKey};
use shardwise::kpl::{self, AggregateEntry, KPL_MAGIC};
use shardwise::metrics::MetricsWriter;
use shardwise::processor::BatchReport;
use shardwise::response::BatchResponse;
use shardwise::retry::ExponentialBackoff;
use shardwise::testing::{CountPerKey, TestRecord, event_json, plain, raw_data, sequence_number};
use shardwise::window::{WindowConfig, WindowEndReason, WindowProcessor};
use shardwise::{
    HandlerError, InMemoryDeadLetterSink, Invocation, Json, Processor, Record, RecordHandler,
};

/// The payload the handlers of these tests expect.
#[derive(Debug, Deserialize)]
struct Transaction<'a> {
    #[allow(dead_code)]
    card_id: &'a str,
    #[allow(dead_code)]
    amount: f64,
}

struct Accept;

impl<'d> RecordHandler<'d> for Accept {
    type Payload = Json<Transaction<'d>>;

    async fn handle(&self, _: &Record<'d>, _: &Json<Transaction<'d>>) -> Result<(), HandlerError> {
        Ok(())
    }
}

struct NoMetrics;

impl MetricsWriter for NoMetrics {
    fn write_line(&self, _: &str) {}
}

const GOOD: &[u8] = br#"{"card_id":"c-1","amount":12.5}"#;

fn processor() -> Processor<shardwise::processor::PerRecord<Accept>, InMemoryDeadLetterSink> {
    Processor::per_record(Accept, InMemoryDeadLetterSink::new()).retry(ExponentialBackoff::none())
}

/// Process `records` (a good record first and last around them) and return the report and the
/// dead letters.
async fn run(records: &[TestRecord]) -> (BatchReport, Vec<Value>) {
    let p = processor();
    let event = event_json(records);
    let report = p
        .process(event.as_bytes(), &Invocation::unbounded("req"))
        .await
        .unwrap();
    let letters = p.dead_letter_sink().letters();
    (report, letters)
}

/// The one dead letter of a batch whose other records are fine; the batch is acknowledged.
async fn only_letter(record: TestRecord) -> Value {
    let (report, letters) = run(&[
        plain("k", &sequence_number(1), GOOD),
        record,
        plain("k", &sequence_number(3), GOOD),
    ])
    .await;
    assert_eq!(
        report.response,
        BatchResponse::all_done(),
        "{:?}",
        report.outcomes
    );
    assert_eq!(letters.len(), 1, "{letters:?}");
    letters.into_iter().next().unwrap()
}

fn message(letter: &Value) -> &str {
    letter["error"]["message"].as_str().unwrap()
}

/// What Lambda sees when the invocation fails: `(errorType, errorMessage)`.
async fn invocation_error(event: &[u8]) -> (String, String) {
    let p = processor().metrics(NoMetrics);
    let deadline = shardwise::clock::Clock::now_ms(&SystemClock) + 60_000;
    let error = handle_invocation(&p, "req", deadline as u64, event)
        .await
        .unwrap_err();
    (error.error_type().to_owned(), error.to_string())
}

// ---------------------------------------------------------------------------------------------
// The event as a whole

#[tokio::test]
async fn row_01_event_that_is_not_json_fails_the_invocation() {
    let (error_type, message) = invocation_error(b"Records: [").await;
    assert_eq!(error_type, "MalformedEvent");
    assert_eq!(
        message,
        "malformed Kinesis event at `.`: expected value at line 1 column 1"
    );
}

#[tokio::test]
async fn row_02_event_without_records_fails_the_invocation() {
    let (error_type, message) = invocation_error(br#"{"records":[]}"#).await;
    assert_eq!(error_type, "MalformedEvent");
    assert_eq!(
        message,
        "malformed Kinesis event at `.`: missing field `Records` at line 1 column 14"
    );
}

#[tokio::test]
async fn row_03_event_field_of_the_wrong_type_names_its_path() {
    let event = br#"{"Records":[{"eventID":"shardId-0:1","kinesis":{"data":"","partitionKey":5,"sequenceNumber":"1"}}]}"#;
    let (error_type, message) = invocation_error(event).await;
    assert_eq!(error_type, "MalformedEvent");
    assert!(
        message.starts_with(
            "malformed Kinesis event at `Records[0].kinesis.partitionKey`: invalid type: integer `5`, expected a string"
        ),
        "{message}"
    );
}

#[tokio::test]
async fn row_04_record_without_data_fails_the_invocation() {
    let event = br#"{"Records":[{"eventID":"shardId-0:1","kinesis":{"partitionKey":"k","sequenceNumber":"1"}}]}"#;
    let (error_type, message) = invocation_error(event).await;
    assert_eq!(error_type, "MalformedEvent");
    assert!(
        message
            .starts_with("malformed Kinesis event at `Records[0].kinesis`: missing field `data`"),
        "{message}"
    );
}

#[tokio::test]
async fn row_05_empty_records_array_is_acknowledged() {
    let (report, letters) = run(&[]).await;
    assert_eq!(
        serde_json::to_value(&report.response).unwrap(),
        json!({"batchItemFailures": []})
    );
    assert!(letters.is_empty());
}

// ---------------------------------------------------------------------------------------------
// One record's bytes

#[tokio::test]
async fn row_06_data_that_is_not_base64_is_dead_lettered_as_delivered() {
    let letter = only_letter(raw_data("k", &sequence_number(2), "!!not base64!!")).await;
    assert_eq!(letter["error"]["type"], "InvalidBase64");
    assert!(
        message(&letter)
            == format!(
                "record shardId-000000000000/{}: `kinesis.data` is not valid base64: \
                 '!' at offset 0 of 14 is not in the base64 alphabet",
                sequence_number(2)
            ),
        "{letter}"
    );
    assert_eq!(letter["data"], "!!not base64!!");
}

#[tokio::test]
async fn row_07_payload_that_is_not_utf8_is_dead_lettered() {
    let letter = only_letter(plain("k", &sequence_number(2), b"\xff\xfe\x00binary")).await;
    assert_eq!(letter["error"]["type"], "PayloadNotUtf8");
    assert_eq!(
        message(&letter),
        format!(
            "record shardId-000000000000/{}: PayloadNotUtf8: the record's data is not UTF-8 text, so it cannot be JSON",
            sequence_number(2)
        )
    );
    assert_eq!(
        letter["data"],
        base64_simd::STANDARD.encode_to_string(b"\xff\xfe\x00binary")
    );
}

#[tokio::test]
async fn row_08_payload_that_is_not_json_is_dead_lettered() {
    let letter = only_letter(plain("k", &sequence_number(2), b"card=c-1;amount=3")).await;
    assert_eq!(letter["error"]["type"], "PayloadNotJson");
    assert_eq!(
        message(&letter),
        format!(
            "record shardId-000000000000/{}: PayloadNotJson: expected value at line 1 column 1",
            sequence_number(2)
        )
    );
}

#[tokio::test]
async fn row_09_payload_of_the_wrong_shape_names_the_field() {
    let letter = only_letter(plain(
        "k",
        &sequence_number(2),
        br#"{"card_id":"c-1","amount":"12.50"}"#,
    ))
    .await;
    assert_eq!(letter["error"]["type"], "PayloadWrongShape");
    assert!(
        message(&letter).starts_with(&format!(
            "record shardId-000000000000/{}: PayloadWrongShape at `amount`: invalid type: string \"12.50\", expected f64",
            sequence_number(2)
        )),
        "{letter}"
    );
}

#[tokio::test]
async fn row_10_payload_missing_a_field_names_it() {
    let letter = only_letter(plain("k", &sequence_number(2), br#"{"card_id":"c-1"}"#)).await;
    assert_eq!(letter["error"]["type"], "PayloadWrongShape");
    assert!(
        message(&letter).contains(": PayloadWrongShape at `.`: missing field `amount`"),
        "{letter}"
    );
}

#[tokio::test]
async fn row_11_empty_data_is_dead_lettered() {
    let letter = only_letter(plain("k", &sequence_number(2), b"")).await;
    assert_eq!(letter["error"]["type"], "EmptyPayload");
    assert_eq!(
        message(&letter),
        format!(
            "record shardId-000000000000/{}: EmptyPayload: the record has no data",
            sequence_number(2)
        )
    );
    assert_eq!(letter["data"], "");
}

#[tokio::test]
async fn row_12_oversize_dead_letter_leaves_the_data_out() {
    // 300 KiB of bytes that are not JSON: the dead letter would pass SQS's 256 KiB.
    let big = vec![b'x'; 300 * 1024];
    let letter = only_letter(plain("k", &sequence_number(2), &big)).await;
    assert_eq!(letter["error"]["type"], "PayloadNotJson");
    assert_eq!(letter["dataTruncated"], true);
    assert!(letter.get("data").is_none());
    assert_eq!(letter["sequenceNumber"], sequence_number(2));
    assert_eq!(letter["shardId"], "shardId-000000000000");
}

// ---------------------------------------------------------------------------------------------
// KPL aggregates

fn aggregate_of(payloads: &[&[u8]]) -> Vec<u8> {
    let entries: Vec<AggregateEntry<'_>> = payloads
        .iter()
        .map(|data| AggregateEntry {
            partition_key: "card-1",
            explicit_hash_key: None,
            data,
        })
        .collect();
    kpl::aggregate(&entries)
}

/// Magic + `protobuf` + its right digest: reaches the protobuf checks.
fn framed(protobuf: &[u8]) -> Vec<u8> {
    use md5::{Digest, Md5};
    let mut out = KPL_MAGIC.to_vec();
    out.extend_from_slice(protobuf);
    out.extend_from_slice(&Md5::digest(protobuf));
    out
}

async fn corrupt_aggregate_letter(data: &[u8]) -> Value {
    let record = plain("card-1", &sequence_number(2), data);
    let field = record.data_field.clone();
    let letter = only_letter(record).await;
    assert_eq!(letter["error"]["type"], "CorruptKplAggregate");
    // The whole Kinesis record, as delivered: no user record can be told apart.
    assert_eq!(letter["data"], field);
    assert!(letter.get("subSequenceNumber").is_none());
    assert!(
        message(&letter).starts_with(&format!(
            "record shardId-000000000000/{}: corrupt KPL aggregate: ",
            sequence_number(2)
        )),
        "{letter}"
    );
    letter
}

#[tokio::test]
async fn row_13_aggregate_with_a_broken_digest_is_dead_lettered_whole() {
    let mut data = aggregate_of(&[GOOD, GOOD]);
    let last = data.len() - 1;
    data[last] ^= 0xff;
    let letter = corrupt_aggregate_letter(&data).await;
    assert!(
        message(&letter)
            .contains("corrupt KPL aggregate: KPL aggregate is corrupt: its MD5 digest is "),
        "{letter}"
    );
}

#[tokio::test]
async fn row_14_aggregate_cut_short_is_dead_lettered_whole() {
    let letter = corrupt_aggregate_letter(&KPL_MAGIC).await;
    assert!(
        message(&letter).ends_with(
            "record starts with the KPL magic but is only 4 bytes; an aggregate needs at least 20 (magic and MD5 digest)"
        ),
        "{letter}"
    );
}

#[tokio::test]
async fn row_15_aggregate_with_malformed_protobuf_names_the_byte() {
    // Field 3 (a user record) claims 10 bytes and has 1.
    let letter = corrupt_aggregate_letter(&framed(&[0x1A, 0x0A, 0x08])).await;
    assert!(
        message(&letter).ends_with(
            "KPL aggregate protobuf is malformed at byte 4 of the record: field runs past the end of the protobuf"
        ),
        "{letter}"
    );
}

#[tokio::test]
async fn row_16_aggregate_claiming_a_huge_table_allocates_nothing() {
    // A partition key table entry whose length prefix says 2^62 bytes, then many user records
    // that each claim the maximum: rejected on the first claim, before anything is sized by it.
    let mut protobuf = vec![0x0A];
    protobuf.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40]);
    let letter = corrupt_aggregate_letter(&framed(&protobuf)).await;
    assert!(
        message(&letter).ends_with(
            "KPL aggregate protobuf is malformed at byte 4 of the record: field runs past the end of the protobuf"
        ),
        "{letter}"
    );
}

#[tokio::test]
async fn row_17_aggregate_with_a_key_index_out_of_range_is_dead_lettered_whole() {
    // partition_key_table = ["a"], one user record pointing at entry 3.
    let protobuf = [0x0A, 0x01, b'a', 0x1A, 0x04, 0x08, 0x03, 0x1A, 0x00];
    let letter = corrupt_aggregate_letter(&framed(&protobuf)).await;
    assert!(
        message(&letter).ends_with(
            "KPL sub-record 0 has partition_key_index 3, but the partition key table has 1 entries"
        ),
        "{letter}"
    );
}

#[tokio::test]
async fn row_18_aggregate_without_user_records_is_dead_lettered_whole() {
    let letter = corrupt_aggregate_letter(&kpl::aggregate(&[])).await;
    assert!(
        message(&letter).ends_with("KPL aggregate holds no user records"),
        "{letter}"
    );
}

#[tokio::test]
async fn row_19_broken_magic_is_a_plain_record() {
    // Not an aggregate any more: a binary payload, which the JSON handler cannot read.
    let mut data = aggregate_of(&[GOOD]);
    data[0] ^= 0x01;
    let letter = only_letter(plain("card-1", &sequence_number(2), &data)).await;
    assert_eq!(letter["error"]["type"], "PayloadNotUtf8");
    assert!(letter.get("subSequenceNumber").is_none());
}

#[tokio::test]
async fn row_20_bad_user_record_in_a_good_aggregate_is_dead_lettered_alone() {
    let data = aggregate_of(&[GOOD, b"not json", GOOD]);
    let (report, letters) = run(&[plain("card-1", &sequence_number(2), &data)]).await;
    assert_eq!(report.response, BatchResponse::all_done());
    assert_eq!(report.counts.processed, 2);
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter["error"]["type"], "PayloadNotJson");
    assert_eq!(letter["subSequenceNumber"], 1);
    assert_eq!(
        letter["data"],
        base64_simd::STANDARD.encode_to_string(b"not json")
    );
    assert!(
        message(letter).starts_with(&format!(
            "record shardId-000000000000/{}/1: PayloadNotJson: ",
            sequence_number(2)
        )),
        "{letter}"
    );
}

// ---------------------------------------------------------------------------------------------
// Sequence numbers

/// Fails on payloads that say so, retryably.
struct Flaky;

#[derive(Deserialize)]
struct MaybeFail {
    #[serde(default)]
    fail: bool,
}

impl<'d> RecordHandler<'d> for Flaky {
    type Payload = Json<MaybeFail>;

    async fn handle(&self, _: &Record<'d>, p: &Json<MaybeFail>) -> Result<(), HandlerError> {
        if p.fail {
            return Err(HandlerError::retryable("downstream throttled"));
        }
        Ok(())
    }
}

#[tokio::test]
async fn row_21_sequence_numbers_of_unusual_length_order_by_length() {
    // moto-style short numbers and a number longer than 56 digits (and than u128) in one batch:
    // "9" < "10" < a 60-digit one, although "9" > "10" as text.
    let long = format!("1{}", "0".repeat(59));
    let p = Processor::per_record(Flaky, InMemoryDeadLetterSink::new())
        .retry(ExponentialBackoff::none());
    let event = event_json(&[
        plain("a", "9", br#"{"fail":false}"#),
        plain("b", "10", br#"{"fail":true}"#),
        plain("c", &long, br#"{"fail":true}"#),
    ]);
    let report = p
        .process(event.as_bytes(), &Invocation::unbounded("req"))
        .await
        .unwrap();
    assert_eq!(report.response, BatchResponse::redeliver_from("10"));

    let event = event_json(&[
        plain("a", "9", br#"{"fail":true}"#),
        plain("b", "10", br#"{"fail":true}"#),
    ]);
    let report = p
        .process(event.as_bytes(), &Invocation::unbounded("req"))
        .await
        .unwrap();
    assert_eq!(report.response, BatchResponse::redeliver_from("9"));
}

// ---------------------------------------------------------------------------------------------
// Tumbling-window state (the handler: `shardwise::testing::CountPerKey`)

fn window_event(records: &[TestRecord], state: Value) -> Vec<u8> {
    let mut event: Value = serde_json::from_str(&event_json(records)).unwrap();
    event["window"] = json!({"start": "2020-12-09T07:04:00Z", "end": "2020-12-09T07:06:00Z"});
    event["state"] = state;
    event["shardId"] = json!("shardId-000000000000");
    event["eventSourceARN"] = json!("arn:aws:kinesis:us-east-1:123456789012:stream/transactions");
    serde_json::to_vec(&event).unwrap()
}

fn window_processor() -> WindowProcessor<CountPerKey, InMemoryDeadLetterSink> {
    WindowProcessor::new(CountPerKey::default(), InMemoryDeadLetterSink::new())
        .records(|p| p.retry(ExponentialBackoff::none()))
        .state_retry(ExponentialBackoff::none())
}

#[tokio::test]
async fn row_22_window_state_of_the_wrong_type_is_dead_lettered_and_the_window_restarts() {
    let p = window_processor();
    let event = window_event(&[plain("k", "1", b"x")], json!({"card-1": "three"}));
    let report = p
        .process(&event, &Invocation::unbounded("req"))
        .await
        .unwrap();
    let letters = p.dead_letter_sink().letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["error"]["type"], "WindowStateInvalid");
    assert!(
        message(&letters[0]).starts_with(
            "window state does not read at `card-1`: invalid type: string \"three\", expected u64"
        ),
        "{}",
        letters[0]
    );
    assert_eq!(letters[0]["state"], r#"{"card-1":"three"}"#);
    assert!(report.state_reset.is_some());
    // The records of this invocation count in a fresh state, marked partial.
    assert_eq!(
        report.response.state.get(),
        r#"{"shardwise":{"opened_by":"1","partial":true,"through":"1"},"k":1}"#
    );
    assert!(report.response.batch_item_failures.is_empty());
}

#[tokio::test]
async fn row_23_window_state_that_is_not_an_object_is_dead_lettered() {
    let p = window_processor();
    let event = window_event(&[], json!([1, 2, 3]));
    let report = p
        .process(&event, &Invocation::unbounded("req"))
        .await
        .unwrap();
    let letters = p.dead_letter_sink().letters();
    assert_eq!(letters[0]["error"]["type"], "WindowStateInvalid");
    assert!(
        message(&letters[0]).starts_with("window state does not read at `.`: invalid type: sequence, expected a window state object"),
        "{}",
        letters[0]
    );
    assert!(report.state_reset.is_some());
}

#[tokio::test]
async fn row_24_unreadable_window_state_over_an_sqs_message_is_dead_lettered_without_it() {
    // 1.2 MB of state: more than Lambda itself allows, far more than an SQS message.
    let huge: serde_json::Map<String, Value> = (0..60_000)
        .map(|i| (format!("key-{i:06}"), json!("not a count")))
        .collect();
    let state = Value::Object(huge);
    assert!(state.to_string().len() > 1_000_000);
    let p = window_processor();
    let event = window_event(&[], state);
    let report = p
        .process(&event, &Invocation::unbounded("req"))
        .await
        .unwrap();
    let letters = p.dead_letter_sink().letters();
    assert_eq!(letters[0]["error"]["type"], "WindowStateInvalid");
    assert_eq!(letters[0]["stateTruncated"], true);
    assert!(letters[0].get("state").is_none());
    assert!(report.state_reset.is_some());
}

#[tokio::test]
async fn row_25_window_state_outgrowing_its_limit_ends_the_segment_early() {
    let p = WindowProcessor::new(CountPerKey::default(), InMemoryDeadLetterSink::new())
        .window_config(WindowConfig {
            state_limit_bytes: 64,
        })
        .records(|p| p.retry(ExponentialBackoff::none()));
    let records: Vec<TestRecord> = (0..10u64)
        .map(|i| plain(&format!("card-{i:04}"), &sequence_number(i + 1), b"x"))
        .collect();
    let report = p
        .process(
            &window_event(&records, json!({})),
            &Invocation::unbounded("req"),
        )
        .await
        .unwrap();
    assert_eq!(report.ended, Some(WindowEndReason::StateLimit));
    assert_eq!(p.handler().ends(), vec![WindowEndReason::StateLimit]);
    // A fresh state, which still knows the records the ended segment accounted for.
    assert_eq!(
        report.response.state.get(),
        r#"{"shardwise":{"through":"49590338271490256608559692538361571095921575980000000010"}}"#
    );
}

#[tokio::test]
async fn row_26_unreadable_state_that_cannot_be_dead_lettered_fails_the_invocation() {
    let p = window_processor();
    p.dead_letter_sink().inject(SinkFault::FailCall);
    let event = window_event(&[], json!({"card-1": -1}));
    let error = p
        .process(&event, &Invocation::unbounded("req"))
        .await
        .unwrap_err();
    assert_eq!(error.error_type(), "WindowStateNotDeadLettered");
    let text = error.to_string();
    assert!(
        text.starts_with(
            "window state does not read at `card-1`: invalid value: integer `-1`, expected u64"
        ),
        "{text}"
    );
    assert!(
        text.ends_with(
            "; it could not be dead-lettered either, so the invocation fails: dead-letter queue call failed: injected failure"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn row_27_window_event_without_its_window_fails_the_invocation() {
    let p = window_processor();
    let error = p
        .process(br#"{"Records":[]}"#, &Invocation::unbounded("req"))
        .await
        .unwrap_err();
    assert_eq!(error.error_type(), "MalformedEvent");
    assert_eq!(
        error.to_string(),
        "malformed Kinesis event at `.`: missing field `window` at line 1 column 14"
    );
}

// ---------------------------------------------------------------------------------------------
// The environment

fn env(vars: &[(&'static str, &'static str)]) -> Env<HashMap<&'static str, &'static str>> {
    Env(vars.iter().copied().collect())
}

#[test]
fn row_28_missing_dead_letter_queue_is_named_at_start() {
    let error = CommonSettings::from_env(&env(&[])).unwrap_err();
    assert_eq!(
        error.to_string(),
        "environment variable DEAD_LETTER_QUEUE_URL is required (the SQS queue URL that receives records that cannot be processed) but is not set"
    );
    // Blank counts as missing.
    let error = CommonSettings::from_env(&env(&[("DEAD_LETTER_QUEUE_URL", "  ")])).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("environment variable DEAD_LETTER_QUEUE_URL is required")
    );
}

#[test]
fn row_29_malformed_numbers_are_named_with_their_value() {
    let q = ("DEAD_LETTER_QUEUE_URL", "http://127.0.0.1:9/q");
    let error =
        CommonSettings::from_env(&env(&[q, ("SHARDWISE_MAX_CONCURRENCY", "lots")])).unwrap_err();
    assert_eq!(
        error.to_string(),
        r#"environment variable SHARDWISE_MAX_CONCURRENCY="lots" is not valid: expected a whole number from 1"#
    );
    let error =
        CommonSettings::from_env(&env(&[q, ("SHARDWISE_MAX_CONCURRENCY", "0")])).unwrap_err();
    assert_eq!(
        error.to_string(),
        r#"environment variable SHARDWISE_MAX_CONCURRENCY="0" is not valid: expected a whole number from 1"#
    );
    let error =
        CommonSettings::from_env(&env(&[q, ("SHARDWISE_DEADLINE_MARGIN_MS", "-5")])).unwrap_err();
    assert_eq!(
        error.to_string(),
        r#"environment variable SHARDWISE_DEADLINE_MARGIN_MS="-5" is not valid: expected milliseconds, a whole number"#
    );
}

#[test]
fn row_30_started_outside_lambda_says_what_is_missing() {
    let error = check_lambda_environment(&env(&[])).unwrap_err();
    assert_eq!(
        error.to_string(),
        "environment variable AWS_LAMBDA_RUNTIME_API is required (set by Lambda, `cargo lambda watch` or the Shardwise local runner) but is not set"
    );
}

// ---------------------------------------------------------------------------------------------
// Idempotency keys taken from the payload

#[tokio::test]
async fn row_33_payload_without_its_idempotency_key_is_dead_lettered() {
    let p = processor().gate(
        Idempotency::new(InMemoryIdempotencyStore::new()).key(JsonFieldKey::new("transaction_id")),
    );
    let event = event_json(&[plain("k", &sequence_number(1), GOOD)]);
    let report = p
        .process(event.as_bytes(), &Invocation::unbounded("req"))
        .await
        .unwrap();
    assert_eq!(report.response, BatchResponse::all_done());
    let letters = p.dead_letter_sink().letters();
    assert_eq!(letters[0]["error"]["type"], "IdempotencyKeyMissing");
    assert_eq!(
        message(&letters[0]),
        format!(
            "record shardId-000000000000/{}: payload has no JSON field `transaction_id` to take the idempotency key from",
            sequence_number(1)
        )
    );
}

#[tokio::test]
async fn row_34_corrupt_record_is_dead_lettered_once_across_redeliveries() {
    // The checkpoint falls before the corrupt record (a record ahead of it is handed back), so
    // Lambda delivers it again: the gate remembers it was dead-lettered.
    let p = Processor::per_record(Flaky, InMemoryDeadLetterSink::new())
        .retry(ExponentialBackoff::none())
        .gate(Idempotency::new(InMemoryIdempotencyStore::new()));
    let event = event_json(&[
        plain("a", &sequence_number(1), br#"{"fail":true}"#),
        raw_data("b", &sequence_number(2), "%%%"),
    ]);
    for _ in 0..3 {
        let report = p
            .process(event.as_bytes(), &Invocation::unbounded("req"))
            .await
            .unwrap();
        assert_eq!(
            report.response,
            BatchResponse::redeliver_from(&sequence_number(1))
        );
    }
    let letters = p.dead_letter_sink().letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["error"]["type"], "InvalidBase64");
}
