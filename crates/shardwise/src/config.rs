//! Settings from the environment, read through an injected source.
//!
//! Binaries pass [`ProcessEnv`]; tests pass a map. Nothing in the library reads the process
//! environment on its own, so a test never depends on the machine it runs on. A missing or
//! malformed variable is an error that names it, raised at start-up, not at the first record.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

/// Where variables come from.
pub trait EnvSource {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl EnvSource for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl EnvSource for HashMap<&str, &str> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).map(|v| (*v).to_owned())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("environment variable {name} is required ({purpose}) but is not set")]
    Missing { name: String, purpose: String },
    #[error("environment variable {name}={value:?} is not valid: expected {expected}")]
    Invalid {
        name: String,
        value: String,
        expected: String,
    },
}

/// Typed access to variables.
#[derive(Debug, Clone, Copy)]
pub struct Env<E>(pub E);

impl<E: EnvSource> Env<E> {
    /// A variable that must be set and non-empty.
    pub fn required(&self, name: &str, purpose: &str) -> Result<String, ConfigError> {
        match self.0.var(name) {
            Some(value) if !value.trim().is_empty() => Ok(value),
            _ => Err(ConfigError::Missing {
                name: name.to_owned(),
                purpose: purpose.to_owned(),
            }),
        }
    }

    /// A string variable with a default for unset or empty.
    pub fn string_or(&self, name: &str, default: &str) -> String {
        self.0
            .var(name)
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| default.to_owned())
    }

    /// A parsed variable with a default for unset or empty.
    pub fn parse_or<T: FromStr>(
        &self,
        name: &str,
        default: T,
        expected: &str,
    ) -> Result<T, ConfigError> {
        match self.0.var(name) {
            None => Ok(default),
            Some(value) if value.trim().is_empty() => Ok(default),
            Some(value) => value.trim().parse().map_err(|_| ConfigError::Invalid {
                name: name.to_owned(),
                value,
                expected: expected.to_owned(),
            }),
        }
    }
}

/// The settings every Shardwise function shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommonSettings {
    /// `AWS_LAMBDA_FUNCTION_NAME`, set by Lambda (default `shardwise` outside Lambda).
    pub function_name: String,
    /// `DEAD_LETTER_QUEUE_URL`: the SQS queue for dead letters with payloads.
    pub dead_letter_queue_url: String,
    /// `SHARDWISE_METRICS_NAMESPACE`, default `Shardwise`.
    pub metrics_namespace: String,
    /// `SHARDWISE_MAX_CONCURRENCY`, default 8 partition keys at once.
    pub max_concurrency: usize,
    /// `SHARDWISE_DEADLINE_MARGIN_MS`, default 1000.
    pub deadline_margin: Duration,
    /// `RUST_LOG`, default `info`.
    pub log_filter: String,
}

impl CommonSettings {
    pub fn from_env(env: &Env<impl EnvSource>) -> Result<Self, ConfigError> {
        let max_concurrency =
            env.parse_or("SHARDWISE_MAX_CONCURRENCY", 8usize, "a whole number from 1")?;
        if max_concurrency == 0 {
            return Err(ConfigError::Invalid {
                name: "SHARDWISE_MAX_CONCURRENCY".to_owned(),
                value: "0".to_owned(),
                expected: "a whole number from 1".to_owned(),
            });
        }
        Ok(Self {
            function_name: env.string_or("AWS_LAMBDA_FUNCTION_NAME", "shardwise"),
            dead_letter_queue_url: env.required(
                "DEAD_LETTER_QUEUE_URL",
                "the SQS queue URL that receives records that cannot be processed",
            )?,
            metrics_namespace: env.string_or("SHARDWISE_METRICS_NAMESPACE", "Shardwise"),
            max_concurrency,
            deadline_margin: Duration::from_millis(env.parse_or(
                "SHARDWISE_DEADLINE_MARGIN_MS",
                1000u64,
                "milliseconds, a whole number",
            )?),
            log_filter: env.string_or("RUST_LOG", "info"),
        })
    }

    /// The processor settings these imply.
    pub fn processor_config(&self) -> crate::processor::ProcessorConfig {
        crate::processor::ProcessorConfig {
            function_name: self.function_name.clone(),
            max_concurrency: self.max_concurrency,
            deadline_margin: self.deadline_margin,
            metrics_namespace: self.metrics_namespace.clone(),
        }
    }
}

/// The variables Lambda sets for every function: `shardwise::run` needs the Runtime API's
/// address, and `lambda_runtime` (which the scheduled canary runs on) panics without any of
/// them. Checked first, so a binary started outside Lambda says what is missing.
pub fn check_lambda_environment(env: &Env<impl EnvSource>) -> Result<(), ConfigError> {
    for name in [
        "AWS_LAMBDA_RUNTIME_API",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_FUNCTION_VERSION",
    ] {
        env.required(
            name,
            "set by Lambda, `cargo lambda watch` or the Shardwise local runner",
        )?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_malformed_variables_are_named() {
        let env = Env(HashMap::from([("SHARDWISE_MAX_CONCURRENCY", "lots")]));
        let err = CommonSettings::from_env(&env).unwrap_err();
        assert!(
            err.to_string()
                .contains("SHARDWISE_MAX_CONCURRENCY=\"lots\""),
            "{err}"
        );

        let env = Env(HashMap::<&str, &str>::new());
        let err = CommonSettings::from_env(&env).unwrap_err();
        assert!(err.to_string().contains("DEAD_LETTER_QUEUE_URL"), "{err}");

        let env = Env(HashMap::from([
            ("DEAD_LETTER_QUEUE_URL", "http://q"),
            ("SHARDWISE_MAX_CONCURRENCY", "0"),
        ]));
        assert!(CommonSettings::from_env(&env).is_err());
    }

    #[test]
    fn defaults_apply() {
        let env = Env(HashMap::from([("DEAD_LETTER_QUEUE_URL", "http://q")]));
        let s = CommonSettings::from_env(&env).unwrap();
        assert_eq!(s.max_concurrency, 8);
        assert_eq!(s.metrics_namespace, "Shardwise");
        assert_eq!(s.deadline_margin, Duration::from_millis(1000));
        assert!(
            check_lambda_environment(&env)
                .unwrap_err()
                .to_string()
                .contains("AWS_LAMBDA_RUNTIME_API")
        );
    }
}
