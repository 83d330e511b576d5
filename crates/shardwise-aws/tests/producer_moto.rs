//! The Kinesis producer against moto: records land on the stream and read back with GetRecords.
//! Skipped unless `SHARDWISE_MOTO_ENDPOINT` is set (see `shardwise_testkit::moto_config`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;

use aws_sdk_kinesis::types::ShardIteratorType;
use shardwise::producer::{Producer, ProducerRecord, PutOutcome, aggregate_by_partition_key};
use shardwise_aws::{KinesisStreamWriter, StreamTarget};
use shardwise_testkit::{moto_config, unique_name};

async fn create_stream(client: &aws_sdk_kinesis::Client, shards: i32) -> String {
    let name = unique_name("producer");
    client
        .create_stream()
        .stream_name(&name)
        .shard_count(shards)
        .send()
        .await
        .unwrap();
    name
}

/// Every record of every shard, as (shard, sequence number, partition key, data).
async fn read_all(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Vec<(String, String, String, Vec<u8>)> {
    let shards = client
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .unwrap();
    let mut out = Vec::new();
    for shard in shards.shards() {
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard.shard_id())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator()
            .map(str::to_owned);
        while let Some(it) = iterator {
            let page = client
                .get_records()
                .shard_iterator(it)
                .send()
                .await
                .unwrap();
            if page.records().is_empty() {
                break;
            }
            for record in page.records() {
                out.push((
                    shard.shard_id().to_owned(),
                    record.sequence_number().to_owned(),
                    record.partition_key().unwrap_or_default().to_owned(),
                    record.data().as_ref().to_vec(),
                ));
            }
            iterator = page.next_shard_iterator().map(str::to_owned);
        }
    }
    out
}

#[tokio::test]
async fn records_land_on_the_stream_and_read_back() {
    let Some(config) = moto_config().await else {
        return;
    };
    let client = aws_sdk_kinesis::Client::new(&config);
    let stream = create_stream(&client, 2).await;
    // More than one call's worth, so batching is exercised against the real wire protocol.
    let input: Vec<ProducerRecord> = (0..620)
        .map(|i| ProducerRecord::new(format!("card-{}", i % 37), format!("{{\"n\":{i}}}")))
        .collect();
    // One call at a time: moto numbers concurrent PutRecords without a lock and can drop a
    // record (AWS does not); what this test is about is the batching on the real wire protocol.
    let producer = Producer::new(KinesisStreamWriter::new(
        client.clone(),
        StreamTarget::Name(stream.clone()),
    ))
    .max_in_flight(1);
    let report = producer.put(&input, None).await;
    assert!(report.all_put(), "{:?}", report.failed().next());
    assert_eq!(report.calls, 2);

    let stored = read_all(&client, &stream).await;
    assert_eq!(stored.len(), input.len());
    let by_position: HashMap<(String, String), (String, Vec<u8>)> = stored
        .into_iter()
        .map(|(shard, seq, key, data)| ((shard, seq), (key, data)))
        .collect();
    for (record, outcome) in input.iter().zip(&report.outcomes) {
        let PutOutcome::Put {
            shard_id,
            sequence_number,
            ..
        } = outcome
        else {
            panic!("{outcome:?}");
        };
        let (key, data) = &by_position[&(shard_id.clone(), sequence_number.clone())];
        assert_eq!(key, &record.partition_key);
        assert_eq!(data, &record.data);
    }
}

#[tokio::test]
async fn a_missing_stream_is_reported_per_record_without_retrying() {
    let Some(config) = moto_config().await else {
        return;
    };
    let client = aws_sdk_kinesis::Client::new(&config);
    let producer = Producer::new(KinesisStreamWriter::new(
        client,
        StreamTarget::Name(unique_name("no-such-stream")),
    ));
    let report = producer
        .put(&[ProducerRecord::new("k", b"x".to_vec())], None)
        .await;
    assert_eq!(report.calls, 1);
    match &report.outcomes[0] {
        PutOutcome::Failed { error_code, .. } => {
            assert_eq!(error_code, "ResourceNotFoundException");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn kpl_aggregates_put_by_the_producer_deaggregate() {
    let Some(config) = moto_config().await else {
        return;
    };
    let client = aws_sdk_kinesis::Client::new(&config);
    let stream = create_stream(&client, 1).await;
    let input: Vec<ProducerRecord> = (0..50)
        .map(|i| ProducerRecord::new(format!("card-{}", i % 2), format!("{{\"n\":{i}}}")))
        .collect();
    let aggregates = aggregate_by_partition_key(&input, 1024 * 1024);
    assert_eq!(aggregates.len(), 2);
    let to_put: Vec<ProducerRecord> = aggregates.iter().map(|(a, _)| a.clone()).collect();
    let producer = Producer::new(KinesisStreamWriter::new(
        client.clone(),
        StreamTarget::Name(stream.clone()),
    ));
    assert!(producer.put(&to_put, None).await.all_put());
    let stored = read_all(&client, &stream).await;
    let mut users = Vec::new();
    for (_, _, _, data) in stored {
        users.extend(shardwise::kpl::deaggregate(&data).unwrap().unwrap());
    }
    assert_eq!(users.len(), 50);
}
