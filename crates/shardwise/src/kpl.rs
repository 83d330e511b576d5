//! KPL (Kinesis Producer Library) aggregated records: recognise them, split them into the user
//! records they carry, and build them.
//!
//! # The format
//!
//! A producer using the KPL (or one of the awslabs `kinesis-aggregation` libraries) packs many
//! small *user records* into one Kinesis record to save on per-record cost and throughput. Such a
//! record's data is
//!
//! ```text
//! F3 89 9A C2 | AggregatedRecord (protobuf, proto2) | MD5 of the protobuf bytes (16 bytes)
//! ```
//!
//! where `AggregatedRecord` holds a table of partition keys (field 1), a table of explicit hash
//! keys (field 2) and the user records (field 3). Each user record (`Record`) refers to its keys
//! by index into those tables (fields 1 and 2), carries its payload (field 3) and optional tags
//! (field 4). Lambda delivers the aggregate as one Kinesis record; every user record in it shares
//! that record's sequence number and is told apart by its *sub-sequence number*, its 0-based
//! position in the aggregate.
//!
//! # Why the digest is verified, and a bad aggregate is an error
//!
//! The magic is not valid UTF-8, so no text payload (JSON, CSV, logs) can start with it; only a
//! binary payload could, by a 1 in 2³² chance. A record that starts with the magic is therefore
//! taken to *be* an aggregate, and the digest tells whether it arrived intact. The official
//! deaggregators treat a record with the magic but a bad digest (and, in the Python one, a
//! protobuf that does not parse) as a *plain* record: the handler then receives the raw
//! aggregate, protobuf and all, as if it were one user payload, and the user records inside never
//! reach it as such. Shardwise instead returns a [`KplError`] for that Kinesis record, so the
//! processor reports it (dead letter, partial batch failure) with its identity intact. Every
//! [`KplError`] is permanent: it is about the bytes, and redelivering the same bytes cannot help.
//!
//! What we do differently from the official libraries (checked against the Python deaggregator):
//!
//! | input | official | Shardwise |
//! | --- | --- | --- |
//! | no magic | plain record | plain record (`Ok(None)`) |
//! | magic, shorter than magic + digest | plain record | [`KplError::TooShort`] |
//! | magic, digest mismatch | plain record | [`KplError::DigestMismatch`] |
//! | magic, digest fine, protobuf malformed | plain record | [`KplError::Malformed`], [`KplError::Decode`] |
//! | required field missing (`partition_key_index`, `data`) | rejected by the protobuf runtime → plain | [`KplError::MissingField`] (prost does not check `required`, so we do) |
//! | key index out of range | error logged, the remaining user records dropped | [`KplError::PartitionKeyIndexOutOfRange`], [`KplError::ExplicitHashKeyIndexOutOfRange`] |
//! | explicit hash key index with an empty table | index ignored | [`KplError::ExplicitHashKeyIndexOutOfRange`] |
//! | no user records | the record vanishes | [`KplError::Empty`] |
//!
//! The KCL (not used on Lambda) also drops user records whose hash key falls outside the shard
//! after a reshard; Lambda's deaggregators do not, and neither do we.
//!
//! # Bounded work on hostile input
//!
//! A Kinesis record is at most 10 MiB, but decoding can amplify it: an empty user record is two
//! bytes on the wire and tens of bytes in memory, and every user record that shares a partition
//! key gets its own copy of it. So:
//!
//! - The top level of `AggregatedRecord` is walked by hand (a few dozen lines of wire-format
//!   reading below) instead of being decoded by prost into a `Vec` of every user record at once.
//!   A first walk only counts, and rejects more than [`MAX_USER_RECORDS`] user records (or key
//!   table entries) before anything is allocated; then the key tables are borrowed from the input
//!   as `&str`, and each user record is decoded by prost from its own slice, one at a time.
//! - The bytes handed back (keys plus payloads, summed over the user records) may not exceed
//!   [`MAX_DEAGGREGATED_BYTES`]; the check runs before each key is copied.
//! - Tags (field 4 of `Record`) are skipped, not decoded: nothing uses them, and decoding them
//!   would allocate per tag.
//! - Nothing is pre-allocated from a count read from the input; capacities come from counting the
//!   fields actually present.
//! - Proto2 groups (wire types 3 and 4) at the top level are rejected as malformed: the schema has
//!   none and no producer writes them.
//!
//! # Ownership
//!
//! [`UserRecord`]s own their bytes (`String`, `Vec<u8>`). prost's derived messages cannot borrow
//! from their input, and the caller frees the aggregate's bytes once it is split, so borrowing
//! would buy nothing. Each payload is allocated once (by prost, then moved); each partition key
//! is copied once per user record from the borrowed table.

use std::collections::HashMap;
use std::fmt;

use md5::{Digest, Md5};
use prost::Message;

/// The four bytes every KPL aggregate starts with.
pub const KPL_MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Length of the MD5 digest that ends an aggregate.
const DIGEST_LEN: usize = 16;

/// The shortest aggregate: magic and digest around an empty protobuf.
pub const MIN_AGGREGATE_LEN: usize = KPL_MAGIC.len() + DIGEST_LEN;

/// Most user records (and most entries in either key table) one aggregate may hold.
///
/// The KPL caps an aggregate at 1 MiB and a valid user record costs at least 6 bytes on the wire,
/// so KPL aggregates hold under 175,000; a 10 MiB aggregate from another producer could pass the
/// limit only with payloads of a few bytes each.
pub const MAX_USER_RECORDS: usize = 1_000_000;

