//! A Shardwise Kinesis function whose handler reads two borrowed fields of each transaction
//! (the bootstrap benchmark's `shardwise-lean`). Wired as `functions/fraud/src/main.rs` is:
//! SDK config and SQS client at start (nothing is dead-lettered, so no AWS call is made).

#![recursion_limit = "256"]

use std::hint::black_box;

use serde::Deserialize;
use shardwise::{HandlerError, Json, Record, RecordHandler};

#[derive(Deserialize)]
struct CardAmount<'a> {
    card_id: &'a str,
    amount: f64,
}

struct SumAmounts;

impl<'d> RecordHandler<'d> for SumAmounts {
    type Payload = Json<CardAmount<'d>>;

    async fn handle(&self, _: &Record<'d>, tx: &Json<CardAmount<'d>>) -> Result<(), HandlerError> {
        black_box((tx.card_id.len(), tx.amount));
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    shardwise_bench::serve(SumAmounts).await
}
