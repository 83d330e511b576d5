//! Producer tools — `put`, `replay`, `loadgen` — all through the shared producer
//! (`shardwise::producer`: `PutRecords` of ≤ 500 records / 5 MiB, refused records retried with
//! backoff), against the embedded stream or Kinesis.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use serde_json::Value;
use shardwise::producer::{
    CallError, EntryResult, Producer, ProducerRecord, PutEntry, StreamWriter,
};
use shardwise_aws::{KinesisStreamWriter, StreamTarget};
use shardwise_cards::generator::{GeneratorOptions, TransactionGenerator};
use tokio::time::Instant;

use crate::cli::{SourceKind, StreamArgs};
use crate::stream::EmbeddedStream;
use crate::stream::embedded::EmbeddedWriter;

/// Either stream, behind the producer's one-call trait.
#[derive(Debug, Clone)]
pub enum AnyWriter {
    Embedded(EmbeddedWriter),
    Kinesis(KinesisStreamWriter),
}

impl StreamWriter for AnyWriter {
    async fn put_records(&self, entries: &[PutEntry<'_>]) -> Result<Vec<EntryResult>, CallError> {
        match self {
            Self::Embedded(w) => w.put_records(entries).await,
            Self::Kinesis(w) => w.put_records(entries).await,
        }
    }
}

/// A producer onto the stream `args` names.
pub async fn producer(args: &StreamArgs) -> anyhow::Result<Producer<AnyWriter>> {
    Ok(Producer::new(writer(args).await?).max_in_flight(args.put_calls_in_flight))
}

pub async fn writer(args: &StreamArgs) -> anyhow::Result<AnyWriter> {
    Ok(match args.source {
        SourceKind::Embedded => AnyWriter::Embedded(EmbeddedWriter(Arc::new(
            EmbeddedStream::open(args.stream_db(), &args.stream, args.shards)?,
        ))),
        SourceKind::Kinesis => {
            let sdk = shardwise_aws::sdk_config(None).await;
            AnyWriter::Kinesis(KinesisStreamWriter::new(
                aws_sdk_kinesis::Client::new(&sdk),
                StreamTarget::parse(&args.stream),
            ))
        }
    })
}

fn progress(total: Option<u64>, what: &str) -> ProgressBar {
    let bar = match total {
        Some(total) => ProgressBar::new(total),
        None => ProgressBar::new_spinner(),
    };
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(ProgressDrawTarget::stderr());
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let template = if total.is_some() {
        format!("{what} [{{bar:30}}] {{pos}}/{{len}} {{per_sec}} {{msg}}")
    } else {
        format!("{what} {{spinner}} {{pos}} records {{per_sec}} {{msg}}")
    };
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Put `records`; returns how many were put.
async fn put_all<W: StreamWriter>(producer: &Producer<W>, records: &[ProducerRecord]) -> usize {
    let report = producer.put(records, None).await;
    for (index, outcome) in report.failed().take(5) {
        eprintln!("record {index} not put: {outcome:?}");
    }
    report.put_count()
}

// ------------------------------------------------------------------------------------------ put

#[derive(Debug, Clone, Args)]
pub struct PutArgs {
    #[command(flatten)]
    pub stream: StreamArgs,
    /// JSONL file (default: stdin). A line is `{"partitionKey": "…", "data": <JSON or string>}`,
    /// `{"partitionKey": "…", "dataBase64": "…"}`, or any JSON object (put as is, keyed by
    /// `--partition-key-field`).
    pub file: Option<PathBuf>,
    #[arg(long, default_value = "card_id")]
    pub partition_key_field: String,
}

/// A JSONL line as a record.
pub fn record_from_line(line: &str, key_field: &str) -> Result<ProducerRecord, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let key = value
        .get("partitionKey")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let data = if let Some(b64) = value.get("dataBase64").and_then(Value::as_str) {
        base64_simd::STANDARD
            .decode_to_vec(b64)
            .map_err(|e| format!("dataBase64: {e}"))?
    } else if let Some(data) = value.get("data").filter(|_| key.is_some()) {
        match data {
            Value::String(s) => s.clone().into_bytes(),
            other => other.to_string().into_bytes(),
        }
    } else {
        value.to_string().into_bytes()
    };
    let key = key
        .or_else(|| match value.get(key_field) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
            None => None,
        })
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    Ok(ProducerRecord::new(key, data))
}

