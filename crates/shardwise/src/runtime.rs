//! The Lambda boundary: events in, partial batch responses and EMF metrics out.
//!
//! This is the only place that knows about `lambda_runtime` (for plain batches and, with
//! [`run_window`], tumbling windows). Errors become a `Diagnostic` here
//! and nowhere else, with stable `errorType`s.

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use serde_json::value::RawValue;

use crate::clock::Clock;
use crate::dead_letter::DeadLetterSink;
use crate::event::EventError;
use crate::gate::RecordGate;
use crate::processor::{Invocation, Mode, Processor};
use crate::response::BatchResponse;
use crate::retry::RetryPolicy;

/// Why a whole invocation failed (Lambda then retries or bisects the batch itself).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvocationError {
    #[error(transparent)]
    MalformedEvent(#[from] EventError),
}

impl From<InvocationError> for Diagnostic {
    fn from(error: InvocationError) -> Self {
        Diagnostic {
            error_type: match error {
                InvocationError::MalformedEvent(_) => "MalformedEvent".to_owned(),
            },
            error_message: error.to_string(),
        }
    }
}

/// The invocation deadline in epoch milliseconds, from the `Lambda-Runtime-Deadline-Ms` header.
///
/// Lambda sends an epoch time; `cargo lambda watch` (1.9) sends the timeout itself (`600000`),
/// which read as an epoch time would put the deadline in 1970 and hand every record back
/// unstarted. A value before 2001 is therefore read as milliseconds from now.
pub fn deadline_epoch_ms(header: u64, now_ms: i64) -> i64 {
    let header = i64::try_from(header).unwrap_or(i64::MAX);
    if header < 1_000_000_000_000 {
        now_ms.saturating_add(header)
    } else {
        header
    }
}

/// Where metrics go; stdout in Lambda, a buffer in tests.
pub trait MetricsWriter: Send + Sync {
    fn write_line(&self, line: &str);
}

/// Writes EMF lines to stdout, where Lambda's log agent picks them up.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdoutMetrics;

impl MetricsWriter for StdoutMetrics {
    fn write_line(&self, line: &str) {
        println!("{line}");
    }
}

/// Handle one invocation: what the Lambda service function does, callable from tests.
pub async fn handle_invocation<M, S, G, C, R>(
    processor: &Processor<M, S, G, C, R>,
    clock: &impl Clock,
    metrics: &impl MetricsWriter,
    namespace: &str,
    request_id: &str,
    deadline_ms: i64,
    event: &[u8],
) -> Result<BatchResponse, InvocationError>
where
    M: Mode,
    S: DeadLetterSink,
    G: RecordGate,
    C: Clock,
    R: RetryPolicy + Clone,
{
    let invocation = Invocation::with_deadline_ms(request_id, deadline_ms, clock);
    let report = processor.process(event, &invocation).await?;
    let line = report
        .metrics(namespace, &processor.settings().function_name)
        .property("requestId", request_id)
        .to_line(clock.now_ms());
    metrics.write_line(&line);
    Ok(report.response)
}

/// Run `processor` as a Lambda function until the runtime stops.
pub async fn run<M, S, G, C, R>(
    processor: Processor<M, S, G, C, R>,
    clock: impl Clock,
    namespace: &str,
) -> Result<(), lambda_runtime::Error>
where
    M: Mode,
    S: DeadLetterSink,
    G: RecordGate,
    C: Clock,
    R: RetryPolicy + Clone,
{
    let processor = &processor;
    let clock = &clock;
    serve(clock, move |event, deadline_ms| async move {
        handle_invocation(
            processor,
            clock,
            &StdoutMetrics,
            namespace,
            &event.context.request_id,
            deadline_ms,
            event.payload.get().as_bytes(),
        )
        .await
    })
    .await
}

/// The Lambda loop both entry points share: each event with its deadline in epoch
/// milliseconds (normalised by [`deadline_epoch_ms`]) goes to `handle`.
async fn serve<F, Fut, T, E>(clock: &impl Clock, handle: F) -> Result<(), lambda_runtime::Error>
where
    F: Fn(LambdaEvent<Box<RawValue>>, i64) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    T: serde::Serialize,
    E: Into<Diagnostic> + std::fmt::Debug,
{
    lambda_runtime::run(service_fn(|event: LambdaEvent<Box<RawValue>>| {
        let deadline_ms = deadline_epoch_ms(event.context.deadline, clock.now_ms());
        handle(event, deadline_ms)
    }))
    .await
}

impl From<crate::window::WindowError> for Diagnostic {
    fn from(error: crate::window::WindowError) -> Self {
        Diagnostic {
            error_type: error.error_type().to_owned(),
            error_message: error.to_string(),
        }
    }
}

/// Run a tumbling-window processor as a Lambda function until the runtime stops.
pub async fn run_window<H, S, G, C, R>(
    processor: crate::window::WindowProcessor<H, S, G, C, R>,
    clock: impl Clock,
    namespace: &str,
) -> Result<(), lambda_runtime::Error>
where
    H: for<'d> crate::window::WindowRecordHandler<'d>,
    S: DeadLetterSink,
    G: RecordGate,
    C: Clock,
    R: RetryPolicy + Clone,
{
    let processor = &processor;
    let clock = &clock;
    serve(clock, move |event, deadline_ms| async move {
        crate::window::handle_invocation(
            processor,
            clock,
            &StdoutMetrics,
            namespace,
            &event.context.request_id,
            deadline_ms,
            event.payload.get().as_bytes(),
        )
        .await
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_headers_of_lambda_and_cargo_lambda() {
        let now = 1_795_687_200_000;
        assert_eq!(deadline_epoch_ms(600_000, now), now + 600_000);
        assert_eq!(deadline_epoch_ms(1_795_687_230_000, now), 1_795_687_230_000);
        assert_eq!(deadline_epoch_ms(u64::MAX, now), i64::MAX);
    }
}
