//! Idempotency keys: which records count as "the same", and whether two of them can be in flight
//! at once.
//!
//! A key is a [`KeyStrategy`]'s text for a record, namespaced by the function's name so two
//! functions on one stream never share records. The strategy also states its [`KeyScope`],
//! which decides whether the gate must take a lock before running a record (see the module
//! docs of [`crate::idempotency`]).

use std::fmt::Write as _;

use sha2::{Digest, Sha256};
use sonic_rs::JsonValueTrait;

use crate::record::Record;

/// DynamoDB's limit on a partition key value. Longer keys are replaced by their SHA-256.
pub const MAX_KEY_BYTES: usize = 2048;

/// Where two records with the same key can come from, which decides whether a key must be
/// claimed (locked) before its record runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyScope {
    /// The key names one position in one shard. Lambda hands a shard's records to one
    /// invocation at a time, so no other invocation can hold the same key while this one runs:
    /// no claim is needed.
    OneShard,
    /// The key comes from the payload and may arrive on several shards, hence in concurrent
    /// invocations: it is claimed with a conditional write before its record runs.
    AnyShard,
}

/// Why a record has no key. Such a record is rejected (dead-lettered): without a key its effect
/// could not be made to happen once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("payload has no JSON field `{path}` to take the idempotency key from")]
    Missing { path: String },
    #[error("JSON field `{path}` holds {found}; an idempotency key must be a string or a number")]
    WrongType { path: String, found: &'static str },
    #[error("JSON field `{path}` is empty; an idempotency key must not be")]
    Empty { path: String },
}

impl KeyError {
    /// The stable error type written into the dead letter.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Missing { .. } | Self::Empty { .. } => "IdempotencyKeyMissing",
            Self::WrongType { .. } => "IdempotencyKeyInvalid",
        }
    }
}

/// Derives a record's idempotency key.
pub trait KeyStrategy: Send + Sync {
    /// Whether keys of this strategy can be in flight in two invocations at once.
    fn scope(&self) -> KeyScope;

    /// Append the key of `record` to `out` (the namespace is already there).
    fn write_key(&self, record: &Record<'_>, out: &mut String) -> Result<(), KeyError>;
}

/// The record's place in the stream: stream ARN, shard, sequence number and, for a KPL user
/// record, its sub-sequence number. Unique per record; the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordKey;

impl KeyStrategy for RecordKey {
    fn scope(&self) -> KeyScope {
        KeyScope::OneShard
    }

    fn write_key(&self, record: &Record<'_>, out: &mut String) -> Result<(), KeyError> {
        out.push_str(record.stream_arn);
        out.push('#');
        out.push_str(record.shard_id);
        out.push('#');
        out.push_str(record.sequence_number.as_str());
        if let Some(sub) = record.sub_sequence_number {
            // Writing to a String cannot fail.
            let _ = write!(out, "#{sub}");
        }
        Ok(())
    }
}

/// A field of the JSON payload (`transaction_id`), so a producer that sends one business event
/// twice, as two records, has it handled once. Strings are taken unescaped
/// (`transaction_id=tx-1`), numbers as written and marked as numbers (`transaction_id#12345`):
/// the key keeps the JSON type, so `{"id":1}` and `{"id":"1"}` are two events, not one.
#[derive(Debug, Clone)]
pub struct JsonFieldKey {
    path: Vec<String>,
    dotted: String,
}

impl JsonFieldKey {
    /// A top-level field.
    pub fn new(field: impl Into<String>) -> Self {
        Self::path([field.into()])
    }

    /// A nested field: `JsonFieldKey::path(["order", "id"])`.
    pub fn path<I: IntoIterator<Item = impl Into<String>>>(path: I) -> Self {
        let path: Vec<String> = path.into_iter().map(Into::into).collect();
        let dotted = path.join(".");
        Self { path, dotted }
    }
}

impl KeyStrategy for JsonFieldKey {
    fn scope(&self) -> KeyScope {
        KeyScope::AnyShard
    }

