//! Distinct cards per window and category: exact while small, a HyperLogLog past that.
//!
//! The set lives in the window state, which Lambda caps at 1 MB per shard, across every merchant
//! category of the window. A window-category pair usually sees few cards, so up to
//! [`EXACT_LIMIT`] card hashes are kept as they are (exact count, 8 bytes each); past that the
//! set becomes a HyperLogLog of 2^[`PRECISION`] one-byte registers (1 KiB, standard error
//! 1.04/√1024 ≈ 3.3 %), which merges with other sets, so segments of a window flushed early
//! still add up to one estimate.
//!
//! Card ids are hashed with FNV-1a and a MurmurHash3 finalizer rather than std's `DefaultHasher`,
//! whose output may change between Rust releases: the state, and the sketches written to
//! DynamoDB, outlive one build.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Cards kept exactly before the set turns into a sketch.
pub const EXACT_LIMIT: usize = 32;
/// Bits of the hash that pick a register.
pub const PRECISION: u32 = 10;
const REGISTERS: usize = 1 << PRECISION;

const TAG_EXACT: u8 = 0;
const TAG_SKETCH: u8 = 1;

/// A stable 64-bit hash of a card id.
pub fn card_hash(card_id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in card_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits mix poorly; the finalizer spreads every input bit over the whole word.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// The distinct cards of one window and category.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CardSet {
    /// Sorted, without duplicates, at most [`EXACT_LIMIT`] hashes.
    Exact(Vec<u64>),
    /// HyperLogLog registers.
    Sketch(Box<[u8]>),
}

impl Default for CardSet {
    fn default() -> Self {
        Self::Exact(Vec::new())
    }
}

impl CardSet {
    pub fn insert(&mut self, hash: u64) {
        match self {
            Self::Exact(hashes) => {
                if let Err(at) = hashes.binary_search(&hash) {
                    hashes.insert(at, hash);
                    if hashes.len() > EXACT_LIMIT {
                        *self = Self::sketch_of(hashes);
                    }
                }
            }
            Self::Sketch(registers) => add_to_sketch(registers, hash),
        }
    }

    /// Add every card of `other`.
    pub fn merge(&mut self, other: &CardSet) {
        match other {
            Self::Exact(hashes) => {
                for &hash in hashes {
                    self.insert(hash);
                }
            }
            Self::Sketch(theirs) => {
                if let Self::Exact(hashes) = self {
                    *self = Self::sketch_of(hashes);
                }
                if let Self::Sketch(ours) = self {
                    for (mine, their) in ours.iter_mut().zip(theirs.iter()) {
                        *mine = (*mine).max(*their);
                    }
                }
            }
        }
    }

    /// The number of distinct cards: exact for an exact set, estimated for a sketch.
    pub fn estimate(&self) -> u64 {
        match self {
            Self::Exact(hashes) => hashes.len() as u64,
            Self::Sketch(registers) => estimate_sketch(registers),
        }
    }

    pub fn is_exact(&self) -> bool {
        matches!(self, Self::Exact(_))
    }

    /// One tag byte, then the hashes (little-endian) or the registers.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::Exact(hashes) => {
                let mut out = Vec::with_capacity(1 + hashes.len() * 8);
                out.push(TAG_EXACT);
                for hash in hashes {
                    out.extend_from_slice(&hash.to_le_bytes());
                }
                out
            }
            Self::Sketch(registers) => {
                let mut out = Vec::with_capacity(1 + registers.len());
                out.push(TAG_SKETCH);
                out.extend_from_slice(registers);
                out
            }
        }
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CardSetError> {
        match bytes.split_first() {
            Some((&TAG_EXACT, body)) if body.len() % 8 == 0 && body.len() / 8 <= EXACT_LIMIT => {
                let mut hashes: Vec<u64> = body
                    .chunks_exact(8)
                    .map(|chunk| {
                        let mut word = [0u8; 8];
                        word.copy_from_slice(chunk);
                        u64::from_le_bytes(word)
                    })
                    .collect();
                hashes.sort_unstable();
                hashes.dedup();
                Ok(Self::Exact(hashes))
            }
            Some((&TAG_SKETCH, body)) if body.len() == REGISTERS => {
                let limit = u8::try_from(64 - PRECISION + 1).unwrap_or(u8::MAX);
                if body.iter().any(|&rank| rank > limit) {
                    return Err(CardSetError("a register is out of range".to_owned()));
                }
                Ok(Self::Sketch(body.into()))
            }
            Some((tag, body)) => Err(CardSetError(format!(
                "tag {tag} with {} bytes is neither {EXACT_LIMIT} hashes at most nor {REGISTERS} registers",
                body.len()
            ))),
            None => Err(CardSetError("no bytes".to_owned())),
        }
    }

    fn sketch_of(hashes: &[u64]) -> Self {
        let mut registers = vec![0u8; REGISTERS].into_boxed_slice();
        for &hash in hashes {
            add_to_sketch(&mut registers, hash);
        }
        Self::Sketch(registers)
    }
}

