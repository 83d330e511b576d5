//! The `canary` Lambda function's entry point: settings → clients → canary → runtime.
//! Everything else lives in the library (`canary::*`), where the tests exercise it.

// The runtime future nests the canary run, producer and SDK futures deeper than rustc's default
// layout query depth.
#![recursion_limit = "256"]

use std::process::ExitCode;

use canary::store::DynamoDbCanaryStore;
use canary::{Canary, CanarySettings};
use shardwise::clock::SystemClock;
use shardwise::metrics::StdoutMetrics;
use shardwise::producer::Producer;
use shardwise_aws::{KinesisStreamWriter, StreamTarget};
use shardwise_cards::start::{Backend, start};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("canary: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let (settings, backend) = start(CanarySettings::from_env, |s| &s.log_filter).await?;
    let Backend::Aws(sdk) = backend else {
        anyhow::bail!("the canary runs against AWS only (it is a scheduled function)");
    };
    let kinesis = aws_sdk_kinesis::Client::new(&sdk);
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let canary = Canary::new(
        Producer::new(KinesisStreamWriter::new(
            kinesis,
            StreamTarget::parse(&settings.stream_name),
        )),
        DynamoDbCanaryStore::new(dynamodb, &settings.canary_table),
        SystemClock,
        StdoutMetrics,
        &settings.metrics_namespace,
        settings.run.clone(),
    );
    canary::serve(canary)
        .await
        .map_err(|error| anyhow::anyhow!(error))
}
