//! The aggregation function against DynamoDB on moto: window aggregates land once across a
//! retried final invocation and across segments; canary acknowledgements land.
//! Skipped unless `SHARDWISE_MOTO_ENDPOINT` is set (`make test` sets it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use aggregation::Aggregation;
use aggregation::store::{DynamoDbAggregateStore, from_item};
use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::{Value, json};
use shardwise::InMemoryDeadLetterSink;
use shardwise::clock::ManualClock;
use shardwise::processor::Invocation;
use shardwise::window::{WindowConfig, WindowEndReason, WindowProcessor};
use shardwise_cards::canary::DynamoDbCanaryAckStore;
use shardwise_testkit::{KeyType, create_table, moto_config};

const NOW_MS: i64 = 1_795_687_265_000;

type Handler = Aggregation<DynamoDbAggregateStore, DynamoDbCanaryAckStore, ManualClock>;

fn load(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../events")
            .join(name),
    )
    .unwrap()
}

struct Setup {
    config: SdkConfig,
    aggregates_table: String,
    canary_table: String,
}

async fn setup() -> Option<Setup> {
    let config = moto_config().await?;
    let aggregates_table = create_table(&config, "aggregates", &[("id", KeyType::Hash)]).await;
    let canary_table = create_table(
        &config,
        "canary",
        &[("canary_id", KeyType::Hash), ("consumer", KeyType::Range)],
    )
    .await;
    Some(Setup {
        config,
        aggregates_table,
        canary_table,
    })
}

fn processor(setup: &Setup, limit: usize) -> WindowProcessor<Handler, InMemoryDeadLetterSink> {
    let client = aws_sdk_dynamodb::Client::new(&setup.config);
    let handler = Aggregation::new(
        DynamoDbAggregateStore::new(client.clone(), &setup.aggregates_table),
        DynamoDbCanaryAckStore::new(client, &setup.canary_table).ttl_seconds(3600),
    )
    .clock(ManualClock::new(NOW_MS));
    WindowProcessor::new(handler, InMemoryDeadLetterSink::new()).window_config(WindowConfig {
        state_limit_bytes: limit,
    })
}

async fn all_items(setup: &Setup) -> Vec<aggregation::store::WindowAggregate> {
    let client = aws_sdk_dynamodb::Client::new(&setup.config);
    let out = client
        .scan()
        .table_name(&setup.aggregates_table)
        .consistent_read(true)
        .send()
        .await
        .unwrap();
    let mut items: Vec<_> = out.items().iter().map(|i| from_item(i).unwrap()).collect();
    items.sort_by(|a, b| a.id.cmp(&b.id));
    items
}

async fn state_after(p: &WindowProcessor<Handler, InMemoryDeadLetterSink>, event: &[u8]) -> Value {
    let report = p.process(event, &Invocation::unbounded("r")).await.unwrap();
    assert!(report.response.batch_item_failures.is_empty());
    serde_json::to_value(&report.response).unwrap()["state"].clone()
}

#[tokio::test]
async fn window_aggregates_land_once_across_a_retried_final_invocation() {
    let Some(setup) = setup().await else { return };
    let p = processor(&setup, shardwise::window::DEFAULT_STATE_LIMIT_BYTES);
    state_after(&p, &load("window-first.json")).await;
    state_after(&p, &load("window-middle.json")).await;
    assert!(all_items(&setup).await.is_empty());

    let final_event = load("window-final.json");
    let report = p
        .process(&final_event, &Invocation::unbounded("final-1"))
        .await
        .unwrap();
    assert_eq!(report.ended, Some(WindowEndReason::Final));
    let written = all_items(&setup).await;
    assert_eq!(written.len(), 3);
    // Lambda retries the final invocation (say its response was lost): same state, no new write.
    for attempt in 2..=3 {
        p.process(
            &final_event,
            &Invocation::unbounded(format!("final-{attempt}")),
        )
        .await
        .unwrap();
    }
    let after = all_items(&setup).await;
    assert_eq!(after, written, "the retries changed nothing");
    assert!(
        after
            .iter()
            .all(|i| i.version == 1 && i.segments.len() == 1)
    );
    let grocery = &after[0];
    assert_eq!(
        grocery.id,
        "shardId-000000000000#2026-11-26T10:00:00.000Z#5411"
    );
    assert_eq!((grocery.count, grocery.sum_milli), (3, 62_090));
    assert_eq!((grocery.min, grocery.max), (7.99, 42.1));
    assert_eq!(grocery.cards.estimate(), 2);

    // The item as readers see it.
    let client = aws_sdk_dynamodb::Client::new(&setup.config);
    let item = client
        .get_item()
        .table_name(&setup.aggregates_table)
        .key("id", AttributeValue::S(grocery.id.clone()))
        .send()
        .await
        .unwrap();
    let item = item.item().unwrap();
    assert_eq!(item["sum"], AttributeValue::N("62.09".into()));
    assert_eq!(item["distinct_cards"], AttributeValue::N("2".into()));
    assert_eq!(item["merchant_category"], AttributeValue::S("5411".into()));
}

