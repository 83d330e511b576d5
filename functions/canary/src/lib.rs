//! `canary`: measures, end to end, how long the stream's consumers take to see a record, and
//! notices when they do not see it at all.
//!
//! Every run (EventBridge, `rate(1 minute)`):
//!
//! 1. **send**: writes a few canary records (`{"canary_id", "sent_at"}`) to the stream with the
//!    shared [`Producer`] (`PutRecords`, refused records retried), spread over the hash key range
//!    so that, with as many records as shards, every shard carries one. Before putting them it
//!    writes one row per canary to the canary table (consumer `canary`); a canary that could not
//!    be put has its row deleted again, so it is never counted as missing.
//! 2. **check**: reads the rows of the canaries of earlier runs (the look-back window) with
//!    `BatchGetItem`. For each consumer (`fraud`, `aggregation`) and canary not yet reported: an
//!    acknowledgement gives a latency (`acked_at − sent_at`); none by the deadline counts as
//!    missing; otherwise it is left for a later run. A consumer is reported once per canary.
//! 3. **report**: EMF metrics per consumer (dimension `Consumer`): `CanaryLatency`
//!    (milliseconds, one value per acknowledged canary) and `CanaryMissing` (count, emitted every
//!    run, 0 included, so the alarm's "missing data" means the canary itself stopped).
//!
//! # Finding earlier runs without a scan
//! Canary ids are derived from the run's time slot: `canary-{slot start, epoch s}-{n}`. A run
//! computes the ids of the slots in its look-back window and fetches exactly those rows. Two
//! runs in one slot (EventBridge delivers at least once) share ids: the second finds the rows
//! there and sends nothing.

pub mod store;

use std::collections::BTreeMap;

use serde::Serialize;
use shardwise::clock::Clock;
use shardwise::config::{ConfigError, Env, EnvSource};
use shardwise::metrics::MetricsWriter;
use shardwise::metrics::{EmfDocument, Unit};
use shardwise::producer::{Producer, ProducerRecord, StreamWriter};
use shardwise_cards::transaction::CanaryRecord;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::store::{CanaryStore, SentRow};

/// The function's settings, from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanarySettings {
    /// `STREAM_NAME` (required): the stream's name or ARN.
    pub stream_name: String,
    /// `CANARY_TABLE` (required).
    pub canary_table: String,
    /// `AWS_LAMBDA_FUNCTION_NAME`, default `canary`.
    pub function_name: String,
    /// `SHARDWISE_METRICS_NAMESPACE`, default `Shardwise`.
    pub metrics_namespace: String,
    /// `RUST_LOG`, default `info`.
    pub log_filter: String,
    pub run: RunSettings,
}

/// What one run does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSettings {
    /// `CANARY_RECORDS_PER_RUN`, default 3 (1 to 100).
    pub records_per_run: u32,
    /// `CANARY_INTERVAL_SECONDS`, default 60: the schedule's period, the length of a slot.
    pub interval_seconds: i64,
    /// `CANARY_DEADLINE_SECONDS`, default 120: a canary unacknowledged this long is missing.
    pub deadline_seconds: i64,
    /// `CANARY_LOOKBACK_SECONDS`, default deadline + 5 intervals: how far back runs are checked.
    pub lookback_seconds: i64,
    /// `CANARY_CONSUMERS`, default `fraud,aggregation`.
    pub consumers: Vec<String>,
    /// How long canary rows live (TTL), one day.
    pub ttl_seconds: i64,
}

impl Default for RunSettings {
    fn default() -> Self {
        Self {
            records_per_run: 3,
            interval_seconds: 60,
            deadline_seconds: 120,
            lookback_seconds: 420,
            consumers: vec!["fraud".into(), "aggregation".into()],
            ttl_seconds: 86_400,
        }
    }
}

