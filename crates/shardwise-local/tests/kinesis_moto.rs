//! The SDK source against moto: the same mapping reads a Kinesis stream through ListShards,
//! GetShardIterator and GetRecords, bisects a poison record out and sends the on-failure record
//! to an SQS queue. Skipped without moto (`SHARDWISE_MOTO_ENDPOINT`), failed when required.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{Harness, rec, settings};
use shardwise::producer::{Producer, ProducerRecord};
use shardwise_aws::{KinesisStreamWriter, StreamTarget};
use shardwise_local::settings::MappingSettings;
use shardwise_local::stream::{KinesisSource, Source};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kinesis_source_delivers_every_record_and_isolates_poison() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let Some(config) = shardwise_testkit::moto_config().await else {
        return;
    };
    let client = aws_sdk_kinesis::Client::new(&config);
    let name = shardwise_testkit::unique_name("esm");
    client
        .create_stream()
        .stream_name(&name)
        .shard_count(2)
        .send()
        .await
        .expect("create stream");
    let mut records: Vec<(String, String)> = (1..=12)
        .map(|i| rec(&format!("r{i}"), &format!("key-{}", i % 4), ""))
        .collect();
    records[6] = rec("poison", "key-3", "\"fail\":\"error\"");
    let producer = Producer::new(KinesisStreamWriter::new(
        client.clone(),
        StreamTarget::Name(name.clone()),
    ));
    let report = producer
        .put(
            &records
                .iter()
                .map(|(k, d)| ProducerRecord::new(k.clone(), d.clone().into_bytes()))
                .collect::<Vec<_>>(),
            None,
        )
        .await;
    assert!(report.all_put());

    let source = Source::Kinesis(Arc::new(
        KinesisSource::connect(client, &name).await.unwrap(),
    ));
    let queue_url = shardwise_testkit::create_queue(&config, "on-failure").await;
    let mut h = Harness::new(1);
    h.instances = 2;
    h.on_failure = Some(shardwise_local::esm::OnFailure::Sqs {
        client: aws_sdk_sqs::Client::new(&config),
        queue_url: queue_url.clone(),
    });
    h.idle = std::time::Duration::from_millis(1500);
    let out = h
        .run_source(
            MappingSettings {
                bisect_on_error: true,
                max_retry_attempts: Some(0),
                ..settings()
            },
            source,
            vec![],
        )
        .await;
    let mut delivered: Vec<String> = out
        .invocations()
        .into_iter()
        .flatten()
        .filter(|id| id != "poison")
        .collect();
    delivered.sort();
    delivered.dedup();
    assert_eq!(delivered.len(), 11, "{:?}", out.invocations());
    assert_eq!(out.get(|s| &s.records_out), 11);
    // The on-failure record went to the SQS queue, in Lambda's shape.
    let bodies = shardwise_testkit::drain_queue(&config, &queue_url).await;
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let record: serde_json::Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(record["KinesisBatchInfo"]["batchSize"], 1);
    assert!(
        record["KinesisBatchInfo"]["streamArn"]
            .as_str()
            .unwrap()
            .ends_with(&name)
    );
}
