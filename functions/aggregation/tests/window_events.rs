//! The aggregation function on the sample events in `events/`, with in-memory stores: what each
//! event answers, exactly one write per window across retried final invocations, canary
//! acknowledgements, the state limit, an unreadable state, and records failing mid-window.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use aggregation::store::InMemoryAggregateStore;
use aggregation::{Aggregation, WindowState};
use serde_json::{Value, json};
use shardwise::InMemoryDeadLetterSink;
use shardwise::clock::ManualClock;
use shardwise::processor::Invocation;
use shardwise::retry::ExponentialBackoff;
use shardwise::window::{WindowConfig, WindowEndReason, WindowError, WindowProcessor};
use shardwise_cards::canary::{CanaryAckError, InMemoryCanaryAckStore};

type Handler = Aggregation<InMemoryAggregateStore, InMemoryCanaryAckStore, ManualClock>;

const NOW_MS: i64 = 1_795_687_265_000;

fn events_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../events")
}

fn load(name: &str) -> Vec<u8> {
    std::fs::read(events_dir().join(name)).unwrap_or_else(|e| panic!("events/{name}: {e}"))
}

fn processor(limit: usize) -> WindowProcessor<Handler, InMemoryDeadLetterSink> {
    let handler = Aggregation::new(InMemoryAggregateStore::new(), InMemoryCanaryAckStore::new())
        .clock(ManualClock::new(NOW_MS));
    WindowProcessor::new(handler, InMemoryDeadLetterSink::new())
        .records(|p| p.retry(ExponentialBackoff::none()))
        .state_retry(ExponentialBackoff::none())
        .window_config(WindowConfig {
            state_limit_bytes: limit,
        })
}

fn default_processor() -> WindowProcessor<Handler, InMemoryDeadLetterSink> {
    processor(shardwise::window::DEFAULT_STATE_LIMIT_BYTES)
}

async fn invoke(
    p: &WindowProcessor<Handler, InMemoryDeadLetterSink>,
    event: &[u8],
) -> Result<Value, WindowError> {
    let report = p.process(event, &Invocation::unbounded("req")).await?;
    Ok(serde_json::to_value(&report.response).unwrap())
}

/// `event` with its `state` replaced by `state`.
fn with_state(event: &[u8], state: &Value) -> Vec<u8> {
    let mut value: Value = serde_json::from_slice(event).unwrap();
    value["state"] = state.clone();
    serde_json::to_vec(&value).unwrap()
}

fn state_of(response: &Value) -> WindowState {
    serde_json::from_value(response["state"].clone()).unwrap()
}

