//! What every example function does before it serves: settings, the Lambda environment check,
//! logging, and the backend its stores and queues live in.
//!
//! The backend is chosen explicitly, by `SHARDWISE_BACKEND`: `aws` (the default) builds the SDK
//! configuration once for every client; `local` names the local runner's SQLite file
//! (`SHARDWISE_LOCAL_DB`), which a function opens only in a build with its own `local` feature
//! (the Lambda builds leave SQLite out, and refuse `local` with [`StartError::LocalNotBuilt`]).
//! An unreachable AWS never falls back to a local file.

use std::path::PathBuf;

use shardwise::config::{ConfigError, Env, EnvSource, ProcessEnv, check_lambda_environment};
use shardwise::telemetry::{self, LogFormat};

/// Where a function's stores and queues are.
#[derive(Debug)]
#[non_exhaustive]
pub enum Backend {
    /// DynamoDB, SQS and Kinesis through this SDK configuration (Lambda, moto). Boxed: it is
    /// large, and read once.
    Aws(Box<aws_config::SdkConfig>),
    /// The local runner's SQLite file (`shardwise_sqlite::LocalDb::open`).
    Local { path: PathBuf },
}

/// Why a function could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "SHARDWISE_BACKEND=local needs the local backends: build with `--features local` \
         (the Lambda build leaves them out)"
    )]
    LocalNotBuilt,
}

/// What `SHARDWISE_BACKEND` (and, for `local`, `SHARDWISE_LOCAL_DB`) ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendKind {
    Aws,
    Local { path: PathBuf },
}

impl BackendKind {
    /// `SHARDWISE_BACKEND` = `aws` (default) | `local`; `local` requires `SHARDWISE_LOCAL_DB`.
    pub fn from_env(env: &Env<impl EnvSource>) -> Result<Self, ConfigError> {
        match env.string_or("SHARDWISE_BACKEND", "aws").as_str() {
            "aws" => Ok(Self::Aws),
            "local" => Ok(Self::Local {
                path: PathBuf::from(env.required(
                    "SHARDWISE_LOCAL_DB",
                    "the SQLite file of the local backends (SHARDWISE_BACKEND=local)",
                )?),
            }),
            other => Err(ConfigError::Invalid {
                name: "SHARDWISE_BACKEND".to_owned(),
                value: other.to_owned(),
                expected: "aws or local".to_owned(),
            }),
        }
    }
}

/// Read the function's settings with `settings`, check that the Lambda Runtime API variables
/// are there, start JSON logging at the filter `log_filter` picks, and pick the backend.
pub async fn start<S>(
    settings: impl FnOnce(&Env<ProcessEnv>) -> Result<S, ConfigError>,
    log_filter: impl FnOnce(&S) -> &str,
) -> Result<(S, Backend), StartError> {
    let env = Env(ProcessEnv);
    let settings = settings(&env)?;
    check_lambda_environment(&env)?;
    let backend = BackendKind::from_env(&env)?;
    telemetry::init(LogFormat::Json, log_filter(&settings));
    let backend = match backend {
        BackendKind::Aws => Backend::Aws(Box::new(shardwise_aws::sdk_config(None).await)),
        BackendKind::Local { path } => Backend::Local { path },
    };
    Ok((settings, backend))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn the_backend_is_chosen_explicitly() {
        let env = Env(HashMap::<&str, &str>::new());
        assert_eq!(BackendKind::from_env(&env).unwrap(), BackendKind::Aws);
        let env = Env(HashMap::from([("SHARDWISE_BACKEND", "local")]));
        let err = BackendKind::from_env(&env).unwrap_err().to_string();
        assert!(err.contains("SHARDWISE_LOCAL_DB"), "{err}");
        let env = Env(HashMap::from([
            ("SHARDWISE_BACKEND", "local"),
            ("SHARDWISE_LOCAL_DB", "/tmp/x.db"),
        ]));
        assert_eq!(
            BackendKind::from_env(&env).unwrap(),
            BackendKind::Local {
                path: "/tmp/x.db".into()
            }
        );
        let env = Env(HashMap::from([("SHARDWISE_BACKEND", "sqlite")]));
        let err = BackendKind::from_env(&env).unwrap_err().to_string();
        assert!(err.contains("SHARDWISE_BACKEND=\"sqlite\""), "{err}");
    }
}
