//! An in-memory store for tests and the local runner, and a fault-injecting decorator for any
//! store.
//!
//! The in-memory store behaves as DynamoDB does where the gate can tell: it refuses calls over
//! DynamoDB's limits and with repeated keys, and a claim call is all-or-nothing with one verdict
//! per claim. Faults are queued per kind of call and played on the next calls of that kind, so a
//! test says exactly which call is throttled.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use crate::dead_letter::lock;

use super::store::{
    ClaimOutcome, ClaimVerdict, Fetched, IdempotencyStore, StoreError, StoreLimits, StoreWrite,
    StoredRecord,
};

/// A kind of store call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOp {
    /// [`IdempotencyStore::get`] (`BatchGetItem`).
    Get,
    /// [`IdempotencyStore::write`] (`BatchWriteItem`).
    Write,
    /// [`IdempotencyStore::claim`] (`TransactWriteItems`).
    Claim,
}

/// What a faulty call does instead of succeeding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreFault {
    /// The call fails as throttled (after the SDK's own retries); nothing is done.
    Throttled,
    /// The call fails as unreachable; nothing is done.
    Unavailable,
    /// The first `n` entries are left unprocessed (for a claim: the call is cancelled, those
    /// `n` with a transaction conflict); the rest are done.
    Unprocessed(usize),
    /// The call is applied, then fails as unreachable: a timeout after the store acted, so the
    /// caller does not know that it did.
    AppliedThenLost,
}

/// Queued faults and call counts, shared by the in-memory store and [`FaultyStore`].
#[derive(Debug, Default)]
struct Faults {
    queued: Mutex<HashMap<StoreOp, VecDeque<StoreFault>>>,
    calls: Mutex<HashMap<StoreOp, Vec<usize>>>,
}

impl Faults {
    fn inject(&self, op: StoreOp, fault: StoreFault) {
        lock(&self.queued).entry(op).or_default().push_back(fault);
    }

    /// Count the call and take its fault, if one is queued.
    fn next(&self, op: StoreOp, entries: usize) -> Option<StoreFault> {
        lock(&self.calls).entry(op).or_default().push(entries);
        lock(&self.queued)
            .get_mut(&op)
            .and_then(VecDeque::pop_front)
    }

    fn calls(&self, op: StoreOp) -> Vec<usize> {
        lock(&self.calls).get(&op).cloned().unwrap_or_default()
    }
}

fn injected(fault: &StoreFault) -> Option<StoreError> {
    match fault {
        StoreFault::Throttled => Some(StoreError::Throttled("injected throttling".into())),
        StoreFault::Unavailable => Some(StoreError::Unavailable("injected outage".into())),
        StoreFault::Unprocessed(_) | StoreFault::AppliedThenLost => None,
    }
}

fn lost_answer() -> StoreError {
    StoreError::Unavailable("injected timeout after the call was applied".into())
}

fn unprocessed_count(fault: Option<&StoreFault>, len: usize) -> usize {
    match fault {
        Some(StoreFault::Unprocessed(n)) => (*n).min(len),
        _ => 0,
    }
}

/// Apply `fault` to a get: fail it, or hold back its first keys.
async fn faulty_get<S: IdempotencyStore + ?Sized>(
    store: &S,
    fault: Option<StoreFault>,
    keys: &[&str],
) -> Result<Fetched, StoreError> {
    if let Some(error) = fault.as_ref().and_then(injected) {
        return Err(error);
    }
    let held = unprocessed_count(fault.as_ref(), keys.len());
    let mut fetched = if held < keys.len() {
        store.get(&keys[held..]).await?
    } else {
        Fetched::default()
    };
    if fault == Some(StoreFault::AppliedThenLost) {
        return Err(lost_answer());
    }
    fetched
        .unprocessed
        .extend(keys[..held].iter().map(|k| (*k).to_owned()));
    Ok(fetched)
}

