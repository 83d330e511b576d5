//! The anomaly model through the real handler: learnt once per transaction whatever Lambda
//! redelivers, resumed from its snapshot after a cold start, and explained in alerts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use fraud::FraudHandler;
use fraud::alert::InMemoryAlertSink;
use fraud::model::InMemoryModelStore;
use fraud::rules::{Rule, RuleSet};
use fraud::state::{InMemoryCardStateStore, StateError};
use shardwise::clock::ManualClock;
use shardwise::config::{CommonSettings, Env};
use shardwise::processor::Bisecting;
use shardwise::retry::{ExponentialBackoff, Jitter};
use shardwise::testing::{TEST_SHARD_ID, event_json, plain, sequence_number};
use shardwise::{InMemoryDeadLetterSink, Invocation, Processor};
use shardwise_cards::canary::InMemoryCanaryAckStore;
use shardwise_cards::generator::{GeneratorOptions, TransactionGenerator};

type Handler = FraudHandler<
    InMemoryCardStateStore,
    InMemoryAlertSink,
    InMemoryCanaryAckStore,
    ManualClock,
    InMemoryModelStore,
>;
type FraudProcessor = Processor<Bisecting<Handler>, InMemoryDeadLetterSink>;

fn rules() -> RuleSet {
    let mut rules = RuleSet::default();
    rules.anomaly.warmup = 300;
    rules.anomaly.snapshot_interval_ms = 0;
    rules
}

fn processor(rules: RuleSet) -> FraudProcessor {
    let common = CommonSettings::from_env(&Env(std::collections::HashMap::from([(
        "DEAD_LETTER_QUEUE_URL",
        "memory",
    )])))
    .unwrap();
    let handler = FraudHandler::new(
        InMemoryCardStateStore::new(),
        InMemoryAlertSink::new(),
        InMemoryCanaryAckStore::new(),
        ManualClock::new(1_700_000_000_000),
        rules,
    )
    .with_model_store(InMemoryModelStore::new());
    fraud::processor(handler, InMemoryDeadLetterSink::new(), &common).retry(ExponentialBackoff {
        initial: Duration::from_millis(1),
        max_delay: Duration::from_millis(1),
        max_retries: 0,
        jitter: Jitter::None,
    })
}

/// Ordinary traffic of 200 cards, one transaction a second from `first`, as events of 100.
fn events(first: u64, count: u64) -> Vec<String> {
    traffic(first, count).chunks(100).map(event_json).collect()
}

fn traffic(first: u64, count: u64) -> Vec<shardwise::testing::TestRecord> {
    let mut generator = TransactionGenerator::new(GeneratorOptions {
        cards: 200,
        poison_share: 0.0,
        fraud_share: 0.0,
        blocked_merchant: "none".into(),
        seed: first,
    });
    (first..first + count)
        .map(|n| {
            let r = generator.next_record(1_700_000_000_000 + n as i64 * 1000);
            plain(&r.partition_key, &sequence_number(n), &r.data)
        })
        .collect()
}

async fn deliver(p: &FraudProcessor, event: &str) -> String {
    let report = p
        .process(event.as_bytes(), &Invocation::unbounded("model"))
        .await
        .unwrap();
    serde_json::to_string(&report.response).unwrap()
}

fn handler(p: &FraudProcessor) -> &Handler {
    &p.handler().0
}

#[tokio::test]
async fn a_redelivered_batch_is_not_learnt_twice() {
    let p = processor(rules());
    let batches = events(0, 500);
    for event in &batches {
        deliver(&p, event).await;
    }
    assert_eq!(handler(&p).model_updates(TEST_SHARD_ID), Some(500));
    // Lambda delivers the last two batches again (a lost response, a retried invocation).
    for event in &batches[3..] {
        deliver(&p, event).await;
    }
    assert_eq!(handler(&p).model_updates(TEST_SHARD_ID), Some(500));
}

