//! Hostile input to the three decoders, as proptest cases in every `cargo test`: the same
//! properties the libFuzzer targets check (fuzz/src/lib.rs), on generated rather than evolved
//! input. No input may panic; every record of an event that parses is acknowledged by the
//! processor (processed or dead-lettered with its data as delivered); what decodes re-encodes to
//! itself. `PROPTEST_CASES` sets the cases per property (default 256).
//!
//! The KPL deaggregator's own byte-level properties are in `src/kpl.rs`; here it is fuzzed
//! inside events, and for a stable re-encoding.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use md5::{Digest, Md5};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{Value, json};
use shardwise::event::{DecodedBatch, KinesisEvent, parse_event};
use shardwise::kpl::{self, AggregateEntry, KPL_MAGIC};
use shardwise::processor::Invocation;
use shardwise::retry::ExponentialBackoff;
use shardwise::testing::CountPerKey;
use shardwise::window::{WindowEvent, WindowProcessor, decode_state, encode_state, raw_state};
use shardwise::{HandlerError, InMemoryDeadLetterSink, Json, Processor, Record, RecordHandler};

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..ProptestConfig::default()
    }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(future)
}

/// Takes any JSON; fails permanently on the string `"fail"`.
struct AnyJson;

impl<'d> RecordHandler<'d> for AnyJson {
    type Payload = Json<Value>;

    async fn handle(&self, _: &Record<'d>, payload: &Json<Value>) -> Result<(), HandlerError> {
        if payload.0 == json!("fail") {
            return Err(HandlerError::permanent("asked to fail"));
        }
        Ok(())
    }
}

/// Decode the event and run the processor over it: nothing panics, and with no faults and no
/// deadline every record is acknowledged.
fn check_event(bytes: &[u8]) -> Result<(), TestCaseError> {
    let event = match parse_event::<KinesisEvent<'_>>(bytes) {
        Ok(event) => event,
        Err(error) => {
            prop_assert!(
                error
                    .to_string()
                    .starts_with("malformed Kinesis event at `")
            );
            return Ok(());
        }
    };
    let batch = DecodedBatch::decode(&event.records);
    let records = batch.records(&event.records);
    prop_assert!(records.len() >= event.records.len());
    let mut undecoded = 0;
    for decoded in &records {
        let source = &event.records[decoded.record.event_index];
        prop_assert_eq!(
            decoded.record.sequence_number.as_str(),
            source.kinesis.sequence_number.as_ref()
        );
        if let Some(error) = &decoded.error {
            undecoded += 1;
            prop_assert!(error.to_string().starts_with("record "));
            prop_assert_eq!(decoded.record.data, source.kinesis.data.as_bytes());
        }
    }
    let processor = Processor::per_record(AnyJson, InMemoryDeadLetterSink::new())
        .retry(ExponentialBackoff::none());
    let report = block_on(processor.process_records(&event.records, &Invocation::unbounded("p")));
    prop_assert_eq!(report.outcomes.len(), records.len());
    prop_assert!(report.response.batch_item_failures.is_empty());
    let letters = processor.dead_letter_sink().letters();
    prop_assert_eq!(letters.len(), report.counts.dead_lettered);
    prop_assert!(letters.len() >= undecoded);
    for letter in letters {
        prop_assert!(letter["data"].is_string() || letter["dataTruncated"] == json!(true));
    }
    Ok(())
}

/// Strings a producer or a broken pipeline might put in an event's string fields.
fn wild_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[A-Za-z0-9+/=]{0,40}",
        "[0-9]{0,80}",
        any::<String>(),
        "\\PC{0,20}",
    ]
}

/// A record: data as base64 of arbitrary bytes, of a KPL aggregate (valid or not), or any text.
fn wild_record() -> impl Strategy<Value = Value> {
    let data = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| base64_simd::STANDARD.encode_to_string(b)),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|protobuf| {
            let mut framed = KPL_MAGIC.to_vec();
            framed.extend_from_slice(&protobuf);
            framed.extend_from_slice(&Md5::digest(&protobuf));
            base64_simd::STANDARD.encode_to_string(framed)
        }),
        proptest::collection::vec(
            ("\\PC{0,8}", proptest::collection::vec(any::<u8>(), 0..16)),
            1..4
        )
        .prop_map(|entries| {
            let entries: Vec<AggregateEntry<'_>> = entries
                .iter()
                .map(|(key, data)| AggregateEntry {
                    partition_key: key,
                    explicit_hash_key: None,
                    data,
                })
                .collect();
            base64_simd::STANDARD.encode_to_string(kpl::aggregate(&entries))
        }),
        Just(base64_simd::STANDARD.encode_to_string(b"\"fail\"")),
        wild_string(),
    ];
    (data, wild_string(), wild_string(), wild_string(), any::<f64>()).prop_map(
        |(data, key, sequence, event_id, arrival)| {
            json!({
                "kinesis": {
                    "partitionKey": key,
                    "sequenceNumber": sequence,
                    "data": data,
                    "approximateArrivalTimestamp": if arrival.is_finite() { json!(arrival) } else { json!(0) },
                },
                "eventID": event_id,
                "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/s",
            })
        },
    )
}

/// A bounded mutation of a byte string: flip, insert, delete or truncate at a position.
fn mutate(mut bytes: Vec<u8>, how: u8, at: usize, byte: u8) -> Vec<u8> {
    if bytes.is_empty() {
        return vec![byte];
    }
    let at = at % bytes.len();
    match how % 4 {
        0 => bytes[at] ^= byte | 1,
        1 => bytes.insert(at, byte),
        2 => {
            bytes.remove(at);
        }
        _ => bytes.truncate(at),
    }
    bytes
}