async fn faulty_write<S: IdempotencyStore + ?Sized>(
    store: &S,
    fault: Option<StoreFault>,
    writes: &[&StoreWrite],
) -> Result<Vec<String>, StoreError> {
    if let Some(error) = fault.as_ref().and_then(injected) {
        return Err(error);
    }
    let held = unprocessed_count(fault.as_ref(), writes.len());
    let mut unprocessed = if held < writes.len() {
        store.write(&writes[held..]).await?
    } else {
        Vec::new()
    };
    if fault == Some(StoreFault::AppliedThenLost) {
        return Err(lost_answer());
    }
    unprocessed.extend(writes[..held].iter().map(|w| w.key().to_owned()));
    Ok(unprocessed)
}

async fn faulty_claim<S: IdempotencyStore + ?Sized>(
    store: &S,
    fault: Option<StoreFault>,
    claims: &[&StoredRecord],
    now_s: i64,
) -> Result<ClaimOutcome, StoreError> {
    if let Some(error) = fault.as_ref().and_then(injected) {
        return Err(error);
    }
    let held = unprocessed_count(fault.as_ref(), claims.len());
    if held == 0 {
        let outcome = store.claim(claims, now_s).await?;
        if fault == Some(StoreFault::AppliedThenLost) {
            return Err(lost_answer());
        }
        return Ok(outcome);
    }
    Ok(ClaimOutcome::Cancelled(
        (0..claims.len())
            .map(|i| {
                if i < held {
                    ClaimVerdict::Retry("injected TransactionConflict".into())
                } else {
                    ClaimVerdict::NotAttempted
                }
            })
            .collect(),
    ))
}

/// Whether `existing` is a lock taken by the same invocation as `claim`.
fn is_own_lock(existing: &StoredRecord, claim: &StoredRecord) -> bool {
    matches!(
        existing.status,
        crate::idempotency::RecordStatus::InProgress { .. }
    ) && existing.request_id.is_some()
        && existing.request_id == claim.request_id
}

/// Idempotency records in a map, with DynamoDB's limits and fault injection.
#[derive(Debug)]
pub struct InMemoryIdempotencyStore {
    items: Mutex<HashMap<String, StoredRecord>>,
    limits: StoreLimits,
    faults: Faults,
}

impl Default for InMemoryIdempotencyStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryIdempotencyStore {
    pub fn new() -> Self {
        Self {
            items: Mutex::new(HashMap::new()),
            limits: StoreLimits::DYNAMODB,
            faults: Faults::default(),
        }
    }

    /// Play `fault` on the next call of kind `op` that has not been given one.
    pub fn inject(&self, op: StoreOp, fault: StoreFault) {
        self.faults.inject(op, fault);
    }

    /// The number of entries of every call of kind `op` made so far, in order (faulty ones too).
    pub fn calls(&self, op: StoreOp) -> Vec<usize> {
        self.faults.calls(op)
    }

    /// Put an item as another invocation would have.
    pub fn insert(&self, record: StoredRecord) {
        lock(&self.items).insert(record.key.clone(), record);
    }

    pub fn record(&self, key: &str) -> Option<StoredRecord> {
        lock(&self.items).get(key).cloned()
    }

    /// Every item, sorted by key.
    pub fn records(&self) -> Vec<StoredRecord> {
        let mut records: Vec<StoredRecord> = lock(&self.items).values().cloned().collect();
        records.sort_by(|a, b| a.key.cmp(&b.key));
        records
    }

    fn check(&self, what: &str, keys: &[&str], max: usize) -> Result<(), StoreError> {
        if keys.len() > max {
            return Err(StoreError::Rejected(format!(
                "{what} of {} entries exceeds the limit of {max}",
                keys.len()
            )));
        }
        let mut seen = HashSet::with_capacity(keys.len());
        if let Some(repeated) = keys.iter().find(|k| !seen.insert(**k)) {
            return Err(StoreError::Rejected(format!(
                "{what} names key {repeated} twice"
            )));
        }
        Ok(())
    }

    fn get_now(&self, keys: &[&str]) -> Result<Fetched, StoreError> {
        self.check("get", keys, self.limits.max_get)?;
        let items = lock(&self.items);
        Ok(Fetched {
            records: keys.iter().filter_map(|k| items.get(*k).cloned()).collect(),
            ..Fetched::default()
        })
    }

