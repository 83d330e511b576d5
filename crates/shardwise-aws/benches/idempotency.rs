//! DynamoDB calls and client CPU per record of the idempotency gate, against moto.
//!
//! `SHARDWISE_MOTO_ENDPOINT=http://127.0.0.1:4566 cargo bench -p shardwise --bench idempotency`
//! processes events of 100, 1000 and 10000 ~1 KiB card transactions through
//! `Processor::per_record(..).gate(Idempotency::new(DynamoDbIdempotencyStore ..))`, each twice
//! (first delivery, then the same event again), on a fresh table, and prints:
//! - DynamoDB requests per record, counted in the SDK by an interceptor (every attempt, so a
//!   retried request counts twice), by operation;
//! - client CPU per record: this process's CPU time (every thread, from /proc) for the whole
//!   invocation, and the same minus an ungated run of the same event, i.e. the gate's share.
//!
//! moto is a functional backend (10–100 ms a call), so wall time says nothing about DynamoDB:
//! count calls, not milliseconds. moto runs in its own process, so its CPU is not counted here.
//! Without `SHARDWISE_MOTO_ENDPOINT` the bench prints a note and exits.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use shardwise::clock::{Clock, SystemClock};
use shardwise::gate::RecordGate;
use shardwise::idempotency::{
    Idempotency, IdempotencyStore, InMemoryIdempotencyStore, JsonFieldKey, KeyStrategy, RecordKey,
    StoreOp,
};
use shardwise::testing::{event_json, plain, sequence_number};
use shardwise::{
    HandlerError, InMemoryDeadLetterSink, Invocation, Processor, ProcessorConfig, Record,
    RecordHandler,
};
use shardwise_aws::DynamoDbIdempotencyStore;
use shardwise_cards::generator::card_transaction;

/// Counts every request the SDK sends, by operation.
#[derive(Debug, Clone, Default)]
struct CallCounter(Arc<Mutex<BTreeMap<String, u64>>>);

impl CallCounter {
    /// Requests sent so far, by operation.
    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap().clone()
    }
}

/// Calls made to the in-memory store so far, named as the DynamoDB operations they stand for.
fn memory_calls(store: &InMemoryIdempotencyStore) -> BTreeMap<String, u64> {
    [
        ("BatchGetItem", StoreOp::Get),
        ("BatchWriteItem", StoreOp::Write),
        ("TransactWriteItems", StoreOp::Claim),
    ]
    .into_iter()
    .map(|(name, op)| (name.to_owned(), store.calls(op).len() as u64))
    .collect()
}

fn since(before: &BTreeMap<String, u64>, after: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .into_iter()
        .map(|(op, n)| {
            let earlier = before.get(&op).copied().unwrap_or(0);
            (op, n - earlier)
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

impl Intercept for CallCounter {
    fn name(&self) -> &'static str {
        "CallCounter"
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg
            .load::<Metadata>()
            .map_or("unknown", Metadata::name)
            .to_owned();
        *self.0.lock().unwrap().entry(operation).or_default() += 1;
        Ok(())
    }
}

/// A handler that does nothing, so the gate's cost shows.
struct Nothing;

impl<'d> RecordHandler<'d> for Nothing {
    type Payload = &'d [u8];

    async fn handle(&self, _: &Record<'d>, data: &&'d [u8]) -> Result<(), HandlerError> {
        black_box(data.len());
        Ok(())
    }
}

/// CPU time of this process so far, in nanoseconds: the sum of every thread's run time
/// (`/proc/self/task/*/schedstat`, nanosecond resolution), or `/proc/self/stat`'s utime + stime
/// (10 ms ticks) where schedstat is missing.
fn cpu_ns() -> u64 {
    let mut total = 0u64;
    let mut found = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let path = task.path().join("schedstat");
            if let Some(ns) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            {
                total += ns;
                found = true;
            }
        }
    }
    if found {
        return total;
    }
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    ticks * 10_000_000
}

/// An event of `records` transactions numbered from `first` (so every event has its own keys).
fn make_event(first: u64, records: usize) -> String {
    let records: Vec<_> = (first..first + records as u64)
        .map(|n| {
            let tx = card_transaction(n);
            plain(
                &format!("card-{:06}", n % 100),
                &sequence_number(n),
                tx.as_bytes(),
            )
        })
        .collect();
    event_json(&records)
}

