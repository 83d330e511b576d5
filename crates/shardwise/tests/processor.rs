//! The processor against in-memory sinks: ordering, retries, deadlines, bisecting, dead letters.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::Deserialize;
use shardwise::dead_letter::SinkFault;
use shardwise::processor::Outcome;
use shardwise::retry::{ExponentialBackoff, Jitter};
use shardwise::testing::{event_json, plain, raw_data, sequence_number};
use shardwise::{
    BatchHandler, HandlerError, InMemoryDeadLetterSink, Invocation, Json, Processor,
    ProcessorConfig, Record, RecordHandler, TypedRecord,
};
use tokio::time::Instant;

/// What a test record asks the handler to do.
#[derive(Debug, Deserialize)]
struct Command<'a> {
    key: &'a str,
    n: u32,
    #[serde(default)]
    fail: Option<&'a str>,
    #[serde(default)]
    sleep_ms: u64,
}

/// Executes commands and records the effects it made, in order.
#[derive(Default)]
struct Scripted {
    effects: Mutex<Vec<(String, u32)>>,
    attempts: Mutex<HashMap<u32, u32>>,
    in_flight: AtomicU32,
    max_in_flight: AtomicU32,
}

impl Scripted {
    fn effects(&self) -> Vec<(String, u32)> {
        self.effects.lock().unwrap().clone()
    }
    fn effects_of(&self, key: &str) -> Vec<u32> {
        self.effects()
            .into_iter()
            .filter(|(k, _)| k == key)
            .map(|(_, n)| n)
            .collect()
    }
}

impl<'d> RecordHandler<'d> for Scripted {
    type Payload = Json<Command<'d>>;

    async fn handle(
        &self,
        _record: &Record<'d>,
        cmd: &Json<Command<'d>>,
    ) -> Result<(), HandlerError> {
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap();
            let a = attempts.entry(cmd.n).or_default();
            *a += 1;
            *a
        };
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if cmd.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(cmd.sleep_ms)).await;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        match cmd.fail {
            Some("permanent") => {
                return Err(HandlerError::permanent("amount is negative").with_type("BusinessRule"));
            }
            Some("retry") => return Err(HandlerError::retryable("throttled")),
            Some("retry_once") if attempt == 1 => return Err(HandlerError::retryable("throttled")),
            Some("panic") => panic!("boom on {}", cmd.n),
            _ => {}
        }
        self.effects
            .lock()
            .unwrap()
            .push((cmd.key.to_owned(), cmd.n));
        Ok(())
    }
}

