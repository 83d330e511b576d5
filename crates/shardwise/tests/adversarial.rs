//! Cases found by adversarial tests against the public API, each kept as a regression test: a
//! window's contributions under an idempotency gate, calls bounded by the deadline, dead letters
//! that always fit, claims whose answer was lost, event-wide KPL expansion, duplicates across
//! partition keys, and keys that keep their JSON type.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use shardwise::clock::ManualClock;
use shardwise::dead_letter::{DeadLetterSink, EntryFailure, SinkEntry, SinkError};
use shardwise::idempotency::{
    Idempotency, InMemoryIdempotencyStore, JsonFieldKey, StoreFault, StoreOp,
};
use shardwise::kpl::{self, AggregateEntry};
use shardwise::processor::Outcome;
use shardwise::retry::ExponentialBackoff;
use shardwise::testing::{event_json, plain, sequence_number};
use shardwise::window::{
    WindowEnd, WindowEndReason, WindowError, WindowHandler, WindowProcessor, WindowRecordHandler,
};
use shardwise::{
    BatchHandler, HandlerError, InMemoryDeadLetterSink, Invocation, Json, Processor, Record,
    RecordHandler, TypedRecord,
};
use tokio::time::Instant;

const NOW_MS: i64 = 1_700_000_000_000;

#[derive(Debug, Deserialize)]
struct Command<'a> {
    #[serde(default)]
    fail: Option<&'a str>,
}

/// Counts records per partition key; `{"fail":"once"}` fails a record's first attempt ever
/// (across invocations), `{"fail":"permanent"}` every attempt.
#[derive(Default)]
struct FlakyCount {
    attempts: Mutex<HashMap<String, u32>>,
    ends: Mutex<Vec<(BTreeMap<String, u64>, WindowEndReason)>>,
    fail_end: Mutex<u32>,
}

impl WindowHandler for FlakyCount {
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
        {
            let mut failing = self.fail_end.lock().unwrap();
            if *failing > 0 {
                *failing -= 1;
                return Err(HandlerError::retryable("aggregates table throttled"));
            }
        }
        self.ends.lock().unwrap().push((state.clone(), end.reason));
        Ok(())
    }
}

impl<'d> WindowRecordHandler<'d> for FlakyCount {
    type Payload = Json<Command<'d>>;

    async fn contribute(
        &self,
        record: &Record<'d>,
        command: &Json<Command<'d>>,
    ) -> Result<Option<String>, HandlerError> {
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap();
            let n = attempts
                .entry(record.sequence_number.to_string())
                .or_default();
            *n += 1;
            *n
        };
        match command.fail {
            Some("once") if attempt == 1 => Err(HandlerError::retryable("throttled")),
            Some("permanent") => Err(HandlerError::permanent("bad record")),
            _ => Ok(Some(record.partition_key.to_owned())),
        }
    }
}

type Windows = WindowProcessor<
    FlakyCount,
    InMemoryDeadLetterSink,
    Idempotency<Arc<InMemoryIdempotencyStore>, shardwise::idempotency::RecordKey, ManualClock>,
>;

fn gated_windows(store: &Arc<InMemoryIdempotencyStore>) -> Windows {
    WindowProcessor::new(FlakyCount::default(), InMemoryDeadLetterSink::new())
        .records(|p| {
            p.retry(ExponentialBackoff::none())
                .gate(Idempotency::new(store.clone()).clock(ManualClock::new(NOW_MS)))
        })
        .state_retry(ExponentialBackoff::none())
}

fn window_event(records: &[(&str, u64, &str)], state: &Value, last: bool) -> Vec<u8> {
    let records: Vec<_> = records
        .iter()
        .map(|(key, n, body)| plain(key, &sequence_number(*n), body.as_bytes()))
        .collect();
    let mut event: Value = serde_json::from_str(&event_json(&records)).unwrap();
    event["window"] = json!({"start": "2020-12-09T07:04:00Z", "end": "2020-12-09T07:06:00Z"});
    event["shardId"] = json!("shardId-000000000000");
    event["eventSourceARN"] = json!("arn:aws:kinesis:us-east-1:123456789012:stream/transactions");
    event["isFinalInvokeForWindow"] = json!(last);
    event["isWindowTerminatedEarly"] = json!(false);
    event["state"] = state.clone();
    serde_json::to_vec(&event).unwrap()
}