#[tokio::test]
async fn each_sample_event_answers_as_the_readme_says() {
    let p = default_processor();
    let first: Value = serde_json::from_slice(&load("window-first.json")).unwrap();
    assert!(
        first.get("state").is_none(),
        "the first invocation has no state"
    );

    let answer = invoke(&p, &load("window-first.json")).await.unwrap();
    assert_eq!(answer["batchItemFailures"], json!([]));
    let state = state_of(&answer);
    assert_eq!(state.categories["5411"].count, 2);
    assert_eq!(state.categories["5812"].count, 1);
    // The canary is acknowledged, not aggregated.
    assert_eq!(
        p.handler()
            .acks()
            .acks()
            .iter()
            .map(|a| (a.canary_id.as_str(), a.consumer.as_str(), a.acked_at))
            .collect::<Vec<_>>(),
        vec![("canary-2026-11-26T10:00:05Z-0", "aggregation", NOW_MS)]
    );
    // The middle event carries exactly the state the first one returns.
    let middle: Value = serde_json::from_slice(&load("window-middle.json")).unwrap();
    assert_eq!(answer["state"], middle["state"]);

    let answer = invoke(&p, &load("window-middle.json")).await.unwrap();
    assert_eq!(answer["batchItemFailures"], json!([]));
    let final_event: Value = serde_json::from_slice(&load("window-final.json")).unwrap();
    assert_eq!(answer["state"], final_event["state"]);
    assert!(
        p.handler().aggregates().items().is_empty(),
        "nothing written mid-window"
    );

    let answer = invoke(&p, &load("window-final.json")).await.unwrap();
    assert_eq!(answer, json!({"state": {}, "batchItemFailures": []}));
    let items = p.handler().aggregates().items();
    let summary: Vec<_> = items
        .iter()
        .map(|i| {
            (
                i.id.as_str(),
                i.count,
                i.sum_milli,
                i.min,
                i.max,
                i.cards.estimate(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "shardId-000000000000#2026-11-26T10:00:00.000Z#5411",
                3,
                62_090,
                7.99,
                42.1,
                2
            ),
            (
                "shardId-000000000000#2026-11-26T10:00:00.000Z#5812",
                2,
                42_250,
                18.5,
                23.75,
                1
            ),
            (
                "shardId-000000000000#2026-11-26T10:00:00.000Z#5999",
                1,
                250_000,
                250.0,
                250.0,
                1
            ),
        ]
    );
    assert!(items.iter().all(|i| i.version == 1 && !i.partial));
    assert_eq!(items[0].window_end, "2026-11-26T10:01:00.000Z");
}

#[tokio::test]
async fn a_retried_final_invocation_writes_once() {
    let p = default_processor();
    let final_event = load("window-final.json");
    invoke(&p, &final_event).await.unwrap();
    let written = p.handler().aggregates().writes();
    assert_eq!(written, 3);
    let before = p.handler().aggregates().items();
    for _ in 0..3 {
        let answer = invoke(&p, &final_event).await.unwrap();
        assert_eq!(answer["batchItemFailures"], json!([]));
    }
    assert_eq!(p.handler().aggregates().writes(), written);
    assert_eq!(p.handler().aggregates().items(), before);
}

#[tokio::test]
async fn a_failed_write_fails_the_final_invocation_and_its_retry_completes_it() {
    let p = default_processor();
    let final_event = load("window-final.json");
    p.handler().aggregates().fail_next(1);
    let err = invoke(&p, &final_event).await.unwrap_err();
    assert_eq!(err.error_type(), "WindowEndFailed");
    // Lambda retries the final invocation with the same state: the missing item is written,
    // the ones already there are not written again.
    invoke(&p, &final_event).await.unwrap();
    assert_eq!(p.handler().aggregates().items().len(), 3);
    assert_eq!(p.handler().aggregates().writes(), 3);
}

#[tokio::test]
async fn records_failing_mid_window_are_neither_lost_nor_counted_twice() {
    // Reference: every record succeeds.
    let clean = default_processor();
    let reference = state_of(&invoke(&clean, &load("window-first.json")).await.unwrap());

    // The canary's acknowledgement fails (throttled): the processor hands it back, and Lambda
    // redelivers from its sequence number, with the state returned alongside.
    let p = default_processor();
    p.handler().acks().fail_next(throttled());
    let first = load("window-first.json");
    let answer = invoke(&p, &first).await.unwrap();
    let failures = answer["batchItemFailures"].as_array().unwrap().clone();
    assert_eq!(failures.len(), 1);
    let checkpoint = failures[0]["itemIdentifier"].as_str().unwrap().to_owned();
    let event: Value = serde_json::from_slice(&first).unwrap();
    let records = event["Records"].as_array().unwrap();
    let canary_at = records
        .iter()
        .position(|r| r["kinesis"]["sequenceNumber"] == checkpoint.as_str())
        .unwrap();
    assert_eq!(canary_at, 2);
    // The record after the canary (another card, so it ran) is not in the state: it comes back.
    let partial = state_of(&answer);
    assert_eq!(partial.categories["5411"].count, 1);
    assert_eq!(partial.categories["5812"].count, 1);

    let mut redelivery = event.clone();
    redelivery["Records"] = Value::Array(records[canary_at..].to_vec());
    redelivery["state"] = answer["state"].clone();
    let answer = invoke(&p, &serde_json::to_vec(&redelivery).unwrap())
        .await
        .unwrap();
    assert_eq!(answer["batchItemFailures"], json!([]));
    let mut finished = state_of(&answer);
    let mut reference = reference;
    // Same numbers; only the segment's name may differ, and here it does not.
    assert_eq!(
        std::mem::take(&mut finished.categories),
        std::mem::take(&mut reference.categories)
    );
    assert_eq!(
        answer["state"]["shardwise"]["opened_by"],
        json!(records[0]["kinesis"]["sequenceNumber"])
    );
    assert_eq!(p.handler().acks().acks().len(), 1);
}

#[tokio::test]
async fn a_final_invocation_with_a_failing_record_is_retried_whole() {
    let p = default_processor();
    let mut event: Value = serde_json::from_slice(&load("window-first.json")).unwrap();
    event["isFinalInvokeForWindow"] = json!(true);
    p.handler().acks().fail_next(throttled());
    let err = invoke(&p, &serde_json::to_vec(&event).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.error_type(), "WindowFinalInvokeIncomplete");
    assert!(p.handler().aggregates().items().is_empty());
    invoke(&p, &serde_json::to_vec(&event).unwrap())
        .await
        .unwrap();
    assert_eq!(p.handler().aggregates().items().len(), 2);
}

#[tokio::test]
async fn poison_records_are_dead_lettered_and_not_counted() {
    let p = default_processor();
    let mut event: Value = serde_json::from_slice(&load("window-first.json")).unwrap();
    let mut poison = event["Records"][0].clone();
    poison["kinesis"]["data"] = json!("bm90IGpzb24="); // "not json"
    poison["kinesis"]["sequenceNumber"] =
        json!("49590338271490256608559692538361571095921575989136589999");
    event["Records"].as_array_mut().unwrap().push(poison);
    let answer = invoke(&p, &serde_json::to_vec(&event).unwrap())
        .await
        .unwrap();
    assert_eq!(answer["batchItemFailures"], json!([]));
    assert_eq!(state_of(&answer).categories["5411"].count, 2);
    let letters = p.dead_letter_sink().letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["error"]["type"], "PayloadNotJson");
}