impl CanarySettings {
    pub fn from_env(env: &Env<impl EnvSource>) -> Result<Self, ConfigError> {
        let invalid = |name: &str, value: String, expected: &str| ConfigError::Invalid {
            name: name.to_owned(),
            value,
            expected: expected.to_owned(),
        };
        let records_per_run: u32 =
            env.parse_or("CANARY_RECORDS_PER_RUN", 3, "a whole number from 1 to 100")?;
        if !(1..=100).contains(&records_per_run) {
            return Err(invalid(
                "CANARY_RECORDS_PER_RUN",
                records_per_run.to_string(),
                "a whole number from 1 to 100",
            ));
        }
        let seconds = |name: &str, default: i64| -> Result<i64, ConfigError> {
            let value: i64 = env.parse_or(name, default, "seconds, a whole number from 1")?;
            if value < 1 {
                return Err(invalid(
                    name,
                    value.to_string(),
                    "seconds, a whole number from 1",
                ));
            }
            Ok(value)
        };
        let interval_seconds = seconds("CANARY_INTERVAL_SECONDS", 60)?;
        let deadline_seconds = seconds("CANARY_DEADLINE_SECONDS", 120)?;
        let lookback_seconds = seconds(
            "CANARY_LOOKBACK_SECONDS",
            deadline_seconds + 5 * interval_seconds,
        )?;
        if lookback_seconds < deadline_seconds + interval_seconds {
            return Err(invalid(
                "CANARY_LOOKBACK_SECONDS",
                lookback_seconds.to_string(),
                "at least CANARY_DEADLINE_SECONDS + CANARY_INTERVAL_SECONDS, or canaries are never judged",
            ));
        }
        let consumers: Vec<String> = env
            .string_or("CANARY_CONSUMERS", "fraud,aggregation")
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        if consumers.is_empty()
            || consumers
                .iter()
                .any(|c| c == shardwise_cards::canary::canary_table::SENDER)
        {
            return Err(invalid(
                "CANARY_CONSUMERS",
                consumers.join(","),
                "comma-separated consumer names, not `canary`",
            ));
        }
        Ok(Self {
            stream_name: env.required(
                "STREAM_NAME",
                "the Kinesis stream canary records are put on",
            )?,
            canary_table: env.required(
                "CANARY_TABLE",
                "the DynamoDB table of canary rows and consumer acknowledgements",
            )?,
            function_name: env.string_or("AWS_LAMBDA_FUNCTION_NAME", "canary"),
            metrics_namespace: env.string_or("SHARDWISE_METRICS_NAMESPACE", "Shardwise"),
            log_filter: env.string_or("RUST_LOG", "info"),
            run: RunSettings {
                records_per_run,
                interval_seconds,
                deadline_seconds,
                lookback_seconds,
                consumers,
                ttl_seconds: 86_400,
            },
        })
    }
}

/// One consumer's results in one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerReport {
    /// Latencies of canaries acknowledged since they were last reported, in ms.
    pub latency_ms: Vec<i64>,
    pub missing: u32,
    /// Sent, unacknowledged, still within the deadline.
    pub pending: u32,
}

/// What a run did: also the function's response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    /// This run's slot (epoch seconds).
    pub slot: i64,
    /// Canary records put on the stream.
    pub sent: u32,
    /// Canaries of this slot that an earlier run had sent already.
    pub already_sent: u32,
    /// Canary records that could not be put.
    pub put_failed: u32,
    pub consumers: BTreeMap<String, ConsumerReport>,
}

/// Why a run failed (after reporting what it could).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CanaryError {
    #[error("{failed} of {total} canary records could not be put on the stream: {reason}")]
    PutFailed {
        failed: u32,
        total: u32,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

impl CanaryError {
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::PutFailed { .. } => "CanaryPutFailed",
            Self::Store(_) => "CanaryTableFailed",
        }
    }
}

impl From<CanaryError> for lambda_runtime::Diagnostic {
    fn from(error: CanaryError) -> Self {
        Self {
            error_type: error.error_type().to_owned(),
            error_message: error.to_string(),
        }
    }
}

