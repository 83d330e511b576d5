//! A Shardwise Kinesis function whose handler decodes the whole transaction, every field
//! borrowed (the bootstrap benchmark's `shardwise-borrowed`). Wired as `lean.rs` is.

#![recursion_limit = "256"]

use std::hint::black_box;

use shardwise::{HandlerError, Json, Record, RecordHandler};
use shardwise_cards::generator::FullTransactionRef as BorrowedTransaction;

struct SumAmounts;

impl<'d> RecordHandler<'d> for SumAmounts {
    type Payload = Json<BorrowedTransaction<'d>>;

    async fn handle(
        &self,
        _: &Record<'d>,
        tx: &Json<BorrowedTransaction<'d>>,
    ) -> Result<(), HandlerError> {
        black_box((tx.card_id.len(), tx.amount));
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    shardwise_bench::serve(SumAmounts).await
}
