//! Dead letters to SQS: `shardwise::dead_letter::DeadLetterSink` over the SDK.

use shardwise::dead_letter::{DeadLetterSink, EntryFailure, SinkEntry, SinkError};

/// Dead letters to an SQS queue (`DEAD_LETTER_QUEUE_URL`).
#[derive(Debug, Clone)]
pub struct SqsDeadLetterSink {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl SqsDeadLetterSink {
    pub fn new(client: aws_sdk_sqs::Client, queue_url: impl Into<String>) -> Self {
        Self {
            client,
            queue_url: queue_url.into(),
        }
    }
}

impl DeadLetterSink for SqsDeadLetterSink {
    async fn send_batch(&self, entries: &[SinkEntry]) -> Result<Vec<EntryFailure>, SinkError> {
        use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
        let mut request = self.client.send_message_batch().queue_url(&self.queue_url);
        for entry in entries {
            let built = SendMessageBatchRequestEntry::builder()
                .id(&entry.id)
                .message_body(&entry.body)
                .build()
                .map_err(SinkError::new)?;
            request = request.entries(built);
        }
        let output = request
            .send()
            .await
            .map_err(|e| SinkError::new(SqsCallError(e)))?;
        Ok(output
            .failed()
            .iter()
            .map(|f| EntryFailure {
                id: f.id().to_owned(),
                sender_fault: f.sender_fault(),
                message: format!("{}: {}", f.code(), f.message().unwrap_or_default()),
            })
            .collect())
    }
}

type SendBatchError = aws_sdk_sqs::error::SdkError<
    aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError,
    aws_sdk_sqs::config::http::HttpResponse,
>;

/// The SDK's error, shown with its whole chain of causes (the SDK's own `Display` says only
/// "dispatch failure" or "service error").
#[derive(Debug)]
struct SqsCallError(SendBatchError);

impl std::fmt::Display for SqsCallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", aws_sdk_sqs::error::DisplayErrorContext(&self.0))
    }
}

impl std::error::Error for SqsCallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}