fn config() -> ProcessorConfig {
    ProcessorConfig {
        function_name: "bench".into(),
        max_concurrency: 16,
        deadline_margin: std::time::Duration::from_millis(1000),
        ..ProcessorConfig::default()
    }
}

fn invocation(request_id: &str) -> Invocation {
    Invocation::with_deadline_ms(request_id, SystemClock.now_ms() + 900_000, &SystemClock)
}

/// CPU ns of invocations of `processor` on `events`, one after the other; asserts every record
/// was acknowledged. Measured around all of them, so /proc's tick granularity is amortized.
async fn measure<G: RecordGate>(
    processor: &Processor<shardwise::processor::PerRecord<Nothing>, InMemoryDeadLetterSink, G>,
    events: &[String],
    request_id: &str,
) -> u64 {
    let before = cpu_ns();
    for event in events {
        let report = processor
            .process(event.as_bytes(), &invocation(request_id))
            .await
            .unwrap();
        assert!(
            report.response.batch_item_failures.is_empty(),
            "{request_id}: {:?}, first failure: {:?}",
            report.counts,
            report.outcomes.iter().find(|o| !o.is_acknowledged())
        );
    }
    cpu_ns() - before
}

struct Row {
    /// Records per event.
    batch: usize,
    /// Records measured (the event repeated with new keys).
    records: usize,
    key: &'static str,
    delivery: &'static str,
    calls: BTreeMap<String, u64>,
    cpu_ns: u64,
    baseline_ns: u64,
}

impl Row {
    fn print(&self) {
        let total: u64 = self.calls.values().sum();
        let per = |n: u64| n as f64 / self.records as f64;
        let get = self.calls.get("BatchGetItem").copied().unwrap_or(0);
        let write = self.calls.get("BatchWriteItem").copied().unwrap_or(0);
        let claim = self.calls.get("TransactWriteItems").copied().unwrap_or(0);
        let cpu = self.cpu_ns as f64 / 1000.0 / self.records as f64;
        let gate =
            self.cpu_ns.saturating_sub(self.baseline_ns) as f64 / 1000.0 / self.records as f64;
        println!(
            "| {:>5} | {:<16} | {:<10} | {:>6} | {:>7.4} | {:>4} | {:>5} | {:>5} | {:>8.1} | {:>9.1} |",
            self.batch,
            self.key,
            self.delivery,
            total,
            per(total),
            get,
            write,
            claim,
            cpu,
            gate
        );
    }
}

/// Records measured per row: small batches are repeated (each with its own keys) until this many.
const RECORDS_PER_ROW: usize = 10_000;

/// Batch sizes, records per row, and the claims row's (batch, records). `cargo bench` passes
/// `--bench`; `cargo test --all-targets` runs this binary without it, as a quick smoke test of
/// the bench on small sizes (every figure but the scale is the same code).
fn scale() -> (&'static [usize], usize, (usize, usize)) {
    if std::env::args().any(|a| a == "--bench") {
        (&[100, 1000, 10_000], RECORDS_PER_ROW, (100, 1000))
    } else {
        (&[100], 200, (20, 40))
    }
}

/// `total` records in events of `batch`, each delivered twice through a gate on `store`;
/// `calls` reads the store's request count so far.
async fn run_case<S: IdempotencyStore, K: KeyStrategy>(
    store: S,
    calls: impl Fn() -> BTreeMap<String, u64>,
    (batch, total): (usize, usize),
    key_name: &'static str,
    key: K,
) -> Vec<Row> {
    let repeats = (total / batch).max(1);
    let events: Vec<String> = (0..repeats)
        .map(|r| make_event((r * batch) as u64, batch))
        .collect();

    // The same events without a gate: what the processor itself costs.
    let ungated = Processor::per_record(Nothing, InMemoryDeadLetterSink::new()).config(config());
    measure(&ungated, &events[..1], "warm-up").await;
    let baseline_ns = measure(&ungated, &events, "baseline").await;

    let gated = Processor::per_record(Nothing, InMemoryDeadLetterSink::new())
        .config(config())
        .gate(Idempotency::new(store).key(key));
    // Open connections and fill caches on keys no row uses.
    let warm_up = make_event(1_000_000_000, 50);
    measure(&gated, std::slice::from_ref(&warm_up), "warm-up").await;
    let mut rows = Vec::new();
    for (delivery, request_id) in [("first", "first"), ("redelivery", "again")] {
        let before = calls();
        let cpu_ns = measure(&gated, &events, request_id).await;
        rows.push(Row {
            batch,
            records: batch * repeats,
            key: key_name,
            delivery,
            calls: since(&before, calls()),
            cpu_ns,
            baseline_ns,
        });
    }
    rows
}

