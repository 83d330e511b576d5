//! The Lambda boundary: events in, partial batch responses and EMF metrics out.
//!
//! This is the only place that knows about `lambda_runtime`. Errors become a `Diagnostic` here
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
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<Box<RawValue>>| async move {
            handle_invocation(
                processor,
                clock,
                &StdoutMetrics,
                namespace,
                &event.context.request_id,
                i64::try_from(event.context.deadline).unwrap_or(i64::MAX),
                event.payload.get().as_bytes(),
            )
            .await
        },
    ))
    .await
}
