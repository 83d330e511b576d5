//! Test support: AWS SDK configuration for the moto server that `make test` starts.
//!
//! Integration tests call [`moto_config`]. When `SHARDWISE_MOTO_ENDPOINT` is unset the test is
//! skipped with a note (plain `cargo test` on a laptop), unless `SHARDWISE_REQUIRE_MOTO=1`
//! (set by `make test` and CI), where a missing emulator fails the test instead of passing it
//! silently. This crate, unlike the library, reads the environment: it is only for tests.

use std::sync::atomic::{AtomicU32, Ordering};

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};

/// SDK configuration pointing at moto, or `None` when the test should be skipped.
///
/// # Panics
/// When `SHARDWISE_REQUIRE_MOTO=1` and no endpoint is set: the run asked for integration tests.
#[allow(clippy::panic)]
pub async fn moto_config() -> Option<SdkConfig> {
    let endpoint = match std::env::var("SHARDWISE_MOTO_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => endpoint,
        _ => {
            if std::env::var("SHARDWISE_REQUIRE_MOTO").is_ok_and(|v| v == "1") {
                panic!(
                    "SHARDWISE_REQUIRE_MOTO=1 but SHARDWISE_MOTO_ENDPOINT is not set: run `make test`"
                );
            }
            eprintln!(
                "skipped: SHARDWISE_MOTO_ENDPOINT is not set (run `make test` to start moto)"
            );
            return None;
        }
    };
    Some(
        aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "test",
                "test",
                None,
                None,
                "shardwise-testkit",
            ))
            // moto answers some calls with 5xx; tests want to see that, not wait through retries.
            .retry_config(RetryConfig::standard().with_max_attempts(2))
            .load()
            .await,
    )
}

/// A resource name unique to this test process and call, so tests share one moto server.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Create an SQS queue with a unique name; returns its URL.
///
/// # Panics
/// When moto refuses: the test cannot go on.
#[allow(clippy::expect_used)]
pub async fn create_queue(config: &SdkConfig, prefix: &str) -> String {
    let client = aws_sdk_sqs::Client::new(config);
    let out = client
        .create_queue()
        .queue_name(unique_name(prefix))
        .send()
        .await
        .expect("create SQS queue on moto");
    out.queue_url().expect("queue url").to_owned()
}

/// Receive every message currently in `queue_url` (deleting none), bodies only.
///
/// # Panics
/// When moto refuses.
#[allow(clippy::expect_used)]
pub async fn drain_queue(config: &SdkConfig, queue_url: &str) -> Vec<String> {
    let client = aws_sdk_sqs::Client::new(config);
    let mut bodies = Vec::new();
    loop {
        let out = client
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .visibility_timeout(300)
            .send()
            .await
            .expect("receive from moto");
        let messages = out.messages();
        if messages.is_empty() {
            return bodies;
        }
        bodies.extend(messages.iter().filter_map(|m| m.body().map(str::to_owned)));
    }
}

/// The SDK configuration [`moto_config`] returns, for crates that do not depend on aws-config.
pub use aws_config::SdkConfig as MotoConfig;
/// Whether a key attribute is the partition (hash) key or the sort (range) key.
pub use aws_sdk_dynamodb::types::KeyType;

/// Create an on-demand DynamoDB table with a unique name whose key attributes are all strings:
/// `keys` is `[(partition_key, KeyType::Hash)]`, optionally followed by a sort key. Returns the
/// table name.
///
/// # Panics
/// When moto refuses: the test cannot go on.
#[allow(clippy::expect_used)]
pub async fn create_table(config: &SdkConfig, prefix: &str, keys: &[(&str, KeyType)]) -> String {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, ScalarAttributeType,
    };
    let client = aws_sdk_dynamodb::Client::new(config);
    let name = unique_name(prefix);
    let mut request = client
        .create_table()
        .table_name(&name)
        .billing_mode(BillingMode::PayPerRequest);
    for (attribute, key_type) in keys {
        request = request
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(*attribute)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .expect("attribute definition"),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(*attribute)
                    .key_type(key_type.clone())
                    .build()
                    .expect("key schema element"),
            );
    }
    request.send().await.expect("create DynamoDB table on moto");
    name
}