pub async fn put(args: PutArgs) -> anyhow::Result<()> {
    let producer = producer(&args.stream).await?;
    let reader: Box<dyn BufRead> = match &args.file {
        Some(path) => Box::new(std::io::BufReader::new(std::fs::File::open(path)?)),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    let bar = progress(None, "put");
    let mut pending = Vec::with_capacity(500);
    let (mut put, mut bad) = (0usize, 0usize);
    for (number, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match record_from_line(&line, &args.partition_key_field) {
            Ok(record) => pending.push(record),
            Err(error) => {
                bad += 1;
                eprintln!("line {}: {error}", number + 1);
            }
        }
        if pending.len() >= 500 {
            put += put_all(&producer, &pending).await;
            bar.inc(pending.len() as u64);
            pending.clear();
        }
    }
    put += put_all(&producer, &pending).await;
    bar.inc(pending.len() as u64);
    bar.finish_and_clear();
    println!(
        "put {put} records ({bad} unreadable lines) to {}",
        args.stream.stream
    );
    anyhow::ensure!(bad == 0, "{bad} lines could not be read");
    Ok(())
}

// --------------------------------------------------------------------------------------- replay

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub stream: StreamArgs,
    /// Recorded traffic: JSONL (`{"partitionKey", "data"|"dataBase64", "timestamp"}`, the
    /// timestamp RFC 3339 or epoch seconds; `approximateArrivalTimestamp` also read), or a Lambda
    /// Kinesis event file (`{"Records": […]}`) such as those in `events/`.
    pub file: PathBuf,
    /// Play this many times faster than recorded.
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    #[arg(long, default_value = "card_id")]
    pub partition_key_field: String,
}

/// Recorded records with their offsets from the first, ms.
pub fn read_recording(text: &str, key_field: &str) -> Result<Vec<(i64, ProducerRecord)>, String> {
    let timestamp = |v: &Value| -> Option<i64> {
        let t = v
            .get("timestamp")
            .or_else(|| v.get("approximateArrivalTimestamp"))?;
        match t {
            #[allow(clippy::cast_possible_truncation)]
            Value::Number(n) => n.as_f64().map(|s| (s * 1000.0) as i64),
            Value::String(s) => shardwise::time::Timestamp::parse_rfc3339(s)
                .ok()
                .map(|t| t.epoch_millis()),
            _ => None,
        }
    };
    let mut out: Vec<(Option<i64>, ProducerRecord)> = Vec::new();
    if let Ok(event) = serde_json::from_str::<Value>(text)
        && let Some(records) = event.get("Records").and_then(Value::as_array)
    {
        for record in records {
            let k = &record["kinesis"];
            let data = k["data"]
                .as_str()
                .map(|d| {
                    base64_simd::STANDARD
                        .decode_to_vec(d)
                        .unwrap_or_else(|_| d.as_bytes().to_vec())
                })
                .unwrap_or_default();
            let key = k["partitionKey"].as_str().unwrap_or("replay").to_owned();
            out.push((timestamp(k), ProducerRecord::new(key, data)));
        }
    } else {
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(line)
                .map_err(|e| format!("line {}: not JSON: {e}", number + 1))?;
            let record = record_from_line(line, key_field)
                .map_err(|e| format!("line {}: {e}", number + 1))?;
            out.push((timestamp(&value), record));
        }
    }
    let first = out.iter().find_map(|(t, _)| *t).unwrap_or(0);
    Ok(out
        .into_iter()
        .map(|(t, r)| (t.map_or(0, |t| (t - first).max(0)), r))
        .collect())
}

pub async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.speedup > 0.0, "--speedup must be positive");
    let text = std::fs::read_to_string(&args.file)?;
    let recording = read_recording(&text, &args.partition_key_field).map_err(anyhow::Error::msg)?;
    let producer = producer(&args.stream).await?;
    let bar = progress(Some(recording.len() as u64), "replay");
    let started = Instant::now();
    let mut put = 0;
    let mut index = 0;
    // Records due at the same moment go in one call; the loop ends with the recording.
    while index < recording.len() {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let due = Duration::from_millis((recording[index].0 as f64 / args.speedup) as u64);
        tokio::time::sleep_until(started + due).await;
        let now = started.elapsed();
        let mut batch = Vec::new();
        while index < recording.len() && batch.len() < 500 {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let at = Duration::from_millis((recording[index].0 as f64 / args.speedup) as u64);
            if at > now && !batch.is_empty() {
                break;
            }
            batch.push(recording[index].1.clone());
            index += 1;
        }
        put += put_all(&producer, &batch).await;
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    println!(
        "replayed {put}/{} records in {:.1} s (speedup {}×)",
        recording.len(),
        started.elapsed().as_secs_f64(),
        args.speedup
    );
    Ok(())
}

// -------------------------------------------------------------------------------------- loadgen

#[derive(Debug, Clone, Args)]
pub struct LoadgenArgs {
    #[command(flatten)]
    pub stream: StreamArgs,
    #[command(flatten)]
    pub load: LoadOptions,
}

