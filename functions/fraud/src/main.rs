//! The `fraud` Lambda function's entry point: settings → clients → processor → runtime.
//! Everything else lives in the library (`fraud::*`), where the tests exercise it.
//!
//! Backends: DynamoDB and SQS (the default), or — with `SHARDWISE_BACKEND=local` and
//! `SHARDWISE_LOCAL_DB`, in a build with the `local` feature — the local runner's SQLite file
//! (`shardwise_cards::start`).

// The runtime future nests the processor, bisecting handler and SDK futures deeper than rustc's
// default layout query depth.
#![recursion_limit = "256"]

use std::process::ExitCode;

use fraud::alert::{AlertSink, SqsAlertSink};
use fraud::model::{DynamoDbModelStore, ModelStore};
use fraud::state::{CardStateStore, DynamoDbCardStateStore};
use fraud::{FraudHandler, FraudSettings};
use shardwise::clock::SystemClock;
use shardwise::dead_letter::DeadLetterSink;
use shardwise_aws::SqsDeadLetterSink;
use shardwise_cards::canary::{CanaryAckStore, DynamoDbCanaryAckStore};
use shardwise_cards::start::{Backend, start};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fraud: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let (settings, backend) = start(FraudSettings::from_env, |s| &s.common.log_filter).await?;
    match backend {
        Backend::Aws(sdk) => {
            let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
            let sqs = aws_sdk_sqs::Client::new(&sdk);
            serve(
                DynamoDbCardStateStore::new(
                    dynamodb.clone(),
                    &settings.card_state_table,
                    settings.card_state_ttl_seconds,
                ),
                DynamoDbModelStore::new(
                    dynamodb.clone(),
                    &settings.card_state_table,
                    settings.card_state_ttl_seconds,
                ),
                SqsAlertSink::new(sqs.clone(), &settings.alerts_queue_url),
                DynamoDbCanaryAckStore::new(dynamodb, &settings.canary_table),
                SqsDeadLetterSink::new(sqs, &settings.common.dead_letter_queue_url),
                &settings,
            )
            .await
        }
        Backend::Local { path } => serve_local(&path, &settings).await,
        other => anyhow::bail!("fraud has no stores for the backend {other:?}"),
    }
}

#[cfg(feature = "local")]
async fn serve_local(path: &std::path::Path, settings: &FraudSettings) -> anyhow::Result<()> {
    use fraud::local::{SqliteAlertSink, SqliteCardStateStore, SqliteModelStore};
    use shardwise_cards::canary::SqliteCanaryAckStore;
    use shardwise_sqlite::{LocalDb, SqliteQueue, queues};
    let db = std::sync::Arc::new(LocalDb::open(path)?);
    serve(
        SqliteCardStateStore::new(db.clone(), settings.card_state_ttl_seconds),
        SqliteModelStore::new(db.clone(), settings.card_state_ttl_seconds),
        SqliteAlertSink::new(db.clone()),
        SqliteCanaryAckStore::new(db.clone()),
        SqliteQueue::new(db, queues::DEAD_LETTERS),
        settings,
    )
    .await
}

#[cfg(not(feature = "local"))]
async fn serve_local(_: &std::path::Path, _: &FraudSettings) -> anyhow::Result<()> {
    Err(shardwise_cards::start::StartError::LocalNotBuilt.into())
}

async fn serve(
    store: impl CardStateStore,
    models: impl ModelStore,
    alerts: impl AlertSink,
    canaries: impl CanaryAckStore,
    dead_letters: impl DeadLetterSink,
    settings: &FraudSettings,
) -> anyhow::Result<()> {
    let handler = FraudHandler::new(store, alerts, canaries, SystemClock, settings.rules.clone())
        .with_model_store(models);
    let processor = fraud::processor(handler, dead_letters, &settings.common);
    shardwise::run(processor)
        .await
        .map_err(|error| anyhow::anyhow!(error))
}
