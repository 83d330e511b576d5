//! Fraud alerts and the SQS queue they go to (`ALERTS_QUEUE_URL`).

use std::future::Future;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::model::Contribution;
use crate::rules::Reason;

/// The alert message body (camelCase JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub transaction_id: String,
    pub card_id: String,
    pub score: u32,
    pub reasons: Vec<Reason>,
    /// RFC 3339, when the function scored the transaction.
    pub detected_at: String,
    pub merchant_id: String,
    pub amount: f64,
    pub currency: String,
    /// The transaction's own time, RFC 3339.
    pub transaction_timestamp: String,
    /// What the anomaly model made of the transaction, whichever rules fired (absent while the
    /// shard's model warms up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelView>,
}

/// The anomaly model's score of an alerted transaction and the features that drove it
/// (attribution), largest part first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelView {
    pub score: f64,
    pub threshold: f64,
    pub features: Vec<Contribution>,
}

/// What a queue needs to know of an alert besides its body (FIFO queues group and deduplicate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutgoingAlert<'a> {
    pub transaction_id: &'a str,
    pub card_id: &'a str,
    pub body: &'a str,
}

/// Why an alert was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("alert not sent: {message}")]
pub struct AlertError {
    pub retryable: bool,
    pub message: String,
}

/// Sends alerts; one result per alert, same positions.
pub trait AlertSink: Send + Sync {
    fn send(
        &self,
        alerts: &[OutgoingAlert<'_>],
    ) -> impl Future<Output = Vec<Result<(), AlertError>>> + Send;
}

/// SQS allows 10 messages per `SendMessageBatch`.
const MAX_BATCH: usize = 10;

/// Alerts to an SQS queue. A FIFO queue (URL ending `.fifo`) gets the card as message group
/// (alerts of a card stay in order) and the transaction as deduplication id (SQS drops a second
/// alert for one transaction within five minutes).
#[derive(Debug, Clone)]
pub struct SqsAlertSink {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    fifo: bool,
}

impl SqsAlertSink {
    pub fn new(client: aws_sdk_sqs::Client, queue_url: impl Into<String>) -> Self {
        let queue_url = queue_url.into();
        Self {
            fifo: queue_url.ends_with(".fifo"),
            client,
            queue_url,
        }
    }

    async fn send_batch(&self, alerts: &[OutgoingAlert<'_>]) -> Vec<Result<(), AlertError>> {
        use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
        let mut request = self.client.send_message_batch().queue_url(&self.queue_url);
        for (i, alert) in alerts.iter().enumerate() {
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(alert.body);
            if self.fifo {
                entry = entry
                    .message_group_id(alert.card_id)
                    .message_deduplication_id(dedup_id(alert.transaction_id));
            }
            match entry.build() {
                Ok(entry) => request = request.entries(entry),
                Err(error) => {
                    return alerts
                        .iter()
                        .map(|_| {
                            Err(AlertError {
                                retryable: false,
                                message: error.to_string(),
                            })
                        })
                        .collect();
                }
            }
        }
        match request.send().await {
            Ok(output) => {
                let mut results: Vec<Result<(), AlertError>> =
                    alerts.iter().map(|_| Ok(())).collect();
                for failed in output.failed() {
                    if let Some(slot) = failed
                        .id()
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| results.get_mut(i))
                    {
                        *slot = Err(AlertError {
                            retryable: !failed.sender_fault(),
                            message: format!(
                                "{}: {}",
                                failed.code(),
                                failed.message().unwrap_or_default()
                            ),
                        });
                    }
                }
                results
            }
            Err(error) => {
                let message = aws_sdk_sqs::error::DisplayErrorContext(&error).to_string();
                // A missing queue or a denied call does not fix itself; everything else may.
                let retryable = !matches!(
                    aws_sdk_sqs::error::ProvideErrorMetadata::code(&error),
                    Some(
                        "AWS.SimpleQueueService.NonExistentQueue"
                            | "QueueDoesNotExist"
                            | "AccessDenied"
                            | "AccessDeniedException"
                            | "InvalidParameterValue"
                    )
                );
                alerts
                    .iter()
                    .map(|_| {
                        Err(AlertError {
                            retryable,
                            message: message.clone(),
                        })
                    })
                    .collect()
            }
        }
    }
}

/// SQS deduplication ids are at most 128 characters of `[A-Za-z0-9!-/:-@[-`{-~]`; anything
/// else is replaced, and a long id is cut (transaction ids are far shorter in practice).
fn dedup_id(transaction_id: &str) -> String {
    transaction_id
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(128)
        .collect()
}

impl AlertSink for SqsAlertSink {
    async fn send(&self, alerts: &[OutgoingAlert<'_>]) -> Vec<Result<(), AlertError>> {
        let batches = alerts.chunks(MAX_BATCH).map(|chunk| self.send_batch(chunk));
        futures::future::join_all(batches)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Keeps alert bodies in memory; can fail the next call's alerts.
#[derive(Debug, Default)]
pub struct InMemoryAlertSink {
    sent: Mutex<Vec<String>>,
    fail_next: Mutex<Option<AlertError>>,
}

impl InMemoryAlertSink {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn bodies(&self) -> Vec<String> {
        self.sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The bodies sent so far, forgetting them.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .sent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    pub fn alerts(&self) -> Vec<Alert> {
        self.bodies()
            .iter()
            .filter_map(|b| serde_json::from_str(b).ok())
            .collect()
    }

    /// Every alert of the next call fails with `error`.
    pub fn fail_next(&self, error: AlertError) {
        *self
            .fail_next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
    }
}

impl AlertSink for InMemoryAlertSink {
    async fn send(&self, alerts: &[OutgoingAlert<'_>]) -> Vec<Result<(), AlertError>> {
        if let Some(error) = self
            .fail_next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            return alerts.iter().map(|_| Err(error.clone())).collect();
        }
        let mut sent = self
            .sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sent.extend(alerts.iter().map(|a| a.body.to_owned()));
        alerts.iter().map(|_| Ok(())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deduplication_ids_are_valid() {
        assert_eq!(dedup_id("tx-1"), "tx-1");
        assert_eq!(dedup_id("tx 1é"), "tx_1_");
        assert_eq!(dedup_id(&"x".repeat(300)).len(), 128);
    }
}
