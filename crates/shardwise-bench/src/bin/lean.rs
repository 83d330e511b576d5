//! A Shardwise Kinesis function whose handler reads two borrowed fields of each transaction
//! (the bootstrap benchmark's `shardwise-lean`). Wired as `functions/fraud/src/main.rs` is:
//! SDK config and SQS client at start (nothing is dead-lettered, so no AWS call is made).

#![recursion_limit = "256"]

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    shardwise_bench::serve(shardwise_cards::bench::ReadCardAmount).await
}
