//! Shardwise: Kinesis stream consumers for AWS Lambda that neither lose nor repeat records.
//!
//! A user writes a [`RecordHandler`] (one record at a time) or a [`BatchHandler`] (a whole batch
//! at once) and hands it to a [`Processor`], which gives them, per invocation:
//!
//! - **decoding** ([`event`], [`kpl`], [`payload`]): the event parsed in place, base64 decoded
//!   into one arena, KPL aggregates expanded, payloads typed with serde. Bad data is a
//!   permanent error of that record, named by sequence number and field path.
//! - **ordering** ([`processor`]): records of one partition key strictly in order, keys
//!   concurrently; a retryable failure holds back the rest of its key.
//! - **retries** ([`retry`]): retryable errors retried with backoff inside the deadline.
//! - **bisecting**: a failing batch handler is split until the poison records are isolated.
//! - **dead letters** ([`dead_letter`]): permanent failures go to SQS *with their payload*;
//!   a record that cannot be dead-lettered is handed back to Lambda, never acknowledged.
//! - **idempotency** ([`idempotency`]) through a [`gate`]: batched look-ups before, batched
//!   completions after, so effects happen once per record under at-least-once delivery.
//! - **tumbling windows** ([`window`]): typed state carried between invocations, a final-window
//!   hook, Lambda's 1 MB state limit respected.
//! - **the response** ([`response`]): the lowest sequence number Lambda must redeliver.
//! - **the Lambda boundary** ([`runtime`], [`runtime_api`]): one entry point, [`run`], for every
//!   processor kind, on our own Runtime API client, so an event body is read once into a buffer
//!   every invocation reuses.
//! - **telemetry** ([`telemetry`], [`metrics`]): JSON logs and CloudWatch EMF metrics.
//! - **producing** ([`producer`]): `PutRecords` within Kinesis's limits, retrying refused records.
//! - **the small things every part uses**: [`time`] (RFC 3339 timestamps), [`clock`] (the wall
//!   clock, injected), [`config`] (settings read through an injected environment), [`testing`]
//!   (event builders for tests and benchmarks).
//!
//! # What is not here, and why
//! This crate links no AWS SDK. Everything that leaves the process is a small trait here
//! ([`dead_letter::DeadLetterSink`], [`idempotency::IdempotencyStore`],
//! [`producer::StreamWriter`]) with an in-memory implementation, so a function whose effects are
//! its own builds without an SDK, and every test of the machinery runs without a network. The
//! AWS implementations are the `shardwise-aws` crate (SQS, DynamoDB, Kinesis, the SDK
//! configuration and the one list of retryable AWS error codes); the embedded SQLite ones are
//! `shardwise-sqlite`, for the local runner. The example functions' own domain (card
//! transactions, the canary table) is `shardwise-cards`: nothing here knows about it.
//!
//! # Errors
//! Each module has its own error type. Record-level problems never become an `Err` of the
//! invocation: they become an [`Outcome`] of that record. Only an unreadable event fails the
//! invocation ([`runtime::InvocationError`]), because nothing in it can be attributed to a record.

pub mod clock;
pub mod config;
pub mod dead_letter;
pub mod event;
pub mod gate;
pub mod handler;
pub mod idempotency;
pub mod kpl;
pub mod metrics;
pub mod payload;
pub mod processor;
pub mod producer;
pub mod record;
pub mod response;
pub mod retry;
pub mod runtime;
pub mod runtime_api;
pub mod telemetry;
pub mod testing;
pub mod time;
pub mod window;

pub use dead_letter::InMemoryDeadLetterSink;
pub use handler::{BatchHandler, ErrorClass, HandlerError, RecordHandler, TypedRecord};
pub use payload::{FromRecordData, Json};
pub use processor::{BatchReport, Invocation, Outcome, Processor, ProcessorConfig};
pub use record::{Record, SequenceNumber};
pub use response::BatchResponse;
pub use runtime::{InvocationError, Invoke, handle_invocation, run};
