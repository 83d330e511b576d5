//! The fraud function against moto: alerts land in SQS exactly once across redelivered batches,
//! card state and canary acknowledgements land in DynamoDB.
//! Skipped unless `SHARDWISE_MOTO_ENDPOINT` is set (see `shardwise_testkit::moto_config`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::AttributeValue;
use fraud::alert::{Alert, SqsAlertSink};
use fraud::rules::{CardRange, RuleSet};
use fraud::state::{CardStateStore, DynamoDbCardStateStore};
use fraud::{FraudHandler, FraudSettings};
use shardwise::clock::ManualClock;
use shardwise::config::Env;
use shardwise::processor::Bisecting;
use shardwise::{Invocation, Processor};
use shardwise_aws::SqsDeadLetterSink;
use shardwise_cards::canary::{DynamoDbCanaryAckStore, canary_table};
use shardwise_testkit::{KeyType, create_queue, create_table, drain_queue, moto_config};

struct Resources {
    alerts_queue: String,
    dead_letter_queue: String,
    card_table: String,
    canary_table: String,
}

async fn resources(config: &SdkConfig) -> Resources {
    Resources {
        alerts_queue: create_queue(config, "alerts").await,
        dead_letter_queue: create_queue(config, "dlq").await,
        card_table: create_table(config, "cards", &[("card_id", KeyType::Hash)]).await,
        canary_table: create_table(
            config,
            "canary",
            &[
                (canary_table::CANARY_ID, KeyType::Hash),
                (canary_table::CONSUMER, KeyType::Range),
            ],
        )
        .await,
    }
}

type MotoHandler =
    FraudHandler<DynamoDbCardStateStore, SqsAlertSink, DynamoDbCanaryAckStore, ManualClock>;

/// The processor main.rs builds, from the same settings, against moto.
fn processor(
    config: &SdkConfig,
    r: &Resources,
    alerts_queue: &str,
) -> Processor<Bisecting<MotoHandler>, SqsDeadLetterSink, shardwise::gate::NoGate> {
    let settings = FraudSettings::from_env(&Env(std::collections::HashMap::from([
        ("DEAD_LETTER_QUEUE_URL", r.dead_letter_queue.as_str()),
        ("ALERTS_QUEUE_URL", alerts_queue),
        ("CARD_STATE_TABLE", r.card_table.as_str()),
        ("CANARY_TABLE", r.canary_table.as_str()),
        ("FRAUD_BLOCKED_MERCHANTS", "m-blocked-666"),
        ("FRAUD_BLOCKED_CARD_PREFIXES", "999999"),
    ])))
    .unwrap();
    let mut expected = RuleSet::default();
    expected.blocklist.merchants.insert("m-blocked-666".into());
    expected
        .blocklist
        .card_ranges
        .push(CardRange::parse("999999").unwrap());
    assert_eq!(settings.rules, expected);

    let dynamodb = aws_sdk_dynamodb::Client::new(config);
    let sqs = aws_sdk_sqs::Client::new(config);
    let handler = FraudHandler::new(
        DynamoDbCardStateStore::new(
            dynamodb.clone(),
            &settings.card_state_table,
            settings.card_state_ttl_seconds,
        ),
        SqsAlertSink::new(sqs.clone(), alerts_queue),
        DynamoDbCanaryAckStore::new(dynamodb, &settings.canary_table),
        ManualClock::new(1_795_688_100_000),
        settings.rules.clone(),
    );
    fraud::processor(
        handler,
        SqsDeadLetterSink::new(sqs, &settings.common.dead_letter_queue_url),
        &settings.common,
    )
}

