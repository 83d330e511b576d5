//! The `fraud` Lambda function's entry point: settings → clients → processor → runtime.
//! Everything else lives in the library (`fraud::*`), where the tests exercise it.
//!
//! Backends: DynamoDB and SQS (the default), or — with `SHARDWISE_BACKEND=local` and
//! `SHARDWISE_LOCAL_DB`, in a build with the `local` feature — the local runner's SQLite file.
//! The choice is explicit: an unreachable AWS never falls back to a local file.

// The runtime future nests the processor, bisecting handler and SDK futures deeper than rustc's
// default layout query depth.
#![recursion_limit = "256"]

use std::process::ExitCode;

use fraud::alert::{AlertSink, SqsAlertSink};
use fraud::state::{CardStateStore, DynamoDbCardStateStore};
use fraud::{FraudHandler, FraudSettings};
use shardwise::SqsDeadLetterSink;
use shardwise::clock::SystemClock;
use shardwise::config::{Env, EnvSource, ProcessEnv, check_lambda_environment};
use shardwise::dead_letter::DeadLetterSink;
use shardwise::telemetry::{self, LogFormat};
use shardwise::transaction::{CanaryAckStore, DynamoDbCanaryAckStore};

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
    let env = Env(ProcessEnv);
    let settings = FraudSettings::from_env(&env)?;
    check_lambda_environment(&env)?;
    telemetry::init(LogFormat::Json, &settings.common.log_filter);

    if env.string_or("SHARDWISE_BACKEND", "aws") != "aws" {
        return run_local(&env, &settings).await;
    }
    let sdk = shardwise::aws::sdk_config(None).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    serve(
        DynamoDbCardStateStore::new(
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

async fn serve(
    store: impl CardStateStore,
    alerts: impl AlertSink,
    canaries: impl CanaryAckStore,
    dead_letters: impl DeadLetterSink,
    settings: &FraudSettings,
) -> anyhow::Result<()> {
    let handler = FraudHandler::new(store, alerts, canaries, SystemClock, settings.rules.clone());
    let processor = fraud::processor(handler, dead_letters, &settings.common);
    shardwise::runtime::run(processor, SystemClock, &settings.common.metrics_namespace)
        .await
        .map_err(|error| anyhow::anyhow!(error))
}

#[cfg(feature = "local")]
async fn run_local(env: &Env<impl EnvSource>, settings: &FraudSettings) -> anyhow::Result<()> {
    use std::sync::Arc;

    use fraud::local::{SqliteAlertSink, SqliteCardStateStore};
    use shardwise::local::{Backend, LocalDb, SqliteCanaryAckStore, SqliteQueue, queues};

    let Backend::Local { path } = Backend::from_env(env)? else {
        anyhow::bail!("SHARDWISE_BACKEND must be aws or local");
    };
    let db = Arc::new(LocalDb::open(&path)?);
    serve(
        SqliteCardStateStore::new(db.clone(), settings.card_state_ttl_seconds),
        SqliteAlertSink::new(db.clone()),
        SqliteCanaryAckStore::new(db.clone()),
        SqliteQueue::new(db, queues::DEAD_LETTERS),
        settings,
    )
    .await
}

#[cfg(not(feature = "local"))]
async fn run_local(env: &Env<impl EnvSource>, _: &FraudSettings) -> anyhow::Result<()> {
    anyhow::bail!(
        "SHARDWISE_BACKEND={} needs the local backends: build with `--features local` \
         (the Lambda build leaves them out)",
        env.string_or("SHARDWISE_BACKEND", "aws")
    )
}
