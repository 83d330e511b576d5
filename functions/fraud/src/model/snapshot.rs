//! Where a shard's model is kept between instances: one item per shard in the card state table
//! (`CARD_STATE_TABLE`), partition key `#model#<shard id>`, the snapshot a binary attribute.
//!
//! # Why the card state table, and why it fits
//! The snapshot shares the card histories' lifecycle — backups, encryption key, deletion
//! protection, TTL, the function's grants — so it lives beside them instead of in a resource of
//! its own. A snapshot is the trees' samples (40 bytes a point) and the category counts: 210 KB
//! at the default 40 trees of 128 points, under DynamoDB's 400 KB item limit; settings whose
//! snapshot could exceed it are refused at start-up ([`snapshot_size_bound`]). A snapshot costs
//! one `PutItem` per shard per interval (about 210 write units a minute per shard by default).
//!
//! Writes are conditional on the version read (`version`), as card states are: when another
//! instance wrote the shard's model since (a shard handed over), the write is refused and this
//! instance reloads the stored model rather than overwrite it.
//!
//! # Format
//! Little-endian: magic `SWRCF1`, dimensions, trees, sample size, time decay, seed, updates,
//! the forest's generator; the category counts; per tree its generator and `(weight, point)`
//! samples. Anything else is [`SnapshotError::Unreadable`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;

use super::forest::{DIMS, Forest, ForestConfig, Point};
use super::{MAX_CATEGORIES, ShardModel};
use crate::rules::AnomalyRule;
use crate::state::attr;

/// Partition keys of model items start with this; no transaction may use it as a card id.
pub const MODEL_KEY_PREFIX: &str = "#model#";
/// The binary attribute holding the snapshot.
pub const SNAPSHOT_ATTR: &str = "snapshot";

const MAGIC: &[u8; 6] = b"SWRCF1";
/// Longest category name a snapshot keeps (merchant category codes are 4 digits).
pub(crate) const MAX_CATEGORY_LEN: usize = 16;
/// What a snapshot item may use of DynamoDB's 400 KB, leaving room for the other attributes.
pub const MAX_SNAPSHOT_BYTES: usize = 399_000;

/// The largest snapshot a model of this size can write.
pub fn snapshot_size_bound(trees: usize, sample_size: usize) -> usize {
    let header = MAGIC.len() + 3 * 4 + 4 * 8 + 4;
    let categories = MAX_CATEGORIES * (1 + MAX_CATEGORY_LEN + 8);
    let per_tree = 8 + 4 + sample_size.saturating_mul(8 + 4 * DIMS);
    header + categories + trees.saturating_mul(per_tree)
}

/// A snapshot call that failed, or a snapshot that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Another instance wrote the shard's model since it was read.
    #[error("model snapshot of {shard_id} changed since it was read")]
    Conflict { shard_id: String },
    #[error("model snapshot store unavailable: {0}")]
    Unavailable(String),
    #[error("model snapshot store rejected the request: {0}")]
    Rejected(String),
    #[error("model snapshot unreadable: {0}")]
    Unreadable(String),
    /// Written by a model of another size: the settings changed.
    #[error("model snapshot is of {found}, the settings ask for {wanted}")]
    OtherSize { found: String, wanted: String },
}

/// A stored snapshot and the version to write the next one against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    pub version: u64,
    pub bytes: Vec<u8>,
}

/// Shard models' snapshots; every method is one backend call.
pub trait ModelStore: Send + Sync {
    fn load(
        &self,
        shard_id: &str,
    ) -> impl Future<Output = Result<Option<StoredSnapshot>, SnapshotError>> + Send;

    /// Write a snapshot if the stored version is `version` (0: none stored); it is stored as
    /// `version + 1`.
    fn save(
        &self,
        shard_id: &str,
        bytes: &[u8],
        version: u64,
        now_ms: i64,
    ) -> impl Future<Output = Result<(), SnapshotError>> + Send;
}

