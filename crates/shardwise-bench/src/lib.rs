//! The real-bootstrap benchmark: three Lambda bootstrap binaries and the driver that runs them
//! against the local runner's Runtime API server (`benches/bootstrap.rs`, whose docs say what is
//! measured and how).
//!
//! - `src/bin/usual.rs`: `lambda_runtime` + `aws_lambda_events`, an owned payload;
//! - `src/bin/lean.rs`: `shardwise::run`, a payload of two borrowed fields;
//! - `src/bin/borrowed.rs`: `shardwise::run`, a payload that borrows all 25 fields;
//!
//! The payload types are `shardwise_cards::generator::{FullTransaction, FullTransactionRef}`,
//! the same the library bench (`crates/shardwise/benches/pipeline.rs`) uses. Both model the
//! whole ~1 KiB card transaction that `shardwise_cards::generator::card_transaction` writes (25 fields, nested objects): `FullTransaction` owned, as a handler written against
//! `aws_lambda_events` declares it (the struct of `crates/shardwise/benches/pipeline.rs`);
//! `FullTransactionRef` borrowing every string from the decoded record data, which is what a
//! Shardwise handler can do because the record data outlives the handler call.

use shardwise::{Processor, ProcessorConfig, RecordHandler};

/// What both Shardwise bootstraps' `main` does, as a real function's does: SDK configuration and
/// SQS client at start (no call is made: nothing is dead-lettered), then `shardwise::run`.
pub async fn serve<H>(handler: H) -> anyhow::Result<()>
where
    H: for<'d> RecordHandler<'d>,
{
    let sdk = shardwise_aws::sdk_config(None).await;
    let queue_url = std::env::var("DEAD_LETTER_QUEUE_URL")?;
    let dead_letters =
        shardwise_aws::SqsDeadLetterSink::new(aws_sdk_sqs::Client::new(&sdk), queue_url);
    let processor = Processor::per_record(handler, dead_letters).config(ProcessorConfig {
        metrics_namespace: "Bench".to_owned(),
        ..ProcessorConfig::default()
    });
    Ok(shardwise::run(processor).await?)
}