#[tokio::test]
async fn an_unreadable_state_is_dead_lettered_and_the_window_restarts_marked_partial() {
    let p = default_processor();
    let middle = load("window-middle.json");
    let mut bad: Value = serde_json::from_slice(&middle).unwrap();
    bad["state"]["categories"]["5411"]["count"] = json!("two");
    let answer = invoke(&p, &serde_json::to_vec(&bad).unwrap())
        .await
        .unwrap();
    let letters = p.dead_letter_sink().letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["kind"], "WindowState");
    assert_eq!(letters[0]["error"]["type"], "WindowStateInvalid");
    let message = letters[0]["error"]["message"].as_str().unwrap();
    assert!(message.contains("`categories.5411.count`"), "{message}");
    let kept: Value = serde_json::from_str(letters[0]["state"].as_str().unwrap()).unwrap();
    assert_eq!(
        kept, bad["state"],
        "the old state is kept whole in the dead letter"
    );
    assert_eq!(letters[0]["shardId"], "shardId-000000000000");

    // The window goes on from this batch alone, and says so when it ends.
    assert_eq!(answer["state"]["shardwise"]["partial"], json!(true));
    assert_eq!(state_of(&answer).categories["5411"].count, 1);
    let final_event = with_state(&load("window-final.json"), &answer["state"]);
    invoke(&p, &final_event).await.unwrap();
    let items = p.handler().aggregates().items();
    assert!(items.iter().all(|i| i.partial));
}

#[tokio::test]
async fn an_unreadable_state_that_cannot_be_dead_lettered_fails_the_invocation() {
    let p = default_processor();
    p.dead_letter_sink()
        .inject(shardwise::dead_letter::SinkFault::FailCall);
    let mut bad: Value = serde_json::from_slice(&load("window-middle.json")).unwrap();
    bad["state"] = json!({"categories": 5});
    let err = invoke(&p, &serde_json::to_vec(&bad).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.error_type(), "WindowStateNotDeadLettered");
    assert!(err.to_string().contains("`categories`"), "{err}");
    assert!(p.handler().acks().acks().is_empty(), "no record ran");
}

