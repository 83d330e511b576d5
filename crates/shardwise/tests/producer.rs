//! The Kinesis producer against the in-memory writer: batching limits, per-record retries, the
//! report of what could not be put, KPL aggregation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use shardwise::handler::ErrorClass;
use shardwise::kpl;
use shardwise::producer::{
    InMemoryStreamWriter, Producer, ProducerRecord, PutOutcome, PutRecordsLimits, WriterFault,
    aggregate_by_partition_key,
};
use shardwise::retry::{ExponentialBackoff, Jitter};
use tokio::time::Instant;

fn quick_retry(max_retries: u32) -> ExponentialBackoff {
    ExponentialBackoff {
        initial: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
        max_retries,
        jitter: Jitter::None,
    }
}

fn records(n: usize, data_bytes: usize) -> Vec<ProducerRecord> {
    (0..n)
        .map(|i| ProducerRecord::new(format!("k{i}"), vec![b'x'; data_bytes]))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn batches_keep_to_500_records_per_call() {
    let producer = Producer::new(InMemoryStreamWriter::new()).max_in_flight(1);
    let input = records(1201, 10);
    let report = producer.put(&input, None).await;
    assert!(report.all_put());
    assert_eq!(report.calls, 3);
    let counts: Vec<usize> = producer.writer().calls().iter().map(|c| c.0).collect();
    assert_eq!(counts, vec![500, 500, 201]);
    // Stream order is kept when nothing is retried.
    let stored = producer.writer().records();
    assert_eq!(stored.len(), 1201);
    assert_eq!(stored[0].partition_key, "k0");
    assert_eq!(stored[1200].partition_key, "k1200");
}

#[tokio::test(start_paused = true)]
async fn batches_keep_to_5_mib_per_call_counting_partition_keys() {
    let producer = Producer::new(InMemoryStreamWriter::new());
    // 11 records of 1 MiB minus their 3-byte keys each: 5 fit a call, the 6th would pass 5 MiB.
    let input: Vec<ProducerRecord> = (0..11)
        .map(|i| ProducerRecord::new(format!("k{i:02}"), vec![0u8; 1024 * 1024 - 3]))
        .collect();
    let report = producer.put(&input, None).await;
    assert!(report.all_put(), "{report:?}");
    let calls = producer.writer().calls();
    assert_eq!(calls.iter().map(|c| c.0).collect::<Vec<_>>(), vec![5, 5, 1]);
    assert!(calls.iter().all(|c| c.1 <= 5 * 1024 * 1024));
    assert_eq!(calls[0].1, 5 * 1024 * 1024);
}

#[tokio::test(start_paused = true)]
async fn records_that_can_never_be_put_are_reported_without_a_call() {
    let producer = Producer::new(InMemoryStreamWriter::new());
    let input = vec![
        // Exactly 1 MiB with its key: allowed.
        ProducerRecord::new("k", vec![0u8; 1024 * 1024 - 1]),
        // One byte more: refused.
        ProducerRecord::new("kk", vec![0u8; 1024 * 1024 - 1]),
        ProducerRecord::new("", b"x".to_vec()),
        ProducerRecord::new("é".repeat(257), b"x".to_vec()),
        ProducerRecord::new("k", b"x".to_vec()).with_explicit_hash_key("12a"),
        ProducerRecord::new("k", b"x".to_vec())
            .with_explicit_hash_key("340282366920938463463374607431768211456"),
        ProducerRecord::new("k", b"x".to_vec())
            .with_explicit_hash_key("340282366920938463463374607431768211455"),
    ];
    let report = producer.put(&input, None).await;
    let codes: Vec<&str> = report
        .outcomes
        .iter()
        .map(|o| match o {
            PutOutcome::Put { .. } => "put",
            PutOutcome::Failed { error_code, .. } => error_code.as_str(),
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            "put",
            "RecordTooLarge",
            "InvalidPartitionKey",
            "InvalidPartitionKey",
            "InvalidExplicitHashKey",
            "InvalidExplicitHashKey",
            "put"
        ]
    );
    assert_eq!(report.calls, 1);
    assert_eq!(report.failed().count(), 5);
}

#[tokio::test(start_paused = true)]
async fn refused_records_are_retried_alone_with_backoff() {
    let writer = InMemoryStreamWriter::new();
    writer.inject(WriterFault::RefuseEntries {
        positions: vec![1, 3],
        error_code: "ProvisionedThroughputExceededException".into(),
        class: shardwise::handler::ErrorClass::Retryable,
    });
    writer.inject(WriterFault::RefuseEntries {
        positions: vec![0],
        error_code: "InternalFailure".into(),
        class: shardwise::handler::ErrorClass::Retryable,
    });
    let producer = Producer::new(writer).retry(quick_retry(3));
    let input = records(5, 8);
    let started = Instant::now();
    let report = producer.put(&input, None).await;
    assert!(report.all_put(), "{report:?}");
    // 5 records, then the 2 refused, then the 1 refused again.
    let counts: Vec<usize> = producer.writer().calls().iter().map(|c| c.0).collect();
    assert_eq!(counts, vec![5, 2, 1]);
    assert_eq!(started.elapsed(), Duration::from_millis(100 + 200));
    let attempts: Vec<u32> = report
        .outcomes
        .iter()
        .map(|o| match o {
            PutOutcome::Put { attempts, .. } => *attempts,
            PutOutcome::Failed { .. } => 0,
        })
        .collect();
    assert_eq!(attempts, vec![1, 3, 1, 2, 1]);
    // Each record exactly once on the stream, the retried ones after the others.
    let keys: Vec<String> = producer
        .writer()
        .records()
        .into_iter()
        .map(|r| r.partition_key)
        .collect();
    assert_eq!(keys, vec!["k0", "k2", "k4", "k3", "k1"]);
}

#[tokio::test(start_paused = true)]
async fn what_stays_refused_is_reported_with_the_last_error() {
    let writer = InMemoryStreamWriter::new();
    for _ in 0..3 {
        writer.inject(WriterFault::RefuseEntries {
            positions: vec![0],
            error_code: "ProvisionedThroughputExceededException".into(),
            class: shardwise::handler::ErrorClass::Retryable,
        });
    }
    let producer = Producer::new(writer).retry(quick_retry(2));
    let report = producer.put(&records(2, 8), None).await;
    assert_eq!(report.put_count(), 1);
    let failed: Vec<_> = report.failed().collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, 0);
    match failed[0].1 {
        PutOutcome::Failed {
            error_code,
            attempts,
            ..
        } => {
            assert_eq!(error_code, "ProvisionedThroughputExceededException");
            assert_eq!(*attempts, 3);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn permanent_entry_errors_are_not_retried() {
    let writer = InMemoryStreamWriter::new();
    writer.inject(WriterFault::RefuseEntries {
        positions: vec![0],
        error_code: "KMSAccessDeniedException".into(),
        class: shardwise::handler::ErrorClass::Permanent,
    });
    let producer = Producer::new(writer).retry(quick_retry(5));
    let report = producer.put(&records(2, 8), None).await;
    assert_eq!(report.calls, 1);
    assert_eq!(report.put_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn failed_calls_are_retried_only_when_retryable() {
    let writer = InMemoryStreamWriter::new();
    writer.inject(WriterFault::FailCall {
        class: ErrorClass::Retryable,
        code: "ProvisionedThroughputExceededException".into(),
    });
    let producer = Producer::new(writer).retry(quick_retry(2));
    let report = producer.put(&records(3, 8), None).await;
    assert!(report.all_put());
    assert_eq!(report.calls, 2);

    let writer = InMemoryStreamWriter::new();
    writer.inject(WriterFault::FailCall {
        class: ErrorClass::Permanent,
        code: "ResourceNotFoundException".into(),
    });
    let producer = Producer::new(writer).retry(quick_retry(2));
    let report = producer.put(&records(3, 8), None).await;
    assert_eq!(report.calls, 1);
    assert_eq!(report.failed().count(), 3);
    assert!(report.outcomes.iter().all(|o| matches!(o,
        PutOutcome::Failed { error_code, .. } if error_code == "ResourceNotFoundException")));
}

#[tokio::test(start_paused = true)]
async fn retries_stop_before_the_cutoff() {
    let writer = InMemoryStreamWriter::new();
    for _ in 0..10 {
        writer.inject(WriterFault::RefuseEntries {
            positions: vec![0],
            error_code: "ProvisionedThroughputExceededException".into(),
            class: shardwise::handler::ErrorClass::Retryable,
        });
    }
    let producer = Producer::new(writer).retry(quick_retry(10));
    let cutoff = Instant::now() + Duration::from_millis(250);
    let report = producer.put(&records(1, 8), Some(cutoff)).await;
    // Waits 100 ms, then a 200 ms wait would pass the cutoff.
    assert_eq!(report.calls, 2);
    assert!(!report.all_put());
    assert!(Instant::now() < cutoff);
}

#[tokio::test(start_paused = true)]
async fn calls_run_concurrently_up_to_the_limit() {
    let producer = Producer::new(InMemoryStreamWriter::new())
        .limits(PutRecordsLimits {
            max_records_per_call: 10,
            ..PutRecordsLimits::default()
        })
        .max_in_flight(3);
    let report = producer.put(&records(95, 8), None).await;
    assert!(report.all_put());
    assert_eq!(report.calls, 10);
    // The report keeps the input's positions whatever order the calls finished in.
    let sequence_numbers: Vec<&str> = report
        .outcomes
        .iter()
        .map(|o| match o {
            PutOutcome::Put {
                sequence_number, ..
            } => sequence_number.as_str(),
            PutOutcome::Failed { .. } => "",
        })
        .collect();
    let stored = producer.writer().records();
    for (i, sequence_number) in sequence_numbers.iter().enumerate() {
        let record = stored
            .iter()
            .find(|r| r.sequence_number == *sequence_number)
            .unwrap();
        assert_eq!(record.partition_key, format!("k{i}"));
    }
}

#[test]
fn aggregation_groups_by_partition_key_and_round_trips() {
    let mut input = Vec::new();
    for i in 0..30 {
        input.push(ProducerRecord::new(
            format!("card-{}", i % 3),
            format!("{{\"n\":{i}}}").into_bytes(),
        ));
    }
    input.push(ProducerRecord::new("lonely", b"{}".to_vec()));
    let aggregates = aggregate_by_partition_key(&input, 100);
    // Small limit: several aggregates per key; the lone record passes through as it is.
    assert!(aggregates.len() > 4);
    let mut seen = vec![false; input.len()];
    for (aggregate, positions) in &aggregates {
        assert!(
            aggregate.size() <= 100 || positions.len() == 1,
            "{}",
            aggregate.size()
        );
        if positions.len() == 1 {
            assert_eq!(aggregate, &input[positions[0]]);
            seen[positions[0]] = true;
            continue;
        }
        let users = kpl::deaggregate(&aggregate.data).unwrap().unwrap();
        assert_eq!(users.len(), positions.len());
        for (user, &position) in users.iter().zip(positions) {
            assert_eq!(user.partition_key, input[position].partition_key);
            assert_eq!(user.partition_key, aggregate.partition_key);
            assert_eq!(user.data, input[position].data);
            seen[position] = true;
        }
        // Order within a key is kept.
        assert!(positions.windows(2).all(|w| w[0] < w[1]));
    }
    assert!(seen.iter().all(|s| *s));

    let one_each = aggregate_by_partition_key(&input, 1024 * 1024);
    assert_eq!(one_each.len(), 4);
}

#[test]
fn put_is_a_send_future_so_tools_can_spawn_it() {
    fn assert_send<T: Send>(_: T) {}
    let producer = Producer::new(InMemoryStreamWriter::new());
    let input = records(1, 1);
    assert_send(producer.put(&input, None));
}
