//! The partial batch response Lambda reads when the mapping has `ReportBatchItemFailures`.
//!
//! Lambda checkpoints at the lowest sequence number reported and redelivers everything from
//! there, so one identifier says all there is to say; an empty list acknowledges the batch.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResponse {
    #[serde(rename = "batchItemFailures")]
    pub batch_item_failures: Vec<BatchItemFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItemFailure {
    #[serde(rename = "itemIdentifier")]
    pub item_identifier: String,
}

impl BatchResponse {
    /// Acknowledge the whole batch.
    pub fn all_done() -> Self {
        Self::default()
    }

    /// Ask Lambda to redeliver from `sequence_number`.
    pub fn redeliver_from(sequence_number: &str) -> Self {
        Self {
            batch_item_failures: vec![BatchItemFailure {
                item_identifier: sequence_number.to_owned(),
            }],
        }
    }
}