#[tokio::test]
async fn a_state_over_its_limit_is_flushed_and_the_segments_add_up_once() {
    // 380 bytes: the first invocation's state fits, the middle one's does not.
    let p = processor(380);
    let answer = invoke(&p, &load("window-first.json")).await.unwrap();
    let first_state = answer["state"].clone();
    assert!(first_state.to_string().len() <= 380);
    assert!(
        first_state["categories"].is_object(),
        "not flushed: {first_state}"
    );

    let middle = with_state(&load("window-middle.json"), &first_state);
    let report = p
        .process(&middle, &Invocation::unbounded("r"))
        .await
        .unwrap();
    assert_eq!(report.ended, Some(WindowEndReason::StateLimit));
    let flushed = p.handler().aggregates().items();
    assert_eq!(flushed.len(), 3);
    let answer = serde_json::to_value(&report.response).unwrap();
    assert_eq!(
        answer["state"],
        json!({"shardwise": {"through": "49590338271490256608559692538361571095921575980000000007"}}),
        "the window goes on with a fresh state that still knows what it accounted for"
    );

    // Lambda retries the flushing invocation (say the response was lost): nothing new is written.
    let retried = p
        .process(&middle, &Invocation::unbounded("r2"))
        .await
        .unwrap();
    assert_eq!(retried.ended, Some(WindowEndReason::StateLimit));
    assert_eq!(p.handler().aggregates().writes(), 3);

    // More records in a second segment, then the window's end: merged into the same items.
    let mut second: Value = serde_json::from_slice(&load("window-middle.json")).unwrap();
    for record in second["Records"].as_array_mut().unwrap() {
        let seq = record["kinesis"]["sequenceNumber"].as_str().unwrap();
        let later = format!("{}9{}", &seq[..45], &seq[46..]);
        record["kinesis"]["sequenceNumber"] = json!(later);
        record["eventID"] = json!(format!("shardId-000000000000:{later}"));
    }
    second["state"] = answer["state"].clone();
    let answer = invoke(&p, &serde_json::to_vec(&second).unwrap())
        .await
        .unwrap();
    let final_event = with_state(&load("window-final.json"), &answer["state"]);
    invoke(&p, &final_event).await.unwrap();
    invoke(&p, &final_event).await.unwrap();
    let item = p
        .handler()
        .aggregates()
        .get("shardId-000000000000#2026-11-26T10:00:00.000Z#5999")
        .unwrap();
    assert_eq!(item.count, 2, "one 5999 sale in each segment");
    assert_eq!(item.segments.len(), 2);
    assert_eq!(item.version, 2);
    let grocery = p
        .handler()
        .aggregates()
        .get("shardId-000000000000#2026-11-26T10:00:00.000Z#5411")
        .unwrap();
    assert_eq!(grocery.count, 4);
    assert_eq!(grocery.cards.estimate(), 2);
    // 3 first writes, 3 merges at the end: never more, however often retried.
    assert_eq!(p.handler().aggregates().writes(), 6);
}

#[tokio::test]
async fn the_state_stays_small_with_many_cards() {
    let mut state = WindowState::default();
    for n in 0..10_000u64 {
        state.add(aggregation::Sale {
            merchant_category: format!("{}", 5000 + n % 200),
            amount: 1.0,
            amount_milli: 1000,
            card: aggregation::cards::card_hash(&format!("card-{n}")),
        });
    }
    let bytes = serde_json::to_vec(&state).unwrap().len();
    // 200 categories with a 1 KiB sketch each: well under the 768 KiB default limit.
    assert!(bytes < 320 * 1024, "{bytes} bytes");
}

/// What a throttled acknowledgement write reports.
fn throttled() -> CanaryAckError {
    CanaryAckError {
        retryable: true,
        message: "ThrottlingException: injected".to_owned(),
    }
}