    fn write_now(&self, writes: &[&StoreWrite]) -> Result<Vec<String>, StoreError> {
        let names: Vec<&str> = writes.iter().map(|w| w.key()).collect();
        self.check("write", &names, self.limits.max_write)?;
        let mut items = lock(&self.items);
        for write in writes {
            match *write {
                StoreWrite::Put(record) => {
                    items.insert(record.key.clone(), record.clone());
                }
                StoreWrite::Release { key, request_id } => {
                    if items
                        .get(key)
                        .is_some_and(|item| item.request_id.as_deref() == Some(request_id.as_str()))
                    {
                        items.remove(key);
                    }
                }
            }
        }
        Ok(Vec::new())
    }

    fn claim_now(&self, claims: &[&StoredRecord], now_s: i64) -> Result<ClaimOutcome, StoreError> {
        let names: Vec<&str> = claims.iter().map(|c| c.key.as_str()).collect();
        self.check("claim", &names, self.limits.max_claim)?;
        let mut items = lock(&self.items);
        let taken: Vec<bool> = claims
            .iter()
            .map(|c| {
                items.get(&c.key).is_some_and(|existing| {
                    existing.status.expires_at() > now_s && !is_own_lock(existing, c)
                })
            })
            .collect();
        if taken.iter().any(|t| *t) {
            return Ok(ClaimOutcome::Cancelled(
                taken
                    .into_iter()
                    .map(|t| {
                        if t {
                            ClaimVerdict::Taken
                        } else {
                            ClaimVerdict::NotAttempted
                        }
                    })
                    .collect(),
            ));
        }
        for claim in claims {
            items.insert(claim.key.clone(), (*claim).clone());
        }
        Ok(ClaimOutcome::Claimed)
    }
}

/// The store's own behaviour, without faults (what [`FaultyStore`] would wrap).
struct Plain<'a>(&'a InMemoryIdempotencyStore);

impl IdempotencyStore for Plain<'_> {
    async fn get(&self, keys: &[&str]) -> Result<Fetched, StoreError> {
        self.0.get_now(keys)
    }

    async fn write(&self, writes: &[&StoreWrite]) -> Result<Vec<String>, StoreError> {
        self.0.write_now(writes)
    }

    async fn claim(
        &self,
        claims: &[&StoredRecord],
        now_s: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        self.0.claim_now(claims, now_s)
    }
}

impl IdempotencyStore for InMemoryIdempotencyStore {
    fn limits(&self) -> StoreLimits {
        self.limits
    }

    async fn get(&self, keys: &[&str]) -> Result<Fetched, StoreError> {
        let fault = self.faults.next(StoreOp::Get, keys.len());
        faulty_get(&Plain(self), fault, keys).await
    }

    async fn write(&self, writes: &[&StoreWrite]) -> Result<Vec<String>, StoreError> {
        let fault = self.faults.next(StoreOp::Write, writes.len());
        faulty_write(&Plain(self), fault, writes).await
    }

    async fn claim(
        &self,
        claims: &[&StoredRecord],
        now_s: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        let fault = self.faults.next(StoreOp::Claim, claims.len());
        faulty_claim(&Plain(self), fault, claims, now_s).await
    }
}

/// Wraps any store (DynamoDB against moto, typically) and plays injected faults on it.
#[derive(Debug)]
pub struct FaultyStore<S> {
    inner: S,
    faults: Faults,
}

