//! The real-bootstrap benchmark: three Lambda bootstrap binaries and the driver that runs them
//! against the local runner's Runtime API server (`benches/bootstrap.rs`, whose docs say what is
//! measured and how).
//!
//! - `src/bin/usual.rs`: `lambda_runtime` + `aws_lambda_events`, an owned payload;
//! - `src/bin/lean.rs`: `shardwise::run`, a payload of two borrowed fields;
//! - `src/bin/borrowed.rs`: `shardwise::run`, a payload that borrows all 25 fields;
//! - this library: the payload types, shared so that each binary is only its wiring.
//!
//! Both model the whole ~1 KiB card transaction that `shardwise_cards::generator::card_transaction`
//! writes (25 fields, nested objects): [`Transaction`] owned, as a handler written against
//! `aws_lambda_events` declares it (the struct of `crates/shardwise/benches/pipeline.rs`);
//! [`BorrowedTransaction`] borrowing every string from the decoded record data, which is what a
//! Shardwise handler can do because the record data outlives the handler call.

use std::borrow::Cow;

use serde::Deserialize;

/// The whole transaction, owned.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
pub struct Transaction {
    transaction_id: String,
    card_id: String,
    merchant_id: String,
    merchant_category: String,
    pub amount: f64,
    currency: String,
    country: String,
    lat: f64,
    lon: f64,
    timestamp: String,
    channel: String,
    device: Device,
    customer: Customer,
    terminal: Terminal,
    metadata: Metadata,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
struct Device {
    id: String,
    ip: String,
    user_agent: String,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
struct Customer {
    id: String,
    segment: String,
    risk_tier: String,
    since: String,
    email_hash: String,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
struct Terminal {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    entry_mode: String,
    address: String,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
struct Metadata {
    source: String,
    schema: String,
    trace: String,
    tags: Vec<String>,
    notes: String,
}

/// The whole transaction, every string borrowed from the record data. `Cow`, not `&str`: a
/// producer may escape any JSON string, and an escaped one cannot be borrowed.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
pub struct BorrowedTransaction<'a> {
    #[serde(borrow)]
    transaction_id: Cow<'a, str>,
    #[serde(borrow)]
    pub card_id: Cow<'a, str>,
    #[serde(borrow)]
    merchant_id: Cow<'a, str>,
    #[serde(borrow)]
    merchant_category: Cow<'a, str>,
    pub amount: f64,
    #[serde(borrow)]
    currency: Cow<'a, str>,
    #[serde(borrow)]
    country: Cow<'a, str>,
    lat: f64,
    lon: f64,
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    device: BorrowedDevice<'a>,
    #[serde(borrow)]
    customer: BorrowedCustomer<'a>,
    #[serde(borrow)]
    terminal: BorrowedTerminal<'a>,
    #[serde(borrow)]
    metadata: BorrowedMetadata<'a>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
struct BorrowedDevice<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    ip: Cow<'a, str>,
    #[serde(borrow)]
    user_agent: Cow<'a, str>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
struct BorrowedCustomer<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    segment: Cow<'a, str>,
    #[serde(borrow)]
    risk_tier: Cow<'a, str>,
    #[serde(borrow)]
    since: Cow<'a, str>,
    #[serde(borrow)]
    email_hash: Cow<'a, str>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
struct BorrowedTerminal<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    entry_mode: Cow<'a, str>,
    #[serde(borrow)]
    address: Cow<'a, str>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
struct BorrowedMetadata<'a> {
    #[serde(borrow)]
    source: Cow<'a, str>,
    #[serde(borrow)]
    schema: Cow<'a, str>,
    #[serde(borrow)]
    trace: Cow<'a, str>,
    #[serde(borrow)]
    tags: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    notes: Cow<'a, str>,
}
