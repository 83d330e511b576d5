//! Rows 31 and 32 of the bad-input catalogue (docs/bad-input.md): the AWS adapters against an
//! endpoint nothing listens on. The record is handed back to Lambda, never acknowledged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde::Deserialize;
use shardwise::idempotency::Idempotency;
use shardwise::processor::Outcome;
use shardwise::response::BatchResponse;
use shardwise::retry::ExponentialBackoff;
use shardwise::testing::{event_json, plain, raw_data, sequence_number};
use shardwise::{
    HandlerError, InMemoryDeadLetterSink, Invocation, Json, Processor, Record, RecordHandler,
};
use shardwise_aws::{DynamoDbIdempotencyStore, SqsDeadLetterSink};

#[derive(Debug, Deserialize)]
struct Transaction<'a> {
    #[allow(dead_code)]
    card_id: &'a str,
    #[allow(dead_code)]
    amount: f64,
}

struct Accept;

impl<'d> RecordHandler<'d> for Accept {
    type Payload = Json<Transaction<'d>>;

    async fn handle(&self, _: &Record<'d>, _: &Json<Transaction<'d>>) -> Result<(), HandlerError> {
        Ok(())
    }
}

const GOOD: &[u8] = br#"{"card_id":"c-1","amount":12.5}"#;

fn processor() -> Processor<shardwise::processor::PerRecord<Accept>, InMemoryDeadLetterSink> {
    Processor::per_record(Accept, InMemoryDeadLetterSink::new()).retry(ExponentialBackoff::none())
}

// ---------------------------------------------------------------------------------------------
// Unreachable endpoints

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn unreachable_sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(format!("http://127.0.0.1:{}", closed_port()))
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test",
            "test",
            None,
            None,
            "bad-input",
        ))
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_timeout(Duration::from_secs(5))
                .build(),
        )
        .load()
        .await
}

#[tokio::test]
async fn row_31_unreachable_dead_letter_queue_hands_the_record_back() {
    let config = unreachable_sdk_config().await;
    let sink = SqsDeadLetterSink::new(
        aws_sdk_sqs::Client::new(&config),
        "http://127.0.0.1/123456789012/dlq",
    );
    let p = Processor::per_record(Accept, sink).retry(ExponentialBackoff::none());
    let event = event_json(&[
        plain("k", &sequence_number(1), GOOD),
        plain("k", &sequence_number(2), b"not json"),
        plain("j", &sequence_number(3), GOOD),
    ]);
    let report = p
        .process(event.as_bytes(), &Invocation::unbounded("req"))
        .await
        .unwrap();
    // Not acknowledged: Lambda redelivers from the record that could not be dead-lettered.
    assert_eq!(
        report.response,
        BatchResponse::redeliver_from(&sequence_number(2))
    );
    let Outcome::Retryable { reason, .. } = &report.outcomes[1] else {
        panic!("{:?}", report.outcomes[1]);
    };
    assert!(
        reason.starts_with(
            "DeadLetterFailed: dead-letter queue did not accept the message after 1 attempt: dead-letter queue call failed: dispatch failure"
        ),
        "{reason}"
    );
}

#[tokio::test]
async fn row_32_unreachable_idempotency_table_hands_the_batch_back() {
    let config = unreachable_sdk_config().await;
    let store =
        DynamoDbIdempotencyStore::new(aws_sdk_dynamodb::Client::new(&config), "idempotency");
    let gate = Idempotency::new(store).retry(ExponentialBackoff::none());
    let p = processor().gate(gate);
    let event = event_json(&[
        plain("k", &sequence_number(1), GOOD),
        plain("j", &sequence_number(2), GOOD),
        raw_data("i", &sequence_number(3), "%%%"),
    ]);
    let report = p
        .process(event.as_bytes(), &Invocation::unbounded("req"))
        .await
        .unwrap();
    assert_eq!(
        report.response,
        BatchResponse::redeliver_from(&sequence_number(1))
    );
    assert_eq!(report.handler_calls, 0);
    for outcome in &report.outcomes {
        let Outcome::Retryable { reason, .. } = outcome else {
            panic!("{outcome:?}");
        };
        assert!(
            reason.starts_with("IdempotencyStoreUnavailable: idempotency store unavailable: "),
            "{reason}"
        );
    }
    // Not even the record that does not decode is dead-lettered unrecorded: it waits for the
    // table like the others.
    assert!(p.dead_letter_sink().bodies().is_empty());
}
