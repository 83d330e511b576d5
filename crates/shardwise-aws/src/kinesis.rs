//! `PutRecords` on a real Kinesis stream: `shardwise::producer::StreamWriter` over the SDK.

use shardwise::handler::ErrorClass;
use shardwise::producer::{CallError, EntryResult, PutEntry, StreamWriter};

use crate::retryable;

/// Where a [`KinesisStreamWriter`] puts records: a stream name or ARN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamTarget {
    Name(String),
    Arn(String),
}

impl StreamTarget {
    /// An ARN when it looks like one (`arn:…`), else a name.
    pub fn parse(name_or_arn: &str) -> Self {
        if name_or_arn.starts_with("arn:") {
            Self::Arn(name_or_arn.to_owned())
        } else {
            Self::Name(name_or_arn.to_owned())
        }
    }
}

/// `PutRecords` on a real stream (or any endpoint speaking Kinesis, such as moto).
#[derive(Debug, Clone)]
pub struct KinesisStreamWriter {
    client: aws_sdk_kinesis::Client,
    target: StreamTarget,
}

impl KinesisStreamWriter {
    pub fn new(client: aws_sdk_kinesis::Client, target: StreamTarget) -> Self {
        Self { client, target }
    }
}

impl StreamWriter for KinesisStreamWriter {
    async fn put_records(&self, entries: &[PutEntry<'_>]) -> Result<Vec<EntryResult>, CallError> {
        use aws_sdk_kinesis::primitives::Blob;
        use aws_sdk_kinesis::types::PutRecordsRequestEntry;

        let mut request = self.client.put_records();
        request = match &self.target {
            StreamTarget::Name(name) => request.stream_name(name),
            StreamTarget::Arn(arn) => request.stream_arn(arn),
        };
        for entry in entries {
            let built = PutRecordsRequestEntry::builder()
                .partition_key(entry.partition_key)
                .set_explicit_hash_key(entry.explicit_hash_key.map(str::to_owned))
                .data(Blob::new(entry.data))
                .build()
                .map_err(|e| CallError {
                    class: ErrorClass::Permanent,
                    code: None,
                    message: e.to_string(),
                })?;
            request = request.records(built);
        }
        let output = request.send().await.map_err(call_error)?;
        Ok(output
            .records()
            .iter()
            .map(|result| match result.error_code() {
                Some(code) => EntryResult::Failed {
                    error_code: code.to_owned(),
                    message: result.error_message().unwrap_or_default().to_owned(),
                    // Kinesis names ProvisionedThroughputExceededException, InternalFailure and
                    // the KMS codes per record; the one list decides which pass on a retry.
                    class: if retryable::classify_code(Some(code), 200).is_retryable() {
                        ErrorClass::Retryable
                    } else {
                        ErrorClass::Permanent
                    },
                },
                None => EntryResult::Put {
                    shard_id: result.shard_id().unwrap_or_default().to_owned(),
                    sequence_number: result.sequence_number().unwrap_or_default().to_owned(),
                },
            })
            .collect())
    }
}

/// Classify a failed call: throttling, server faults and transport errors are worth retrying;
/// a missing stream, bad arguments or access denied are not.
fn call_error<E>(
    error: aws_smithy_runtime_api::client::result::SdkError<
        E,
        aws_smithy_runtime_api::client::orchestrator::HttpResponse,
    >,
) -> CallError
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata
        + std::error::Error
        + Send
        + Sync
        + 'static,
{
    let code = match &error {
        aws_smithy_runtime_api::client::result::SdkError::ServiceError(context) => {
            context.err().code().map(str::to_owned)
        }
        _ => None,
    };
    let class = if retryable::classify(&error).is_retryable() {
        ErrorClass::Retryable
    } else {
        ErrorClass::Permanent
    };
    CallError {
        class,
        code,
        message: aws_sdk_kinesis::error::DisplayErrorContext(&error).to_string(),
    }
}
