//! The store behind the idempotency gate: a small trait, one call per method.
//!
//! Each method is exactly one request to the backend and takes at most [`StoreLimits`] entries;
//! the gate owns everything that is the same for every backend — splitting into calls, running
//! them concurrently, retrying what the backend left unprocessed, expiry and hashing — as the
//! dead-letter publisher does for sinks. A backend only translates.

use std::future::Future;
use std::sync::Arc;

/// What a stored idempotency record says, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordStatus {
    /// An invocation claimed the key and may be running its record until `lock_expires_at`
    /// (epoch seconds: the invocation's deadline, rounded up).
    InProgress { lock_expires_at: i64 },
    /// The record's effect happened. The record says so until `expires_at` (epoch seconds, the
    /// table's TTL attribute).
    Completed { expires_at: i64 },
}

impl RecordStatus {
    /// Epoch seconds after which the record means nothing (the `expiration` attribute).
    pub fn expires_at(&self) -> i64 {
        match *self {
            Self::InProgress { lock_expires_at } => lock_expires_at,
            Self::Completed { expires_at } => expires_at,
        }
    }
}

/// A record's state at a given time. `Expired` is never written: DynamoDB's TTL deletes items
/// lazily (within days), so an item past its expiry must be read as if it were absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    /// Another invocation holds the key until `lock_expires_at` (epoch seconds).
    InProgress { lock_expires_at: i64 },
    /// Done; valid until `expires_at` (epoch seconds).
    Completed { expires_at: i64 },
    /// A lock of an invocation that timed out, or a completion older than its time to live.
    Expired,
}

/// One item of the idempotency table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// The namespaced key (`{function}#{key}`), the table's partition key `id`.
    pub key: String,
    pub status: RecordStatus,
    /// SHA-256 (hex) of the payload, when the gate checks payloads.
    pub payload_hash: Option<String>,
    /// The invocation that wrote the item, for whoever investigates.
    pub request_id: Option<String>,
}

impl StoredRecord {
    /// The record's state at `now_ms` (epoch milliseconds).
    pub fn state_at(&self, now_ms: i64) -> RecordState {
        if now_ms >= self.status.expires_at().saturating_mul(1000) {
            return RecordState::Expired;
        }
        match self.status {
            RecordStatus::InProgress { lock_expires_at } => {
                RecordState::InProgress { lock_expires_at }
            }
            RecordStatus::Completed { expires_at } => RecordState::Completed { expires_at },
        }
    }
}

/// One entry of a [`IdempotencyStore::write`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreWrite {
    /// Write the record, replacing whatever is there (a completion replaces its own lock).
    Put(StoredRecord),
    /// Delete the lock with this key, if it is still the one `request_id` took: a released
    /// lock, so a redelivery can run the record. Conditional, because a release that arrives
    /// late (its call was abandoned at the deadline, then applied) must not delete the lock of
    /// the invocation that claimed the key after ours expired; an item that is not ours (or no
    /// item) counts as released.
    Release { key: String, request_id: String },
}

impl StoreWrite {
    pub fn key(&self) -> &str {
        match self {
            Self::Put(record) => &record.key,
            Self::Release { key, .. } => key,
        }
    }
}

/// The answer to one [`IdempotencyStore::get`] call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fetched {
    /// The items found (keys without an item are simply absent).
    pub records: Vec<StoredRecord>,
    /// Keys the backend did not get to (DynamoDB's `UnprocessedKeys`); asked again.
    pub unprocessed: Vec<String>,
    /// Keys whose item could not be read as an idempotency record, with why.
    pub unreadable: Vec<(String, String)>,
}

/// How one claim of a cancelled [`IdempotencyStore::claim`] call fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimVerdict {
    /// A live record holds the key (another invocation's lock, or a completion).
    Taken,
    /// Not at fault: cancelled because another claim of the call failed. Try again at once.
    NotAttempted,
    /// Failed in a way that may pass (a conflicting transaction, throttling). Try again later.
    Retry(String),
    /// Failed in a way that will not pass (a validation error).
    Failed(String),
}