fn cmd(key: &str, n: u32, extra: &str) -> shardwise::testing::TestRecord {
    let body = format!(r#"{{"key":"{key}","n":{n}{extra}}}"#);
    plain(key, &sequence_number(u64::from(n)), body.as_bytes())
}

fn quick_retry() -> ExponentialBackoff {
    ExponentialBackoff {
        initial: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
        max_retries: 2,
        jitter: Jitter::None,
    }
}

fn processor(
    handler: Scripted,
) -> Processor<shardwise::processor::PerRecord<Scripted>, InMemoryDeadLetterSink> {
    Processor::per_record(handler, InMemoryDeadLetterSink::new()).config(ProcessorConfig {
        function_name: "test-fn".into(),
        max_concurrency: 4,
        deadline_margin: Duration::from_millis(100),
        ..ProcessorConfig::default()
    })
}

#[tokio::test(start_paused = true)]
async fn all_good_records_are_acknowledged() {
    let p = processor(Scripted::default()).retry(quick_retry());
    let event = event_json(&[cmd("a", 1, ""), cmd("b", 2, ""), cmd("a", 3, "")]);
    let report = p
        .process(event.as_bytes(), &Invocation::unbounded("r1"))
        .await
        .unwrap();
    assert!(report.response.batch_item_failures.is_empty());
    assert_eq!(report.counts.processed, 3);
    assert_eq!(p.handler().0.effects_of("a"), vec![1, 3]);
}

#[tokio::test(start_paused = true)]
async fn order_is_kept_per_key_while_keys_run_concurrently() {
    let handler = Scripted::default();
    let mut records = Vec::new();
    // Earlier records sleep longer, so any reordering within a key would show.
    for n in 0..40u32 {
        let key = format!("k{}", n % 5);
        records.push(cmd(&key, n, &format!(r#","sleep_ms":{}"#, 100 - n)));
    }
    let p = processor(handler);
    let report = p
        .process(event_json(&records).as_bytes(), &Invocation::unbounded("r"))
        .await
        .unwrap();
    assert_eq!(report.counts.processed, 40);
    for k in 0..5u32 {
        let seen = p.handler().0.effects_of(&format!("k{k}"));
        let expected: Vec<u32> = (0..40).filter(|n| n % 5 == k).collect();
        assert_eq!(seen, expected);
    }
    let max = p.handler().0.max_in_flight.load(Ordering::SeqCst);
    assert!(max > 1 && max <= 4, "concurrency {max}");
}

#[tokio::test(start_paused = true)]
async fn retryable_failures_are_retried_with_backoff() {
    let p = processor(Scripted::default()).retry(quick_retry());
    let start = Instant::now();
    let event = event_json(&[cmd("a", 1, r#","fail":"retry_once""#)]);
    let report = p
        .process(event.as_bytes(), &Invocation::unbounded("r"))
        .await
        .unwrap();
    assert!(report.response.batch_item_failures.is_empty());
    assert_eq!(report.outcomes[0], Outcome::Processed { attempts: 2 });
    assert_eq!(start.elapsed(), Duration::from_millis(50));
}

#[tokio::test(start_paused = true)]
async fn a_retryable_failure_holds_back_its_key_and_sets_the_checkpoint() {
    let p = processor(Scripted::default()).retry(quick_retry());
    let event = event_json(&[
        cmd("a", 1, ""),
        cmd("b", 2, r#","fail":"retry""#),
        cmd("a", 3, ""),
        cmd("b", 4, ""),
        cmd("c", 5, ""),
    ]);
    let report = p
        .process(event.as_bytes(), &Invocation::unbounded("r"))
        .await
        .unwrap();
    assert_eq!(report.response.batch_item_failures.len(), 1);
    assert_eq!(
        report.response.batch_item_failures[0].item_identifier,
        sequence_number(2)
    );
    assert_eq!(
        report.outcomes[1],
        Outcome::Retryable {
            reason: "RetryableError: throttled".into(),
            attempts: 3
        }
    );
    assert_eq!(report.outcomes[3], Outcome::Blocked);
    assert!(p.handler().0.effects_of("b").is_empty());
    assert_eq!(p.handler().0.effects_of("a"), vec![1, 3]);
    assert_eq!(p.handler().0.effects_of("c"), vec![5]);
}

#[tokio::test(start_paused = true)]
async fn poison_records_are_dead_lettered_with_payload_and_do_not_block() {
    let p = processor(Scripted::default()).retry(quick_retry());
    let event = event_json(&[
        cmd("a", 1, r#","fail":"permanent""#),
        cmd("a", 2, ""),
        raw_data("a", &sequence_number(3), "%%%"),
        plain("a", &sequence_number(4), b"not json"),
        plain("a", &sequence_number(5), br#"{"key":"a","n":"five"}"#),
        plain("a", &sequence_number(6), b""),
        cmd("a", 7, r#","fail":"panic""#),
        cmd("a", 8, ""),
    ]);
    let report = p
        .process(event.as_bytes(), &Invocation::unbounded("req-9"))
        .await
        .unwrap();
    assert!(
        report.response.batch_item_failures.is_empty(),
        "{:?}",
        report.outcomes
    );
    assert_eq!(report.counts.dead_lettered, 6);
    assert_eq!(p.handler().0.effects_of("a"), vec![2, 8]);
    let letters = p.dead_letter_sink().letters();
    let types: Vec<_> = letters
        .iter()
        .map(|l| l["error"]["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        types,
        [
            "BusinessRule",
            "InvalidBase64",
            "PayloadNotJson",
            "PayloadWrongShape",
            "EmptyPayload",
            "HandlerPanic"
        ]
    );
    let wrong_shape = &letters[3];
    assert!(
        wrong_shape["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at `n`")
    );
    assert!(
        wrong_shape["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&sequence_number(5))
    );
    assert_eq!(letters[0]["functionName"], "test-fn");
    assert_eq!(letters[0]["requestId"], "req-9");
    assert_eq!(letters[0]["attempts"], 1);
    assert_eq!(letters[1]["data"], "%%%");
    assert_eq!(letters[2]["data"], "bm90IGpzb24=");
    assert!(
        letters[5]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("boom on 7")
    );
}

#[tokio::test(start_paused = true)]
async fn a_record_that_cannot_be_dead_lettered_is_handed_back() {
    let p = Processor::per_record(Scripted::default(), InMemoryDeadLetterSink::new()).retry(
        ExponentialBackoff {
            max_retries: 1,
            ..quick_retry()
        },
    );
    p.dead_letter_sink().inject(SinkFault::FailCall);
    p.dead_letter_sink().inject(SinkFault::FailCall);
    let event = event_json(&[
        cmd("a", 1, ""),
        cmd("b", 2, r#","fail":"permanent""#),
        cmd("c", 3, ""),
    ]);
    let report = p
        .process(event.as_bytes(), &Invocation::unbounded("r"))
        .await
        .unwrap();
    assert_eq!(
        report.response.batch_item_failures[0].item_identifier,
        sequence_number(2)
    );
    assert!(matches!(report.outcomes[1], Outcome::Retryable { .. }));
    assert_eq!(report.counts.dead_lettered, 0);
}

#[tokio::test(start_paused = true)]
async fn nothing_starts_after_the_deadline_margin() {
    let p = processor(Scripted::default());
    // Each record takes 300 ms; the invocation has 1 s with a 100 ms margin: three fit.
    let records: Vec<_> = (1..=6).map(|n| cmd("a", n, r#","sleep_ms":300"#)).collect();
    let invocation = Invocation {
        request_id: "r".into(),
        deadline: Some(Instant::now() + Duration::from_millis(1000)),
        deadline_ms: None,
    };
    let report = p
        .process(event_json(&records).as_bytes(), &invocation)
        .await
        .unwrap();
    assert_eq!(report.counts.processed, 3);
    assert_eq!(report.counts.not_started + report.counts.blocked, 3);
    assert_eq!(
        report.response.batch_item_failures[0].item_identifier,
        sequence_number(4)
    );
    assert!(Instant::now() < invocation.deadline.unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_hung_handler_is_abandoned_before_the_deadline() {
    let p = processor(Scripted::default());
    let invocation = Invocation {
        request_id: "r".into(),
        deadline: Some(Instant::now() + Duration::from_millis(1000)),
        deadline_ms: None,
    };
    let event = event_json(&[cmd("a", 1, ""), cmd("b", 2, r#","sleep_ms":60000"#)]);
    let report = p.process(event.as_bytes(), &invocation).await.unwrap();
    assert_eq!(report.outcomes[0], Outcome::Processed { attempts: 1 });
    assert!(
        matches!(&report.outcomes[1], Outcome::Retryable { reason, .. } if reason.starts_with("DeadlineExceeded"))
    );
    assert_eq!(
        report.response.batch_item_failures[0].item_identifier,
        sequence_number(2)
    );
    assert!(Instant::now() < invocation.deadline.unwrap());
}

#[tokio::test]
async fn a_malformed_event_fails_the_invocation() {
    let p = processor(Scripted::default());
    let err = p
        .process(
            br#"{"Records": [{"kinesis": 1}]}"#,
            &Invocation::unbounded("r"),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Records[0]"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn kpl_user_records_are_processed_and_checkpointed_by_their_aggregate() {
    let bodies: Vec<String> = (10..14)
        .map(|n| format!(r#"{{"key":"u{n}","n":{n}}}"#))
        .collect();
    let mut entries: Vec<shardwise::kpl::AggregateEntry<'_>> = Vec::new();
    let keys: Vec<String> = (10..14).map(|n| format!("u{n}")).collect();
    for (b, k) in bodies.iter().zip(&keys) {
        entries.push(shardwise::kpl::AggregateEntry {
            partition_key: k,
            explicit_hash_key: None,
            data: b.as_bytes(),
        });
    }
    let poison = r#"{"key":"u12","n":12,"fail":"retry"}"#.to_owned();
    entries[2].data = poison.as_bytes();
    let aggregate = shardwise::kpl::aggregate(&entries);
    let event = event_json(&[
        cmd("a", 1, ""),
        plain("agg", &sequence_number(2), &aggregate),
        cmd("z", 3, ""),
    ]);
    let p = processor(Scripted::default()).retry(ExponentialBackoff::none());
    let report = p
        .process(event.as_bytes(), &Invocation::unbounded("r"))
        .await
        .unwrap();
    assert_eq!(report.counts.records, 6);
    assert_eq!(report.counts.processed, 5);
    assert_eq!(
        report.response.batch_item_failures[0].item_identifier,
        sequence_number(2)
    );
}

/// A batch handler that fails permanently when any record of the batch is poison.
#[derive(Default)]
struct BulkWriter {
    calls: AtomicU32,
    written: Mutex<Vec<u32>>,
    transient_failures: AtomicU32,
}

impl<'d> BatchHandler<'d> for BulkWriter {
    type Payload = Json<Command<'d>>;

    async fn handle_batch(
        &self,
        batch: &[TypedRecord<'_, 'd, Json<Command<'d>>>],
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if batch.iter().any(|r| r.payload.fail == Some("permanent")) {
            return Err(HandlerError::permanent("bulk write rejected a record"));
        }
        if batch.iter().any(|r| r.payload.fail == Some("retry")) {
            self.transient_failures.fetch_add(1, Ordering::SeqCst);
            return Err(HandlerError::retryable("throttled"));
        }
        self.written
            .lock()
            .unwrap()
            .extend(batch.iter().map(|r| r.payload.n));
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn bisecting_isolates_one_poison_record_within_the_bound() {
    for (n, poison) in [(1024u32, 777u32), (1000, 0), (1000, 999), (2, 1), (1, 0)] {
        let records: Vec<_> = (0..n)
            .map(|i| {
                cmd(
                    &format!("k{}", i % 7),
                    i,
                    if i == poison {
                        r#","fail":"permanent""#
                    } else {
                        ""
                    },
                )
            })
            .collect();
        let p = Processor::bisecting(BulkWriter::default(), InMemoryDeadLetterSink::new());
        let report = p
            .process(event_json(&records).as_bytes(), &Invocation::unbounded("r"))
            .await
            .unwrap();
        let calls = p.handler().0.calls.load(Ordering::SeqCst);
        let bound = 2 * (f64::from(n)).log2().ceil() as u32 + 1;
        assert!(calls <= bound, "n={n}: {calls} calls > {bound}");
        assert_eq!(report.handler_calls, calls);
        assert!(report.response.batch_item_failures.is_empty());
        assert_eq!(report.counts.dead_lettered, 1);
        assert_eq!(report.counts.processed, n as usize - 1);
        let letters = p.dead_letter_sink().letters();
        assert_eq!(
            letters[0]["sequenceNumber"],
            sequence_number(u64::from(poison))
        );
        let mut written = p.handler().0.written.lock().unwrap().clone();
        written.sort_unstable();
        assert_eq!(written.len(), n as usize - 1);
        assert!(!written.contains(&poison));
    }
}

#[tokio::test(start_paused = true)]
async fn bisecting_hands_back_transient_failures_and_blocks_their_keys() {
    let records = vec![
        cmd("a", 0, ""),
        cmd("b", 1, r#","fail":"permanent""#),
        cmd("c", 2, ""),
        cmd("d", 3, r#","fail":"retry""#),
        cmd("a", 4, ""),
        cmd("d", 5, ""),
        cmd("e", 6, ""),
        cmd("f", 7, ""),
    ];
    let p = Processor::bisecting(BulkWriter::default(), InMemoryDeadLetterSink::new())
        .retry(ExponentialBackoff::none());
    let report = p
        .process(event_json(&records).as_bytes(), &Invocation::unbounded("r"))
        .await
        .unwrap();
    assert_eq!(
        report.response.batch_item_failures[0].item_identifier,
        sequence_number(2)
    );
    assert_eq!(report.counts.dead_lettered, 1);
    assert!(matches!(
        report.outcomes[5],
        Outcome::Blocked | Outcome::Retryable { .. }
    ));
    let written = p.handler().0.written.lock().unwrap().clone();
    assert!(
        !written.contains(&5),
        "d/5 ran after d/3 failed: {written:?}"
    );
    assert!(written.contains(&0) && written.contains(&7));
}