fn event(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/../../events/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

async fn deliver(
    p: &Processor<Bisecting<MotoHandler>, SqsDeadLetterSink, shardwise::gate::NoGate>,
    name: &str,
) -> String {
    let report = p
        .process(&event(name), &Invocation::unbounded("moto"))
        .await
        .unwrap();
    serde_json::to_string(&report.response).unwrap()
}

fn alert_counts(bodies: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for body in bodies {
        let alert: Alert = serde_json::from_str(body).unwrap();
        *counts.entry(alert.transaction_id).or_default() += 1;
    }
    counts
}

const EXPECTED_ALERTS: [&str; 6] = [
    "tx-amount-big",
    "tx-blocked-card",
    "tx-blocked-merchant",
    "tx-travel-1",
    "tx-velocity-5",
    "tx-velocity-amount",
];

#[tokio::test]
async fn alerts_land_once_across_a_redelivered_batch() {
    let Some(config) = moto_config().await else {
        return;
    };
    let r = resources(&config).await;
    let p = processor(&config, &r, &r.alerts_queue);
    let done = r#"{"batchItemFailures":[]}"#;
    assert_eq!(deliver(&p, "fraud-suspicious.json").await, done);
    // Lambda delivers the same batch again (say the response was lost), twice.
    assert_eq!(deliver(&p, "fraud-suspicious.json").await, done);
    assert_eq!(deliver(&p, "fraud-suspicious.json").await, done);

    let counts = alert_counts(&drain_queue(&config, &r.alerts_queue).await);
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        EXPECTED_ALERTS
    );
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");

    // The card's state is where the first delivery left it.
    let store =
        DynamoDbCardStateStore::new(aws_sdk_dynamodb::Client::new(&config), &r.card_table, None);
    let states = store
        .load(&["4444440000000005", "unknown-card"])
        .await
        .unwrap();
    let card = states[0].clone().unwrap();
    assert_eq!(card.version, 1);
    assert_eq!(card.profile.amounts.n, 6);
    assert!(card.pending_alerts.is_empty());
    assert!(states[1].is_none());
}

#[tokio::test]
async fn alerts_that_could_not_be_sent_go_out_once_on_redelivery() {
    let Some(config) = moto_config().await else {
        return;
    };
    let r = resources(&config).await;
    // First delivery: the alerts queue is unreachable (wrong URL), so the alerts stay in the
    // cards' outboxes in DynamoDB and the batch goes back to Lambda.
    let broken = processor(&config, &r, &format!("{}-missing", r.alerts_queue));
    let first = deliver(&broken, "fraud-suspicious.json").await;
    assert!(first.contains("itemIdentifier"), "{first}");
    let store =
        DynamoDbCardStateStore::new(aws_sdk_dynamodb::Client::new(&config), &r.card_table, None);
    let travel = store.load(&["4222220000000002"]).await.unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(travel.pending_alerts.len(), 1);

    // Redelivered once the queue works: every alert exactly once, outboxes empty.
    let p = processor(&config, &r, &r.alerts_queue);
    assert_eq!(
        deliver(&p, "fraud-suspicious.json").await,
        r#"{"batchItemFailures":[]}"#
    );
    assert_eq!(
        deliver(&p, "fraud-suspicious.json").await,
        r#"{"batchItemFailures":[]}"#
    );
    let counts = alert_counts(&drain_queue(&config, &r.alerts_queue).await);
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        EXPECTED_ALERTS
    );
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    let travel = store.load(&["4222220000000002"]).await.unwrap()[0]
        .clone()
        .unwrap();
    assert!(travel.pending_alerts.is_empty());
}

#[tokio::test]
async fn a_normal_batch_writes_state_and_acknowledges_the_canary() {
    let Some(config) = moto_config().await else {
        return;
    };
    let r = resources(&config).await;
    let p = processor(&config, &r, &r.alerts_queue);
    assert_eq!(
        deliver(&p, "fraud-normal.json").await,
        r#"{"batchItemFailures":[]}"#
    );
    assert!(drain_queue(&config, &r.alerts_queue).await.is_empty());

    let dynamodb = aws_sdk_dynamodb::Client::new(&config);
    let ack = dynamodb
        .get_item()
        .table_name(&r.canary_table)
        .key(
            canary_table::CANARY_ID,
            AttributeValue::S("canary-1795687200-0".into()),
        )
        .key(canary_table::CONSUMER, AttributeValue::S("fraud".into()))
        .send()
        .await
        .unwrap();
    let item = ack.item().unwrap();
    assert_eq!(
        item[canary_table::ACKED_AT],
        AttributeValue::N("1795688100000".into())
    );
    assert_eq!(
        item[canary_table::SENT_AT],
        AttributeValue::N("1795687200000".into())
    );

    // Poison records: dead-lettered with their payload, the rest processed.
    assert_eq!(
        deliver(&p, "fraud-poison.json").await,
        r#"{"batchItemFailures":[]}"#
    );
    let letters = drain_queue(&config, &r.dead_letter_queue).await;
    assert_eq!(letters.len(), 3);
}