fn add_to_sketch(registers: &mut [u8], hash: u64) {
    let index = usize::try_from(hash >> (64 - PRECISION)).unwrap_or(0);
    let rest = hash << PRECISION;
    // Position of the first 1 bit in the remaining 64 - PRECISION bits (all zero: one past them).
    let rank = rest.leading_zeros().min(64 - PRECISION) + 1;
    if let Some(register) = registers.get_mut(index) {
        *register = (*register).max(u8::try_from(rank).unwrap_or(u8::MAX));
    }
}

fn estimate_sketch(registers: &[u8]) -> u64 {
    let m = registers.len() as f64;
    let alpha = 0.7213 / (1.0 + 1.079 / m);
    let sum: f64 = registers.iter().map(|&r| 2f64.powi(-i32::from(r))).sum();
    let raw = alpha * m * m / sum;
    let zeros = registers.iter().filter(|&&r| r == 0).count();
    // Small ranges: linear counting is the better estimator while registers are still empty.
    let estimate = if raw <= 2.5 * m && zeros > 0 {
        m * (m / zeros as f64).ln()
    } else {
        raw
    };
    // `as` saturates; the estimate is finite and non-negative.
    estimate.round() as u64
}

/// A card set's bytes that do not make a card set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a card set: {0}")]
pub struct CardSetError(pub String);

/// In the window state: the bytes, base64.
impl Serialize for CardSet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64_simd::STANDARD.encode_to_string(self.to_bytes()))
    }
}

impl<'de> Deserialize<'de> for CardSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        let bytes = base64_simd::STANDARD
            .decode_to_vec(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("card set is not base64: {e}")))?;
        Self::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn small_sets_are_exact() {
        let mut set = CardSet::default();
        for card in ["c-1", "c-2", "c-1", "c-3"] {
            set.insert(card_hash(card));
        }
        assert!(set.is_exact());
        assert_eq!(set.estimate(), 3);
        let bytes = set.to_bytes();
        assert_eq!(bytes.len(), 1 + 3 * 8);
        assert_eq!(CardSet::from_bytes(&bytes).unwrap(), set);
    }

    #[test]
    fn large_sets_become_a_sketch_within_its_error() {
        let mut set = CardSet::default();
        for n in 0..=EXACT_LIMIT {
            set.insert(card_hash(&format!("card-{n}")));
        }
        assert!(!set.is_exact());
        // Linear counting: close to exact while most registers are empty.
        assert!(set.estimate().abs_diff(EXACT_LIMIT as u64 + 1) <= 2);
        for n in 0..20_000 {
            set.insert(card_hash(&format!("card-{n}")));
        }
        let estimate = set.estimate() as f64;
        assert!(
            (estimate - 20_000.0).abs() / 20_000.0 < 0.1,
            "estimate {estimate}"
        );
        assert_eq!(set.to_bytes().len(), 1 + 1024);
        assert_eq!(CardSet::from_bytes(&set.to_bytes()).unwrap(), set);
    }

    #[test]
    fn merging_is_a_union() {
        let mut left = CardSet::default();
        let mut right = CardSet::default();
        for n in 0..20 {
            left.insert(card_hash(&format!("card-{n}")));
        }
        for n in 10..30 {
            right.insert(card_hash(&format!("card-{n}")));
        }
        let mut exact = left.clone();
        exact.merge(&right);
        assert_eq!(exact.estimate(), 30);

        let mut big = CardSet::default();
        for n in 0..5000 {
            big.insert(card_hash(&format!("card-{n}")));
        }
        left.merge(&big);
        let mut other_way = big.clone();
        other_way.merge(&CardSet::default());
        assert_eq!(left, big, "the sketch already held cards 0..20");
        assert_eq!(other_way, big);
    }

    #[test]
    fn the_hash_is_stable() {
        // Written to state and to DynamoDB: must never change.
        assert_eq!(card_hash("4000001234567899"), 0x51c3_48dd_3086_b30b);
        assert_eq!(card_hash(""), 0xefd0_1f60_ba99_2926);
        assert_ne!(card_hash("a"), card_hash("b"));
    }

    #[test]
    fn bad_bytes_are_refused() {
        assert!(CardSet::from_bytes(&[]).is_err());
        assert!(CardSet::from_bytes(&[0, 1, 2]).is_err());
        assert!(CardSet::from_bytes(&[1; 10]).is_err());
        assert!(CardSet::from_bytes(&[9]).is_err());
        let mut sketch = vec![TAG_SKETCH];
        sketch.extend(std::iter::repeat_n(200u8, 1024));
        assert!(CardSet::from_bytes(&sketch).is_err());
        let err = serde_json::from_str::<CardSet>("\"%%\"").unwrap_err();
        assert!(err.to_string().contains("base64"), "{err}");
    }
}
