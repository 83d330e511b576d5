//! Counters of one function's mapping, shared by its shard workers and read by the live view,
//! the summary and the dashboard (which turns them into per-second rates): one set of counters,
//! so the page and the summary cannot disagree.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Upper bounds (inclusive) of the batch-size buckets; the last bucket takes the rest.
pub const BATCH_SIZE_BUCKETS: [u64; 4] = [1, 9, 99, 999];

/// What one shard's worker of one function did. Bytes are what Kinesis counts against a
/// shard's limits: data plus partition key.
#[derive(Debug, Default)]
pub struct ShardStats {
    pub records_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub records_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Age of the last record handed to the function, ms (0 once the shard is caught up).
    pub iterator_age_ms: AtomicI64,
}

/// What the live view and the summary show per function.
#[derive(Debug, Default)]
pub struct MappingStats {
    /// Records read from the stream.
    pub records_in: AtomicU64,
    /// Bytes (data + partition key) of the records read.
    pub bytes_in: AtomicU64,
    /// Records dropped by filter criteria.
    pub filtered: AtomicU64,
    /// Records acknowledged by the function (checkpointed past after a successful invoke).
    pub records_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Records discarded by the mapping (retries or age exhausted), sent to on-failure.
    pub discarded: AtomicU64,
    pub invokes: AtomicU64,
    /// Invocations by the records they carried, bucketed by [`BATCH_SIZE_BUCKETS`] (a window's
    /// final invoke, which carries none, is left out).
    pub batch_sizes: [AtomicU64; BATCH_SIZE_BUCKETS.len() + 1],
    /// Records carried by invocations (retries and bisected halves count again).
    pub invoked_records: AtomicU64,
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
    /// Per shard, in the order the workers started.
    shards: Mutex<Vec<(String, Arc<ShardStats>)>>,
}

const LATENCY_SAMPLES: usize = 200_000;

impl MappingStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// The counters of `shard`, created on first use.
    pub fn shard(&self, shard: &str) -> Arc<ShardStats> {
        let mut shards = self
            .shards
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, stats)) = shards.iter().find(|(id, _)| id == shard) {
            return stats.clone();
        }
        let stats = Arc::new(ShardStats::default());
        shards.push((shard.to_owned(), stats.clone()));
        stats
    }

    /// Every shard's counters, in the order the workers started.
    pub fn shards(&self) -> Vec<(String, Arc<ShardStats>)> {
        self.shards
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Count one invocation carrying `records` records.
    pub fn record_batch(&self, records: usize) {
        let records = records as u64;
        let bucket = BATCH_SIZE_BUCKETS
            .iter()
            .position(|&max| records <= max)
            .unwrap_or(BATCH_SIZE_BUCKETS.len());
        Self::add(&self.batch_sizes[bucket], 1);
        Self::add(&self.invoked_records, records);
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
        let (at, count) = self.latency_quantiles(&[0.5, 0.99])?;
        Some((at[0], at[1], count))
    }

    /// Put-to-acknowledged latency at each of `quantiles` (0..=1), ms, and the sample's size.
    pub fn latency_quantiles(&self, quantiles: &[f64]) -> Option<(Vec<u32>, usize)> {
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
        Some((quantiles.iter().map(|&q| at(q)).collect(), sample.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fall_in_their_bucket() {
        let stats = MappingStats::default();
        for records in [1, 2, 9, 10, 100, 999, 1000, 10_000] {
            stats.record_batch(records);
        }
        let buckets: Vec<u64> = stats.batch_sizes.iter().map(MappingStats::get).collect();
        assert_eq!(buckets, [1, 2, 1, 2, 2]);
        assert_eq!(MappingStats::get(&stats.invoked_records), 12_121);
    }

    #[test]
    fn a_shard_has_one_set_of_counters() {
        let stats = MappingStats::default();
        MappingStats::add(&stats.shard("shardId-000000000001").records_in, 2);
        MappingStats::add(&stats.shard("shardId-000000000000").records_in, 1);
        MappingStats::add(&stats.shard("shardId-000000000001").records_in, 3);
        let shards: Vec<(String, u64)> = stats
            .shards()
            .into_iter()
            .map(|(id, s)| (id, MappingStats::get(&s.records_in)))
            .collect();
        assert_eq!(
            shards,
            [
                ("shardId-000000000001".to_owned(), 5),
                ("shardId-000000000000".to_owned(), 1)
            ]
        );
    }
}
