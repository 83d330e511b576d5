//! What every example function does before it serves: settings, the Lambda environment check,
//! logging, and the backend its stores and queues live in.
//!
//! The backend is chosen explicitly (`SHARDWISE_BACKEND`, read by `shardwise_sqlite::Backend`
//! in a build with the local backends): `aws` (the default) builds the SDK configuration once
//! for every client; `local` opens the local runner's SQLite file. An unreachable AWS never falls
//! back to a local file, and a Lambda build (without the `local` feature) refuses `local` with
//! a message that says how to build one that has it.

use shardwise::config::{ConfigError, Env, EnvSource, ProcessEnv, check_lambda_environment};
use shardwise::telemetry::{self, LogFormat};

/// Where a function's stores and queues are.
#[derive(Debug)]
#[non_exhaustive]
pub enum Backend {
    /// DynamoDB, SQS and Kinesis through this SDK configuration (Lambda, moto). Boxed: it is
    /// large, and read once.
    Aws(Box<aws_config::SdkConfig>),
    /// The local runner's SQLite file.
    #[cfg(feature = "local")]
    Local(std::sync::Arc<shardwise_sqlite::LocalDb>),
}

/// Why a function could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "SHARDWISE_BACKEND={0} needs the local backends: build with `--features local` \
         (the Lambda build leaves them out)"
    )]
    LocalNotBuilt(String),
    #[cfg(feature = "local")]
    #[error(transparent)]
    Local(#[from] shardwise_sqlite::LocalError),
}

/// Read the function's settings with `settings`, check that the Lambda Runtime API variables
/// are there, start JSON logging at the filter `log_filter` picks, and open the backend.
pub async fn start<S>(
    settings: impl FnOnce(&Env<ProcessEnv>) -> Result<S, ConfigError>,
    log_filter: impl FnOnce(&S) -> &str,
) -> Result<(S, Backend), StartError> {
    let env = Env(ProcessEnv);
    let settings = settings(&env)?;
    check_lambda_environment(&env)?;
    telemetry::init(LogFormat::Json, log_filter(&settings));
    let backend = backend(&env).await?;
    Ok((settings, backend))
}

#[cfg(feature = "local")]
async fn backend(env: &Env<impl EnvSource>) -> Result<Backend, StartError> {
    match shardwise_sqlite::Backend::from_env(env)? {
        shardwise_sqlite::Backend::Aws => Ok(Backend::Aws(Box::new(
            shardwise_aws::sdk_config(None).await,
        ))),
        shardwise_sqlite::Backend::Local { path } => Ok(Backend::Local(std::sync::Arc::new(
            shardwise_sqlite::LocalDb::open(path)?,
        ))),
    }
}

#[cfg(not(feature = "local"))]
async fn backend(env: &Env<impl EnvSource>) -> Result<Backend, StartError> {
    match env.string_or("SHARDWISE_BACKEND", "aws").as_str() {
        "aws" => Ok(Backend::Aws(Box::new(
            shardwise_aws::sdk_config(None).await,
        ))),
        other => Err(StartError::LocalNotBuilt(other.to_owned())),
    }
}
