//! Tumbling windows with a counting handler: AWS's own example event, the response shape, which
//! records the state may hold after a partial failure (KPL included), the state limit, Lambda's
//! early termination, unreadable states and incomplete final invocations.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::{Value, json};
use shardwise::metrics::MetricsWriter;
use shardwise::processor::Invocation;
use shardwise::retry::ExponentialBackoff;
use shardwise::testing::{event_json, plain, sequence_number};
use shardwise::window::{
    WindowConfig, WindowEnd, WindowEndReason, WindowHandler, WindowProcessor, WindowRecordHandler,
};
use shardwise::{HandlerError, InMemoryDeadLetterSink, Json, Record, handle_invocation};

/// A window end the handler saw: state, reason, segment, partial.
type SeenEnd = (BTreeMap<String, u64>, WindowEndReason, Option<String>, bool);

/// AWS's example: count records per partition key. The state is `{"<key>": <count>}`.
#[derive(Default)]
struct CountPerKey {
    ends: Mutex<Vec<SeenEnd>>,
    fail_end: Mutex<bool>,
}

#[derive(serde::Deserialize)]
struct Command<'a> {
    #[serde(default)]
    fail: Option<&'a str>,
}

impl WindowHandler for CountPerKey {
    type State = BTreeMap<String, u64>;
    type Contribution = String;

    fn fold(&self, state: &mut Self::State, key: String) {
        *state.entry(key).or_default() += 1;
    }

    async fn on_window_end(
        &self,
        state: &Self::State,
        end: &WindowEnd<'_>,
    ) -> Result<(), HandlerError> {
        if *self.fail_end.lock().unwrap() {
            return Err(HandlerError::retryable("table throttled"));
        }
        self.ends.lock().unwrap().push((
            state.clone(),
            end.reason,
            end.segment.map(str::to_owned),
            end.partial,
        ));
        Ok(())
    }
}

impl<'d> WindowRecordHandler<'d> for CountPerKey {
    type Payload = Json<Command<'d>>;

    async fn contribute(
        &self,
        record: &Record<'d>,
        command: &Json<Command<'d>>,
    ) -> Result<Option<String>, HandlerError> {
        match command.fail {
            Some("retry") => Err(HandlerError::retryable("throttled")),
            Some("permanent") => Err(HandlerError::permanent("bad record")),
            _ => Ok(Some(record.partition_key.to_owned())),
        }
    }
}

fn processor() -> WindowProcessor<CountPerKey, InMemoryDeadLetterSink> {
    WindowProcessor::new(CountPerKey::default(), InMemoryDeadLetterSink::new())
        .records(|p| p.retry(ExponentialBackoff::none()))
        .state_retry(ExponentialBackoff::none())
}

/// A window event around `records`, with `extra` top-level fields.
fn window_event(records: &[shardwise::testing::TestRecord], extra: Value) -> Vec<u8> {
    let mut event: Value = serde_json::from_str(&event_json(records)).unwrap();
    event["window"] = json!({"start": "2020-12-09T07:04:00Z", "end": "2020-12-09T07:06:00Z"});
    event["shardId"] = json!("shardId-000000000000");
    event["eventSourceARN"] = json!("arn:aws:kinesis:us-east-1:123456789012:stream/transactions");
    event["isFinalInvokeForWindow"] = json!(false);
    event["isWindowTerminatedEarly"] = json!(false);
    for (key, value) in extra.as_object().unwrap() {
        event[key] = value.clone();
    }
    serde_json::to_vec(&event).unwrap()
}

fn rec(key: &str, n: u64, body: &str) -> shardwise::testing::TestRecord {
    plain(key, &sequence_number(n), body.as_bytes())
}

async fn invoke(p: &WindowProcessor<CountPerKey, InMemoryDeadLetterSink>, event: &[u8]) -> Value {
    let report = p.process(event, &Invocation::unbounded("r")).await.unwrap();
    serde_json::to_value(&report.response).unwrap()
}

/// AWS's example event from the Lambda Developer Guide, verbatim.
const AWS_EXAMPLE: &str = r#"{
    "Records": [
        {
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "partitionKey": "1",
                "sequenceNumber": "49590338271490256608559692538361571095921575989136588898",
                "data": "SGVsbG8sIHRoaXMgaXMgYSB0ZXN0Lg==",
                "approximateArrivalTimestamp": 1607497475.000
            },
            "eventSource": "aws:kinesis",
            "eventVersion": "1.0",
            "eventID": "shardId-000000000006:49590338271490256608559692538361571095921575989136588898",
            "eventName": "aws:kinesis:record",
            "invokeIdentityArn": "arn:aws:iam::123456789012:role/lambda-kinesis-role",
            "awsRegion": "us-east-1",
            "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/lambda-stream"
        }
    ],
    "window": {
        "start": "2020-12-09T07:04:00Z",
        "end": "2020-12-09T07:06:00Z"
    },
    "state": {
        "1": 282,
        "2": 715
    },
    "shardId": "shardId-000000000006",
    "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/lambda-stream",
    "isFinalInvokeForWindow": false,
    "isWindowTerminatedEarly": false
}"#;

