//! The `aggregation` Lambda function: configuration, clients and the window processor, wired.
//! What it does is in the library (`aggregation::Aggregation`).
//!
//! Backends: DynamoDB and SQS (the default), or — with `SHARDWISE_BACKEND=local` and
//! `SHARDWISE_LOCAL_DB`, in a build with the `local` feature — the local runner's SQLite file
//! (`shardwise_cards::start`).

// The future of the Lambda loop around the window processor and the SDK clients is nested deeper
// than the compiler's default query depth (128) allows when laying it out.
#![recursion_limit = "256"]

use aggregation::store::{AggregateStore, DynamoDbAggregateStore};
use aggregation::{Aggregation, AggregationSettings};
use anyhow::Context;
use shardwise::config::CommonSettings;
use shardwise::dead_letter::DeadLetterSink;
use shardwise::window::{WindowConfig, WindowProcessor};
use shardwise_aws::SqsDeadLetterSink;
use shardwise_cards::canary::{CanaryAckStore, DynamoDbCanaryAckStore};
use shardwise_cards::start::{Backend, start};

// One thread: the work is waiting on DynamoDB and SQS, and Lambda gives 1–2 vCPUs; a
// multi-threaded runtime would only add start-up time.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let ((common, settings), backend) = start(
        |env| {
            Ok((
                CommonSettings::from_env(env)?,
                AggregationSettings::from_env(env)?,
            ))
        },
        |(common, _)| &common.log_filter,
    )
    .await?;
    match backend {
        Backend::Aws(sdk) => {
            let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
            serve(
                DynamoDbAggregateStore::new(dynamodb.clone(), &settings.aggregates_table),
                DynamoDbCanaryAckStore::new(dynamodb, &settings.canary_table).ttl_seconds(
                    i64::try_from(settings.canary_ack_ttl.as_secs()).unwrap_or(i64::MAX),
                ),
                SqsDeadLetterSink::new(
                    aws_sdk_sqs::Client::new(&sdk),
                    &common.dead_letter_queue_url,
                ),
                &common,
                &settings,
            )
            .await
        }
        Backend::Local { path } => serve_local(&path, &common, &settings).await,
        other => anyhow::bail!("aggregation has no stores for the backend {other:?}"),
    }
}

#[cfg(feature = "local")]
async fn serve_local(
    path: &std::path::Path,
    common: &CommonSettings,
    settings: &AggregationSettings,
) -> anyhow::Result<()> {
    use aggregation::store::SqliteAggregateStore;
    use shardwise_cards::canary::SqliteCanaryAckStore;
    use shardwise_sqlite::{LocalDb, SqliteQueue, queues};
    let db = std::sync::Arc::new(LocalDb::open(path)?);
    serve(
        SqliteAggregateStore::new(db.clone()),
        SqliteCanaryAckStore::new(db.clone()),
        SqliteQueue::new(db, queues::DEAD_LETTERS),
        common,
        settings,
    )
    .await
}

#[cfg(not(feature = "local"))]
async fn serve_local(
    _: &std::path::Path,
    _: &CommonSettings,
    _: &AggregationSettings,
) -> anyhow::Result<()> {
    Err(shardwise_cards::start::StartError::LocalNotBuilt.into())
}

async fn serve(
    aggregates: impl AggregateStore,
    canary: impl CanaryAckStore,
    dead_letters: impl DeadLetterSink,
    common: &CommonSettings,
    settings: &AggregationSettings,
) -> anyhow::Result<()> {
    let processor = WindowProcessor::new(Aggregation::new(aggregates, canary), dead_letters)
        .records(|records| records.config(common.processor_config()))
        .window_config(WindowConfig {
            state_limit_bytes: settings.state_limit_bytes,
        });
    shardwise::run(processor)
        .await
        .map_err(|error| anyhow::anyhow!(error))
        .context("the Lambda runtime stopped")
}
