//! DynamoDB helpers shared by the stores built on Shardwise.
use std::collections::HashMap;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{BuildError, SdkError};
use aws_sdk_dynamodb::operation::batch_get_item::BatchGetItemError;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;

/// One DynamoDB item (or key).
pub type Item = HashMap<String, AttributeValue>;

/// `BatchGetItem` takes at most this many keys per call.
pub const MAX_BATCH_GET_KEYS: usize = 100;

/// Why [`batch_get_consistent`] did not return every item.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchGetError {
    #[error("BatchGetItem request could not be built: {0}")]
    Build(#[from] BuildError),
    #[error("BatchGetItem failed: {}", aws_sdk_dynamodb::error::DisplayErrorContext(.0))]
    Call(Box<SdkError<BatchGetItemError, HttpResponse>>),
    #[error("{left} keys left unprocessed after {rounds} BatchGetItem rounds")]
    Unprocessed { left: usize, rounds: u32 },
}

/// Read `keys` of `table` with consistent reads, at most [`MAX_BATCH_GET_KEYS`] per call,
/// calls issued concurrently. DynamoDB may answer part of a call (`UnprocessedKeys`, under
/// throttling): those keys are asked again, after a growing wait, for up to `rounds` calls.
/// Items come back in no particular order; absent keys are simply not there.
pub async fn batch_get_consistent(
    client: &Client,
    table: &str,
    keys: Vec<Item>,
    rounds: u32,
) -> Result<Vec<Item>, BatchGetError> {
    let chunks: Vec<Vec<Item>> = keys
        .chunks(MAX_BATCH_GET_KEYS)
        .map(<[Item]>::to_vec)
        .collect();
    let calls = chunks
        .into_iter()
        .map(|chunk| get_chunk(client, table, chunk, rounds));
    let mut items = Vec::new();
    for mut got in futures::future::try_join_all(calls).await? {
        items.append(&mut got);
    }
    Ok(items)
}

async fn get_chunk(
    client: &Client,
    table: &str,
    mut pending: Vec<Item>,
    rounds: u32,
) -> Result<Vec<Item>, BatchGetError> {
    let mut items = Vec::new();
    for round in 0..rounds {
        if pending.is_empty() {
            return Ok(items);
        }
        if round > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50 << round.min(6))).await;
        }
        let request = KeysAndAttributes::builder()
            .set_keys(Some(std::mem::take(&mut pending)))
            .consistent_read(true)
            .build()?;
        let output = client
            .batch_get_item()
            .request_items(table, request)
            .send()
            .await
            .map_err(|e| BatchGetError::Call(Box::new(e)))?;
        if let Some(mut got) = output.responses.and_then(|mut r| r.remove(table)) {
            items.append(&mut got);
        }
        if let Some(left) = output.unprocessed_keys.and_then(|mut u| u.remove(table)) {
            pending = left.keys;
        }
    }
    if pending.is_empty() {
        Ok(items)
    } else {
        Err(BatchGetError::Unprocessed {
            left: pending.len(),
            rounds,
        })
    }
}
