//! The streaming anomaly model: one Random Cut Forest per shard over each transaction's
//! features, scored and then updated with every transaction the function applies.
//!
//! - [`forest`]: the Random Cut Forest itself.
//! - [`features`]: what it sees of a transaction.
//! - [`snapshot`]: where a shard's model is kept between instances ([`ModelStore`]).
//!
//! # Why per shard, in memory, and snapshotted
//! Lambda sends one shard's batches to one invocation at a time, so a model per shard is never
//! updated by two batches at once, and needs no lock held across calls. It lives in the
//! instance's memory, where updating it costs microseconds; every `snapshot_interval` it is
//! written to the store so a cold start (or another instance taking the shard over) resumes it
//! instead of learning from nothing. A snapshot holds the trees' samples, from which the trees
//! are rebuilt: random cut trees built over a sample are distributed as the ones grown point by
//! point (Guha et al., theorem 1), so a restored forest scores as the original did, in
//! distribution.
//!
//! # Why a redelivered transaction is learned once
//! The model learns a transaction only after the card state that applied it was written: the
//! card's sequence guard is what decides a record is new, and a transaction whose card write
//! failed is learned when its retry succeeds. A redelivery after a cold start finds the cards'
//! guards ahead of the snapshot and skips the records, so the model misses at most the last
//! snapshot interval's transactions, and never counts one twice.

pub mod features;
pub mod forest;
pub mod snapshot;

use std::collections::HashMap;

pub use features::Feature;
pub use forest::{DIMS, Forest, ForestConfig, Point};
pub use snapshot::{
    DynamoDbModelStore, InMemoryModelStore, ModelStore, SnapshotError, StoredSnapshot,
};

use crate::rules::AnomalyRule;

/// Merchant categories a shard's model counts; the rarest are dropped beyond this.
const MAX_CATEGORIES: usize = 400;
/// Category counts are halved when they reach this total, so rarity follows recent traffic.
const CATEGORY_HALF_LIFE: f64 = 20_000.0;

/// One shard's model: the forest and the shard's merchant-category frequencies.
#[derive(Debug, Clone)]
pub struct ShardModel {
    pub forest: Forest,
    pub(crate) categories: HashMap<String, f64>,
    pub(crate) category_total: f64,
}

/// What the model says of one transaction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    pub point: Point,
    /// `None` while the model is warming up.
    pub score: Option<f64>,
}

/// A feature's part of an anomaly score, for the alert.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Contribution {
    pub feature: Feature,
    /// The feature's value (scaled as the model sees it).
    pub value: f32,
    /// Its part of the score.
    pub score: f64,
}

impl ShardModel {
    pub fn new(rule: &AnomalyRule, seed: u64) -> Self {
        Self {
            forest: Forest::new(ForestConfig::new(rule.trees, rule.sample_size, seed)),
            categories: HashMap::new(),
            category_total: 0.0,
        }
    }

    /// The share of the shard's recent transactions in `category`, counting this one (so a
    /// category never seen has the share of one transaction).
    pub fn category_share(&self, category: &str) -> f64 {
        let count = self.categories.get(category).copied().unwrap_or(0.0) + 1.0;
        count / (self.category_total + 1.0)
    }

    /// Score a point (before learning it).
    pub fn judge(&self, rule: &AnomalyRule, point: Point) -> Verdict {
        Verdict {
            point,
            score: (self.forest.updates() >= rule.warmup).then(|| self.forest.score(&point)),
        }
    }

    /// The features that drove a score, largest part first; those under a tenth of it left out.
    pub fn explain(&self, point: &Point) -> Vec<Contribution> {
        let parts = self.forest.attribution(point);
        let total: f64 = parts.iter().sum();
        let mut out: Vec<Contribution> = Feature::ALL
            .iter()
            .zip(parts)
            .zip(point)
            .filter(|((_, part), _)| *part >= 0.1 * total)
            .map(|((&feature, part), &value)| Contribution {
                feature,
                value,
                score: part,
            })
            .collect();
        out.sort_by(|a, b| b.score.total_cmp(&a.score));
        out
    }

    /// Learn a transaction.
    pub fn learn(&mut self, point: &Point, category: &str) {
        self.forest.update(point);
        *self.categories.entry(category.to_owned()).or_default() += 1.0;
        self.category_total += 1.0;
        if self.category_total >= CATEGORY_HALF_LIFE {
            self.categories.values_mut().for_each(|c| *c /= 2.0);
            self.categories.retain(|_, c| *c >= 0.5);
            self.category_total = self.categories.values().sum();
        }
        if self.categories.len() > MAX_CATEGORIES {
            let mut counts: Vec<f64> = self.categories.values().copied().collect();
            counts.sort_by(f64::total_cmp);
            let cut = counts[self.categories.len() - MAX_CATEGORIES];
            self.categories.retain(|_, c| *c > cut);
            self.category_total = self.categories.values().sum();
        }
    }
}

/// The model's seed for a shard: fixed per shard, so a replay is reproducible.
pub fn shard_seed(shard_id: &str) -> u64 {
    // FNV-1a.
    shard_id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