/// Counts records by partition key whatever their payload (AWS's example is not JSON).
struct RawCount;

impl WindowHandler for RawCount {
    type State = BTreeMap<String, u64>;
    type Contribution = String;
    fn fold(&self, state: &mut Self::State, key: String) {
        *state.entry(key).or_default() += 1;
    }
    async fn on_window_end(&self, _: &Self::State, _: &WindowEnd<'_>) -> Result<(), HandlerError> {
        Ok(())
    }
}

impl<'d> WindowRecordHandler<'d> for RawCount {
    type Payload = &'d [u8];
    async fn contribute(
        &self,
        record: &Record<'d>,
        _: &&'d [u8],
    ) -> Result<Option<String>, HandlerError> {
        Ok(Some(record.partition_key.to_owned()))
    }
}

#[tokio::test]
async fn aws_example_event_reads_and_the_response_carries_state_and_failures() {
    let p = WindowProcessor::new(RawCount, InMemoryDeadLetterSink::new());
    let report = p
        .process(AWS_EXAMPLE.as_bytes(), &Invocation::unbounded("r"))
        .await
        .unwrap();
    let response = serde_json::to_value(&report.response).unwrap();
    assert_eq!(
        response,
        json!({
            "state": {
                "1": 283,
                "2": 715,
                "shardwise": {
                    "opened_by": "49590338271490256608559692538361571095921575989136588898",
                    "through": "49590338271490256608559692538361571095921575989136588898"
                }
            },
            "batchItemFailures": []
        })
    );
}

#[tokio::test]
async fn a_first_invocation_without_state_starts_from_the_default() {
    let p = processor();
    let event = window_event(
        &[rec("a", 1, "{}"), rec("b", 2, "{}"), rec("a", 3, "{}")],
        json!({}),
    );
    let response = invoke(&p, &event).await;
    assert_eq!(response["state"]["a"], 2);
    assert_eq!(response["state"]["b"], 1);
    assert_eq!(
        response["state"]["shardwise"]["opened_by"],
        json!(sequence_number(1))
    );
    for empty in [json!({}), Value::Null] {
        let event = window_event(&[rec("a", 1, "{}")], json!({"state": empty}));
        assert_eq!(invoke(&p, &event).await["state"]["a"], 1);
    }
}