/// The canary: a producer on the stream, the canary table, a clock and a metrics writer.
#[derive(Debug)]
pub struct Canary<W, S, C, M> {
    producer: Producer<W>,
    store: S,
    clock: C,
    metrics: M,
    namespace: String,
    settings: RunSettings,
}

impl<W, S, C, M> Canary<W, S, C, M>
where
    W: StreamWriter,
    S: CanaryStore,
    C: Clock,
    M: MetricsWriter,
{
    pub fn new(
        producer: Producer<W>,
        store: S,
        clock: C,
        metrics: M,
        namespace: impl Into<String>,
        settings: RunSettings,
    ) -> Self {
        Self {
            producer,
            store,
            clock,
            metrics,
            namespace: namespace.into(),
            settings,
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn producer(&self) -> &Producer<W> {
        &self.producer
    }

    pub fn metrics(&self) -> &M {
        &self.metrics
    }

    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// One run: send, check, report. Metrics are written even when a step failed; the error
    /// (the first one) then fails the invocation so the function's error alarm sees it.
    pub async fn run_once(&self, cutoff: Option<Instant>) -> Result<RunReport, CanaryError> {
        let now_ms = self.clock.now_ms();
        let interval = self.settings.interval_seconds;
        let slot = now_ms.div_euclid(1000).div_euclid(interval) * interval;
        let mut report = RunReport {
            slot,
            ..RunReport::default()
        };
        let mut failure = None;

        if let Err(error) = self.send(slot, now_ms, cutoff, &mut report).await {
            error!("canary send failed: {error}");
            failure.get_or_insert(error);
        }
        match self.check(slot, now_ms).await {
            Ok(consumers) => report.consumers = consumers,
            Err(error) => {
                error!("canary check failed: {error}");
                failure.get_or_insert(error);
            }
        }
        self.emit(&report, now_ms);
        info!(
            slot,
            sent = report.sent,
            already_sent = report.already_sent,
            put_failed = report.put_failed,
            "canary run done"
        );
        match failure {
            Some(error) => Err(error),
            None => Ok(report),
        }
    }

    async fn send(
        &self,
        slot: i64,
        now_ms: i64,
        cutoff: Option<Instant>,
        report: &mut RunReport,
    ) -> Result<(), CanaryError> {
        let count = self.settings.records_per_run;
        let ids: Vec<String> = (0..count).map(|n| canary_id(slot, n)).collect();
        let rows: Vec<(&str, i64)> = ids.iter().map(|id| (id.as_str(), now_ms)).collect();
        let expiration = now_ms / 1000 + self.settings.ttl_seconds;
        let written = self.store.record_sent(&rows, expiration).await;

        let mut to_put = Vec::new();
        let mut first_error = None;
        for (n, (id, result)) in ids.iter().zip(written).enumerate() {
            match result {
                Ok(SentRow::Written) => to_put.push((id.as_str(), n as u32)),
                Ok(SentRow::AlreadyThere) => report.already_sent += 1,
                Err(error) => {
                    report.put_failed += 1;
                    first_error.get_or_insert(CanaryError::Store(error));
                }
            }
        }
        if to_put.is_empty() {
            return first_error.map_or(Ok(()), Err);
        }
        let records: Vec<ProducerRecord> = to_put
            .iter()
            .map(|&(id, n)| {
                let payload = CanaryRecord {
                    canary_id: id.into(),
                    sent_at: now_ms,
                };
                let data = serde_json::to_vec(&payload).unwrap_or_default();
                ProducerRecord::new(id, data).with_explicit_hash_key(spread_hash_key(n, count))
            })
            .collect();
        let put = self.producer.put(&records, cutoff).await;
        let mut unput = Vec::new();
        let mut reason = String::new();
        for (index, outcome) in put.failed() {
            if let shardwise::producer::PutOutcome::Failed {
                error_code,
                message,
                ..
            } = outcome
            {
                warn!(
                    canary_id = to_put[index].0,
                    "canary record not put: {error_code}: {message}"
                );
                if reason.is_empty() {
                    reason = format!("{error_code}: {message}");
                }
            }
            unput.push(to_put[index].0);
        }
        report.sent += put.put_count() as u32;
        report.put_failed += unput.len() as u32;
        if !unput.is_empty() {
            // Never sent, so never missing: its row goes. If even that fails, a later run will
            // count it missing, which overstates rather than hides a problem.
            if let Err(error) = self.store.forget(&unput).await {
                warn!("rows of unsent canaries not deleted: {error}");
            }
            first_error.get_or_insert(CanaryError::PutFailed {
                failed: unput.len() as u32,
                total: records.len() as u32,
                reason,
            });
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn check(
        &self,
        slot: i64,
        now_ms: i64,
    ) -> Result<BTreeMap<String, ConsumerReport>, CanaryError> {
        let mut consumers: BTreeMap<String, ConsumerReport> = self
            .settings
            .consumers
            .iter()
            .map(|c| (c.clone(), ConsumerReport::default()))
            .collect();
        let interval = self.settings.interval_seconds;
        let first_slot = slot - self.settings.lookback_seconds;
        let mut ids = Vec::new();
        let mut earlier = slot - interval;
        while earlier >= first_slot {
            ids.extend((0..self.settings.records_per_run).map(|n| canary_id(earlier, n)));
            earlier -= interval;
        }
        if ids.is_empty() {
            return Ok(consumers);
        }
        let rows = self.store.fetch(&ids, &self.settings.consumers).await?;
        let deadline_ms = self.settings.deadline_seconds * 1000;
        for (id, rows) in ids.iter().zip(rows) {
            let Some(sent_at) = rows.sent_at else {
                continue;
            };
            let mut verdicts = Vec::new();
            for consumer in &self.settings.consumers {
                if rows.reported.contains(consumer) {
                    continue;
                }
                match rows.acks.get(consumer) {
                    Some(&acked_at) => verdicts.push((consumer, Some((acked_at - sent_at).max(0)))),
                    None if now_ms - sent_at > deadline_ms => verdicts.push((consumer, None)),
                    None => {
                        if let Some(report) = consumers.get_mut(consumer) {
                            report.pending += 1;
                        }
                    }
                }
            }
            if verdicts.is_empty() {
                continue;
            }
            let names: Vec<String> = verdicts.iter().map(|(c, _)| (*c).clone()).collect();
            if !self.store.mark_reported(id, &names).await? {
                // Another run reported this canary first.
                continue;
            }
            for (consumer, latency) in verdicts {
                let Some(report) = consumers.get_mut(consumer) else {
                    continue;
                };
                match latency {
                    Some(ms) => report.latency_ms.push(ms),
                    None => {
                        warn!(canary_id = %id, consumer = %consumer, "canary missing past the deadline");
                        report.missing += 1;
                    }
                }
            }
        }
        Ok(consumers)
    }

    fn emit(&self, report: &RunReport, now_ms: i64) {
        for (consumer, results) in &report.consumers {
            let line = EmfDocument::new(&self.namespace)
                .dimension("Consumer", consumer)
                .metric("CanaryMissing", Unit::Count, f64::from(results.missing))
                .metric("CanaryPending", Unit::Count, f64::from(results.pending))
                .to_line(now_ms);
            self.metrics.write_line(&line);
            for latency in &results.latency_ms {
                let line = EmfDocument::new(&self.namespace)
                    .dimension("Consumer", consumer)
                    .metric("CanaryLatency", Unit::Milliseconds, *latency as f64)
                    .to_line(now_ms);
                self.metrics.write_line(&line);
            }
        }
        let line = EmfDocument::new(&self.namespace)
            .dimension("Function", "canary")
            .metric("CanarySent", Unit::Count, f64::from(report.sent))
            .metric("CanaryPutFailed", Unit::Count, f64::from(report.put_failed))
            .to_line(now_ms);
        self.metrics.write_line(&line);
    }
}

/// The id of canary `n` of the run in `slot`.
pub fn canary_id(slot: i64, n: u32) -> String {
    format!("canary-{slot}-{n}")
}

/// The middle of the `n`-th of `count` equal parts of the 128-bit hash key space: with `count`
/// at least the shard count and shards of equal ranges, every shard gets a canary.
pub fn spread_hash_key(n: u32, count: u32) -> String {
    let halves = u128::from(count.max(1)) * 2;
    // (2n + 1) / 2count of the space, never past its end.
    (u128::MAX / halves * (u128::from(n) * 2 + 1)).to_string()
}

/// Milliseconds left before the deadline as a tokio instant, keeping `margin_ms` for the rest.
pub fn cutoff(deadline_ms: i64, now_ms: i64, margin_ms: i64) -> Instant {
    let left = deadline_ms.saturating_sub(now_ms).saturating_sub(margin_ms);
    let left = std::time::Duration::from_millis(u64::try_from(left).unwrap_or(0));
    let now = Instant::now();
    // A deadline too far away to represent is as good as none: a day is more than Lambda allows.
    now.checked_add(left)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(86_400))
}

/// The EventBridge scheduled event that invokes the canary. Only `time` is read (for the log);
/// every field is optional so a hand-made `{}` invokes it too.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct ScheduledEvent {
    #[serde(rename = "detail-type")]
    pub detail_type: String,
    pub time: String,
}

impl<W, S, C, M> Canary<W, S, C, M>
where
    W: StreamWriter,
    S: CanaryStore,
    C: Clock,
    M: MetricsWriter,
{
    /// One invocation: a run that stops retrying 2 s before the invocation's deadline
    /// (`deadline_ms`, epoch ms).
    pub async fn invoke(
        &self,
        event: &ScheduledEvent,
        deadline_ms: i64,
    ) -> Result<RunReport, CanaryError> {
        info!(scheduled_at = %event.time, "canary invoked");
        let cutoff = cutoff(deadline_ms, self.clock.now_ms(), 2000);
        self.run_once(Some(cutoff)).await
    }
}

/// Serve invocations until the runtime stops.
pub async fn serve<W, S, C, M>(canary: Canary<W, S, C, M>) -> Result<(), lambda_runtime::Error>
where
    W: StreamWriter,
    S: CanaryStore,
    C: Clock,
    M: MetricsWriter,
{
    let canary = &canary;
    lambda_runtime::run(lambda_runtime::service_fn(
        move |event: lambda_runtime::LambdaEvent<ScheduledEvent>| async move {
            let deadline = shardwise::runtime::deadline_epoch_ms(
                event.context.deadline,
                canary.clock.now_ms(),
            );
            canary.invoke(&event.payload, deadline).await
        },
    ))
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn hash_keys_spread_over_the_key_space() {
        let keys: Vec<u128> = (0..4)
            .map(|n| spread_hash_key(n, 4).parse().unwrap())
            .collect();
        let quarter = u128::MAX / 4;
        for (n, key) in keys.iter().enumerate() {
            assert!(*key > quarter * n as u128 && *key < quarter * (n as u128 + 1));
        }
        assert_eq!(spread_hash_key(0, 1), (u128::MAX / 2).to_string());
    }

    #[test]
    fn settings_default_and_name_what_is_wrong() {
        let vars = HashMap::from([("STREAM_NAME", "s"), ("CANARY_TABLE", "t")]);
        let settings = CanarySettings::from_env(&Env(vars.clone())).unwrap();
        assert_eq!(settings.run, RunSettings::default());
        let err =
            CanarySettings::from_env(&Env(HashMap::from([("CANARY_TABLE", "t")]))).unwrap_err();
        assert!(err.to_string().contains("STREAM_NAME"), "{err}");
        for (name, value) in [
            ("CANARY_RECORDS_PER_RUN", "0"),
            ("CANARY_LOOKBACK_SECONDS", "100"),
            ("CANARY_CONSUMERS", "fraud,canary"),
            ("CANARY_DEADLINE_SECONDS", "soon"),
        ] {
            let mut bad = vars.clone();
            bad.insert(name, value);
            let err = CanarySettings::from_env(&Env(bad)).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
        }
    }
}