/// The answer to one [`IdempotencyStore::claim`] call, which succeeds or fails as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// Every key of the call is now locked by this invocation.
    Claimed,
    /// Nothing was written; one verdict per claim, same positions.
    Cancelled(Vec<ClaimVerdict>),
}

/// The maximum entries of one call of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    pub max_get: usize,
    pub max_write: usize,
    pub max_claim: usize,
}

impl StoreLimits {
    /// DynamoDB's: `BatchGetItem` 100 keys, `BatchWriteItem` 25 requests, `TransactWriteItems`
    /// 100 actions. Enforced here because emulators are laxer (moto accepts 26 writes).
    pub const DYNAMODB: Self = Self {
        max_get: 100,
        max_write: 25,
        max_claim: 100,
    };
}

/// A failed store call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend shed load (throttling, capacity exceeded). Retried with backoff.
    #[error("idempotency store throttled: {0}")]
    Throttled(String),
    /// The backend could not be reached or failed (network, timeout, 5xx). Retried.
    #[error("idempotency store unavailable: {0}")]
    Unavailable(String),
    /// The request is wrong or the table is missing: retrying will not help. Records are still
    /// only handed back (never let through), so a misconfiguration shows as a stuck shard.
    #[error("idempotency store rejected the request: {0}")]
    Rejected(String),
    /// An item exists but is not an idempotency record this gate can read.
    #[error("idempotency record unreadable: {0}")]
    Unreadable(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Throttled(_) | Self::Unavailable(_))
    }
}

/// A table of idempotency records. Every method is one backend request.
pub trait IdempotencyStore: Send + Sync {
    /// The entries one call of each kind may carry; the gate never sends more.
    fn limits(&self) -> StoreLimits {
        StoreLimits::DYNAMODB
    }

    /// Read the items of `keys` (distinct), strongly consistent.
    fn get(&self, keys: &[&str]) -> impl Future<Output = Result<Fetched, StoreError>> + Send;

    /// Put or delete items unconditionally (distinct keys). Returns the keys left unprocessed.
    fn write(
        &self,
        writes: &[&StoreWrite],
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Write every record of `claims` (distinct keys, each `InProgress`) only where no live
    /// record exists — no item, or one whose expiry is at or before `now_s` (epoch seconds) —
    /// or where the live record is a lock of the same `request_id` (our own claim, applied by a
    /// call whose answer was lost): all of them or none.
    fn claim(
        &self,
        claims: &[&StoredRecord],
        now_s: i64,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send;
}

impl<S: IdempotencyStore + ?Sized> IdempotencyStore for Arc<S> {
    fn limits(&self) -> StoreLimits {
        (**self).limits()
    }

    fn get(&self, keys: &[&str]) -> impl Future<Output = Result<Fetched, StoreError>> + Send {
        (**self).get(keys)
    }

    fn write(
        &self,
        writes: &[&StoreWrite],
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send {
        (**self).write(writes)
    }

    fn claim(
        &self,
        claims: &[&StoredRecord],
        now_s: i64,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send {
        (**self).claim(claims, now_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_derived_from_time() {
        let record = StoredRecord {
            key: "k".into(),
            status: RecordStatus::Completed { expires_at: 100 },
            payload_hash: None,
            request_id: None,
        };
        assert_eq!(
            record.state_at(99_999),
            RecordState::Completed { expires_at: 100 }
        );
        assert_eq!(record.state_at(100_000), RecordState::Expired);
        let lock = StoredRecord {
            status: RecordStatus::InProgress {
                lock_expires_at: 50,
            },
            ..record
        };
        assert_eq!(
            lock.state_at(49_000),
            RecordState::InProgress {
                lock_expires_at: 50
            }
        );
        assert_eq!(lock.state_at(50_000), RecordState::Expired);
    }
}
