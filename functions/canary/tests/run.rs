//! Canary runs against the in-memory stream writer and table, on a manual clock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Mutex;
use std::time::Duration;

use canary::store::InMemoryCanaryStore;
use canary::{Canary, CanaryError, RunSettings, ScheduledEvent, canary_id};
use shardwise::FromRecordData;
use shardwise::clock::ManualClock;
use shardwise::metrics::MetricsWriter;
use shardwise::producer::{InMemoryStreamWriter, Producer, WriterFault};
use shardwise::retry::{ExponentialBackoff, Jitter};
use shardwise_cards::transaction::StreamPayload;

/// Captures EMF lines.
#[derive(Default)]
struct Lines(Mutex<Vec<String>>);

impl MetricsWriter for Lines {
    fn write_line(&self, line: &str) {
        self.0.lock().unwrap().push(line.to_owned());
    }
}

impl Lines {
    fn take(&self) -> Vec<serde_json::Value> {
        std::mem::take(&mut *self.0.lock().unwrap())
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// (consumer, metric) → values, from EMF lines.
fn metric(lines: &[serde_json::Value], consumer: &str, name: &str) -> Vec<f64> {
    lines
        .iter()
        .filter(|l| l["Consumer"] == consumer)
        .filter_map(|l| l[name].as_f64())
        .collect()
}

// 2026-11-26T10:00:00Z, the start of a slot.
const T0: i64 = 1_795_687_200_000;
const SLOT0: i64 = 1_795_687_200;

type TestCanary = Canary<InMemoryStreamWriter, InMemoryCanaryStore, ManualClock, Lines>;

fn canary() -> TestCanary {
    let producer = Producer::new(InMemoryStreamWriter::new()).retry(ExponentialBackoff {
        initial: Duration::from_millis(10),
        max_delay: Duration::from_millis(10),
        max_retries: 1,
        jitter: Jitter::None,
    });
    Canary::new(
        producer,
        InMemoryCanaryStore::new(),
        ManualClock::new(T0 + 1_500),
        Lines::default(),
        "Test",
        RunSettings::default(),
    )
}

fn scheduled() -> ScheduledEvent {
    let path = format!(
        "{}/../../events/canary-scheduled.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_run_puts_its_canaries_spread_over_the_shards() {
    let c = canary();
    let event = scheduled();
    assert_eq!(event.detail_type, "Scheduled Event");
    let report = c.invoke(&event, T0 + 50_000).await.unwrap();
    assert_eq!(report.slot, SLOT0);
    assert_eq!(report.sent, 3);
    let records = c.producer().writer().records();
    assert_eq!(records.len(), 3);
    let mut hash_keys = Vec::new();
    for (n, record) in records.iter().enumerate() {
        // Consumers decode it with the shared payload type, as a canary.
        let payload = StreamPayload::from_record_data(&record.data).unwrap();
        let canary = payload.as_canary().unwrap();
        assert_eq!(canary.canary_id, canary_id(SLOT0, n as u32));
        assert_eq!(canary.sent_at, T0 + 1_500);
        assert_eq!(record.partition_key, canary.canary_id);
        hash_keys.push(
            record
                .explicit_hash_key
                .clone()
                .unwrap()
                .parse::<u128>()
                .unwrap(),
        );
    }
    assert!(hash_keys.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(c.store().canary_ids().len(), 3);
    // Nothing to judge yet, but the missing count is reported (as 0) for every consumer.
    let lines = c.metrics().take();
    assert_eq!(metric(&lines, "fraud", "CanaryMissing"), vec![0.0]);
    assert_eq!(metric(&lines, "aggregation", "CanaryMissing"), vec![0.0]);
}

#[tokio::test(start_paused = true)]
async fn a_second_run_in_the_same_slot_sends_nothing() {
    let c = canary();
    c.run_once(None).await.unwrap();
    c.clock().advance(20_000);
    let report = c.run_once(None).await.unwrap();
    assert_eq!((report.sent, report.already_sent), (0, 3));
    assert_eq!(c.producer().writer().records().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn acknowledgements_become_latencies_and_absences_missing_once() {
    let c = canary();
    c.run_once(None).await.unwrap();
    c.metrics().take();
    // fraud sees all three, aggregation two of them.
    for n in 0..3 {
        c.store().acknowledge(
            &canary_id(SLOT0, n),
            "fraud",
            T0 + 1_500 + 800 + i64::from(n),
        );
    }
    for n in 0..2 {
        c.store()
            .acknowledge(&canary_id(SLOT0, n), "aggregation", T0 + 1_500 + 5_000);
    }

    // A minute later: latencies reported, the third aggregation canary still within its deadline.
    c.clock().set(T0 + 61_000);
    let report = c.run_once(None).await.unwrap();
    assert_eq!(report.consumers["fraud"].latency_ms, vec![800, 801, 802]);
    assert_eq!(
        report.consumers["aggregation"].latency_ms,
        vec![5_000, 5_000]
    );
    assert_eq!(report.consumers["aggregation"].pending, 1);
    assert_eq!(report.consumers["aggregation"].missing, 0);
    let lines = c.metrics().take();
    assert_eq!(
        metric(&lines, "fraud", "CanaryLatency"),
        vec![800.0, 801.0, 802.0]
    );
    assert_eq!(metric(&lines, "fraud", "CanaryMissing"), vec![0.0]);

    // Past the 120 s deadline: missing, once.
    c.clock().set(T0 + 181_000);
    let report = c.run_once(None).await.unwrap();
    assert_eq!(report.consumers["aggregation"].missing, 1);
    assert!(report.consumers["fraud"].latency_ms.is_empty());
    let lines = c.metrics().take();
    assert_eq!(metric(&lines, "aggregation", "CanaryMissing"), vec![1.0]);
    assert_eq!(metric(&lines, "fraud", "CanaryMissing"), vec![0.0]);

    // A late acknowledgement does not turn a reported absence into a latency.
    c.store()
        .acknowledge(&canary_id(SLOT0, 2), "aggregation", T0 + 200_000);
    c.clock().set(T0 + 241_000);
    let report = c.run_once(None).await.unwrap();
    assert!(report.consumers["aggregation"].latency_ms.is_empty());
    // What is missing now are the canaries of the run at 61 s, which nobody acknowledged;
    // those of the run at 181 s are still within their deadline.
    assert_eq!(report.consumers["aggregation"].missing, 3);
    assert_eq!(report.consumers["fraud"].missing, 3);
    assert_eq!(report.consumers["fraud"].pending, 3);
}

#[tokio::test(start_paused = true)]
async fn canaries_that_could_not_be_put_are_never_missing() {
    let c = canary();
    for _ in 0..2 {
        c.producer().writer().inject(WriterFault::RefuseEntries {
            positions: vec![0],
            error_code: "ProvisionedThroughputExceededException".into(),
            class: shardwise::handler::ErrorClass::Retryable,
        });
    }
    let err = c.run_once(None).await.unwrap_err();
    assert!(
        matches!(
            err,
            CanaryError::PutFailed {
                failed: 1,
                total: 3,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.error_type(), "CanaryPutFailed");
    // Metrics were written all the same.
    let lines = c.metrics().take();
    assert!(lines.iter().any(|l| l["CanaryPutFailed"] == 1.0));
    assert_eq!(c.store().canary_ids().len(), 2);

    c.clock().set(T0 + 300_000);
    let report = c.run_once(None).await.unwrap();
    // Two sent and never acknowledged: missing for each consumer; the unsent one is not.
    assert_eq!(report.consumers["fraud"].missing, 2);
    assert_eq!(report.consumers["aggregation"].missing, 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_check_still_sends_and_fails_the_invocation() {
    let c = canary();
    c.store().fail_next_fetch();
    let err = c.run_once(None).await.unwrap_err();
    assert_eq!(err.error_type(), "CanaryTableFailed");
    assert_eq!(c.producer().writer().records().len(), 3);
}