    fn write_key(&self, record: &Record<'_>, out: &mut String) -> Result<(), KeyError> {
        let missing = || KeyError::Missing {
            path: self.dotted.clone(),
        };
        // Finds the field without building the document: the rest of the payload is skipped.
        let value = sonic_rs::get(record.data, &self.path).map_err(|_| missing())?;
        // `=` before a string, `#` before a number: with one strategy per function (one dotted
        // path), the separator alone tells the types apart.
        let (separator, text) = match value.get_type() {
            sonic_rs::JsonType::String => ('=', value.as_str().ok_or_else(missing)?),
            sonic_rs::JsonType::Number => ('#', value.as_raw_str()),
            other => {
                return Err(KeyError::WrongType {
                    path: self.dotted.clone(),
                    found: match other {
                        sonic_rs::JsonType::Null => "null",
                        sonic_rs::JsonType::Boolean => "a boolean",
                        sonic_rs::JsonType::Object => "an object",
                        _ => "an array",
                    },
                });
            }
        };
        if text.is_empty() {
            return Err(KeyError::Empty {
                path: self.dotted.clone(),
            });
        }
        out.push_str(&self.dotted);
        out.push(separator);
        out.push_str(text);
        Ok(())
    }
}

/// The stored key of `record`: `{function}#{strategy's key}`, or `{function}#sha256:{hex}` when
/// that would exceed DynamoDB's key size. Lambda function names cannot contain `#`, so the
/// namespace is unambiguous.
pub fn namespaced_key(
    strategy: &impl KeyStrategy,
    function_name: &str,
    record: &Record<'_>,
) -> Result<String, KeyError> {
    let mut key = String::with_capacity(function_name.len() + 160);
    key.push_str(function_name);
    key.push('#');
    let prefix = key.len();
    strategy.write_key(record, &mut key)?;
    if key.len() > MAX_KEY_BYTES {
        let digest = Sha256::digest(&key.as_bytes()[prefix..]);
        key.truncate(prefix);
        key.push_str("sha256:");
        push_hex(&mut key, &digest);
    }
    Ok(key)
}

/// The SHA-256 of a payload, hex.
pub fn payload_hash(data: &[u8]) -> String {
    let mut out = String::with_capacity(64);
    push_hex(&mut out, &Sha256::digest(data));
    out
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::record::SequenceNumber;

    fn record(data: &[u8], sub: Option<u64>) -> Record<'_> {
        Record {
            event_index: 0,
            stream_arn: "arn:aws:kinesis:us-east-1:1:stream/s",
            shard_id: "shardId-000000000001",
            sequence_number: SequenceNumber::new(
                "49590338271490256608559692538361571095921575989136588898",
            ),
            sub_sequence_number: sub,
            partition_key: "pk",
            explicit_hash_key: None,
            approximate_arrival_ms: 0,
            data,
        }
    }

    #[test]
    fn record_keys_name_the_position_and_the_function() {
        let key = namespaced_key(&RecordKey, "fraud", &record(b"{}", None)).unwrap();
        assert_eq!(
            key,
            "fraud#arn:aws:kinesis:us-east-1:1:stream/s#shardId-000000000001#49590338271490256608559692538361571095921575989136588898"
        );
        let kpl = namespaced_key(&RecordKey, "fraud", &record(b"{}", Some(3))).unwrap();
        assert!(kpl.ends_with("588898#3"));
        let other = namespaced_key(&RecordKey, "audit", &record(b"{}", None)).unwrap();
        assert_ne!(key, other);
    }

    #[test]
    fn json_field_keys_take_strings_and_numbers() {
        let strategy = JsonFieldKey::new("transaction_id");
        let text = br#"{"amount":5,"transaction_id":"tx\u002d1"}"#;
        assert_eq!(
            namespaced_key(&strategy, "f", &record(text, None)).unwrap(),
            "f#transaction_id=tx-1"
        );
        let number = br#"{"transaction_id":12345}"#;
        assert_eq!(
            namespaced_key(&strategy, "f", &record(number, None)).unwrap(),
            "f#transaction_id#12345"
        );
        // The JSON type is part of the key: a number and a string that read alike differ.
        let as_text = br#"{"transaction_id":"12345"}"#;
        assert_ne!(
            namespaced_key(&strategy, "f", &record(number, None)).unwrap(),
            namespaced_key(&strategy, "f", &record(as_text, None)).unwrap()
        );
        let nested = JsonFieldKey::path(["order", "id"]);
        assert_eq!(
            namespaced_key(&nested, "f", &record(br#"{"order":{"id":"o-1"}}"#, None)).unwrap(),
            "f#order.id=o-1"
        );
    }

    #[test]
    fn records_without_a_usable_key_are_errors() {
        let strategy = JsonFieldKey::new("transaction_id");
        let cases: [(&[u8], &str); 5] = [
            (br#"{"other":1}"#, "IdempotencyKeyMissing"),
            (b"not json", "IdempotencyKeyMissing"),
            (br#"{"transaction_id":""}"#, "IdempotencyKeyMissing"),
            (br#"{"transaction_id":null}"#, "IdempotencyKeyInvalid"),
            (br#"{"transaction_id":{"a":1}}"#, "IdempotencyKeyInvalid"),
        ];
        for (data, error_type) in cases {
            let err = namespaced_key(&strategy, "f", &record(data, None)).unwrap_err();
            assert_eq!(err.error_type(), error_type, "{err}");
            assert!(err.to_string().contains("transaction_id"));
        }
    }

    #[test]
    fn oversized_keys_are_hashed_within_the_limit() {
        let long = format!(r#"{{"id":"{}"}}"#, "x".repeat(3000));
        let key = namespaced_key(
            &JsonFieldKey::new("id"),
            "f",
            &record(long.as_bytes(), None),
        )
        .unwrap();
        assert!(key.starts_with("f#sha256:"));
        assert_eq!(key.len(), "f#sha256:".len() + 64);
    }

    #[test]
    fn payload_hash_is_sha256_hex() {
        assert_eq!(
            payload_hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