#[tokio::test]
async fn a_write_from_a_stale_read_is_a_conflict_and_writes_nothing() {
    use fraud::state::{CardState, StateError};
    let Some(config) = moto_config().await else {
        return;
    };
    let r = resources(&config).await;
    let store = DynamoDbCardStateStore::new(
        aws_sdk_dynamodb::Client::new(&config),
        &r.card_table,
        Some(3600),
    );
    let fresh = vec![CardState::new("card-a"), CardState::new("card-b")];
    assert!(store.save(&fresh, 1_000).await.iter().all(Result::is_ok));
    // card-a read at version 1 and written; card-b written from a read that predates it.
    let mut a = store.load(&["card-a"]).await.unwrap()[0].clone().unwrap();
    a.profile.recent.push(42);
    let stale_b = CardState::new("card-b");
    let results = store.save(&[a, stale_b], 2_000).await;
    assert!(
        matches!(&results[1], Err(StateError::Conflict { card_id }) if card_id == "card-b"),
        "{results:?}"
    );
    // One transaction: card-a was not written either.
    assert!(results[0].is_err());
    let a = store.load(&["card-a"]).await.unwrap()[0].clone().unwrap();
    assert_eq!(a.version, 1);
    assert!(a.profile.recent.is_empty());
}

#[tokio::test]
async fn a_models_snapshot_round_trips_through_the_card_state_table() {
    use fraud::model::{DynamoDbModelStore, ModelStore, ShardModel, SnapshotError};
    let Some(config) = moto_config().await else {
        return;
    };
    let r = resources(&config).await;
    let store = DynamoDbModelStore::new(
        aws_sdk_dynamodb::Client::new(&config),
        &r.card_table,
        Some(3600),
    );
    assert_eq!(store.load("shardId-000000000001").await.unwrap(), None);
    // A full default-size model: the largest item the function writes.
    let rule = RuleSet::default().anomaly;
    let mut model = ShardModel::new(&rule, 1);
    for i in 0..5000u32 {
        let x = (i % 101) as f32 / 101.0;
        model.learn(&[x, 1.0 - x, x * x, 0.3, 0.0, 0.5, 0.2, 0.0], "5411");
    }
    let bytes = model.to_snapshot();
    assert!(bytes.len() > 200_000, "{}", bytes.len());
    store
        .save("shardId-000000000001", &bytes, 0, 1_000)
        .await
        .unwrap();
    let stored = store.load("shardId-000000000001").await.unwrap().unwrap();
    assert_eq!(stored.version, 1);
    assert_eq!(stored.bytes, bytes);
    let back = ShardModel::from_snapshot(&stored.bytes, &rule).unwrap();
    assert_eq!(back.forest.updates(), 5000);
    // A writer that read no snapshot (or an older one) cannot overwrite it.
    assert!(matches!(
        store.save("shardId-000000000001", b"stale", 0, 2_000).await,
        Err(SnapshotError::Conflict { .. })
    ));
    store
        .save("shardId-000000000001", &bytes, 1, 2_000)
        .await
        .unwrap();
    // Card loads never see the model's item.
    let cards =
        DynamoDbCardStateStore::new(aws_sdk_dynamodb::Client::new(&config), &r.card_table, None);
    assert!(cards.load(&["shardId-000000000001"]).await.unwrap()[0].is_none());
}