/// What the generator produces.
#[derive(Debug, Clone, Args)]
pub struct LoadOptions {
    /// Records per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    #[arg(long, value_parser = crate::parse_duration, default_value = "60s")]
    pub duration: Duration,
    /// Distinct cards (partition keys). Each card shops near its home and around its usual
    /// amount, so ordinary traffic raises (almost) no alerts; keep the per-card rate low (the
    /// fraud velocity rule's default is 5 transactions in 5 minutes).
    #[arg(long, default_value_t = 50_000)]
    pub cards: u32,
    /// Share of records that are poison (not base64-decodable JSON, wrong shape).
    #[arg(long, default_value_t = 0.005)]
    pub poison_share: f64,
    /// Share of records that start a fraud pattern (velocity burst, impossible travel, amount
    /// spike, blocklisted merchant).
    #[arg(long, default_value_t = 0.01)]
    pub fraud_share: f64,
    /// Merchant the generator uses for the blocklist pattern (give the same to fraud with
    /// FRAUD_BLOCKED_MERCHANTS).
    #[arg(long, default_value = "m-blocked-0001")]
    pub blocked_merchant: String,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

impl LoadOptions {
    /// What the shared transaction generator is told (rate and duration are the sender's).
    pub fn generator(&self) -> GeneratorOptions {
        GeneratorOptions {
            cards: self.cards,
            poison_share: self.poison_share,
            fraud_share: self.fraud_share,
            blocked_merchant: self.blocked_merchant.clone(),
            seed: self.seed,
        }
    }
}

/// What the generator sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadReport {
    pub put: u64,
    pub failed: u64,
    pub poison: u64,
    pub fraud_patterns: u64,
}

/// Send generated load at `options.rate` for `options.duration` (or until `stop`), in 100 ms
/// ticks; `on_progress` gets the running count.
pub async fn generate<W: StreamWriter>(
    producer: &Producer<W>,
    options: &LoadOptions,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
    on_progress: impl Fn(u64),
) -> LoadReport {
    let mut generator = TransactionGenerator::new(options.generator());
    let mut report = LoadReport::default();
    let started = Instant::now();
    let tick = Duration::from_millis(100);
    let mut sent_target = 0f64;
    let mut ticks = 0u64;
    // Bounded by the duration (and `stop`).
    while started.elapsed() < options.duration {
        if stop.as_ref().is_some_and(|s| *s.borrow()) {
            break;
        }
        ticks += 1;
        sent_target += f64::from(options.rate) / 10.0;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let due = (sent_target as u64).saturating_sub(report.put + report.failed);
        let now = crate::now_ms();
        let records: Vec<ProducerRecord> = (0..due).map(|_| generator.next_record(now)).collect();
        let outcome = producer.put(&records, None).await;
        report.put += outcome.put_count() as u64;
        report.failed += (records.len() - outcome.put_count()) as u64;
        on_progress(report.put);
        tokio::time::sleep_until(started + tick * u32::try_from(ticks).unwrap_or(u32::MAX)).await;
    }
    report.poison = generator.poison;
    report.fraud_patterns = generator.fraud_patterns;
    report
}

pub async fn loadgen(args: LoadgenArgs) -> anyhow::Result<()> {
    let producer = producer(&args.stream).await?;
    let total = u64::from(args.load.rate) * args.load.duration.as_secs().max(1);
    let bar = progress(Some(total), "loadgen");
    let report = generate(&producer, &args.load, None, |n| bar.set_position(n)).await;
    bar.finish_and_clear();
    println!(
        "loadgen: put {} records ({} failed), {} poison, {} fraud patterns, to {}",
        report.put, report.failed, report.poison, report.fraud_patterns, args.stream.stream
    );
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_recordings_parse() {
        let r = record_from_line(r#"{"partitionKey":"k","data":{"a":1}}"#, "card_id").unwrap();
        assert_eq!(
            (r.partition_key.as_str(), r.data.as_slice()),
            ("k", br#"{"a":1}"#.as_slice())
        );
        let r = record_from_line(r#"{"card_id":"c1","amount":3}"#, "card_id").unwrap();
        assert_eq!(r.partition_key, "c1");
        let rec = read_recording(
            "{\"partitionKey\":\"a\",\"data\":\"x\",\"timestamp\":\"2024-01-01T00:00:00Z\"}\n{\"partitionKey\":\"a\",\"data\":\"y\",\"timestamp\":\"2024-01-01T00:00:02.5Z\"}\n",
            "card_id",
        )
        .unwrap();
        assert_eq!(
            rec.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            vec![0, 2500]
        );
        let events = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../events/fraud-normal.json"
        ))
        .unwrap();
        assert!(!read_recording(&events, "card_id").unwrap().is_empty());
    }

    #[test]
    fn the_generator_mixes_poison_and_fraud() {
        let options = LoadOptions {
            rate: 1000,
            duration: Duration::from_secs(1),
            cards: 50,
            poison_share: 0.05,
            fraud_share: 0.05,
            blocked_merchant: "m-x".into(),
            seed: 1,
        };
        let mut g = TransactionGenerator::new(options.generator());
        let records: Vec<_> = (0..2000).map(|_| g.next_record(0)).collect();
        let json_ok = records
            .iter()
            .filter(|r| {
                serde_json::from_slice::<Value>(&r.data).is_ok_and(|v| v.get("amount").is_some())
            })
            .count();
        assert!(
            g.poison > 20 && g.fraud_patterns > 20,
            "{} {}",
            g.poison,
            g.fraud_patterns
        );
        assert!(json_ok > 1800);
    }
}
