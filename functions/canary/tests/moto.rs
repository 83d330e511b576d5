//! The canary against moto: it puts records on a real (emulated) stream, sees the consumers'
//! acknowledgements in the canary table, and reports a missing one.
//! Skipped unless `SHARDWISE_MOTO_ENDPOINT` is set (see `shardwise_testkit::moto_config`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Mutex;

use aws_sdk_kinesis::types::ShardIteratorType;
use canary::store::DynamoDbCanaryStore;
use canary::{Canary, RunSettings};
use shardwise::FromRecordData;
use shardwise::clock::ManualClock;
use shardwise::metrics::MetricsWriter;
use shardwise::producer::Producer;
use shardwise_aws::{KinesisStreamWriter, StreamTarget};
use shardwise_cards::canary::{CanaryAck, CanaryAckStore, DynamoDbCanaryAckStore, canary_table};
use shardwise_cards::transaction::StreamPayload;
use shardwise_testkit::{KeyType, MotoConfig, create_table, moto_config, unique_name};

#[derive(Default)]
struct Lines(Mutex<Vec<serde_json::Value>>);

impl MetricsWriter for Lines {
    fn write_line(&self, line: &str) {
        self.0
            .lock()
            .unwrap()
            .push(serde_json::from_str(line).unwrap());
    }
}

/// The canary table as template.yaml declares it.
async fn create_canary_table(config: &MotoConfig) -> String {
    create_table(
        config,
        "canary",
        &[
            (canary_table::CANARY_ID, KeyType::Hash),
            (canary_table::CONSUMER, KeyType::Range),
        ],
    )
    .await
}

/// Every record on the stream, decoded as the consumers decode them.
async fn canaries_on(client: &aws_sdk_kinesis::Client, stream: &str) -> Vec<(String, String, i64)> {
    let shards = client
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .unwrap();
    let mut out = Vec::new();
    for shard in shards.shards() {
        let iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard.shard_id())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap();
        let page = client
            .get_records()
            .shard_iterator(iterator.shard_iterator().unwrap())
            .send()
            .await
            .unwrap();
        for record in page.records() {
            let payload = StreamPayload::from_record_data(record.data().as_ref()).unwrap();
            let canary = payload.as_canary().unwrap();
            out.push((
                shard.shard_id().to_owned(),
                canary.canary_id.to_string(),
                canary.sent_at,
            ));
        }
    }
    out
}

const T0: i64 = 1_795_687_200_000;

#[tokio::test]
async fn the_canary_puts_records_sees_acks_and_reports_a_missing_one() {
    let Some(config) = moto_config().await else {
        return;
    };
    let kinesis = aws_sdk_kinesis::Client::new(&config);
    let dynamodb = aws_sdk_dynamodb::Client::new(&config);
    let stream = unique_name("canary-stream");
    kinesis
        .create_stream()
        .stream_name(&stream)
        .shard_count(2)
        .send()
        .await
        .unwrap();
    let table = create_canary_table(&config).await;

    let canary = Canary::new(
        Producer::new(KinesisStreamWriter::new(
            kinesis.clone(),
            StreamTarget::Name(stream.clone()),
        )),
        DynamoDbCanaryStore::new(dynamodb.clone(), &table),
        ManualClock::new(T0 + 700),
        Lines::default(),
        "Test",
        RunSettings::default(),
    );
    let report = canary.run_once(None).await.unwrap();
    assert_eq!(report.sent, 3);

    // The records are on the stream, on both shards (the hash keys are spread).
    let seen = canaries_on(&kinesis, &stream).await;
    assert_eq!(seen.len(), 3);
    let shards: std::collections::BTreeSet<&str> =
        seen.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(shards.len(), 2, "{seen:?}");

    // The consumers acknowledge what they read, through the store they use in Lambda: fraud
    // all three, aggregation all but one.
    let acks = DynamoDbCanaryAckStore::new(dynamodb.clone(), &table);
    let mut ids: Vec<&(String, String, i64)> = seen.iter().collect();
    ids.sort_by(|a, b| a.1.cmp(&b.1));
    let ack = |consumer: &str, (_, id, sent_at): &(String, String, i64), delay: i64| CanaryAck {
        canary_id: id.clone(),
        consumer: consumer.to_owned(),
        sent_at: *sent_at,
        acked_at: sent_at + delay,
    };
    let fraud: Vec<CanaryAck> = ids.iter().map(|c| ack("fraud", c, 900)).collect();
    let aggregation: Vec<CanaryAck> = ids[..2]
        .iter()
        .map(|c| ack("aggregation", c, 4_000))
        .collect();
    acks.acknowledge(&fraud).await.unwrap();
    acks.acknowledge(&aggregation).await.unwrap();
    // A redelivered canary keeps its first acknowledgement.
    acks.acknowledge(&[ack("fraud", ids[0], 50_000)])
        .await
        .unwrap();

    // Three minutes later: past the deadline.
    canary.clock().set(T0 + 180_700);
    let report = canary.run_once(None).await.unwrap();
    assert_eq!(report.consumers["fraud"].latency_ms, vec![900, 900, 900]);
    assert_eq!(report.consumers["fraud"].missing, 0);
    assert_eq!(
        report.consumers["aggregation"].latency_ms,
        vec![4_000, 4_000]
    );
    assert_eq!(report.consumers["aggregation"].missing, 1);

    let lines = canary.metrics().0.lock().unwrap().clone();
    let missing: Vec<(String, f64)> = lines
        .iter()
        .filter(|l| l.get("CanaryMissing").is_some())
        .map(|l| {
            (
                l["Consumer"].as_str().unwrap().to_owned(),
                l["CanaryMissing"].as_f64().unwrap(),
            )
        })
        .collect();
    assert!(
        missing.contains(&("aggregation".to_owned(), 1.0)),
        "{missing:?}"
    );
    let latency_lines = lines
        .iter()
        .filter(|l| l.get("CanaryLatency").is_some())
        .count();
    assert_eq!(latency_lines, 5);
    assert_eq!(
        lines[0]["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
        serde_json::json!([["Consumer"]])
    );

    // Reported once: the next run judges none of them again.
    canary.clock().set(T0 + 240_700);
    let report = canary.run_once(None).await.unwrap();
    assert_eq!(report.consumers["aggregation"].missing, 0);
    assert!(report.consumers["fraud"].latency_ms.is_empty());
}
