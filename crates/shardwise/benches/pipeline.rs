//! The full decode → handle → respond path against the naive floor, in one run.
//!
//! `cargo bench -p shardwise --bench pipeline` prints µs/record for events of 100, 1000 and
//! 10000 ~1 KiB card transactions, for:
//! - naive: `serde_json` into `aws_lambda_events`' `KinesisEvent` (base64 decoded while
//!   deserializing) plus `serde_json::from_slice` of each payload into an owned struct;
//! - shardwise: `Processor::process` with a trivial handler reading two fields, through to the
//!   response JSON.
//!
//! and the peak RSS of a fresh process handling a 6 MB event. Only same-run ratios are stable on
//! shared machines; absolute times drift ~2×, so the two paths alternate and each reports its
//! fastest repetition.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use aws_lambda_events::event::kinesis::KinesisEvent as NaiveEvent;
use serde::Deserialize;
use shardwise::testing::{card_transaction, event_json, plain, sequence_number};
use shardwise::{
    HandlerError, InMemoryDeadLetterSink, Invocation, Json, Processor, Record, RecordHandler,
};

/// What the naive path deserializes: the whole transaction, owned.
#[allow(dead_code)]
#[derive(Deserialize)]
struct OwnedTransaction {
    transaction_id: String,
    card_id: String,
    merchant_id: String,
    merchant_category: String,
    amount: f64,
    currency: String,
    country: String,
    lat: f64,
    lon: f64,
    timestamp: String,
    channel: String,
}

/// What a handler that scores amounts per card reads: borrowed, only the fields it uses.
#[derive(Deserialize)]
struct CardAmount<'a> {
    card_id: &'a str,
    amount: f64,
}

struct SumAmounts;

impl<'d> RecordHandler<'d> for SumAmounts {
    type Payload = Json<CardAmount<'d>>;

    async fn handle(&self, _: &Record<'d>, tx: &Json<CardAmount<'d>>) -> Result<(), HandlerError> {
        black_box((tx.card_id.len(), tx.amount));
        Ok(())
    }
}

fn make_event(records: usize) -> String {
    let records: Vec<_> = (0..records as u64)
        .map(|n| {
            let tx = card_transaction(n);
            plain(
                &format!("card-{:06}", n % 5000),
                &sequence_number(n),
                tx.as_bytes(),
            )
        })
        .collect();
    event_json(&records)
}

fn naive(event: &[u8]) -> usize {
    let event: NaiveEvent = serde_json::from_slice(event).unwrap();
    let mut sum = 0.0;
    for record in &event.records {
        let tx: OwnedTransaction = serde_json::from_slice(&record.kinesis.data.0).unwrap();
        sum += tx.amount;
    }
    black_box(sum);
    let response = aws_lambda_events::event::streams::KinesisEventResponse::default();
    serde_json::to_vec(&response).unwrap().len()
}

fn shardwise_path(
    runtime: &tokio::runtime::Runtime,
    processor: &Processor<shardwise::processor::PerRecord<SumAmounts>, InMemoryDeadLetterSink>,
    invocation: &Invocation,
    event: &[u8],
) -> usize {
    runtime.block_on(async {
        let report = processor.process(event, invocation).await.unwrap();
        assert_eq!(report.counts.processed, report.counts.records);
        serde_json::to_vec(&report.response).unwrap().len()
    })
}

/// Per-record times of two paths, run alternately so that both see the same machine load, each
/// the lowest of its repetitions (the least disturbed run; medians drift with other work on a
/// shared machine). Repetitions cover about `budget` records per path.
fn measure_pair(
    records: usize,
    budget: usize,
    mut first: impl FnMut() -> usize,
    mut second: impl FnMut() -> usize,
) -> (Duration, Duration) {
    // Warm up caches and the allocator.
    black_box(first());
    black_box(second());
    let reps = (budget / records).clamp(1, 2000);
    let (mut best_first, mut best_second) = (Duration::MAX, Duration::MAX);
    for _ in 0..reps {
        let start = Instant::now();
        black_box(first());
        best_first = best_first.min(start.elapsed());
        let start = Instant::now();
        black_box(second());
        best_second = best_second.min(start.elapsed());
    }
    (best_first / records as u32, best_second / records as u32)
}

fn peak_rss_child() {
    // About 6 MB: ~2 KB of event JSON per 1 KiB transaction.
    let event = make_event(3000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let processor = Processor::per_record(SumAmounts, InMemoryDeadLetterSink::new());
    let bytes = shardwise_path(
        &runtime,
        &processor,
        &Invocation::unbounded("rss"),
        event.as_bytes(),
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("VmHWM: ? kB");
    println!(
        "{} {} {}",
        event.len(),
        bytes,
        hwm.split_whitespace().nth(1).unwrap_or("?")
    );
}

fn main() {
    if std::env::args().any(|a| a == "--rss-child") {
        return peak_rss_child();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let processor = Processor::per_record(SumAmounts, InMemoryDeadLetterSink::new());
    let invocation = Invocation::unbounded("bench");
    // `--only-shardwise` skips the naive path, for profiling ours alone.
    let only_ours = std::env::args().any(|a| a == "--only-shardwise");
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it,
    // as a smoke test of the bench itself on small sizes.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let (sizes, budget): (&[usize], usize) = if smoke {
        (&[10, 100], 200)
    } else {
        (&[100, 1000, 10000], 200_000)
    };
    println!("records  event_MB  naive_us/rec  shardwise_us/rec  speedup");
    for &records in sizes {
        let event = make_event(records);
        let (naive_time, ours) = if only_ours {
            let (ours, _) = measure_pair(
                records,
                budget,
                || shardwise_path(&runtime, &processor, &invocation, event.as_bytes()),
                || 0,
            );
            (Duration::ZERO, ours)
        } else {
            measure_pair(
                records,
                budget,
                || naive(event.as_bytes()),
                || shardwise_path(&runtime, &processor, &invocation, event.as_bytes()),
            )
        };
        println!(
            "{records:>7}  {:>8.2}  {:>12.2}  {:>16.2}  {:>6.2}x",
            event.len() as f64 / 1e6,
            naive_time.as_secs_f64() * 1e6,
            ours.as_secs_f64() * 1e6,
            naive_time.as_secs_f64() / ours.as_secs_f64()
        );
    }
    if smoke {
        return;
    }
    match std::env::current_exe()
        .and_then(|exe| std::process::Command::new(exe).arg("--rss-child").output())
    {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let parts: Vec<&str> = text.split_whitespace().collect();
            if let [event_bytes, _, hwm_kb] = parts[..] {
                let mib = hwm_kb.parse::<f64>().unwrap_or(f64::NAN) / 1024.0;
                println!(
                    "peak RSS handling a {:.1} MB event: {mib:.1} MiB (process total)",
                    event_bytes.parse::<f64>().unwrap_or(0.0) / 1e6
                );
            } else {
                println!("peak RSS: child printed {text:?}");
            }
        }
        Err(e) => println!("peak RSS: could not start child: {e}"),
    }
}