fn counts(state: &Value) -> BTreeMap<String, u64> {
    state
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.as_str() != "shardwise")
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

fn invocation() -> Invocation {
    Invocation::unbounded("req")
}

#[tokio::test]
async fn a_gated_window_folds_a_record_whose_contribution_was_dropped_when_it_returns() {
    let store = Arc::new(InMemoryIdempotencyStore::new());
    let p = gated_windows(&store);
    let first = window_event(
        &[
            ("a", 1, "{}"),
            ("b", 2, r#"{"fail":"once"}"#),
            ("a", 3, "{}"),
        ],
        &json!({}),
        false,
    );
    let report = p.process(&first, &invocation()).await.unwrap();
    let failures: Vec<_> = report
        .response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect();
    assert_eq!(failures, vec![sequence_number(2)]);
    let state: Value = serde_json::from_str(report.response.state.get()).unwrap();
    assert_eq!(counts(&state), BTreeMap::from([("a".into(), 1)]));

    // Lambda redelivers from the checkpoint with the state it committed.
    let again = window_event(
        &[("b", 2, r#"{"fail":"once"}"#), ("a", 3, "{}")],
        &state,
        false,
    );
    let report = p.process(&again, &invocation()).await.unwrap();
    assert!(report.response.batch_item_failures.is_empty());
    assert!(
        report
            .batch
            .outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Processed { .. })),
        "{:?}",
        report.batch.outcomes
    );
    let state: Value = serde_json::from_str(report.response.state.get()).unwrap();
    assert_eq!(
        counts(&state),
        BTreeMap::from([("a".into(), 2), ("b".into(), 1)])
    );
}

#[tokio::test]
async fn a_retried_final_invocation_and_a_failed_end_hook_keep_every_contribution() {
    let store = Arc::new(InMemoryIdempotencyStore::new());
    let p = gated_windows(&store);
    let last = window_event(
        &[("a", 1, "{}"), ("b", 2, r#"{"fail":"once"}"#)],
        &json!({}),
        true,
    );
    let error = p.process(&last, &invocation()).await.unwrap_err();
    assert!(matches!(error, WindowError::FinalInvokeIncomplete { .. }));
    // Lambda retries the whole final invocation; the end hook fails once more.
    *p.handler().fail_end.lock().unwrap() = 1;
    let error = p.process(&last, &invocation()).await.unwrap_err();
    assert!(matches!(error, WindowError::WindowEnd { .. }), "{error}");
    let report = p.process(&last, &invocation()).await.unwrap();
    assert_eq!(report.ended, Some(WindowEndReason::Final));
    let ends = p.handler().ends.lock().unwrap().clone();
    assert_eq!(
        ends,
        vec![(
            BTreeMap::from([("a".into(), 1), ("b".into(), 1)]),
            WindowEndReason::Final
        )]
    );
}

#[tokio::test]
async fn a_lost_response_is_retried_with_the_old_state_and_nothing_is_lost_or_doubled() {
    let store = Arc::new(InMemoryIdempotencyStore::new());
    let p = gated_windows(&store);
    let first = window_event(&[("a", 1, "{}"), ("a", 2, "{}")], &json!({}), false);
    let committed: Value = serde_json::from_str(
        p.process(&first, &invocation())
            .await
            .unwrap()
            .response
            .state
            .get(),
    )
    .unwrap();
    // The next invocation succeeds, but its response never reaches Lambda, which retries it
    // with the state it had.
    let next = window_event(&[("a", 3, "{}"), ("b", 4, "{}")], &committed, false);
    let _lost = p.process(&next, &invocation()).await.unwrap();
    let report = p.process(&next, &invocation()).await.unwrap();
    let state: Value = serde_json::from_str(report.response.state.get()).unwrap();
    assert_eq!(
        counts(&state),
        BTreeMap::from([("a".into(), 3), ("b".into(), 1)])
    );
    // Records the state already holds are never folded twice, whatever the store says.
    let replay = window_event(&[("a", 3, "{}"), ("b", 4, "{}")], &state, false);
    let report = p.process(&replay, &invocation()).await.unwrap();
    assert!(
        report
            .batch
            .outcomes
            .iter()
            .all(|o| *o == Outcome::AlreadyDone)
    );
    let state: Value = serde_json::from_str(report.response.state.get()).unwrap();
    assert_eq!(
        counts(&state),
        BTreeMap::from([("a".into(), 3), ("b".into(), 1)])
    );
}

/// Runs every record once per delivery and counts the effects per sequence number.
#[derive(Default)]
struct Effects {
    runs: Mutex<HashMap<String, u32>>,
}

impl Effects {
    fn of(&self, n: u64) -> u32 {
        self.runs
            .lock()
            .unwrap()
            .get(&sequence_number(n))
            .copied()
            .unwrap_or(0)
    }
}

impl<'d> RecordHandler<'d> for Effects {
    type Payload = Json<Command<'d>>;

    async fn handle(
        &self,
        record: &Record<'d>,
        command: &Json<Command<'d>>,
    ) -> Result<(), HandlerError> {
        *self
            .runs
            .lock()
            .unwrap()
            .entry(record.sequence_number.to_string())
            .or_default() += 1;
        match command.fail {
            Some("permanent") => Err(HandlerError::permanent("poison")),
            Some("retry") => Err(HandlerError::retryable("throttled")),
            Some("quote") => Err(HandlerError::permanent(format!(
                "field `note` is invalid: {}",
                String::from_utf8_lossy(record.data)
            ))),
            _ => Ok(()),
        }
    }
}

/// A dead-letter queue that cannot be reached: each call hangs for `hang`, then fails.
#[derive(Default)]
struct Unreachable {
    hang: Duration,
    calls: AtomicU32,
}

impl DeadLetterSink for Unreachable {
    async fn send_batch(&self, _: &[SinkEntry]) -> Result<Vec<EntryFailure>, SinkError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.hang).await;
        Err(SinkError::new("connect timeout"))
    }
}

#[tokio::test(start_paused = true)]
async fn dead_lettering_ends_before_the_deadline_and_the_good_record_runs_once() {
    let store = Arc::new(InMemoryIdempotencyStore::new());
    let sink = Unreachable {
        hang: Duration::from_secs(10),
        ..Unreachable::default()
    };
    let p = Processor::per_record(Effects::default(), sink)
        .gate(Idempotency::new(store.clone()).clock(ManualClock::new(NOW_MS)));
    let event = event_json(&[
        plain("a", &sequence_number(1), b"{}"),
        plain("b", &sequence_number(2), br#"{"fail":"permanent"}"#),
    ]);
    for _ in 0..2 {
        let started = Instant::now();
        let invocation = Invocation {
            request_id: "req".into(),
            deadline: Some(started + Duration::from_secs(3)),
            deadline_ms: Some(NOW_MS + 3_000),
        };
        let report = p.process(event.as_bytes(), &invocation).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "ran {:?}",
            started.elapsed()
        );
        assert!(matches!(report.outcomes[1], Outcome::Retryable { .. }));
    }
    // The poison record was handed back both times (its dead letter never went out); the good
    // one's completion was written the first time.
    assert_eq!(p.handler().0.of(1), 1);
}

#[tokio::test]
async fn a_dead_letter_always_fits_even_when_its_error_quotes_a_large_payload() {
    let p = Processor::per_record(Effects::default(), InMemoryDeadLetterSink::new())
        .retry(ExponentialBackoff::none());
    let note = "x".repeat(1_100 * 1024);
    let body = format!(r#"{{"fail":"quote","note":"{note}"}}"#);
    let event = event_json(&[plain("a", &sequence_number(1), body.as_bytes())]);
    let report = p.process(event.as_bytes(), &invocation()).await.unwrap();
    assert!(matches!(report.outcomes[0], Outcome::DeadLettered { .. }));
    let bodies = p.dead_letter_sink().bodies();
    assert_eq!(bodies.len(), 1);
    assert!(bodies[0].len() <= 256 * 1024, "{} bytes", bodies[0].len());
    let letter: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(letter["dataTruncated"], true);
    assert_eq!(letter["sequenceNumber"], sequence_number(1));
    let message = letter["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("field `note` is invalid"), "{message}");
    assert!(
        message.ends_with("bytes in all]"),
        "{}",
        &message[message.len() - 60..]
    );
}

#[tokio::test(start_paused = true)]
async fn a_claim_applied_but_answered_with_a_timeout_does_not_block_its_own_record() {
    let store = Arc::new(InMemoryIdempotencyStore::new());
    store.inject(StoreOp::Claim, StoreFault::AppliedThenLost);
    let p = Processor::per_record(Effects::default(), InMemoryDeadLetterSink::new()).gate(
        Idempotency::new(store.clone())
            .key(JsonFieldKey::new("id"))
            .clock(ManualClock::new(NOW_MS)),
    );
    let event = event_json(&[plain("a", &sequence_number(1), br#"{"id":"tx-1"}"#)]);
    let report = p.process(event.as_bytes(), &invocation()).await.unwrap();
    assert_eq!(report.outcomes, vec![Outcome::Processed { attempts: 1 }]);
    assert_eq!(p.handler().0.of(1), 1);
    assert_eq!(store.calls(StoreOp::Claim), vec![1, 1]);
}

#[tokio::test]
async fn an_event_of_many_aggregates_cannot_expand_past_its_budget() {
    let key = "k".repeat(256);
    let entries: Vec<AggregateEntry<'_>> = (0..170_000)
        .map(|_| AggregateEntry {
            partition_key: &key,
            explicit_hash_key: None,
            data: b"{}",
        })
        .collect();
    let aggregate = kpl::aggregate(&entries);
    // One aggregate alone is within its own limits.
    assert_eq!(
        kpl::deaggregate(&aggregate).unwrap().unwrap().len(),
        170_000
    );
    let mut budget = kpl::ExpansionBudget::event();
    let mut decoded = 0;
    let mut refused = 0;
    for _ in 0..4 {
        match kpl::deaggregate_within(&aggregate, &mut budget) {
            Ok(users) => decoded += users.unwrap().len(),
            Err(error @ kpl::KplError::EventBudgetExceeded { .. }) => {
                assert!(error.to_string().contains("user records"), "{error}");
                assert!(!error.is_retryable());
                refused += 1;
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert!(decoded <= 170_000, "{decoded} user records decoded");
    assert!(refused >= 3);

    // Through the processor: the aggregates past the budget are permanent failures of their
    // own records, dead-lettered; nothing is lost, and the event still completes.
    let p = Processor::per_record(Effects::default(), InMemoryDeadLetterSink::new())
        .retry(ExponentialBackoff::none());
    let records: Vec<_> = (1..=4)
        .map(|n| plain(&key, &sequence_number(n), &aggregate))
        .collect();
    let report = p
        .process(event_json(&records).as_bytes(), &invocation())
        .await
        .unwrap();
    assert_eq!(report.counts.dead_lettered, 3);
    assert_eq!(report.counts.processed, decoded);
    assert!(report.outcomes.iter().all(Outcome::is_acknowledged));
}

/// Fails `acct-1`'s records (retryable); everything else succeeds.
#[derive(Default)]
struct FailFirstAccount {
    ran: Mutex<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct Transfer<'a> {
    id: &'a str,
}

impl FailFirstAccount {
    fn run(&self, record: &Record<'_>, id: &str) -> Result<(), HandlerError> {
        self.ran
            .lock()
            .unwrap()
            .push(format!("{}/{id}", record.partition_key));
        if record.partition_key == "acct-1" {
            Err(HandlerError::retryable("throttled"))
        } else {
            Ok(())
        }
    }
}

impl<'d> RecordHandler<'d> for FailFirstAccount {
    type Payload = Json<Transfer<'d>>;

    async fn handle(
        &self,
        record: &Record<'d>,
        t: &Json<Transfer<'d>>,
    ) -> Result<(), HandlerError> {
        self.run(record, t.id)
    }
}

impl<'d> BatchHandler<'d> for FailFirstAccount {
    type Payload = Json<Transfer<'d>>;

    async fn handle_batch(
        &self,
        batch: &[TypedRecord<'_, 'd, Json<Transfer<'d>>>],
    ) -> Result<(), HandlerError> {
        for item in batch {
            self.run(item.record, item.payload.id)?;
        }
        Ok(())
    }
}

fn transfers() -> String {
    event_json(&[
        plain("acct-1", &sequence_number(1), br#"{"id":"t1"}"#),
        plain("acct-2", &sequence_number(2), br#"{"id":"t1"}"#),
        plain("acct-2", &sequence_number(3), br#"{"id":"t2"}"#),
    ])
}

#[tokio::test]
async fn a_duplicate_of_a_handed_back_record_holds_its_own_key_back() {
    let store = Arc::new(InMemoryIdempotencyStore::new());
    let gate = || {
        Idempotency::new(store.clone())
            .key(JsonFieldKey::new("id"))
            .clock(ManualClock::new(NOW_MS))
    };
    let expected = |outcomes: &[Outcome]| {
        assert!(
            matches!(outcomes[0], Outcome::Retryable { .. }),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[1..], [Outcome::Blocked, Outcome::Blocked]);
    };
    let per_record =
        Processor::per_record(FailFirstAccount::default(), InMemoryDeadLetterSink::new())
            .retry(ExponentialBackoff::none())
            .gate(gate());
    let report = per_record
        .process(transfers().as_bytes(), &invocation())
        .await
        .unwrap();
    expected(&report.outcomes);
    assert_eq!(
        *per_record.handler().0.ran.lock().unwrap(),
        vec!["acct-1/t1"]
    );

    let bisecting =
        Processor::bisecting(FailFirstAccount::default(), InMemoryDeadLetterSink::new())
            .retry(ExponentialBackoff::none())
            .gate(gate());
    let report = bisecting
        .process(transfers().as_bytes(), &invocation())
        .await
        .unwrap();
    expected(&report.outcomes);
    assert!(
        !bisecting
            .handler()
            .0
            .ran
            .lock()
            .unwrap()
            .contains(&"acct-2/t2".to_owned())
    );
}

#[tokio::test]
async fn a_number_and_a_string_that_read_alike_are_two_keys() {
    let store = Arc::new(InMemoryIdempotencyStore::new());
    let p = Processor::per_record(Effects::default(), InMemoryDeadLetterSink::new()).gate(
        Idempotency::new(store.clone())
            .key(JsonFieldKey::new("id"))
            .clock(ManualClock::new(NOW_MS)),
    );
    let event = event_json(&[
        plain("a", &sequence_number(1), br#"{"id":1}"#),
        plain("b", &sequence_number(2), br#"{"id":"1"}"#),
    ]);
    let report = p.process(event.as_bytes(), &invocation()).await.unwrap();
    assert_eq!(
        report.outcomes,
        vec![
            Outcome::Processed { attempts: 1 },
            Outcome::Processed { attempts: 1 }
        ]
    );
}

#[tokio::test]
async fn a_late_release_leaves_the_lock_another_invocation_took() {
    use shardwise::idempotency::{IdempotencyStore, RecordStatus, StoreWrite, StoredRecord};
    let store = InMemoryIdempotencyStore::new();
    let lock = |request: &str| StoredRecord {
        key: "f#id=tx-1".into(),
        status: RecordStatus::InProgress {
            lock_expires_at: NOW_MS / 1000 + 60,
        },
        payload_hash: None,
        request_id: Some(request.into()),
    };
    store.insert(lock("req-2"));
    // req-1's lock expired, req-2 claimed the key; req-1's release arrives only now.
    let release = StoreWrite::Release {
        key: "f#id=tx-1".into(),
        request_id: "req-1".into(),
    };
    store.write(&[&release]).await.unwrap();
    assert_eq!(store.record("f#id=tx-1"), Some(lock("req-2")));
    let own = StoreWrite::Release {
        key: "f#id=tx-1".into(),
        request_id: "req-2".into(),
    };
    store.write(&[&own]).await.unwrap();
    assert!(store.record("f#id=tx-1").is_none());
}