/// Most bytes (partition keys, explicit hash keys and payloads, summed over the user records)
/// one aggregate may expand to.
///
/// Payloads alone can never exceed the input; only keys shared by many user records amplify. 64
/// MiB allows a 1 MiB KPL aggregate to grow 64-fold while keeping a hostile one from exhausting a
/// Lambda function's memory.
pub const MAX_DEAGGREGATED_BYTES: usize = 64 * 1024 * 1024;

/// What one user record costs in memory besides its keys and payload: the decoded record, its
/// view, its state and outcome in the processor (measured: about 550 bytes for an empty user
/// record with a shared 256-byte key, key copy included).
pub const USER_RECORD_OVERHEAD_BYTES: usize = 512;

/// Most bytes (keys, payloads and [`USER_RECORD_OVERHEAD_BYTES`] per user record) all the
/// aggregates of one event may expand to. A 6 MB event that expands past it is hostile or
/// broken: a function with 512 MB must survive it, so the aggregate that crosses the line fails.
pub const MAX_EVENT_EXPANDED_BYTES: usize = 128 * 1024 * 1024;

/// What the aggregates of one event may still expand to, in user records and bytes (per-record
/// overhead included). [`deaggregate`] checks one aggregate alone; the event decoder passes one
/// budget through all of an event's aggregates with [`deaggregate_within`], so that many
/// aggregates cannot add up to what one may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpansionBudget {
    pub records: usize,
    pub bytes: usize,
}

impl ExpansionBudget {
    /// The budget of one whole event.
    pub fn event() -> Self {
        Self {
            records: MAX_USER_RECORDS,
            bytes: MAX_EVENT_EXPANDED_BYTES,
        }
    }
}

/// True when `data` starts with [`KPL_MAGIC`], that is exactly when [`deaggregate`] does not
/// return `Ok(None)`.
///
/// A record that starts with the magic but is shorter than [`MIN_AGGREGATE_LEN`] counts as
/// aggregated here, unlike in the official libraries: it is a truncated aggregate, and
/// [`deaggregate`] reports it as [`KplError::TooShort`] rather than letting it pass as user data.
pub fn is_aggregated(data: &[u8]) -> bool {
    data.starts_with(&KPL_MAGIC)
}

/// One user record inside an aggregate (owned; see the module docs for why).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Position of this user record in its aggregate, from 0.
    pub sub_sequence_number: u64,
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Vec<u8>,
}

/// One user record to put into an aggregate with [`aggregate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregateEntry<'a> {
    pub partition_key: &'a str,
    pub explicit_hash_key: Option<&'a str>,
    pub data: &'a [u8],
}

/// One of the two key tables of an aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyTable {
    PartitionKey,
    ExplicitHashKey,
}

impl fmt::Display for KeyTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyTable::PartitionKey => "partition key table",
            KeyTable::ExplicitHashKey => "explicit hash key table",
        })
    }
}

/// Why a record that starts with [`KPL_MAGIC`] could not be split into user records.
///
/// All of these are permanent (see [`KplError::is_retryable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KplError {
    #[error(
        "record starts with the KPL magic but is only {len} bytes; an aggregate needs at least {MIN_AGGREGATE_LEN} (magic and MD5 digest)"
    )]
    TooShort { len: usize },

    #[error(
        "KPL aggregate is corrupt: its MD5 digest is {}, but its protobuf hashes to {}",
        hex(.carried),
        hex(.computed)
    )]
    DigestMismatch {
        carried: [u8; DIGEST_LEN],
        computed: [u8; DIGEST_LEN],
    },

    /// The top level of `AggregatedRecord` is not valid protobuf.
    #[error("KPL aggregate protobuf is malformed at byte {offset} of the record: {reason}")]
    Malformed { offset: usize, reason: &'static str },

    /// One user record (`Record`) is not valid protobuf. prost's message is part of this one's
    /// text, so it is not also exposed as `source()`, which would print it twice in a chain.
    #[error("KPL sub-record {sub_sequence_number} is malformed: {error}")]
    Decode {
        sub_sequence_number: u64,
        error: prost::DecodeError,
    },

    #[error("KPL sub-record {sub_sequence_number} lacks its required field `{field}`")]
    MissingField {
        sub_sequence_number: u64,
        field: &'static str,
    },

    #[error("KPL aggregate's {table} entry {entry} is not valid UTF-8")]
    InvalidUtf8 { table: KeyTable, entry: usize },

    #[error(
        "KPL sub-record {sub_sequence_number} has partition_key_index {index}, but the partition key table has {table_len} entries"
    )]
    PartitionKeyIndexOutOfRange {
        sub_sequence_number: u64,
        index: u64,
        table_len: usize,
    },

    #[error(
        "KPL sub-record {sub_sequence_number} has explicit_hash_key_index {index}, but the explicit hash key table has {table_len} entries"
    )]
    ExplicitHashKeyIndexOutOfRange {
        sub_sequence_number: u64,
        index: u64,
        table_len: usize,
    },

    #[error("KPL aggregate holds no user records")]
    Empty,

    #[error("KPL aggregate holds more than {limit} user records")]
    TooManyRecords { limit: usize },

    #[error("KPL aggregate's {table} has more than {limit} entries")]
    TableTooLarge { table: KeyTable, limit: usize },

    #[error(
        "KPL aggregate expands to more than {limit} bytes of keys and payloads (reached at sub-record {sub_sequence_number})"
    )]
    TooLarge {
        sub_sequence_number: u64,
        limit: usize,
    },

    /// The aggregate would take the event's expansion past its budget (what the event's earlier
    /// aggregates left of [`ExpansionBudget::event`]).
    #[error(
        "KPL aggregate of {records} user records would expand to at least {bytes} bytes in memory \
         (keys, payloads and {USER_RECORD_OVERHEAD_BYTES} bytes per user record); the event's \
         aggregates have {} user records and {} bytes left of their budget",
        budget.records,
        budget.bytes
    )]
    EventBudgetExceeded {
        records: usize,
        bytes: usize,
        budget: ExpansionBudget,
    },
}