/// A window state type with nesting.
#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Totals {
    count: u64,
    #[serde(default)]
    by_key: BTreeMap<String, u64>,
}

fn state_round_trips<S>(text: &str) -> Result<(), TestCaseError>
where
    S: serde::Serialize + serde::de::DeserializeOwned + Default + PartialEq + std::fmt::Debug,
{
    match decode_state::<S>(Some(text)) {
        Ok((state, meta)) => {
            let encoded = encode_state(&state, &meta).unwrap();
            let (again, again_meta) = decode_state::<S>(Some(&encoded)).unwrap();
            prop_assert_eq!(again, state);
            prop_assert_eq!(again_meta, meta);
        }
        Err(error) => prop_assert!(
            error
                .to_string()
                .starts_with("window state does not read at `")
        ),
    }
    Ok(())
}

/// JSON values of any shape, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        "\\PC{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("shardwise".to_owned()),
                    Just("count".to_owned()),
                    "\\PC{0,6}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_are_no_event_but_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        check_event(&bytes)?;
    }

    #[test]
    fn events_with_wild_fields_are_acknowledged_whole(
        records in proptest::collection::vec(wild_record(), 0..8),
    ) {
        let event = serde_json::to_vec(&json!({ "Records": records })).unwrap();
        check_event(&event)?;
    }

    #[test]
    fn mutated_events_never_panic(
        records in proptest::collection::vec(wild_record(), 1..4),
        edits in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..6),
    ) {
        let mut event = serde_json::to_vec(&json!({ "Records": records })).unwrap();
        for (how, at, byte) in edits {
            event = mutate(event, how, at, byte);
        }
        check_event(&event)?;
    }

    #[test]
    fn what_deaggregates_reaggregates_to_itself(
        protobuf in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut framed = KPL_MAGIC.to_vec();
        framed.extend_from_slice(&protobuf);
        framed.extend_from_slice(&Md5::digest(&protobuf));
        if let Ok(Some(users)) = kpl::deaggregate(&framed) {
            let entries: Vec<AggregateEntry<'_>> = users
                .iter()
                .map(|u| AggregateEntry {
                    partition_key: &u.partition_key,
                    explicit_hash_key: u.explicit_hash_key.as_deref(),
                    data: &u.data,
                })
                .collect();
            let again = kpl::deaggregate(&kpl::aggregate(&entries)).unwrap().unwrap();
            prop_assert_eq!(again, users);
        }
    }

    #[test]
    fn arbitrary_text_as_window_state_never_panics(text in any::<String>()) {
        state_round_trips::<BTreeMap<String, u64>>(&text)?;
        state_round_trips::<Totals>(&text)?;
        let _ = raw_state(text.as_bytes());
    }

    #[test]
    fn arbitrary_json_as_window_state_round_trips_or_names_its_path(value in json_value()) {
        let text = value.to_string();
        state_round_trips::<BTreeMap<String, u64>>(&text)?;
        state_round_trips::<Totals>(&text)?;
    }

    #[test]
    fn window_invocations_with_any_state_never_panic(
        state in json_value(),
        records in proptest::collection::vec(wild_record(), 0..4),
        final_invoke in any::<bool>(),
    ) {
        let event = serde_json::to_vec(&json!({
            "Records": records,
            "window": {"start": "2020-12-09T07:04:00Z", "end": "2020-12-09T07:06:00Z"},
            "state": state,
            "shardId": "shardId-000000000006",
            "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/s",
            "isFinalInvokeForWindow": final_invoke,
        }))
        .unwrap();
        prop_assert!(parse_event::<WindowEvent<'_>>(&event).is_ok());
        let processor = WindowProcessor::new(CountPerKey::default(), InMemoryDeadLetterSink::new())
            .records(|p| p.retry(ExponentialBackoff::none()))
            .state_retry(ExponentialBackoff::none());
        let report = block_on(processor.process(&event, &Invocation::unbounded("w"))).unwrap();
        // An unreadable state is dead-lettered, never dropped silently.
        let state_letters = processor
            .dead_letter_sink()
            .letters()
            .into_iter()
            .filter(|l| l["kind"] == json!("WindowState"))
            .count();
        prop_assert_eq!(state_letters, usize::from(report.state_reset.is_some()));
        prop_assert!(report.response.batch_item_failures.is_empty());
    }

    #[test]
    fn mutated_window_events_never_panic(
        edits in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..6),
    ) {
        let mut event = br#"{"Records":[],"window":{"start":"2020-12-09T07:04:00Z","end":"2020-12-09T07:06:00Z"},"state":{"1":282,"shardwise":{"opened_by":"5"}},"shardId":"s","isFinalInvokeForWindow":true}"#.to_vec();
        for (how, at, byte) in edits {
            event = mutate(event, how, at, byte);
        }
        let _ = raw_state(&event);
        if let Ok(window) = parse_event::<WindowEvent<'_>>(&event) {
            let _ = window.window.start.to_rfc3339();
            let processor = WindowProcessor::new(CountPerKey::default(), InMemoryDeadLetterSink::new())
                .records(|p| p.retry(ExponentialBackoff::none()))
                .state_retry(ExponentialBackoff::none());
            let _ = block_on(processor.process(&event, &Invocation::unbounded("w")));
        }
    }
}
