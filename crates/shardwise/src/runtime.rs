//! The Lambda boundary: one entry point, [`run`], for every kind of processor.
//!
//! The plain [`Processor`] and the tumbling-window [`WindowProcessor`] both implement
//! [`Invoke`]: event bytes and the invocation's deadline in, the response's JSON and the
//! invocation's metrics out. [`handle_invocation`] is what the Lambda loop does with one event
//! (tests call it directly); [`serve`] is the loop, on our own Runtime API client
//! ([`crate::runtime_api`]), and [`run`] finds the Runtime API where Lambda says it is. Errors
//! become a Lambda error (`errorType`, `errorMessage`) here and nowhere else, with the stable
//! types of [`InvocationError`].
//!
//! # Why the loop is ours
//! The event body is read from the socket into one buffer that lives as long as the process and
//! handed to the parser as it is: no validating copy before our own parse (which is what
//! `lambda_runtime`'s `LambdaEvent<Box<RawValue>>` costs), and no event-sized allocation freed
//! and faulted back in every invocation. The processor keeps its decode buffers between
//! invocations for the same reason. A handler panic is already a record's permanent failure
//! inside the processor; a panic anywhere else in an invocation fails that invocation
//! (`errorType` `Panic`) and the loop goes on, as `lambda_runtime` does.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use tracing::Instrument;

use crate::clock::Clock;
use crate::config::{ConfigError, Env, ProcessEnv};
use crate::dead_letter::DeadLetterSink;
use crate::event::EventError;
use crate::gate::RecordGate;
use crate::metrics::EmfDocument;
use crate::processor::{Invocation, Mode, Processor};
use crate::runtime_api::{RuntimeApiClient, RuntimeApiError};
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

/// What one invocation answered.
#[derive(Debug)]
pub struct Invoked {
    /// The response body for Lambda (JSON).
    pub response: Vec<u8>,
    /// The invocation's metrics, written once the request id is added.
    pub metrics: EmfDocument,
}

impl Invoked {
    fn new(
        response: &impl serde::Serialize,
        metrics: EmfDocument,
    ) -> Result<Self, InvocationError> {
        Ok(Self {
            response: serde_json::to_vec(response).map_err(InvocationError::Response)?,
            metrics,
        })
    }
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
        Invoked::new(
            &report.response,
            report.metrics(&settings.metrics_namespace, &settings.function_name),
        )
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
        Invoked::new(
            &report.response,
            report.metrics(&settings.metrics_namespace, &settings.function_name),
        )
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

/// Why the Lambda loop stopped: it runs until the Runtime API fails, which in Lambda means the
/// sandbox is going away (exiting lets Lambda start a fresh one).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Api(#[from] RuntimeApiError),
}

/// Run `function` as a Lambda function: serve invocations from the Runtime API at
/// `AWS_LAMBDA_RUNTIME_API` (set by Lambda, `cargo lambda watch` and the local runner) until it
/// fails. This is the one place the library reads the environment, as every Lambda runtime does
/// to find its API.
pub async fn run(function: impl Invoke) -> Result<(), RuntimeError> {
    let address = Env(ProcessEnv).required(
        "AWS_LAMBDA_RUNTIME_API",
        "set by Lambda, `cargo lambda watch` or the Shardwise local runner",
    )?;
    serve(&function, &address).await
}