impl KplError {
    /// Always false: every error is about the record's bytes, which a retry delivers unchanged.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Split a KPL aggregate into its user records, in order.
///
/// Returns `Ok(None)` when `data` does not start with [`KPL_MAGIC`]: it is a plain record. Any
/// record that does start with it yields either its user records (at least one) or an error; see
/// the module docs for how this differs from the official deaggregators.
pub fn deaggregate(data: &[u8]) -> Result<Option<Vec<UserRecord>>, KplError> {
    deaggregate_within(data, &mut ExpansionBudget::event())
}

/// [`deaggregate`], spending from `budget` what the user records cost. An aggregate that would
/// overspend it fails as a whole ([`KplError::EventBudgetExceeded`]) and spends nothing, so the
/// records after it still decode.
pub fn deaggregate_within(
    data: &[u8],
    budget: &mut ExpansionBudget,
) -> Result<Option<Vec<UserRecord>>, KplError> {
    let Some(rest) = data.strip_prefix(&KPL_MAGIC) else {
        return Ok(None);
    };
    let Some((message, carried)) = rest.split_last_chunk::<DIGEST_LEN>() else {
        return Err(KplError::TooShort { len: data.len() });
    };
    let computed: [u8; DIGEST_LEN] = Md5::digest(message).into();
    if computed != *carried {
        return Err(KplError::DigestMismatch {
            carried: *carried,
            computed,
        });
    }

    let counts = count_fields(message)?;
    if counts.records == 0 {
        return Err(KplError::Empty);
    }
    // Checked before anything is allocated for the user records.
    let spent_at_least = counts.records.saturating_mul(USER_RECORD_OVERHEAD_BYTES);
    if counts.records > budget.records || spent_at_least > budget.bytes {
        return Err(KplError::EventBudgetExceeded {
            records: counts.records,
            bytes: spent_at_least,
            budget: *budget,
        });
    }
    let tables = KeyTables::borrow(message, &counts)?;

    let mut users = Vec::with_capacity(counts.records);
    let mut produced = 0usize;
    for field in WireFields::new(message) {
        let field = field?;
        if let (RECORDS, WireValue::LengthDelimited(bytes)) = (field.number, field.value) {
            // `users.len()` is below MAX_USER_RECORDS, so it fits any u64.
            let sub_sequence_number = users.len() as u64;
            users.push(decode_user_record(
                sub_sequence_number,
                bytes,
                &tables,
                &mut produced,
            )?);
            let spent = produced.saturating_add(users.len() * USER_RECORD_OVERHEAD_BYTES);
            if spent > budget.bytes {
                return Err(KplError::EventBudgetExceeded {
                    records: counts.records,
                    bytes: spent,
                    budget: *budget,
                });
            }
        }
    }
    budget.records -= users.len();
    budget.bytes -= produced.saturating_add(users.len() * USER_RECORD_OVERHEAD_BYTES);
    Ok(Some(users))
}

/// Build an aggregate: magic, protobuf, MD5.
///
/// Partition keys and explicit hash keys are stored once each, in order of first use, as the KPL
/// does. No limit is enforced: keeping within Kinesis's record size and key lengths (partition
/// keys of 1 to 256 characters) is the caller's job. An empty `entries` gives an aggregate with
/// no user records, which [`deaggregate`] rejects as [`KplError::Empty`].
pub fn aggregate(entries: &[AggregateEntry<'_>]) -> Vec<u8> {
    let mut partition_keys = KeyInterner::default();
    let mut explicit_hash_keys = KeyInterner::default();
    let records = entries
        .iter()
        .map(|entry| proto::Record {
            partition_key_index: Some(partition_keys.index_of(entry.partition_key)),
            explicit_hash_key_index: entry
                .explicit_hash_key
                .map(|key| explicit_hash_keys.index_of(key)),
            data: Some(entry.data.to_vec()),
        })
        .collect();
    let message = proto::AggregatedRecord {
        partition_key_table: partition_keys.table,
        explicit_hash_key_table: explicit_hash_keys.table,
        records,
    }
    .encode_to_vec();

    let digest = Md5::digest(&message);
    let mut out = Vec::with_capacity(KPL_MAGIC.len() + message.len() + DIGEST_LEN);
    out.extend_from_slice(&KPL_MAGIC);
    out.extend_from_slice(&message);
    out.extend_from_slice(&digest);
    out
}

/// Assigns table indexes to keys in order of first use.
#[derive(Default)]
struct KeyInterner<'a> {
    indexes: HashMap<&'a str, u64>,
    table: Vec<String>,
}

impl<'a> KeyInterner<'a> {
    fn index_of(&mut self, key: &'a str) -> u64 {
        let table = &mut self.table;
        *self.indexes.entry(key).or_insert_with(|| {
            let index = table.len() as u64;
            table.push(key.to_owned());
            index
        })
    }
}

/// The protobuf messages, for prost. Only `Record` is decoded with them; `AggregatedRecord` is
/// only encoded (decoding it whole would hold every user record at once, see the module docs).
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AggregatedRecord {
        #[prost(string, repeated, tag = "1")]
        pub partition_key_table: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub explicit_hash_key_table: Vec<String>,
        #[prost(message, repeated, tag = "3")]
        pub records: Vec<Record>,
    }

