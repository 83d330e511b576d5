//! The full decode → handle → respond path against the naive floor, in one run.
//!
//! `cargo bench -p shardwise --bench pipeline` prints µs/record for events of 100, 1000, 3000 and
//! 10000 ~1 KiB card transactions, for:
//! - naive (the floor): `serde_json` into `aws_lambda_events`' `KinesisEvent` (base64 decoded
//!   while deserializing) plus `serde_json::from_slice` of each payload into an owned struct
//!   that models the whole transaction, nested objects included — the typed payload a handler
//!   written against `aws_lambda_events` declares;
//! - naive, lean: the same, but the payload struct keeps only the eleven top-level scalar fields
//!   and serde skips the nested objects. Printed so the ratio against a floor that already
//!   skips most of the payload is on record too;
//! - shardwise: `Processor::process` with a trivial handler reading two fields, through to the
//!   response JSON;
//! - shardwise, full: the same with a payload struct that borrows every field of the
//!   transaction (`Cow<str>`, nested objects too), the borrowed twin of the naive struct.
//!
//! and the peak RSS of a fresh process handling a 6 MB event. Only same-run ratios are stable on
//! shared machines; absolute times drift ~2×, so the paths alternate and each reports its
//! fastest repetition.
//!
//! `-- --only-shardwise [--payload lean|full] [--records N]` runs Shardwise alone and prints the
//! minor page faults per invocation. Paths that alternate share the allocator's state (glibc
//! sizes its trim threshold from the largest block freed so far), so one payload type alone is
//! what a function's process sees: per-invocation page faults, not cache misses, are what made
//! the full payload grow worse than linearly with batch size.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use aws_lambda_events::event::kinesis::KinesisEvent as NaiveEvent;
use serde::Deserialize;
use shardwise::{InMemoryDeadLetterSink, Invocation, Json, Processor, RecordHandler};
use shardwise_cards::bench::{CardAmount, ReadCardAmount, ReadWholeTransaction};
use shardwise_cards::generator::{
    FullTransaction as Transaction, FullTransactionRef as TransactionRef, card_transaction_event,
};

// The naive path deserializes `Transaction`: the whole transaction, owned, as its producer
// wrote it (`shardwise_cards::generator::card_transaction`); the full Shardwise path borrows
// all of it (`TransactionRef`, `Cow` because a producer may escape any string).

/// The naive lean path: only the eleven top-level scalars, owned; serde skips the nested objects.
#[allow(dead_code)]
#[derive(Deserialize)]
struct LeanTransaction {
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

fn make_event(records: usize) -> String {
    card_transaction_event(records)
}

/// The naive path, with `T` as the payload type. `amount` is what both payload types share.
fn naive<T: serde::de::DeserializeOwned>(event: &[u8], amount: impl Fn(&T) -> f64) -> usize {
    let event: NaiveEvent = serde_json::from_slice(event).unwrap();
    let mut sum = 0.0;
    for record in &event.records {
        let tx: T = serde_json::from_slice(&record.kinesis.data.0).unwrap();
        sum += amount(&tx);
    }
    black_box(sum);
    let response = aws_lambda_events::event::streams::KinesisEventResponse::default();
    serde_json::to_vec(&response).unwrap().len()
}

fn shardwise_path<H: for<'d> RecordHandler<'d>>(
    runtime: &tokio::runtime::Runtime,
    processor: &Processor<shardwise::processor::PerRecord<H>, InMemoryDeadLetterSink>,
    invocation: &Invocation,
    event: &[u8],
) -> usize {
    runtime.block_on(async {
        let report = processor.process(event, invocation).await.unwrap();
        assert_eq!(report.counts.processed, report.counts.records);
        serde_json::to_vec(&report.response).unwrap().len()
    })
}

/// Per-record times of several paths, run in turn within each repetition so that all see the
/// same machine load, each the lowest of its repetitions (the least disturbed run; medians drift
/// with other work on a shared machine). Repetitions cover about `budget` records per path.
fn measure(
    records: usize,
    budget: usize,
    paths: &mut [&mut dyn FnMut() -> usize],
) -> Vec<Duration> {
    // Warm up caches and the allocator.
    for path in paths.iter_mut() {
        black_box(path());
    }
    let reps = (budget / records).clamp(1, 2000);
    let mut best = vec![Duration::MAX; paths.len()];
    for _ in 0..reps {
        for (path, best) in paths.iter_mut().zip(&mut best) {
            let start = Instant::now();
            black_box(path());
            *best = (*best).min(start.elapsed());
        }
    }
    best.into_iter().map(|d| d / records as u32).collect()
}

/// Minor page faults of this process so far (field 10 of `/proc/self/stat`; 0 if unreadable).
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name, field 2, is parenthesised and may hold spaces: count from after it.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(7))
        .and_then(|f| f.parse().ok())
        .unwrap_or(0)
}

