//! The hook through which idempotency (or any admission control) sees a batch.
//!
//! The processor asks the gate once per batch which records to run, and tells it once per batch
//! how they settled, so a store can answer with one batched call each way instead of two calls
//! per record. [`NoGate`] runs everything.

use std::future::Future;

use crate::record::Record;

/// What to do with a record, decided before any handler runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Run the handler.
    Run,
    /// Its effect already happened (an earlier delivery completed it): acknowledge, don't run.
    AlreadyDone,
    /// Same idempotency key as the earlier record at this position in the batch: it settles the
    /// way that record does, without running.
    DuplicateOf(usize),
    /// Cannot be decided now (the store is unavailable, another invocation holds the key): hand
    /// it back to Lambda. Later records of its partition key wait too, to keep their order.
    Defer { reason: String },
    /// Must never run (its key was used with a different payload): dead-letter it.
    Reject { error_type: String, message: String },
}

/// How an admitted record ended, told to the gate after handlers and dead-lettering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Its effect happened, or it was dead-lettered: it must not run again.
    Done,
    /// It will be redelivered and must be allowed to run again.
    Released,
}

/// Failure to record a settlement; the processor hands the record back to Lambda.
///
/// The gate's own error is kept as the source (a store's `StoreError`, a key's `KeyError`), so
/// whoever handles it can downcast rather than parse text.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum GateError {
    /// The record's completion was not written: it will run again when redelivered.
    #[error("completion not recorded: {0}")]
    CompletionNotRecorded(#[source] SharedError),
    /// A lock taken for the record was not released: it expires at the invocation's deadline.
    #[error("lock not released (it expires at the deadline): {0}")]
    LockNotReleased(#[source] SharedError),
    /// The record's settlement could not even be addressed (its key could not be derived).
    #[error("settlement not addressable: {0}")]
    Unaddressable(#[source] SharedError),
}

/// An error shared by every record of one failed call (one store write settles many records).
pub type SharedError = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Per-invocation facts a gate needs (lock expiry follows the invocation deadline).
#[derive(Debug, Clone, Copy)]
pub struct GateContext<'a> {
    pub function_name: &'a str,
    pub request_id: &'a str,
    /// Invocation deadline, epoch milliseconds, when known.
    pub deadline_ms: Option<i64>,
}

pub trait RecordGate: Send + Sync {
    /// One admission per record, same positions.
    fn admit(
        &self,
        records: &[Record<'_>],
        context: &GateContext<'_>,
    ) -> impl Future<Output = Vec<Admission>> + Send;

    /// Whether an [`Admission::AlreadyDone`] always means *this very record* took effect (a key
    /// that names the record's place in the stream), rather than possibly another record with
    /// the same key. A layer that keeps effects elsewhere (the window state) then needs no
    /// completion written for a record whose effect it holds itself.
    fn identifies_records(&self) -> bool {
        false
    }

    /// `settled[i]` is `Some` for each record that was admitted with [`Admission::Run`]. Returns
    /// one result per record (`Ok` for those with `None`).
    fn settle(
        &self,
        records: &[Record<'_>],
        settled: &[Option<Settlement>],
        context: &GateContext<'_>,
    ) -> impl Future<Output = Vec<Result<(), GateError>>> + Send;
}

/// Admits every record; settles nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGate;

impl RecordGate for NoGate {
    async fn admit(&self, records: &[Record<'_>], _: &GateContext<'_>) -> Vec<Admission> {
        vec![Admission::Run; records.len()]
    }

    async fn settle(
        &self,
        records: &[Record<'_>],
        _: &[Option<Settlement>],
        _: &GateContext<'_>,
    ) -> Vec<Result<(), GateError>> {
        vec![Ok(()); records.len()]
    }
}
