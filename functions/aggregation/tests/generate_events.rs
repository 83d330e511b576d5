//! Writes `events/window-*.json`: `cargo test -p aggregation --test generate_events -- --ignored`.
//!
//! The three events are one window of one shard: the first invocation (no state), a middle one
//! (with the state the first returned) and the final one (the state the middle returned, no
//! records). Generated rather than written by hand so that each state is exactly what the
//! function returns; `window_events.rs` checks that they still are.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use aggregation::Aggregation;
use aggregation::store::InMemoryAggregateStore;
use serde_json::{Value, json};
use shardwise::InMemoryDeadLetterSink;
use shardwise::processor::Invocation;
use shardwise::testing::sequence_number;
use shardwise::time::Timestamp;
use shardwise::window::WindowProcessor;
use shardwise_cards::canary::InMemoryCanaryAckStore;

const SHARD: &str = "shardId-000000000000";
const STREAM_ARN: &str = "arn:aws:kinesis:us-east-1:123456789012:stream/shardwise-transactions";

fn transaction(
    n: u64,
    card: &str,
    merchant: &str,
    category: &str,
    amount: f64,
    second: u32,
) -> (String, String) {
    let body = json!({
        "transaction_id": format!("tx-20261126-{n:06}"),
        "card_id": card,
        "merchant_id": merchant,
        "merchant_category": category,
        "amount": amount,
        "currency": "EUR",
        "country": "DE",
        "lat": 52.5200,
        "lon": 13.4050,
        "timestamp": format!("2026-11-26T10:00:{second:02}.000Z"),
        "channel": "pos",
    });
    (card.to_owned(), body.to_string())
}

fn record(n: u64, partition_key: &str, body: &str, second: u32) -> Value {
    let sequence = sequence_number(n);
    let arrival = Timestamp::parse_rfc3339(&format!("2026-11-26T10:00:{second:02}.250Z"))
        .unwrap()
        .epoch_millis() as f64
        / 1000.0;
    json!({
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": partition_key,
            "sequenceNumber": sequence,
            "data": base64_simd::STANDARD.encode_to_string(body.as_bytes()),
            "approximateArrivalTimestamp": arrival,
        },
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": format!("{SHARD}:{sequence}"),
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": "arn:aws:iam::123456789012:role/shardwise-aggregation",
        "awsRegion": "us-east-1",
        "eventSourceARN": STREAM_ARN,
    })
}

fn event(records: Vec<Value>, state: Option<Value>, final_invoke: bool) -> Value {
    let mut event = json!({
        "Records": records,
        "window": {"start": "2026-11-26T10:00:00Z", "end": "2026-11-26T10:01:00Z"},
        "shardId": SHARD,
        "eventSourceARN": STREAM_ARN,
        "isFinalInvokeForWindow": final_invoke,
        "isWindowTerminatedEarly": false,
    });
    if let Some(state) = state {
        event["state"] = state;
    }
    event
}

async fn state_after(event: &Value) -> Value {
    let processor = WindowProcessor::new(
        Aggregation::new(InMemoryAggregateStore::new(), InMemoryCanaryAckStore::new()),
        InMemoryDeadLetterSink::new(),
    );
    let report = processor
        .process(
            &serde_json::to_vec(event).unwrap(),
            &Invocation::unbounded("gen"),
        )
        .await
        .unwrap();
    serde_json::to_value(&report.response).unwrap()["state"].clone()
}

fn write(name: &str, event: &Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../events")
        .join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut text = serde_json::to_string_pretty(event).unwrap();
    text.push('\n');
    std::fs::write(&path, text).unwrap();
}

#[tokio::test]
#[ignore = "writes the sample events; run by hand after changing the state format"]
async fn regenerate_window_events() {
    let canary = r#"{"canary_id":"canary-2026-11-26T10:00:05Z-0","sent_at":1795687205000}"#;
    let mut first_records = Vec::new();
    for (n, (key, body), second) in [
        (
            1,
            transaction(1, "4000001234567899", "m-00042", "5411", 42.10, 3),
            3,
        ),
        (
            2,
            transaction(2, "4000009876543210", "m-00731", "5812", 18.50, 4),
            4,
        ),
        (
            3,
            (
                "canary-2026-11-26T10:00:05Z-0".to_owned(),
                canary.to_owned(),
            ),
            5,
        ),
        (
            4,
            transaction(4, "4000005555666677", "m-00042", "5411", 7.99, 9),
            9,
        ),
    ] {
        first_records.push(record(n, &key, &body, second));
    }
    let first = event(first_records, None, false);
    write("window-first.json", &first);

    let mut middle_records = Vec::new();
    for (n, (key, body), second) in [
        (
            5,
            transaction(5, "4000001234567899", "m-00107", "5411", 12.00, 21),
            21,
        ),
        (
            6,
            transaction(6, "4000002222333344", "m-00905", "5999", 250.00, 33),
            33,
        ),
        (
            7,
            transaction(7, "4000009876543210", "m-00731", "5812", 23.75, 48),
            48,
        ),
    ] {
        middle_records.push(record(n, &key, &body, second));
    }
    let middle = event(middle_records, Some(state_after(&first).await), false);
    write("window-middle.json", &middle);

    let last = event(Vec::new(), Some(state_after(&middle).await), true);
    write("window-final.json", &last);
}