impl ShardModel {
    /// The model as snapshot bytes.
    pub fn to_snapshot(&self) -> Vec<u8> {
        let config = self.forest.config();
        let mut out = Vec::with_capacity(snapshot_size_bound(config.trees, config.sample_size));
        out.extend_from_slice(MAGIC);
        for n in [DIMS, config.trees, config.sample_size] {
            out.extend_from_slice(&(n as u32).to_le_bytes());
        }
        out.extend_from_slice(&config.time_decay.to_le_bytes());
        out.extend_from_slice(&config.seed.to_le_bytes());
        out.extend_from_slice(&self.forest.updates().to_le_bytes());
        out.extend_from_slice(&self.forest.rng_state().to_le_bytes());
        let mut categories: Vec<(&String, &f64)> = self
            .categories
            .iter()
            .filter(|(name, _)| name.len() <= MAX_CATEGORY_LEN)
            .collect();
        categories.sort_by(|a, b| a.0.cmp(b.0));
        out.extend_from_slice(&(categories.len() as u32).to_le_bytes());
        for (name, count) in categories {
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        for tree in &self.forest.trees {
            out.extend_from_slice(&tree.rng.0.to_le_bytes());
            out.extend_from_slice(&(tree.points.len() as u32).to_le_bytes());
            for (point, weight) in tree.points.iter().zip(&tree.weights) {
                out.extend_from_slice(&weight.to_le_bytes());
                for x in point {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        out
    }

    /// The model a snapshot holds, if it is of the size `rule` asks for.
    pub fn from_snapshot(bytes: &[u8], rule: &AnomalyRule) -> Result<Self, SnapshotError> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(MAGIC.len())? != MAGIC {
            return Err(SnapshotError::Unreadable("not a model snapshot".into()));
        }
        let (dims, trees, sample_size) = (r.u32()? as usize, r.u32()? as usize, r.u32()? as usize);
        if (dims, trees, sample_size) != (DIMS, rule.trees, rule.sample_size) {
            return Err(SnapshotError::OtherSize {
                found: format!("{trees} trees of {sample_size} points in {dims} dimensions"),
                wanted: format!(
                    "{} trees of {} points in {DIMS} dimensions",
                    rule.trees, rule.sample_size
                ),
            });
        }
        let time_decay = r.f64()?;
        let seed = r.u64()?;
        let updates = r.u64()?;
        let rng = r.u64()?;
        let n_categories = r.u32()? as usize;
        if n_categories > MAX_CATEGORIES {
            return Err(SnapshotError::Unreadable(format!(
                "{n_categories} categories (at most {MAX_CATEGORIES})"
            )));
        }
        let mut categories = HashMap::with_capacity(n_categories);
        for _ in 0..n_categories {
            let len = usize::from(r.take(1)?[0]);
            let name = std::str::from_utf8(r.take(len)?)
                .map_err(|_| SnapshotError::Unreadable("a category is not UTF-8".into()))?
                .to_owned();
            let count = r.f64()?;
            if !(count.is_finite() && count >= 0.0) {
                return Err(SnapshotError::Unreadable(format!(
                    "category {name} counted {count}"
                )));
            }
            categories.insert(name, count);
        }
        let mut samples = Vec::with_capacity(trees);
        for tree in 0..trees {
            let tree_rng = r.u64()?;
            let len = r.u32()? as usize;
            if len > sample_size {
                return Err(SnapshotError::Unreadable(format!(
                    "tree {tree} holds {len} points (sample size {sample_size})"
                )));
            }
            let mut points = Vec::with_capacity(len);
            for _ in 0..len {
                let weight = r.f64()?;
                let mut point: Point = [0.0; DIMS];
                for x in &mut point {
                    *x = f32::from_le_bytes(r.array()?);
                }
                if !weight.is_finite() || point.iter().any(|x| !x.is_finite()) {
                    return Err(SnapshotError::Unreadable(format!(
                        "tree {tree} holds a non-finite value"
                    )));
                }
                points.push((weight, point));
            }
            samples.push((tree_rng, points));
        }
        if r.at != bytes.len() {
            return Err(SnapshotError::Unreadable(format!(
                "{} bytes after the last tree",
                bytes.len() - r.at
            )));
        }
        let config = ForestConfig {
            trees,
            sample_size,
            time_decay,
            seed,
        };
        let category_total = categories.values().sum();
        Ok(Self {
            forest: Forest::restore(config, updates, rng, samples),
            categories,
            category_total,
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(SnapshotError::Unreadable(format!(
                "cut short at byte {} of {}",
                self.at,
                self.bytes.len()
            )));
        };
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn f64(&mut self) -> Result<f64, SnapshotError> {
        Ok(f64::from_le_bytes(self.array()?))
    }
}

/// The item of a shard's snapshot (shared by the DynamoDB and SQLite stores).
pub(crate) fn snapshot_item(
    shard_id: &str,
    bytes: &[u8],
    version: u64,
    now_ms: i64,
    ttl_seconds: Option<i64>,
) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::from([
        (
            attr::CARD_ID.to_owned(),
            AttributeValue::S(format!("{MODEL_KEY_PREFIX}{shard_id}")),
        ),
        (
            attr::VERSION.to_owned(),
            AttributeValue::N((version + 1).to_string()),
        ),
        (
            SNAPSHOT_ATTR.to_owned(),
            AttributeValue::B(Blob::new(bytes.to_vec())),
        ),
        (
            attr::UPDATED_AT.to_owned(),
            AttributeValue::N(now_ms.to_string()),
        ),
    ]);
    if let Some(ttl) = ttl_seconds {
        item.insert(
            attr::EXPIRATION.to_owned(),
            AttributeValue::N((now_ms / 1000 + ttl).to_string()),
        );
    }
    item
}

pub(crate) fn parse_snapshot_item(
    item: &HashMap<String, AttributeValue>,
) -> Result<StoredSnapshot, SnapshotError> {
    let version = match item.get(attr::VERSION) {
        Some(AttributeValue::N(n)) => n
            .parse()
            .map_err(|_| SnapshotError::Unreadable(format!("version is {n:?}")))?,
        _ => return Err(SnapshotError::Unreadable("no version".into())),
    };
    match item.get(SNAPSHOT_ATTR) {
        Some(AttributeValue::B(blob)) => Ok(StoredSnapshot {
            version,
            bytes: blob.as_ref().to_vec(),
        }),
        _ => Err(SnapshotError::Unreadable(format!(
            "no binary {SNAPSHOT_ATTR} attribute"
        ))),
    }
}

/// Snapshots in the card state table.
#[derive(Debug, Clone)]
pub struct DynamoDbModelStore {
    client: Client,
    table: String,
    ttl_seconds: Option<i64>,
}

impl DynamoDbModelStore {
    pub fn new(client: Client, table: impl Into<String>, ttl_seconds: Option<i64>) -> Self {
        Self {
            client,
            table: table.into(),
            ttl_seconds,
        }
    }
}

fn classify<E>(error: SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>) -> SnapshotError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let text = aws_sdk_dynamodb::error::DisplayErrorContext(&error).to_string();
    if shardwise_aws::retryable::classify(&error).is_retryable() {
        SnapshotError::Unavailable(text)
    } else {
        SnapshotError::Rejected(text)
    }
}

impl ModelStore for DynamoDbModelStore {
    async fn load(&self, shard_id: &str) -> Result<Option<StoredSnapshot>, SnapshotError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(
                attr::CARD_ID,
                AttributeValue::S(format!("{MODEL_KEY_PREFIX}{shard_id}")),
            )
            .consistent_read(true)
            .send()
            .await
            .map_err(classify)?;
        output.item().map(parse_snapshot_item).transpose()
    }

    async fn save(
        &self,
        shard_id: &str,
        bytes: &[u8],
        version: u64,
        now_ms: i64,
    ) -> Result<(), SnapshotError> {
        let item = snapshot_item(shard_id, bytes, version, now_ms, self.ttl_seconds);
        let request = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item));
        let request = if version == 0 {
            request
                .condition_expression("attribute_not_exists(#id)")
                .expression_attribute_names("#id", attr::CARD_ID)
        } else {
            request
                .condition_expression("#v = :v")
                .expression_attribute_names("#v", attr::VERSION)
                .expression_attribute_values(":v", AttributeValue::N(version.to_string()))
        };
        match request.send().await {
            Ok(_) => Ok(()),
            Err(error) if error.code() == Some("ConditionalCheckFailedException") => {
                Err(SnapshotError::Conflict {
                    shard_id: shard_id.to_owned(),
                })
            }
            Err(error) => Err(classify(error)),
        }
    }
}

