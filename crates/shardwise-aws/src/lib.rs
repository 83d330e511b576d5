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

use aws_config::{BehaviorVersion, SdkConfig};

/// Load the SDK configuration, optionally pointing every client at `endpoint_url`.
///
/// The SDK resolves region, credentials and endpoint itself, honouring `AWS_ENDPOINT_URL` (and
/// per-service `AWS_ENDPOINT_URL_SQS`, …), which is how the same binaries talk to moto or the
/// local runner's endpoints. An explicit endpoint, when given, wins.
pub async fn sdk_config(endpoint_url: Option<&str>) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(endpoint) = endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}
