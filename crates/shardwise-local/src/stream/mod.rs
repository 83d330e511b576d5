//! Where records come from: the embedded stream ([`embedded`]) or Kinesis through the AWS SDK
//! ([`kinesis`]). Both are read the same way, one reader per shard that remembers its position.

pub mod embedded;
pub mod kinesis;

use std::sync::Arc;

pub use embedded::EmbeddedStream;
pub use kinesis::KinesisSource;

/// A record as read from a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    pub sequence_number: String,
    pub partition_key: String,
    pub data: Vec<u8>,
    /// `ApproximateArrivalTimestamp`, epoch milliseconds.
    pub arrival_ms: i64,
}

/// The mapping's `StartingPosition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartingPosition {
    TrimHorizon,
    Latest,
    /// Epoch milliseconds (`StartingPositionTimestamp` is in seconds).
    AtTimestamp(i64),
}

impl StartingPosition {
    pub fn parse(text: &str, timestamp_s: Option<f64>) -> Result<Self, String> {
        match text {
            "TRIM_HORIZON" => Ok(Self::TrimHorizon),
            "LATEST" => Ok(Self::Latest),
            "AT_TIMESTAMP" => {
                let ts = timestamp_s
                    .ok_or("AT_TIMESTAMP needs a starting position timestamp (seconds)")?;
                #[allow(clippy::cast_possible_truncation)]
                Ok(Self::AtTimestamp((ts * 1000.0) as i64))
            }
            other => Err(format!(
                "starting position {other:?}: expected TRIM_HORIZON, LATEST or AT_TIMESTAMP"
            )),
        }
    }
}

/// Where a shard reader starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// No checkpoint yet: the mapping's starting position.
    Start(StartingPosition),
    /// After a checkpointed sequence number.
    After(String),
}

/// One read.
#[derive(Debug, Clone, Default)]
pub struct ReadBatch {
    pub records: Vec<StreamRecord>,
    /// How far the last record read is behind the shard's newest (Kinesis's
    /// `MillisBehindLatest`).
    pub millis_behind: i64,
}

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    #[error("stream: {0}")]
    Backend(String),
    #[error("Kinesis {call}: {message}")]
    Kinesis { call: &'static str, message: String },
}

/// A stream to read.
#[derive(Debug, Clone)]
pub enum Source {
    Embedded(Arc<EmbeddedStream>),
    Kinesis(Arc<KinesisSource>),
}

impl Source {
    pub fn arn(&self) -> String {
        match self {
            Self::Embedded(s) => s.arn(),
            Self::Kinesis(s) => s.arn().to_owned(),
        }
    }

    pub async fn shards(&self) -> Result<Vec<String>, StreamError> {
        match self {
            Self::Embedded(s) => Ok(s.shard_ids()),
            Self::Kinesis(s) => s.shards().await,
        }
    }

    pub async fn open(&self, shard: &str, position: Position) -> Result<ShardReader, StreamError> {
        match self {
            Self::Embedded(s) => {
                let index = embedded::shard_index(shard)
                    .ok_or_else(|| StreamError::Backend(format!("no shard {shard}")))?;
                let after = s.resolve(index, &position)?;
                Ok(ShardReader::Embedded {
                    stream: s.clone(),
                    shard: index,
                    after,
                })
            }
            Self::Kinesis(s) => Ok(ShardReader::Kinesis(s.reader(shard, position).await?)),
        }
    }
}

/// Reads one shard forward from a position.
#[derive(Debug)]
pub enum ShardReader {
    Embedded {
        stream: Arc<EmbeddedStream>,
        shard: u32,
        after: i64,
    },
    Kinesis(kinesis::KinesisShardReader),
}

impl ShardReader {
    /// The next records, at most `limit` (fewer, or none, when the shard has no more yet).
    pub async fn read(&mut self, limit: usize) -> Result<ReadBatch, StreamError> {
        match self {
            Self::Embedded {
                stream,
                shard,
                after,
            } => {
                let batch = stream.read(*shard, *after, limit)?;
                if let Some(last) = batch.records.last()
                    && let Some(seq) = last.sequence_number.get(8..).and_then(|s| s.parse().ok())
                {
                    *after = seq;
                }
                Ok(batch)
            }
            Self::Kinesis(reader) => reader.read(limit).await,
        }
    }
}

/// Compare sequence numbers as Kinesis orders them: by length, then as strings.
pub fn sequence_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}