/// Serve invocations from the Runtime API at `address` (`host:port`) until it fails.
pub async fn serve(function: &impl Invoke, address: &str) -> Result<(), RuntimeError> {
    keep_batch_memory_between_invocations();
    let mut client = RuntimeApiClient::connect(address).await?;
    // Reused by every invocation: after the first large event, no event-sized allocation again.
    let mut body = Vec::new();
    loop {
        let context = match client.next(&mut body).await {
            Ok(context) => context,
            // Answerable: fail this one invocation and go on.
            Err(RuntimeApiError::InvalidInvocation { request_id, header }) => {
                let message = format!("the invocation has no valid {header} header");
                tracing::error!(requestId = %request_id, "{message}");
                client
                    .fail(&request_id, "Runtime.InvalidInvocation", &message)
                    .await?;
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        let span = tracing::info_span!(
            "Lambda runtime invoke",
            requestId = %context.request_id,
            xrayTraceId = context.xray_trace_id.as_deref(),
        );
        let handled = AssertUnwindSafe(handle_invocation(
            function,
            &context.request_id,
            context.deadline_ms,
            &body,
        ))
        .catch_unwind()
        .instrument(span)
        .await;
        let request_id = &context.request_id;
        match handled {
            Ok(Ok(response)) => match client.respond(request_id, &response).await {
                Ok(()) => {}
                // Above Lambda's response limit (6 MB): the invocation fails, the loop goes on.
                Err(error) if error.status() == Some(hyper::StatusCode::PAYLOAD_TOO_LARGE) => {
                    tracing::error!(requestId = %request_id, "response refused: {error}");
                    client
                        .fail(
                            request_id,
                            "Function.ResponseSizeTooLarge",
                            &error.to_string(),
                        )
                        .await?;
                }
                Err(error) => return Err(error.into()),
            },
            Ok(Err(error)) => {
                tracing::error!(requestId = %request_id, error_type = error.error_type(),
                    "invocation failed: {error}");
                client
                    .fail(request_id, error.error_type(), &error.to_string())
                    .await?;
            }
            Err(panic) => {
                let message = crate::processor::panic_message(panic.as_ref())
                    .unwrap_or_else(|| "the invocation panicked".to_owned());
                tracing::error!(requestId = %request_id, "invocation panicked: {message}");
                client.fail(request_id, "Panic", &message).await?;
            }
        }
    }
}

/// The largest block whose release raises glibc's mmap threshold (`DEFAULT_MMAP_THRESHOLD_MAX`
/// on 64-bit is 32 MiB): above every allocation an invocation makes (Lambda's payload limit is
/// 6 MB), and half of it as the heap's trim threshold keeps any batch's heap resident.
const ALLOCATOR_THRESHOLD_BYTES: usize = 16 << 20;

/// Keep batch-sized allocations on the heap, where their pages stay between invocations.
///
/// glibc's malloc serves a request at or above its mmap threshold (128 KiB at start) with a
/// fresh mapping and unmaps it when freed, and gives the heap's free top back to the kernel
/// past twice that. A 3,000-record invocation makes half a dozen vectors of that size (the
/// parsed records, their states, their outcomes): each was mapped, faulted in page by page and
/// unmapped again every invocation — some 2,500 page faults, half of the process's CPU in the
/// kernel. glibc raises both thresholds when a mapped block is freed ("dynamic mmap threshold",
/// mallopt(3)); freeing one block of [`ALLOCATOR_THRESHOLD_BYTES`] at start-up does that once,
/// at the cost of one untouched mapping. The event body and the decode arena are reused buffers
/// besides, so the heap stops growing after the largest event. Other allocators ignore this.
fn keep_batch_memory_between_invocations() {
    drop(std::hint::black_box(Vec::<u8>::with_capacity(
        ALLOCATOR_THRESHOLD_BYTES,
    )));
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::runtime_api::tests::{Answer, TestServer, accepted, invocation};
    use crate::testing::{event_json, plain, sequence_number};
    use crate::{InMemoryDeadLetterSink, Processor, Record, RecordHandler};

    struct Accept;

    impl<'d> RecordHandler<'d> for Accept {
        type Payload = &'d [u8];

        async fn handle(&self, _: &Record<'d>, _: &&'d [u8]) -> Result<(), crate::HandlerError> {
            Ok(())
        }
    }

    struct NoMetrics;

    impl crate::metrics::MetricsWriter for NoMetrics {
        fn write_line(&self, _: &str) {}
    }

    /// The loop fails one invocation and goes on when Lambda refuses a response as too large or
    /// hands over an invocation it can answer but not time; it stops only when the Runtime API
    /// itself fails.
    #[tokio::test]
    async fn the_loop_outlives_one_bad_invocation() {
        let event = event_json(&[plain("k", &sequence_number(1), b"x")]);
        let too_large = Answer {
            status: 413,
            headers: vec![],
            body: br#"{"errorType":"RequestEntityTooLarge"}"#.to_vec(),
        };
        let mut no_deadline = invocation("req-2", "0", event.as_bytes());
        no_deadline
            .headers
            .retain(|(name, _)| *name != "lambda-runtime-deadline-ms");
        let server = TestServer::start(
            vec![
                invocation("req-1", "600000", event.as_bytes()),
                too_large,
                accepted(),
                no_deadline,
                accepted(),
                invocation("req-3", "600000", event.as_bytes()),
                accepted(),
            ],
            true,
        )
        .await;
        let processor =
            Processor::per_record(Accept, InMemoryDeadLetterSink::new()).metrics(NoMetrics);
        let stopped = serve(&processor, &server.address).await;
        // The script is exhausted: the server answers 410 to the fourth `next`.
        assert!(
            matches!(&stopped, Err(RuntimeError::Api(e)) if e.status() == Some(hyper::StatusCode::GONE)),
            "{stopped:?}"
        );
        let calls: Vec<(String, Option<String>)> = server
            .received()
            .iter()
            .map(|r| {
                let kind = r
                    .header("lambda-runtime-function-error-type")
                    .map(str::to_owned);
                (r.path.clone(), kind)
            })
            .collect();
        let next = "/2018-06-01/runtime/invocation/next".to_owned();
        assert_eq!(
            calls,
            vec![
                (next.clone(), None),
                (
                    "/2018-06-01/runtime/invocation/req-1/response".to_owned(),
                    None
                ),
                (
                    "/2018-06-01/runtime/invocation/req-1/error".to_owned(),
                    Some("Function.ResponseSizeTooLarge".to_owned())
                ),
                (next.clone(), None),
                (
                    "/2018-06-01/runtime/invocation/req-2/error".to_owned(),
                    Some("Runtime.InvalidInvocation".to_owned())
                ),
                (next.clone(), None),
                (
                    "/2018-06-01/runtime/invocation/req-3/response".to_owned(),
                    None
                ),
                (next, None),
            ]
        );
    }

    #[test]
    fn deadline_headers_of_lambda_and_cargo_lambda() {
        let now = 1_795_687_200_000;
        assert_eq!(deadline_epoch_ms(600_000, now), now + 600_000);
        assert_eq!(deadline_epoch_ms(1_795_687_230_000, now), 1_795_687_230_000);
        assert_eq!(deadline_epoch_ms(u64::MAX, now), i64::MAX);
    }
}
