//! Structured logs for CloudWatch.
//!
//! JSON lines on stdout, one per event, with the current span's fields (the Lambda runtime's span
//! carries the request id; ours add shard and sequence number). Payload bytes are never logged:
//! they may hold card data.

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// JSON for CloudWatch Logs Insights.
    Json,
    /// Human-readable, for terminals.
    Text,
}

/// Install the global subscriber. `filter` is a `RUST_LOG`-style directive (`info`,
/// `shardwise=debug`); an invalid one falls back to `info` rather than failing start-up.
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    // A second initialisation (tests, tools) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.compact().with_writer(std::io::stderr).try_init(),
    };
}
