//! Which AWS failures are worth trying again: one list for every client in Shardwise.
//!
//! Each adapter (dead letters, idempotency, the producer, the example functions' stores) turns an
//! SDK error into its own error type, but whether a call may pass on a retry is the same
//! question everywhere, so it is answered once here. The codes are the services' own
//! (DynamoDB, Kinesis, SQS, KMS behind them); an answer without a known code is judged by its
//! HTTP status, and a call that got no answer at all (timeout, connection refused, a response
//! that did not parse) is worth retrying.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// Throttling and contention: the service is fine, we asked too fast or too much at once.
pub const THROTTLING_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "LimitExceededException",
    "KMSThrottlingException",
    "RequestThrottled",
    "TooManyRequestsException",
    "TransactionConflictException",
    "TransactionInProgressException",
];

/// The service (or a dependency of it) failed or timed out on its side.
pub const UNAVAILABLE_CODES: &[&str] = &[
    "InternalServerError",
    "InternalFailure",
    "InternalFailureException",
    "InternalError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "RequestTimeout",
    "RequestTimeoutException",
    "RequestExpired",
];

/// The reasons DynamoDB gives, per item, for cancelling a `TransactWriteItems` that are worth
/// another attempt (a vocabulary of its own, without the `Exception` suffix).
pub const RETRYABLE_CANCELLATION_CODES: &[&str] = &[
    "TransactionConflict",
    "ThrottlingError",
    "ProvisionedThroughputExceeded",
    "RequestLimitExceeded",
];

/// How a failed AWS call should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Throttled or contended: retry with backoff.
    Throttled,
    /// The service or the network failed: retry.
    Unavailable,
    /// The request itself is wrong (validation, access denied, missing resource): retrying the
    /// same call cannot help.
    Rejected,
}

impl Fault {
    pub fn is_retryable(self) -> bool {
        !matches!(self, Self::Rejected)
    }
}

/// Classify a service's answer by its error code, falling back to the HTTP status.
pub fn classify_code(code: Option<&str>, status: u16) -> Fault {
    match code {
        Some(code) if THROTTLING_CODES.contains(&code) => Fault::Throttled,
        Some(code) if UNAVAILABLE_CODES.contains(&code) => Fault::Unavailable,
        _ if status == 429 => Fault::Throttled,
        _ if (500..600).contains(&status) => Fault::Unavailable,
        _ => Fault::Rejected,
    }
}

/// Classify any SDK error.
pub fn classify<E: ProvideErrorMetadata>(error: &SdkError<E, HttpResponse>) -> Fault {
    match error {
        SdkError::ServiceError(service) => {
            classify_code(service.err().code(), service.raw().status().as_u16())
        }
        // The request could not be built: the same request will not build next time either.
        SdkError::ConstructionFailure(_) => Fault::Rejected,
        // Timeouts, connection failures, responses that did not parse.
        _ => Fault::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_first_then_status() {
        assert_eq!(
            classify_code(Some("ProvisionedThroughputExceededException"), 400),
            Fault::Throttled
        );
        assert_eq!(
            classify_code(Some("InternalFailure"), 500),
            Fault::Unavailable
        );
        assert_eq!(
            classify_code(Some("ValidationException"), 400),
            Fault::Rejected
        );
        assert_eq!(classify_code(None, 429), Fault::Throttled);
        assert_eq!(classify_code(None, 503), Fault::Unavailable);
        assert_eq!(
            classify_code(Some("AccessDeniedException"), 403),
            Fault::Rejected
        );
        assert!(!Fault::Rejected.is_retryable());
        assert!(Fault::Throttled.is_retryable());
    }
}
