//! The `aggregation` Lambda function: configuration, clients and the window processor, wired.
//! What it does is in the library (`aggregation::Aggregation`).
//!
//! Backends: DynamoDB and SQS (the default), or — with `SHARDWISE_BACKEND=local` and
//! `SHARDWISE_LOCAL_DB`, in a build with the `local` feature — the local runner's SQLite file.
//! The choice is explicit: an unreachable AWS never falls back to a local file.

// The future of the Lambda loop around the window processor and the SDK clients is nested deeper
// than the compiler's default query depth (128) allows when laying it out.
#![recursion_limit = "256"]

use aggregation::store::{AggregateStore, CanaryAcks, DynamoDbAggregateStore, DynamoDbCanaryAcks};
use aggregation::{Aggregation, AggregationSettings, CONSUMER};
use anyhow::Context;
use shardwise::SqsDeadLetterSink;
use shardwise::clock::SystemClock;
use shardwise::config::{CommonSettings, Env, EnvSource, ProcessEnv, check_lambda_environment};
use shardwise::dead_letter::DeadLetterSink;
use shardwise::telemetry::{self, LogFormat};
use shardwise::window::{WindowConfig, WindowProcessor};

// One thread: the work is waiting on DynamoDB and SQS, and Lambda gives 1–2 vCPUs; a
// multi-threaded runtime would only add start-up time.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let env = Env(ProcessEnv);
    check_lambda_environment(&env)?;
    let common = CommonSettings::from_env(&env)?;
    let settings = AggregationSettings::from_env(&env)?;
    telemetry::init(LogFormat::Json, &common.log_filter);

    if env.string_or("SHARDWISE_BACKEND", "aws") != "aws" {
        return run_local(&env, &common, &settings).await;
    }
    let sdk = shardwise::aws::sdk_config(None).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    serve(
        DynamoDbAggregateStore::new(dynamodb.clone(), &settings.aggregates_table),
        DynamoDbCanaryAcks::new(
            dynamodb,
            &settings.canary_table,
            CONSUMER,
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

async fn serve(
    aggregates: impl AggregateStore,
    canary: impl CanaryAcks,
    dead_letters: impl DeadLetterSink,
    common: &CommonSettings,
    settings: &AggregationSettings,
) -> anyhow::Result<()> {
    let processor = WindowProcessor::new(Aggregation::new(aggregates, canary), dead_letters)
        .records(|records| records.config(common.processor_config()))
        .window_config(WindowConfig {
            state_limit_bytes: settings.state_limit_bytes,
        });
    shardwise::runtime::run_window(processor, SystemClock, &common.metrics_namespace)
        .await
        .map_err(|error| anyhow::anyhow!(error))
        .context("the Lambda runtime stopped")
}

#[cfg(feature = "local")]
async fn run_local(
    env: &Env<impl EnvSource>,
    common: &CommonSettings,
    settings: &AggregationSettings,
) -> anyhow::Result<()> {
    use std::sync::Arc;

    use aggregation::store::{SqliteAggregateStore, SqliteCanaryAcks};
    use shardwise::local::{Backend, LocalDb, SqliteQueue, queues};

    let Backend::Local { path } = Backend::from_env(env)? else {
        anyhow::bail!("SHARDWISE_BACKEND must be aws or local");
    };
    let db = Arc::new(LocalDb::open(&path)?);
    serve(
        SqliteAggregateStore::new(db.clone()),
        SqliteCanaryAcks::new(db.clone(), CONSUMER),
        SqliteQueue::new(db, queues::DEAD_LETTERS),
        common,
        settings,
    )
    .await
}

#[cfg(not(feature = "local"))]
async fn run_local(
    env: &Env<impl EnvSource>,
    _: &CommonSettings,
    _: &AggregationSettings,
) -> anyhow::Result<()> {
    anyhow::bail!(
        "SHARDWISE_BACKEND={} needs the local backends: build with `--features local` \
         (the Lambda build leaves them out)",
        env.string_or("SHARDWISE_BACKEND", "aws")
    )
}