#[tokio::test]
async fn records_from_the_checkpoint_on_are_not_folded_even_when_they_ran() {
    let p = processor();
    let state = json!({"a": 10, "shardwise": {"opened_by": "1"}});
    let records = [
        rec("a", 1, "{}"),
        rec("b", 2, r#"{"fail":"retry"}"#),
        rec("a", 3, "{}"), // ran (another key), but after the checkpoint: redelivered
        rec("c", 4, r#"{"fail":"permanent"}"#), // dead-lettered: acknowledged, never folded
        rec("b", 5, "{}"), // blocked behind b/2
    ];
    let event = window_event(&records, json!({"state": state}));
    let report = p
        .process(&event, &Invocation::unbounded("r"))
        .await
        .unwrap();
    let response = serde_json::to_value(&report.response).unwrap();
    assert_eq!(
        response["batchItemFailures"],
        json!([{"itemIdentifier": sequence_number(2)}])
    );
    assert_eq!(
        response["state"]["a"], 11,
        "only a/1 is before the checkpoint"
    );
    assert!(response["state"].get("b").is_none());
    assert_eq!(
        response["state"]["shardwise"]["opened_by"], "1",
        "the segment keeps its name"
    );
    assert_eq!(report.folded, 1);
    assert_eq!(p.dead_letter_sink().letters().len(), 1);

    // Lambda redelivers from the checkpoint with that state: every record counted once.
    let again = window_event(
        &[
            rec("b", 2, "{}"),
            rec("a", 3, "{}"),
            rec("c", 4, "{}"),
            rec("b", 5, "{}"),
        ],
        json!({"state": response["state"]}),
    );
    let response = invoke(&p, &again).await;
    assert_eq!(response["state"]["a"], 12);
    assert_eq!(response["state"]["b"], 2);
    assert_eq!(response["state"]["c"], 1);
}

#[tokio::test]
async fn kpl_user_records_are_folded_or_dropped_with_their_aggregate() {
    let entries = [("u1", "{}"), ("u2", r#"{"fail":"retry"}"#), ("u3", "{}")];
    let aggregate = shardwise::kpl::aggregate(
        &entries
            .iter()
            .map(|(key, body)| shardwise::kpl::AggregateEntry {
                partition_key: key,
                explicit_hash_key: None,
                data: body.as_bytes(),
            })
            .collect::<Vec<_>>(),
    );
    let p = processor();
    let records = [
        rec("x", 1, "{}"),
        plain("agg", &sequence_number(2), &aggregate),
        rec("y", 3, "{}"),
    ];
    let response = invoke(&p, &window_event(&records, json!({}))).await;
    assert_eq!(
        response["batchItemFailures"],
        json!([{"itemIdentifier": sequence_number(2)}])
    );
    // u1 succeeded but shares its aggregate's sequence number, which Lambda redelivers whole.
    let state = response["state"].as_object().unwrap();
    assert_eq!(state["x"], 1);
    assert!(!state.contains_key("u1") && !state.contains_key("y"));
}

#[tokio::test]
async fn the_final_invocation_ends_the_window_with_the_whole_state() {
    let p = processor();
    let event = window_event(
        &[],
        json!({"isFinalInvokeForWindow": true, "state": {"a": 3, "shardwise": {"opened_by": "7"}}}),
    );
    let response = invoke(&p, &event).await;
    assert_eq!(response, json!({"state": {}, "batchItemFailures": []}));
    let ends = p.handler().ends.lock().unwrap().clone();
    assert_eq!(
        ends,
        vec![(
            BTreeMap::from([("a".to_owned(), 3)]),
            WindowEndReason::Final,
            Some("7".to_owned()),
            false
        )]
    );
}

#[tokio::test]
async fn a_final_invocation_is_failed_rather_than_ended_incomplete() {
    let p = processor();
    let event = window_event(
        &[rec("a", 1, "{}"), rec("b", 2, r#"{"fail":"retry"}"#)],
        json!({"isFinalInvokeForWindow": true}),
    );
    let err = p
        .process(&event, &Invocation::unbounded("r"))
        .await
        .unwrap_err();
    assert_eq!(err.error_type(), "WindowFinalInvokeIncomplete");
    assert!(err.to_string().contains(&sequence_number(2)), "{err}");
    assert!(p.handler().ends.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_failing_end_hook_fails_the_invocation() {
    let p = processor();
    *p.handler().fail_end.lock().unwrap() = true;
    let event = window_event(
        &[],
        json!({"isFinalInvokeForWindow": true, "state": {"a": 1}}),
    );
    let err = p
        .process(&event, &Invocation::unbounded("r"))
        .await
        .unwrap_err();
    assert_eq!(err.error_type(), "WindowEndFailed");
    assert!(err.to_string().contains("throttled"), "{err}");
}

#[tokio::test]
async fn a_state_over_the_limit_ends_the_segment_and_continues_fresh() {
    let p = processor().window_config(WindowConfig {
        state_limit_bytes: 40,
    });
    let records: Vec<_> = (1..=6).map(|n| rec(&format!("key-{n}"), n, "{}")).collect();
    let report = p
        .process(
            &window_event(&records, json!({})),
            &Invocation::unbounded("r"),
        )
        .await
        .unwrap();
    assert_eq!(report.ended, Some(WindowEndReason::StateLimit));
    let response = serde_json::to_value(&report.response).unwrap();
    // Fresh, but it still knows what the ended segment accounted for.
    assert_eq!(
        response["state"],
        json!({"shardwise": {"through": sequence_number(6)}})
    );
    let ends = p.handler().ends.lock().unwrap().clone();
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].0.len(), 6, "the flushed state held every record");
    assert_eq!(ends[0].2.as_deref(), Some(sequence_number(1).as_str()));

    // The configured limit can never exceed Lambda's.
    let p = processor().window_config(WindowConfig {
        state_limit_bytes: 5_000_000,
    });
    assert_eq!(p.window_settings().state_limit_bytes, 1_000_000);
}

#[tokio::test]
async fn lambdas_early_termination_ends_the_segment_too() {
    let p = processor();
    let event = window_event(
        &[rec("a", 9, "{}")],
        json!({"isWindowTerminatedEarly": true, "state": {"a": 1, "shardwise": {"opened_by": "3"}}}),
    );
    let response = invoke(&p, &event).await;
    assert_eq!(
        response["state"],
        json!({"shardwise": {"through": sequence_number(9)}})
    );
    let ends = p.handler().ends.lock().unwrap().clone();
    assert_eq!(ends[0].0["a"], 2);
    assert_eq!(ends[0].1, WindowEndReason::TerminatedEarly);
}

#[tokio::test]
async fn an_unreadable_state_is_dead_lettered_whole_and_the_window_restarts() {
    let p = processor();
    let bad = json!({"a": "many", "b": 2});
    let event = window_event(&[rec("a", 1, "{}")], json!({"state": bad}));
    let report = p
        .process(&event, &Invocation::unbounded("req-7"))
        .await
        .unwrap();
    let reset = report.state_reset.clone().unwrap();
    assert_eq!(reset.path, "a");
    let response = serde_json::to_value(&report.response).unwrap();
    assert_eq!(response["state"]["a"], 1);
    assert_eq!(response["state"]["shardwise"]["partial"], true);
    let letters = p.dead_letter_sink().letters();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter["error"]["type"], "WindowStateInvalid");
    assert_eq!(letter["requestId"], "req-7");
    assert_eq!(letter["window"]["start"], "2020-12-09T07:04:00.000Z");
    assert_eq!(letter["stateTruncated"], false);
    let kept: Value = serde_json::from_str(letter["state"].as_str().unwrap()).unwrap();
    assert_eq!(kept, bad);
}

#[tokio::test]
async fn a_state_too_big_for_a_dead_letter_goes_without_its_body() {
    let p = processor();
    let big: BTreeMap<String, String> = (0..3000)
        .map(|n| (format!("k{n}"), "x".repeat(100)))
        .collect();
    let event = window_event(&[], json!({"state": big}));
    let report = p
        .process(&event, &Invocation::unbounded("r"))
        .await
        .unwrap();
    assert!(report.state_reset.is_some());
    let letter = &p.dead_letter_sink().letters()[0];
    assert_eq!(letter["stateTruncated"], true);
    assert!(letter.get("state").is_none());
}

#[tokio::test]
async fn a_malformed_window_event_fails_the_invocation() {
    let p = processor();
    let err = p
        .process(
            br#"{"Records":[],"window":{"start":"2020-12-09T07:04:00Z"}}"#,
            &Invocation::unbounded("r"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.error_type(), "MalformedEvent");
    assert!(err.to_string().contains("end"), "{err}");
}

#[derive(Default)]
struct Lines(Mutex<Vec<String>>);

impl MetricsWriter for Lines {
    fn write_line(&self, line: &str) {
        self.0.lock().unwrap().push(line.to_owned());
    }
}

#[tokio::test]
async fn the_lambda_entry_point_writes_window_metrics() {
    let lines = std::sync::Arc::new(Lines::default());
    let clock = shardwise::clock::ManualClock::new(1_607_497_475_000);
    let p = processor().records(|r| r.clock(clock).metrics(lines.clone()));
    let event = window_event(
        &[],
        json!({"isFinalInvokeForWindow": true, "state": {"a": 1}}),
    );
    let response = handle_invocation(&p, "req", 1_607_497_535_000, &event)
        .await
        .unwrap();
    let response: Value = serde_json::from_slice(&response).unwrap();
    assert_eq!(response["state"], json!({}));
    let lines = lines.0.lock().unwrap();
    let line: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(line["WindowsEnded"], 1.0);
    assert_eq!(line["windowEnd"], "Final");
    assert_eq!(line["WindowStateBytes"], 2.0);
}

/// AWS's two flags: `isFinalInvokeForWindow` ends the window (a new one follows with a fresh
/// state), `isWindowTerminatedEarly` ends its state (the same window goes on with a fresh one).
/// Set together, the window is not complete: the early end wins, so a hook never sees `Final`
/// for a window that goes on.
#[tokio::test]
async fn each_combination_of_the_window_flags_ends_the_window_as_aws_documents() {
    for (is_final, early, expected) in [
        (false, false, None),
        (true, false, Some(WindowEndReason::Final)),
        (false, true, Some(WindowEndReason::TerminatedEarly)),
        (true, true, Some(WindowEndReason::TerminatedEarly)),
    ] {
        let p = processor();
        let event = window_event(
            &[rec("a", 1, "{}")],
            json!({"isFinalInvokeForWindow": is_final, "isWindowTerminatedEarly": early}),
        );
        let report = p
            .process(&event, &Invocation::unbounded("r"))
            .await
            .unwrap();
        assert_eq!(report.ended, expected, "final {is_final}, early {early}");
        let reasons: Vec<_> = p
            .handler()
            .ends
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.1)
            .collect();
        assert_eq!(reasons, expected.into_iter().collect::<Vec<_>>());
    }
}