    /// `partition_key_index` and `data` are `required` in the schema. They are `optional` here
    /// because prost does not enforce `required`: an `Option` tells "absent" from "zero/empty",
    /// and the encoding of `Some` is the same. Field 4 (`repeated Tag tags`) is left out on
    /// purpose, so prost skips it without allocating.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Record {
        #[prost(uint64, optional, tag = "1")]
        pub partition_key_index: Option<u64>,
        #[prost(uint64, optional, tag = "2")]
        pub explicit_hash_key_index: Option<u64>,
        #[prost(bytes = "vec", optional, tag = "3")]
        pub data: Option<Vec<u8>>,
    }
}

/// Field numbers of `AggregatedRecord`.
const PARTITION_KEY_TABLE: u32 = 1;
const EXPLICIT_HASH_KEY_TABLE: u32 = 2;
const RECORDS: u32 = 3;

fn decode_user_record(
    sub_sequence_number: u64,
    bytes: &[u8],
    tables: &KeyTables<'_>,
    produced: &mut usize,
) -> Result<UserRecord, KplError> {
    let record = proto::Record::decode(bytes).map_err(|error| KplError::Decode {
        sub_sequence_number,
        error,
    })?;
    let missing = |field| KplError::MissingField {
        sub_sequence_number,
        field,
    };
    let partition_key_index = record
        .partition_key_index
        .ok_or_else(|| missing("partition_key_index"))?;
    let data = record.data.ok_or_else(|| missing("data"))?;

    let partition_key = lookup(&tables.partition_keys, partition_key_index).ok_or(
        KplError::PartitionKeyIndexOutOfRange {
            sub_sequence_number,
            index: partition_key_index,
            table_len: tables.partition_keys.len(),
        },
    )?;
    let explicit_hash_key = match record.explicit_hash_key_index {
        None => None,
        Some(index) => Some(lookup(&tables.explicit_hash_keys, index).ok_or(
            KplError::ExplicitHashKeyIndexOutOfRange {
                sub_sequence_number,
                index,
                table_len: tables.explicit_hash_keys.len(),
            },
        )?),
    };

    // Checked before the keys are copied: copies of shared keys are the only amplification.
    *produced = produced
        .saturating_add(partition_key.len())
        .saturating_add(explicit_hash_key.map_or(0, str::len))
        .saturating_add(data.len());
    if *produced > MAX_DEAGGREGATED_BYTES {
        return Err(KplError::TooLarge {
            sub_sequence_number,
            limit: MAX_DEAGGREGATED_BYTES,
        });
    }

    Ok(UserRecord {
        sub_sequence_number,
        partition_key: partition_key.to_owned(),
        explicit_hash_key: explicit_hash_key.map(str::to_owned),
        data,
    })
}

fn lookup<'a>(table: &[&'a str], index: u64) -> Option<&'a str> {
    usize::try_from(index)
        .ok()
        .and_then(|index| table.get(index))
        .copied()
}

/// How many of each `AggregatedRecord` field the message holds.
#[derive(Debug, Default)]
struct FieldCounts {
    partition_keys: usize,
    explicit_hash_keys: usize,
    records: usize,
}

/// First walk: validate the top-level wire format and count, stopping as soon as a limit is
/// passed, so that nothing is allocated for an oversized aggregate.
fn count_fields(message: &[u8]) -> Result<FieldCounts, KplError> {
    let mut counts = FieldCounts::default();
    for field in WireFields::new(message) {
        let field = field?;
        let (count, too_many) = match field.number {
            PARTITION_KEY_TABLE => (
                &mut counts.partition_keys,
                KplError::TableTooLarge {
                    table: KeyTable::PartitionKey,
                    limit: MAX_USER_RECORDS,
                },
            ),
            EXPLICIT_HASH_KEY_TABLE => (
                &mut counts.explicit_hash_keys,
                KplError::TableTooLarge {
                    table: KeyTable::ExplicitHashKey,
                    limit: MAX_USER_RECORDS,
                },
            ),
            RECORDS => (
                &mut counts.records,
                KplError::TooManyRecords {
                    limit: MAX_USER_RECORDS,
                },
            ),
            // Unknown fields are skipped, as protobuf requires for forward compatibility.
            _ => continue,
        };
        if !matches!(field.value, WireValue::LengthDelimited(_)) {
            return Err(KplError::Malformed {
                offset: field.offset,
                reason: "a table entry or user record is not length-delimited",
            });
        }
        *count += 1;
        if *count > MAX_USER_RECORDS {
            return Err(too_many);
        }
    }
    Ok(counts)
}

/// The key tables, borrowed from the aggregate's bytes.
struct KeyTables<'a> {
    partition_keys: Vec<&'a str>,
    explicit_hash_keys: Vec<&'a str>,
}

impl<'a> KeyTables<'a> {
    /// Second walk: collect the key tables. `counts` come from [`count_fields`] on the same
    /// message, so they are real counts within the limits, not claims read from the input.
    fn borrow(message: &'a [u8], counts: &FieldCounts) -> Result<Self, KplError> {
        let mut tables = KeyTables {
            partition_keys: Vec::with_capacity(counts.partition_keys),
            explicit_hash_keys: Vec::with_capacity(counts.explicit_hash_keys),
        };
        for field in WireFields::new(message) {
            let field = field?;
            let (table, entries) = match field.number {
                PARTITION_KEY_TABLE => (KeyTable::PartitionKey, &mut tables.partition_keys),
                EXPLICIT_HASH_KEY_TABLE => {
                    (KeyTable::ExplicitHashKey, &mut tables.explicit_hash_keys)
                }
                _ => continue,
            };
            if let WireValue::LengthDelimited(bytes) = field.value {
                let key = std::str::from_utf8(bytes).map_err(|_| KplError::InvalidUtf8 {
                    table,
                    entry: entries.len(),
                })?;
                entries.push(key);
            }
        }
        Ok(tables)
    }
}

