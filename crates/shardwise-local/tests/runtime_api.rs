//! `shardwise::runtime_api` against the real Runtime API of the local runner: the
//! `runtime_api_echo` function started by a `ProcessPool`, invoked as the runner invokes functions.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use shardwise_local::function::{FunctionSpec, InvokeOutcome, ProcessPool};

const ECHO: &str = env!("CARGO_BIN_EXE_runtime_api_echo");

fn spec(env: Vec<(String, String)>) -> FunctionSpec {
    FunctionSpec {
        name: "runtime-api-echo".to_owned(),
        binary: ECHO.into(),
        env,
        memory_mb: 128,
        timeout: Duration::from_secs(20),
        log_file: None,
        sandbox_dir: None,
    }
}

fn response(outcome: InvokeOutcome) -> Value {
    match outcome {
        InvokeOutcome::Response(body) => serde_json::from_slice(&body).unwrap(),
        other => panic!("expected a response, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_function_answers_and_fails_through_the_runner() {
    let pool = ProcessPool::start(spec(vec![]), 1).await.unwrap();
    let now_ms = u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();

    let first = response(pool.invoke(br#"{"x":1}"#.to_vec()).await);
    assert_eq!(first["echo"], json!({"x": 1}));
    assert_eq!(first["bytes"], 7);
    assert_eq!(
        first["functionArn"],
        "arn:aws:lambda:us-east-1:000000000000:function:runtime-api-echo"
    );
    assert!(first["traceId"].as_str().unwrap().starts_with("Root=1-"));
    let deadline = first["deadlineMs"].as_u64().unwrap();
    assert!(
        (now_ms..now_ms + 60_000).contains(&deadline),
        "an epoch deadline about the timeout from now: {deadline} vs {now_ms}"
    );
    let first_id = first["requestId"].as_str().unwrap().to_owned();
    assert_eq!(first_id.len(), 36);

    // A large event, then a short one: the same buffer, read right both times.
    let records: Vec<Value> = (0..3000)
        .map(|i| json!({"sequenceNumber": format!("{i:056}"), "data": "eyJpZCI6MX0="}))
        .collect();
    let big = serde_json::to_vec(&json!({ "Records": records })).unwrap();
    let answer = response(pool.invoke(big.clone()).await);
    assert_eq!(answer["bytes"], big.len());
    assert_eq!(answer["echo"]["Records"].as_array().unwrap().len(), 3000);
    assert_ne!(answer["requestId"], first_id.as_str());

    let answer = response(pool.invoke(b"[]".to_vec()).await);
    assert_eq!(answer["echo"], json!([]));
    assert_eq!(answer["bytes"], 2);

    assert_eq!(
        pool.invoke(br#"{"fail":"boom \"quoted\""}"#.to_vec()).await,
        InvokeOutcome::FunctionError {
            error_type: "Echo.Requested".to_owned(),
            message: "boom \"quoted\"".to_owned(),
        }
    );
    let outcome = pool.invoke(b"not json".to_vec()).await;
    assert_eq!(outcome.error_type(), Some("Echo.NotJson"), "{outcome:?}");

    // A failed invocation does not end the loop: the same process answers the next one.
    let answer = response(pool.invoke(br#"{"after":"errors"}"#.to_vec()).await);
    assert_eq!(answer["echo"], json!({"after": "errors"}));
    assert_eq!(pool.starts(), 1, "one process served every invocation");
    assert_eq!(pool.init_errors(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_error_reaches_the_runner() {
    let pool = ProcessPool::start(
        spec(vec![("ECHO_INIT_ERROR".to_owned(), "no config".to_owned())]),
        1,
    )
    .await
    .unwrap();
    // The process reports, exits and is restarted by the pool; wait for the first report.
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        while pool.init_errors() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "no init error reported");
}
