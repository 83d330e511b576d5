//! A Shardwise Kinesis function whose handler decodes the whole transaction, every field
//! borrowed (the bootstrap benchmark's `shardwise-borrowed`). Wired as `lean.rs` is.

#![recursion_limit = "256"]

use std::hint::black_box;

use shardwise::{HandlerError, Json, Processor, ProcessorConfig, Record, RecordHandler};
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
    let sdk = shardwise_aws::sdk_config(None).await;
    let queue_url = std::env::var("DEAD_LETTER_QUEUE_URL")?;
    let dead_letters =
        shardwise_aws::SqsDeadLetterSink::new(aws_sdk_sqs::Client::new(&sdk), queue_url);
    let processor = Processor::per_record(SumAmounts, dead_letters).config(ProcessorConfig {
        metrics_namespace: "Bench".to_owned(),
        ..ProcessorConfig::default()
    });
    Ok(shardwise::run(processor).await?)
}