#[tokio::test]
async fn a_batch_whose_state_was_not_written_is_learnt_when_its_retry_is() {
    let p = processor(rules());
    let batches = events(0, 200);
    deliver(&p, &batches[0]).await;
    handler(&p)
        .store()
        .fail_next_save(StateError::Unavailable("throttled".into()));
    let failed = deliver(&p, &batches[1]).await;
    assert!(failed.contains("itemIdentifier"), "{failed}");
    assert_eq!(handler(&p).model_updates(TEST_SHARD_ID), Some(100));
    deliver(&p, &batches[1]).await;
    assert_eq!(handler(&p).model_updates(TEST_SHARD_ID), Some(200));
}

#[tokio::test]
async fn a_cold_start_resumes_the_model_from_its_snapshot() {
    let p = processor(rules());
    for event in events(0, 400) {
        deliver(&p, &event).await;
    }
    let stored = handler(&p).model_store().get(TEST_SHARD_ID).unwrap();
    assert_eq!(stored.version, 4, "one snapshot per batch at interval 0");
    // A new instance: nothing in memory, the snapshot in the store.
    handler(&p).drop_models();
    for event in events(400, 100) {
        deliver(&p, &event).await;
    }
    assert_eq!(handler(&p).model_updates(TEST_SHARD_ID), Some(500));
    // And it is snapshotted against the version it read.
    assert_eq!(
        handler(&p)
            .model_store()
            .get(TEST_SHARD_ID)
            .unwrap()
            .version,
        5
    );
}

#[tokio::test]
async fn snapshots_wait_for_their_interval() {
    let mut rules = rules();
    rules.anomaly.snapshot_interval_ms = 60_000;
    let p = processor(rules);
    for event in events(0, 300) {
        deliver(&p, &event).await;
    }
    // The clock stands still: nothing is due yet.
    assert_eq!(handler(&p).model_store().saves(), 0);
}

#[tokio::test]
async fn an_anomalous_transaction_is_alerted_with_the_features_that_drove_it() {
    let p = processor(rules());
    let records = traffic(0, 1000);
    for event in records.chunks(100).map(event_json) {
        deliver(&p, &event).await;
    }
    // The busiest card of the traffic above, online in an unseen category and country, for
    // 4,000 (its usual is at most 155).
    let mut counts = std::collections::HashMap::new();
    for r in &records {
        *counts.entry(r.partition_key.clone()).or_insert(0) += 1;
    }
    let (card, _) = counts
        .into_iter()
        .max_by_key(|(k, n)| (*n, k.clone()))
        .unwrap();
    let odd = format!(
        r#"{{"transaction_id":"tx-odd","card_id":"{card}","merchant_id":"w-odd",
        "merchant_category":"7995","amount":4000.0,"currency":"USD","country":"KY","lat":19.29,
        "lon":-81.37,"timestamp":"2023-11-14T22:20:00Z","channel":"ecom"}}"#
    );
    let event = event_json(&[plain(&card, &sequence_number(5000), odd.as_bytes())]);
    deliver(&p, &event).await;
    let alerts = handler(&p).alerts().alerts();
    let alert = alerts
        .iter()
        .find(|a| a.transaction_id == "tx-odd")
        .unwrap();
    let rules: Vec<Rule> = alert.reasons.iter().map(|r| r.rule).collect();
    assert!(rules.contains(&Rule::Anomaly), "{rules:?}");
    let model = alert.model.as_ref().unwrap();
    assert!(model.score >= model.threshold);
    let named: Vec<&str> = model.features.iter().map(|c| c.feature.name()).collect();
    assert!(named.contains(&"amount"), "{named:?}");
    // The parts add up to no more than the score, largest first.
    let parts: f64 = model.features.iter().map(|c| c.score).sum();
    assert!(parts <= model.score + 1e-9);
    assert!(model.features.windows(2).all(|w| w[0].score >= w[1].score));
    // The reason names them too.
    let reason = alert
        .reasons
        .iter()
        .find(|r| r.rule == Rule::Anomaly)
        .unwrap();
    assert!(reason.detail.contains("amount"), "{}", reason.detail);
}