/// Snapshots in memory, with the same version conditions; counts writes.
#[derive(Debug, Default)]
pub struct InMemoryModelStore {
    inner: Mutex<HashMap<String, StoredSnapshot>>,
    saves: Mutex<u32>,
}

impl InMemoryModelStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, shard_id: &str) -> Option<StoredSnapshot> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(shard_id)
            .cloned()
    }

    /// Snapshots written.
    pub fn saves(&self) -> u32 {
        *self
            .saves
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ModelStore for InMemoryModelStore {
    async fn load(&self, shard_id: &str) -> Result<Option<StoredSnapshot>, SnapshotError> {
        Ok(self.get(shard_id))
    }

    async fn save(
        &self,
        shard_id: &str,
        bytes: &[u8],
        version: u64,
        _now_ms: i64,
    ) -> Result<(), SnapshotError> {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if inner.get(shard_id).map_or(0, |s| s.version) != version {
            return Err(SnapshotError::Conflict {
                shard_id: shard_id.to_owned(),
            });
        }
        inner.insert(
            shard_id.to_owned(),
            StoredSnapshot {
                version: version + 1,
                bytes: bytes.to_vec(),
            },
        );
        *self
            .saves
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::rules::RuleSet;

    fn model() -> (ShardModel, AnomalyRule) {
        let rule = RuleSet::default().anomaly;
        let mut model = ShardModel::new(&rule, 3);
        for i in 0..3000u32 {
            let x = (i % 97) as f32 / 97.0;
            let p = [x, 1.0 - x, x * x, 0.2, 0.0, 0.5, 0.1, 0.0];
            model.learn(&p, ["5411", "5812", "4111"][i as usize % 3]);
        }
        (model, rule)
    }

    #[test]
    fn a_snapshot_restores_the_samples_and_scores_alike() {
        let (model, rule) = model();
        let bytes = model.to_snapshot();
        assert!(bytes.len() <= snapshot_size_bound(rule.trees, rule.sample_size));
        let back = ShardModel::from_snapshot(&bytes, &rule).unwrap();
        assert_eq!(back.forest.updates(), model.forest.updates());
        assert_eq!(back.categories, model.categories);
        // The same samples.
        for (a, b) in model.forest.trees.iter().zip(&back.forest.trees) {
            assert_eq!((&a.points, &a.weights), (&b.points, &b.weights));
        }
        // Rebuilt trees: scores agree in distribution, not bit for bit.
        let odd = [3.0, 0.0, 0.0, 0.2, 0.0, 0.5, 0.1, 0.0];
        let usual = [0.5, 0.5, 0.25, 0.2, 0.0, 0.5, 0.1, 0.0];
        for q in [odd, usual] {
            let (a, b) = (model.forest.score(&q), back.forest.score(&q));
            assert!((a - b).abs() < 0.15 * a.max(1.0), "{a} vs {b}");
        }
        assert!(back.forest.score(&odd) > 2.0 * back.forest.score(&usual));
    }

    #[test]
    fn the_default_model_fits_in_a_dynamodb_item() {
        let rule = RuleSet::default().anomaly;
        assert!(snapshot_size_bound(rule.trees, rule.sample_size) <= MAX_SNAPSHOT_BYTES);
        let (model, _) = model();
        assert!(model.to_snapshot().len() < 220_000);
    }

    #[test]
    fn bad_snapshots_are_refused_with_the_reason() {
        let (model, rule) = model();
        let bytes = model.to_snapshot();
        for cut in [0, 5, 40, bytes.len() - 1] {
            let err = ShardModel::from_snapshot(&bytes[..cut], &rule).unwrap_err();
            assert!(matches!(err, SnapshotError::Unreadable(_)), "{err}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            ShardModel::from_snapshot(&longer, &rule),
            Err(SnapshotError::Unreadable(_))
        ));
        let mut bigger = rule.clone();
        bigger.trees = 50;
        let err = ShardModel::from_snapshot(&bytes, &bigger).unwrap_err();
        assert!(err.to_string().contains("40 trees"), "{err}");
    }

    #[test]
    fn items_round_trip_and_writes_are_versioned() {
        let item = snapshot_item("shardId-1", b"abc", 4, 1_700_000_000_000, Some(60));
        assert_eq!(
            item[attr::CARD_ID],
            AttributeValue::S("#model#shardId-1".into())
        );
        let back = parse_snapshot_item(&item).unwrap();
        assert_eq!(
            back,
            StoredSnapshot {
                version: 5,
                bytes: b"abc".to_vec()
            }
        );
        let store = InMemoryModelStore::new();
        let run = |f| tokio_test_block_on(f);
        run(store.save("s", b"1", 0, 0)).unwrap();
        assert!(matches!(
            run(store.save("s", b"2", 0, 0)),
            Err(SnapshotError::Conflict { .. })
        ));
        run(store.save("s", b"2", 1, 0)).unwrap();
        assert_eq!(store.get("s").unwrap().bytes, b"2");
    }

    fn tokio_test_block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }
}
