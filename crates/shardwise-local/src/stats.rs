//! Counters of one function's mapping, shared by its shard workers and read by the live view.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// What the live view and the summary show per function.
#[derive(Debug, Default)]
pub struct MappingStats {
    /// Records read from the stream.
    pub records_in: AtomicU64,
    /// Records dropped by filter criteria.
    pub filtered: AtomicU64,
    /// Records acknowledged by the function (checkpointed past after a successful invoke).
    pub records_out: AtomicU64,
    /// Records discarded by the mapping (retries or age exhausted), sent to on-failure.
    pub discarded: AtomicU64,
    pub invokes: AtomicU64,
    pub function_errors: AtomicU64,
    pub partial_failures: AtomicU64,
    pub retries: AtomicU64,
    pub bisects: AtomicU64,
    pub on_failure_records: AtomicU64,
    pub windows_closed: AtomicU64,
    pub windows_terminated_early: AtomicU64,
    /// Tumbling windows open now (across shards).
    pub open_windows: AtomicI64,
    /// Largest iterator age seen in the last reads, ms.
    pub iterator_age_ms: AtomicI64,
    /// Put-to-acknowledged latencies (ms), a bounded sample for percentiles.
    latencies: Mutex<Vec<u32>>,
}

const LATENCY_SAMPLES: usize = 200_000;

impl MappingStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn record_latencies(&self, latencies: impl IntoIterator<Item = i64>) {
        let mut sample = self
            .latencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for latency in latencies {
            if sample.len() < LATENCY_SAMPLES {
                sample.push(u32::try_from(latency.max(0)).unwrap_or(u32::MAX));
            }
        }
    }

    /// (p50, p99, count) of put-to-acknowledged latency, ms.
    pub fn latency_percentiles(&self) -> Option<(u32, u32, usize)> {
        let mut sample = self
            .latencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if sample.is_empty() {
            return None;
        }
        sample.sort_unstable();
        let at = |q: f64| {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let index = ((sample.len() - 1) as f64 * q).round() as usize;
            sample[index.min(sample.len() - 1)]
        };
        Some((at(0.5), at(0.99), sample.len()))
    }
}
