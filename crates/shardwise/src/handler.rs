//! What a user writes: a record handler or a batch handler, and the errors they return.
//!
//! Handlers are plain traits rather than closures so that one type can carry its clients and
//! configuration, and so that the payload type is named once. The trait is generic over `'d`,
//! the lifetime of the batch's decoded data, so a payload type may borrow from it
//! (`Json<Transaction<'d>>`) and the hot path copies no strings.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;

use crate::payload::FromRecordData;
use crate::record::Record;

/// Handles one record. Records of one partition key are handed over strictly in order; records of
/// different keys may be in flight at the same time.
pub trait RecordHandler<'d>: Send + Sync {
    /// The payload type, decoded before the handler is called.
    type Payload: FromRecordData<'d> + Send + Sync;

    fn handle(
        &self,
        record: &Record<'d>,
        payload: &Self::Payload,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// One record of a batch given to a [`BatchHandler`].
#[derive(Debug)]
pub struct TypedRecord<'r, 'd, P> {
    pub record: &'r Record<'d>,
    pub payload: &'r P,
}

impl<P> Clone for TypedRecord<'_, '_, P> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P> Copy for TypedRecord<'_, '_, P> {}

/// Handles many records at once (one bulk write, one transaction). When it fails permanently the
/// processor bisects the batch to find the records at fault, so it must be safe to call again on
/// a subset of records it was already given.
pub trait BatchHandler<'d>: Send + Sync {
    type Payload: FromRecordData<'d> + Send + Sync;

    fn handle_batch(
        &self,
        batch: &[TypedRecord<'_, 'd, Self::Payload>],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Throttling, timeouts, 5xx: retried within the invocation, then handed back to Lambda.
    Retryable,
    /// Bad data, a business rule: dead-lettered at once, never retried.
    Permanent,
}

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// A handler's failure, classified once where the cause is known.
#[derive(Debug)]
pub struct HandlerError {
    class: ErrorClass,
    error_type: Cow<'static, str>,
    source: BoxError,
}

impl HandlerError {
    /// A failure that may pass if tried again.
    pub fn retryable(error: impl Into<BoxError>) -> Self {
        Self::new(ErrorClass::Retryable, error.into())
    }

    /// A failure that will recur every time: the record goes to the dead-letter queue.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self::new(ErrorClass::Permanent, error.into())
    }

    fn new(class: ErrorClass, source: BoxError) -> Self {
        Self {
            class,
            error_type: Cow::Borrowed(match class {
                ErrorClass::Retryable => "RetryableError",
                ErrorClass::Permanent => "PermanentError",
            }),
            source,
        }
    }

    /// Name the failure for dead letters, logs and metrics (`"FraudRuleRejected"`).
    pub fn with_type(mut self, error_type: impl Into<Cow<'static, str>>) -> Self {
        self.error_type = error_type.into();
        self
    }

    pub fn class(&self) -> ErrorClass {
        self.class
    }

    pub fn is_retryable(&self) -> bool {
        self.class == ErrorClass::Retryable
    }

    pub fn error_type(&self) -> &str {
        &self.error_type
    }

    pub fn source_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.source
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl StdError for HandlerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}
