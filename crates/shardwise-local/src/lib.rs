//! The Shardwise local runner: Lambda's Kinesis event source mapping (ESM) played on one machine,
//! against the real function binaries, plus the producer tools and the capacity planner.
//!
//! - [`stream`]: where records come from — the embedded stream (a SQLite file, several shards,
//!   records placed by partition-key hash as Kinesis places them) or Kinesis through the SDK.
//! - [`function`]: the Lambda Runtime API, served by the runner, and the function processes it
//!   starts (one per instance), or a running `cargo lambda watch`.
//! - [`esm`]: the mapping itself — batching, lanes, retries, bisecting, partial batch responses,
//!   record age, on-failure records, tumbling windows, filters — with [`checkpoint`]s that
//!   survive a killed runner.
//! - [`settings`]: the mapping's settings, read from `template.yaml`.
//! - [`runner`] and [`view`]: a run, its live view and summary; [`dashboard`]: the same
//!   counters as a live page in a browser (`--dashboard`), and as JSON.
//! - [`tools`]: `put`, `replay`, `loadgen`; [`plan`]: shards, concurrency and cost.
//! - [`demo`]: `make demo` — fraud and aggregation under generated load, end to end;
//!   [`bench`]: `shardwise bench`, end-to-end throughput and latency of the embedded pipeline.
//! - [`filter`]: the mapping's event filters; [`stats`]: what the view and summary count;
//!   [`sandbox`]: the function processes a killed runner left behind, stopped by the next.
//! - [`cli`]: the subcommands, each with its own arguments and `run`.
//! - Binaries besides `shardwise`: `shardwise-test-function` (fails on command: the conformance
//!   and chaos suites' subject) and `runtime_api_echo` (echoes events through
//!   `shardwise::runtime_api`: that client's test against this runner and `cargo lambda watch`).
//!
//! Errors: each module has its own error type; only the binary (`main.rs`) uses `anyhow`.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod dashboard;
pub mod demo;
pub mod esm;
pub mod filter;
pub mod function;
pub mod plan;
pub mod runner;
pub mod sandbox;
pub mod settings;
pub mod stats;
pub mod stream;
pub mod tools;
pub mod view;

/// Wall-clock milliseconds since the epoch (the runner plays a service: it reads the clock).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// RFC 3339, UTC, milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    shardwise::time::Timestamp::from_epoch_millis(ms).to_rfc3339()
}

/// Parse `500ms`, `20s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((text, "s"), |at| (&text[..at], &text[at..]));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a duration such as 500ms, 20s, 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("{text:?}: unknown unit {other:?}")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?}: not a duration"));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn durations_parse() {
        assert_eq!(
            super::parse_duration("500ms"),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(super::parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(super::parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(super::parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(super::parse_duration("x").is_err());
    }
}
