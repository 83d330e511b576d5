//! What the anomaly model costs per record, and what the whole fraud path costs per record.
//!
//! `cargo bench -p fraud --bench model` prints, for the default model (40 trees of 128 points):
//! - score + update per record (the work the model adds to every transaction), and each alone;
//! - attribution (only computed for alerted transactions);
//! - snapshot size, encode and restore time;
//! - the full path: `Processor::process` of the fraud function (decode, card grouping, rules,
//!   features, model score and update, alert decisions, in-memory state and alert stores) on
//!   events of 100 transactions of the labelled set, per record.
//!
//! Only same-run ratios are stable on shared machines: each figure is the fastest of its
//! repetitions. `-- --quick` runs fewer repetitions.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use fraud::FraudHandler;
use fraud::alert::InMemoryAlertSink;
use fraud::model::{DIMS, Point, ShardModel};
use fraud::rules::RuleSet;
use fraud::state::InMemoryCardStateStore;
use shardwise::clock::ManualClock;
use shardwise::config::{CommonSettings, Env};
use shardwise::testing::{event_json, plain, sequence_number};
use shardwise::{InMemoryDeadLetterSink, Invocation};
use shardwise_cards::canary::InMemoryCanaryAckStore;
use shardwise_cards::generator::{ScenarioOptions, scenario};

/// SplitMix64, for points that look like the features of ordinary traffic.
struct Points(u64);

impl Points {
    fn unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }

    fn next(&mut self) -> Point {
        let mut p = [0.0; DIMS];
        for x in &mut p {
            *x = self.unit() + self.unit() - 1.0;
        }
        // One point in a hundred far out in one feature.
        if self.unit() < 0.01 {
            p[(self.unit() * DIMS as f32) as usize % DIMS] += 5.0;
        }
        p
    }
}

fn fastest(reps: usize, mut run: impl FnMut() -> Duration) -> Duration {
    (0..reps).map(|_| run()).min().unwrap_or_default()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 3 } else { 7 };
    let rules = RuleSet::default();
    let rule = &rules.anomaly;
    let mut model = ShardModel::new(rule, 1);
    let mut points = Points(7);
    for _ in 0..20_000 {
        model.learn(&points.next(), "5411");
    }
    let n = 20_000;
    let stream: Vec<Point> = (0..n).map(|_| points.next()).collect();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;

    let both = fastest(reps, || {
        let started = Instant::now();
        for p in &stream {
            black_box(model.forest.score(p));
            model.forest.update(p);
        }
        started.elapsed()
    });
    let score = fastest(reps, || {
        let started = Instant::now();
        for p in &stream {
            black_box(model.forest.score(p));
        }
        started.elapsed()
    });
    let update = fastest(reps, || {
        let started = Instant::now();
        for p in &stream {
            model.forest.update(p);
        }
        started.elapsed()
    });
    let explained = fastest(reps, || {
        let started = Instant::now();
        for p in stream.iter().take(2000) {
            black_box(model.explain(p));
        }
        started.elapsed() * (n as u32 / 2000)
    });
    println!(
        "model: {} trees × {} points, {DIMS} features",
        rule.trees, rule.sample_size
    );
    println!("  score + update   {:>7.2} µs/record", per(both));
    println!("  score alone      {:>7.2} µs/record", per(score));
    println!("  update alone     {:>7.2} µs/record", per(update));
    println!("  attribution      {:>7.2} µs/alert", per(explained));

    let snapshot = model.to_snapshot();
    let encode = fastest(reps, || {
        let started = Instant::now();
        black_box(model.to_snapshot());
        started.elapsed()
    });
    let restore = fastest(reps, || {
        let started = Instant::now();
        black_box(ShardModel::from_snapshot(&snapshot, rule).unwrap());
        started.elapsed()
    });
    println!(
        "  snapshot         {} bytes, encode {:.2} ms, restore {:.2} ms",
        snapshot.len(),
        encode.as_secs_f64() * 1e3,
        restore.as_secs_f64() * 1e3
    );

    // The full path, on the labelled set's transactions.
    let set = scenario(&ScenarioOptions {
        cards: 300,
        warmup_days: 10,
        days: 5,
        incidents_per_pattern: 20,
        ..ScenarioOptions::default()
    });
    let events: Vec<String> = set
        .chunks(100)
        .enumerate()
        .map(|(b, chunk)| {
            let records: Vec<_> = chunk
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    plain(
                        &l.record.partition_key,
                        &sequence_number((b * 100 + i) as u64),
                        &l.record.data,
                    )
                })
                .collect();
            event_json(&records)
        })
        .collect();
    let records = set.len();
    let common = CommonSettings::from_env(&Env(std::collections::HashMap::from([(
        "DEAD_LETTER_QUEUE_URL",
        "memory",
    )])))
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let full = fastest(reps.min(3), || {
        let handler = FraudHandler::new(
            InMemoryCardStateStore::new(),
            InMemoryAlertSink::new(),
            InMemoryCanaryAckStore::new(),
            ManualClock::new(set.last().map_or(0, |l| l.at_ms)),
            rules.clone(),
        );
        let processor = fraud::processor(handler, InMemoryDeadLetterSink::new(), &common);
        let started = Instant::now();
        for event in &events {
            runtime
                .block_on(processor.process(event.as_bytes(), &Invocation::unbounded("bench")))
                .unwrap();
        }
        started.elapsed()
    });
    println!(
        "full fraud path: {:.2} µs/record ({records} records in events of 100, in-memory stores)",
        full.as_secs_f64() * 1e6 / records as f64
    );
}
