//! The example domain the shipped functions share: card transactions on a Kinesis stream.
//!
//! `fraud`, `aggregation` and `canary` are examples of functions built on Shardwise, and they
//! agree on what is on the stream. That agreement lives here, apart from the core crate, which
//! knows nothing of cards or canaries:
//!
//! - [`transaction`]: the payload (`Transaction`, and `StreamPayload`, which tells a transaction
//!   from a canary record in one pass, borrowing from the record);
//! - [`canary`]: the canary table's schema and the one store consumers acknowledge canaries
//!   through (DynamoDB with feature `aws`, SQLite with feature `local`, memory for tests);
//! - [`generator`]: the synthetic traffic the local runner's `loadgen`, the demo, the
//!   benchmarks and the tests send;
//! - [`bench`]: the handlers both benchmarks run, so they measure the same work;
//! - `start` (feature `aws`): the start-up every example function shares (settings, logging,
//!   the AWS or local backend).

pub mod bench;
pub mod canary;
pub mod generator;
#[cfg(feature = "aws")]
pub mod start;
pub mod transaction;