/// A top-level protobuf field as found on the wire.
struct WireField<'a> {
    /// Where the field's key starts, in bytes from the start of the record (magic included).
    offset: usize,
    number: u32,
    value: WireValue<'a>,
}

enum WireValue<'a> {
    /// A varint, 64-bit or 32-bit value: none of our fields, so its value is not kept.
    Scalar,
    LengthDelimited(&'a [u8]),
}

/// Iterates over the fields of one protobuf message without allocating; stops after the first
/// error.
struct WireFields<'a> {
    message: &'a [u8],
    position: usize,
}

impl<'a> WireFields<'a> {
    fn new(message: &'a [u8]) -> Self {
        WireFields {
            message,
            position: 0,
        }
    }

    fn malformed(&self, position: usize, reason: &'static str) -> KplError {
        KplError::Malformed {
            offset: KPL_MAGIC.len().saturating_add(position),
            reason,
        }
    }

    fn read_field(&mut self) -> Result<WireField<'a>, KplError> {
        let start = self.position;
        let key = u32::try_from(self.read_varint()?)
            .map_err(|_| self.malformed(start, "field key does not fit in 32 bits"))?;
        let number = key >> 3;
        if number == 0 {
            return Err(self.malformed(start, "field number 0"));
        }
        let value = match key & 0b111 {
            0 => {
                self.read_varint()?;
                WireValue::Scalar
            }
            1 => {
                self.take(8, start)?;
                WireValue::Scalar
            }
            2 => {
                let len = self.read_varint()?;
                WireValue::LengthDelimited(self.take(len, start)?)
            }
            5 => {
                self.take(4, start)?;
                WireValue::Scalar
            }
            3 | 4 => return Err(self.malformed(start, "protobuf groups are not supported")),
            _ => return Err(self.malformed(start, "invalid wire type")),
        };
        Ok(WireField {
            offset: KPL_MAGIC.len().saturating_add(start),
            number,
            value,
        })
    }

    fn read_varint(&mut self) -> Result<u64, KplError> {
        let start = self.position;
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.message.get(self.position) else {
                return Err(self.malformed(start, "truncated varint"));
            };
            self.position += 1;
            // The tenth byte holds only the 64th bit.
            if shift == 63 && byte > 1 {
                break;
            }
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.malformed(start, "varint longer than 64 bits"))
    }

    /// The next `len` bytes; an error names the field that claimed them.
    fn take(&mut self, len: u64, field_start: usize) -> Result<&'a [u8], KplError> {
        let start = self.position;
        let bytes = usize::try_from(len)
            .ok()
            .and_then(|len| start.checked_add(len))
            .and_then(|end| self.message.get(start..end))
            .ok_or_else(|| {
                self.malformed(field_start, "field runs past the end of the protobuf")
            })?;
        self.position += bytes.len();
        Ok(bytes)
    }
}

