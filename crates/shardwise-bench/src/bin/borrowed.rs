//! A Shardwise Kinesis function whose handler decodes the whole transaction, every field
//! borrowed (the bootstrap benchmark's `shardwise-borrowed`). Wired as `lean.rs` is.

#![recursion_limit = "256"]

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    shardwise_bench::serve(shardwise_cards::bench::ReadWholeTransaction).await
}
