//! Conformance: one test per documented behaviour of Lambda's Kinesis event source mapping
//! (docs/local-runner.md lists them with their AWS sources), run against the embedded stream
//! with the real test-function process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Harness, rec, settings};
use serde_json::Value;
use shardwise_local::filter::Pattern;
use shardwise_local::stream::StartingPosition;

fn records(n: usize, key: &str) -> Vec<(String, String)> {
    (1..=n).map(|i| rec(&format!("r{i}"), key, "")).collect()
}

fn flat(invocations: &[Vec<String>]) -> Vec<String> {
    invocations.iter().flatten().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_size_caps_the_records_of_an_invocation() {
    let h = Harness::new(1);
    h.put(&records(25, "k"));
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            batch_size: 10,
            ..settings()
        })
        .await;
    let sizes: Vec<usize> = out.invocations().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![10, 10, 5]);
    assert_eq!(
        flat(&out.invocations()),
        records(25, "k")
            .iter()
            .map(|r| serde_json::from_str::<Value>(&r.1).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned())
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batching_window_gathers_records_before_invoking() {
    let h = Harness::new(1);
    h.put(&records(3, "k"));
    let stream = h.stream.clone();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let data = br#"{"id":"late"}"#;
        stream
            .append(
                &[shardwise::producer::PutEntry {
                    partition_key: "k",
                    explicit_hash_key: None,
                    data,
                }],
                shardwise_local::now_ms(),
            )
            .unwrap();
    });
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            batch_size: 100,
            batching_window: Duration::from_millis(1000),
            ..settings()
        })
        .await;
    late.await.unwrap();
    assert_eq!(out.invocations(), vec![vec!["r1", "r2", "r3", "late"]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payload_cap_splits_a_batch() {
    let h = Harness::new(1);
    let pad = "x".repeat(600);
    let recs: Vec<_> = (1..=10)
        .map(|i| rec(&format!("r{i}"), "k", &format!("\"pad\":\"{pad}\"")))
        .collect();
    h.put(&recs);
    // A 6 MB cap scaled down: each record is ~1.3 KB in the event, so 4 KB holds two or three.
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            batch_size: 100,
            max_payload_bytes: 4096,
            ..settings()
        })
        .await;
    assert!(out.invocations().len() >= 4, "{:?}", out.invocations());
    assert!(out.invocations().iter().all(|i| i.len() <= 3));
    assert_eq!(flat(&out.invocations()).len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_starts_after_the_records_already_there() {
    let mut h = Harness::new(1);
    // The run must still be going when the new record arrives.
    h.idle = Duration::from_millis(2000);
    h.put(&records(5, "k"));
    let stream = h.stream.clone();
    let later = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        stream
            .append(
                &[shardwise::producer::PutEntry {
                    partition_key: "k",
                    explicit_hash_key: None,
                    data: br#"{"id":"new"}"#,
                }],
                shardwise_local::now_ms(),
            )
            .unwrap();
    });
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            starting_position: StartingPosition::Latest,
            ..settings()
        })
        .await;
    later.await.unwrap();
    assert_eq!(flat(&out.invocations()), vec!["new"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_timestamp_starts_at_the_first_record_arrived_since() {
    let h = Harness::new(1);
    h.put(&records(3, "k"));
    tokio::time::sleep(Duration::from_millis(30)).await;
    let since = shardwise_local::now_ms();
    h.put(&[rec("after1", "k", ""), rec("after2", "k", "")]);
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            starting_position: StartingPosition::AtTimestamp(since),
            ..settings()
        })
        .await;
    assert_eq!(flat(&out.invocations()), vec!["after1", "after2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_horizon_reads_every_shard_from_the_start_and_keys_pick_shards() {
    let h = Harness::new(3);
    let recs: Vec<_> = (1..=30)
        .map(|i| rec(&format!("r{i}"), &format!("key-{}", i % 7), ""))
        .collect();
    h.put(&recs);
    let out = h.run(settings()).await;
    assert_eq!(flat(&out.invocations()).len(), 30);
    // A key's records all come from one shard (its hash), in order.
    for line in &out.log {
        let keys: Vec<&str> = line["partition_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        let seqs: Vec<&str> = line["seqs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        assert!(!keys.is_empty());
    }
    let shards: std::collections::HashSet<&str> = out
        .log
        .iter()
        .map(|l| &l["seqs"][0].as_str().unwrap()[4..8])
        .collect();
    assert!(shards.len() > 1, "records spread over shards by key hash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallelization_factor_runs_keys_concurrently_and_each_key_in_order() {
    let mut h = Harness::new(1);
    h.instances = 4;
    let mut recs = Vec::new();
    for round in 1..=3 {
        for key in 0..8 {
            recs.push(rec(
                &format!("k{key}-{round}"),
                &format!("key-{key}"),
                "\"fail\":\"sleep\",\"sleep_ms\":150",
            ));
        }
    }
    h.put(&recs);
    let started = std::time::Instant::now();
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            batch_size: 1,
            parallelization_factor: 4,
            ..settings()
        })
        .await;
    let elapsed = started.elapsed();
    assert_eq!(flat(&out.invocations()).len(), 24);
    // 24 invocations of 150 ms, one lane would need 3.6 s.
    assert!(elapsed < Duration::from_millis(3500), "{elapsed:?}");
    let pids: std::collections::HashSet<u64> =
        out.log.iter().map(|l| l["pid"].as_u64().unwrap()).collect();
    assert!(pids.len() > 1, "several instances served the lanes");
    for key in 0..8 {
        let order: Vec<String> = flat(&out.invocations())
            .into_iter()
            .filter(|id| id.starts_with(&format!("k{key}-")))
            .collect();
        assert_eq!(
            order,
            vec![
                format!("k{key}-1"),
                format!("k{key}-2"),
                format!("k{key}-3")
            ]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bisect_on_function_error_isolates_the_poison_record() {
    let h = Harness::new(1);
    let mut recs = records(8, "k");
    recs[5] = rec("poison", "k", "\"fail\":\"error\"");
    h.put(&recs);
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            batch_size: 8,
            bisect_on_error: true,
            max_retry_attempts: Some(1),
            ..settings()
        })
        .await;
    assert!(out.get(|s| &s.bisects) >= 3, "8 → 4 → 2 → 1");
    assert_eq!(out.get(|s| &s.records_out), 7);
    assert_eq!(out.get(|s| &s.discarded), 1);
    assert_eq!(out.on_failure.len(), 1);
    assert_eq!(out.on_failure[0]["KinesisBatchInfo"]["batchSize"], 1);
    // Every good record reached the function after the poison was isolated; order kept.
    let last_good: Vec<String> = out
        .invocations()
        .iter()
        .filter(|i| !i.contains(&"poison".to_owned()))
        .flatten()
        .cloned()
        .collect();
    for id in ["r1", "r2", "r3", "r4", "r5", "r7", "r8"] {
        assert!(last_good.contains(&id.to_owned()), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_bisect_the_whole_batch_is_retried_then_discarded() {
    let h = Harness::new(1);
    let mut recs = records(4, "k");
    recs[1] = rec("poison", "k", "\"fail\":\"error\"");
    h.put(&recs);
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            max_retry_attempts: Some(2),
            ..settings()
        })
        .await;
    // One attempt and two retries of the same four records.
    assert_eq!(out.invocations(), vec![vec!["r1", "poison", "r3", "r4"]; 3]);
    assert_eq!(out.get(|s| &s.retries), 2);
    assert_eq!(out.get(|s| &s.discarded), 4);
    let record = &out.on_failure[0];
    assert_eq!(
        record["requestContext"]["condition"],
        "RetryAttemptsExhausted"
    );
    assert_eq!(record["requestContext"]["approximateInvokeCount"], 3);
    assert_eq!(record["KinesisBatchInfo"]["batchSize"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_on_failure_record_has_lambdas_shape_and_no_data() {
    let h = Harness::new(1);
    h.put(&[
        rec("a", "k", "\"fail\":\"error\""),
        rec("b", "k", "\"fail\":\"error\""),
    ]);
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            max_retry_attempts: Some(0),
            ..settings()
        })
        .await;
    let record = &out.on_failure[0];
    for path in [
        "/requestContext/requestId",
        "/requestContext/functionArn",
        "/responseContext/statusCode",
        "/responseContext/executedVersion",
        "/responseContext/functionError",
        "/version",
        "/timestamp",
        "/KinesisBatchInfo/shardId",
        "/KinesisBatchInfo/startSequenceNumber",
        "/KinesisBatchInfo/endSequenceNumber",
        "/KinesisBatchInfo/approximateArrivalOfFirstRecord",
        "/KinesisBatchInfo/approximateArrivalOfLastRecord",
        "/KinesisBatchInfo/streamArn",
    ] {
        assert!(record.pointer(path).is_some(), "{path} in {record}");
    }
    assert_eq!(
        record["KinesisBatchInfo"]["startSequenceNumber"],
        out.log[0]["seqs"][0]
    );
    assert_eq!(
        record["KinesisBatchInfo"]["endSequenceNumber"],
        out.log[0]["seqs"][1]
    );
    assert!(!record.to_string().contains("\"data\""), "metadata only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_item_failures_checkpoint_at_the_reported_record() {
    let h = Harness::new(1);
    let mut recs = records(6, "k");
    recs[2] = rec("r3", "k", "\"fail\":\"rbif\",\"times\":1");
    h.put(&recs);
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            report_batch_item_failures: true,
            ..settings()
        })
        .await;
    assert_eq!(
        out.invocations(),
        vec![
            vec!["r1", "r2", "r3", "r4", "r5", "r6"],
            vec!["r3", "r4", "r5", "r6"]
        ]
    );
    assert_eq!(out.get(|s| &s.partial_failures), 1);
    assert_eq!(out.get(|s| &s.records_out), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_several_reported_failures_the_lowest_sequence_number_wins() {
    let h = Harness::new(1);
    let mut recs = records(6, "k");
    recs[4] = rec("r5", "k", "\"fail\":\"rbif\",\"times\":1");
    recs[1] = rec("r2", "k", "\"fail\":\"rbif\",\"times\":1");
    h.put(&recs);
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            report_batch_item_failures: true,
            ..settings()
        })
        .await;
    assert_eq!(out.invocations()[1], vec!["r2", "r3", "r4", "r5", "r6"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bisect_with_batch_item_failures_splits_at_the_returned_record() {
    let h = Harness::new(1);
    let mut recs = records(8, "k");
    recs[5] = rec("r6", "k", "\"fail\":\"rbif\",\"times\":1");
    h.put(&recs);
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            report_batch_item_failures: true,
            bisect_on_error: true,
            ..settings()
        })
        .await;
    // Not halved: retried from the returned record only.
    assert_eq!(out.invocations()[1], vec!["r6", "r7", "r8"]);
    assert_eq!(out.get(|s| &s.bisects), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_batch_item_failures_answer_fails_the_whole_batch() {
    let h = Harness::new(1);
    let mut recs = records(4, "k");
    recs[2] = rec("r3", "k", "\"fail\":\"malformed\",\"times\":1");
    h.put(&recs);
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            report_batch_item_failures: true,
            ..settings()
        })
        .await;
    assert_eq!(out.invocations(), vec![vec!["r1", "r2", "r3", "r4"]; 2]);
    assert_eq!(out.get(|s| &s.function_errors), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_report_batch_item_failures_the_answer_is_ignored() {
    let h = Harness::new(1);
    let mut recs = records(4, "k");
    recs[2] = rec("r3", "k", "\"fail\":\"rbif\"");
    h.put(&recs);
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            report_batch_item_failures: false,
            ..settings()
        })
        .await;
    assert_eq!(out.invocations().len(), 1);
    assert_eq!(out.get(|s| &s.records_out), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_past_the_maximum_age_are_discarded_without_an_invocation() {
    let h = Harness::new(1);
    h.put(&records(3, "k"));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            max_record_age: Some(Duration::from_secs(1)),
            ..settings()
        })
        .await;
    assert!(out.log.is_empty(), "{:?}", out.invocations());
    assert_eq!(out.get(|s| &s.discarded), 3);
    assert_eq!(
        out.on_failure[0]["requestContext"]["condition"],
        "RecordAgeExceeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_process_fails_the_invocation_and_a_new_instance_takes_over() {
    let h = Harness::new(1);
    let mut recs = records(3, "k");
    recs[1] = rec("r2", "k", "\"fail\":\"crash\",\"times\":1");
    h.put(&recs);
    let out = h.run(settings()).await;
    assert_eq!(out.invocations(), vec![vec!["r1", "r2", "r3"]; 2]);
    let pids: std::collections::HashSet<u64> =
        out.log.iter().map(|l| l["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids.len(), 2, "the retry ran in a new process");
    assert_eq!(out.get(|s| &s.records_out), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_past_its_timeout_is_stopped_and_retried() {
    let mut h = Harness::new(1);
    h.timeout = Duration::from_millis(1500);
    h.put(&[rec(
        "slow",
        "k",
        "\"fail\":\"sleep\",\"sleep_ms\":5000,\"times\":1",
    )]);
    let out = h.run(settings()).await;
    assert_eq!(out.invocations().len(), 2);
    assert_eq!(out.get(|s| &s.function_errors), 1);
    assert_eq!(out.get(|s| &s.records_out), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_api_sends_lambdas_invocation_headers() {
    let h = Harness::new(1);
    h.put(&records(1, "k"));
    let out = h.run(settings()).await;
    let line = &out.log[0];
    let request = line["request"].as_str().unwrap();
    assert_eq!(request.len(), 36, "a UUID: {request}");
    assert!(
        line["function_arn"]
            .as_str()
            .unwrap()
            .ends_with(":function:conformance")
    );
    assert!(line["trace_id"].as_str().unwrap().starts_with("Root=1-"));
    let deadline = line["deadline_ms"].as_u64().unwrap();
    let now = u64::try_from(shardwise_local::now_ms()).unwrap();
    assert!(deadline > now - 60_000 && deadline < now + 60_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tumbling_windows_pass_state_between_invokes_and_end_with_a_final_invoke() {
    let mut h = Harness::new(1);
    h.idle = Duration::from_millis(300);
    let window = Duration::from_secs(1);
    // Put right after a window boundary so all records share a window.
    let ms = shardwise_local::now_ms();
    tokio::time::sleep(Duration::from_millis(
        u64::try_from(1000 - ms % 1000).unwrap() + 20,
    ))
    .await;
    h.put(&records(7, "k"));
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            batch_size: 3,
            tumbling_window: Some(window),
            ..settings()
        })
        .await;
    let lines = &out.log;
    assert!(
        lines.len() >= 4,
        "3 + 3 + 1 records, then the final invoke: {lines:?}"
    );
    assert_eq!(lines[0]["state"], serde_json::json!({}));
    assert_eq!(
        lines[1]["state"]["count"], 3,
        "the state returned by the first invoke"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["final"], true);
    assert_eq!(last["early"], false);
    assert_eq!(last["ids"].as_array().unwrap().len(), 0);
    assert_eq!(last["state"]["count"], 7);
    assert!(
        last["window"]["start"].as_str().unwrap().ends_with(":00Z")
            || last["window"]["start"].as_str().unwrap().ends_with('Z')
    );
    assert_eq!(out.get(|s| &s.windows_closed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_whose_state_outgrows_the_limit_terminates_early() {
    let h = Harness::new(1);
    h.put(&[
        rec("big", "k", "\"fail\":\"big_state\""),
        rec("next", "k", ""),
    ]);
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            batch_size: 1,
            tumbling_window: Some(Duration::from_secs(1)),
            ..settings()
        })
        .await;
    let early = out
        .log
        .iter()
        .position(|l| l["early"] == true)
        .expect("an early invoke");
    // The window goes on after an early end: that invoke is not the window's final one.
    assert_eq!(out.log[early]["final"], false);
    // The window goes on with a fresh state.
    assert_eq!(out.log[early + 1]["state"], serde_json::json!({}));
    assert_eq!(out.get(|s| &s.windows_terminated_early), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_answer_without_state_is_a_failed_invocation() {
    let h = Harness::new(1);
    h.put(&[rec("a", "k", "\"fail\":\"nostate\",\"times\":1")]);
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            tumbling_window: Some(Duration::from_secs(1)),
            ..settings()
        })
        .await;
    assert_eq!(out.get(|s| &s.function_errors), 1);
    assert_eq!(
        out.invocations()[0],
        out.invocations()[1],
        "the same batch again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_criteria_drop_records_and_non_json_data() {
    let h = Harness::new(1);
    h.put(&[
        rec("keep1", "k", "\"keep\":true"),
        rec("drop", "k", "\"keep\":false"),
    ]);
    h.put_raw("k", b"\x00 not json");
    h.put(&[rec("keep2", "k", "\"keep\":true")]);
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            filters: vec![Pattern::parse(r#"{"data": {"keep": [true]}}"#).unwrap()],
            ..settings()
        })
        .await;
    assert_eq!(flat(&out.invocations()), vec!["keep1", "keep2"]);
    assert_eq!(out.get(|s| &s.filtered), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_persist_and_a_new_run_resumes_after_them() {
    let h = Harness::new(2);
    h.put(
        &(1..=10)
            .map(|i| rec(&format!("a{i}"), &format!("k{i}"), ""))
            .collect::<Vec<_>>(),
    );
    let first = h.run(settings()).await;
    assert_eq!(flat(&first.invocations()).len(), 10);
    h.put(
        &(1..=5)
            .map(|i| rec(&format!("b{i}"), &format!("k{i}"), ""))
            .collect::<Vec<_>>(),
    );
    let second = h.run(settings()).await;
    let mut all = flat(&second.invocations());
    all.sort();
    // The log holds both runs: the second delivered only the new records.
    let new: Vec<&String> = all.iter().filter(|id| id.starts_with('b')).collect();
    assert_eq!(new.len(), 5);
    assert_eq!(
        all.iter().filter(|id| id.starts_with('a')).count(),
        10,
        "no a-record twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_over_the_limit_returned_with_failures_terminates_the_window_too() {
    let h = Harness::new(1);
    h.put(&[
        rec("big", "k", "\"fail\":\"big_state\""),
        rec("r2", "k", "\"fail\":\"rbif\",\"times\":1"),
    ]);
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            report_batch_item_failures: true,
            tumbling_window: Some(Duration::from_secs(1)),
            ..settings()
        })
        .await;
    assert_eq!(out.get(|s| &s.partial_failures), 1);
    let early = out
        .log
        .iter()
        .position(|l| l["early"] == true)
        .expect("an early invoke after the partial failure");
    assert_eq!(early, 1, "{:?}", out.log);
    assert_eq!(out.log[early]["final"], false);
    // The redelivered record comes with a fresh state, not the oversized one.
    assert_eq!(
        out.log[early + 1]["ids"],
        serde_json::json!(["r2"]),
        "{:?}",
        out.invocations()
    );
    assert_eq!(out.log[early + 1]["state"], serde_json::json!({}));
    assert_eq!(out.get(|s| &s.windows_terminated_early), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_cut_again_when_the_window_state_grew_since_the_lane_started() {
    let h = Harness::new(1);
    let pad = format!("\"pad\":\"{}\"", "x".repeat(150_000));
    h.put(&[
        rec("big", "k", "\"fail\":\"big_state\""),
        rec("a", "k", ""),
        rec("b", "k", &pad),
        rec("c", "k", &pad),
    ]);
    let out = h
        .run(shardwise_local::settings::MappingSettings {
            batch_size: 2,
            max_payload_bytes: 1_300_000,
            max_window_state_bytes: 5_000_000,
            tumbling_window: Some(Duration::from_secs(60)),
            ..settings()
        })
        .await;
    let with_records: Vec<Vec<String>> = out
        .invocations()
        .into_iter()
        .filter(|ids| !ids.is_empty())
        .collect();
    assert_eq!(
        with_records,
        vec![vec!["big", "a"], vec!["b"], vec!["c"]],
        "[b, c] with the 1.1 MB state would pass the 1.3 MB cap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_dropped_for_their_age_move_the_checkpoint_past_them() {
    let h = Harness::new(1);
    h.put(&records(3, "k"));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let aged = shardwise_local::settings::MappingSettings {
        max_record_age: Some(Duration::from_secs(1)),
        ..settings()
    };
    let first = h.run(aged.clone()).await;
    assert_eq!(first.on_failure.len(), 1);
    // A restart resumes after them: no second on-failure record, no invocation.
    let second = h.run(aged).await;
    assert!(second.log.is_empty(), "{:?}", second.invocations());
    assert_eq!(second.on_failure.len(), 1, "{:?}", second.on_failure);
}
