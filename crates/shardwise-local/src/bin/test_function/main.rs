//! `shardwise-test-function`: a Lambda function that fails on command, the subject of the
//! conformance suite. A real bootstrap (lambda_runtime), run by the runner like any function.
//!
//! Each record's data is JSON: `{"id": "r1", "fail": "error"|"rbif"|"crash"|"sleep"|"malformed"|
//! "nostate"|"big_state", "times": n, "sleep_ms": n}`. A failure applies while the record has been
//! delivered at most `times` times (always when absent). Every invocation appends one JSON line
//! to `TEST_FN_LOG`: the request's record ids, sequence numbers and window fields — what the
//! tests assert on.
//!
//! With `TEST_FN_EFFECTS` set it runs instead as a Shardwise processor with the local idempotency
//! store (`SHARDWISE_LOCAL_DB`): each record's effect is one line appended to that file, exactly
//! once however often the record is delivered (the kill-and-resume test).
//!
//! With `TEST_FN_MODE=chaos` it runs the chaos test's handler (see `chaos.rs`).

use std::io::Write as _;
use std::process::ExitCode;

use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::{Value, json};

fn decode(record: &Value) -> (String, Value) {
    let sequence = record["kinesis"]["sequenceNumber"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let data = record["kinesis"]["data"]
        .as_str()
        .and_then(|d| base64_simd::STANDARD.decode_to_vec(d).ok())
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .unwrap_or(Value::Null);
    (sequence, data)
}

fn append(path: &str, line: &str) {
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        // One write per line: several processes append to the same file.
        let _ = file.write_all(format!("{line}\n").as_bytes());
    }
}

/// Deliveries of `id` logged so far (this one included).
fn deliveries(log: &str, id: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| {
            l["ids"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|i| i.as_str() == Some(id)))
        })
        .count()
}

async fn handle(event: LambdaEvent<Value>) -> Result<Value, Error> {
    let log = std::env::var("TEST_FN_LOG").unwrap_or_else(|_| "/dev/null".to_owned());
    let payload = event.payload;
    let records = payload["Records"].as_array().cloned().unwrap_or_default();
    let decoded: Vec<(String, Value)> = records.iter().map(decode).collect();
    let ids: Vec<Value> = decoded
        .iter()
        .map(|(_, d)| d.get("id").cloned().unwrap_or(Value::Null))
        .collect();
    let line = json!({
        "request": event.context.request_id,
        "ids": ids,
        "seqs": decoded.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
        "partition_keys": records.iter().map(|r| r["kinesis"]["partitionKey"].clone()).collect::<Vec<_>>(),
        "window": payload.get("window"),
        "state": payload.get("state"),
        "final": payload.get("isFinalInvokeForWindow"),
        "early": payload.get("isWindowTerminatedEarly"),
        "shard": payload.get("shardId"),
        "pid": std::process::id(),
        "deadline_ms": event.context.deadline,
        "function_arn": event.context.invoked_function_arn,
        "trace_id": event.context.xray_trace_id,
    });
    append(&log, &line.to_string());
    // Without the idempotency store (no SHARDWISE_LOCAL_DB) the effect is not guarded: used to
    // show the redelivered tail that idempotency absorbs.
    if let Ok(effects) = std::env::var("TEST_FN_EFFECTS") {
        for id in ids.iter().filter_map(Value::as_str) {
            append(&effects, id);
        }
    }

    let mut failures = Vec::new();
    let mut state_pad = 0usize;
    for ((sequence, data), id) in decoded.iter().zip(&ids) {
        let Some(fail) = data.get("fail").and_then(Value::as_str) else {
            continue;
        };
        let id = id.as_str().unwrap_or_default();
        if let Some(times) = data.get("times").and_then(Value::as_u64)
            && deliveries(&log, id) > usize::try_from(times).unwrap_or(usize::MAX)
        {
            continue;
        }
        match fail {
            "error" => return Err(format!("TestError: record {id} fails").into()),
            "crash" => std::process::exit(3),
            "sleep" => {
                let ms = data.get("sleep_ms").and_then(Value::as_u64).unwrap_or(1000);
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            "rbif" => failures.push(json!({"itemIdentifier": sequence})),
            "malformed" => return Ok(json!({"batchItemFailures": [{"itemIdentifier": ""}]})),
            "nostate" => return Ok(json!({})),
            "big_state" => state_pad = 1_100_000,
            _ => {}
        }
    }
    if let Some(state) = payload.get("state") {
        let mut state = state.clone();
        let count = state.get("count").and_then(Value::as_u64).unwrap_or(0) + records.len() as u64;
        let mut seen: Vec<Value> = state
            .get("ids")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        seen.extend(ids.iter().cloned());
        state = json!({"count": count, "ids": seen});
        if state_pad > 0 {
            state["pad"] = Value::String("x".repeat(state_pad));
        }
        return Ok(json!({"state": state, "batchItemFailures": failures}));
    }
    Ok(json!({"batchItemFailures": failures}))
}

/// The exactly-once mode: the real processor with the local idempotency store.
mod effects {
    use std::sync::Arc;

    use shardwise::ProcessorConfig;
    use shardwise::idempotency::Idempotency;
    use shardwise::{HandlerError, Processor, Record, RecordHandler};
    use shardwise_sqlite::{LocalDb, SqliteIdempotencyStore, SqliteQueue, queues};

    pub struct AppendEffect {
        pub path: String,
    }

    impl<'d> RecordHandler<'d> for AppendEffect {
        type Payload = &'d [u8];

        async fn handle(
            &self,
            record: &Record<'d>,
            payload: &&'d [u8],
        ) -> Result<(), HandlerError> {
            let id = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned))
                .unwrap_or_else(|| record.sequence_number.to_string());
            super::append(&self.path, &id);
            Ok(())
        }
    }

    pub async fn run(effects: String, db: String) -> Result<(), lambda_runtime::Error> {
        let db = Arc::new(LocalDb::open(&db).map_err(|e| e.to_string())?);
        let processor = Processor::per_record(
            AppendEffect { path: effects },
            SqliteQueue::new(db.clone(), queues::DEAD_LETTERS),
        )
        .gate(Idempotency::new(SqliteIdempotencyStore::new(db)))
        .config(ProcessorConfig {
            metrics_namespace: "ShardwiseTest".to_owned(),
            ..ProcessorConfig::default()
        });
        Ok(shardwise::run(processor).await?)
    }
}

mod chaos;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let result = match (
        std::env::var("TEST_FN_MODE").as_deref(),
        std::env::var("TEST_FN_EFFECTS"),
        std::env::var("SHARDWISE_LOCAL_DB"),
    ) {
        (Ok("chaos"), _, _) => chaos::run().await,
        (_, Ok(effects), Ok(db)) => effects::run(effects, db).await,
        _ => lambda_runtime::run(service_fn(handle)).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shardwise-test-function: {error}");
            ExitCode::FAILURE
        }
    }
}
