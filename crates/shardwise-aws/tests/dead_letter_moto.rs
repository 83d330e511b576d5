//! Dead letters through the real SQS wire protocol (moto started by `make test`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde::Deserialize;
use shardwise::retry::{ExponentialBackoff, Jitter};
use shardwise::testing::{TEST_STREAM_ARN, event_json, plain, raw_data, sequence_number};
use shardwise::{
    HandlerError, Invocation, Json, Processor, ProcessorConfig, Record, RecordHandler,
};
use shardwise_aws::SqsDeadLetterSink;
use shardwise_testkit::{create_queue, drain_queue, moto_config};

#[derive(Deserialize)]
struct Tx<'a> {
    id: u32,
    #[serde(default)]
    kind: &'a str,
}

struct Mixed;

impl<'d> RecordHandler<'d> for Mixed {
    type Payload = Json<Tx<'d>>;

    async fn handle(&self, _: &Record<'d>, tx: &Json<Tx<'d>>) -> Result<(), HandlerError> {
        match tx.kind {
            "poison" => Err(HandlerError::permanent(format!(
                "transaction {} breaks a rule",
                tx.id
            ))
            .with_type("RuleViolation")),
            "transient" => Err(HandlerError::retryable("downstream throttled")),
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn mixed_batch_yields_the_right_response_and_dead_letters() {
    let Some(config) = moto_config().await else {
        return;
    };
    let queue_url = create_queue(&config, "dlq").await;
    let sink = SqsDeadLetterSink::new(aws_sdk_sqs::Client::new(&config), &queue_url);
    let processor = Processor::per_record(Mixed, sink)
        .config(ProcessorConfig {
            function_name: "fraud".into(),
            ..ProcessorConfig::default()
        })
        .retry(ExponentialBackoff {
            initial: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            max_retries: 1,
            jitter: Jitter::None,
        });
    let seq = sequence_number;
    let event = event_json(&[
        plain("card-a", &seq(1), br#"{"id":1}"#),
        plain("card-b", &seq(2), br#"{"id":2,"kind":"poison"}"#),
        raw_data("card-c", &seq(3), "***"),
        plain("card-d", &seq(4), br#"{"id":4,"kind":"transient"}"#),
        plain("card-a", &seq(5), br#"{"id":5}"#),
        plain("card-d", &seq(6), br#"{"id":6}"#),
        plain("card-e", &seq(7), br#"{"id":"seven"}"#),
    ]);
    let report = processor
        .process(event.as_bytes(), &Invocation::unbounded("req-1"))
        .await
        .unwrap();

    // card-d failed transiently: Lambda must redeliver from it (and d/6 was held back).
    assert_eq!(report.response.batch_item_failures.len(), 1);
    assert_eq!(
        report.response.batch_item_failures[0].item_identifier,
        seq(4)
    );
    assert_eq!(report.counts.processed, 2);
    assert_eq!(report.counts.dead_lettered, 3);
    assert_eq!(report.counts.failed(), 2);

    let mut letters: Vec<serde_json::Value> = drain_queue(&config, &queue_url)
        .await
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    letters.sort_by_key(|l| l["sequenceNumber"].as_str().unwrap().to_owned());
    assert_eq!(letters.len(), 3);
    let expected = [
        (
            2,
            "card-b",
            "RuleViolation",
            "eyJpZCI6Miwia2luZCI6InBvaXNvbiJ9",
        ),
        (3, "card-c", "InvalidBase64", "***"),
        (7, "card-e", "PayloadWrongShape", "eyJpZCI6InNldmVuIn0="),
    ];
    for (letter, (n, key, error_type, data)) in letters.iter().zip(expected) {
        assert_eq!(letter["sequenceNumber"], seq(n));
        assert_eq!(letter["partitionKey"], key);
        assert_eq!(letter["error"]["type"], error_type);
        assert_eq!(letter["data"], data);
        assert_eq!(letter["streamArn"], TEST_STREAM_ARN);
        assert_eq!(letter["shardId"], "shardId-000000000000");
        assert_eq!(letter["functionName"], "fraud");
        assert_eq!(letter["dataTruncated"], false);
        assert!(letter["approximateArrivalTimestamp"].as_f64().unwrap() > 1.7e9);
        assert!(letter["attempts"].is_number());
    }
    assert!(
        letters[2]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at `id`")
    );
}

#[tokio::test]
async fn a_missing_queue_hands_poison_records_back_to_lambda() {
    let Some(config) = moto_config().await else {
        return;
    };
    let missing = format!("{}-missing", create_queue(&config, "gone").await);
    let sink = SqsDeadLetterSink::new(aws_sdk_sqs::Client::new(&config), missing);
    let processor = Processor::per_record(Mixed, sink).retry(ExponentialBackoff::none());
    let event = event_json(&[
        plain("k", &sequence_number(1), br#"{"id":1}"#),
        plain("k", &sequence_number(2), br#"{"id":2,"kind":"poison"}"#),
    ]);
    let report = processor
        .process(event.as_bytes(), &Invocation::unbounded("r"))
        .await
        .unwrap();
    assert_eq!(report.counts.dead_lettered, 0);
    assert_eq!(
        report.response.batch_item_failures[0].item_identifier,
        sequence_number(2)
    );
}

#[tokio::test]
async fn an_oversize_payload_is_dead_lettered_without_data() {
    let Some(config) = moto_config().await else {
        return;
    };
    let queue_url = create_queue(&config, "dlq-big").await;
    let sink = SqsDeadLetterSink::new(aws_sdk_sqs::Client::new(&config), &queue_url);
    let processor = Processor::per_record(Mixed, sink);
    let big = format!(
        r#"{{"id":9,"kind":"poison","pad":"{}"}}"#,
        "x".repeat(300 * 1024)
    );
    let event = event_json(&[plain("k", &sequence_number(9), big.as_bytes())]);
    let report = processor
        .process(event.as_bytes(), &Invocation::unbounded("r"))
        .await
        .unwrap();
    assert!(report.response.batch_item_failures.is_empty());
    let bodies = drain_queue(&config, &queue_url).await;
    assert_eq!(bodies.len(), 1);
    let letter: serde_json::Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(letter["dataTruncated"], true);
    assert!(letter.get("data").is_none());
    assert_eq!(letter["sequenceNumber"], sequence_number(9));
}
