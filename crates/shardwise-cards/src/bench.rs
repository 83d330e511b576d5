//! The handlers both benchmarks run (the library's `pipeline` bench and the real-bootstrap one),
//! so the two measure the same work: one reads two borrowed fields, the other the whole
//! transaction borrowed.

use std::hint::black_box;

use serde::Deserialize;
use shardwise::{HandlerError, Json, Record, RecordHandler};

use crate::generator::FullTransactionRef;

/// What a handler that scores amounts per card reads: borrowed, only the fields it uses.
#[derive(Debug, Deserialize)]
pub struct CardAmount<'a> {
    pub card_id: &'a str,
    pub amount: f64,
}

/// Reads [`CardAmount`]: the lean payload.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadCardAmount;

impl<'d> RecordHandler<'d> for ReadCardAmount {
    type Payload = Json<CardAmount<'d>>;

    async fn handle(&self, _: &Record<'d>, tx: &Json<CardAmount<'d>>) -> Result<(), HandlerError> {
        black_box((tx.card_id.len(), tx.amount));
        Ok(())
    }
}

/// Reads [`FullTransactionRef`]: every field decoded and borrowed.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadWholeTransaction;

impl<'d> RecordHandler<'d> for ReadWholeTransaction {
    type Payload = Json<FullTransactionRef<'d>>;

    async fn handle(
        &self,
        _: &Record<'d>,
        tx: &Json<FullTransactionRef<'d>>,
    ) -> Result<(), HandlerError> {
        black_box((tx.card_id.len(), tx.amount, tx.metadata.tags.len()));
        Ok(())
    }
}
