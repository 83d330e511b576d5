//! Kinesis through the AWS SDK (AWS itself, or any endpoint from `AWS_ENDPOINT_URL`, e.g. moto):
//! `ListShards`, `GetShardIterator`, `GetRecords`, as Lambda's shared-throughput poller does.

use aws_sdk_kinesis::error::DisplayErrorContext;
use aws_sdk_kinesis::types::ShardIteratorType;

use super::{Position, ReadBatch, StartingPosition, StreamError, StreamRecord};

/// A Kinesis stream named by its ARN (resolved from a name at start).
#[derive(Debug, Clone)]
pub struct KinesisSource {
    client: aws_sdk_kinesis::Client,
    arn: String,
}

fn kinesis_error<E, R>(
    call: &'static str,
    error: aws_sdk_kinesis::error::SdkError<E, R>,
) -> StreamError
where
    E: std::error::Error + aws_sdk_kinesis::error::ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_kinesis::error::ProvideErrorMetadata;
    let message = match (error.code(), error.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(&error).to_string(),
    };
    StreamError::Kinesis { call, message }
}

impl KinesisSource {
    /// `name_or_arn`: a stream name (looked up with `DescribeStreamSummary`) or its ARN.
    pub async fn connect(
        client: aws_sdk_kinesis::Client,
        name_or_arn: &str,
    ) -> Result<Self, StreamError> {
        let arn = if name_or_arn.starts_with("arn:") {
            name_or_arn.to_owned()
        } else {
            let summary = client
                .describe_stream_summary()
                .stream_name(name_or_arn)
                .send()
                .await
                .map_err(|e| kinesis_error("DescribeStreamSummary", e))?;
            summary
                .stream_description_summary()
                .map(|d| d.stream_arn().to_owned())
                .ok_or_else(|| StreamError::Kinesis {
                    call: "DescribeStreamSummary",
                    message: "no stream description".to_owned(),
                })?
        };
        Ok(Self { client, arn })
    }

    pub fn arn(&self) -> &str {
        &self.arn
    }

    pub async fn shards(&self) -> Result<Vec<String>, StreamError> {
        let mut shards = Vec::new();
        let mut next: Option<String> = None;
        // Bounded: a stream has at most a few thousand shards, 1000 per page.
        for _ in 0..100 {
            let mut request = self.client.list_shards();
            request = match &next {
                Some(token) => request.next_token(token),
                None => request.stream_arn(&self.arn),
            };
            let page = request
                .send()
                .await
                .map_err(|e| kinesis_error("ListShards", e))?;
            shards.extend(page.shards().iter().map(|s| s.shard_id().to_owned()));
            next = page.next_token().map(str::to_owned);
            if next.is_none() {
                break;
            }
        }
        Ok(shards)
    }

    pub async fn reader(
        &self,
        shard: &str,
        position: Position,
    ) -> Result<KinesisShardReader, StreamError> {
        let mut request = self
            .client
            .get_shard_iterator()
            .stream_arn(&self.arn)
            .shard_id(shard);
        request = match position {
            Position::Start(StartingPosition::TrimHorizon) => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            Position::Start(StartingPosition::Latest) => {
                request.shard_iterator_type(ShardIteratorType::Latest)
            }
            Position::Start(StartingPosition::AtTimestamp(ms)) => request
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(aws_sdk_kinesis::primitives::DateTime::from_millis(ms)),
            Position::After(sequence) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(sequence),
        };
        let out = request
            .send()
            .await
            .map_err(|e| kinesis_error("GetShardIterator", e))?;
        Ok(KinesisShardReader {
            client: self.client.clone(),
            arn: self.arn.clone(),
            iterator: out.shard_iterator().map(str::to_owned),
        })
    }
}

/// Follows one shard's iterator.
#[derive(Debug)]
pub struct KinesisShardReader {
    client: aws_sdk_kinesis::Client,
    arn: String,
    /// `None` once the shard is closed and read to its end.
    iterator: Option<String>,
}

impl KinesisShardReader {
    pub async fn read(&mut self, limit: usize) -> Result<ReadBatch, StreamError> {
        let Some(iterator) = self.iterator.clone() else {
            return Ok(ReadBatch::default());
        };
        let out = self
            .client
            .get_records()
            .stream_arn(&self.arn)
            .shard_iterator(iterator)
            .limit(i32::try_from(limit.clamp(1, 10_000)).unwrap_or(10_000))
            .send()
            .await
            .map_err(|e| kinesis_error("GetRecords", e))?;
        self.iterator = out.next_shard_iterator().map(str::to_owned);
        let records = out
            .records()
            .iter()
            .map(|r| StreamRecord {
                sequence_number: r.sequence_number().to_owned(),
                partition_key: r.partition_key().unwrap_or_default().to_owned(),
                data: r.data().as_ref().to_vec(),
                arrival_ms: r
                    .approximate_arrival_timestamp()
                    .and_then(|t| t.to_millis().ok())
                    .unwrap_or(0),
            })
            .collect();
        Ok(ReadBatch {
            records,
            millis_behind: out.millis_behind_latest().unwrap_or(0),
        })
    }
}
