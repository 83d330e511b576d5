//! A Kinesis function written the usual way, the bootstrap benchmark's baseline:
//! `lambda_runtime` + `aws_lambda_events`' `KinesisEvent` (base64 decoded while deserializing),
//! each record's data into an owned struct of the whole transaction, no failures reported.

use std::hint::black_box;

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::KinesisEventResponse;
use lambda_runtime::{Error, LambdaEvent, service_fn};
use shardwise_cards::generator::FullTransaction as Transaction;

async fn handle(event: LambdaEvent<KinesisEvent>) -> Result<KinesisEventResponse, Error> {
    let mut sum = 0.0;
    for record in &event.payload.records {
        let tx: Transaction = serde_json::from_slice(&record.kinesis.data.0)?;
        sum += tx.amount;
    }
    black_box(sum);
    Ok(KinesisEventResponse::default())
}

// One thread, as the Shardwise bootstraps: the comparison is of the event path, not of the
// executor's cross-thread wake-ups.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handle)).await
}