impl<S: IdempotencyStore> FaultyStore<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            faults: Faults::default(),
        }
    }

    /// Play `fault` on the next call of kind `op` that has not been given one.
    pub fn inject(&self, op: StoreOp, fault: StoreFault) {
        self.faults.inject(op, fault);
    }

    /// The number of entries of every call of kind `op` made so far, in order.
    pub fn calls(&self, op: StoreOp) -> Vec<usize> {
        self.faults.calls(op)
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: IdempotencyStore> IdempotencyStore for FaultyStore<S> {
    fn limits(&self) -> StoreLimits {
        self.inner.limits()
    }

    async fn get(&self, keys: &[&str]) -> Result<Fetched, StoreError> {
        let fault = self.faults.next(StoreOp::Get, keys.len());
        faulty_get(&self.inner, fault, keys).await
    }

    async fn write(&self, writes: &[&StoreWrite]) -> Result<Vec<String>, StoreError> {
        let fault = self.faults.next(StoreOp::Write, writes.len());
        faulty_write(&self.inner, fault, writes).await
    }

    async fn claim(
        &self,
        claims: &[&StoredRecord],
        now_s: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        let fault = self.faults.next(StoreOp::Claim, claims.len());
        faulty_claim(&self.inner, fault, claims, now_s).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::idempotency::store::RecordStatus;

    fn completed(key: &str, expires_at: i64) -> StoredRecord {
        StoredRecord {
            key: key.into(),
            status: RecordStatus::Completed { expires_at },
            payload_hash: None,
            request_id: None,
        }
    }

    fn lock_of(key: &str, until: i64) -> StoredRecord {
        StoredRecord {
            status: RecordStatus::InProgress {
                lock_expires_at: until,
            },
            ..completed(key, 0)
        }
    }

    #[tokio::test]
    async fn calls_over_dynamodb_limits_are_refused() {
        let store = InMemoryIdempotencyStore::new();
        let owned: Vec<StoreWrite> = (0..26)
            .map(|i| StoreWrite::Put(completed(&format!("k{i}"), 10)))
            .collect();
        let writes: Vec<&StoreWrite> = owned.iter().collect();
        assert!(matches!(
            store.write(&writes).await,
            Err(StoreError::Rejected(_))
        ));
        assert!(store.write(&writes[..25]).await.unwrap().is_empty());
        let names: Vec<String> = (0..101).map(|i| format!("k{i}")).collect();
        let keys: Vec<&str> = names.iter().map(String::as_str).collect();
        assert!(store.get(&keys).await.is_err());
        assert_eq!(store.get(&keys[..100]).await.unwrap().records.len(), 25);
        assert!(store.get(&["a", "a"]).await.is_err());
    }

    #[tokio::test]
    async fn claims_are_all_or_nothing_with_a_verdict_each() {
        let store = InMemoryIdempotencyStore::new();
        store.insert(lock_of("held", 100));
        store.insert(lock_of("stale", 50));
        let owned = [
            lock_of("free", 200),
            lock_of("held", 200),
            lock_of("stale", 200),
        ];
        let claims: Vec<&StoredRecord> = owned.iter().collect();
        let outcome = store.claim(&claims, 60).await.unwrap();
        assert_eq!(
            outcome,
            ClaimOutcome::Cancelled(vec![
                ClaimVerdict::NotAttempted,
                ClaimVerdict::Taken,
                ClaimVerdict::NotAttempted
            ])
        );
        assert!(store.record("free").is_none());
        let retry = [claims[0], claims[2]];
        assert_eq!(
            store.claim(&retry, 60).await.unwrap(),
            ClaimOutcome::Claimed
        );
        assert_eq!(store.record("stale").unwrap().status.expires_at(), 200);
    }

    #[tokio::test]
    async fn faults_play_on_the_chosen_calls() {
        let store = FaultyStore::new(InMemoryIdempotencyStore::new());
        store.inject(StoreOp::Write, StoreFault::Unprocessed(2));
        store.inject(StoreOp::Get, StoreFault::Throttled);
        let owned: Vec<StoreWrite> = (0..3)
            .map(|i| StoreWrite::Put(completed(&format!("k{i}"), 10)))
            .collect();
        let writes: Vec<&StoreWrite> = owned.iter().collect();
        let unprocessed = store.write(&writes).await.unwrap();
        assert_eq!(unprocessed, vec!["k0".to_owned(), "k1".to_owned()]);
        assert!(store.inner().record("k2").is_some());
        let keys = ["k2"];
        assert!(matches!(
            store.get(&keys).await,
            Err(StoreError::Throttled(_))
        ));
        assert_eq!(store.get(&keys).await.unwrap().records.len(), 1);
        assert_eq!(store.calls(StoreOp::Get), vec![1, 1]);
    }
}
