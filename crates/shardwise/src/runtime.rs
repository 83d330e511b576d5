//! The Lambda boundary: one entry point, [`run`], for every kind of processor.
//!
//! The plain [`Processor`] and the tumbling-window [`WindowProcessor`] both implement
//! [`Invoke`]: event bytes and the invocation's deadline in, the response's JSON and the
//! invocation's metrics out. [`handle_invocation`] is what the Lambda loop does with one event
//! (tests call it directly); [`run`] is the loop. Errors become a Lambda error (`errorType`,
//! `errorMessage`) here and nowhere else, with the stable types of [`InvocationError`].

use std::future::Future;

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use serde_json::value::RawValue;

use crate::clock::Clock;
use crate::dead_letter::DeadLetterSink;
use crate::event::EventError;
use crate::gate::RecordGate;
use crate::metrics::EmfDocument;
use crate::processor::{Invocation, Mode, Processor};
use crate::window::{WindowError, WindowProcessor, WindowRecordHandler};

/// Why a whole invocation failed (Lambda then retries or bisects the batch itself).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvocationError {
    #[error(transparent)]
    MalformedEvent(#[from] EventError),
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error("the response could not be serialized: {0}")]
    Response(#[source] serde_json::Error),
}

impl InvocationError {
    /// The stable `errorType` Lambda reports.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::MalformedEvent(_) => "MalformedEvent",
            Self::Window(error) => error.error_type(),
            Self::Response(_) => "ResponseNotSerializable",
        }
    }
}

impl From<InvocationError> for Diagnostic {
    fn from(error: InvocationError) -> Self {
        Diagnostic {
            error_type: error.error_type().to_owned(),
            error_message: error.to_string(),
        }
    }
}

/// What one invocation answered.
#[derive(Debug)]
pub struct Invoked {
    /// The response body for Lambda (JSON).
    pub response: Vec<u8>,
    /// The invocation's metrics, written once the request id is added.
    pub metrics: EmfDocument,
}

/// Something Lambda can invoke with a Kinesis event: the one trait [`run`] takes.
///
/// Its future need not be `Send`: one Lambda sandbox handles one invocation at a time, and the
/// loop runs it on the current task. (A window processor's future is not provably `Send` to
/// today's compiler, because its handler is bound for every lifetime of the batch's data.)
pub trait Invoke: Send + Sync {
    /// Process one event. Record-level problems are in the response; only an event that cannot
    /// be processed at all is an error.
    fn invoke(
        &self,
        event: &[u8],
        invocation: &Invocation,
    ) -> impl Future<Output = Result<Invoked, InvocationError>>;

    /// The wall clock deadlines and metric timestamps are read from.
    fn clock(&self) -> &dyn Clock;

    /// Write one metrics line (stdout in Lambda).
    fn write_metrics(&self, line: &str);
}

impl<M, S, G> Invoke for Processor<M, S, G>
where
    M: Mode,
    S: DeadLetterSink,
    G: RecordGate,
{
    async fn invoke(
        &self,
        event: &[u8],
        invocation: &Invocation,
    ) -> Result<Invoked, InvocationError> {
        let report = self.process(event, invocation).await?;
        let settings = self.settings();
        Ok(Invoked {
            response: serde_json::to_vec(&report.response).map_err(InvocationError::Response)?,
            metrics: report.metrics(&settings.metrics_namespace, &settings.function_name),
        })
    }

    fn clock(&self) -> &dyn Clock {
        self.current_clock()
    }

    fn write_metrics(&self, line: &str) {
        Processor::write_metrics(self, line);
    }
}

impl<H, S, G> Invoke for WindowProcessor<H, S, G>
where
    H: for<'d> WindowRecordHandler<'d>,
    S: DeadLetterSink,
    G: RecordGate,
{
    fn invoke(
        &self,
        event: &[u8],
        invocation: &Invocation,
    ) -> impl Future<Output = Result<Invoked, InvocationError>> {
        self.invoke_window(event, invocation)
    }

    fn clock(&self) -> &dyn Clock {
        self.records_processor().current_clock()
    }

    fn write_metrics(&self, line: &str) {
        self.records_processor().write_metrics(line);
    }
}

impl<H, S, G> WindowProcessor<H, S, G>
where
    H: for<'d> WindowRecordHandler<'d>,
    S: DeadLetterSink,
    G: RecordGate,
{
    async fn invoke_window(
        &self,
        event: &[u8],
        invocation: &Invocation,
    ) -> Result<Invoked, InvocationError> {
        let report = self.process(event, invocation).await?;
        let settings = self.settings();
        Ok(Invoked {
            response: serde_json::to_vec(&report.response).map_err(InvocationError::Response)?,
            metrics: report.metrics(&settings.metrics_namespace, &settings.function_name),
        })
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

/// Handle one invocation as the Lambda loop does: process the event, write its metrics line
/// (with the request id), and return the response body. Callable from tests.
pub async fn handle_invocation(
    function: &impl Invoke,
    request_id: &str,
    deadline_header_ms: u64,
    event: &[u8],
) -> Result<Vec<u8>, InvocationError> {
    let clock = function.clock();
    let deadline_ms = deadline_epoch_ms(deadline_header_ms, clock.now_ms());
    let invocation = Invocation::with_deadline_ms(request_id, deadline_ms, &clock);
    let invoked = function.invoke(event, &invocation).await?;
    let line = invoked
        .metrics
        .property("requestId", request_id)
        .to_line(clock.now_ms());
    function.write_metrics(&line);
    Ok(invoked.response)
}

/// Run `function` as a Lambda function until the runtime stops.
pub async fn run(function: impl Invoke) -> Result<(), lambda_runtime::Error> {
    let function = &function;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<Box<RawValue>>| async move {
            let response = handle_invocation(
                function,
                &event.context.request_id,
                event.context.deadline,
                event.payload.get().as_bytes(),
            )
            .await?;
            RawValue::from_string(String::from_utf8_lossy(&response).into_owned())
                .map_err(InvocationError::Response)
        },
    ))
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