fn header(title: &str) {
    println!();
    println!("{title}");
    println!();
    println!(
        "| batch | key              | delivery   |  calls | /record |  get | write | claim | cpu µs/r | gate µs/r |"
    );
    println!(
        "|------:|------------------|------------|-------:|--------:|-----:|------:|------:|---------:|----------:|"
    );
}

/// Worst figures of the default-key rows.
#[derive(Default)]
struct Worst {
    first: f64,
    again: f64,
    gate_us: f64,
}

impl Worst {
    fn add(&mut self, row: &Row) {
        let per = row.calls.values().sum::<u64>() as f64 / row.records as f64;
        if row.delivery == "first" {
            self.first = self.first.max(per);
        } else {
            self.again = self.again.max(per);
        }
        self.gate_us = self
            .gate_us
            .max(row.cpu_ns.saturating_sub(row.baseline_ns) as f64 / 1000.0 / row.records as f64);
    }
}

async fn run() {
    println!("Idempotency gate: store calls and client CPU per record");
    println!(
        "({RECORDS_PER_ROW} records per row (1000 with claims), smaller batches repeated with new \
         keys; calls: requests, per row; cpu: this process, whole invocation; gate: minus the \
         same events without the gate)"
    );

    let (batches, per_row, claims_size) = scale();
    // The gate's own work, without SDK or network: the floor the DynamoDB rows stand on.
    header("in-memory store");
    for &batch in batches {
        let store = Arc::new(InMemoryIdempotencyStore::new());
        let counted = store.clone();
        let size = (batch, per_row);
        let calls = move || memory_calls(&counted);
        for row in run_case(store, calls, size, "record (default)", RecordKey).await {
            row.print();
        }
    }

    let Some(sdk) = shardwise_testkit::moto_config().await else {
        println!();
        println!("DynamoDB rows skipped: set SHARDWISE_MOTO_ENDPOINT to a moto server");
        return;
    };
    let counter = CallCounter::default();
    let client = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&sdk)
            .interceptor(counter.clone())
            .build(),
    );
    let table = || async {
        let name = shardwise_testkit::unique_name("idempotency-bench");
        DynamoDbIdempotencyStore::create_table(&client, &name)
            .await
            .expect("create table on moto");
        DynamoDbIdempotencyStore::new(client.clone(), name)
    };

    header("DynamoDbIdempotencyStore on moto (requests counted by an SDK interceptor)");
    let mut worst = Worst::default();
    for &batch in batches {
        let size = (batch, per_row);
        let calls = || counter.snapshot();
        for row in run_case(table().await, calls, size, "record (default)", RecordKey).await {
            row.print();
            worst.add(&row);
        }
    }
    // moto copies the whole table for every TransactWriteItems (and fails concurrent ones with a
    // 500 now and then, which the gate retries): keep this table small.
    let claims = JsonFieldKey::new("transaction_id");
    let calls = || counter.snapshot();
    for row in run_case(table().await, calls, claims_size, "transaction_id", claims).await {
        row.print();
    }
    println!();
    println!(
        "default key on DynamoDB, worst row: {:.3} calls/record on first delivery (target ≤ 0.05), \
         {:.3} on redelivery (target ≤ 0.01), {:.1} µs gate CPU/record (target ≤ 20)",
        worst.first, worst.again, worst.gate_us
    );
    println!(
        "Powertools for AWS Lambda (Python), for comparison: 2.0 and 1.03 calls/record, ~2 ms CPU/record"
    );
}

fn main() {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}
