//! The `fraud` Lambda function's entry point: settings → clients → processor → runtime.
//! Everything else lives in the library (`fraud::*`), where the tests exercise it.

// The runtime future nests the processor, bisecting handler and SDK futures deeper than rustc's
// default layout query depth.
#![recursion_limit = "256"]

use std::process::ExitCode;

use fraud::alert::SqsAlertSink;
use fraud::state::DynamoDbCardStateStore;
use fraud::{FraudHandler, FraudSettings};
use shardwise::SqsDeadLetterSink;
use shardwise::clock::SystemClock;
use shardwise::config::{Env, ProcessEnv, check_lambda_environment};
use shardwise::telemetry::{self, LogFormat};
use shardwise::transaction::DynamoDbCanaryAckStore;

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

    let sdk = shardwise::aws::sdk_config(None).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let handler = FraudHandler::new(
        DynamoDbCardStateStore::new(
            dynamodb.clone(),
            &settings.card_state_table,
            settings.card_state_ttl_seconds,
        ),
        SqsAlertSink::new(sqs.clone(), &settings.alerts_queue_url),
        DynamoDbCanaryAckStore::new(dynamodb, &settings.canary_table),
        SystemClock,
        settings.rules.clone(),
    );
    let processor = fraud::processor(
        handler,
        SqsDeadLetterSink::new(sqs, &settings.common.dead_letter_queue_url),
        &settings.common,
    );
    shardwise::runtime::run(processor, SystemClock, &settings.common.metrics_namespace)
        .await
        .map_err(|error| anyhow::anyhow!(error))
}
