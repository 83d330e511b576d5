//! AWS adapters for Shardwise: the SDK implementations of the core crate's ports.
//!
//! The core crate (`shardwise`) defines small traits for everything that leaves the process and
//! links no AWS SDK, so a function that only needs the processor builds without one. This crate
//! is the other half, one module per service:
//!
//! | here | implements | what for |
//! |---|---|---|
//! | [`SqsDeadLetterSink`] | `shardwise::dead_letter::DeadLetterSink` | dead letters, with payload, to SQS |
//! | [`DynamoDbIdempotencyStore`] | `shardwise::idempotency::IdempotencyStore` | the idempotency table |
//! | [`KinesisStreamWriter`] | `shardwise::producer::StreamWriter` | `PutRecords` on a stream |
//! | [`dynamodb`] | — | batched consistent reads for stores built on Shardwise |
//! | [`retryable`] | — | which AWS error codes are worth retrying, once for every client |
//! | [`sdk_config`] | — | the one place the SDK configuration is built |
//!
//! The embedded (SQLite) backends of the local runner are a crate of their own
//! (`shardwise-sqlite`) and implement the same traits.

/// The README's "Writing a function", compiled so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

pub mod dynamodb;
mod idempotency;
mod kinesis;
pub mod retryable;
mod sqs;

pub use idempotency::DynamoDbIdempotencyStore;
pub use kinesis::{KinesisStreamWriter, StreamTarget};
pub use sqs::SqsDeadLetterSink;

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};

/// Connecting to an in-region endpoint takes milliseconds; past this the endpoint is down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One attempt of one call (a `BatchWriteItem` of 25, a `SendMessageBatch` of 10, a
/// `PutRecords` of 500 answer in tens of milliseconds).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// One call with the SDK's own retries.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(8);

/// The SDK sets no timeout by default, so an unreachable endpoint holds a call for as long as
/// the OS lets a connection hang: an invocation would run past its deadline and its effects be
/// repeated. The processor also bounds every call by the invocation's deadline; these bound one
/// call whatever its caller.
fn timeouts() -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build()
}

/// Load the SDK configuration, optionally pointing every client at `endpoint_url`.
///
/// The SDK resolves region, credentials and endpoint itself, honouring `AWS_ENDPOINT_URL` (and
/// per-service `AWS_ENDPOINT_URL_SQS`, …), which is how the same binaries talk to moto or the
/// local runner's endpoints. An explicit endpoint, when given, wins.
pub async fn sdk_config(endpoint_url: Option<&str>) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(timeouts());
    if let Some(endpoint) = endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}