#[tokio::test]
async fn segments_flushed_early_merge_into_one_item_once() {
    let Some(setup) = setup().await else { return };
    // The first invocation's state (window marker included) fits in 380 bytes, the middle one's
    // does not.
    let p = processor(&setup, 380);
    let state = state_after(&p, &load("window-first.json")).await;
    let mut middle: Value = serde_json::from_slice(&load("window-middle.json")).unwrap();
    middle["state"] = state;
    let middle = serde_json::to_vec(&middle).unwrap();
    let report = p
        .process(&middle, &Invocation::unbounded("m"))
        .await
        .unwrap();
    assert_eq!(report.ended, Some(WindowEndReason::StateLimit));
    // The flushing invocation retried: nothing written twice.
    p.process(&middle, &Invocation::unbounded("m2"))
        .await
        .unwrap();
    assert!(all_items(&setup).await.iter().all(|i| i.version == 1));

    // A second segment with one more grocery sale, then the window's end, twice.
    let mut second: Value = serde_json::from_slice(&load("window-first.json")).unwrap();
    let record = second["Records"][0].clone();
    let later = "49590338271490256608559692538361571095921575999000000001";
    let mut record = record;
    record["kinesis"]["sequenceNumber"] = json!(later);
    record["eventID"] = json!(format!("shardId-000000000000:{later}"));
    second["Records"] = json!([record]);
    let state = state_after(&p, &serde_json::to_vec(&second).unwrap()).await;
    let mut final_event: Value = serde_json::from_slice(&load("window-final.json")).unwrap();
    final_event["state"] = state;
    let final_event = serde_json::to_vec(&final_event).unwrap();
    p.process(&final_event, &Invocation::unbounded("f1"))
        .await
        .unwrap();
    p.process(&final_event, &Invocation::unbounded("f2"))
        .await
        .unwrap();

    let items = all_items(&setup).await;
    assert_eq!(items.len(), 3);
    let grocery = &items[0];
    assert_eq!(
        grocery.count, 4,
        "3 sales in the first segment, 1 in the second"
    );
    assert_eq!(grocery.sum_milli, 62_090 + 42_100);
    assert_eq!(grocery.segments.len(), 2);
    assert_eq!(grocery.version, 2);
    assert!(items[1..].iter().all(|i| i.version == 1));
}

#[tokio::test]
async fn canary_acknowledgements_land() {
    let Some(setup) = setup().await else { return };
    let p = processor(&setup, shardwise::window::DEFAULT_STATE_LIMIT_BYTES);
    state_after(&p, &load("window-first.json")).await;
    // Redelivered: the first acknowledgement stands.
    p.handler().current_clock().advance(5_000);
    state_after(&p, &load("window-first.json")).await;

    let client = aws_sdk_dynamodb::Client::new(&setup.config);
    let item = client
        .get_item()
        .table_name(&setup.canary_table)
        .key(
            "canary_id",
            AttributeValue::S("canary-2026-11-26T10:00:05Z-0".into()),
        )
        .key("consumer", AttributeValue::S("aggregation".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap();
    let item = item.item().expect("the canary acknowledgement");
    assert_eq!(item["acked_at"], AttributeValue::N(NOW_MS.to_string()));
    assert_eq!(
        item["expiration"],
        AttributeValue::N((NOW_MS / 1000 + 3600).to_string())
    );
}
