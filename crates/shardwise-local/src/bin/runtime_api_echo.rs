//! `runtime_api_echo`: a Lambda function on `shardwise::runtime_api` instead of `lambda_runtime`,
//! the subject of that client's test against the runner's Runtime API (and of `cargo lambda
//! watch` by hand).
//!
//! Each event must be JSON. It is answered with
//! `{"requestId": …, "deadlineMs": …, "functionArn": …, "traceId": …, "bytes": n, "echo": <event>}`;
//! an event with `"fail": "<message>"` is failed instead as `Echo.Requested` with that message,
//! one that is not JSON as `Echo.NotJson`. With `ECHO_INIT_ERROR` set the function reports an
//! init error with its value and exits, as a function that cannot start does.

use std::process::ExitCode;

use serde::Deserialize;
use serde_json::value::RawValue;
use shardwise::runtime_api::{InvocationContext, RuntimeApiClient, RuntimeApiError};

/// The event fields this function looks at; the event itself is echoed as it came.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow, default)]
    fail: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Echo<'a> {
    request_id: &'a str,
    deadline_ms: u64,
    function_arn: &'a str,
    trace_id: Option<&'a str>,
    bytes: usize,
    echo: &'a RawValue,
}

/// What to answer `event` with: the response body, or an error type and message.
fn handle(context: &InvocationContext, event: &[u8]) -> Result<Vec<u8>, (&'static str, String)> {
    let raw: &RawValue =
        serde_json::from_slice(event).map_err(|e| ("Echo.NotJson", e.to_string()))?;
    let fields: Event<'_> = serde_json::from_str(raw.get()).unwrap_or(Event { fail: None });
    if let Some(message) = fields.fail {
        return Err(("Echo.Requested", message.into_owned()));
    }
    serde_json::to_vec(&Echo {
        request_id: &context.request_id,
        deadline_ms: context.deadline_ms,
        function_arn: &context.invoked_function_arn,
        trace_id: context.xray_trace_id.as_deref(),
        bytes: event.len(),
        echo: raw,
    })
    .map_err(|e| ("Echo.Encode", e.to_string()))
}

async fn serve(client: &mut RuntimeApiClient) -> Result<(), RuntimeApiError> {
    let mut event = Vec::new();
    loop {
        let context = client.next(&mut event).await?;
        match handle(&context, &event) {
            Ok(answer) => client.respond(&context.request_id, &answer).await?,
            Err((error_type, message)) => {
                client
                    .fail(&context.request_id, error_type, &message)
                    .await?;
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Ok(address) = std::env::var("AWS_LAMBDA_RUNTIME_API") else {
        eprintln!("AWS_LAMBDA_RUNTIME_API is not set: not running inside Lambda");
        return ExitCode::FAILURE;
    };
    let mut client = match RuntimeApiClient::connect(&address).await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    if let Ok(message) = std::env::var("ECHO_INIT_ERROR") {
        if let Err(error) = client.init_error("Echo.InitError", &message).await {
            eprintln!("{error}");
        }
        return ExitCode::FAILURE;
    }
    // Only an error ends the loop: the Runtime API is gone or broke the contract. Exiting lets
    // Lambda (or the runner) start a fresh process.
    if let Err(error) = serve(&mut client).await {
        eprintln!("{error}");
    }
    ExitCode::FAILURE
}
