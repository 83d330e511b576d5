//! The chaos mode (`TEST_FN_MODE=chaos`): the real processor, the real idempotency store and
//! dead-letter sink, and an effect that is itself idempotent with the gate's key — what
//! `shardwise::idempotency` tells handlers to do to close the crash window between an effect and
//! its completion. The chaos test (`tests/chaos.rs`) kills these processes and the runner at
//! random and then reads the stores.
//!
//! Records are JSON `{"id": "c17", "key": "card-3", "n": 5, "poison": false}`: `n` is the record's
//! position among its key's records, `poison` makes it fail permanently (dead-lettered).
//!
//! Backends follow `SHARDWISE_BACKEND`: `local` → the SQLite file `SHARDWISE_LOCAL_DB` (table
//! `effects`); otherwise DynamoDB and SQS: `IDEMPOTENCY_TABLE`, `DEAD_LETTER_QUEUE_URL`,
//! `EFFECTS_TABLE` (partition key `id`). Each effect is one conditional put of
//! `{id: gate key, record_id, partition_key, n, at_ns (monotonic clock), pid}`; `TEST_FN_ATTEMPTS`, when set, gets a
//! line per attempt (the record id) and one per repeat the condition absorbed (`=` and the id).
//! `TEST_FN_CHAOS_DELAY_MS` makes each effect take that long first (a handler's I/O), so that
//! kills find invocations in flight.
//!
//! `TEST_FN_CHAOS_SABOTAGE=no-idempotency` (local backend only) removes both guards — no gate,
//! and every attempt writes an effect of its own — so the test can show its checks catch the
//! duplicates a redelivery then causes.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_dynamodb::types::AttributeValue;
use serde::Deserialize;
use shardwise::idempotency::key::namespaced_key;
use shardwise::idempotency::{Idempotency, RecordKey};
use shardwise::{HandlerError, Json, Processor, ProcessorConfig, Record, RecordHandler};
use shardwise_aws::{DynamoDbIdempotencyStore, SqsDeadLetterSink};
use shardwise_sqlite::{
    Condition, LocalDb, PutResult, SqliteIdempotencyStore, SqliteQueue, SqliteTable, queues,
};

/// The local table the effects go to.
pub const EFFECTS: &str = "effects";

#[derive(Deserialize)]
pub struct ChaosRecord<'a> {
    id: &'a str,
    n: u64,
    #[serde(default)]
    poison: bool,
}

/// Where effects go: a put that happens once per key.
pub trait EffectStore: Send + Sync {
    /// `Ok(true)` when written now, `Ok(false)` when the key was already there.
    fn put_once(
        &self,
        item: HashMap<String, AttributeValue>,
    ) -> impl Future<Output = Result<bool, HandlerError>> + Send;
}

impl EffectStore for SqliteTable {
    async fn put_once(&self, item: HashMap<String, AttributeValue>) -> Result<bool, HandlerError> {
        let id = match item.get("id") {
            Some(AttributeValue::S(id)) => id.clone(),
            _ => return Err(HandlerError::permanent("effect without an id")),
        };
        match self.put(&id, &item, &Condition::NotExists) {
            Ok(PutResult::Written) => Ok(true),
            Ok(PutResult::ConditionFailed(_)) => Ok(false),
            Err(error) => Err(HandlerError::retryable(error.to_string())),
        }
    }
}

pub struct DynamoDbEffects {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl EffectStore for DynamoDbEffects {
    async fn put_once(&self, item: HashMap<String, AttributeValue>) -> Result<bool, HandlerError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(id)")
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(error) => Err(HandlerError::retryable(
                aws_sdk_dynamodb::error::DisplayErrorContext(error).to_string(),
            )),
        }
    }
}

pub struct ChaosHandler<E> {
    effects: E,
    function_name: String,
    attempts: Option<String>,
    /// Sabotage: a key per attempt, so no repeat is absorbed.
    key_per_attempt: bool,
    delay: std::time::Duration,
}

impl<'d, E: EffectStore> RecordHandler<'d> for ChaosHandler<E> {
    type Payload = Json<ChaosRecord<'d>>;