impl<'a> Iterator for WireFields<'a> {
    type Item = Result<WireField<'a>, KplError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.position >= self.message.len() {
            return None;
        }
        let field = self.read_field();
        if field.is_err() {
            self.position = self.message.len();
        }
        Some(field)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry<'a>(
        partition_key: &'a str,
        explicit_hash_key: Option<&'a str>,
        data: &'a [u8],
    ) -> AggregateEntry<'a> {
        AggregateEntry {
            partition_key,
            explicit_hash_key,
            data,
        }
    }

    /// Magic + `message` + its correct digest: lets a test reach the protobuf checks.
    fn with_digest(message: &[u8]) -> Vec<u8> {
        let mut out = KPL_MAGIC.to_vec();
        out.extend_from_slice(message);
        out.extend_from_slice(&Md5::digest(message));
        out
    }

    /// The protobuf between magic and digest.
    fn message_of(aggregate: &[u8]) -> &[u8] {
        &aggregate[KPL_MAGIC.len()..aggregate.len() - DIGEST_LEN]
    }

    // A minimal protobuf writer, independent of prost, so tests can build what prost would not.
    fn varint(mut value: u64, out: &mut Vec<u8>) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    fn bytes_field(number: u32, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(u64::from(number) << 3 | 2, &mut out);
        varint(bytes.len() as u64, &mut out);
        out.extend_from_slice(bytes);
        out
    }

    fn varint_field(number: u32, value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        varint(u64::from(number) << 3, &mut out);
        varint(value, &mut out);
        out
    }

    fn deaggregate_ok(data: &[u8]) -> Vec<UserRecord> {
        deaggregate(data).unwrap().expect("an aggregate")
    }

    fn user(sub: u64, key: &str, hash_key: Option<&str>, data: &[u8]) -> UserRecord {
        UserRecord {
            sub_sequence_number: sub,
            partition_key: key.to_owned(),
            explicit_hash_key: hash_key.map(str::to_owned),
            data: data.to_vec(),
        }
    }

    #[test]
    fn wire_format_matches_the_published_schema() {
        // partition_key_table = ["a"], records = [{ partition_key_index: 0, data: "hi" }],
        // written by hand from the .proto, not by prost.
        let message = [
            0x0A, 0x01, b'a', // field 1, length 1, "a"
            0x1A, 0x06, // field 3, length 6
            0x08, 0x00, // partition_key_index = 0
            0x1A, 0x02, b'h', b'i', // data = "hi"
        ];
        assert_eq!(aggregate(&[entry("a", None, b"hi")]), with_digest(&message));
        assert_eq!(
            deaggregate_ok(&with_digest(&message)),
            vec![user(0, "a", None, b"hi")]
        );
    }

    #[test]
    fn round_trips_one_record() {
        let data = aggregate(&[entry("key", None, b"payload")]);
        assert!(is_aggregated(&data));
        assert_eq!(
            deaggregate_ok(&data),
            vec![user(0, "key", None, b"payload")]
        );
    }

    #[test]
    fn round_trips_many_records_in_order() {
        let payloads: Vec<Vec<u8>> = (0..500)
            .map(|i| format!("record {i}").into_bytes())
            .collect();
        let keys: Vec<String> = (0..500).map(|i| format!("key-{i}")).collect();
        let entries: Vec<_> = keys
            .iter()
            .zip(&payloads)
            .map(|(key, data)| entry(key, None, data))
            .collect();
        let users = deaggregate_ok(&aggregate(&entries));
        assert_eq!(users.len(), 500);
        for (i, user) in users.iter().enumerate() {
            assert_eq!(user.sub_sequence_number, i as u64);
            assert_eq!(user.partition_key, keys[i]);
            assert_eq!(user.data, payloads[i]);
        }
    }

    #[test]
    fn shared_partition_keys_are_stored_once() {
        let entries = [
            entry("a", None, b"1"),
            entry("b", None, b"2"),
            entry("a", None, b"3"),
            entry("a", None, b"4"),
        ];
        let data = aggregate(&entries);
        let message = proto::AggregatedRecord::decode(message_of(&data)).unwrap();
        assert_eq!(message.partition_key_table, ["a", "b"]);
        let indexes: Vec<_> = message
            .records
            .iter()
            .map(|r| r.partition_key_index)
            .collect();
        assert_eq!(indexes, [Some(0), Some(1), Some(0), Some(0)]);
        assert_eq!(
            deaggregate_ok(&data),
            vec![
                user(0, "a", None, b"1"),
                user(1, "b", None, b"2"),
                user(2, "a", None, b"3"),
                user(3, "a", None, b"4"),
            ]
        );
    }

    #[test]
    fn explicit_hash_keys_round_trip() {
        let big = "340282366920938463463374607431768211455";
        let entries = [
            entry("a", Some("0"), b"1"),
            entry("b", None, b"2"),
            entry("c", Some(big), b"3"),
            entry("d", Some("0"), b"4"),
        ];
        let data = aggregate(&entries);
        let message = proto::AggregatedRecord::decode(message_of(&data)).unwrap();
        assert_eq!(message.explicit_hash_key_table, ["0", big]);
        assert_eq!(
            deaggregate_ok(&data),
            vec![
                user(0, "a", Some("0"), b"1"),
                user(1, "b", None, b"2"),
                user(2, "c", Some(big), b"3"),
                user(3, "d", Some("0"), b"4"),
            ]
        );
    }

    #[test]
    fn empty_payloads_round_trip() {
        let data = aggregate(&[entry("a", None, b""), entry("a", None, b"")]);
        assert_eq!(
            deaggregate_ok(&data),
            vec![user(0, "a", None, b""), user(1, "a", None, b"")]
        );
    }

    #[test]
    fn plain_records_pass_through() {
        for plain in [
            &b""[..],
            b"{\"id\":1}",
            b"hello",
            &KPL_MAGIC[..3],
            // The magic later in the record does not count.
            &[
                0x00, 0xF3, 0x89, 0x9A, 0xC2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        ] {
            assert!(!is_aggregated(plain));
            assert!(deaggregate(plain).unwrap().is_none());
        }
    }

    #[test]
    fn corrupt_magic_is_a_plain_record() {
        let mut data = aggregate(&[entry("a", None, b"x")]);
        data[1] ^= 0x01;
        assert!(!is_aggregated(&data));
        assert!(deaggregate(&data).unwrap().is_none());
    }

    #[test]
    fn digest_mismatch_is_an_error() {
        let mut data = aggregate(&[entry("a", None, b"x")]);
        let last = data.len() - 1;
        data[last] ^= 0xFF;
        assert!(is_aggregated(&data));
        let error = deaggregate(&data).unwrap_err();
        assert!(matches!(error, KplError::DigestMismatch { .. }), "{error}");
        assert!(!error.is_retryable());

        // A changed payload byte is caught by the digest too.
        let mut data = aggregate(&[entry("a", None, b"x")]);
        let payload = data.len() - DIGEST_LEN - 1;
        data[payload] = b'y';
        let error = deaggregate(&data).unwrap_err();
        let KplError::DigestMismatch { carried, computed } = error else {
            panic!("{error}");
        };
        assert_ne!(carried, computed);
        assert!(error.to_string().contains(&hex(&computed)));
    }

    #[test]
    fn too_short_is_an_error_not_a_plain_record() {
        for len in KPL_MAGIC.len()..MIN_AGGREGATE_LEN {
            let mut data = KPL_MAGIC.to_vec();
            data.resize(len, 0);
            assert!(is_aggregated(&data));
            assert!(
                matches!(deaggregate(&data), Err(KplError::TooShort { len: l }) if l == len),
                "{len}"
            );
        }
    }

    #[test]
    fn empty_aggregate_is_an_error() {
        // Magic and the digest of an empty protobuf: the shortest well-formed aggregate.
        let data = with_digest(b"");
        assert_eq!(data.len(), MIN_AGGREGATE_LEN);
        assert!(matches!(deaggregate(&data), Err(KplError::Empty)));
        assert!(matches!(deaggregate(&aggregate(&[])), Err(KplError::Empty)));
        // Tables without records are still empty.
        let data = with_digest(&bytes_field(1, b"a"));
        assert!(matches!(deaggregate(&data), Err(KplError::Empty)));
    }

    #[test]
    fn truncated_protobuf_is_an_error() {
        let data = aggregate(&[entry("a", None, b"payload"), entry("b", None, b"more")]);
        let message = message_of(&data);
        for cut in 1..message.len() {
            let truncated = with_digest(&message[..cut]);
            match deaggregate(&truncated) {
                Err(
                    KplError::Malformed { .. }
                    | KplError::Decode { .. }
                    | KplError::Empty
                    | KplError::MissingField { .. },
                ) => {}
                // Cutting exactly between user records leaves a shorter, valid aggregate.
                Ok(Some(users)) => assert_eq!(users, vec![user(0, "a", None, b"payload")]),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        // A length that runs past the end is reported with its position in the record.
        let error = deaggregate(&with_digest(&[0x0A, 0x05, b'a'])).unwrap_err();
        assert!(
            matches!(error, KplError::Malformed { offset: 4, .. }),
            "{error}"
        );
    }

    #[test]
    fn malformed_sub_record_names_it() {
        let mut message = bytes_field(1, b"a");
        message.extend(bytes_field(
            3,
            &[varint_field(1, 0), bytes_field(3, b"x")].concat(),
        ));
        message.extend(bytes_field(3, &[0x08])); // truncated varint inside Record
        let error = deaggregate(&with_digest(&message)).unwrap_err();
        assert!(
            matches!(
                error,
                KplError::Decode {
                    sub_sequence_number: 1,
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("sub-record 1"), "{error}");
    }

    #[test]
    fn partition_key_index_out_of_range_is_an_error() {
        let mut message = bytes_field(1, b"a");
        message.extend(bytes_field(
            3,
            &[varint_field(1, 0), bytes_field(3, b"x")].concat(),
        ));
        message.extend(bytes_field(
            3,
            &[varint_field(1, 1), bytes_field(3, b"y")].concat(),
        ));
        let error = deaggregate(&with_digest(&message)).unwrap_err();
        assert!(
            matches!(
                error,
                KplError::PartitionKeyIndexOutOfRange {
                    sub_sequence_number: 1,
                    index: 1,
                    table_len: 1
                }
            ),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            "KPL sub-record 1 has partition_key_index 1, but the partition key table has 1 entries"
        );

        // An index beyond usize is out of range too, not a panic.
        let mut message = bytes_field(1, b"a");
        message.extend(bytes_field(
            3,
            &[varint_field(1, u64::MAX), bytes_field(3, b"x")].concat(),
        ));
        assert!(matches!(
            deaggregate(&with_digest(&message)),
            Err(KplError::PartitionKeyIndexOutOfRange {
                index: u64::MAX,
                ..
            })
        ));
    }

    #[test]
    fn explicit_hash_key_index_out_of_range_is_an_error() {
        // With an empty table (the Python deaggregator would ignore the index) ...
        let mut message = bytes_field(1, b"a");
        let record = [varint_field(1, 0), varint_field(2, 0), bytes_field(3, b"x")].concat();
        message.extend(bytes_field(3, &record));
        assert!(matches!(
            deaggregate(&with_digest(&message)),
            Err(KplError::ExplicitHashKeyIndexOutOfRange {
                sub_sequence_number: 0,
                index: 0,
                table_len: 0
            })
        ));
        // ... and past the end of a non-empty one.
        let mut message = [bytes_field(1, b"a"), bytes_field(2, b"7")].concat();
        let record = [varint_field(1, 0), varint_field(2, 3), bytes_field(3, b"x")].concat();
        message.extend(bytes_field(3, &record));
        assert!(matches!(
            deaggregate(&with_digest(&message)),
            Err(KplError::ExplicitHashKeyIndexOutOfRange {
                index: 3,
                table_len: 1,
                ..
            })
        ));
    }

    #[test]
    fn missing_required_fields_are_errors() {
        let table = bytes_field(1, b"a");
        let no_index = [table.clone(), bytes_field(3, &bytes_field(3, b"x"))].concat();
        assert!(matches!(
            deaggregate(&with_digest(&no_index)),
            Err(KplError::MissingField {
                sub_sequence_number: 0,
                field: "partition_key_index"
            })
        ));
        let no_data = [table, bytes_field(3, &varint_field(1, 0))].concat();
        assert!(matches!(
            deaggregate(&with_digest(&no_data)),
            Err(KplError::MissingField { field: "data", .. })
        ));
    }

    #[test]
    fn invalid_utf8_key_is_an_error() {
        let mut message = [bytes_field(1, b"a"), bytes_field(2, &[0xFF])].concat();
        message.extend(bytes_field(
            3,
            &[varint_field(1, 0), bytes_field(3, b"x")].concat(),
        ));
        assert!(matches!(
            deaggregate(&with_digest(&message)),
            Err(KplError::InvalidUtf8 {
                table: KeyTable::ExplicitHashKey,
                entry: 0
            })
        ));
    }

    #[test]
    fn tags_and_unknown_fields_are_skipped() {
        let tag = [bytes_field(1, b"tag"), bytes_field(2, b"value")].concat();
        let record = [
            varint_field(1, 0),
            bytes_field(3, b"x"),
            bytes_field(4, &tag),
            varint_field(9, 42), // unknown field inside Record
        ]
        .concat();
        let message = [
            varint_field(15, 1), // unknown top-level fields of every wire type
            bytes_field(3, &record),
            vec![0x81, 0x01, 1, 2, 3, 4, 5, 6, 7, 8], // field 16, 64-bit
            bytes_field(1, b"k"), // a table entry after the records still counts
            vec![0x8D, 0x01, 1, 2, 3, 4], // field 17, 32-bit
            bytes_field(20, b"ignored"),
        ]
        .concat();
        assert_eq!(
            deaggregate_ok(&with_digest(&message)),
            vec![user(0, "k", None, b"x")]
        );
    }

    #[test]
    fn malformed_top_level_is_an_error() {
        let record = bytes_field(3, &[varint_field(1, 0), bytes_field(3, b"x")].concat());
        for (prefix, reason) in [
            (vec![0x00, 0x00], "field number 0"),
            (vec![0x0B], "protobuf groups are not supported"),
            (vec![0x0E], "invalid wire type"),
            (
                varint_field(3, 1),
                "a table entry or user record is not length-delimited",
            ),
            (vec![0x80; 11], "varint longer than 64 bits"),
            (
                vec![0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
                "field key does not fit in 32 bits",
            ),
        ] {
            let message = [prefix, bytes_field(1, b"a"), record.clone()].concat();
            match deaggregate(&with_digest(&message)) {
                Err(KplError::Malformed {
                    offset: 4,
                    reason: r,
                }) => assert_eq!(r, reason),
                other => panic!("{reason}: {other:?}"),
            }
        }
    }

    #[test]
    fn too_many_records_are_rejected_before_decoding() {
        // Empty `Record`s: two bytes each, invalid if decoded (no required fields), so the
        // count must be what stops them.
        let mut message = bytes_field(1, b"a");
        for _ in 0..=MAX_USER_RECORDS {
            message.extend_from_slice(&[0x1A, 0x00]);
        }
        assert!(matches!(
            deaggregate(&with_digest(&message)),
            Err(KplError::TooManyRecords {
                limit: MAX_USER_RECORDS
            })
        ));

        let mut message = Vec::new();
        for _ in 0..=MAX_USER_RECORDS {
            message.extend_from_slice(&[0x0A, 0x00]);
        }
        assert!(matches!(
            deaggregate(&with_digest(&message)),
            Err(KplError::TableTooLarge {
                table: KeyTable::PartitionKey,
                ..
            })
        ));
    }

    #[test]
    fn shared_key_amplification_is_bounded() {
        // One 8 MiB partition key shared by nine user records would expand to 72 MiB.
        let key = vec![b'k'; 8 * 1024 * 1024];
        let mut message = bytes_field(1, &key);
        let record = bytes_field(3, &[varint_field(1, 0), bytes_field(3, b"")].concat());
        for _ in 0..9 {
            message.extend_from_slice(&record);
        }
        assert!(matches!(
            deaggregate(&with_digest(&message)),
            Err(KplError::TooLarge {
                sub_sequence_number: 8,
                limit: MAX_DEAGGREGATED_BYTES
            })
        ));
        // Eight fit exactly.
        let eight = &message[..message.len() - record.len()];
        assert_eq!(deaggregate_ok(&with_digest(eight)).len(), 8);
    }

    fn arbitrary_key() -> impl Strategy<Value = String> {
        // Mostly a few short keys, so that tables are shared; sometimes any Unicode.
        prop_oneof![3 => "[ab]{0,2}", 1 => any::<String>()]
    }

    fn arbitrary_entries() -> impl Strategy<Value = Vec<(String, Option<String>, Vec<u8>)>> {
        proptest::collection::vec(
            (
                arbitrary_key(),
                proptest::option::of(prop_oneof!["[0-9]{1,39}", arbitrary_key()]),
                proptest::collection::vec(any::<u8>(), 0..64),
            ),
            1..24,
        )
    }

    fn as_entries(owned: &[(String, Option<String>, Vec<u8>)]) -> Vec<AggregateEntry<'_>> {
        owned
            .iter()
            .map(|(key, hash_key, data)| entry(key, hash_key.as_deref(), data))
            .collect()
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let result = deaggregate(&data);
            prop_assert_eq!(is_aggregated(&data), !matches!(result, Ok(None)));
        }

        #[test]
        fn magic_prefixed_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let data = [&KPL_MAGIC[..], &tail].concat();
            prop_assert!(!matches!(deaggregate(&data), Ok(None)));
        }

        #[test]
        fn arbitrary_protobuf_with_a_valid_digest_never_panics(
            message in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            if let Ok(Some(users)) = deaggregate(&with_digest(&message)) {
                prop_assert!(!users.is_empty());
                for (i, user) in users.iter().enumerate() {
                    prop_assert_eq!(user.sub_sequence_number, i as u64);
                }
            }
        }

        #[test]
        fn mutated_aggregates_never_panic(
            owned in arbitrary_entries(),
            mutations in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let mut message = message_of(&aggregate(&as_entries(&owned))).to_vec();
            for (at, byte) in mutations {
                let at = at.index(message.len());
                message[at] = byte;
            }
            let _ = deaggregate(&with_digest(&message));
        }

        #[test]
        fn aggregate_then_deaggregate_round_trips(owned in arbitrary_entries()) {
            let users = deaggregate_ok(&aggregate(&as_entries(&owned)));
            let expected: Vec<_> = owned
                .iter()
                .enumerate()
                .map(|(i, (key, hash_key, data))| user(i as u64, key, hash_key.as_deref(), data))
                .collect();
            prop_assert_eq!(users, expected);
        }
    }
}
