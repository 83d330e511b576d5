//! One Kinesis record as a handler sees it, after base64 decoding and KPL deaggregation.
//!
//! Records borrow everything from the invocation's event buffer and decode arena: a batch of
//! ten thousand records costs no per-record allocation to expose.

use std::cmp::Ordering;
use std::fmt;

/// A Kinesis sequence number.
///
/// Real sequence numbers are decimal strings of 56 digits or more, too large for `u128`, and they
/// only grow within a shard. They are compared as (length, text), which orders decimal strings
/// without leading zeros numerically and never parses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SequenceNumber<'a>(&'a str);

impl<'a> SequenceNumber<'a> {
    pub fn new(text: &'a str) -> Self {
        Self(text)
    }

    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

impl Ord for SequenceNumber<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .len()
            .cmp(&other.0.len())
            .then_with(|| self.0.cmp(other.0))
    }
}

impl PartialOrd for SequenceNumber<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SequenceNumber<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A decoded record: the unit a handler processes.
///
/// For a KPL aggregate, each user record inside it is one `Record`; they share the Kinesis
/// sequence number (the unit Lambda checkpoints and redelivers) and differ by
/// `sub_sequence_number`.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Position of the Kinesis record in the event's `Records` array.
    pub event_index: usize,
    pub stream_arn: &'a str,
    /// The shard, taken from `eventID` (`shardId-…:sequence`).
    pub shard_id: &'a str,
    pub sequence_number: SequenceNumber<'a>,
    /// Index inside a KPL aggregate; `None` for a plain record.
    pub sub_sequence_number: Option<u64>,
    pub partition_key: &'a str,
    /// Only KPL user records carry one here; Lambda does not pass it for plain records.
    pub explicit_hash_key: Option<&'a str>,
    /// Arrival time at Kinesis, in milliseconds since the Unix epoch.
    pub approximate_arrival_ms: i64,
    /// The decoded payload bytes (for a record that failed to decode: the bytes as received).
    pub data: &'a [u8],
}

impl<'a> Record<'a> {
    /// A short, log-friendly identity: `shard/sequence[/sub]`.
    pub fn id(&self) -> RecordId<'a> {
        RecordId {
            shard_id: self.shard_id,
            sequence_number: self.sequence_number,
            sub_sequence_number: self.sub_sequence_number,
        }
    }
}

/// Where a record sits in the stream; unique within a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordId<'a> {
    pub shard_id: &'a str,
    pub sequence_number: SequenceNumber<'a>,
    pub sub_sequence_number: Option<u64>,
}

impl fmt::Display for RecordId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.shard_id, self.sequence_number)?;
        if let Some(sub) = self.sub_sequence_number {
            write!(f, "/{sub}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_order_by_length_then_text() {
        let long_a = "49590338271490256608559692538361571095921575989136588898";
        let long_b = "49590338271490256608559692538361571095921575989136588899";
        let longer = "149590338271490256608559692538361571095921575989136588898";
        assert!(SequenceNumber::new(long_a) < SequenceNumber::new(long_b));
        assert!(SequenceNumber::new(long_b) < SequenceNumber::new(longer));
        assert!(SequenceNumber::new("9") < SequenceNumber::new("10"));
        assert_eq!(
            SequenceNumber::new(long_a).cmp(&SequenceNumber::new(long_a)),
            Ordering::Equal
        );
    }
}