    async fn handle(
        &self,
        record: &Record<'d>,
        payload: &Json<ChaosRecord<'d>>,
    ) -> Result<(), HandlerError> {
        if payload.poison {
            return Err(
                HandlerError::permanent(format!("poison record {}", payload.id))
                    .with_type("ChaosPoison"),
            );
        }
        let key = namespaced_key(&RecordKey, &self.function_name, record)
            .map_err(|e| HandlerError::permanent(e.to_string()))?;
        if let Some(path) = &self.attempts {
            super::append(path, payload.id);
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        // The monotonic clock: one for every process on the machine, and never stepped back
        // (the wall clock may be), so effect times order effects across processes.
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let at_ns = u128::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000
            + u128::try_from(now.tv_nsec).unwrap_or(0);
        let key = if self.key_per_attempt {
            format!("{key}#{at_ns}")
        } else {
            key
        };
        let item = HashMap::from([
            ("id".to_owned(), AttributeValue::S(key)),
            (
                "record_id".to_owned(),
                AttributeValue::S(payload.id.to_owned()),
            ),
            (
                "partition_key".to_owned(),
                AttributeValue::S(record.partition_key.to_owned()),
            ),
            ("n".to_owned(), AttributeValue::N(payload.n.to_string())),
            ("at_ns".to_owned(), AttributeValue::N(at_ns.to_string())),
            (
                "pid".to_owned(),
                AttributeValue::N(std::process::id().to_string()),
            ),
        ]);
        let written = self.effects.put_once(item).await?;
        if !written && let Some(path) = &self.attempts {
            // A repeat the condition absorbed: the effect was already there.
            super::append(path, &format!("={}", payload.id));
        }
        Ok(())
    }
}

fn var(name: &str) -> Result<String, lambda_runtime::Error> {
    std::env::var(name).map_err(|_| format!("chaos mode needs {name}").into())
}

pub async fn run() -> Result<(), lambda_runtime::Error> {
    let function_name = var("AWS_LAMBDA_FUNCTION_NAME")?;
    let config = ProcessorConfig {
        function_name: function_name.clone(),
        metrics_namespace: "ShardwiseTest".to_owned(),
        ..ProcessorConfig::default()
    };
    let attempts = std::env::var("TEST_FN_ATTEMPTS").ok();
    let delay = std::time::Duration::from_millis(
        std::env::var("TEST_FN_CHAOS_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    if std::env::var("SHARDWISE_BACKEND").as_deref() == Ok("local") {
        let db = Arc::new(LocalDb::open(var("SHARDWISE_LOCAL_DB")?).map_err(|e| e.to_string())?);
        let sabotage = std::env::var("TEST_FN_CHAOS_SABOTAGE").is_ok_and(|v| v == "no-idempotency");
        let handler = ChaosHandler {
            effects: SqliteTable::new(db.clone(), EFFECTS),
            function_name,
            attempts,
            key_per_attempt: sabotage,
            delay,
        };
        let dead_letters = SqliteQueue::new(db.clone(), queues::DEAD_LETTERS);
        if sabotage {
            let processor = Processor::per_record(handler, dead_letters).config(config);
            return Ok(shardwise::run(processor).await?);
        }
        let processor = Processor::per_record(handler, dead_letters)
            .config(config)
            .gate(Idempotency::new(SqliteIdempotencyStore::new(db)));
        return Ok(shardwise::run(processor).await?);
    }
    let sdk = shardwise_aws::sdk_config(None).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let handler = ChaosHandler {
        effects: DynamoDbEffects {
            client: dynamodb.clone(),
            table: var("EFFECTS_TABLE")?,
        },
        function_name,
        attempts,
        key_per_attempt: false,
        delay,
    };
    let processor = Processor::per_record(
        handler,
        SqsDeadLetterSink::new(
            aws_sdk_sqs::Client::new(&sdk),
            var("DEAD_LETTER_QUEUE_URL")?,
        ),
    )
    .config(config)
    .gate(Idempotency::new(DynamoDbIdempotencyStore::new(
        dynamodb,
        var("IDEMPOTENCY_TABLE")?,
    )));
    Ok(shardwise::run(processor).await?)
}