fn peak_rss_child() {
    // About 6 MB: ~2 KB of event JSON per 1 KiB transaction.
    let event = make_event(3000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let processor = Processor::per_record(ReadCardAmount, InMemoryDeadLetterSink::new());
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
    let processor = Processor::per_record(ReadCardAmount, InMemoryDeadLetterSink::new());
    let processor_full = Processor::per_record(ReadWholeTransaction, InMemoryDeadLetterSink::new());
    let invocation = Invocation::unbounded("bench");
    let args: Vec<String> = std::env::args().collect();
    // `--only-shardwise` skips the naive path, for profiling ours alone, and prints the minor
    // page faults per invocation; `--payload lean|full` runs one payload type only.
    let only_ours = args.iter().any(|a| a == "--only-shardwise");
    let payload = args
        .iter()
        .position(|a| a == "--payload")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    // `--records N` runs one size only.
    let one_size: Option<usize> = args
        .iter()
        .position(|a| a == "--records")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok());
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it,
    // as a smoke test of the bench itself on small sizes.
    let smoke = !args.iter().any(|a| a == "--bench");
    let (sizes, budget): (&[usize], usize) = if smoke {
        (&[10, 100], 200)
    } else {
        (&[100, 1000, 3000, 10000], 200_000)
    };
    let one = one_size.map(|n| [n]);
    let sizes = one.as_ref().map_or(sizes, |one| &one[..]);
    println!(
        "payload bytes (size_of, Option<P> as decoded): lean {}, full {}",
        size_of::<Option<Json<CardAmount<'_>>>>(),
        size_of::<Option<Json<TransactionRef<'_>>>>(),
    );
    if only_ours {
        println!("records  event_MB  shardwise_us/rec  shardwise_full_us/rec  faults/invocation");
    } else {
        println!(concat!(
            "records  event_MB  naive_us/rec  shardwise_us/rec  speedup  naive_lean_us/rec  ",
            "speedup_vs_lean  shardwise_full_us/rec  speedup_full"
        ));
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    for &records in sizes {
        let event = make_event(records);
        let bytes = event.as_bytes();
        let mut ours = || shardwise_path(&runtime, &processor, &invocation, bytes);
        let mut ours_full = || shardwise_path(&runtime, &processor_full, &invocation, bytes);
        if only_ours {
            // One payload type alone is what a function's process sees: the two share the
            // allocator's state when they alternate.
            let mut paths: Vec<&mut dyn FnMut() -> usize> = Vec::new();
            if payload != Some("full") {
                paths.push(&mut ours);
            }
            if payload != Some("lean") {
                paths.push(&mut ours_full);
            }
            let before = minor_faults();
            let times = measure(records, budget, &mut paths);
            let invocations = paths.len() * (1 + (budget / records).clamp(1, 2000));
            let faults = (minor_faults() - before) as f64 / invocations as f64;
            let mut times = times.into_iter().map(us);
            let mut column = |shown: bool| match shown {
                true => format!("{:.2}", times.next().unwrap_or(f64::NAN)),
                false => "-".to_owned(),
            };
            let (lean, full) = (
                column(payload != Some("full")),
                column(payload != Some("lean")),
            );
            println!(
                "{records:>7}  {:>8.2}  {lean:>16}  {full:>21}  {faults:>17.0}",
                bytes.len() as f64 / 1e6,
            );
            continue;
        }
        let mut full = || naive(bytes, |t: &Transaction| t.amount);
        let mut lean = || naive(bytes, |t: &LeanTransaction| t.amount);
        let times = measure(
            records,
            budget,
            &mut [&mut full, &mut ours, &mut lean, &mut ours_full],
        );
        let (full, ours, lean, ours_full) =
            (us(times[0]), us(times[1]), us(times[2]), us(times[3]));
        println!(
            "{records:>7}  {:>8.2}  {full:>12.2}  {ours:>16.2}  {:>6.2}x  {lean:>17.2}  {:>14.2}x  {ours_full:>21.2}  {:>11.2}x",
            bytes.len() as f64 / 1e6,
            full / ours,
            lean / ours,
            full / ours_full,
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
